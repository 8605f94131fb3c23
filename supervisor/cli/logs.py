"""loguru set up for journald: `<prio>` prefixes instead of timestamps (journald adds them)."""

from __future__ import annotations

import sys
from typing import Any

from loguru import logger

_PRIORITY = {
    "TRACE": 7,
    "DEBUG": 7,
    "INFO": 6,
    "SUCCESS": 5,
    "WARNING": 4,
    "ERROR": 3,
    "CRITICAL": 2,
}


def _journald_format(record: Any) -> str:
    # `\<` keeps loguru from reading the sd-daemon prefix as a colour tag.
    return f"\\<{_PRIORITY.get(record['level'].name, 6)}>{{level}}: {{message}}\n{{exception}}"


def setup_logging(level: str = "INFO", journald: bool | None = None) -> None:
    """To stderr; with syslog priority prefixes under systemd, with times on a terminal."""
    logger.remove()
    if journald is None:
        journald = not sys.stderr.isatty()
    fmt: Any = _journald_format if journald else "{time:HH:mm:ss.SSS} {level: <7} {message}"
    logger.add(sys.stderr, level=level, format=fmt, backtrace=False, diagnose=False)
