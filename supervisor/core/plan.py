"""Placing the fleet: priced rungs and GPUs in, a plan a person can check out. Pure.

The glue around the solver (`planner.py`): each GPU's budget, each service's demand, the
solver's answer, and an explanation for every rung it did not choose. The prices (each
rung's VRAM need) come in: the analyzer estimates them from model files, the daemon keeps
the last ones it made, so placing never reads a file.

On a Swarm (`sites`), every node's GPUs are planned at once under fleet-wide indexes; each
GPU's site says which node and which of its GPUs it is, a rung's GPUs share one node, and a
service's `gpu:` pin names GPUs by their index on a node.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from supervisor.core.config import FleetConfig, ServiceConfig
from supervisor.core.gpus import Discovery, Gpu
from supervisor.core.planner import Demand, GpuSlot, Solution, solve
from supervisor.core.runtimes import REGISTRY, spec_of
from supervisor.core.units import GIB, format_size

NeedSource = Literal["declared", "gguf", "hf", "measured"]
# The original request's tiers: 8 GB -> 1 Ollama service, 16 GB -> 2, 24 GB -> 3, 48 GB -> 4.
# Thresholds sit under the marketed sizes: a "16 GB" card reports 15.99 GiB, a T4 15.0,
# ECC cards less again (A10 and L4: 22.5 GiB, L40S and A40: 45.0 GiB).
_OLLAMA_TIERS_GIB = ((42, 4), (21, 3), (14, 2))


@dataclass(frozen=True)
class RungNeed:
    rung: int
    model: str
    need_bytes: int
    source: NeedSource
    detail: str


@dataclass(frozen=True)
class RungVerdict:
    need: RungNeed
    status: Literal["chosen", "rejected", "not tried"]
    reason: str | None = None


@dataclass(frozen=True)
class ServicePlan:
    name: str
    service: ServiceConfig
    rung: int | None
    gpu: int | None
    rungs: tuple[RungVerdict, ...]
    reason: str | None = None  # why it is not placed, with the nearest option
    gpus: tuple[int, ...] = ()  # every GPU the chosen rung spans (tensor_parallel), gpu first

    @property
    def model(self) -> str | None:
        return None if self.rung is None else self.service.ladder[self.rung].model

    @property
    def need_bytes(self) -> int | None:
        return None if self.rung is None else self.rungs[self.rung].need.need_bytes


@dataclass(frozen=True)
class GpuSite:
    """Where a GPU of a Swarm plan is: its node, and its index and UUID there."""

    node_id: str
    hostname: str
    group: int  # the planner's group: one per node
    local_index: int
    uuid: str

    @property
    def node(self) -> str:
        """`gpu-a (h3k9x2q1)`: the hostname and the node ID's first 8 characters."""
        return f"{self.hostname} ({self.node_id[:8]})"


@dataclass(frozen=True)
class GpuPlan:
    gpu: Gpu
    budget_bytes: int
    unmanaged_bytes: int
    planned_bytes: int
    ollama_limit: int  # `ollama_instances_per_gpu` here: the name the config and plan JSON use
    services: tuple[str, ...]
    site: GpuSite | None = None  # on a Swarm: its node

    @property
    def headroom_bytes(self) -> int:
        return self.budget_bytes - self.planned_bytes

    @property
    def local_index(self) -> int:
        """Its index on its own host (what a `gpu:` pin names)."""
        return self.site.local_index if self.site else self.gpu.index

    @property
    def where(self) -> str:
        """`GPU 1`, or on a Swarm `GPU 1 of gpu-a (h3k9x2q1)`."""
        own = f"GPU {self.local_index}"
        return f"{own} of {self.site.node}" if self.site else own


@dataclass(frozen=True)
class FleetPlan:
    config: FleetConfig
    gpus: tuple[GpuPlan, ...]
    services: dict[str, ServicePlan]
    optimal: bool
    notes: tuple[str, ...] = field(default=())
    on_swarm: bool = False  # planned across a Swarm's nodes: every GPU has its site

    @property
    def all_placed(self) -> bool:
        return all(s.rung is not None for s in self.services.values())

    def gpu_plan(self, index: int) -> GpuPlan:
        """The plan of the GPU with this (fleet-wide) index."""
        return next(g for g in self.gpus if g.gpu.index == index)


def limited_titles() -> str:
    """The runtimes that `ollama_instances_per_gpu` limits, as people write them."""
    return "/".join(s.title for s in REGISTRY.values() if s.instance_limited)


def ollama_limit(config: FleetConfig, gpu: Gpu) -> int:
    """How many instance-limited services (Ollama's) a GPU may host."""
    if config.ollama_instances_per_gpu != "auto":
        return config.ollama_instances_per_gpu
    for floor_gib, limit in _OLLAMA_TIERS_GIB:
        if gpu.total_bytes >= floor_gib * GIB:
            return limit
    return 1


