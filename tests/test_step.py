"""The supervision step with plain values: messages in, the world and effects out.

Each test is a scenario: a fleet, a sequence of messages (log matches, Docker events,
ticks, control requests, workers' results) at given times, and the effects expected.
They cover what tests/integration runs against a real engine (named in each docstring)
and the paths a real engine cannot reach on demand (a worker failing, stale results,
backoff that decays). No Docker, no NVML, no threads, no clock.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from supervisor.core import step
from supervisor.core.config import GpuDeclaration, load_config
from supervisor.core.gpus import declared_gpus
from supervisor.core.health import Breaker, HealthStatus
from supervisor.core.plan import RungNeed
from supervisor.core.state import FleetState, Measured, ServiceState, ServiceStatus
from supervisor.core.step import Phase, World
from supervisor.daemon.lifecycle import Settled

MIB = 1024**2
GIB = 1024**3

FLEET = """
budget: 0.85
gpus: [{name: test, memory: 8GiB}]
policy:
  incidents_to_step_down: 3
  incident_window: 10m
  cooldown: 60s
  burst_window: 0.5s
  stop_timeout: 2s
  step_up_after: 1h
  probation: 30m
services:
  svc:
    runtime: llamacpp
    containers: [svc-1]
    port: 8080
    ladder:
      - {model: big, vram: 4000MiB}
      - {model: medium, vram: 2500MiB}
      - {model: wide, vram: 2600MiB}
      - {model: small, vram: 1000MiB}
  app:
    runtime: ollama
    image: example/app:1
    containers: [app-1]
    ensemble: [{model: "qwen:7b", vram: 5GiB}, {model: "llama3:8b", vram: 5GiB}]
"""


def priced(name: str, models: list[str], sizes: list[int]) -> list[RungNeed]:
    return [
        RungNeed(i, m, b, "declared", "declared")
        for i, (m, b) in enumerate(zip(models, sizes, strict=True))
    ]


NEEDS = {
    "svc": priced(
        "svc", ["big", "medium", "wide", "small"], [4000 * MIB, 2500 * MIB, 2600 * MIB, 1000 * MIB]
    ),
    "app": priced("app", ["qwen:7b"], [5 * GIB]),
}
T0 = 1_000_000.0  # fleetd started; every time below is T0 + seconds


@pytest.fixture
def fleet(tmp_path: Path) -> World:
    return make_world(tmp_path, FLEET)


def make_world(tmp_path: Path, text: str, **services: ServiceState) -> World:
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    config = load_config(path)
    state = FleetState(
        services={
            "svc": services.get("svc", ServiceState("big", 0)),
            "app": services.get("app", ServiceState("qwen:7b", 0)),
        }
    )
    world = step.initial_world(config, state, NEEDS, T0, {"pid": 1})
    assert not isinstance(config.gpus, str)
    return replace(world, gpus=declared_gpus(config.gpus), docker_up=True)


class Run:
    """Feeds messages one by one, keeping every effect with the message that made it."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.effects: list[step.Effect] = []

    def __call__(self, message: step.Message, at_s: float) -> list[step.Effect]:
        self.world, effects = step.step(self.world, message, T0 + at_s)
        self.effects += effects
        return effects

    @property
    def svc(self) -> ServiceState:
        return self.world.state.services["svc"]

    def flight(self, name: str = "svc") -> step.Flight:
        return self.world.flight(name)


def oom(at_s: float, container: str = "svc-1", run_ns: int = 0) -> step.LineMatched:
    return step.LineMatched(
        container,
        "c1",
        int((T0 + at_s) * 1e9),
        run_ns,
        "llamacpp.cuda_malloc_failed",
        "vram_oom",
        "cudaMalloc failed: out of memory",
    )


def fault(at_s: float) -> step.LineMatched:
    return step.LineMatched(
        "svc-1",
        "c1",
        int((T0 + at_s) * 1e9),
        0,
        "cuda.illegal_address",
        "gpu_fault",
        "CUDA error: an illegal memory access was encountered",
    )


def of(effects: Iterable[step.Effect], kind: type) -> list[Any]:
    return [e for e in effects if isinstance(e, kind)]


def logs(effects: Iterable[step.Effect], level: str | None = None) -> str:
    return "\n".join(e.text for e in of(effects, step.Log) if level in (None, e.level))


def step_down_to_medium(run: Run) -> step.Restart:
    for at in (1, 2, 3):
        run(oom(at), at + 0.1)
    [restart] = of(run.effects, step.Restart)
    return restart  # type: ignore[no-any-return]


# --- incidents and the ladder (tests/integration/test_daemon.py) ------------------------


def test_three_incidents_in_the_window_step_down_and_save_first(fleet: World) -> None:
    """test_steps_down_to_the_largest_rung_that_fits_and_stays."""
    run = Run(fleet)
    assert of(run(oom(1), 1.1), step.Restart) == []
    assert of(run(oom(2), 2.1), step.Restart) == []
    effects = run(oom(3), 3.1)

    [restart] = of(effects, step.Restart)
    assert (restart.old_model, restart.model, restart.handoff) == ("big", "medium", True)
    assert effects.index(step.Save()) < effects.index(restart)  # recorded before applied
    assert run.svc.pending is not None and run.svc.pending.rule == "llamacpp.cuda_malloc_failed"
    assert run.flight().phase is Phase.APPLYING
    assert len(of(run.effects, step.CountIncident)) == 3
    assert of(effects, step.CountIncident)[0].latency_s == pytest.approx(0.1)


