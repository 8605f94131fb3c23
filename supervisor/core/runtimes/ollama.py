"""Ollama: one server that pulls, loads and unloads models through its API."""

from __future__ import annotations

from supervisor.core.runtimes.spec import ContainerCheck, RungOptions, Runtime, RuntimeSpec

# The start script reads the hand-off file when the container starts, so a restart through
# the Docker SDK picks up a new model with the same container (no compose drift).
_START = (
    "ollama serve & pid=$!; trap 'kill -TERM $pid' TERM INT; "
    "until ollama list >/dev/null 2>&1; do sleep 1; done; "
    'ollama pull "$(cat /run/fleetd/model)" || echo "fleetd: pull failed, using local models"; '
    "wait $pid"
)


def _env(options: RungOptions) -> tuple[tuple[str, str], ...]:
    env: tuple[tuple[str, str], ...] = (
        ("OLLAMA_HOST", "0.0.0.0:11434"),
        ("OLLAMA_MAX_LOADED_MODELS", "1"),  # the plan budgets one model per service
        ("OLLAMA_NUM_PARALLEL", str(options.parallel or 1)),  # the slots the KV estimate counted
        ("OLLAMA_KEEP_ALIVE", "-1"),  # budgeted VRAM stays loaded; fleetd unloads on change
    )
    if options.context:
        env += (("OLLAMA_CONTEXT_LENGTH", str(options.context)),)
    return env


SPEC = RuntimeSpec(
    name=Runtime.OLLAMA,
    title="Ollama",
    summary="one server that pulls, loads and unloads models on request",
    model_handoff=(
        "the hand-off file, pulled at start; on a change fleetd pulls the new model through "
        "the API, unloads the old one and restarts the app that names it"
    ),
    options_handoff="environment: OLLAMA_CONTEXT_LENGTH, OLLAMA_NUM_PARALLEL",
    not_done="",
    template="ollama.yml.j2",
    image="ollama/ollama:latest",
    port=11434,
    start_script=_START,
    volumes=("ollama-{service}:/root/.ollama",),
    container_check=ContainerCheck(("CMD-SHELL", "ollama list >/dev/null 2>&1 || exit 1")),
    env=_env,
    api="OllamaApi",
    health_path="/api/version",
    start_period_s=60.0,
    warmup_path="/api/generate",
    can_pull=True,
    can_unload=True,
    reports_measured_vram=True,
    swaps_models=True,
    instance_limited=True,
    overhead_mib=500,
)
