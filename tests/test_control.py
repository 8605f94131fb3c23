"""The control API on a real Unix socket (supervisor.edges.control), and fleetctl against it and
without it, as real subprocesses. The daemon's side is a stand-in loop answering `Call`s;
tests/integration/test_control_api.py drives the real fleetd."""

from __future__ import annotations

import json
import os
import queue
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.cli.link import connect
from supervisor.core.errors import FleetdError, UsageError
from supervisor.core.state import FleetState, ServiceState
from supervisor.edges import control
from supervisor.edges.control import (
    API_VERSION,
    Call,
    ControlClient,
    ControlError,
    ControlServer,
    DaemonError,
    DaemonUnreachable,
)
from supervisor.edges.store import StateStore

CONFIG = """
gpus: [{name: "test GPU", memory: 8GiB}]
services:
  web:
    runtime: llamacpp
    containers: [fleetd-test-no-such-container]
    ladder:
      - {model: big, vram: 4000MiB}
      - {model: medium, vram: 2500MiB}
"""


class Loop:
    """Stands in for fleetd's main loop: answers each call with `answer(call)`."""

    def __init__(self, answer: Callable[[Call], tuple[int, Any]]) -> None:
        self.calls: queue.Queue[Call] = queue.Queue()
        self.seen: list[Call] = []
        self.answer = answer
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def submit(self, call: Call) -> None:
        self.calls.put(call)

    def _run(self) -> None:
        while True:
            call = self.calls.get()
            self.seen.append(call)
            call.answer(*self.answer(call))


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory whose socket path stays well under the 107-byte limit."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fleetd-") as d:
        yield Path(d)


def serve(path: Path, answer: Callable[[Call], tuple[int, Any]]) -> tuple[ControlServer, Loop]:
    loop = Loop(answer)
    server = ControlServer(path, loop.submit)
    server.start()
    return server, loop


def test_the_socket_is_0660_and_removed_on_stop(short_dir: Path) -> None:
    path = short_dir / "fleetd.sock"
    server, _ = serve(path, lambda call: (200, {}))
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660  # never world-writable, whatever the umask
    server.stop()
    assert not path.exists()


def test_the_socket_gets_the_configured_group(short_dir: Path) -> None:
    path = short_dir / "fleetd.sock"
    server = ControlServer(path, lambda call: None, gid=4242)
    server.start()
    try:
        assert os.stat(path).st_gid == 4242
    finally:
        server.stop()


def test_a_call_reaches_the_loop_with_the_callers_uid(short_dir: Path) -> None:
    path = short_dir / "fleetd.sock"
    server, loop = serve(path, lambda call: (200, {"message": f"{call.op} {call.service}"}))
    try:
        client = ControlClient(path)
        assert client.hello()["api"] == API_VERSION
        answer = client.call("POST", "/v1/services/web/pin", {"rung": "1", "force": False})
        assert answer == {"message": "pin web"}
        [call] = loop.seen
        assert (call.op, call.service, call.args) == ("pin", "web", {"rung": "1", "force": False})
        assert call.peer.uid == os.getuid() and call.peer.pid == os.getpid()
    finally:
        server.stop()


def test_errors_carry_their_kind_and_bad_requests_never_reach_the_loop(short_dir: Path) -> None:
    path = short_dir / "fleetd.sock"
    server, loop = serve(path, lambda call: (409, {"error": "refused!", "kind": "refused"}))
    try:
        client = ControlClient(path)
        with pytest.raises(DaemonError, match="refused!") as refused:
            client.call("POST", "/v1/services/web/downgrade", {})
        assert refused.value.kind == "refused" and refused.value.exit_code == 1
        with pytest.raises(DaemonError, match="no such endpoint: POST /v1/services/web/explode"):
            client.call("POST", "/v1/services/web/explode", {})
        with pytest.raises(DaemonError, match="GET is not allowed") as wrong:
            client.call("GET", "/v1/services/web/downgrade")
        assert wrong.value.exit_code == 2
        assert len(loop.seen) == 1
    finally:
        server.stop()


def test_a_socket_left_by_a_dead_fleetd_is_replaced_a_live_one_is_not(short_dir: Path) -> None:
    path = short_dir / "fleetd.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # bound, never listening: what a killed fleetd leaves
    server, _ = serve(path, lambda call: (200, {}))
    try:
        with pytest.raises(ControlError, match="another fleetd answers on"):
            ControlServer(path, lambda call: None).start()
    finally:
        server.stop()


