"""Docker edges for watching: one thread per followed log, one for the event stream.

Threads only read Docker and put plain records on the daemon's queue; every decision is
made by the daemon's main loop. A follower re-reads from its cursor (`since`) and drops
lines at or before it, so across restarts of a container or of fleetd no line is read
twice and none is missed.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loguru import logger

from supervisor.core.step import ContainerEvent
from supervisor.edges import engine, services
from supervisor.edges.engine import DockerError, split_stamped

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
    follower: int = 0  # id() of the follower that ended (a new one may follow the same run)


@dataclass(frozen=True)
class NodeBack:
    """`mode: swarm`: a node the manager had lost is ready again. A service log stream
    opened before stops delivering that node's lines: its followers must be reopened."""

    node_id: str
    name: str


@dataclass(frozen=True)
class EventsEnded:
    error: str


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
            self._stream = self._open(since)
            self._pump(self._stream)
        except DockerError as e:
            if not self._stopped.is_set():
                logger.warning(f"log of {self.container} ended: {e}")
        finally:
            self._out.put(FollowerEnded(self.container, self.container_id, id(self)))

    def _open(self, since_s: float) -> engine.Stream:
        return engine.log_stream(self.client, self.container_id, since_s)

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


class ServiceLogFollower(LogFollower):
    """`mode: swarm`: follows a Swarm service's log, every task's, on every node, through
    the manager, across task replacements. `container` is the fleet's name for it; each
    matched line carries the task that printed it as `container_id`, and that task's
    creation as `run_ns` (a task is one run: Swarm replaces it, never restarts it)."""

    def __init__(
        self,
        client: docker.DockerClient,
        name: str,
        service: str,
        since_ns: int,
        out: queue.Queue[object],
        classify: Callable[[str], Any] = lambda line: line,
    ) -> None:
        super().__init__(client, name, "", since_ns, out, 0, classify)
        self.service = service
        self._runs: dict[str, int] = {}  # task id -> created, for the tasks that matched

    def _open(self, since_s: float) -> engine.Stream:
        return services.service_log_stream(self.client, self.service, since_s)

    def _emit(self, raw: bytes) -> None:
        record = services.parse_log_line(raw.decode("utf-8", errors="replace").rstrip("\r"))
        if record is None or record.time_ns <= self._floor_ns:
            return
        self.since_ns = max(self.since_ns, record.time_ns)
        self.lines += 1
        self.lag_s = time.time() - record.time_ns / 1e9
        match = self._classify(record.text)
        if match is not None:
            run_ns = self._run_of(record.task_id)
            line = LogLine(
                self.container, record.task_id, record.time_ns, record.text, run_ns, match
            )
            self._out.put(line)

    def _run_of(self, task_id: str) -> int:
        if task_id not in self._runs:
            try:
                self._runs[task_id] = services.inspect_task(
                    self.client, self.service, task_id
                ).created_ns
            except DockerError:
                return 0  # unknown: the step compares the line's own time
        return self._runs[task_id]


# `mode: swarm`: how often the tasks are read when no event says they changed.
TASK_POLL_S = 2.0


class SwarmWatcher(_StreamThread):
    """`mode: swarm`: the manager's service and node events wake a reader of the fleet's
    tasks (read every TASK_POLL_S anyway: tasks have no events of their own); a task that
    starts running or ends becomes a ContainerEvent of the fleet's name for its service
    (`start`, `die` with its exit code), and each service's current task is reported for
    status. Ends with EventsEnded when the event stream does."""

    def __init__(
        self,
        client: docker.DockerClient,
        since_s: float,
        out: queue.Queue[object],
        watched: Callable[[], dict[str, str]],  # fleet name -> Swarm service name
        report: Callable[[dict[str, dict[str, Any] | None]], object],
    ) -> None:
        super().__init__(name="swarm-events")
        self.client, self.since_s, self._out = client, since_s, out
        self._watched, self._report = watched, report
        self._wake = threading.Event()
        self._seen: dict[str, tuple[str, bool]] = {}  # task id -> (state, reported ended)
        self._nodes: dict[str, str] = {}
        self._started_ns = int(since_s * 1e9)
        self._poller = threading.Thread(target=self._poll_loop, name="swarm-tasks", daemon=True)

    def run(self) -> None:
        self._poller.start()
        error = "stopped"
        try:
            self._stream = services.events(self.client, self.since_s)
            for event in self._stream:
                self._wake.set()
                self._node_event(event)
        except DockerError as e:
            error = str(e)
        stopped = self._stopped.is_set()
        self._stopped.set()  # the task reader ends with the stream
        self._wake.set()
        if not stopped:
            self._out.put(EventsEnded(error))

    def stop(self) -> None:
        super().stop()
        self._wake.set()

    def _node_event(self, event: dict[str, Any]) -> None:
        """A node back to `ready` from another state (down, disconnected) is a NodeBack."""
        if event.get("Type") != "node":
            return
        actor = event.get("Actor") or {}
        attrs = actor.get("Attributes") or {}
        old = attrs.get("state.old")
        if attrs.get("state.new") == "ready" and old not in (None, "ready", "unknown"):
            self._out.put(NodeBack(str(actor.get("ID", "")), str(attrs.get("name", ""))))

    def _poll_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                self.poll()
            except DockerError as e:
                logger.warning(f"cannot read the swarm's tasks: {e}")
            self._wake.wait(TASK_POLL_S)
            self._wake.clear()

    def poll(self) -> None:
        """Read every watched service's tasks once; queue what changed."""
        current: dict[str, dict[str, Any] | None] = {}
        for name, service in self._watched().items():
            try:
                found = services.tasks(self.client, service)
            except services.NoSuchService:
                current[name] = None
                continue
            for task in found:
                self._emit(name, task)
            running = [t for t in found if t.running]
            current[name] = self._task_json(running[-1]) if running else None
        self._report(current)

    def _emit(self, name: str, task: services.Task) -> None:
        before = self._seen.get(task.id)
        if task.ended:
            if before is not None and before[1]:
                return
            self._seen[task.id] = (task.state, True)
            # A task that ended before fleetd watched is history, not an event; one Swarm
            # shut down (an update, a scale, a drained node: state `shutdown`) did not exit
            # by itself; one that never ran has no exit code.
            exited = task.state in ("failed", "complete") and task.exit_code is not None
            if task.changed_ns < self._started_ns or not exited:
                return
            said = (f"swarm: {task.error}",) if task.error else ()
            self._out.put(
                ContainerEvent(name, task.id, "die", task.changed_ns, task.exit_code, said)
            )
        elif task.running and (before is None or before[0] != "running"):
            self._seen[task.id] = (task.state, False)
            self._out.put(ContainerEvent(name, task.id, "start", task.created_ns))
        elif before is None:
            self._seen[task.id] = (task.state, False)

    def _task_json(self, task: services.Task) -> dict[str, Any]:
        if task.node_id not in self._nodes:
            with contextlib.suppress(DockerError):  # a name is a nicety: the ID shows
                self._nodes.update(services.node_names(self.client))
        return {
            "id": task.id,
            "node_id": task.node_id,
            "node": self._nodes.get(task.node_id, task.node_id[:12]),
            "state": task.state,
            "since": task.changed_ns / 1e9,
        }


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
