"""Each decision's record carries the GPU reading it was made with (issue 6: every
decision explained by its evidence line, its rule and what NVML read)."""

from __future__ import annotations

from pathlib import Path

from supervisor.daemon import Daemon
from supervisor.gpus import Nvml
from supervisor.ladder import apply_change
from supervisor.state import PendingChange, ServiceState
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


def test_the_gpu_reading_goes_into_the_decision_and_its_history_record(tmp_path: Path) -> None:
    config = tmp_path / "fleet.yaml"
    config.write_text(CONFIG)
    fake = FakeNvml(devices=[FakeDevice(total=24 * GIB, used=22 * GIB, name="RTX 4090")])
    daemon = Daemon(config, tmp_path / "state", nvml=Nvml(fake))
    reading = daemon._gpu_reading()
    assert reading == "GPU 0 RTX 4090: 22.0 GiB used of 24.0 GiB, fleet budget 20.4 GiB"

    pending = PendingChange(1, "small", "3 vram_oom incidents", 100.0, gpu=reading)
    _, record = apply_change(ServiceState("big", 0, pending=pending), "chat", 101.0)
    assert record.gpu == reading


def test_declared_gpus_have_no_reading_to_record(tmp_path: Path) -> None:
    config = tmp_path / "fleet.yaml"
    config.write_text(CONFIG.replace("gpus: auto", "gpus: [{memory: 24GiB}]"))
    daemon = Daemon(config, tmp_path / "state", nvml=Nvml(FakeNvml(devices=[])))
    assert daemon._gpu_reading() is None
