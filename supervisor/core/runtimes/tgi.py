"""Hugging Face Text Generation Inference: one model, loaded at start (`--model-id`)."""

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
    return ("--hostname", "0.0.0.0", "--port", "80")


def _rung_args(options: RungOptions) -> tuple[str, ...]:
    tp = options.tensor_parallel
    return (
        *flag("--max-total-tokens", options.context),
        *flag("--max-concurrent-requests", options.parallel),
        *flag("--num-shard", tp if tp > 1 else None),
        *flag("--served-model-name", options.served_name),
    )


SPEC = RuntimeSpec(
    name=Runtime.TGI,
    title="Text Generation Inference",
    summary="Hugging Face TGI (text-generation-launcher); one model, loaded at start",
    model_handoff=(
        "the hand-off file, read at start (`text-generation-launcher --model-id MODEL`); "
        "or `model_env:` (e.g. MODEL_ID) on recreate"
    ),
    options_handoff=(
        "arguments: --max-total-tokens (context), --max-concurrent-requests (parallel), "
        "--num-shard (tensor parallel), --served-model-name"
    ),
    names_model="--served-model-name",
    not_done="no pull, unload or measured VRAM: the model loads when the container starts",
    template="tgi.yml.j2",
    image="ghcr.io/huggingface/text-generation-inference:latest",
    port=80,
    start_script=(
        READ_HANDOFF + 'exec text-generation-launcher --model-id "$(cat /run/fleetd/model)" "$@"'
    ),
    volumes=("huggingface-cache:/data",),  # the image's HF_HOME
    shm_size="1gb",  # TGI's docs: NCCL shares memory through /dev/shm when sharded
    container_check=ContainerCheck(
        ("CMD", "curl", "-fsS", "http://127.0.0.1:80/health"), start_period="600s"
    ),
    args=_args,
    rung_flags=(
        "--max-total-tokens",
        "--max-concurrent-requests",
        "--num-shard",
        "--served-model-name",
        "--model-id",
    ),
    rung_args=_rung_args,
    rung_options=frozenset({"context", "parallel", "tensor_parallel"}),
    api="TgiApi",
    health_path="/health",
    start_period_s=600.0,
    warmup_path="/generate",
    # TGI sizes its KV pool to the memory it is given, like vLLM.
    overhead_mib=1024,
    context_is_model_max=True,
    one_sequence_at_start=True,
)
