"""A runtime's own report of the memory it allocated, read from its start-up log (pure).

llama.cpp's server prints one line per buffer it allocates when started with `-lv 4`:

    load_tensors:   CPU_Mapped model buffer size =    59.19 MiB
    load_tensors:        CUDA0 model buffer size =  4403.49 MiB
    llama_kv_cache:      CUDA0 KV buffer size =   512.00 MiB
    llama_context:  CUDA_Host  output buffer size =     0.12 MiB
    sched_reserve:       CUDA0 compute buffer size =   300.01 MiB

Each names the backend buffer that holds it. The device buffers (`CUDA0`, `ROCm1`,
`Vulkan0`, `Metal`, ...) are what a GPU holds; `CPU`, `CPU_Mapped`, `CPU_REPACK` and the
pinned `*_Host` buffers live in host memory. On a host with a device buffer the footprint
is what the devices hold; on a CPU-only host (no device buffer) it is the host buffers.
The figure is what the runtime itself allocated for this model with these options, so
the planner prefers it to the estimate (supervisor.analyzer.rung_need).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from supervisor.core.units import MIB

PARTS = ("model", "kv", "compute", "output")
_BUFFER = re.compile(
    r"(?P<buffer>[A-Za-z][\w-]*)\s+(?P<part>model|KV|compute|output) buffer size =\s*"
    r"(?P<mib>\d+(?:\.\d+)?) MiB"
)
_BUILD = re.compile(r"\bbuild[: ]+(?P<build>\d+) \((?P<what>[^)]*)\)")
_CONTEXT = re.compile(r"llama_context: n_ctx\s+= (?P<n>\d+)$")
_SLOTS = re.compile(r"llama_context: n_seq_max\s+= (?P<n>\d+)$")
CELL_PADDING = 256  # llama-server rounds each slot's share of -c up to a multiple of this
_HOST_BUFFER = re.compile(r"^CPU(?:_\w+)?$|_Host$")


@dataclass(frozen=True)
class Footprint:
    """What one run of the runtime allocated, by part, in bytes."""

    parts: dict[str, int]  # model, kv, compute, output: on the device (or host, CPU-only)
    on_device: bool  # False: a CPU-only run, the figures are host memory
    version: str | None  # the runtime's build, e.g. "b11669 (Debian)"
    context: int | None = None  # the context the run allocated (n_ctx), as it printed it
    slots: int | None = None  # its parallel sequences (n_seq_max)

    def ran_with(self, context: int, slots: int) -> bool:
        """Whether the run had this context and these slots (-c, -np); llama-server pads
        each slot's share of the context to whole blocks of cells."""
        if self.context is None or self.slots is None:
            return True  # the report does not say: take it as asked
        share = -(-context // slots)
        padded = -(-share // CELL_PADDING) * CELL_PADDING
        return self.slots == slots and self.context in (context, padded * slots)

    @property
    def total_bytes(self) -> int:
        return sum(self.parts.values())


def llamacpp_footprint(lines: Iterable[str]) -> Footprint | None:
    """llama-server's buffer report from its start-up log; None when it printed none (a
    verbosity below 4, or a log that does not reach the report)."""
    device: dict[str, int] = {}
    host: dict[str, int] = {}
    version = None
    shape: dict[str, int] = {}
    for raw in lines:
        line = raw.rstrip()
        if version is None and (build := _BUILD.search(line)):
            version = f"b{build['build']} ({build['what']})"
        for key, pattern in (("context", _CONTEXT), ("slots", _SLOTS)):
            if key not in shape and (number := pattern.search(line)):
                shape[key] = int(number["n"])
        found = _BUFFER.search(line)
        if found is None:
            continue
        part = found["part"].lower()
        where = host if _HOST_BUFFER.search(found["buffer"]) else device
        where[part] = where.get(part, 0) + round(float(found["mib"]) * MIB)
    if "model" not in device and "model" not in host:
        return None  # the report starts with the weights; without them it is no report
    parts = device if device else host
    return Footprint(
        {p: parts.get(p, 0) for p in PARTS},
        bool(device),
        version,
        shape.get("context"),
        shape.get("slots"),
    )
