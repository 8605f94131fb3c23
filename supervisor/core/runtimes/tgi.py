"""Hugging Face Text Generation Inference: one model, loaded at start (`--model-id`)."""

from __future__ import annotations

from supervisor.core.runtimes.spec import RungOptions, Runtime, RuntimeSpec, flag


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
    model_handoff="`model_env:` (e.g. MODEL_ID) on recreate; fleetd generates no container",
    options_handoff=(
        "`model_env:` recreate: FLEETD_ARGS holds --max-total-tokens, "
        "--max-concurrent-requests, --num-shard and --served-model-name for the command "
        "to append"
    ),
    names_model="--served-model-name (in FLEETD_ARGS)",
    not_done=(
        "no generated compose service (run the container yourself and name it in "
        "`containers:`); no pull, unload or measured VRAM"
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
