"""Tests for supervisor.core.gpus and supervisor.edges.nvml: NVML discovery through a fake
pynvml, simulated and declared GPUs."""

from __future__ import annotations

from typing import Any

import pynvml
import pytest

from supervisor.core.config import FleetConfig
from supervisor.core.errors import UsageError
from supervisor.core.gpus import Gpu, GpuProcess, resolve_gpus, simulated_gpus
from supervisor.edges.nvml import Nvml, normalise_bus_id
from tests import fakenvml
from tests.fakenvml import GIB, NOT_AVAILABLE, FakeDevice, FakeNvml

LADDER = [{"model": "tinyllama:1.1b", "vram": "637MiB"}]


def fleet(**top: Any) -> FleetConfig:
    services = {"alpha": {"runtime": "ollama", "containers": ["alpha"], "ladder": LADDER}}
    return FleetConfig.model_validate({"services": services, **top})


# --- NVML discovery -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scenario", "code"),
    [
        (fakenvml.library_not_found, pynvml.NVML_ERROR_LIBRARY_NOT_FOUND),
        (fakenvml.driver_not_loaded, pynvml.NVML_ERROR_DRIVER_NOT_LOADED),
    ],
    ids=["library-not-found", "driver-not-loaded"],
)
def test_missing_nvml_is_a_problem_not_a_crash(scenario: Any, code: int) -> None:
    discovery = Nvml(scenario()).discover()

    assert discovery.gpus == ()
    assert discovery.problem is not None
    assert discovery.problem.startswith("no NVIDIA GPU found: ")
    assert str(pynvml.NVMLError(code)) in discovery.problem


def test_zero_devices_says_so() -> None:
    discovery = Nvml(fakenvml.zero_devices()).discover()

    assert discovery.gpus == ()
    assert discovery.problem is not None
    assert "no NVIDIA GPU found" in discovery.problem
    assert "0 devices" in discovery.problem


def test_one_gpu_reports_memory_identity_and_driver() -> None:
    fake = fakenvml.one_gpu()

    discovery = Nvml(fake).discover()

    assert discovery.problem is None
    assert discovery.driver_version == fake.driver
    (gpu,) = discovery.gpus
    device = fake.devices[0]
    assert gpu.valid and gpu.source == "nvml" and gpu.index == 0
    assert (gpu.name, gpu.uuid) == (device.name, device.uuid)
    assert (gpu.total_bytes, gpu.used_bytes) == (device.total, device.used)
    assert gpu.free_bytes == device.total - device.used


def test_two_gpus_list_their_processes() -> None:
    fake = fakenvml.two_gpus_with_processes()

    gpus = Nvml(fake).discover().gpus

    assert [g.index for g in gpus] == [0, 1]
    assert [g.total_bytes for g in gpus] == [d.total for d in fake.devices]
    for gpu, device in zip(gpus, fake.devices, strict=True):
        assert gpu.processes == tuple(GpuProcess(pid, used) for pid, used in device.processes)


@pytest.mark.parametrize("query", ["handle", "memory"])
def test_lost_gpu_is_an_invalid_record_and_the_others_still_work(query: str) -> None:
    fake = fakenvml.lost_gpu_among_good_ones(query)

    discovery = Nvml(fake).discover()

    assert [g.index for g in discovery.gpus] == [0, 1, 2]
    good0, lost, good2 = discovery.gpus
    assert not lost.valid
    assert lost.error == str(pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST))
    assert good0.valid and good2.valid
    assert (good0.uuid, good2.uuid) == ("GPU-good0", "GPU-good2")
    assert good2.total_bytes == fake.devices[2].total
    assert discovery.problem is None


def test_unreadable_name_and_uuid_leave_a_valid_record() -> None:
    fake = fakenvml.name_and_uuid_unreadable()

    (gpu,) = Nvml(fake).discover().gpus

    assert gpu.valid
    assert gpu.name == "unknown"
    assert gpu.uuid is None
    assert gpu.total_bytes == fake.devices[0].total


def test_init_runs_once_across_discoveries() -> None:
    fake = fakenvml.one_gpu()
    nvml = Nvml(fake)

    first, second = nvml.discover(), nvml.discover()

    assert fake.calls["nvmlInit"] == 1
    assert first == second


