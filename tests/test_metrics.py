"""Tests for supervisor.edges.metrics: what a scrape of fleetd shows, read back with the client's
own parser, and the HTTP endpoint's binding and errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from supervisor.core.config import FleetConfig, load_config
from supervisor.core.gpus import Gpu, GpuProcess
from supervisor.core.ladder import apply_change
from supervisor.core.rules import IncidentClass
from supervisor.core.state import (
    Actor,
    Cordon,
    FleetState,
    Incident,
    PendingChange,
    ServiceState,
    ServiceStatus,
    Transition,
)
from supervisor.edges.metrics import (
    Direction,
    FleetMetrics,
    FleetSnapshot,
    MetricsError,
    TransitionReason,
    build_snapshot,
    transition_kind,
)

MIB, GIB = 1024**2, 1024**3
NOW = 1_800_000_000.0
FLEET = """\
policy: {incidents_to_step_down: 3, incident_window: 10m}
services:
  coder:
    runtime: llamacpp
    containers: [coder-1]
    ladder:
      - {model: big, vram: 4000MiB}
      - {model: medium, vram: 2500MiB}
  chat:
    runtime: ollama
    containers: [chat-app]
    watch: [chat-server]
    ladder:
      - {model: "llama3.2:3b", vram: 2048MiB}
"""
NEEDS = {"coder": [4000 * MIB, 2500 * MIB], "chat": [2048 * MIB]}
GPU = Gpu(
    index=0,
    name="RTX 4070 SUPER",
    total_bytes=12 * GIB,
    source="nvml",
    uuid="GPU-6a1f",
    used_bytes=5 * GIB,
    free_bytes=7 * GIB,
    processes=(GpuProcess(pid=10, used_bytes=GIB),),
)


@pytest.fixture
def config(tmp_path: Path) -> FleetConfig:
    path = tmp_path / "fleet.yaml"
    path.write_text(FLEET, encoding="utf-8")
    return load_config(path)


@pytest.fixture
def metrics() -> Iterator[FleetMetrics]:
    m = FleetMetrics()
    yield m
    m.close()


def fresh_state() -> FleetState:
    return FleetState(
        services={
            "coder": ServiceState(model="big", rung=0),
            "chat": ServiceState(model="llama3.2:3b", rung=0),
        }
    )


def publish(
    metrics: FleetMetrics,
    config: FleetConfig,
    state: FleetState,
    gpus: tuple[Gpu, ...] = (GPU,),
    budgets: dict[int, int] | None = None,
) -> None:
    budgets = {0: 9 * GIB} if budgets is None else budgets
    metrics.publish(build_snapshot(config, state, gpus, NEEDS, budgets, NOW, docker_up=True))


def samples(metrics: FleetMetrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample called `name` in the exposition text, keyed by its sorted labels."""
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(metrics.render())
        for s in family.samples
        if s.name == name
    }


def value(metrics: FleetMetrics, name: str, **labels: str) -> float | None:
    return samples(metrics, name).get(tuple(sorted(labels.items())))


def step_down(state: FleetState, service: str, to_rung: int, to_model: str) -> FleetState:
    svc = replace(
        state.services[service], pending=PendingChange(to_rung, to_model, "3 vram_oom", NOW - 1)
    )
    new, _record = apply_change(svc, service, NOW)
    return replace(state, services={**state.services, service: new})


# --- services: model, rung, state ---------------------------------------------------------


