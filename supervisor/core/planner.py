"""Which rung of each service's ladder runs on which GPUs, under each GPU's VRAM budget.

Pure: GPUs and demands in, a `Solution` out; no NVML, Docker, files or clock.

A rung may be tensor parallel: it then runs on k distinct GPUs of the host, each of which
must have the rung's need left, and counts once against each one's instance limit.
GPUs come in groups (a Swarm's nodes; one host is one group): a rung's GPUs are always of
one group, since a service never spans nodes.

The plan is the best one by, in this order (each lexicographic by priority, highest first):
1. the most services placed (a lower rung beats no place);
2. the most-preferred rungs (the smallest sum of rung indices);
3. the largest smallest headroom, as a share of each GPU's budget, so load spreads and
   every model keeps room to grow.
The search is an exact branch and bound (optimistic bounds per service, water-filling for
headroom, interchangeable GPUs tried once); `node_limit` and `work_limit` cap it for inputs
far beyond real hosts, and `Solution.optimal` says whether the bound was proven. The search
recurses once per service: the config allows at most `config.MAX_SERVICES`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

Score = tuple[tuple[int, ...], tuple[int, ...], float]
_Pick = tuple[int, tuple[int, ...]]  # inside the search: a rung and its slots
DEFAULT_NODE_LIMIT = 25_000
# Each node bounds every service still to place, so a node's cost grows with the fleet:
# this caps the GPU checks those bounds make (about a second of search on any input; the
# hardest 16-service benchmarks stop at the node limit with half of it used).
DEFAULT_WORK_LIMIT = 4_000_000
_PRUNE = object()


class _Improved(Exception):
    """A better plan was found: search again from the root with the tighter bound."""


@dataclass(frozen=True)
class GpuSlot:
    """The planner's view of a GPU: what fleetd may use on it."""

    index: int
    budget_bytes: int  # budget ratio x total, minus what unmanaged processes hold
    instance_limit: int  # most `limited` demands it may host (a runtime's registry says)
    group: int = 0  # the node it is on: a rung's GPUs all share one group


@dataclass(frozen=True)
class Demand:
    """A service's ladder as VRAM needs, in preference order."""

    service: str
    needs_bytes: tuple[int, ...]  # per GPU: a tensor-parallel rung needs this on each
    allowed_gpus: frozenset[int] | None = None  # None: any GPU
    priority: int = 0
    limited: bool = False  # counts against the instance_limit of each GPU it uses
    gpus_per_rung: tuple[int, ...] = ()  # GPUs each rung spans; empty: 1 for every rung

    def __post_init__(self) -> None:
        spans = self.gpus_per_rung
        if spans and (len(spans) != len(self.needs_bytes) or min(spans) < 1):
            raise ValueError(
                f"{self.service}: gpus_per_rung {spans} must give one count >= 1 for each "
                f"of the {len(self.needs_bytes)} rungs"
            )

    def gpus_of(self, rung: int) -> int:
        """How many GPUs `rung` spans."""
        return self.gpus_per_rung[rung] if self.gpus_per_rung else 1


@dataclass(frozen=True)
class Choice:
    """A rung and the GPUs it runs on: `gpus` sorted, `gpu` the first of them."""

    rung: int
    gpu: int
    gpus: tuple[int, ...] = ()  # empty: just `gpu`

    def __post_init__(self) -> None:
        if not self.gpus:
            object.__setattr__(self, "gpus", (self.gpu,))
        elif self.gpus[0] != self.gpu or list(self.gpus) != sorted(set(self.gpus)):
            raise ValueError(f"gpus {self.gpus} must be distinct, sorted and start at {self.gpu}")

    @classmethod
    def across(cls, rung: int, gpus: Iterable[int]) -> Choice:
        """`rung` on the GPUs `gpus`, in any order."""
        ordered = tuple(sorted(gpus))
        return cls(rung=rung, gpu=ordered[0], gpus=ordered)


@dataclass(frozen=True)
class Solution:
    choices: dict[str, Choice | None]
    score: Score
    optimal: bool
    nodes: int


