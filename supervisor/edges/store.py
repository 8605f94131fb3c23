"""The state store: `<state-dir>/state.json` on disk, the writers' lock, hand-off files.

`StateStore.load` never raises for a bad file: it moves the file aside
(`state.json.corrupt-<UTC time>`, or `state.json.newer-v<N>-<UTC time>` for a newer
schema) and starts empty, with a note. `save` writes with `fsutil.atomic_write`, so a
crash or `kill -9` at any instant leaves either the previous or the new content.
Writers (fleetd, fleetctl) hold `StateStore.lock()`, an flock on `state.lock` that the
kernel releases when the holder dies, so they never write at the same time. A running
fleetd also holds `daemon.lock` (its pid and control socket inside) for its whole life:
fleetctl finds the daemon through it, and never changes the state behind a live daemon.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from supervisor.core.state import (
    _SERVICE_RE,
    SCHEMA_VERSION,
    STATE_FILE,
    FleetState,
    NewerStateError,
    StateError,
)
from supervisor.edges.fsutil import atomic_write, remove_temps

if TYPE_CHECKING:
    from supervisor.core.rungs import RungSetup

LOCK_FILE = "state.lock"
DAEMON_LOCK_FILE = "daemon.lock"  # held by a running fleetd for its whole life
FILE_MODE = 0o644
DIR_MODE = 0o755
STALE_TEMP_S = 300.0  # a temp file this old belongs to a writer that was killed
HANDOFF_FILES = ("model", "args", "env")  # in <state-dir>/services/<service>/


@dataclass(frozen=True)
class DaemonInfo:
    """What a running fleetd writes into `daemon.lock`: its pid and control socket."""

    pid: int | None
    socket: str | None

    def to_bytes(self) -> bytes:
        return (json.dumps({"pid": self.pid, "socket": self.socket}) + "\n").encode()

    @classmethod
    def parse(cls, data: bytes) -> DaemonInfo | None:
        try:
            document = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(document, dict):
            return None
        pid, socket = document.get("pid"), document.get("socket")
        return cls(
            pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
            socket if isinstance(socket, str) else None,
        )


@dataclass(frozen=True)
class LoadResult:
    """The loaded state and what a person should be told about how it was obtained."""

    state: FleetState
    notes: tuple[str, ...] = ()


class StateStore:
    """Loads and saves state.json, holds the writers' lock, writes model hand-off files."""

    def __init__(self, state_dir: Path, clock: Callable[[], float] = time.time) -> None:
        self.state_dir = state_dir
        self.path = state_dir / STATE_FILE
        self.lock_path = state_dir / LOCK_FILE
        self._clock = clock

    def load(self) -> LoadResult:
        """The saved state; a missing, corrupt or newer file gives an empty state and a note."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return LoadResult(FleetState(), (f"no state yet ({self.path} does not exist)",))
        except OSError as e:
            raise StateError(f"cannot read {self.path}: {e.strerror or e}") from e
        try:
            return LoadResult(FleetState.from_bytes(data))
        except NewerStateError as e:
            detail = f"was written by a newer fleetd (schema version {e.version}, this one reads "
            return self._set_aside(f"newer-v{e.version}", f"{detail}{SCHEMA_VERSION})")
        except StateError as e:
            return self._set_aside("corrupt", f"was corrupt ({e})")

    def save(self, state: FleetState) -> None:
        """Write state.json atomically (mode 0644), creating the state dir if missing."""
        try:
            _make_dirs(self.state_dir)
            atomic_write(self.path, state.to_json(), FILE_MODE)
        except OSError as e:
            raise StateError(f"cannot write {self.path}: {e.strerror or e}") from e

    @contextlib.contextmanager
    def lock(self, blocking: bool = True) -> Iterator[None]:
        """Hold the exclusive writers' lock (flock on state.lock); not re-entrant."""
        fd = self._open_lock_file()
        try:
            _acquire(fd, blocking)
            with contextlib.suppress(OSError):  # a full disk: the pid only names the holder
                _write_pid(fd)
            self._remove_stale_temps()
            try:
                yield
            finally:
                os.ftruncate(fd, 0)  # no stale pid for the next holder's error message
        finally:
            os.close(fd)  # closing releases the flock

    def hold_daemon_lock(self, socket_path: Path | None) -> int:
        """Take `daemon.lock` for the life of this process (one fleetd per state dir);
        returns its fd, which the caller keeps open. The file names the pid and socket."""
        path = self.state_dir / DAEMON_LOCK_FILE
        try:
            _make_dirs(self.state_dir)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        except OSError as e:
            raise StateError(f"cannot open {path}: {e.strerror or e}") from e
        # fleetctl tests the lock with a shared flock for an instant: retry briefly.
        deadline = time.monotonic() + 2.0
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = DaemonInfo.parse(os.pread(fd, 4096, 0))
                    os.close(fd)
                    pid = holder.pid if holder else "unknown"
                    raise StateError(
                        f"another fleetd (pid {pid}) is running with state dir {self.state_dir}"
                    ) from None
                time.sleep(0.05)
        info = DaemonInfo(os.getpid(), str(socket_path) if socket_path else None)
        try:  # fleetctl finds the daemon's socket here: it must be written
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.to_bytes(), 0)
        except OSError as e:
            os.close(fd)
            raise StateError(f"cannot write {path}: {e.strerror or e}") from e
        return fd

    def running_daemon(self) -> DaemonInfo | None:
        """The fleetd holding `daemon.lock` on this state dir, or None when none runs."""
        path = self.state_dir / DAEMON_LOCK_FILE
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None  # never started here, or not readable: nothing to go by
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return DaemonInfo.parse(os.pread(fd, 4096, 0)) or DaemonInfo(None, None)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def adopt(self) -> None:
        """Run as root (`sudo fleetctl ...`), give what this process created in the state
        dir to the dir's owner, so the fleetd user can still replace it."""
        if os.geteuid() != 0:
            return
        try:
            owner = os.stat(self.state_dir)
        except FileNotFoundError:
            return
        for root, dirs, files in os.walk(self.state_dir):
            for name in dirs + files:
                path = os.path.join(root, name)
                with contextlib.suppress(FileNotFoundError):
                    st = os.lstat(path)
                    if (st.st_uid, st.st_gid) != (owner.st_uid, owner.st_gid):
                        os.lchown(path, owner.st_uid, owner.st_gid)

    def write_model_file(self, service: str, model: str) -> Path:
        """Atomically write `model` + newline to `<state_dir>/services/<service>/model`."""
        path = self._model_path(service)
        if not model or any(ch.isspace() or not ch.isprintable() for ch in model):
            raise StateError(f"model {model!r} for {service}: expected a name without spaces")
        try:
            _make_dirs(path.parent)
            atomic_write(path, model + "\n", FILE_MODE)
        except OSError as e:
            raise StateError(f"cannot write {path}: {e.strerror or e}") from e
        return path

    def write_handoff(
        self,
        setup: RungSetup,
        also: Mapping[Path, str] | None = None,
        then: Callable[[], None] | None = None,
    ) -> Path:
        """Write a rung's hand-off files (`model`, `args`, `env` in
        `<state_dir>/services/<service>/`) and `also` (other files that must name the same
        rung, such as a compose `.env`), all or none; returns the model file's path.

        Each file whose text changes is written to a synced temp file beside it first; then
        `then()` runs (the caller saves the state there); then the temp files replace the
        files, `model` last. A failure before the replacing (a full disk, `then` raising)
        leaves every file as it was: StateError naming the file and the cause."""
        folder = self._model_path(setup.service).parent
        model = setup.model
        if not model or any(ch.isspace() or not ch.isprintable() for ch in model):
            raise StateError(f"model {model!r} for {setup.service}: expected a name without spaces")
        files = setup.files()
        texts = {folder / "args": files["args"], folder / "env": files["env"], **(also or {})}
        texts[folder / "model"] = files["model"]
        staged: list[tuple[Path, Path]] = []
        try:
            _make_handoff_dir(folder)
            for path, text in texts.items():
                if _text_of(path) != text:
                    staged.append((_stage(path, text), path))
            if then is not None:
                then()
        except BaseException:
            for temp, _ in staged:
                with contextlib.suppress(OSError):
                    temp.unlink()
            raise
        _replace_staged(staged)
        return folder / "model"

    def read_model_file(self, service: str) -> str | None:
        """The model in a service's hand-off file, or None when it is missing or empty."""
        path = self._model_path(service)
        try:
            model = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise StateError(f"cannot read {path}: {e}") from e
        return model or None

    def _model_path(self, service: str) -> Path:
        if not _SERVICE_RE.fullmatch(service):
            raise StateError(f"service name {service!r}: expected letters, digits, '_', '.', '-'")
        return self.state_dir / "services" / service / "model"

    def _set_aside(self, kind: str, why: str) -> LoadResult:
        """Move the bad file aside (never delete a person's data) and start empty."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._clock()))
        aside = _free_name(self.state_dir / f"{STATE_FILE}.{kind}-{stamp}")
        try:
            os.rename(self.path, aside)
        except OSError as e:
            raise StateError(f"{self.path} {why}, and moving it aside failed: {e}") from e
        note = (
            f"{STATE_FILE} {why}; moved aside to {aside.name}; starting from the config's defaults"
        )
        return LoadResult(FleetState(), (note,))

    def _open_lock_file(self) -> int:
        try:
            _make_dirs(self.state_dir)
            return os.open(self.lock_path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as e:
            raise StateError(f"cannot open {self.lock_path}: {e.strerror or e}") from e

    def _remove_stale_temps(self) -> None:
        """Drop the temp files a killed writer left behind (the lock is held)."""
        # Only the lock's holder writes state.json: any temp file of it is a dead writer's.
        remove_temps(self.state_dir, STATE_FILE)
        # fleetd and `fleetctl generate` write hand-off files without the lock: age, not
        # the lock, is what makes one of those safe to remove.
        for folder in self.state_dir.glob("services/*/"):
            remove_temps(folder, *HANDOFF_FILES, older_than_s=STALE_TEMP_S)


def _make_handoff_dir(folder: Path) -> None:
    try:
        _make_dirs(folder)
    except OSError as e:
        raise StateError(f"cannot create {folder}: {e.strerror or e}") from e


def _text_of(path: Path) -> str | None:
    """A file's text, or None when it is missing or cannot be read (so it is written)."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _stage(path: Path, text: str) -> Path:
    """`text` in a synced temp file beside `path` (mode 0644), to replace it later."""
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise StateError(f"cannot write {path}: {e.strerror or e}") from e
    temp = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, FILE_MODE)
    except BaseException as e:
        with contextlib.suppress(OSError):
            temp.unlink()
        if isinstance(e, OSError):
            raise StateError(f"cannot write {path}: {e.strerror or e}") from e
        raise
    return temp


def _replace_staged(staged: list[tuple[Path, Path]]) -> None:
    """Each temp file over its file, in order, then each folder synced (the renames last)."""
    for index, (temp, path) in enumerate(staged):
        try:
            os.replace(temp, path)
        except OSError as e:
            for left, _ in staged[index:]:
                with contextlib.suppress(OSError):
                    left.unlink()
            raise StateError(f"cannot replace {path}: {e.strerror or e}") from e
    for folder in dict.fromkeys(path.parent for _, path in staged):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _acquire(fd: int, blocking: bool) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        raise StateError(
            f"state is locked by another fleetd/fleetctl (pid {_holder_pid(fd)})"
        ) from e


def _holder_pid(fd: int) -> str:
    """The pid the holder wrote, or 'unknown' if it has not written it yet."""
    holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return holder if holder.isdigit() else "unknown"


def _write_pid(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _make_dirs(directory: Path) -> None:
    """Create `directory` and missing parents with mode 0755 whatever the umask."""
    missing = [d for d in (directory, *directory.parents) if not d.exists()]
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir()
            os.chmod(d, DIR_MODE)


def _free_name(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`... when a file set aside in the same second exists."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate
