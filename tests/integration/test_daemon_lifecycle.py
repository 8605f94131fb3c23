"""`fleetd run` as systemd runs it: the notify protocol, signals, reloads and restarts.

A real `fleetd run` subprocess talks to a datagram socket the test binds
(NOTIFY_SOCKET) with WATCHDOG_USEC=2000000, against the real Docker engine; incidents
come from the oom-emitter test image. Services whose containers do not exist are fine:
fleetd attaches to them when they start.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml
from docker.models.containers import Container

from supervisor.core.state import FleetState, ServiceState
from supervisor.daemon import Daemon
from supervisor.edges.watch import LogLine
from tests.entrypoints import entry_point
from tests.integration.fleet_harness import IMAGE, LADDER, SIZES

WATCHDOG_USEC = 2_000_000
FLEETD = "from supervisor.cli.fleetd import main; main()"
MAX_SUN_PATH = 107


@dataclass
class Message:
    at: float  # time.monotonic() when it arrived
    text: str
    snapshot: dict[str, Any] = field(default_factory=dict)  # files, taken as it arrived


class NotifySocket:
    """systemd's end of NOTIFY_SOCKET: records every datagram with when it arrived.

    On READY=1 it snapshots state.json and the model files at once, from the receiving
    thread, so the test sees what existed when fleetd said it was ready.
    """

    def __init__(self, directory: Path, snapshot: Callable[[], dict[str, Any]]) -> None:
        if len(os.fsencode(directory / "notify.sock")) > MAX_SUN_PATH:
            directory = Path(tempfile.mkdtemp(prefix="fleetd-notify-"))
        self.path = directory / "notify.sock"
        self._snapshot = snapshot
        self.messages: list[Message] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.path))
        self._sock.settimeout(0.1)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stopped.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            text = data.decode()
            at = time.monotonic()
            snap = self._snapshot() if "READY=1" in text.split("\n") else {}
            self.messages.append(Message(at, text, snap))

    def with_field(self, name: str) -> list[Message]:
        """Messages carrying `NAME=...` (e.g. READY, STATUS, WATCHDOG)."""
        return [
            m for m in self.messages if any(f.startswith(name + "=") for f in m.text.split("\n"))
        ]

    def wait_for(self, name: str, count: int = 1, timeout_s: float = 15.0) -> list[Message]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = self.with_field(name)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"no {count}x {name}= within {timeout_s} s: {self.messages}")

    def close(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=2)
        self._sock.close()
        self.path.unlink(missing_ok=True)


def _field(message: Message, name: str) -> str:
    [value] = [f.split("=", 1)[1] for f in message.text.split("\n") if f.startswith(name + "=")]
    return value


class Fleetd:
    """One test's config, state dir, notify socket and `fleetd run` process."""

    def __init__(self, tmp: Path, client: docker.DockerClient, labels: dict[str, str]) -> None:
        self.tmp, self.client, self.labels = tmp, client, labels
        self.state_dir = tmp / "state"
        self.config = tmp / "fleet.yaml"
        self.log = tmp / "fleetd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.notify: NotifySocket | None = None
        self.services: list[str] = []

    # --- config --------------------------------------------------------------------------

    def write_config(self, services: dict[str, dict[str, Any]], **policy: Any) -> None:
        body = {
            "budget": 0.85,
            "gpus": [{"name": "test", "memory": "8GiB"}],
            "policy": {
                "incidents_to_step_down": 50,
                "incident_window": "10m",
                "cooldown": "1s",
                "burst_window": "0.5s",
                "stop_timeout": "2s",
                **policy,
            },
            "services": services,
            # Any free port: tests on this machine run fleetds side by side.
            "metrics": {"address": "127.0.0.1:0"},
        }
        self.config.write_text(yaml.safe_dump(body, sort_keys=False))

    @staticmethod
    def service(container: str, runtime: str = "ollama") -> dict[str, Any]:
        ladder = [{"model": m, "vram": v} for m, v in LADDER]
        return {"runtime": runtime, "containers": [container], "ladder": ladder}

    # --- files ---------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        path = self.state_dir / "state.json"
        return json.loads(path.read_text()) if path.exists() else {"services": {}}

    def model_file(self, service: str) -> str | None:
        path = self.state_dir / "services" / service / "model"
        return path.read_text() if path.exists() else None

    def snapshot(self) -> dict[str, Any]:
        state = self.state_dir / "state.json"
        return {
            "state": json.loads(state.read_text()) if state.exists() else None,
            "models": {name: self.model_file(name) for name in self.services},
        }

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    # --- the process ---------------------------------------------------------------------

    def start(self, services: list[str], **env: str) -> NotifySocket:
        """Start `fleetd run`; `services` are the names whose files READY must find."""
        self.services = services
        if self.notify is not None:
            self.notify.close()
        self.notify = NotifySocket(self.tmp, self.snapshot)
        environ = {k: v for k, v in os.environ.items() if not k.startswith("FLEETD_")}
        environ.update(NOTIFY_SOCKET=str(self.notify.path), WATCHDOG_USEC=str(WATCHDOG_USEC))
        environ.update(env)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    FLEETD,
                    "run",
                    "--config",
                    str(self.config),
                    "--state-dir",
                    str(self.state_dir),
                    "--log-level",
                    "DEBUG",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=self.tmp,
                env=environ,
            )
        return self.notify

    def ready(self, timeout_s: float = 20.0) -> Message:
        assert self.notify is not None
        try:
            [message, *_] = self.notify.wait_for("READY", timeout_s=timeout_s)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.log_text()}") from None
        return message

    def send(self, sig: int) -> None:
        assert self.process is not None and self.process.poll() is None, self.log_text()
        self.process.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> tuple[int, float]:
        """Send `sig`; the exit code and how long fleetd took to exit."""
        assert self.process is not None
        began = time.monotonic()
        self.process.send_signal(sig)
        code = self.process.wait(timeout=timeout_s)
        took = time.monotonic() - began
        self.process = None
        return code, took

    def wait_for(self, what: str, check: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if check():
                return
            assert self.process is None or self.process.poll() is None, self.log_text()
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}\n{self.log_text()}")

    def wait_for_log(self, text: str, count: int = 1, timeout_s: float = 10.0) -> None:
        self.wait_for(
            f"{count}x {text!r} in the log", lambda: self.log_text().count(text) >= count, timeout_s
        )

    # --- containers ----------------------------------------------------------------------

    def run_emitter(self, name: str, service: str, capacity_mib: int, **env: str) -> Container:
        handoff = self.state_dir / "services" / service
        handoff.mkdir(parents=True, exist_ok=True)
        if not (handoff / "model").exists():
            (handoff / "model").write_text(LADDER[0][0] + "\n")
        return self.client.containers.run(
            IMAGE,
            name=name,
            detach=True,
            labels=self.labels,
            environment={
                "RUNTIME": "ollama",
                "CAPACITY_MIB": str(capacity_mib),
                "MODEL_SIZES": SIZES,
                **env,
            },
            volumes={str(handoff): {"bind": "/run/fleetd", "mode": "ro"}},
        )

    def close(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
        if self.notify is not None:
            self.notify.close()


@pytest.fixture
def fleetd(
    tmp_path: Path, docker_client: docker.DockerClient, cleanup: Any, emitter_image: str
) -> Iterator[Fleetd]:
    f = Fleetd(tmp_path, docker_client, cleanup.labels)
    yield f
    f.close()


def _absent() -> str:
    """A container name that exists nowhere: fleetd waits for it to start."""
    return f"absent-{uuid.uuid4().hex[:10]}"


def _incidents(f: Fleetd, service: str) -> int:
    return len(f.state()["services"].get(service, {}).get("incidents", []))


# --- start-up, status, watchdog, stop ----------------------------------------------------


def test_ready_status_watchdog_and_sigterm(fleetd: Fleetd) -> None:
    fleetd.write_config({"alpha": fleetd.service(_absent()), "beta": fleetd.service(_absent())})
    notify = fleetd.start(["alpha", "beta"])

    ready = fleetd.ready()

    # Everything a service needs was on disk before READY=1 was sent.
    snap = ready.snapshot
    assert snap["state"] is not None, "READY=1 before state.json existed"
    assert set(snap["state"]["services"]) == {"alpha", "beta"}
    assert snap["models"] == {"alpha": "big\n", "beta": "big\n"}
    # READY=1 carries a one-line STATUS naming every service.
    status = _field(ready, "STATUS")
    assert "\n" not in status
    assert "alpha" in status and "beta" in status and "big" in status
    # WATCHDOG=1 at least every WATCHDOG_USEC / 2 (1 s): two or more within 3 s.
    time.sleep(3.0)
    pings = [m.at for m in notify.with_field("WATCHDOG") if m.at >= ready.at]
    assert len(pings) >= 2, notify.messages
    assert all(b - a < WATCHDOG_USEC / 1e6 for a, b in itertools.pairwise(pings))

    code, took = fleetd.stop(signal.SIGTERM)

    assert code == 0, fleetd.log_text()
    assert took < 5.0, f"fleetd took {took:.1f} s to stop"
    notify.wait_for("STOPPING", timeout_s=1)
    stopping = notify.with_field("STOPPING")[0]
    assert stopping.at > ready.at
    assert "Traceback" not in fleetd.log_text()
    assert "fleetd stopped" in fleetd.log_text()


def test_a_persisted_rung_is_kept_across_restarts(fleetd: Fleetd) -> None:
    fleetd.write_config({"svc": fleetd.service(_absent()), "other": fleetd.service(_absent())})
    fleetd.state_dir.mkdir()
    before = FleetState(
        services={
            "svc": ServiceState(model="wide", rung=2),
            # A stale model name at a valid rung: the ladder's model for that rung wins.
            "other": ServiceState(model="renamed-since", rung=3),
        }
    )
    (fleetd.state_dir / "state.json").write_text(before.to_json())

    for run in range(2):  # and again after a clean restart
        fleetd.start(["svc", "other"])
        ready = fleetd.ready()

        assert ready.snapshot["models"] == {"svc": "wide\n", "other": "small\n"}, run
        services = ready.snapshot["state"]["services"]
        assert (services["svc"]["rung"], services["svc"]["model"]) == (2, "wide")
        assert (services["other"]["rung"], services["other"]["model"]) == (3, "small")
        assert "svc=wide" in _field(ready, "STATUS")
        assert fleetd.stop()[0] == 0
    assert "starting at rung" not in fleetd.log_text()


def test_a_bad_config_at_start_exits_2_with_file_line_and_key(fleetd: Fleetd) -> None:
    fleetd.write_config({"svc": fleetd.service(_absent())})
    text = fleetd.config.read_text().replace("2500MiB", "12 potatoes")
    fleetd.config.write_text(text)
    line = 1 + text.splitlines().index(next(x for x in text.splitlines() if "12 potatoes" in x))
    notify = fleetd.start(["svc"])

    assert fleetd.process is not None
    code = fleetd.process.wait(timeout=20)
    fleetd.process = None

    err = fleetd.log_text()
    assert code == 2, err
    assert "Traceback" not in err
    [first, *_] = err.strip().splitlines()
    assert f"{fleetd.config}:{line}: services.svc.ladder[1].vram: " in first
    assert "potatoes" in first
    assert not fleetd.state_dir.exists()
    time.sleep(0.2)
    assert notify.with_field("READY") == []


def test_docker_unreachable_starts_retries_and_stops(fleetd: Fleetd) -> None:
    fleetd.write_config({"svc": fleetd.service(_absent())})
    notify = fleetd.start(["svc"], DOCKER_HOST="unix:///nonexistent.sock")

    ready = fleetd.ready()

    assert ready.snapshot["models"] == {"svc": "big\n"}
    assert "Docker is not reachable" in fleetd.log_text()
    # The reconcile job (every 5 s) tries again, and fleetd keeps answering the watchdog.
    fleetd.wait_for_log("Docker is not reachable", count=2, timeout_s=8)
    assert len([m for m in notify.with_field("WATCHDOG") if m.at > ready.at]) >= 2
    code, took = fleetd.stop()
    assert code == 0, fleetd.log_text()
    assert took < 5.0
    assert notify.wait_for("STOPPING", timeout_s=1)
    assert "Traceback" not in fleetd.log_text()


class HungEngine:
    """A Docker socket that accepts every connection and never answers (an engine stuck
    on a lock, a full disk or a dead containerd looks like this to its clients)."""

    def __init__(self, directory: Path) -> None:
        if len(os.fsencode(directory / "hung.sock")) > MAX_SUN_PATH:
            directory = Path(tempfile.mkdtemp(prefix="fleetd-hung-"))
        self.path = directory / "hung.sock"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(self.path))
        self._sock.listen(64)
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections.append(conn)  # read nothing, answer nothing, keep it open

    def close(self) -> None:
        self._sock.close()
        for conn in self.connections:
            conn.close()


