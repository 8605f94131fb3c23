"""fleetd's VRAM estimate against what the real llama.cpp server allocates; prints Markdown.

    python bench/estimate_accuracy.py            # about 2 minutes on 2 cores; Docker, root

Builds (or reuses) the real llama-server image (scripts/build-llamacpp-image.sh), writes a
matrix of tiny random GGUF models (tests/ggufmodels.py) into a temp folder, starts
llama-server with `-lv 4` once per row, all rows in one container, and reads its buffer
report: model buffer (weights), KV buffer (KV cache), compute and output buffers. Each row
is compared with `estimate_model(..., Runtime.LLAMACPP, context, parallel, kv_cache)`.

The server runs on its CPU backend here: the runtime overhead the estimate adds (the CUDA
context) has no CPU counterpart, so totals are compared without it.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from supervisor.analyzer.estimate import Estimate, estimate_model  # noqa: E402
from supervisor.core.runtimes import Runtime  # noqa: E402
from supervisor.core.units import MIB  # noqa: E402
from tests.ggufmodels import GgufShape, write_gguf  # noqa: E402

BUILD_SCRIPT = ROOT / "scripts" / "build-llamacpp-image.sh"
TOLERANCE_RATIO = 0.05  # the target: every row's total within 5% ...
TOLERANCE_BYTES = 64 * MIB  # ... or within 64 MiB, for models too small for 5% to mean much
SERVER_TIMEOUT_S = 600

# --- the rows ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One llama-server start: a model shape and the context, slots and KV type it runs with."""

    shape: GgufShape
    context: int
    slots: int
    kv_cache: str = "f16"

    @property
    def name(self) -> str:
        return (
            f"{self.shape.label().replace('/', 'x')}-c{self.context}-np{self.slots}-{self.kv_cache}"
        )

    def server_args(self, model: str) -> list[str]:
        """llama-server's arguments, as fleetd's llamacpp runtime passes them (plus the KV type)."""
        args = ["-m", model, "-c", str(self.context), "-np", str(self.slots), "-lv", "4"]
        if self.kv_cache != "f16":
            # A quantized V cache needs flash attention, which "auto" turns on for it.
            args += ["-ctk", self.kv_cache, "-ctv", self.kv_cache]
        return args


def _shape(layers: int, embd: int, heads: int, kv_heads: int, **more: Any) -> GgufShape:
    return GgufShape(layers=layers, n_embd=embd, n_head=heads, n_head_kv=kv_heads, **more)


# Chosen so that each term dominates some rows: weights (wide, many layers), KV (long
# context, no GQA), compute (wide FFN), and vocab (a 32k vocabulary).
MATRIX: tuple[Row, ...] = (
    Row(_shape(2, 256, 4, 4), 512, 1),
    Row(_shape(4, 512, 8, 2, vocab=1000), 1000, 1),
    Row(_shape(4, 512, 8, 2, vocab=1000), 4096, 4),
    Row(_shape(4, 512, 8, 2, vocab=1000), 4096, 3, "q8_0"),
    Row(_shape(8, 1024, 16, 16, context_length=32768), 16384, 1),
    Row(_shape(8, 1024, 16, 16, context_length=32768), 16384, 2, "q8_0"),
    Row(_shape(8, 1024, 16, 16, context_length=32768), 16384, 4, "q4_0"),
    Row(_shape(8, 1024, 16, 4, n_ff=4096, weight_type="f16"), 8192, 2),
    Row(_shape(12, 768, 12, 4, vocab=32000, weight_type="q8_0"), 2048, 1),
    Row(_shape(6, 2048, 16, 8, n_ff=8192, weight_type="f16"), 4096, 1),
    Row(_shape(6, 2048, 16, 8, n_ff=8192, weight_type="f16"), 4096, 1, "q4_0"),
    Row(_shape(4, 640, 10, 2, n_ff=1792, vocab=8000), 3000, 2),
    # Outside the two shapes the compute formula was fitted on: an FFN narrower than
    # 2 x n_embd (over-estimated), attention wider than n_embd, a context below a micro-batch.
    Row(_shape(2, 1024, 8, 8, n_ff=1536, weight_type="f16"), 1024, 1),
    Row(_shape(2, 1024, 32, 8, head_dim=128, n_ff=1024, weight_type="f16"), 1024, 1),
    Row(_shape(2, 512, 8, 2, vocab=1000), 300, 1),
)


