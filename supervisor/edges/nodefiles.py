"""The files `fleetctl node init` reads and writes: Docker's daemon.json and the NVIDIA
runtime's config.toml, each backed up beside itself before it changes."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from supervisor.core.nodesetup import FileEdit, NodeSetupError
from supervisor.edges.fsutil import write_all

DAEMON_CONFIG = Path("/etc/docker/daemon.json")
RUNTIME_CONFIG = Path("/etc/nvidia-container-runtime/config.toml")
BACKUP_INFIX = ".fleetd-backup-"


def read_daemon_config(path: Path) -> str | None:
    """daemon.json's text, or None when there is none yet (Docker's defaults)."""
    if not path.parent.is_dir():
        raise NodeSetupError(
            f"{path.parent} does not exist: is Docker installed on this node? "
            "(--daemon-config names another daemon.json): nothing was changed"
        )
    try:
        return _read(path)
    except FileNotFoundError:
        return None


def read_runtime_config(path: Path) -> str:
    """The NVIDIA runtime's config.toml; refuses when it is missing."""
    try:
        return _read(path)
    except FileNotFoundError:
        raise NodeSetupError(
            f"{path} does not exist: the NVIDIA Container Toolkit is not installed, or made "
            "no config (`nvidia-ctk config default --output "
            f"{path}` writes one); install it, or pass --skip-runtime-config to set up "
            "daemon.json alone: nothing was changed"
        ) from None


def _read(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise NodeSetupError(f"cannot read {path}: {e.strerror}: nothing was changed") from None
    try:
        return data.decode("utf-8-sig")  # dockerd accepts a byte-order mark too
    except UnicodeDecodeError as e:
        raise NodeSetupError(
            f"{path}: not UTF-8 text (byte {e.start}): nothing was changed"
        ) from None


def write_edits(edits: Sequence[FileEdit], stamp: str) -> dict[str, Path | None]:
    """Writes the edits that change something, all or none, each existing file first
    copied to `FILE.fleetd-backup-<stamp>` beside it. Returns the backups by path (None:
    the file is new). A file that cannot be written is one clear error, with every file
    as it was and no backup left behind."""
    changed = [edit for edit in edits if edit.changed]
    backups: dict[str, Path | None] = {}
    try:
        for edit in changed:
            backups[edit.path] = (
                _backup(Path(edit.path), stamp) if edit.old_text is not None else None
            )
        modes = {edit.path: _mode(Path(edit.path)) for edit in changed}
        # Staged 0600 (never more open than the file was), then given the file's own mode.
        write_all({Path(edit.path): edit.new_text for edit in changed}, mode=0o600)
    except OSError as e:
        _remove(backups)
        where = e.filename or ", ".join(backups)
        raise NodeSetupError(f"cannot write {where}: {e.strerror}: nothing was changed") from None
    for path, mode in modes.items():
        with contextlib.suppress(OSError):
            os.chmod(path, mode)
    return backups


def _backup(path: Path, stamp: str) -> Path:
    """A copy of `path` (mode and times kept) under a name no file has yet."""
    backup = path.with_name(f"{path.name}{BACKUP_INFIX}{stamp}")
    number = 1
    while backup.exists():
        number += 1
        backup = path.with_name(f"{path.name}{BACKUP_INFIX}{stamp}-{number}")
    shutil.copy2(path, backup)
    return backup


def _mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o644


def _remove(backups: dict[str, Path | None]) -> None:
    for backup in backups.values():
        if backup is not None:
            with contextlib.suppress(OSError):
                backup.unlink()
