"""What a person asks for with fleetctl: reset, downgrade, upgrade, pin, unpin.

Pure decisions on a `FleetState` (no Docker, no files): each either refuses with the
reason (`Refused`) or changes one service's state and says whether its containers must
be restarted into another model (a `PendingChange` with actor "fleetctl", applied by
the same code as fleetd's own step-downs). fleetd runs these in its main loop for the
control API; fleetctl runs them under the state lock when no fleetd is running.

A person's downgrade goes to the next rung whatever its size (only automatic step-downs
skip rungs that are no smaller); moving up is checked against the GPUs first
(`check_fit`), unless forced.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from supervisor.core.config import FleetConfig
from supervisor.core.errors import FleetdError, UsageError
from supervisor.core.gpus import Discovery
from supervisor.core.ladder import describe_rung
from supervisor.core.plan import FleetPlan, RungNeed, limited_titles, place
from supervisor.core.state import FleetState, PendingChange, ServiceState, ServiceStatus
from supervisor.core.units import format_size


class Refused(FleetdError):
    """The operation is understood but not done (exit 1), with the reason."""


@dataclass(frozen=True)
class Fit:
    fits: bool
    reason: str


@dataclass(frozen=True)
class Outcome:
    """What an operation did: the message for a person, and a change still to apply."""

    service: str
    message: str
    change: PendingChange | None = None

    def to_json(self) -> dict[str, object]:
        change = self.change
        return {
            "service": self.service,
            "message": self.message,
            "to_rung": None if change is None else change.to_rung,
            "to_model": None if change is None else change.to_model,
        }


FitCheck = Callable[[str, int], Fit]


def check_fit(
    config: FleetConfig,
    state: FleetState,
    service: str,
    rung: int,
    discovery: Discovery,
    needs: Mapping[str, Sequence[RungNeed]],
    managed_pids: frozenset[int] = frozenset(),
) -> Fit:
    """Would the fleet fit with `service` on `rung` and every other service where it is?

    The planner answers it on the GPUs as read now: each GPU's budget less the memory
    of processes that are not the fleet's, against the fleet's VRAM needs (`needs`, each
    service's rungs priced) at their current rungs. So a step up is predicted before
    anything is loaded, and without reading a model file.
    """
    if not any(g.valid for g in discovery.gpus):
        why = discovery.problem or "no usable GPU"
        return Fit(False, f"cannot check the VRAM: {why}")
    plan = _trial(config, state, service, rung, discovery, needs, managed_pids)
    target = plan.services[service]
    need = target.rungs[0].need  # the service's ladder is just that rung here
    size = format_size(need.need_bytes)
    if target.rung is not None:
        gpu = next(g for g in plan.gpus if g.gpu.index == target.gpu)
        return Fit(
            True,
            f"needs {size}; fits on GPU {target.gpu} beside the others "
            f"({format_size(gpu.headroom_bytes)} of its budget left)",
        )
    others = [n for n, p in plan.services.items() if n != service and p.rung is None]
    if others:
        missing = ", ".join(sorted(others))
        return Fit(False, f"the fleet does not fit as it is ({missing} not placed)")
    pins = config.services[service].pinned_gpus
    rooms = [g for g in plan.gpus if pins is None or g.gpu.index in pins]
    if not rooms:
        return Fit(False, f"needs {size}: {target.reason}")
    best = max(rooms, key=lambda g: g.headroom_bytes)
    if best.headroom_bytes >= need.need_bytes:
        limited = f"{best.ollama_limit} {limited_titles()} "
        why = f"GPU {best.gpu.index} has the room but already runs {limited}"
        return Fit(False, f"needs {size}; {why}service(s), its limit")
    short = format_size(need.need_bytes - best.headroom_bytes)
    return Fit(
        False,
        f"needs {size}; the most room beside the other services is "
        f"{format_size(best.headroom_bytes)} on GPU {best.gpu.index} ({short} short)",
    )


def _trial(
    config: FleetConfig,
    state: FleetState,
    service: str,
    rung: int,
    discovery: Discovery,
    needs: Mapping[str, Sequence[RungNeed]],
    managed_pids: frozenset[int],
) -> FleetPlan:
    """The fleet placed with `service` on `rung` and every other service where it is."""
    services, trial_needs = {}, {}
    for name, svc in config.services.items():
        current = state.services.get(name)
        at = rung if name == service else (current.rung if current is not None else 0)
        at = min(at, len(svc.ladder) - 1)
        services[name] = svc.model_copy(update={"ladder": [svc.ladder[at]]})
        priced = needs[name]  # an ensemble is priced as one rung: its largest member
        trial_needs[name] = [replace(priced[min(at, len(priced) - 1)], rung=0)]
    trial = config.model_copy(update={"services": services})  # each keeps its name
    return place(trial, discovery, trial_needs, managed_pids)


def gpu_total_for(
    config: FleetConfig,
    state: FleetState,
    service: str,
    rung: int,
    discovery: Discovery,
    needs: Mapping[str, Sequence[RungNeed]],
    managed_pids: frozenset[int] = frozenset(),
) -> int | None:
    """The size of the GPU `service` runs on at `rung` (the one the planner places it on
    beside the others; where it is not placed, the smallest it may use), for a share of
    it (vLLM's --gpu-memory-utilization); None without a usable GPU."""
    valid = [g for g in discovery.gpus if g.valid]
    pins = config.services[service].pinned_gpus
    allowed = [g for g in valid if pins is None or g.index in pins] or valid
    if not allowed:
        return None
    if len({g.total_bytes for g in allowed}) == 1:
        return allowed[0].total_bytes
    placed = _trial(config, state, service, rung, discovery, needs, managed_pids)
    gpu = placed.services[service].gpu
    return next(
        (g.total_bytes for g in allowed if g.index == gpu), min(g.total_bytes for g in allowed)
    )


def require_service(
    config: FleetConfig, state: FleetState, name: str, off_ladder_ok: bool = False
) -> ServiceState:
    """The service's state (top rung if fleetd has not run with it); UsageError if unknown,
    Refused if the saved rung is past the end of the config's ladder (unless a reset)."""
    if name not in config.services:
        known = ", ".join(sorted(config.services)) or "none"
        where = " (it is in the saved state only)" if name in state.services else ""
        raise UsageError(f"no service {name!r} in the config{where}; services: {known}")
    current = state.services.get(name)
    if current is None:  # fleetd has not run with it yet: it starts at the top
        top = config.services[name].ladder[0].model
        current = ServiceState(model=top, rung=0)
    rungs = len(config.services[name].ladder)
    if current.rung >= rungs and not off_ladder_ok:
        raise Refused(
            f"{name}: the saved state puts it on rung {current.rung} ({current.model}), past the "
            f"end of its {rungs}-rung ladder (the config changed since); `fleetctl reset {name}` "
            "puts it back on the top rung"
        )
    return current


def _change(config: FleetConfig, name: str, rung: int, reason: str, now: float) -> PendingChange:
    model = config.services[name].ladder[rung].model
    return PendingChange(
        to_rung=rung, to_model=model, reason=reason, decided_at=now, actor="fleetctl"
    )


def _rung_text(config: FleetConfig, name: str, rung: int) -> str:
    return describe_rung(config.services[name], rung)


def parse_rung(config: FleetConfig, name: str, text: str) -> int:
    """A rung given as its 0-based index or as its model name."""
    ladder = config.services[name].ladder
    if text.isdigit():
        rung = int(text)
        if rung < len(ladder):
            return rung
    else:
        for index, r in enumerate(ladder):
            if r.model == text:
                return index
    choices = ", ".join(f"{i} ({r.model})" for i, r in enumerate(ladder))
    raise UsageError(f"rung {text!r} for {name}: expected one of {choices}")


def reset(state: FleetState, config: FleetConfig, name: str, now: float, who: str) -> Outcome:
    """Back to the top rung with counters cleared and any pin removed.

    A change recorded but not applied yet (its hand-off files may already name its rung)
    is replaced by a change to the top rung, even when the service runs there, so that the
    hand-off follows the reset."""
    svc = require_service(config, state, name, off_ladder_ok=True)
    cleared = replace(
        svc,
        state=ServiceStatus.STEADY,
        incidents=[],
        pinned=None,
        pending=None,
        restarts=0,
        last_restart_at=None,
    )
    exhausted = svc.state is ServiceStatus.EXHAUSTED
    if svc.rung == 0 and not exhausted and svc.pending is None:
        state.services[name] = cleared
        return Outcome(name, f"{name}: counters cleared; already at {_rung_text(config, name, 0)}")
    why = " (it was exhausted; its containers start again)" * exhausted
    if svc.pending is not None and svc.pending.to_rung != 0 and not exhausted:
        why = f" (instead of the recorded change to rung {svc.pending.to_rung})"
    change = _change(config, name, 0, f"reset {who}{why}", now)
    state.services[name] = replace(cleared, pending=change)
    return Outcome(name, f"{name}: back to {_rung_text(config, name, 0)}{why}", change)


def _not_pinned(svc: ServiceState, name: str, what: str) -> None:
    if svc.pinned is not None:
        raise Refused(
            f"{name} is pinned at rung {svc.pinned}; `fleetctl unpin {name}` before {what}"
        )


def downgrade(state: FleetState, config: FleetConfig, name: str, now: float, who: str) -> Outcome:
    """The next rung down, now, whatever its size: a person decides."""
    svc = require_service(config, state, name)
    _not_pinned(svc, name, "a downgrade")
    ladder = config.services[name].ladder
    if svc.rung + 1 >= len(ladder):
        raise Refused(f"{name} is already at the bottom, {_rung_text(config, name, svc.rung)}")
    target = svc.rung + 1
    change = _change(config, name, target, f"downgrade {who}", now)
    state.services[name] = replace(svc, pending=change)
    return Outcome(name, f"{name}: down to {_rung_text(config, name, target)}", change)


def upgrade(
    state: FleetState,
    config: FleetConfig,
    name: str,
    now: float,
    who: str,
    fit: FitCheck,
    force: bool = False,
) -> Outcome:
    """One rung up, refused with the reason when the VRAM check says it will not fit."""
    svc = require_service(config, state, name)
    _not_pinned(svc, name, "an upgrade")
    if svc.rung == 0:
        raise Refused(f"{name} is already at the top, {_rung_text(config, name, 0)}")
    target = svc.rung - 1
    reason = f"upgrade {who}" + _fit_note(fit, name, target, force)
    change = _change(config, name, target, reason, now)
    state.services[name] = replace(svc, pending=change)
    return Outcome(name, f"{name}: up to {_rung_text(config, name, target)}", change)


def _fit_note(fit: FitCheck, name: str, target: int, force: bool) -> str:
    """Run the VRAM check for a move up; refuse unless forced (then say it was skipped)."""
    result = fit(name, target)
    if result.fits:
        return f" ({result.reason})"
    if not force:
        raise Refused(
            f"{name}: rung {target} will not fit: {result.reason} (--force to try anyway)"
        )
    return f" (forced; the VRAM check said: {result.reason})"


def pin(
    state: FleetState,
    config: FleetConfig,
    name: str,
    rung_text: str,
    now: float,
    who: str,
    fit: FitCheck,
    force: bool = False,
) -> Outcome:
    """Hold a service on a rung (its index or model): incidents are recorded, never acted on."""
    svc = require_service(config, state, name)
    rung = parse_rung(config, name, rung_text)
    if rung == svc.rung and svc.pending is None:
        state.services[name] = replace(svc, pinned=rung, state=ServiceStatus.PINNED)
        return Outcome(name, f"{name}: pinned at {_rung_text(config, name, rung)}")
    note = _fit_note(fit, name, rung, force) if rung < svc.rung else ""
    change = _change(config, name, rung, f"pin {who}{note}", now)
    state.services[name] = replace(svc, pinned=rung, pending=change)
    return Outcome(name, f"{name}: pinned at {_rung_text(config, name, rung)}", change)


def unpin(state: FleetState, config: FleetConfig, name: str, now: float, who: str) -> Outcome:
    """Let incidents move the service again (counting starts afresh)."""
    svc = require_service(config, state, name)
    if svc.pinned is None:
        return Outcome(name, f"{name}: was not pinned")
    state.services[name] = replace(svc, pinned=None, state=ServiceStatus.STEADY, incidents=[])
    return Outcome(name, f"{name}: unpinned at {_rung_text(config, name, svc.rung)}")


OPERATIONS = ("reset", "downgrade", "upgrade", "pin", "unpin")


def dispatch(
    op: str,
    state: FleetState,
    config: FleetConfig,
    name: str,
    now: float,
    who: str,
    fit: FitCheck,
    rung: str = "",
    force: bool = False,
) -> Outcome:
    """Run operation `op` by name: the one dispatcher of the daemon and of fleetctl offline."""
    if op == "reset":
        return reset(state, config, name, now, who)
    if op == "downgrade":
        return downgrade(state, config, name, now, who)
    if op == "upgrade":
        return upgrade(state, config, name, now, who, fit, force)
    if op == "pin":
        return pin(state, config, name, rung, now, who, fit, force)
    if op == "unpin":
        return unpin(state, config, name, now, who)
    raise UsageError(f"unknown operation {op!r}; expected one of {', '.join(OPERATIONS)}")
