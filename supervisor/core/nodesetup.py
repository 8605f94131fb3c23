"""What a GPU node's Docker needs so that Swarm sees its GPUs (pure: texts in, texts out).

`fleetctl node init` reads NVML and the two files, asks `plan_node_init` for their new
texts, and shows or writes them. Three things make Swarm place tasks on GPUs:

* `node-generic-resources` in daemon.json: one named resource per GPU, `NVIDIA-GPU=<uuid>`.
  Docker's own example uses that kind name ("NVIDIA-GPU=UUID1"; dockerd reference, "Node
  generic resources": https://docs.docker.com/reference/cli/dockerd/#node-generic-resources).
  A service then reserves GPUs with `--generic-resource NVIDIA-GPU=1`.
* The NVIDIA runtime as Docker's `default-runtime` (a service cannot pick a runtime or
  pass `--gpus`), registered under `runtimes.nvidia` as `nvidia-ctk runtime configure`
  does, and `swarm-resource = "DOCKER_RESOURCE_NVIDIA-GPU"` in its config.toml (commented
  out by default). Swarm hands a task its GPUs as the environment variable
  `DOCKER_RESOURCE_<KIND>` (swarmkit's genericresource.EnvFormat upper-cases
  `DOCKER_RESOURCE_` + kind), and the runtime exposes the devices named in the variables
  `swarm-resource` lists (comma-separated) instead of NVIDIA_VISIBLE_DEVICES
  (nvidia-container-toolkit's HookConfig.getSwarmResourceEnvvars; the runtime's jit-cdi
  mode honours it from NVIDIA/nvidia-container-toolkit#1600, the fix of #1599).
* Engine labels (daemon.json `labels`) describing each GPU, for placement constraints
  (`engine.labels.org.fleetd.gpu.0.name==...`) and for fleetd on other hosts:
  `org.fleetd.gpus=<count>` and `org.fleetd.gpu.<index>.{uuid,name,memory_bytes}`.

Only fleetd's part is replaced: its labels (`org.fleetd.gpus`, `org.fleetd.gpu.*`) and
the NVIDIA-GPU resources; every other key, label, resource and runtime is kept, and a
file that already says all this is left as it is.
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from supervisor.core.errors import FleetdError
from supervisor.core.gpus import Discovery

JsonObject = dict[str, Any]

GPU_RESOURCE_KIND = "NVIDIA-GPU"
# What swarmkit names the variable that carries a task's NVIDIA-GPU resources.
SWARM_RESOURCE_ENV = f"DOCKER_RESOURCE_{GPU_RESOURCE_KIND.upper()}"
SWARM_RESOURCE_KEY = "swarm-resource"
NVIDIA_RUNTIME = "nvidia"
NVIDIA_RUNTIME_PATH = "nvidia-container-runtime"  # as `nvidia-ctk runtime configure` writes
GPU_COUNT_LABEL = "org.fleetd.gpus"
GPU_LABEL_PREFIX = "org.fleetd.gpu."


class NodeSetupError(FleetdError):
    """The node cannot be set up as asked: a file or a GPU that cannot be used (exit 1)."""


@dataclass(frozen=True)
class NodeGpu:
    """One GPU as Swarm is told about it."""

    index: int
    uuid: str
    name: str
    memory_bytes: int


@dataclass(frozen=True)
class FileEdit:
    """One file's text before (None: it does not exist) and after."""

    path: str
    old_text: str | None
    new_text: str

    @property
    def changed(self) -> bool:
        return self.old_text != self.new_text

    def diff(self) -> str:
        """A unified diff, empty when nothing changes."""
        before = (self.old_text or "").splitlines(keepends=True)
        after = self.new_text.splitlines(keepends=True)
        old_name = self.path if self.old_text is not None else "/dev/null"
        lines = difflib.unified_diff(before, after, old_name, f"{self.path} (node init)")
        return "".join(line if line.endswith("\n") else f"{line}\n" for line in lines)


