"""A real llama-server stepped down by fleetd, against a cold start of the smaller rung alone.

    python bench/stepdown_bench.py              # 5 + 5 runs: about 2 minutes on 2 cores
    python bench/stepdown_bench.py --runs 3 --keep /tmp/stepdown   # keep configs and logs

Needs the Docker engine, Compose v2 (scripts/ensure-compose.sh) and the llama.cpp image
(scripts/build-test-images.sh llamacpp); it runs both scripts first. Prints a Markdown
section on stdout (progress on stderr) and writes it to /tmp/stepdown-section.md
(`--out`); `--append docs/benchmarks.md` also appends it there.

Each step-down run is the loop of tests/integration/test_llamacpp_e2e.py, afresh: its
fleet.yaml (`accelerator: cpu`, big -> small), `fleetctl generate`, the override that puts
the server under `ulimit -v 600000` (big's 512 MiB KV cache cannot be allocated), `fleetd
run --log-level debug` (this script stamps each line of its stderr as it arrives), `docker
compose up -d`. /health is polled every 15 ms from just after `compose up`; the measure is
from the Docker timestamp of the line that made fleetd decide (the history entry's
`evidence`, found in `docker logs --timestamps`) to the first /health 200 after it (the
poll's answer time, same host clock). Docker's events and llama-server's own timestamped
lines split it into: fleetd's decision (its `detected N ms after the line`), fleetd's
restart call reaching Docker (the `stop` event), Docker's restart (`stop` -> `start`),
llama-server's load (`start` -> `model loaded`) and the poll (`model loaded` -> 200).

Each cold run `docker run -d`s the same image with the entrypoint, command and volumes the
generated compose.yml gives the service (the hand-off file naming the small model), and
measures from `docker run` to the first /health 200, and from the container's StartedAt;
once on Docker's default bridge (the target's baseline) and once on a fresh user-defined
network, as compose runs the service (on Docker 20.10 a container there can stay
unreachable for up to half a second after its server listens). Cold and step-down runs
alternate, so a busy neighbour weighs on both alike.
Everything a run creates (compose project, fleetd, containers, folders) is removed when
it ends, also when it fails.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from supervisor.edges.engine import parse_docker_time_ns  # noqa: E402
from tests.ggufmodels import write_gguf  # noqa: E402
from tests.integration.test_llamacpp_e2e import (  # noqa: E402  (one definition of the loop)
    ADDRESS_SPACE_KIB,
    BIG,
    CAPACITY_RULE,
    IMAGE,
    SMALL,
)

FLEETCTL = ROOT / ".venv" / "bin" / "fleetctl"  # the checkout's, never one from PATH
FLEETD = ROOT / ".venv" / "bin" / "fleetd"
POLL_S = 0.015
POLL_TIMEOUT_S = 0.1  # a /health answer takes a few ms; see HealthPoller
RUN_TIMEOUT_S = 120.0
LABEL = "org.fleetd.bench.stepdown"
TARGET_RATIO, TARGET_EXTRA_S = 1.2, 0.5
LOADED = "model loaded"  # llama-server: the model is in memory, /health turns 200
# llama.cpp's log prefix: minutes.seconds.milliseconds.microseconds since the process began.
SERVER_CLOCK_RE = re.compile(r"(\d+)\.(\d{2})\.(\d{3})\.(\d{3}) ")
STEP_RE = re.compile(r"step down .* \| detected (?P<ms>-?\d+) ms after the line")
READY_RE = re.compile(r"ready in (?P<s>[\d.]+) s; warm-up (?P<warm>[^;]*)")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- edges: processes, Docker, HTTP ------------------------------------------------------


def run(argv: Sequence[str | Path], cwd: Path | None = None, timeout_s: float = 300) -> str:
    """stdout of a command that must succeed; its stderr in the error otherwise."""
    done = subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout_s
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))}: exit {done.returncode}\n{done.stderr}")
    return done.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def docker_time(stamp: str) -> float:
    return parse_docker_time_ns(stamp) / 1e9


def stamped_log(container: str) -> list[tuple[float, str]]:
    """The container's lines (both streams, every run) with Docker's timestamps."""
    done = subprocess.run(
        ["docker", "logs", "--timestamps", container],
        capture_output=True, text=True, errors="replace", timeout=60, check=True,
    )  # fmt: skip
    lines = []
    for raw in (done.stdout + done.stderr).splitlines():
        stamp, _, text = raw.partition(" ")
        with contextlib.suppress(ValueError):
            lines.append((docker_time(stamp), text))
    return sorted(lines)


def container_events(container: str, since: float, until: float) -> list[tuple[float, str]]:
    """(time, action) of Docker's events for the container in [since, until]."""
    out = run([
        "docker", "events", "--since", f"{since:.3f}", "--until", f"{until:.3f}",
        "--filter", f"container={container}", "--format", "{{.TimeNano}} {{.Action}}",
    ])  # fmt: skip
    events = []
    for line in out.splitlines():
        nano, _, action = line.partition(" ")
        events.append((int(nano) / 1e9, action))
    return events


