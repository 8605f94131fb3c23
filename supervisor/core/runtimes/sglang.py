"""SGLang's server: one model, loaded at start, OpenAI-compatible API."""

from __future__ import annotations

from supervisor.core.runtimes.spec import Runtime, RuntimeSpec

SPEC = RuntimeSpec(
    name=Runtime.SGLANG,
    title="SGLang",
    summary="sglang.launch_server; one model, loaded at start, OpenAI-compatible API",
    model_handoff=(
        "`model_env:` on recreate, for a command that reads that variable "
        "(e.g. `--model-path $MODEL`); "
        "fleetd generates no container"
    ),
    options_handoff="none from fleetd: set --context-length and --mem-fraction-static yourself",
    not_done=(
        "no generated compose service (run the container yourself and name it in "
        "`containers:`); no pull, unload or measured VRAM"
    ),
    api="SglangApi",
    health_path="/health",
    start_period_s=600.0,
    warmup_path="/v1/completions",
    # SGLang reserves a static share of the GPU for its KV pool, like vLLM.
    overhead_mib=1024,
    context_is_model_max=True,
    one_sequence_at_start=True,
)
