"""Tests for supervisor.analyzer.estimate, against real GGUF files and HF folders written in
tmp_path."""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from bench.estimate_accuracy import ServerReport, parse_report
from supervisor.analyzer.estimate import (
    Estimate,
    ModelShape,
    estimate_from_shape,
    estimate_model,
    read_gguf_shape,
    read_hf_shape,
)
from supervisor.core.errors import EstimateError
from supervisor.core.runtimes import Runtime
from tests import ggufmodels
from tests.ggufmodels import GgufShape

MIB = 1024 * 1024

# The spec's numbers, written out here so the tests check the module rather than echo it.
OVERHEAD_MIB = {
    Runtime.OLLAMA: 500,
    Runtime.LLAMACPP: 300,
    Runtime.VLLM: 1024,
    Runtime.GENERIC: 500,
    Runtime.TGI: 1024,
    Runtime.SGLANG: 1024,
    Runtime.TENSORRT: 1024,
    Runtime.TRITON: 1024,
}

# Arch keys (without the "{arch}." prefix) of a small llama-like model.
BASE_KEYS: dict[str, int | list[int]] = {
    "block_count": 28,
    "embedding_length": 2048,
    "attention.head_count": 16,
    "attention.head_count_kv": 16,
    "context_length": 32768,
}
TOKENS = [f"tok{i}" for i in range(300)]


def tiny_tensors() -> dict[str, tuple[np.ndarray[Any, Any], gguf.GGMLQuantizationType | None]]:
    # A Q8_0 tensor is given as raw blocks: 2 blocks of 32 weights, 34 bytes each.
    return {
        "token_embd.weight": (np.zeros((8, 16), np.float32), None),
        "blk.0.attn_q.weight": (np.zeros((16, 16), np.float16), None),
        "blk.0.ffn_up.weight": (np.zeros((2, 34), np.uint8), gguf.GGMLQuantizationType.Q8_0),
    }


TENSOR_BYTES = sum(array.nbytes for array, _ in tiny_tensors().values())


def write_gguf(
    path: Path,
    keys: dict[str, int | float | list[int] | None] | None = None,
    tokens: list[str] | None = TOKENS,
    arch: str = "llama",
) -> Path:
    """A real GGUF file: BASE_KEYS with `keys` applied on top (None removes a key)."""
    merged: dict[str, int | float | list[int] | None] = {**BASE_KEYS, **(keys or {})}
    writer = gguf.GGUFWriter(path, arch)
    for key, value in merged.items():
        if isinstance(value, list):
            writer.add_array(f"{arch}.{key}", value)
        elif isinstance(value, float):
            writer.add_float32(f"{arch}.{key}", value)
        elif value is not None:
            writer.add_uint32(f"{arch}.{key}", value)
    if tokens is not None:
        writer.add_token_list(tokens)
    for name, (array, raw_dtype) in tiny_tensors().items():
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_split_gguf(path: Path) -> Path:
    """A GGUF split one tensor per shard (3 shards), as llama.cpp's gguf-split writes; returns
    the first shard, which holds the metadata."""
    writer = gguf.GGUFWriter(path, "llama", split_max_tensors=1)
    for key, value in BASE_KEYS.items():
        assert isinstance(value, int)
        writer.add_uint32(f"llama.{key}", value)
    writer.add_token_list(TOKENS)
    for name, (array, raw_dtype) in tiny_tensors().items():
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.with_name(f"{path.stem}-00001-of-00003.gguf")


def kv_bytes(
    layers: int, ctx: int, slots: int, kv_heads: int, k_dim: int, v_dim: int, elem: int = 2
) -> int:
    return layers * ctx * slots * kv_heads * (k_dim + v_dim) * elem


def compute_bytes(n_embd: int, n_vocab: int) -> int:
    return 512 * (n_embd + n_vocab) * 4


def assert_consistent(estimate: Estimate) -> None:
    assert set(estimate.parts) == {"weights", "kv_cache", "compute", "runtime_overhead"}
    assert estimate.total_bytes == sum(estimate.parts.values())


# --- GGUF ----------------------------------------------------------------------------------


