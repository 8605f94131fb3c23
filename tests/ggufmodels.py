"""Tiny valid GGUF models that the real llama.cpp server loads and answers with.

A llama-architecture model with random weights and a byte-level SentencePiece ("llama")
vocabulary: three control tokens, the 256 byte tokens llama.cpp's SPM tokenizer falls
back to, then letter pieces up to the vocabulary size asked for. The same shape always
gives the same bytes (the weights come from a seeded generator), so a recorded server log
stays true of the file that is written again from its shape.

    write_gguf(tmp_path / "m.gguf", GgufShape(layers=2, n_embd=256, n_head=4))
    python -m tests.ggufmodels OUT.gguf --layers 4 --n-embd 512 --n-head 8 --n-head-kv 2
"""

from __future__ import annotations

import argparse
import itertools
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import gguf
import numpy as np

ARCH = "llama"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2: unk, bos, eos
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))
MIN_VOCAB = len(SPECIAL_TOKENS) + len(BYTE_TOKENS)
WORD_START = "\u2581"  # SentencePiece's "▁": a piece that begins a word
WEIGHT_TYPES = ("f32", "f16", "q8_0")
# general.file_type (llama_ftype): what llama.cpp prints as the model's "file type".
_FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7}
_WEIGHT_SCALE = 0.02  # weights in +-0.02 keep activations finite through every layer


@dataclass(frozen=True)
class GgufShape:
    """The hyperparameters of one written model."""

    layers: int = 2
    n_embd: int = 256
    n_head: int = 4
    n_head_kv: int | None = None  # None: as many as n_head (no GQA)
    n_ff: int | None = None  # None: 4 x n_embd
    context_length: int = 4096
    vocab: int = 300
    weight_type: str = "f32"  # f32, f16 or q8_0 for every matrix; norms stay f32
    seed: int = 0
    head_dim: int | None = None  # None: n_embd / n_head; else written as key/value_length

    def __post_init__(self) -> None:
        _check_shape(self)

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_head_kv is None else self.n_head_kv

    @property
    def ff(self) -> int:
        return 4 * self.n_embd if self.n_ff is None else self.n_ff

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head if self.head_dim is None else self.head_dim

    def label(self) -> str:
        """A short name for tables and file names: L2-E256-H4/4-F1024-V300-f32."""
        head = "" if self.head_dim is None else f"x{self.head_dim}"
        return (
            f"L{self.layers}-E{self.n_embd}-H{self.n_head}/{self.kv_heads}{head}-F{self.ff}"
            f"-V{self.vocab}-{self.weight_type}"
        )


def _check_shape(shape: GgufShape) -> None:
    sizes = (shape.layers, shape.n_embd, shape.n_head, shape.kv_heads, shape.ff, shape.head_size)
    if min(sizes) < 1:
        raise ValueError(f"every size must be positive: {shape}")
    if shape.head_dim is None and shape.n_embd % shape.n_head:
        raise ValueError(f"n_embd must divide by n_head (or give head_dim): {shape}")
    if shape.n_head % shape.kv_heads:
        raise ValueError(f"n_head must divide by n_head_kv: {shape}")
    if shape.vocab < MIN_VOCAB:
        raise ValueError(f"vocab must be at least {MIN_VOCAB} (3 control + 256 bytes): {shape}")
    if shape.weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type must be one of {WEIGHT_TYPES}: {shape.weight_type!r}")
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    rows = (shape.n_embd, shape.ff, shape.n_head * shape.head_size)  # each matrix's row length
    if shape.weight_type == "q8_0" and any(n % block for n in rows):
        raise ValueError(f"q8_0 needs n_embd, n_ff, n_head x head_dim in multiples of {block}")


def write_gguf(path: Path, shape: GgufShape) -> Path:
    """Write the model of `shape` to `path` and return the path."""
    path = Path(path)
    writer = gguf.GGUFWriter(path, ARCH)
    _add_hparams(writer, shape)
    _add_vocab(writer, shape.vocab)
    rng = np.random.default_rng(shape.seed)
    for name, dims in _tensor_dims(shape):
        _add_tensor(writer, name, dims, shape.weight_type, rng)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_hparams(writer: gguf.GGUFWriter, shape: GgufShape) -> None:
    writer.add_name(f"fleetd-test {shape.label()}")
    writer.add_file_type(_FILE_TYPE[shape.weight_type])
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    if shape.head_dim is not None:
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
    writer.add_rope_dimension_count(shape.head_size)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(shape.vocab)