def place(
    config: FleetConfig,
    discovery: Discovery,
    needs: Mapping[str, Sequence[RungNeed]],
    managed_pids: frozenset[int] = frozenset(),
    sites: Mapping[int, GpuSite] | None = None,
) -> FleetPlan:
    """Plan the fleet on these GPUs with these prices; every refusal explained.

    `sites` (a Swarm's GPUs, by fleet-wide index): each rung stays on one node."""
    on = sites or {}
    slots = [
        _slot(config, gpu, managed_pids, on.get(gpu.index)) for gpu in discovery.gpus if gpu.valid
    ]
    demands = [_demand(name, svc, needs[name], on) for name, svc in config.services.items()]
    solution = solve(slots, demands)
    gpu_plans = _gpu_plans(discovery.gpus, slots, solution, needs, managed_pids, on)
    rooms = {g.gpu.index: g for g in gpu_plans}
    swarm = sites is not None
    services = {
        name: _explain(name, svc, needs[name], solution, rooms, swarm)
        for name, svc in config.services.items()
    }
    notes = list(discovery.notes) + ([discovery.problem] if discovery.problem else [])
    notes += [f"GPU {g.index} is unusable: {g.error}" for g in discovery.gpus if not g.valid]
    if not solution.optimal:
        notes.append(
            f"search stopped after {solution.nodes} nodes: best plan found, not proven best"
        )
    return FleetPlan(config, tuple(gpu_plans), services, solution.optimal, tuple(notes), swarm)


def gpu_budget_bytes(
    config: FleetConfig, gpu: Gpu, managed_pids: frozenset[int] = frozenset()
) -> int:
    """What fleetd may plan for on a GPU: the budget share, less others' processes."""
    budget = int(config.budget * gpu.total_bytes) - gpu.unmanaged_bytes(managed_pids)
    return max(0, budget)


def _slot(
    config: FleetConfig, gpu: Gpu, managed_pids: frozenset[int], site: GpuSite | None
) -> GpuSlot:
    return GpuSlot(
        index=gpu.index,
        budget_bytes=gpu_budget_bytes(config, gpu, managed_pids),
        instance_limit=ollama_limit(config, gpu),
        group=site.group if site else 0,
    )


def _pins(service: ServiceConfig, sites: Mapping[int, GpuSite]) -> frozenset[int] | None:
    """The GPUs a `gpu:` pin allows; on a Swarm, that index on every node."""
    pinned = service.pinned_gpus
    if pinned is None or not sites:
        return pinned
    return frozenset(i for i, site in sites.items() if site.local_index in pinned)


def _demand(
    name: str, service: ServiceConfig, needs: Sequence[RungNeed], sites: Mapping[int, GpuSite]
) -> Demand:
    spans = tuple(
        service.ladder[min(n.rung, len(service.ladder) - 1)].tensor_parallel for n in needs
    )
    return Demand(
        service=name,
        needs_bytes=tuple(n.need_bytes for n in needs),
        allowed_gpus=_pins(service, sites),
        priority=service.priority,
        limited=spec_of(service.runtime).instance_limited,
        gpus_per_rung=spans if service.ensemble is None and max(spans) > 1 else (),
    )


def _gpu_plans(
    gpus: tuple[Gpu, ...],
    slots: list[GpuSlot],
    solution: Solution,
    needs: Mapping[str, Sequence[RungNeed]],
    managed_pids: frozenset[int],
    sites: Mapping[int, GpuSite],
) -> list[GpuPlan]:
    by_index = {s.index: s for s in slots}
    plans = []
    for gpu in gpus:
        slot = by_index.get(gpu.index)
        chosen = {n: c for n, c in solution.choices.items() if c and gpu.index in c.gpus}
        planned = sum(needs[n][c.rung].need_bytes for n, c in chosen.items())
        plans.append(
            GpuPlan(
                gpu=gpu,
                budget_bytes=slot.budget_bytes if slot else 0,
                unmanaged_bytes=gpu.unmanaged_bytes(managed_pids) if gpu.valid else 0,
                planned_bytes=planned,
                ollama_limit=slot.instance_limit if slot else 0,
                services=tuple(sorted(chosen)),
                site=sites.get(gpu.index),
            )
        )
    return plans


