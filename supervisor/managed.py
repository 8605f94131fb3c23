"""Which host processes belong to the fleet's own containers (their VRAM is not "unmanaged")."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import docker
import docker.errors
import requests.exceptions

from supervisor.config import FleetConfig

_DOCKER_ERRORS = (docker.errors.DockerException, requests.exceptions.RequestException, OSError)


def container_names(config: FleetConfig) -> set[str]:
    return {c for svc in config.services.values() for c in (*svc.containers, *svc.watched)}


def managed_pids(client: Any, names: Iterable[str]) -> frozenset[int]:
    """Host PIDs of the running containers among `names`; a missing one is skipped."""
    pids: set[int] = set()
    for name in names:
        try:
            container = client.containers.get(name)
            if container.status != "running":
                continue
            top = container.top(ps_args="-eo pid")
        except _DOCKER_ERRORS:
            continue
        column = top.get("Titles", []).index("PID") if "PID" in top.get("Titles", []) else 0
        pids.update(int(row[column]) for row in top.get("Processes") or [] if row)
    return frozenset(pids)


def managed_pids_if_reachable(config: FleetConfig) -> tuple[frozenset[int], str | None]:
    """The fleet's PIDs when Docker answers, else none and why (planning still works)."""
    try:
        client = docker.from_env(timeout=5)
        client.ping()
    except _DOCKER_ERRORS as e:
        return frozenset(), f"Docker not reachable ({e}); all GPU processes count as unmanaged"
    try:
        return managed_pids(client, container_names(config)), None
    finally:
        client.close()
