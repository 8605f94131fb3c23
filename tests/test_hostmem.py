"""Host memory as the device of a CPU-only host (supervisor/edges/hostmem.py)."""

from __future__ import annotations

from pathlib import Path

import yaml

from supervisor.core.config import load_config
from supervisor.core.gpus import resolve_gpus
from supervisor.edges.hostmem import HOST_MEMORY_NAME, HostMemory, device_reader
from supervisor.edges.nvml import Nvml

MEMINFO = """MemTotal:       24567812 kB
MemFree:         1000000 kB
MemAvailable:   20000000 kB
Buffers:          100000 kB
HugePages_Total:       0
"""


def config(tmp_path: Path, **top: object) -> Path:
    path = tmp_path / "fleet.yaml"
    ladder = [{"model": "/m/a.gguf", "vram": "1GiB"}]
    service = {"runtime": "llamacpp", "containers": ["c"], "ladder": ladder}
    path.write_text(yaml.safe_dump({**top, "services": {"c": service}}))
    return path


def test_host_memory_is_one_device_with_total_and_used(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    found = HostMemory(meminfo).discover()
    assert found.problem is None
    (device,) = found.gpus
    assert (device.index, device.name, device.source) == (0, HOST_MEMORY_NAME, "host")
    assert device.total_bytes == 24567812 * 1024
    assert device.used_bytes == (24567812 - 20000000) * 1024
    assert device.free_bytes == 20000000 * 1024
    assert device.unmanaged_bytes() == 0  # no per-process attribution on a CPU host


def test_unreadable_meminfo_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    found = HostMemory(tmp_path / "missing").discover()
    assert found.gpus == ()
    assert found.problem is not None and "cannot read host memory" in found.problem
    (tmp_path / "partial").write_text("MemTotal: 1000 kB\n")
    assert "MemAvailable" in (HostMemory(tmp_path / "partial").discover().problem or "")


def test_the_accelerator_picks_the_reader(tmp_path: Path) -> None:
    assert isinstance(device_reader(load_config(config(tmp_path))), Nvml)
    cpu = load_config(config(tmp_path, accelerator="cpu"))
    reader = device_reader(cpu)
    assert isinstance(reader, HostMemory)
    (device,) = resolve_gpus(cpu, (), reader).gpus  # this machine's real /proc/meminfo
    assert device.total_bytes > 0 and device.source == "host"


def test_an_unknown_accelerator_is_refused_with_the_choices(tmp_path: Path) -> None:
    import pytest

    from supervisor.core.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(config(tmp_path, accelerator="amd"))
    assert "accelerator" in str(e.value) and "'nvidia'" in str(e.value) and "'cpu'" in str(e.value)
