"""Fuzzing the control API: a real ControlServer on its Unix socket, fed raw bytes and
HTTP-ish requests (odd methods, targets, versions, headers, Content-Length values, bodies).

Every request gets well-formed HTTP answers (2xx, 4xx, or the 501/505 http.server gives a
method or an HTTP version it does not speak) or a clean close, within a bound; the server
answers a good request right after; no handler raises (which prints a traceback), and
what it logs holds no control character from the request.
"""

from __future__ import annotations

import re
import socket
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from loguru import logger

from supervisor.edges import control
from supervisor.edges.control import API_VERSION, Call, ControlClient, ControlServer
from tests.fuzz.fuzzing import TALLY, bounded, fuzz_settings, odd_values

pytestmark = pytest.mark.fuzz

ANSWER_S = 5.0  # for the server to answer and close, once the request is sent
EXAMPLE_S = 15.0
STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) ")
FINE = {*range(200, 300), *range(400, 500), 501, 505}
CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass
class Served:
    path: Path
    logged: list[str] = field(default_factory=list)
    raised: list[BaseException] = field(default_factory=list)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    """A ControlServer whose calls a stand-in for fleetd's loop answers at once."""
    with tempfile.TemporaryDirectory(prefix="fleetd-fuzz-") as d:
        served = Served(Path(d) / "fleetd.sock")
        original = control._Server.handle_error

        def handle_error(server: Any, request: Any, client_address: Any) -> None:
            import sys

            served.raised.append(sys.exc_info()[1] or RuntimeError("handle_error"))

        def answer(call: Call) -> None:
            call.answer(200, {"message": f"{call.op} {call.service}"})

        control._Server.handle_error = handle_error  # type: ignore[method-assign]
        sink = logger.add(lambda m: served.logged.append(str(m)), level="DEBUG", format="{message}")
        server = ControlServer(served.path, answer)
        server.start()
        try:
            yield served
        finally:
            server.stop()
            logger.remove(sink)
            control._Server.handle_error = original  # type: ignore[method-assign]


