"""SGLang's server: one model, loaded at start, OpenAI-compatible API."""

from __future__ import annotations

from supervisor.core.runtimes.spec import (
    READ_HANDOFF,
    ContainerCheck,
    RungOptions,
    Runtime,
    RuntimeSpec,
    flag,
)


def _args(options: RungOptions) -> tuple[str, ...]:
    return ("--host", "0.0.0.0", "--port", "30000")


def _rung_args(options: RungOptions) -> tuple[str, ...]:
    share = options.memory_share
    tp = options.tensor_parallel
    return (
        *flag("--context-length", options.context),
        *flag("--max-running-requests", options.parallel),
        *flag("--kv-cache-dtype", options.kv_cache),
        *flag("--tp-size", tp if tp > 1 else None),
        *flag("--mem-fraction-static", None if share is None else f"{share:.2f}"),
        *flag("--served-model-name", options.served_name),
    )


SPEC = RuntimeSpec(
    name=Runtime.SGLANG,
    title="SGLang",
    summary="sglang.launch_server; one model, loaded at start, OpenAI-compatible API",
    model_handoff=(
        "the hand-off file, read at start (`sglang.launch_server --model-path MODEL`); "
        "or `model_env:` on recreate"
    ),
    options_handoff=(
        "arguments: --context-length, --max-running-requests (parallel), --kv-cache-dtype, "
        "--tp-size, --mem-fraction-static (the planned share of the rung running), "
        "--served-model-name"
    ),
    names_model="--served-model-name",
    not_done="no pull, unload or measured VRAM: the model loads when the container starts",
    template="sglang.yml.j2",
    image="lmsysorg/sglang:latest",
    port=30000,
    start_script=(
        READ_HANDOFF
        + 'exec python3 -m sglang.launch_server --model-path "$(cat /run/fleetd/model)" "$@"'
    ),
    volumes=("huggingface-cache:/root/.cache/huggingface",),
    # SGLang's docs run it with --shm-size 32g (tensor-parallel workers share memory
    # there); a tmpfs limit, not a reservation.
    shm_size="32gb",
    container_check=ContainerCheck(
        ("CMD", "curl", "-fsS", "http://127.0.0.1:30000/health"), start_period="600s"
    ),
    args=_args,
    rung_flags=(
        "--context-length",
        "--max-running-requests",
        "--kv-cache-dtype",
        "--tp-size",
        "--mem-fraction-static",
        "--served-model-name",
        "--model-path",
    ),
    rung_args=_rung_args,
    takes_memory_share=True,
    rung_options=frozenset({"context", "parallel", "kv_cache", "tensor_parallel"}),
    kv_cache_types=("auto", "fp8_e5m2", "fp8_e4m3"),
    api="SglangApi",
    health_path="/health",
    start_period_s=600.0,
    warmup_path="/v1/completions",
    # SGLang reserves a static share of the GPU for its KV pool, like vLLM.
    overhead_mib=1024,
    context_is_model_max=True,
    one_sequence_at_start=True,
)