def test_a_hung_engine_blocks_neither_status_nor_the_watchdog_nor_sigterm(
    fleetd: Fleetd, tmp_path: Path
) -> None:
    engine = HungEngine(tmp_path)
    try:
        fleetd.write_config({"svc": fleetd.service(_absent())})
        notify = fleetd.start(["svc"], DOCKER_HOST=f"unix://{engine.path}")

        ready = fleetd.ready(timeout_s=10)
        assert ready.snapshot["models"] == {"svc": "big\n"}
        # At start it waits 2 s for the engine; the reconcile's next try times out (10 s).
        fleetd.wait_for_log("Docker is not reachable", count=2, timeout_s=40)
        assert engine.connections, "fleetd never tried the engine"

        # While it hangs, fleetctl gets its answer from the running fleetd, which says so.
        fleetctl = [entry_point("fleetctl"), "status", "--state-dir", str(fleetd.state_dir)]
        shown = subprocess.run(fleetctl, capture_output=True, text=True, timeout=10)
        assert shown.returncode == 0, shown.stderr
        assert "Docker engine: not answering" in shown.stdout, shown.stdout
        as_json = subprocess.run([*fleetctl, "--json"], capture_output=True, timeout=10)
        daemon = json.loads(as_json.stdout)["daemon"]
        assert daemon["docker"] is False
        assert "Docker is not reachable" in daemon["docker_error"]

        # The watchdog kept its rhythm the whole time.
        pings = [m.at for m in notify.with_field("WATCHDOG") if m.at >= ready.at]
        assert len(pings) >= 5, notify.messages
        assert all(b - a < WATCHDOG_USEC / 1e6 for a, b in itertools.pairwise(pings))

        code, took = fleetd.stop()
        assert code == 0, fleetd.log_text()
        assert took < 5.0, f"fleetd took {took:.1f} s to stop"
        assert "Traceback" not in fleetd.log_text()
    finally:
        engine.close()


