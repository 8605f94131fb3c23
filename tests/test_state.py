"""Tests for supervisor.core.state: the state.json schema, load/save, the lock, hand-off files."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from supervisor.core.state import (
    HISTORY_LIMIT,
    SCHEMA_VERSION,
    STATE_FILE,
    FleetState,
    Incident,
    LogCursor,
    Measured,
    PendingChange,
    ServiceState,
    ServiceStatus,
    StateError,
    Transition,
)
from supervisor.edges.store import StateStore

FIXED_NOW = datetime(2026, 11, 23, 10, 15, 0, tzinfo=UTC).timestamp()
STAMP = "20261123T101500Z"
EVIDENCE = "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 1918.35 MiB on device 0: cudaMalloc failed: out of memory"  # noqa: E501


def full_state() -> FleetState:
    """A state with every field set to a non-default value."""
    incident = Incident(
        time=1732345678.12,
        incident_class="vram_oom",
        rule="llamacpp.cuda_alloc_failed",
        container_id="abc123",
        evidence=EVIDENCE,
    )
    pending = PendingChange(
        to_rung=2,
        to_model="qwen2.5:1.5b",
        reason="3 vram_oom incidents in 10m",
        decided_at=1732345679.5,
        evidence=EVIDENCE,
        rule="llamacpp.cuda_alloc_failed",
        container_id="abc123",
        actor="fleetctl",
        probation_s=1800.0,
    )
    alpha = ServiceState(
        model="llama3.2:3b",
        rung=1,
        state=ServiceStatus.COOLDOWN,
        incidents=[incident, Incident(1732345690.0, "vram_oom", "vllm.oom", None, "OOM")],
        changed_at=1732345000.0,
        pinned=None,
        pending=pending,
        restarts=4,
        last_restart_at=1732345001.25,
        probation_until=1732346800.0,
        step_up_failures=2,
        step_up_not_before=1732691000.0,
    )
    beta = ServiceState(model="phi3:mini", rung=0, state=ServiceStatus.PINNED, pinned=0)
    history = [
        Transition(
            time=1732345000.0,
            service="alpha",
            from_rung=0,
            to_rung=1,
            from_model="llama3.1:8b",
            to_model="llama3.2:3b",
            reason="3 vram_oom incidents in 10m",
            evidence=EVIDENCE,
            rule="llamacpp.cuda_alloc_failed",
            container_id="abc123",
            actor="fleetd",
        ),
        Transition(
            1732346000.0, "beta", 1, 0, "a", "phi3:mini", "pinned by a person", actor="fleetctl"
        ),
    ]
    cursors = {"fleet-alpha-1": LogCursor(container_id="abc123", since_ns=1732345678123456789)}
    measured = {"llama3.2:3b": Measured(2_576_980_378, 2.25, 41.5, 1732345002.0)}
    return FleetState(SCHEMA_VERSION, {"alpha": alpha, "beta": beta}, history, cursors, measured)


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    return StateStore(tmp_path / "state", clock=lambda: FIXED_NOW)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def strict_umask() -> Iterator[None]:
    """Modes must be exact whatever the umask of the process that writes them."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


# ---------------------------------------------------------------- round trip and format


def test_full_state_round_trips_through_save_and_load(store: StateStore) -> None:
    state = full_state()
    store.save(state)
    result = store.load()
    assert result.state == state
    assert result.notes == ()


def test_file_is_json_with_the_documented_keys(store: StateStore) -> None:
    store.save(full_state())
    text = store.path.read_text()
    document = json.loads(text)
    assert text.startswith('{\n  "version": 1,')  # pretty-printed for people
    assert document["version"] == SCHEMA_VERSION
    alpha = document["services"]["alpha"]
    assert (alpha["model"], alpha["rung"], alpha["state"]) == ("llama3.2:3b", 1, "cooldown")
    assert set(alpha) == {
        "model",
        "rung",
        "state",
        "incidents",
        "changed_at",
        "pinned",
        "pending",
        "restarts",
        "last_restart_at",
        "probation_until",
        "step_up_failures",
        "step_up_not_before",
    }
    assert alpha["incidents"][0]["class"] == "vram_oom"
    assert alpha["pending"]["to_rung"] == 2
    assert document["history"][1]["actor"] == "fleetctl"
    assert document["log_cursors"]["fleet-alpha-1"]["since_ns"] == 1732345678123456789
    assert document["measured"]["llama3.2:3b"]["vram_bytes"] == 2_576_980_378