@dataclass(frozen=True)
class ServerRun:
    """One run of llama-server, placed on the host clock by its own log clock."""

    clock_at: float  # when its clock began (about when the process started), host time
    loaded_s: float  # its own figure: `model loaded` this many seconds into the run

    @property
    def loaded_at(self) -> float:
        return self.clock_at + self.loaded_s


def server_run(lines: Sequence[tuple[float, str]], since: float) -> ServerRun:
    """The run whose lines Docker stamped from `since` on. Docker stamps a line when it
    reads it, never before it was written: the earliest stamp less the server's own time
    of the line is the best bound on when the server's clock began."""
    clock_at, loaded_s = math.inf, None
    for at, text in lines:
        found = SERVER_CLOCK_RE.match(text)
        if at < since or found is None:
            continue
        minutes, seconds, millis, micros = map(int, found.groups())
        offset_s = minutes * 60 + seconds + millis / 1e3 + micros / 1e6
        clock_at = min(clock_at, at - offset_s)
        if LOADED in text:
            loaded_s = offset_s
    if loaded_s is None:
        raise RuntimeError(f"no `{LOADED}` line from {since:.3f} on")
    return ServerRun(clock_at, loaded_s)


class HealthPoller:
    """GET /health every POLL_S, one at a time, in a thread; keeps (sent_at, answered_at,
    status) of each.

    One at a time: under `ulimit -v` each request llama-server serves concurrently can
    cost its HTTP thread a 64 MiB malloc arena of address space, and a burst of them
    crashes the small rung too (`std::system_error: Resource temporarily unavailable`).
    A short timeout: while the container's network comes up, docker-proxy accepts and then
    hangs; the poll gives up and the next one goes out, rather than waiting a second."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.polls: list[tuple[float, float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="health-poll", daemon=True)

    def __enter__(self) -> HealthPoller:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            sent_at = time.time()
            status = self._status()
            self.polls.append((sent_at, time.time(), status))
            next_at = max(next_at + POLL_S, time.monotonic())
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _status(self) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=POLL_TIMEOUT_S)
        try:
            connection.request("GET", "/health")
            return connection.getresponse().status
        except OSError:  # refused or reset while the container (re)starts
            return 0
        finally:
            connection.close()

    def first_ok(self, after: float = 0.0) -> float | None:
        """When the first 200 to a poll sent after `after` came back."""
        polls = list(self.polls)
        return next((got for sent, got, code in polls if code == 200 and sent > after), None)

    def save(self, path: Path) -> None:
        """Each poll as `sent_at answered_at status`, for a look with --keep."""
        path.write_text("".join(f"{s:.6f} {g:.6f} {c}\n" for s, g, c in list(self.polls)))

    def wait_ok(self, timeout_s: float) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = self.first_ok()
            if found is not None:
                return found
            time.sleep(0.05)
        raise TimeoutError(f"no /health 200 on port {self.port} within {timeout_s:.0f} s")


class StampedFleetd:
    """`fleetd run --log-level debug`; each stderr line stamped with the host clock as it
    arrives, and copied to a file."""

    def __init__(self, config: Path, state_dir: Path, log_file: Path) -> None:
        env = {**os.environ, "NOTIFY_SOCKET": "", "FLEETD_SOCKET": ""}
        argv = [FLEETD, "run", "--config", config, "--state-dir", state_dir, "--log-level", "debug"]
        self.process = subprocess.Popen(
            [str(a) for a in argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, env=env, start_new_session=True,
        )  # fmt: skip
        self.lines: list[tuple[float, str]] = []
        self._file = log_file.open("w")
        self._reader = threading.Thread(target=self._read, name="fleetd-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            at = time.time()
            self.lines.append((at, line.rstrip("\n")))
            self._file.write(f"{at:.6f} {line}")
        self._file.close()

    def first(self, check: Callable[[str], bool]) -> tuple[float, str] | None:
        return next(((at, line) for at, line in list(self.lines) if check(line)), None)

    def wait_for(self, check: Callable[[str], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while self.first(check) is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fleetd: no {what}\n{self.transcript()}")
            time.sleep(0.05)

    def transcript(self) -> str:
        return "\n".join(line for _, line in list(self.lines))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._reader.join(5)


# --- the fleet ---------------------------------------------------------------------------


def fleet_config(folder: Path, models: Path, container: str, port: int) -> Path:
    """The fleet.yaml of tests/integration/test_llamacpp_e2e.py, in `folder`."""
    service = {
        "runtime": "llamacpp",
        "image": IMAGE,
        "containers": [container],
        "port": port,
        "volumes": [f"{models}:/models:ro"],
        "environment": {"MALLOC_ARENA_MAX": "1"},
        "rules": [CAPACITY_RULE],
        "health": {"interval": "2s"},
        "warmup": {"tokens": 8, "timeout": "60s"},
        "ladder": [
            {"model": "/models/big.gguf", "metadata": str(models / "big.gguf"), "context": 32768},
            {
                "model": "/models/small.gguf",
                "metadata": str(models / "small.gguf"),
                "context": 32768,
            },
        ],
    }
    body = {
        "accelerator": "cpu",
        "compose_dir": str(folder / "compose"),
        "metrics": {"address": "127.0.0.1:0"},
        "policy": {"cooldown": "1s", "burst_window": "1s", "stop_timeout": "2s"},
        "services": {"llm": service},
    }
    config = folder / "fleet.yaml"
    config.write_text(yaml.safe_dump(body))
    return config


def generate(config: Path, folder: Path) -> dict[str, Any]:
    """`fleetctl generate` into folder/compose; the generated service `llm`."""
    out = folder / "compose"
    run([FLEETCTL, "generate", "--config", config, "--out", out, "--state-dir", folder / "state"])
    generated: dict[str, Any] = yaml.safe_load((out / "compose.yml").read_text())
    return dict(generated["services"]["llm"])


def write_limits(service: dict[str, Any], compose_dir: Path) -> None:
    """The override that runs the generated entrypoint's script under `ulimit -v`."""
    shell, flag, script, *rest = service["entrypoint"]
    limited = [shell, flag, f"ulimit -v {ADDRESS_SPACE_KIB}; {script}", *rest]
    override = {"services": {"llm": {"entrypoint": limited}}}
    (compose_dir / "limits.yml").write_text(yaml.safe_dump(override, width=1000))


