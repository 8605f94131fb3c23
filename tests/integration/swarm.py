"""A real single-node swarm on the test engine, for the Swarm tests, left as found.

The engine is shared by every test run on the machine (and by several people's runs), so
one lock file serialises the tests that need a swarm: whoever holds it may init the
swarm, deploy stacks and leave; nobody else touches swarm mode meanwhile. A swarm that
was already active when the lock was taken is used and left active; one this module
started is left (`docker swarm leave --force`), with the `docker_gwbridge` network that
swarm mode creates and does not remove.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors

from supervisor.core.nodesetup import NodeGpu

LOCK_PATH = Path(
    os.environ.get("FLEETD_SWARM_LOCK", Path(tempfile.gettempdir()) / "fleetd-swarm.lock")
)
ADVERTISE = "127.0.0.1"
LEFT_BEHIND = ("docker_gwbridge",)  # networks swarm mode creates and `leave` keeps
# The stand-in GPUs the swarm tests describe the test node with, as `node init` would.
GIB = 1024**3
GPUS = (
    NodeGpu(0, "GPU-5a11d0c0-0000-4000-8000-000000000000", "Stand-in GPU", 24 * GIB),
    NodeGpu(1, "GPU-5a11d0c0-0000-4000-8000-000000000001", "Stand-in GPU", 24 * GIB),
)


@dataclass(frozen=True)
class Swarm:
    """The swarm a test runs on: this engine is its only node, a manager."""

    node_id: str
    hostname: str
    started_here: bool  # False: it was active before, and stays so


def _state(client: docker.DockerClient) -> str:
    return str(client.info().get("Swarm", {}).get("LocalNodeState", ""))


@contextmanager
def single_node_swarm(client: docker.DockerClient) -> Iterator[Swarm]:
    """Hold the swarm lock; init a swarm unless one is active; on exit, leave it as found."""
    LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_PATH, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        networks_before = {n.name for n in client.networks.list()}
        started = _state(client) != "active"
        if started:
            client.swarm.init(advertise_addr=ADVERTISE, listen_addr=f"{ADVERTISE}:2377")
        info = client.info()
        node_id = str(info["Swarm"]["NodeID"])
        hostname = str(client.nodes.get(node_id).attrs["Description"]["Hostname"])
        try:
            yield Swarm(node_id=node_id, hostname=hostname, started_here=started)
        finally:
            if started:
                client.swarm.leave(force=True)
                for name in LEFT_BEHIND:
                    if name in networks_before:
                        continue
                    try:
                        client.networks.get(name).remove()
                    except docker.errors.NotFound:
                        pass
                    except docker.errors.APIError:
                        pass  # still in use by a container the engine has not removed yet
