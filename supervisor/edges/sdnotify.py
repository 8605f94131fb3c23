"""systemd's notify protocol (READY=1, WATCHDOG=1, STATUS=...): one datagram per message.

Hand-written on purpose: the protocol is a single sendto() on $NOTIFY_SOCKET, and the
libraries for it either need libsystemd or are unmaintained.
"""

from __future__ import annotations

import os
import socket
from contextlib import suppress


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # An abstract socket is written with a leading '@' and addressed with a NUL byte.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        self.watchdog_s: float | None = int(usec) / 1e6 / 2 if usec.isdigit() else None

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def send(self, *messages: str) -> None:
        if not self._address:
            return
        # If systemd went away there is nobody to tell: ignore the error.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, suppress(OSError):
            sock.sendto("\n".join(messages).encode(), self._address)
