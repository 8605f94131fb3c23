"""Tests for tensor-parallel rungs in supervisor.core.planner: a rung that spans k GPUs, each of
which must hold the rung's need; examples a user would recognise, and the brute-force check."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.core.planner import Choice, Demand, GpuSlot, solve
from tests.test_planner import brute_force_best, demand, gpu, same_score, score_of, violations

# --- the optimum against trying every set of GPUs -------------------------------------------


@st.composite
def tp_instances(draw: st.DrawFn) -> tuple[list[GpuSlot], list[Demand]]:
    scale = draw(st.sampled_from([1, 7]))
    n_gpus = draw(st.integers(1, 4))
    indices = draw(st.lists(st.integers(0, 5), min_size=n_gpus, max_size=n_gpus, unique=True))
    # Few distinct budgets and limits, so identical GPUs (pruned as twins) are common.
    budgets = st.integers(0, 30) | st.sampled_from([0, 12, 24])
    gpus = [GpuSlot(i, draw(budgets) * scale, draw(st.sampled_from([0, 1, 2, 4]))) for i in indices]
    pins = st.none() | st.frozensets(st.integers(0, 5), min_size=1, max_size=3)
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
@given(tp_instances())
def test_solver_matches_brute_force_with_tensor_parallel_rungs(
    instance: tuple[list[GpuSlot], list[Demand]],
) -> None:
    gpus, demands = instance

    solution = solve(gpus, demands)

    assert set(solution.choices) == {d.service for d in demands}
    assert violations(gpus, demands, solution.choices) == []
    assert same_score(solution.score, score_of(gpus, demands, solution.choices))
    assert same_score(solution.score, brute_force_best(gpus, demands))
    assert solution.optimal


# --- examples -------------------------------------------------------------------------------


def test_two_gpu_rung_runs_on_two_gpus_that_each_have_its_need() -> None:
    # 12 MiB on each of two GPUs: GPU 1 (8 MiB) is too small, so GPUs 0 and 2 take it.
    gpus = [gpu(0, 14), gpu(1, 8), gpu(2, 14)]

    solution = solve(gpus, [demand("llama70b", 12, gpus_per_rung=(2,))])

    choice = solution.choices["llama70b"]
    assert choice == Choice.across(0, (2, 0))
    assert choice is not None and choice.gpus == (0, 2) and choice.gpu == 0
    assert math.isclose(solution.score[2], -(14 - 12) / 14)


def test_two_gpu_rung_is_refused_on_one_allowed_gpu_and_the_one_gpu_rung_below_runs() -> None:
    gpus = [gpu(0, 20), gpu(1, 20)]
    pinned = demand("llama70b", 12, 18, gpus_per_rung=(2, 1), allowed_gpus=frozenset({1}))

    solution = solve(gpus, [pinned])

    assert solution.choices["llama70b"] == Choice(rung=1, gpu=1)


def test_rung_wider_than_the_host_is_never_placed() -> None:
    solution = solve([gpu(0, 100), gpu(1, 100)], [demand("huge", 1, gpus_per_rung=(3,))])

    assert solution.choices == {"huge": None}
    assert solution.optimal


def test_stepping_from_two_gpus_to_one_frees_a_whole_gpu_for_another_service() -> None:
    # "chat" fits only on an empty GPU; "big" on two GPUs would leave 8 MiB on each.
    gpus = [gpu(0, 20), gpu(1, 20)]
    demands = [
        demand("big", 12, 18, gpus_per_rung=(2, 1), priority=1),
        demand("chat", 16, priority=0),
    ]

    alone = solve(gpus, demands[:1])
    together = solve(gpus, demands)

    assert alone.choices["big"] == Choice.across(0, (0, 1))
    big, chat = together.choices["big"], together.choices["chat"]
    assert big is not None and chat is not None
    assert big.rung == 1 and len(big.gpus) == 1
    assert {big.gpu, chat.gpu} == {0, 1}


def test_tensor_parallel_rung_counts_against_the_instance_limit_of_each_gpu() -> None:
    demands = [
        demand("tp", 4, gpus_per_rung=(2,), limited=True, priority=1),
        demand("solo", 4, limited=True),
    ]

    one_each = solve([gpu(0, 100, instance_limit=1), gpu(1, 100, instance_limit=1)], demands)
    two_each = solve([gpu(0, 100, instance_limit=2), gpu(1, 100, instance_limit=2)], demands)

    assert one_each.choices == {"tp": Choice.across(0, (0, 1)), "solo": None}
    assert two_each.choices["solo"] is not None


def test_headroom_counts_the_need_on_every_gpu_a_rung_uses() -> None:
    # The 2-GPU rung takes 4 MiB on two GPUs, the other service the third: 60 % stays free.
    gpus = [gpu(0, 10), gpu(1, 10), gpu(2, 10)]
    demands = [demand("tp", 4, gpus_per_rung=(2,)), demand("solo", 4)]

    solution = solve(gpus, demands)

    used = [g for c in solution.choices.values() if c is not None for g in c.gpus]
    assert sorted(used) == [0, 1, 2]
    assert math.isclose(solution.score[2], -0.6)


def test_eight_identical_gpus_with_wide_rungs_are_proven_optimal() -> None:
    # Identical GPUs are tried once per set shape, which keeps a real 8-GPU host quick.
    gib = 1024
    gpus = [gpu(i, 68 * gib) for i in range(8)]
    demands = [
        demand("llama405b", 60 * gib, 40 * gib, gpus_per_rung=(8, 4)),
        demand("llama70b", 40 * gib, 38 * gib, gpus_per_rung=(2, 1)),
        demand("qwen32b", 20 * gib, 36 * gib, gpus_per_rung=(2, 1), priority=1),
        demand("mixtral", 30 * gib, 50 * gib, gpus_per_rung=(2, 1)),
        demand("embed", 2 * gib),
    ]

    solution = solve(gpus, demands)

    assert solution.optimal
    assert violations(gpus, demands, solution.choices) == []
    assert all(c is not None for c in solution.choices.values())


# --- the API --------------------------------------------------------------------------------


def test_choice_of_one_gpu_keeps_its_old_form() -> None:
    assert Choice(2, 3).gpus == (3,)
    assert Choice(2, 3) == Choice(rung=2, gpu=3, gpus=(3,)) == Choice.across(2, [3])


@pytest.mark.parametrize("gpus", [(1, 0), (0, 0), (1, 2)])
def test_choice_refuses_gpus_out_of_order_repeated_or_not_starting_at_gpu(
    gpus: tuple[int, ...],
) -> None:
    with pytest.raises(ValueError, match="gpus"):
        Choice(rung=0, gpu=0, gpus=gpus)


@pytest.mark.parametrize("spans", [(1,), (1, 0), (2, 1, 1)])
def test_demand_refuses_gpus_per_rung_that_does_not_match_its_ladder(
    spans: tuple[int, ...],
) -> None:
    with pytest.raises(ValueError, match="gpus_per_rung"):
        Demand("alpha", (1, 2), gpus_per_rung=spans)


def test_demand_without_gpus_per_rung_spans_one_gpu_per_rung() -> None:
    alpha = Demand("alpha", (3, 2, 1))

    assert [alpha.gpus_of(r) for r in range(3)] == [1, 1, 1]
    assert Demand("beta", (3, 2), gpus_per_rung=(4, 2)).gpus_of(0) == 4
