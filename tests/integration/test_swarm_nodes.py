"""`fleetctl node init` end to end: with a fake NVML it writes a node's daemon.json, a real
dockerd started from that file joins a swarm, and the swarm's node list carries the GPUs.

Every engine here is a throwaway one (tests/integration/engines.py) in a network namespace
of its own: node init's config must be loaded by a daemon, and swarm mode must be
initialised, neither of which may happen to the machine's shared engine. Two namespaces
joined by a veth pair make a two-node swarm (a manager and a worker) on one machine.

The daemon.json node init writes is used as written, the nvidia runtime included: it
names `nvidia-container-runtime`, which is not installed here, and dockerd (20.10)
starts anyway, only logging that it cannot read the runtime's version; a container
started through it would fail, and none is started.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.entrypoints import REPO
from tests.integration.conftest import _unavailable
from tests.integration.engines import (
    Engine,
    Namespace,
    linked_namespaces,
    missing_netns_tools,
    throwaway_engine,
)

pytestmark = pytest.mark.integration

GIB = 1024**3

# fleetctl's own main(), as the console script runs it, with NVML replaced by a
# tests/fakenvml.py scenario (named by the first argument).
FLEETCTL_WITH_FAKE_NVML = """\
import sys
from supervisor.edges import nvml
from tests import fakenvml
fake = getattr(fakenvml, sys.argv.pop(1))()
class FakeNvml(nvml.Nvml):
    def __init__(self) -> None:
        super().__init__(fake)
nvml.Nvml = FakeNvml
from supervisor.cli.fleetctl import main
main()
"""

# A user's own settings, which node init must keep.
USER_DAEMON_JSON = """\
{
    "log-level": "warn",
    "max-concurrent-downloads": 5,
    "labels": ["rack=r1"]
}
"""

# What `nvidia-ctk config default` writes, trimmed (swarm-resource commented out).
RUNTIME_TOML = """\
disable-require = false
#swarm-resource = "DOCKER_RESOURCE_GPU"

[nvidia-container-cli]
load-kmods = true
"""

# What each fake NVML scenario reports: (uuid, name, total bytes) by index.
SCENARIO_GPUS = {
    "two_gpus_with_processes": [
        ("GPU-aaaa", "NVIDIA GeForce RTX 4090", 24 * GIB),
        ("GPU-bbbb", "NVIDIA GeForce RTX 4070 SUPER", 12 * GIB),
    ],
    "three_good_gpus": [(f"GPU-good{i}", "NVIDIA GeForce RTX 4090", 80 * GIB) for i in range(3)],
}


@dataclass(frozen=True)
class NodeFiles:
    """One node's daemon.json and NVIDIA runtime config.toml, and its fake GPUs."""

    daemon: Path
    runtime: Path
    scenario: str

    def texts(self) -> dict[str, bytes]:
        """Every file in both folders (backups included), by path."""
        folders = {self.daemon.parent, self.runtime.parent}
        return {str(p): p.read_bytes() for folder in folders for p in sorted(folder.iterdir())}


def make_node(folder: Path, scenario: str) -> NodeFiles:
    node = NodeFiles(folder / "docker" / "daemon.json", folder / "nvidia" / "config.toml", scenario)
    for path, text in ((node.daemon, USER_DAEMON_JSON), (node.runtime, RUNTIME_TOML)):
        path.parent.mkdir(parents=True)
        path.write_text(text)
    return node


