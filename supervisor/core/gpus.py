"""The GPUs fleetd plans for: what one is (pure data), declared ones, simulated ones.

NVML's readings come from the NVML edge (`supervisor/nvml.py`); this module never
imports pynvml, so the planner, the step and the status report stay pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from supervisor.core.config import FleetConfig, GpuDeclaration
from supervisor.core.errors import UsageError
from supervisor.core.units import parse_size

GpuSource = Literal["nvml", "declared", "simulated", "host", "swarm"]


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
    pci_bus_id: str | None = None  # NVML's, as `00000000:3b:00.0` (edges.nvml.normalise_bus_id)

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


class GpuReader(Protocol):
    """What reads the host's GPUs (supervisor.edges.nvml.Nvml), or its memory on a
    CPU-only host (supervisor.edges.hostmem.HostMemory)."""

    def discover(self) -> Discovery: ...

    def shutdown(self) -> None: ...


def resolve_gpus(config: FleetConfig, simulated: Sequence[str], nvml: GpuReader) -> Discovery:
    """The GPUs to plan for: `--gpu` options, else declared ones, else NVML's."""
    if simulated:
        return Discovery(gpus=simulated_gpus(simulated))
    if config.gpus != "auto":
        return Discovery(gpus=declared_gpus(config.gpus))
    return nvml.discover()
