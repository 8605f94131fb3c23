"""`fleetctl node init` end to end: with a fake NVML it writes a node's daemon.json, a real
dockerd started from that file joins a swarm, and the swarm's node list carries the GPUs.

Every engine here is a throwaway one (tests/integration/engines.py) in a network namespace
of its own: node init's config must be loaded by a daemon, and swarm mode must be
initialised, neither of which may happen to the machine's shared engine. Two namespaces
joined by a veth pair make a two-node swarm (a manager and a worker) on one machine.

The daemon.json node init writes is used as written, the nvidia runtime included: it
names `nvidia-container-runtime`, which is not installed here, and dockerd (20.10)
starts anyway, only logging that it cannot read the runtime's version; a container
started through it would fail. The tests that run tasks (fleetd supervising a service on
the worker) therefore drop `default-runtime` from node init's file and keep the rest (the
runtime entry, the generic resources, the labels): their tasks run under runc, where
NVIDIA_VISIBLE_DEVICES is a plain variable.

fleetd and fleetctl only ever talk to the manager's socket (DOCKER_HOST); the worker's
tasks, their logs and their replacements reach them through the manager's API. A stack's
overlay network is made by `docker stack deploy` as usual, and VXLAN runs over the veth
between the namespaces (tried by hand: a task on the manager pings one on the worker by
address and by `tasks.<service>`); IPVS is missing from the kernel here, so a service's
virtual IP does not balance, which tasks nobody calls do not need.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml

from tests.entrypoints import REPO, entry_point
from tests.integration.conftest import _unavailable
from tests.integration.engines import (
    Engine,
    Namespace,
    linked_namespaces,
    missing_netns_tools,
    throwaway_engine,
)
from tests.integration.fleet_harness import IMAGE, LADDER, SIZES, Fleet, at_rung

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


# --- a two-node swarm that runs tasks, driven through the manager only --------------------


@dataclass(frozen=True)
class TwoNodes:
    """A running two-node swarm: engines, node IDs and the files node init wrote."""

    manager: Engine
    worker: Engine
    manager_id: str
    worker_id: str
    hostname: str  # both nodes run on this machine: they share it
    manager_files: NodeFiles
    worker_files: NodeFiles
    worker_ns: Namespace

    @property
    def docker_host(self) -> str:
        """What fleetd and fleetctl are pointed at: the manager, never the worker."""
        return self.manager.base_url

    def node_gpus(self, node_id: str) -> list[str]:
        files = self.manager_files if node_id == self.manager_id else self.worker_files
        return [uuid for uuid, _, _ in SCENARIO_GPUS[files.scenario]]


def runnable(files: NodeFiles) -> None:
    """Node init's daemon.json without `default-runtime`: the NVIDIA runtime it names is not
    installed here, and these nodes run tasks."""
    written = json.loads(files.daemon.read_text())
    assert written.pop("default-runtime") == "nvidia"
    files.daemon.write_text(json.dumps(written, indent=4))


@pytest.fixture
def two_nodes(tmp_path: Path, two_namespaces: list[Namespace]) -> Iterator[TwoNodes]:
    """Node init on a manager (24 + 12 GiB GPUs) and a worker (three 80 GiB GPUs), both
    engines started from those files, the worker joined to the manager's swarm."""
    manager_ns, worker_ns = two_namespaces
    manager_files = make_node(tmp_path / "manager", "two_gpus_with_processes")
    worker_files = make_node(tmp_path / "worker", "three_good_gpus")
    for files in (manager_files, worker_files):
        node_init(files)
        runnable(files)
    with (
        throwaway_engine(manager_files.daemon, netns=manager_ns.name) as manager,
        throwaway_engine(worker_files.daemon, netns=worker_ns.name) as worker,
    ):
        init_swarm(manager, manager_ns.address)
        worker.client.swarm.join(
            remote_addrs=[f"{manager_ns.address}:2377"],
            join_token=manager.client.swarm.attrs["JoinTokens"]["Worker"],
            advertise_addr=worker_ns.address,
            listen_addr=f"{worker_ns.address}:2377",
        )
        nodes = {n.attrs["Spec"]["Role"]: n.attrs for n in wait_for_nodes(manager.client, 2)}
        yield TwoNodes(
            manager=manager,
            worker=worker,
            manager_id=nodes["manager"]["ID"],
            worker_id=nodes["worker"]["ID"],
            hostname=nodes["worker"]["Description"]["Hostname"],
            manager_files=manager_files,
            worker_files=worker_files,
            worker_ns=worker_ns,
        )


