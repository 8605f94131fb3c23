"""Estimate the VRAM a model needs from its own metadata (GGUF header or HF config.json).

No Docker, NVML or network: only the model's files are read, and a GGUF's tensor data is
never touched (the reader memory-maps the file and only the header is parsed).

Formula, all in bytes:

    weights           GGUF: sum of every tensor's data size (all shards of a split GGUF);
                      HF: total size of the *.safetensors files (else pytorch_model*.bin,
                      else *.bin)
    context           the requested context, else the runtime default (4096; vLLM, TGI,
                      SGLang, TensorRT-LLM: the model's max, as their max length defaults
                      to it), capped at the model's trained max context when known; not
                      capped for llama.cpp, whose server allocates every cell of `-c`
    slots             the requested parallel slots, else 1; always 1 for the runtimes whose
                      KV pool is a share of the GPU (vLLM, TGI, SGLang, TensorRT-LLM: one
                      full-length sequence is the minimum they must hold at start)
    slot_cells        llama.cpp: ceil(context / slots) rounded up to a multiple of 256
                      (llama-server splits `-c` over its `-np` slots and pads each share);
                      others: context
    kv_cache          n_layers x slots x slot_cells x n_head_kv x (head_dim_k + head_dim_v)
                      x bytes per element of the KV cache type: f16 = 2, q8_0 = 34/32,
                      q4_0 = 18/32 (llama.cpp's -ctk/-ctv and Ollama's KV cache types, for
                      GGUF models; f16 when none is given); HF: torch_dtype size, bf16/f16
                      = 2, f32 = 4, missing = 2
    compute           llama.cpp: ubatch x 4 x (max(3 x n_ff, 2 x n_head x head_dim_k)
                      + 5 x n_embd) + ubatch x slot_cells x 2, ubatch = min(512, context):
                      the widest step of one micro-batch in f32 plus its f16 attention mask,
                      as llama-server 0.7.0 reserves it (measured on its CPU backend; n_ff
                      missing = 4 x n_embd);
                      others: 512 x (n_embd + n_vocab) x 4 (one 512-token batch of f32
                      activations and logits)
    runtime_overhead  CUDA context and the runtime's own buffers, from its registry entry:
                      ollama 500 MiB, llamacpp 300 MiB, vllm 1024 MiB, generic 500 MiB;
                      tgi, sglang, tensorrt, triton 1024 MiB
    total             sum of the four parts
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from supervisor.core.errors import EstimateError
from supervisor.core.runtimes import REGISTRY, Runtime, spec_of
from supervisor.core.units import GIB, MIB

if TYPE_CHECKING:  # gguf (and numpy under it) loads when a GGUF file is read, not before
    import gguf

# The registry's figures (supervisor.core.runtimes), by runtime.
DEFAULT_CONTEXT: dict[Runtime, int] = {r: s.default_context for r, s in REGISTRY.items()}
RUNTIME_OVERHEAD_MIB: dict[Runtime, int] = {r: s.overhead_mib for r, s in REGISTRY.items()}
COMPUTE_BATCH_TOKENS = 512
COMPUTE_BYTES_PER_ELEMENT = 4  # activations and logits are f32 in every runtime
GGUF_KV_BYTES_PER_ELEMENT = 2  # llama.cpp and ollama default to an f16 KV cache
# KV cache types of GGUF runtimes (llama.cpp -ctk/-ctv, Ollama OLLAMA_KV_CACHE_TYPE):
# (bytes, elements) per block, ggml's sizes; llama-server 0.7.0 reports exactly these.
GGUF_KV_CACHE_TYPES: dict[str, tuple[int, int]] = {
    "f16": (2, 1),
    "q8_0": (34, 32),
    "q4_0": (18, 32),
}
LLAMA_SERVER_CELL_PADDING = 256  # each slot's share of -c is rounded up to this
LLAMA_SERVER_UBATCH = 512  # -ub default; a context below it shrinks the micro-batch
MASK_BYTES_PER_ELEMENT = 2  # the attention mask is f16 (flash attention, llama.cpp's default)

_GGUF_MAGIC = b"GGUF"
# What gguf.GGUFReader raises on a truncated or corrupt header; it has no error type of its own.
_GGUF_READ_ERRORS = (OSError, ValueError, KeyError, IndexError, TypeError, OverflowError)
_SHARD_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_HF_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
_SOURCE_LABEL = {"gguf": "GGUF", "hf": "HF"}


@functools.cache
def _gguf() -> ModuleType:
    import gguf

    return gguf


@functools.cache
def _gguf_int_types() -> frozenset[gguf.GGUFValueType]:
    value = _gguf().GGUFValueType
    return frozenset(
        {
            value.UINT8,
            value.INT8,
            value.UINT16,
            value.INT16,
            value.UINT32,
            value.INT32,
            value.UINT64,
            value.INT64,
        }
    )


@dataclass(frozen=True)
class Estimate:
    total_bytes: int
    source: str
    parts: dict[str, int]
    detail: str


@dataclass(frozen=True)
class ModelShape:
    """What the formula needs, read from a model's metadata."""

    architecture: str
    weights_bytes: int
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_vocab: int
    context_length: int | None
    kv_bytes_per_element: int
    n_ff: int | None = None  # the feed-forward width; None where the metadata has none


