"""The fleet's own container processes are not "unmanaged" VRAM when planning."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import docker

from supervisor.analyzer import analyze
from supervisor.core.config import load_config
from supervisor.core.gpus import Discovery, Gpu, GpuProcess
from supervisor.edges.managed import container_names, managed_pids

GIB = 1024**3


def test_running_fleet_containers_count_as_managed(
    tmp_path: Path, docker_client: docker.DockerClient, busybox_image: str, cleanup: Any
) -> None:
    name = f"alpha-{uuid.uuid4().hex[:8]}"
    container = docker_client.containers.run(
        busybox_image,
        ["sh", "-c", "trap 'exit 0' TERM; sleep 600 & wait $!"],
        name=name,
        detach=True,
        labels=cleanup.labels,
    )
    container.reload()
    ours = container.attrs["State"]["Pid"]
    config_path = tmp_path / "fleet.yaml"
    config_path.write_text(
        f"services:\n  alpha:\n    runtime: ollama\n    containers: [{name}, not-created-yet]\n"
        "    ladder: [{model: big, vram: 8GiB}, {model: small, vram: 1GiB}]\n"
    )
    config = load_config(config_path)

    pids = managed_pids(docker_client, container_names(config))

    assert ours in pids
    # On a 12 GiB GPU where our container holds 8 GiB and a stranger 1 GiB, only the
    # stranger's memory comes off the budget: the fleet keeps its top rung.
    gpu = Gpu(
        index=0,
        name="test",
        total_bytes=12 * GIB,
        source="nvml",
        used_bytes=9 * GIB,
        processes=(GpuProcess(ours, 8 * GIB), GpuProcess(999_999, 1 * GIB)),
    )
    plan = analyze(config, Discovery(gpus=(gpu,)), pids)
    assert plan.gpus[0].unmanaged_bytes == 1 * GIB
    assert plan.services["alpha"].model == "big"
    blind = analyze(config, Discovery(gpus=(gpu,)))
    assert blind.gpus[0].unmanaged_bytes == 9 * GIB
    assert blind.services["alpha"].model == "small"
