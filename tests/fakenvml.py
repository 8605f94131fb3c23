"""A fake of the pynvml module: the calls `supervisor.edges.nvml.Nvml` makes, raising real
NVMLErrors.

`pynvml.NVMLError(code)` builds the code's own subclass (`NVMLError_GpuIsLost`, ...), so the
code under test sees exactly what the real library raises. Like NVML, initialisation is
counted: each nvmlInit needs its nvmlShutdown. The event API is fed by the test
(`emit_xid`, `emit_wait_error`). Scenarios are named after the failure they reproduce.
"""

from __future__ import annotations

import queue
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace

import pynvml

GIB = 1024**3
MIB = 1024**2
NOT_AVAILABLE = 2**64 - 1  # NVML_VALUE_NOT_AVAILABLE_ulonglong, as some drivers report it


@dataclass
class FakeDevice:
    """One GPU; `fail` maps a query (`handle`, `memory`, `name`, `uuid`, `processes`, `pci`,
    `events`: registering for events) to an NVML error code that query raises."""

    total: int
    used: int = 0
    name: str = "NVIDIA GeForce RTX 4090"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    processes: list[tuple[int, int | None]] = field(default_factory=list)
    fail: dict[str, int] = field(default_factory=dict)
    bus_id: str = "00000000:01:00.0"  # as NVML's nvmlPciInfo_t.busId writes it

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
        self.inits = 0  # NVML counts initialisations; shutdown happens when none is left
        self.calls: Counter[str] = Counter()
        self.event_sets: list[FakeEventSet] = []

    @property
    def ready(self) -> bool:
        return self.inits > 0

    def _call(self, name: str) -> None:
        self.calls[name] += 1
        if not self.ready:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)

    def nvmlInit(self) -> None:
        self.calls["nvmlInit"] += 1
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self._call("nvmlShutdown")
        self.inits -= 1

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

    def nvmlDeviceGetPciInfo(self, handle: FakeDevice) -> SimpleNamespace:
        self._call("nvmlDeviceGetPciInfo")
        handle.check("pci")
        return SimpleNamespace(busId=handle.bus_id, busIdLegacy=handle.bus_id[4:])

    # --- the event API ---------------------------------------------------------------------

    def nvmlEventSetCreate(self) -> FakeEventSet:
        self._call("nvmlEventSetCreate")
        event_set = FakeEventSet()
        self.event_sets.append(event_set)
        return event_set

    def nvmlDeviceRegisterEvents(
        self, handle: FakeDevice, event_types: int, event_set: FakeEventSet
    ) -> None:
        self._call("nvmlDeviceRegisterEvents")
        handle.check("events")
        event_set.registered[id(handle)] = event_types

    def nvmlEventSetWait_v2(self, event_set: FakeEventSet, timeoutms: int) -> SimpleNamespace:
        self._call("nvmlEventSetWait_v2")
        if event_set.freed:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        try:
            item = event_set.pending.get(timeout=timeoutms / 1000)
        except queue.Empty:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT) from None
        if isinstance(item, int):
            raise pynvml.NVMLError(item)
        return item

    def nvmlEventSetWait(self, event_set: FakeEventSet, timeoutms: int) -> SimpleNamespace:
        return self.nvmlEventSetWait_v2(event_set, timeoutms)

    def nvmlEventSetFree(self, event_set: FakeEventSet) -> None:
        self._call("nvmlEventSetFree")
        event_set.freed = True

    def emit_xid(
        self, index: int, xid: int, event_type: int = pynvml.nvmlEventTypeXidCriticalError
    ) -> None:
        """GPU `index` reports Xid `xid`: every open set registered for it gets the event."""
        device = self.devices[index]
        for event_set in self.event_sets:
            if event_set.registered.get(id(device), 0) & event_type and not event_set.freed:
                # Like pynvml's c_nvmlEventData_t; `device` is the handle itself here.
                event = SimpleNamespace(
                    device=device,
                    eventType=event_type,
                    eventData=xid,
                    gpuInstanceId=0xFFFFFFFF,
                    computeInstanceId=0xFFFFFFFF,
                )
                event_set.pending.put(event)

    def emit_wait_error(self, code: int) -> None:
        """The next wait on every open set raises NVML error `code` (GPU_IS_LOST, ...)."""
        for event_set in self.event_sets:
            if not event_set.freed:
                event_set.pending.put(code)


@dataclass
class FakeEventSet:
    """An nvmlEventSet_t: which devices are registered (by identity) for which event types."""

    registered: dict[int, int] = field(default_factory=dict)
    pending: queue.Queue[SimpleNamespace | int] = field(default_factory=queue.Queue)
    freed: bool = False


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
                bus_id="00000000:3B:00.0",
            ),
            FakeDevice(
                total=12 * GIB,
                used=1 * GIB,
                name="NVIDIA GeForce RTX 4070 SUPER",
                uuid="GPU-bbbb",
                processes=[(3003, 1 * GIB)],
                bus_id="00000000:AF:00.0",
            ),
        ]
    )


def three_good_gpus() -> FakeNvml:
    """An 8-GPU server's first three slots: distinct UUIDs and bus ids."""
    return FakeNvml(
        devices=[
            FakeDevice(total=80 * GIB, uuid=f"GPU-good{i}", bus_id=f"00000000:{bus}:00.0")
            for i, bus in enumerate(("18", "3B", "86"))
        ]
    )


def lost_gpu_among_good_ones(query: str = "handle") -> FakeNvml:
    """GPU 1 fell off the bus (Xid 79): its `query` raises GPU_IS_LOST, GPUs 0 and 2 work.

    The same GPUs as `three_good_gpus`, after GPU 1 was lost."""
    fake = three_good_gpus()
    fake.devices[1].fail[query] = pynvml.NVML_ERROR_GPU_IS_LOST
    return fake


def events_not_supported_on_one() -> FakeNvml:
    """GPU 0 answers NOT_SUPPORTED to event registration (a vGPU, an old board); 1 and 2 work."""
    fake = three_good_gpus()
    fake.devices[0].fail["events"] = pynvml.NVML_ERROR_NOT_SUPPORTED
    return fake


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
