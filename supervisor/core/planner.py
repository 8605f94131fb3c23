"""Which rung of each service's ladder runs on which GPU, under each GPU's VRAM budget.

Pure: GPUs and demands in, a `Solution` out; no NVML, Docker, files or clock.

The plan is the best one by, in this order (each lexicographic by priority, highest first):
1. the most services placed (a lower rung beats no place);
2. the most-preferred rungs (the smallest sum of rung indices);
3. the largest smallest headroom, as a share of each GPU's budget, so load spreads and
   every model keeps room to grow.
The search is an exact branch and bound (optimistic bounds per service, water-filling for
headroom, identical GPUs tried once); `node_limit` caps it for inputs far beyond real
hosts, and `Solution.optimal` says whether the bound was proven.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Score = tuple[tuple[int, ...], tuple[int, ...], float]
DEFAULT_NODE_LIMIT = 25_000
_PRUNE = object()


class _Improved(Exception):
    """A better plan was found: search again from the root with the tighter bound."""


@dataclass(frozen=True)
class GpuSlot:
    """The planner's view of a GPU: what fleetd may use on it."""

    index: int
    budget_bytes: int  # budget ratio x total, minus what unmanaged processes hold
    instance_limit: int  # most `limited` demands it may host (a runtime's registry says)


@dataclass(frozen=True)
class Demand:
    """A service's ladder as VRAM needs, in preference order."""

    service: str
    needs_bytes: tuple[int, ...]
    allowed_gpus: frozenset[int] | None = None  # None: any GPU
    priority: int = 0
    limited: bool = False  # counts against each GPU's instance_limit


@dataclass(frozen=True)
class Choice:
    rung: int
    gpu: int


@dataclass(frozen=True)
class Solution:
    choices: dict[str, Choice | None]
    score: Score
    optimal: bool
    nodes: int


class _Search:
    def __init__(self, gpus: Sequence[GpuSlot], demands: Sequence[Demand], node_limit: int):
        self.gpus = [g for g in gpus if g.budget_bytes > 0]
        self.levels = sorted({d.priority for d in demands}, reverse=True)
        # Biggest first, as in bin packing: infeasibility shows up near the root.
        self.order = sorted(
            demands, key=lambda d: (-max(d.needs_bytes, default=0), -d.priority, d.service)
        )
        self.allowed = [self._allowed_slots(d) for d in self.order]
        self.level_of = [self.levels.index(d.priority) for d in self.order]
        self.twin = self._twins()
        self.used = [0] * len(self.gpus)
        self.instances = [0] * len(self.gpus)
        self.picked: list[Choice | None] = []
        self.best: tuple[Score, list[Choice | None]] | None = None
        self.nodes, self.node_limit = 0, node_limit

    def _allowed_slots(self, demand: Demand) -> list[int]:
        allowed = demand.allowed_gpus
        return [s for s, g in enumerate(self.gpus) if allowed is None or g.index in allowed]

    def _twins(self) -> list[int]:
        """For each slot, the first slot interchangeable with it (same budget, limit, pins)."""
        signature = [
            (g.budget_bytes, g.instance_limit, tuple(s in a for a in self.allowed))
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
            if self.nodes > self.node_limit:
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

    def _options(self, k: int, floor: float | None) -> list[Choice]:
        demand, options = self.order[k], []
        rungs = range(len(demand.needs_bytes))
        if floor is not None:
            best = self._best_rung_alone(k, floor)
            rungs = range(0) if best is None else range(best, best + 1)
        for rung in rungs:
            need, tried = demand.needs_bytes[rung], set()
            for s in sorted(self.allowed[k], key=lambda s: -self._room_share(s)):
                key = (self.twin[s], self.used[s], self.instances[s])
                if key not in tried and self._fits(k, s, need, floor):
                    tried.add(key)
                    options.append(Choice(rung=rung, gpu=s))
        return options

    def _fits(self, k: int, s: int, need: int, floor: float | None = None) -> bool:
        gpu = self.gpus[s]
        if self.order[k].limited and self.instances[s] >= gpu.instance_limit:
            return False
        if floor is not None:
            return (gpu.budget_bytes - (self.used[s] + need)) / gpu.budget_bytes > floor
        return self.used[s] + need <= gpu.budget_bytes

    def _place(self, k: int, choice: Choice, sign: int) -> None:
        self.used[choice.gpu] += sign * self.order[k].needs_bytes[choice.rung]
        self.instances[choice.gpu] += sign * int(self.order[k].limited)

    def _room_share(self, s: int) -> float:
        budget = self.gpus[s].budget_bytes
        return (budget - self.used[s]) / budget

    def _score(self) -> Score:
        placed, rungs = self._tally(self.picked)
        headroom = min((self._room_share(s) for s in range(len(self.gpus))), default=0.0)
        return tuple(placed), tuple(rungs), -headroom

    def _tally(self, picked: Sequence[Choice | None]) -> tuple[list[int], list[int]]:
        placed, rungs = [0] * len(self.levels), [0] * len(self.levels)
        for level, choice in zip(self.level_of, picked, strict=False):
            if choice is not None:
                placed[level] -= 1
                rungs[level] += choice.rung
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
                extra += self.order[j].needs_bytes[rung]
        return tuple(placed), tuple(rungs), extra

    def _best_rung_alone(self, j: int, floor: float | None = None) -> int | None:
        for rung, need in enumerate(self.order[j].needs_bytes):
            if any(self._fits(j, s, need, floor) for s in self.allowed[j]):
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


def solve(
    gpus: Sequence[GpuSlot], demands: Sequence[Demand], node_limit: int = DEFAULT_NODE_LIMIT
) -> Solution:
    """The best assignment of a rung and a GPU (or none) to every demand."""
    search = _Search(gpus, demands, node_limit)
    search.run()
    assert search.best is not None  # the all-unplaced leaf is always reached
    score, picked = search.best
    choices = {
        d.service: None if c is None else Choice(rung=c.rung, gpu=search.gpus[c.gpu].index)
        for d, c in zip(search.order, picked, strict=True)
    }
    return Solution(
        choices=choices, score=score, optimal=search.nodes <= node_limit, nodes=search.nodes
    )
