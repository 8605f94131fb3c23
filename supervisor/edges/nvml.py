"""The NVML edge: the host's GPUs read through pynvml, never raising.

Every NVML read returns a value or an explicit "unknown" (None); one lost or broken
GPU becomes an invalid record and the rest of the query still works. NVML is initialised
lazily, under a lock, on the first read.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import pynvml

from supervisor.core.gpus import Discovery, Gpu, GpuProcess

T = TypeVar("T")


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
