"""Detector recall and false alarms on the labelled corpus (tests/data/corpus), per runtime.

Prints the Markdown tables for docs/detector.md ("The corpus and its figures"). Each corpus
entry is one incident as the program printed it: one line, or the lines of one multi-line
error (a traceback, a ggml line and the runner's verdict). An entry is found when the
detector, built exactly as fleetd builds it for a service of that runtime, matches any of
its lines with the entry's class; a look-alike raises a false alarm when any of its lines
matches anything.
Run: .venv/bin/python bench/detector_recall.py [--split heldout|tune|all]
     .venv/bin/python bench/detector_recall.py --rules   (the rule tables of the same page)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date
from functools import cache
from pathlib import Path

from supervisor.core.config import ServiceConfig
from supervisor.core.detector import CLASS_PRIORITY, Detector
from supervisor.core.rules import BUILTIN_RULES, KNOWN_RUNTIMES, Rule
from supervisor.daemon import _detector

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "data" / "corpus"
LABELS = ("vram_oom", "gpu_fault", "host_oom", "start_failure", "none")
SPLITS = ("tune", "heldout")
HELD_OUT_PERCENT = 30  # of the entries whose source no rule cites, chosen by hash
# The service runtime a program's log is read as; libraries run inside a `generic` app.
SERVICE_RUNTIME = {
    "ollama": "ollama",
    "llamacpp": "llamacpp",
    "vllm": "vllm",
    "tgi": "tgi",
    "sglang": "sglang",
    "tensorrt": "tensorrt",
    "triton": "triton",
}
PROGRAM_NAMES = {
    "ollama": "Ollama",
    "llamacpp": "llama.cpp / ggml",
    "vllm": "vLLM",
    "tgi": "TGI",
    "sglang": "SGLang",
    "tensorrt": "TensorRT-LLM / TensorRT",
    "triton": "Triton",
    "pytorch": "PyTorch",
    "jax": "JAX / XLA",
    "tensorflow": "TensorFlow",
    "onnxruntime": "ONNX Runtime",
    "deepspeed": "DeepSpeed",
    "kernel": "Linux kernel, NVIDIA driver",
    "docker": "Docker",
}


@dataclass(frozen=True)
class Entry:
    """One labelled incident (or look-alike) as a program printed it."""

    program: str  # the corpus file it comes from, e.g. "vllm"
    lines: tuple[str, ...]
    label: str
    source: str
    split: str
    note: str = ""
    seen_by_rules: bool = False  # its source was cited by rules.py before the corpus existed
    batch: int = 1  # 2: gathered after the rules were changed for batch 1, all held out

    @property
    def service_runtime(self) -> str:
        return SERVICE_RUNTIME.get(self.program, "generic")


def load_corpus(folder: Path = CORPUS) -> list[Entry]:
    """Every entry of every `<program>.jsonl` in the folder, in file order."""
    entries = []
    for path in sorted(folder.glob("*.jsonl")):
        for text in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(text)
            lines = record["lines"] if "lines" in record else [record["line"]]
            entries.append(
                Entry(
                    program=path.stem,
                    lines=tuple(lines),
                    label=record["label"],
                    source=record["source"],
                    split=record["split"],
                    note=record.get("note", ""),
                    seen_by_rules=record.get("seen_by_rules", False),
                    batch=record.get("batch", 1),
                )
            )
    return entries


def held_out_by_hash(lines: Sequence[str]) -> bool:
    """The split rule, fixed before any rule was measured on the corpus."""
    digest = hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()
    return int(digest[:8], 16) % 100 < HELD_OUT_PERCENT


@cache
def service_detector(runtime: str) -> Detector:
    """The detector fleetd builds for a service of this runtime without rules of its own."""
    config = {"runtime": runtime, "containers": ["app"], "ladder": [{"model": "m", "vram": "1GiB"}]}
    if runtime == "generic":
        config["image"] = "app:latest"  # a generic service must name its image
    service = ServiceConfig.model_validate(config)
    return _detector(service)


def matched_classes(entry: Entry) -> frozenset[str]:
    """The incident classes the service's detector finds in the entry's lines."""
    detector = service_detector(entry.service_runtime)
    found = (detector.classify(line) for line in entry.lines)
    return frozenset(str(m.incident_class) for m in found if m is not None)


@dataclass
class Figures:
    """Counts for one program (or all) on one split."""

    vram_total: int = 0
    vram_found: int = 0
    other_total: int = 0  # gpu_fault, host_oom, start_failure entries
    other_right: int = 0
    lookalike_total: int = 0
    lookalike_alarms: int = 0
    vram_on_other: int = 0  # a non-VRAM entry called vram_oom: a wrong step-down
    missed: list[Entry] = field(default_factory=list)
    alarms: list[Entry] = field(default_factory=list)

    def add(self, entry: Entry, classes: frozenset[str]) -> None:
        if entry.label == "vram_oom":
            self.vram_total += 1
            self.vram_found += "vram_oom" in classes
            if "vram_oom" not in classes:
                self.missed.append(entry)
            return
        self.vram_on_other += "vram_oom" in classes
        if entry.label == "none":
            self.lookalike_total += 1
            self.lookalike_alarms += bool(classes)
            if classes:
                self.alarms.append(entry)
            return
        self.other_total += 1
        self.other_right += entry.label in classes
        if entry.label not in classes:
            self.missed.append(entry)

    @property
    def recall(self) -> float | None:
        return self.vram_found / self.vram_total if self.vram_total else None

    @property
    def false_alarm_rate(self) -> float | None:
        return self.lookalike_alarms / self.lookalike_total if self.lookalike_total else None


def measure(
    entries: Iterable[Entry], split: str | None, batch: int | None = None
) -> dict[str, Figures]:
    """Figures per program and for "all", on one split (None: every entry) and batch."""
    figures: dict[str, Figures] = {}
    for entry in entries:
        if split is not None and entry.split != split:
            continue
        if batch is not None and entry.batch != batch:
            continue
        classes = matched_classes(entry)
        figures.setdefault(entry.program, Figures()).add(entry, classes)
        figures.setdefault("all", Figures()).add(entry, classes)
    return figures


def _ratio(part: int, whole: int) -> str:
    return f"{part}/{whole} ({part / whole:.0%})" if whole else "-"


def table(figures: dict[str, Figures]) -> str:
    """A Markdown table: one row per program, then all of them."""
    rows = [
        "| program | read as | vram_oom found | look-alikes alarmed | other classes right "
        "| non-VRAM called vram_oom |",
        "|---|---|---|---|---|---|",
    ]
    order = [p for p in PROGRAM_NAMES if p in figures] + ["all"]
    for program in order:
        f = figures[program]
        name = PROGRAM_NAMES.get(program, "**all**")
        runtime = SERVICE_RUNTIME.get(program, "generic") if program != "all" else ""
        rows.append(
            f"| {name} | {runtime} | {_ratio(f.vram_found, f.vram_total)} "
            f"| {_ratio(f.lookalike_alarms, f.lookalike_total)} "
            f"| {_ratio(f.other_right, f.other_total)} | {f.vram_on_other} |"
        )
    return "\n".join(rows)


def size_table(entries: Sequence[Entry]) -> str:
    """Entries per program and label (held-out ones in brackets), lines and sources."""
    head = "| program | " + " | ".join(LABELS) + " | lines | sources |"
    rows = [head, "|---" * (len(LABELS) + 3) + "|"]
    for program in [p for p in PROGRAM_NAMES if any(e.program == p for e in entries)]:
        mine = [e for e in entries if e.program == program]
        cells = []
        for label in LABELS:
            n = sum(e.label == label for e in mine)
            held = sum(e.label == label and e.split == "heldout" for e in mine)
            cells.append(f"{n} ({held})" if n else "-")
        lines = sum(len(e.lines) for e in mine)
        sources = len({e.source for e in mine})
        row = " | ".join([PROGRAM_NAMES[program], *cells, str(lines), str(sources)])
        rows.append(f"| {row} |")
    return "\n".join(rows)


def report(entries: Sequence[Entry], split: str | None, batch: int | None = None) -> str:
    figures = measure(entries, split, batch)
    lines = [table(figures), ""]
    for title, kind in (("Missed", "missed"), ("False alarms", "alarms")):
        listed = [e for f in (figures[p] for p in figures if p != "all") for e in getattr(f, kind)]
        if listed:
            lines.append(f"{title} ({split or 'all'}):")
            lines += [f"* {e.program} [{e.label}] {e.lines[0][:110]!r}" for e in listed]
            lines.append("")
    return "\n".join(lines)


def _wording(rule: Rule) -> str:
    return ", ".join(sorted(rule.runtimes)) if rule.runtimes else "any"


def _code(text: str, limit: int = 150) -> str:
    """Markdown inline code for a log line, cut at `limit` characters."""
    if len(text) > limit:
        text = text[: limit - 2].rstrip() + " …"
    text = text.replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _links(source: str) -> str:
    return re.sub(
        r"https://github\.com/([\w.-]+/[\w.-]+)/(?:issues|pull)/(\d+)",
        lambda m: f"[{m[1]}#{m[2]}]({m[0]})",
        source,
    )


def rule_tables() -> str:
    """The rule count, the rules by runtime and the rule table of docs/detector.md."""
    ranked = sorted(BUILTIN_RULES, key=lambda r: CLASS_PRIORITY.index(r.incident_class))
    counts: dict[tuple[str, str], int] = {}
    for rule in ranked:
        key = (str(rule.incident_class), _wording(rule))
        counts[key] = counts.get(key, 0) + 1
    out = ["| class | wording of | rules |", "|---|---|---|"]
    out += [f"| {cls} | {who} | {n} |" for (cls, who), n in counts.items()]
    out += ["", "| runtime | rules in its own wording (tried first in their class) |", "|---|---|"]
    for runtime in sorted(KNOWN_RUNTIMES):
        own = [f"`{r.id}`" for r in ranked if r.runtimes and runtime in r.runtimes]
        out.append(f"| {runtime} | {', '.join(own) or '-'} |")
    shared = [f"`{r.id}`" for r in ranked if r.runtimes is None]
    out.append(f"| any runtime | {', '.join(shared)} |")
    out += [
        "",
        "| id | class | wording of | what it matches | example | source |",
        "|---|---|---|---|---|---|",
    ]
    for rule in BUILTIN_RULES:
        example = min(rule.examples, key=len)
        out.append(
            f"| `{rule.id}` | {rule.incident_class} | {_wording(rule)} | {rule.description} "
            f"| {_code(example)} | {_links(rule.source)} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=(*SPLITS, "all"), default=None)
    parser.add_argument("--rules", action="store_true", help="print the rule tables instead")
    args = parser.parse_args()
    if args.rules:
        print(rule_tables())
        return
    split = args.split
    entries = load_corpus()
    print(f"Measured {date.today().isoformat()} on {len(entries)} corpus entries.\n")
    print(size_table(entries) + "\n")
    splits: Sequence[str | None] = [split if split != "all" else None] if split else SPLITS
    for name in splits:
        print(f"### {name or 'all'}\n")
        print(report(entries, name))
    if split in (None, "heldout"):
        print("### heldout, batch 2 only (gathered after the rule changes)\n")
        print(report(entries, "heldout", batch=2))


if __name__ == "__main__":
    main()
