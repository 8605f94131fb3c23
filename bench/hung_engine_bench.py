"""`fleetd run` against a Docker engine that never answers; prints a Markdown section for
docs/benchmarks.md.

    python bench/hung_engine_bench.py              # 300 status calls, about 40 s
    python bench/hung_engine_bench.py --calls 50   # shorter

The "engine" is a unix socket that accepts every connection and never answers (an engine
stuck on a lock looks like this to its clients); fleetd is pointed at it with DOCKER_HOST.
Needs no Docker. Measured, against a real `fleetd run` subprocess with WATCHDOG_USEC=2 s:

1. `GET /v1/status` over the control socket (what `fleetctl status` sends), one call
   after another while every Docker call of fleetd's hangs: latency p50/p99/max, failures,
   and whether the answer says the engine is not answering.
2. The gaps between the watchdog pings over the whole run.
3. SIGTERM to exit.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

from supervisor.edges.control import ControlClient

FLEETD = "from supervisor.cli.fleetd import main; main()"
WATCHDOG_USEC = 2_000_000


class HungEngine:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(64)
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.connections.append(self._sock.accept()[0])
            except OSError:
                return


class Watchdog:
    """systemd's end of NOTIFY_SOCKET: when each WATCHDOG=1 came."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pings: list[float] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        threading.Thread(target=self._receive, daemon=True).start()

    def _receive(self) -> None:
        while True:
            try:
                data = self._sock.recv(65536).decode()
            except OSError:
                return
            if "WATCHDOG=1" in data.split("\n"):
                self.pings.append(time.monotonic())


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fleetd-hung-"))
    engine = HungEngine(tmp / "hung.sock")
    watchdog = Watchdog(tmp / "notify.sock")
    config = tmp / "fleet.yaml"
    ladder = [{"model": "big", "vram": "4GiB"}, {"model": "small", "vram": "1GiB"}]
    services = {"svc": {"runtime": "llamacpp", "containers": ["svc-1"], "ladder": ladder}}
    body = {"gpus": [{"name": "test", "memory": "8GiB"}], "services": services}
    config.write_text(yaml.safe_dump(body))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETD_")}
    env.update(
        DOCKER_HOST=f"unix://{engine.path}",
        NOTIFY_SOCKET=str(watchdog.path),
        WATCHDOG_USEC=str(WATCHDOG_USEC),
    )
    state_dir = tmp / "state"
    command = [sys.executable, "-c", FLEETD, "run", "--config", str(config)]
    command += ["--state-dir", str(state_dir), "--no-metrics"]
    command += ["--socket", str(tmp / "fleetd.sock")]
    log = (tmp / "fleetd.log").open("w")
    began = time.monotonic()
    process = subprocess.Popen(command, stderr=log, stdout=subprocess.DEVNULL, env=env)
    client = ControlClient(tmp / "fleetd.sock", timeout_s=30)
    while True:  # until fleetd has seen a Docker call time out
        try:
            status = client.call("GET", "/v1/status")
            if status["daemon"].get("docker_error"):
                break
        except Exception:
            pass
        time.sleep(0.2)
    print(f"engine seen hung after {time.monotonic() - began:.1f} s", file=sys.stderr)
    latencies, failures, saying = [], 0, 0
    for _ in range(args.calls):
        start = time.perf_counter()
        try:
            status = client.call("GET", "/v1/status")
        except Exception as e:
            failures += 1
            print(f"failed: {e}", file=sys.stderr)
            continue
        latencies.append((time.perf_counter() - start) * 1000)
        saying += status["daemon"]["docker"] is False and bool(status["daemon"]["docker_error"])
        time.sleep(0.05)
    stop_began = time.monotonic()
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=30)
    stop_s = time.monotonic() - stop_began
    pings = [p for p in watchdog.pings if p <= stop_began]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    held_s = stop_began - began
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"### fleetd with a hung Docker engine ({when})\n")
    print(
        f"Machine: {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}."
    )
    print(
        f"`fleetd run` pointed at a socket that never answers, for {held_s:.0f} s; the engine "
        f"held {len(engine.connections)} connections of fleetd's by the end.\n"
    )
    print("| measure | value |\n|---|---|")
    print(f"| `GET /v1/status` calls while the engine hangs | {args.calls} |")
    print(f"| failed | {failures} |")
    print(f"| answers saying the engine is not answering | {saying} |")
    print(f"| latency p50 / p99 / max | {statistics.median(latencies):.1f} / "
          f"{_percentile(latencies, 0.99):.1f} / {max(latencies):.1f} ms |")  # fmt: skip
    print(f"| watchdog pings / largest gap (WatchdogSec 2 s) | {len(pings)} / {max(gaps):.2f} s |")
    print(f"| SIGTERM to exit | {stop_s:.2f} s (exit {code}) |")


if __name__ == "__main__":
    main()