def test_a_path_that_is_not_a_socket_is_never_replaced(short_dir: Path) -> None:
    path = short_dir / "fleetd.sock"
    path.write_text("someone's file\n")
    with pytest.raises(ControlError, match="exists and is not a socket"):
        ControlServer(path, lambda call: None).start()
    assert path.read_text() == "someone's file\n"


def test_a_socket_path_too_long_for_unix_sockets_is_a_clear_error(short_dir: Path) -> None:
    path = short_dir / ("x" * 120) / "fleetd.sock"
    with pytest.raises(ControlError, match=r"bytes; Unix sockets allow 107 \(use a shorter"):
        ControlServer(path, lambda call: None).start()


def test_no_daemon_is_unreachable_not_an_error(short_dir: Path) -> None:
    with pytest.raises(DaemonUnreachable, match="no socket at"):
        ControlClient(short_dir / "none.sock").hello()


# ---------------------------------------------------------------- fleetctl, for real


def fleetctl(
    *args: str | Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    code = "from supervisor.cli.fleetctl import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "FLEETD_SOCKET": "", **(env or {})},
        timeout=60,
    )


@pytest.fixture
def fleet(short_dir: Path) -> tuple[Path, Path]:
    config = short_dir / "fleet.yaml"
    config.write_text(CONFIG)
    state_dir = short_dir / "state"
    StateStore(state_dir).save(FleetState(services={"web": ServiceState("big", 0)}))
    return config, state_dir


def test_fleetctl_refuses_a_daemon_with_another_api_version(short_dir: Path) -> None:
    import socketserver
    from http.server import BaseHTTPRequestHandler

    class Future(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"api": API_VERSION + 1, "fleetd": "9.0.0"}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    path = short_dir / "future.sock"
    server = socketserver.UnixStreamServer(str(path), Future)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = fleetctl("status", "--socket", path, "--state-dir", short_dir)
    finally:
        server.shutdown()
        server.server_close()
    assert r.returncode == 1, r
    assert f"speaks control API v{API_VERSION + 1}; this fleetctl" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_status_without_a_daemon_says_so_on_stderr_and_keeps_stdout_json(
    fleet: tuple[Path, Path],
) -> None:
    config, state_dir = fleet
    r = fleetctl("status", "--json", "--config", config, "--state-dir", state_dir)
    assert r.returncode == 0, r
    assert "fleetd is not running" in r.stderr
    report = json.loads(r.stdout)
    assert report["services"]["web"]["model"] == "big"
    assert report["daemon"] is None
    assert report["gpus"][0]["budget_bytes"] == int(0.85 * 8 * 1024**3)


def test_reload_needs_a_daemon_and_exits_3(fleet: tuple[Path, Path]) -> None:
    _, state_dir = fleet
    r = fleetctl("reload", "--state-dir", state_dir)
    assert r.returncode == 3, r
    assert "this needs a running fleetd" in r.stderr and "Traceback" not in r.stderr


def test_a_change_without_daemon_or_docker_is_recorded_for_fleetd(
    fleet: tuple[Path, Path],
) -> None:
    config, state_dir = fleet
    no_docker = {"DOCKER_HOST": f"unix://{state_dir}/no-docker.sock"}
    r = fleetctl("downgrade", "web", "--config", config, "--state-dir", state_dir, env=no_docker)
    assert r.returncode == 0, r
    assert "fleetd is not running" in r.stderr
    assert "the change applies when fleetd starts" in r.stdout
    svc = json.loads((state_dir / "state.json").read_text())["services"]["web"]
    assert svc["rung"] == 0  # not applied yet ...
    assert svc["pending"]["to_model"] == "medium"  # ... but recorded, by a person
    assert svc["pending"]["actor"] == "fleetctl"


def test_a_refused_change_exits_1_and_leaves_the_state_file_alone(
    fleet: tuple[Path, Path],
) -> None:
    config, state_dir = fleet
    before = (state_dir / "state.json").read_bytes()
    r = fleetctl("upgrade", "web", "--config", config, "--state-dir", state_dir)
    assert r.returncode == 1, r
    assert "web is already at the top, rung 0 of 2 (big)" in r.stderr
    assert (state_dir / "state.json").read_bytes() == before


