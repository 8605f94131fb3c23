"""A Swarm's nodes and their GPUs, from the manager's node objects. Pure: dicts in.

Each node object is what the Engine API's `GET /nodes` returns (docker-py's `Node.attrs`).
fleetd reads a node's GPUs from the labels `fleetctl node init` wrote into its daemon.json
(`Description.Engine.Labels`: `org.fleetd.gpus=<count>`, `org.fleetd.gpu.<i>.uuid`,
`.name`, `.memory_bytes`; see nodesetup.py). Where a node has none of those, the same keys
set as node labels (`docker node update --label-add`, `Spec.Labels`) are read instead: a
manager can describe a node whose daemon.json it cannot change. The node's `NVIDIA-GPU`
generic resources, when it has any, must name the same UUIDs.

A node is planned on when it is ready and its availability is active; a GPU whose labels
are missing, malformed or disagree with the resources is left out with a note that names
the node and the key, and the rest of the swarm is still planned.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from supervisor.core.gpus import Discovery, Gpu
from supervisor.core.nodesetup import GPU_COUNT_LABEL, GPU_LABEL_PREFIX, GPU_RESOURCE_KIND, NodeGpu
from supervisor.core.plan import GpuSite

LabelSource = Literal["engine", "node", "none"]
_MAX_NODE_GPUS = 64  # a count beyond any real host is a typo, not a node
# NVML's UUIDs (`GPU-8f6...`, `MIG-...`): no comma or space, which would split the list a
# stack gives NVIDIA_VISIBLE_DEVICES.
_UUID_RE = re.compile(r"^(GPU|MIG)-[A-Za-z0-9/._:-]+$")


@dataclass(frozen=True)
class SwarmNode:
    """One node as fleetd plans on it."""

    id: str
    hostname: str
    state: str  # Status.State: ready, down, unknown, disconnected
    availability: str  # Spec.Availability: active, pause, drain
    gpus: tuple[NodeGpu, ...]
    labels_from: LabelSource  # where its GPUs were read: engine or node labels
    resource_uuids: frozenset[str] | None  # its named NVIDIA-GPU resources; None: none named

    @property
    def usable(self) -> bool:
        return self.state == "ready" and self.availability == "active"

    @property
    def name(self) -> str:
        """`gpu-a (h3k9x2q1)`: the hostname and the ID's first 8 characters."""
        return f"{self.hostname} ({self.id[:8]})"


@dataclass(frozen=True)
class SwarmLayout:
    """Every usable node's GPUs under fleet-wide indexes, ready for `plan.place`."""

    nodes: tuple[SwarmNode, ...]
    discovery: Discovery
    sites: dict[int, GpuSite]


def read_nodes(objects: Sequence[Mapping[str, Any]]) -> tuple[tuple[SwarmNode, ...], list[str]]:
    """Every node, ordered by hostname then ID, and a note for each problem found."""
    nodes, notes = [], []
    for obj in objects:
        node, found = read_node(obj)
        nodes.append(node)
        notes += found
    nodes.sort(key=lambda n: (n.hostname, n.id))
    return tuple(nodes), notes


def read_node(obj: Mapping[str, Any]) -> tuple[SwarmNode, list[str]]:
    """One node object: its state, its GPUs, and notes on anything left out."""
    description = _mapping(obj.get("Description"))
    spec = _mapping(obj.get("Spec"))
    node_id = str(obj.get("ID", ""))
    hostname = str(description.get("Hostname") or "?")
    name = f"{hostname} ({node_id[:8]})"
    engine_labels = _labels(_mapping(description.get("Engine")).get("Labels"))
    node_labels = _labels(spec.get("Labels"))
    advertised, resources = _gpu_resources(
        _mapping(description.get("Resources")).get("GenericResources")
    )
    labels, source = _chosen_labels(engine_labels, node_labels)
    notes = []
    if source == "engine" and _fleetd_part(node_labels) not in ({}, _fleetd_part(engine_labels)):
        notes.append(
            f"node {name}: its node labels org.fleetd.gpu* differ from the engine labels "
            "`fleetctl node init` wrote; the engine labels are used"
        )
    gpus: list[NodeGpu] = []
    if source == "none":
        if advertised:
            notes.append(
                f"node {name}: advertises {GPU_RESOURCE_KIND} generic resources but has no "
                f"label {GPU_COUNT_LABEL} (run `fleetctl node init` on it); its GPUs are "
                "not planned"
            )
    else:
        gpus, found = _labelled_gpus(name, source, labels, resources)
        notes += found
    node = SwarmNode(
        id=node_id,
        hostname=hostname,
        state=str(_mapping(obj.get("Status")).get("State") or "unknown"),
        availability=str(spec.get("Availability") or "unknown"),
        gpus=tuple(gpus),
        labels_from=source,
        resource_uuids=resources,
    )
    if node.gpus and not node.usable:
        notes.append(
            f"node {name} is {node.state}, availability {node.availability}: its "
            f"{len(node.gpus)} GPU(s) are not planned (expected ready and active)"
        )
    return node, notes