def _add_vocab(writer: gguf.GGUFWriter, size: int) -> None:
    pieces = list(itertools.islice(_word_pieces(), size - MIN_VOCAB))
    kinds = [gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS)
    kinds[0] = gguf.TokenType.UNKNOWN
    kinds += [gguf.TokenType.BYTE] * len(BYTE_TOKENS) + [gguf.TokenType.NORMAL] * len(pieces)
    # SPM merges the pair whose merged piece scores highest: earlier pieces are preferred.
    scores = [0.0] * MIN_VOCAB + [-float(i) for i in range(len(pieces))]
    writer.add_tokenizer_model("llama")
    writer.add_token_list([*SPECIAL_TOKENS, *BYTE_TOKENS, *pieces])
    writer.add_token_scores(scores)
    writer.add_token_types(kinds)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)


def _word_pieces() -> Iterator[str]:
    """'▁', letters, '▁'+letter, then ever longer letter strings: unique and unending."""
    letters = string.ascii_lowercase
    yield WORD_START
    yield from letters
    yield from (WORD_START + c for c in letters)
    for length in itertools.count(2):
        yield from ("".join(p) for p in itertools.product(letters, repeat=length))


def _tensor_dims(shape: GgufShape) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Each tensor's name and numpy shape (rows = outputs): llama.cpp's llama layout."""
    e, ff = shape.n_embd, shape.ff
    q, kv = shape.n_head * shape.head_size, shape.kv_heads * shape.head_size
    yield "token_embd.weight", (shape.vocab, e)
    for i in range(shape.layers):
        yield f"blk.{i}.attn_norm.weight", (e,)
        yield f"blk.{i}.attn_q.weight", (q, e)
        yield f"blk.{i}.attn_k.weight", (kv, e)
        yield f"blk.{i}.attn_v.weight", (kv, e)
        yield f"blk.{i}.attn_output.weight", (e, q)
        yield f"blk.{i}.ffn_norm.weight", (e,)
        yield f"blk.{i}.ffn_gate.weight", (ff, e)
        yield f"blk.{i}.ffn_up.weight", (ff, e)
        yield f"blk.{i}.ffn_down.weight", (e, ff)
    yield "output_norm.weight", (e,)
    yield "output.weight", (shape.vocab, e)


def _add_tensor(
    writer: gguf.GGUFWriter,
    name: str,
    dims: tuple[int, ...],
    weight_type: str,
    rng: np.random.Generator,
) -> None:
    if len(dims) == 1:  # norm scales: ones, as a freshly initialised RMSNorm has
        writer.add_tensor(name, np.ones(dims, np.float32))
        return
    # Uniform, not normal: numpy draws uniform floats several times faster, and the tiny
    # models only need weights that are random and small.
    data = rng.random(dims, dtype=np.float32)
    data -= 0.5
    data *= 2 * _WEIGHT_SCALE
    if weight_type == "f16":
        writer.add_tensor(name, data.astype(np.float16))
    elif weight_type == "q8_0":
        q8_0 = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(data, q8_0), raw_dtype=q8_0)
    else:
        writer.add_tensor(name, data)


# --- command line ------------------------------------------------------------------------


def _add_shape_flags(parser: argparse.ArgumentParser) -> None:
    for field in fields(GgufShape):
        flag = "--" + field.name.replace("_", "-")
        if field.name == "weight_type":
            parser.add_argument(flag, choices=WEIGHT_TYPES, default=field.default)
        else:
            parser.add_argument(flag, type=int, default=field.default, metavar="N")


def shape_from_args(argv: Sequence[str]) -> GgufShape:
    """The shape that command-line flags (`--layers 4 --n-embd 512 ...`) describe."""
    parser = argparse.ArgumentParser(prog="GgufShape", exit_on_error=False)
    _add_shape_flags(parser)
    options: dict[str, Any] = vars(parser.parse_args(argv))
    return GgufShape(**options)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.ggufmodels", description="Write a tiny random llama GGUF model."
    )
    parser.add_argument("out", type=Path, help="the .gguf file to write")
    _add_shape_flags(parser)
    options: dict[str, Any] = vars(parser.parse_args(argv))
    out: Path = options.pop("out")
    shape = GgufShape(**options)
    write_gguf(out, shape)
    print(f"{out}: {shape.label()}, {out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