@dataclass(frozen=True)
class NodePlan:
    gpus: tuple[NodeGpu, ...]
    edits: tuple[FileEdit, ...]  # daemon.json, then config.toml unless it is left alone
    notes: tuple[str, ...]


def plan_node_init(
    discovery: Discovery,
    daemon: tuple[str, str | None],
    runtime: tuple[str, str] | None,
) -> NodePlan:
    """The new daemon.json and config.toml for this node's GPUs.

    `daemon` is daemon.json's path and text (None: no such file yet); `runtime` the NVIDIA
    runtime's config.toml, or None to leave it alone. Raises NodeSetupError, naming the
    file and what is wrong, when they cannot be made."""
    daemon_path, daemon_text = daemon
    current = parse_daemon_config(daemon_text, daemon_path)
    gpus = node_gpus(discovery)
    config, notes = merge_daemon_config(current, gpus, daemon_path)
    if config == current and daemon_text is not None:
        new_daemon = daemon_text  # the same settings: not rewritten, not even re-indented
    else:
        new_daemon = render_daemon_config(config, daemon_text)
    edits = [FileEdit(daemon_path, daemon_text, new_daemon)]
    if runtime is not None:
        runtime_path, runtime_text = runtime
        edits.append(
            FileEdit(runtime_path, runtime_text, set_swarm_resource(runtime_text, runtime_path))
        )
    return NodePlan(gpus, tuple(edits), tuple(notes))


def node_gpus(discovery: Discovery) -> tuple[NodeGpu, ...]:
    """Every GPU with its UUID; refuses when NVML found none or cannot read one, since
    advertising only some of them would let Swarm hand out the others twice."""
    if not discovery.gpus:
        problem = discovery.problem or "no NVIDIA GPU found"
        raise NodeSetupError(f"{problem}: nothing was changed")
    gpus = []
    for gpu in discovery.gpus:
        if not gpu.valid or not gpu.uuid:
            why = gpu.error or "NVML does not tell its UUID"
            raise NodeSetupError(
                f"GPU {gpu.index}: cannot be advertised to Swarm ({why}); every GPU needs "
                "a UUID that NVML can read: nothing was changed"
            )
        gpus.append(NodeGpu(gpu.index, gpu.uuid, gpu.name, gpu.total_bytes))
    return tuple(gpus)


def gpu_resources(gpus: Sequence[NodeGpu]) -> list[str]:
    return [f"{GPU_RESOURCE_KIND}={gpu.uuid}" for gpu in gpus]


def gpu_labels(gpus: Sequence[NodeGpu]) -> list[str]:
    labels = [f"{GPU_COUNT_LABEL}={len(gpus)}"]
    for gpu in gpus:
        key = f"{GPU_LABEL_PREFIX}{gpu.index}"
        labels += [
            f"{key}.uuid={gpu.uuid}",
            f"{key}.name={gpu.name}",
            f"{key}.memory_bytes={gpu.memory_bytes}",
        ]
    return labels


def is_fleetd_label(label: str) -> bool:
    key = label.partition("=")[0]
    return key == GPU_COUNT_LABEL or key.startswith(GPU_LABEL_PREFIX)


def is_gpu_resource(resource: str) -> bool:
    return resource.partition("=")[0] == GPU_RESOURCE_KIND


def parse_daemon_config(text: str | None, source: str) -> JsonObject:
    """daemon.json's settings ({} for a missing or empty file, as dockerd reads it)."""
    if text is None or not text.strip():
        return {}
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise NodeSetupError(
            f"{source}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
            "fix it first: nothing was changed"
        ) from None
    if not isinstance(config, dict):
        raise NodeSetupError(
            f"{source}: expected a JSON object of daemon settings, found "
            f"{_json_kind(config)}: nothing was changed"
        )
    return config


def _json_kind(value: object) -> str:
    kinds = {list: "an array", str: "a string", bool: "true or false", type(None): "null"}
    return kinds.get(type(value), "a number")