class _Search:
    def __init__(
        self, gpus: Sequence[GpuSlot], demands: Sequence[Demand], node_limit: int, work_limit: int
    ) -> None:
        self.gpus = [g for g in gpus if g.budget_bytes > 0]
        self.levels = sorted({d.priority for d in demands}, reverse=True)
        # Biggest first, as in bin packing: infeasibility shows up near the root.
        self.order = sorted(demands, key=lambda d: (-_biggest_bytes(d), -d.priority, d.service))
        self.spans = [tuple(d.gpus_of(r) for r in range(len(d.needs_bytes))) for d in self.order]
        self.allowed = [self._allowed_slots(d) for d in self.order]
        self.level_of = [self.levels.index(d.priority) for d in self.order]
        self.twin = self._twins()
        self.used = [0] * len(self.gpus)
        self.instances = [0] * len(self.gpus)
        self.picked: list[_Pick | None] = []
        self.best: tuple[Score, list[_Pick | None]] | None = None
        self.nodes, self.node_limit = 0, node_limit
        self.work, self.work_limit = 0, work_limit  # GPU checks made by the bounds

    @property
    def stopped(self) -> bool:
        """Whether a limit stopped the search before it proved its best plan."""
        return self.nodes > self.node_limit or self.work > self.work_limit

    def _allowed_slots(self, demand: Demand) -> list[int]:
        allowed = demand.allowed_gpus
        return [s for s, g in enumerate(self.gpus) if allowed is None or g.index in allowed]

    def _twins(self) -> list[int]:
        """For each slot, the first slot interchangeable with it (same budget, limit, pins,
        and group where some rung spans GPUs: only then does the group constrain a pick)."""
        wide = any(span > 1 for spans in self.spans for span in spans)
        signature = [
            (g.budget_bytes, g.instance_limit, tuple(s in a for a in self.allowed))
            + ((g.group,) if wide else ())
            for s, g in enumerate(self.gpus)
        ]
        return [signature.index(sig) for sig in signature]

    def run(self) -> None:
        # Restart from the root on every better plan: the tighter bound then prunes the
        # early choices (the biggest services) that the first descent got wrong.
        while True:
            self.used, self.instances, self.picked = [0] * len(self.gpus), [0] * len(self.gpus), []
            try:
                self._visit(0)
                return
            except _Improved:
                continue

    def _visit(self, k: int) -> None:
        self.nodes += 1
        if k == len(self.order):
            score = self._score()
            if self.best is None or score < self.best[0]:
                self.best = (score, list(self.picked))
                raise _Improved
            return
        floor: float | None = None  # in tight mode: headroom every GPU must stay above
        if self.best is not None:
            if self.stopped:
                return
            tight = self._tight_floor(k, self.best[0])
            if tight is _PRUNE:
                return
            floor = tight if isinstance(tight, float) else None
        for choice in self._options(k, floor):
            self._place(k, choice, +1)
            self.picked.append(choice)
            self._visit(k + 1)
            self.picked.pop()
            self._place(k, choice, -1)
        if floor is None or self._best_rung_alone(k, floor) is None:
            self.picked.append(None)
            self._visit(k + 1)
            self.picked.pop()

    def _tight_floor(self, k: int, best: Score) -> float | object | None:
        """Prune (`_PRUNE`), branch freely (None), or branch tightly above a headroom floor.

        A completion can beat `best` on placement or rungs only if the optimistic bound
        does. When the bound merely ties `best` there, the only way to win is more
        headroom: every remaining service must take its optimistic rung and every GPU
        must keep strictly more headroom than `best`, which prunes like bin packing.
        """
        optimistic = self._optimistic(k, None)
        if optimistic[:2] > best[:2]:
            return _PRUNE
        if optimistic[:2] < best[:2]:
            return None
        floor = -best[2]
        tight = self._optimistic(k, floor)
        if tight[:2] != best[:2] or self._water_level(tight[2]) + 1e-9 <= floor:
            return _PRUNE
        return floor

    def _options(self, k: int, floor: float | None) -> list[_Pick]:
        demand, options = self.order[k], []
        rungs = range(len(demand.needs_bytes))
        if floor is not None:
            best = self._best_rung_alone(k, floor)
            rungs = range(0) if best is None else range(best, best + 1)
        roomiest_first = sorted(self.allowed[k], key=lambda s: -self._room_share(s))
        for rung in rungs:
            need = demand.needs_bytes[rung]
            fitting = [s for s in roomiest_first if self._fits(k, s, need, floor)]
            options += [(rung, slots) for slots in self._spreads(fitting, self.spans[k][rung])]
        return options

    def _spreads(self, fitting: list[int], width: int) -> Iterator[tuple[int, ...]]:
        """Every set of `width` slots from `fitting`, once up to swapping interchangeable ones.

        Slots of one twin class that hold the same bytes and instances are interchangeable
        now, so a set is known by how many it takes from each such group: each group gives
        its first m slots, for every m, which keeps the search exact.
        """
        groups: dict[tuple[int, int, int], list[int]] = {}
        for s in fitting:
            groups.setdefault((self.twin[s], self.used[s], self.instances[s]), []).append(s)
        if width == 1:  # the common case, without the recursion
            return iter([(slots[0],) for slots in groups.values()])
        # Twins share a group here (see _twins), so each node's twin classes are taken apart.
        by_node: dict[int, list[list[int]]] = {}
        for slots in groups.values():
            by_node.setdefault(self.gpus[slots[0]].group, []).append(slots)
        return (pick for classes in by_node.values() for pick in _take(classes, width))

    def _fits(self, k: int, s: int, need: int, floor: float | None = None) -> bool:
        gpu = self.gpus[s]
        if self.order[k].limited and self.instances[s] >= gpu.instance_limit:
            return False
        if floor is not None:
            return (gpu.budget_bytes - (self.used[s] + need)) / gpu.budget_bytes > floor
        return self.used[s] + need <= gpu.budget_bytes

    def _place(self, k: int, pick: _Pick, sign: int) -> None:
        rung, slots = pick
        need, limited = self.order[k].needs_bytes[rung], int(self.order[k].limited)
        for s in slots:
            self.used[s] += sign * need
            self.instances[s] += sign * limited

    def _room_share(self, s: int) -> float:
        budget = self.gpus[s].budget_bytes
        return (budget - self.used[s]) / budget

    def _score(self) -> Score:
        placed, rungs = self._tally(self.picked)
        headroom = min((self._room_share(s) for s in range(len(self.gpus))), default=0.0)
        return tuple(placed), tuple(rungs), -headroom

    def _tally(self, picked: Sequence[_Pick | None]) -> tuple[list[int], list[int]]:
        placed, rungs = [0] * len(self.levels), [0] * len(self.levels)
        for level, pick in zip(self.level_of, picked, strict=False):
            if pick is not None:
                placed[level] -= 1
                rungs[level] += pick[0]
        return placed, rungs

    def _optimistic(
        self, k: int, floor: float | None
    ) -> tuple[tuple[int, ...], tuple[int, ...], int]:
        """Placement and rung parts no completion can beat, and the bytes they would add."""
        placed, rungs = self._tally(self.picked)
        extra = 0
        for j in range(k, len(self.order)):
            rung = self._best_rung_alone(j, floor)
            if rung is not None:
                placed[self.level_of[j]] -= 1
                rungs[self.level_of[j]] += rung
                extra += self.order[j].needs_bytes[rung] * self.spans[j][rung]
        return tuple(placed), tuple(rungs), extra

    def _best_rung_alone(self, j: int, floor: float | None = None) -> int | None:
        """The first rung with enough GPUs in one group that could take it now, ignoring
        later services."""
        slots = self.allowed[j]
        self.work += 1  # the call itself costs about one check
        for rung, need in enumerate(self.order[j].needs_bytes):
            self.work += len(slots)
            span = self.spans[j][rung]
            missing: dict[int, int] = {}  # per group: GPUs the rung still lacks there
            for s in slots:
                if self._fits(j, s, need, floor):
                    group = self.gpus[s].group
                    missing[group] = missing.get(group, span) - 1
                    if missing[group] == 0:
                        return rung
        return None

    def _water_level(self, extra: int) -> float:
        """Smallest headroom share if `extra` bytes spread perfectly (a relaxation)."""
        shares = sorted(
            (self._room_share(s), self.gpus[s].budget_bytes) for s in range(len(self.gpus))
        )
        if not shares:
            return 0.0
        # Pour `extra` into the GPUs with the most room first, levelling them down.
        level, weight = shares[-1][0], 0
        for i in range(len(shares) - 1, -1, -1):
            _share, budget = shares[i]
            weight += budget
            floor = shares[i - 1][0] if i > 0 else float("-inf")
            drop = min(level - floor, extra / weight)
            level, extra = level - drop, extra - round(drop * weight)
            if extra <= 0 or floor == float("-inf"):
                break
        return min(level, shares[0][0])


