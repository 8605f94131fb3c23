"""Edges that notice a GPU fault: NVML's critical Xid events, the kernel log, a lost GPU.

Threads only read and put plain records (`GpuFaultSeen`) on the daemon's queue; whether
and how a GPU is cordoned is decided by the daemon's main loop. Each record names its GPU
by whatever the source knows (UUID, PCI bus id, NVML index); bus ids are all in the form
`normalise_bus_id` writes, so a kernel-log record and `Gpu.pci_bus_id` compare equal.
"""

from __future__ import annotations

import io
import os
import queue
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal, Protocol

from loguru import logger

from supervisor.core.gpus import Discovery, Gpu
from supervisor.edges.nvml import (
    GPU_LOST_ERRORS,
    Nvml,
    NvmlEventError,
    XidEvent,
    XidEvents,
    normalise_bus_id,
)

FaultSource = Literal["nvml-event", "kernel-log", "nvml-discovery"]

# The Xids that are faults of the GPU itself: after one, the GPU should take no new work
# until it is reset or replaced. From NVIDIA's Xid catalog (docs.nvidia.com/deploy/
# xid-errors/analyzing-xid-catalog.html: these want a GPU reset, a reboot or service, not
# RESTART_APP), its GPU memory error management guide (docs.nvidia.com/deploy/
# a100-gpu-mem-error-mgmt/: 48, 95) and NVIDIA Health Validation's Xid checks (48 is
# CRITICAL, "drain: reset_gpu"). Left out on purpose:
#   13, 31, 43, 45, 68  application errors; NVIDIA's k8s-device-plugin skips the same ones
#                       (internal/rm/health.go: "Application errors: the GPU should still
#                       be healthy")
#   63                  a row remap recorded; NVIDIA's guide: with a remap pending "new
#                       workloads can be launched", it takes effect at the next reset
#   92                  a high rate of *corrected* single-bit ECC errors: a trend to watch
#   94                  a *contained* ECC error: only the application that hit it is
#                       ended, the GPU keeps serving (the guide's "error containment")
GPU_FAULT_XIDS: Mapping[int, str] = MappingProxyType(
    {
        48: "double-bit (uncorrectable) ECC error",
        62: "internal micro-controller halt",
        64: "row remapping / page retirement failed",
        74: "NVLink error",
        79: "GPU has fallen off the bus",
        95: "uncontained ECC error",
        119: "GSP RPC timeout",
        120: "GSP error",
    }
)

FALLEN_OFF_THE_BUS = "fallen off the bus"


@dataclass(frozen=True)
class GpuFaultSeen:
    """A GPU fault some source reported; at least one of uuid / pci_bus_id / index is set."""

    gpu_uuid: str | None
    pci_bus_id: str | None  # as normalise_bus_id writes it: `00000000:3b:00.0`
    index: int | None  # NVML's index
    reason: str  # short: "Xid 79", "fallen off the bus", "GPU lost"
    evidence: str  # the kernel-log line, or what NVML said
    source: FaultSource
    time: float  # epoch seconds when fleetd read it


@dataclass(frozen=True)
class GpuWatchEnded:
    """A fault watcher stopped on its own (not by stop()): that source is no longer watched."""

    source: FaultSource
    error: str


def is_gpu_fault(xid: int) -> bool:
    return xid in GPU_FAULT_XIDS


# --- NVML critical Xid events ---------------------------------------------------------------


