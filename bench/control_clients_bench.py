"""1,000 fleetctl clients at once against a running fleetd; prints a Markdown section for
docs/benchmarks.md.

    python bench/control_clients_bench.py                   # 1,000 processes, then threads
    python bench/control_clients_bench.py --clients 2000 --mode threads

Starts `fleetd run` on the demo config (examples/demo/fleet.yaml, its containers need not
exist; no Docker or GPU needed) with a state dir in a temp folder, then:

- processes: forks N children after importing fleetctl (a `fleetctl` process of its own
  holds ~25 MB; N of them would not fit in memory, forks share the imported code), holds
  every child on a pipe until all are forked, releases them at once, and each runs
  `fleetctl status --json` through fleetctl's own entry point (`run_cli`), its stdout
  checked as the status JSON and its exit code as 0;
- threads: N threads in this process, held at a barrier, each doing what
  `fleetctl status` does: `link.connect` (reads daemon.lock, `GET /version`) and
  `GET /v1/status`.

A client fails when it raises, exits non-zero or prints something else than the status.
Latency is from the release to the client's answer. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from supervisor.cli import fleetctl  # noqa: E402
from supervisor.cli.common import run_cli  # noqa: E402
from supervisor.cli.link import connect  # noqa: E402
from supervisor.edges.control import BACKLOG, MAX_HANDLERS, ControlClient  # noqa: E402

CONFIG = ROOT / "examples" / "demo" / "fleet.yaml"
FLEETD = [sys.executable, "-c", "from supervisor.cli.fleetd import main; main()"]
WAIT_S = 300.0  # for every client of one run to finish


@dataclass(frozen=True)
class Outcome:
    latency_ms: float
    failure: str | None  # None: answered with the status


@contextlib.contextmanager
def running_fleetd(state_dir: Path, log: Path) -> Iterator[None]:
    env = {**os.environ, "NOTIFY_SOCKET": "", "FLEETD_SOCKET": ""}
    with log.open("w") as out:
        daemon = subprocess.Popen(
            [*FLEETD, "run", "--config", str(CONFIG), "--state-dir", str(state_dir),
             "--no-metrics", "--log-level", "WARNING"],
            stdout=subprocess.DEVNULL, stderr=out, env=env,
        )  # fmt: skip
    try:
        client, deadline = ControlClient(state_dir / "fleetd.sock"), time.monotonic() + 30
        while True:
            try:
                client.call("GET", "/v1/status")
                break
            except Exception:
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise SystemExit(f"fleetd did not start:\n{log.read_text()}") from None
                time.sleep(0.1)
        yield
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)


def is_status(report: object) -> bool:
    return isinstance(report, dict) and set(report.get("services", ())) == {"coder", "chat"}


# ---------------------------------------------------------------- processes


def fleetctl_child(release: int, state_dir: Path, out: Path) -> None:
    """In a forked child: wait for the release, run `fleetctl status --json`, record."""
    os.read(release, 1)  # end of file when the parent lets go
    started = time.monotonic()
    with (
        out.with_suffix(".stdout").open("w") as stdout,
        out.with_suffix(".stderr").open("w") as stderr,
    ):
        sys.stdout, sys.stderr = stdout, stderr
        sys.argv = ["fleetctl", "status", "--json", "--state-dir", str(state_dir)]
        try:
            run_cli(fleetctl.cli, "fleetctl", die_on_sigpipe=True)
            code: object = 0
        except SystemExit as e:
            code = e.code
        except BaseException as e:
            code = f"traceback: {e!r}"
        sys.stdout.flush()
    elapsed_ms = (time.monotonic() - started) * 1000
    out.write_text(json.dumps({"started": started, "ms": elapsed_ms, "code": str(code)}))


def run_processes(clients: int, state_dir: Path, work: Path) -> tuple[list[Outcome], float]:
    from supervisor.cli.views import print_status  # noqa: F401  (what status imports, shared)
    from supervisor.core.status import status_json  # noqa: F401

    read_end, write_end = os.pipe()
    gc.collect()
    gc.freeze()  # the children's garbage collector leaves the shared pages unwritten
    pids = []
    for n in range(clients):
        pid = os.fork()
        if pid == 0:
            os.close(write_end)
            try:
                fleetctl_child(read_end, state_dir, work / f"client-{n}")
            finally:
                os._exit(0)
        pids.append(pid)
    gc.unfreeze()
    os.close(read_end)
    released = time.monotonic()
    os.close(write_end)  # every child's read returns: all go at once
    deadline = released + WAIT_S
    for pid in pids:
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, 9)
            time.sleep(0.01)
    return [_process_outcome(work / f"client-{n}", released) for n in range(clients)], released


def _process_outcome(record: Path, released: float) -> Outcome:
    try:
        got = json.loads(record.read_text())
    except (OSError, ValueError):
        return Outcome(float("nan"), "no record (killed or crashed)")
    latency_ms = (got["started"] - released) * 1000 + got["ms"]
    if got["code"] != "0":
        said = record.with_suffix(".stderr").read_text().strip().splitlines() or [""]
        return Outcome(latency_ms, f"exit {got['code']}: {said[-1]}")
    try:
        report = json.loads(record.with_suffix(".stdout").read_text())
    except ValueError:
        return Outcome(latency_ms, "stdout is not JSON")
    return Outcome(latency_ms, None if is_status(report) else "stdout is not the status")


# ---------------------------------------------------------------- threads


def run_threads(clients: int, state_dir: Path) -> list[Outcome]:
    outcomes: list[Outcome] = []
    start = threading.Barrier(clients + 1)

    def one() -> None:
        start.wait()
        released = time.perf_counter()
        try:
            link = connect(state_dir, None)  # what `fleetctl status` does first
            if link.client is None:
                failure: str | None = f"no daemon: {link.why_not}"
            else:
                report = link.client.call("GET", "/v1/status")
                failure = None if is_status(report) else "not the status"
        except Exception as e:
            failure = f"{type(e).__name__}: {e}"
        outcomes.append(Outcome((time.perf_counter() - released) * 1000, failure))

    threading.stack_size(256 * 1024)
    threads = [threading.Thread(target=one, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    for t in threads:
        t.join(WAIT_S)
    missing = clients - len(outcomes)
    return outcomes + [Outcome(float("nan"), "no answer in time")] * missing


# ---------------------------------------------------------------- report


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def row(name: str, outcomes: list[Outcome], wall_s: float) -> str:
    failed = [o for o in outcomes if o.failure is not None]
    ordered = sorted(o.latency_ms for o in outcomes if o.failure is None) or [float("nan")]
    return (
        f"| {name} | {len(outcomes)} | {len(failed)} | {statistics.median(ordered):.0f} | "
        f"{percentile(ordered, 0.99):.0f} | {ordered[-1]:.0f} | {wall_s:.1f} |"
    )


def failures(outcomes: list[Outcome]) -> list[str]:
    counted = Counter(o.failure for o in outcomes if o.failure is not None)
    return [f"  - {n} x {why}" for why, n in counted.most_common(5)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--mode", choices=("both", "processes", "threads"), default="both")
    args = parser.parse_args()
    rows, notes = [], []
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="fleetd-bench-") as work:
        state_dir = Path(work) / "state"
        with running_fleetd(state_dir, Path(work) / "fleetd.log"):
            if args.mode in ("both", "processes"):  # first: forking after threads is unsafe
                print(f"{args.clients} fleetctl processes ...", file=sys.stderr)
                records = Path(work) / "records"
                records.mkdir()
                began = time.monotonic()
                outcomes, _ = run_processes(args.clients, state_dir, records)
                name = "`fleetctl status --json` processes, released at once"
                rows.append(row(name, outcomes, time.monotonic() - began))
                notes += failures(outcomes)
            if args.mode in ("both", "threads"):
                print(f"{args.clients} client threads ...", file=sys.stderr)
                began = time.monotonic()
                outcomes = run_threads(args.clients, state_dir)
                name = "threads (`link.connect` + `GET /v1/status`), at a barrier"
                rows.append(row(name, outcomes, time.monotonic() - began))
                notes += failures(outcomes)
    somaxconn = Path("/proc/sys/net/core/somaxconn").read_text().strip()
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"### {args.clients} concurrent fleetctl clients ({stamp})\n")
    print(
        f"Machine: {platform.node()}, {platform.machine()}, {os.cpu_count()} cores, Linux "
        f"{platform.release()}, Python {platform.python_version()}; fleetd on "
        f"examples/demo/fleet.yaml; listen backlog {BACKLOG} (somaxconn {somaxconn}), "
        f"{MAX_HANDLERS} handler threads; load average {load:.1f} when it began.\n"
    )
    print("| clients | n | failed | p50 ms | p99 ms | max ms | wall s |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if notes:
        print("\nFailures:\n" + "\n".join(notes))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