def test_documented_example_with_optional_keys_left_out_loads() -> None:
    text = json.dumps(
        {
            "version": 1,
            "services": {
                "alpha": {
                    "model": "llama3.2:3b",
                    "rung": 0,
                    "pending": {"to_rung": 2, "to_model": "m", "reason": "r", "decided_at": 5},
                }
            },
        }
    )
    state = FleetState.from_json(text)
    assert state.services["alpha"].state is ServiceStatus.STEADY
    assert state.services["alpha"].pending == PendingChange(2, "m", "r", 5.0)
    assert state.history == [] and state.log_cursors == {}


def test_history_file_keeps_the_newest_transitions(store: StateStore) -> None:
    extra = 5
    history = [
        Transition(float(n), "alpha", 0, 1, "a", "b", f"n={n}")
        for n in range(HISTORY_LIMIT + extra)
    ]
    state = FleetState(history=history)
    store.save(state)
    assert len(state.history) == HISTORY_LIMIT + extra  # memory is append-only
    loaded = store.load().state.history
    assert len(loaded) == HISTORY_LIMIT
    assert loaded[0].reason == f"n={extra}" and loaded[-1] == history[-1]


def test_services_the_config_does_not_know_are_kept(store: StateStore) -> None:
    state = FleetState(services={"retired": ServiceState(model="old:7b", rung=3)})
    store.save(state)
    loaded = store.load().state
    loaded.services["alpha"] = ServiceState(model="llama3.2:3b", rung=0)
    store.save(loaded)
    assert set(store.load().state.services) == {"alpha", "retired"}


# ---------------------------------------------------------------- missing and bad files


def test_missing_file_gives_empty_state_and_a_note(store: StateStore) -> None:
    result = store.load()
    assert result.state == FleetState()
    assert result.state.version == SCHEMA_VERSION and result.state.services == {}
    assert len(result.notes) == 1 and "no state yet" in result.notes[0]
    assert not store.state_dir.exists()  # loading creates nothing


def _valid_document() -> dict[str, object]:
    return json.loads(full_state().to_json())  # type: ignore[no-any-return]


def _with_rung_two() -> str:
    document = _valid_document()
    document["services"]["alpha"]["rung"] = "two"  # type: ignore[index]
    return json.dumps(document)


CORRUPT = {
    "truncated": full_state().to_json()[:200].encode(),
    "a list": b"[1, 2, 3]",
    "rung two": _with_rung_two().encode(),
    "empty": b"",
    "not utf-8": b'{"version": 1, "services": {"\xff": 1}}',
    # JSON escapes for lone surrogates: saving them again raised UnicodeEncodeError
    "surrogate in a model": b'{"version": 1, "services": {"a": {"model": "x\\ud800", "rung": 0}}}',
    "surrogate in a name": b'{"version": 1, "services": {"a\\udc80": {"model": "x", "rung": 0}}}',
}


@pytest.mark.parametrize("original", CORRUPT.values(), ids=CORRUPT.keys())
def test_corrupt_file_is_moved_aside_and_load_starts_empty(
    store: StateStore, original: bytes
) -> None:
    store.state_dir.mkdir()
    store.path.write_bytes(original)

    result = store.load()

    aside = store.state_dir / f"{STATE_FILE}.corrupt-{STAMP}"
    assert aside.read_bytes() == original
    assert not store.path.exists()
    assert result.state == FleetState()
    assert len(result.notes) == 1
    assert "corrupt" in result.notes[0] and aside.name in result.notes[0]
    _next_save_writes_a_fresh_file(store)


def test_newer_schema_is_moved_aside_under_its_version(store: StateStore) -> None:
    store.state_dir.mkdir()
    original = json.dumps({"version": 99, "services": {"alpha": {"future": True}}}).encode()
    store.path.write_bytes(original)

    result = store.load()

    aside = store.state_dir / f"{STATE_FILE}.newer-v99-{STAMP}"
    assert aside.read_bytes() == original
    assert result.state == FleetState()
    assert "newer fleetd" in result.notes[0] and "99" in result.notes[0]
    assert aside.name in result.notes[0]
    _next_save_writes_a_fresh_file(store)