def test_nothing_touches_nvml_before_the_first_discovery() -> None:
    fake = fakenvml.one_gpu()

    Nvml(fake)

    assert sum(fake.calls.values()) == 0


def test_failed_init_is_retried_on_the_next_discovery() -> None:
    fake = fakenvml.driver_not_loaded()
    nvml = Nvml(fake)
    assert nvml.discover().problem is not None

    fake.init_error = None  # the driver came back
    fake.devices = [FakeDevice(total=8 * GIB)]

    assert len(nvml.discover().gpus) == 1
    assert fake.calls["nvmlInit"] == 2


def test_shutdown_then_discover_initialises_again() -> None:
    fake = fakenvml.one_gpu()
    nvml = Nvml(fake)
    nvml.discover()

    nvml.shutdown()
    nvml.shutdown()  # a second shutdown is a no-op
    gpus = nvml.discover().gpus

    assert fake.calls["nvmlShutdown"] == 1
    assert fake.calls["nvmlInit"] == 2
    assert len(gpus) == 1


def test_unreadable_driver_version_is_none() -> None:
    fake = fakenvml.one_gpu()
    fake.nvmlSystemGetDriverVersion = _raise_not_supported  # type: ignore[method-assign]

    discovery = Nvml(fake).discover()

    assert discovery.driver_version is None
    assert len(discovery.gpus) == 1


def _raise_not_supported() -> str:
    raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)


# --- PCI bus ids ----------------------------------------------------------------------------


def test_each_gpu_carries_its_pci_bus_id_in_one_form() -> None:
    gpus = Nvml(fakenvml.two_gpus_with_processes()).discover().gpus

    assert [g.pci_bus_id for g in gpus] == ["00000000:3b:00.0", "00000000:af:00.0"]


def test_unreadable_pci_info_leaves_a_valid_record_without_a_bus_id() -> None:
    fake = FakeNvml(devices=[FakeDevice(total=GIB, fail={"pci": pynvml.NVML_ERROR_UNKNOWN})])

    (gpu,) = Nvml(fake).discover().gpus

    assert gpu.valid and gpu.pci_bus_id is None


def test_a_lost_gpu_has_no_bus_id() -> None:
    _, lost, _ = Nvml(fakenvml.lost_gpu_among_good_ones()).discover().gpus

    assert not lost.valid and lost.pci_bus_id is None


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("00000000:3B:00.0", "00000000:3b:00.0"),  # NVML's nvmlPciInfo_t.busId
        ("0000:3B:00.0", "00000000:3b:00.0"),  # NVML's busIdLegacy
        ("PCI:0000:3b:00", "00000000:3b:00.0"),  # the kernel's `NVRM: Xid (PCI:...)`
        ("0000:01:00", "00000000:01:00.0"),  # older drivers' `NVRM: Xid (0000:01:00)`
        ("0000:2b:00.0", "00000000:2b:00.0"),  # `NVRM: GPU 0000:2b:00.0: ...`
        ("3b:00.0", "00000000:3b:00.0"),  # lspci's short form
        ("0001:c1:00.1", "00000001:c1:00.1"),
    ],
)
def test_bus_ids_from_nvml_and_the_kernel_compare_equal(text: str, normal: str) -> None:
    assert normalise_bus_id(text) == normal


@pytest.mark.parametrize("text", ["", "GPU-aaaa", "3b", "0000:3b:00.9", "0000:3b:00:0"])
def test_what_is_not_a_bus_id_is_none(text: str) -> None:
    assert normalise_bus_id(text) is None


def test_fake_counts_initialisations_like_nvml() -> None:
    fake = fakenvml.one_gpu()
    fake.nvmlInit()
    fake.nvmlInit()

    fake.nvmlShutdown()
    assert fake.nvmlDeviceGetCount() == 1  # one initialisation is still held
    fake.nvmlShutdown()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        fake.nvmlDeviceGetCount()


# --- memory other programs hold -------------------------------------------------------------


def test_unmanaged_bytes_sums_processes_fleetd_does_not_manage() -> None:
    (gpu, _) = Nvml(fakenvml.two_gpus_with_processes()).discover().gpus

    assert gpu.unmanaged_bytes() == 5 * GIB
    assert gpu.unmanaged_bytes(frozenset({1001})) == 2 * GIB
    assert gpu.unmanaged_bytes(frozenset({1001, 2002})) == 0


