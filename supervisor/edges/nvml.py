"""The NVML edge: the host's GPUs read through pynvml, never raising.

Every NVML read returns a value or an explicit "unknown" (None); one lost or broken
GPU becomes an invalid record and the rest of the query still works. NVML is initialised
lazily, under a lock, on the first read. NVML's critical-Xid event stream is opened here
too (`Nvml.open_xid_events`), so pynvml's errors are translated in this one module.
"""

from __future__ import annotations

import ctypes
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pynvml

from supervisor.core.errors import FleetdError
from supervisor.core.gpus import Discovery, Gpu, GpuProcess

T = TypeVar("T")

# What NVML's discovery writes in an invalid Gpu record's `error` for a GPU that is gone,
# by code: the library's own text for that code, so a record is matched by equality,
# never by searching its message.
GPU_LOST_ERRORS = {
    str(pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)): "GPU lost",
    str(pynvml.NVMLError(pynvml.NVML_ERROR_RESET_REQUIRED)): "GPU requires reset",
}


class NvmlEventError(FleetdError):
    """NVML's event API failed (no driver, no event support, an unexpected error)."""


@dataclass(frozen=True)
class XidEvent:
    """One critical Xid NVML delivered, with what was known of its GPU when watching began."""

    xid: int
    gpu_uuid: str | None
    pci_bus_id: str | None
    index: int | None


@dataclass(frozen=True)
class _Watched:
    index: int
    uuid: str | None
    pci_bus_id: str | None


class Nvml:
    """NVML, initialised lazily under a lock; `nvml` is pynvml or a test fake of it."""

    def __init__(self, nvml: Any = pynvml) -> None:
        self._nvml = nvml
        self._lock = threading.Lock()
        self._ready = False

    def discover(self) -> Discovery:
        with self._lock:
            try:
                if not self._ready:
                    self._nvml.nvmlInit()
                    self._ready = True
                count = int(self._nvml.nvmlDeviceGetCount())
            except pynvml.NVMLError as e:
                return Discovery(gpus=(), problem=f"no NVIDIA GPU found: NVML: {e}")
            driver = self._read(lambda: str(self._nvml.nvmlSystemGetDriverVersion()))
            gpus = tuple(self._gpu(i) for i in range(count))
        problem = None if gpus else "no NVIDIA GPU found: NVML reports 0 devices"
        return Discovery(gpus=gpus, problem=problem, driver_version=driver)

    def shutdown(self) -> None:
        with self._lock:
            if self._ready:
                self._read(self._nvml.nvmlShutdown)
                self._ready = False

    def open_xid_events(self) -> XidEvents:
        """An event set registered for critical Xids on every GPU that supports NVML events.

        It holds its own NVML initialisation (NVML counts them), so `shutdown()` or a later
        `discover()` never pulls it away; `XidEvents.close()` gives it back. Raises
        NvmlEventError when NVML or its event API cannot be used at all.
        """
        nvml = self._nvml
        with self._lock:
            try:
                nvml.nvmlInit()
            except pynvml.NVMLError as e:
                raise NvmlEventError(f"NVML: {e}") from e
            try:
                event_set = nvml.nvmlEventSetCreate()
                count = int(nvml.nvmlDeviceGetCount())
            except pynvml.NVMLError as e:
                self._read(nvml.nvmlShutdown)
                raise NvmlEventError(f"NVML events: {e}") from e
            watched: dict[int, _Watched] = {}
            notes = [self._register(event_set, i, watched) for i in range(count)]
        return XidEvents(nvml, self._lock, event_set, watched, tuple(n for n in notes if n))

    def _register(self, event_set: Any, index: int, watched: dict[int, _Watched]) -> str:
        """Registers GPU `index` for critical Xids; a note when it cannot be watched."""
        nvml = self._nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            nvml.nvmlDeviceRegisterEvents(handle, pynvml.nvmlEventTypeXidCriticalError, event_set)
        except pynvml.NVMLError as e:
            return f"GPU {index}: not watched for NVML Xid events: {e}"
        watched[_handle_key(handle)] = _Watched(
            index=index,
            uuid=self._read(lambda: str(nvml.nvmlDeviceGetUUID(handle))),
            pci_bus_id=self._read(lambda: _bus_id(nvml, handle)),
        )
        return ""

    def _gpu(self, index: int) -> Gpu:
        nvml = self._nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        except pynvml.NVMLError as e:
            return Gpu(index=index, name="unknown", total_bytes=0, source="nvml", error=str(e))
        return Gpu(
            index=index,
            name=self._read(lambda: str(nvml.nvmlDeviceGetName(handle))) or "unknown",
            uuid=self._read(lambda: str(nvml.nvmlDeviceGetUUID(handle))),
            total_bytes=int(memory.total),
            used_bytes=int(memory.used),
            free_bytes=int(memory.free),
            processes=self._read(lambda: _processes(nvml, handle)),
            source="nvml",
            pci_bus_id=self._read(lambda: _bus_id(nvml, handle)),
        )

    @staticmethod
    def _read(query: Callable[[], T]) -> T | None:
        try:
            return query()
        except pynvml.NVMLError:
            return None