def _next_save_writes_a_fresh_file(store: StateStore) -> None:
    store.save(FleetState(services={"alpha": ServiceState(model="m", rung=0)}))
    assert json.loads(store.path.read_text())["services"]["alpha"]["rung"] == 0
    assert store.load().notes == ()


def test_a_second_bad_file_in_the_same_second_does_not_overwrite_the_first(
    store: StateStore,
) -> None:
    store.state_dir.mkdir()
    store.path.write_text("[1]")
    store.load()
    store.path.write_text("[2]")
    note = store.load().notes[0]
    first = store.state_dir / f"{STATE_FILE}.corrupt-{STAMP}"
    second = store.state_dir / f"{STATE_FILE}.corrupt-{STAMP}-2"
    assert (first.read_text(), second.read_text()) == ("[1]", "[2]")
    assert second.name in note


def test_note_pattern_uses_utc_time(tmp_path: Path) -> None:
    store = StateStore(tmp_path, clock=time.time)
    store.path.write_text("{")
    note = store.load().notes[0]
    assert re.search(r"moved aside to state\.json\.corrupt-\d{8}T\d{6}Z;", note)


def test_unusable_state_dir_raises(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    store = StateStore(not_a_dir)
    with pytest.raises(StateError, match="cannot read"):
        store.load()
    with pytest.raises(StateError, match="cannot write"):
        store.save(FleetState())


# ---------------------------------------------------------------- schema messages


def _service_with(**changes: object) -> str:
    document = _valid_document()
    document["services"]["alpha"].update(changes)  # type: ignore[index]
    return json.dumps(document)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            _service_with(rung="two"),
            'services.alpha.rung is "two", expected a non-negative integer',
        ),
        (_service_with(rung=True), "services.alpha.rung is true, expected a non-negative integer"),
        (_service_with(rung=-1), "services.alpha.rung is -1, expected a non-negative integer"),
        (
            _service_with(state="broken"),
            'services.alpha.state is "broken", expected one of "steady"',
        ),
        (
            _service_with(pinned=1.5),
            "services.alpha.pinned is 1.5, expected a non-negative integer",
        ),
        (_service_with(incidents={}), "services.alpha.incidents is an object, expected a list"),
        (_service_with(pined=2), "services.alpha: unknown key 'pined'"),
        (_service_with(changed_at="yesterday"), 'services.alpha.changed_at is "yesterday"'),
        ('{"version": 1, "services": {"a": {"rung": 0}}}', "services.a: missing key 'model'"),
        ('{"services": {}}', "the top level: missing key 'version'"),
        ('{"version": 0}', "version is 0, expected 1"),
        ('{"version": "1"}', 'version is "1", expected a non-negative integer'),
        ('{"version": 99}', "version is 99, expected 1 (written by a newer fleetd)"),
        ("[]", "the top level is a list, expected an object"),
        ('{"version": 1, "history": [{"time": NaN}]}', "history[0].time is NaN"),
        (
            '{"version": 1, "log_cursors": {"c": {"container_id": 1}}}',
            "log_cursors.c.container_id is 1",
        ),
    ],
)
def test_schema_errors_name_key_value_and_expectation(text: str, message: str) -> None:
    with pytest.raises(StateError) as caught:
        FleetState.from_json(text)
    assert message in str(caught.value)


def test_incident_class_and_actor_are_checked() -> None:
    document = _valid_document()
    document["history"][0]["actor"] = "cron"  # type: ignore[index]
    with pytest.raises(StateError, match=r'history\[0\]\.actor is "cron", expected "fleetd" or'):
        FleetState.from_json(json.dumps(document))
    document = _valid_document()
    document["services"]["alpha"]["incidents"][0]["class"] = "vram"  # type: ignore[index]
    expected = r'incidents\[0\]\.class is "vram", expected one of "vram_oom"'
    with pytest.raises(StateError, match=expected):
        FleetState.from_json(json.dumps(document))


# ---------------------------------------------------------------- modes


def test_state_file_and_dir_modes_are_exact(store: StateStore, strict_umask: None) -> None:
    store.save(full_state())
    assert mode_of(store.path) == 0o644
    assert mode_of(store.state_dir) == 0o755


def test_model_file_modes_are_exact(store: StateStore, strict_umask: None) -> None:
    path = store.write_model_file("alpha", "llama3.2:3b")
    assert path == store.state_dir / "services" / "alpha" / "model"
    assert mode_of(path) == 0o644
    assert mode_of(path.parent) == 0o755 and mode_of(path.parent.parent) == 0o755


