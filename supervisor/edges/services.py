"""Docker Swarm services: fleetd's edge to a manager's services, tasks and their logs.

In `mode: swarm` a fleet service is a Swarm service (`STACK_name`) whose tasks Swarm
places on its nodes; a task runs one container, and a task that ends is replaced by a new
one. fleetd reads all of it from the manager's API, so the tasks may run on any node:
- a service's tasks and their states (`tasks`), the one running now (`current_task`);
- its log across all of its tasks, each line stamped and tagged with its task
  (`service_log_stream`, `GET /services/{id}/logs` with `details`), followed across task
  replacements;
- a change of rung as a service update (`update_env`): the new variables in the task
  template, rolled out by Swarm with the service's own update policy (stop-first or
  start-first), then `wait_rolled` until a task of the new spec has started;
- `scale`, to stop a service at the bottom of its ladder (replicas 0).
Every call goes through `engine.translated`, so docker-py's errors become DockerError once.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from supervisor.edges.engine import (
    DockerError,
    Stream,
    parse_docker_time_ns,
    split_stamped,
    translated,
)

if TYPE_CHECKING:
    import docker


@dataclass(frozen=True)
class Task:
    """One task of a service, as the manager reports it."""

    id: str
    service: str  # the Swarm service's name
    node_id: str
    state: str  # Status.State: new ... running, complete, failed, shutdown, rejected
    desired: str  # DesiredState
    created_ns: int  # CreatedAt: fleetd's "run" of a task starts here
    changed_ns: int  # Status.Timestamp: when it reached `state`
    exit_code: int | None
    error: str  # Status.Err (why it failed or was rejected), "" when none
    env: tuple[str, ...]  # the task's ContainerSpec.Env

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def ended(self) -> bool:
        return self.state in ENDED


# Task states after which a task never runs again (swarmkit's api.TaskState).
ENDED = frozenset({"complete", "failed", "shutdown", "rejected", "orphaned", "remove"})


def parse_time_ns(stamp: str) -> int:
    """`2026-12-04T13:51:36.057544087Z` (Swarm writes 0 to 9 fraction digits) -> ns."""
    return parse_docker_time_ns(stamp) if stamp else 0


def task_of(raw: Mapping[str, Any], service: str) -> Task:
    status = raw.get("Status") or {}
    container = status.get("ContainerStatus") or {}
    code = container.get("ExitCode")
    spec = (raw.get("Spec") or {}).get("ContainerSpec") or {}
    return Task(
        id=str(raw.get("ID", "")),
        service=service,
        node_id=str(raw.get("NodeID", "")),
        state=str(status.get("State", "")),
        desired=str(raw.get("DesiredState", "")),
        created_ns=parse_time_ns(str(raw.get("CreatedAt", ""))),
        changed_ns=parse_time_ns(str(status.get("Timestamp", ""))),
        exit_code=int(code) if code is not None and status.get("State") in ENDED else None,
        error=str(status.get("Err", "")),
        env=tuple(str(e) for e in spec.get("Env") or ()),
    )


class NoSuchService(DockerError):
    """The service named does not exist (the stack is not deployed, or was removed)."""


def tasks(client: docker.DockerClient, service: str) -> list[Task]:
    """The service's tasks (every node), oldest first; NoSuchService when it is missing."""
    service_id = str(inspect(client, service)["ID"])
    with translated(f"cannot list the tasks of service {service}"):
        raw = client.api.tasks(filters={"service": service_id})
    found = [task_of(t, service) for t in raw if t.get("ServiceID") == service_id]
    return sorted(found, key=lambda t: t.created_ns)


def current_task(client: docker.DockerClient, service: str) -> Task | None:
    """The newest task of the service that runs now, or None (also when it is missing)."""
    try:
        running = [t for t in tasks(client, service) if t.running]
    except NoSuchService:
        return None
    return running[-1] if running else None


