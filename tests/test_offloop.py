"""The daemon's lanes and bounded calls: blocking reads kept off the main loop."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import docker
import docker.errors

from supervisor.core.gpus import Discovery, Gpu
from supervisor.daemon import GPU_FRESH_S, Daemon
from supervisor.daemon.offloop import Bounded, Lane
from supervisor.edges.watch import LogLine


def _take(out: queue.Queue[object], count: int) -> list[object]:
    return [out.get(timeout=5) for _ in range(count)]


def test_a_lane_hands_back_each_jobs_records_in_the_order_the_jobs_came() -> None:
    out: queue.Queue[object] = queue.Queue()
    lane = Lane("test", out)
    for i in range(20):
        lane.submit(lambda i=i: [f"read {i}", f"then {i}"])
    expected = [f"{what} {i}" for i in range(20) for what in ("read", "then")]
    assert _take(out, 40) == expected


def test_a_keyed_job_asked_again_while_it_runs_runs_once_more_with_the_latest_ask() -> None:
    out: queue.Queue[object] = queue.Queue()
    lane = Lane("test", out)
    release = threading.Event()

    def slow() -> list[object]:
        release.wait(5)
        return ["first"]

    lane.submit(slow, key="connect")
    for i in range(10):  # a reconcile tick every few seconds while the engine hangs
        lane.submit(lambda i=i: [f"again {i}"], key="connect")
    release.set()
    assert _take(out, 2) == ["first", "again 9"]
    time.sleep(0.2)
    assert out.empty()


def test_a_job_that_raises_is_reported_and_the_lane_goes_on() -> None:
    out: queue.Queue[object] = queue.Queue()
    lane = Lane("test", out)

    def broken() -> list[object]:
        raise RuntimeError("a bug")

    lane.submit(broken, key="k")
    lane.submit(lambda: ["after"], key="k")
    lane.submit(lambda: ["unkeyed"])
    assert sorted(str(r) for r in _take(out, 2)) == ["after", "unkeyed"]


def test_a_bounded_call_returns_its_value_or_its_error() -> None:
    bounded: Bounded[int] = Bounded("test", 5.0)
    assert bounded(lambda: 42) == (True, 42, None)
    error = ValueError("refused")

    def refuse() -> int:
        raise error

    assert bounded(refuse) == (True, None, error)


def test_a_hung_call_is_left_behind_and_no_second_one_starts_beside_it() -> None:
    bounded: Bounded[str] = Bounded("test", 0.1)
    release = threading.Event()
    started = []

    def hang() -> str:
        started.append(1)
        release.wait(5)
        return "late"

    assert bounded(hang) == (False, None, None)
    assert bounded(hang) == (False, None, None)  # the first still hangs: none started
    assert len(started) == 1
    release.set()
    time.sleep(0.2)
    assert bounded(lambda: "again") == (True, "again", None)


# --- the daemon's loop with a hung NVML --------------------------------------------------

GIB = 1024**3
FLEET = """\
policy: {incidents_to_step_down: 3, incident_window: 10m}
services:
  coder:
    runtime: llamacpp
    containers: [coder-1]
    ladder:
      - {model: big, vram: 4GiB}
      - {model: small, vram: 1GiB}
"""


class HangingNvml:
    """NVML that answers until `hang` is set, then blocks until `release` is."""

    def __init__(self) -> None:
        self.hang, self.release = threading.Event(), threading.Event()

    def discover(self) -> Discovery:
        if self.hang.is_set():
            self.release.wait(60)
        gpu = Gpu(0, "fake", 8 * GIB, "nvml", used_bytes=GIB, free_bytes=7 * GIB)
        return Discovery(gpus=(gpu,))

    def shutdown(self) -> None:
        pass


def _no_docker() -> docker.DockerClient:
    raise docker.errors.DockerException("no Docker in this test")


def test_a_hung_nvml_delays_a_decision_by_its_bound_and_blocks_nothing(tmp_path: Path) -> None:
    (tmp_path / "fleet.yaml").write_text(FLEET)
    nvml = HangingNvml()
    daemon = Daemon(
        tmp_path / "fleet.yaml",
        tmp_path / "state",
        docker_factory=_no_docker,
        nvml=nvml,
        serve_metrics=False,
    )
    daemon.start()
    nvml.hang.set()
    time.sleep(GPU_FRESH_S + 0.1)  # the reading taken at start is stale: decisions read again
    text = "CUDA error: out of memory"
    match = daemon.detectors["coder"].classify(text)
    assert match is not None
    try:
        for i in range(3):  # three incidents, bursts apart: a step down
            stamp = time.time_ns() + i * 3_000_000_000
            daemon.queue.put(LogLine("coder-1", "c1", stamp, text, 1, match))
        loop = threading.Thread(target=daemon.drain)
        loop.start()
        loop.join(15)

        assert not loop.is_alive(), "the loop waited for NVML"
        assert not nvml.release.is_set()
        svc = daemon.state.services["coder"]
        assert len(svc.incidents) == 3
        assert svc.pending is not None and svc.pending.to_rung == 1  # decided, on the last reading
    finally:
        nvml.release.set()
        daemon.shutdown()