def test_lines_of_one_burst_count_once_and_a_new_run_opens_a_new_incident(fleet: World) -> None:
    """test_kill_9_loses_nothing_and_counts_nothing_twice (a burst is one incident)."""
    run = Run(fleet)
    for ms in (0, 50, 300, 450):
        run(oom(1 + ms / 1000, run_ns=1), 2)
    assert len(run.svc.incidents) == 1
    run(oom(1.5, run_ns=2), 2)  # the container restarted: its first OOM is new
    assert len(run.svc.incidents) == 2


def test_incidents_outside_the_window_do_not_add_up(fleet: World) -> None:
    run = Run(fleet)
    for at in (0, 700, 1400):  # more than 10 minutes apart
        run(oom(at), at + 0.1)
    assert of(run.effects, step.Restart) == []
    assert len(run.svc.incidents) == 1


def test_a_rung_no_smaller_is_skipped_and_the_bottom_is_exhausted(tmp_path: Path) -> None:
    """test_skips_a_rung_that_needs_no_less_and_exhausts_at_the_bottom."""
    world = make_world(tmp_path, FLEET, svc=ServiceState("medium", 1, changed_at=T0 - 3600))
    run = Run(world)
    [restart] = of([e for at in (1, 2, 3) for e in run(oom(at), at + 0.1)], step.Restart)
    assert restart.model == "small"
    assert run.svc.pending is not None and "skipped rung 2" in run.svc.pending.reason

    bottom = make_world(tmp_path, FLEET, svc=ServiceState("small", 3, changed_at=T0 - 3600))
    run = Run(bottom)
    effects = [e for at in (1, 2, 3) for e in run(oom(at), at + 0.1)]
    assert run.svc.state is ServiceStatus.EXHAUSTED
    assert of(effects, step.Restart) == []
    [stop] = of(effects, step.StopContainers)
    assert stop.containers == ("svc-1",)
    assert "EXHAUSTED" in logs(effects, "CRITICAL")
    assert run.world.expected_stops["svc-1"] == T0 + 3.1 + 2 + 5


def test_after_a_change_old_lines_and_the_cooldown_do_not_count(fleet: World) -> None:
    run = Run(fleet)
    restart = step_down_to_medium(run)
    run(step.Applied("svc", restart.change, None, settles=False), 4)
    assert run.svc.rung == 1 and run.svc.state is ServiceStatus.COOLDOWN
    run(oom(3.5), 5)  # printed before the change
    run(oom(10), 10.1)  # within the 60 s cooldown
    assert run.svc.incidents == []
    run(step.Tick("reconcile"), 70)
    assert run.svc.state is ServiceStatus.STEADY


def test_a_pinned_service_records_incidents_and_never_moves(tmp_path: Path) -> None:
    world = make_world(tmp_path, FLEET, svc=ServiceState("big", 0, pinned=0))
    run = Run(world)
    for at in (1, 2, 3, 4):
        run(oom(at), at + 0.1)
    assert of(run.effects, step.Restart) == []
    assert "is pinned" in logs(run.effects)
    assert len(run.svc.incidents) == 4


# --- Docker events are rules too (test_daemon_lifecycle.py, test_daemon.py) ------------


def test_docker_oom_event_and_exit_137_are_host_oom_never_a_step_down(fleet: World) -> None:
    run = Run(fleet)
    for at, action, code in ((1, "oom", None), (2, "die", 137), (3, "die", 137)):
        run(step.ContainerEvent("svc-1", "c1", action, int((T0 + at) * 1e9), code), at)
    assert [i.rule for i in run.svc.incidents] == [
        "docker.oom_event",
        "docker.exit_137",
        "docker.exit_137",
    ]
    assert {i.incident_class for i in run.svc.incidents} == {"host_oom"}
    assert of(run.effects, step.Restart) == []


def test_one_kill_is_one_incident_though_docker_reports_oom_then_exit_137(fleet: World) -> None:
    run = Run(fleet)
    for at, action, code in ((1.0, "oom", None), (1.07, "die", 137)):
        run(step.ContainerEvent("svc-1", "c1", action, int((T0 + at) * 1e9), code), at)
    assert [i.rule for i in run.svc.incidents] == ["docker.oom_event"]


def test_an_exit_after_a_persons_docker_stop_or_kill_is_not_an_incident(fleet: World) -> None:
    run = Run(fleet)
    for at, action, code in ((1.0, "kill", None), (1.2, "die", 137), (40.0, "die", 137)):
        run(step.ContainerEvent("svc-1", "c1", action, int((T0 + at) * 1e9), code), at)
    # `docker kill` then its exit: nothing; a kill by the kernel much later: one host_oom.
    assert [(i.rule, i.time) for i in run.svc.incidents] == [("docker.exit_137", T0 + 40.0)]
    run(step.ContainerEvent("svc-1", "c1", "kill", int((T0 + 50) * 1e9)), 50)
    run(step.ContainerEvent("svc-1", "c1", "die", int((T0 + 51) * 1e9), 0), 51)
    assert len(run.svc.incidents) == 1  # `docker stop`: a clean exit, asked for