def node_init(node: NodeFiles) -> dict[str, Any]:
    """`fleetctl node init --json` on these files; its report."""
    done = subprocess.run(
        [sys.executable, "-c", FLEETCTL_WITH_FAKE_NVML, node.scenario, "node", "init",
         "--daemon-config", str(node.daemon), "--runtime-config", str(node.runtime), "--json"],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"node init failed ({done.returncode}):\n{done.stderr}"
    report: dict[str, Any] = json.loads(done.stdout)
    return report


@pytest.fixture(scope="module")
def netns_tools() -> None:
    why = missing_netns_tools()
    if why is not None:
        _unavailable(why)


@pytest.fixture
def one_namespace(netns_tools: None) -> Iterator[Namespace]:
    with linked_namespaces(1) as (namespace,):
        yield namespace


@pytest.fixture
def two_namespaces(netns_tools: None) -> Iterator[list[Namespace]]:
    with linked_namespaces(2) as namespaces:
        yield namespaces


def init_swarm(engine: Engine, address: str) -> None:
    # The engine has a network namespace of its own, so Swarm's usual 2377 is free there.
    engine.client.swarm.init(advertise_addr=address, listen_addr=f"{address}:2377")


def expected_labels(scenario: str) -> dict[str, str]:
    gpus = SCENARIO_GPUS[scenario]
    labels = {"org.fleetd.gpus": str(len(gpus))}
    for index, (uuid, name, total) in enumerate(gpus):
        labels |= {
            f"org.fleetd.gpu.{index}.uuid": uuid,
            f"org.fleetd.gpu.{index}.name": name,
            f"org.fleetd.gpu.{index}.memory_bytes": str(total),
        }
    return labels


def gpu_resources(description: dict[str, Any]) -> list[str]:
    """The NVIDIA-GPU generic resources a node advertises, as their UUIDs."""
    resources = description["Resources"].get("GenericResources") or []
    return [
        r["NamedResourceSpec"]["Value"]
        for r in resources
        if r.get("NamedResourceSpec", {}).get("Kind") == "NVIDIA-GPU"
    ]


def assert_advertises(description: dict[str, Any], node: NodeFiles) -> None:
    """The node's description is what node init wrote in its daemon.json, GPU for GPU."""
    uuids = [uuid for uuid, _, _ in SCENARIO_GPUS[node.scenario]]
    assert gpu_resources(description) == uuids
    labels = description["Engine"].get("Labels") or {}
    fleetd_labels = {k: v for k, v in labels.items() if k.startswith("org.fleetd.gpu")}
    assert fleetd_labels == expected_labels(node.scenario)
    written = dict(label.split("=", 1) for label in json.loads(node.daemon.read_text())["labels"])
    assert labels == written, "the engine carries exactly daemon.json's labels"
    assert labels["rack"] == "r1"


def test_node_init_makes_the_gpus_visible_to_a_real_swarm_and_runs_once(
    tmp_path: Path, one_namespace: Namespace
) -> None:
    node = make_node(tmp_path, "two_gpus_with_processes")
    report = node_init(node)
    daemon_report, runtime_report = report["files"]
    assert daemon_report["changed"] and runtime_report["changed"] and report["restart_docker"]
    backup = Path(daemon_report["backup"])
    assert backup.read_text() == USER_DAEMON_JSON, "the backup is the user's file, unchanged"
    assert Path(runtime_report["backup"]).read_text() == RUNTIME_TOML
    written = json.loads(node.daemon.read_text())
    assert written["log-level"] == "warn" and written["max-concurrent-downloads"] == 5
    assert written["default-runtime"] == "nvidia"
    assert 'swarm-resource = "DOCKER_RESOURCE_NVIDIA-GPU"\n' in node.runtime.read_text()

    with throwaway_engine(node.daemon, netns=one_namespace.name) as engine:
        info = engine.client.info()
        assert info["DefaultRuntime"] == "nvidia" and "nvidia" in info["Runtimes"]
        init_swarm(engine, one_namespace.address)
        (swarm_node,) = engine.client.nodes.list()
        assert_advertises(swarm_node.attrs["Description"], node)

    files_after_first_run = node.texts()
    again = node_init(node)
    assert [f["changed"] for f in again["files"]] == [False, False]
    assert not again["restart_docker"]
    assert node.texts() == files_after_first_run, "no file rewritten, no new backup"


def wait_for_nodes(client: docker.DockerClient, count: int, timeout_s: float = 30) -> list[Any]:
    """The swarm's nodes once `count` of them are ready (a joined worker reports in a
    heartbeat later)."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = client.nodes.list()
        ready = [n for n in nodes if n.attrs["Status"]["State"] == "ready"]
        if len(ready) == count or time.monotonic() > deadline:
            states = [(n.attrs["Status"].get("Addr"), n.attrs["Status"]["State"]) for n in nodes]
            assert len(ready) == count, f"after {timeout_s} s the nodes are {states}"
            return ready
        time.sleep(0.2)


def test_two_nodes_in_one_swarm_each_advertise_their_own_gpus(
    tmp_path: Path, two_namespaces: list[Namespace]
) -> None:
    manager_ns, worker_ns = two_namespaces
    manager_files = make_node(tmp_path / "manager", "two_gpus_with_processes")
    worker_files = make_node(tmp_path / "worker", "three_good_gpus")
    for files in (manager_files, worker_files):
        node_init(files)

    with (
        throwaway_engine(manager_files.daemon, netns=manager_ns.name) as manager,
        throwaway_engine(worker_files.daemon, netns=worker_ns.name) as worker,
    ):
        init_swarm(manager, manager_ns.address)
        token = manager.client.swarm.attrs["JoinTokens"]["Worker"]
        worker.client.swarm.join(
            remote_addrs=[f"{manager_ns.address}:2377"],
            join_token=token,
            advertise_addr=worker_ns.address,
            listen_addr=f"{worker_ns.address}:2377",
        )
        nodes = wait_for_nodes(manager.client, 2)
        by_address = {n.attrs["Status"]["Addr"]: n.attrs for n in nodes}
        assert sorted(by_address) == [manager_ns.address, worker_ns.address]
        assert by_address[manager_ns.address]["Spec"]["Role"] == "manager"
        assert by_address[worker_ns.address]["Spec"]["Role"] == "worker"
        assert_advertises(by_address[manager_ns.address]["Description"], manager_files)
        assert_advertises(by_address[worker_ns.address]["Description"], worker_files)