def layout(nodes: Sequence[SwarmNode], notes: Sequence[str] = ()) -> SwarmLayout:
    """The usable nodes' GPUs as one list (node by node), each with its site."""
    gpus: list[Gpu] = []
    sites: dict[int, GpuSite] = {}
    usable = [n for n in nodes if n.usable and n.gpus]
    for group, node in enumerate(usable):
        for gpu in node.gpus:
            index = len(gpus)
            gpus.append(Gpu(index, gpu.name, gpu.memory_bytes, "swarm", uuid=gpu.uuid))
            sites[index] = GpuSite(node.id, node.hostname, group, gpu.index, gpu.uuid)
    problem = None if gpus else "no usable Swarm node has fleetd's GPU labels"
    discovery = Discovery(gpus=tuple(gpus), problem=problem, notes=tuple(notes))
    return SwarmLayout(tuple(nodes), discovery, sites)


def _labelled_gpus(
    name: str, source: LabelSource, labels: Mapping[str, str], resources: frozenset[str] | None
) -> tuple[list[NodeGpu], list[str]]:
    where = f"node {name}: {source} label"
    text = labels[GPU_COUNT_LABEL]
    count = _count(text)
    if count is None:
        return [], [f"{where} {GPU_COUNT_LABEL}={text!r} is not a GPU count (expected 0-64)"]
    gpus, notes = [], []
    for index in range(count):
        gpu, problem = _labelled_gpu(index, labels)
        if problem is not None:
            notes.append(f"{where} {problem}; GPU {index} is not planned")
        elif resources is not None and gpu.uuid not in resources:
            notes.append(
                f"{where} {GPU_LABEL_PREFIX}{index}.uuid={gpu.uuid!r} is not among its "
                f"{GPU_RESOURCE_KIND} generic resources ({', '.join(sorted(resources))}): "
                f"run `fleetctl node init` on it again; GPU {index} is not planned"
            )
        else:
            gpus.append(gpu)
    return gpus, notes


def _labelled_gpu(index: int, labels: Mapping[str, str]) -> tuple[NodeGpu, str | None]:
    """GPU `index` from its labels, or a problem naming the key."""
    key = f"{GPU_LABEL_PREFIX}{index}"
    values = {part: labels.get(f"{key}.{part}") for part in ("uuid", "name", "memory_bytes")}
    missing = [f"{key}.{part}" for part, value in values.items() if not value]
    empty = NodeGpu(index, "", "", 0)
    if missing:
        return empty, f"{missing[0]} is missing (expected what `fleetctl node init` writes)"
    uuid = values["uuid"] or ""
    if not _UUID_RE.fullmatch(uuid):
        return empty, f"{key}.uuid={uuid!r} is not a GPU UUID (expected GPU-... as NVML gives it)"
    memory = values["memory_bytes"] or ""
    if not memory.isdigit() or int(memory) <= 0:
        return empty, f"{key}.memory_bytes={memory!r} is not a size in bytes (expected digits)"
    return NodeGpu(index, uuid, values["name"] or "", int(memory)), None


def _count(text: str) -> int | None:
    return int(text) if text.isdigit() and int(text) <= _MAX_NODE_GPUS else None


def _chosen_labels(
    engine: Mapping[str, str], node: Mapping[str, str]
) -> tuple[Mapping[str, str], LabelSource]:
    if GPU_COUNT_LABEL in engine:
        return engine, "engine"
    if GPU_COUNT_LABEL in node:
        return node, "node"
    return {}, "none"


def _fleetd_part(labels: Mapping[str, str]) -> dict[str, str]:
    return {
        k: v for k, v in labels.items() if k == GPU_COUNT_LABEL or k.startswith(GPU_LABEL_PREFIX)
    }


def _gpu_resources(value: object) -> tuple[bool, frozenset[str] | None]:
    """Whether the node advertises NVIDIA-GPU resources, and the UUIDs its named ones
    give (None: none named; a discrete count names no GPU)."""
    found: list[str] = []
    advertised = False
    for entry in value if isinstance(value, list) else []:
        for kind in ("NamedResourceSpec", "DiscreteResourceSpec"):
            spec = _mapping(_mapping(entry).get(kind))
            if spec.get("Kind") != GPU_RESOURCE_KIND:
                continue
            advertised = True
            if kind == "NamedResourceSpec":
                found.append(str(spec.get("Value", "")))
    return advertised, frozenset(found) if found else None


def _labels(value: object) -> dict[str, str]:
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, Mapping) else {}


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}