def _processes(nvml: Any, handle: Any) -> tuple[GpuProcess, ...]:
    found = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
    return tuple(
        GpuProcess(pid=int(p.pid), used_bytes=_known(getattr(p, "usedGpuMemory", None)))
        for p in found
    )


def _known(value: int | None) -> int | None:
    # NVML reports "not available" as None or as the all-ones sentinel.
    if value is None or value >= 2**63:
        return None
    return int(value)


class XidEvents:
    """An open NVML event set watching critical Xids; `wait()` from one thread, then `close()`."""

    def __init__(
        self,
        nvml: Any,
        lock: threading.Lock,
        event_set: Any,
        watched: dict[int, _Watched],
        notes: tuple[str, ...],
    ) -> None:
        self._nvml, self._lock, self._set = nvml, lock, event_set
        self._watched = watched
        self.notes = notes  # one line per GPU that could not be watched, and why
        self.watched_indexes = tuple(sorted(w.index for w in watched.values()))

    def wait(self, timeout_ms: int) -> XidEvent | None:
        """The next critical Xid, or None when none came within `timeout_ms`.

        Waits outside the Nvml lock, so a discovery is never held up by it. Raises
        NvmlEventError on any other NVML answer (GPU_IS_LOST: some GPU fell off the bus).
        """
        wait = getattr(self._nvml, "nvmlEventSetWait_v2", None) or self._nvml.nvmlEventSetWait
        try:
            data = wait(self._set, timeout_ms)
        except pynvml.NVMLError_Timeout:
            return None
        except pynvml.NVMLError as e:
            raise NvmlEventError(f"NVML event wait: {e}") from e
        known = self._watched.get(_handle_key(data.device))
        if known is None:  # not a handle we registered: ask NVML who it is
            uuid = Nvml._read(lambda: str(self._nvml.nvmlDeviceGetUUID(data.device)))
            known = next((w for w in self._watched.values() if uuid and w.uuid == uuid), None)
            if known is None:
                return XidEvent(xid=int(data.eventData), gpu_uuid=uuid, pci_bus_id=None, index=None)
        return XidEvent(
            xid=int(data.eventData),
            gpu_uuid=known.uuid,
            pci_bus_id=known.pci_bus_id,
            index=known.index,
        )

    def close(self) -> None:
        """Frees the event set and gives back its NVML initialisation; a second call is a no-op."""
        with self._lock:
            if self._set is None:
                return
            Nvml._read(lambda: self._nvml.nvmlEventSetFree(self._set))
            Nvml._read(self._nvml.nvmlShutdown)
            self._set = None


# A PCI address: [PCI:][domain:]bus:device[.function], hex. The forms seen:
#   00000000:3B:00.0   NVML's nvmlPciInfo_t.busId (8-digit domain, upper case)
#   0000:3B:00.0       NVML's busIdLegacy
#   PCI:0000:3b:00     the kernel log's `NVRM: Xid (PCI:0000:3b:00): 79, ...` (no function)
#   0000:01:00         older drivers' `NVRM: Xid (0000:01:00): 3, ...`
#   0000:2b:00.0       `NVRM: GPU 0000:2b:00.0: GPU has fallen off the bus.`
_PCI_ADDRESS = re.compile(
    r"(?:PCI:)?(?:(?P<domain>[0-9a-fA-F]{1,8}):)?(?P<bus>[0-9a-fA-F]{1,2}):"
    r"(?P<device>[0-9a-fA-F]{1,2})(?:\.(?P<function>[0-7]))?"
)


def normalise_bus_id(text: str) -> str | None:
    """A PCI address in any form NVML or the kernel log writes, as `00000000:3b:00.0`.

    None when `text` is not one. A form without a function means function 0: a GPU is
    function 0 of its PCI device (function 1 is its audio controller).
    """
    found = _PCI_ADDRESS.fullmatch(text.strip())
    if found is None:
        return None
    domain = int(found["domain"] or "0", 16)
    bus, device = int(found["bus"], 16), int(found["device"], 16)
    return f"{domain:08x}:{bus:02x}:{device:02x}.{int(found['function'] or '0')}"


def _bus_id(nvml: Any, handle: Any) -> str | None:
    raw = nvml.nvmlDeviceGetPciInfo(handle).busId
    # pynvml hands back str for char arrays; older versions gave bytes.
    return normalise_bus_id(raw.decode() if isinstance(raw, bytes) else str(raw))


def _handle_key(handle: Any) -> int:
    """What identifies a device handle: the address a pynvml handle points at (an event's
    `device` is a new pointer object to the same device), else the object (a test fake)."""
    if isinstance(handle, ctypes._Pointer):
        return ctypes.cast(handle, ctypes.c_void_p).value or 0
    return id(handle)
