"""vLLM's OpenAI-compatible server: one model, loaded at start."""

from __future__ import annotations

from supervisor.core.runtimes.spec import ContainerCheck, RungOptions, Runtime, RuntimeSpec


def _args(options: RungOptions) -> tuple[str, ...]:
    args: tuple[str, ...] = ("--host", "0.0.0.0", "--port", "8000")
    if not options.on_cpu:
        # vLLM takes this share of the whole GPU for weights, activations and KV cache. Its
        # CPU build sizes its KV cache from VLLM_CPU_KVCACHE_SPACE (GiB) instead: the
        # service's `environment:` sets it (docs/runtimes.md).
        share = min(0.99, -(-options.need_bytes * 100 // options.gpu_total_bytes) / 100)
        args += ("--gpu-memory-utilization", f"{share:.2f}")
    return args + (("--max-model-len", str(options.context)) if options.context else ())


SPEC = RuntimeSpec(
    name=Runtime.VLLM,
    title="vLLM",
    summary="OpenAI-compatible server; one model, loaded at start",
    model_handoff="the hand-off file, read at start (`vllm serve MODEL`); a change restarts it",
    options_handoff=(
        "arguments: --max-model-len, --gpu-memory-utilization (the planned share; on a "
        "CPU-only host, VLLM_CPU_KVCACHE_SPACE from the service's environment instead)"
    ),
    not_done="no pull or unload through the API: the model loads when the container starts",
    template="vllm.yml.j2",
    image="vllm/vllm-openai:latest",
    port=8000,
    start_script='exec vllm serve "$(cat /run/fleetd/model)" "$@"',
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
    api="VllmApi",
    health_path="/health",
    start_period_s=600.0,
    warmup_path="/v1/completions",
    overhead_mib=1024,
    footprint_in_log="vllm",
    context_is_model_max=True,
    one_sequence_at_start=True,
)
