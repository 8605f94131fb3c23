"""Listen addresses written as people write them: `127.0.0.1:10464`, `[::1]:10464`.

Kept apart from the metrics server so the config can check an address without
importing the Prometheus client.
"""

from __future__ import annotations

import re

ADDRESS_EXPECTED = "HOST:PORT such as 127.0.0.1:10464, [::1]:10464 or 0.0.0.0:10464"

# A host name or IPv4 address; IPv6 goes in brackets, as in URLs.
_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")
_IPV6_RE = re.compile(r"^[0-9A-Fa-f:.]+(%[A-Za-z0-9_.-]+)?$")
_PORT_RE = re.compile(r"^[0-9]{1,5}$")


def parse_address(text: object) -> tuple[str, int]:
    """`HOST:PORT` -> (host, port); port 0 asks for any free port. ValueError names the value."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not {ADDRESS_EXPECTED}")
    host, sep, port_text = text.strip().rpartition(":")
    if not sep:
        raise ValueError(f"{text!r} has no port (expected {ADDRESS_EXPECTED})")
    if not host:
        raise ValueError(f"{text!r} has no host (expected {ADDRESS_EXPECTED})")
    if host.startswith("[") and host.endswith("]") and _IPV6_RE.fullmatch(host[1:-1]):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: put an IPv6 address in brackets (expected {ADDRESS_EXPECTED})")
    elif not _HOST_RE.fullmatch(host):
        raise ValueError(f"{text!r}: {host!r} is not a host name or address")
    if not _PORT_RE.fullmatch(port_text) or int(port_text) > 65535:
        raise ValueError(f"{text!r}: {port_text!r} is not a port (expected 0 to 65535)")
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    """The inverse of `parse_address`: IPv6 hosts come back in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
