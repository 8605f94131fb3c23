"""fleetd's metrics as a real Prometheus sees them: scraped every second, linted by
promtool, and a step down visible in PromQL."""

from __future__ import annotations

import json
import re
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.fleet_harness import Fleet, at_rung
from tests.integration.prometheus_harness import Prometheus, prometheus_tools, promtool_check

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "fleetd.json"
# Grafana's variables, as Grafana substitutes them ("All" is ".*").
VARIABLES = {"$instance": ".*", "$service": ".*", "$__rate_interval": "1m"}
StartPrometheus = Callable[[str], Prometheus]
SERVING = re.compile(r"metrics: serving http://(127\.0\.0\.1:\d+)/metrics")


@pytest.fixture
def tools() -> tuple[str, str]:
    return prometheus_tools()


@pytest.fixture
def start_prometheus(tmp_path: Path, tools: tuple[str, str]) -> Iterator[StartPrometheus]:
    """Starts a Prometheus scraping a target once the test knows it; stops it at the end."""
    started: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        server = Prometheus(tmp_path, tools[0], target)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


def metrics_target(fleet: Fleet, timeout_s: float = 20.0) -> str:
    """HOST:PORT from fleetd's log line `metrics: serving http://HOST:PORT/metrics`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = SERVING.search(fleet.log.read_text() if fleet.log.exists() else "")
        if found:
            return found.group(1)
        assert fleet.process is not None and fleet.process.poll() is None, fleet.log.read_text()
        time.sleep(0.1)
    raise AssertionError(f"fleetd never said where it serves metrics:\n{fleet.log.read_text()}")


def test_prometheus_scrapes_fleetd_run_and_sees_a_step_down(
    fleet: Fleet, tools: tuple[str, str], start_prometheus: StartPrometheus
) -> None:
    name = f"svc-{uuid.uuid4().hex[:8]}"
    # The config turns the endpoint off; the command line's address wins.
    fleet.write_config({"svc": fleet.service("llamacpp", name)}, metrics={"enabled": False})
    (fleet.state_dir / "services/svc").mkdir(parents=True)
    (fleet.state_dir / "services/svc/model").write_text("big\n")
    fleet.start(extra_args=["--metrics-address", "127.0.0.1:0"])
    server = start_prometheus(metrics_target(fleet))
    # Scraped at rung 0 with the counter at 0 before anything happens, so the step down
    # shows as an increase; the container starts only now (fleetd attaches on its start).
    down = 'fleetd_transitions_total{service="svc",direction="down",reason="vram_oom"}'
    server.wait_for(f'fleetd_service_rung{{service="svc"}} == 0 and on() {down} == 0', 20)
    fleet.run_container(name, "llamacpp", capacity_mib=3000, OOM_INTERVAL_S="0.3")

    fleet.wait_for("a step down to medium", at_rung("svc", 1), timeout_s=60)

    [rung] = server.wait_for('fleetd_service_rung{service="svc"} == 1', timeout_s=20)
    assert rung["value"][1] == "1"
    [info] = server.query('fleetd_service_info{service="svc"}')
    assert (info["metric"]["model"], info["metric"]["runtime"]) == ("medium", "llamacpp")
    [increase] = server.wait_for(f"increase({down}[1m]) > 0", timeout_s=20)
    assert float(increase["value"][1]) > 0
    [incidents] = server.query('fleetd_incidents_total{service="svc",class="vram_oom"}')
    assert float(incidents["value"][1]) >= 3
    # What fleetctl shows and what Prometheus scraped agree.
    from tests.integration.test_control_api import fleetctl

    # (The ladder state moves from cooldown to steady on fleetd's 5 s tick, which may fall
    # between a scrape and the status call: compare until both have seen the same tick.)
    deadline = time.monotonic() + 15
    while True:
        status = json.loads(fleetctl(fleet, "status", "--json").stdout)["services"]["svc"]
        [state] = server.query('fleetd_service_state{service="svc"} == 1')
        [model] = server.query('fleetd_service_info{service="svc"}')
        scraped = (model["metric"]["model"], int(rung["value"][1]), state["metric"]["state"])
        if (status["model"], status["rung"], status["state"]) == scraped:
            break
        assert time.monotonic() < deadline, (status, scraped)
        time.sleep(1)
    server.wait_for('fleetd_detection_latency_seconds_count{service="svc"} >= 3', 20)
    server.wait_for(f'fleetd_log_follow_lag_seconds{{container="{name}"}}', timeout_s=20)
    with urllib.request.urlopen(f"http://{server.target}/metrics", timeout=5) as response:
        checked = promtool_check(tools[1], response.read().decode())
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The test's GPU is declared, so NVML's "used" has no reading to show.
    # Nor does a service without a runtime endpoint have health checks or warm-ups.
    runtime = {"Runtime health A", "Restart circuit breaker A", "Warm-up speed A"}
    run_dashboard_queries(server, {"VRAM per GPU against the budget A", *runtime})
    assert fleet.stop() == 0


def dashboard_queries() -> dict[str, str]:
    """Every PromQL query of the dashboard (panels, variables, annotations), by where it is."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = {
        f"{p['title']} {t['refId']}": t["expr"]
        for p in dashboard["panels"]
        for t in p.get("targets", [])
    }
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":  # label_values(SELECTOR, LABEL): the selector is PromQL
            found[f"${v['name']}"] = re.sub(
                r"^label_values\((.*), *\w+\)$", r"\1", v["query"]["query"]
            )
    for a in dashboard["annotations"]["list"]:
        if "expr" in a:
            found[a["name"]] = a["expr"]
    return found


def run_dashboard_queries(prometheus: Prometheus, may_be_empty: set[str]) -> None:
    """Prometheus accepts every dashboard query, and each one shows data unless allowed."""
    empty = []
    for where, expr in dashboard_queries().items():
        for name, value in VARIABLES.items():
            expr = expr.replace(name, value)
        if not prometheus.query(expr):  # `query` fails on a query Prometheus refuses
            empty.append(where)
    assert set(empty) <= may_be_empty, f"no data for {sorted(set(empty) - may_be_empty)}"
