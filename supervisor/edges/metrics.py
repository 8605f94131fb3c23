"""Prometheus metrics for fleetd: what the daemon counts, and its state at scrape time.

Two halves, on one registry of fleetd's own (never the client's global one):

- events the main loop reports as they happen (incidents, transitions, detection
  latency, log-follow lag), kept by prometheus-client's thread-safe counters;
- state rendered at scrape time from an immutable `FleetSnapshot` the main loop
  publishes after each change. The HTTP thread only ever reads the latest snapshot,
  never the daemon's mutable dicts.

`build_snapshot` is pure: config, state, GPU readings, rung needs and budgets in, a
frozen snapshot out. docs/observability.md lists every metric.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from threading import Thread
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from supervisor import __version__
from supervisor.core.address import format_address
from supervisor.core.config import FleetConfig
from supervisor.core.errors import FleetdError
from supervisor.core.gpus import Gpu
from supervisor.core.health import Breaker, Health, HealthStatus
from supervisor.core.rules import IncidentClass
from supervisor.core.rungs import measured_key
from supervisor.core.state import FleetState, ServiceStatus, Transition

# From a log line's timestamp to the main loop acting on it: milliseconds when idle,
# tens of milliseconds while another container floods (docs/benchmarks.md).
DETECTION_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class MetricsError(FleetdError):
    """The metrics endpoint cannot be served at the address asked for."""


class Direction(StrEnum):
    DOWN = "down"  # to a smaller model
    UP = "up"  # back towards the preferred model


class TransitionReason(StrEnum):
    """Why a service changed rung: a fixed set, so a label never carries free text."""

    VRAM_OOM = "vram_oom"  # repeated VRAM out-of-memory incidents (fleetd's step down)
    MANUAL = "manual"  # a person's fleetctl downgrade/upgrade
    STEP_UP = "step_up"  # fleetd stepping back up once it is safe
    RESET = "reset"  # fleetctl reset: back to the preferred rung


# The (direction, reason) pairs that can happen; each starts at 0 for every service, so
# `increase()` sees the first change (a series born at 1 shows no increase).
TRANSITION_KINDS = (
    (Direction.DOWN, TransitionReason.VRAM_OOM),
    (Direction.DOWN, TransitionReason.MANUAL),
    (Direction.UP, TransitionReason.MANUAL),
    (Direction.UP, TransitionReason.STEP_UP),
    (Direction.UP, TransitionReason.RESET),
)


def transition_kind(
    record: Transition, op: str | None = None
) -> tuple[Direction, TransitionReason] | None:
    """How a transition is counted; `op` is the fleetctl operation that asked for it, when
    known. None for a record that does not change rung."""
    if record.to_rung == record.from_rung:
        return None
    direction = Direction.DOWN if record.to_rung > record.from_rung else Direction.UP
    if record.actor == "fleetctl":
        reset = op == "reset" and direction is Direction.UP
        return direction, TransitionReason.RESET if reset else TransitionReason.MANUAL
    if direction is Direction.DOWN:
        return direction, TransitionReason.VRAM_OOM
    return direction, TransitionReason.STEP_UP


# --- the snapshot: what a scrape shows of the daemon's state -----------------------------


OPTION_LABELS = ("context", "parallel", "kv_cache", "tensor_parallel")


@dataclass(frozen=True)
class RungSnapshot:
    rung: int
    model: str
    need_bytes: int
    source: str  # "estimated" (declared or from metadata) or "measured"


@dataclass(frozen=True)
class ServiceSnapshot:
    name: str
    runtime: str
    model: str
    rung: int
    state: ServiceStatus
    changed_at: float | None
    recent_incidents: tuple[tuple[str, int], ...]  # (class, count inside the policy window)
    rungs: tuple[RungSnapshot, ...]
    watched: tuple[str, ...]  # containers whose logs are followed
    health: Health | None = None  # None: no health checks (no endpoint) or none yet
    warmup_tokens_per_s: float | None = None  # the current model's last warm-up
    served_name: str = ""  # the name clients call, on every rung
    # The running rung's options (context, parallel, kv_cache, tensor_parallel), as label
    # values: "" where the rung leaves it to the runtime.
    options: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class GpuSnapshot:
    index: int
    uuid: str  # "" when unknown (declared GPUs)
    total_bytes: int
    used_bytes: int | None  # None: not measured (declared GPU, or NVML could not tell)
    free_bytes: int | None
    budget_bytes: int | None


@dataclass(frozen=True)
class FleetSnapshot:
    published_at: float | None = None  # None: nothing published yet
    services: tuple[ServiceSnapshot, ...] = ()
    gpus: tuple[GpuSnapshot, ...] = ()
    incidents_to_step_down: int | None = None
    docker_up: bool | None = None  # None: not known yet
    cordoned: tuple[tuple[int, str], ...] = ()  # (GPU index, reason)


def build_snapshot(
    config: FleetConfig,
    state: FleetState,
    gpus: Sequence[Gpu],
    needs_bytes: Mapping[str, Sequence[int]],
    budgets_bytes: Mapping[int, int],
    now: float,
    docker_up: bool | None = None,
    health: Mapping[str, Health] | None = None,
) -> FleetSnapshot:
    """The state a scrape shows: services of the config that have a rung, and valid GPUs."""
    services = tuple(
        _service_snapshot(name, config, state, needs_bytes.get(name, ()), now, health or {})
        for name in config.services
        if name in state.services
    )
    return FleetSnapshot(
        published_at=now,
        services=services,
        gpus=tuple(_gpu_snapshot(g, budgets_bytes.get(g.index)) for g in gpus if g.valid),
        incidents_to_step_down=config.policy.incidents_to_step_down,
        docker_up=docker_up,
        cordoned=tuple((i, c.reason) for i, c in sorted(state.cordoned.items())),
    )


def _service_snapshot(
    name: str,
    config: FleetConfig,
    state: FleetState,
    needs: Sequence[int],
    now: float,
    health: Mapping[str, Health],
) -> ServiceSnapshot:
    svc, service = state.services[name], config.services[name]
    since = now - config.policy.incident_window
    recent = [i.incident_class for i in svc.incidents if i.time > since]
    rungs = [
        RungSnapshot(i, rung.model, need, "estimated")
        for i, (rung, need) in enumerate(zip(service.ladder, needs, strict=False))
    ]
    for i, rung in enumerate(service.ladder):  # what the runtime reported, beside the plan's
        seen = state.measured.get(measured_key(rung))
        if seen is not None and seen.vram_bytes:
            rungs.append(RungSnapshot(i, rung.model, seen.vram_bytes, "measured"))
    on = service.ladder[min(svc.rung, len(service.ladder) - 1)]
    current = state.measured.get(measured_key(on))
    return ServiceSnapshot(
        name=name,
        runtime=service.runtime.value,
        model=svc.model,
        rung=svc.rung,
        state=svc.state,
        changed_at=svc.changed_at,
        recent_incidents=tuple((str(c), recent.count(c)) for c in IncidentClass),
        rungs=tuple(rungs),
        watched=tuple(service.watched),
        health=health.get(name),
        warmup_tokens_per_s=current.tokens_per_s if current is not None else None,
        served_name=service.client_name,
        options=tuple((k, "" if v is None else str(v)) for k, v in on.options.items()),
    )


def _gpu_snapshot(gpu: Gpu, budget_bytes: int | None) -> GpuSnapshot:
    return GpuSnapshot(
        index=gpu.index,
        uuid=gpu.uuid or "",
        total_bytes=gpu.total_bytes,
        used_bytes=gpu.used_bytes,
        free_bytes=gpu.free_bytes,
        budget_bytes=budget_bytes,
    )


# --- rendering a snapshot ---------------------------------------------------------------


def snapshot_families(snapshot: FleetSnapshot) -> list[Metric]:
    """The metric families of one snapshot (every family, empty ones included)."""
    return [*_service_families(snapshot.services), *_gpu_families(snapshot), *_fleet(snapshot)]


def _service_families(services: Sequence[ServiceSnapshot]) -> Iterator[Metric]:
    info = InfoMetricFamily(
        "fleetd_service",
        "The rung a service runs now: its model, the rung's options (context, parallel, "
        "kv_cache, tensor_parallel; empty: the runtime's default) and the name clients "
        "call (one series per service, value 1).",
        labels=["service", "model", "runtime", "served_name", *OPTION_LABELS],
    )
    rung = GaugeMetricFamily(
        "fleetd_service_rung", "The service's rung on its ladder, from 0.", labels=["service"]
    )
    rungs = GaugeMetricFamily(
        "fleetd_service_ladder_rungs", "How many rungs the ladder has.", labels=["service"]
    )
    status = GaugeMetricFamily(
        "fleetd_service_state",
        "1 for the service's ladder state (steady, cooldown, exhausted, pinned), else 0.",
        labels=["service", "state"],
    )
    recent = GaugeMetricFamily(
        "fleetd_service_recent_incidents",
        "Incidents inside the policy window, by class (what counts toward a step down).",
        labels=["service", "class"],
    )
    changed = GaugeMetricFamily(
        "fleetd_service_last_change_timestamp_seconds",
        "When the service last changed rung (Unix time).",
        labels=["service"],
    )
    vram = GaugeMetricFamily(
        "fleetd_model_vram_bytes",
        "VRAM each rung's model needs: estimated (declared or from metadata) or measured.",
        labels=["service", "rung", "model", "source"],
    )
    healthy = GaugeMetricFamily(
        "fleetd_service_healthy",
        "1 when fleetd's health checks of the runtime API pass, 0 when the service is "
        "unhealthy (absent while unknown or unchecked).",
        labels=["service"],
    )
    breaker = GaugeMetricFamily(
        "fleetd_circuit_breaker_state",
        "1 for the restart circuit breaker's state (closed, open, half_open), else 0.",
        labels=["service", "state"],
    )
    warmup = GaugeMetricFamily(
        "fleetd_warmup_tokens_per_second",
        "Generation speed of the current model's last warm-up.",
        labels=["service", "model"],
    )
    for s in services:
        if s.health is not None:
            if s.health.status is not HealthStatus.UNKNOWN:
                healthy.add_metric(
                    [s.name], 1.0 if s.health.status is HealthStatus.HEALTHY else 0.0
                )
            for state in Breaker:
                breaker.add_metric([s.name, state.value], 1.0 if s.health.breaker is state else 0.0)
        if s.warmup_tokens_per_s is not None:
            warmup.add_metric([s.name, s.model], s.warmup_tokens_per_s)
        options = dict(s.options)
        info.add_metric(
            [
                s.name,
                s.model,
                s.runtime,
                s.served_name,
                *(options.get(o, "") for o in OPTION_LABELS),
            ],
            {},
        )
        rung.add_metric([s.name], s.rung)
        rungs.add_metric([s.name], len(s.rungs))
        for st in ServiceStatus:
            status.add_metric([s.name, st.value], 1.0 if s.state is st else 0.0)
        for incident_class, count in s.recent_incidents:
            recent.add_metric([s.name, incident_class], count)
        if s.changed_at is not None:
            changed.add_metric([s.name], s.changed_at)
        for r in s.rungs:
            vram.add_metric([s.name, str(r.rung), r.model, r.source], r.need_bytes)
    yield from (info, rung, rungs, status, recent, changed, vram, healthy, breaker, warmup)


def _gpu_families(snapshot: FleetSnapshot) -> Iterator[Metric]:
    labels = ["gpu", "uuid"]
    total = GaugeMetricFamily(
        "fleetd_gpu_memory_total_bytes", "GPU memory (NVML, or the declared size).", labels=labels
    )
    used = GaugeMetricFamily(
        "fleetd_gpu_memory_used_bytes", "GPU memory in use (NVML).", labels=labels
    )
    free = GaugeMetricFamily(
        "fleetd_gpu_memory_free_bytes", "GPU memory free (NVML).", labels=labels
    )
    budget = GaugeMetricFamily(
        "fleetd_gpu_budget_bytes",
        "VRAM fleetd may plan for on the GPU: budget ratio x total, minus others' processes.",
        labels=labels,
    )
    for g in snapshot.gpus:
        key = [str(g.index), g.uuid]
        total.add_metric(key, g.total_bytes)
        if g.used_bytes is not None:
            used.add_metric(key, g.used_bytes)
        if g.free_bytes is not None:
            free.add_metric(key, g.free_bytes)
        if g.budget_bytes is not None:
            budget.add_metric(key, g.budget_bytes)
    yield from (total, used, free, budget)


def _fleet(snapshot: FleetSnapshot) -> Iterator[Metric]:
    threshold = GaugeMetricFamily(
        "fleetd_policy_incidents_to_step_down",
        "VRAM incidents inside the window that step a service down (policy).",
    )
    docker_up = GaugeMetricFamily(
        "fleetd_docker_up", "1 when fleetd reaches the Docker engine, else 0."
    )
    published = GaugeMetricFamily(
        "fleetd_last_publish_timestamp_seconds",
        "When the main loop last published its state (Unix time); stale means it is stuck.",
    )
    if snapshot.incidents_to_step_down is not None:
        threshold.add_metric([], snapshot.incidents_to_step_down)
    if snapshot.docker_up is not None:
        docker_up.add_metric([], 1.0 if snapshot.docker_up else 0.0)
    if snapshot.published_at is not None:
        published.add_metric([], snapshot.published_at)
    cordoned = GaugeMetricFamily(
        "fleetd_gpu_cordoned",
        "1 for each GPU fleetd plans on no more (a fault, or fleetctl cordon), with why.",
        labels=["gpu", "reason"],
    )
    for index, reason in snapshot.cordoned:
        cordoned.add_metric([str(index), reason], 1.0)
    yield from (threshold, docker_up, published, cordoned)


class _SnapshotCollector(Collector):
    """Renders the latest published snapshot; swapping the reference is the only sharing."""

    def __init__(self) -> None:
        self.snapshot = FleetSnapshot()

    def collect(self) -> Iterable[Metric]:
        return snapshot_families(self.snapshot)

    def describe(self) -> Iterable[Metric]:
        return snapshot_families(FleetSnapshot())


# --- the metrics object the daemon holds ------------------------------------------------


class FleetMetrics:
    """fleetd's registry: event methods for the main loop, `publish` for its state."""

    def __init__(self) -> None:
        # Counters' `_created` series double the output and Prometheus ignores them in the
        # text format; the switch is process-wide, and fleetd is the only user here.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        self._incidents = Counter(
            "fleetd_incidents",
            "Incidents detected (a burst of lines counts once), by class.",
            ["service", "class"],
            registry=self.registry,
        )
        self._transitions = Counter(
            "fleetd_transitions",
            "Rung changes applied, by direction and reason.",
            ["service", "direction", "reason"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "fleetd_detection_latency_seconds",
            "From an incident's first log line (Docker's timestamp) to fleetd handling it.",
            ["service"],
            buckets=DETECTION_BUCKETS_S,
            registry=self.registry,
        )
        self._follow_lag = Gauge(
            "fleetd_log_follow_lag_seconds",
            "How far behind the log follower is: now minus the newest line's timestamp.",
            ["container"],
            registry=self.registry,
        )
        Info("fleetd_build", "fleetd's version.", registry=self.registry).info(
            {"version": __version__}
        )
        self._state = _SnapshotCollector()
        self.registry.register(self._state)
        self._lagging: set[str] = set()  # containers with a follow-lag series
        self._server: WSGIServer | None = None
        self._thread: Thread | None = None

    # events, from the main loop

    def incident(self, service: str, incident_class: str) -> None:
        self._incidents.labels(service, IncidentClass(incident_class).value).inc()

    def transition(self, service: str, direction: Direction, reason: TransitionReason) -> None:
        if (direction, reason) not in TRANSITION_KINDS:
            raise ValueError(f"no transition {direction.value} for reason {reason.value}")
        self._transitions.labels(service, direction.value, reason.value).inc()

    def detection_latency(self, service: str, seconds: float) -> None:
        self._latency.labels(service).observe(max(0.0, seconds))

    def follow_lag(self, container: str, seconds: float) -> None:
        self._follow_lag.labels(container).set(max(0.0, seconds))
        self._lagging.add(container)

    # state

    def publish(self, snapshot: FleetSnapshot) -> None:
        """Show this snapshot from now on; known services' counters start at 0."""
        watched: set[str] = set()
        for s in snapshot.services:
            for incident_class in IncidentClass:
                self._incidents.labels(s.name, incident_class.value)
            for direction, reason in TRANSITION_KINDS:
                self._transitions.labels(s.name, direction.value, reason.value)
            self._latency.labels(s.name)
            watched.update(s.watched)
        for container in self._lagging - watched:  # no longer followed: drop its last value
            self._follow_lag.remove(container)
        self._lagging &= watched
        self._state.snapshot = snapshot

    @property
    def snapshot(self) -> FleetSnapshot:
        return self._state.snapshot

    def render(self) -> str:
        """The text exposition a scrape gets."""
        return generate_latest(self.registry).decode("utf-8")

    # the HTTP endpoint

    def serve(self, host: str, port: int) -> tuple[str, int]:
        """Serve /metrics from a daemon thread; returns the bound (host, port)."""
        if self._server is not None:
            raise MetricsError("the metrics endpoint is already being served")
        address = format_address(host, port)
        try:
            self._server, self._thread = start_http_server(port, host, registry=self.registry)
        except OSError as e:
            raise MetricsError(f"cannot serve metrics on {address}: {_why(e)}") from e
        bound = self.bound_address
        assert bound is not None
        return bound

    @property
    def bound_address(self) -> tuple[str, int] | None:
        """The listening socket's (host, port), or None when not serving."""
        if self._server is None:
            return None
        name = self._server.socket.getsockname()
        return str(name[0]), int(name[1])

    def close(self) -> None:
        """Stop serving (a scrape in flight finishes) and free the port."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()


def _why(error: OSError) -> str:
    """An OSError from binding, in words a person can act on (decided by errno)."""
    if error.errno == errno.EADDRINUSE:
        return (
            "the port is already in use (another fleetd, or an exporter?); "
            "choose another with `metrics.address` or `fleetd run --metrics-address`"
        )
    if error.errno == errno.EADDRNOTAVAIL:
        return "this host has no such address"
    if error.errno == errno.EACCES:
        return "permission denied (ports below 1024 need privileges)"
    return str(error.strerror or error)
