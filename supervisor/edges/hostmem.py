"""Host memory as the one "device" of a CPU-only host (`accelerator: cpu`).

On such a host the models live in RAM, so fleetd plans against it the way it plans against
a GPU: one device, index 0, its total and used memory read from /proc/meminfo. Other
processes' memory is not subtracted per process (the kernel does not attribute page cache
and shared memory the way NVML attributes VRAM); the budget's margin covers the system.
"""

from __future__ import annotations

from pathlib import Path

from supervisor.core.config import FleetConfig
from supervisor.core.gpus import Discovery, Gpu, GpuReader
from supervisor.edges.nvml import Nvml

MEMINFO = Path("/proc/meminfo")
HOST_MEMORY_NAME = "host memory (CPU)"


class HostMemory:
    """Reads /proc/meminfo; never raises (an unreadable file is Discovery.problem)."""

    def __init__(self, meminfo: Path = MEMINFO) -> None:
        self.meminfo = meminfo

    def discover(self) -> Discovery:
        try:
            fields = _parse(self.meminfo.read_text())
            total, available = fields["MemTotal"], fields["MemAvailable"]
        except (OSError, KeyError, ValueError) as e:
            return Discovery(gpus=(), problem=f"cannot read host memory from {self.meminfo}: {e}")
        used = max(0, total - available)
        gpu = Gpu(
            index=0,
            name=HOST_MEMORY_NAME,
            total_bytes=total,
            source="host",
            used_bytes=used,
            free_bytes=available,
            processes=(),
        )
        return Discovery(gpus=(gpu,))

    def shutdown(self) -> None:
        """Nothing to release (NVML's reader has something)."""


def _parse(text: str) -> dict[str, int]:
    """`MemTotal:  24567812 kB` lines -> bytes by name."""
    fields = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            scale = 1024 if parts[1:] == ["kB"] else 1
            fields[name.strip()] = int(parts[0]) * scale
    return fields


def device_reader(config: FleetConfig | None) -> GpuReader:
    """What reads this host's devices: NVML, or host memory on a CPU-only host."""
    if config is not None and config.accelerator == "cpu":
        return HostMemory()
    return Nvml()