def compose(project: str, compose_dir: Path, *args: str) -> str:
    files = ["-f", "compose.yml", "-f", "limits.yml"]
    return run(["docker", "compose", "-p", project, *files, *args], cwd=compose_dir)


def compose_down(project: str, where: Path) -> None:
    """By project name, from a folder without a compose file: whatever `up` created."""
    subprocess.run(
        ["docker", "compose", "-p", project, "down", "-v", "--remove-orphans", "-t", "1"],
        cwd=where, capture_output=True, timeout=120, check=False,
    )  # fmt: skip


def unescape(value: str) -> str:
    """A compose file's string as the container gets it (`$$` is compose's literal `$`)."""
    return value.replace("$$", "$")


def cold_argv(service: dict[str, Any], models: Path, handoff: Path) -> list[str]:
    """`docker run` arguments for the generated service's image, entrypoint, command,
    environment and volumes, with the hand-off folder `handoff` at /run/fleetd."""
    entrypoint = [unescape(a) for a in service["entrypoint"]]
    argv = ["--entrypoint", entrypoint[0]]
    for name, value in (service.get("environment") or {}).items():
        argv += ["--env", f"{name}={value}"]
    argv += ["--volume", f"{handoff}:/run/fleetd:ro", "--volume", f"{models}:/models:ro"]
    return [*argv, service["image"], *entrypoint[1:], *map(unescape, service["command"])]


