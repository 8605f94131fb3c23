"""The Docker engine: fleetd's edge to it, where docker-py's errors become fleetd's.

Every call fleetd makes to the engine goes through a function here (or, for the env
strategy's container swap, through `recreate.py`, which uses `translated` too), so the
SDK's exceptions (docker-py's, requests', a broken socket's OSError) are translated once,
into `DockerError` with what was being done, chained with `from`. Callers decide by type:
`NoSuchContainer` for a container that does not exist, `EngineNotAnswering` for an engine
out of reach or out of time, `DockerError` for the rest.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import docker
import docker.errors
import requests.exceptions

from supervisor.core.errors import FleetdError

# What a failing engine raises out of docker-py (HTTP errors, a broken socket).
SDK_ERRORS = (docker.errors.DockerException, requests.exceptions.RequestException, OSError)


class DockerError(FleetdError):
    """The Docker engine refused a call or did not answer."""


class NoSuchContainer(DockerError):
    """The container named does not exist."""


class EngineNotAnswering(DockerError):
    """The engine could not be reached, or did not answer in time (not a refusal)."""


@contextmanager
def translated(
    what: str,
    error: type[DockerError] = DockerError,
    missing: type[DockerError] = NoSuchContainer,
) -> Iterator[None]:
    """Docker calls inside raise `error` (`missing` for a 404, EngineNotAnswering for an
    engine out of reach when `error` is the default) saying `what` failed."""
    try:
        yield
    except docker.errors.NotFound as e:
        raise missing(f"{what}: {_explain(e)}") from e
    except docker.errors.APIError as e:  # an answer: a refusal (an HTTPError, an OSError)
        raise error(f"{what}: {_explain(e)}") from e
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
        unreached = EngineNotAnswering if error is DockerError else error
        raise unreached(f"{what}: {_explain(e)}") from e
    except SDK_ERRORS as e:
        raise error(f"{what}: {_explain(e)}") from e


def _explain(e: BaseException) -> str:
    return str(getattr(e, "explanation", None) or e)


def connect(factory: Callable[[], docker.DockerClient]) -> docker.DockerClient:
    """A client whose engine answers a ping."""
    with translated("Docker is not reachable"):
        client = factory()
        client.ping()
    return client


# Every call of fleetd's own clients gives up after this long (docker-py's default is
# 60 s); a stop or restart adds its stop timeout to it, and streams have none.
CALL_TIMEOUT_S = 10


def client_from_env() -> docker.DockerClient:
    """A client of DOCKER_HOST (or the local socket) whose calls time out; not pinged."""
    return docker.from_env(timeout=CALL_TIMEOUT_S)


def from_env(timeout_s: int | None = None) -> docker.DockerClient:
    """The engine of DOCKER_HOST (or the local socket), pinged."""
    kwargs = {} if timeout_s is None else {"timeout": timeout_s}
    return connect(lambda: docker.from_env(**kwargs))


def ping(client: docker.DockerClient) -> None:
    """Raises EngineNotAnswering unless the engine answers within the client's timeout."""
    with translated("Docker is not answering"):
        client.ping()


def container_state(client: docker.DockerClient, name: str) -> tuple[str, bool] | None:
    """(id, running) of the container named `name`, or None when there is none."""
    try:
        with translated(f"cannot inspect container {name}"):
            container = client.containers.get(name)
    except NoSuchContainer:
        return None
    return str(container.id), container.status == "running"


def current_run(client: docker.DockerClient, name: str) -> tuple[str, str] | None:
    """(id, State.StartedAt) of the container named `name` while it runs, else None."""
    try:
        with translated(f"cannot inspect container {name}"):
            container = client.containers.get(name)
    except NoSuchContainer:
        return None
    if container.status != "running":
        return None
    return str(container.id), str(container.attrs["State"]["StartedAt"])


def started_ns(client: docker.DockerClient, name: str) -> str:
    """The container's State.StartedAt as Docker writes it."""
    with translated(f"cannot inspect container {name}"):
        return str(client.containers.get(name).attrs["State"]["StartedAt"])


def run_log(client: docker.DockerClient, name: str, limit: int = 20_000) -> list[str]:
    """The lines the container's current run printed (stdout and stderr), oldest first;
    at most the first `limit` (a start-up report sits at the top)."""
    with translated(f"cannot read the log of container {name}"):
        container = client.containers.get(name)
        stamp = str(container.attrs["State"]["StartedAt"])
        base, _, frac = stamp.rstrip("Z").partition(".")
        started = datetime.fromisoformat(base + "+00:00").timestamp() + float(f"0.{frac or 0}")
        raw: bytes = container.logs(stdout=True, stderr=True, since=max(started, 1.0))
    return raw.decode("utf-8", "replace").splitlines()[:limit]


def last_lines(client: docker.DockerClient, container_id: str, count: int) -> list[str]:
    """The last `count` lines the container printed (stdout and stderr), oldest first."""
    with translated(f"cannot read the log of container {container_id[:12]}"):
        raw: bytes = client.api.logs(container_id, stdout=True, stderr=True, tail=count)
    return raw.decode("utf-8", "replace").splitlines()[-count:]


def restart(client: docker.DockerClient, name: str, timeout_s: int) -> None:
    with translated(f"cannot restart container {name}"):
        client.containers.get(name).restart(timeout=timeout_s)


def stop(client: docker.DockerClient, name: str, timeout_s: int) -> None:
    with translated(f"cannot stop container {name}"):
        client.containers.get(name).stop(timeout=timeout_s)


def host_pids(client: docker.DockerClient, name: str) -> list[int]:
    """Host PIDs of a running container's processes (none when it is not running)."""
    with translated(f"cannot list the processes of container {name}"):
        container = client.containers.get(name)
        if container.status != "running":
            return []
        top: dict[str, Any] = container.top(ps_args="-eo pid")
    titles = top.get("Titles") or []
    column = titles.index("PID") if "PID" in titles else 0
    return [int(row[column]) for row in top.get("Processes") or [] if row]


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


class Stream:
    """A streaming Docker response (a log, the events): iterate it, close it from any thread.

    Errors while it is opened or read leave as DockerError."""

    def __init__(self, what: str, open_stream: Callable[[], Any]) -> None:
        self._what, self._open = what, open_stream
        self._stream: Any = None

    def __iter__(self) -> Iterator[Any]:
        with translated(self._what):
            self._stream = self._open()
            yield from self._stream

    def close(self) -> None:
        stream = self._stream
        if stream is not None:
            stream.close()


def log_stream(client: docker.DockerClient, container_id: str, since_s: float) -> Stream:
    """A container's log from `since_s` on, stamped, followed until the container stops."""
    return Stream(
        f"log of {container_id[:12]}",
        lambda: client.api.logs(
            container_id, stream=True, follow=True, timestamps=True, since=since_s
        ),
    )


def event_stream(client: docker.DockerClient, since_s: float) -> Stream:
    """Container events (decoded dicts) from `since_s` on."""
    return Stream(
        "Docker events",
        lambda: client.events(decode=True, since=since_s, filters={"type": "container"}),
    )
