"""The detector on whole start-up logs of the real servers (tests/data/: llama-server 0.7.0
and vLLM 0.32.0 on CPU, recorded here): each failure is classified as what it is, and a
healthy start, whatever sizes it prints, raises nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.core.detector import Detector

DATA = Path(__file__).resolve().parent / "data"

# file -> the (class, rule) pairs its lines match, in order of first appearance
EXPECTED = {
    "vllm/startup-healthy.log": [],
    "vllm/startup-vllm-serve-default-kv.log": [],
    "vllm/engine-core-killed.log": [],  # no line says why: Docker's exit 0 does (docker.exit_0)
    "vllm/worker-killed.log": [],
    "vllm/kv-cache-too-small.log": [("vram_oom", "vllm.kv_cache_insufficient")],
    "vllm/kv-cache-too-small-derived.log": [("vram_oom", "vllm.kv_cache_insufficient")],
    "vllm/shm-default-64m.log": [("start_failure", "vllm.shm_insufficient")],
    "vllm/max-model-len-over-derived.log": [("start_failure", "vllm.max_model_len_over_model")],
    "llamacpp/tiny-c512-np1.log": [],
    "llamacpp/f16-c8192-np2.log": [],
    "llamacpp/gqa-c4096-np3-q8_0.log": [],
    "llamacpp/fail-kv-ulimit.log": [("host_oom", "llamacpp.cpu_alloc_failed")],
    "llamacpp/fail-compute-ulimit.log": [("host_oom", "llamacpp.cpu_alloc_failed")],
    "llamacpp/fail-model-mmap-ulimit.log": [("host_oom", "llamacpp.cpu_alloc_failed")],
    "llamacpp/killed-memory-64m.log": [],  # a silent cgroup kill: Docker's events say it
}


def matches(name: str) -> list[tuple[str, str]]:
    runtime = name.split("/")[0]
    detector = Detector(runtime=runtime)
    lines = [line for line in (DATA / name).read_text().splitlines() if not line.startswith("#")]
    found = [m for m in map(detector.classify, lines) if m is not None]
    return list(dict.fromkeys((str(m.incident_class), m.rule.id) for m in found))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_real_start_up_log_is_classified_as_what_happened(name: str) -> None:
    assert matches(name) == EXPECTED[name]


def test_vllm_prints_its_kv_cache_error_twice_in_one_run() -> None:
    """Both from the engine process: through vLLM's logger, and bare in the traceback that
    multiprocessing prints. One run, one incident (the step groups a run's lines)."""
    detector = Detector(runtime="vllm")
    text = (DATA / "vllm/kv-cache-too-small.log").read_text().splitlines()
    lines = [line for line in text if not line.startswith("#") and detector.classify(line)]
    assert len(lines) == 2
    assert sum(line.startswith("(EngineCore pid=") for line in lines) == 1