def _explain(
    name: str,
    service: ServiceConfig,
    needs: Sequence[RungNeed],
    solution: Solution,
    rooms: dict[int, GpuPlan],
    swarm: bool,
) -> ServicePlan:
    choice = solution.choices[name]
    chosen = choice.rung if choice else None
    own = needs[chosen].need_bytes if chosen is not None else None
    verdicts = []
    for need in needs:
        if need.rung == chosen:
            verdicts.append(RungVerdict(need, "chosen"))
        elif chosen is None or need.rung < chosen:
            why = _why_not(need, name, service, rooms, own, swarm)
            verdicts.append(RungVerdict(need, "rejected", why))
        else:
            verdicts.append(RungVerdict(need, "not tried"))
    reason = None if choice else _unplaced_reason(name, service, needs, rooms, swarm)
    return ServicePlan(
        name,
        service,
        chosen,
        choice.gpu if choice else None,
        tuple(verdicts),
        reason,
        choice.gpus if choice else (),
    )


def _allowed(service: ServiceConfig, rooms: dict[int, GpuPlan]) -> list[GpuPlan]:
    pinned = service.pinned_gpus
    return [
        g
        for g in rooms.values()
        if g.budget_bytes > 0 and (pinned is None or g.local_index in pinned)
    ]


def _widest(allowed: Sequence[GpuPlan]) -> int:
    """The most of these GPUs on one host (a Swarm node)."""
    per_node: dict[int, int] = {}
    for g in allowed:
        group = g.site.group if g.site else 0
        per_node[group] = per_node.get(group, 0) + 1
    return max(per_node.values(), default=0)


def _room_beside_others(name: str, plan: GpuPlan, own_bytes: int | None) -> int:
    own = own_bytes if name in plan.services and own_bytes is not None else 0
    return plan.headroom_bytes + own


def _why_not(
    need: RungNeed,
    name: str,
    service: ServiceConfig,
    rooms: dict[int, GpuPlan],
    own: int | None,
    swarm: bool,
) -> str:
    """Why a rung more preferred than the chosen one (or any, if unplaced) was not taken."""
    allowed = _allowed(service, rooms)
    size = format_size(need.need_bytes)
    if not allowed:
        return _no_gpu_reason(service, swarm)
    spans = service.ladder[min(need.rung, len(service.ladder) - 1)].tensor_parallel
    if spans > _widest(allowed) and service.ensemble is None:
        if swarm:
            return (
                f"spans {spans} GPUs (tensor_parallel), and no node has more than "
                f"{_widest(allowed)} it may use (a service never spans nodes)"
            )
        return f"spans {spans} GPUs (tensor_parallel), and this host has {len(allowed)} it may use"
    biggest = max(allowed, key=lambda g: g.budget_bytes)
    if need.need_bytes > biggest.budget_bytes:
        return (
            f"needs {size}, more than the largest budget "
            f"({format_size(biggest.budget_bytes)} on {biggest.where})"
        )
    best = max(allowed, key=lambda g: _room_beside_others(name, g, own))
    room = _room_beside_others(name, best, own)
    if room >= need.need_bytes and spec_of(service.runtime).instance_limited:
        return (
            f"needs {size}; {best.where} has the room but already hosts "
            f"{best.ollama_limit} {limited_titles()} service(s), its limit"
        )
    if room >= need.need_bytes:
        return f"fits beside the others on {best.where}, but the search stopped first"
    return (
        f"needs {size}; the most room left beside the other services is "
        f"{format_size(room)} on {best.where}"
    )


def _no_gpu_reason(service: ServiceConfig, swarm: bool) -> str:
    if service.pinned_gpus is not None:
        pins = ", ".join(str(i) for i in sorted(service.pinned_gpus))
        where = "no usable node has" if swarm else "this host does not have"
        return f"pinned to GPU {pins}, which {where} (or cannot use)"
    if swarm:
        return "no usable GPU on any ready, active node (run `fleetctl node init` on GPU nodes)"
    return "no usable GPU (pass --gpu SIZE to plan for one, or declare `gpus:` in the config)"


def _unplaced_reason(
    name: str,
    service: ServiceConfig,
    needs: Sequence[RungNeed],
    rooms: dict[int, GpuPlan],
    swarm: bool,
) -> str:
    allowed = _allowed(service, rooms)
    if not allowed:
        return _no_gpu_reason(service, swarm)
    smallest = min(needs, key=lambda n: n.need_bytes)
    best = max(allowed, key=lambda g: g.headroom_bytes)
    short = smallest.need_bytes - best.headroom_bytes
    if short <= 0:
        return (
            f"nearest option: {smallest.model!r} ({format_size(smallest.need_bytes)}) fits "
            f"the room on {best.where} but not its {limited_titles()} limit of "
            f"{best.ollama_limit}"
        )
    return (
        f"no rung fits; nearest option: {smallest.model!r} needs "
        f"{format_size(smallest.need_bytes)}, the most room left is "
        f"{format_size(best.headroom_bytes)} on {best.where} "
        f"({format_size(short)} short)"
    )
