"""fleetd in `mode: swarm` on a real single-node swarm, on a stack `fleetctl generate
--swarm` wrote: it follows the service's task logs through the manager, steps the service
down with a rolling service update, keeps the rung across its own restart (and puts it back
on a service a redeploy reset), shows the task and node in `fleetctl status`, and misses no
incident while the manager is cut off.

The node is described with the stand-in GPUs as node labels (the `gpu_node_labels`
fixture, as in test_swarm_stack.py); the service is the oom-emitter stand-in as a
`generic` service that reads its model from `model_env: MODEL`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml

from tests.integration.fleet_harness import IMAGE, SIZES, Fleet, at_rung
from tests.integration.swarm import GPUS, Swarm
from tests.integration.test_daemon_reconnect import ENGINE, SocketProxy

CAPACITY_MIB = 3000  # big (4000 MiB) runs out of memory at every start; medium fits


@pytest.fixture
def stack(
    swarm: Swarm,
    docker_client: docker.DockerClient,
    emitter_image: str,
    gpu_node_labels: dict[str, str],
    tmp_path: Path,
) -> Iterator[Stack]:
    deployed = Stack(docker_client, f"fleettest{uuid.uuid4().hex[:6]}", tmp_path / "stack.yml")
    yield deployed
    deployed.remove()


class Stack:
    """The stack `fleetctl generate --swarm` writes for a fleet, deployed with the real
    `docker stack deploy`."""

    def __init__(self, client: docker.DockerClient, name: str, path: Path) -> None:
        self.client, self.name, self.path = client, name, path

    def generate(self, fleet: Fleet) -> None:
        _fleetctl(fleet, "generate", "--swarm", "--config", str(fleet.config), "-o", str(self.path))

    def deploy(self) -> None:
        _run(
            "docker", "stack", "deploy", "--resolve-image", "never", "-c", str(self.path), self.name
        )

    @property
    def service(self) -> str:
        return f"{self.name}_llm"

    def env(self) -> dict[str, str]:
        spec = self.client.api.inspect_service(self.service)["Spec"]
        env = spec["TaskTemplate"]["ContainerSpec"].get("Env") or []
        return dict(e.partition("=")[::2] for e in env)

    def tasks(self) -> list[dict[str, Any]]:
        service_id = self.client.api.inspect_service(self.service)["ID"]
        found = self.client.api.tasks(filters={"service": service_id})
        return sorted(found, key=lambda t: str(t["CreatedAt"]))

    def running_model(self) -> str | None:
        """The MODEL of the newest running task (the one the service runs now)."""
        running = [t for t in self.tasks() if t["Status"]["State"] == "running"]
        if not running:
            return None
        env = running[-1]["Spec"]["ContainerSpec"].get("Env") or []
        return dict(e.partition("=")[::2] for e in env).get("MODEL")

    def remove(self) -> None:
        subprocess.run(["docker", "stack", "rm", self.name], capture_output=True, check=False)
        label = {"label": f"com.docker.stack.namespace={self.name}"}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not self.client.services.list(filters=label) and not self.client.networks.list(
                filters=label
            ):
                return
            time.sleep(0.5)
        raise AssertionError(f"stack {self.name} was not removed within 60 s")


def _run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr}"
    return done.stdout


def _config(fleet: Fleet, stack: Stack) -> None:
    """`llm` on the stand-in: `big` (4000 MiB) runs out of the stand-in's 3000 MiB at every
    start, `medium` fits; the plan puts `big` on a 24 GiB stand-in GPU. `batch`: its first
    rung needs more than a GPU, so the plan (and the stack) start it on its second, which
    runs fine; fleetd must keep it there."""
    emitter = {
        "RUNTIME": "vllm",
        "CAPACITY_MIB": str(CAPACITY_MIB),
        "MODEL_SIZES": SIZES,
        "MODEL_FROM_ENV": "1",
    }
    llm = fleet.service("generic", "llm", model_env="MODEL", image=IMAGE, environment=emitter)
    batch = {
        "runtime": "generic",
        "model_env": "MODEL",
        "image": IMAGE,
        "environment": emitter,
        "ladder": [{"model": "huge", "vram": "40GiB"}, {"model": "small", "vram": "1000MiB"}],
    }
    del llm["containers"]  # `mode: swarm`: the service `llm` of the stack
    fleet.write_config({"llm": llm, "batch": batch}, mode="swarm", swarm={"stack": stack.name})
    body = yaml.safe_load(fleet.config.read_text())
    del body["gpus"]  # the swarm's nodes say what GPUs there are (node labels here)
    fleet.config.write_text(yaml.safe_dump(body))
    stack.generate(fleet)
    generated = yaml.safe_load(stack.path.read_text())["services"]
    assert generated["llm"]["environment"]["MODEL"] == "big"
    assert generated["batch"]["environment"]["MODEL"] == "small"


def _fleetctl(fleet: Fleet, *args: str) -> str:
    code = "from supervisor.cli.fleetctl import main; main()"
    done = subprocess.run(
        [sys.executable, "-c", code, *args, "--state-dir", str(fleet.state_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _status(fleet: Fleet) -> dict[str, Any]:
    return dict(json.loads(_fleetctl(fleet, "status", "--json")))


def _until(what: str, check: Callable[[], Any], timeout_s: float, fleet: Fleet) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}\n{fleet.log.read_text()[-4000:]}")


def test_steps_a_swarm_service_down_by_service_update_and_keeps_it(
    fleet: Fleet, stack: Stack, swarm: Swarm
) -> None:
    _config(fleet, stack)
    stack.deploy()
    fleet.start()

    state = fleet.wait_for("the step down", at_rung("llm", 1), timeout_s=150)
    [change] = state["history"]
    assert (change["from_model"], change["to_model"]) == ("big", "medium")
    assert "CUDA out of memory" in change["evidence"]
    # the rung reached Swarm as a service update, and the new task runs it
    _until("a task of medium running", lambda: stack.running_model() == "medium", 60, fleet)
    assert stack.env()["MODEL"] == "medium"
    assert stack.env()["FLEETD_SERVED_NAME"]  # the stable name rides along with the model

    # start-first: the old task may run a moment beside the new one; status follows the
    # newest within a task read (2 s)
    def status_shows_the_newest() -> dict[str, Any] | None:
        running = [t for t in stack.tasks() if t["Status"]["State"] == "running"]
        task = _task_of(_status(fleet))
        return task if task and running and task["id"] == running[-1]["ID"] else None

    report = _until("status with the running task", status_shows_the_newest, 30, fleet)
    assert report["node"] == swarm.hostname
    assert report["node_id"] == swarm.node_id
    assert report["state"] == "running"
    # the GPUs are the swarm's, as node init published them, not the manager's NVML
    gpus = _status(fleet)["gpus"]
    assert [(g["uuid"], g["total_bytes"]) for g in gpus] == [(g.uuid, g.memory_bytes) for g in GPUS]
    # batch started where the plan put it, and stayed: fleetd did not update it
    assert fleet.state()["services"]["batch"]["rung"] == 1
    assert "batch: service" not in fleet.log.read_text()
    text = _fleetctl(fleet, "status")
    print(text)  # the README's example
    assert f"llm: task {report['id'][:12]} on node {swarm.hostname} (running since" in text

    # fleetd restarts: nothing changes, the service stays on medium
    assert fleet.stop() == 0
    fleet.start()
    time.sleep(8)
    state = fleet.state()
    assert state["services"]["llm"]["rung"] == 1
    assert len(state["history"]) == 1
    still = [t for t in stack.tasks() if t["Status"]["State"] == "running"]
    seen = [(t["ID"], t["Status"]["State"], t["Slot"]) for t in stack.tasks()]
    assert [t["ID"] for t in still] == [report["id"]], seen  # not rolled again: the same task runs
    assert stack.running_model() == "medium"

    # the stack is deployed again from its file (MODEL=big) while fleetd is down: fleetd
    # puts the rung the state names back with a service update when it starts
    assert fleet.stop() == 0
    stack.deploy()  # the same generated file: MODEL=big again
    assert stack.env()["MODEL"] == "big"
    fleet.start()
    _until("the service back on medium", lambda: stack.env()["MODEL"] == "medium", 30, fleet)
    _until("a task of medium running", lambda: stack.running_model() == "medium", 60, fleet)
    assert fleet.state()["services"]["llm"]["rung"] == 1
    assert "does not run rung 1 (medium) that the state names" in fleet.log.read_text()

    # a person puts it back on its first rung: the same service update, the other way
    _fleetctl(fleet, "reset", "llm")
    _until("the service back on big", lambda: stack.env()["MODEL"] == "big", 60, fleet)
    assert fleet.state()["services"]["llm"]["rung"] == 0
    assert fleet.stop() == 0


def _task_of(report: dict[str, Any]) -> dict[str, Any] | None:
    task = report["services"]["llm"].get("task")
    return task if task and task.get("state") == "running" else None


def test_misses_no_incident_while_the_manager_is_cut_off(
    fleet: Fleet, stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not Path(ENGINE).exists():
        pytest.fail(f"{ENGINE} is missing")
    proxy = SocketProxy(tmp_path / "docker.sock")
    proxy.start()
    monkeypatch.setenv("DOCKER_HOST", f"unix://{proxy.path}")
    _config(fleet, stack)
    fleet.start()  # first: every task of the stack runs while fleetd watches
    stack.deploy()
    fleet.wait_for("a first incident", _incidents_at_least(1), timeout_s=90)

    # as a manager restart: every connection drops and the socket is gone for longer than
    # the stack's 10 s between tries, so a task fails while fleetd cannot see the manager
    proxy.cut()
    time.sleep(13)
    assert fleet.process is not None and fleet.process.poll() is None, "fleetd must not die"
    proxy.start()

    state = fleet.wait_for("the step down after reconnecting", at_rung("llm", 1), timeout_s=90)
    assert "Docker is not reachable" in fleet.log.read_text()
    # Nothing lost: fleetd stepped down at the third failure of `big`, the one of the cut
    # among them (had it missed that one, it would have waited for a fourth).
    [change] = state["history"]
    assert change["to_model"] == "medium"
    assert _failures_until(stack, change["time"]) == 3
    _until("a task of medium running", lambda: stack.running_model() == "medium", 60, fleet)
    assert fleet.stop() == 0
    proxy.cut()


def _failures_until(stack: Stack, until: float) -> int:
    """How many tasks of `big` had exited (failed) by `until`: the ones whose exit Swarm
    reported first (their container's exit, in the task's status) at or before it."""
    count = 0
    for task in stack.tasks():
        env = task["Spec"]["ContainerSpec"].get("Env") or []
        if "MODEL=big" not in env or task["Status"]["State"] != "failed":
            continue
        created = _epoch(task["CreatedAt"])
        if created <= until:
            count += 1
    return count


def _epoch(stamp: str) -> float:
    base, _, frac = stamp.rstrip("Z").partition(".")
    when = datetime.fromisoformat(base).replace(tzinfo=UTC).timestamp()
    return when + float(f"0.{frac or 0}")


def _incidents_at_least(count: int) -> Callable[[dict[str, Any]], bool]:
    return lambda s: len(s["services"].get("llm", {}).get("incidents", [])) >= count
