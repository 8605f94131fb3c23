"""llama.cpp server: one GGUF file, loaded at start."""

from __future__ import annotations

from supervisor.core.runtimes.spec import ContainerCheck, RungOptions, Runtime, RuntimeSpec

# `-lv 4` makes llama-server print its buffer report (model, KV cache and compute buffer
# sizes, one line each) at start: fleetd reads it as the rung's measured footprint
# (supervisor.core.footprint). Lower verbosities print none of it.
_VERBOSITY = ("-lv", "4")


def _args(options: RungOptions) -> tuple[str, ...]:
    context, parallel = str(options.context or 4096), str(options.parallel or 1)
    layers = "0" if options.on_cpu else "999"  # every layer on the GPU, or none
    return (
        "--host",
        "0.0.0.0",
        "--port",
        "8080",
        "-ngl",
        layers,
        "-c",
        context,
        "-np",
        parallel,
        *_VERBOSITY,
    )


# The upstream images keep the binary in /app; Debian's package (and most distributions)
# put it on PATH.
_START = (
    'bin=$(command -v llama-server || echo /app/llama-server); exec "$bin" '
    '-m "$(cat /run/fleetd/model)" "$@"'
)
# The upstream server images carry curl; Debian's minimal ones only bash: the check falls
# back to bash's /dev/tcp, so it says "healthy" in both.
_CHECK = (
    "curl -fsS http://127.0.0.1:8080/health || bash -c 'exec 3<>/dev/tcp/127.0.0.1/8080 "
    '&& printf "GET /health HTTP/1.0\\r\\n\\r\\n" >&3 && read -r status <&3 '
    '&& [[ $status == *" 200 "* ]]\''
)

SPEC = RuntimeSpec(
    name=Runtime.LLAMACPP,
    title="llama.cpp server",
    summary="llama-server; one GGUF file, loaded at start",
    model_handoff="the hand-off file (a GGUF path), read at start (`llama-server -m`)",
    options_handoff=(
        "arguments: -c (context), -np (parallel slots), -ngl 999 (0 with `accelerator: cpu`), "
        "-lv 4 (its buffer report, read as the measured footprint)"
    ),
    not_done="no pull or unload through the API: the model loads when the container starts",
    template="llamacpp.yml.j2",
    image="ghcr.io/ggml-org/llama.cpp:server-cuda",
    port=8080,
    start_script=_START,
    container_check=ContainerCheck(("CMD-SHELL", _CHECK), start_period="300s"),
    args=_args,
    api="LlamaCppApi",
    health_path="/health",
    start_period_s=300.0,
    warmup_path="/v1/completions",
    overhead_mib=300,
    footprint_in_log="llamacpp",
    sized_as_llama_server=True,
)