def test_a_server_that_exits_0_by_itself_is_a_crash_and_is_restarted(fleet: World) -> None:
    run = Run(fleet)
    effects = run(step.ContainerEvent("svc-1", "c1", "die", int((T0 + 1) * 1e9), 0), 1)
    assert [(i.incident_class, i.rule) for i in run.svc.incidents] == [("crash", "docker.exit_0")]
    [restart] = of(effects, step.Restart)
    assert (restart.model, restart.old_model, run.svc.rung) == ("big", "big", 0)
    assert "crash (docker.exit_0): it stopped by itself: restart, never step down" in logs(effects)


def exited(at_s: float, code: int, *lines: str) -> step.ContainerEvent:
    return step.ContainerEvent("svc-1", "c1", "die", int((T0 + at_s) * 1e9), code, lines)


def test_an_unexplained_non_zero_exit_is_a_crash_loop_restarted_with_backoff(
    fleet: World,
) -> None:
    run = Run(fleet)
    effects = run(exited(1, 3, "loading weights", "Segmentation fault (core dumped)"), 1.1)

    [incident] = run.svc.incidents
    assert (incident.incident_class, incident.rule) == ("crash_loop", "docker.exit_unexplained")
    assert incident.evidence == (
        "container svc-1 exited 3; its last lines: loading weights | Segmentation fault (core "
        "dumped)"
    )
    [restart] = of(effects, step.Restart)
    assert (restart.model, run.svc.rung) == ("big", 0)
    # It keeps crashing: restarts back off (1 s, 2 s, 4 s ...), and it never steps down.
    run(step.Applied("svc", restart.change, None, settles=False), 1.2)
    for at in (1.5, 2.0, 6.0, 6.5, 20.0):
        for again in of(
            run(exited(at, 3, "Segmentation fault (core dumped)"), at + 0.1), step.Restart
        ):
            run(step.Applied("svc", again.change, None, settles=False), at + 0.2)
    assert len(run.svc.incidents) == 6
    assert run.svc.rung == 0 and run.svc.pending is None
    assert len(of(run.effects, step.Restart)) == 4  # two were held back by the backoff
    assert "restart held back" in logs(run.effects)
    assert "crash_loop (docker.exit_unexplained): 6 unexplained exits in 10m" in logs(run.effects)


def test_an_expected_stop_ends_when_the_container_starts_again(fleet: World) -> None:
    run = Run(fleet)
    run(step.StopExpected("svc-1", T0 + 40), 1)  # fleetd restarts it
    run(exited(1.2, 143), 1.3)  # the stop it expected
    run(step.ContainerEvent("svc-1", "c1", "start", int((T0 + 1.5) * 1e9)), 1.6)
    run(exited(3.5, 3, "boom"), 3.6)  # the new run crashes on its own
    assert [i.evidence for i in run.svc.incidents] == [
        "container svc-1 exited 3; its last lines: boom"
    ]


def test_a_restart_the_backoff_holds_back_is_made_when_the_wait_is_over(fleet: World) -> None:
    run = Run(fleet)
    [first] = of(run(exited(1, 3, "boom"), 1.1), step.Restart)
    run(step.Applied("svc", first.change, None, settles=False), 1.2)
    held = run(exited(1.5, 3, "boom"), 1.6)  # within the 1 s backoff
    assert of(held, step.Restart) == [] and "in 0.5 s" in logs(held)
    assert of(run(step.Tick("reconcile"), 1.9), step.Restart) == []  # not yet
    [later] = of(run(step.Tick("reconcile"), 2.2), step.Restart)  # the wait is over
    assert (later.model, run.svc.restarts) == ("big", 2)
    assert of(run(step.Tick("reconcile"), 9.0), step.Restart) == []  # made once


def test_the_exit_of_a_run_a_change_is_leaving_is_no_crash_loop(fleet: World) -> None:
    # Its OOM line is not counted (the change is on its way), but it still explains the
    # exit: counting that exit as a crash loop restarted the service under the change.
    run = Run(fleet)
    step_down_to_medium(run)  # APPLYING: lines of the run being left are not counted
    run(oom(39.5), 39.6)  # long after the counted ones
    effects = run(exited(40, 1, "cudaMalloc failed: out of memory"), 40.1)
    assert [i.incident_class for i in run.svc.incidents] == ["vram_oom"] * 3
    assert of(effects, step.Restart) == []


def test_an_exit_a_matched_line_explains_is_not_a_crash_loop(fleet: World) -> None:
    run = Run(fleet)
    run(oom(1), 1.1)
    run(exited(3, 1, "cudaMalloc failed: out of memory"), 3.1)  # the OOM's own exit
    run(exited(60, 1, "cudaMalloc failed: out of memory"), 60.1)  # long after: unexplained
    assert [i.incident_class for i in run.svc.incidents] == ["vram_oom", "crash_loop"]


