"""Cordoned GPUs: fleetd plans on none of them, and moves the services they ran (pure).

A GPU is cordoned when it faults (a critical Xid, off the bus, lost to NVML) or when a
person says so (`fleetctl cordon`); the cordon is in the state and lasts until
`fleetctl uncordon`. Each service the fleet had placed on it goes to the healthy GPUs at
the largest of its rungs, from the one it runs down, that fits there beside the others
(which stay where they are); when none fits it is stopped, with the reason. A fault
never counts as an incident of the service: nothing steps down because a GPU broke.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from supervisor.core.config import FleetConfig
from supervisor.core.gpus import Discovery, Gpu, GpuProcess
from supervisor.core.plan import FleetPlan, RungNeed, place
from supervisor.core.state import Cordon, FleetState


def usable(gpus: Sequence[Gpu], cordoned: Mapping[int, Cordon]) -> tuple[Gpu, ...]:
    """The GPUs as read, each cordoned one made unusable (the planner skips it)."""
    return tuple(
        replace(g, error=f"cordoned: {cordoned[g.index].reason}")
        if g.index in cordoned and g.valid
        else g
        for g in gpus
    )


@dataclass(frozen=True)
class Move:
    """Where a service on a cordoned GPU goes: `rung` on `gpus`, or nowhere (None)."""

    service: str
    from_rung: int
    rung: int | None
    gpus: tuple[int, ...]
    reason: str


def moves_off(
    config: FleetConfig,
    state: FleetState,
    gpu: int,
    gpus: Sequence[Gpu],
    needs: Mapping[str, Sequence[RungNeed]],
    managed_pids: frozenset[int] = frozenset(),
) -> list[Move]:
    """Where each service placed on `gpu` goes now that it is cordoned (`state.cordoned`
    holds it already; `gpus` as read)."""
    others = {i: c for i, c in state.cordoned.items() if i != gpu}
    before = _placed(config, state, usable(gpus, others), needs, managed_pids)
    on_it = {
        name: placed
        for name, placed in before.items()
        if gpu in placed and name in state.services and name in config.services
    }
    if not on_it:
        return []
    stay = {name: placed for name, placed in before.items() if name not in on_it}
    after = _holding(usable(gpus, state.cordoned), stay, state, needs)
    only_moving = config.model_copy(
        update={"services": {n: s for n, s in config.services.items() if n in on_it}}
    )
    plan = _trial(only_moving, state, after, needs, managed_pids, set(on_it))
    moves = []
    for name in on_it:
        current = state.services[name].rung
        target = plan.services[name]
        if target.rung is None:
            why = target.reason or "no healthy GPU has room"
            moves.append(Move(name, current, None, (), why))
            continue
        rung = current + target.rung
        where = target.gpus or ((target.gpu,) if target.gpu is not None else ())
        on = "GPU" + ("s " if len(where) > 1 else " ") + ", ".join(map(str, where))
        what = "the same rung" if rung == current else f"rung {rung}, the largest that fits"
        moves.append(Move(name, current, rung, where, f"moved to {on} at {what}"))
    return moves


def _holding(
    gpus: Sequence[Gpu],
    stay: Mapping[str, tuple[int, ...]],
    state: FleetState,
    needs: Mapping[str, Sequence[RungNeed]],
) -> tuple[Gpu, ...]:
    """The GPUs with what the services that stay hold on them taken from their room, as
    processes of their own (the planner then places only the moving ones)."""
    held: dict[int, list[GpuProcess]] = {}
    for number, (name, placed) in enumerate(sorted(stay.items())):
        current = state.services.get(name)
        priced = needs[name]
        at = min(current.rung if current is not None else 0, len(priced) - 1)
        for gpu in placed:
            held.setdefault(gpu, []).append(GpuProcess(-1 - number, priced[at].need_bytes))
    return tuple(
        replace(g, processes=(*g.processes, *held[g.index]))
        if g.index in held and g.processes is not None
        else g
        for g in gpus
    )


def _placed(
    config: FleetConfig,
    state: FleetState,
    gpus: Sequence[Gpu],
    needs: Mapping[str, Sequence[RungNeed]],
    managed_pids: frozenset[int],
) -> dict[str, tuple[int, ...]]:
    """Each placed service's GPUs with every service on its current rung."""
    plan = _trial(config, state, gpus, needs, managed_pids, set())
    return {
        name: p.gpus or ((p.gpu,) if p.gpu is not None else ())
        for name, p in plan.services.items()
        if p.rung is not None
    }


def _trial(
    config: FleetConfig,
    state: FleetState,
    gpus: Sequence[Gpu],
    needs: Mapping[str, Sequence[RungNeed]],
    managed_pids: frozenset[int],
    moving: set[str],
) -> FleetPlan:
    """The fleet planned with each service on its current rung (a moving one may go
    lower)."""
    services, trial_needs = {}, {}
    for name, svc in config.services.items():
        current = state.services.get(name)
        at = min(current.rung if current is not None else 0, len(svc.ladder) - 1)
        priced = needs[name]
        if name in moving:
            ladder, priced_rungs = svc.ladder[at:], list(priced[at:])
        else:  # an ensemble is priced as one rung: its largest member
            ladder, priced_rungs = [svc.ladder[at]], [priced[min(at, len(priced) - 1)]]
        services[name] = svc.model_copy(update={"ladder": ladder})
        trial_needs[name] = [replace(n, rung=i) for i, n in enumerate(priced_rungs)]
    trial = config.model_copy(update={"services": services})
    return place(trial, Discovery(gpus=tuple(gpus)), trial_needs, managed_pids)
