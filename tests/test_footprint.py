"""The runtime's own buffer report read from its log (supervisor/core/footprint.py), and
the planner preferring it (supervisor.analyzer.rung_need)."""

# ruff: noqa: E501  (log lines are kept verbatim)
from __future__ import annotations

from pathlib import Path

import yaml

from supervisor.analyzer import rung_need
from supervisor.core.config import load_config
from supervisor.core.footprint import llamacpp_footprint
from supervisor.core.rungs import measured_key
from supervisor.core.runtimes import Runtime
from supervisor.core.state import Measured, measured_json
from supervisor.core.units import MIB
from tests.ggufmodels import GgufShape, write_gguf

# Verbatim from llama-server 0.7.0 (Debian forky, build 11669, CPU backend), `-c 2048
# -np 2 -ngl 0 -lv 4`, a 4-layer GGUF written by tests/ggufmodels.py (2026-12-03).
CPU_RUN = """\
0.00.019.053 I cmn  common_param: common_params_print_info: build 11669 (Debian) with GNU 16.2.0 for Linux x86_64
0.00.024.969 I common_memory_breakdown_print: | memory breakdown [MiB] | total   free    self   model   context   compute    unaccounted |
0.00.025.124 I common_memory_breakdown_print: |   - Host               |                   81 =    59 +       4 +      18                |
0.00.030.317 I load_tensors:   CPU_Mapped model buffer size =    59.19 MiB
0.00.030.542 I llama_context:        CPU  output buffer size =     0.00 MiB
0.00.030.586 I llama_kv_cache:        CPU KV buffer size =     4.00 MiB
0.00.034.010 I llama_kv_cache: size =    4.00 MiB (  1024 cells,   4 layers,  2/2 seqs), K (f16):    2.00 MiB, V (f16):    2.00 MiB
0.00.037.210 I sched_reserve:        CPU compute buffer size =    18.02 MiB
""".splitlines()

# The shape of the same report on a CUDA build (one GPU, weights partly on the host).
CUDA_RUN = """\
load_tensors:   CPU_Mapped model buffer size =   281.81 MiB
load_tensors:        CUDA0 model buffer size =  4403.49 MiB
llama_context:  CUDA_Host  output buffer size =     0.49 MiB
llama_kv_cache:      CUDA0 KV buffer size =   512.00 MiB
sched_reserve:       CUDA0 compute buffer size =   296.00 MiB
sched_reserve:  CUDA_Host compute buffer size =    16.01 MiB
""".splitlines()


def mib(value: float) -> int:
    return round(value * MIB)


def test_a_cpu_run_is_read_as_host_memory_by_part() -> None:
    found = llamacpp_footprint(CPU_RUN)
    assert found is not None and not found.on_device
    assert found.parts == {"model": mib(59.19), "kv": mib(4), "compute": mib(18.02), "output": 0}
    assert found.version == "b11669 (Debian)"


def test_a_gpu_run_counts_what_the_gpu_holds_not_the_host_buffers() -> None:
    found = llamacpp_footprint(CUDA_RUN)
    assert found is not None and found.on_device
    assert found.parts == {"model": mib(4403.49), "kv": mib(512), "compute": mib(296), "output": 0}
    assert found.total_bytes == mib(4403.49) + mib(512) + mib(296)


def test_two_gpus_add_up() -> None:
    lines = [line.replace("CUDA0", "CUDA1") for line in CUDA_RUN] + CUDA_RUN
    found = llamacpp_footprint(lines)
    assert found is not None and found.parts["model"] == 2 * mib(4403.49)


def test_no_report_is_none_not_zero() -> None:
    assert llamacpp_footprint([]) is None
    below_verbosity_4 = [line for line in CPU_RUN if "buffer size" not in line]
    assert llamacpp_footprint(below_verbosity_4) is None
    # the projection printed before loading is not the report
    assert llamacpp_footprint([CPU_RUN[1], CPU_RUN[2]]) is None


def config_with(tmp_path: Path, context: int | None, parallel: int | None) -> Path:
    model = write_gguf(tmp_path / "m.gguf", GgufShape(layers=2, n_embd=128, n_head=2))
    rung = {"model": "/models/m.gguf", "metadata": str(model)}
    rung.update({k: v for k, v in (("context", context), ("parallel", parallel)) if v})
    path = tmp_path / "fleet.yaml"
    services = {"s": {"runtime": "llamacpp", "containers": ["s"], "ladder": [rung]}}
    path.write_text(yaml.safe_dump({"services": services}))
    return path


def reported(context: int | None, parallel: int | None) -> Measured:
    parts = {"model": 50 * MIB, "kv": 8 * MIB, "compute": 20 * MIB, "output": 0}
    return Measured(78 * MIB, None, None, 1.0e9, parts, context, parallel, "b11669 (Debian)")


