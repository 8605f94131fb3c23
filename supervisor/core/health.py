"""Health of a service's runtime API, and the circuit breaker on restarting it. Pure.

    unknown --(healthy_after successes)--> healthy --(unhealthy_after failures)--> unhealthy
    unhealthy: restart the service, then judge again after `unhealthy_after` more checks

A restart that does not bring health back counts as failed; after `breaker_after` failed
restarts in a row the breaker opens and no more restarts are made (a broken service must
not restart-storm the host). After `breaker_reset` it half-opens: one more restart is
tried; health coming back closes it, another failure opens it again. Any run of
`healthy_after` successes closes it and clears the count.

A check that fails within `start_period` of the run's start is not counted: a server
still loading its model (minutes, for a large one) must not be restarted for it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from supervisor.core.config import HealthConfig, ServiceConfig
from supervisor.core.runtimes import spec_of


class HealthStatus(StrEnum):
    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


class Breaker(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class Health:
    status: HealthStatus = HealthStatus.UNKNOWN
    failures: int = 0  # checks failed in a row
    successes: int = 0  # checks passed in a row
    last_error: str | None = None
    last_check_at: float | None = None
    breaker: Breaker = Breaker.CLOSED
    failed_restarts: int = 0
    opened_at: float | None = None
    judging_restart: bool = False  # a restart was made; the next verdict judges it

    def to_json(self) -> dict[str, object]:
        return {
            "status": str(self.status),
            "failures": self.failures,
            "last_error": self.last_error,
            "last_check_at": self.last_check_at,
            "breaker": str(self.breaker),
            "failed_restarts": self.failed_restarts,
        }


@dataclass(frozen=True)
class Verdict:
    restart: bool
    message: str | None = None  # for the log, when something changed


def observe(
    health: Health, ok: bool, error: str | None, now: float, config: HealthConfig
) -> tuple[Health, Verdict]:
    """One check's result in; the new health and whether to restart out."""
    if ok:
        return _success(health, now, config)
    h = replace(
        health, failures=health.failures + 1, successes=0, last_error=error, last_check_at=now
    )
    if h.failures < config.unhealthy_after:
        return h, Verdict(False)
    h = replace(h, status=HealthStatus.UNHEALTHY, failures=0)  # the next verdict needs N more
    note = f"unhealthy after {config.unhealthy_after} failed checks ({error})"
    if h.judging_restart:  # the last restart did not help
        h = replace(h, failed_restarts=h.failed_restarts + 1, judging_restart=False)
    if h.breaker is Breaker.HALF_OPEN or (
        h.breaker is Breaker.CLOSED and h.failed_restarts >= config.breaker_after
    ):
        h = replace(h, breaker=Breaker.OPEN, opened_at=now)
        return h, Verdict(
            False,
            f"{note}; circuit breaker OPEN after {h.failed_restarts} restarts that did not "
            f"help: no restart for {config.breaker_reset:.0f} s",
        )
    if h.breaker is Breaker.OPEN:
        if now < (h.opened_at or now) + config.breaker_reset:
            return h, Verdict(False)  # said when it opened
        h = replace(h, breaker=Breaker.HALF_OPEN)
        return replace(h, judging_restart=True), Verdict(
            True, f"{note}; circuit breaker half-open: one restart to try"
        )
    return replace(h, judging_restart=True), Verdict(True, f"{note}; restarting")


def _success(health: Health, now: float, config: HealthConfig) -> tuple[Health, Verdict]:
    h = replace(health, successes=health.successes + 1, failures=0, last_check_at=now)
    if h.successes < config.healthy_after or (
        h.status is HealthStatus.HEALTHY and h.breaker is Breaker.CLOSED
    ):
        return h, Verdict(False)
    was = h.status
    h = replace(
        h,
        status=HealthStatus.HEALTHY,
        last_error=None,
        breaker=Breaker.CLOSED,
        failed_restarts=0,
        opened_at=None,
        judging_restart=False,
    )
    if was is HealthStatus.UNHEALTHY or health.breaker is not Breaker.CLOSED:
        return h, Verdict(False, f"healthy again after {config.healthy_after} passed checks")
    return h, Verdict(False, "healthy" if was is HealthStatus.UNKNOWN else None)


def start_period_s(service: ServiceConfig) -> float:
    """How long after a run starts its failed checks are not counted: the service's
    `health.start_period`, else its runtime's (llama.cpp 300 s, vLLM 600 s, ...)."""
    if service.health.start_period is not None:
        return service.health.start_period
    return spec_of(service.runtime).start_period_s