# --- SIGHUP ------------------------------------------------------------------------------


def test_sighup_adds_a_service(fleetd: Fleetd) -> None:
    services = {"alpha": fleetd.service(_absent())}
    fleetd.write_config(services)
    notify = fleetd.start(["alpha"])
    fleetd.ready()
    assert fleetd.model_file("gamma") is None

    fleetd.write_config({**services, "gamma": fleetd.service(_absent(), runtime="vllm")})
    fleetd.send(signal.SIGHUP)

    fleetd.wait_for_log("config reloaded")
    fleetd.wait_for("gamma in state.json", lambda: "gamma" in fleetd.state()["services"], 5)
    gamma = fleetd.state()["services"]["gamma"]
    assert fleetd.model_file("gamma") == gamma["model"] + "\n"
    assert gamma["model"] in dict(LADDER)
    assert fleetd.model_file("alpha") == "big\n"
    assert "gamma" in fleetd.log_text().split("config reloaded")[-1].splitlines()[0]
    # The new STATUS names the added service.
    notify.wait_for("STATUS", count=2, timeout_s=2)
    assert "gamma" in _field(notify.with_field("STATUS")[-1], "STATUS")
    assert fleetd.stop()[0] == 0


def test_sighup_removing_a_service_keeps_its_state(fleetd: Fleetd) -> None:
    fleetd.write_config({"alpha": fleetd.service(_absent()), "beta": fleetd.service(_absent())})
    fleetd.state_dir.mkdir()
    before = FleetState(services={"beta": ServiceState(model="small", rung=3)})
    (fleetd.state_dir / "state.json").write_text(before.to_json())
    fleetd.start(["alpha", "beta"])
    fleetd.ready()

    fleetd.write_config({"alpha": fleetd.service(_absent())})
    fleetd.send(signal.SIGHUP)

    fleetd.wait_for_log("config reloaded")
    assert "beta" in fleetd.log_text().split("config reloaded")[-1].splitlines()[0]
    fleetd.wait_for_log("beta: no longer in the config")
    beta = fleetd.state()["services"]["beta"]
    assert (beta["rung"], beta["model"]) == (3, "small")
    assert fleetd.model_file("beta") == "small\n"
    code, _ = fleetd.stop()
    assert code == 0
    assert fleetd.state()["services"]["beta"]["rung"] == 3  # the final save keeps it too


