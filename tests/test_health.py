"""Health checks and the circuit breaker (supervisor.core.health): check results in, restarts out,
with plain float times."""

from __future__ import annotations

from supervisor.core.config import HealthConfig
from supervisor.core.health import Breaker, Health, HealthStatus, observe

CONFIG = HealthConfig(unhealthy_after=3, healthy_after=2, breaker_after=5, breaker_reset=60.0)


def run(health: Health, results: str, start: float = 0.0, step: float = 10.0) -> tuple[Health, int]:
    """Feed results ('.' ok, 'x' failed), one per `step` seconds; count the restarts."""
    restarts = 0
    for n, r in enumerate(results):
        health, verdict = observe(health, r == ".", "HTTP 503", start + n * step, CONFIG)
        restarts += verdict.restart
    return health, restarts


def test_healthy_after_two_passes_unhealthy_after_three_failures() -> None:
    h, restarts = run(Health(), ".")
    assert h.status is HealthStatus.UNKNOWN
    h, restarts = run(h, ".")
    assert h.status is HealthStatus.HEALTHY
    h, restarts = run(h, "xx")
    assert (h.status, restarts) == (HealthStatus.HEALTHY, 0)
    h, verdict = observe(h, False, "HTTP 503", 100.0, CONFIG)
    assert h.status is HealthStatus.UNHEALTHY and verdict.restart
    assert verdict.message == "unhealthy after 3 failed checks (HTTP 503); restarting"


def test_a_flapping_service_is_never_restarted() -> None:
    # One failure between passes never makes three in a row.
    h, restarts = run(Health(), ".." + "x.x." * 20)
    assert (h.status, restarts) == (HealthStatus.HEALTHY, 0)


def test_five_restarts_that_do_not_help_open_the_breaker() -> None:
    h, restarts = run(Health(), ".." + "xxx" * 5)
    assert restarts == 5 and h.breaker is Breaker.CLOSED
    h, verdict = observe(h, False, "HTTP 503", 200.0, CONFIG)
    h, verdict = observe(h, False, "HTTP 503", 210.0, CONFIG)
    h, verdict = observe(h, False, "HTTP 503", 220.0, CONFIG)
    assert h.breaker is Breaker.OPEN and not verdict.restart
    assert "circuit breaker OPEN after 5 restarts" in (verdict.message or "")
    # Open: no restart however long it keeps failing within the reset time ...
    h, restarts = run(h, "xxxxx", start=221.0, step=5.0)
    assert restarts == 0 and h.breaker is Breaker.OPEN


def test_the_breaker_half_opens_after_its_reset_time_then_closes_on_health() -> None:
    h, _ = run(Health(), ".." + "xxx" * 6)  # open at t=190
    assert h.breaker is Breaker.OPEN
    h, restarts = run(h, "xxx", start=260.0)  # past 190 + 60 s
    assert restarts == 1 and h.breaker is Breaker.HALF_OPEN
    h, restarts = run(h, "..", start=300.0)
    assert (h.status, h.breaker, h.failed_restarts) == (HealthStatus.HEALTHY, Breaker.CLOSED, 0)


def test_a_half_open_restart_that_fails_opens_the_breaker_again() -> None:
    h, _ = run(Health(), ".." + "xxx" * 6)
    h, _ = run(h, "xxx", start=260.0)  # half-open, one restart
    h, verdict = observe(h, False, "timeout", 300.0, CONFIG)
    h, verdict = observe(h, False, "timeout", 310.0, CONFIG)
    h, verdict = observe(h, False, "timeout", 320.0, CONFIG)
    assert h.breaker is Breaker.OPEN and h.opened_at == 320.0 and not verdict.restart