def test_an_unknown_service_or_rung_exits_2(fleet: tuple[Path, Path]) -> None:
    config, state_dir = fleet
    r = fleetctl("pin", "web", "huge", "--config", config, "--state-dir", state_dir)
    assert r.returncode == 2, r
    assert "rung 'huge' for web: expected one of 0 (big), 1 (medium)" in r.stderr
    r = fleetctl("downgrade", "nope", "--config", config, "--state-dir", state_dir)
    assert r.returncode == 2, r
    assert "no service 'nope' in the config" in r.stderr


def test_a_fleetd_that_holds_the_state_but_does_not_answer_is_never_bypassed(
    fleet: tuple[Path, Path],
) -> None:
    config, state_dir = fleet
    before = (state_dir / "state.json").read_bytes()
    fd = StateStore(state_dir).hold_daemon_lock(state_dir / "gone.sock")  # a hung fleetd
    try:
        r = fleetctl("downgrade", "web", "--config", config, "--state-dir", state_dir)
        status = fleetctl("status", "--json", "--config", config, "--state-dir", state_dir)
    finally:
        os.close(fd)
    assert r.returncode == 1, r
    assert f"fleetd (pid {os.getpid()}) holds {state_dir} but does not answer" in r.stderr
    assert "refusing to change the state behind it" in r.stderr
    assert (state_dir / "state.json").read_bytes() == before
    assert status.returncode == 0 and json.loads(status.stdout)["services"]["web"]["rung"] == 0
    assert "does not answer" in status.stderr


def test_two_daemons_cannot_share_a_state_dir(short_dir: Path) -> None:
    store = StateStore(short_dir)
    fd = store.hold_daemon_lock(None)
    try:
        # flock locks belong to the open file: a second open in this process conflicts too.
        with pytest.raises(FleetdError, match=f"another fleetd \\(pid {os.getpid()}\\)"):
            store.hold_daemon_lock(None)
        assert store.running_daemon() is not None
    finally:
        os.close(fd)
    assert store.running_daemon() is None


def test_completion_prints_a_script_that_completes_service_names(
    fleet: tuple[Path, Path],
) -> None:
    _, state_dir = fleet
    script = fleetctl("completion", "bash")
    assert script.returncode == 0 and "_FLEETCTL_COMPLETE=bash_complete" in script.stdout
    r = fleetctl(
        env={
            "_FLEETCTL_COMPLETE": "bash_complete",
            "COMP_WORDS": f"fleetctl downgrade --state-dir {state_dir} w",
            "COMP_CWORD": "4",
        }
    )
    assert r.stdout.split() == ["plain,web"]


@pytest.mark.skipif(os.getuid() != 0, reason="only root writes files as another owner")
def test_a_root_fleetctl_leaves_the_state_dir_owned_by_fleetds_user(
    fleet: tuple[Path, Path],
) -> None:
    config, state_dir = fleet
    for path in [state_dir, *state_dir.rglob("*")]:
        os.chown(path, 65534, 65534)  # as if fleetd runs as an unprivileged user
    no_docker = {"DOCKER_HOST": f"unix://{state_dir}/no-docker.sock"}
    r = fleetctl("downgrade", "web", "--config", config, "--state-dir", state_dir, env=no_docker)
    assert r.returncode == 0, r
    owners = {(p.name, p.stat().st_uid, p.stat().st_gid) for p in state_dir.rglob("*")}
    assert {(name, 65534, 65534) for name, _, _ in owners} == owners
    assert any(name == "state.lock" for name, _, _ in owners)