def test_sighup_with_an_invalid_config_keeps_the_running_one(fleetd: Fleetd) -> None:
    container = f"svc-{uuid.uuid4().hex[:8]}"
    fleetd.write_config({"svc": fleetd.service(container)})
    good = fleetd.config.read_text()
    # Ollama's server survives the runner: an OOM burst every second, never a restart.
    fleetd.run_emitter(container, "svc", capacity_mib=3000, OOM_INTERVAL_S="1")
    fleetd.start(["svc"])
    fleetd.ready()
    fleetd.wait_for("a first incident", lambda: _incidents(fleetd, "svc") >= 1, 15)

    # A bad value, then YAML that does not parse: both refused, the old config runs on.
    for n, bad in enumerate(
        [good.replace("2500MiB", "12 potatoes"), good + "services: [unclosed\n"], start=1
    ):
        fleetd.config.write_text(bad)
        fleetd.send(signal.SIGHUP)
        fleetd.wait_for_log("reload refused", count=n)
    assert fleetd.process is not None and fleetd.process.poll() is None
    assert "config reloaded" not in fleetd.log_text()
    refused = fleetd.log_text().split("reload refused")[1].splitlines()[0]
    assert str(fleetd.config) in refused

    after = _incidents(fleetd, "svc")
    fleetd.wait_for(
        "incidents after the refused reload", lambda: _incidents(fleetd, "svc") >= after + 2, 10
    )
    svc = fleetd.state()["services"]["svc"]
    assert svc["incidents"][-1]["class"] == "vram_oom"
    assert svc["rung"] == 0  # 50 incidents step down; nothing else changed
    assert fleetd.model_file("svc") == "big\n"
    code, took = fleetd.stop()
    assert code == 0, fleetd.log_text()
    assert took < 5.0