def estimate_model(
    path: Path,
    runtime: Runtime,
    context: int | None = None,
    parallel: int | None = None,
    kv_cache: str | None = None,
) -> Estimate:
    """Estimate from a .gguf file or a Hugging Face folder holding config.json.

    kv_cache is the KV cache type of a GGUF runtime (f16, q8_0, q4_0); None: f16 for GGUF,
    the torch_dtype for HF."""
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EstimateError(
                f"{path}: no config.json in this folder (expected a Hugging Face model folder)"
            )
        return estimate_from_shape(read_hf_shape(path), runtime, context, parallel, "hf", kv_cache)
    if not path.exists():
        raise EstimateError(
            f"{path}: no such file (expected a .gguf file or a folder with config.json)"
        )
    if path.suffix.lower() != ".gguf":
        raise EstimateError(
            f"{path}: not a model fleetd can read (expected a .gguf file or a folder with "
            "config.json)"
        )
    shape = read_gguf_shape(path)
    return estimate_from_shape(shape, runtime, context, parallel, "gguf", kv_cache)


# --- the formula -------------------------------------------------------------------------


@dataclass(frozen=True)
class _KvLayout:
    """How a runtime lays its KV cache out: cells per slot, and the element size."""

    ctx: int
    slots: int
    slot_cells: int
    kv_type: str
    block_bytes: int
    block_elements: int

    @property
    def cells(self) -> int:
        return self.slots * self.slot_cells


def estimate_from_shape(
    shape: ModelShape,
    runtime: Runtime,
    context: int | None,
    parallel: int | None,
    source: str,
    kv_cache: str | None = None,
) -> Estimate:
    """Apply the module's formula to a model shape for one runtime."""
    ctx, capped = _resolve_context(shape, runtime, context)
    layout = _kv_layout(shape, runtime, ctx, _resolve_slots(runtime, parallel), source, kv_cache)
    parts = {
        "weights": shape.weights_bytes,
        "kv_cache": _kv_bytes(shape, layout),
        "compute": _compute_bytes(shape, runtime, layout),
        "runtime_overhead": RUNTIME_OVERHEAD_MIB[runtime] * MIB,
    }
    total = sum(parts.values())
    detail = _describe(shape, runtime, source, parts, layout, capped, context, parallel)
    return Estimate(total_bytes=total, source=source, parts=parts, detail=detail)


def _kv_layout(
    shape: ModelShape, runtime: Runtime, ctx: int, slots: int, source: str, kv_cache: str | None
) -> _KvLayout:
    kv_type, (block_bytes, block_elements) = _kv_type(shape, source, kv_cache)
    slot_cells = ctx
    if _sized_as_llama_server(runtime):
        # llama-server 0.7.0 gives each of its -np slots an equal share of -c, padded.
        slot_cells = _round_up(_ceil_div(ctx, slots), LLAMA_SERVER_CELL_PADDING)
    return _KvLayout(ctx, slots, slot_cells, kv_type, block_bytes, block_elements)