def fleetctl_on(nodes: TwoNodes, *args: str) -> dict[str, Any] | str:
    """`fleetctl ARGS` with DOCKER_HOST at the manager: its JSON, or its stdout."""
    done = subprocess.run(
        [entry_point("fleetctl"), *args],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "DOCKER_HOST": nodes.docker_host},
    )  # fmt: skip
    assert done.returncode == 0, f"fleetctl {' '.join(args)} ({done.returncode}):\n{done.stderr}"
    if "--json" in args:
        return dict(json.loads(done.stdout))
    return done.stdout


def _ladder(*rungs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"model": model, "vram": vram} for model, vram in rungs]


def test_plan_across_two_nodes_puts_each_service_on_one_node_that_fits_it(
    tmp_path: Path, two_nodes: TwoNodes
) -> None:
    # Budgets (0.85): manager 20.4 and 10.2 GiB, worker 68 GiB on each of three GPUs.
    # `batch-*` fit only on the worker's GPUs, one each; `chat` fits only the manager's
    # first GPU once they are taken; `wide` would need four GPUs, which the swarm has (five)
    # but no node has, so it is planned on its second rung.
    generic = {"runtime": "generic", "image": IMAGE, "model_env": "MODEL"}
    services = {
        **{f"batch-{i}": {**generic, "ladder": _ladder(("b-70b", "60GiB"))} for i in range(3)},
        "chat": {**generic, "ladder": _ladder(("chat-8b", "16GiB"))},
        "wide": {
            "runtime": "vllm",  # a generic app has no tensor_parallel
            "ladder": [
                {"model": "w-405b", "vram": "2GiB", "tensor_parallel": 4},
                {"model": "w-8b", "vram": "2GiB"},
            ],
        },
    }
    config = tmp_path / "fleet.yaml"
    config.write_text(
        yaml.safe_dump({"mode": "swarm", "swarm": {"stack": "plan"}, "services": services})
    )

    plan = fleetctl_on(two_nodes, "plan", "--swarm", "--json", "--config", str(config))
    assert isinstance(plan, dict)
    placed = plan["services"]
    models = {name: s["model"] for name, s in placed.items()}
    batches = {f"batch-{i}": "b-70b" for i in range(3)}
    assert models == {**batches, "chat": "chat-8b", "wide": "w-8b"}
    for name, service in placed.items():
        node = service["node"]
        assert node["hostname"] == two_nodes.hostname
        used = [g["uuid"] for g in node["gpus"]]
        # never spans nodes: every GPU of the service is one of its own node's
        assert used and set(used) <= set(two_nodes.node_gpus(node["id"])), (name, node)
    batch_gpus = [placed[f"batch-{i}"]["node"]["gpus"] for i in range(3)]
    assert all(placed[f"batch-{i}"]["node"]["id"] == two_nodes.worker_id for i in range(3))
    worker_gpus = [uuid for uuid, _, _ in SCENARIO_GPUS["three_good_gpus"]]
    assert sorted(g["uuid"] for gpus in batch_gpus for g in gpus) == worker_gpus  # one each
    assert placed["chat"]["node"]["id"] == two_nodes.manager_id
    assert [g["uuid"] for g in placed["chat"]["node"]["gpus"]] == ["GPU-aaaa"]
    text = json.dumps(plan)
    assert "no node has more than 3 it may use (a service never spans nodes)" in text, text

    # The generated stack pins each service to its node by ID, with its GPUs by UUID.
    stack = yaml.safe_load(
        str(fleetctl_on(two_nodes, "generate", "--swarm", "--config", str(config)))
    )
    for name, service in placed.items():
        spec = stack["services"][name]
        node = service["node"]
        assert spec["deploy"]["placement"]["constraints"] == [f"node.id == {node['id']}"]
        uuids = ",".join(g["uuid"] for g in node["gpus"])
        assert spec["environment"]["NVIDIA_VISIBLE_DEVICES"] == uuids


