"""Tests for supervisor.analyzer: configs written to tmp_path, planned on simulated GPUs."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from supervisor.analyzer import analyze
from supervisor.analyzer.estimate import estimate_model
from supervisor.core.config import FleetConfig, load_config
from supervisor.core.gpus import Discovery, Gpu, GpuProcess, simulated_gpus
from supervisor.core.plan import FleetPlan, ollama_limit
from supervisor.core.runtimes import Runtime
from supervisor.core.units import format_size

MIB, GIB = 1024**2, 1024**3
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fleet.yaml"
SEED = ["llama3.2:3b", "phi3:mini", "tinyllama:1.1b", "qwen2.5:0.5b"]


def seed_fleet(tmp_path: Path, old: str, new: str) -> FleetConfig:
    """The example fleet with one line changed."""
    text = EXAMPLE.read_text()
    assert old in text
    path = tmp_path / "fleet.yaml"
    path.write_text(text.replace(old, new))
    return load_config(path)


def plan_on(config: FleetConfig, *specs: str, managed: frozenset[int] = frozenset()) -> FleetPlan:
    return analyze(config, Discovery(gpus=simulated_gpus(specs)), managed)


def budget_of(config: FleetConfig, total_bytes: int) -> int:
    return int(config.budget * total_bytes)


def nvml_gpu(total: int, used: int = 0, processes: tuple[GpuProcess, ...] = ()) -> Gpu:
    return Gpu(
        index=0, name="RTX", total_bytes=total, source="nvml", used_bytes=used, processes=processes
    )


def write_gguf(path: Path) -> Path:
    """A small real GGUF: a 4-layer llama-like header and one tiny tensor."""
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in {
        "block_count": 4,
        "embedding_length": 256,
        "attention.head_count": 4,
        "attention.head_count_kv": 2,
        "context_length": 8192,
    }.items():
        writer.add_uint32(f"llama.{key}", value)
    writer.add_token_list([f"tok{i}" for i in range(100)])
    writer.add_tensor("token_embd.weight", np.zeros((100, 256), np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- the seed fleet -------------------------------------------------------------------------


def test_seed_fleet_on_12gib_runs_the_preferred_model() -> None:
    plan = plan_on(load_config(EXAMPLE), "12GiB")

    alpha = plan.services["alpha"]
    assert (alpha.model, alpha.gpu) == ("llama3.2:3b", 0)
    assert [v.status for v in alpha.rungs] == ["chosen", "not tried", "not tried", "not tried"]
    assert plan.all_placed and plan.optimal


def test_seed_fleet_on_2gib_steps_down_to_tinyllama_past_phi3() -> None:
    config = load_config(EXAMPLE)
    budget = format_size(budget_of(config, 2 * GIB))

    alpha = plan_on(config, "2GiB").services["alpha"]

    assert alpha.model == "tinyllama:1.1b"
    assert [v.status for v in alpha.rungs] == ["rejected", "rejected", "chosen", "not tried"]
    for verdict in alpha.rungs[:2]:
        assert verdict.reason is not None
        assert "budget" in verdict.reason
        assert format_size(verdict.need.need_bytes) in verdict.reason
        assert budget in verdict.reason


def test_seed_fleet_without_a_gpu_is_unplaced_with_a_reason() -> None:
    plan = analyze(load_config(EXAMPLE), Discovery(gpus=()))

    alpha = plan.services["alpha"]
    assert (alpha.rung, alpha.gpu, alpha.model) == (None, None, None)
    assert alpha.reason is not None and "no usable GPU" in alpha.reason
    assert all(v.status == "rejected" for v in alpha.rungs)
    assert not plan.all_placed


def test_nvml_problem_reaches_the_plan_notes() -> None:
    problem = "no NVIDIA GPU found: NVML: Driver Not Loaded"

    plan = analyze(load_config(EXAMPLE), Discovery(gpus=(), problem=problem))

    assert problem in plan.notes


def test_rung_needs_are_the_declared_sizes() -> None:
    alpha = plan_on(load_config(EXAMPLE), "12GiB").services["alpha"]

    assert [(v.need.model, v.need.need_bytes, v.need.source) for v in alpha.rungs] == [
        ("llama3.2:3b", 2048 * MIB, "declared"),
        ("phi3:mini", 2200 * MIB, "declared"),
        ("tinyllama:1.1b", 637 * MIB, "declared"),
        ("qwen2.5:0.5b", 397 * MIB, "declared"),
    ]


def test_seed_fleet_on_a_tiny_gpu_names_the_nearest_option_and_the_shortfall() -> None:
    config = load_config(EXAMPLE)
    budget = budget_of(config, 256 * MIB)

    alpha = plan_on(config, "256MiB").services["alpha"]

    assert alpha.rung is None
    assert alpha.reason is not None
    assert "'qwen2.5:0.5b'" in alpha.reason
    assert format_size(397 * MIB) in alpha.reason
    assert format_size(397 * MIB - budget) in alpha.reason


def test_pin_to_a_missing_gpu_is_explained(tmp_path: Path) -> None:
    config = seed_fleet(tmp_path, "containers: [alpha]", "containers: [alpha]\n    gpu: 3")

    alpha = plan_on(config, "24GiB").services["alpha"]

    assert alpha.rung is None
    assert alpha.reason is not None and "pinned to GPU 3" in alpha.reason


def test_rung_given_up_for_a_higher_priority_service_says_how_much_room_is_left(
    tmp_path: Path,
) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(
        "services:\n  chat:\n    runtime: vllm\n    containers: [chat]\n    priority: 1\n"
        "    ladder: [{model: c, vram: 6GiB}]\n"
        "  batch:\n    runtime: vllm\n    containers: [batch]\n"
        "    ladder: [{model: big, vram: 4GiB}, {model: small, vram: 2GiB}]\n"
    )
    config = load_config(path)
    left_beside_chat = budget_of(config, 10 * GIB) - 6 * GIB

    batch = plan_on(config, "10GiB").services["batch"]

    assert batch.model == "small"
    reason = batch.rungs[0].reason
    assert batch.rungs[0].status == "rejected" and reason is not None
    assert format_size(4 * GIB) in reason
    assert f"{format_size(left_beside_chat)} on GPU 0" in reason


# --- budgets --------------------------------------------------------------------------------


def test_gpu_budget_is_ratio_of_total_and_headroom_what_is_left() -> None:
    config = load_config(EXAMPLE)

    plan = plan_on(config, "12GiB:RTX 4070 SUPER")

    (room,) = plan.gpus
    assert room.budget_bytes == budget_of(config, 12 * GIB)
    assert room.planned_bytes == 2048 * MIB
    assert room.headroom_bytes == room.budget_bytes - 2048 * MIB
    assert room.services == ("alpha",)


def test_budget_ratio_from_the_config_is_used(tmp_path: Path) -> None:
    config = seed_fleet(tmp_path, "budget: 0.85", "budget: 0.5")

    plan = plan_on(config, "4GiB")

    assert plan.gpus[0].budget_bytes == 2 * GIB
    assert plan.services["alpha"].model == "llama3.2:3b"  # 2048 MiB fits 2 GiB exactly


def test_unmanaged_process_shrinks_the_budget_and_the_model() -> None:
    config = load_config(EXAMPLE)
    other = GpuProcess(pid=4242, used_bytes=2 * GIB)
    gpu = nvml_gpu(4 * GIB, used=2 * GIB, processes=(other,))

    crowded = analyze(config, Discovery(gpus=(gpu,)))
    ours = analyze(config, Discovery(gpus=(gpu,)), managed_pids=frozenset({4242}))

    assert crowded.gpus[0].unmanaged_bytes == 2 * GIB
    assert crowded.gpus[0].budget_bytes == budget_of(config, 4 * GIB) - 2 * GIB
    assert crowded.services["alpha"].model == "tinyllama:1.1b"
    assert ours.gpus[0].budget_bytes == budget_of(config, 4 * GIB)
    assert ours.services["alpha"].model == "llama3.2:3b"


def test_gpu_full_of_other_work_gets_no_service() -> None:
    gpu = nvml_gpu(4 * GIB, used=4 * GIB, processes=(GpuProcess(1, 4 * GIB),))

    plan = analyze(load_config(EXAMPLE), Discovery(gpus=(gpu,)))

    assert plan.gpus[0].budget_bytes == 0
    assert plan.services["alpha"].rung is None


def test_lost_gpu_is_noted_and_the_service_goes_to_a_good_one() -> None:
    good = simulated_gpus(["8GiB"])[0]
    lost = Gpu(index=1, name="unknown", total_bytes=0, source="nvml", error="GPU is lost")

    plan = analyze(load_config(EXAMPLE), Discovery(gpus=(good, lost)))

    assert plan.services["alpha"].gpu == 0
    assert any("GPU 1" in note and "GPU is lost" in note for note in plan.notes)
    assert [g.budget_bytes for g in plan.gpus] == [budget_of(load_config(EXAMPLE), 8 * GIB), 0]


# --- Ollama tiers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "limit"),
    [
        (8 * GIB, 1),
        (12 * GIB, 1),
        (16376 * MIB, 2),  # a "16 GB" RTX 4080 reports 15.99 GiB
        (15360 * MIB, 2),  # T4
        (24564 * MIB, 3),  # RTX 4090
        (24 * GIB, 3),
        (49140 * MIB, 4),  # RTX 6000 Ada
        (80 * GIB, 4),
    ],
    ids=["8GiB", "12GiB", "RTX4080", "T4", "RTX4090", "24GiB", "RTX6000Ada", "80GiB"],
)
def test_ollama_tiers_follow_marketed_sizes(total: int, limit: int) -> None:
    assert ollama_limit(load_config(EXAMPLE), nvml_gpu(total)) == limit


@pytest.mark.parametrize(
    ("total", "limit"),
    [(23028 * MIB, 3), (23034 * MIB, 3), (46068 * MIB, 4)],
    ids=["A10", "L4", "L40S"],
)
def test_ollama_tiers_count_ecc_datacentre_cards_by_their_marketed_size(
    total: int, limit: int
) -> None:
    assert ollama_limit(load_config(EXAMPLE), nvml_gpu(total)) == limit


def test_ollama_instances_per_gpu_overrides_the_tiers(tmp_path: Path) -> None:
    config = seed_fleet(tmp_path, "gpus: auto", "ollama_instances_per_gpu: 7\ngpus: auto")

    assert ollama_limit(config, nvml_gpu(8 * GIB)) == 7


def test_ollama_limit_leaves_second_service_unplaced_and_says_why(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(
        "ollama_instances_per_gpu: 1\nservices:\n"
        + "".join(
            f"  {name}:\n    runtime: ollama\n    containers: [{name}]\n"
            f"    priority: {priority}\n    ladder: [{{model: m, vram: 1GiB}}]\n"
            for name, priority in (("chat", 1), ("batch", 0))
        )
    )

    plan = plan_on(load_config(path), "24GiB")

    assert plan.services["chat"].gpu == 0
    batch = plan.services["batch"]
    assert batch.rung is None
    assert batch.reason is not None and "Ollama limit of 1" in batch.reason


# --- rungs priced from model metadata -------------------------------------------------------


def test_metadata_rung_is_priced_from_its_gguf(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = write_gguf(tmp_path / "m.gguf")
    path = tmp_path / "fleet.yaml"
    path.write_text(
        "services:\n  llm:\n    runtime: llamacpp\n    containers: [llm]\n"
        "    ladder: [{model: m, metadata: m.gguf, context: 2048, parallel: 2}]\n"
    )
    expected = estimate_model(model, Runtime.LLAMACPP, context=2048, parallel=2)

    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # metadata is relative to the config, not the cwd

    plan = plan_on(load_config(path), "8GiB")

    llm = plan.services["llm"]
    need = llm.rungs[0].need
    assert need.source == "gguf"
    assert need.need_bytes == expected.total_bytes
    assert llm.rung == 0
    assert plan.gpus[0].planned_bytes == expected.total_bytes