# --- running the real server ---------------------------------------------------------------


def ensure_image() -> str:
    """Build the llama-server image unless it is current; its tag."""
    done = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{BUILD_SCRIPT.name} failed:\n{done.stderr.strip()}")
    return done.stdout.strip().splitlines()[-1]


def model_file(row: Row) -> str:
    return row.shape.label().replace("/", "x") + ".gguf"


def write_models(rows: Iterable[Row], folder: Path) -> dict[GgufShape, Path]:
    """Each distinct shape's GGUF file in folder, written once."""
    return {
        row.shape: write_gguf(folder / model_file(row), row.shape)
        for row in {r.shape: r for r in rows}.values()
    }


# Starts llama-server for one row, waits until it listens or exits, stops it, records the
# exit status: the logs are complete without any HTTP client inside the image (no curl).
_RUN_ROW_SH = """
run_row() {
    log=/logs/$1.log; shift
    llama-server "$@" --host 127.0.0.1 --port 8080 >"$log" 2>&1 &
    pid=$!
    while kill -0 "$pid" 2>/dev/null && ! grep -q 'listening on' "$log"; do sleep 0.05; done
    kill "$pid" 2>/dev/null
    wait "$pid"
    echo "exit status $?" >>"$log"
}
"""


def row_script(rows: Sequence[Row]) -> str:
    calls = [
        shlex.join(["run_row", row.name, *row.server_args(f"/models/{model_file(row)}")])
        for row in rows
    ]
    return _RUN_ROW_SH + "\n".join(calls) + "\n"


def run_rows(
    image: str, rows: Sequence[Row], models: Path, logs: Path, *extra: str
) -> dict[Row, str]:
    """Start llama-server once per row, all in one container; each row's log text."""
    command = [
        "docker", "run", "--rm", *extra,
        "-v", f"{models}:/models:ro", "-v", f"{logs}:/logs",
        "--entrypoint", "/bin/sh", image, "-c", row_script(rows),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=SERVER_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"llama-server container failed ({done.returncode}): {done.stderr}")
    return {row: (logs / f"{row.name}.log").read_text() for row in rows}


# --- llama-server's buffer report ----------------------------------------------------------

_MIB_NUMBER = r"(?P<mib>\d+(?:\.\d+)?) MiB"
_BUFFER_LINES = {
    "model": re.compile(rf"(?P<dev>\S+) model buffer size = +{_MIB_NUMBER}"),
    "kv": re.compile(rf"(?P<dev>\S+) KV buffer size = +{_MIB_NUMBER}"),
    "compute": re.compile(rf"(?P<dev>\S+) compute buffer size = +{_MIB_NUMBER}"),
    "output": re.compile(rf"(?P<dev>\S+) +output buffer size = +{_MIB_NUMBER}"),
}
_KV_SIZE_LINE = re.compile(
    r"llama_kv_cache: size = +(?P<mib>[\d.]+) MiB \( *(?P<cells>\d+) cells, +(?P<layers>\d+) "
    r"layers, +(?P<seqs>\d+)/(?P<streams>\d+) seqs\), K \((?P<k_type>\w+)\)"
)


@dataclass(frozen=True)
class ServerReport:
    """What llama-server said it allocated, in bytes (its MiB figures have 2 decimals)."""

    model_bytes: int
    kv_bytes: int
    compute_bytes: int
    output_bytes: int
    kv_cells: int
    kv_streams: int
    kv_type: str

    @property
    def total_bytes(self) -> int:
        """Weights, KV cache and compute: the output buffer (logits) is host memory under
        CUDA (CUDA_Host), so it is not part of what the estimate prices."""
        return self.model_bytes + self.kv_bytes + self.compute_bytes


