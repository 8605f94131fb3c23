"""Ollama: one server that pulls, loads and unloads models through its API."""

from __future__ import annotations

from supervisor.core.runtimes.spec import (
    READ_HANDOFF,
    ContainerCheck,
    RungOptions,
    Runtime,
    RuntimeSpec,
)

# The start script reads the hand-off file when the container starts, so a restart through
# the Docker SDK picks up a new model with the same container (no compose drift).
_START = READ_HANDOFF + (
    "ollama serve & pid=$!; trap 'kill -TERM $pid' TERM INT; "
    "until ollama list >/dev/null 2>&1; do sleep 1; done; "
    'ollama pull "$(cat /run/fleetd/model)" || echo "fleetd: pull failed, using local models"; '
    "wait $pid"
)


def _env(options: RungOptions) -> tuple[tuple[str, str], ...]:
    return (
        ("OLLAMA_HOST", "0.0.0.0:11434"),
        ("OLLAMA_MAX_LOADED_MODELS", "1"),  # the plan budgets one model per service
        ("OLLAMA_KEEP_ALIVE", "-1"),  # budgeted VRAM stays loaded; fleetd unloads on change
    )


def _rung_env(options: RungOptions) -> tuple[tuple[str, str], ...]:
    env: tuple[tuple[str, str], ...] = (
        ("OLLAMA_NUM_PARALLEL", str(options.parallel or 1)),  # the slots the KV estimate counted
    )
    if options.context:  # the stable model fleetd creates carries it as num_ctx too
        env += (("OLLAMA_CONTEXT_LENGTH", str(options.context)),)
    if options.kv_cache:  # server-wide in Ollama; a quantized cache needs flash attention
        env += (("OLLAMA_KV_CACHE_TYPE", options.kv_cache),)
        if options.kv_cache != "f16":
            env += (("OLLAMA_FLASH_ATTENTION", "1"),)
    return env


SPEC = RuntimeSpec(
    name=Runtime.OLLAMA,
    title="Ollama",
    summary="one server that pulls, loads and unloads models on request",
    model_handoff=(
        "the hand-off file, pulled at start; on a change fleetd pulls the new model through "
        "the API, unloads the old one and restarts the app that names it"
    ),
    options_handoff=(
        "the stable model's num_ctx (context); environment read at start: "
        "OLLAMA_CONTEXT_LENGTH, OLLAMA_NUM_PARALLEL, OLLAMA_KV_CACHE_TYPE (with "
        "OLLAMA_FLASH_ATTENTION=1 when quantized)"
    ),
    names_model="a model of that name, created through /api/create from the rung's model",
    not_done="",
    template="ollama.yml.j2",
    image="ollama/ollama:latest",
    port=11434,
    start_script=_START,
    volumes=("ollama-{service}:/root/.ollama",),
    container_check=ContainerCheck(("CMD-SHELL", "ollama list >/dev/null 2>&1 || exit 1")),
    env=_env,
    rung_env=_rung_env,
    rung_options=frozenset({"context", "parallel", "kv_cache"}),
    kv_cache_types=("f16", "q8_0", "q4_0"),
    api="OllamaApi",
    health_path="/api/version",
    start_period_s=60.0,
    warmup_path="/api/generate",
    can_pull=True,
    can_unload=True,
    can_create=True,
    reports_measured_vram=True,
    swaps_models=True,
    instance_limited=True,
    overhead_mib=500,
)