def test_an_app_without_an_api_may_exit_0(tmp_path: Path) -> None:
    text = FLEET.replace("runtime: llamacpp", "runtime: generic\n    image: example/app:1")
    run = Run(make_world(tmp_path, text.replace("    port: 8080\n", "")))
    effects = run(step.ContainerEvent("svc-1", "c1", "die", int((T0 + 1) * 1e9), 0), 1)
    assert run.svc.incidents == [] and not of(effects, step.Restart)


def test_a_start_failure_is_reported_with_its_cause_never_acted_on(fleet: World) -> None:
    run = Run(fleet)
    line = step.LineMatched(
        "svc-1", "c1", int((T0 + 1) * 1e9), 0, "llamacpp.bad_argument", "start_failure",
        "error: invalid argument: --no-mmap",
    )  # fmt: skip
    effects = run(line, 1.1)
    assert [i.incident_class for i in run.svc.incidents] == ["start_failure"]
    assert not of(effects, step.Restart) and run.svc.rung == 0
    assert "a restart or a smaller rung does not fix that" in logs(effects)
    assert "error: invalid argument: --no-mmap" in logs(effects)


def test_an_exit_137_of_fleetds_own_stop_is_not_an_incident(fleet: World) -> None:
    run = Run(fleet)
    run(step.StopExpected("svc-1", T0 + 10), 1)
    run(step.ContainerEvent("svc-1", "c1", "die", int((T0 + 2) * 1e9), 137), 2)
    assert run.svc.incidents == []
    run(step.ContainerEvent("svc-1", "c1", "die", int((T0 + 11) * 1e9), 137), 11)
    assert len(run.svc.incidents) == 1


def test_other_events_and_unwatched_containers_are_not_incidents(fleet: World) -> None:
    run = Run(fleet)
    run(step.ContainerEvent("svc-1", "c1", "destroy", int(T0 * 1e9)), 1)
    run(step.ContainerEvent("svc-1", "c1", "die", int(T0 * 1e9), None), 1)  # no exit code
    run(step.ContainerEvent("stranger", "c9", "oom", int(T0 * 1e9)), 1)
    run(oom(1, container="stranger"), 1)
    assert run.effects == []


# --- applying a change: the worker's result (test_lifecycle.py, test_daemon.py) -----------


def test_a_change_applied_goes_into_the_history_then_settles(fleet: World) -> None:
    run = Run(fleet)
    restart = step_down_to_medium(run)
    effects = run(step.Applied("svc", restart.change, None, settles=True), 4)

    [record] = run.world.state.history
    assert (record.from_model, record.to_model, record.rule) == (
        "big",
        "medium",
        "llamacpp.cuda_malloc_failed",
    )
    assert of(effects, step.CountTransition)[0].record == record
    assert run.flight().phase is Phase.SETTLING
    run(step.Progress("svc", restart.change, "warming up"), 5)
    assert run.flight().activity == "warming up"
    measured = Measured(2400 * MIB, 1.5, 40.0, T0 + 6)
    effects = run(
        step.SettleDone(restart.change, Settled("svc", "medium", True, "ready", measured)), 6
    )
    assert run.flight().phase is Phase.IDLE and run.flight().activity is None
    assert run.world.state.measured["medium"] == measured
    assert step.Reprice() in effects and step.Save() in effects
    assert "2400 MiB VRAM measured (planned 2500 MiB)" in logs(effects)


def test_on_a_cpu_host_the_measured_need_is_host_memory(tmp_path: Path) -> None:
    run = Run(make_world(tmp_path, "accelerator: cpu\n" + FLEET))
    restart = step_down_to_medium(run)
    run(step.Applied("svc", restart.change, None, settles=True), 4)
    measured = Measured(2400 * MIB, 1.5, 40.0, T0 + 6)
    effects = run(
        step.SettleDone(restart.change, Settled("svc", "medium", True, "ready", measured)), 6
    )
    assert "2400 MiB host memory measured (planned 2500 MiB)" in logs(effects)


def test_an_oom_while_the_new_model_loads_aborts_its_wait_and_steps_down_again(
    fleet: World,
) -> None:
    """test_lifecycle: an OOM line while loading ends the wait and steps down at once."""
    run = Run(fleet)
    restart = step_down_to_medium(run)
    run(step.Applied("svc", restart.change, None, settles=True), 4)
    effects = run(oom(5), 5.1)
    assert step.AbortSettle("svc", restart.change) in effects
    failed = Settled("svc", "medium", False, "out of memory while loading", oom=True)
    effects = run(step.SettleDone(restart.change, failed), 5.2)
    [again] = of(effects, step.Restart)
    assert again.model == "small"  # wide (rung 2) needs no less than medium: skipped
    assert "ran out of memory while loading" in logs(effects)