def parse_report(log: str) -> ServerReport:
    """The buffer report of a `-lv 4` start-up log; ValueError when a part is missing."""
    sizes = {kind: _buffer_bytes(pattern, log) for kind, pattern in _BUFFER_LINES.items()}
    kv_size = _KV_SIZE_LINE.search(log)
    if kv_size is None:
        raise ValueError("no 'llama_kv_cache: size = ...' line (was the log made with -lv 4?)")
    return ServerReport(
        model_bytes=sizes["model"],
        kv_bytes=sizes["kv"],
        compute_bytes=sizes["compute"],
        output_bytes=sizes["output"],
        kv_cells=int(kv_size["cells"]),
        kv_streams=int(kv_size["streams"]),
        kv_type=kv_size["k_type"],
    )


def _buffer_bytes(pattern: re.Pattern[str], log: str) -> int:
    # One line per device (CPU_Mapped, CPU_REPACK, CUDA0 ...): the part is their sum.
    per_device = {m["dev"]: float(m["mib"]) for m in pattern.finditer(log)}
    if not per_device:
        raise ValueError(f"no line matching {pattern.pattern!r} (was the log made with -lv 4?)")
    return round(sum(per_device.values()) * MIB)


# --- estimate against report ---------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    row: Row
    estimate: Estimate
    report: ServerReport

    @property
    def estimated_total_bytes(self) -> int:
        """The estimate without its runtime overhead (the CUDA context: nothing on CPU)."""
        return self.estimate.total_bytes - self.estimate.parts["runtime_overhead"]

    @property
    def within_target(self) -> bool:
        error = abs(self.estimated_total_bytes - self.report.total_bytes)
        return error <= max(TOLERANCE_RATIO * self.report.total_bytes, TOLERANCE_BYTES)


def compare(row: Row, model: Path, report: ServerReport) -> Comparison:
    estimate = estimate_model(model, Runtime.LLAMACPP, row.context, row.slots, row.kv_cache)
    return Comparison(row, estimate, report)


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / MIB:.2f}"


def _pair(estimated: int, real: int) -> str:
    error = f"{(estimated - real) / real:+.1%}" if real else "n/a"
    return f"{_mib(estimated)} / {_mib(real)} ({error})"


def table(comparisons: Iterable[Comparison]) -> str:
    lines = [
        "| shape | ctx | slots | KV | weights MiB est / real | KV MiB est / real "
        "| compute MiB est / real | total MiB est / real | target | output MiB (host) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    for c in comparisons:
        parts, report = c.estimate.parts, c.report
        lines.append(
            f"| {c.row.shape.label()} | {c.row.context} | {c.row.slots} | {c.row.kv_cache} "
            f"| {_pair(parts['weights'], report.model_bytes)} "
            f"| {_pair(parts['kv_cache'], report.kv_bytes)} "
            f"| {_pair(parts['compute'], report.compute_bytes)} "
            f"| {_pair(c.estimated_total_bytes, report.total_bytes)} "
            f"| {'yes' if c.within_target else 'NO'} | {_mib(report.output_bytes)} |"
        )
    return "\n".join(lines)


def server_version(image: str) -> str:
    done = subprocess.run(
        ["docker", "run", "--rm", image, "--version"], capture_output=True, text=True, check=True
    )
    return " ".join((done.stdout + done.stderr).split())


def machine() -> str:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor() or "unknown CPU",
    )  # fmt: skip
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="keep the models and logs in this folder")
    args = parser.parse_args(argv)
    started = time.monotonic()
    image = ensure_image()
    with tempfile.TemporaryDirectory(prefix="fleetd-accuracy-") as tmp:
        work = args.keep or Path(tmp)
        (work / "models").mkdir(parents=True, exist_ok=True)
        (work / "logs").mkdir(exist_ok=True)
        models = write_models(MATRIX, work / "models")
        logs = run_rows(image, MATRIX, work / "models", work / "logs")
        comparisons = [compare(row, models[row.shape], parse_report(logs[row])) for row in MATRIX]
    print(f"llama.cpp: {server_version(image)} ({image}), CPU backend")
    print(f"machine: {machine()}; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; "
          f"{time.monotonic() - started:.0f} s")  # fmt: skip
    print()
    print(table(comparisons))
    return 0 if all(c.within_target for c in comparisons) else 1


if __name__ == "__main__":
    raise SystemExit(main())
