"""llama.cpp server: one GGUF file, loaded at start."""

from __future__ import annotations

from supervisor.core.runtimes.spec import ContainerCheck, RungOptions, Runtime, RuntimeSpec


def _args(options: RungOptions) -> tuple[str, ...]:
    context, parallel = str(options.context or 4096), str(options.parallel or 1)
    return ("--host", "0.0.0.0", "--port", "8080", "-ngl", "999", "-c", context, "-np", parallel)


SPEC = RuntimeSpec(
    name=Runtime.LLAMACPP,
    title="llama.cpp server",
    summary="llama-server; one GGUF file, loaded at start",
    model_handoff="the hand-off file (a GGUF path), read at start (`llama-server -m`)",
    options_handoff="arguments: -c (context), -np (parallel slots), -ngl 999",
    not_done="no pull or unload through the API: the model loads when the container starts",
    template="llamacpp.yml.j2",
    image="ghcr.io/ggml-org/llama.cpp:server-cuda",
    port=8080,
    start_script='exec /app/llama-server -m "$(cat /run/fleetd/model)" "$@"',
    container_check=ContainerCheck(
        ("CMD", "curl", "-fsS", "http://127.0.0.1:8080/health"), start_period="300s"
    ),
    args=_args,
    api="LlamaCppApi",
    health_path="/health",
    warmup_path="/v1/completions",
    overhead_mib=300,
)
