"""`fleetctl plan --swarm` and `generate --swarm` against the test engine's real single-node
swarm: the stack file deploys with `docker stack deploy`, each service runs a task on its
planned node with its planned rung in its environment, and everything is removed after.

The node's GPUs are the stand-ins' own: `fleetctl node init` writes its labels into a
daemon.json, which the shared test engine must not be given, so the same keys are set as
node labels (`docker node update --label-add`), the fallback supervisor/core/swarm.py
documents, and removed at the end. The services run the oom-emitter stand-in, which takes
its model from the variable the stack sets (`model_env: MODEL`); no GPU is needed, as the
NVIDIA runtime is not installed here and NVIDIA_VISIBLE_DEVICES is then a plain variable.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import docker
import yaml

from tests.entrypoints import entry_point
from tests.integration.swarm import GPUS, Swarm

DEPLOY_TIMEOUT_S = 90
REMOVE_TIMEOUT_S = 60


def fleet_yaml(stack: str, image: str) -> str:
    """Two stand-in services: `chat` fits its first rung on one GPU, `batch` gets its
    second rung, as its first needs more than a GPU's budget."""
    emitter = {"RUNTIME": "llamacpp", "CAPACITY_MIB": "30000", "MODEL_FROM_ENV": "1"}
    return yaml.safe_dump(
        {
            "mode": "swarm",
            "swarm": {"stack": stack},
            "services": {
                "chat": {
                    "runtime": "generic",
                    "image": image,
                    "model_env": "MODEL",
                    "environment": emitter,
                    "ladder": [
                        {"model": "chat-8b", "vram": "16GiB"},
                        {"model": "chat-3b", "vram": "4GiB"},
                    ],
                },
                "batch": {
                    "runtime": "generic",
                    "image": image,
                    "model_env": "MODEL",
                    "environment": emitter,
                    "ladder": [
                        {"model": "batch-70b", "vram": "40GiB"},
                        {"model": "batch-8b", "vram": "16GiB"},
                    ],
                },
            },
        }
    )


def fleetctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [entry_point("fleetctl"), *args], capture_output=True, text=True, timeout=60, check=False
    )


def running_task(client: docker.DockerClient, service: str) -> dict[str, Any] | None:
    """The service's task that runs now, if one does."""
    found = client.services.get(service).tasks(filters={"desired-state": "running"})
    return next((t for t in found if t["Status"]["State"] == "running"), None)


def wait_for(what: str, check: Any, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def stack_objects(client: docker.DockerClient, stack: str) -> list[str]:
    """What `docker stack deploy` made for this stack and `stack rm` has not removed yet."""
    label = {"label": f"com.docker.stack.namespace={stack}"}
    services = [s.name for s in client.services.list(filters=label)]
    networks = [n.name for n in client.networks.list(filters=label)]
    return services + networks


def test_a_generated_stack_runs_each_service_on_its_node_with_its_planned_rung(
    tmp_path: Path,
    docker_client: docker.DockerClient,
    swarm: Swarm,
    emitter_image: str,
    gpu_node_labels: dict[str, str],
) -> None:
    stack = f"fleetdtest{uuid.uuid4().hex[:8]}"
    config = tmp_path / "fleet.yaml"
    config.write_text(fleet_yaml(stack, emitter_image))
    stack_file = tmp_path / "stack.yml"

    planned = fleetctl("plan", "--swarm", "--json", "--config", str(config))
    assert planned.returncode == 0, planned.stderr
    plan = json.loads(planned.stdout)
    models = {name: s["model"] for name, s in plan["services"].items()}
    assert models == {"chat": "chat-8b", "batch": "batch-8b"}
    for service in plan["services"].values():
        assert service["node"]["id"] == swarm.node_id
        assert service["node"]["hostname"] == swarm.hostname
    used = sorted(g["uuid"] for s in plan["services"].values() for g in s["node"]["gpus"])
    assert used == sorted(g.uuid for g in GPUS)  # one each: headroom spreads them

    generated = fleetctl("generate", "--swarm", "--config", str(config), "-o", str(stack_file))
    assert generated.returncode == 0, generated.stderr
    checked = subprocess.run(
        ["docker", "stack", "config", "-c", str(stack_file)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    try:
        deployed = subprocess.run(
            ["docker", "stack", "deploy", "--resolve-image", "never", "-c", str(stack_file), stack],
            capture_output=True,
            text=True,
            check=False,
        )
        assert deployed.returncode == 0, deployed.stderr
        for name, model in models.items():
            service = f"{stack}_{name}"
            task = wait_for(
                f"a running task of {service}",
                lambda s=service: running_task(docker_client, s),
                DEPLOY_TIMEOUT_S,
            )
            assert task["NodeID"] == swarm.node_id
            container = docker_client.containers.get(
                task["Status"]["ContainerStatus"]["ContainerID"]
            )
            env = dict(e.split("=", 1) for e in container.attrs["Config"]["Env"])
            assert env["MODEL"] == model
            uuids = [g["uuid"] for g in plan["services"][name]["node"]["gpus"]]
            assert env["NVIDIA_VISIBLE_DEVICES"] == ",".join(uuids)
            labels = container.labels
            assert labels["org.fleetd.service"] == name and labels["org.fleetd.managed"] == "true"
            wait_for(
                f"{service} to start {model}",
                lambda c=container, m=model: m in c.logs().decode(errors="replace"),
                DEPLOY_TIMEOUT_S,
            )
    finally:
        subprocess.run(["docker", "stack", "rm", stack], capture_output=True, check=False)
        wait_for(
            f"stack {stack} to be removed",
            lambda: not stack_objects(docker_client, stack),
            REMOVE_TIMEOUT_S,
        )
