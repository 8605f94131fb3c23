"""TensorRT-LLM's own server (`trtllm-serve`): one model, OpenAI-compatible API."""

from __future__ import annotations

from supervisor.core.runtimes.spec import Runtime, RuntimeSpec

SPEC = RuntimeSpec(
    name=Runtime.TENSORRT,
    title="TensorRT-LLM",
    summary="trtllm-serve; one model or engine, loaded at start, OpenAI-compatible API",
    model_handoff=(
        "`model_env:` on recreate, for a command that reads that variable "
        "(e.g. `trtllm-serve $MODEL`); "
        "fleetd generates no container"
    ),
    options_handoff="none from fleetd: set --max_seq_len and the KV cache fraction yourself",
    not_done=(
        "no generated compose service (run the container yourself and name it in "
        "`containers:`); no pull, unload or measured VRAM; for TensorRT-LLM inside "
        "Triton use runtime `triton`"
    ),
    api="TensorRtLlmApi",
    health_path="/health",
    start_period_s=600.0,
    warmup_path="/v1/completions",
    # Its KV cache takes a fraction of the free GPU memory, like vLLM's pool.
    overhead_mib=1024,
    context_is_model_max=True,
    one_sequence_at_start=True,
)