def test_the_planner_prefers_the_report_of_a_run_with_the_rungs_options(tmp_path: Path) -> None:
    config = load_config(config_with(tmp_path, 2048, 2))
    rung = config.services["s"].ladder[0]
    estimated = rung_need(config, Runtime.LLAMACPP, 0, rung, {})
    assert estimated.source == "gguf"
    need = rung_need(config, Runtime.LLAMACPP, 0, rung, {measured_key(rung): reported(2048, 2)})
    assert need.source == "measured"
    assert need.need_bytes == 78 * MIB + 300 * MIB  # the report + llama.cpp's overhead
    assert "the runtime's own report b11669 (Debian): weights 50 MiB + KV 8 MiB" in need.detail


def test_a_report_of_other_options_does_not_price_the_rung(tmp_path: Path) -> None:
    config = load_config(config_with(tmp_path, 2048, 2))
    rung = config.services["s"].ladder[0]
    for other in (reported(4096, 2), reported(2048, 1), reported(None, None)):
        found = {measured_key(rung): other}
        assert rung_need(config, Runtime.LLAMACPP, 0, rung, found).source == "gguf"


def test_a_report_survives_the_state_file_and_an_api_figure_stays_as_it_was() -> None:
    from supervisor.core.state import FleetState

    report = reported(2048, 2)
    report.estimate_bytes = 400 * MIB
    api = Measured(2_576_980_378, 2.25, 41.5, 1732345002.0)
    state = FleetState(measured={"a": report, "b": api})
    back = FleetState.from_json(state.to_json())
    assert back.measured == {"a": report, "b": api}
    assert set(measured_json(api)) == {"vram_bytes", "load_s", "tokens_per_s", "at"}


DATA = Path(__file__).resolve().parent / "data" / "llamacpp"


def recorded(name: str) -> list[str]:
    return [line for line in (DATA / name).read_text().splitlines() if not line.startswith("#")]


def test_the_report_says_which_context_and_slots_the_run_had() -> None:
    found = llamacpp_footprint(recorded("q8_0-v32k-c2000-q4_0.log"))  # -c 2000 -np 1
    assert found is not None and (found.context, found.slots) == (2048, 1)
    assert found.ran_with(2000, 1)  # padded to whole blocks of 256 cells
    assert not found.ran_with(4096, 1) and not found.ran_with(2000, 2)


def test_a_run_with_another_rungs_options_does_not_price_this_rung(tmp_path: Path) -> None:
    from supervisor.daemon.lifecycle import measured_from_report

    config = load_config(config_with(tmp_path, 4096, 1))
    service = config.services["s"]
    rung = service.ladder[0]
    lines = recorded("q8_0-v32k-c2000-q4_0.log")  # ran with -c 2000 (2048 cells)
    seen = measured_from_report("s", service, 0, lines, 1.0e9)
    assert seen is not None and (seen.context, seen.parallel) == (2048, 1)
    found = {measured_key(rung): seen}
    assert rung_need(config, Runtime.LLAMACPP, 0, rung, found).source == "gguf"
    matching = load_config(config_with(tmp_path, 2000, 1))
    fits = measured_from_report("s", matching.services["s"], 0, lines, 1.0e9)
    assert fits is not None and (fits.context, fits.parallel) == (2000, 1)
    same = matching.services["s"].ladder[0]
    found = {measured_key(same): fits}
    assert rung_need(matching, Runtime.LLAMACPP, 0, same, found).source == "measured"


VLLM = Path(__file__).resolve().parent / "data" / "vllm"


def test_vllm_reports_its_kv_cache_and_weights_on_cpu() -> None:
    from supervisor.core.footprint import GIB, vllm_footprint

    lines = (VLLM / "startup-healthy.log").read_text().splitlines()  # VLLM_CPU_KVCACHE_SPACE=1
    found = vllm_footprint(lines)
    assert found is not None and not found.on_device
    assert found.parts["kv"] == GIB and found.version == "vLLM 0.32.0" and found.context == 2048
    auto = vllm_footprint((VLLM / "startup-vllm-serve-default-kv.log").read_text().splitlines())
    assert auto is not None  # sized by itself: 1.1 GiB of KV, 0.53 GiB for the rest
    assert auto.parts["kv"] == round(1.1 * GIB) and auto.parts["compute"] == round(0.53 * GIB)


def test_vllm_on_a_gpu_reports_weights_and_kv_on_the_device() -> None:
    from supervisor.core.footprint import GIB, vllm_footprint

    lines = [  # vLLM's GPU worker, as its source prints it (gpu_model_runner, gpu_worker)
        "(EngineCore_DP0 pid=1) INFO 10-01 18:43:27 [gpu_model_runner.py:2653] Model loading"
        " took 14.9921 GiB and 5.24 seconds",
        "(EngineCore_DP0 pid=1) INFO 10-01 18:43:40 [gpu_worker.py:298] Available KV cache"
        " memory: 17.54 GiB",
    ]
    found = vllm_footprint(lines)
    assert found is not None and found.on_device
    assert (found.parts["model"], found.parts["kv"]) == (round(14.9921 * GIB), round(17.54 * GIB))
    assert vllm_footprint(lines[:1]) is None  # no KV cache yet: no report
