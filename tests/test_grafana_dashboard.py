"""Tests for docs/grafana/fleetd.json: a Grafana dashboard whose every query uses only metric
names a real FleetMetrics exports, on a Prometheus data source chosen by a variable."""

from __future__ import annotations

import json
import re
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest

from supervisor.core.config import load_config
from supervisor.core.gpus import Gpu
from supervisor.core.health import Health, HealthStatus
from supervisor.core.state import FleetState, Measured, ServiceState
from supervisor.edges.metrics import Direction, FleetMetrics, TransitionReason, build_snapshot

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "docs" / "grafana" / "fleetd.json"
OBSERVABILITY = ROOT / "docs" / "observability.md"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# PromQL words that are not metric names: functions (followed by "(") and operators.
FUNCTIONS = {
    "sum", "max", "min", "avg", "count", "rate", "increase", "changes", "time",
    "histogram_quantile", "scalar", "topk", "clamp_min", "abs",
}  # fmt: skip
KEYWORDS = {"and", "or", "unless", "bool", "offset", "group_left", "group_right"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Every sample name a FleetMetrics with one service, one GPU and every event exports."""
    path = tmp_path_factory.mktemp("dash") / "fleet.yaml"
    path.write_text(
        "services:\n  svc:\n    runtime: vllm\n    containers: [svc-1]\n"
        "    ladder: [{model: m, vram: 1GiB}]\n"
    )
    config = load_config(path)
    gpu = Gpu(0, "g", 8 << 30, "nvml", uuid="GPU-1", used_bytes=1 << 30, free_bytes=7 << 30)
    state = FleetState(services={"svc": ServiceState(model="m", rung=0, changed_at=1.0)})
    state.measured["m"] = Measured(vram_bytes=1 << 30, load_s=1.0, tokens_per_s=40.0, at=1.0)
    metrics = FleetMetrics()
    needs, budgets = {"svc": [1 << 30]}, {0: 6 << 30}
    health = {"svc": Health(status=HealthStatus.HEALTHY)}
    metrics.publish(build_snapshot(config, state, (gpu,), needs, budgets, 2.0, True, health))
    metrics.incident("svc", "vram_oom")
    metrics.transition("svc", Direction.DOWN, TransitionReason.VRAM_OOM)
    metrics.detection_latency("svc", 0.01)
    metrics.follow_lag("svc-1", 0.1)
    return {s.name for family in metrics.registry.collect() for s in family.samples}


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """The visible panels (rows are only headings)."""
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target, variable query and annotation."""
    found = [(p["title"], t["expr"]) for p in panels(dashboard) for t in p["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            # Grafana's label_values(SELECTOR, LABEL): only the selector is PromQL.
            selector = re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", variable["query"]["query"])
            found.append((f"${variable['name']}", selector))
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            found.append((annotation["name"], annotation["expr"]))
    return found


def metric_names(promql: str) -> set[str]:
    """The metric names a PromQL expression reads; fails on a word it does not know."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', promql)  # label values, regexes
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges, $__rate_interval
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word, rest = match.group(), text[match.end() :].lstrip()
        if rest.startswith("("):
            assert word in FUNCTIONS, f"unknown PromQL function {word!r} in {promql!r}"
        elif word not in KEYWORDS:
            names.add(word)
    return names


def test_the_dashboard_is_grafana_json_with_a_prometheus_datasource_variable(
    dashboard: dict[str, Any],
) -> None:
    assert dashboard["title"] == "fleetd" and dashboard["uid"] == "fleetd"
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert dashboard["id"] is None  # Grafana assigns it on import
    [variable] = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert (variable["name"], variable["query"]) == ("datasource", "prometheus")
    for panel in panels(dashboard):
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert all(t["datasource"] == DATASOURCE for t in panel["targets"]), panel["title"]


def test_every_query_reads_only_metrics_fleetd_exports(
    dashboard: dict[str, Any], exported: set[str]
) -> None:
    for where, promql in queries(dashboard):
        names = metric_names(promql)
        assert names, f"{where}: {promql!r} reads no metric"
        assert names <= exported, f"{where}: {sorted(names - exported)} not exported"


def test_the_panels_cover_what_the_issue_asks_for(dashboard: dict[str, Any]) -> None:
    read = {name for _where, promql in queries(dashboard) for name in metric_names(promql)}

    for needed in (
        "fleetd_service_rung",  # rung per service over time
        "fleetd_incidents_total",  # incidents
        "fleetd_gpu_memory_used_bytes",  # VRAM per GPU ...
        "fleetd_gpu_budget_bytes",  # ... against the budget
        "fleetd_service_state",  # health
    ):
        assert needed in read


def test_panels_have_unique_ids_and_refids_and_do_not_overlap(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)) and panel["description"], panel["title"]
    boxes = [p["gridPos"] for p in dashboard["panels"]]
    for box in boxes:
        assert box["x"] >= 0 and box["w"] > 0 and box["x"] + box["w"] <= 24 and box["h"] > 0
    for a, b in combinations(boxes, 2):
        apart_x = a["x"] + a["w"] <= b["x"] or b["x"] + b["w"] <= a["x"]
        apart_y = a["y"] + a["h"] <= b["y"] or b["y"] + b["h"] <= a["y"]
        assert apart_x or apart_y, f"panels overlap: {a} {b}"


def test_every_panel_is_described_in_the_docs(dashboard: dict[str, Any]) -> None:
    docs = OBSERVABILITY.read_text(encoding="utf-8")

    for panel in panels(dashboard):
        assert f"**{panel['title']}**" in docs, panel["title"]


@pytest.mark.parametrize(
    ("promql", "names"),
    [
        ('sum by (le) (rate(a_bucket{x=~"$y"}[$__rate_interval]))', {"a_bucket"}),
        ("a * on(instance, service) group_left b", {"a", "b"}),
        ('a{s="x"} + ignoring(state) 2 * b', {"a", "b"}),
        ("time() - a", {"a"}),
    ],
)
def test_metric_names_are_read_out_of_promql(promql: str, names: set[str]) -> None:
    assert metric_names(promql) == names
