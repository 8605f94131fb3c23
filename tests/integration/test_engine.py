"""The real engine honours the model hand-off contract of ARCHITECTURE.md (file strategy).

fleetd writes the model name to ``<state-dir>/services/<service>/model``; the container
mounts that *directory* read-only at /run/fleetd and reads the file when it starts. A
step-down rewrites the file atomically (a new inode) and restarts the container, which
must then see the new name and keep its ID.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import docker
from docker.models.containers import Container

if TYPE_CHECKING:
    from .conftest import Cleanup

WAIT_S = 30


def write_atomically(path: Path, text: str) -> None:
    """Write a temp file in the same directory and rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def run_to_exit(container: Container) -> list[str]:
    """Wait for the container's command to end and return its log lines (all its runs)."""
    result = container.wait(timeout=WAIT_S)
    assert result["StatusCode"] == 0, result
    logs: bytes = container.logs()
    return logs.decode().splitlines()


def test_model_file_handoff_survives_atomic_rewrite_and_restart(
    docker_client: docker.DockerClient,
    busybox_image: str,
    cleanup: Cleanup,
    tmp_path: Path,
) -> None:
    handoff_dir = tmp_path / "services" / "alpha"
    handoff_dir.mkdir(parents=True)
    model_file = handoff_dir / "model"
    write_atomically(model_file, "llama3.2:3b\n")

    container = docker_client.containers.run(
        busybox_image,
        ["sh", "-c", "echo hello; cat /run/fleetd/model"],
        detach=True,
        labels=cleanup.labels,
        volumes={str(handoff_dir): {"bind": "/run/fleetd", "mode": "ro"}},
    )
    assert run_to_exit(container) == ["hello", "llama3.2:3b"]
    first_id = container.id

    old_inode = model_file.stat().st_ino
    write_atomically(model_file, "qwen2.5:0.5b\n")
    assert model_file.stat().st_ino != old_inode  # a rename, as fleetd does it

    container.restart(timeout=5)
    assert run_to_exit(container)[-2:] == ["hello", "qwen2.5:0.5b"]
    container.reload()
    assert container.id == first_id
