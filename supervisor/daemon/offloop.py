"""Blocking calls (Docker, NVML) kept off the daemon's main loop.

The loop must answer `fleetctl`, ping the watchdog and stop on SIGTERM whatever the
engine or the driver does, so everything that can block runs here: a `Lane` is one
worker thread running jobs in the order given and putting what they return on the loop's
queue; a `Bounded` call waits a fixed time for a call in its own thread and lets the
caller go on without it (a hung NVML or engine then holds one thread, not one per try).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from loguru import logger

T = TypeVar("T")


@dataclass(frozen=True)
class LoopTask:
    """What a job hands back: `apply` runs on the main loop (where decisions are made)."""

    apply: Callable[[], None]


Job = Callable[[], Iterable[object]]


class Lane:
    """One worker thread running jobs in order; each job's records go on `out`, in order.

    A job submitted with a `key` while another of that key waits or runs is kept as that
    key's next run (the latest replaces an earlier one): a reconnect or a re-attach asked
    for every few seconds of a hung engine queues one try, not one per tick."""

    def __init__(self, name: str, out: queue.Queue[object]) -> None:
        self.name, self._out = name, out
        self._jobs: queue.Queue[tuple[str | None, Job]] = queue.Queue()
        self._lock = threading.Lock()
        self._busy: set[str] = set()
        self._next: dict[str, Job] = {}
        self._thread: threading.Thread | None = None

    def submit(self, job: Job, key: str | None = None) -> None:
        with self._lock:
            if key is not None:
                if key in self._busy:
                    self._next[key] = job
                    return
                self._busy.add(key)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
        self._jobs.put((key, job))

    def _run(self) -> None:
        while True:
            key, job = self._jobs.get()
            try:
                records = list(job())
            except Exception:  # a bug: reported, and the lane goes on
                logger.exception(f"BUG in a {self.name} job; please report it")
                records = []
            for record in records:
                self._out.put(record)
            if key is not None:
                with self._lock:
                    again = self._next.pop(key, None)
                    if again is None:
                        self._busy.discard(key)
                if again is not None:
                    self._jobs.put((key, again))


class Bounded(Generic[T]):
    """Calls in a thread of their own, each waited for at most `wait_s`."""

    def __init__(self, name: str, wait_s: float) -> None:
        self.name, self.wait_s = name, wait_s
        self._running: threading.Thread | None = None

    def __call__(self, call: Callable[[], T]) -> tuple[bool, T | None, BaseException | None]:
        """(finished, value, error): not finished when it outlived the wait, or when an
        earlier call that did is still running (none is started beside it)."""
        if self._running is not None and self._running.is_alive():
            return False, None, None
        box: list[tuple[T | None, BaseException | None]] = []

        def run() -> None:
            try:
                box.append((call(), None))
            except BaseException as e:  # handed to the caller, who knows what it means
                box.append((None, e))

        thread = threading.Thread(target=run, name=self.name, daemon=True)
        thread.start()
        thread.join(self.wait_s)
        if not box:
            self._running = thread
            return False, None, None
        self._running = None
        value, error = box[0]
        return True, value, error
