"""Tests for supervisor.core.planner: examples a user would recognise, and a property test that the
branch and bound finds the same optimum as trying every assignment."""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations

from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.core.planner import Choice, Demand, GpuSlot, Score, Solution, solve

MIB = 1024**2
Choices = dict[str, Choice | None]

# The seed fleet's ladder: preference order, not size order (phi3:mini needs more than the
# rung above it).
SEED_LADDER = (2048 * MIB, 2200 * MIB, 637 * MIB, 397 * MIB)


def gpu(index: int, budget_mib: int, instance_limit: int = 4) -> GpuSlot:
    return GpuSlot(index=index, budget_bytes=budget_mib * MIB, instance_limit=instance_limit)


def demand(name: str, *needs_mib: int, **kwargs: object) -> Demand:
    return Demand(name, tuple(n * MIB for n in needs_mib), **kwargs)  # type: ignore[arg-type]


# --- a reference written from the objective alone -------------------------------------------


def violations(gpus: Sequence[GpuSlot], demands: Sequence[Demand], choices: Choices) -> list[str]:
    """Every broken constraint of an assignment (empty: feasible)."""
    by_index = {g.index: g for g in gpus}
    found = []
    used: dict[int, int] = dict.fromkeys(by_index, 0)
    ollama: dict[int, int] = dict.fromkeys(by_index, 0)
    for d in demands:
        choice = choices[d.service]
        if choice is None:
            continue
        if len(choice.gpus) != d.gpus_of(choice.rung) or choice.gpu != min(choice.gpus):
            found.append(f"{d.service} rung {choice.rung} on GPUs {choice.gpus}")
        for index in choice.gpus:
            slot = by_index.get(index)
            if slot is None or slot.budget_bytes <= 0:
                found.append(f"{d.service} on unusable GPU {index}")
                continue
            if d.allowed_gpus is not None and index not in d.allowed_gpus:
                found.append(f"{d.service} on GPU {index}, pinned to {sorted(d.allowed_gpus)}")
            used[index] += d.needs_bytes[choice.rung]
            ollama[index] += int(d.limited)
    for index, slot in by_index.items():
        if used[index] > slot.budget_bytes:
            found.append(f"GPU {index} over budget")
        if ollama[index] > slot.instance_limit:
            found.append(f"GPU {index} over its Ollama limit")
    return found


def score_of(gpus: Sequence[GpuSlot], demands: Sequence[Demand], choices: Choices) -> Score:
    levels = sorted({d.priority for d in demands}, reverse=True)
    placed, rungs = [0] * len(levels), [0] * len(levels)
    used = {g.index: 0 for g in gpus if g.budget_bytes > 0}
    for d in demands:
        choice = choices[d.service]
        if choice is not None:
            placed[levels.index(d.priority)] -= 1
            rungs[levels.index(d.priority)] += choice.rung
            for index in choice.gpus:
                used[index] += d.needs_bytes[choice.rung]
    shares = [(g.budget_bytes - used[g.index]) / g.budget_bytes for g in gpus if g.index in used]
    return tuple(placed), tuple(rungs), -min(shares, default=0.0)


def brute_force_best(gpus: Sequence[GpuSlot], demands: Sequence[Demand]) -> Score:
    """Try every feasible assignment (pruning only on the constraints) and keep the best.

    A rung spanning k GPUs is tried on every set of k allowed GPUs."""
    usable = [g for g in gpus if g.budget_bytes > 0]
    used = {g.index: 0 for g in usable}
    ollama = {g.index: 0 for g in usable}
    choices: Choices = {}
    best: list[Score] = []

    def visit(k: int) -> None:
        if k == len(demands):
            score = score_of(gpus, demands, choices)
            if not best or score < best[0]:
                best[:] = [score]
            return
        d = demands[k]
        choices[d.service] = None
        visit(k + 1)
        allowed = [g for g in usable if d.allowed_gpus is None or g.index in d.allowed_gpus]
        for rung, need in enumerate(d.needs_bytes):
            for group in combinations(allowed, d.gpus_of(rung)):
                if any(used[g.index] + need > g.budget_bytes for g in group):
                    continue
                if d.limited and any(ollama[g.index] >= g.instance_limit for g in group):
                    continue
                for g in group:
                    used[g.index] += need
                    ollama[g.index] += int(d.limited)
                choices[d.service] = Choice.across(rung, (g.index for g in group))
                visit(k + 1)
                for g in group:
                    used[g.index] -= need
                    ollama[g.index] -= int(d.limited)
        del choices[d.service]

    visit(0)
    return best[0]