def _kv_type(shape: ModelShape, source: str, kv_cache: str | None) -> tuple[str, tuple[int, int]]:
    """The KV cache type's name and its (bytes, elements) per block."""
    if kv_cache is None or kv_cache == "auto":
        n_bytes = shape.kv_bytes_per_element
        return _dtype_text(n_bytes), (n_bytes, 1)
    if kv_cache.startswith("fp8"):  # vLLM's and SGLang's 8-bit KV cache: one byte each
        return kv_cache, (1, 1)
    if source == "hf":
        raise EstimateError(
            f"kv_cache {kv_cache!r} applies to GGUF models (llama.cpp, Ollama); a Hugging Face "
            "model's KV cache is `auto` (its torch_dtype) or `fp8`"
        )
    if kv_cache not in GGUF_KV_CACHE_TYPES:
        expected = ", ".join(GGUF_KV_CACHE_TYPES)
        raise EstimateError(f"kv_cache must be one of {expected}, got {kv_cache!r}")
    return kv_cache, GGUF_KV_CACHE_TYPES[kv_cache]


def _kv_bytes(shape: ModelShape, layout: _KvLayout) -> int:
    def row_bytes(elements: int) -> int:  # one cell of one layer, K or V: whole blocks
        return _ceil_div(elements, layout.block_elements) * layout.block_bytes

    per_cell = row_bytes(shape.n_head_kv * shape.head_dim_k) + row_bytes(
        shape.n_head_kv * shape.head_dim_v
    )
    return shape.n_layers * layout.cells * per_cell


def _compute_bytes(shape: ModelShape, runtime: Runtime, layout: _KvLayout) -> int:
    if not _sized_as_llama_server(runtime):
        return COMPUTE_BATCH_TOKENS * (shape.n_embd + shape.n_vocab) * COMPUTE_BYTES_PER_ELEMENT
    # llama-server reserves its graph for one micro-batch; with flash attention, the peak is
    # the feed-forward step (gate, up and their product live at once) or, for models with
    # wide attention and a narrow FFN, the attention step, plus a few n_embd-wide tensors.
    # Logits count only one row per slot, in a host-side output buffer: no vocab term.
    ubatch = min(LLAMA_SERVER_UBATCH, layout.ctx)
    n_ff = shape.n_ff or 4 * shape.n_embd
    widest = max(3 * n_ff, 2 * shape.n_head * shape.head_dim_k) + 5 * shape.n_embd
    mask = ubatch * layout.slot_cells * MASK_BYTES_PER_ELEMENT
    return ubatch * widest * COMPUTE_BYTES_PER_ELEMENT + mask


def _sized_as_llama_server(runtime: Runtime) -> bool:
    """Whether the runtime sizes its KV cache and compute buffer as llama-server 0.7.0 does
    (measured: tests/data/llamacpp, bench/estimate_accuracy.py)."""
    return spec_of(runtime).sized_as_llama_server


