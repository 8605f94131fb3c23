"""A generic app: a container that uses a model (often through another service's API)."""

from __future__ import annotations

from supervisor.core.runtimes.spec import Runtime, RuntimeSpec

SPEC = RuntimeSpec(
    name=Runtime.GENERIC,
    title="generic app",
    summary="any container that reads its model name; no runtime API",
    model_handoff="the hand-off file (FLEETD_MODEL_FILE), or `model_env:` on recreate",
    options_handoff="none: the app's own `environment:` and arguments",
    not_done="no API calls: no health checks through an API, no warm-up, no measured VRAM",
    template="generic.yml.j2",
    overhead_mib=500,
)
