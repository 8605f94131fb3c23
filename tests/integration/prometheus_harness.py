"""A real Prometheus (Debian's package) on loopback, scraping fleetd every second."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

ENSURE = Path(__file__).resolve().parents[2] / "scripts" / "ensure-prometheus.sh"


def prometheus_tools() -> tuple[str, str]:
    """Paths of `prometheus` and `promtool`; skip without them, fail under CI=true."""
    found = shutil.which("prometheus"), shutil.which("promtool")
    if found[0] and found[1]:
        return found[0], found[1]
    reason = f"prometheus/promtool not on PATH; run {ENSURE.relative_to(ENSURE.parents[1])}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: integration tests must not be skipped)", pytrace=False)
    pytest.skip(reason)


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """One Prometheus server: its config, storage and log in `tmp`, its API on loopback."""

    def __init__(self, tmp: Path, binary: str, target: str) -> None:
        self.tmp, self.binary, self.target = tmp, binary, target
        self.port = free_loopback_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "prometheus.log"
        self.process: subprocess.Popen[bytes] | None = None

    def write_config(self) -> Path:
        path = self.tmp / "prometheus.yml"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": "fleetd",
                    "scrape_interval": "1s",
                    "scrape_timeout": "1s",
                    "static_configs": [{"targets": [self.target]}],
                }
            ],
        }
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        return path

    def start(self, timeout_s: float = 30.0) -> None:
        config = self.write_config()
        self.process = subprocess.Popen(
            [
                self.binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("ab"),
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"prometheus exited: {self.log.read_text()}"
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"prometheus not ready in {timeout_s}s: {self.log.read_text()}")

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query through /api/v1/query: the vector's samples."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_for(self, promql: str, timeout_s: float) -> list[dict[str, Any]]:
        """Query until the result is not empty; fail showing the last result and the log."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(promql)
            if result:
                return result
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"no result for {promql!r} in {timeout_s}s; targets: "
                    f"{self.targets()}\nprometheus log: {self.log.read_text()}"
                )
            time.sleep(0.25)

    def targets(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=5) as response:
            active: list[dict[str, Any]] = json.loads(response.read())["data"]["activeTargets"]
        return active

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


def promtool_check(promtool: str, exposition: str) -> subprocess.CompletedProcess[str]:
    """`promtool check metrics` on a scrape's text (it reads the text from stdin)."""
    return subprocess.run(
        [promtool, "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