def _ceil_div(value: int, divisor: int) -> int:
    return -(-value // divisor)


def _round_up(value: int, multiple: int) -> int:
    return _ceil_div(value, multiple) * multiple


def _resolve_context(
    shape: ModelShape, runtime: Runtime, requested: int | None
) -> tuple[int, bool]:
    """The context the runtime will allocate, and whether the model's max capped it."""
    if requested is not None:
        _require_positive("context", requested)
        ctx = requested
    elif spec_of(runtime).context_is_model_max and shape.context_length is not None:
        ctx = shape.context_length
    else:
        ctx = DEFAULT_CONTEXT[runtime]
    # llama-server allocates the -c it is given, above the trained context too (it warns).
    if _sized_as_llama_server(runtime):
        return ctx, False
    if shape.context_length is not None and ctx > shape.context_length:
        return shape.context_length, True
    return ctx, False


def _resolve_slots(runtime: Runtime, requested: int | None) -> int:
    if requested is not None:
        _require_positive("parallel", requested)
    # vLLM (and its kind) sizes its KV pool from a share of the GPU; at start it only has
    # to fit one full-length sequence, so more parallel requests do not raise its minimum.
    if spec_of(runtime).one_sequence_at_start or requested is None:
        return 1
    return requested


def _require_positive(name: str, value: int) -> None:
    if value < 1:
        raise EstimateError(f"{name} must be a positive integer, got {value!r}")


def _describe(
    shape: ModelShape,
    runtime: Runtime,
    source: str,
    parts: dict[str, int],
    layout: _KvLayout,
    capped: bool,
    requested_ctx: int | None,
    requested_slots: int | None,
) -> str:
    """One human line showing how the total was obtained."""
    kv_text = "; ".join(
        [
            _kv_terms(shape, layout),
            *_kv_notes(shape, runtime, layout, capped, requested_ctx, requested_slots),
        ]
    )
    return (
        f"{_SOURCE_LABEL.get(source, source)} {shape.architecture}: "
        f"weights {_size_text(parts['weights'])}"
        f" + KV cache {_size_text(parts['kv_cache'])} ({kv_text})"
        f" + compute {_size_text(parts['compute'])}"
        f" + {runtime.value} overhead {_size_text(parts['runtime_overhead'])}"
        f" = {_size_text(sum(parts.values()))}"
    )


def _kv_terms(shape: ModelShape, layout: _KvLayout) -> str:
    slots = f"{layout.slots} slot{'s' if layout.slots != 1 else ''}"
    cells = f"{layout.ctx} ctx x {slots}"
    if layout.slot_cells != layout.ctx:
        cells = f"{slots} x {layout.slot_cells} cells"
    return (
        f"{shape.n_layers} layers x {cells} x {shape.n_head_kv} KV heads"
        f" x {_head_dims_text(shape)} x {layout.kv_type}"
    )


def _kv_notes(
    shape: ModelShape,
    runtime: Runtime,
    layout: _KvLayout,
    capped: bool,
    requested_ctx: int | None,
    requested_slots: int | None,
) -> list[str]:
    notes = []
    if layout.slot_cells != layout.ctx:
        padded = layout.cells != layout.ctx
        notes.append(
            f"{layout.ctx} ctx shared by {layout.slots} slots"
            + (f", each share padded to {LLAMA_SERVER_CELL_PADDING} cells" if padded else "")
        )
    if capped:
        default = f"default {DEFAULT_CONTEXT[runtime]}"
        asked = requested_ctx if requested_ctx is not None else default
        notes.append(f"{asked} ctx capped at model max {shape.context_length}")
    elif shape.context_length is not None and layout.ctx > shape.context_length:
        notes.append(f"{layout.ctx} ctx above model max {shape.context_length}, all allocated")
    spec = spec_of(runtime)
    if spec.one_sequence_at_start and requested_slots not in (None, 1):
        notes.append(
            f"{spec.title} needs 1 sequence at start, parallel {requested_slots} not counted"
        )
    return notes


def _head_dims_text(shape: ModelShape) -> str:
    if shape.head_dim_k == shape.head_dim_v:
        return f"{shape.head_dim_k} dim x K+V"
    return f"({shape.head_dim_k} K + {shape.head_dim_v} V) dim"


def _dtype_text(n_bytes: int) -> str:
    return {2: "f16", 4: "f32"}.get(n_bytes, f"{n_bytes}-byte")


def _size_text(n_bytes: int) -> str:
    if n_bytes >= GIB:
        return f"{n_bytes / GIB:.2f} GiB"
    if n_bytes >= MIB:
        return f"{n_bytes / MIB:.0f} MiB"
    return f"{n_bytes} B"


# --- GGUF --------------------------------------------------------------------------------


def read_gguf_shape(path: Path) -> ModelShape:
    """Read the formula's inputs from a GGUF header, without reading tensor data."""
    reader = _open_gguf(path)
    arch = _gguf_str(reader, path, "general.architecture")
    n_embd = _gguf_int(reader, path, f"{arch}.embedding_length")
    n_head = _gguf_int(reader, path, f"{arch}.attention.head_count")
    default_head_dim = n_embd // n_head
    return ModelShape(
        architecture=arch,
        weights_bytes=_gguf_weights_bytes(reader, path),
        n_layers=_gguf_int(reader, path, f"{arch}.block_count"),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=_gguf_int(reader, path, f"{arch}.attention.head_count_kv", n_head),
        head_dim_k=_gguf_int(reader, path, f"{arch}.attention.key_length", default_head_dim),
        head_dim_v=_gguf_int(reader, path, f"{arch}.attention.value_length", default_head_dim),
        n_vocab=_gguf_vocab(reader, path, arch),
        context_length=_gguf_optional_int(reader, path, f"{arch}.context_length"),
        kv_bytes_per_element=GGUF_KV_BYTES_PER_ELEMENT,
        n_ff=_gguf_optional_int(reader, path, f"{arch}.feed_forward_length"),
    )


def _open_gguf(path: Path) -> gguf.GGUFReader:
    _check_gguf_magic(path)
    try:
        reader: gguf.GGUFReader = _gguf().GGUFReader(path)
        return reader
    except _GGUF_READ_ERRORS as e:
        raise EstimateError(
            f"{path}: corrupt GGUF header ({type(e).__name__}: {e}); expected a complete GGUF file"
        ) from e


def _check_gguf_magic(path: Path) -> None:
    # Checked here rather than inferred from the reader's ValueError text, which names no cause.
    try:
        with path.open("rb") as f:
            magic = f.read(len(_GGUF_MAGIC))
    except FileNotFoundError as e:
        raise EstimateError(f"{path}: no such file (expected a GGUF file)") from e
    except OSError as e:
        raise EstimateError(f"{path}: cannot read ({e.strerror})") from e
    if magic != _GGUF_MAGIC:
        raise EstimateError(f"{path}: not a GGUF file (bad magic, expected {_GGUF_MAGIC!r})")


def _gguf_weights_bytes(reader: gguf.GGUFReader, path: Path) -> int:
    shard_count = _gguf_optional_int(reader, path, "split.count")
    if shard_count is None or shard_count == 1:
        return _tensor_bytes(reader)
    # The first shard holds the metadata; the others only hold tensors that count too.
    return sum(_tensor_bytes(_open_gguf(shard)) for shard in _shard_paths(path, shard_count))


def _tensor_bytes(reader: gguf.GGUFReader) -> int:
    return sum(int(tensor.n_bytes) for tensor in reader.tensors)


def _shard_paths(path: Path, shard_count: int) -> list[Path]:
    match = _SHARD_NAME.match(path.name)
    if match is None or int(match["count"]) != shard_count:
        raise EstimateError(
            f"{path}: split GGUF of {shard_count} shards, but the name does not follow "
            f"NAME-00001-of-{shard_count:05d}.gguf, so the other shards cannot be found"
        )
    stem = match["stem"]
    return [
        path.with_name(f"{stem}-{no:05d}-of-{shard_count:05d}.gguf")
        for no in range(1, shard_count + 1)
    ]


def _gguf_vocab(reader: gguf.GGUFReader, path: Path, arch: str) -> int:
    vocab_size = _gguf_optional_int(reader, path, f"{arch}.vocab_size")
    if vocab_size is not None:
        return vocab_size
    tokens = reader.get_field("tokenizer.ggml.tokens")
    # field.data indexes one entry per token: counting it avoids decoding every token string.
    if tokens is None or tokens.types[:1] != [_gguf().GGUFValueType.ARRAY] or not tokens.data:
        raise EstimateError(
            f"{path}: missing key '{arch}.vocab_size' and 'tokenizer.ggml.tokens' "
            "(expected a vocabulary size or a token list)"
        )
    return len(tokens.data)


def _gguf_str(reader: gguf.GGUFReader, path: Path, key: str) -> str:
    field = reader.get_field(key)
    if field is None:
        raise EstimateError(f"{path}: missing key '{key}' (expected a string)")
    if field.types != [_gguf().GGUFValueType.STRING]:
        raise EstimateError(f"{path}: key '{key}' is {_gguf_type_text(field)} (expected a string)")
    try:
        value: str = field.contents()
    except UnicodeDecodeError as e:
        raise EstimateError(f"{path}: key '{key}' is not valid UTF-8 (expected a string)") from e
    return value


def _gguf_int(reader: gguf.GGUFReader, path: Path, key: str, default: int | None = None) -> int:
    value = _gguf_optional_int(reader, path, key)
    if value is not None:
        return value
    if default is not None:
        return default
    raise EstimateError(f"{path}: missing key '{key}' (expected a positive integer)")


def _gguf_optional_int(reader: gguf.GGUFReader, path: Path, key: str) -> int | None:
    """An integer key, or the largest entry of a per-layer integer array; None when absent."""
    field = reader.get_field(key)
    if field is None:
        return None
    if not field.types or field.types[-1] not in _gguf_int_types():
        raise EstimateError(
            f"{path}: key '{key}' is {_gguf_type_text(field)} (expected a positive integer)"
        )
    contents: Any = field.contents()
    value = max(contents, default=0) if isinstance(contents, list) else contents
    if not isinstance(value, int) or value < 1:
        raise EstimateError(f"{path}: key '{key}' is {contents!r} (expected a positive integer)")
    return value


def _gguf_type_text(field: gguf.ReaderField) -> str:
    return " of ".join(t.name.lower() for t in field.types) or "untyped"


# --- Hugging Face ------------------------------------------------------------------------


def read_hf_shape(folder: Path) -> ModelShape:
    """Read the formula's inputs from a Hugging Face folder's config.json and weight files."""
    config_path = folder / "config.json"
    config = _load_json_object(config_path)
    section, prefix = _hf_text_section(config)
    cfg = _HfConfig(config_path, section, prefix)
    n_embd = cfg.required_int("hidden_size")
    n_head = cfg.required_int("num_attention_heads")
    head_dim = cfg.optional_int("head_dim") or n_embd // n_head
    return ModelShape(
        architecture=_hf_architecture(config),
        weights_bytes=_hf_weights_bytes(folder),
        n_layers=cfg.required_int("num_hidden_layers"),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=cfg.optional_int("num_key_value_heads") or n_head,
        head_dim_k=head_dim,
        head_dim_v=head_dim,
        n_vocab=cfg.required_int("vocab_size"),
        context_length=cfg.optional_int("max_position_embeddings"),
        kv_bytes_per_element=_hf_dtype_bytes(config_path, config, section, prefix),
        n_ff=cfg.optional_int("intermediate_size"),
    )


@dataclass(frozen=True)
class _HfConfig:
    """Typed reads of one config.json section, with errors naming the file and the key."""

    path: Path
    section: dict[str, Any]
    prefix: str

    def required_int(self, key: str) -> int:
        value = self.optional_int(key)
        if value is None:
            raise EstimateError(
                f"{self.path}: missing key '{self.prefix}{key}' (expected an integer)"
            )
        return value

    def optional_int(self, key: str) -> int | None:
        value = self.section.get(key)
        if value is None:  # configs often write null for "use the default"
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EstimateError(
                f"{self.path}: key '{self.prefix}{key}' is {value!r} (expected a positive integer)"
            )
        return value


def _load_json_object(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise EstimateError(f"{path}: no such file (expected a Hugging Face config.json)") from e
    except OSError as e:
        raise EstimateError(f"{path}: cannot read ({e.strerror})") from e
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise EstimateError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(loaded, dict):
        raise EstimateError(f"{path}: top level is {type(loaded).__name__} (expected an object)")
    return loaded


def _hf_text_section(config: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The section holding the language model's shape: multimodal configs nest it."""
    text_config = config.get("text_config")
    if "num_hidden_layers" not in config and isinstance(text_config, dict):
        return text_config, "text_config."
    return config, ""


def _hf_architecture(config: dict[str, Any]) -> str:
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type:
        return model_type
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        return architectures[0]
    return "unknown"


def _hf_dtype_bytes(
    path: Path, config: dict[str, Any], section: dict[str, Any], prefix: str
) -> int:
    # Newer transformers write "dtype" where older ones wrote "torch_dtype"; multimodal
    # configs may keep it at the top level rather than in text_config.
    for where, source in ((prefix, section), ("", config)):
        for key in ("torch_dtype", "dtype"):
            value = source.get(key)
            if value is None:
                continue
            if not isinstance(value, str) or value not in _HF_DTYPE_BYTES:
                expected = ", ".join(_HF_DTYPE_BYTES)
                raise EstimateError(
                    f"{path}: key '{where}{key}' is {value!r} (expected {expected})"
                )
            return _HF_DTYPE_BYTES[value]
    return 2


def _hf_weights_bytes(folder: Path) -> int:
    files = _hf_weight_files(folder)
    if not files:
        raise EstimateError(
            f"{folder}: no weight files (expected *.safetensors, or pytorch_model*.bin / *.bin)"
        )
    try:
        return sum(f.stat().st_size for f in files)
    except OSError as e:  # a dangling symlink into a half-downloaded HF cache, typically
        raise EstimateError(f"{e.filename}: cannot read weight file ({e.strerror})") from e


def _hf_weight_files(folder: Path) -> list[Path]:
    safetensors = sorted(folder.glob("*.safetensors"))
    sharded = [f for f in safetensors if not f.name.startswith("consolidated")]
    if sharded:
        # Mistral repos ship the same weights twice (consolidated.* for mistral-inference).
        return sharded
    if safetensors:
        return safetensors
    return sorted(folder.glob("pytorch_model*.bin")) or sorted(folder.glob("*.bin"))
