"""Tests for supervisor.edges.gpufaults: NVML Xid events through a fake pynvml, the kernel
log through real driver lines in a temp file, and a lost GPU between two discoveries."""

from __future__ import annotations

import ctypes
import os
import queue
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pynvml
import pytest

from supervisor.edges import gpufaults
from supervisor.edges.gpufaults import (
    GPU_FAULT_XIDS,
    GpuFaultSeen,
    GpuWatchEnded,
    KernelLogParser,
    KernelLogWatcher,
    XidWatcher,
    lost_gpus,
)
from supervisor.edges.nvml import Nvml, _handle_key
from tests import fakenvml
from tests.fakenvml import GIB, FakeDevice, FakeNvml

NOW = 1_764_788_400.0
WAIT_S = 2.0  # the longest any record or stop may take here


def next_record(out: queue.Queue[object]) -> object:
    return out.get(timeout=WAIT_S)


def nothing_queued(out: queue.Queue[object], for_s: float = 0.3) -> bool:
    try:
        out.get(timeout=for_s)
    except queue.Empty:
        return True
    return False


def eventually(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


# --- NVML critical Xid events ---------------------------------------------------------------


@pytest.fixture
def watching() -> Iterator[Callable[[FakeNvml], tuple[XidWatcher, queue.Queue[object]]]]:
    """Starts an XidWatcher on a fake NVML and waits until its GPUs are registered."""
    started: list[XidWatcher] = []

    def start(fake: FakeNvml) -> tuple[XidWatcher, queue.Queue[object]]:
        out: queue.Queue[object] = queue.Queue()
        watcher = XidWatcher(Nvml(fake), out, wait_ms=100, clock=lambda: NOW)
        watcher.start()
        started.append(watcher)
        assert eventually(lambda: bool(watcher.watched_indexes) or not watcher.is_alive())
        return watcher, out

    yield start
    for watcher in started:
        watcher.stop()
        watcher.join(WAIT_S)


def test_a_critical_xid_79_names_its_gpu(watching: Any) -> None:
    fake = fakenvml.three_good_gpus()
    _, out = watching(fake)

    fake.emit_xid(1, 79)

    assert next_record(out) == GpuFaultSeen(
        gpu_uuid="GPU-good1",
        pci_bus_id="00000000:3b:00.0",
        index=1,
        reason="Xid 79",
        evidence="NVML critical Xid event: Xid 79 on GPU 1 GPU-good1 00000000:3b:00.0",
        source="nvml-event",
        time=NOW,
    )
    assert nothing_queued(out)


@pytest.mark.parametrize("xid", [13, 31, 43, 45, 63, 68, 92, 94])
def test_an_application_or_benign_xid_is_ignored(watching: Any, xid: int) -> None:
    fake = fakenvml.three_good_gpus()
    _, out = watching(fake)

    fake.emit_xid(0, xid)
    fake.emit_xid(2, 48)  # a fault after it: the first record out is this one

    record = next_record(out)
    assert isinstance(record, GpuFaultSeen)
    assert (record.index, record.reason) == (2, "Xid 48")
    assert nothing_queued(out)


def test_a_gpu_without_event_support_is_skipped_and_the_others_still_watched(
    watching: Any,
) -> None:
    fake = fakenvml.events_not_supported_on_one()
    watcher, out = watching(fake)

    assert watcher.watched_indexes == (1, 2)
    fake.emit_xid(0, 79)  # not registered: NVML delivers nothing for it
    fake.emit_xid(2, 95)

    record = next_record(out)
    assert isinstance(record, GpuFaultSeen)
    assert (record.gpu_uuid, record.reason) == ("GPU-good2", "Xid 95")


def test_stop_ends_the_thread_promptly_and_gives_nvml_back() -> None:
    fake = fakenvml.three_good_gpus()
    out: queue.Queue[object] = queue.Queue()
    watcher = XidWatcher(Nvml(fake), out)  # the default 1000 ms wait
    watcher.start()
    assert eventually(lambda: bool(watcher.watched_indexes))

    began = time.monotonic()
    watcher.stop()
    watcher.join(WAIT_S)

    assert not watcher.is_alive()
    assert time.monotonic() - began < WAIT_S
    assert all(s.freed for s in fake.event_sets)
    assert fake.inits == 0  # its own nvmlInit was matched by an nvmlShutdown
    assert out.empty()  # stopped, not ended: no GpuWatchEnded


def test_discovery_is_not_held_up_by_a_waiting_watcher() -> None:
    fake = fakenvml.three_good_gpus()
    nvml = Nvml(fake)
    out: queue.Queue[object] = queue.Queue()
    watcher = XidWatcher(nvml, out, wait_ms=5000)
    watcher.start()
    try:
        assert eventually(lambda: bool(watcher.watched_indexes))
        began = time.monotonic()
        assert len(nvml.discover().gpus) == 3
        assert time.monotonic() - began < 1.0
        nvml.shutdown()  # the daemon's shutdown of discovery leaves the event set open

        fake.emit_xid(0, 74)

        record = next_record(out)
        assert isinstance(record, GpuFaultSeen) and record.reason == "Xid 74"
    finally:
        watcher.stop()
        fake.emit_xid(0, 13)  # wakes the 5 s wait at once
        watcher.join(WAIT_S)
    assert fake.inits == 0


def test_a_failing_wait_is_logged_and_watching_goes_on(watching: Any) -> None:
    fake = fakenvml.three_good_gpus()
    _, out = watching(fake)

    fake.emit_wait_error(pynvml.NVML_ERROR_GPU_IS_LOST)  # names no GPU
    fake.emit_xid(1, 79)

    record = next_record(out)
    assert isinstance(record, GpuFaultSeen) and record.index == 1


@pytest.mark.parametrize(
    ("fake", "error"),
    [
        (fakenvml.driver_not_loaded, "NVML: Driver Not Loaded"),
        (fakenvml.zero_devices, "no GPU supports NVML Xid events"),
    ],
    ids=["no-driver", "no-gpu"],
)
def test_a_watcher_that_cannot_watch_ends_with_a_record(
    fake: Callable[[], FakeNvml], error: str
) -> None:
    nvml_fake = fake()
    out: queue.Queue[object] = queue.Queue()
    watcher = XidWatcher(Nvml(nvml_fake), out)

    watcher.start()
    watcher.join(WAIT_S)

    assert not watcher.is_alive()
    assert out.get_nowait() == GpuWatchEnded("nvml-event", error)
    assert nvml_fake.inits == 0


def test_pynvml_handles_to_one_device_share_a_key() -> None:
    # An event's `device` is a new ctypes pointer to the handle's device: keyed by address.
    device = pynvml.struct_c_nvmlDevice_t()
    handle = ctypes.pointer(device)
    from_event = ctypes.cast(ctypes.addressof(device), pynvml.c_nvmlDevice_t)

    assert handle is not from_event
    assert _handle_key(handle) == _handle_key(from_event)
    assert _handle_key(handle) != _handle_key(ctypes.pointer(pynvml.struct_c_nvmlDevice_t()))


def test_the_fault_xids_leave_out_the_application_errors() -> None:
    # NVIDIA's k8s-device-plugin's list: the GPU is still healthy after these.
    assert not {13, 31, 43, 45, 68} & GPU_FAULT_XIDS.keys()
    assert {48, 79, 95} <= GPU_FAULT_XIDS.keys()


# --- the kernel log: real driver lines ------------------------------------------------------

# (line, its source, the (pci_bus_id, reason) expected or None)
REAL_LINES = [
    (
        "6,1234,5678,-;NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, name=python3, "
        "GPU has fallen off the bus.",
        "/dev/kmsg record prefix: kernel Documentation/ABI/testing/dev-kmsg",
        ("00000000:3b:00.0", "Xid 79"),
    ),
    (
        "Dec  3 19:00:00 host kernel: [12345.678] NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, "
        "name=python3, GPU has fallen off the bus.",
        "syslog (rsyslog kern.log) with the dmesg timestamp",
        ("00000000:3b:00.0", "Xid 79"),
    ),
    (
        "May 18 19:02:39 kernel: NVRM: Xid (PCI:0000:2b:00): 79, GPU has fallen off the bus.",
        "github.com/NVIDIA/open-gpu-kernel-modules/issues/1151",
        ("00000000:2b:00.0", "Xid 79"),
    ),
    (
        "May 18 19:02:39 kernel: NVRM: GPU 0000:2b:00.0: GPU has fallen off the bus.",
        "github.com/NVIDIA/open-gpu-kernel-modules/issues/1151",
        ("00000000:2b:00.0", "fallen off the bus"),
    ),
    (
        "Jan 18 11:38:05 localhost kernel: [ 269.516977] NVRM: GPU at 0000:01:00.0 has fallen "
        "off the bus.",
        "pastebin.com/xJaypMZt",
        ("00000000:01:00.0", "fallen off the bus"),
    ),
    (
        "[gpu-health] [CRITICAL] GPU-1234: XID: NVRM: Xid (PCI:0000:c6:00): 79, pid=1101234, "
        "name=nvc:[driver], GPU has fallen off the bus.",
        "modal.com/docs/guide/gpu-health",
        ("00000000:c6:00.0", "Xid 79"),
    ),
    (
        "NVRM: Xid (PCI:0000:01:00): 62, 323f0f30 0000c3d8 00000000 206dae68 206da022 "
        "206da190 206d85f6 206d8d86",
        "forums.developer.nvidia.com/t/.../371272 (Xid 62, GSP watchdog)",
        ("00000000:01:00.0", "Xid 62"),
    ),
    # Xids that are not faults of the GPU
    (
        "[Fri Aug 30 11:43:09 2024] NVRM: Xid (PCI:0000:cb:00): 13, pid='<unknown>', "
        "name=<unknown>, Graphics SM Warp Exception on (GPC 7, TPC 0, SM 0): Out Of Range Address",
        "github.com/leptonai/gpud docs (dmesg --ctime)",
        None,
    ),
    (
        "NVRM: Xid (PCI:0000:10:1c): 63, pid=1896, Row Remapper: New row marked for remapping, "
        "reset gpu to activate.",
        "github.com/stas00/ml-engineering compute/accelerator/nvidia/debug.md",
        None,
    ),
    (
        "NVRM: Xid (PCI:0000:01:00): 154, GPU recovery action changed from 0x0 (None) to 0x1 "
        "(GPU Reset Required)",
        "forums.developer.nvidia.com/t/.../371272",
        None,
    ),
    (
        "Jan 18 11:38:05 localhost kernel: [ 269.517039] NVRM: Xid (0000:01:00): 3, C 00000005 "
        "SC 00000007 M 00001ffc Data ffffffff",
        "pastebin.com/xJaypMZt (an older driver: no `PCI:`)",
        None,
    ),
    # NVRM lines that are not Xids, and a line that is not NVRM's
    (
        "May 18 19:02:39 kernel: NVRM: GPU at PCI:0000:2b:00: GPU-0b11d014-1685-04bd-26ed-"
        "5fc0bc1c44ae",
        "github.com/NVIDIA/open-gpu-kernel-modules/issues/1151",
        None,
    ),
    (
        "[ 1843.439669] NVRM: loading NVIDIA UNIX Open Kernel Module for x86_64  570.158.01  "
        "Release Build  (dvs-builder@U22-I3-B10-02-5)  Mon Jun  2 13:13:04 UTC 2025",
        "github.com/NVIDIA/NVSentinel/issues/155",
        None,
    ),
    (
        "Feb 14 05:03:41 000-000-00000-1-gpu-1 kernel: mlx5_core 0000:ab:00.0 mlx5_5: Port: 1 "
        "Link ACTIVE",
        "github.com/leptonai/gpud/pull/1209",
        None,
    ),
]


@pytest.mark.parametrize(
    ("line", "source", "expected"), REAL_LINES, ids=[f"line{i}" for i in range(len(REAL_LINES))]
)
def test_real_kernel_log_lines(line: str, source: str, expected: tuple[str, str] | None) -> None:
    fault = KernelLogParser().parse(line, NOW)

    if expected is None:
        assert fault is None, source
        return
    assert fault is not None, source
    assert (fault.pci_bus_id, fault.reason) == expected, source
    assert (fault.gpu_uuid, fault.index, fault.source, fault.time) == (
        None,
        None,
        "kernel-log",
        NOW,
    )
    assert fault.evidence == line


def test_a_mig_instances_xid_names_the_whole_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # docs.nvidia.com/deploy/a100-gpu-mem-error-mgmt: an Xid 94 with MIG enabled. 94 (a
    # contained error) is not a fault; counted here only to see the bus id read.
    line = (
        "NVRM: Xid (PCI:0000:01:00 GPU-I:05): 94, pid=7194, Contained: CE User Channel (0x9). "
        "RST: No, D-RST: No"
    )
    assert KernelLogParser().parse(line, NOW) is None
    monkeypatch.setattr(gpufaults, "GPU_FAULT_XIDS", {94: "contained ECC error"})

    fault = KernelLogParser().parse(line, NOW)

    assert fault is not None
    assert (fault.pci_bus_id, fault.reason) == ("00000000:01:00.0", "Xid 94")


# github.com/NVIDIA/NVSentinel/issues/155: one message over three lines, no Xid.
NVSENTINEL_DMESG = [
    "[ 1843.308145] NVRM: The NVIDIA GPU 0000:b3:00.0",
    "               NVRM: (PCI ID: 10de:26b5) installed in this system has",
    "               NVRM: fallen off the bus and is not responding to commands.",
]


def test_fallen_off_the_bus_over_three_lines_names_the_gpu_of_the_first() -> None:
    parser = KernelLogParser()

    faults = [parser.parse(line, NOW) for line in NVSENTINEL_DMESG]

    assert faults[:2] == [None, None]
    assert faults[2] is not None
    assert (faults[2].pci_bus_id, faults[2].reason) == ("00000000:b3:00.0", "fallen off the bus")


@pytest.mark.parametrize("joint", ["\\x0a", "#012"], ids=["kmsg-escape", "rsyslog-escape"])
def test_fallen_off_the_bus_as_one_record(joint: str) -> None:
    # /dev/kmsg escapes the record's newlines as \x0a; rsyslog writes them as #012.
    text = joint.join(line.split("] ")[-1].strip() for line in NVSENTINEL_DMESG)

    fault = KernelLogParser().parse(f"3,1500,1843308145,-;{text}", NOW)

    assert fault is not None
    assert fault.pci_bus_id == "00000000:b3:00.0"


def test_fallen_off_the_bus_without_a_gpu_named_is_not_attributed() -> None:
    parser = KernelLogParser()
    parser.parse("NVRM: GPU at PCI:0000:2b:00: GPU-0b11d014", NOW)  # a bus id...
    for _ in range(4):
        parser.parse("NVRM: some other driver message", NOW)  # ...too many lines ago

    assert parser.parse("NVRM: fallen off the bus and is not responding to commands.", NOW) is None


# --- the kernel log: following a file -------------------------------------------------------

# The brief's syslog line (real format, see REAL_LINES), and two shaped like the real ones.
XID_79 = (
    "Dec  3 19:00:00 host kernel: [12345.678] NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, "
    "name=python3, GPU has fallen off the bus.\n"
)
XID_48 = (
    "Dec  3 19:00:01 host kernel: [12346.001] NVRM: Xid (PCI:0000:86:00): 48, pid=99, "
    "name=llama-server, An uncorrectable double bit error (DBE) has been detected on GPU.\n"
)
XID_13 = (
    "Dec  3 19:00:02 host kernel: [12347.002] NVRM: Xid (PCI:0000:18:00): 13, pid=42, "
    "name=python3, Graphics SM Warp Exception on (GPC 7, TPC 0, SM 0): Out Of Range Address\n"
)


def append(path: Path, text: str) -> None:
    with path.open("a") as f:
        f.write(text)


@pytest.fixture
def following() -> Iterator[Callable[[Path], tuple[KernelLogWatcher, queue.Queue[object]]]]:
    started: list[KernelLogWatcher] = []

    def start(path: Path) -> tuple[KernelLogWatcher, queue.Queue[object]]:
        out: queue.Queue[object] = queue.Queue()
        watcher = KernelLogWatcher(path, out, poll_s=0.02, clock=lambda: NOW)
        watcher.start()
        started.append(watcher)
        return watcher, out

    yield start
    for watcher in started:
        watcher.stop()
        watcher.join(WAIT_S)


def reasons(out: queue.Queue[object], count: int) -> list[tuple[str | None, str]]:
    found = []
    for _ in range(count):
        record = next_record(out)
        assert isinstance(record, GpuFaultSeen)
        found.append((record.pci_bus_id, record.reason))
    return found


def test_lines_written_before_start_are_not_reported(tmp_path: Path, following: Any) -> None:
    log = tmp_path / "kern.log"
    log.write_text(XID_79)
    _, out = following(log)

    append(log, XID_13 + XID_48)

    assert reasons(out, 1) == [("00000000:86:00.0", "Xid 48")]
    assert nothing_queued(out)


def test_a_line_is_read_once_it_is_complete(tmp_path: Path, following: Any) -> None:
    log = tmp_path / "kern.log"
    log.write_text("")
    _, out = following(log)

    half = len(XID_79) // 2
    append(log, XID_79[:half])
    assert nothing_queued(out, 0.1)
    append(log, XID_79[half:])

    assert reasons(out, 1) == [("00000000:3b:00.0", "Xid 79")]


def test_rotation_is_followed(tmp_path: Path, following: Any) -> None:
    log = tmp_path / "kern.log"
    log.write_text("")
    _, out = following(log)

    os.rename(log, tmp_path / "kern.log.1")  # logrotate's default: rename, then create
    append(tmp_path / "kern.log.1", XID_48)  # rsyslog still writes to the old one a while
    time.sleep(0.1)
    log.write_text(XID_79)

    assert reasons(out, 2) == [("00000000:86:00.0", "Xid 48"), ("00000000:3b:00.0", "Xid 79")]


def test_truncation_is_followed(tmp_path: Path, following: Any) -> None:
    log = tmp_path / "kern.log"
    log.write_text(XID_13 * 20)
    _, out = following(log)

    with log.open("r+") as f:  # logrotate's copytruncate
        f.truncate(0)
    time.sleep(0.1)
    append(log, XID_48)

    assert reasons(out, 1) == [("00000000:86:00.0", "Xid 48")]


def test_a_log_that_appears_later_is_read_from_its_start(tmp_path: Path, following: Any) -> None:
    log = tmp_path / "kern.log"
    _, out = following(log)
    time.sleep(0.1)

    log.write_text(XID_79)

    assert reasons(out, 1) == [("00000000:3b:00.0", "Xid 79")]


def test_stop_ends_the_follower_promptly(tmp_path: Path) -> None:
    out: queue.Queue[object] = queue.Queue()
    watcher = KernelLogWatcher(tmp_path / "kern.log", out)  # the default 0.5 s poll
    watcher.start()

    began = time.monotonic()
    watcher.stop()
    watcher.join(WAIT_S)

    assert not watcher.is_alive()
    assert time.monotonic() - began < 1.0
    assert out.empty()


def test_an_unreadable_log_ends_the_watcher_with_a_record(tmp_path: Path) -> None:
    out: queue.Queue[object] = queue.Queue()
    watcher = KernelLogWatcher(tmp_path, out)  # a directory

    watcher.start()
    watcher.join(WAIT_S)

    record = out.get_nowait()
    assert isinstance(record, GpuWatchEnded)
    assert record.source == "kernel-log" and str(tmp_path) in record.error


def test_kmsg_records_are_read_without_blocking() -> None:
    # /dev/kmsg hands one record per read, ` KEY=value` continuation lines after it; a
    # non-blocking pipe stands in for it (writing real kernel log records is not a test's).
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    tail = object.__new__(gpufaults._KmsgTail)
    tail._fd = read_fd
    try:
        os.write(write_fd, b"6,1234,5678,-;NVRM: Xid (PCI:0000:3b:00): 79, GPU has fallen off\n")
        os.write(write_fd, b" SUBSYSTEM=pci\n DEVICE=+pci:0000:3b:00.0\n")

        assert list(tail.lines()) == [
            "6,1234,5678,-;NVRM: Xid (PCI:0000:3b:00): 79, GPU has fallen off"
        ]
        assert list(tail.lines()) == []
    finally:
        tail.close()
        os.close(write_fd)


@pytest.mark.skipif(not os.access("/dev/kmsg", os.R_OK), reason="/dev/kmsg is not readable here")
def test_dev_kmsg_is_followed_from_now_and_stops() -> None:
    out: queue.Queue[object] = queue.Queue()
    watcher = KernelLogWatcher("/dev/kmsg", out, poll_s=0.05)
    watcher.start()
    time.sleep(0.2)

    watcher.stop()
    watcher.join(WAIT_S)

    assert not watcher.is_alive()
    assert all(isinstance(r, GpuFaultSeen) for r in list(out.queue))  # no GpuWatchEnded


# --- NVML reporting a GPU lost --------------------------------------------------------------


@pytest.mark.parametrize("query", ["handle", "memory"])
def test_a_gpu_nvml_reports_lost_is_a_fault(query: str) -> None:
    before = Nvml(fakenvml.three_good_gpus()).discover()
    after = Nvml(fakenvml.lost_gpu_among_good_ones(query)).discover()

    assert lost_gpus(before, after, NOW) == [
        GpuFaultSeen(
            gpu_uuid="GPU-good1",
            pci_bus_id="00000000:3b:00.0",
            index=1,
            reason="GPU lost",
            evidence="NVML: GPU 1: GPU is lost",
            source="nvml-discovery",
            time=NOW,
        )
    ]


def test_a_gpu_that_needs_a_reset_is_a_fault() -> None:
    before = Nvml(fakenvml.three_good_gpus()).discover()
    fake = fakenvml.three_good_gpus()
    fake.devices[2].fail["memory"] = pynvml.NVML_ERROR_RESET_REQUIRED

    (fault,) = lost_gpus(before, Nvml(fake).discover(), NOW)

    assert (fault.index, fault.gpu_uuid, fault.reason) == (2, "GPU-good2", "GPU requires reset")


def test_a_gpu_no_longer_listed_is_a_fault_even_when_the_others_renumber() -> None:
    before = Nvml(fakenvml.three_good_gpus()).discover()
    fake = fakenvml.three_good_gpus()
    del fake.devices[1]  # the driver dropped it: GPU 2 is now index 1

    (fault,) = lost_gpus(before, Nvml(fake).discover(), NOW)

    assert (fault.index, fault.gpu_uuid, fault.pci_bus_id) == (1, "GPU-good1", "00000000:3b:00.0")
    assert fault.reason == "GPU lost"
    assert "GPU-good1" in fault.evidence and "GPU-good2" in fault.evidence


def test_the_last_gpu_no_longer_listed_is_a_fault() -> None:
    before = Nvml(fakenvml.three_good_gpus()).discover()
    fake = fakenvml.three_good_gpus()
    del fake.devices[2]

    (fault,) = lost_gpus(before, Nvml(fake).discover(), NOW)

    assert (fault.index, fault.gpu_uuid) == (2, "GPU-good2")


@pytest.mark.parametrize(
    "after",
    [
        pytest.param(lambda: Nvml(fakenvml.three_good_gpus()).discover(), id="unchanged"),
        pytest.param(lambda: Nvml(fakenvml.driver_not_loaded()).discover(), id="nvml-gone"),
        pytest.param(
            lambda: Nvml(
                FakeNvml(
                    devices=[
                        FakeDevice(total=80 * GIB, uuid="GPU-good0", bus_id="00000000:18:00.0"),
                        FakeDevice(total=80 * GIB, fail={"memory": pynvml.NVML_ERROR_UNKNOWN}),
                        FakeDevice(total=80 * GIB, uuid="GPU-good2", bus_id="00000000:86:00.0"),
                    ]
                )
            ).discover(),
            id="another-nvml-error",
        ),
    ],
)
def test_no_fault_without_a_lost_gpu(after: Callable[[], Any]) -> None:
    before = Nvml(fakenvml.three_good_gpus()).discover()

    assert lost_gpus(before, after(), NOW) == []


def test_a_gpu_already_lost_is_not_reported_again() -> None:
    lost = Nvml(fakenvml.lost_gpu_among_good_ones()).discover()

    assert lost_gpus(lost, lost, NOW) == []
