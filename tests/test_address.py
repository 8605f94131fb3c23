"""Tests for supervisor.core.address: HOST:PORT as people write it, refused with the value
quoted."""

from __future__ import annotations

import pytest

from supervisor.core.address import format_address, parse_address


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:10464", ("127.0.0.1", 10464)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("localhost:65535", ("localhost", 65535)),
        ("metrics.example.internal:10464", ("metrics.example.internal", 10464)),
        ("[::1]:10464", ("::1", 10464)),
        ("[::]:10464", ("::", 10464)),
        ("[fe80::1%eth0]:10464", ("fe80::1%eth0", 10464)),
    ],
)
def test_addresses_people_write_are_read(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected
    assert parse_address(format_address(*expected)) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("10464", "has no port"),
        (":10464", "has no host"),
        ("::1:10464", "in brackets"),
        ("127.0.0.1:", "'' is not a port"),
        ("127.0.0.1:65536", "'65536' is not a port"),
        ("127.0.0.1:-1", "'-1' is not a port"),
        ("127.0.0.1:\uff11\uff12", "is not a port"),  # full-width digits
        ("my host:80", "'my host' is not a host name"),
        ("[nothex]:80", "'[nothex]' is not a host name"),
        (10464, "is not HOST:PORT"),
    ],
)
def test_bad_addresses_are_refused_with_the_value_quoted(text: object, fragment: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_address(text)

    assert repr(text) in str(caught.value) and fragment in str(caught.value)
