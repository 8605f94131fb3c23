"""Tests for supervisor.core.swarm: a Swarm's node objects (shaped as the Engine API returns
them; the base is `docker node inspect self` of the test engine's single-node swarm, Docker
20.10) read into GPUs, and those GPUs planned with a rung never spanning nodes."""

from __future__ import annotations

import copy
from typing import Any

from supervisor.core.config import FleetConfig
from supervisor.core.plan import RungNeed, place
from supervisor.core.swarm import layout, read_node, read_nodes
from supervisor.core.units import GIB

# `docker node inspect self`, trimmed of the TLS certificate and the plugin list.
REAL_NODE: dict[str, Any] = {
    "ID": "qkc0p6vbbzz572hzbro41xujr",
    "Version": {"Index": 9},
    "CreatedAt": "2026-12-04T13:54:15.53295671Z",
    "UpdatedAt": "2026-12-04T13:54:16.043136098Z",
    "Spec": {"Labels": {}, "Role": "manager", "Availability": "active"},
    "Description": {
        "Hostname": "vm",
        "Platform": {"Architecture": "x86_64", "OS": "linux"},
        "Resources": {"NanoCPUs": 2000000000, "MemoryBytes": 25276203008},
        "Engine": {
            "EngineVersion": "20.10.24+dfsg1",
            "Plugins": [{"Type": "Log", "Name": "local"}],
        },
    },
    "Status": {"State": "ready", "Addr": "127.0.0.1"},
    "ManagerStatus": {"Leader": True, "Reachability": "reachable", "Addr": "127.0.0.1:2377"},
}


def gpu_labels(*gpus: tuple[str, str, int]) -> dict[str, str]:
    """What `fleetctl node init` writes, for GPUs given as (uuid, name, bytes)."""
    labels = {"org.fleetd.gpus": str(len(gpus))}
    for i, (uuid, name, size) in enumerate(gpus):
        labels |= {
            f"org.fleetd.gpu.{i}.uuid": uuid,
            f"org.fleetd.gpu.{i}.name": name,
            f"org.fleetd.gpu.{i}.memory_bytes": str(size),
        }
    return labels


def node(
    node_id: str,
    hostname: str,
    engine_labels: dict[str, str] | None = None,
    node_labels: dict[str, str] | None = None,
    resources: list[str] | None = None,
    state: str = "ready",
    availability: str = "active",
) -> dict[str, Any]:
    obj = copy.deepcopy(REAL_NODE)
    obj["ID"], obj["Description"]["Hostname"] = node_id, hostname
    if engine_labels is not None:
        obj["Description"]["Engine"]["Labels"] = engine_labels
    obj["Spec"]["Labels"] = node_labels or {}
    if resources is not None:
        obj["Description"]["Resources"]["GenericResources"] = [
            {"NamedResourceSpec": {"Kind": "NVIDIA-GPU", "Value": uuid}} for uuid in resources
        ]
    obj["Status"]["State"], obj["Spec"]["Availability"] = state, availability
    return obj


A0 = ("GPU-aaaa0000-0000-0000-0000-000000000000", "NVIDIA L4", 24 * GIB)
B0 = ("GPU-bbbb0000-0000-0000-0000-000000000000", "NVIDIA A10", 24 * GIB)
B1 = ("GPU-bbbb1111-0000-0000-0000-000000000000", "NVIDIA A10", 24 * GIB)


def test_the_real_node_without_labels_has_no_gpus_and_no_notes() -> None:
    found, notes = read_node(REAL_NODE)

    assert (found.id, found.hostname, found.usable, found.gpus, notes) == (
        REAL_NODE["ID"],
        "vm",
        True,
        (),
        [],
    )


def test_engine_labels_node_init_wrote_give_the_gpus() -> None:
    found, notes = read_node(node("n1", "gpu-a", gpu_labels(A0), resources=[A0[0]]))

    assert notes == []
    assert found.labels_from == "engine"
    assert [(g.index, g.uuid, g.name, g.memory_bytes) for g in found.gpus] == [(0, *A0)]


