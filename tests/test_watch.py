"""LogFollower's reading of Docker's stamped log stream (supervisor.edges.watch), fed the bytes
Docker's log API sends, without an engine (tests/integration/ follows real containers)."""

from __future__ import annotations

import queue
from typing import Any

from supervisor.edges.watch import LogFollower, LogLine


def stamped(stamp: str, text: str) -> bytes:
    return f"2026-11-23T08:49:{stamp}Z {text}\n".encode()


def follower(since_ns: int = 0) -> tuple[LogFollower, queue.Queue[Any]]:
    out: queue.Queue[Any] = queue.Queue()
    classify = lambda line: line if "out of memory" in line else None  # noqa: E731
    return LogFollower(None, "c", "id", since_ns, out, classify=classify), out  # type: ignore[arg-type]


def matched(out: queue.Queue[Any]) -> list[str]:
    lines = []
    while not out.empty():
        item = out.get()
        if isinstance(item, LogLine):
            lines.append(item.text)
    return lines


def test_a_stderr_line_stamped_before_the_stdout_line_ahead_of_it_is_still_read() -> None:
    # Docker stamps stdout and stderr in separate copiers: in the log, an OOM line on
    # stderr can follow a stdout line stamped a few microseconds after it.
    f, out = follower()
    f._pump(
        [
            stamped("53.240000100", "standin: POST /api/generate 500"),  # stdout
            stamped("53.240000050", "ggml: cudaMalloc failed: out of memory"),  # stderr
            stamped("53.240000200", "level=ERROR ... out of memory"),
        ]
    )
    assert matched(out) == [
        "ggml: cudaMalloc failed: out of memory",
        "level=ERROR ... out of memory",
    ]
    assert f.since_ns == 1795423793240000200  # the cursor: the newest stamp read


def test_what_the_cursor_covers_is_not_read_again() -> None:
    f, out = follower(since_ns=1795423793240000100)
    f._pump(
        [
            stamped("53.240000100", "old: out of memory"),  # at the cursor: handled before
            stamped("53.240000300", "new: out of memory"),
        ]
    )
    assert matched(out) == ["new: out of memory"]


def test_a_line_split_across_chunks_is_read_whole() -> None:
    f, out = follower()
    line = stamped("53.5", "CUDA out of memory. Tried to allocate 1.06 GiB")
    f._pump([line[:20], line[20:41], line[41:]])
    assert matched(out) == ["CUDA out of memory. Tried to allocate 1.06 GiB"]