CAPACITY_MIB = 3000  # the pretend GPU of the emitter: big (4000 MiB) never fits, medium does
TASK_TIMEOUT_S = 60
STEP_DOWN_TIMEOUT_S = 90


@pytest.fixture
def emitter_on_both(
    two_nodes: TwoNodes, docker_client: docker.DockerClient, emitter_image: str
) -> str:
    """The emitter image, saved from the machine's engine and loaded into both nodes (a
    swarm node pulls what it lacks, and nothing can be pulled here)."""
    image = b"".join(docker_client.images.get(emitter_image).save(named=True))
    for engine in (two_nodes.manager, two_nodes.worker):
        engine.client.images.load(image)
    return emitter_image


def supervised_config(fleet: Fleet, stack: str, image: str) -> None:
    """One generic service of the emitter, taking its model from MODEL and printing vLLM's
    out-of-memory error for `big`, the rung the plan picks (the worker's GPUs fit it)."""
    service = {
        "runtime": "generic",
        "image": image,
        "model_env": "MODEL",
        "environment": {
            "RUNTIME": "vllm",
            "CAPACITY_MIB": str(CAPACITY_MIB),
            "MODEL_SIZES": SIZES,
            "MODEL_FROM_ENV": "1",
        },
        "ladder": _ladder(*LADDER),
    }
    fleet.write_config({"llm": service}, mode="swarm", swarm={"stack": stack})
    written = yaml.safe_load(fleet.config.read_text())
    del written["gpus"]  # the swarm's GPUs come from its nodes, not the harness's default
    fleet.config.write_text(yaml.safe_dump(written))


def generate_stack(
    nodes: TwoNodes, fleet: Fleet, path: Path, restart_delay: str = "1s"
) -> dict[str, Any]:
    """`fleetctl generate --swarm` against the manager, with the restart delay cut from 10 s
    (to 1 s by default) so that three out-of-memory exits take seconds, not half a minute."""
    fleetctl_on(nodes, "generate", "--swarm", "--config", str(fleet.config), "-o", str(path))
    stack = yaml.safe_load(path.read_text())
    stack["services"]["llm"]["deploy"]["restart_policy"]["delay"] = restart_delay
    path.write_text(yaml.safe_dump(stack))
    return dict(stack)


def deploy(nodes: TwoNodes, path: Path, stack: str) -> None:
    done = subprocess.run(
        ["docker", "stack", "deploy", "--resolve-image", "never", "-c", str(path), stack],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "DOCKER_HOST": nodes.docker_host},
    )  # fmt: skip
    assert done.returncode == 0, f"docker stack deploy: {done.stderr}"


def tasks_of(client: docker.DockerClient, service: str) -> list[dict[str, Any]]:
    found = client.api.tasks(filters={"service": service})
    return sorted(found, key=lambda t: str(t["CreatedAt"]))


def task_env(task: dict[str, Any]) -> dict[str, str]:
    env = task["Spec"]["ContainerSpec"].get("Env") or []
    return dict(e.partition("=")[::2] for e in env)