def test_node_labels_are_the_documented_fallback() -> None:
    found, notes = read_node(node("n1", "gpu-a", node_labels=gpu_labels(A0, B0)))

    assert notes == [] and found.labels_from == "node"
    assert [g.uuid for g in found.gpus] == [A0[0], B0[0]]


def test_engine_labels_win_over_node_labels_that_differ_with_a_note() -> None:
    found, notes = read_node(
        node("n1abcdefgh", "gpu-a", gpu_labels(A0), node_labels=gpu_labels(B0))
    )

    assert [g.uuid for g in found.gpus] == [A0[0]]
    assert notes == [
        "node gpu-a (n1abcdef): its node labels org.fleetd.gpu* differ from the engine "
        "labels `fleetctl node init` wrote; the engine labels are used"
    ]


def test_generic_resources_without_labels_are_named_in_a_note() -> None:
    found, notes = read_node(node("n2abcdefgh", "gpu-b", resources=[B0[0], B1[0]]))

    assert found.gpus == ()
    assert notes == [
        "node gpu-b (n2abcdef): advertises NVIDIA-GPU generic resources but has no label "
        "org.fleetd.gpus (run `fleetctl node init` on it); its GPUs are not planned"
    ]


def test_a_label_uuid_that_the_resources_do_not_name_leaves_that_gpu_out() -> None:
    found, notes = read_node(node("n2abcdefgh", "gpu-b", gpu_labels(B0, B1), resources=[B0[0]]))

    assert [g.uuid for g in found.gpus] == [B0[0]]
    assert notes == [
        f"node gpu-b (n2abcdef): engine label org.fleetd.gpu.1.uuid={B1[0]!r} is not among "
        f"its NVIDIA-GPU generic resources ({B0[0]}): run `fleetctl node init` on it "
        "again; GPU 1 is not planned"
    ]


def test_a_discrete_gpu_count_names_no_uuid_to_disagree_with() -> None:
    obj = node("n1", "gpu-a", gpu_labels(A0))
    obj["Description"]["Resources"]["GenericResources"] = [
        {"DiscreteResourceSpec": {"Kind": "NVIDIA-GPU", "Value": 1}}
    ]

    found, notes = read_node(obj)

    assert len(found.gpus) == 1 and notes == []


def test_missing_and_malformed_labels_name_the_key() -> None:
    labels = gpu_labels(A0, B0)
    del labels["org.fleetd.gpu.0.name"]
    labels["org.fleetd.gpu.1.memory_bytes"] = "24GiB"

    found, notes = read_node(node("n1abcdefgh", "gpu-a", labels))

    assert found.gpus == ()
    assert notes == [
        "node gpu-a (n1abcdef): engine label org.fleetd.gpu.0.name is missing (expected "
        "what `fleetctl node init` writes); GPU 0 is not planned",
        "node gpu-a (n1abcdef): engine label org.fleetd.gpu.1.memory_bytes='24GiB' is not "
        "a size in bytes (expected digits); GPU 1 is not planned",
    ]


def test_a_count_that_is_not_a_number_is_refused() -> None:
    _, notes = read_node(node("n1abcdefgh", "gpu-a", {"org.fleetd.gpus": "two"}))

    assert notes == [
        "node gpu-a (n1abcdef): engine label org.fleetd.gpus='two' is not a GPU count "
        "(expected 0-64)"
    ]


def test_drained_or_down_nodes_are_not_planned_on_and_say_so() -> None:
    nodes, notes = read_nodes(
        [
            node("n1abcdefgh", "gpu-a", gpu_labels(A0), availability="drain"),
            node("n2abcdefgh", "gpu-b", gpu_labels(B0), state="down"),
            node("n3abcdefgh", "cpu-only"),
        ]
    )

    assert [(n.hostname, n.usable) for n in nodes] == [
        ("cpu-only", True),
        ("gpu-a", False),
        ("gpu-b", False),
    ]
    assert layout(nodes).discovery.gpus == ()
    assert notes == [
        "node gpu-a (n1abcdef) is ready, availability drain: its 1 GPU(s) are not planned "
        "(expected ready and active)",
        "node gpu-b (n2abcdef) is down, availability active: its 1 GPU(s) are not planned "
        "(expected ready and active)",
    ]