def same_score(a: Score, b: Score) -> bool:
    return a[:2] == b[:2] and math.isclose(a[2], b[2], abs_tol=1e-9)


@st.composite
def instances(draw: st.DrawFn) -> tuple[list[GpuSlot], list[Demand]]:
    scale = draw(st.sampled_from([1, 7, MIB]))
    n_gpus = draw(st.integers(1, 3))
    indices = draw(st.lists(st.integers(0, 4), min_size=n_gpus, max_size=n_gpus, unique=True))
    budgets = st.integers(0, 30) | st.just(0)
    gpus = [GpuSlot(i, draw(budgets) * scale, draw(st.integers(0, 3))) for i in indices]
    pins = st.none() | st.frozensets(st.integers(0, 4), min_size=1, max_size=2)
    demands = [
        Demand(
            service=f"s{k}",
            needs_bytes=tuple(
                n * scale for n in draw(st.lists(st.integers(1, 15), min_size=1, max_size=3))
            ),
            allowed_gpus=draw(pins),
            priority=draw(st.integers(0, 1)),
            limited=draw(st.booleans()),
        )
        for k in range(draw(st.integers(1, 5)))
    ]
    return gpus, demands


@settings(max_examples=1500, deadline=None)
@given(instances())
def test_solver_matches_brute_force(instance: tuple[list[GpuSlot], list[Demand]]) -> None:
    gpus, demands = instance

    solution = solve(gpus, demands)

    assert set(solution.choices) == {d.service for d in demands}
    assert violations(gpus, demands, solution.choices) == []
    assert same_score(solution.score, score_of(gpus, demands, solution.choices))
    assert same_score(solution.score, brute_force_best(gpus, demands))
    assert solution.optimal


# --- examples -------------------------------------------------------------------------------


def test_seed_ladder_skips_phi3_which_needs_more_than_llama() -> None:
    # 2100 MiB: llama3.2:3b (2048) fits; on 2000 MiB phi3:mini (2200) cannot help either.
    roomy = solve([gpu(0, 2100)], [Demand("alpha", SEED_LADDER, limited=True)])
    tight = solve([gpu(0, 2000)], [Demand("alpha", SEED_LADDER, limited=True)])

    assert roomy.choices["alpha"] == Choice(rung=0, gpu=0)
    assert tight.choices["alpha"] == Choice(rung=2, gpu=0)  # tinyllama:1.1b


def test_lower_rung_beats_no_place() -> None:
    # Both at their first rung need 12 GiB of a 10 GiB budget; one steps down instead.
    solution = solve([gpu(0, 10)], [demand("chat", 6, 3), demand("code", 6, 3)])

    rungs = sorted(c.rung for c in solution.choices.values() if c is not None)
    assert rungs == [0, 1]


def test_higher_priority_gets_the_room() -> None:
    gpus = [gpu(0, 10)]
    demands = [demand("a-batch", 8, priority=0), demand("z-chat", 8, priority=1)]

    solution = solve(gpus, demands)

    assert solution.choices == {"z-chat": Choice(0, 0), "a-batch": None}


def test_placing_a_low_priority_service_beats_a_better_rung_for_a_high_one() -> None:
    demands = [demand("chat", 8, 4, priority=1), demand("batch", 5, priority=0)]

    solution = solve([gpu(0, 10)], demands)

    assert solution.choices == {"chat": Choice(1, 0), "batch": Choice(0, 0)}


def test_pin_is_honoured_even_where_another_gpu_has_more_room() -> None:
    gpus = [gpu(0, 4), gpu(1, 20)]

    solution = solve(gpus, [demand("alpha", 2, allowed_gpus=frozenset({0}))])

    assert solution.choices["alpha"] == Choice(0, 0)


def test_pin_to_a_missing_gpu_leaves_the_service_unplaced() -> None:
    solution = solve([gpu(0, 20)], [demand("alpha", 2, allowed_gpus=frozenset({3}))])

    assert solution.choices["alpha"] is None