# ---------------------------------------------------------------- model hand-off files


def test_write_model_file_replaces_the_inode_in_the_same_directory(store: StateStore) -> None:
    first = store.write_model_file("alpha", "llama3.1:8b")
    dir_before, file_before = os.stat(first.parent), os.stat(first)
    second = store.write_model_file("alpha", "llama3.2:3b")
    dir_after, file_after = os.stat(second.parent), os.stat(second)
    assert second == first
    assert dir_after.st_ino == dir_before.st_ino  # the bind-mounted directory is reused
    assert file_after.st_ino != file_before.st_ino  # the file was renamed into place
    assert second.read_bytes() == b"llama3.2:3b\n"
    assert store.read_model_file("alpha") == "llama3.2:3b"
    assert sorted(p.name for p in second.parent.iterdir()) == ["model"]  # no temp left


def test_read_model_file_missing_is_none(store: StateStore) -> None:
    assert store.read_model_file("alpha") is None


@pytest.mark.parametrize("service", ["../etc", "a/b", "", ".hidden"])
def test_model_file_refuses_service_names_that_escape(store: StateStore, service: str) -> None:
    with pytest.raises(StateError, match="service name"):
        store.write_model_file(service, "m")


@pytest.mark.parametrize("model", ["", "two words", "line\nbreak"])
def test_model_file_refuses_models_that_are_not_one_name(store: StateStore, model: str) -> None:
    with pytest.raises(StateError, match="model"):
        store.write_model_file("alpha", model)


# ---------------------------------------------------------------- lock

HOLDER = """
import sys
from pathlib import Path
from supervisor.edges.store import StateStore
with StateStore(Path(sys.argv[1])).lock():
    print("locked", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def holder(store: StateStore) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the lock until its stdin is closed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(store.state_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_lock_held_by_another_process_names_its_pid(
    store: StateStore, holder: subprocess.Popen[str]
) -> None:
    with pytest.raises(StateError) as caught, store.lock(blocking=False):
        pass
    assert str(caught.value) == f"state is locked by another fleetd/fleetctl (pid {holder.pid})"

    assert holder.stdin is not None
    holder.stdin.close()
    assert holder.wait(timeout=10) == 0
    with store.lock(blocking=False):
        assert store.lock_path.read_text() == f"{os.getpid()}\n"
    assert mode_of(store.lock_path) == 0o644


def test_lock_is_released_when_the_holder_is_killed(
    store: StateStore, holder: subprocess.Popen[str]
) -> None:
    holder.kill()
    holder.wait()
    with store.lock(blocking=False):
        pass


def test_lock_removes_the_temp_files_a_killed_writer_left(store: StateStore) -> None:
    """state.json's temp files go at once (only the lock's holder writes it, and a new holder
    means the old one is gone); hand-off temp files, which fleetd and `fleetctl generate`
    write without the lock, once they are old. The hand-off's args and env temp files used
    to stay for ever."""
    store.save(FleetState())
    folder = store.write_model_file("alpha", "m").parent
    state_temps = [store.state_dir / ".state.json.x1.tmp", store.state_dir / ".state.json.x3.tmp"]
    old = [folder / ".model.x2.tmp", folder / ".args.x4.tmp", folder / ".env.x5.tmp"]
    fresh = folder / ".args.x6.tmp"  # `fleetctl generate` may be writing it right now
    for temp in [*state_temps, *old, fresh]:
        temp.write_text("partial")
    for temp in [state_temps[0], *old]:
        os.utime(temp, (time.time() - 3600, time.time() - 3600))
    with store.lock():
        pass
    assert [t.name for t in [*state_temps, *old] if t.exists()] == [] and fresh.exists()


_TRANSITION = (
    '{"time": 1e20, "service": "a", "from_rung": 0, "to_rung": 1, "from_model": "x", '
    '"to_model": "y", "reason": "r", "actor": "fleetd"}'
)


@pytest.mark.parametrize(
    ("text", "wanted"),
    [
        (
            '{"version": 1, "services": {"a": {"model": "x\\ud800", "rung": 0}}}',
            'services.a.model is "x\\ud800", expected text (no lone surrogate such as \\ud800)',
        ),
        (
            '{"version": 1, "services": {"a\\udc80": {"model": "x", "rung": 0}}}',
            'services: key "a\\udc80", expected text',
        ),
        (
            '{"version": 1, "measured": {"m": {"at": 1' + "0" * 5000 + "}}}",
            "not a state file: a number of 5001 digits (10000000000000000000...), expected at most",
        ),
        ("[" * 100_000, "nested too deeply"),
        ('{"version": 1, "history": [' + _TRANSITION + "]}", "before the year 10000"),
    ],
)
def test_a_state_file_python_cannot_take_is_a_state_error(text: str, wanted: str) -> None:
    with pytest.raises(StateError, match=re.escape(wanted)):
        FleetState.from_json(text)


def test_state_bytes_that_are_not_utf8_are_a_state_error() -> None:
    """What `fleetctl status` and `plan --state-dir` read with: a decode error, not a
    UnicodeDecodeError traceback."""
    with pytest.raises(StateError, match=re.escape("not UTF-8: invalid start byte at byte 29")):
        FleetState.from_bytes(b'{"version": 1, "services": {"\xff": 1}}')
    assert FleetState.from_bytes(FleetState().to_json().encode()) == FleetState()


# ---------------------------------------------------------------- a full disk

ENOSPC = OSError(28, "No space left on device")


def _no_space(*_args: object, **_kwargs: object) -> None:
    raise ENOSPC


def test_a_full_disk_under_the_lock_is_a_state_error_and_the_file_is_intact(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fleetctl downgrade` and `reset` on a full disk: writing the holder's pid into
    state.lock raised a bare OSError (a traceback); the pid only names the holder."""
    from supervisor.edges import store as store_module

    store.save(full_state())
    before = store.path.read_bytes()
    monkeypatch.setattr(store_module, "_write_pid", _no_space)
    monkeypatch.setattr(os, "fsync", _no_space)  # every write runs out of room
    wanted = f"cannot write {re.escape(str(store.path))}: No space"
    with store.lock(), pytest.raises(StateError, match=wanted):
        store.save(FleetState())
    assert store.path.read_bytes() == before
    assert [p.name for p in store.state_dir.iterdir() if p.name.endswith(".tmp")] == []