class XidWatcher(threading.Thread):
    """Puts a GpuFaultSeen on `out` for each critical Xid NVML reports that is a GPU fault."""

    def __init__(
        self,
        nvml: Nvml,
        out: queue.Queue[object],
        wait_ms: int = 1000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(name="nvml-xid-events", daemon=True)
        self._nvml, self._out, self._wait_ms, self._clock = nvml, out, wait_ms, clock
        self._stopped = threading.Event()
        self.watched_indexes: tuple[int, ...] = ()  # the GPUs registered, once running

    def stop(self) -> None:
        """Ends the thread within one wait (`wait_ms`)."""
        self._stopped.set()

    def run(self) -> None:
        try:
            events = self._nvml.open_xid_events()
        except NvmlEventError as e:
            self._end(str(e))
            return
        try:
            for note in events.notes:
                logger.info(note)
            self.watched_indexes = events.watched_indexes
            if not events.watched_indexes:
                self._end("no GPU supports NVML Xid events")
                return
            while not self._stopped.is_set():
                self._wait_once(events)
        finally:
            events.close()

    def _wait_once(self, events: XidEvents) -> None:
        try:
            event = events.wait(self._wait_ms)
        except NvmlEventError as e:
            # GPU_IS_LOST names no GPU (discovery's lost_gpus will); a failing wait may
            # return at once, so pause rather than spin.
            logger.warning(f"{e}; watching on")
            self._stopped.wait(self._wait_ms / 1000)
            return
        if event is not None:
            fault = xid_fault(event, self._clock())
            if fault is not None:
                self._out.put(fault)

    def _end(self, error: str) -> None:
        logger.warning(f"not watching NVML Xid events: {error}")
        if not self._stopped.is_set():
            self._out.put(GpuWatchEnded("nvml-event", error))


def xid_fault(event: XidEvent, now_s: float) -> GpuFaultSeen | None:
    """The fault an NVML Xid event reports, or None: not a GPU fault, or no GPU named."""
    known = (event.index, event.gpu_uuid, event.pci_bus_id)
    gpu = " ".join(str(part) for part in known if part is not None) or "(unknown)"
    if not is_gpu_fault(event.xid):
        logger.debug(f"NVML: Xid {event.xid} on GPU {gpu}: not a GPU fault, ignored")
        return None
    if all(part is None for part in known):
        logger.warning(f"NVML: Xid {event.xid} on a GPU NVML cannot name; not attributed")
        return None
    return GpuFaultSeen(
        gpu_uuid=event.gpu_uuid,
        pci_bus_id=event.pci_bus_id,
        index=event.index,
        reason=f"Xid {event.xid}",
        evidence=f"NVML critical Xid event: Xid {event.xid} on GPU {gpu}",
        source="nvml-event",
        time=now_s,
    )


# --- the kernel log -------------------------------------------------------------------------

# The NVIDIA driver's lines, as they reach a kernel log. Each example's source is noted.
#   NVRM: Xid (PCI:0000:2b:00): 79, GPU has fallen off the bus.
#       github.com/NVIDIA/open-gpu-kernel-modules/issues/1151 (journalctl -k)
#   NVRM: Xid (PCI:0000:c6:00): 79, pid=1101234, name=nvc:[driver], GPU has fallen off the bus.
#       modal.com/docs/guide/gpu-health
#   NVRM: Xid (PCI:0000:01:00 GPU-I:05): 94, pid=7194, Contained: CE User Channel (0x9). ...
#       docs.nvidia.com/deploy/a100-gpu-mem-error-mgmt (a MIG instance inside the brackets)
#   NVRM: Xid (0000:01:00): 3, C 00000005 SC 00000007 M 00001ffc Data ffffffff
#       pastebin.com/xJaypMZt (older drivers: no `PCI:`)
_BUS = r"(?:PCI:)?[0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}(?:\.[0-7])?"
_XID = re.compile(rf"NVRM: Xid \((?P<bus>{_BUS})[^)]*\): (?P<xid>\d+)\b")

#   NVRM: GPU 0000:2b:00.0: GPU has fallen off the bus.
#       github.com/NVIDIA/open-gpu-kernel-modules/issues/1151
#   NVRM: GPU at 0000:01:00.0 has fallen off the bus.
#       pastebin.com/xJaypMZt, pastebin.com/C4RfJB4y (syslog, with `[ 269.516977]`)
#   NVRM: The NVIDIA GPU 0000:b3:00.0
#   NVRM: (PCI ID: 10de:26b5) installed in this system has
#   NVRM: fallen off the bus and is not responding to commands.
#       github.com/NVIDIA/NVSentinel/issues/155 (dmesg: one message over three lines; in
#       /dev/kmsg it is one record)
_GPU_AT = re.compile(rf"NVRM: (?:The NVIDIA )?GPU (?:at )?(?P<bus>{_BUS})")

# /dev/kmsg's record prefix `prio,seq,usec,flags;` (Documentation/ABI/testing/dev-kmsg).
_KMSG_PREFIX = re.compile(r"^\d+,\d+,\d+,[^;]*;")

# How many lines after `NVRM: The NVIDIA GPU <bus>` a bus-less "fallen off the bus" line
# still belongs to it.
_CARRY_LINES = 3


class KernelLogParser:
    """Turns kernel-log lines into GpuFaultSeen records; keeps the little state a message
    split over lines needs."""

    def __init__(self) -> None:
        self._last_bus: str | None = None
        self._lines_since_bus = 0

    def parse(self, line: str, now_s: float) -> GpuFaultSeen | None:
        """The fault `line` reports, or None; `line` becomes the record's evidence."""
        line = line.rstrip("\n")
        text = _KMSG_PREFIX.sub("", line, count=1)
        if "NVRM: " not in text:
            return None
        self._lines_since_bus += 1
        xid = _XID.search(text)
        if xid is not None:
            return self._xid(int(xid["xid"]), xid["bus"], line, now_s)
        gpu = _GPU_AT.search(text)
        if gpu is not None:
            self._last_bus, self._lines_since_bus = normalise_bus_id(gpu["bus"]), 0
        if FALLEN_OFF_THE_BUS not in text:
            return None
        bus = self._last_bus if self._lines_since_bus <= _CARRY_LINES else None
        if bus is None:
            logger.warning(f"kernel log: a GPU fell off the bus, no bus id given: {line}")
            return None
        return _kernel_fault(bus, "fallen off the bus", line, now_s)

    @staticmethod
    def _xid(xid: int, bus_text: str, line: str, now_s: float) -> GpuFaultSeen | None:
        bus = normalise_bus_id(bus_text)
        if not is_gpu_fault(xid):
            logger.debug(f"kernel log: Xid {xid} on {bus}: not a GPU fault, ignored")
            return None
        if bus is None:
            logger.warning(f"kernel log: Xid {xid} with an unreadable bus id: {line}")
            return None
        return _kernel_fault(bus, f"Xid {xid}", line, now_s)


def _kernel_fault(bus: str, reason: str, line: str, now_s: float) -> GpuFaultSeen:
    return GpuFaultSeen(
        gpu_uuid=None,
        pci_bus_id=bus,
        index=None,
        reason=reason,
        evidence=line.strip(),
        source="kernel-log",
        time=now_s,
    )


class KernelLogWatcher(threading.Thread):
    """Follows a kernel log like `tail -F` and puts a GpuFaultSeen on `out` for each fault.

    `path` is a file (/var/log/kern.log, /var/log/messages: read from its end at start,
    followed across rotation and truncation, or from its start once it appears) or the
    /dev/kmsg character device (records from now on). Polled every `poll_s`.
    """

    def __init__(
        self,
        path: Path | str,
        out: queue.Queue[object],
        poll_s: float = 0.5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(name="kernel-log", daemon=True)
        self.path, self._out, self._poll_s, self._clock = Path(path), out, poll_s, clock
        self._stopped = threading.Event()
        self._parser = KernelLogParser()
        # Positioned now, not when the thread first runs: what is written after the
        # constructor returns is what it reports. A log it may not read ends the thread
        # at once, with a GpuWatchEnded.
        self._tail: _Tail | None = None
        self._error = ""
        try:
            kmsg = _is_char_device(self.path)
            self._tail = _KmsgTail(self.path) if kmsg else _FileTail(self.path)
        except OSError as e:
            self._error = str(e)

    def stop(self) -> None:
        """Ends the thread within one poll (`poll_s`)."""
        self._stopped.set()

    def run(self) -> None:
        if self._tail is None:
            self._end(self._error)
            return
        try:
            while not self._stopped.wait(self._poll_s):
                for line in self._tail.lines():
                    fault = self._parser.parse(line, self._clock())
                    if fault is not None:
                        self._out.put(fault)
        except OSError as e:
            self._end(str(e))
        finally:
            self._tail.close()

    def _end(self, error: str) -> None:
        logger.warning(f"not watching the kernel log {self.path}: {error}")
        if not self._stopped.is_set():
            self._out.put(GpuWatchEnded("kernel-log", f"{self.path}: {error}"))


class _Tail(Protocol):
    def lines(self) -> Iterator[str]: ...

    def close(self) -> None: ...


class _FileTail:
    """A log file read like `tail -F`: what was appended since the last call, as lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: io.FileIO | None = None
        self._partial = b""
        self._open(from_end=True)

    def _open(self, from_end: bool) -> None:
        try:
            self._file = io.FileIO(self.path, "rb")
        except FileNotFoundError:
            self._file = None  # not there yet: read it from its start once it appears
            return
        if from_end:
            self._file.seek(0, os.SEEK_END)

    def lines(self) -> Iterator[str]:
        if self._file is None:
            self._open(from_end=False)
            if self._file is None:
                return
        yield from self._read_new()
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return  # rotated away, the new one not yet made: keep the old one open
        current = os.fstat(self._file.fileno())
        if (now.st_dev, now.st_ino) != (current.st_dev, current.st_ino):
            # Rotated: finish the old file (a line may have landed since the read above),
            # then read the new one from its start.
            yield from self._read_new()
            if self._partial:
                yield self._partial.decode("utf-8", errors="replace")
            self.close()
            self._partial = b""
            self._open(from_end=False)
            if self._file is not None:
                yield from self._read_new()
        elif now.st_size < self._file.tell():
            # Truncated in place (copytruncate): start again from its start.
            self._file.seek(0)
            self._partial = b""
            yield from self._read_new()

    def _read_new(self) -> Iterator[str]:
        assert self._file is not None
        data = self._partial + self._file.read()
        *complete, self._partial = data.split(b"\n")
        for raw in complete:
            yield raw.decode("utf-8", errors="replace")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class _KmsgTail:
    """/dev/kmsg: one record per read(), from the end at start; never blocks."""

    def __init__(self, path: Path) -> None:
        self._fd: int | None = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        os.lseek(self._fd, 0, os.SEEK_END)

    def lines(self) -> Iterator[str]:
        while self._fd is not None:
            try:
                record = os.read(self._fd, 8192)
            except BlockingIOError:
                return
            except BrokenPipeError:
                # The ring buffer overwrote records we had not read; read on from here.
                logger.warning("kernel log /dev/kmsg: records were overwritten before read")
                continue
            if not record:
                return
            for raw in record.split(b"\n"):
                if raw and not raw.startswith(b" "):  # ` KEY=value` continuation lines
                    yield raw.decode("utf-8", errors="replace")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _is_char_device(path: Path) -> bool:
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return False


# --- NVML reporting a GPU lost --------------------------------------------------------------


def lost_gpus(before: Discovery, after: Discovery, now_s: float) -> list[GpuFaultSeen]:
    """The GPUs valid in `before` that `after` reports lost or no longer lists.

    A GPU is lost when its record in `after` (same UUID, else same index) is invalid with
    NVML's GPU_IS_LOST or RESET_REQUIRED, or when no GPU in `after` has its UUID and its
    index is gone or taken by another GPU. An `after` with no GPU at all says NVML itself
    is unavailable, a host problem rather than one GPU's, and yields nothing.
    """
    if not after.gpus:
        return []
    faults = []
    for gpu in before.gpus:
        if gpu.valid:
            fault = _lost(gpu, after, now_s)
            if fault is not None:
                faults.append(fault)
    return faults


def _lost(gpu: Gpu, after: Discovery, now_s: float) -> GpuFaultSeen | None:
    same_uuid = [g for g in after.gpus if gpu.uuid is not None and g.uuid == gpu.uuid]
    if any(g.valid for g in same_uuid):
        return None
    at_index = next((g for g in after.gpus if g.index == gpu.index), None)
    if at_index is None:
        evidence = f"NVML no longer lists GPU {gpu.index} ({gpu.uuid})"
        return _discovery_fault(gpu, "GPU lost", evidence, now_s)
    if not at_index.valid:
        reason = GPU_LOST_ERRORS.get(at_index.error or "")
        if reason is None:
            return None  # another NVML error: not evidence that the GPU is gone
        evidence = f"NVML: GPU {gpu.index}: {at_index.error}"
        return _discovery_fault(gpu, reason, evidence, now_s)
    if gpu.uuid is None or at_index.uuid is None or at_index.uuid == gpu.uuid:
        return None  # the same GPU as far as NVML can tell
    evidence = f"NVML no longer lists {gpu.uuid}; index {gpu.index} is now {at_index.uuid}"
    return _discovery_fault(gpu, "GPU lost", evidence, now_s)


def _discovery_fault(gpu: Gpu, reason: str, evidence: str, now_s: float) -> GpuFaultSeen:
    return GpuFaultSeen(
        gpu_uuid=gpu.uuid,
        pci_bus_id=gpu.pci_bus_id,
        index=gpu.index,
        reason=reason,
        evidence=evidence,
        source="nvml-discovery",
        time=now_s,
    )