def inspect(client: docker.DockerClient, service: str) -> dict[str, Any]:
    with translated(f"cannot inspect service {service}", missing=NoSuchService):
        found: dict[str, Any] = client.api.inspect_service(service)
    return found


def inspect_task(client: docker.DockerClient, service: str, task_id: str) -> Task:
    with translated(f"cannot inspect task {task_id[:12]} of service {service}"):
        raw = client.api.inspect_task(task_id)
    return task_of(raw, service)


def node_names(client: docker.DockerClient) -> dict[str, str]:
    """Node ID -> hostname, for every node of the swarm."""
    with translated("cannot list the swarm's nodes"):
        nodes = client.api.nodes()
    return {
        str(n.get("ID", "")): str((n.get("Description") or {}).get("Hostname", "")) for n in nodes
    }


@dataclass(frozen=True)
class LogRecord:
    """One line of a service's log: when, which task printed it, and the text."""

    time_ns: int
    task_id: str
    node_id: str
    text: str


def parse_log_line(raw: str) -> LogRecord | None:
    """`STAMP com.docker.swarm.node.id=N,com.docker.swarm.service.id=S,
    com.docker.swarm.task.id=T TEXT` (timestamps and details on) -> a record."""
    stamped = split_stamped(raw)
    if stamped is None:
        return None
    time_ns, rest = stamped
    details, _, text = rest.partition(" ")
    tags = dict(item.partition("=")[::2] for item in details.split(",") if "=" in item)
    task = tags.get("com.docker.swarm.task.id")
    if task is None:
        return None
    return LogRecord(time_ns, task, tags.get("com.docker.swarm.node.id", ""), text)


def service_log_stream(client: docker.DockerClient, service: str, since_s: float) -> Stream:
    """The service's log, every task's, from `since_s` on, stamped and tagged, followed
    across task replacements until the service is removed or the stream is closed."""
    return Stream(f"log of service {service}", lambda: _open_log(client, service, since_s))


def _open_log(client: docker.DockerClient, service: str, since_s: float) -> Any:
    """`GET /services/{id}/logs` as a stream another thread can close. docker-py's own
    `service_logs` returns a bare generator, which cannot be closed while a thread reads
    it (its container logs come as a CancellableStream that holds the response; this does
    the same for a service, through the client's request helpers)."""
    from docker.types.daemon import CancellableStream

    api = client.api
    tty = inspect(client, service)["Spec"]["TaskTemplate"]["ContainerSpec"].get("TTY", False)
    params = {
        "details": True,
        "follow": True,
        "stdout": True,
        "stderr": True,
        "since": since_s,
        "timestamps": True,
        "tail": "all",
    }
    response = api._get(api._url("/services/{0}/logs", service), params=params, stream=True)
    api._raise_for_status(response)
    return CancellableStream(api._get_result_tty(True, response, tty), response)


def last_lines(client: docker.DockerClient, service: str, task_id: str, count: int) -> list[str]:
    """The last `count` lines a task printed (the log API keeps a stopped task's log)."""
    with translated(f"cannot read the log of service {service}"):
        raw = client.api.service_logs(
            service, stdout=True, stderr=True, timestamps=True, details=True, tail=count
        )
        chunks = b"".join(raw) if not isinstance(raw, bytes) else raw
    lines = []
    for line in chunks.decode("utf-8", "replace").splitlines():
        record = parse_log_line(line)
        if record is not None and record.task_id == task_id:
            lines.append(record.text)
    return lines[-count:]


def set_env(env: list[str], changes: Mapping[str, str | None]) -> list[str]:
    """`env` with each of `changes` set (None: removed), the others kept in order."""
    kept = [e for e in env if e.partition("=")[0] not in changes]
    return kept + [f"{k}={v}" for k, v in changes.items() if v is not None]


