"""NVIDIA Triton Inference Server: a model repository, loaded at start."""

from __future__ import annotations

from supervisor.core.runtimes.spec import Runtime, RuntimeSpec

SPEC = RuntimeSpec(
    name=Runtime.TRITON,
    title="Triton Inference Server",
    summary="tritonserver; a model repository, loaded at start (KServe v2 API)",
    model_handoff=(
        "`model_env:` on recreate, for a command that reads that variable "
        "(e.g. `--model-repository $MODEL`); "
        "fleetd generates no container"
    ),
    options_handoff="none from fleetd: each model's config.pbtxt in the repository",
    not_done=(
        "no generated compose service (run the container yourself and name it in "
        "`containers:`); no warm-up (Triton's model names are the repository's, not the "
        "ladder's); no pull, unload or measured VRAM"
    ),
    api="TritonApi",
    health_path="/v2/health/ready",
    start_period_s=600.0,
    overhead_mib=1024,
)
