"""Write a tiny random-weight LlamaForCausalLM folder that vLLM serves, with no hub.

Runs inside the fleetd-test/vllm-cpu image (transformers, tokenizers and torch are there):

    docker run --rm -v DIR:/models IMAGE python /opt/fleetd/write_model.py /models/NAME \
        --layers 2 --hidden-size 256 --heads 4 --kv-heads 2 --head-dim 64

The folder holds config.json, generation_config.json, model.safetensors and a byte-level
BPE tokenizer (tokenizer.json, tokenizer_config.json) trained offline on generated text.
The same arguments write the same bytes: weights come from one seeded generator, the
training text from a seeded random, and nothing records a time or a path.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM

# Head sizes the CPU attention backend of vLLM 0.32.0 accepts (get_supported_head_sizes).
CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (BOS, EOS, PAD)
BYTE_ALPHABET_SIZE = 256
INIT_STD = 0.02
TRAINING_WORDS = 40_000
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to write (made if missing)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA)")
    parser.add_argument("--head-dim", type=int, default=64, choices=CPU_HEAD_DIMS)
    parser.add_argument("--intermediate-size", type=int, default=512)
    parser.add_argument("--max-position-embeddings", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=512, help="vocabulary size")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    check_shape(parser, args)
    return args


def check_shape(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a shape LlamaForCausalLM or the tokenizer cannot have, naming the value."""
    for name in (
        "layers",
        "hidden_size",
        "heads",
        "kv_heads",
        "intermediate_size",
        "max_position_embeddings",
    ):
        if getattr(args, name) < 1:
            parser.error(
                f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}"
            )
    if args.heads % args.kv_heads:
        parser.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    least_vocab = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    if args.vocab < least_vocab:
        parser.error(
            f"--vocab must be at least {least_vocab} (bytes and special tokens), got {args.vocab}"
        )


def training_text(seed: int) -> list[str]:
    """Lines of made-up words with a skewed frequency, so BPE finds many merges."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(2_000)]
    weights = [1.0 / (rank + 1) for rank in range(len(words))]
    picked = rng.choices(words, weights=weights, k=TRAINING_WORDS)
    return [" ".join(picked[i : i + 20]) for i in range(0, len(picked), 20)]


def build_tokenizer(vocab: int, seed: int) -> Tokenizer:
    """A byte-level BPE of exactly `vocab` tokens (filler tokens pad a short training run)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_text(seed), trainer=trainer)
    short = vocab - tokenizer.get_vocab_size()
    if short > 0:
        tokenizer.add_special_tokens([f"<extra_{i}>" for i in range(short)])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, tokenizer.token_to_id(BOS))],
    )
    return tokenizer


def llama_config(args: argparse.Namespace, tokenizer: Tokenizer) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=args.max_position_embeddings,
        bos_token_id=tokenizer.token_to_id(BOS),
        eos_token_id=tokenizer.token_to_id(EOS),
        pad_token_id=tokenizer.token_to_id(PAD),
        tie_word_embeddings=False,
        dtype=args.dtype,
    )


def random_weights(config: LlamaConfig, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """Every parameter drawn from one seeded generator in name order; norms are ones."""
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name in sorted(shapes):
        if name.endswith("norm.weight"):
            tensor = torch.ones(shapes[name])
        else:
            tensor = torch.randn(shapes[name], generator=generator) * INIT_STD
        weights[name] = tensor.to(dtype).contiguous()
    return weights


def tokenizer_config(max_length: int) -> dict[str, object]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": False,  # tokenizer.json's post-processor already adds it
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "chat_template": CHAT_TEMPLATE,
    }


def write_json(path: Path, data: dict[str, object]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_model(args: argparse.Namespace) -> None:
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(args.vocab, args.seed)
    config = llama_config(args, tokenizer)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(out)  # config.json, only what differs from LlamaConfig's defaults
    write_json(
        out / "generation_config.json",
        {
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id,
        },
    )
    tokenizer.save(str(out / "tokenizer.json"))
    write_json(out / "tokenizer_config.json", tokenizer_config(args.max_position_embeddings))
    weights = random_weights(config, DTYPES[args.dtype], args.seed)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # safetensors writes 0600; others read it too
    params = sum(t.numel() for t in weights.values())
    print(
        f"wrote {out}: {params} parameters ({args.dtype}), vocab {args.vocab}, "
        f"{args.layers} layers, head_dim {args.head_dim}"
    )


def main(argv: list[str] | None = None) -> int:
    write_model(parse_args(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
