"""Small helpers for the tests against real inference servers (llama.cpp, vLLM): a free
loopback port, HTTP calls that tell "not up yet" from an answer, and the checkout's
fleetctl."""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.error
import urllib.request
from typing import Any

from tests.entrypoints import entry_point


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, timeout_s: float = 5.0) -> tuple[int, str]:
    """(status, body); status 0 while nothing answers (refused, or reset while the
    container restarts)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, str(e)


def post_json(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        found: dict[str, Any] = json.loads(reply.read())
    return found


def fleetctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [entry_point("fleetctl"), *args], capture_output=True, text=True, timeout=120, check=False
    )
