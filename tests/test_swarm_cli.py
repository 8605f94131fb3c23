"""`fleetctl plan --swarm` against engines that cannot list a swarm's nodes: a stand-in
Engine API on a local port (only what docker-py asks: ping, version, info) answers as a
real engine outside a swarm, or as a worker; fleetctl says so in one line, exit 1."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.entrypoints import entry_point

CONFIG = """\
mode: swarm
services:
  chat:
    runtime: llamacpp
    ladder: [{model: /m/chat.gguf, vram: 4GiB}]
"""


def engine_answering(swarm: dict[str, Any]) -> Iterator[str]:
    class Engine(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?")[0].rsplit("/", 1)[-1]
            body: object = {
                "_ping": "OK",
                "version": {"ApiVersion": "1.41", "Version": "20.10.24"},
                "info": {"Swarm": swarm},
            }.get(path, {"message": "page not found"})
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(200 if path in {"_ping", "version", "info"} else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Engine)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"tcp://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(
    params=[
        ({"LocalNodeState": "inactive", "ControlAvailable": False}, "Swarm: inactive"),
        (
            {"LocalNodeState": "active", "ControlAvailable": False},
            "Swarm: active, a worker (ControlAvailable: false)",
        ),
    ],
    ids=["no-swarm", "worker"],
)
def engine(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    swarm, said = request.param
    for url in engine_answering(swarm):
        yield url, said


def test_plan_swarm_off_a_manager_is_refused_in_one_line(
    tmp_path: Path, engine: tuple[str, str]
) -> None:
    url, said = engine
    config = tmp_path / "fleet.yaml"
    config.write_text(CONFIG)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}

    done = subprocess.run(
        [entry_point("fleetctl"), "plan", "--swarm", "--config", str(config)],
        env={**env, "DOCKER_HOST": url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 1
    assert done.stderr == (
        f"fleetctl: error: this Docker engine is not a Swarm manager (docker info: {said}); "
        "run `fleetctl plan --swarm` on a manager, or point DOCKER_HOST at one\n"
    )
    assert done.stdout == ""