def test_after_a_step_down_the_info_metric_shows_only_the_new_model(
    metrics: FleetMetrics, config: FleetConfig
) -> None:
    state = fresh_state()
    publish(metrics, config, state)
    assert value(metrics, "fleetd_service_rung", service="coder") == 0
    assert value(metrics, "fleetd_transitions_total", **DOWN_OOM) == 0

    publish(metrics, config, step_down(state, "coder", 1, "medium"))
    metrics.transition("coder", Direction.DOWN, TransitionReason.VRAM_OOM)

    info = samples(metrics, "fleetd_service_info")
    coder = [dict(labels) for labels in info if ("service", "coder") in labels]
    assert coder == [
        {
            "service": "coder",
            "model": "medium",
            "runtime": "llamacpp",
            "served_name": "coder",  # the name clients call stays
            "context": "",  # the rung leaves these to the runtime
            "parallel": "",
            "kv_cache": "",
            "tensor_parallel": "1",
        }
    ]
    assert info[tuple(sorted(coder[0].items()))] == 1
    assert value(metrics, "fleetd_service_rung", service="coder") == 1
    assert value(metrics, "fleetd_service_rung", service="chat") == 0
    assert value(metrics, "fleetd_transitions_total", **DOWN_OOM) == 1
    others = {k: v for k, v in samples(metrics, "fleetd_transitions_total").items() if v}
    assert list(others) == [tuple(sorted(DOWN_OOM.items()))]
    assert value(metrics, "fleetd_service_state", service="coder", state="cooldown") == 1
    assert value(metrics, "fleetd_service_state", service="coder", state="steady") == 0
    assert value(metrics, "fleetd_service_last_change_timestamp_seconds", service="coder") == NOW


DOWN_OOM = {"service": "coder", "direction": "down", "reason": "vram_oom"}


def test_every_state_is_shown_with_exactly_one_set(
    metrics: FleetMetrics, config: FleetConfig
) -> None:
    state = fresh_state()
    exhausted = replace(state.services["chat"], state=ServiceStatus.EXHAUSTED)
    publish(metrics, config, replace(state, services={**state.services, "chat": exhausted}))

    chat = {
        dict(k)["state"]: v
        for k, v in samples(metrics, "fleetd_service_state").items()
        if ("service", "chat") in k
    }
    assert chat == {"steady": 0, "cooldown": 0, "exhausted": 1, "pinned": 0}


def test_ladder_length_and_every_rungs_vram_need_are_shown_as_estimated(
    metrics: FleetMetrics, config: FleetConfig
) -> None:
    publish(metrics, config, fresh_state())

    vram = samples(metrics, "fleetd_model_vram_bytes")
    assert vram == {
        (("model", "big"), ("rung", "0"), ("service", "coder"), ("source", "estimated")): 4000
        * MIB,
        (("model", "medium"), ("rung", "1"), ("service", "coder"), ("source", "estimated")): 2500
        * MIB,
        (
            ("model", "llama3.2:3b"),
            ("rung", "0"),
            ("service", "chat"),
            ("source", "estimated"),
        ): 2048 * MIB,
    }
    assert value(metrics, "fleetd_service_ladder_rungs", service="coder") == 2


def test_services_without_a_rung_yet_or_gone_from_the_config_are_not_shown(
    metrics: FleetMetrics, config: FleetConfig
) -> None:
    state = FleetState(
        services={"coder": ServiceState("big", 0), "retired": ServiceState("old", 2)}
    )
    publish(metrics, config, state)

    shown = {dict(k)["service"] for k in samples(metrics, "fleetd_service_rung")}
    assert shown == {"coder"}


def test_recent_incidents_count_only_inside_the_policy_window(
    metrics: FleetMetrics, config: FleetConfig
) -> None:
    def oom(age_s: float) -> Incident:
        return Incident(NOW - age_s, "vram_oom", "llamacpp.cuda_malloc_failed", "c1", "oom")

    state = fresh_state()
    coder = replace(
        state.services["coder"],
        incidents=[oom(700), oom(30), oom(5), Incident(NOW, "gpu_fault", "xid", "c1", "Xid 79")],
    )
    publish(metrics, config, replace(state, services={**state.services, "coder": coder}))

    recent = samples(metrics, "fleetd_service_recent_incidents")
    coder_counts = {dict(k)["class"]: v for k, v in recent.items() if ("service", "coder") in k}
    assert coder_counts == {
        "vram_oom": 2,
        "gpu_fault": 1,
        "host_oom": 0,
        "start_failure": 0,
        "crash": 0,
        "crash_loop": 0,
    }
    assert value(metrics, "fleetd_policy_incidents_to_step_down") == 3


# --- events: incidents, transitions, latency, lag -------------------------------------------