def _raw(path: Path, request: bytes, timeout_s: float = 5.0) -> bytes:
    """Send bytes as they are and read the answer until the server closes or goes quiet."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        s.connect(str(path))
        s.sendall(request)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
                if b"\r\n\r\n" in got and b'"kind"' in got:
                    break
        except TimeoutError:
            pass
        return got


@pytest.mark.parametrize(
    ("headers", "body", "wanted"),
    [
        ("Content-Length: -1", b"x" * 1000, b"expected a number of bytes"),
        ("Content-Length: abc", b"{}", b"expected a number of bytes"),
        ("Content-Length: 99999999", b"{}", b"the limit is 65536"),
        ("Content-Length: 40000", b"[" * 40000, b"nested too deeply"),
        # More digits than Python turns into an int: json.loads raises a plain ValueError.
        ("Content-Length: 5010", b'{"rung": ' + b"1" * 5000 + b"}", b"body is not JSON"),
    ],
)
def test_malformed_requests_get_a_400_and_never_reach_the_loop(
    short_dir: Path, headers: str, body: bytes, wanted: bytes
) -> None:
    path = short_dir / "fleetd.sock"
    server, loop = serve(path, lambda call: (200, {}))
    try:
        request = f"POST /v1/services/web/downgrade HTTP/1.1\r\n{headers}\r\n\r\n".encode()
        answer = _raw(path, request + body)
        assert answer.startswith(b"HTTP/1.0 400") or answer.startswith(b"HTTP/1.1 400"), answer
        assert wanted in answer
        assert loop.seen == []
        assert ControlClient(path).hello()["api"] == API_VERSION  # and it still serves
    finally:
        server.stop()


@pytest.mark.parametrize("backlog", [control.BACKLOG, 128])
def test_a_thousand_simultaneous_fleetctl_clients_are_all_answered(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch, backlog: int
) -> None:
    """Far more callers at once than handler threads, each doing what `fleetctl status`
    does (link.connect, then GET /v1/status): they wait to be taken, none fails. 128 is
    the backlog on a host whose kernel caps it there (somaxconn before Linux 5.4, RHEL 8):
    871 of 1,000 fleetctl runs failed there with "Resource temporarily unavailable"."""
    monkeypatch.setattr(control._Server, "request_queue_size", backlog)
    path = short_dir / "fleetd.sock"
    server, _ = serve(path, lambda call: (200, {"message": "ok"}))
    clients = 1000
    results: list[object] = []
    start = threading.Barrier(clients)

    def one() -> None:
        start.wait()
        try:
            link = connect(short_dir, path)
            assert link.client is not None, link.why_not
            results.append(link.client.call("GET", "/v1/status"))
        except Exception as e:  # every failure is what the test counts
            results.append(e)

    threading.stack_size(256 * 1024)
    threads = [threading.Thread(target=one, daemon=True) for _ in range(clients)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        failed = [r for r in results if r != {"message": "ok"}]
        assert (len(results), failed[:3]) == (clients, [])
    finally:
        threading.stack_size(0)
        server.stop()


def test_a_client_that_finds_the_backlog_full_waits_for_room(short_dir: Path) -> None:
    """A full listen backlog makes a Unix connect fail at once with EAGAIN: the client tries
    again until fleetd takes it (it used to fail: 'Resource temporarily unavailable')."""
    path = short_dir / "busy.sock"
    got: list[object] = []

    def ask() -> None:
        try:
            got.append(ControlClient(path, timeout_s=30).call("GET", "/v1/status"))
        except Exception as e:
            got.append(e)

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(0)  # one connection waits; the next finds the backlog full
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as first:
            first.connect(str(path))
            asking = threading.Thread(target=ask)
            asking.start()
            asking.join(0.5)
            assert got == []  # still trying, not failed
            listener.accept()[0].close()
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            body = json.dumps({"message": "ok"}).encode()
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            connection.sendall(head + body)
            asking.join(30)
    assert got == [{"message": "ok"}]


def test_a_backlog_that_never_drains_is_a_timeout_not_a_hang(short_dir: Path) -> None:
    path = short_dir / "stuck.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(0)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as first:
            first.connect(str(path))
            with pytest.raises(FleetdError, match=r"did not answer in 1 s"):
                ControlClient(path, timeout_s=1).call("GET", "/v1/status")


def test_control_characters_in_a_request_reach_the_log_escaped(short_dir: Path) -> None:
    """A caller's bytes are logged as text, never as terminal escapes (`journalctl`, a tty)."""
    from loguru import logger

    path = short_dir / "fleetd.sock"
    server, _ = serve(path, lambda call: (200, {}))
    logged: list[str] = []
    sink = logger.add(lambda m: logged.append(str(m)), level="DEBUG", format="{message}")
    try:
        answer = _raw(path, b"GET /version\x1b[2J\x07 HTTP/1.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 404")
        assert ControlClient(path).hello()["api"] == API_VERSION  # every line is logged by now
    finally:
        logger.remove(sink)
        server.stop()
    lines = [m.rstrip("\n") for m in logged]
    assert any("/version\\x1b[2J\\x07 HTTP/1.1" in m for m in lines), lines
    assert not any(c in m for m in lines for c in "\x1b\x07"), lines