def merge_daemon_config(
    current: JsonObject, gpus: Sequence[NodeGpu], source: str
) -> tuple[JsonObject, list[str]]:
    """`current` with this node's GPUs as generic resources and labels, and the NVIDIA
    runtime as the default; everything else as it was. Returns it and notes for a person."""
    config = dict(current)
    notes: list[str] = []
    resources = _strings(config, "node-generic-resources", source)
    config["node-generic-resources"] = _replace_block(
        resources, is_gpu_resource, gpu_resources(gpus)
    )
    notes += _shared_gpus(resources, gpus)
    labels = _strings(config, "labels", source)
    config["labels"] = _replace_block(labels, is_fleetd_label, gpu_labels(gpus))
    notes += _set_runtime(config, source)
    return config, notes


def _strings(config: JsonObject, key: str, source: str) -> list[str]:
    value = config.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise NodeSetupError(
            f'{source}: {key}: expected a list of "KEY=VALUE" strings, found '
            f"{json.dumps(value)}: nothing was changed"
        )
    return value


def _replace_block(items: list[str], ours: Callable[[str], bool], new: list[str]) -> list[str]:
    """`items` with the ones `ours` claims replaced by `new`, where the first of them was
    (else at the end): a list that already holds `new` there stays the same list."""
    at = next((i for i, item in enumerate(items) if ours(item)), len(items))
    kept = [item for item in items if not ours(item)]
    before = sum(1 for item in items[:at] if not ours(item))
    return kept[:before] + new + kept[before:]


def _shared_gpus(resources: list[str], gpus: Sequence[NodeGpu]) -> list[str]:
    """A note for each GPU another resource kind advertises too (Swarm could hand the
    same GPU to a task of each kind)."""
    uuids = {gpu.uuid for gpu in gpus}
    return [
        f"node-generic-resources also advertises {entry!r}: Swarm may give that GPU to a "
        f"task reserving {entry.partition('=')[0]} and to one reserving {GPU_RESOURCE_KIND}"
        for entry in resources
        if not is_gpu_resource(entry) and entry.partition("=")[2] in uuids
    ]


def _set_runtime(config: JsonObject, source: str) -> list[str]:
    """Registers the NVIDIA runtime if missing and makes it the default (a Swarm service
    cannot choose a runtime); a default other than runc is refused, not replaced."""
    runtimes = config.get("runtimes", {})
    if not isinstance(runtimes, dict):
        raise NodeSetupError(
            f"{source}: runtimes: expected an object of runtimes by name, found "
            f"{json.dumps(runtimes)}: nothing was changed"
        )
    notes = []
    if NVIDIA_RUNTIME not in runtimes:
        config["runtimes"] = {**runtimes, NVIDIA_RUNTIME: {"path": NVIDIA_RUNTIME_PATH}}
        notes.append(f"registers the {NVIDIA_RUNTIME} runtime: {NVIDIA_RUNTIME_PATH} from the PATH")
    default = config.get("default-runtime", "runc")
    if default not in ("runc", NVIDIA_RUNTIME):
        raise NodeSetupError(
            f"{source}: default-runtime is {json.dumps(default)}; Swarm services reach "
            f"their GPUs only through the {NVIDIA_RUNTIME!r} runtime as the default (it can "
            "run another low-level runtime: `runtimes` in its config.toml). Change it "
            "yourself and run this again: nothing was changed"
        )
    if default != NVIDIA_RUNTIME:
        config["default-runtime"] = NVIDIA_RUNTIME
        notes.append(
            f"makes {NVIDIA_RUNTIME} the default runtime: every container here starts "
            "through it, and it hands each on to runc (its config.toml's `runtimes`)"
        )
    return notes


def render_daemon_config(config: JsonObject, like: str | None) -> str:
    """daemon.json's text, indented as `like` was (4 spaces for a new file)."""
    found = re.search(r"\n([ \t]+)\S", like or "")
    indent = found.group(1) if found else "    "
    return json.dumps(config, indent=indent, ensure_ascii=False) + "\n"