def exchange(path: Path, request: bytes) -> bytes:
    """Send `request`, end the sending side, read the answer until the server closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(ANSWER_S)
        s.connect(str(path))
        try:
            s.sendall(request)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):  # answered and closed before the end
            pass
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            raise AssertionError(
                f"no close {ANSWER_S} s after the request: {got[:200]!r}"
            ) from None
        return got


def check(served: Served, request: bytes, surface: str) -> None:
    before = len(served.logged)
    with bounded(EXAMPLE_S):
        answer = exchange(served.path, request)
        statuses = [int(s) for s in STATUS_LINE.findall(answer)]
        if answer:
            assert answer.startswith(b"HTTP/1."), answer[:200]
            assert statuses, answer[:200]
        assert all(s in FINE or s == 100 for s in statuses), answer[:300]
        assert ControlClient(served.path, timeout_s=ANSWER_S).hello()["api"] == API_VERSION
    assert served.raised == [], served.raised
    logged = served.logged[before:]
    assert not any("Traceback" in m for m in logged), logged
    assert not any(CONTROL_CHARACTER.search(m.rstrip("\n")) for m in logged), logged
    TALLY[surface][_outcome(statuses)] += 1


def _outcome(statuses: list[int]) -> str:
    """What the first answer was: 2xx, 4xx, or the exact code of any other."""
    final = [s for s in statuses if s != 100]  # `Expect: 100-continue` comes first
    if not final:
        return "closed without an answer"
    return f"answered {final[0] // 100}xx" if final[0] // 100 in (2, 4) else f"answered {final[0]}"


@fuzz_settings(200)
@given(st.binary(max_size=4096))
@example(b"\r\n\r\n")
@example(b"GET /version HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n")
@example(b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n")
def test_raw_bytes_get_an_answer_or_a_close(served: Served, data: bytes) -> None:
    check(served, data, "control: raw bytes")


METHODS = ["GET", "POST", "PUT", "HEAD", "DELETE", "OPTIONS", "get", "", "G ET", "\x00", "PRI"]
TARGETS = [
    "/version", "/v1/status", "/v1/status?service=web", "/v1/history?service=", "/v1/reload",
    "/v1/services/web/downgrade", "/v1/services/web/pin", "/v1/services/web/warm",
    "/v1/services/web/reset", "/v1/services/../../etc/pin", "/v1/services/-/upgrade", "*",
    "http://x/v1/status", "//[", "/v1/status?service=%00&service=%ff", "/%ff", "",
    "/v1/status?" + "a=b&" * 2000, "/v1/status#frag", "/v1/services/web/pin?x=1",
]  # fmt: skip
VERSIONS = ["HTTP/1.1", "HTTP/1.0", "HTTP/0.9", "HTTP/2.0", "HTTP/1.1.1", "HTTP/a.b", "",
            "HTTP/11111111111111111111.1", "http/1.1"]  # fmt: skip
HEADER_NAMES = ["Content-Length", "content-length", "Transfer-Encoding", "Expect", "Connection",
                "Content-Type", "Host", "X"]  # fmt: skip
LENGTHS = ["-1", "0", "1", "10", "65536", "65537", "99999999999999999999999", "1e3", " 12 ",
           "0x10", "+5", "\u0663", "", "1,1", "\t5", "5 5"]  # fmt: skip
OTHER_VALUES = ["chunked", "100-continue", "close", "keep-alive", "application/json", "a" * 9000]


def bodies() -> st.SearchStrategy[bytes]:
    import json

    def dumped(value: Any) -> bytes:
        return json.dumps(value, allow_nan=True).encode()

    return st.one_of(
        odd_values.map(dumped),
        st.fixed_dictionaries(
            {}, optional={"force": odd_values, "rung": odd_values, "model": odd_values}
        ).map(dumped),
        st.binary(max_size=512),
        st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n),
        st.sampled_from([b'{"rung": ' + b"1" * 5000 + b"}", b"\xff\xfe{}", b"{}" * 100]),
    )


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):  # a request line fleetd serves: the headers and body are odd
        method = draw(st.sampled_from(["GET", "POST"]))
        target = draw(st.sampled_from(TARGETS))
        version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0"]))
    else:
        method = draw(st.sampled_from(METHODS) | st.text(max_size=8))
        target = draw(st.sampled_from(TARGETS) | st.text(max_size=40))
        version = draw(st.sampled_from(VERSIONS))
    body = draw(bodies())
    headers: list[tuple[str, str]] = []
    if draw(st.booleans()):
        headers.append(("Content-Length", str(len(body))))
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(HEADER_NAMES) | st.text(max_size=12))
        value = draw(st.sampled_from(LENGTHS + OTHER_VALUES) | st.text(max_size=20))
        headers.append((name, value))
    eol = draw(st.sampled_from(["\r\n", "\n"]))
    head = " ".join(p for p in (method, target, version) if p) + eol
    head += "".join(f"{name}: {value}{eol}" for name, value in headers) + eol
    return head.encode("utf-8", "surrogateescape") + body


@fuzz_settings(400)
@given(requests())
@example(
    b'POST /v1/services/web/pin HTTP/1.1\r\nContent-Length: 5010\r\n\r\n{"rung": '
    + b"1" * 5000
    + b"}"
)
@example(b"GET //[ HTTP/1.1\r\n\r\n")
@example(b"GET /version\x1b[2J HTTP/1.1\r\n\r\n")
def test_http_requests_get_an_answer_or_a_close(served: Served, request: bytes) -> None:
    check(served, request, "control: HTTP requests")


def test_the_fuzzed_server_still_answers_many_clients_at_once(served: Served) -> None:
    """After the fuzzing, no handler thread is left stuck: 200 callers at once all answered."""
    answers: list[object] = []

    def ask() -> None:
        try:
            answers.append(ControlClient(served.path, timeout_s=30).call("GET", "/v1/status"))
        except Exception as e:
            answers.append(e)

    threads = [threading.Thread(target=ask) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert answers == [{"message": "status None"}] * 200
