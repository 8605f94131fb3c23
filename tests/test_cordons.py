"""Cordoned GPUs: a faulted GPU is planned on no more, and its services move (pure step)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import docker
import docker.errors
import pynvml
import pytest

from supervisor.core import cordons, step
from supervisor.core.config import load_config
from supervisor.core.gpus import declared_gpus
from supervisor.core.plan import RungNeed
from supervisor.core.state import Cordon, FleetState, ServiceState
from supervisor.core.step import World
from supervisor.daemon import Daemon
from supervisor.edges.nvml import Nvml
from tests.fakenvml import FakeNvml, three_good_gpus

MIB = 1024**2
T0 = 1_000_000.0

FLEET = """
budget: 0.85
gpus: [{name: a, memory: 8GiB}, {name: b, memory: 8GiB}]
policy: {incidents_to_step_down: 3, incident_window: 10m, cooldown: 60s}
services:
  chat:
    runtime: llamacpp
    containers: [chat-1]
    ladder:
      - {model: big, vram: 4000MiB}
      - {model: medium, vram: 2500MiB}
      - {model: small, vram: 1000MiB}
  other:
    runtime: llamacpp
    containers: [other-1]
    gpu: 1
    ladder:
      - {model: other, vram: OTHER}
"""


def world(tmp_path: Path, other_mib: int) -> World:
    path = tmp_path / "fleet.yaml"
    path.write_text(FLEET.replace("OTHER", f"{other_mib}MiB"))
    config = load_config(path)
    needs = {
        "chat": [
            RungNeed(i, m, b * MIB, "declared", "declared")
            for i, (m, b) in enumerate((("big", 4000), ("medium", 2500), ("small", 1000)))
        ],
        "other": [RungNeed(0, "other", other_mib * MIB, "declared", "declared")],
    }
    state = FleetState(services={"chat": ServiceState("big", 0), "other": ServiceState("other", 0)})
    w = step.initial_world(config, state, needs, T0, {"pid": 1})
    assert not isinstance(config.gpus, str)
    return replace(w, gpus=declared_gpus(config.gpus), docker_up=True)


def fault(gpu: int) -> step.GpuFault:
    line = "NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, GPU has fallen off the bus."
    return step.GpuFault(gpu, "Xid 79", line, "kernel-log")


def of(effects: list[step.Effect], kind: type) -> list:  # type: ignore[type-arg]
    return [e for e in effects if isinstance(e, kind)]


def test_a_faulted_gpus_service_moves_to_a_healthy_gpu_at_the_same_rung(tmp_path: Path) -> None:
    # `other` (2000 MiB) is pinned to GPU 1; chat (4000 MiB) fits beside it there, so
    # wherever the planner put chat, a fault of its GPU moves it to the other one.
    start = world(tmp_path, 2000)
    outcomes = {}
    for gpu in (0, 1):
        after, effects = step.step(start, fault(gpu), T0 + 1)
        outcomes[gpu] = (after, effects)
    moved = {gpu: of(e, step.Restart) for gpu, (_, e) in outcomes.items()}
    chat_moves = [(gpu, r) for gpu, rs in moved.items() for r in rs if r.service == "chat"]
    [(faulted, restart)] = chat_moves
    assert restart.setup.gpus == (1 - faulted,) and restart.setup.rung == 0
    after, effects = outcomes[faulted]
    chat = after.state.services["chat"]
    assert (chat.rung, chat.pending, chat.incidents) == (0, None, [])  # never a step down
    cordon = after.state.cordoned[faulted]
    assert (cordon.reason, cordon.by) == ("Xid 79", "fleetd (kernel-log)")
    assert "fallen off the bus" in (cordon.evidence or "")
    assert any(isinstance(e, step.Save) for e in effects)
    texts = [e.text for e in of(effects, step.Log)]
    assert any(t.startswith(f"GPU {faulted} cordoned (Xid 79") for t in texts)
    assert (
        f"chat: GPU {faulted} cordoned (Xid 79): moved to GPU {1 - faulted} at the same rung"
        in texts
    )


def test_a_move_takes_the_largest_rung_that_fits_on_the_healthy_gpu(tmp_path: Path) -> None:
    # other (3000 MiB) pinned to GPU 1 leaves 3963 MiB of its 6963 MiB budget: chat's
    # big (4000) was on GPU 0; after GPU 0 faults it runs medium (2500) on GPU 1.
    after, effects = step.step(world(tmp_path, 3000), fault(0), T0 + 1)
    chat = after.state.services["chat"]
    assert chat.pending is not None and chat.pending.to_rung == 1
    assert (
        chat.pending.reason
        == "GPU 0 cordoned (Xid 79): moved to GPU 1 at rung 1, the largest that fits"
    )
    [restart] = of(effects, step.Restart)
    assert (restart.service, restart.setup.rung, restart.setup.gpus, restart.handoff) == (
        "chat",
        1,
        (1,),
        True,
    )
    assert chat.incidents == []


def test_no_room_on_a_healthy_gpu_stops_the_service_with_the_reason(tmp_path: Path) -> None:
    after, effects = step.step(world(tmp_path, 6000), fault(0), T0 + 1)
    [stop] = of(effects, step.StopContainers)
    assert stop.containers == ("chat-1",)
    assert after.state.services["chat"].rung == 0  # not stepped down
    assert any("chat: GPU 0 cordoned (Xid 79); " in e.text for e in of(effects, step.Log))


def test_a_fault_of_a_gpu_already_cordoned_changes_nothing(tmp_path: Path) -> None:
    once, _ = step.step(world(tmp_path, 3000), fault(0), T0 + 1)
    twice, effects = step.step(once, fault(0), T0 + 2)
    assert effects == [] and twice.state.cordoned == once.state.cordoned


def test_a_person_cordons_and_uncordons_a_gpu(tmp_path: Path) -> None:
    start = world(tmp_path, 3000)
    ask = step.Request(1, "cordon", None, {"gpu": 0, "reason": "fan noise"}, "alice")
    after, effects = step.step(start, ask, T0 + 1)
    [reply] = of(effects, step.Reply)
    assert reply.status == 200 and reply.body["moves"][0]["service"] == "chat"
    assert after.state.cordoned[0] == Cordon(T0 + 1, "fan noise", None, "alice", None)
    status = step.status_report(after, None, T0 + 2)
    gpu0 = next(g for g in status["gpus"] if g["index"] == 0)
    assert "cordoned: fan noise" in str(gpu0)
    _, effects = step.step(after, replace(ask, call=2), T0 + 3)
    assert of(effects, step.Reply)[0].status == 409
    back, effects = step.step(after, step.Request(3, "uncordon", None, {"gpu": 0}, "bob"), T0 + 4)
    assert back.state.cordoned == {} and of(effects, step.Reply)[0].status == 200


@pytest.mark.parametrize("gpu", [7, "0", None, True])
def test_cordoning_a_gpu_fleetd_does_not_know_is_a_usage_error(tmp_path: Path, gpu: object) -> None:
    start = world(tmp_path, 3000)
    after, effects = step.step(start, step.Request(1, "cordon", None, {"gpu": gpu}, "a"), T0)
    [reply] = of(effects, step.Reply)
    assert (
        reply.status == 400
        and "expected the index of a GPU fleetd knows (0, 1)" in reply.body["error"]
    )
    assert after.state.cordoned == {}


# --- the daemon: each fault source cordons the GPU it names ------------------------------

DAEMON_FLEET = """
budget: 0.85
kernel_log: KERNEL_LOG
services:
  chat:
    runtime: llamacpp
    containers: [chat-1]
    ladder:
      - {model: big, vram: 60GiB}
      - {model: small, vram: 20GiB}