def running_on(client: docker.DockerClient, service: str, model: str) -> dict[str, Any] | None:
    """The service's newest task, once it runs `model`."""
    tasks = tasks_of(client, service)
    newest = tasks[-1] if tasks else None
    if newest and newest["Status"]["State"] == "running" and task_env(newest)["MODEL"] == model:
        return newest
    return None


def until(what: str, check: Callable[[], Any], timeout_s: float, fleet: Fleet) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        assert fleet.process is None or fleet.process.poll() is None, fleet.log.read_text()
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}\n{fleet.log.read_text()[-4000:]}")


def fleetctl_status(fleet: Fleet) -> dict[str, Any]:
    done = subprocess.run(
        [entry_point("fleetctl"), "status", "--json", "--state-dir", str(fleet.state_dir)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def test_fleetd_on_the_manager_steps_a_task_on_the_worker_down_by_service_update(
    tmp_path: Path,
    two_nodes: TwoNodes,
    emitter_on_both: str,
    fleet: Fleet,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stack, service = "nodes", "nodes_llm"
    supervised_config(fleet, stack, emitter_on_both)
    generated = generate_stack(two_nodes, fleet, tmp_path / "stack.yml")
    placement = generated["services"]["llm"]["deploy"]["placement"]["constraints"]
    assert placement == [f"node.id == {two_nodes.worker_id}"], "the plan chose the worker"
    deploy(two_nodes, tmp_path / "stack.yml", stack)

    monkeypatch.setenv("DOCKER_HOST", two_nodes.docker_host)
    fleet.start()
    state = fleet.wait_for("the step down", at_rung("llm", 1), timeout_s=STEP_DOWN_TIMEOUT_S)
    [change] = state["history"]
    assert (change["from_model"], change["to_model"]) == ("big", "medium")
    assert "CUDA out of memory" in change["evidence"]  # a worker's log line, via the manager
    manager = two_nodes.manager.client
    failed = [t for t in tasks_of(manager, service) if t["Status"]["State"] == "failed"]
    assert failed and {t["NodeID"] for t in failed} == {two_nodes.worker_id}

    task = until(
        "a task of medium running",
        lambda: running_on(manager, service, "medium"),
        TASK_TIMEOUT_S,
        fleet,
    )
    assert task["NodeID"] == two_nodes.worker_id
    template = manager.api.inspect_service(service)["Spec"]["TaskTemplate"]
    assert task_env({"Spec": template})["MODEL"] == "medium"  # the service, not only the task
    # the container is on the worker's engine, not the manager's, and runs medium
    container_id = task["Status"]["ContainerStatus"]["ContainerID"]
    container = two_nodes.worker.client.containers.get(container_id)
    env = dict(e.split("=", 1) for e in container.attrs["Config"]["Env"])
    assert env["MODEL"] == "medium"
    assert not manager.containers.list(all=True), "no task ever ran on the manager"
    until(
        "the worker's task to load medium",
        lambda: b"model=medium" in container.logs(),
        TASK_TIMEOUT_S,
        fleet,
    )

    # status follows the tasks every few seconds: it may still show a task of big at first
    report = until(
        "status to show the task of medium",
        lambda: _task_in_status(fleetctl_status(fleet), task["ID"]),
        30,
        fleet,
    )
    assert report["state"] == "running"
    assert report["node_id"] == two_nodes.worker_id
    assert report["node"] == two_nodes.hostname
    assert fleet.stop() == 0


def _task_in_status(report: dict[str, Any], task_id: str) -> dict[str, Any] | None:
    """The task `fleetctl status --json` shows for `llm`, once it is `task_id`."""
    task = report["services"]["llm"].get("task")
    return task if task and task.get("id") == task_id else None


def task_summary(nodes: TwoNodes, service: str) -> list[tuple[str, str, str, str]]:
    """Each task of `service`: its node (manager/worker), state, desired state, error."""
    role = {nodes.manager_id: "manager", nodes.worker_id: "worker"}
    return [
        (role.get(t.get("NodeID", ""), "-"), t["Status"]["State"], t["DesiredState"],
         t["Status"].get("Err", ""))
        for t in tasks_of(nodes.manager.client, service)
    ]  # fmt: skip


def fresh_log_tail(nodes: TwoNodes, service: str) -> list[str]:
    """The out-of-memory lines a new (not followed) read of the service's log gives."""
    raw = nodes.manager.client.api.service_logs(
        service, stdout=True, stderr=True, timestamps=True, follow=False, tail=200
    )
    text = b"".join(raw).decode(errors="replace")
    return [line[:60] for line in text.splitlines() if "CUDA out of memory" in line]


def node_state(nodes: TwoNodes, node_id: str) -> str:
    return str(nodes.manager.client.api.inspect_node(node_id)["Status"]["State"])


def set_link(nodes: TwoNodes, up: bool) -> None:
    """The worker's end of the veth, inside the worker's namespace: down cuts it off from
    the manager (both ends lose carrier), as a pulled cable or a crashed host would."""
    state = "up" if up else "down"
    argv = ["ip", "-n", nodes.worker_ns.name, "link", "set", "fleet0", state]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr}"


# After the worker is cut off and back, a service log stream opened before the cut delivers
# none of the worker's new lines (a fresh read through the manager does): fleetd reopens
# its streams from where they were when the manager says the node is ready again.
def test_fleetd_survives_losing_the_worker_and_steps_down_once_it_is_back(
    tmp_path: Path,
    two_nodes: TwoNodes,
    emitter_on_both: str,
    fleet: Fleet,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stack, service = "lost", "lost_llm"
    supervised_config(fleet, stack, emitter_on_both)
    # 4 s between tries: the cut lands after the first incident, long before the third
    generate_stack(two_nodes, fleet, tmp_path / "stack.yml", restart_delay="4s")
    deploy(two_nodes, tmp_path / "stack.yml", stack)
    monkeypatch.setenv("DOCKER_HOST", two_nodes.docker_host)
    fleet.start()
    fleet.wait_for("a first incident", _incidents_at_least(1), timeout_s=60)

    set_link(two_nodes, up=False)
    try:
        until(
            "the manager to see the worker down",
            lambda: node_state(two_nodes, two_nodes.worker_id) == "down",
            60,
            fleet,
        )
        assert fleet.process is not None and fleet.process.poll() is None, "fleetd must not die"
        report = fleetctl_status(fleet)  # the control socket answers while a node is lost
        assert report["services"]["llm"]["rung"] == 0
        assert fleet.state()["history"] == []
    finally:
        set_link(two_nodes, up=True)
    until(
        "the worker back", lambda: node_state(two_nodes, two_nodes.worker_id) == "ready", 60, fleet
    )

    try:
        # two more tries 4 s apart are enough: the incident from before the cut still counts
        state = fleet.wait_for(
            "the step down after the worker is back", at_rung("llm", 1), timeout_s=45
        )
    except AssertionError as e:
        raise AssertionError(
            f"{e}\ntasks: {task_summary(two_nodes, service)}\n"
            f"the manager's service log now: {fresh_log_tail(two_nodes, service)}"
        ) from None
    [change] = state["history"]
    assert (change["from_model"], change["to_model"]) == ("big", "medium")
    log = fleet.log.read_text()
    assert "is ready again: reading the services' logs on from where they were" in log
    # a node down takes its GPUs out of the swarm's list: that is no GPU fault
    assert not state.get("cordoned") and "cordoned" not in log
    manager = two_nodes.manager.client
    task = until(
        "a task of medium running",
        lambda: running_on(manager, service, "medium"),
        TASK_TIMEOUT_S,
        fleet,
    )
    assert task["NodeID"] == two_nodes.worker_id
    assert fleet.stop() == 0


def _incidents_at_least(count: int) -> Callable[[dict[str, Any]], bool]:
    return lambda s: len(s["services"].get("llm", {}).get("incidents", [])) >= count
