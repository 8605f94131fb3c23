"""Tests for supervisor.edges.sdnotify: the systemd notify protocol over a real AF_UNIX socket.

Each test binds its own datagram socket (a path in tmp_path, or an abstract `@name`) and
reads what the Notifier sent, the way systemd would.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.edges.sdnotify import Notifier

MAX_SUN_PATH = 107  # sockaddr_un.sun_path is 108 bytes with its NUL


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket in tmp_path and its path, as systemd's $NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    if len(os.fsencode(path)) > MAX_SUN_PATH:
        pytest.skip(f"{path} is too long for an AF_UNIX address")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    yield sock, str(path)
    sock.close()


def test_ready_and_status_arrive_as_one_datagram(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = Notifier({"NOTIFY_SOCKET": path})

    assert notifier.enabled
    notifier.send("READY=1", "STATUS=svc=big (steady)")

    assert sock.recv(4096) == b"READY=1\nSTATUS=svc=big (steady)"


def test_each_send_is_its_own_datagram(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = Notifier({"NOTIFY_SOCKET": path})

    notifier.send("WATCHDOG=1")
    notifier.send("STOPPING=1")

    assert [sock.recv(4096), sock.recv(4096)] == [b"WATCHDOG=1", b"STOPPING=1"]


def test_an_abstract_socket_is_written_with_a_leading_at() -> None:
    name = f"fleetd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2.0)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})

        notifier.send("READY=1", "STATUS=ok")

        assert sock.recv(4096) == b"READY=1\nSTATUS=ok"


def test_the_process_environment_is_read_when_none_is_given(
    receiver: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")

    notifier = Notifier()
    notifier.send("READY=1")

    assert sock.recv(4096) == b"READY=1"
    assert notifier.watchdog_s == 2.0


@pytest.mark.parametrize("usec", [2_000_000, 30_000_000, 1_500_001, 1])
def test_watchdog_interval_is_half_of_watchdog_usec(usec: int) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": str(usec)})

    assert notifier.watchdog_s == pytest.approx(usec / 2e6, rel=1e-12)


@pytest.mark.parametrize("value", ["", "abc", "-5", "1.5"])
def test_no_watchdog_without_a_whole_number_of_usec(value: str) -> None:
    env = {"NOTIFY_SOCKET": "@x"}
    if value:
        env["WATCHDOG_USEC"] = value

    assert Notifier(env).watchdog_s is None


def test_without_notify_socket_send_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    created: list[object] = []
    real_socket = socket.socket

    def spy(*args: object, **kwargs: object) -> socket.socket:
        created.append(args)
        return real_socket(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "socket", spy)
    for notifier in (Notifier({}), Notifier({"NOTIFY_SOCKET": ""}), Notifier()):
        assert not notifier.enabled
        notifier.send("READY=1", "STATUS=nobody listens")

    assert created == []  # not even a socket was opened


def test_a_vanished_socket_does_not_raise(tmp_path: Path) -> None:
    path = tmp_path / "gone.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    notifier = Notifier({"NOTIFY_SOCKET": str(path)})
    sock.close()  # systemd went away: the file is left, nobody reads it
    notifier.send("WATCHDOG=1")
    path.unlink()  # and then the file went too
    notifier.send("STOPPING=1")


def test_a_socket_that_never_existed_does_not_raise(tmp_path: Path) -> None:
    Notifier({"NOTIFY_SOCKET": str(tmp_path / "missing.sock")}).send("READY=1")
    Notifier({"NOTIFY_SOCKET": f"@fleetd-test-missing-{uuid.uuid4().hex}"}).send("READY=1")
