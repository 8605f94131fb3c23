"""GPU discovery through NVML (pynvml), declared GPUs, and simulated ones (`--gpu`).

Every NVML read returns a value or an explicit "unknown" (None); one lost or broken
GPU becomes an invalid record and the rest of the query still works.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import pynvml

from supervisor.config import FleetConfig, GpuDeclaration
from supervisor.errors import UsageError
from supervisor.units import parse_size

GpuSource = Literal["nvml", "declared", "simulated"]
T = TypeVar("T")


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_bytes: int | None  # None: NVML cannot tell (MIG, some drivers)


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    total_bytes: int
    source: GpuSource
    uuid: str | None = None
    used_bytes: int | None = None
    free_bytes: int | None = None
    processes: tuple[GpuProcess, ...] | None = ()  # None: NVML could not list them
    error: str | None = None  # set on an invalid record (lost GPU, NVML error)

    @property
    def valid(self) -> bool:
        return self.error is None

    def unmanaged_bytes(self, managed_pids: frozenset[int] = frozenset()) -> int:
        """Memory held by processes fleetd does not manage (0 when nothing is known)."""
        processes = self.processes
        if processes is not None and all(p.used_bytes is not None for p in processes):
            return sum(p.used_bytes or 0 for p in processes if p.pid not in managed_pids)
        # Per-process figures are missing: count all used memory but what we know is ours.
        ours = sum(p.used_bytes or 0 for p in processes or () if p.pid in managed_pids)
        return max(0, (self.used_bytes or 0) - ours)


@dataclass(frozen=True)
class Discovery:
    gpus: tuple[Gpu, ...]
    problem: str | None = None  # why NVML found nothing, for one clear line
    driver_version: str | None = None
    notes: tuple[str, ...] = field(default=())


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


def declared_gpus(declarations: Sequence[GpuDeclaration]) -> tuple[Gpu, ...]:
    return tuple(
        Gpu(index=i, name=d.name, total_bytes=d.memory, source="declared")
        for i, d in enumerate(declarations)
    )


def simulated_gpus(specs: Iterable[str]) -> tuple[Gpu, ...]:
    """GPUs from `--gpu SIZE[:NAME]` options, e.g. `24GiB:RTX 4090`."""
    gpus = []
    for index, spec in enumerate(specs):
        size_text, _, name = spec.partition(":")
        try:
            size = parse_size(size_text)
        except ValueError as e:
            raise UsageError(f"--gpu {spec!r}: {e} (expected SIZE[:NAME])") from None
        if size <= 0:
            raise UsageError(f"--gpu {spec!r}: expected a positive size (SIZE[:NAME])")
        gpus.append(
            Gpu(index=index, name=name or "simulated GPU", total_bytes=size, source="simulated")
        )
    return tuple(gpus)


def resolve_gpus(config: FleetConfig, simulated: Sequence[str], nvml: Nvml) -> Discovery:
    """The GPUs to plan for: `--gpu` options, else declared ones, else NVML's."""
    if simulated:
        return Discovery(gpus=simulated_gpus(simulated))
    if config.gpus != "auto":
        return Discovery(gpus=declared_gpus(config.gpus))
    return nvml.discover()
