"""llama.cpp server: one GGUF file, loaded at start."""

from __future__ import annotations

from supervisor.core.runtimes.spec import (
    READ_HANDOFF,
    ContainerCheck,
    RungOptions,
    Runtime,
    RuntimeSpec,
    flag,
)

# `-lv 4` makes llama-server print its buffer report (model, KV cache and compute buffer
# sizes, one line each) at start: fleetd reads it as the rung's measured footprint
# (supervisor.core.footprint). Lower verbosities print none of it.
_VERBOSITY = ("-lv", "4")


def _args(options: RungOptions) -> tuple[str, ...]:
    layers = "0" if options.on_cpu else "999"  # every layer on the GPU, or none
    return ("--host", "0.0.0.0", "--port", "8080", "-ngl", layers, *_VERBOSITY)


def _rung_args(options: RungOptions) -> tuple[str, ...]:
    kv = options.kv_cache
    # A quantized V cache needs flash attention ("V cache quantization requires flash_attn").
    quantized = kv is not None and kv != "f16"
    return (
        "-c",
        str(options.context or 4096),
        "-np",
        str(options.parallel or 1),
        *flag("-ctk", kv),
        *flag("-ctv", kv),
        *(("-fa", "on") if quantized else ()),
        *flag("--alias", options.served_name),
    )


def _rung_env(options: RungOptions) -> tuple[tuple[str, str], ...]:
    # llama-server splits layers over every GPU it sees: the rung's count of them.
    if options.on_cpu or options.tensor_parallel <= 1:
        return ()
    return (("CUDA_VISIBLE_DEVICES", ",".join(str(i) for i in range(options.tensor_parallel))),)


# The upstream images keep the binary in /app; Debian's package (and most distributions)
# put it on PATH.
_START = READ_HANDOFF + (
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
        "arguments: -c (context), -np (parallel slots), -ctk/-ctv (kv_cache; with -fa on "
        "when quantized), its GPUs through CUDA_VISIBLE_DEVICES (tensor_parallel: layers "
        "split over them); always -ngl 999 (0 with `accelerator: cpu`) and -lv 4 (its "
        "buffer report, read as the measured footprint)"
    ),
    names_model="--alias",
    not_done="no pull or unload through the API: the model loads when the container starts",
    template="llamacpp.yml.j2",
    image="ghcr.io/ggml-org/llama.cpp:server-cuda",
    port=8080,
    start_script=_START,
    container_check=ContainerCheck(("CMD-SHELL", _CHECK), start_period="300s"),
    args=_args,
    rung_args=_rung_args,
    rung_env=_rung_env,
    rung_options=frozenset({"context", "parallel", "kv_cache", "tensor_parallel"}),
    kv_cache_types=("f16", "q8_0", "q4_0"),
    rung_flags=(
        "-c",
        "--ctx-size",
        "-np",
        "--parallel",
        "-ctk",
        "--cache-type-k",
        "-ctv",
        "--cache-type-v",
        "-a",
        "--alias",
    ),
    api="LlamaCppApi",
    health_path="/health",
    start_period_s=300.0,
    warmup_path="/v1/completions",
    overhead_mib=300,
    footprint_in_log="llamacpp",
    sized_as_llama_server=True,
)
