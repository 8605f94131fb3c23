"""fleetd survives losing the Docker engine: it reconnects with backoff and reads on from
its cursor, so lines written while it was cut off still count."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.integration.fleet_harness import Fleet, at_rung

ENGINE = "/var/run/docker.sock"


class SocketProxy:
    """A unix-socket proxy to the real engine that the test can cut and restore."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._listener: socket.socket | None = None
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        self.path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Like an engine restart: the socket disappears and every connection drops."""
        with self._lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._open.clear()
        self.path.unlink(missing_ok=True)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(ENGINE)
            with self._lock:
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def test_reconnects_after_losing_the_engine_and_misses_no_incident(
    fleet: Fleet,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not Path(ENGINE).exists():
        pytest.fail(f"{ENGINE} is missing")
    proxy = SocketProxy(tmp_path / "docker.sock")
    proxy.start()
    monkeypatch.setenv("DOCKER_HOST", f"unix://{proxy.path}")
    name = f"svc-{uuid.uuid4().hex[:8]}"
    fleet.write_config({"svc": fleet.service("ollama", name)})
    (fleet.state_dir / "services/svc").mkdir(parents=True)
    (fleet.state_dir / "services/svc/model").write_text("big\n")
    fleet.run_container(name, "ollama", capacity_mib=3000, OOM_INTERVAL_S="2.5")
    fleet.start()
    fleet.wait_for("a first incident", _incidents_at_least(1), timeout_s=30)

    proxy.cut()
    time.sleep(6)  # two bursts happen while fleetd cannot see the engine
    assert fleet.process is not None and fleet.process.poll() is None, "fleetd must not die"
    proxy.start()

    state = fleet.wait_for("the step down after reconnecting", at_rung("svc", 1), timeout_s=60)

    [change] = state["history"]
    assert change["to_model"] == "medium"
    log = fleet.log.read_text()
    assert "Docker is not reachable" in log or "reconnecting" in log
    assert fleet.stop() == 0
    proxy.cut()


def _incidents_at_least(count: int) -> Any:
    return lambda s: len(s["services"].get("svc", {}).get("incidents", [])) >= count
