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

from supervisor.core.units import GIB, MIB

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

    def ran_with(self, context: int | None, slots: int) -> bool:
        """Whether the run had this context and these slots (-c, -np); llama-server pads
        each slot's share of the context to whole blocks of cells."""
        if self.context is None or context is None:
            return True  # the report (or the rung) does not say: take it as asked
        if self.slots is None:  # vLLM: no slots, the context as asked
            return self.context == context
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


# vLLM reports what it took at INFO level, whatever the device:
#   Model loading took 14.9921 GiB and 5.24 seconds        (GPU: weights on the device)
#   Available KV cache memory: 17.54 GiB                    (GPU: the KV cache it allocates)
#   Checkpoint size: 0.00 GiB.                              (CPU: the weights)
#   Explicitly set (1.0/16.34) GiB for KV cache on node 0.  (CPU: VLLM_CPU_KVCACHE_SPACE)
#   Auto set (1.1/16.34) GiB for KV cache on node 0, ... 0.53 GiB memory was consumed by
#   non-kv usages.                                          (CPU: sized by itself)
_VLLM_GIB = (
    ("model", True, re.compile(r"Model loading took (?P<gib>\d+(?:\.\d+)?) GiB")),
    ("kv", True, re.compile(r"Available KV cache memory: (?P<gib>\d+(?:\.\d+)?) GiB")),
    ("model", False, re.compile(r"Checkpoint size: (?P<gib>\d+(?:\.\d+)?) GiB")),
    ("kv", False, re.compile(r"set \((?P<gib>\d+(?:\.\d+)?)/[\d.]+\) GiB for KV cache")),
    ("non_kv", False, re.compile(r"(?P<gib>\d+(?:\.\d+)?) GiB memory was consumed by non-kv")),
)
_VLLM_VERSION = re.compile(r"Initializing a V1 LLM engine \(v(?P<v>[^)]+)\)")
_VLLM_CONTEXT = re.compile(r"Using max model len (?P<n>\d+)")


def vllm_footprint(lines: Iterable[str]) -> Footprint | None:
    """vLLM's report of its weights and KV cache (and, on CPU when it sized the cache
    itself, the rest); None when it reported no KV cache. Read once the server is healthy:
    a start that failed after sizing its cache reports one too."""
    found: dict[str, int] = {}
    on_device = False
    version = context = None
    for line in lines:
        for part, device, pattern in _VLLM_GIB:
            if part not in found and (number := pattern.search(line)):
                found[part] = round(float(number["gib"]) * GIB)
                on_device = on_device or device
        if version is None and (named := _VLLM_VERSION.search(line)):
            version = f"vLLM {named['v']}"
        if context is None and (length := _VLLM_CONTEXT.search(line)):
            context = int(length["n"])
    if "kv" not in found:
        return None
    model = found.get("model", 0)
    compute = max(0, found["non_kv"] - model) if "non_kv" in found else 0
    parts = {"model": model, "kv": found["kv"], "compute": compute, "output": 0}
    return Footprint(parts, on_device, version, context, None)


def runtime_footprint(parser: str, lines: Iterable[str]) -> Footprint | None:
    """The report of the runtime whose registry entry names `parser`."""
    return {"llamacpp": llamacpp_footprint, "vllm": vllm_footprint}[parser](lines)
