"""The status report: what `fleetctl status --json` prints, from fleetd or from state.json.

One builder for both: the daemon answers `status` with it (adding its live view: health,
what a change is doing, itself), and fleetctl without a running fleetd prints the same
report from the saved state. Pure: values in, a JSON-ready dict out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from supervisor.core.endpoints import endpoint_of
from supervisor.core.errors import UsageError
from supervisor.core.plan import gpu_budget_bytes
from supervisor.core.rungs import measured_key
from supervisor.core.state import (
    FleetState,
    Incident,
    ServiceState,
    Transition,
    cordon_json,
    measured_json,
    transition_json,
)

if TYPE_CHECKING:
    from supervisor.core.config import FleetConfig, RungConfig
    from supervisor.core.gpus import Discovery


@dataclass(frozen=True)
class Live:
    """What only a running fleetd knows, per service and about itself."""

    health: Mapping[str, dict[str, Any] | None] = field(default_factory=dict)
    activity: Mapping[str, str | None] = field(default_factory=dict)
    daemon: Mapping[str, Any] = field(default_factory=dict)
    tasks: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # `mode: swarm`


def _last(state: FleetState, service: str) -> Transition | None:
    return next((t for t in reversed(state.history) if t.service == service), None)


def status_json(
    state: FleetState,
    config: FleetConfig | None,
    now: float,
    service: str | None = None,
    live: Live | None = None,
) -> dict[str, Any]:
    """What `fleetctl status --json` prints, with or without a running fleetd.

    Without `live` (fleetctl reading state.json) the live-only fields are null: health,
    activity, daemon; GPUs are added with `gpus_json` by the caller in both cases."""
    if service is not None and service not in state.services:
        known = ", ".join(sorted(state.services)) or "none yet"
        raise UsageError(f"no service {service!r} in the state; services: {known}")
    services = {}
    for name, svc in state.services.items():
        if service is not None and name != service:
            continue
        window = config.policy.incident_window if config else None
        last = _last(state, name)
        rung = _rung(config, name, svc)
        services[name] = {
            "model": svc.model,
            "rung": svc.rung,
            "rungs": len(config.services[name].ladder)
            if config and name in config.services
            else None,
            "state": str(svc.state),
            "in_config": None if config is None else name in config.services,
            "incidents_in_window": _recent(svc, now, window),
            "pinned": svc.pinned,
            "pending": None if svc.pending is None else svc.pending.to_model,
            "last_transition": None if last is None else transition_json(last),
            # the newest incident, with its evidence: why it failed, whatever the class
            "last_incident": _incident(svc.incidents[-1]) if svc.incidents else None,
            "probation_until": svc.probation_until,
            "step_up_not_before": svc.step_up_not_before,
            "measured": _measured(state, svc.model, rung),
            # the running rung's options and the name clients call it by, on every rung
            "options": None if rung is None else rung.options,
            "served_name": config.services[name].client_name
            if config and name in config.services
            else None,
            "endpoint": endpoint_of(config, name) if config and name in config.services else None,
            "ensemble": _members(config, name),
            # fleetd's live view only: a check result and the circuit breaker; what a
            # change is doing now (a pull's progress, a warm-up)
            "health": live.health.get(name) if live else None,
            "activity": live.activity.get(name) if live else None,
            # `mode: swarm`: the task running it now and its node (null on one host)
            "task": _task(live, name),
        }
    return {
        "services": services,
        "gpus": [],
        "gpu_problem": None,
        # GPUs fleetd plans on no more (a fault, or `fleetctl cordon`), by index
        "cordoned": {str(i): cordon_json(c) for i, c in sorted(state.cordoned.items())},
        "daemon": dict(live.daemon) if live else None,
    }


def gpus_json(
    discovery: Discovery, config: FleetConfig | None, managed: frozenset[int] = frozenset()
) -> list[dict[str, Any]]:
    """Per GPU: memory used and total (when NVML reads it) against the fleet's budget, the
    same budget the planner, the metrics and the history use (`gpu_budget_bytes`)."""
    return [
        {
            "index": g.index,
            "name": g.name,
            "uuid": g.uuid,
            "source": g.source,
            "total_bytes": g.total_bytes,
            "used_bytes": g.used_bytes,
            "free_bytes": g.free_bytes,
            "budget_bytes": None if config is None else gpu_budget_bytes(config, g, managed),
            "error": g.error,
        }
        for g in discovery.gpus
    ]


def _task(live: Live | None, name: str) -> dict[str, Any] | None:
    task = live.tasks.get(name) if live else None
    return dict(task) if task else None


def _incident(incident: Incident) -> dict[str, Any]:
    return {
        "time": incident.time,
        "class": str(incident.incident_class),
        "rule": incident.rule,
        "evidence": incident.evidence,
    }


def _members(config: FleetConfig | None, name: str) -> list[str] | None:
    service = config.services.get(name) if config is not None else None
    return [r.model for r in service.ensemble] if service and service.ensemble else None


def _rung(config: FleetConfig | None, name: str, svc: ServiceState) -> RungConfig | None:
    """The config's entry for the rung the service is on (None: not in the config)."""
    service = config.services.get(name) if config is not None else None
    if service is None or svc.rung >= len(service.ladder):
        return None
    return service.ladder[svc.rung]


def _measured(state: FleetState, model: str, rung: RungConfig | None) -> dict[str, Any] | None:
    seen = state.measured.get(measured_key(rung) if rung is not None else model)
    return None if seen is None else measured_json(seen)


def _recent(svc: ServiceState, now: float, window_s: float | None) -> int:
    return sum(1 for i in svc.incidents if window_s is None or i.time > now - window_s)
