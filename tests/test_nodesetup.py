"""`fleetctl node init`'s decisions: daemon.json merged, config.toml edited, GPUs checked."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest

from supervisor.core.gpus import Discovery, Gpu
from supervisor.core.nodesetup import (
    FileEdit,
    NodePlan,
    NodeSetupError,
    plan_node_init,
    set_swarm_resource,
)
from supervisor.edges import nodefiles
from supervisor.edges.nvml import Nvml
from tests import fakenvml

GIB = 1024**3
DAEMON = "/etc/docker/daemon.json"
RUNTIME = "/etc/nvidia-container-runtime/config.toml"

# What `nvidia-ctk config default` writes (toolkit 1.17+), trimmed.
DEFAULT_RUNTIME_CONFIG = """\
#accept-nvidia-visible-devices-as-volume-mounts = false
#accept-nvidia-visible-devices-envvar-when-unprivileged = true
disable-require = false
supported-driver-capabilities = "compat32,compute,display,graphics,ngx,utility,video"
#swarm-resource = "DOCKER_RESOURCE_GPU"

[nvidia-container-cli]
#debug = "/var/log/nvidia-container-toolkit.log"
environment = []
ldconfig = "@/sbin/ldconfig.real"
load-kmods = true

[nvidia-container-runtime]
log-level = "info"
mode = "auto"
runtimes = ["docker-runc", "runc", "crun"]
"""


def h200s(count: int = 2) -> Discovery:
    return Discovery(
        gpus=tuple(
            Gpu(index=i, name="NVIDIA H200", total_bytes=141 * GIB, source="nvml", uuid=f"GPU-{i}")
            for i in range(count)
        )
    )


def plan(
    daemon: dict[str, Any] | str | None,
    runtime: str | None = DEFAULT_RUNTIME_CONFIG,
    discovery: Discovery | None = None,
) -> NodePlan:
    text = json.dumps(daemon, indent=2) if isinstance(daemon, dict) else daemon
    runtime_file = None if runtime is None else (RUNTIME, runtime)
    return plan_node_init(discovery or h200s(), (DAEMON, text), runtime_file)


def new_daemon(result: NodePlan) -> dict[str, Any]:
    config: dict[str, Any] = json.loads(result.edits[0].new_text)
    return config


def changed_lines(edit: FileEdit) -> list[tuple[str, str]]:
    old, new = (edit.old_text or "").splitlines(True), edit.new_text.splitlines(True)
    assert len(old) == len(new), "lines were added or removed"
    return [(a, b) for a, b in zip(old, new, strict=True) if a != b]


# --- daemon.json ----------------------------------------------------------------------


def test_a_new_daemon_json_advertises_each_gpu_and_makes_nvidia_the_default() -> None:
    config = new_daemon(plan(None))
    assert config["node-generic-resources"] == ["NVIDIA-GPU=GPU-0", "NVIDIA-GPU=GPU-1"]
    assert config["labels"] == [
        "org.fleetd.gpus=2",
        "org.fleetd.gpu.0.uuid=GPU-0",
        "org.fleetd.gpu.0.name=NVIDIA H200",
        f"org.fleetd.gpu.0.memory_bytes={141 * GIB}",
        "org.fleetd.gpu.1.uuid=GPU-1",
        "org.fleetd.gpu.1.name=NVIDIA H200",
        f"org.fleetd.gpu.1.memory_bytes={141 * GIB}",
    ]
    assert config["default-runtime"] == "nvidia"
    assert config["runtimes"] == {"nvidia": {"path": "nvidia-container-runtime"}}
    assert plan(None).edits[0].diff().startswith("--- /dev/null\n")


def test_the_merge_keeps_every_other_key_label_resource_and_runtime() -> None:
    current = {
        "log-driver": "journald",
        "insecure-registries": ["10.0.0.5:5000"],
        "labels": ["rack=r1", "org.fleetd.gpus=4", "org.fleetd.gpu.3.uuid=GPU-gone", "zone=b"],
        "node-generic-resources": ["SSD=ssd0", "NVIDIA-GPU=GPU-gone", "FPGA=f0"],
        "runtimes": {"crun": {"path": "/usr/bin/crun"}},
        "default-runtime": "runc",
    }
    config = new_daemon(plan(current))
    assert config["log-driver"] == "journald"
    assert config["insecure-registries"] == ["10.0.0.5:5000"]
    labels = config["labels"]
    assert labels[0] == "rack=r1" and labels[-1] == "zone=b"
    assert "org.fleetd.gpu.3.uuid=GPU-gone" not in labels, "a GPU no longer there is dropped"
    assert "org.fleetd.gpus=2" in labels
    assert config["node-generic-resources"] == [
        "SSD=ssd0",
        "NVIDIA-GPU=GPU-0",
        "NVIDIA-GPU=GPU-1",
        "FPGA=f0",
    ]
    assert config["runtimes"]["crun"] == {"path": "/usr/bin/crun"}
    assert config["default-runtime"] == "nvidia"


def test_a_registered_nvidia_runtime_is_kept_as_it_is() -> None:
    runtimes = {"nvidia": {"path": "/opt/nvidia/bin/nvidia-container-runtime", "args": []}}
    config = new_daemon(plan({"runtimes": runtimes, "default-runtime": "nvidia"}))
    assert config["runtimes"] == runtimes


def test_running_on_its_own_output_changes_nothing() -> None:
    first = plan({"labels": ["a=b"], "node-generic-resources": ["SSD=x"]})
    again = plan(first.edits[0].new_text, first.edits[1].new_text)
    assert not any(edit.changed for edit in again.edits)
    assert all(edit.diff() == "" for edit in again.edits)


def test_a_file_that_already_says_it_is_left_byte_for_byte() -> None:
    done = new_daemon(plan(None))
    # Written by hand: another indent, fleetd's block between others' entries.
    done["labels"] = ["rack=r1", *done["labels"], "zone=b"]
    text = json.dumps(done, indent="\t", separators=(",", " : "))
    assert not plan(text).edits[0].changed


def test_the_rewritten_file_keeps_the_original_indent() -> None:
    text = '{\n  "debug": true\n}\n'
    assert plan(text).edits[0].new_text.startswith('{\n  "debug": true,\n  "node-generic')


def test_an_empty_daemon_json_is_dockers_defaults() -> None:
    assert new_daemon(plan("  \n"))["default-runtime"] == "nvidia"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"debug": true,}', "not valid JSON (line 1, column 16"),
        ('["debug"]', "expected a JSON object of daemon settings, found an array"),
        ('{"labels": "rack=r1"}', 'labels: expected a list of "KEY=VALUE" strings'),
        ('{"node-generic-resources": [1]}', "node-generic-resources: expected a list"),
        ('{"runtimes": []}', "runtimes: expected an object"),
        ('{"default-runtime": "crun"}', 'default-runtime is "crun"'),
    ],
)
def test_a_daemon_json_it_cannot_merge_is_refused_with_file_and_key(
    text: str, expected: str
) -> None:
    with pytest.raises(NodeSetupError) as e:
        plan(text)
    assert str(e.value).startswith(f"{DAEMON}: ")
    assert expected in str(e.value)
    assert str(e.value).endswith("nothing was changed")


def test_a_gpu_another_resource_kind_advertises_is_noted() -> None:
    result = plan({"node-generic-resources": ["gpu=GPU-1"]})
    assert any("'gpu=GPU-1'" in note for note in result.notes)
    assert "gpu=GPU-1" in new_daemon(result)["node-generic-resources"], "theirs is kept"


# --- the GPUs -------------------------------------------------------------------------


def test_gpus_come_from_nvml_with_their_uuids() -> None:
    result = plan(None, discovery=Nvml(fakenvml.three_good_gpus()).discover())
    assert [g.uuid for g in result.gpus] == ["GPU-good0", "GPU-good1", "GPU-good2"]


@pytest.mark.parametrize(
    ("scenario", "expected"),
    [
        (fakenvml.lost_gpu_among_good_ones, "GPU 1: cannot be advertised to Swarm"),
        (fakenvml.name_and_uuid_unreadable, "GPU 0: cannot be advertised to Swarm"),
        (fakenvml.driver_not_loaded, "no NVIDIA GPU found: NVML: Driver Not Loaded"),
        (fakenvml.zero_devices, "no NVIDIA GPU found: NVML reports 0 devices"),
    ],
)
def test_a_gpu_nvml_cannot_read_refuses_the_whole_node(scenario: Any, expected: str) -> None:
    with pytest.raises(NodeSetupError, match=expected):
        plan(None, discovery=Nvml(scenario()).discover())


# --- config.toml ----------------------------------------------------------------------


def test_the_commented_out_line_is_set_and_every_other_byte_kept() -> None:
    edit = plan(None).edits[1]
    assert changed_lines(edit) == [
        (
            '#swarm-resource = "DOCKER_RESOURCE_GPU"\n',
            'swarm-resource = "DOCKER_RESOURCE_NVIDIA-GPU"\n',
        )
    ]


def test_a_set_line_gets_the_variable_added_and_keeps_its_comment() -> None:
    text = "swarm-resource = 'DOCKER_RESOURCE_GPU'  # ours\r\n\r\n[x]\r\na = 1\r\n"
    assert set_swarm_resource(text, RUNTIME) == (
        "swarm-resource = 'DOCKER_RESOURCE_GPU,DOCKER_RESOURCE_NVIDIA-GPU'  # ours\r\n"
        "\r\n[x]\r\na = 1\r\n"
    )


@pytest.mark.parametrize(
    "text",
    [
        'swarm-resource = "DOCKER_RESOURCE_NVIDIA-GPU"\n',
        'swarm-resource = "DOCKER_RESOURCE_GPU, DOCKER_RESOURCE_NVIDIA-GPU"\n[x]\n',
        '"swarm-resource" = "DOCKER_RESOURCE_NVIDIA-GPU"\n',
    ],
)
def test_a_config_that_has_it_is_unchanged(text: str) -> None:
    assert set_swarm_resource(text, RUNTIME) == text


def test_without_the_line_it_goes_before_the_first_table() -> None:
    text = "disable-require = false\n\n[nvidia-container-cli]\nswarm-resource = 'no'\n"
    assert set_swarm_resource(text, RUNTIME) == (
        'disable-require = false\nswarm-resource = "DOCKER_RESOURCE_NVIDIA-GPU"\n'
        "\n[nvidia-container-cli]\nswarm-resource = 'no'\n"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 'swarm-resource = "DOCKER_RESOURCE_NVIDIA-GPU"\n'),
        ("a = 1", 'a = 1\nswarm-resource = "DOCKER_RESOURCE_NVIDIA-GPU"\n'),
        ("[t]\n", 'swarm-resource = "DOCKER_RESOURCE_NVIDIA-GPU"\n\n[t]\n'),
    ],
)
def test_the_line_is_added_to_files_of_any_shape(text: str, expected: str) -> None:
    assert set_swarm_resource(text, RUNTIME) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("disable-require = \n", "not valid TOML"),
        ("swarm-resource = 1\n", "cannot set swarm-resource without touching other settings"),
    ],
)
def test_a_config_toml_it_cannot_edit_is_refused(text: str, expected: str) -> None:
    with pytest.raises(NodeSetupError, match=expected):
        set_swarm_resource(text, RUNTIME)


def test_the_runtime_config_can_be_left_alone() -> None:
    assert [edit.path for edit in plan(None, runtime=None).edits] == [DAEMON]


# --- the files (supervisor/edges/nodefiles.py) ----------------------------------------


def test_a_changed_file_keeps_its_mode_and_its_backup_is_the_old_bytes(tmp_path: Path) -> None:
    daemon = tmp_path / "daemon.json"
    daemon.write_bytes(b'{"debug": true}\n')
    daemon.chmod(0o640)
    (tmp_path / "daemon.json.fleetd-backup-T").write_text("an earlier backup\n")
    edit = FileEdit(str(daemon), daemon.read_text(), '{"debug": false}\n')
    backups = nodefiles.write_edits([edit], "T")
    assert backups == {str(daemon): tmp_path / "daemon.json.fleetd-backup-T-2"}
    assert (tmp_path / "daemon.json.fleetd-backup-T-2").read_bytes() == b'{"debug": true}\n'
    assert daemon.read_text() == '{"debug": false}\n'
    assert daemon.stat().st_mode & 0o777 == 0o640


def test_a_failed_write_leaves_every_file_and_no_backup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon, runtime = tmp_path / "daemon.json", tmp_path / "config.toml"
    daemon.write_text("{}\n")
    runtime.write_text("a = 1\n")

    def disk_full(texts: object, mode: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(runtime))

    monkeypatch.setattr(nodefiles, "write_all", disk_full)
    edits = [FileEdit(str(daemon), "{}\n", "{ }\n"), FileEdit(str(runtime), "a = 1\n", "a = 2\n")]
    with pytest.raises(NodeSetupError, match=f"cannot write {runtime}: No space left on device"):
        nodefiles.write_edits(edits, "T")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", "daemon.json"]


def test_nothing_is_written_when_nothing_changes(tmp_path: Path) -> None:
    daemon = tmp_path / "daemon.json"
    assert nodefiles.write_edits([FileEdit(str(daemon), "{}", "{}")], "T") == {}
    assert not daemon.exists()


def test_files_it_cannot_read_are_refused(tmp_path: Path) -> None:
    with pytest.raises(NodeSetupError, match="is Docker installed"):
        nodefiles.read_daemon_config(tmp_path / "docker" / "daemon.json")
    assert nodefiles.read_daemon_config(tmp_path / "daemon.json") is None
    (tmp_path / "daemon.json").write_bytes(b'{"labels": ["\xff"]}')
    with pytest.raises(NodeSetupError, match="not UTF-8 text"):
        nodefiles.read_daemon_config(tmp_path / "daemon.json")
    with pytest.raises(NodeSetupError, match="NVIDIA Container Toolkit is not installed"):
        nodefiles.read_runtime_config(tmp_path / "config.toml")
