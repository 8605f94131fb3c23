"""Which host processes belong to the fleet's own containers (their VRAM is not "unmanaged")."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from supervisor.core.config import FleetConfig
from supervisor.edges import engine
from supervisor.edges.engine import DockerError, EngineNotAnswering


def container_names(config: FleetConfig) -> set[str]:
    return {c for svc in config.services.values() for c in (*svc.containers, *svc.watched)}


def managed_pids(client: Any, names: Iterable[str]) -> frozenset[int]:
    """Host PIDs of the running containers among `names`; one that is missing or refused
    is skipped, an engine that does not answer raises EngineNotAnswering at once (not after
    one timeout per name)."""
    pids: set[int] = set()
    for name in names:
        try:
            pids.update(engine.host_pids(client, name))
        except EngineNotAnswering:
            raise
        except DockerError:
            continue
    return frozenset(pids)


def managed_pids_if_reachable(config: FleetConfig) -> tuple[frozenset[int], str | None]:
    """The fleet's PIDs when Docker answers, else none and why (planning still works)."""
    try:
        client = engine.from_env(timeout_s=5)
        try:
            return managed_pids(client, container_names(config)), None
        finally:
            client.close()
    except DockerError as e:
        return frozenset(), f"{e}; all GPU processes count as unmanaged"