"""


def _no_docker() -> docker.DockerClient:
    raise docker.errors.DockerException("no Docker in this test")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Daemon, FakeNvml, Path]]:
    kernel_log = tmp_path / "kern.log"
    kernel_log.write_text("Dec  3 19:00:00 gpu1 kernel: [1.0] NVRM: loading NVIDIA UNIX driver\n")
    (tmp_path / "fleet.yaml").write_text(DAEMON_FLEET.replace("KERNEL_LOG", str(kernel_log)))
    fake = three_good_gpus()
    running = Daemon(
        tmp_path / "fleet.yaml", tmp_path / "state", docker_factory=_no_docker,
        nvml=Nvml(fake), serve_metrics=False,
    )  # fmt: skip
    running.start()
    yield running, fake, kernel_log
    running.shutdown()


def _wait_cordoned(daemon: Daemon, gpu: int) -> Cordon:
    deadline = time.monotonic() + 10
    while gpu not in daemon.state.cordoned and time.monotonic() < deadline:
        daemon.drain(0.2)
    return daemon.state.cordoned[gpu]


def _chat_gpu(daemon: Daemon) -> int:
    status = step.status_report(daemon.world, None, time.time())
    gpus = cordons.usable(daemon.world.gpus, daemon.state.cordoned)
    plan = cordons._placed(daemon.config, daemon.state, gpus, daemon.world.needs, frozenset())
    [gpu] = plan["chat"]
    assert any(g["index"] == gpu for g in status["gpus"])
    return gpu


def test_an_nvml_xid_event_cordons_its_gpu_and_moves_the_service(
    daemon: tuple[Daemon, FakeNvml, Path],
) -> None:
    running, fake, _ = daemon
    gpu = _chat_gpu(running)
    fake.emit_xid(gpu, 13)  # an application's error: not the GPU's
    fake.emit_xid(gpu, 79)
    cordon = _wait_cordoned(running, gpu)
    assert (cordon.reason, cordon.by, cordon.uuid) == (
        "Xid 79",
        "fleetd (nvml-event)",
        f"GPU-good{gpu}",
    )
    assert set(running.state.cordoned) == {gpu}
    assert _chat_gpu(running) != gpu  # planned elsewhere now
    assert running.state.services["chat"].incidents == []


def test_a_kernel_log_xid_line_cordons_the_gpu_on_that_bus(
    daemon: tuple[Daemon, FakeNvml, Path],
) -> None:
    running, _, kernel_log = daemon
    with kernel_log.open("a") as log:  # GPU 1 is on bus 3b (three_good_gpus)
        log.write(
            "Dec  3 19:05:01 gpu1 kernel: [4242.1] NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, "
            "name=python3, GPU has fallen off the bus.\n"
        )
    cordon = _wait_cordoned(running, 1)
    assert cordon.reason in ("Xid 79", "fallen off the bus")
    assert "PCI:0000:3b:00" in (cordon.evidence or "")


def test_a_gpu_nvml_loses_is_cordoned(daemon: tuple[Daemon, FakeNvml, Path]) -> None:
    running, fake, _ = daemon
    fake.devices[2].fail["handle"] = pynvml.NVML_ERROR_GPU_IS_LOST
    running.queue.put(step.Tick("gpus"))  # the periodic NVML reading
    cordon = _wait_cordoned(running, 2)
    assert (cordon.reason, cordon.by) == ("GPU lost", "fleetd (nvml-discovery)")
