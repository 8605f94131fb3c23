"""A fake of the pynvml module: the calls `supervisor.edges.nvml.Nvml` makes, raising real
NVMLErrors.

`pynvml.NVMLError(code)` builds the code's own subclass (`NVMLError_GpuIsLost`, ...), so the
code under test sees exactly what the real library raises. Scenarios are named after the
failure they reproduce.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace

import pynvml

GIB = 1024**3
MIB = 1024**2
NOT_AVAILABLE = 2**64 - 1  # NVML_VALUE_NOT_AVAILABLE_ulonglong, as some drivers report it


@dataclass
class FakeDevice:
    """One GPU; `fail` maps a query (`handle`, `memory`, `name`, `uuid`, `processes`) to an
    NVML error code that query raises."""

    total: int
    used: int = 0
    name: str = "NVIDIA GeForce RTX 4090"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    processes: list[tuple[int, int | None]] = field(default_factory=list)
    fail: dict[str, int] = field(default_factory=dict)

    def check(self, query: str) -> None:
        if query in self.fail:
            raise pynvml.NVMLError(self.fail[query])


class FakeNvml:
    """Stands in for the `pynvml` module; counts every call in `calls`."""

    def __init__(
        self,
        devices: list[FakeDevice] | None = None,
        init_error: int | None = None,
        driver: str = "550.54.14",
    ) -> None:
        self.devices = devices or []
        self.init_error = init_error
        self.driver = driver
        self.ready = False
        self.calls: Counter[str] = Counter()

    def _call(self, name: str) -> None:
        self.calls[name] += 1
        if not self.ready:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)

    def nvmlInit(self) -> None:
        self.calls["nvmlInit"] += 1
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)
        self.ready = True

    def nvmlShutdown(self) -> None:
        self._call("nvmlShutdown")
        self.ready = False

    def nvmlSystemGetDriverVersion(self) -> str:
        self._call("nvmlSystemGetDriverVersion")
        return self.driver

    def nvmlDeviceGetCount(self) -> int:
        self._call("nvmlDeviceGetCount")
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeDevice:
        self._call("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.devices):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        self.devices[index].check("handle")
        return self.devices[index]

    def nvmlDeviceGetMemoryInfo(self, handle: FakeDevice) -> SimpleNamespace:
        self._call("nvmlDeviceGetMemoryInfo")
        handle.check("memory")
        return SimpleNamespace(
            total=handle.total, used=handle.used, free=handle.total - handle.used
        )

    def nvmlDeviceGetName(self, handle: FakeDevice) -> str:
        self._call("nvmlDeviceGetName")
        handle.check("name")
        return handle.name

    def nvmlDeviceGetUUID(self, handle: FakeDevice) -> str:
        self._call("nvmlDeviceGetUUID")
        handle.check("uuid")
        return handle.uuid

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeDevice) -> list[SimpleNamespace]:
        self._call("nvmlDeviceGetComputeRunningProcesses")
        handle.check("processes")
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in handle.processes]


# --- scenarios ------------------------------------------------------------------------------


def library_not_found() -> FakeNvml:
    """No driver installed: libnvidia-ml.so cannot be loaded."""
    return FakeNvml(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)


def driver_not_loaded() -> FakeNvml:
    """The library is there but the kernel module is not (e.g. after a driver upgrade)."""
    return FakeNvml(init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)


def zero_devices() -> FakeNvml:
    """NVML works but sees no GPU (a container started without --gpus)."""
    return FakeNvml(devices=[])


def one_gpu() -> FakeNvml:
    return FakeNvml(devices=[FakeDevice(total=24 * GIB, used=1 * GIB, uuid="GPU-aaaa")])


def two_gpus_with_processes() -> FakeNvml:
    return FakeNvml(
        devices=[
            FakeDevice(
                total=24 * GIB,
                used=5 * GIB,
                uuid="GPU-aaaa",
                processes=[(1001, 3 * GIB), (2002, 2 * GIB)],
            ),
            FakeDevice(
                total=12 * GIB,
                used=1 * GIB,
                name="NVIDIA GeForce RTX 4070 SUPER",
                uuid="GPU-bbbb",
                processes=[(3003, 1 * GIB)],
            ),
        ]
    )


def lost_gpu_among_good_ones(query: str = "handle") -> FakeNvml:
    """GPU 1 fell off the bus (Xid 79): its `query` raises GPU_IS_LOST, GPUs 0 and 2 work."""
    good = [FakeDevice(total=24 * GIB, uuid=f"GPU-good{i}") for i in (0, 2)]
    lost = FakeDevice(total=24 * GIB, uuid="GPU-lost", fail={query: pynvml.NVML_ERROR_GPU_IS_LOST})
    return FakeNvml(devices=[good[0], lost, good[1]])


def name_and_uuid_unreadable() -> FakeNvml:
    """Older drivers or vGPUs answer NOT_SUPPORTED to some identity queries."""
    failing = {"name": pynvml.NVML_ERROR_NOT_SUPPORTED, "uuid": pynvml.NVML_ERROR_UNKNOWN}
    return FakeNvml(devices=[FakeDevice(total=16 * GIB, used=2 * GIB, fail=failing)])


def process_memory_not_available(marker: int | None = None) -> FakeNvml:
    """MIG or a Windows/WSL driver lists processes but not their memory (None or the sentinel)."""
    processes = [(1001, marker), (2002, 2 * GIB)]
    return FakeNvml(devices=[FakeDevice(total=24 * GIB, used=6 * GIB, processes=processes)])


def process_list_unreadable() -> FakeNvml:
    """The process query itself fails (NOT_SUPPORTED) while 6 GiB is in use."""
    failing = {"processes": pynvml.NVML_ERROR_NOT_SUPPORTED}
    return FakeNvml(devices=[FakeDevice(total=24 * GIB, used=6 * GIB, fail=failing)])