def _biggest_bytes(demand: Demand) -> int:
    """The most bytes any one rung of `demand` takes over all its GPUs."""
    return max((need * demand.gpus_of(r) for r, need in enumerate(demand.needs_bytes)), default=0)


def _take(groups: list[list[int]], width: int) -> Iterator[tuple[int, ...]]:
    """Every way to take `width` slots from `groups`, the first m of a group for each m."""
    if width == 0:
        yield ()
        return
    if not groups:
        return
    first, rest = groups[0], groups[1:]
    for m in range(min(width, len(first)), -1, -1):
        for tail in _take(rest, width - m):
            yield (*first[:m], *tail)


def solve(
    gpus: Sequence[GpuSlot],
    demands: Sequence[Demand],
    node_limit: int = DEFAULT_NODE_LIMIT,
    work_limit: int = DEFAULT_WORK_LIMIT,
) -> Solution:
    """The best assignment of a rung and its GPUs (or none) to every demand."""
    search = _Search(gpus, demands, node_limit, work_limit)
    search.run()
    assert search.best is not None  # the all-unplaced leaf is always reached
    score, picked = search.best
    choices = {
        d.service: None
        if pick is None
        else Choice.across(pick[0], (search.gpus[s].index for s in pick[1]))
        for d, pick in zip(search.order, picked, strict=True)
    }
    return Solution(choices=choices, score=score, optimal=not search.stopped, nodes=search.nodes)
