"""Files written so that a crash at any instant leaves the old or the new content."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path


def atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    """Write `text` to `path` via a synced temp file and a rename in the same directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _stage(path, text, mode)
    try:
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    _fsync_dir(path.parent)


def write_all(texts: Mapping[Path, str], mode: int = 0o644) -> None:
    """Write every file or none: each text to a synced temp file beside its file first, then
    the renames, in the mapping's order. A failure while staging (a full disk, a folder that
    cannot be written) removes the temp files and leaves every file as it was; the OSError
    names the file (`filename`)."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, text in texts.items():
            try:
                staged.append((_stage(path, text, mode), path))
            except OSError as e:  # naming the file, which a failed write() does not
                raise OSError(e.errno, e.strerror, str(path)) from e
        for temp, path in staged:
            os.replace(temp, path)
    except BaseException:
        for temp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        raise
    for folder in dict.fromkeys(path.parent for path in texts):
        _fsync_dir(folder)


def remove_temps(folder: Path, *names: str, older_than_s: float | None = None) -> None:
    """Remove the temp files a killed writer of `folder/NAME` left (`.NAME.*.tmp`), or only
    those older than `older_than_s` when a live writer might be using a new one."""
    cutoff = None if older_than_s is None else time.time() - older_than_s
    for name in names:
        for temp in folder.glob(f".{name}.*.tmp"):
            with contextlib.suppress(OSError):
                if cutoff is None or temp.stat().st_mtime < cutoff:
                    temp.unlink()


def _stage(path: Path, text: str, mode: int) -> Path:
    """`text` in a synced temp file beside `path`, with `mode`; the caller renames it."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(name, mode)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        raise
    return Path(name)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