# --- one step-down -----------------------------------------------------------------------


@dataclass(frozen=True)
class StepDown:
    error_at: float  # Docker's timestamp of the line fleetd decided on
    detected_ms: int  # fleetd's own figure for that line
    die_at: float  # Docker's `die` of the failing run (it exits 1 by itself)
    stop_at: float  # Docker's `stop` event: the stop of fleetd's restart call is done
    server: ServerRun  # the small rung's run
    healthy_at: float  # the first /health 200 after error_at
    fleetd_ready_at: float | None  # fleetd's `warming up` line (it saw /health 200)
    ready_detail: str  # fleetd's `ready in ...; warm-up ...`
    evidence: str

    @property
    def total_s(self) -> float:
        return self.healthy_at - self.error_at

    @property
    def decided_at(self) -> float:
        return self.error_at + self.detected_ms / 1000


def step_down_run(index: int, work: Path, models: Path) -> StepDown:
    folder = work / f"stepdown-{index}"
    folder.mkdir()
    project = f"fleetd-bench-{uuid.uuid4().hex[:8]}"
    container, port = f"{project}-llm", free_port()
    config = fleet_config(folder, models, container, port)
    write_limits(generate(config, folder), folder / "compose")
    fleetd = StampedFleetd(config, folder / "state", folder / "fleetd.log")
    try:
        fleetd.wait_for(lambda line: "fleetd running" in line, 30, "`fleetd running` line")
        up_at = time.time()
        with HealthPoller(port) as poller:
            compose(project, folder / "compose", "up", "-d")
            state = wait_settled(folder / "state" / "state.json", fleetd)
        poller.save(folder / "polls.txt")
        return read_step_down(state, container, fleetd, poller, up_at)
    finally:
        fleetd.stop()
        with (folder / "server.log").open("w") as f:  # every run of the server, for --keep
            subprocess.run(["docker", "logs", "--timestamps", container], stdout=f, stderr=f)
        compose_down(project, folder)


class SmallRungFailed(RuntimeError):
    """The small rung ran out of memory too, under the same limit: fleetd gave up."""


