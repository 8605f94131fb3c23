"""What the fuzzers share: a fixed seed, a bounded number of examples, a time bound on each
example, the odd values they mutate seeds with, and a tally for the run's summary.

    FLEETD_FUZZ_SCALE=50 pytest -q tests/fuzz     # 50 times the examples, for a long run
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
from collections import Counter, defaultdict
from collections.abc import Iterator
from types import FrameType
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

SCALE = max(1, int(os.environ.get("FLEETD_FUZZ_SCALE", "1")))

# surface -> outcome -> cases; printed at the end of the run (tests/fuzz/conftest.py).
TALLY: defaultdict[str, Counter[str]] = defaultdict(Counter)


def fuzz_settings(examples: int) -> settings:
    """`examples` (times FLEETD_FUZZ_SCALE) cases, the same ones on every run."""
    return settings(
        max_examples=examples * SCALE,
        derandomize=True,  # a fixed seed: CI tries the same cases every time
        database=None,
        deadline=None,  # `bounded` below fails a slow example, and also stops a hung one
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


class Hang(BaseException):
    """An example ran past its bound. A BaseException, so that no `except Exception` in
    the code under test turns it into a clean refusal."""


@contextlib.contextmanager
def bounded(seconds: float) -> Iterator[None]:
    """Raise Hang in the main thread if the block runs longer than `seconds`."""

    def expire(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# Values that broke parsers before, or might: wrong types, limits, units, markup, controls.
ODD_SCALARS: list[Any] = [
    None, True, False, 0, -1, 1, 7, 2**31, 2**63, 10**30, -(10**30), 0.5, -0.0, 1e308,
    float("inf"), float("-inf"), float("nan"), "", " ", "0", "-1", "1e999", "0x10",
    "12 potatoes", "1GiB", "-1GiB", "0MiB", "1e30GiB", "9999999999999999TiB", "6.2GB",
    "0s", "1ms", "-5s", "100000000d", "10m", "nan", "\x00", "\u202e", "é", "\n", "a\nb",
    "\t", "'", '"', "\\", "$HOME", "${HOME}", "$(id)", "`id`", "{{ 7*7 }}", "[bold]x[/]",
    "&anchor", "*alias", "!!python/object:os.system", "../../etc/passwd", "/", "a:b:c:d",
    "-", "--", "x" * 300, "y" * 5000,
]  # fmt: skip

odd_scalars = st.sampled_from(ODD_SCALARS) | st.integers() | st.text(max_size=40)
odd_values = st.recursive(
    odd_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=8,
)


Tree = Any
Path_ = tuple[Any, ...]


def paths(tree: Tree, at: Path_ = ()) -> list[Path_]:
    """Every place in a parsed document (mapping keys and list indexes), the root first."""
    found = [at]
    if isinstance(tree, dict):
        for key, value in tree.items():
            found += paths(value, (*at, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            found += paths(value, (*at, index))
    return found


def _parent(tree: Tree, at: Path_) -> Any:
    for part in at[:-1]:
        tree = tree[part]
    return tree


@st.composite
def mutated_tree(
    draw: st.DrawFn,
    seed: Tree,
    keys: list[str],
    values: st.SearchStrategy[Any] = odd_values,
    actions: tuple[str, ...] = ("replace", "remove", "add", "repeat"),
) -> Tree:
    """`seed` (a parsed document, copied) with 1-4 changes: a value replaced, a key or an
    item removed, a key added (a known one or any), an item repeated."""
    fresh = values.map(copy.deepcopy)  # sampled_from gives the same list each time: copy it
    tree = copy.deepcopy(seed)
    for _ in range(draw(st.integers(1, 4))):
        places = paths(tree)
        at = draw(st.sampled_from(places))
        action = draw(st.sampled_from(actions))
        if not at:
            if action == "replace":
                tree = draw(fresh)
            continue
        parent, last = _parent(tree, at), at[-1]
        if action == "replace":
            parent[last] = draw(fresh)
        elif action == "remove":
            del parent[last]
        elif action == "add" and isinstance(parent[last], dict):
            parent[last][draw(st.sampled_from(keys) | st.text(max_size=12))] = draw(fresh)
        elif action == "repeat" and isinstance(parent, list):
            parent.insert(last, copy.deepcopy(parent[last]))
    return tree


@st.composite
def mutated_text(draw: st.DrawFn, seed: str, tokens: list[str]) -> str:
    """`seed` with 1-5 edits of its text: lines removed, repeated, swapped or re-indented,
    tokens or characters inserted, the end cut off."""
    lines = seed.splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 5))):
        if not lines:
            lines = [""]
        i = draw(st.integers(0, len(lines) - 1))
        action = draw(st.sampled_from(["remove", "repeat", "swap", "indent", "insert", "cut"]))
        if action == "remove":
            del lines[i]
        elif action == "repeat":
            lines.insert(i, lines[i])
        elif action == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif action == "indent":
            lines[i] = draw(st.sampled_from([" ", "  ", "    ", "\t", ""])) + lines[i].lstrip(" ")
        elif action == "insert":
            at = draw(st.integers(0, len(lines[i])))
            token = draw(st.sampled_from(tokens) | st.text(max_size=6))
            lines[i] = lines[i][:at] + token + lines[i][at:]
        else:
            text = "".join(lines)
            lines = text[: draw(st.integers(0, len(text)))].splitlines(keepends=True)
    return "".join(lines)