def test_counters_of_every_known_service_start_at_zero(
    metrics: FleetMetrics, config: FleetConfig
) -> None:
    publish(metrics, config, fresh_state())

    incidents = samples(metrics, "fleetd_incidents_total")
    transitions = samples(metrics, "fleetd_transitions_total")
    assert len(incidents) == 2 * len(IncidentClass) and set(incidents.values()) == {0}
    assert len(transitions) == 2 * 5 and set(transitions.values()) == {0}
    assert value(metrics, "fleetd_detection_latency_seconds_count", service="chat") == 0


def test_incidents_are_counted_by_service_and_class(metrics: FleetMetrics) -> None:
    metrics.incident("coder", "vram_oom")
    metrics.incident("coder", "vram_oom")
    metrics.incident("chat", "host_oom")

    assert value(metrics, "fleetd_incidents_total", service="coder", **{"class": "vram_oom"}) == 2
    assert value(metrics, "fleetd_incidents_total", service="chat", **{"class": "host_oom"}) == 1


def test_labels_take_only_the_fixed_values(metrics: FleetMetrics) -> None:
    with pytest.raises(ValueError):
        metrics.incident("coder", "CUDA error: out of memory")
    with pytest.raises(ValueError, match="no transition up for reason vram_oom"):
        metrics.transition("coder", Direction.UP, TransitionReason.VRAM_OOM)
    with pytest.raises(ValueError):
        metrics.transition("coder", Direction.DOWN, TransitionReason("free text"))


@pytest.mark.parametrize(
    ("from_rung", "to_rung", "actor", "op", "expected"),
    [
        (0, 1, "fleetd", None, ("down", "vram_oom")),
        (2, 1, "fleetd", None, ("up", "step_up")),
        (0, 2, "fleetctl", "downgrade", ("down", "manual")),
        (2, 0, "fleetctl", "reset", ("up", "reset")),
        (2, 0, "fleetctl", "upgrade", ("up", "manual")),
        (1, 0, "fleetctl", None, ("up", "manual")),  # decided before a restart of fleetd
        (1, 3, "fleetctl", "pin", ("down", "manual")),
    ],
)
def test_transitions_are_counted_by_direction_and_a_fixed_reason(
    from_rung: int, to_rung: int, actor: Actor, op: str | None, expected: tuple[str, str]
) -> None:
    record = Transition(NOW, "coder", from_rung, to_rung, "a", "b", "free text", actor=actor)

    kind = transition_kind(record, op)

    assert kind is not None and (kind[0].value, kind[1].value) == expected


def test_a_record_that_keeps_the_rung_is_not_a_transition() -> None:
    assert transition_kind(Transition(NOW, "coder", 1, 1, "a", "a", "x")) is None


def test_detection_latency_lands_in_its_bucket(metrics: FleetMetrics) -> None:
    metrics.detection_latency("coder", 0.007)
    metrics.detection_latency("coder", 0.2)

    def bucket(le: str) -> float | None:
        return value(metrics, "fleetd_detection_latency_seconds_bucket", service="coder", le=le)

    assert (bucket("0.005"), bucket("0.01"), bucket("0.25"), bucket("+Inf")) == (0, 1, 2, 2)
    assert value(metrics, "fleetd_detection_latency_seconds_sum", service="coder") == pytest.approx(
        0.207
    )


def test_follow_lag_is_per_container_and_dropped_when_no_longer_followed(
    metrics: FleetMetrics, config: FleetConfig
) -> None:
    metrics.follow_lag("chat-server", 0.25)
    metrics.follow_lag("gone-1", 3.0)
    assert value(metrics, "fleetd_log_follow_lag_seconds", container="gone-1") == 3.0

    publish(metrics, config, fresh_state())

    assert samples(metrics, "fleetd_log_follow_lag_seconds") == {
        (("container", "chat-server"),): 0.25
    }


# --- GPUs -----------------------------------------------------------------------------------


def test_gpu_bytes_match_the_nvml_readings_and_the_budget(
    metrics: FleetMetrics, config: FleetConfig
) -> None:
    lost = Gpu(index=1, name="unknown", total_bytes=0, source="nvml", error="GPU is lost")
    publish(metrics, config, fresh_state(), gpus=(GPU, lost), budgets={0: 9 * GIB})

    key = {"gpu": "0", "uuid": "GPU-6a1f"}
    assert value(metrics, "fleetd_gpu_memory_total_bytes", **key) == 12 * GIB
    assert value(metrics, "fleetd_gpu_memory_used_bytes", **key) == 5 * GIB
    assert value(metrics, "fleetd_gpu_memory_free_bytes", **key) == 7 * GIB
    assert value(metrics, "fleetd_gpu_budget_bytes", **key) == 9 * GIB
    assert len(samples(metrics, "fleetd_gpu_memory_total_bytes")) == 1  # the lost one: none


