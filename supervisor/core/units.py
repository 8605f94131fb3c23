"""Sizes and durations written the way people write them (`2048MiB`, `4.1GB`, `10m`)."""

from __future__ import annotations

import math
import re

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2,
    "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2,
    "gi": 1024**3, "gib": 1024**3, "ti": 1024**4, "tib": 1024**4,
}  # fmt: skip
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
SIZE_EXPECTED = "a size such as 2048MiB, 12GiB or 4.1GB"

_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
DURATION_EXPECTED = "a duration such as 90s, 10m, 1h30m or 24h"

MIB = 1024**2
GIB = 1024**3


def parse_size(value: object) -> int:
    """Return a size in bytes; a bare number counts bytes. Raises ValueError naming the value."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{value!r} is not {SIZE_EXPECTED}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value!r} is negative; expected {SIZE_EXPECTED}")
        _within_size(value, value)
        return value
    match = _SIZE_RE.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"{value!r} is not {SIZE_EXPECTED}")
    n_bytes = float(match.group(1)) * _SIZE_UNITS[unit]
    return round(_within_size(value, n_bytes))


# The largest size and duration a config may give: far above any GPU, host or wait, and
# small enough for every computation the daemon makes with them.
MAX_SIZE_BYTES = 2**50  # 1 PiB
MAX_DURATION_S = 10 * 365 * 86400.0  # ten years


def _within_size(value: object, n_bytes: float) -> float:
    if not n_bytes <= MAX_SIZE_BYTES:  # also refuses inf and nan
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise ValueError(f"{shown} is larger than 1 PiB, the most fleetd accepts")
    return n_bytes


def _within_duration(value: object, seconds: float) -> float:
    if not seconds <= MAX_DURATION_S:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise ValueError(f"{shown} is longer than 10 years, the most fleetd accepts")
    return seconds


def parse_duration(value: object) -> float:
    """Return a duration in seconds; a bare number counts seconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{value!r} is not {DURATION_EXPECTED}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not {DURATION_EXPECTED}")
        if value < 0:
            raise ValueError(f"{value!r} is negative; expected {DURATION_EXPECTED}")
        return _within_duration(value, float(value))
    text = value.strip().lower()
    if _DURATION_RE.sub("", text) != "" or not text:
        raise ValueError(f"{value!r} is not {DURATION_EXPECTED}")
    seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_RE.findall(text))
    return _within_duration(value, seconds)


def format_size(n_bytes: int) -> str:
    """Format bytes for people: MiB below 10 GiB (what nvidia-smi shows), GiB above."""
    if abs(n_bytes) < 10 * GIB:
        return f"{n_bytes / MIB:.0f} MiB"
    return f"{n_bytes / GIB:.1f} GiB"


def format_duration(seconds: float) -> str:
    """Format seconds compactly (`90s`, `10m`, `1h30m`)."""
    whole = round(seconds)
    if whole < 60 or whole % 60:
        return f"{seconds:g}s"
    hours, minutes = divmod(whole // 60, 60)
    return (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "")