def test_a_daemon_lock_that_cannot_be_written_is_a_state_error(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fleetctl finds the running fleetd's socket in daemon.lock: fleetd must not run
    without it (it used to exit with an OSError traceback)."""
    store.save(FleetState())
    monkeypatch.setattr(os, "pwrite", _no_space)
    with pytest.raises(StateError, match=r"cannot write .*daemon\.lock: No space left on device"):
        store.hold_daemon_lock(None)
    assert store.running_daemon() is None  # the lock was let go


def test_write_all_writes_every_file_or_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from supervisor.edges import fsutil

    first, second = tmp_path / "compose.yml", tmp_path / "sub" / ".env"
    second.parent.mkdir()
    first.write_text("old compose\n")
    real_stage = fsutil._stage

    def stage_then_fill_up(path: Path, text: str, mode: int) -> Path:
        if path == second:
            raise ENOSPC
        return real_stage(path, text, mode)

    monkeypatch.setattr(fsutil, "_stage", stage_then_fill_up)
    with pytest.raises(OSError, match="No space left on device") as raised:
        fsutil.write_all({first: "new compose\n", second: "A=1\n"})
    assert raised.value.filename == str(second)
    assert first.read_text() == "old compose\n" and not second.exists()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["compose.yml"]
    monkeypatch.setattr(fsutil, "_stage", real_stage)
    fsutil.write_all({first: "new compose\n", second: "A=1\n"})
    assert (first.read_text(), second.read_text()) == ("new compose\n", "A=1\n")


def test_remove_temps_takes_only_the_named_files_temps(tmp_path: Path) -> None:
    from supervisor.edges.fsutil import remove_temps

    names = [".compose.yml.a1.tmp", "..env.b2.tmp", ".other.c3.tmp", ".compose.yml.d4.tmp"]
    for name in names:
        (tmp_path / name).write_text("partial")
    os.utime(tmp_path / names[0], (time.time() - 3600, time.time() - 3600))
    os.utime(tmp_path / names[1], (time.time() - 3600, time.time() - 3600))
    remove_temps(tmp_path, "compose.yml", ".env", older_than_s=300)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".compose.yml.d4.tmp", ".other.c3.tmp"]
    remove_temps(tmp_path, "compose.yml")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.c3.tmp"]