def test_lines_of_the_rung_left_never_count_against_the_new_one(fleet: World) -> None:
    """A real vLLM prints its error twice (its logger, then the engine's traceback) and
    Docker may restart the failed container before fleetd does: the new rung must not pay
    for any of it."""
    run = Run(fleet)
    old_run = int((T0 + 0.5) * 1e9)
    for at in (1, 2, 3):
        run(oom(at, run_ns=old_run + int(at * 1e9)), at + 0.1)
    restart = of(run.effects, step.Restart)[0]
    # Still applying: the old instance repeats its error; Docker restarts it once more.
    effects = run(oom(3.2, run_ns=old_run + int(3 * 1e9)), 3.25)
    effects += run(oom(3.4, run_ns=int((T0 + 3.3) * 1e9)), 3.45)
    assert not of(effects, step.AbortSettle) and not of(effects, step.Restart)
    assert run.svc.pending is not None and run.svc.pending.to_model == "medium"
    new_run = int((T0 + 3.6) * 1e9)
    run(step.Applied("svc", restart.change, None, True, (("svc-1", new_run),)), 3.7)
    # Settling: a late line of an older run is not the new model failing to load...
    effects = run(oom(3.5, run_ns=int((T0 + 3.3) * 1e9)), 3.8)
    assert not of(effects, step.AbortSettle) and run.svc.rung == 1
    assert "not counted, printed by the run before the change" in logs(effects, "DEBUG")
    # ...but a line of the new run is.
    effects = run(oom(4.0, run_ns=new_run), 4.1)
    assert step.AbortSettle("svc", restart.change) in effects


def test_a_server_still_loading_is_not_restarted_for_failed_checks(fleet: World) -> None:
    """llama.cpp's start period is 300 s: a large model may take minutes to load."""
    run = Run(fleet)
    started = T0 + 100
    for at in (110, 140, 170, 200):
        effects = run(step.HealthChecked("svc", False, "connection refused", started), at)
        assert not of(effects, step.Restart)
    assert "not answering yet, 100 s into its 300 s start period" in logs(run.effects, "DEBUG")
    for at in (410, 440, 470):  # past the start period: a hung server
        effects = run(step.HealthChecked("svc", False, "connection refused", started), at)
    assert of(effects, step.Restart)


def test_a_settle_result_of_an_older_change_is_ignored(fleet: World) -> None:
    run = Run(fleet)
    restart = step_down_to_medium(run)
    run(step.Applied("svc", restart.change, None, settles=True), 4)
    stale = Settled("svc", "big", False, "gone", oom=True)
    run(step.SettleDone(restart.change - 1, stale), 5)
    assert run.flight().phase is Phase.SETTLING
    assert run.svc.pending is None and run.svc.rung == 1


def test_a_failed_restart_is_retried_with_a_backoff_that_doubles(fleet: World) -> None:
    run = Run(fleet)
    restart = step_down_to_medium(run)
    waits = []
    for attempt in range(4):
        run(step.Applied("svc", restart.change, "Docker is not reachable"), 10)
        assert run.flight().phase is Phase.RETRYING
        assert run.svc.pending is not None  # the decision stays recorded
        waits.append((run.flight().retry_at or 0) - (T0 + 10))
        assert of(run(step.Tick("reconcile"), 10 + waits[-1] - 0.5), step.Restart) == []
        [restart] = of(run(step.Tick("reconcile"), 10 + waits[-1]), step.Restart)
        assert restart.model == "medium", attempt
    assert waits == [5, 10, 20, 40]
    assert "will retry in 5 s" in logs(run.effects, "ERROR")
    run(step.Applied("svc", restart.change, None), 60)
    assert run.svc.rung == 1 and run.flight().retries == 0


def test_the_retry_backoff_is_capped_at_five_minutes(fleet: World) -> None:
    run = Run(fleet)
    restart = step_down_to_medium(run)
    for _ in range(12):
        run(step.Applied("svc", restart.change, "no"), 10)
        [restart] = of(run(step.Tick("reconcile"), 10 + 301), step.Restart)
    assert (run.flight().retry_at or 0) <= T0 + 10 + 300


# --- GPU faults: restart, never step down; a backoff that decays -----------------------------


def test_a_gpu_fault_restarts_the_same_model_with_a_decaying_backoff(fleet: World) -> None:
    run = Run(fleet)
    [first] = of(run(fault(1), 1), step.Restart)
    assert (first.model, first.handoff) == ("big", False)
    run(step.Applied("svc", first.change, None, settles=False), 1.5)
    assert run.flight().phase is Phase.IDLE and run.world.state.history == []
    [second] = of(run(fault(2.2), 2.2), step.Restart)  # 1 s after the first: allowed
    run(step.Applied("svc", second.change, None), 2.3)
    assert of(run(fault(3), 3), step.Restart) == []  # 2 s backoff now
    assert "held back (2 s backoff)" in logs(run.effects, "WARNING")
    assert run.svc.rung == 0 and run.svc.pending is None
    # Ten quiet minutes later the count is forgotten: the next fault restarts at once.
    [later] = of(run(fault(700), 700), step.Restart)
    assert later.model == "big" and run.svc.restarts == 1


# --- the control API (test_control_api.py) --------------------------------------------------


def request(call: int, op: str, service: str | None = "svc", **args: Any) -> step.Request:
    return step.Request(call, op, service, args, "with fleetctl by uid 0")