def test_a_declared_gpu_shows_its_size_and_no_invented_usage(
    metrics: FleetMetrics, config: FleetConfig
) -> None:
    declared = Gpu(index=0, name="test", total_bytes=8 * GIB, source="declared")
    publish(metrics, config, fresh_state(), gpus=(declared,), budgets={})

    assert value(metrics, "fleetd_gpu_memory_total_bytes", gpu="0", uuid="") == 8 * GIB
    assert samples(metrics, "fleetd_gpu_memory_used_bytes") == {}
    assert samples(metrics, "fleetd_gpu_budget_bytes") == {}


# --- fleetd itself --------------------------------------------------------------------------


def test_before_the_first_publish_only_fleetds_version_has_a_value(metrics: FleetMetrics) -> None:
    families = list(text_string_to_metric_families(metrics.render()))

    with_values = {s.name for f in families for s in f.samples}
    assert with_values == {"fleetd_build_info"}
    assert metrics.snapshot == FleetSnapshot()


def test_publish_time_and_docker_reachability_are_shown(
    metrics: FleetMetrics, config: FleetConfig
) -> None:
    publish(metrics, config, fresh_state())

    assert value(metrics, "fleetd_last_publish_timestamp_seconds") == NOW
    assert value(metrics, "fleetd_docker_up") == 1


def test_scrapes_while_the_loop_publishes_never_fail(
    metrics: FleetMetrics, config: FleetConfig
) -> None:
    errors: list[BaseException] = []
    done = threading.Event()

    def scrape() -> None:
        try:
            while not done.is_set():
                list(text_string_to_metric_families(metrics.render()))
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    scraper = threading.Thread(target=scrape)
    scraper.start()
    state = fresh_state()
    for n in range(300):
        state = step_down(state, "coder", n % 2, ["big", "medium"][n % 2])
        publish(metrics, config, state)
        metrics.incident("coder", "vram_oom")
    done.set()
    scraper.join()

    assert errors == []


# --- the HTTP endpoint ----------------------------------------------------------------------


def test_the_default_address_binds_loopback_only(
    metrics: FleetMetrics, config: FleetConfig
) -> None:
    # The configured default host, on a free port (the default port may be in use here).
    host, port = metrics.serve(config.metrics.host, 0)

    assert config.metrics.host == "127.0.0.1"
    assert metrics.bound_address == ("127.0.0.1", port) == (host, port)
    publish(metrics, config, fresh_state())
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    assert 'fleetd_service_info{model="medium"' not in body
    assert 'fleetd_service_rung{service="coder"} 0.0' in body


def test_a_taken_port_is_refused_naming_the_address(metrics: FleetMetrics) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        with pytest.raises(MetricsError) as caught:
            metrics.serve("127.0.0.1", port)

    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message
    assert "already in use" in message and "--metrics-address" in message


def test_an_address_this_host_does_not_have_is_refused(metrics: FleetMetrics) -> None:
    with pytest.raises(MetricsError, match=r"192\.0\.2\.1:10464: this host has no such address"):
        metrics.serve("192.0.2.1", 10464)  # TEST-NET-1: never assigned to a host


def test_close_frees_the_port(metrics: FleetMetrics) -> None:
    _host, port = metrics.serve("127.0.0.1", 0)
    metrics.close()

    again = FleetMetrics()
    try:
        assert again.serve("127.0.0.1", port)[1] == port
    finally:
        again.close()


# --- fleetd run: which address, and a taken port ------------------------------------------


