"""vLLM's OpenAI-compatible server: one model, loaded at start."""

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
    return ("--host", "0.0.0.0", "--port", "8000")


def _rung_args(options: RungOptions) -> tuple[str, ...]:
    # vLLM takes this share of each GPU for weights, activations and KV cache, so the share
    # follows the rung: a step down frees the difference. Its CPU build sizes its KV cache
    # from VLLM_CPU_KVCACHE_SPACE (GiB) instead: the service's `environment:` sets it.
    share = options.memory_share
    tp = options.tensor_parallel
    return (
        *flag("--max-model-len", options.context),
        *flag("--max-num-seqs", options.parallel),
        *flag("--kv-cache-dtype", options.kv_cache),
        *flag("--tensor-parallel-size", tp if tp > 1 else None),
        *flag("--gpu-memory-utilization", None if share is None else f"{share:.2f}"),
        *flag("--served-model-name", options.served_name),
    )


SPEC = RuntimeSpec(
    name=Runtime.VLLM,
    title="vLLM",
    summary="OpenAI-compatible server; one model, loaded at start",
    model_handoff="the hand-off file, read at start (`vllm serve MODEL`); a change restarts it",
    options_handoff=(
        "arguments: --max-model-len (context), --max-num-seqs (parallel), --kv-cache-dtype, "
        "--tensor-parallel-size, --gpu-memory-utilization (the planned share of the rung "
        "running; on a CPU-only host, VLLM_CPU_KVCACHE_SPACE from the service's environment "
        "instead)"
    ),
    names_model="--served-model-name",
    not_done="no pull or unload through the API: the model loads when the container starts",
    template="vllm.yml.j2",
    image="vllm/vllm-openai:latest",
    port=8000,
    start_script=READ_HANDOFF + 'exec vllm serve "$(cat /run/fleetd/model)" "$@"',
    volumes=("huggingface-cache:/root/.cache/huggingface",),
    # vLLM's processes share tensors through /dev/shm: its docs ask for `--ipc=host` or a
    # larger `--shm-size`; with Docker's 64 MiB it fails at start ("Insufficient space in
    # /dev/shm"). A tmpfs limit, not a reservation: only what vLLM writes there is used.
    shm_size="8gb",
    # Big models take minutes to load.
    container_check=ContainerCheck(
        ("CMD", "curl", "-fsS", "http://127.0.0.1:8000/health"), start_period="600s"
    ),
    args=_args,
    rung_args=_rung_args,
    takes_memory_share=True,
    rung_options=frozenset({"context", "parallel", "kv_cache", "tensor_parallel"}),
    kv_cache_types=("auto", "fp8"),
    rung_flags=(
        "--max-model-len",
        "--max-num-seqs",
        "--kv-cache-dtype",
        "--tensor-parallel-size",
        "-tp",
        "--gpu-memory-utilization",
        "--served-model-name",
    ),
    api="VllmApi",
    health_path="/health",
    start_period_s=600.0,
    warmup_path="/v1/completions",
    overhead_mib=1024,
    footprint_in_log="vllm",
    context_is_model_max=True,
    one_sequence_at_start=True,
)
