"""Fuzzing the state decoder (FleetState.from_json) and StateStore.load.

Whatever a state.json holds, decoding it gives a state or a StateError, never another
exception or a hang; a state that decodes saves again (to_json) and reads back the same.
StateStore.load never loses a byte: a file it cannot use is moved aside unchanged, one it
can use stays where it is. Seeds: a state with every field set, written by the code, as
bytes (a torn or flipped write) and as a parsed document (wrong types and values).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from supervisor.core.state import STATE_FILE, FleetState, StateError
from supervisor.edges.store import StateStore
from tests.fuzz.fuzzing import TALLY, bounded, fuzz_settings, mutated_tree, odd_values
from tests.test_state import full_state

pytestmark = pytest.mark.fuzz

SEED_TEXT = full_state().to_json()
SEED_BYTES = SEED_TEXT.encode()
SEED_TREE = json.loads(SEED_TEXT)
DECODE_S = 5.0

KEYS = """version services history log_cursors measured model rung state incidents changed_at
pinned pending restarts last_restart_at probation_until step_up_failures step_up_not_before
time class rule container_id evidence to_rung to_model reason decided_at actor probation_s
gpu service from_rung from_model from_options to_options since_ns vram_bytes load_s
tokens_per_s at parts context parallel estimate_bytes""".split()  # noqa: SIM905 (a paragraph reads better than 60 strings)


def decode(text: str) -> str:
    """'decoded' (and it saves and reads back the same) or 'refused' (a StateError)."""
    try:
        with bounded(DECODE_S):
            state = FleetState.from_json(text)
    except StateError as e:
        assert str(e).strip(), "a StateError says what is wrong"
        return "refused"
    with bounded(DECODE_S):
        again = FleetState.from_json(state.to_json())
    assert again == state, "a state that loads is saved and read back unchanged"
    return "decoded"


@st.composite
def edited_bytes(draw: st.DrawFn, seed: bytes) -> bytes:
    """`seed` with 1-4 byte edits: cut (a torn write), flipped, removed, inserted."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["cut", "flip", "remove", "insert"]))
        if action == "cut":
            del data[at:]
        elif action == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "remove":
            del data[at : at + draw(st.integers(1, 64))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=16) | st.sampled_from(PIECES))
    return bytes(data)


PIECES = [b"[", b"{", b'"', b"\\", b"NaN", b"Infinity", b"-", b"1e999", b"9" * 5000, b"null",
          b"\xc3", b"\xff", b"\x00", b'\\ud800', b",", b"}", b"]"]  # fmt: skip


@fuzz_settings(300)
@given(st.text(max_size=2000))
@example("")
@example("NaN")
@example("[" * 100_000)
@example('{"version": 1e999}')
def test_any_text_decodes_or_is_a_state_error(text: str) -> None:
    TALLY["state: any text"][decode(text)] += 1


@fuzz_settings(300)
@given(mutated_tree(SEED_TREE, KEYS, odd_values))
def test_changed_state_documents_decode_or_are_a_state_error(tree: Any) -> None:
    text = json.dumps(tree, ensure_ascii=False)  # NaN and Infinity as Python writes them
    TALLY["state: changed documents"][decode(text)] += 1


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fleetd-fuzz-state-") as d:
        yield Path(d)


CASES = iter(range(10**9))


@fuzz_settings(300)
@given(edited_bytes(SEED_BYTES) | st.binary(max_size=2000))
@example(b"")
@example(SEED_BYTES[: len(SEED_BYTES) // 2])
def test_load_keeps_every_byte_of_a_file_it_cannot_use(work: Path, data: bytes) -> None:
    state_dir = work / f"case-{next(CASES)}"
    state_dir.mkdir()
    (state_dir / STATE_FILE).write_bytes(data)
    with bounded(DECODE_S):
        result = StateStore(state_dir).load()
    kept = {p.name: p.read_bytes() for p in state_dir.iterdir()}
    assert list(kept.values()) == [data], f"the file's bytes are kept, once: {sorted(kept)}"
    if STATE_FILE in kept:
        assert result.notes == ()
        TALLY["state: StateStore.load of edited files"]["loaded"] += 1
    else:
        assert result.state == FleetState() and "moved aside" in result.notes[0]
        TALLY["state: StateStore.load of edited files"]["moved aside, bytes intact"] += 1
