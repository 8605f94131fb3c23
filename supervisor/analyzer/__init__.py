"""The resource analyzer: config + GPUs -> a plan a person can check.

It prices every rung (declared, measured, or estimated from the model's metadata: this
may read model files) and hands the prices to `plan.place`, which places the fleet.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from supervisor.analyzer.estimate import estimate_model
from supervisor.core.config import FleetConfig, RungConfig, ServiceConfig
from supervisor.core.gpus import Discovery
from supervisor.core.plan import FleetPlan, NeedSource, RungNeed, place
from supervisor.core.rungs import measured_key
from supervisor.core.runtimes import Runtime, spec_of
from supervisor.core.state import Measured
from supervisor.core.units import MIB, format_size


def rung_need(
    config: FleetConfig,
    runtime: Runtime,
    index: int,
    rung: RungConfig,
    measured: Mapping[str, Measured] | None = None,
) -> RungNeed:
    """A rung's VRAM need: declared as its whole need; else measured, when fleetd has seen
    the model loaded (the runtime's figure plus its overhead); else estimated."""
    if rung.vram is not None:
        return RungNeed(index, rung.model, rung.vram, "declared", "declared in the config")
    seen = (measured or {}).get(measured_key(rung))
    if seen is not None and seen.vram_bytes and seen.holds_for(rung.context, rung.parallel):
        overhead = spec_of(runtime).overhead_mib * MIB
        when = time.strftime("%Y-%m-%d", time.gmtime(seen.at))
        detail = (
            f"measured {format_size(seen.vram_bytes)} loaded ({when}{_report(seen)}) + "
            f"{runtime.value} overhead {format_size(overhead)}"
        )
        return RungNeed(index, rung.model, seen.vram_bytes + overhead, "measured", detail)
    assert rung.metadata is not None  # the config refuses a rung with neither
    estimate = estimate_model(
        config.resolve(rung.metadata), runtime, rung.context, rung.parallel, rung.kv_cache
    )
    source: NeedSource = "gguf" if estimate.source == "gguf" else "hf"
    need, detail = estimate.total_bytes, estimate.detail
    if rung.tensor_parallel > 1:
        need, detail = per_gpu(need, rung.tensor_parallel, spec_of(runtime).overhead_mib * MIB)
        detail = f"{estimate.detail}; {detail}"
    return RungNeed(index, rung.model, need, source, detail)


def per_gpu(total_bytes: int, gpus: int, overhead_bytes: int) -> tuple[int, str]:
    """What each of `gpus` GPUs needs for a rung of `total_bytes` (one overhead in it):
    an even share of the rest, plus the runtime's overhead on every GPU."""
    share = -(-(total_bytes - overhead_bytes) // gpus)
    need = share + overhead_bytes
    return need, (
        f"split over {gpus} GPUs: {format_size(share)} + overhead {format_size(overhead_bytes)}"
        f" = {format_size(need)} on each"
    )


def _report(seen: Measured) -> str:
    """`; runtime's report b11669: weights 59.2 MiB + KV 4.0 MiB + compute 18.0 MiB`."""
    if seen.parts is None:
        return ""
    names = {"model": "weights", "kv": "KV", "compute": "compute", "output": "output"}
    parts = " + ".join(f"{names.get(k, k)} {format_size(v)}" for k, v in seen.parts.items() if v)
    build = f" {seen.version}" if seen.version else ""
    return f"; the runtime's own report{build}: {parts}"


def service_needs(
    config: FleetConfig, service: ServiceConfig, measured: Mapping[str, Measured] | None = None
) -> list[RungNeed]:
    """Every rung's need; an ensemble (one model loaded at a time) is one rung that needs
    what its largest member needs."""
    if service.ensemble is None:
        return [
            rung_need(config, service.runtime, i, r, measured) for i, r in enumerate(service.ladder)
        ]
    members = [rung_need(config, service.runtime, 0, r, measured) for r in service.ensemble]
    largest = max(members, key=lambda n: n.need_bytes)
    detail = (
        f"ensemble of {len(members)} models, one loaded at a time; the largest is "
        f"{largest.model} ({largest.source}: {largest.detail})"
    )
    first = service.ensemble[0].model
    return [RungNeed(0, first, largest.need_bytes, largest.source, detail)]


def analyze(
    config: FleetConfig,
    discovery: Discovery,
    managed_pids: frozenset[int] = frozenset(),
    measured: Mapping[str, Measured] | None = None,
) -> FleetPlan:
    """Plan the fleet on these GPUs; every rung priced, every refusal explained."""
    return place(config, discovery, prices(config, measured), managed_pids)


def prices(
    config: FleetConfig, measured: Mapping[str, Measured] | None = None
) -> dict[str, list[RungNeed]]:
    """Every service's rungs, priced."""
    return {name: service_needs(config, svc, measured) for name, svc in config.services.items()}
