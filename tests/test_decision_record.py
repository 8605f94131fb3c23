"""Each decision's record carries the GPU reading it was made with (issue 6: every
decision explained by its evidence line, its rule and what NVML read), and every place
that shows a GPU's budget shows the same one (issue 11: one budget function)."""

from __future__ import annotations

from pathlib import Path

from supervisor.analyzer import analyze, prices
from supervisor.core import step
from supervisor.core.config import load_config
from supervisor.core.gpus import resolve_gpus
from supervisor.core.ladder import apply_change
from supervisor.core.state import FleetState, PendingChange, ServiceState
from supervisor.core.status import gpus_json
from supervisor.edges.nvml import Nvml
from tests.fakenvml import GIB, FakeDevice, FakeNvml

CONFIG = """
gpus: auto
budget: 0.85
services:
  chat:
    runtime: ollama
    containers: [chat-1]
    ladder: [{model: big, vram: 6GiB}, {model: small, vram: 2GiB}]
"""


def _world(
    tmp_path: Path, fake: FakeNvml, text: str = CONFIG, managed: frozenset[int] = frozenset()
) -> step.World:
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    config = load_config(path)
    discovery = resolve_gpus(config, (), Nvml(fake))
    state = FleetState(services={"chat": ServiceState("big", 0)})
    world = step.initial_world(config, state, prices(config), 0.0, {})
    world, _ = step.step(world, step.GpusRead(discovery.gpus, discovery.problem, managed), 1.0)
    return world


def test_the_gpu_reading_goes_into_the_decision_and_its_history_record(tmp_path: Path) -> None:
    fake = FakeNvml(devices=[FakeDevice(total=24 * GIB, used=22 * GIB, name="RTX 4090")])
    reading = step.gpu_reading(_world(tmp_path, fake))
    assert reading == "GPU 0 RTX 4090: 22.0 GiB used of 24.0 GiB, fleet budget 20.4 GiB"

    pending = PendingChange(1, "small", "3 vram_oom incidents", 100.0, gpu=reading)
    _, record = apply_change(ServiceState("big", 0, pending=pending), "chat", 101.0)
    assert record.gpu == reading


def test_a_step_down_records_the_reading_it_was_decided_with(tmp_path: Path) -> None:
    fake = FakeNvml(devices=[FakeDevice(total=24 * GIB, used=22 * GIB, name="RTX 4090")])
    world = _world(tmp_path, fake)
    for second in (10, 20, 30):
        line = step.LineMatched(
            "chat-1",
            "c1",
            second * 10**9,
            0,
            "cuda.error_oom",
            "vram_oom",
            "CUDA error: out of memory",
        )
        world, effects = step.step(world, line, second + 0.5)
    pending = world.state.services["chat"].pending
    assert pending is not None and pending.to_model == "small"
    assert pending.gpu == "GPU 0 RTX 4090: 22.0 GiB used of 24.0 GiB, fleet budget 20.4 GiB"
    assert any(isinstance(e, step.Restart) and e.model == "small" for e in effects)


def test_declared_gpus_have_no_reading_to_record(tmp_path: Path) -> None:
    text = CONFIG.replace("gpus: auto", "gpus: [{memory: 24GiB}]")
    assert step.gpu_reading(_world(tmp_path, FakeNvml(devices=[]), text)) is None


def test_one_budget_in_the_plan_the_history_and_status(tmp_path: Path) -> None:
    # One 24 GiB GPU at budget 0.85 with 10 GiB in use: 8 GiB by the fleet's own container
    # (pid 100), 2 GiB by someone else's. The fleet may plan for 0.85 x 24 - 2 = 18.4 GiB,
    # and says so everywhere (before: 18.4 in the plan, 10.4 in the history, 20.4 in status).
    processes = [(100, 8 * GIB), (200, 2 * GIB)]
    fake = FakeNvml(devices=[FakeDevice(total=24 * GIB, used=10 * GIB, processes=processes)])
    world = _world(tmp_path, fake, managed=frozenset({100}))
    expected = int(0.85 * 24 * GIB) - 2 * GIB

    discovery = resolve_gpus(world.config, (), Nvml(fake))
    plan = analyze(world.config, discovery, world.managed)
    report = step.status_report(world, None, 2.0)
    assert plan.gpus[0].budget_bytes == expected
    assert gpus_json(discovery, world.config, world.managed)[0]["budget_bytes"] == expected
    assert report["gpus"][0]["budget_bytes"] == expected
    assert "fleet budget 18.4 GiB" in (step.gpu_reading(world) or "")