_TABLE_HEADER = re.compile(r"\s*\[")
_ACTIVE = re.compile(
    r"(?P<head>\s*swarm-resource\s*=\s*)(?P<quote>[\"'])(?P<value>[^\"'\n]*)(?P=quote)"
    r"(?P<tail>\s*(#.*)?)"
)
_COMMENTED = re.compile(r"\s*#\s*swarm-resource\s*=")


def set_swarm_resource(text: str, source: str) -> str:
    """config.toml with DOCKER_RESOURCE_NVIDIA-GPU among `swarm-resource`'s variables:
    added to a value that is set, else set on the commented-out line, else on a line of
    its own before the first table. Every other byte stays as it was."""
    before = _parse_toml(text, source)
    if SWARM_RESOURCE_ENV in _variables(before.get(SWARM_RESOURCE_KEY)):
        return text
    lines = text.splitlines(keepends=True)
    top = next((i for i, line in enumerate(lines) if _TABLE_HEADER.match(line)), len(lines))
    active = [i for i in range(top) if _ACTIVE.fullmatch(lines[i].rstrip("\r\n"))]
    commented = [i for i in range(top) if _COMMENTED.match(lines[i])]
    newline = _newline(next((line for line in lines if line.endswith("\n")), "\n"))
    if active:
        lines[active[0]] = _add_variable(lines[active[0]])
    elif commented:
        lines[commented[0]] = _swarm_line(_newline(lines[commented[0]]))
    else:
        at = _insert_at(lines, top)
        if at > 0 and not lines[at - 1].endswith("\n"):
            lines[at - 1] += newline  # the last line had no newline; the new one follows
        lines[at:at] = [_swarm_line(newline)] + ([newline] if at == 0 and lines else [])
    new_text = "".join(lines)
    _check_edit(before, new_text, source)
    return new_text


def _parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise NodeSetupError(f"{source}: not valid TOML ({e}): nothing was changed") from None


def _add_variable(line: str) -> str:
    found = _ACTIVE.fullmatch(line.rstrip("\r\n"))
    assert found is not None
    value = ",".join([*_variables(found["value"]), SWARM_RESOURCE_ENV])
    quote = found["quote"]
    return f"{found['head']}{quote}{value}{quote}{found['tail']}{_newline(line)}"


def _swarm_line(newline: str) -> str:
    return f'{SWARM_RESOURCE_KEY} = "{SWARM_RESOURCE_ENV}"{newline}'


def _newline(line: str) -> str:
    return "\r\n" if line.endswith("\r\n") else "\n"


def _insert_at(lines: list[str], top: int) -> int:
    """Where a new top-level key goes: after the last non-blank line before the tables."""
    at = top
    while at > 0 and not lines[at - 1].strip():
        at -= 1
    return at


def _variables(value: object) -> list[str]:
    """The variable names a `swarm-resource` value lists (comma-separated)."""
    if not isinstance(value, str):
        return []
    return [name.strip() for name in value.split(",") if name.strip()]


def _check_edit(before: dict[str, Any], new_text: str, source: str) -> None:
    """The edit set `swarm-resource` and changed nothing else, or it is refused."""
    try:
        after = tomllib.loads(new_text)
    except tomllib.TOMLDecodeError:
        after = {}
    rest_before = {k: v for k, v in before.items() if k != SWARM_RESOURCE_KEY}
    rest_after = {k: v for k, v in after.items() if k != SWARM_RESOURCE_KEY}
    if rest_after != rest_before or SWARM_RESOURCE_ENV not in _variables(
        after.get(SWARM_RESOURCE_KEY)
    ):
        raise NodeSetupError(
            f"{source}: cannot set {SWARM_RESOURCE_KEY} without touching other settings; "
            f"add {SWARM_RESOURCE_ENV} to it yourself (at the top level: "
            f'{SWARM_RESOURCE_KEY} = "{SWARM_RESOURCE_ENV}"): nothing was changed'
        )