def test_layout_numbers_gpus_across_nodes_and_keeps_each_ones_site() -> None:
    nodes, _ = read_nodes(
        [node("n2", "gpu-b", gpu_labels(B0, B1)), node("n1", "gpu-a", gpu_labels(A0))]
    )

    found = layout(nodes)

    assert [(g.index, g.uuid) for g in found.discovery.gpus] == [(0, A0[0]), (1, B0[0]), (2, B1[0])]
    assert [(s.hostname, s.group, s.local_index) for s in found.sites.values()] == [
        ("gpu-a", 0, 0),
        ("gpu-b", 1, 0),
        ("gpu-b", 1, 1),
    ]


SWARM_FLEET = {
    "mode": "swarm",
    "services": {
        "big": {
            "runtime": "vllm",
            "ladder": [{"model": "m-70b", "vram": "10GiB", "tensor_parallel": 2}],
        },
        "chat": {"runtime": "llamacpp", "ladder": [{"model": "/m/chat.gguf", "vram": "12GiB"}]},
        "pinned": {
            "runtime": "llamacpp",
            "gpu": 1,
            "ladder": [{"model": "/m/p.gguf", "vram": "4GiB"}],
        },
    },
}


def priced(config: FleetConfig) -> dict[str, list[RungNeed]]:
    return {
        name: [
            RungNeed(i, r.model, r.vram or 0, "declared", "declared in the config")
            for i, r in enumerate(svc.ladder)
        ]
        for name, svc in config.services.items()
    }


def test_place_keeps_a_tensor_parallel_rung_on_one_node_and_pins_by_node_index() -> None:
    config = FleetConfig.model_validate(SWARM_FLEET)
    nodes, _ = read_nodes(
        [node("n1", "gpu-a", gpu_labels(A0)), node("n2", "gpu-b", gpu_labels(B0, B1))]
    )
    swarm = layout(nodes)

    plan = place(config, swarm.discovery, priced(config), sites=swarm.sites)

    where = {
        name: sorted((swarm.sites[g].hostname, swarm.sites[g].local_index) for g in s.gpus)
        for name, s in plan.services.items()
    }
    assert where == {
        "big": [("gpu-b", 0), ("gpu-b", 1)],
        "chat": [("gpu-a", 0)],
        "pinned": [("gpu-b", 1)],
    }
    assert plan.on_swarm and plan.all_placed


def test_a_rung_wider_than_every_node_says_no_node_has_enough() -> None:
    config = FleetConfig.model_validate(
        {
            "mode": "swarm",
            "services": {
                "big": {
                    "runtime": "vllm",
                    "ladder": [{"model": "m", "vram": "1GiB", "tensor_parallel": 2}],
                }
            },
        }
    )
    nodes, _ = read_nodes([node("n1", "a", gpu_labels(A0)), node("n2", "b", gpu_labels(B0))])
    swarm = layout(nodes)

    plan = place(config, swarm.discovery, priced(config), sites=swarm.sites)

    assert plan.services["big"].rung is None
    assert plan.services["big"].rungs[0].reason == (
        "spans 2 GPUs (tensor_parallel), and no node has more than 1 it may use (a service "
        "never spans nodes)"
    )


def test_a_uuid_that_could_split_the_visible_devices_list_is_refused() -> None:
    labels = gpu_labels(("GPU-1,GPU-2", "x", GIB))

    found, notes = read_node(node("n1abcdefgh", "gpu-a", labels))

    assert found.gpus == ()
    assert notes == [
        "node gpu-a (n1abcdef): engine label org.fleetd.gpu.0.uuid='GPU-1,GPU-2' is not a "
        "GPU UUID (expected GPU-... as NVML gives it); GPU 0 is not planned"
    ]