@pytest.mark.parametrize(
    ("written", "override", "serve", "expected"),
    [
        ("", None, True, ("127.0.0.1", 10464)),  # the default
        ('metrics: {address: "[::1]:9999"}', None, True, ("::1", 9999)),
        ("metrics: {enabled: false}", None, True, None),
        ("metrics: {enabled: false}", ("127.0.0.1", 0), True, ("127.0.0.1", 0)),
        ('metrics: {address: "0.0.0.0:1"}', ("127.0.0.1", 2), True, ("127.0.0.1", 2)),
        ("", None, False, None),  # --no-metrics
    ],
)
def test_the_command_line_address_overrides_the_config(
    tmp_path: Path,
    written: str,
    override: tuple[str, int] | None,
    serve: bool,
    expected: tuple[str, int] | None,
) -> None:
    from supervisor.daemon import Daemon

    path = tmp_path / "fleet.yaml"
    path.write_text(f"{written}\n{FLEET}", encoding="utf-8")

    daemon = Daemon(path, tmp_path / "state", metrics_address=override, serve_metrics=serve)

    assert daemon.metrics_at == expected


def test_fleetd_run_on_a_taken_port_exits_1_before_touching_the_state(tmp_path: Path) -> None:
    (tmp_path / "fleet.yaml").write_text(FLEET, encoding="utf-8")
    state_dir = tmp_path / "state"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        fleetd = [sys.executable, "-c", "from supervisor.cli.fleetd import main; main()"]
        files = ["--config", str(tmp_path / "fleet.yaml"), "--state-dir", str(state_dir)]
        done = subprocess.run(
            [*fleetd, "run", *files, "--no-socket", "--metrics-address", address],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "NOTIFY_SOCKET": ""},
            check=False,
        )

    assert done.returncode == 1, done.stderr
    assert f"fleetd: error: cannot serve metrics on {address}: the port is already in use" in (
        done.stderr
    )
    assert not (state_dir / "state.json").exists()
    assert not (state_dir / "services").exists()  # no model hand-off file written either


# --- model lifecycle: health, circuit breaker, warm-up, measured VRAM ----------------------


def test_health_and_the_breaker_are_shown_once_checked(
    metrics: FleetMetrics, config: FleetConfig
) -> None:
    from supervisor.core.health import Breaker, Health, HealthStatus

    state = fresh_state()
    unhealthy = Health(status=HealthStatus.UNHEALTHY, breaker=Breaker.OPEN, failed_restarts=5)
    metrics.publish(
        build_snapshot(config, state, (GPU,), NEEDS, {0: 9 * GIB}, NOW, True, {"coder": unhealthy})
    )
    assert value(metrics, "fleetd_service_healthy", service="coder") == 0.0
    assert value(metrics, "fleetd_circuit_breaker_state", service="coder", state="open") == 1.0
    assert value(metrics, "fleetd_circuit_breaker_state", service="coder", state="closed") == 0.0
    # A service never checked (no endpoint) has no health series at all, not a fake 0 or 1.
    assert value(metrics, "fleetd_service_healthy", service="chat") is None
    assert value(metrics, "fleetd_circuit_breaker_state", service="chat", state="closed") is None


def test_measured_vram_and_warmup_speed_sit_beside_the_estimates(
    metrics: FleetMetrics, config: FleetConfig
) -> None:
    from supervisor.core.state import Measured

    state = fresh_state()
    state.measured["big"] = Measured(vram_bytes=3 * GIB, load_s=2.5, tokens_per_s=42.0, at=NOW)
    publish(metrics, config, state)
    measured = value(
        metrics,
        "fleetd_model_vram_bytes",
        service="coder",
        rung="0",
        model="big",
        source="measured",
    )
    assert measured == 3 * GIB
    assert value(
        metrics, "fleetd_model_vram_bytes", service="coder", rung="0", model="big",
        source="estimated",
    ) is not None  # fmt: skip
    assert value(metrics, "fleetd_warmup_tokens_per_second", service="coder", model="big") == 42.0


def test_a_cordoned_gpu_is_a_gauge_with_its_reason(
    metrics: FleetMetrics, config: FleetConfig
) -> None:
    state = replace(fresh_state(), cordoned={0: Cordon(NOW, "Xid 79", "NVRM: Xid ...", "fleetd")})
    publish(metrics, config, state)
    assert value(metrics, "fleetd_gpu_cordoned", gpu="0", reason="Xid 79") == 1.0
    publish(metrics, config, fresh_state())  # uncordoned
    assert samples(metrics, "fleetd_gpu_cordoned") == {}
