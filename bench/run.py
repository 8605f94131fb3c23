"""Planner and `fleetctl plan` benchmarks; prints a Markdown section for docs/benchmarks.md.

Reproducible: fixed seeds, no GPU needed. Run with `make bench` (or python bench/run.py).
"""

from __future__ import annotations

import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

from supervisor.core.planner import Demand, GpuSlot, solve

GIB = 1024**3
ROOT = Path(__file__).resolve().parent.parent


def realistic_host() -> tuple[list[GpuSlot], list[Demand]]:
    """8 x 80 GiB at 85%, 16 services with 4-rung ladders (70B/32B/8B/3B-class needs)."""
    gpus = [GpuSlot(i, int(0.85 * 80 * GIB), 4) for i in range(8)]
    ladders = [
        (44, 20, 9, 4),
        (40, 22, 8, 3),
        (22, 9, 5, 2),
        (20, 9, 4, 2),
        (9, 5, 3, 1),
        (9, 6, 3, 1),
        (8, 5, 2, 1),
        (8, 4, 2, 1),
        (24, 12, 6, 3),
        (18, 9, 5, 2),
        (6, 4, 2, 1),
        (6, 3, 2, 1),
        (12, 8, 4, 2),
        (10, 6, 3, 2),
        (5, 3, 2, 1),
        (4, 2, 1, 1),
    ]
    demands = [
        Demand(f"svc{i}", tuple(int(n * GIB) for n in ladder), None, i % 3, i % 2 == 0)
        for i, ladder in enumerate(ladders)
    ]
    return gpus, demands


def random_family(
    seed: int, sizes_gib: list[int], lo: int, hi: int
) -> tuple[list[GpuSlot], list[Demand]]:
    rng = random.Random(seed)
    gpus = [
        GpuSlot(i, int(0.85 * rng.choice(sizes_gib) * GIB), rng.randint(1, 4)) for i in range(8)
    ]
    demands = []
    for j in range(16):
        top = rng.randint(lo, hi) * GIB // 2
        rungs = sorted([top] + [rng.randint(1, top) for _ in range(3)], reverse=True)
        demands.append(Demand(f"s{j}", tuple(rungs), None, rng.randint(0, 2), rng.random() < 0.4))
    return gpus, demands


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return times


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    lines = [f"## Planner ({date.today().isoformat()})", ""]
    lines.append(
        f"Machine: {platform.node()}, {platform.processor() or platform.machine()}, "
        f"{_cores()} cores, Python {platform.python_version()}"
    )
    lines += [
        "",
        "| case | runs | median ms | p95 ms | max ms | proven optimal |",
        "|---|---|---|---|---|---|",
    ]
    gpus, demands = realistic_host()
    solution = solve(gpus, demands)
    times = timed(lambda: solve(gpus, demands), 30)
    lines.append(
        f"| realistic 8 GPUs x 16 services x 4 rungs | 30 | {statistics.median(times):.1f} "
        f"| {pct(times, 0.95):.1f} | {max(times):.1f} | {solution.optimal} |"
    )
    families = {
        "random 8 GPUs (24/40/80 GiB) x 16 services, all fit": ([24, 40, 80], 8, 80),
        "random 8 x 80 GiB x 16 services": ([80], 8, 80),
        "random 8 x 24 GiB x 16 services, overloaded": ([24], 16, 60),
    }
    for label, (sizes, lo, hi) in families.items():
        times, proven = [], 0
        for seed in range(20):
            g, d = random_family(seed, sizes, lo, hi)
            start = time.perf_counter()
            sol = solve(g, d)
            times.append((time.perf_counter() - start) * 1000)
            proven += sol.optimal
        lines.append(
            f"| {label} | 20 | {statistics.median(times):.1f} | {pct(times, 0.95):.1f} "
            f"| {max(times):.1f} | {proven}/20 |"
        )
    lines += [
        "",
        "## `fleetctl plan` wall time (process start to exit)",
        "",
        "| command | runs | median ms | max ms |",
        "|---|---|---|---|",
    ]
    for args in (["examples/fleet.yaml", "--gpu", "12GiB"], ["examples/multi-gpu.yaml"]):
        command = [sys.executable, "-m", "supervisor.cli.fleetctl_main", "plan", "--config", *args]
        times = timed(
            lambda c=command: subprocess.run(
                c,
                cwd=ROOT,
                check=False,  # type: ignore[misc]
                capture_output=True,
            ),
            10,
        )
        lines.append(
            f"| `fleetctl plan --config {' '.join(args)}` | 10 | "
            f"{statistics.median(times):.0f} | {max(times):.0f} |"
        )
    print("\n".join(lines))


def _cores() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    main()
