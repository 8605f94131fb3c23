"""One backoff policy for everything fleetd retries: doubling waits that are forgotten.

A wait doubles with each failure in a row, up to a ceiling, and the failures are
forgotten once a quiet period has passed since the last one: a GPU that faulted ten times
last week gets a quick restart today, not the five-minute ceiling forever.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    first_s: float  # the wait after the first failure
    max_s: float  # the ceiling
    forget_after_s: float  # no failure for this long: the count starts afresh

    def delay_s(self, failures: int) -> float:
        """The wait after `failures` failures in a row (0 for none)."""
        if failures <= 0:
            return 0.0
        return float(min(self.max_s, self.first_s * 2.0 ** min(failures - 1, 62)))

    def failures_now(self, failures: int, last_failure_at: float | None, now: float) -> int:
        """The failures still counted at `now`: all of them, or none after a quiet period."""
        if last_failure_at is None or now - last_failure_at >= self.forget_after_s:
            return 0
        return failures


# Reconnecting to the Docker engine: 1 s, 2 s, ... up to a minute.
DOCKER_RECONNECT = Backoff(first_s=1.0, max_s=60.0, forget_after_s=300.0)
# Applying a recorded change whose restart failed (Docker down, a pull that failed).
APPLY_RETRY = Backoff(first_s=5.0, max_s=300.0, forget_after_s=900.0)
# Restarting a service after a GPU fault; forgotten after ten quiet minutes.
GPU_FAULT_RESTART = Backoff(first_s=1.0, max_s=300.0, forget_after_s=600.0)
