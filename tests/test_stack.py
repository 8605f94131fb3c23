"""Tests for `build_stack` (supervisor.analyzer.compose): a Swarm stack from the same
templates as a compose project, each service pinned to its node and GPUs, its rung in
its environment, every value checked after the YAML is parsed back."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from supervisor.analyzer.compose import STACK_PREAMBLE, build_stack
from supervisor.core.config import FleetConfig
from supervisor.core.errors import RenderError
from supervisor.core.plan import FleetPlan, place
from supervisor.core.swarm import layout, read_nodes
from tests.test_swarm import A0, B0, B1, gpu_labels, node, priced

FLEET: dict[str, Any] = {
    "mode": "swarm",
    "services": {
        "chat": {
            "runtime": "llamacpp",
            "ladder": [
                {"model": "/models/chat-8b.gguf", "vram": "12GiB", "context": 8192},
                {"model": "/models/chat-3b.gguf", "vram": "4GiB"},
            ],
        },
        "big": {
            "runtime": "vllm",
            "ladder": [{"model": "org/m-70b", "vram": "18GiB", "tensor_parallel": 2}],
        },
        "app": {
            "runtime": "generic",
            "image": "example/app:1",
            "model_env": "MODEL",
            "environment": {"MODE": "$literal"},
            "ladder": [{"model": "llama3.2:3b", "vram": "1GiB"}],
        },
    },
}


def swarm_plan(fleet: dict[str, Any] = FLEET) -> FleetPlan:
    config = FleetConfig.model_validate(fleet)
    nodes, notes = read_nodes(
        [
            node("n1aaaaaaaaaaaaaaaaaaaaaaa", "gpu-a", gpu_labels(A0)),
            node("n2bbbbbbbbbbbbbbbbbbbbbbb", "gpu-b", gpu_labels(B0, B1)),
        ]
    )
    swarm = layout(nodes, notes)
    return place(config, swarm.discovery, priced(config), sites=swarm.sites)


def services() -> dict[str, Any]:
    return yaml.safe_load(build_stack(swarm_plan()).stack_yaml)["services"]


def test_each_service_is_placed_on_its_node_by_id_without_a_container_name() -> None:
    got = services()

    assert {n: s["deploy"]["placement"]["constraints"] for n, s in got.items()} == {
        "chat": ["node.id == n1aaaaaaaaaaaaaaaaaaaaaaa"],
        "big": ["node.id == n2bbbbbbbbbbbbbbbbbbbbbbb"],
        "app": ["node.id == n1aaaaaaaaaaaaaaaaaaaaaaa"],
    }
    assert all("container_name" not in s and "restart" not in s for s in got.values())


def test_gpus_are_pinned_by_uuid_in_the_environment_and_not_reserved() -> None:
    got = services()

    assert got["big"]["environment"]["NVIDIA_VISIBLE_DEVICES"] == f"{B0[0]},{B1[0]}"
    assert got["chat"]["environment"]["NVIDIA_VISIBLE_DEVICES"] == A0[0]
    assert all("resources" not in s["deploy"] for s in got.values())


def test_the_rung_is_carried_by_the_variables_a_service_update_changes() -> None:
    got = services()

    chat, app = got["chat"]["environment"], got["app"]["environment"]
    assert chat["FLEETD_MODEL"] == "/models/chat-8b.gguf"
    assert chat["FLEETD_CONTEXT"] == "8192"
    assert chat["FLEETD_ARGS"].split()[:2] == ["-c", "8192"]
    assert "FLEETD_PARALLEL" not in chat  # unset options are left out, not empty
    assert app["MODEL"] == "llama3.2:3b" and "FLEETD_MODEL" not in app  # its model_env
    assert app["MODE"] == "$$literal"  # compose's escape: the container gets `$literal`
    assert "FLEETD_MODEL_FILE" not in app  # a task has no hand-off file


def test_labels_restart_update_and_rollback_policies() -> None:
    got = services()

    deploy = got["app"]["deploy"]
    labels = {
        "org.fleetd.managed": "true",
        "org.fleetd.service": "app",
        "org.fleetd.runtime": "generic",
    }
    assert deploy["labels"] == labels and got["app"]["labels"] == labels
    assert deploy["restart_policy"] == {
        "condition": "any",
        "delay": "10s",
        "max_attempts": 10,
        "window": "10m",
    }
    # on a GPU: stop-first (two rungs at once may not fit; a failing task races its update)
    assert deploy["update_config"]["order"] == "stop-first"
    # fleetd, not Swarm, judges a rung that fails: no rollback behind its back
    assert deploy["update_config"]["failure_action"] == "continue"
    assert deploy["rollback_config"]["parallelism"] == 1


def test_a_published_port_is_on_the_node_only_and_makes_updates_stop_first() -> None:
    got = services()

    assert got["chat"]["ports"] == [
        {"target": 8080, "published": 8080, "protocol": "tcp", "mode": "host"}
    ]
    assert got["chat"]["deploy"]["update_config"]["order"] == "stop-first"


def test_start_scripts_fill_a_tmpfs_hand_off_folder_from_the_environment() -> None:
    got = services()

    assert got["chat"]["volumes"] == [{"type": "tmpfs", "target": "/run/fleetd"}]
    script = got["chat"]["entrypoint"][2]
    assert script.startswith("d=/run/fleetd; mkdir -p $$d && printf")
    assert "volumes" not in got["app"]  # an app without a start script reads its variable


def test_the_preamble_writes_the_model_and_one_argument_per_line(tmp_path: Path) -> None:
    preamble = STACK_PREAMBLE.replace("MODEL_VARIABLE", "FLEETD_MODEL")
    script = preamble.replace("d=/run/fleetd", f"d={tmp_path}") + 'cat "$d/model" "$d/args"'

    out = subprocess.run(
        ["sh", "-c", script],
        env={"FLEETD_MODEL": "org/m *", "FLEETD_ARGS": "-c 8192 -np *"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    assert out == "org/m *\n-c\n8192\n-np\n*\n"  # no glob expanded


def test_a_plan_for_one_host_is_refused() -> None:
    config = FleetConfig.model_validate(FLEET)
    from supervisor.core.gpus import Discovery, simulated_gpus

    plan = place(config, Discovery(simulated_gpus(["24GiB", "24GiB"])), priced(config))

    with pytest.raises(RenderError, match="a stack needs a plan across Swarm nodes"):
        build_stack(plan)


def test_environment_that_sets_a_planned_variable_is_refused() -> None:
    fleet = {**FLEET, "services": {**FLEET["services"]}}
    fleet["services"]["app"] = {
        **FLEET["services"]["app"],
        "environment": {"NVIDIA_VISIBLE_DEVICES": "all"},
    }

    with pytest.raises(RenderError, match="environment sets NVIDIA_VISIBLE_DEVICES"):
        build_stack(swarm_plan(fleet))
