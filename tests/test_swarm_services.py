"""The Swarm edge's parsing: task objects and service log lines as the manager's API gives
them (shapes taken from a real single-node swarm), and the env update it makes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from supervisor.core.config import load_config
from supervisor.core.state import FleetState, ServiceState
from supervisor.core.status import Live, status_json
from supervisor.edges.services import env_matches, parse_log_line, set_env, task_of

FAILED = {
    "ID": "m86wh4f1uohb7r9ex21x2k4z5",
    "NodeID": "tn3ul9yxx372goze0rvzpdtmi",
    "ServiceID": "9hdlpsos0dri4f8yz0m4wu6qq",
    "DesiredState": "shutdown",
    "CreatedAt": "2026-12-04T13:51:30.922010516Z",
    "Spec": {"ContainerSpec": {"Env": ["RUNTIME=vllm", "MODEL=big"]}},
    "Status": {
        "Timestamp": "2026-12-04T13:51:32.643153448Z",
        "State": "failed",
        "Message": "started",
        "Err": "task: non-zero exit (1)",
        "ContainerStatus": {"ContainerID": "47f7b890", "PID": 0, "ExitCode": 1},
    },
}
RUNNING = {
    "ID": "mm3fwiu3uiffs0rz3ztr2qjvv",
    "NodeID": "tn3ul9yxx372goze0rvzpdtmi",
    "DesiredState": "running",
    "CreatedAt": "2026-12-04T13:51:36.982881Z",
    "Spec": {"ContainerSpec": {"Env": ["RUNTIME=vllm", "MODEL=small"]}},
    "Status": {
        "Timestamp": "2026-12-04T13:51:37.5Z",
        "State": "running",
        "ContainerStatus": {"ContainerID": "81003da3", "PID": 4242, "ExitCode": 0},
    },
}


def test_a_failed_task_has_its_exit_code_and_times_in_nanoseconds() -> None:
    task = task_of(FAILED, "fleet_llm")
    assert (task.state, task.ended, task.running, task.exit_code) == ("failed", True, False, 1)
    assert task.created_ns == 1_796_392_290_922_010_516
    assert task.changed_ns == 1_796_392_292_643_153_448
    assert task.env == ("RUNTIME=vllm", "MODEL=big")


def test_a_running_task_has_no_exit_code_yet() -> None:
    task = task_of(RUNNING, "fleet_llm")
    assert (task.running, task.ended, task.exit_code) == (True, False, None)
    assert task.created_ns == 1_796_392_296_982_881_000  # six fraction digits padded


def test_a_service_log_line_gives_its_task_node_time_and_text() -> None:
    raw = (
        "2026-12-04T13:51:36.057544087Z com.docker.swarm.node.id=tn3u,"
        "com.docker.swarm.service.id=9hdl,com.docker.swarm.task.id=znit70 "
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.06 GiB."
    )
    record = parse_log_line(raw)
    assert record is not None
    assert (record.task_id, record.node_id) == ("znit70", "tn3u")
    assert record.time_ns == 1_796_392_296_057_544_087
    assert record.text == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.06 GiB."


def test_a_line_without_a_task_tag_or_stamp_is_not_a_record() -> None:
    assert parse_log_line("2026-12-04T13:51:36.057544087Z hello world") is None
    assert parse_log_line("not a stamp com.docker.swarm.task.id=x text") is None


def test_an_env_update_sets_removes_and_keeps_the_rest_in_order() -> None:
    env = ["RUNTIME=vllm", "MODEL=big", "FLEETD_CONTEXT=8192", "A=1"]
    changes = {"MODEL": "medium", "FLEETD_CONTEXT": None, "FLEETD_SERVED_NAME": "llm"}
    updated = set_env(env, changes)
    assert updated == ["RUNTIME=vllm", "A=1", "MODEL=medium", "FLEETD_SERVED_NAME=llm"]
    assert env_matches(updated, changes)
    assert not env_matches(env, changes)
    assert not env_matches([*updated, "FLEETD_CONTEXT=4096"], changes)  # must be unset


def test_status_shows_the_task_a_running_fleetd_reports(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    body = {
        "mode": "swarm",
        "gpus": [{"name": "g", "memory": "8GiB"}],
        "services": {"llm": {"runtime": "vllm", "ladder": [{"model": "m", "vram": "1GiB"}]}},
    }
    path.write_text(yaml.safe_dump(body))
    config = load_config(path)
    state = FleetState()

    state.services["llm"] = ServiceState(model="m", rung=0)
    task = {"id": "mm3f", "node": "gpu-a", "node_id": "tn3u", "state": "running", "since": 1.0}
    report = status_json(state, config, 2.0, live=Live(tasks={"llm": task}))
    assert report["services"]["llm"]["task"] == task
    assert status_json(state, config, 2.0)["services"]["llm"]["task"] is None  # no fleetd


def test_a_reload_that_switches_to_swarm_mode_is_refused_and_changes_nothing(
    tmp_path: Path,
) -> None:
    from supervisor.daemon import Daemon
    from supervisor.edges.engine import EngineNotAnswering

    def no_docker() -> Any:
        raise EngineNotAnswering("no engine in this test")

    path = tmp_path / "fleet.yaml"
    service = {"runtime": "vllm", "containers": ["llm"], "ladder": [{"model": "m", "vram": "1GiB"}]}
    body: dict[str, Any] = {"gpus": [{"name": "g", "memory": "8GiB"}], "services": {"llm": service}}
    path.write_text(yaml.safe_dump(body))
    daemon = Daemon(path, tmp_path / "state", docker_factory=no_docker, serve_metrics=False)
    daemon.start()
    path.write_text(yaml.safe_dump({**body, "mode": "swarm"}))
    refused: list[str] = []
    daemon.apply_config(done=lambda: refused.append("done"))
    daemon.drain(0.1)
    assert refused == ["done"]
    assert daemon.config.mode == "host"
    daemon.shutdown()


def test_task_states_become_the_events_a_container_would_give() -> None:
    import queue

    from supervisor.core.step import ContainerEvent
    from supervisor.edges.watch import SwarmWatcher

    out: queue.Queue[object] = queue.Queue()
    started_s = 1_796_392_290.0  # the watcher starts before FAILED was created
    watcher = SwarmWatcher(None, started_s, out, dict, lambda tasks: None)  # type: ignore[arg-type]
    running = task_of(RUNNING, "fleet_llm")
    failed = task_of(FAILED, "fleet_llm")
    shut = task_of(
        {**RUNNING, "ID": "shut", "Status": {**RUNNING["Status"], "State": "shutdown"}}, "fleet_llm"
    )
    for task in (running, running, failed, failed, shut):  # read twice: reported once
        watcher._emit("llm", task)
    events = [out.get_nowait() for _ in range(out.qsize())]
    assert events == [
        ContainerEvent("llm", running.id, "start", running.created_ns),
        ContainerEvent(
            "llm", failed.id, "die", failed.changed_ns, 1, ("swarm: task: non-zero exit (1)",)
        ),
    ]  # Swarm's own shutdown is no exit of the service's


def test_a_task_that_ended_before_fleetd_watched_is_no_event() -> None:
    import queue

    from supervisor.edges.watch import SwarmWatcher

    out: queue.Queue[object] = queue.Queue()
    watcher = SwarmWatcher(None, 1_796_392_300.0, out, dict, lambda tasks: None)  # type: ignore[arg-type]
    watcher._emit("llm", task_of(FAILED, "fleet_llm"))
    assert out.empty()