# --- a burst across a SIGHUP (in-process: the timing cannot be forced through Docker) ------


def _no_docker() -> docker.DockerClient:
    raise docker.errors.DockerException("no Docker in this test")


@pytest.mark.parametrize("outcome", ["refused", "reloaded"])
def test_a_burst_that_straddles_a_sighup_counts_once(tmp_path: Path, outcome: str) -> None:
    f = Fleetd(tmp_path, None, {})  # only its config writing: no Docker client
    services = {"svc": f.service("emitter-1")}
    f.write_config(services, burst_window="2s")
    daemon = Daemon(f.config, f.state_dir, docker_factory=_no_docker)
    daemon.start()
    detector = daemon.detectors["svc"]
    text = "Error: llama runner process has terminated: CUDA error: out of memory"
    first_ns = time.time_ns()

    def line(offset_ms: int) -> LogLine:
        match = detector.classify(text)
        assert match is not None
        return LogLine("emitter-1", "c1", first_ns + offset_ms * 1_000_000, text, 1, match)

    daemon.queue.put(line(0))
    daemon.drain()
    assert len(daemon.state.services["svc"].incidents) == 1
    if outcome == "refused":
        f.config.write_text(f.config.read_text().replace("2500MiB", "12 potatoes"))
    else:  # a valid config that leaves svc as it was
        f.write_config({**services, "other": f.service("emitter-2")}, burst_window="2s")
    daemon.reload()
    daemon.queue.put(line(50))  # the burst's second line, 50 ms after its first
    daemon.drain()

    try:
        assert len(daemon.state.services["svc"].incidents) == 1
    finally:
        daemon.shutdown()
