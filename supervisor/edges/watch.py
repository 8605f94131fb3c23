"""Docker edges for watching: one thread per followed log, one for the event stream.

Threads only read Docker and put plain records on the daemon's queue; every decision is
made by the daemon's main loop. A follower re-reads from its cursor (`since`) and drops
lines at or before it, so across restarts of a container or of fleetd no line is read
twice and none is missed.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from loguru import logger

from supervisor.core.step import ContainerEvent
from supervisor.edges import engine
from supervisor.edges.engine import DockerError

if TYPE_CHECKING:
    import docker


@dataclass(frozen=True)
class LogLine:
    """A line the follower's classifier matched (the others never leave the thread)."""

    container: str
    container_id: str
    time_ns: int
    text: str
    run_ns: int = 0  # when the container run that printed it started
    match: Any = None  # what the classifier returned for it


@dataclass(frozen=True)
class FollowerEnded:
    container: str
    container_id: str


@dataclass(frozen=True)
class EventsEnded:
    error: str


def parse_docker_time_ns(stamp: str) -> int:
    """`2026-11-23T07:12:01.123456789Z` -> epoch nanoseconds (Docker keeps 9 digits)."""
    base, _, frac = stamp.rstrip("Z").partition(".")
    return _epoch_seconds(base) * 1_000_000_000 + int((frac + "000000000")[:9])


@functools.lru_cache(maxsize=256)
def _epoch_seconds(base: str) -> int:
    # Cached: a busy log repeats the same second thousands of times, and this is the hot path.
    return int(datetime.fromisoformat(base + "+00:00").timestamp())


def split_stamped(raw: str) -> tuple[int, str] | None:
    stamp, _, text = raw.partition(" ")
    try:
        return parse_docker_time_ns(stamp), text
    except ValueError:
        return None


class _StreamThread(threading.Thread):
    """A thread reading one Docker stream; `stop()` closes the stream to wake it up."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._stream: Any = None
        self._stopped = threading.Event()

    def stop(self) -> None:
        self._stopped.set()
        if self._stream is not None:
            self._stream.close()


class LogFollower(_StreamThread):
    """Follows one container's log from `since_ns` until the container stops or `stop()`."""

    def __init__(
        self,
        client: docker.DockerClient,
        name: str,
        container_id: str,
        since_ns: int,
        out: queue.Queue[object],
        run_ns: int = 0,
        classify: Callable[[str], Any] = lambda line: line,
    ) -> None:
        super().__init__(name=f"follow-{name}")
        self.client, self.container, self.container_id = client, name, container_id
        self.since_ns, self._out, self.run_ns = since_ns, out, run_ns
        # What the cursor already covers. Only that is dropped: Docker stamps stdout and
        # stderr lines in separate copiers, so inside one stream a stderr line may follow
        # a stdout line stamped a few microseconds later, and must not be lost for it.
        self._floor_ns = since_ns
        # Classifying here, not in the main loop, keeps one flooding container from
        # delaying the detection of another: only matches are queued.
        self._classify = classify
        self.lines = 0
        self.lag_s: float | None = None  # when the newest line was read minus its timestamp

    def run(self) -> None:
        try:
            # `since` is inclusive and a float loses nanoseconds: start a little early
            # and drop what the cursor already covers.
            since = max(self.since_ns / 1e9 - 0.001, 0.000001)
            self._stream = engine.log_stream(self.client, self.container_id, since)
            self._pump(self._stream)
        except DockerError as e:
            if not self._stopped.is_set():
                logger.warning(f"log of {self.container} ended: {e}")
        finally:
            self._out.put(FollowerEnded(self.container, self.container_id))

    def _pump(self, chunks: Iterable[bytes]) -> None:
        pending = b""
        for chunk in chunks:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                self._emit(raw)
            if self._stopped.is_set():
                return
        if pending:
            self._emit(pending)

    def _emit(self, raw: bytes) -> None:
        parsed = split_stamped(raw.decode("utf-8", errors="replace").rstrip("\r"))
        if parsed is None or parsed[0] <= self._floor_ns:
            return
        self.since_ns = max(self.since_ns, parsed[0])
        self.lines += 1
        self.lag_s = time.time() - parsed[0] / 1e9
        match = self._classify(parsed[1])
        if match is not None:
            self._out.put(
                LogLine(self.container, self.container_id, parsed[0], parsed[1], self.run_ns, match)
            )


class EventWatcher(_StreamThread):
    """Puts container start/die/oom/destroy/health events on the queue until stopped."""

    ACTIONS = frozenset({"start", "die", "oom", "destroy", "kill", "stop"})

    def __init__(self, client: docker.DockerClient, since_s: float, out: queue.Queue[object]):
        super().__init__(name="docker-events")
        self.client, self.since_s, self._out = client, since_s, out

    def run(self) -> None:
        error = "stopped"
        try:
            self._stream = engine.event_stream(self.client, self.since_s)
            for event in self._stream:
                self._emit(event)
        except DockerError as e:
            error = str(e)
        if not self._stopped.is_set():
            self._out.put(EventsEnded(error))

    def _emit(self, event: dict[str, Any]) -> None:
        action = str(event.get("Action") or event.get("status") or "")
        base = action.split(":")[0]
        if base not in self.ACTIONS and not action.startswith("health_status"):
            return
        attrs = event.get("Actor", {}).get("Attributes", {})
        code = attrs.get("exitCode")
        self._out.put(
            ContainerEvent(
                container=str(attrs.get("name", "")),
                container_id=str(event.get("id") or event.get("Actor", {}).get("ID", "")),
                action=action,
                time_ns=int(event.get("timeNano") or 0),
                exit_code=int(code) if code is not None else None,
            )
        )
