"""fleetd's metrics as a real Prometheus sees them: scraped every second, linted by
promtool, and a step down visible in PromQL."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from supervisor.config import load_config
from supervisor.gpus import Gpu
from supervisor.ladder import apply_change
from supervisor.metrics import Direction, FleetMetrics, TransitionReason, build_snapshot
from supervisor.state import FleetState, PendingChange, ServiceState
from tests.integration.prometheus_harness import Prometheus, prometheus_tools, promtool_check

MIB, GIB = 1024**2, 1024**3
DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "fleetd.json"
# Grafana's variables, as Grafana substitutes them ("All" is ".*").
VARIABLES = {"$instance": ".*", "$service": ".*", "$__rate_interval": "1m"}
FLEET = """\
services:
  svc:
    runtime: llamacpp
    containers: [svc-1]
    ladder: [{model: big, vram: 4000MiB}, {model: medium, vram: 2500MiB}]
"""


@pytest.fixture
def tools() -> tuple[str, str]:
    return prometheus_tools()


@pytest.fixture
def metrics() -> Iterator[FleetMetrics]:
    m = FleetMetrics()
    yield m
    m.close()


@pytest.fixture
def prometheus(
    tmp_path: Path, tools: tuple[str, str], metrics: FleetMetrics
) -> Iterator[Prometheus]:
    host, port = metrics.serve("127.0.0.1", 0)
    server = Prometheus(tmp_path, tools[0], f"{host}:{port}")
    yield server
    server.stop()


def test_prometheus_scrapes_fleetd_and_sees_a_step_down(
    tmp_path: Path, tools: tuple[str, str], metrics: FleetMetrics, prometheus: Prometheus
) -> None:
    (tmp_path / "fleet.yaml").write_text(FLEET)
    config = load_config(tmp_path / "fleet.yaml")
    needs = {"svc": [4000 * MIB, 2500 * MIB]}
    gpu = Gpu(index=0, name="test", total_bytes=8 * GIB, source="declared")
    state = FleetState(services={"svc": ServiceState(model="big", rung=0)})
    metrics.publish(build_snapshot(config, state, (gpu,), needs, {0: 7 * GIB}, 0.0, True))
    prometheus.start()
    prometheus.wait_for('fleetd_service_rung{service="svc"} == 0', timeout_s=20)

    with urllib.request.urlopen(f"http://{prometheus.target}/metrics", timeout=5) as response:
        checked = promtool_check(tools[1], response.read().decode())
    assert checked.returncode == 0, checked.stdout + checked.stderr

    svc = replace(state.services["svc"], pending=PendingChange(1, "medium", "3 vram_oom", 0.0))
    new, _record = apply_change(svc, "svc", 1.0)
    state = replace(state, services={"svc": new})
    metrics.publish(build_snapshot(config, state, (gpu,), needs, {0: 7 * GIB}, 1.0, True))
    metrics.transition("svc", Direction.DOWN, TransitionReason.VRAM_OOM)

    [rung] = prometheus.wait_for('fleetd_service_rung{service="svc"} == 1', timeout_s=20)
    assert rung["value"][1] == "1"
    [info] = prometheus.query('fleetd_service_info{service="svc"}')
    assert info["metric"]["model"] == "medium"
    [increase] = prometheus.wait_for(
        'increase(fleetd_transitions_total{service="svc",direction="down"}[1m]) > 0', 20
    )
    assert increase["metric"]["reason"] == "vram_oom"
    # A declared GPU has no NVML reading; nothing here reports follow lag or latency.
    run_dashboard_queries(
        prometheus,
        {"VRAM per GPU against the budget A", "Log-follow lag A"},
    )


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
