"""Hugging Face Text Generation Inference: one model, loaded at start (`--model-id`)."""

from __future__ import annotations

from supervisor.core.runtimes.spec import Runtime, RuntimeSpec

SPEC = RuntimeSpec(
    name=Runtime.TGI,
    title="Text Generation Inference",
    summary="Hugging Face TGI (text-generation-launcher); one model, loaded at start",
    model_handoff="`model_env:` (e.g. MODEL_ID) on recreate; fleetd generates no container",
    options_handoff="none from fleetd: set --max-total-tokens and the like yourself",
    not_done=(
        "no generated compose service (run the container yourself and name it in "
        "`containers:`); no pull, unload or measured VRAM"
    ),
    api="TgiApi",
    health_path="/health",
    start_period_s=600.0,
    warmup_path="/generate",
    # TGI sizes its KV pool to the memory it is given, like vLLM.
    overhead_mib=1024,
    context_is_model_max=True,
    one_sequence_at_start=True,
)
