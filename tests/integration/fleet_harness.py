"""Runs the real `fleetd run` against real containers: the harness of the daemon's tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
from docker.models.containers import Container

IMAGE = "fleetd-test/oom-emitter:1"
SIZES = "big=4000,medium=2500,wide=2600,small=1000,tiny=500"
# `wide` is preferred to `small` but needs more than `medium`: a step down skips it.
LADDER = [
    ("big", "4000MiB"),
    ("medium", "2500MiB"),
    ("wide", "2600MiB"),
    ("small", "1000MiB"),
    ("tiny", "500MiB"),
]


class Fleet:
    """A config, a state dir and the emitter containers of one test."""

    def __init__(self, tmp: Path, client: docker.DockerClient, labels: dict[str, str]) -> None:
        self.tmp, self.client, self.labels = tmp, client, labels
        self.state_dir = tmp / "state"
        self.config = tmp / "fleet.yaml"
        self.process: subprocess.Popen[str] | None = None
        self.log = tmp / "fleetd.log"

    def write_config(
        self,
        services: dict[str, dict[str, Any]],
        cooldown: str = "1s",
        policy: dict[str, Any] | None = None,
        **top: Any,
    ) -> None:
        import yaml

        body = {
            # Any free port: tests on this machine run fleetds side by side.
            "metrics": {"address": "127.0.0.1:0"},
            "budget": 0.85,
            "gpus": [{"name": "test", "memory": "8GiB"}],
            **top,  # may replace the defaults above (budget, gpus)
            "policy": {
                "incidents_to_step_down": 3,
                "incident_window": "10m",
                "cooldown": cooldown,
                "burst_window": "1s",
                "stop_timeout": "2s",
                **(policy or {}),
            },
            "services": services,
        }
        self.config.write_text(yaml.safe_dump(body))

    def service(self, runtime: str, container: str, **extra: Any) -> dict[str, Any]:
        ladder = [{"model": m, "vram": v} for m, v in LADDER]
        return {"runtime": runtime, "containers": [container], "ladder": ladder, **extra}

    def run_container(self, name: str, runtime: str, capacity_mib: int, **env: str) -> Container:
        handoff = self.state_dir / "services" / name.split("-", 1)[0]
        handoff.mkdir(parents=True, exist_ok=True)
        return self.client.containers.run(
            IMAGE,
            name=name,
            detach=True,
            labels=self.labels,
            environment={
                "RUNTIME": runtime,
                "CAPACITY_MIB": str(capacity_mib),
                "MODEL_SIZES": SIZES,
                **env,
            },
            volumes={str(handoff): {"bind": "/run/fleetd", "mode": "ro"}},
            restart_policy={"Name": "on-failure"},
        )

    def start(self, extra_args: list[str] | None = None) -> None:
        """`fleetd run` on this fleet; its control socket is STATE_DIR/fleetd.sock."""
        code = "from supervisor.cli.fleetd import main; main()"
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                code,
                "run",
                "--config",
                str(self.config),
                "--state-dir",
                str(self.state_dir),
                "--log-level",
                "DEBUG",
                *(extra_args or []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("a"),
            text=True,
            env={**os.environ, "NOTIFY_SOCKET": "", "FLEETD_SOCKET": ""},
        )

    def state(self) -> dict[str, Any]:
        path = self.state_dir / "state.json"
        return json.loads(path.read_text()) if path.exists() else {"services": {}}

    def wait_for(
        self, what: str, check: Callable[[dict[str, Any]], bool], timeout_s: float
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.state()
            if check(state):
                return state
            assert self.process is None or self.process.poll() is None, self.log.read_text()
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; state {state}\n{self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        code = self.process.wait(timeout=10)
        self.process = None
        return code


def at_rung(service: str, rung: int) -> Callable[[dict[str, Any]], bool]:
    return lambda s: s["services"].get(service, {}).get("rung") == rung