def wait_settled(state_file: Path, fleetd: StampedFleetd) -> dict[str, Any]:
    """The state once small is the rung and warmed up (fleetd's `ready in` line)."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        if fleetd.first(lambda line: "EXHAUSTED" in line):
            incidents = [line for _, line in list(fleetd.lines) if "| evidence: " in line]
            evidence = incidents[-1].split("| evidence: ")[1].split(" | ")[0]
            raise SmallRungFailed(evidence)
        with contextlib.suppress(FileNotFoundError, ValueError):
            state: dict[str, Any] = json.loads(state_file.read_text())
            if state["services"].get("llm", {}).get("rung") == 1 and fleetd.first(
                lambda line: "small.gguf ready in" in line
            ):
                return state
        if fleetd.process.poll() is not None:
            break
        time.sleep(0.1)
    raise RuntimeError(f"no step-down and warm-up:\n{fleetd.transcript()}")


def read_step_down(
    state: dict[str, Any],
    container: str,
    fleetd: StampedFleetd,
    poller: HealthPoller,
    up_at: float,
) -> StepDown:
    [change] = state["history"]
    evidence = change["evidence"].strip()
    lines = stamped_log(container)
    [error_at] = [at for at, text in lines if text.strip() == evidence]  # unique per run
    step = fleetd.first(lambda line: STEP_RE.search(line) is not None)
    ready = fleetd.first(lambda line: "small.gguf ready in" in line)
    warming = fleetd.first(lambda line: "warming up /models/small.gguf" in line)
    found = STEP_RE.search(step[1]) if step is not None else None
    healthy_at = poller.first_ok(after=error_at)
    if found is None or ready is None or healthy_at is None:
        raise RuntimeError(f"incomplete run: step-down {step}, ready {ready}, 200 {healthy_at}")
    events = container_events(container, up_at - 1, time.time())
    die_at = min(at for at, action in events if action == "die" and at > error_at)
    stops = [at for at, action in events if action == "stop" and at > error_at]
    stop_at = min(stops, default=die_at)  # no `stop`: it was not running any more
    ready_found = READY_RE.search(ready[1])
    return StepDown(
        error_at=error_at,
        detected_ms=int(found.group("ms")),
        die_at=die_at,
        stop_at=stop_at,
        server=server_run(lines, stop_at),
        healthy_at=healthy_at,
        fleetd_ready_at=warming[0] if warming else None,
        ready_detail=ready_found.group(0) if ready_found else ready[1],
        evidence=evidence,
    )


# --- one cold start ----------------------------------------------------------------------


@dataclass(frozen=True)
class ColdStart:
    run_at: float  # just before `docker run -d`
    started_at: float  # the container's State.StartedAt
    server: ServerRun
    healthy_at: float

    @property
    def total_s(self) -> float:
        return self.healthy_at - self.run_at

    @property
    def from_started_s(self) -> float:
        return self.healthy_at - self.started_at


def cold_run(
    tag: str, work: Path, models: Path, service: dict[str, Any], run_id: str, own_network: bool
) -> ColdStart:
    """One cold start; `own_network`: on a fresh user-defined network, as compose runs the
    service (its project network), rather than on Docker's default bridge."""
    handoff = work / f"cold-{tag}"
    handoff.mkdir()
    (handoff / "model").write_text("/models/small.gguf\n")
    argv = cold_argv(service, models, handoff)
    name, port = f"fleetd-bench-cold-{uuid.uuid4().hex[:8]}", free_port()
    label = ["--label", f"{LABEL}={run_id}"]
    publish = ["--publish", f"127.0.0.1:{port}:8080", *label]
    if own_network:
        run(["docker", "network", "create", *label, name])
        publish += ["--network", name]
    try:
        with HealthPoller(port) as poller:
            run_at = time.time()
            run(["docker", "run", "-d", "--name", name, *publish, *argv])
            healthy_at = poller.wait_ok(RUN_TIMEOUT_S)
        poller.save(handoff / "polls.txt")
        started = run(["docker", "inspect", "-f", "{{.State.StartedAt}}", name]).strip()
        server = server_run(stamped_log(name), run_at)
        return ColdStart(run_at, docker_time(started), server, healthy_at)
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
        if own_network:
            subprocess.run(["docker", "network", "rm", name], capture_output=True, check=False)


# --- the report --------------------------------------------------------------------------


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def median_max(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.3f} | {max(values):.3f}"