@pytest.mark.parametrize(
    ("request_line", "status"),
    [
        (b"\x00", b"400"),
        (b"garbage", b"400"),
        (b"GET", b"400"),
        (b"POST /v1/reload", b"400"),
        (b"GET /version HTTP/0.9", b"505"),
        (b"G ET /version HTTP/0.9", b"505"),
    ],
)
def test_every_answer_has_a_status_line(
    short_dir: Path, request_line: bytes, status: bytes
) -> None:
    """http.server answers a line without a version, or naming HTTP/0.9, as HTTP/0.9 would:
    a bare page with no status line, which no client of fleetd's can read."""
    path = short_dir / "fleetd.sock"
    server, loop = serve(path, lambda call: (200, {}))
    try:
        answer = _raw(path, request_line + b"\r\n\r\n")
        assert answer.startswith((b"HTTP/1.1 " + status, b"HTTP/1.0 " + status)), answer[:80]
        assert loop.seen == []
    finally:
        server.stop()


def test_a_request_target_that_is_no_url_gets_a_400(short_dir: Path) -> None:
    path = short_dir / "fleetd.sock"
    server, loop = serve(path, lambda call: (200, {}))
    try:
        answer = _raw(path, b"GET http://[x/v1/status HTTP/1.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:80]
        assert b"request target 'http://[x/v1/status'" in answer
        assert loop.seen == []
    finally:
        server.stop()


# ---------------------------------------------------------------- another host, over ssh


def test_an_ssh_url_names_user_host_port_and_remote_socket() -> None:
    target = control.SshTarget.parse("ssh://ops@gpu-1.example:2222/run/fleetd/fleetd.sock")
    assert (target.user, target.host, target.port) == ("ops", "gpu-1.example", 2222)
    assert target.socket == "/run/fleetd/fleetd.sock"
    bare = control.SshTarget.parse("ssh://gpu-2")
    assert (bare.user, bare.host, bare.port, bare.socket) == (None, "gpu-2", None, None)


@pytest.mark.parametrize(
    "url",
    ["gpu-1", "tcp://gpu-1:22", "ssh://", "ssh://u:pw@gpu-1", "ssh://gpu-1:port",
     "ssh://-oProxyCommand=x", "ssh://gpu-1/s?x=1"],
)  # fmt: skip
def test_anything_but_an_ssh_url_is_a_usage_error(url: str) -> None:
    with pytest.raises(UsageError, match="--host"):
        control.SshTarget.parse(url)


def test_the_ssh_command_runs_fleetctl_dial_stdio_the_callers_options_first() -> None:
    target = control.SshTarget.parse("ssh://ops@gpu-1:2222/var/run/my fleetd.sock")
    env = {"FLEETD_SSH_OPTS": "-i /k -F '/my config'", "FLEETD_REMOTE_FLEETCTL": "sudo -n fc"}
    assert target.command(env) == [
        "ssh", "-i", "/k", "-F", "/my config", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
        "-p", "2222", "-l", "ops", "--", "gpu-1",
        "sudo -n fc dial-stdio --socket '/var/run/my fleetd.sock'",
    ]  # fmt: skip
    assert control.SshTarget.parse("ssh://gpu-1").command({})[-2:] == [
        "gpu-1",
        "fleetctl dial-stdio",
    ]


FAKE_SSH = """#!/bin/sh
# Stands in for ssh: runs the remote command here (after `-- HOST`), or fails as told.
echo "$@" >>"$(dirname "$0")/calls"
[ -z "$FAKE_SSH_EXIT" ] || { echo "ssh: $FAKE_SSH_SAYS" >&2; exit "$FAKE_SSH_EXIT"; }
while [ "$1" != "--" ]; do shift; done
exec sh -c "$3"
"""


@pytest.fixture
def fake_ssh(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = short_dir / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(FAKE_SSH)
    (bin_dir / "ssh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    here = f"{sys.executable} -c 'from supervisor.cli.fleetctl import main; main()'"
    monkeypatch.setenv("FLEETD_REMOTE_FLEETCTL", here)
    monkeypatch.delenv("FLEETD_SSH_OPTS", raising=False)
    return bin_dir


def test_requests_travel_through_ssh_and_dial_stdio(short_dir: Path, fake_ssh: Path) -> None:
    path = short_dir / "fleetd.sock"
    server, _ = serve(path, lambda call: (200, {"services": {}, "op": call.op}))
    try:
        client = control.SshControlClient(control.SshTarget.parse(f"ssh://ops@gpu-1{path}"))
        assert client.hello()["api"] == API_VERSION
        assert client.call("GET", "/v1/status") == {"services": {}, "op": "status"}
    finally:
        server.stop()
    calls = (fake_ssh / "calls").read_text().splitlines()  # one ssh per request
    remote = f"{os.environ['FLEETD_REMOTE_FLEETCTL']} dial-stdio --socket {path}"
    assert calls == [f"-o BatchMode=yes -o ConnectTimeout=10 -l ops -- gpu-1 {remote}"] * 2


def test_no_fleetd_on_the_host_is_unreachable(short_dir: Path, fake_ssh: Path) -> None:
    client = control.SshControlClient(control.SshTarget.parse(f"ssh://gpu-1{short_dir}/no.sock"))
    with pytest.raises(DaemonUnreachable, match="fleetd is not running on this host"):
        client.hello()


@pytest.mark.parametrize(
    ("code", "says", "expected"),
    [
        ("255", "connect to host gpu-1 port 22: Connection refused", "ssh failed: ssh: connect"),
        ("127", "sh: 1: fleetctl: not found", "set FLEETD_REMOTE_FLEETCTL to its path"),
        ("1", "something else", "no answer through ssh: ssh: something else"),
    ],
)
def test_ssh_failures_are_one_line_naming_the_host(
    fake_ssh: Path, monkeypatch: pytest.MonkeyPatch, code: str, says: str, expected: str
) -> None:
    monkeypatch.setenv("FAKE_SSH_EXIT", code)
    monkeypatch.setenv("FAKE_SSH_SAYS", says)
    client = control.SshControlClient(control.SshTarget.parse("ssh://gpu-1"))
    with pytest.raises(control.SshFailed, match=r"^ssh://gpu-1: ") as raised:
        client.hello()
    assert expected in str(raised.value) and "\n" not in str(raised.value)


def test_no_ssh_installed_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, short_dir: Path
) -> None:
    monkeypatch.setenv("PATH", str(short_dir))
    client = control.SshControlClient(control.SshTarget.parse("ssh://gpu-1"))
    with pytest.raises(control.SshFailed, match="ssh is not installed"):
        client.hello()


def test_fleetctl_status_of_two_hosts_one_down(short_dir: Path, fake_ssh: Path) -> None:
    up = short_dir / "up.sock"
    report = {"services": {}, "gpus": [], "gpu_problem": None}
    server, _ = serve(up, lambda call: (200, report))
    try:
        r = fleetctl("status", "--json", "--host", f"ssh://a{up}", "--host", "ssh://b/none.sock")
    finally:
        server.stop()
    assert r.returncode == 1, r
    answers = json.loads(r.stdout)
    assert answers[f"ssh://a{up}"] == report
    assert "fleetd is not running there" in answers["ssh://b/none.sock"]["error"]
    assert r.stderr.startswith("fleetctl: error: ssh://b/none.sock: fleetd is not running"), r


def test_idle_connections_hold_a_bounded_number_of_threads_and_are_dropped(
    short_dir: Path,
) -> None:
    """2,000 idle connections made 2,000 threads; now at most MAX_HANDLERS handle at once,
    an idle one is dropped after IDLE_TIMEOUT_S, and fleetd answers again after that."""
    path = short_dir / "fleetd.sock"
    server, _ = serve(path, lambda call: (200, {}))
    idle: list[socket.socket] = []
    try:
        before = threading.active_count()
        for _ in range(300):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(path))
            idle.append(s)
        time.sleep(1.0)
        assert threading.active_count() - before <= control.MAX_HANDLERS + 2
        # The first idle clients are dropped (the server closes them): recv sees the end.
        idle[0].settimeout(control.IDLE_TIMEOUT_S + 10)
        assert idle[0].recv(1) == b""
        for s in idle:
            s.close()
        assert ControlClient(path).hello()["api"] == API_VERSION
    finally:
        for s in idle:
            s.close()
        server.stop()


@pytest.mark.parametrize("command", [["plan", "--gpu", "24GiB"], ["generate"], ["node", "init"]])
def test_host_before_a_command_that_runs_here_is_refused(
    fleet: tuple[Path, Path], command: list[str]
) -> None:
    config, state_dir = fleet
    args = [*command, "--config", config] if command[0] != "node" else command
    done = fleetctl("--host", "ssh://gpu-1", *args, env={"FLEETD_STATE_DIR": str(state_dir)})
    assert done.returncode == 2
    assert f"`fleetctl {command[0]}` runs on this machine" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (state_dir / "services").exists()  # no hand-off file written