def test_a_downgrade_is_answered_once_the_containers_run_the_new_model(fleet: World) -> None:
    """test_downgrade_through_the_socket_restarts_and_records_the_person."""
    run = Run(fleet)
    effects = run(request(7, "downgrade"), 1)
    [restart] = of(effects, step.Restart)
    assert restart.model == "medium" and of(effects, step.Reply) == []
    busy = run(request(8, "downgrade"), 1.5)
    [refused] = of(busy, step.Reply)
    assert (refused.call, refused.status) == (8, 409)
    effects = run(step.Applied("svc", restart.change, None, settles=False), 2)
    [reply] = of(effects, step.Reply)
    assert (reply.call, reply.status) == (7, 200)
    assert reply.body["transition"]["actor"] == "fleetctl"
    assert "restarted svc-1" in reply.body["message"]
    assert run.world.state.history[-1].to_model == "medium"


def test_a_change_that_cannot_be_applied_fails_its_caller_and_stays_recorded(
    fleet: World,
) -> None:
    run = Run(fleet)
    [restart] = of(run(request(7, "downgrade"), 1), step.Restart)
    [reply] = of(run(step.Applied("svc", restart.change, "Docker is not reachable"), 2), step.Reply)
    assert reply.status == 500 and "fleetd retries it" in reply.body["error"]
    assert run.svc.pending is not None


def test_bad_requests_are_answered_with_the_reason(fleet: World) -> None:
    run = Run(fleet)
    [unknown] = of(run(request(1, "downgrade", "nope"), 1), step.Reply)
    assert unknown.status == 400 and "no service 'nope'" in unknown.body["error"]
    [bad_op] = of(run(request(2, "explode"), 1), step.Reply)
    assert bad_op.status == 400
    [not_ensemble] = of(run(request(3, "warm", model="x"), 1), step.Reply)
    assert not_ensemble.status == 409


def test_status_and_history_answer_from_the_world(fleet: World) -> None:
    run = Run(fleet)
    restart = step_down_to_medium(run)
    run(step.Progress("svc", restart.change, "pulling medium: 40%"), 3.5)
    [status] = of(run(request(1, "status", None), 4), step.Reply)
    row = status.body["services"]["svc"]
    assert (row["model"], row["pending"], row["activity"]) == (
        "big",
        "medium",
        "pulling medium: 40%",
    )
    assert status.body["daemon"]["docker"] is True
    assert status.body["gpus"][0]["budget_bytes"] == int(0.85 * 8 * GIB)
    run(step.Applied("svc", restart.change, None), 5)
    [history] = of(run(request(2, "history"), 6), step.Reply)
    assert [t["to_model"] for t in history.body] == ["medium"]


def test_an_upgrade_that_does_not_fit_is_refused_unless_forced(tmp_path: Path) -> None:
    world = make_world(tmp_path, FLEET, svc=ServiceState("medium", 1))
    world = replace(world, gpus=declared_gpus([GpuDeclaration(name="small", memory=3 * GIB)]))
    run = Run(world)
    [refused] = of(run(request(1, "upgrade"), 1), step.Reply)
    assert refused.status == 409 and "will not fit" in refused.body["error"]
    [restart] = of(run(request(2, "upgrade", force=True), 2), step.Restart)
    assert restart.model == "big"


def test_warming_an_ensemble_member_is_one_change_in_flight(fleet: World) -> None:
    run = Run(fleet)
    [warm] = of(run(request(1, "warm", "app", model="llama3:8b"), 1), step.WarmMember)
    assert warm.others == ("qwen:7b",)
    [busy] = of(run(request(2, "warm", "app", model="qwen:7b"), 1.5), step.Reply)
    assert busy.status == 409
    done = Settled("app", "llama3:8b", True, "loaded in 2.0 s")
    [reply] = of(run(step.MemberWarmed(1, warm.change, done), 3), step.Reply)
    assert reply.status == 200 and run.flight("app").phase is Phase.IDLE


# --- health and the circuit breaker (test_lifecycle.py) ------------------------------------


def test_failed_health_checks_restart_the_service_and_the_breaker_opens(fleet: World) -> None:
    run = Run(fleet)
    config = fleet.config.services["svc"].health
    restarts = 0
    at = 1.0
    for _ in range(config.breaker_after + 1):
        for _ in range(config.unhealthy_after):
            [check] = of(run(step.Tick("health:svc"), at), step.CheckHealth)
            effects = run(step.HealthChecked(check.service, False, "connection refused"), at)
            at += 1
        for restart in of(effects, step.Restart):
            restarts += 1
            run(step.Applied("svc", restart.change, None), at)
    assert restarts == config.breaker_after
    assert run.flight().health.breaker is Breaker.OPEN
    assert "circuit breaker OPEN" in logs(run.effects, "WARNING")


def test_no_health_check_while_a_change_is_in_flight(fleet: World) -> None:
    run = Run(fleet)
    step_down_to_medium(run)
    assert of(run(step.Tick("health:svc"), 4), step.CheckHealth) == []
    run.world = replace(run.world, flights={})
    [check] = of(run(step.Tick("health:svc"), 5), step.CheckHealth)
    assert of(run(step.Tick("health:svc"), 5.5), step.CheckHealth) == []  # one in flight
    run(step.HealthChecked(check.service, True, None), 6)
    run(step.HealthChecked(check.service, True, None), 7)
    assert run.flight().health.status is HealthStatus.HEALTHY


