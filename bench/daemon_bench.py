"""`fleetd run` against the real Docker engine; prints a Markdown section for docs/benchmarks.md.

    python bench/daemon_bench.py            # full: about 4 minutes
    python bench/daemon_bench.py --quick    # shorter runs: about 2 minutes

Needs the Docker engine (scripts/ensure-docker.sh) and the test images
(scripts/build-test-images.sh). Every container it creates carries the labels
org.fleetd.test=1 and org.fleetd.test.run=<this run> and is removed at the end, also when
a measurement fails. Progress goes to stderr, the Markdown to stdout.

What is measured (each against a real `fleetd run` subprocess, as in
tests/integration/test_daemon.py):

1. Detection latency: OOM lines written into a container's stdout (through a FIFO on the
   host that the container `cat`s) at known times, idle and while another watched container
   floods its log with `yes`; fleetd's own figure (`detected N ms after the line`), the
   same seen by this script on fleetd's stderr, and `docker logs -f --timestamps | grep
   --line-buffered` on the same stream as the baseline.
2. Throughput: a watched container fed about 50k lines/s for a minute, with OOM sentinels
   every 5 s and at the end; lines read per second, fleetd's CPU, its lag. Then a
   saturating `yes` flood (what the emitter's FLOOD=1 runs).
3. Third incident -> new container running: a crash-looping llamacpp emitter whose rung 0
   does not fit and rung 1 does.
4. Resident memory with 1, 10 and 50 watched containers.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import math
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import docker.errors
import yaml

from supervisor.core.detector import Detector
from supervisor.edges.engine import parse_docker_time_ns

ROOT = Path(__file__).resolve().parent.parent
BUSYBOX = "fleetd-test/busybox:1"
EMITTER = "fleetd-test/oom-emitter:1"
TEST_LABEL = "org.fleetd.test"
RUN_LABEL = "org.fleetd.test.run"
OOM_TEXT = "CUDA error: out of memory"  # rule cuda.error_oom, every runtime
FLOOD_CMD = 'yes "INFO flood line"'  # exactly what the oom-emitter's FLOOD=1 runs
CLK_TCK = os.sysconf("SC_CLK_TCK")

INCIDENT_RE = re.compile(
    r"(?P<service>\S+): (?P<cls>\w+) incident \((?P<rule>[^)]*)\) in (?P<container>\S+): "
    r"(?P<reason>.*) \| evidence: (?P<evidence>.*) \| detected (?P<ms>-?\d+) ms after the line"
)
SEQ_RE = re.compile(r"seq=(\d+)")

# Benchmark policy: no step-downs (so every OOM line is just recorded), every line >= 10 ms
# after the previous one is its own incident.
NO_STEP_POLICY = {
    "incidents_to_step_down": 100000,
    "incident_window": "1h",
    "cooldown": "1s",
    "burst_window": "0.01s",
    "stop_timeout": "2s",
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- statistics ------------------------------------------------------------------------


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def fmt_ms(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


# --- processes -----------------------------------------------------------------------------


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def dockerd_pid() -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "dockerd":
                    return int(entry.name)
    return None


@dataclass
class Incident:
    seen_at: float  # when this script read fleetd's log line (host clock)
    container: str
    evidence: str
    detected_ms: int  # fleetd's own figure
    line: str


class Fleetd:
    """One `fleetd run` subprocess with its own config and state dir; parses its stderr."""

    def __init__(self, workdir: Path, services: dict[str, Any], policy: dict[str, Any]) -> None:
        self.dir = workdir
        self.state_dir = workdir / "state"
        self.config = workdir / "fleet.yaml"
        self.stderr_log = workdir / "fleetd.log"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        body = {
            "budget": 0.85,
            "gpus": [{"name": "bench", "memory": "8GiB"}],
            "policy": policy,
            "services": services,
        }
        self.config.write_text(yaml.safe_dump(body))
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[tuple[float, str]] = []
        self.incidents: list[Incident] = []
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout_s: float = 30) -> None:
        code = "from supervisor.cli.fleetd import main; main()"
        args = ["run", "--config", str(self.config), "--state-dir", str(self.state_dir)]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, *args, "--log-level", "INFO"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            env={**os.environ, "NOTIFY_SOCKET": ""},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_line(lambda line: "fleetd running" in line, timeout_s, "fleetd to start")

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        with self.stderr_log.open("w") as keep:
            for raw in self.proc.stderr:
                now = time.time()
                line = raw.decode("utf-8", "replace").rstrip("\n")
                keep.write(f"{now:.6f} {line}\n")
                m = INCIDENT_RE.search(line)
                with self._cond:
                    self.lines.append((now, line))
                    if m:
                        self.incidents.append(
                            Incident(now, m["container"], m["evidence"], int(m["ms"]), line)
                        )
                    self._cond.notify_all()

    def wait_line(self, check: Callable[[str], bool], timeout_s: float, what: str) -> str:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for _, line in self.lines:
                    if check(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc is not None and self.proc.poll() is not None):
                    tail = "\n".join(line for _, line in self.lines[-20:])
                    raise RuntimeError(f"timed out waiting for {what}; fleetd said:\n{tail}")
                self._cond.wait(min(left, 0.5))

    def seq_incidents(self, container: str) -> dict[int, Incident]:
        with self._cond:
            found = {}
            for inc in self.incidents:
                m = SEQ_RE.search(inc.evidence)
                if inc.container == container and m:
                    found.setdefault(int(m[1]), inc)
            return found

    def wait_seqs(self, container: str, seqs: set[int], timeout_s: float) -> dict[int, Incident]:
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.seq_incidents(container)
            if seqs <= set(found) or time.monotonic() >= deadline:
                return found
            with self._cond:
                self._cond.wait(0.05)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Fifo:
    """A FIFO on the host, bind-mounted into a container that copies it to its stdout."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = directory / "p"
        os.mkfifo(self.path)
        self.fd: int | None = None

    def open(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as e:  # ENXIO: the container's cat has not opened it yet
                if e.errno != errno.ENXIO or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        self.fd = fd

    def write(self, data: bytes) -> None:
        assert self.fd is not None
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Grep:
    """`docker logs -f --timestamps NAME | grep --line-buffered "out of memory"`, timed."""

    def __init__(self, container: str) -> None:
        self.proc = subprocess.Popen(
            [
                "sh",
                "-c",
                f"docker logs -f --timestamps {container} 2>&1"
                ' | grep --line-buffered "out of memory"',
            ],
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        self.seen: dict[int, tuple[float, int]] = {}  # seq -> (printed at, Docker time)
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            now = time.time()
            line = raw.decode("utf-8", "replace")
            stamp, _, text = line.partition(" ")
            m = SEQ_RE.search(text)
            if m:
                with self._cond:
                    self.seen.setdefault(int(m[1]), (now, parse_docker_time_ns(stamp)))
                    self._cond.notify_all()

    def wait(self, seqs: set[int], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not seqs <= set(self.seen) and time.monotonic() < deadline:
                self._cond.wait(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: sh, docker, grep
            self.proc.wait(timeout=10)


@dataclass
class LogScan:
    lines: int = 0
    first_ns: int = 0
    last_ns: int = 0
    seqs: dict[int, tuple[int, int]] = field(default_factory=dict)  # seq -> (index, Docker ns)


def scan_json_log(path: Path) -> LogScan:
    """Count a json-file log's lines (as `docker logs | wc -l` would) and find the seq= lines.

    Reads the engine's file directly: through `docker logs` 3M lines take most of a minute.
    """
    scan = LogScan()
    rest = b""
    last_line = b""
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            buf = rest + chunk
            cut = buf.rfind(b"\n") + 1
            body, rest = buf[:cut], buf[cut:]
            if not body:
                continue
            if scan.lines == 0:
                scan.first_ns = parse_docker_time_ns(json.loads(body[: body.find(b"\n")])["time"])
            pos = body.find(b"seq=")
            while pos != -1:
                start = body.rfind(b"\n", 0, pos) + 1
                end = body.find(b"\n", pos)
                entry = json.loads(body[start:end])
                m = SEQ_RE.search(entry["log"])
                if m:
                    index = scan.lines + body.count(b"\n", 0, start)
                    scan.seqs.setdefault(int(m[1]), (index, parse_docker_time_ns(entry["time"])))
                pos = body.find(b"seq=", end)
            scan.lines += body.count(b"\n")
            last_line = body[body.rfind(b"\n", 0, len(body) - 1) + 1 :]
    if last_line:
        scan.last_ns = parse_docker_time_ns(json.loads(last_line)["time"])
    return scan


# --- the benchmark ------------------------------------------------------------------------


class Bench:
    def __init__(self, quick: bool, keep: bool = False) -> None:
        self.quick = quick
        self.client = docker.from_env(version="auto")
        self.client.ping()
        self.run_id = uuid.uuid4().hex[:8]
        self.labels = {TEST_LABEL: "1", RUN_LABEL: self.run_id}
        self.tmp = Path(tempfile.mkdtemp(prefix=f"fleetd-bench-{self.run_id}-"))
        self.fleetds: list[Fleetd] = []
        self.greps: list[Grep] = []
        self.out: list[str] = []
        self.notes: list[str] = []
        self.keep = keep
        self.others: set[str] = set()  # running containers that are not this benchmark's
        self.loads: list[float] = []
        for image in (BUSYBOX, EMITTER):
            try:
                self.client.images.get(image)
            except docker.errors.ImageNotFound:
                sys.exit(f"image {image} is missing: run bash scripts/build-test-images.sh")

    def name(self, what: str) -> str:
        return f"fb-{self.run_id}-{what}"

    # --- helpers ------------------------------------------------------------------------

    def fleetd(self, tag: str, services: dict[str, Any], policy: dict[str, Any]) -> Fleetd:
        fleet = Fleetd(self.tmp / tag, services, policy)
        self.fleetds.append(fleet)
        return fleet

    @staticmethod
    def service(container: str, runtime: str = "llamacpp", ladder: Any = None) -> dict[str, Any]:
        ladder = ladder or [{"model": "m0", "vram": "10MiB"}, {"model": "m1", "vram": "5MiB"}]
        return {"runtime": runtime, "containers": [container], "ladder": ladder}

    def busybox(self, name: str, script: str, mounts: dict[str, Any] | None = None) -> Any:
        return self.client.containers.create(
            BUSYBOX,
            ["sh", "-c", script],
            name=name,
            labels=self.labels,
            volumes=mounts or {},
        )

    def fifo_container(self, what: str, flood: bool = False) -> tuple[Any, Fifo]:
        """A container that copies a host FIFO to its stdout (and floods it, if asked)."""
        fifo = Fifo(self.tmp / f"fifo-{what}")
        script = "while :; do cat /f/p; done"
        if flood:
            script = f"{FLOOD_CMD} & echo $! > /f/flood.pid; {script}"
        mounts = {str(fifo.dir): {"bind": "/f", "mode": "rw"}}
        return self.busybox(self.name(what), script, mounts), fifo

    def log_path(self, container: Any) -> Path:
        container.reload()
        return Path(container.attrs["LogPath"])

    def stop_flood(self, container: Any) -> None:
        container.exec_run(["sh", "-c", "kill $(cat /f/flood.pid)"])

    def note_others(self) -> None:
        """Remember what else runs on this engine (it shares the CPUs with the figures)."""
        for c in self.client.containers.list():
            if c.labels.get(RUN_LABEL) != self.run_id:
                self.others.add(c.name)
        self.loads.append(os.getloadavg()[0])

    def sharing(self) -> str:
        loads = ", ".join(f"{x:.1f}" for x in self.loads)
        if not self.others:
            return (
                f"Nothing else ran on the engine during the run (1-min load average at the "
                f"start and end of each part: {loads})."
            )
        names = ", ".join(sorted(self.others)[:6]) + (", ..." if len(self.others) > 6 else "")
        return (
            f"**Not alone:** {len(self.others)} other containers ran on this engine at some "
            f"point during the run ({names}), sharing the CPUs (1-min load average at the start "
            f"and end of each part: {loads})."
        )

    def cleanup(self) -> None:
        for grep in self.greps:
            with contextlib.suppress(Exception):
                grep.stop()
        for fleet in self.fleetds:
            with contextlib.suppress(Exception):
                fleet.stop()
        removed = 0
        run_filter = {"label": f"{RUN_LABEL}={self.run_id}"}
        for c in self.client.containers.list(all=True, filters=run_filter):
            with contextlib.suppress(docker.errors.DockerException):
                c.remove(force=True)
                removed += 1
        log(f"cleanup: removed {removed} containers")
        if self.keep:
            log(f"kept {self.tmp} (configs, state dirs, fleetd's stderr)")
        else:
            subprocess.run(["rm", "-rf", str(self.tmp)], check=False)

    # --- 0. the machine -----------------------------------------------------------------------

    def machine(self) -> None:
        cpu = "unknown"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kib = int(proc_status_line("/proc/meminfo", "MemTotal").split()[0])
        version = self.client.version()
        client = subprocess.run(
            ["docker", "version", "--format", "{{.Client.Version}}"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        mode = "quick" if self.quick else "full"
        self.out += [
            f"### `fleetd run` against Docker ({now}, {mode} mode)",
            "",
            f"Machine: {socket.gethostname()}, {cpu}, {os.cpu_count()} cores, "
            f"{mem_kib / 1024**2:.1f} GiB RAM, Linux {platform.release()}; "
            f"Python {platform.python_version()}; Docker engine {version['Version']} "
            f"(API {version['ApiVersion']}), CLI {client}, docker-py {docker.__version__}.",
            "",
        ]

    # --- 1. detection latency ----------------------------------------------------------------

    def latency(self) -> None:
        n = 50 if self.quick else 100
        spacing = 0.1
        log(f"latency: {n} incidents idle, {n} while another watched container floods")
        src, fifo = self.fifo_container("lat-src")
        flood, _ = self.fifo_container("lat-flood", flood=True)
        fleet = self.fleetd(
            "latency",
            {"src": self.service(src.name), "flood": self.service(flood.name)},
            NO_STEP_POLICY,
        )
        src.start()
        fleet.start()
        grep = Grep(src.name)
        self.greps.append(grep)
        fifo.open()
        seq = 0

        def send(count: int) -> list[tuple[int, float]]:
            nonlocal seq
            sent = []
            for _ in range(count):
                seq += 1
                t = time.time()
                fifo.write(f"seq={seq} t={t:.6f} {OOM_TEXT}\n".encode())
                sent.append((seq, t))
                time.sleep(spacing)
            return sent

        warm = send(3)  # first-use costs (imports, first state write) are not the steady figure
        fleet.wait_seqs(src.name, {s for s, _ in warm}, 10)
        rows = []
        flood_note = ""
        for phase in ("idle", "flood"):
            cpu0 = wall0 = 0.0
            if phase == "flood":
                flood.start()
                time.sleep(3)  # fleetd attaches on the start event; let the flood settle
                cpu0, wall0 = cpu_ticks(fleet.pid), time.monotonic()
            sent = send(n)
            seqs = {s for s, _ in sent}
            found = fleet.wait_seqs(src.name, seqs, 15)
            grep.wait(seqs, 15)
            if phase == "flood":
                cpu = (cpu_ticks(fleet.pid) - cpu0) / CLK_TCK / (time.monotonic() - wall0)
                flood.kill()
                scan = scan_json_log(self.log_path(flood))
                rate = scan.lines / max(1e-9, (scan.last_ns - scan.first_ns) / 1e9)
                flood_note = (
                    f"The flooding container wrote {rate / 1000:.0f}k lines/s into its log "
                    f"during the flood phase; fleetd used {cpu * 100:.0f}% of a core then."
                )
            rows += self._latency_rows(phase, sent, found, grep)
        fifo.close()
        grep.stop()
        fleet.stop()
        src.remove(force=True)
        flood.remove(force=True)
        self.out += [
            "#### 1. Detection latency (OOM line -> incident recorded)",
            "",
            f"{n} incidents per case, one every {spacing * 1000:.0f} ms; all in ms.",
            "",
            "| case | measure | recorded | p50 | p99 | max |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            flood_note,
            *(f"\n{note}" for note in self.notes),
            "",
        ]

    def _latency_rows(
        self,
        phase: str,
        sent: list[tuple[int, float]],
        found: dict[int, Incident],
        grep: Grep,
    ) -> list[str]:
        own, seen, base, path = [], [], [], []
        for s, written in sent:
            stamp = grep.seen.get(s)
            if s in found:
                own.append(float(found[s].detected_ms))
                if stamp:
                    seen.append((found[s].seen_at - stamp[1] / 1e9) * 1000)
            if stamp:
                base.append((stamp[0] - stamp[1] / 1e9) * 1000)
                path.append((stamp[1] / 1e9 - written) * 1000)
        n = len(sent)
        # A line fleetd did not record: say whether the burst window explains it.
        burst_ms = float(NO_STEP_POLICY["burst_window"].rstrip("s")) * 1000
        written_at = dict(sent)
        for s, _ in sent:
            stamp, before = grep.seen.get(s), grep.seen.get(s - 1)
            if s in found or stamp is None or before is None:
                continue
            gap = (stamp[1] - before[1]) / 1e6
            why = (
                f"the container's stdout delivered them together, inside the {burst_ms:.0f} ms "
                "burst window, so fleetd rightly counted the two lines as one incident"
                if 0 <= gap <= burst_ms
                else "outside the burst window: **a missed incident**"
            )
            self.notes.append(
                f"{phase}: line seq={s} was not recorded as an incident of its own. It was "
                f"written {(written_at[s] - written_at.get(s - 1, 0)) * 1000:.0f} ms after the "
                f"previous line, but its Docker timestamp is {gap:.1f} ms after that line's: "
                f"{why}."
            )

        def row(measure: str, values: list[float]) -> str:
            if not values:
                return f"| {phase} | {measure} | 0/{n} | - | - | - |"
            return (
                f"| {phase} | {measure} | {len(values)}/{n} | {fmt_ms(pct(values, 50))} "
                f"| {fmt_ms(pct(values, 99))} | {fmt_ms(max(values))} |"
            )

        return [
            row("fleetd, its own figure (`detected N ms after the line`, whole ms)", own),
            row("fleetd, its log line read by the bench - Docker timestamp", seen),
            row("baseline: `docker logs -f --timestamps \\| grep --line-buffered`", base),
            row("(write into the container -> Docker timestamp)", path),
        ]

    # --- 2. throughput -------------------------------------------------------------------------

    def throughput(self) -> None:
        duration = 15.0 if self.quick else 60.0
        rate = 50_000
        every = 2.0
        sat_s = 5.0 if self.quick else 10.0
        log(f"throughput: {rate} lines/s for {duration:.0f} s, then a {sat_s:.0f} s yes flood")
        src, fifo = self.fifo_container("tp-src")
        sat, sat_fifo = self.fifo_container("tp-sat", flood=True)
        fleet = self.fleetd(
            "throughput",
            {"tp": self.service(src.name), "sat": self.service(sat.name)},
            NO_STEP_POLICY,
        )
        src.start()
        fleet.start()
        fifo.open()
        dockerd = dockerd_pid()

        # Fixed-width lines so that a slice of the blob is a whole number of lines.
        pool = 10_000
        blob = b"".join(
            f"INFO: request {i:06d} done in {i % 47 + 3:02d} ms\n".encode() for i in range(pool)
        )
        width = len(blob) // pool
        sent: dict[int, float] = {}
        cpu0, d0, wall0 = cpu_ticks(fleet.pid), cpu_ticks(dockerd) if dockerd else 0, time.time()
        t0 = time.monotonic()
        written, seq, next_sentinel = 0, 0, every
        while True:
            now = time.monotonic() - t0
            due = int(rate * min(now, duration)) - written
            while due > 0:
                start = written % pool
                k = min(due, 1000, pool - start)
                fifo.write(blob[start * width : (start + k) * width])
                written += k
                due -= k
            if now >= next_sentinel or now >= duration:
                seq += 1
                sent[seq] = time.time()
                fifo.write(f"seq={seq} {OOM_TEXT}\n".encode())
                next_sentinel += every
            if now >= duration:
                break
            time.sleep(0.005)
        write_end = time.monotonic()
        found = fleet.wait_seqs(src.name, set(sent), 120)
        caught_up = time.time()
        cpu1, d1 = cpu_ticks(fleet.pid), cpu_ticks(dockerd) if dockerd else 0
        wall = caught_up - wall0
        fifo.close()
        log(f"throughput: wrote {written} lines in {write_end - t0:.1f} s; scanning the log")
        scan = scan_json_log(self.log_path(src))
        rss = proc_status(fleet.pid).get("VmRSS", "?")

        produced_s = (scan.last_ns - scan.first_ns) / 1e9
        produced_rate = scan.lines / produced_s
        last = max(sent)
        lags = [float(found[s].detected_ms) for s in sorted(sent) if s in found]
        end_lag = f"{found[last].detected_ms} ms" if last in found else "not recorded"
        if last in found:
            detect_last = scan.seqs[last][1] / 1e9 + found[last].detected_ms / 1000
            read_rate = (scan.seqs[last][0] + 1) / (detect_last - scan.first_ns / 1e9)
            read_text = f"{read_rate / 1000:.1f}k lines/s"
        else:
            read_text = "did not reach the end within 120 s"
        cpu = (cpu1 - cpu0) / CLK_TCK / wall
        dcpu = (d1 - d0) / CLK_TCK / wall
        rows = [
            "| measure | value |",
            "|---|---|",
            "| lines in the container's log (counted in its json-file, the same as "
            f"`docker logs \\| wc -l`) | {scan.lines:,} "
            f"in {produced_s:.1f} s = **{produced_rate / 1000:.1f}k lines/s produced** |",
            f"| read by fleetd's follower (all lines up to the last sentinel / time until "
            f"fleetd recorded it) | **{read_text}** |",
            f"| fleetd CPU over the {wall:.0f} s (utime+stime) | **{cpu * 100:.0f}% of one core** "
            f"(dockerd: {dcpu * 100:.0f}%) |",
            f"| lag: a sentinel OOM line every {every:.0f} s -> recorded "
            f"({len(lags)}/{len(sent)} recorded) | p50 {fmt_ms(pct(lags, 50))} ms, "
            f"max {fmt_ms(max(lags))} ms |",
            f"| lag of the sentinel written at the end of the {duration:.0f} s | **{end_lag}** |",
            f"| fleetd VmRSS after the run | {kib_text(rss)} |",
        ]

        # Saturation: `yes`, far more than dockerd delivers.
        log("throughput: saturating flood")
        sat.start()
        time.sleep(0.5)
        sat_fifo.open()
        cpu0, d0, wall0 = cpu_ticks(fleet.pid), cpu_ticks(dockerd) if dockerd else 0, time.time()
        sat_sent: dict[int, float] = {}
        t0 = time.monotonic()
        seq = 0
        while time.monotonic() - t0 < sat_s:
            time.sleep(1.0)
            seq += 1
            sat_sent[seq] = time.time()
            sat_fifo.write(f"seq={seq} {OOM_TEXT}\n".encode())
        cpu1, d1, wall1 = cpu_ticks(fleet.pid), cpu_ticks(dockerd) if dockerd else 0, time.time()
        self.stop_flood(sat)
        time.sleep(0.5)
        seq += 1
        sat_sent[seq] = time.time()
        sat_fifo.write(f"seq={seq} {OOM_TEXT} (after the flood stopped)\n".encode())
        wait_s = 20 if self.quick else 40
        found = fleet.wait_seqs(sat.name, set(sat_sent), wait_s)
        cpu2, d2, wall2 = cpu_ticks(fleet.pid), cpu_ticks(dockerd) if dockerd else 0, time.time()
        drain_cpu = (cpu2 - cpu1) / CLK_TCK / (wall2 - wall1)
        drain_dcpu = (d2 - d1) / CLK_TCK / (wall2 - wall1)
        sat_fifo.close()
        # What Docker's own client gets out of the same log, for scale (not following).
        log("throughput: docker logs | wc -l over the flood's log")
        t = time.monotonic()
        counted = subprocess.run(
            ["sh", "-c", f"docker logs {sat.name} 2>&1 | wc -l"],
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        )
        go_s = time.monotonic() - t
        go_rate = int(counted.stdout.strip()) / go_s
        fleetd_done = "fleetd idle" if len(found) == len(sat_sent) else "fleetd still reading"
        scan = scan_json_log(self.log_path(sat))
        # Produced: from the first line to the last sentinel written during the flood.
        flood_lines, flood_end_ns = scan.seqs.get(seq - 1, (scan.lines, scan.last_ns))
        flood_s = (flood_end_ns - scan.first_ns) / 1e9
        detected = sorted(
            (scan.seqs[s][0], scan.seqs[s][1] / 1e9 + found[s].detected_ms / 1000)
            for s in found
            if s in scan.seqs and s in sat_sent
        )
        sat_lags = [
            f"{found[s].detected_ms / 1000:.1f} s" if s in found else "not seen"
            for s in sorted(sat_sent)
        ]
        if len(detected) >= 2:
            (i0, t_0), (i1, t_1) = detected[0], detected[-1]
            sat_read = f"{(i1 - i0) / (t_1 - t_0) / 1000:.1f}k lines/s"
        else:
            sat_read = "too few sentinels recorded to tell"
        cpu = (cpu1 - cpu0) / CLK_TCK / (wall1 - wall0)
        dcpu = (d1 - d0) / CLK_TCK / (wall1 - wall0)
        sat.remove(force=True)
        fleet.stop()
        src.remove(force=True)
        self.out += [
            f"#### 2. Throughput: one watched container at {rate // 1000}k lines/s for "
            f"{duration:.0f} s",
            "",
            *rows,
            "",
            f"Saturation, for comparison: `{FLOOD_CMD}` (the emitter's FLOOD=1) for "
            f"{sat_s:.0f} s, a sentinel every second and one 0.5 s after the flood stopped "
            "(fleetd read the flood from the container's start):",
            "",
            "| measure | value |",
            "|---|---|",
            f"| produced | {flood_lines:,} lines in {flood_s:.1f} s = "
            f"{flood_lines / max(flood_s, 1e-9) / 1000:.0f}k lines/s |",
            f"| read by fleetd's follower (lines between the first and last sentinel recorded "
            f"/ time between their recording; mostly the backlog after the flood) | {sat_read} |",
            f"| for scale: `docker logs NAME \\| wc -l` over the same log afterwards (no "
            f"follow, {fleetd_done}) | {go_rate / 1000:.1f}k lines/s |",
            f"| fleetd CPU during the flood | {cpu * 100:.0f}% of one core (dockerd: "
            f"{dcpu * 100:.0f}%) |",
            f"| fleetd CPU from the end of the flood until the last sentinel was recorded "
            f"| {drain_cpu * 100:.0f}% of one core (dockerd: {drain_dcpu * 100:.0f}%) |",
            f"| lag of each sentinel (not seen: not recorded within {wait_s} s after) "
            f"| {', '.join(sat_lags)} |",
            "",
        ]

    # --- 3. third incident -> new container running ---------------------------------------

    def stepdown(self) -> None:
        runs = 3 if self.quick else 5
        log(f"step-down: {runs} runs")
        detector = Detector(runtime="llamacpp")
        results = []
        for r in range(runs):
            name = self.name(f"sd{r}")
            ladder = [{"model": "big", "vram": "4000MiB"}, {"model": "medium", "vram": "2500MiB"}]
            policy = {**NO_STEP_POLICY, "incidents_to_step_down": 3, "burst_window": "2s"}
            policy["cooldown"] = "60s"
            fleet = self.fleetd(f"stepdown{r}", {"sd": self.service(name, ladder=ladder)}, policy)
            handoff = fleet.state_dir / "services" / "sd"
            handoff.mkdir(parents=True)
            (handoff / "model").write_text("big\n")
            container = self.client.containers.create(
                EMITTER,
                name=name,
                labels=self.labels,
                environment={
                    "RUNTIME": "llamacpp",
                    "CAPACITY_MIB": "3000",
                    "MODEL_SIZES": "big=4000,medium=2500",
                },
                volumes={str(handoff): {"bind": "/run/fleetd", "mode": "ro"}},
                restart_policy={"Name": "on-failure"},
            )
            fleet.start()
            container.start()
            fleet.wait_line(lambda line: "now rung 1" in line, 60, "the step down")
            started_ns = 0
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                container.reload()
                state = container.attrs["State"]
                started_ns = parse_docker_time_ns(state["StartedAt"])
                # The newest run's own first line (Docker stamps StartedAt a little after
                # the process has started printing, so `logs(since=StartedAt)` can miss it).
                tail = container.logs(tail=40).decode("utf-8", "replace")
                starts = [ln for ln in tail.splitlines() if ln.startswith("emitter: runtime=")]
                if state["Running"] and starts and "model=medium" in starts[-1]:
                    break
                time.sleep(0.1)
            else:
                tail = container.logs(timestamps=True, tail=30).decode("utf-8", "replace")
                said = "\n".join(line for _, line in fleet.lines[-15:])
                raise RuntimeError(
                    f"the container did not come back with model=medium; state {state}\n"
                    f"its log:\n{tail}\nfleetd said:\n{said}"
                )
            # The incident that stepped down: the run whose first OOM line is nearest to
            # (when fleetd logged it - the delay it reported).
            step = next(i for i in fleet.incidents if ": step down rung" in i.line)
            target_ns = (step.seen_at - step.detected_ms / 1000) * 1e9
            firsts = _oom_runs(container, detector)
            number, (line_ns, _) = min(
                enumerate(firsts, 1), key=lambda item: abs(item[1][0] - target_ns)
            )
            # fleetd's restart reaches Docker as the container's `stop` event.
            events = self.client.events(
                since=line_ns / 1e9,
                until=time.time(),
                filters={"container": container.id, "event": "stop"},
                decode=True,
            )
            stops = sorted(int(e["timeNano"]) for e in events if int(e["timeNano"]) > line_ns)
            stop_ns = stops[0] if stops else 0
            results.append(
                (started_ns - line_ns, step.detected_ms, len(firsts), number, stop_ns - line_ns)
            )
            log(
                f"step-down run {r}: incident #{number} of {len(firsts)} runs with an OOM "
                f"line -> StartedAt {(started_ns - line_ns) / 1e6:.0f} ms"
            )
            fleet.stop()
            container.remove(force=True)
        totals = [t / 1e6 for t, *_ in results]
        self.out += [
            "#### 3. Third incident -> new container running",
            "",
            "llamacpp emitter, CAPACITY_MIB=3000, ladder big (4000 MiB) -> medium (2500 MiB), "
            "restart policy on-failure (it crash-loops on big), policy 3 incidents, "
            "stop_timeout 2s. From the Docker timestamp of the third incident's first line to "
            "`State.StartedAt` of the run that loaded `medium`:",
            "",
            "| run | crash-loop runs that printed OOM | the run whose line made fleetd's 3rd "
            "incident | that line -> **StartedAt**, ms | line -> recorded by fleetd, ms "
            "| line -> fleetd's restart reaches Docker (its `stop` event), ms |",
            "|---|---|---|---|---|---|",
            *(
                f"| {i + 1} | {runs_seen} | #{number} | **{t / 1e6:.0f}** | {d} "
                f"| {stop / 1e6:.0f} |"
                for i, (t, d, runs_seen, number, stop) in enumerate(results)
            ),
            "",
            f"**Median {statistics.median(totals):.0f} ms** (min {min(totals):.0f}, "
            f"max {max(totals):.0f}) over {runs} runs.",
            "",
        ]

    # --- 4. resident memory ---------------------------------------------------------------------

    def memory(self) -> None:
        counts = (1, 10, 50)
        settle = 10 if self.quick else 20
        log(f"memory: starting {max(counts)} ticking containers")
        script = 'i=0; while :; do i=$((i+1)); echo "tick $i"; sleep 1; done'

        def make(i: int) -> Any:
            c = self.busybox(self.name(f"tick{i:02d}"), script)
            c.start()
            return c

        with ThreadPoolExecutor(8) as pool:
            containers = list(pool.map(make, range(max(counts))))
        rows = []
        for n in counts:
            services = {f"svc{i:02d}": self.service(c.name) for i, c in enumerate(containers[:n])}
            fleet = self.fleetd(f"mem{n}", services, NO_STEP_POLICY)
            fleet.start()
            cpu0, wall0 = cpu_ticks(fleet.pid), time.monotonic()
            time.sleep(settle)
            status = proc_status(fleet.pid)
            cpu = (cpu_ticks(fleet.pid) - cpu0) / CLK_TCK / (time.monotonic() - wall0)
            rows.append(
                f"| {n} | {kib_text(status['VmRSS'])} | {kib_text(status['VmHWM'])} "
                f"| {status['Threads']} "
                f"| {cpu * 100:.1f}% |"
            )
            log(f"memory: {n} containers: {status['VmRSS']}")
            fleet.stop()
        for c in containers:
            c.remove(force=True)
        self.out += [
            "#### 4. Resident memory",
            "",
            f"Each watched container (busybox, one line a second) in its own service; read "
            f"{settle} s after fleetd reported itself running.",
            "",
            "| watched containers | VmRSS | VmHWM | threads | CPU over those seconds |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]


def kib_text(value: str) -> str:
    """`65960 kB` -> `64.4 MiB`."""
    try:
        return f"{int(value.split()[0]) / 1024:.1f} MiB"
    except (ValueError, IndexError):
        return value


def proc_status_line(path: str, key: str) -> str:
    for line in Path(path).read_text().splitlines():
        if line.startswith(key + ":"):
            return line.split(":", 1)[1].strip()
    raise KeyError(key)


def _oom_runs(container: Any, detector: Detector) -> list[tuple[int, str]]:
    """Docker time and text of the first OOM line of each run of a crash-looping container.

    A run prints its OOM lines within milliseconds and exits; Docker's restart back-off
    keeps runs at least 100 ms apart, so a gap of 50 ms separates them.
    """
    firsts: list[tuple[int, str]] = []
    last_ns = 0
    for raw in container.logs(timestamps=True).decode("utf-8", "replace").splitlines():
        stamp, _, text = raw.partition(" ")
        if detector.classify(text) is None:
            continue
        ns = parse_docker_time_ns(stamp)
        if not firsts or ns - last_ns > 50_000_000:
            firsts.append((ns, text))
        last_ns = ns
    return firsts


@contextlib.contextmanager
def bench_context(quick: bool, keep: bool) -> Iterator[Bench]:
    bench = Bench(quick, keep)
    try:
        yield bench
    finally:
        bench.cleanup()


PHASES = ("latency", "throughput", "stepdown", "memory")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (under 3 minutes)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(PHASES)}")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (fleetd's logs)")
    args = parser.parse_args()
    phases = args.only.split(",") if args.only else list(PHASES)
    # SIGTERM ends the run through the same cleanup as an error (containers removed).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.monotonic()
    with bench_context(args.quick, args.keep) as bench:
        bench.machine()
        for phase in phases:
            bench.note_others()
            getattr(bench, phase)()
            bench.note_others()
        bench.out[4:4] = [bench.sharing(), ""]
    bench.out.append(f"(whole run: {time.monotonic() - started:.0f} s)")
    print("\n".join(bench.out))


if __name__ == "__main__":
    main()