def env_matches(env: tuple[str, ...] | list[str], changes: Mapping[str, str | None]) -> bool:
    values = dict(e.partition("=")[::2] for e in env)
    return all(values.get(k) == v if v is not None else k not in values for k, v in changes.items())


def _update_spec(
    client: docker.DockerClient, service: str, what: str, edit: Callable[[dict[str, Any]], None]
) -> None:
    """Update the service with its current spec as `edit` changes it (a copy), at the
    version read, so a concurrent update is refused rather than overwritten."""
    current = inspect(client, service)
    spec = copy.deepcopy(current["Spec"])
    edit(spec)
    template = spec["TaskTemplate"]
    with translated(f"cannot {what} service {service}"):
        client.api.update_service(
            current["ID"],
            int(current["Version"]["Index"]),
            task_template=template,
            name=spec.get("Name"),
            labels=spec.get("Labels"),
            mode=spec.get("Mode"),
            update_config=spec.get("UpdateConfig"),
            rollback_config=spec.get("RollbackConfig"),
            networks=template.get("Networks") or spec.get("Networks"),
            endpoint_spec=spec.get("EndpointSpec"),
            fetch_current_spec=False,
        )


def update_env(
    client: docker.DockerClient, service: str, changes: Mapping[str, str | None]
) -> None:
    """Update the service's task template with the variables `changes` sets (None:
    removes); Swarm replaces its tasks with its own update policy. Returns when Swarm
    has taken the update; `wait_rolled` waits for the tasks."""

    def edit(spec: dict[str, Any]) -> None:
        template = spec["TaskTemplate"]
        container = template.setdefault("ContainerSpec", {})
        container["Env"] = set_env(list(container.get("Env") or []), changes)
        # A forced update rolls the tasks even when the variables already hold these
        # values (a rung handed off twice must still restart the service on it).
        template["ForceUpdate"] = int(template.get("ForceUpdate") or 0) + 1

    _update_spec(client, service, "update", edit)


def wait_rolled(
    client: docker.DockerClient,
    service: str,
    changes: Mapping[str, str | None],
    timeout_s: float,
    after_ns: int,
    sleep: Callable[[float], None] = time.sleep,
) -> Task:
    """Wait until a task created after `after_ns` with the new variables has started: it
    runs, or it ran and exited (a rung that runs out of memory at once is the ladder's to
    judge, from its log, not a failed update). DockerError when Swarm rolled the update
    back or paused it before any such task started, or none started within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        for task in reversed(tasks(client, service)):
            started = task.running or (task.ended and task.exit_code is not None)
            if task.created_ns >= after_ns and started and env_matches(task.env, changes):
                return task
        status = inspect(client, service).get("UpdateStatus") or {}
        if str(status.get("State", "")).startswith(("rollback", "paused")):
            raise DockerError(
                f"service {service}: the update did not roll out: {status.get('State')}: "
                f"{status.get('Message', '')}"
            )
        if time.monotonic() > deadline:
            raise DockerError(
                f"service {service}: no task of the new rung runs after {timeout_s:.0f} s "
                f"(update {status.get('State', 'unknown')}: {status.get('Message', '')})"
            )
        sleep(0.5)


def scale(client: docker.DockerClient, service: str, replicas: int) -> None:
    """Set a replicated service's replica count (0 stops all of its tasks)."""

    def edit(spec: dict[str, Any]) -> None:
        mode = spec.get("Mode") or {}
        if "Replicated" not in mode:
            raise DockerError(f"service {service} is not replicated (mode {mode}); cannot stop it")
        mode["Replicated"] = {"Replicas": replicas}

    _update_spec(client, service, "scale", edit)


def events(client: docker.DockerClient, since_s: float) -> Stream:
    """The swarm's service and node events from `since_s` on (decoded dicts): a service
    updated, a node's tasks changed state. Tasks themselves have no events: read them."""
    return Stream(
        "Swarm events",
        lambda: client.events(decode=True, since=since_s, filters={"type": ["service", "node"]}),
    )
