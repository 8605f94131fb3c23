"""The control API: HTTP/JSON on a Unix socket (never TCP), versioned, for fleetctl.

    GET  /version                         {"api": 1, "fleetd": "0.1.0", "pid": 123}
    GET  /v1/status[?service=NAME]        what `fleetctl status --json` prints
    GET  /v1/history[?service=NAME]       transitions, oldest first
    POST /v1/services/NAME/OPERATION      reset | downgrade | upgrade | pin | unpin
                                          body: {"force": bool, "rung": "INDEX|MODEL"}
    POST /v1/services/NAME/warm           body: {"model": M}: load and warm up one member
                                          of the service's ensemble (the others unloaded)
    POST /v1/reload                       re-read the config (as SIGHUP does)

Errors are {"error": "...", "kind": "usage|refused|failed"} with status 400/404 (usage),
409 (refused) or 500 (failed). The socket is mode 0660, owned by the daemon's user and
a chosen group: who may connect may control fleetd, nobody else can. Each request
carries the caller's uid (SO_PEERCRED), which the change's reason records.

The server threads only parse and reply: every call is handed to fleetd's main loop as
a `Call` (the loop owns the state) and answered through `Call.reply`. A client checks
`/version` first and refuses to talk to a daemon with another API version.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import http.client
import json
import os
import pwd
import queue
import re
import select
import shlex
import socket
import socketserver
import stat
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from supervisor import __version__
from supervisor.core.errors import FleetdError, UsageError, http_status

API_VERSION = 1
SOCKET_ENV = "FLEETD_SOCKET"
DEFAULT_SOCKET = Path("/run/fleetd/fleetd.sock")
SOCKET_MODE = 0o660
MAX_BODY = 64 * 1024
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the NUL
# How long a request waits for the main loop (a change waits for its restart to finish).
REPLY_TIMEOUT_S = 120.0
CLIENT_TIMEOUT_S = REPLY_TIMEOUT_S + 10

# What a person asks of a service (supervisor.core.ops decides each), and an ensemble's warm-up.
OPERATIONS = ("reset", "downgrade", "upgrade", "pin", "unpin")
_SERVICE_OP = re.compile(r"^/v1/services/([a-zA-Z0-9][a-zA-Z0-9_.-]*)/([a-z]+)$")
_GPU_OP = re.compile(r"^/v1/gpus/([0-9]{1,4})/(cordon|uncordon)$")


class ControlError(FleetdError):
    """The control socket cannot be served (path too long, in use, group unknown)."""


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int

    @property
    def who(self) -> str:
        """`uid 1000 (alice)`: for reasons in the history and the log."""
        try:
            name = pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return f"uid {self.uid}"
        return f"uid {self.uid} ({name})"


@dataclass(frozen=True)
class Response:
    status: int
    body: dict[str, Any] | list[Any]


@dataclass
class Call:
    """One request for the main loop: an operation, its service and arguments."""

    op: str
    service: str | None
    args: dict[str, Any]
    peer: Peer
    reply: queue.Queue[Response] = field(default_factory=lambda: queue.Queue(maxsize=1))

    def answer(self, status: int, body: dict[str, Any] | list[Any]) -> None:
        with contextlib.suppress(queue.Full):  # answered once; a late second answer is dropped
            self.reply.put_nowait(Response(status, body))

    def fail(self, kind: str, message: str) -> None:
        self.answer(http_status(kind), {"error": message, "kind": kind})


def default_socket(state_dir: Path, in_checkout: bool) -> Path:
    """FLEETD_SOCKET, else STATE_DIR/fleetd.sock in a checkout, else /run/fleetd/fleetd.sock."""
    if os.environ.get(SOCKET_ENV):
        return Path(os.environ[SOCKET_ENV])
    return state_dir / "fleetd.sock" if in_checkout else DEFAULT_SOCKET


def resolve_group(group: str | None) -> int | None:
    """A group name or numeric gid to a gid (None: keep the daemon's own group)."""
    if group is None or group == "":
        return None
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise UsageError(f"--socket-group {group!r}: no such group") from None


# ---------------------------------------------------------------- server


# Connections that wait to be accepted (socketserver's default is 5: an 8th simultaneous
# fleetctl got "Resource temporarily unavailable"), handlers that run at once (each a
# thread; the others wait in the backlog), and how long a silent client may hold one.
BACKLOG = 1024
MAX_HANDLERS = 64
IDLE_TIMEOUT_S = 10.0


# A caller's bytes reach the log as text: control characters (a terminal's escapes) and
# the backslash that would make an escape look like one are written out, as http.server's
# own log_message does (overridden here to log through loguru).
_ESCAPED = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))} | {0x5C: "\\\\"}


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False
    request_queue_size = BACKLOG
    submit: Callable[[Call], None]
    _slots: threading.BoundedSemaphore

    def process_request(self, request: Any, client_address: Any) -> None:
        self._slots.acquire()  # at most MAX_HANDLERS threads; more callers wait to be taken
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    # What a request line without a version is taken for: http.server's HTTP/0.9 would
    # answer it with a bare page and no status line.
    default_request_version = "HTTP/1.0"
    server_version = f"fleetd/{__version__}"
    timeout = IDLE_TIMEOUT_S  # a client that sends nothing is dropped, its thread freed
    raw_requestline: bytes  # set by handle_one_request before parse_request

    def parse_request(self) -> bool:
        # http.server answers a request naming HTTP/0.9 as that version would: a bare body,
        # no status line. Refuse it with a status, as it refuses HTTP/2.
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if len(words) < 3 or words[-1] != "HTTP/0.9":
            return super().parse_request()
        self.command, self.request_version, self.close_connection = "", "HTTP/1.0", True
        self.send_error(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "HTTP/0.9 is not spoken here")
        return False

    def address_string(self) -> str:  # a Unix peer has no host
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:
        from loguru import logger  # the server's side only: fleetctl never imports it

        logger.debug("control: " + (format % args).translate(_ESCAPED))

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        try:
            path, query = _target(self.path)
            body = self._body() if method == "POST" else {}
            response = self._route(method, path, query, body)
        except UsageError as e:
            response = Response(400, {"error": str(e), "kind": "usage"})
        self._send(response)

    def _route(
        self, method: str, path: str, query: dict[str, str], body: dict[str, Any]
    ) -> Response:
        if path == "/version":
            if method != "GET":
                return _not_allowed(method, path)
            return Response(200, {"api": API_VERSION, "fleetd": __version__, "pid": os.getpid()})
        routes = {"/v1/status": "status", "/v1/history": "history", "/v1/reload": "reload"}
        if path in routes:
            op = routes[path]
            wanted = "POST" if op == "reload" else "GET"
            if method != wanted:
                return _not_allowed(method, path)
            return self._call(op, query.get("service"), {})
        match = _SERVICE_OP.match(path)
        if match and match.group(2) in (*OPERATIONS, "warm"):
            if method != "POST":
                return _not_allowed(method, path)
            return self._call(match.group(2), match.group(1), body)
        match = _GPU_OP.match(path)
        if match:
            if method != "POST":
                return _not_allowed(method, path)
            return self._call(match.group(2), None, {**body, "gpu": int(match.group(1))})
        return Response(404, {"error": f"no such endpoint: {method} {path}", "kind": "not_found"})

    def _call(self, op: str, service: str | None, args: dict[str, Any]) -> Response:
        call = Call(op, service, args, _peer(self.connection))
        self.server.submit(call)
        try:
            return call.reply.get(timeout=REPLY_TIMEOUT_S)
        except queue.Empty:
            waited = f"{REPLY_TIMEOUT_S:.0f} s"
            return Response(202, {"message": f"accepted; fleetd is still at it after {waited}"})

    def _body(self) -> dict[str, Any]:
        given = (self.headers.get("Content-Length") or "0").strip()
        if not given.isascii() or not given.isdigit():
            self.close_connection = True  # the body's end is unknown: nothing more is read
            raise UsageError(f"Content-Length {given[:20]!r}: expected a number of bytes")
        length = int(given)
        if length > MAX_BODY:
            self.close_connection = True
            raise UsageError(f"request body of {length} bytes; the limit is {MAX_BODY}")
        raw = self.rfile.read(length) if length else b"{}"
        try:
            body = json.loads(raw or b"{}")
        except RecursionError:
            raise UsageError("request body is nested too deeply") from None
        except ValueError as e:  # not UTF-8, not JSON, or an int of more digits than Python takes
            raise UsageError(f"request body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise UsageError("request body: expected a JSON object")
        return body

    def _send(self, response: Response) -> None:
        data = (json.dumps(response.body, indent=2) + "\n").encode()
        self.send_response(response.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _target(target: str) -> tuple[str, dict[str, str]]:
    """The request target's path, and its query (the last value of each name)."""
    try:
        url = urlsplit(target)
    except ValueError as e:  # an absolute URL with a broken host: `http://[x/`
        raise UsageError(f"request target {target[:80]!r}: {e}") from None
    return url.path, {k: v[-1] for k, v in parse_qs(url.query).items()}


def _not_allowed(method: str, path: str) -> Response:
    return Response(405, {"error": f"{method} is not allowed on {path}", "kind": "usage"})


def _peer(connection: socket.socket) -> Peer:
    creds = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return Peer(pid, uid, gid)


class ControlServer:
    """Serves the control API on `path` (mode 0660, group `gid`) in background threads."""

    def __init__(self, path: Path, submit: Callable[[Call], None], gid: int | None = None):
        self.path, self.gid = path, gid
        self._submit = submit
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind (refusing a socket another fleetd answers on) and serve; errors are clear."""
        path = self.path
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            raise ControlError(
                f"control socket path {path} is {len(os.fsencode(path))} bytes; "
                f"Unix sockets allow {MAX_SOCKET_PATH} (use a shorter --socket)"
            )
        _remove_stale(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Bind with a umask that leaves no window where the socket is open to all.
            old_umask = os.umask(0o177)
            try:
                server = _Server(str(path), _Handler, bind_and_activate=True)
            finally:
                os.umask(old_umask)
            os.chmod(path, SOCKET_MODE)
            if self.gid is not None:
                os.chown(path, -1, self.gid)
        except OSError as e:
            raise ControlError(f"cannot serve the control socket {path}: {e.strerror or e}") from e
        server.submit = self._submit
        server._slots = threading.BoundedSemaphore(MAX_HANDLERS)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="control", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._server = None


def _remove_stale(path: Path) -> None:
    """Remove a socket left by a fleetd that died; refuse one that still answers."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise ControlError(f"cannot check {path}: {e.strerror or e}") from e
    if not stat.S_ISSOCK(mode):
        raise ControlError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        os.unlink(path)  # nobody listens: stale
        return
    finally:
        probe.close()
    raise ControlError(f"another fleetd answers on {path}; stop it or use another --socket")


# ---------------------------------------------------------------- client


class DaemonUnreachable(FleetdError):
    """No fleetd answers on the socket: `reason` says why (missing, refused, permission)."""

    def __init__(self, path: Path, reason: str, permission: bool = False) -> None:
        super().__init__(f"no answer from fleetd: {reason}")
        self.path, self.reason, self.permission = path, reason, permission


class DaemonError(FleetdError):
    """fleetd answered with an error; `kind` is usage, refused, not_found or failed."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind
        if kind in ("usage", "not_found"):
            self.exit_code = 2


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path, self.timeout_s = path, timeout

    def connect(self) -> None:
        self.sock = _connect_unix(self.unix_path, self.timeout_s)


def _connect_unix(path: Path, timeout_s: float) -> socket.socket:
    """A socket connected to `path`, each later operation bounded by timeout_s.

    When more callers arrive at once than fleetd's listen backlog holds (the kernel caps it
    at net.core.somaxconn: 128 before Linux 5.4), a non-blocking Unix connect fails at once
    with EAGAIN where TCP would wait. So connect blocking, bounded by SO_SNDTIMEO: the
    kernel holds the caller until fleetd accepts another, and wakes it then."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(None)
        whole_s = int(timeout_s)
        micro_s = max(1, int((timeout_s - whole_s) * 1_000_000))  # 0 would mean forever
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", whole_s, micro_s))
        sock.connect(str(path))
    except BlockingIOError:  # the backlog stayed full for timeout_s
        sock.close()
        raise TimeoutError from None
    except BaseException:
        sock.close()
        raise
    sock.settimeout(timeout_s)
    return sock


class ControlClient:
    """fleetctl's side: one request per connection, JSON in and out."""

    def __init__(self, path: Path, timeout_s: float = CLIENT_TIMEOUT_S) -> None:
        self.path, self.timeout_s = path, timeout_s
        self.where = str(path)  # for messages: the socket, or the host it is reached through

    def hello(self) -> dict[str, Any]:
        """`GET /version`, refusing a daemon that speaks another API version."""
        status, body = self._request("GET", "/version", None)
        if status != 200 or not isinstance(body, dict) or "api" not in body:
            raise FleetdError(f"{self.where} does not answer like fleetd (HTTP {status})")
        if body["api"] != API_VERSION:
            raise FleetdError(
                f"fleetd {body.get('fleetd', '?')} on {self.where} speaks control API "
                f"v{body['api']}; this fleetctl ({__version__}) speaks v{API_VERSION}: use the "
                "fleetctl installed with that fleetd"
            )
        return body

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        status, answer = self._request(method, path, body)
        if status >= 400:
            error = answer.get("error", f"HTTP {status}") if isinstance(answer, dict) else status
            kind = answer.get("kind", "failed") if isinstance(answer, dict) else "failed"
            raise DaemonError(f"fleetd: {error}", str(kind))
        return answer

    def _request(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, Any]:
        connection = _UnixConnection(self.path, self.timeout_s)
        try:
            payload = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            data = response.read()
        except FileNotFoundError:
            raise DaemonUnreachable(self.path, f"no socket at {self.path}") from None
        except ConnectionRefusedError:
            raise DaemonUnreachable(self.path, f"nothing listens on {self.path}") from None
        except PermissionError:
            raise DaemonUnreachable(
                self.path, _permission_hint(self.path), permission=True
            ) from None
        except TimeoutError:
            raise FleetdError(
                f"fleetd on {self.path} did not answer in {self.timeout_s:.0f} s"
            ) from None
        except OSError as e:
            if e.errno in (errno.ENOTSOCK, errno.ENOENT, errno.ECONNREFUSED):
                raise DaemonUnreachable(self.path, e.strerror or str(e)) from None
            raise FleetdError(f"talking to fleetd on {self.path}: {e.strerror or e}") from None
        except http.client.HTTPException as e:
            raise FleetdError(f"fleetd on {self.path} sent a bad answer: {e!r}") from None
        finally:
            connection.close()
        try:
            return response.status, json.loads(data or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise FleetdError(f"{self.path} does not answer like fleetd (not JSON)") from None


# ---------------------------------------------------------------- another host, over SSH
#
# As `DOCKER_HOST=ssh://` does: `ssh [-p PORT] [-l USER] -- HOST fleetctl dial-stdio`, whose
# remote end copies its stdin and stdout to that host's control socket, so HTTP runs over
# the ssh process's pipes. One ssh process per request (one request per connection).

HOST_ENV = "FLEETD_HOST"
SSH_OPTS_ENV = "FLEETD_SSH_OPTS"  # more ssh options, shell words: `-i KEY -F CONFIG`
REMOTE_FLEETCTL_ENV = "FLEETD_REMOTE_FLEETCTL"  # the remote command; default `fleetctl`
SSH_CONNECT_TIMEOUT_S = 10
SSH_EXIT_WAIT_S = 5.0  # for ssh to end once the answer is read (or the pipe broke)
_SSH_FAILED = 255  # ssh's own exit status for its errors (unreachable, auth, host key)
_COMMAND_NOT_FOUND = 127  # the remote shell's, when the remote fleetctl is not there
_REMOTE_NO_DAEMON = 3  # `fleetctl dial-stdio`'s when no fleetd answers there


@dataclass(frozen=True)
class SshTarget:
    """`ssh://[user@]host[:port][/path/to/fleetd.sock]`: where and as whom to reach fleetd."""

    url: str
    host: str
    user: str | None = None
    port: int | None = None
    socket: str | None = None  # the remote control socket; None: what the remote resolves

    @classmethod
    def parse(cls, url: str) -> SshTarget:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise UsageError(f"--host {url!r}: {e}") from None
        if parts.scheme != "ssh":
            raise UsageError(f"--host {url!r}: expected ssh://[USER@]HOST[:PORT][/SOCKET]")
        if not parts.hostname or parts.password is not None or parts.query or parts.fragment:
            raise UsageError(f"--host {url!r}: expected ssh://[USER@]HOST[:PORT][/SOCKET]")
        if parts.hostname.startswith("-") or (parts.username or "").startswith("-"):
            raise UsageError(f"--host {url!r}: a host or user may not start with '-'")
        socket_path = parts.path if parts.path not in ("", "/") else None
        return cls(url, parts.hostname, parts.username or None, port, socket_path)

    def command(self, environ: dict[str, str] | None = None) -> list[str]:
        """The ssh command line that runs `fleetctl dial-stdio` on the host."""
        env = os.environ if environ is None else environ
        try:
            extra = shlex.split(env.get(SSH_OPTS_ENV, ""))
            remote = shlex.split(env.get(REMOTE_FLEETCTL_ENV) or "fleetctl")
        except ValueError as e:
            raise UsageError(f"{SSH_OPTS_ENV} or {REMOTE_FLEETCTL_ENV}: {e}") from None
        remote += ["dial-stdio", *(["--socket", self.socket] if self.socket else [])]
        # ssh takes the first value of an option: the caller's options win over ours.
        args = ["ssh", *extra, "-o", "BatchMode=yes"]
        args += ["-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT_S}"]
        args += ["-p", str(self.port)] if self.port is not None else []
        args += ["-l", self.user] if self.user else []
        return [*args, "--", self.host, shlex.join(remote)]


class _SshConnection(http.client.HTTPConnection):
    """HTTP over an ssh process's stdin and stdout (one end of a socketpair each way)."""

    def __init__(self, target: SshTarget, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.target, self.timeout_s = target, timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.stderr_text = ""  # what ssh (and the remote command) said, once finished

    def connect(self) -> None:
        command = self.target.command()
        ours, theirs = socket.socketpair()
        # A file, never a pipe: a chatty ssh cannot block. finish() reads and closes it.
        stderr = tempfile.TemporaryFile()  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                command,
                stdin=theirs.fileno(),
                stdout=theirs.fileno(),
                stderr=stderr,
                start_new_session=True,  # a Ctrl-C reaches fleetctl, which ends ssh itself
            )
        except FileNotFoundError:
            ours.close()
            stderr.close()
            raise SshFailed(self.target, "ssh is not installed (no `ssh` on PATH)") from None
        finally:
            theirs.close()
        self._stderr = stderr
        ours.settimeout(self.timeout_s)
        self.sock = ours

    def finish(self) -> int | None:
        """Close our end, let ssh end (killed after SSH_EXIT_WAIT_S); its exit status."""
        self.close()
        process, self.process = self.process, None
        if process is None:
            return None
        try:
            return process.wait(timeout=SSH_EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()
        finally:
            with self._stderr:
                self._stderr.seek(0)
                self.stderr_text = self._stderr.read().decode(errors="replace")


class SshFailed(FleetdError):
    """ssh could not run fleetctl on the host (ssh missing, unreachable, auth, no fleetctl)."""

    def __init__(self, target: SshTarget, reason: str) -> None:
        super().__init__(f"{target.url}: {reason}")
        self.target, self.reason = target, reason


class SshControlClient(ControlClient):
    """The same client, its requests carried by ssh to `fleetctl dial-stdio` on a host."""

    def __init__(self, target: SshTarget, timeout_s: float = CLIENT_TIMEOUT_S) -> None:
        super().__init__(Path(target.socket or "fleetd.sock"), timeout_s)
        self.target, self.where = target, target.url

    def _request(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, Any]:
        connection = _SshConnection(self.target, self.timeout_s)
        failure: BaseException | None = None
        try:
            payload = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as e:
            failure = e
        finally:
            code = connection.finish()
        if failure is not None:
            raise _ssh_failure(self, failure, code, connection.stderr_text) from None
        try:
            return response.status, json.loads(data or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise FleetdError(f"{self.where} does not answer like fleetd (not JSON)") from None


def _ssh_failure(
    client: SshControlClient, error: BaseException, code: int | None, stderr: str
) -> FleetdError:
    """The one error for a request that got no answer, decided by ssh's exit status."""
    target, said = client.target, _last_line(stderr)
    if isinstance(error, TimeoutError) and code not in (_SSH_FAILED, _COMMAND_NOT_FOUND):
        return FleetdError(f"{target.url}: fleetd did not answer in {client.timeout_s:.0f} s")
    if code == _SSH_FAILED:
        return SshFailed(target, f"ssh failed: {said or 'exit status 255'}")
    if code == _COMMAND_NOT_FOUND:
        remote = os.environ.get(REMOTE_FLEETCTL_ENV) or "fleetctl"
        return SshFailed(
            target,
            f"{remote!r} is not on the remote PATH ({said or 'command not found'}); "
            f"install fleetctl there or set {REMOTE_FLEETCTL_ENV} to its path",
        )
    if code == _REMOTE_NO_DAEMON:
        return DaemonUnreachable(Path(target.socket or "fleetd.sock"), said or "not running")
    why = said or (f"exit status {code}" if code else f"{error!r}")
    return SshFailed(target, f"no answer through ssh: {why}")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def pump_stdio(path: Path, timeout_s: float = CLIENT_TIMEOUT_S) -> None:
    """`fleetctl dial-stdio`: copy stdin to the socket at `path` and the socket to stdout
    until the socket closes (stdin's end only half-closes it: the answer still comes)."""
    try:
        sock = _connect_unix(path, timeout_s)
    except FileNotFoundError:
        raise DaemonUnreachable(path, f"no socket at {path}") from None
    except ConnectionRefusedError:
        raise DaemonUnreachable(path, f"nothing listens on {path}") from None
    except PermissionError:
        raise DaemonUnreachable(path, _permission_hint(path), permission=True) from None
    except OSError as e:
        raise DaemonUnreachable(path, f"{path}: {e.strerror or e}") from None
    sock.settimeout(None)
    with sock:
        _pump(sock, sys.stdin.fileno(), sys.stdout.fileno())


def _pump(sock: socket.socket, stdin: int, stdout: int) -> None:
    readers = {stdin, sock.fileno()}
    while sock.fileno() in readers:
        ready, _, _ = select.select(list(readers), [], [])
        for fd in ready:
            if fd == stdin:
                data = os.read(stdin, 65536)
                if data:
                    sock.sendall(data)
                else:  # the client is done asking: half-close, and wait for the answer
                    readers.discard(stdin)
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_WR)
                continue
            data = sock.recv(65536)
            if not data:
                readers.discard(fd)
                break
            view = memoryview(data)
            while view:
                view = view[os.write(stdout, view) :]


def _permission_hint(path: Path) -> str:
    """Permission denied, and which group would let this user in."""
    try:
        gid = os.stat(path).st_gid
        group = grp.getgrgid(gid).gr_name
    except (OSError, KeyError):
        return f"permission denied on {path}"
    return f"permission denied on {path}: it is for group {group!r} and root"