# --- stepping back up, probation (test_step_up.py, test_lifecycle.py) ----------------------


def test_a_quiet_service_steps_up_on_probation_and_comes_back_on_an_oom(tmp_path: Path) -> None:
    world = make_world(tmp_path, FLEET, svc=ServiceState("medium", 1, changed_at=T0 - 7200))
    run = Run(world)
    [up] = of(run(step.Tick("step_up"), 3700), step.Restart)
    assert up.model == "big"
    run(step.Applied("svc", up.change, None), 3701)
    assert run.svc.probation_until == T0 + 3701 + 1800
    [down] = of(run(oom(3800), 3800.1), step.Restart)  # one OOM on probation is enough
    assert down.model == "medium"
    assert run.svc.step_up_failures == 1


def test_a_step_up_that_does_not_fit_is_said_once(tmp_path: Path) -> None:
    world = make_world(tmp_path, FLEET, svc=ServiceState("medium", 1, changed_at=T0 - 7200))
    world = replace(world, gpus=declared_gpus([GpuDeclaration(name="small", memory=4 * GIB)]))
    run = Run(world)
    first = run(step.Tick("step_up"), 3700)
    second = run(step.Tick("step_up"), 3760)
    assert of(first + second, step.Restart) == []
    assert logs(first).count("a step up is due but rung 0") == 1
    assert "a step up is due" not in logs(second)


# --- start-up, reload, readings -----------------------------------------------------------


def test_a_change_interrupted_by_a_restart_of_fleetd_is_completed(tmp_path: Path) -> None:
    """test_a_decision_interrupted_by_a_crash_is_completed_at_the_next_start."""
    pending_world = make_world(tmp_path, FLEET)
    run = Run(pending_world)
    step_down_to_medium(run)
    saved = run.world.state  # what state.json held when fleetd was killed
    restarted = step.initial_world(pending_world.config, saved, NEEDS, T0 + 100, {})
    effects = Run(restarted)(step.Resume(), 101)
    [restart] = of(effects, step.Restart)
    assert restart.model == "medium" and "interrupted" in logs(effects)


def test_reconfigure_settles_every_service_and_hands_off_its_model(tmp_path: Path) -> None:
    world = make_world(tmp_path, FLEET)
    run = Run(world)
    shorter = FLEET.replace("      - {model: small, vram: 1000MiB}\n", "")
    (tmp_path / "fleet.yaml").write_text(shorter.replace("app:", "chat:", 1))
    new = load_config(tmp_path / "fleet.yaml")
    needs = {"svc": NEEDS["svc"][:3], "chat": NEEDS["app"]}
    effects = run(step.Reconfigure(new, needs, {"chat": 0}, call=5), 1)
    assert set(run.world.state.services) == {"svc", "app", "chat"}  # app's state is kept
    written = {(w.service, w.model) for w in of(effects, step.WriteModel)}
    assert {("chat", "qwen:7b"), ("svc", "big")} <= written
    [reply] = of(effects, step.Reply)
    assert (
        reply.body["message"] == "config reloaded: added ['chat'], changed ['svc'], removed ['app']"
    )
    assert step.Reattach(frozenset({"svc", "app"})) in effects
    assert of(effects, step.ForgetName) == []  # app was an ensemble: no stable name


def test_a_removed_ollama_service_takes_its_stable_model_with_it(tmp_path: Path) -> None:
    chat = FLEET.replace(
        '    ensemble: [{model: "qwen:7b", vram: 5GiB}, {model: "llama3:8b", vram: 5GiB}]',
        '    served_name: assistant\n    port: 11434\n    ladder: [{model: "qwen:7b", vram: 5GiB}]',
    )
    world = make_world(tmp_path, chat)
    (tmp_path / "fleet.yaml").write_text(FLEET.split("  app:")[0])
    new = load_config(tmp_path / "fleet.yaml")
    effects = Run(world)(step.Reconfigure(new, {"svc": NEEDS["svc"]}, {}), 1)
    [forget] = of(effects, step.ForgetName)
    assert (forget.service, forget.name, forget.runtime) == ("app", "assistant", "ollama")
    assert forget.endpoint == "http://127.0.0.1:11434"


def test_a_service_whose_rung_left_the_ladder_starts_again_where_planned(tmp_path: Path) -> None:
    world = make_world(tmp_path, FLEET, svc=ServiceState("small", 3))
    shorter = FLEET.replace("      - {model: small, vram: 1000MiB}\n", "")
    (tmp_path / "fleet.yaml").write_text(shorter)
    new = load_config(tmp_path / "fleet.yaml")
    effects = Run(world)(step.Reconfigure(new, {**NEEDS, "svc": NEEDS["svc"][:3]}, {"svc": 1}), 1)
    assert ("svc", "medium") in [(w.service, w.model) for w in of(effects, step.WriteModel)]