def test_gguf_basic_follows_the_formula(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf")

    estimate = estimate_model(path, Runtime.OLLAMA)

    head_dim = 2048 // 16
    assert estimate.source == "gguf"
    assert estimate.parts == {
        "weights": TENSOR_BYTES,
        "kv_cache": kv_bytes(28, 4096, 1, 16, head_dim, head_dim),
        "compute": compute_bytes(2048, len(TOKENS)),
        "runtime_overhead": 500 * MIB,
    }
    assert_consistent(estimate)
    assert estimate.detail.startswith("GGUF llama: weights ")
    assert "(28 layers x 4096 ctx x 1 slot x 16 KV heads x 128 dim x K+V x f16)" in estimate.detail
    assert "ollama overhead 500 MiB" in estimate.detail


def test_read_gguf_shape_reads_every_field(tmp_path: Path) -> None:
    path = write_gguf(
        tmp_path / "m.gguf", {"attention.key_length": 96, "attention.value_length": 64}
    )

    assert read_gguf_shape(path) == ModelShape(
        architecture="llama",
        weights_bytes=TENSOR_BYTES,
        n_layers=28,
        n_embd=2048,
        n_head=16,
        n_head_kv=16,
        head_dim_k=96,
        head_dim_v=64,
        n_vocab=len(TOKENS),
        context_length=32768,
        kv_bytes_per_element=2,
    )


def test_q8_0_tensor_counts_its_block_bytes_not_its_element_count(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf")

    # 64 Q8_0 weights take 68 bytes; counting elements x 1 byte would give 64.
    assert read_gguf_shape(path).weights_bytes == 8 * 16 * 4 + 16 * 16 * 2 + 68


def test_gqa_shrinks_kv_cache_by_the_head_ratio(tmp_path: Path) -> None:
    mha = estimate_model(write_gguf(tmp_path / "mha.gguf"), Runtime.OLLAMA)
    gqa = estimate_model(
        write_gguf(tmp_path / "gqa.gguf", {"attention.head_count_kv": 4}), Runtime.OLLAMA
    )

    assert gqa.parts["kv_cache"] == kv_bytes(28, 4096, 1, 4, 128, 128)
    assert gqa.parts["kv_cache"] * 4 == mha.parts["kv_cache"]
    assert "x 4 KV heads x" in gqa.detail


def test_per_layer_kv_head_array_uses_the_largest_layer(tmp_path: Path) -> None:
    per_layer = [4, 8, 0, 4] * 7  # 0: a layer without attention, as hybrid models write
    path = write_gguf(tmp_path / "m.gguf", {"attention.head_count_kv": per_layer})

    estimate = estimate_model(path, Runtime.LLAMACPP)

    assert estimate.parts["kv_cache"] == kv_bytes(28, 4096, 1, 8, 128, 128)


def test_different_key_and_value_sizes_both_count(tmp_path: Path) -> None:
    path = write_gguf(
        tmp_path / "m.gguf", {"attention.key_length": 192, "attention.value_length": 128}
    )

    estimate = estimate_model(path, Runtime.OLLAMA)

    assert estimate.parts["kv_cache"] == kv_bytes(28, 4096, 1, 16, 192, 128)
    assert "(192 K + 128 V) dim" in estimate.detail


def test_default_context_is_capped_at_model_max(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", {"context_length": 2048})

    estimate = estimate_model(path, Runtime.OLLAMA)

    assert estimate.parts["kv_cache"] == kv_bytes(28, 2048, 1, 16, 128, 128)
    assert "default 4096 ctx capped at model max 2048" in estimate.detail


def test_explicit_context_above_model_max_is_capped(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", {"context_length": 2048})

    estimate = estimate_model(path, Runtime.OLLAMA, context=8192)

    assert estimate.parts["kv_cache"] == kv_bytes(28, 2048, 1, 16, 128, 128)
    assert "8192 ctx capped at model max 2048" in estimate.detail


def test_explicit_context_is_used(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf")

    estimate = estimate_model(path, Runtime.OLLAMA, context=1024)

    assert estimate.parts["kv_cache"] == kv_bytes(28, 1024, 1, 16, 128, 128)
    assert "capped" not in estimate.detail


def test_unknown_model_max_leaves_context_uncapped(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", {"context_length": None})

    estimate = estimate_model(path, Runtime.OLLAMA, context=65536)

    assert estimate.parts["kv_cache"] == kv_bytes(28, 65536, 1, 16, 128, 128)


def test_parallel_slots_multiply_kv_cache(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf")

    one = estimate_model(path, Runtime.OLLAMA)
    four = estimate_model(path, Runtime.OLLAMA, parallel=4)

    assert four.parts["kv_cache"] == kv_bytes(28, 4096, 4, 16, 128, 128)
    assert four.parts["kv_cache"] == 4 * one.parts["kv_cache"]
    assert four.total_bytes - one.total_bytes == 3 * one.parts["kv_cache"]
    assert "x 4 slots x" in four.detail


def test_vocab_size_key_wins_over_token_list(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", {"vocab_size": 1000})

    estimate = estimate_model(path, Runtime.OLLAMA)

    assert estimate.parts["compute"] == compute_bytes(2048, 1000)


def test_vocab_falls_back_to_token_list_length(tmp_path: Path) -> None:
    tokens = [f"t{i}" for i in range(777)]
    path = write_gguf(tmp_path / "m.gguf", tokens=tokens)

    assert read_gguf_shape(path).n_vocab == 777


@pytest.mark.parametrize("runtime", list(Runtime))
def test_each_runtime_adds_its_own_overhead(tmp_path: Path, runtime: Runtime) -> None:
    path = write_gguf(tmp_path / "m.gguf")

    estimate = estimate_model(path, runtime)

    assert estimate.parts["runtime_overhead"] == OVERHEAD_MIB[runtime] * MIB
    assert f"{runtime.value} overhead" in estimate.detail
    assert_consistent(estimate)


@pytest.mark.parametrize("runtime", [Runtime.TGI, Runtime.SGLANG, Runtime.TENSORRT])
def test_runtimes_with_a_kv_pool_are_priced_as_vllm(tmp_path: Path, runtime: Runtime) -> None:
    path = write_gguf(tmp_path / "m.gguf", {"context_length": 8192})

    estimate = estimate_model(path, runtime, parallel=8)
    as_vllm = estimate_model(path, Runtime.VLLM, parallel=8)

    assert estimate.parts == as_vllm.parts
    assert "needs 1 sequence at start, parallel 8 not counted" in estimate.detail


def test_vllm_defaults_to_model_max_context(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", {"context_length": 8192})

    estimate = estimate_model(path, Runtime.VLLM)

    assert estimate.parts["kv_cache"] == kv_bytes(28, 8192, 1, 16, 128, 128)
    assert estimate.parts["kv_cache"] > estimate_model(path, Runtime.OLLAMA).parts["kv_cache"]


def test_vllm_without_model_max_uses_4096(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", {"context_length": None})

    estimate = estimate_model(path, Runtime.VLLM)

    assert estimate.parts["kv_cache"] == kv_bytes(28, 4096, 1, 16, 128, 128)


def test_vllm_counts_one_slot_whatever_parallel_says(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", {"context_length": 8192})

    estimate = estimate_model(path, Runtime.VLLM, parallel=8)

    assert estimate.parts["kv_cache"] == kv_bytes(28, 8192, 1, 16, 128, 128)
    assert "parallel 8 not counted" in estimate.detail


def test_split_gguf_counts_the_tensors_of_every_shard(tmp_path: Path) -> None:
    first = write_split_gguf(tmp_path / "m.gguf")

    assert read_gguf_shape(first).weights_bytes == TENSOR_BYTES


def test_estimate_from_shape_needs_no_files() -> None:
    shape = ModelShape(
        architecture="test",
        weights_bytes=10 * MIB,
        n_layers=2,
        n_embd=64,
        n_head=4,
        n_head_kv=2,
        head_dim_k=16,
        head_dim_v=16,
        n_vocab=100,
        context_length=None,
        kv_bytes_per_element=4,
    )

    estimate = estimate_from_shape(shape, Runtime.GENERIC, 100, 3, "declared")

    assert estimate.parts["kv_cache"] == kv_bytes(2, 100, 3, 2, 16, 16, elem=4)
    assert estimate.source == "declared"
    assert_consistent(estimate)


# --- llama.cpp server: sized as llama-server 0.7.0 sizes itself ------------------------


def test_llamacpp_allocates_a_context_above_model_max(tmp_path: Path) -> None:
    # llama-server takes -c as given and only warns: tests/data/llamacpp shows -c 8192 on a
    # model trained for 4096 allocating 8192 cells.
    path = write_gguf(tmp_path / "m.gguf", {"context_length": 2048})

    estimate = estimate_model(path, Runtime.LLAMACPP, context=8192)

    assert estimate.parts["kv_cache"] == kv_bytes(28, 8192, 1, 16, 128, 128)
    assert "8192 ctx above model max 2048, all allocated" in estimate.detail
    assert "capped" not in estimate.detail


def test_llamacpp_slots_share_the_context_each_share_padded_to_256(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf")

    three = estimate_model(path, Runtime.LLAMACPP, context=4096, parallel=3)
    four = estimate_model(path, Runtime.LLAMACPP, context=4096, parallel=4)
    one = estimate_model(path, Runtime.LLAMACPP, context=4096, parallel=1)

    # ceil(4096 / 3) = 1366 cells, padded to 1536, in each of 3 slots.
    assert three.parts["kv_cache"] == kv_bytes(28, 1536, 3, 16, 128, 128)
    assert "28 layers x 3 slots x 1536 cells x 16 KV heads" in three.detail
    assert "4096 ctx shared by 3 slots, each share padded to 256 cells" in three.detail
    assert four.parts["kv_cache"] == one.parts["kv_cache"] == kv_bytes(28, 4096, 1, 16, 128, 128)
    assert "4096 ctx shared by 4 slots)" in four.detail


def test_llamacpp_pads_a_context_to_256_cells(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf")

    estimate = estimate_model(path, Runtime.LLAMACPP, context=1000)

    assert estimate.parts["kv_cache"] == kv_bytes(28, 1024, 1, 16, 128, 128)


def test_ollama_slots_still_multiply_the_whole_context(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf")

    estimate = estimate_model(path, Runtime.OLLAMA, context=1000, parallel=3)

    assert estimate.parts["kv_cache"] == kv_bytes(28, 1000, 3, 16, 128, 128)


def test_llamacpp_compute_is_the_widest_step_of_a_micro_batch_and_its_mask(
    tmp_path: Path,
) -> None:
    path = write_gguf(tmp_path / "m.gguf", {"feed_forward_length": 5632})

    estimate = estimate_model(path, Runtime.LLAMACPP, context=4096, parallel=2)

    ffn_step = 512 * (3 * 5632 + 5 * 2048) * 4  # gate, up, their product; n_embd-wide rest
    mask = 512 * 2048 * 2  # one slot's 2048 cells x 512 tokens, f16
    assert estimate.parts["compute"] == ffn_step + mask


def test_llamacpp_compute_takes_attention_when_it_is_wider_than_the_ffn(tmp_path: Path) -> None:
    keys: dict[str, int | float | list[int] | None] = {
        "feed_forward_length": 1024,
        "attention.head_count": 32,
        "attention.key_length": 256,
    }
    path = write_gguf(tmp_path / "m.gguf", keys)

    estimate = estimate_model(path, Runtime.LLAMACPP, context=512)

    assert estimate.parts["compute"] == 512 * (2 * 32 * 256 + 5 * 2048) * 4 + 512 * 512 * 2


def test_llamacpp_compute_without_ffn_width_assumes_four_times_n_embd(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf")

    estimate = estimate_model(path, Runtime.LLAMACPP, context=256)

    # A context below 512 tokens shrinks the micro-batch to it.
    assert estimate.parts["compute"] == 256 * (3 * 4 * 2048 + 5 * 2048) * 4 + 256 * 256 * 2


def test_other_runtimes_keep_the_batch_of_activations_and_logits(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", {"feed_forward_length": 5632})

    estimate = estimate_model(path, Runtime.OLLAMA, context=4096, parallel=2)

    assert estimate.parts["compute"] == compute_bytes(2048, len(TOKENS))


def test_read_gguf_shape_reads_the_ffn_width(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", {"feed_forward_length": [5632, 0, 8192]})

    assert read_gguf_shape(path).n_ff == 8192


@pytest.mark.parametrize(
    ("kv_cache", "bytes_per_32"), [(None, 64), ("f16", 64), ("q8_0", 34), ("q4_0", 18)]
)
def test_kv_cache_type_sets_bytes_per_element(
    tmp_path: Path, kv_cache: str | None, bytes_per_32: int
) -> None:
    path = write_gguf(tmp_path / "m.gguf")

    for runtime in (Runtime.LLAMACPP, Runtime.OLLAMA):
        estimate = estimate_model(path, runtime, context=4096, kv_cache=kv_cache)

        elements = 28 * 4096 * 16 * (128 + 128)
        assert estimate.parts["kv_cache"] == elements // 32 * bytes_per_32
        assert estimate.detail.count(f"x {kv_cache or 'f16'})") == 1


def test_kv_cache_default_is_what_callers_got_before(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf")

    assert estimate_model(path, Runtime.OLLAMA, 2048, 2) == estimate_model(
        path, Runtime.OLLAMA, 2048, 2, kv_cache="f16"
    )


def test_unknown_kv_cache_type_is_refused(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf")

    with pytest.raises(EstimateError, match=r"kv_cache must be one of f16, q8_0, q4_0, got 'q5_1'"):
        estimate_model(path, Runtime.LLAMACPP, kv_cache="q5_1")


def test_kv_cache_type_is_refused_for_a_hugging_face_model(tmp_path: Path) -> None:
    folder = write_hf(tmp_path / "llama", LLAMA_CONFIG, SHARDS)

    with pytest.raises(EstimateError, match="applies to GGUF models"):
        estimate_model(folder, Runtime.VLLM, kv_cache="q8_0")


# --- the estimate against real llama-server reports (tests/data/llamacpp) ------------------

LLAMACPP_DATA = Path(__file__).parent / "data" / "llamacpp"
STARTED = [
    "tiny-c512-np1",
    "tiny-c2048-auto-np",
    "gqa-c4096-np4",
    "gqa-c4096-np3-q8_0",
    "f16-c8192-np2",
    "q8_0-v32k-c2000-q4_0",
]
PRINTED_MIB = 0.01 * MIB  # the report prints MiB with two decimals


@dataclass(frozen=True)
class RecordedRun:
    """One recorded llama-server start: the model written again from its flags, its args."""

    shape: GgufShape
    context: int
    parallel: int | None
    kv_cache: str | None
    log: str


def recorded_run(name: str) -> RecordedRun:
    log = (LLAMACPP_DATA / f"{name}.log").read_text(encoding="utf-8")
    flags = _header(log, "gguf").split()[4:]  # after "python -m tests.ggufmodels PATH"
    # The server's arguments between the model and -lv, also inside a `sh -c '...'` command.
    found = re.search(r"-m /models/\S+\.gguf (?P<args>.*?) -lv 4", _header(log, "command"))
    assert found is not None, f"{name}: no llama-server arguments in its command line"
    args = shlex.split(found["args"])
    option = dict(zip(args[::2], args[1::2], strict=True))
    return RecordedRun(
        shape=ggufmodels.shape_from_args(flags),
        context=int(option["-c"]),
        parallel=int(option["-np"]) if "-np" in option else None,
        kv_cache=option.get("-ctk"),
        log=log,
    )


def _header(log: str, key: str) -> str:
    found = re.search(rf"^# {key}: (.*)$", log, re.MULTILINE)
    assert found is not None, f"no '# {key}:' line"
    return found[1]


@pytest.fixture(scope="module")
def recorded_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[GgufShape], Path]:
    """The GGUF file of a recorded shape, written once per module (the same bytes again)."""
    folder = tmp_path_factory.mktemp("recorded-models")
    written: dict[GgufShape, Path] = {}

    def model(shape: GgufShape) -> Path:
        if shape not in written:
            written[shape] = ggufmodels.write_gguf(folder / f"{len(written)}.gguf", shape)
        return written[shape]

    return model


def estimate_recorded(run: RecordedRun, model: Callable[[GgufShape], Path]) -> Estimate:
    path = model(run.shape)
    return estimate_model(path, Runtime.LLAMACPP, run.context, run.parallel, run.kv_cache)


@pytest.mark.parametrize("name", STARTED)
def test_estimate_matches_the_real_buffer_report(
    name: str, recorded_model: Callable[[GgufShape], Path]
) -> None:
    run = recorded_run(name)
    real: ServerReport = parse_report(run.log)

    parts = estimate_recorded(run, recorded_model).parts

    assert abs(parts["weights"] - real.model_bytes) <= PRINTED_MIB
    assert abs(parts["kv_cache"] - real.kv_bytes) <= PRINTED_MIB
    # The reserve adds a few small tensors (about 20 KiB; 0.1 MiB with a quantized cache).
    assert abs(parts["compute"] - real.compute_bytes) <= max(0.01 * real.compute_bytes, MIB // 4)
    estimated_total = parts["weights"] + parts["kv_cache"] + parts["compute"]
    assert abs(estimated_total - real.total_bytes) <= 0.01 * real.total_bytes


def test_estimate_names_the_kv_buffer_llama_server_failed_to_allocate(
    recorded_model: Callable[[GgufShape], Path],
) -> None:
    run = recorded_run("fail-kv-ulimit")

    estimate = estimate_recorded(run, recorded_model)

    failed = re.search(r"failed to allocate buffer for kv cache", run.log)
    size = re.search(r"failed to allocate CPU buffer of size (\d+)", run.log)
    assert failed is not None and size is not None
    assert estimate.parts["kv_cache"] == int(size[1]) == 512 * MIB


def test_estimate_names_the_compute_buffer_llama_server_failed_to_allocate(
    recorded_model: Callable[[GgufShape], Path],
) -> None:
    run = recorded_run("fail-compute-ulimit")

    estimate = estimate_recorded(run, recorded_model)

    size = re.search(
        r"ggml_gallocr_reserve_n_impl: failed to allocate CPU buffer of size (\d+)", run.log
    )
    assert size is not None
    assert 0 <= int(size[1]) - estimate.parts["compute"] <= 64 * 1024


def test_recorded_failures_say_their_exit_status() -> None:
    statuses = {
        name: _header((LLAMACPP_DATA / f"{name}.log").read_text(encoding="utf-8"), "exit status")
        for name in ("fail-model-mmap-ulimit", "fail-kv-ulimit", "fail-compute-ulimit")
    }
    killed = _header((LLAMACPP_DATA / "killed-memory-64m.log").read_text(), "exit status")

    assert set(statuses.values()) == {"1"}
    assert killed == "137 (OOMKilled=true)"


# --- Hugging Face --------------------------------------------------------------------------


LLAMA_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "num_hidden_layers": 16,
    "hidden_size": 2048,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "torch_dtype": "bfloat16",
}


def write_hf(folder: Path, config: dict[str, Any], weights: dict[str, int]) -> Path:
    """An HF folder: config.json and weight files of the given sizes (zero bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    for name, size in weights.items():
        with (folder / name).open("wb") as f:
            f.truncate(size)
    return folder


SHARDS = {"model-00001-of-00002.safetensors": 5000, "model-00002-of-00002.safetensors": 1234}


def test_hf_folder_follows_the_formula(tmp_path: Path) -> None:
    folder = write_hf(tmp_path / "llama", LLAMA_CONFIG, {**SHARDS, "tokenizer.json": 999})

    estimate = estimate_model(folder, Runtime.OLLAMA)

    assert estimate.source == "hf"
    assert estimate.parts == {
        "weights": 5000 + 1234,
        "kv_cache": kv_bytes(16, 4096, 1, 8, 2048 // 32, 2048 // 32),
        "compute": compute_bytes(2048, 128256),
        "runtime_overhead": 500 * MIB,
    }
    assert estimate.detail.startswith("HF llama: ")


def test_hf_vllm_uses_max_position_embeddings(tmp_path: Path) -> None:
    folder = write_hf(tmp_path / "llama", LLAMA_CONFIG, SHARDS)

    estimate = estimate_model(folder, Runtime.VLLM)

    assert estimate.parts["kv_cache"] == kv_bytes(16, 131072, 1, 8, 64, 64)


def test_hf_defaults_kv_heads_and_head_dim_and_honours_explicit_head_dim(tmp_path: Path) -> None:
    config = {k: v for k, v in LLAMA_CONFIG.items() if k != "num_key_value_heads"}
    default = read_hf_shape(write_hf(tmp_path / "a", config, SHARDS))
    explicit = read_hf_shape(write_hf(tmp_path / "b", {**config, "head_dim": 256}, SHARDS))

    assert (default.n_head_kv, default.head_dim_k, default.head_dim_v) == (32, 64, 64)
    assert (explicit.head_dim_k, explicit.head_dim_v) == (256, 256)


def test_hf_float32_doubles_kv_cache(tmp_path: Path) -> None:
    bf16 = estimate_model(write_hf(tmp_path / "a", LLAMA_CONFIG, SHARDS), Runtime.OLLAMA)
    f32_config = {**LLAMA_CONFIG, "torch_dtype": "float32"}
    f32 = estimate_model(write_hf(tmp_path / "b", f32_config, SHARDS), Runtime.OLLAMA)

    assert f32.parts["kv_cache"] == kv_bytes(16, 4096, 1, 8, 64, 64, elem=4)
    assert f32.parts["kv_cache"] == 2 * bf16.parts["kv_cache"]
    assert "x f32" in f32.detail


def test_hf_missing_dtype_means_two_bytes(tmp_path: Path) -> None:
    config = {k: v for k, v in LLAMA_CONFIG.items() if k != "torch_dtype"}

    assert read_hf_shape(write_hf(tmp_path / "m", config, SHARDS)).kv_bytes_per_element == 2


def test_hf_text_config_nesting(tmp_path: Path) -> None:
    text = {k: v for k, v in LLAMA_CONFIG.items() if k != "torch_dtype"}
    config = {
        "model_type": "llava",
        "torch_dtype": "float32",
        "text_config": text,
        "vision_config": {"num_hidden_layers": 99, "hidden_size": 7},
    }
    folder = write_hf(tmp_path / "llava", config, SHARDS)

    estimate = estimate_model(folder, Runtime.OLLAMA)

    assert estimate.parts["kv_cache"] == kv_bytes(16, 4096, 1, 8, 64, 64, elem=4)
    assert estimate.parts["compute"] == compute_bytes(2048, 128256)


def test_hf_falls_back_to_pytorch_bin(tmp_path: Path) -> None:
    folder = write_hf(
        tmp_path / "m",
        LLAMA_CONFIG,
        {
            "pytorch_model-00001-of-00002.bin": 300,
            "pytorch_model-00002-of-00002.bin": 200,
            "training_args.bin": 50,
        },
    )

    assert read_hf_shape(folder).weights_bytes == 500


def test_hf_mistral_consolidated_copy_is_not_counted_twice(tmp_path: Path) -> None:
    folder = write_hf(tmp_path / "m", LLAMA_CONFIG, {**SHARDS, "consolidated.safetensors": 6234})

    assert read_hf_shape(folder).weights_bytes == 6234


def test_hf_symlinked_weights_count_their_target(tmp_path: Path) -> None:
    # The HF cache keeps weights as symlinks into a blobs folder.
    blob = tmp_path / "blob"
    with blob.open("wb") as f:
        f.truncate(4321)
    folder = write_hf(tmp_path / "m", LLAMA_CONFIG, {})
    os.symlink(blob, folder / "model.safetensors")

    assert read_hf_shape(folder).weights_bytes == 4321


# --- errors --------------------------------------------------------------------------------


def test_missing_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "absent.gguf"

    with pytest.raises(EstimateError, match="no such file") as info:
        estimate_model(path, Runtime.OLLAMA)
    assert str(path) in str(info.value)


def test_random_bytes_are_not_a_gguf(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())

    with pytest.raises(EstimateError, match=r"not a GGUF file \(bad magic") as info:
        estimate_model(path, Runtime.OLLAMA)
    assert str(path) in str(info.value)


def test_empty_file_is_not_a_gguf(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"")

    with pytest.raises(EstimateError, match="bad magic"):
        estimate_model(path, Runtime.OLLAMA)


@pytest.mark.parametrize("keep_ratio", [0.1, 0.5, 0.9])
def test_truncated_gguf_is_refused_with_the_cause_chained(
    tmp_path: Path, keep_ratio: float
) -> None:
    data = write_gguf(tmp_path / "full.gguf").read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * keep_ratio)])

    with pytest.raises(EstimateError, match="corrupt GGUF header") as info:
        estimate_model(path, Runtime.OLLAMA)
    assert str(path) in str(info.value)
    assert info.value.__cause__ is not None


def test_gguf_missing_block_count_names_the_key(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", {"block_count": None})

    with pytest.raises(EstimateError) as info:
        estimate_model(path, Runtime.OLLAMA)
    assert str(info.value) == (
        f"{path}: missing key 'llama.block_count' (expected a positive integer)"
    )


def test_gguf_missing_architecture_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.kv_data[0].pop("general.architecture")  # the writer always adds it
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    with pytest.raises(EstimateError, match=re.escape("missing key 'general.architecture'")):
        estimate_model(path, Runtime.OLLAMA)


def test_gguf_without_vocab_names_both_keys(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", tokens=None)

    problem = "'llama.vocab_size' and 'tokenizer.ggml.tokens'"
    with pytest.raises(EstimateError, match=re.escape(problem)):
        estimate_model(path, Runtime.OLLAMA)


def test_gguf_float_key_is_refused_with_its_type(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", {"block_count": 28.0})

    problem = "'llama.block_count' is float32 (expected a positive"
    with pytest.raises(EstimateError, match=re.escape(problem)):
        read_gguf_shape(path)


def test_gguf_zero_head_count_is_refused_not_divided_by(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", {"attention.head_count": 0})

    with pytest.raises(EstimateError, match=re.escape("'llama.attention.head_count' is 0")):
        read_gguf_shape(path)


def test_missing_split_shard_is_refused(tmp_path: Path) -> None:
    first = write_split_gguf(tmp_path / "m.gguf")
    missing = tmp_path / "m-00002-of-00003.gguf"
    missing.unlink()

    with pytest.raises(EstimateError, match="no such file") as info:
        estimate_model(first, Runtime.OLLAMA)
    assert str(missing) in str(info.value)


def test_hf_folder_without_weights_is_refused(tmp_path: Path) -> None:
    folder = write_hf(tmp_path / "m", LLAMA_CONFIG, {"tokenizer.json": 10})

    with pytest.raises(EstimateError, match=r"no weight files \(expected \*\.safetensors") as info:
        estimate_model(folder, Runtime.OLLAMA)
    assert str(folder) in str(info.value)


def test_directory_without_config_json_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EstimateError, match=re.escape("no config.json")) as info:
        estimate_model(tmp_path, Runtime.OLLAMA)
    assert str(tmp_path) in str(info.value)


def test_hf_missing_layers_names_file_and_key(tmp_path: Path) -> None:
    config = {k: v for k, v in LLAMA_CONFIG.items() if k != "num_hidden_layers"}
    folder = write_hf(tmp_path / "m", config, SHARDS)

    with pytest.raises(EstimateError) as info:
        estimate_model(folder, Runtime.OLLAMA)
    assert str(info.value) == (
        f"{folder / 'config.json'}: missing key 'num_hidden_layers' (expected an integer)"
    )


def test_hf_missing_key_inside_text_config_names_the_nesting(tmp_path: Path) -> None:
    text = {k: v for k, v in LLAMA_CONFIG.items() if k != "num_hidden_layers"}
    folder = write_hf(tmp_path / "m", {"text_config": text}, SHARDS)

    problem = "missing key 'text_config.num_hidden_layers'"
    with pytest.raises(EstimateError, match=re.escape(problem)):
        read_hf_shape(folder)

    text = {k: v for k, v in LLAMA_CONFIG.items() if k != "vocab_size"}
    folder = write_hf(tmp_path / "n", {"text_config": text}, SHARDS)
    with pytest.raises(EstimateError, match=re.escape("missing key 'text_config.vocab_size'")):
        read_hf_shape(folder)


def test_hf_invalid_json_is_refused(tmp_path: Path) -> None:
    folder = write_hf(tmp_path / "m", {}, SHARDS)
    (folder / "config.json").write_text("{not json", encoding="utf-8")

    with pytest.raises(EstimateError, match=re.escape("config.json: not valid JSON")):
        estimate_model(folder, Runtime.OLLAMA)


def test_hf_string_where_integer_expected_is_quoted(tmp_path: Path) -> None:
    config = {**LLAMA_CONFIG, "hidden_size": "2048"}
    folder = write_hf(tmp_path / "m", config, SHARDS)

    problem = "'hidden_size' is '2048' (expected a positive"
    with pytest.raises(EstimateError, match=re.escape(problem)):
        read_hf_shape(folder)


def test_hf_unknown_dtype_is_refused(tmp_path: Path) -> None:
    folder = write_hf(tmp_path / "m", {**LLAMA_CONFIG, "torch_dtype": "int8"}, SHARDS)

    problem = "'torch_dtype' is 'int8' (expected bfloat16"
    with pytest.raises(EstimateError, match=re.escape(problem)):
        read_hf_shape(folder)


def test_other_file_types_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"x")

    problem = "expected a .gguf file or a folder with config.json"
    with pytest.raises(EstimateError, match=re.escape(problem)):
        estimate_model(path, Runtime.OLLAMA)


@pytest.mark.parametrize("arg", ["context", "parallel"])
def test_non_positive_context_or_parallel_is_refused(tmp_path: Path, arg: str) -> None:
    path = write_gguf(tmp_path / "m.gguf")

    with pytest.raises(EstimateError, match=f"{arg} must be a positive integer, got 0"):
        estimate_model(path, Runtime.OLLAMA, **{arg: 0})
