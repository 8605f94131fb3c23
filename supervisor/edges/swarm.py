"""A Swarm manager's nodes, read through docker-py for `fleetctl plan|generate --swarm`.

Only a manager answers the node list, so the engine is asked first (`docker info`'s Swarm
section) and one that is not a manager is refused with a line saying what it is. The
node objects go to `supervisor.core.swarm` as the API returns them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from supervisor.core.gpus import Discovery
from supervisor.core.plan import GpuSite
from supervisor.core.swarm import SwarmLayout, layout, read_nodes
from supervisor.edges.engine import DockerError, translated

if TYPE_CHECKING:
    import docker


class NoSwarmManager(DockerError):
    """The engine is not a manager of an active swarm, so it cannot list the nodes."""


def manager_state(info: dict[str, Any]) -> str | None:
    """None when `docker info` says this engine manages an active swarm, else what it is."""
    swarm = info.get("Swarm") or {}
    state = str(swarm.get("LocalNodeState") or "inactive")
    if state == "active" and swarm.get("ControlAvailable"):
        return None
    if state == "active":
        return "Swarm: active, a worker (ControlAvailable: false)"
    error = f", {swarm['Error']}" if swarm.get("Error") else ""
    return f"Swarm: {state}{error}"


def require_manager(client: docker.DockerClient, hint: str) -> None:
    """NoSwarmManager, saying what the engine is and then `hint`, unless it manages an
    active swarm (for `plan --swarm` and for fleetd in `mode: swarm`)."""
    with translated("cannot read docker info"):
        info = client.info()
    refused = manager_state(info)
    if refused is not None:
        raise NoSwarmManager(
            f"this Docker engine is not a Swarm manager (docker info: {refused}); {hint}"
        )


def read_swarm(client: docker.DockerClient) -> SwarmLayout:
    """Every node of the swarm this engine manages, and their GPUs."""
    require_manager(client, "run `fleetctl plan --swarm` on a manager, or point DOCKER_HOST at one")
    with translated("cannot list the swarm's nodes", error=NoSwarmManager):
        objects = [n.attrs for n in client.nodes.list()]
    nodes, notes = read_nodes(objects)
    return layout(nodes, notes)


class SwarmGpus:
    """`mode: swarm`: fleetd's GPU reader on a manager. The swarm's GPUs are those `node
    init` published on every node (read from the manager, not NVML: the manager may have
    none of its own), with their fleet-wide indexes and their nodes (`sites`, for the
    planner); memory in use is not known there."""

    def __init__(self, factory: Callable[[], docker.DockerClient]) -> None:
        self._factory = factory
        self.sites: dict[int, GpuSite] = {}

    def discover(self) -> Discovery:
        try:
            client = self._factory()
            try:
                found = read_swarm(client)
            finally:
                client.close()
        except DockerError as e:
            return Discovery(gpus=(), problem=f"cannot read the swarm's GPUs: {e}")
        self.sites = dict(found.sites)
        return found.discovery

    def shutdown(self) -> None:
        return None