def test_a_lost_gpu_is_said_once_and_its_return_too(fleet: World) -> None:
    run = Run(fleet)
    good = fleet.gpus
    lost = (replace(good[0], error="GPU is lost"),)
    first = run(step.GpusRead(lost), 1)
    again = run(step.GpusRead(lost), 2)
    back = run(step.GpusRead(good), 3)
    assert "GPU 0: GPU is lost" in logs(first, "ERROR") and logs(again) == ""
    assert "GPU 0 is back" in logs(back, "WARNING")


def test_a_checkpoint_saves_where_each_follower_read_to(fleet: World) -> None:
    from supervisor.core.state import LogCursor

    effects = Run(fleet)(step.Checkpoint({"svc-1": LogCursor("c1", 42)}), 1)
    assert effects == [step.Save()]


# --- the step itself ---------------------------------------------------------------------


def test_the_step_never_changes_the_world_it_is_given(fleet: World) -> None:
    run = Run(fleet)
    step_down_to_medium(run)
    before = copy.deepcopy(run.world)
    messages: list[step.Message] = [
        oom(4),
        fault(5),
        step.Tick("reconcile"),
        request(1, "downgrade"),
        step.Applied("svc", 1, None, settles=True),
        step.ContainerEvent("svc-1", "c1", "oom", int(T0 * 1e9)),
    ]
    for message in messages:
        step.step(run.world, message, T0 + 10)
        assert run.world == before, message


def test_every_message_type_has_a_handler() -> None:
    import typing

    kinds = typing.get_args(step.Message)
    assert len(kinds) == 19
    assert set(kinds) <= set(step._HANDLERS)


# --- the runtime's own report of what a run allocated -------------------------------------


def report(model: str, total_mib: int, tokens_per_s: float | None = None) -> Measured:
    parts = {"model": (total_mib - 20) * MIB, "kv": 4 * MIB, "compute": 16 * MIB, "output": 0}
    return Measured(total_mib * MIB, None, tokens_per_s, T0, parts, 4096, 1, "b11669 (Debian)")


def test_a_buffer_report_prices_the_running_rung_and_keeps_the_estimate_beside_it(
    fleet: World,
) -> None:
    run = Run(fleet)
    effects = run(step.FootprintRead("svc", "big", report("big", 3000)), 1)
    seen = run.world.state.measured["big"]
    assert seen.vram_bytes == 3000 * MIB and seen.parts is not None
    assert seen.estimate_bytes == 4000 * MIB  # what the plan priced it at before
    assert of(effects, step.Reprice) and of(effects, step.Save)
    assert "big allocated 3000 MiB by its own report (estimated 4000 MiB" in logs(effects)


def test_a_report_of_a_rung_the_service_has_left_is_dropped(fleet: World) -> None:
    run = Run(fleet)
    effects = run(step.FootprintRead("svc", "medium", report("medium", 900)), 1)
    assert "medium" not in run.world.state.measured and not effects


def test_a_warm_up_after_the_report_keeps_the_report_and_adds_the_speed(fleet: World) -> None:
    run = Run(fleet)
    run(step.FootprintRead("svc", "big", report("big", 3000)), 1)
    restart = step_down_to_medium(run)
    run(step.Applied("svc", restart.change, None, settles=True), 4)
    run(step.FootprintRead("svc", "medium", report("medium", 2000)), 5)
    warmed = Measured(None, 0.5, 42.0, T0 + 6)  # the API says no VRAM for llama.cpp
    run(step.SettleDone(restart.change, Settled("svc", "medium", True, "ready", warmed)), 6)
    seen = run.world.state.measured["medium"]
    assert (seen.vram_bytes, seen.tokens_per_s, seen.load_s) == (2000 * MIB, 42.0, 0.5)
    assert seen.parts is not None and seen.version == "b11669 (Debian)"


def test_each_load_failure_is_the_evidence_of_its_own_step_down(tmp_path: Path) -> None:
    """Two rungs in a row run out of memory while loading: each step down's record carries
    the line of the rung it leaves, not the one before."""
    from supervisor.daemon.lifecycle import Settled

    world = make_world(tmp_path, FLEET, svc=ServiceState("big", 0))
    sizes = [4000 * MIB, 2500 * MIB, 2000 * MIB, 1000 * MIB]  # each rung needs less
    world = replace(
        world,
        needs={**world.needs, "svc": priced("svc", [], [])}
        | {"svc": priced("svc", ["big", "medium", "wide", "small"], sizes)},
    )
    run = Run(world)
    run(step.Request(1, "downgrade", "svc", {}, "with fleetctl by uid 0"), 1)
    evidence = []
    for rung, model in ((1, "medium"), (2, "wide")):
        restart = of(run.effects, step.Restart)[-1]
        run(step.Applied("svc", restart.change, None, True, ()), 2 * rung)
        line = replace(oom(2 * rung + 0.5), text=f"cudaMalloc failed: out of memory ({rung})")
        run(line, 2 * rung + 0.5)
        result = Settled("svc", model, False, "out of memory", oom=True, rung=rung)
        run(step.SettleDone(restart.change, result), 2 * rung + 1)
        assert run.svc.pending is not None, run.effects
        evidence.append(run.svc.pending.evidence)
    assert evidence == [
        "cudaMalloc failed: out of memory (1)",
        "cudaMalloc failed: out of memory (2)",
    ]
