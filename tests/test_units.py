"""Tests for supervisor.core.units: sizes and durations as people write them."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor.core.units import format_duration, format_size, parse_duration, parse_size

KIB, MIB, GIB = 1024, 1024**2, 1024**3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2048MiB", 2048 * MIB),
        ("12GiB", 12 * GIB),
        ("4.1GB", 4_100_000_000),  # GB is decimal, as marketed
        ("1.5KiB", 1536),
        ("7kb", 7000),
        ("12 gib", 12 * GIB),
        (" 637MiB ", 637 * MIB),
        ("1TiB", 1024 * GIB),
        ("512", 512),
        ("100B", 100),
        (1024, 1024),
        (0, 0),
    ],
)
def test_parse_size_reads_common_spellings(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "value", ["12 furlongs", "twelve", "", "-1GiB", "1e9", "GiB", "12GiBs", -5, 1.5, True, None]
)
def test_parse_size_refuses_and_quotes_the_value(value: object) -> None:
    with pytest.raises(ValueError) as caught:
        parse_size(value)

    assert repr(value) in str(caught.value)
    assert "2048MiB" in str(caught.value)  # says what was expected


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10m", 600),
        ("1h30m", 5400),
        ("60s", 60),
        ("90s", 90),
        ("1.5h", 5400),
        ("250ms", 0.25),
        ("1d", 86400),
        (" 10M ", 600),
        (45, 45),
        (2.5, 2.5),
    ],
)
def test_parse_duration_reads_common_spellings(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "value", ["10", "10 minutes", "", "m", "1x", "ten", "-5s", -1, True, None, [10]]
)
def test_parse_duration_refuses_and_quotes_the_value(value: object) -> None:
    with pytest.raises(ValueError) as caught:
        parse_duration(value)

    assert repr(value) in str(caught.value)
    assert "10m" in str(caught.value)


def test_parse_duration_refuses_nan() -> None:
    with pytest.raises(ValueError):
        parse_duration(math.nan)


@pytest.mark.parametrize(
    ("n_bytes", "text"),
    [
        (2048 * MIB, "2048 MiB"),
        (637 * MIB, "637 MiB"),
        (10 * GIB - MIB, "10239 MiB"),  # below 10 GiB: MiB, as nvidia-smi shows
        (10 * GIB, "10.0 GiB"),
        (24 * GIB, "24.0 GiB"),
        (0, "0 MiB"),
    ],
)
def test_format_size(n_bytes: int, text: str) -> None:
    assert format_size(n_bytes) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(600, "10m"), (5400, "1h30m"), (3600, "1h"), (90, "90s"), (60, "1m"), (0.25, "0.25s")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.integers(min_value=0, max_value=10 * 86400))
def test_formatted_duration_reads_back_as_the_same_seconds(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.integers(min_value=0, max_value=10 * 1024 - 1))
def test_formatted_mib_size_reads_back_exactly(mib: int) -> None:
    assert parse_size(format_size(mib * MIB)) == mib * MIB


@given(st.integers(min_value=10 * GIB, max_value=2**50))
def test_formatted_gib_size_reads_back_within_rounding(n_bytes: int) -> None:
    assert abs(parse_size(format_size(n_bytes)) - n_bytes) <= 0.05 * GIB
