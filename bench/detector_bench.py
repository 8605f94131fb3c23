"""Detector throughput: lines per second through `Detector.classify`, one core.

Prints a Markdown table for docs/detector.md ("Speed"). Two kinds of line that match
nothing: ordinary log lines (most of a real log), and rules.NOT_INCIDENTS (lines that
mention memory, so they pass the literal prefilter and run the regular expressions).
Run: .venv/bin/python bench/detector_bench.py
"""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from datetime import date

from supervisor.core.detector import Detector, compile_rule
from supervisor.core.rules import BUILTIN_RULES, NOT_INCIDENTS

CALLS = 300_000

ORDINARY = (
    "INFO 07-28 06:40:59 [loggers.py:118] Engine 000: Avg prompt throughput: 0.0 tokens/s",
    '[GIN] 2024/12/31 - 01:58:01 | 200 |  1.386181264s |       127.0.0.1 | POST "/api/generate"',
    'INFO:     10.80.23.18:51408 - "POST /v1/chat/completions HTTP/1.1" 200 OK',
    "srv  update_slots: all slots are idle",
    "slot launch_slot_: id  0 | task 12 | processing task",
    "llama_context: n_ctx_per_seq = 4096",
)


def lines_per_s(detector: Detector, lines: Sequence[str]) -> float:
    classify = detector.classify
    n = len(lines)
    start = time.perf_counter()
    for i in range(CALLS):
        if classify(lines[i % n]) is not None:
            raise SystemExit(f"benchmark line matched: {lines[i % n]!r}")
    return CALLS / (time.perf_counter() - start)


def main() -> None:
    no_literal = compile_rule("my.exit", "gpu_fault", r"^E\d+$")
    cases = [
        ("every rule, no runtime (`runtime=None`)", Detector(), True),
        ('every rule, as a vLLM service (`runtime="vllm"`)', Detector(runtime="vllm"), True),
        ('every rule, as an Ollama service (`runtime="ollama"`)', Detector(runtime="ollama"), True),
        (
            "vLLM service + one per-service rule without a literal",
            Detector([no_literal, *BUILTIN_RULES], runtime="vllm"),
            False,
        ),
    ]
    print(f"Detector.classify, {CALLS:,} calls per cell, one core; {date.today()},")
    print(f"Python {platform.python_version()}, {platform.processor() or platform.machine()}.\n")
    print('| detector | ordinary log lines | the "not incidents" lines |')
    print("|---|---|---|")
    for name, detector, with_benign in cases:
        ordinary = f"{lines_per_s(detector, ORDINARY):,.0f} lines/s"
        benign = f"{lines_per_s(detector, NOT_INCIDENTS):,.0f} lines/s" if with_benign else ""
        print(f"| {name} | {ordinary} | {benign} |")


if __name__ == "__main__":
    main()