@pytest.mark.parametrize("marker", [None, NOT_AVAILABLE], ids=["None", "sentinel"])
def test_process_memory_not_available_falls_back_to_used_minus_managed(marker: int | None) -> None:
    fake = fakenvml.process_memory_not_available(marker)
    used = fake.devices[0].used

    (gpu,) = Nvml(fake).discover().gpus

    assert gpu.processes[0].used_bytes is None
    assert gpu.unmanaged_bytes() == used
    # pid 2002 is ours and known to hold 2 GiB; the rest of what is used is someone else's.
    assert gpu.unmanaged_bytes(frozenset({2002})) == used - 2 * GIB


def test_unmanaged_bytes_never_goes_negative() -> None:
    gpu = Gpu(
        index=0,
        name="x",
        total_bytes=8 * GIB,
        source="nvml",
        used_bytes=1 * GIB,
        processes=(GpuProcess(1, None), GpuProcess(2, 3 * GIB)),
    )

    assert gpu.unmanaged_bytes(frozenset({2})) == 0


def test_unreadable_process_list_counts_used_memory_as_unmanaged() -> None:
    (gpu,) = Nvml(fakenvml.process_list_unreadable()).discover().gpus

    assert gpu.valid
    assert gpu.unmanaged_bytes() == 6 * GIB


# --- simulated and declared GPUs, and which wins --------------------------------------------


def test_simulated_gpus_parse_size_and_optional_name() -> None:
    gpus = simulated_gpus(["24GiB:RTX 4090", "16GiB"])

    assert [(g.index, g.total_bytes, g.source) for g in gpus] == [
        (0, 24 * GIB, "simulated"),
        (1, 16 * GIB, "simulated"),
    ]
    assert gpus[0].name == "RTX 4090"
    assert gpus[1].name == "simulated GPU"
    assert all(g.valid for g in gpus)


@pytest.mark.parametrize("spec", ["twelve", "12 furlongs:RTX", "0", "0GiB:empty", ""])
def test_bad_simulated_gpu_is_a_usage_error_quoting_it(spec: str) -> None:
    with pytest.raises(UsageError) as caught:
        simulated_gpus([spec])

    assert f"--gpu {spec!r}" in str(caught.value)
    assert "SIZE[:NAME]" in str(caught.value)


def test_gpu_option_beats_declared_gpus_and_nvml() -> None:
    fake = fakenvml.one_gpu()
    config = fleet(gpus=[{"name": "declared", "memory": "12GiB"}])

    discovery = resolve_gpus(config, ["8GiB"], Nvml(fake))

    assert [(g.total_bytes, g.source) for g in discovery.gpus] == [(8 * GIB, "simulated")]
    assert sum(fake.calls.values()) == 0


def test_declared_gpus_beat_nvml() -> None:
    fake = fakenvml.one_gpu()
    config = fleet(gpus=[{"name": "RTX 4070 SUPER", "memory": "12GiB"}, {"memory": "16GiB"}])

    discovery = resolve_gpus(config, [], Nvml(fake))

    assert [(g.index, g.name, g.total_bytes, g.source) for g in discovery.gpus] == [
        (0, "RTX 4070 SUPER", 12 * GIB, "declared"),
        (1, "declared GPU", 16 * GIB, "declared"),
    ]
    assert sum(fake.calls.values()) == 0


def test_auto_asks_nvml() -> None:
    fake = fakenvml.two_gpus_with_processes()

    discovery = resolve_gpus(fleet(), [], Nvml(fake))

    assert [(g.total_bytes, g.source) for g in discovery.gpus] == [
        (d.total, "nvml") for d in fake.devices
    ]


def test_auto_without_nvml_reports_the_problem() -> None:
    discovery = resolve_gpus(fleet(), [], Nvml(fakenvml.library_not_found()))

    assert discovery.gpus == ()
    assert discovery.problem is not None and "no NVIDIA GPU found" in discovery.problem


def test_fake_raises_the_real_nvml_error_classes() -> None:
    fake = FakeNvml(devices=[FakeDevice(total=GIB, fail={"memory": pynvml.NVML_ERROR_GPU_IS_LOST})])
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        fake.nvmlDeviceGetCount()
    fake.nvmlInit()
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        fake.nvmlDeviceGetMemoryInfo(fake.nvmlDeviceGetHandleByIndex(0))