def test_unpinned_service_leaves_room_on_the_gpu_another_is_pinned_to() -> None:
    # Two identical GPUs are not interchangeable once one service may use only GPU 0.
    gpus = [gpu(0, 20), gpu(1, 20)]
    demands = [demand("big", 12), demand("pinned", 6, allowed_gpus=frozenset({0}))]

    solution = solve(gpus, demands)

    assert solution.choices == {"big": Choice(0, 1), "pinned": Choice(0, 0)}


def test_services_spread_over_two_gpus_for_headroom() -> None:
    solution = solve([gpu(0, 10), gpu(1, 10)], [demand("a", 4), demand("b", 4)])

    placed = solution.choices.values()
    assert {c.gpu for c in placed if c is not None} == {0, 1}
    assert math.isclose(solution.score[2], -(10 - 4) / 10)


def test_headroom_is_a_share_of_each_budget() -> None:
    # 2 GiB more on the 20 GiB GPU leaves 90 %; on the 4 GiB one it would leave 50 %.
    solution = solve([gpu(0, 4), gpu(1, 20)], [demand("a", 2)])

    assert solution.choices["a"] == Choice(0, 1)


def test_ollama_limit_sends_the_second_ollama_service_to_another_gpu() -> None:
    demands = [demand("a", 8, limited=True), demand("b", 8, limited=True)]
    big, small = 100, 10

    unlimited = solve([gpu(0, big, 2), gpu(1, small, 2)], demands)
    limited = solve([gpu(0, big, 1), gpu(1, small, 1)], demands)

    # Without the limit both share the big GPU (90 % of it stays free beats 20 % of the small).
    assert {c.gpu for c in unlimited.choices.values() if c is not None} == {0}
    assert {c.gpu for c in limited.choices.values() if c is not None} == {0, 1}


def test_ollama_limit_leaves_a_service_unplaced_on_one_gpu() -> None:
    demands = [demand("a", 1, limited=True), demand("b", 1, limited=True), demand("v", 1)]

    solution = solve([gpu(0, 100, instance_limit=1)], demands)

    assert sum(c is None for c in solution.choices.values()) == 1
    assert solution.choices["v"] == Choice(0, 0)  # a vLLM service does not count


def test_nothing_fits_leaves_every_service_unplaced() -> None:
    solution = solve([gpu(0, 1)], [demand("a", 2, 3), demand("b", 5)])

    assert solution.choices == {"a": None, "b": None}
    assert solution.score[0] == (0,)
    assert solution.optimal


def test_a_fleet_of_the_most_services_a_config_allows_is_planned_within_the_work_limit() -> None:
    """A node bounds every service still to place: the work limit, not the node limit, ends
    the search of a fleet far beyond a real host (1,000 services used to recurse past
    Python's limit; 256 took 45 s)."""
    from supervisor.core.config import MAX_SERVICES
    from supervisor.core.planner import DEFAULT_WORK_LIMIT

    gpus = [gpu(i, 20_000, instance_limit=4) for i in range(8)]
    demands = [
        demand(f"s{k}", 3000 + 7 * k, 1500 + 5 * k, limited=k % 2 == 0) for k in range(MAX_SERVICES)
    ]

    solution = solve(gpus, demands, work_limit=DEFAULT_WORK_LIMIT // 20)

    assert not solution.optimal and solution.nodes < 25_000
    assert violations(gpus, demands, solution.choices) == []
    assert sum(c is not None for c in solution.choices.values()) >= 8 * 4


def test_no_gpus_or_zero_budget_places_nothing() -> None:
    for gpus in ([], [gpu(0, 0)]):
        solution = solve(gpus, [demand("a", 1)])
        assert solution.choices == {"a": None}


def test_node_limit_still_returns_a_feasible_plan_but_not_proven() -> None:
    gpus = [gpu(i, 9000 + 700 * i, instance_limit=3) for i in range(4)]
    demands = [
        demand(f"s{k}", 4000 + 97 * k, 2500 + 53 * k, 1200 + 31 * k, limited=k % 2 == 0)
        for k in range(12)
    ]

    solution: Solution = solve(gpus, demands, node_limit=1)

    assert not solution.optimal
    assert set(solution.choices) == {d.service for d in demands}
    assert violations(gpus, demands, solution.choices) == []
    assert same_score(solution.score, score_of(gpus, demands, solution.choices))
