"""Tests for supervisor.core.ladder: the incident -> decision state machine, with plain float times
(no Docker, no clock), and a property test that a step down always goes to a smaller rung."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.core.config import PolicyConfig, ServiceConfig
from supervisor.core.ladder import (
    GPU_FAULT,
    HOST_OOM,
    VRAM_OOM,
    Action,
    BurstGrouper,
    Decision,
    Observed,
    Policy,
    apply_change,
    end_cooldown,
    next_rung_down,
    transition,
)
from supervisor.core.state import ServiceState, ServiceStatus, Transition

MIB = 1024**2
POLICY = Policy(incidents_to_step_down=3, window_s=600.0, cooldown_s=60.0)

# The seed fleet's ladder: preference order, not size order (phi3:mini needs more than the
# rung above it).
SEED_MODELS = ["llama3.2:3b", "phi3:mini", "tinyllama:1.1b", "qwen2.5:0.5b"]
SEED_NEEDS = [2048 * MIB, 2200 * MIB, 637 * MIB, 397 * MIB]


def service(
    models: Sequence[str] = SEED_MODELS, needs: Sequence[int] = SEED_NEEDS
) -> ServiceConfig:
    return ServiceConfig.model_validate(
        {
            "runtime": "ollama",
            "containers": ["alpha"],
            "ladder": [{"model": m, "vram": n} for m, n in zip(models, needs, strict=True)],
        }
    )


SEED = service()


def at_rung(rung: int, **kwargs: object) -> ServiceState:
    return ServiceState(model=SEED_MODELS[rung], rung=rung, **kwargs)  # type: ignore[arg-type]


def seen(
    time: float,
    incident_class: str = VRAM_OOM,
    rule: str = "cuda-oom",
    container_id: str | None = "c0ffee",
    evidence: str | None = None,
) -> Observed:
    return Observed(
        time=time,
        incident_class=incident_class,
        rule=rule,
        container="alpha",
        container_id=container_id,
        evidence=evidence or f"CUDA error: out of memory at t={time}",
    )


def feed(
    svc: ServiceState,
    events: Sequence[Observed],
    cfg: ServiceConfig = SEED,
    needs: Sequence[int] = SEED_NEEDS,
    policy: Policy = POLICY,
) -> tuple[ServiceState, list[Decision]]:
    decisions = []
    for event in events:
        svc, decision = transition(svc, event, cfg, needs, policy)
        decisions.append(decision)
    return svc, decisions


# --- counting incidents in the window ---------------------------------------------------------


def test_three_vram_ooms_in_the_window_step_down() -> None:
    svc, decisions = feed(at_rung(0), [seen(0.0), seen(100.0), seen(200.0)])
    assert [d.action for d in decisions] == [Action.NONE, Action.NONE, Action.STEP_DOWN]
    assert svc.pending is not None


def test_two_vram_ooms_do_not_step_down() -> None:
    svc, decisions = feed(at_rung(0), [seen(0.0), seen(100.0)])
    assert decisions[-1].action is Action.NONE
    assert "2 vram_oom incidents" in decisions[-1].reason
    assert svc.pending is None
    assert (svc.rung, svc.state) == (0, ServiceStatus.STEADY)


def test_incidents_older_than_the_window_are_pruned_and_do_not_count() -> None:
    svc, decisions = feed(at_rung(0), [seen(0.0), seen(400.0), seen(1000.0)])
    assert all(d.action is Action.NONE for d in decisions)
    assert svc.pending is None
    svc, decisions = feed(at_rung(0), [seen(0.0), seen(450.0), seen(1000.0)])
    assert all(d.action is Action.NONE for d in decisions)
    assert "2 vram_oom incidents" in decisions[-1].reason
    assert [i.time for i in svc.incidents] == [450.0, 1000.0]
    assert svc.pending is None


# --- where a step down goes ----------------------------------------------------------------------


def test_seed_fleet_steps_from_rung_0_to_tinyllama_skipping_phi3() -> None:
    svc, decisions = feed(at_rung(0), [seen(0.0), seen(1.0), seen(2.0)])
    assert decisions[-1].action is Action.STEP_DOWN
    assert svc.pending is not None
    assert (svc.pending.to_rung, svc.pending.to_model) == (2, "tinyllama:1.1b")
    assert "skipped rung 1" in decisions[-1].reason
    assert "tinyllama:1.1b" in decisions[-1].reason


def test_next_rung_down_on_the_seed_ladder() -> None:
    assert next_rung_down(SEED_NEEDS, 0) == 2
    assert next_rung_down(SEED_NEEDS, 1) == 2
    assert next_rung_down(SEED_NEEDS, 2) == 3
    assert next_rung_down(SEED_NEEDS, 3) is None


def test_next_rung_down_on_equal_sizes_is_none() -> None:
    assert next_rung_down([1024 * MIB] * 4, 0) is None


def test_step_down_to_the_next_rung_says_nothing_was_skipped() -> None:
    svc, decisions = feed(at_rung(2), [seen(0.0), seen(1.0), seen(2.0)])
    assert svc.pending is not None
    assert svc.pending.to_rung == 3
    assert "skipped" not in decisions[-1].reason


# --- the pending change and applying it ------------------------------------------------------


def test_pending_change_carries_target_evidence_rule_and_container() -> None:
    events = [
        seen(0.0, evidence="first"),
        seen(1.0, evidence="second"),
        seen(2.0, rule="ggml-alloc", container_id="deadbeef", evidence="ggml: failed to alloc"),
    ]
    before = at_rung(0)
    svc, _ = feed(before, events)
    pending = svc.pending
    assert pending is not None
    assert (pending.to_rung, pending.to_model) == (2, "tinyllama:1.1b")
    assert pending.evidence == "ggml: failed to alloc"
    assert pending.rule == "ggml-alloc"
    assert pending.container_id == "deadbeef"
    assert pending.decided_at == 2.0
    # Deciding is not applying: the rung, model and state are those of before.
    assert (svc.rung, svc.model, svc.state) == (0, "llama3.2:3b", ServiceStatus.STEADY)
    assert svc.changed_at is None
    assert before.pending is None  # the input state is not mutated


def test_apply_change_moves_to_the_new_rung_in_cooldown() -> None:
    svc, decisions = feed(at_rung(0), [seen(0.0), seen(1.0), seen(2.0, evidence="OOM!")])
    after, record = apply_change(svc, "alpha", now=5.0)
    assert (after.rung, after.model) == (2, "tinyllama:1.1b")
    assert after.state is ServiceStatus.COOLDOWN
    assert after.incidents == []
    assert after.changed_at == 5.0
    assert after.pending is None
    assert isinstance(record, Transition)
    assert (record.from_rung, record.to_rung) == (0, 2)
    assert (record.from_model, record.to_model) == ("llama3.2:3b", "tinyllama:1.1b")
    assert record.reason == decisions[-1].reason
    assert record.evidence == "OOM!"
    assert (record.time, record.service, record.actor) == (5.0, "alpha", "fleetd")
    assert (record.rule, record.container_id) == ("cuda-oom", "c0ffee")


# --- the cooldown after a change -------------------------------------------------------------


def stepped_down_at(now: float) -> ServiceState:
    svc, _ = feed(at_rung(0), [seen(now - 30.0), seen(now - 20.0), seen(now - 10.0)])
    after, _ = apply_change(svc, "alpha", now=now)
    return after


def test_incidents_within_the_cooldown_are_ignored() -> None:
    svc = stepped_down_at(1000.0)
    for t in (1000.0, 1010.0, 1059.9):
        svc, decision = transition(svc, seen(t), SEED, SEED_NEEDS, POLICY)
        assert decision.action is Action.NONE
        assert "cooldown" in decision.reason
        assert svc.incidents == []
    assert svc.rung == 2


def test_after_the_cooldown_incidents_count_again_from_zero() -> None:
    svc = stepped_down_at(1000.0)
    svc, decisions = feed(svc, [seen(1060.0), seen(1070.0)])
    assert [d.action for d in decisions] == [Action.NONE, Action.NONE]
    assert "1 vram_oom incidents" in decisions[0].reason
    assert "2 vram_oom incidents" in decisions[1].reason
    svc, decision = transition(svc, seen(1080.0), SEED, SEED_NEEDS, POLICY)
    assert decision.action is Action.STEP_DOWN
    assert svc.pending is not None
    assert svc.pending.to_rung == 3


def test_end_cooldown_only_after_the_cooldown() -> None:
    svc = stepped_down_at(1000.0)
    assert end_cooldown(svc, 1059.0, POLICY).state is ServiceStatus.COOLDOWN
    assert end_cooldown(svc, 1060.0, POLICY).state is ServiceStatus.STEADY
    assert end_cooldown(svc, 5000.0, POLICY).state is ServiceStatus.STEADY


def test_end_cooldown_leaves_other_states_alone() -> None:
    for state in (ServiceStatus.STEADY, ServiceStatus.EXHAUSTED, ServiceStatus.PINNED):
        svc = at_rung(1, state=state, changed_at=0.0)
        assert end_cooldown(svc, 1e6, POLICY).state is state


# --- the bottom rung ---------------------------------------------------------------------------


def test_bottom_rung_exhausts_then_only_alerts() -> None:
    svc, decisions = feed(at_rung(3), [seen(0.0), seen(1.0), seen(2.0)])
    assert decisions[-1].action is Action.EXHAUSTED
    assert "no rung below needs less" in decisions[-1].reason
    assert svc.state is ServiceStatus.EXHAUSTED
    assert svc.pending is None
    assert svc.rung == 3
    svc, more = feed(svc, [seen(3.0 + t) for t in range(10)])
    assert all(d.action is Action.ALERT for d in more)
    assert Action.STEP_DOWN not in {d.action for d in more}
    assert (svc.rung, svc.state, svc.pending) == (3, ServiceStatus.EXHAUSTED, None)


def test_equal_sizes_below_exhaust_like_the_bottom_rung() -> None:
    needs = [1024 * MIB] * 3
    cfg = service(["a:1b", "b:1b", "c:1b"], needs)
    svc = ServiceState(model="a:1b", rung=0)
    svc, decisions = feed(svc, [seen(0.0), seen(1.0), seen(2.0)], cfg, needs)
    assert decisions[-1].action is Action.EXHAUSTED
    assert svc.state is ServiceStatus.EXHAUSTED


# --- other incident classes --------------------------------------------------------------------


def test_gpu_fault_restarts_and_never_steps_down() -> None:
    svc, decisions = feed(at_rung(0), [seen(float(t), GPU_FAULT, "xid") for t in range(20)])
    assert all(d.action is Action.RESTART for d in decisions)
    assert (svc.rung, svc.state, svc.pending) == (0, ServiceStatus.STEADY, None)


def test_host_oom_alerts_and_never_steps_down() -> None:
    svc, decisions = feed(at_rung(0), [seen(float(t), HOST_OOM, "oom-killed") for t in range(20)])
    assert all(d.action is Action.ALERT for d in decisions)
    assert (svc.rung, svc.state, svc.pending) == (0, ServiceStatus.STEADY, None)


def test_gpu_faults_and_host_ooms_do_not_count_toward_vram_oom() -> None:
    events = [seen(0.0), seen(1.0)]
    events += [seen(2.0 + t, GPU_FAULT, "xid") for t in range(5)]
    events += [seen(10.0 + t, HOST_OOM, "oom-killed") for t in range(5)]
    svc, decisions = feed(at_rung(0), events)
    assert Action.STEP_DOWN not in {d.action for d in decisions}
    assert svc.pending is None
    # The next vram_oom is the third one, whatever came between.
    svc, decision = transition(svc, seen(20.0), SEED, SEED_NEEDS, POLICY)
    assert decision.action is Action.STEP_DOWN


# --- pinned --------------------------------------------------------------------------------------


def test_pinned_service_alerts_and_keeps_its_rung() -> None:
    svc = at_rung(1, state=ServiceStatus.PINNED, pinned=1)
    svc, decisions = feed(svc, [seen(float(t)) for t in range(6)])
    assert [d.action for d in decisions[:2]] == [Action.NONE, Action.NONE]
    assert all(d.action is Action.ALERT for d in decisions[2:])
    assert "pinned" in decisions[-1].reason
    assert (svc.rung, svc.model, svc.state, svc.pending) == (
        1,
        "phi3:mini",
        ServiceStatus.PINNED,
        None,
    )


# --- policy ------------------------------------------------------------------------------------


def test_policy_from_config_defaults() -> None:
    policy = Policy.from_config(PolicyConfig())
    assert policy == Policy(incidents_to_step_down=3, window_s=600.0, cooldown_s=60.0)


def test_policy_from_config_parses_durations() -> None:
    config = PolicyConfig.model_validate(
        {"incidents_to_step_down": 5, "incident_window": "2m", "cooldown": "30s"}
    )
    assert Policy.from_config(config) == Policy(5, 120.0, 30.0)


# --- burst grouping ------------------------------------------------------------------------------


def test_a_repeating_error_is_an_incident_per_window_not_one_endless_burst() -> None:
    # A server failing every 0.5 s (Ollama keeps serving) must not merge into one incident.
    grouper = BurstGrouper(window_s=2.0)
    opened = [grouper.opens_incident("alpha", VRAM_OOM, t * 0.5) for t in range(11)]  # 0 .. 5 s
    assert opened == [True, False, False, False, False, True, False, False, False, False, True]


def test_a_new_run_of_the_container_opens_a_new_incident() -> None:
    grouper = BurstGrouper(window_s=2.0)
    assert grouper.opens_incident("alpha", VRAM_OOM, 0.0, run=1)
    assert not grouper.opens_incident("alpha", VRAM_OOM, 0.05, run=1)
    assert grouper.opens_incident("alpha", VRAM_OOM, 0.3, run=2)  # crash-looped and restarted


def test_a_seeded_incident_keeps_its_burst_together_after_a_restart_of_fleetd() -> None:
    grouper = BurstGrouper(window_s=2.0)
    grouper.seed("alpha", VRAM_OOM, 10.0)
    assert not grouper.opens_incident("alpha", VRAM_OOM, 10.05, run=7)
    assert grouper.opens_incident("alpha", VRAM_OOM, 12.5, run=7)


def test_burst_gap_longer_than_the_window_opens_a_new_incident() -> None:
    grouper = BurstGrouper(window_s=2.0)
    assert grouper.opens_incident("alpha", VRAM_OOM, 0.0)
    assert not grouper.opens_incident("alpha", VRAM_OOM, 2.0)  # exactly the window: same burst
    assert grouper.opens_incident("alpha", VRAM_OOM, 4.5)
    assert not grouper.opens_incident("alpha", VRAM_OOM, 5.0)


def test_burst_groups_per_container_and_per_class() -> None:
    grouper = BurstGrouper(window_s=2.0)
    assert grouper.opens_incident("alpha", VRAM_OOM, 0.0)
    assert grouper.opens_incident("beta", VRAM_OOM, 0.1)
    assert grouper.opens_incident("alpha", GPU_FAULT, 0.2)
    assert not grouper.opens_incident("alpha", VRAM_OOM, 0.3)
    assert not grouper.opens_incident("beta", VRAM_OOM, 0.4)
    assert not grouper.opens_incident("alpha", GPU_FAULT, 0.5)


def test_burst_window_is_configurable() -> None:
    grouper = BurstGrouper(window_s=10.0)
    assert grouper.opens_incident("alpha", VRAM_OOM, 0.0)
    assert not grouper.opens_incident("alpha", VRAM_OOM, 9.0)
    assert grouper.opens_incident("alpha", VRAM_OOM, 19.5)
    narrow = BurstGrouper(window_s=0.1)
    assert narrow.opens_incident("alpha", VRAM_OOM, 0.0)
    assert narrow.opens_incident("alpha", VRAM_OOM, 0.5)


def test_burst_default_window_is_two_seconds() -> None:
    grouper = BurstGrouper()
    assert grouper.opens_incident("alpha", VRAM_OOM, 0.0)
    assert not grouper.opens_incident("alpha", VRAM_OOM, 1.9)
    assert grouper.opens_incident("alpha", VRAM_OOM, 4.0)


# --- property: a step down always goes to a smaller rung ------------------------------------------

CLASSES = st.sampled_from([VRAM_OOM, VRAM_OOM, VRAM_OOM, GPU_FAULT, HOST_OOM])


@settings(max_examples=300, deadline=None)
@given(
    needs_mib=st.lists(st.integers(min_value=100, max_value=105), min_size=1, max_size=5),
    start=st.integers(min_value=0, max_value=4),
    events=st.lists(
        st.tuples(st.floats(min_value=0.0, max_value=400.0), CLASSES), min_size=1, max_size=40
    ),
    incidents_to_step_down=st.integers(min_value=1, max_value=4),
)
def test_step_down_always_goes_to_a_smaller_later_rung(
    needs_mib: list[int],
    start: int,
    events: list[tuple[float, str]],
    incidents_to_step_down: int,
) -> None:
    needs = [n * MIB for n in needs_mib]
    models = [f"m{i}:1b" for i in range(len(needs))]
    cfg = service(models, needs)
    policy = Policy(incidents_to_step_down, window_s=600.0, cooldown_s=60.0)
    rung = min(start, len(needs) - 1)
    svc = ServiceState(model=models[rung], rung=rung)
    now = 0.0
    for gap, incident_class in events:
        now += gap
        svc = end_cooldown(svc, now, policy)
        before = svc
        svc, decision = transition(svc, seen(now, incident_class), cfg, needs, policy)
        smaller_later = [
            r for r in range(before.rung + 1, len(needs)) if needs[r] < needs[before.rung]
        ]
        if decision.action is Action.STEP_DOWN:
            assert incident_class == VRAM_OOM
            assert svc.pending is not None
            target = svc.pending.to_rung
            assert target > before.rung
            assert needs[target] < needs[before.rung]
            assert target == smaller_later[0]  # the first one in preference order
            assert svc.pending.to_model == models[target]
            svc, record = apply_change(svc, "alpha", now)
            assert (record.from_rung, record.to_rung) == (before.rung, target)
        elif decision.action is Action.EXHAUSTED:
            assert incident_class == VRAM_OOM
            assert smaller_later == []
            assert svc.state is ServiceStatus.EXHAUSTED
        else:
            assert svc.rung == before.rung
            assert svc.pending is None
        if svc.state is not ServiceStatus.EXHAUSTED:
            assert before.state is not ServiceStatus.EXHAUSTED  # exhausted is final
