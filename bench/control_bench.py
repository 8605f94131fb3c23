"""fleetctl against a running fleetd: prints a Markdown section for docs/benchmarks.md.

    python bench/control_bench.py        # about 30 s; no containers, no GPU

Starts `fleetd run` on the demo config (examples/demo/fleet.yaml, its containers need not
exist) with a state dir in a temp folder, then measures:
1. the control API itself: GET /v1/status answered by fleetd's main loop, from a client
   in this process (no Python start-up), N requests;
2. `fleetctl status --json` wall time, process start to exit: through the socket, and
   from the state file when no fleetd runs;
3. `fleetctl pin` of a rung the service is already on (a change the loop makes and saves,
   no container to restart).
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from supervisor.edges.control import ControlClient  # noqa: E402

CONFIG = ROOT / "examples" / "demo" / "fleet.yaml"
FLEETCTL = [sys.executable, "-c", "from supervisor.cli.fleetctl import main; main()"]
FLEETD = [sys.executable, "-c", "from supervisor.cli.fleetd import main; main()"]


def timed(action: Callable[[], object], runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def row(name: str, samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return (
        f"| {name} | {len(samples)} | {statistics.median(samples):.1f} | {p99:.1f} | "
        f"{max(samples):.1f} |"
    )


def run_fleetctl(*args: str, state_dir: Path) -> None:
    env = {**os.environ, "FLEETD_SOCKET": "", "FLEETD_CONFIG": str(CONFIG)}
    done = subprocess.run(
        [*FLEETCTL, *args, "--state-dir", str(state_dir)], capture_output=True, env=env
    )
    assert done.returncode == 0, done.stderr.decode()


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="fleetd-bench-") as work:
        state_dir = Path(work) / "state"
        log = (Path(work) / "fleetd.log").open("w")
        env = {**os.environ, "NOTIFY_SOCKET": "", "FLEETD_SOCKET": ""}
        daemon = subprocess.Popen(
            [*FLEETD, "run", "--config", str(CONFIG), "--state-dir", str(state_dir),
             "--no-metrics", "--log-level", "WARNING"],
            stdout=subprocess.DEVNULL, stderr=log, env=env,
        )  # fmt: skip
        client = ControlClient(state_dir / "fleetd.sock")
        deadline = time.monotonic() + 30
        while True:
            try:
                client.hello()
                client.call("GET", "/v1/status")
                break
            except Exception:
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise
                time.sleep(0.1)
        try:
            api = timed(lambda: client.call("GET", "/v1/status"), 500)
            live = timed(lambda: run_fleetctl("status", "--json", state_dir=state_dir), 20)
            pin = timed(lambda: run_fleetctl("pin", "chat", "0", state_dir=state_dir), 20)
        finally:
            daemon.terminate()
            daemon.wait(timeout=20)
        offline = timed(lambda: run_fleetctl("status", "--json", state_dir=state_dir), 20)

    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"### fleetctl and the control socket ({stamp})\n")
    print(
        f"Machine: {platform.node()}, {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; fleetd on examples/demo/fleet.yaml.\n"
    )
    print("| measure | runs | median ms | p99 ms | max ms |")
    print("|---|---|---|---|---|")
    print(row("GET /v1/status through the socket, answered by the main loop", api))
    print(row("`fleetctl status --json`, fleetd running (process start to exit)", live))
    print(row("`fleetctl status --json`, no fleetd (reads state.json)", offline))
    print(row("`fleetctl pin chat 0` (no change of model: decided, saved, answered)", pin))


if __name__ == "__main__":
    main()