def machine_lines(started: datetime) -> list[str]:
    uname = run(["uname", "-srm"]).strip()
    engine = run(["docker", "version", "--format", "{{.Server.Version}}"]).strip()
    compose_version = run(["docker", "compose", "version", "--short"]).strip()
    others = run(["docker", "ps", "--format", "{{.Image}}"]).split()
    neighbours = (
        f"{len(others)} other containers were running on the engine at the end "
        f"({', '.join(sorted(set(others)))}), sharing the CPUs"
        if others
        else "nothing else ran on the engine"
    )
    return [
        f"Machine: `{uname}`, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"Docker engine {engine}, Compose {compose_version}; {started:%Y-%m-%d %H:%M} UTC. "
        f"1-min load average at the end: {os.getloadavg()[0]:.1f}; {neighbours}.",
    ]


def summary_table(results: Results) -> list[str]:
    downs, colds, own = results.downs, results.colds, results.colds_own_network
    detected = [d.detected_ms / 1000 for d in downs]
    return [
        "| measure | runs | median s | max s |",
        "|---|---|---|---|",
        f"| **step-down**: failing rung's error line -> small rung's first /health 200 "
        f"| {len(downs)} | {median_max([d.total_s for d in downs])} |",
        f"| **cold start** of the small rung alone: `docker run` -> first /health 200 "
        f"| {len(colds)} | {median_max([c.total_s for c in colds])} |",
        f"| cold start: the container's StartedAt -> first /health 200 "
        f"| {len(colds)} | {median_max([c.from_started_s for c in colds])} |",
        f"| cold start on its own user-defined network (as compose runs it): `docker run` "
        f"-> first /health 200 | {len(own)} | {median_max([c.total_s for c in own])} |",
        f"| fleetd's decision latency (`detected N ms after the line`) "
        f"| {len(downs)} | {median_max(detected)} |",
    ]


def target_met(downs: Sequence[StepDown], colds: Sequence[ColdStart]) -> bool:
    step = statistics.median(d.total_s for d in downs)
    return step <= TARGET_RATIO * statistics.median(c.total_s for c in colds) + TARGET_EXTRA_S


def target_line(downs: Sequence[StepDown], colds: Sequence[ColdStart], against: str) -> str:
    step = statistics.median(d.total_s for d in downs)
    cold = statistics.median(c.total_s for c in colds)
    bound = TARGET_RATIO * cold + TARGET_EXTRA_S
    worst = max(d.total_s for d in downs)
    verdict = "**met**" if target_met(downs, colds) else "**missed**"
    return (
        f"- against {against}: {step:.3f} s <= {TARGET_RATIO} x {cold:.3f} + "
        f"{TARGET_EXTRA_S} = {bound:.3f} s: {verdict} (ratio {step / cold:.2f}; the slowest "
        f"step-down, {worst:.3f} s, is {'within' if worst <= bound else 'over'} the bound)"
    )


def target_lines(results: Results) -> list[str]:
    downs = results.downs
    return [
        f"Target `stepdown <= {TARGET_RATIO} x cold + {TARGET_EXTRA_S} s`, on the medians:",
        "",
        target_line(downs, results.colds, "the plain cold start (default bridge; the issue's)"),
        target_line(
            downs,
            results.colds_own_network,
            "the cold start on a user-defined network, as compose runs the service (like for like)",
        ),
    ]


