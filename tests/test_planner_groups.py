"""Tests for GPU groups in supervisor.core.planner (a Swarm's nodes): a rung's GPUs are
always in one group, the optimum matches trying every assignment with that rule, and one
group plans exactly as a single host does."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.core.planner import Choice, Demand, GpuSlot, Score, solve
from tests.test_planner import MIB, demand, same_score, score_of, violations


def node_gpu(index: int, group: int, budget_mib: int, instance_limit: int = 4) -> GpuSlot:
    return GpuSlot(index, budget_mib * MIB, instance_limit, group=group)


def groups_of(gpus: Sequence[GpuSlot], choice: Choice) -> set[int]:
    by_index = {g.index: g for g in gpus}
    return {by_index[i].group for i in choice.gpus}


def brute_force_grouped(gpus: Sequence[GpuSlot], demands: Sequence[Demand]) -> Score:
    """Every feasible assignment in which each rung's GPUs share a group; the best score."""
    usable = [g for g in gpus if g.budget_bytes > 0]
    used = {g.index: 0 for g in usable}
    limited = {g.index: 0 for g in usable}
    choices: dict[str, Choice | None] = {}
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
            for picked in combinations(allowed, d.gpus_of(rung)):
                if len({g.group for g in picked}) != 1:
                    continue
                if any(used[g.index] + need > g.budget_bytes for g in picked):
                    continue
                if d.limited and any(limited[g.index] >= g.instance_limit for g in picked):
                    continue
                for g in picked:
                    used[g.index] += need
                    limited[g.index] += int(d.limited)
                choices[d.service] = Choice.across(rung, (g.index for g in picked))
                visit(k + 1)
                for g in picked:
                    used[g.index] -= need
                    limited[g.index] -= int(d.limited)
        del choices[d.service]

    visit(0)
    return best[0]


@st.composite
def node_instances(draw: st.DrawFn) -> tuple[list[GpuSlot], list[Demand]]:
    """2-3 nodes of 1-3 GPUs each; few distinct budgets, so identical nodes are common."""
    scale = draw(st.sampled_from([1, 7]))
    budgets = st.integers(0, 30) | st.sampled_from([0, 12, 24])
    gpus: list[GpuSlot] = []
    for group in range(draw(st.integers(2, 3))):
        for _ in range(draw(st.integers(1, 3))):
            limit = draw(st.sampled_from([0, 1, 2, 4]))
            gpus.append(GpuSlot(len(gpus), draw(budgets) * scale, limit, group=group))
    pins = st.none() | st.frozensets(st.integers(0, len(gpus) - 1), min_size=1, max_size=4)
    demands = []
    for k in range(draw(st.integers(1, 4))):
        n_rungs = draw(st.integers(1, 3))
        needs = draw(st.lists(st.integers(1, 15), min_size=n_rungs, max_size=n_rungs))
        spans = draw(st.lists(st.integers(1, 3), min_size=n_rungs, max_size=n_rungs))
        demands.append(
            Demand(
                service=f"s{k}",
                needs_bytes=tuple(n * scale for n in needs),
                allowed_gpus=draw(pins),
                priority=draw(st.integers(0, 1)),
                limited=draw(st.booleans()),
                gpus_per_rung=tuple(spans) if draw(st.booleans()) or max(spans) > 1 else (),
            )
        )
    return gpus, demands


@settings(max_examples=1500, deadline=None)
@given(node_instances())
def test_solver_matches_brute_force_across_nodes(
    instance: tuple[list[GpuSlot], list[Demand]],
) -> None:
    gpus, demands = instance

    solution = solve(gpus, demands)

    assert violations(gpus, demands, solution.choices) == []
    for name, choice in solution.choices.items():
        assert choice is None or len(groups_of(gpus, choice)) == 1, (name, choice)
    assert same_score(solution.score, score_of(gpus, demands, solution.choices))
    assert same_score(solution.score, brute_force_grouped(gpus, demands))
    assert solution.optimal


@settings(max_examples=300, deadline=None)
@given(node_instances())
def test_one_group_plans_as_one_host(instance: tuple[list[GpuSlot], list[Demand]]) -> None:
    gpus, demands = instance
    one_host = [GpuSlot(g.index, g.budget_bytes, g.instance_limit) for g in gpus]

    assert solve(one_host, demands) == solve(
        [GpuSlot(g.index, g.budget_bytes, g.instance_limit, group=5) for g in gpus], demands
    )


def test_two_gpu_rung_never_spans_two_one_gpu_nodes() -> None:
    gpus = [node_gpu(0, 0, 10), node_gpu(1, 1, 10)]
    wide = Demand("big", (8 * MIB, 9 * MIB), gpus_per_rung=(2, 1))

    choice = solve(gpus, [wide]).choices["big"]

    assert choice is not None and choice.rung == 1  # the one-GPU rung, on either node


def test_two_gpu_rung_goes_to_the_node_with_two_gpus() -> None:
    gpus = [node_gpu(0, 0, 10), node_gpu(1, 1, 10), node_gpu(2, 1, 10)]
    wide = Demand("big", (8 * MIB,), gpus_per_rung=(2,))

    assert solve(gpus, [wide]).choices["big"] == Choice.across(0, (1, 2))


def test_services_spread_over_nodes_for_headroom() -> None:
    gpus = [node_gpu(0, 0, 10), node_gpu(1, 1, 10)]

    choices = solve(gpus, [demand("a", 4), demand("b", 4)]).choices

    assert {c.gpu for c in choices.values() if c} == {0, 1}
