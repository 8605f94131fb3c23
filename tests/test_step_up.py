"""Stepping back up (supervisor.core.ladder): when a step up is due, probation, and the doubling
wait after a failed probation; plain float times."""

from __future__ import annotations

from supervisor.core.ladder import (
    VRAM_OOM,
    Action,
    Observed,
    Policy,
    apply_change,
    end_probation,
    step_up,
    step_up_due,
    transition,
)
from supervisor.core.state import Incident, ServiceState, ServiceStatus
from tests.test_ladder import SEED, SEED_MODELS, SEED_NEEDS

DAY = 86400.0
POLICY = Policy(
    incidents_to_step_down=3, window_s=600.0, cooldown_s=60.0, step_up_after_s=DAY,
    probation_s=1800.0,
)  # fmt: skip


def at(rung: int, **kwargs: object) -> ServiceState:
    return ServiceState(model=SEED_MODELS[rung], rung=rung, **kwargs)  # type: ignore[arg-type]


def oom(time: float) -> Observed:
    return Observed(time, VRAM_OOM, "cuda-oom", "alpha", "c0ffee", "CUDA out of memory")


def test_due_after_a_day_without_a_vram_incident() -> None:
    svc = at(2, changed_at=1000.0)
    assert not step_up_due(svc, 1000.0 + DAY - 1, POLICY, quiet_since=0.0, window_open=False)
    assert step_up_due(svc, 1000.0 + DAY, POLICY, quiet_since=0.0, window_open=False)
    # A recent incident restarts the clock, and fleetd's own start counts as "recent".
    noisy = at(2, changed_at=1000.0, incidents=[Incident(5000.0, VRAM_OOM, "r", None, "e")])
    assert not step_up_due(noisy, 1000.0 + DAY, POLICY, quiet_since=0.0, window_open=False)
    assert not step_up_due(svc, 1000.0 + DAY, POLICY, quiet_since=2000.0, window_open=False)


def test_an_off_peak_window_needs_only_a_quiet_incident_window() -> None:
    svc = at(2, changed_at=1000.0)
    assert not step_up_due(svc, 1500.0, POLICY, quiet_since=0.0, window_open=True)
    assert step_up_due(svc, 1600.0, POLICY, quiet_since=0.0, window_open=True)


def test_never_from_the_top_pinned_pending_cooling_or_on_probation() -> None:
    late = 10 * DAY
    assert not step_up_due(at(0), late, POLICY, 0.0, False)
    assert not step_up_due(at(2, pinned=2, state=ServiceStatus.PINNED), late, POLICY, 0.0, False)
    assert not step_up_due(at(2, state=ServiceStatus.COOLDOWN), late, POLICY, 0.0, False)
    assert not step_up_due(at(2, probation_until=late + 1), late, POLICY, 0.0, False)
    assert not step_up_due(at(2, step_up_not_before=late + 1), late, POLICY, 0.0, False)
    never = Policy(step_up_after_s=0.0)
    assert not step_up_due(at(2), late, never, 0.0, False)


def test_a_step_up_is_applied_on_probation_and_probation_ends_quietly() -> None:
    svc = step_up(at(2), SEED, SEED_NEEDS, 100.0, POLICY, "no incident for 1d")
    assert svc.pending is not None and svc.pending.to_rung == 1
    expected = "step up rung 2 of 4 (tinyllama:1.1b, 637 MiB) -> rung 1 of 4 (phi3:mini"
    assert expected in svc.pending.reason
    applied, record = apply_change(svc, "alpha", 200.0)
    assert (applied.rung, applied.probation_until) == (1, 2000.0)
    assert record.reason.endswith("on probation for 30m")
    assert end_probation(applied, 1999.0) is applied
    passed = end_probation(applied, 2000.0)
    assert (passed.probation_until, passed.step_up_failures) == (None, 0)


def test_one_oom_on_probation_steps_back_down_and_doubles_the_wait() -> None:
    svc = at(1, changed_at=200.0, probation_until=2000.0, state=ServiceStatus.COOLDOWN)
    # Even inside the cooldown: the new model running out of memory is the proof.
    new, decision = transition(svc, oom(210.0), SEED, SEED_NEEDS, POLICY)
    assert decision.action is Action.STEP_DOWN
    assert new.pending is not None and new.pending.to_rung == 2
    assert (new.step_up_failures, new.step_up_not_before) == (1, 210.0 + 2 * DAY)
    assert "next step up in 48h at the earliest" in decision.reason
    # The second failure in a row waits four days.
    again = at(1, changed_at=300.0, probation_until=3000.0, step_up_failures=1)
    new, decision = transition(again, oom(400.0), SEED, SEED_NEEDS, POLICY)
    assert new.step_up_not_before == 400.0 + 4 * DAY


def test_an_oom_after_probation_counts_as_usual() -> None:
    svc = at(1, changed_at=200.0, probation_until=None)
    new, decision = transition(svc, oom(5000.0), SEED, SEED_NEEDS, POLICY)
    assert decision.action is Action.NONE and new.pending is None