def step_rows(downs: Sequence[StepDown]) -> list[str]:
    rows = [
        "| run | total | 1. fleetd decides (its figure) | 2. decision -> failing run exits "
        "(`die`) | 3. `die` -> `stop` (Docker ends fleetd's stop) | 4. `stop` -> server's "
        "clock starts (Docker starts it) | 5. server: `model loaded` (its clock) | "
        "6. loaded -> first 200 (poll) | after: 200 -> fleetd's `warming up` | fleetd's figures |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, d in enumerate(downs, 1):
        lag = None if d.fleetd_ready_at is None else d.fleetd_ready_at - d.healthy_at
        rows.append(
            f"| {i} | **{ms(d.total_s)}** | {d.detected_ms} | {ms(d.die_at - d.decided_at)} | "
            f"{ms(d.stop_at - d.die_at)} | {ms(d.server.clock_at - d.stop_at)} | "
            f"{ms(d.server.loaded_s)} | {ms(d.healthy_at - d.server.loaded_at)} | {ms(lag)} | "
            f"{d.ready_detail} |"
        )
    return rows


def cold_rows(colds: Sequence[ColdStart]) -> list[str]:
    rows = [
        "| run | total: `docker run` -> first 200 | StartedAt -> first 200 | 1. `docker run` "
        "-> server's clock starts | 2. server: `model loaded` (its clock) | "
        "3. loaded -> first 200 (poll) | (`docker run` -> StartedAt) |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, c in enumerate(colds, 1):
        rows.append(
            f"| {i} | **{ms(c.total_s)}** | {ms(c.from_started_s)} | "
            f"{ms(c.server.clock_at - c.run_at)} | {ms(c.server.loaded_s)} | "
            f"{ms(c.healthy_at - c.server.loaded_at)} | {ms(c.started_at - c.run_at)} |"
        )
    return rows


def failure_lines(results: Results) -> list[str]:
    if not results.failed:
        return []
    return [
        f"**{len(results.failed)} of {len(results.failed) + len(results.downs)} tries did "
        "not count**: the small rung, restarted under the same `ulimit -v`, failed to "
        "allocate too, and fleetd (rightly) marked the service EXHAUSTED; each was tried "
        "again. Their evidence: " + "; ".join(f"`{e}`" for e in results.failed) + ".",
        "",
    ]


def section(results: Results, started: datetime) -> str:
    downs, colds, argv = results.downs, results.colds, results.cold_argv
    lines = [
        "## Step-down against a real llama-server",
        "",
        "Reproduce with `python bench/stepdown_bench.py` (about a minute on 2 cores; Docker, "
        "Compose v2 and the llama.cpp image, which it builds or installs when missing). "
        "Target (issue): the time from the failing rung's first error line (the one fleetd "
        "decided on) to the smaller rung answering /health 200 is at most 1.2 x a plain cold "
        "start of that smaller rung + 0.5 s.",
        "",
        f"### Step-down vs cold start ({started:%Y-%m-%d %H:%M} UTC, {len(downs)} runs each)",
        "",
        *machine_lines(started),
        "",
        *summary_table(results),
        "",
        *target_lines(results),
        "",
        *failure_lines(results),
        "Step-down runs, in ms; columns 1-6 add up to the total. Docker's events (`die`, "
        "`stop`), the server's own log clock placed on the host clock by Docker's "
        "timestamps of its lines, the poll's answer times:",
        "",
        *step_rows(downs),
        "",
        "Cold starts on Docker's default bridge (the baseline), in ms; columns 1-3 add up to "
        "the total:",
        "",
        *cold_rows(colds),
        "",
        "Cold starts on a fresh user-defined network, in ms:",
        "",
        *cold_rows(results.colds_own_network),
        "",
        "A cold start ran `docker run -d --publish 127.0.0.1:PORT:8080 "
        + " ".join(shorten(a) for a in argv)
        + "` (MODELS: the models' folder; HANDOFF: a folder whose `model` file names "
        "/models/small.gguf): the generated compose.yml's entrypoint, command, environment "
        "and volumes, without the address-space override, which only the big rung needs.",
    ]
    return "\n".join(lines) + "\n"


def shorten(arg: str) -> str:
    """An argument for the report: temp folders named by their role, shell-quoted."""
    arg = re.sub(r"/[^\s:]*/models(?=:)", "MODELS", arg)
    arg = re.sub(r"/[^\s:]*/cold-\d+(?=:)", "HANDOFF", arg)
    return arg if re.fullmatch(r"[\w./:=,+-]+", arg) else "'" + arg.replace("'", "'\\''") + "'"


# --- main --------------------------------------------------------------------------------


@contextlib.contextmanager
def workspace(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    folder = Path(tempfile.mkdtemp(prefix="fleetd-stepdown-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def prepare(work: Path) -> tuple[Path, dict[str, Any]]:
    """The models, and the service of a generated project (what a cold start runs)."""
    run(["bash", ROOT / "scripts" / "build-test-images.sh", "llamacpp"], timeout_s=900)
    run(["bash", ROOT / "scripts" / "ensure-compose.sh"], timeout_s=900)
    models = work / "models"
    models.mkdir()
    write_gguf(models / "big.gguf", BIG)
    write_gguf(models / "small.gguf", SMALL)
    generated = work / "generated"
    generated.mkdir()
    config = fleet_config(generated, models, "fleetd-bench-cold", free_port())
    return models, generate(config, generated)


@dataclass
class Results:
    downs: list[StepDown]
    colds: list[ColdStart]  # on Docker's default bridge: the target's baseline
    colds_own_network: list[ColdStart]
    failed: list[str]  # the evidence of each run whose small rung failed too
    cold_argv: list[str]


def measure(runs: int, work: Path) -> Results:
    """`runs` step-downs, each followed by a cold start; a run whose small rung fails too
    is counted and tried again (up to `runs` more tries)."""
    models, service = prepare(work)
    run_id = uuid.uuid4().hex[:8]
    results = Results([], [], [], [], cold_argv(service, models, work / "cold-1"))
    tries = 0
    try:
        while len(results.downs) < runs and tries < 2 * runs:
            tries += 1
            try:
                results.downs.append(step_down_run(tries, work, models))
            except SmallRungFailed as e:
                results.failed.append(str(e))
                log(f"step-down try {tries}: the small rung failed too ({e})")
                continue
            log(f"step-down {len(results.downs)}/{runs}: {results.downs[-1].total_s:.2f} s")
            cold = cold_run(f"{tries}", work, models, service, run_id, own_network=False)
            results.colds.append(cold)
            own = cold_run(f"{tries}-net", work, models, service, run_id, own_network=True)
            results.colds_own_network.append(own)
            log(f"cold starts {tries}: {cold.total_s:.2f} s; own network {own.total_s:.2f} s")
    finally:
        remove_leftovers(run_id)
    if not results.downs:
        raise RuntimeError(f"no step-down completed in {tries} tries: {results.failed}")
    return results


def remove_leftovers(run_id: str) -> None:
    """Cold-start containers and networks a failure left behind (labelled with this run)."""
    where = ["--filter", f"label={LABEL}={run_id}"]
    containers = run(["docker", "ps", "-aq", *where]).split()
    if containers:
        subprocess.run(["docker", "rm", "-f", *containers], capture_output=True, check=False)
    networks = run(["docker", "network", "ls", "-q", *where]).split()
    if networks:
        subprocess.run(["docker", "network", "rm", *networks], capture_output=True, check=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="step-downs and cold starts each")
    parser.add_argument("--keep", type=Path, help="keep configs, state and logs in this folder")
    parser.add_argument("--out", type=Path, default=Path("/tmp/stepdown-section.md"))
    parser.add_argument("--append", type=Path, help="also append the section to this file")
    args = parser.parse_args(argv)
    started = datetime.now(UTC)
    with workspace(args.keep) as work:
        results = measure(args.runs, work)
    text = section(results, started)
    print(text)
    args.out.write_text(text)
    if args.append is not None:
        with args.append.open("a") as f:
            f.write("\n" + text)
    return 0 if target_met(results.downs, results.colds) else 1


if __name__ == "__main__":
    raise SystemExit(main())
