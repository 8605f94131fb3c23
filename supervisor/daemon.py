"""`fleetd run`: follow the logs, count incidents, step services down, restart containers.

One main loop owns the config and the state; follower threads, the event watcher, the
scheduler's jobs and the workers that restart containers only put records on its queue.
Signal handlers only set flags the loop reads.
"""

from __future__ import annotations

import collections
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType

import docker
from apscheduler.events import EVENT_JOB_ERROR, JobExecutionEvent
from apscheduler.schedulers.background import BackgroundScheduler
from loguru import logger

from supervisor import __version__, ops
from supervisor.address import format_address
from supervisor.analyzer import FleetPlan, analyze, gpu_budget_bytes, service_needs
from supervisor.config import FleetConfig, ServiceConfig, load_config
from supervisor.control import Call, ControlServer
from supervisor.detector import Detector, compile_rule
from supervisor.errors import FleetdError, UsageError
from supervisor.gpus import Discovery, Gpu, Nvml, declared_gpus, resolve_gpus
from supervisor.handoff import restart_service, write_handoff
from supervisor.health import Health, observe
from supervisor.ladder import (
    HOST_OOM,
    VRAM_OOM,
    Action,
    BurstGrouper,
    Decision,
    Observed,
    Policy,
    apply_change,
    end_cooldown,
    end_probation,
    load_failed,
    step_up,
    step_up_due,
    transition,
)
from supervisor.lifecycle import ModelChange, Settled, endpoint_of
from supervisor.managed import container_names, managed_pids
from supervisor.metrics import FleetMetrics, build_snapshot, transition_kind
from supervisor.rules import BUILTIN_RULES
from supervisor.runtime_api import OllamaApi, RuntimeApiError, api_for, ollama_name
from supervisor.sdnotify import Notifier
from supervisor.state import (
    FleetState,
    LogCursor,
    ServiceState,
    ServiceStatus,
    StateStore,
    transition_json,
)
from supervisor.units import format_duration, format_size
from supervisor.watch import (
    DOCKER_ERRORS,
    ContainerEvent,
    EventsEnded,
    EventWatcher,
    FollowerEnded,
    LogFollower,
    LogLine,
    parse_docker_time_ns,
)

RECONCILE_S = 5.0
GPU_SAMPLE_S = 30.0
FIRST_READ_MARGIN_NS = 2_000_000_000
CHECKPOINT_S = 5.0
MAX_BACKOFF_S = 300.0


@dataclass(frozen=True)
class Tick:
    job: str


@dataclass(frozen=True)
class Applied:
    service: str
    error: str | None


@dataclass(frozen=True)
class Progress:
    """A step of a change in flight (a pull's progress, a warm-up), for status and the log."""

    service: str
    text: str


@dataclass(frozen=True)
class SettleDone:
    """A change's settle result, with the abort event that identifies that change."""

    result: Settled
    abort: threading.Event


@dataclass(frozen=True)
class MemberWarmed:
    """An ensemble member loaded and warmed up on a person's or an app's request."""

    call: Call
    result: Settled


@dataclass(frozen=True)
class HealthChecked:
    service: str
    ok: bool
    error: str | None


STEP_UP_CHECK_S = 60.0
MAX_RETRY_S = 300.0


class Daemon:
    def __init__(
        self,
        config_path: Path,
        state_dir: Path,
        docker_factory: Callable[[], docker.DockerClient] = lambda: docker.from_env(),
        clock: Callable[[], float] = time.time,
        nvml: Nvml | None = None,
        socket_path: Path | None = None,
        socket_gid: int | None = None,
        metrics_address: tuple[str, int] | None = None,
        serve_metrics: bool = True,
    ) -> None:
        """`metrics_address` overrides the config's `metrics` (and serves even when it is
        disabled); `serve_metrics=False` serves none whatever the config says."""
        self.config_path, self.clock = config_path, clock
        self.queue: queue.Queue[object] = queue.Queue()
        self.control = (
            ControlServer(socket_path, self.queue.put, socket_gid) if socket_path else None
        )
        # service -> calls waiting for its restart, with what each asked for
        self.waiters: dict[str, list[tuple[Call, str]]] = {}
        self.settling: dict[str, threading.Event] = {}  # service -> set on an OOM while loading
        self.activity: dict[str, str] = {}  # service -> what its change is doing now
        self.health: dict[str, Health] = {}
        self.checking: set[str] = set()  # services with a health check in flight
        self.retry_at: dict[str, tuple[float, float]] = {}  # service -> (when, backoff s)
        self.step_up_notes: dict[str, str] = {}  # why a due step up was not made (said once)
        self.scheduler: BackgroundScheduler | None = None
        self.started_at = clock()
        self.store = StateStore(state_dir, clock=clock)
        self.docker_factory = docker_factory
        self.nvml = nvml or Nvml()
        self.notifier = Notifier()
        self.client: docker.DockerClient | None = None
        self.followers: dict[str, LogFollower] = {}
        self.events: EventWatcher | None = None
        self.busy: set[str] = set()  # services with a restart in flight
        self.expected_stops: dict[str, float] = {}  # container -> until when a stop is ours
        # container -> stamps of the matched lines handled lately: an old and a new follower
        # of one container may both deliver a line (dropped once), while lines stamped out of
        # order across stdout and stderr must all count
        self.seen_ns: dict[str, RecentStamps] = {}
        self.gpus: tuple[Gpu, ...] = ()  # the latest NVML reading
        self.managed: frozenset[int] = frozenset()  # host pids of the fleet's containers
        self.gpu_problems: dict[int, str | None] = {}
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._docker_retry_at = 0.0
        self._docker_backoff_s = 1.0
        self.config: FleetConfig = load_config(config_path)  # invalid: fail before anything
        self._index(self.config)
        self.state = FleetState()
        self.metrics = FleetMetrics()
        self.metrics_at = self._metrics_address(metrics_address, serve_metrics)

    def _metrics_address(
        self, override: tuple[str, int] | None, serve: bool
    ) -> tuple[str, int] | None:
        """Where to serve /metrics: the command line's address, else the config's."""
        if not serve:
            return None
        if override is not None:
            return override
        metrics = self.config.metrics
        return (metrics.host, metrics.port) if metrics.enabled else None

    # --- start-up -------------------------------------------------------------------

    def _index(self, config: FleetConfig) -> None:
        """Per-service lookups derived from a config (needs, detectors, container owners)."""
        self.needs = _needs(config, getattr(self, "state", None))
        self.detectors = {name: _detector(svc) for name, svc in config.services.items()}
        self.watched = {c: name for name, svc in config.services.items() for c in svc.watched}
        self.policy = Policy.from_config(config.policy)
        # The grouper outlives reloads: a burst that spans a SIGHUP stays one incident.
        grouper: BurstGrouper | None = getattr(self, "grouper", None)
        if grouper is None or grouper.window_s != config.policy.burst_window:
            self.grouper = BurstGrouper(config.policy.burst_window, grouper)

    def start(self) -> None:
        """Load the state, settle every service on a rung and hand off its model."""
        with self.store.lock():
            loaded = self.store.load()
            for note in loaded.notes:  # a missing file is normal on the first start
                logger.log(
                    "INFO" if note.startswith("no state yet") else "WARNING", f"state: {note}"
                )
            self.state = loaded.state
            self._reprice()
            self._seed_grouper()
        # Docker first, so the plan can tell the fleet's own GPU processes from others';
        # followers only queue lines, which the loop handles once `run` starts.
        self._connect_docker()
        with self.store.lock():
            self._settle(self._initial_plan())
            self.store.save(self.state)
        self._publish()
        for name, svc in list(self.state.services.items()):
            if svc.pending is not None and name in self.config.services:
                logger.warning(f"{name}: completing a change interrupted by a restart of fleetd")
                self._apply(name)

    def _seed_grouper(self) -> None:
        """Bursts recorded before a restart of fleetd stay one incident after it."""
        names = {c.container_id: name for name, c in self.state.log_cursors.items()}
        for svc in self.state.services.values():
            for incident in svc.incidents:
                container = names.get(incident.container_id or "")
                if container is not None:
                    self.grouper.seed(container, incident.incident_class, incident.time)

    def _initial_plan(self) -> FleetPlan | None:
        discovery = self._discover()
        if discovery.problem:
            logger.info(discovery.problem)
        if self.config.gpus == "auto":
            self.gpus = discovery.gpus  # the metrics' first reading, before the sampling
        if not discovery.gpus:
            return None
        pids = managed_pids(self.client, container_names(self.config)) if self.client else None
        self.managed = pids or frozenset()
        return analyze(self.config, discovery, self.managed)

    def _settle(self, plan: FleetPlan | None) -> None:
        """Persisted rung, else the plan's, else the top; write every model file."""
        for name, svc in self.config.services.items():
            current = self.state.services.get(name)
            if current is None or current.rung >= len(svc.ladder):
                planned = plan.services[name].rung if plan is not None else None
                rung = planned if planned is not None else 0
                current = ServiceState(model=svc.ladder[rung].model, rung=rung)
                logger.info(f"{name}: starting at rung {rung} ({current.model})")
            elif current.model != svc.ladder[current.rung].model:
                current = replace(current, model=svc.ladder[current.rung].model)
            self.state.services[name] = current
            self.store.write_model_file(name, current.model)
        for name in set(self.state.services) - set(self.config.services):
            logger.info(f"{name}: no longer in the config; its state is kept")

    # --- the main loop ------------------------------------------------------------------

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the exit status."""
        self._install_signals()
        lock_fd = self.store.hold_daemon_lock(self.control.path if self.control else None)
        try:
            if self.control is not None:  # before start: a socket in use fails fast
                self.control.start()
            self._serve_metrics()  # also before start: a taken port fails fast
            return self._run()
        finally:
            self.metrics.close()
            if self.control is not None:
                self.control.stop()
            os.close(lock_fd)

    def _serve_metrics(self) -> None:
        if self.metrics_at is None:
            logger.info("metrics: not served (disabled)")
            return
        host, port = self.metrics.serve(*self.metrics_at)
        logger.info(f"metrics: serving http://{format_address(host, port)}/metrics")

    def _run(self) -> int:
        self.start()
        scheduler = self._scheduler()
        scheduler.start()
        self.notifier.send("READY=1", f"STATUS={self.summary()}")
        where = f"; control socket {self.control.path}" if self.control else ""
        logger.info(f"fleetd running: {self.summary()}{where}")
        next_ping = 0.0
        try:
            while not self._stop.is_set():
                if self._reload.is_set():
                    self._reload.clear()
                    self.reload()
                self._step(timeout_s=0.5)
                if self.notifier.watchdog_s and time.monotonic() >= next_ping:
                    self.notifier.send("WATCHDOG=1")
                    next_ping = time.monotonic() + self.notifier.watchdog_s
        finally:
            self.notifier.send("STOPPING=1")
            scheduler.shutdown(wait=False)
            self.shutdown()
        return 0

    def _step(self, timeout_s: float) -> None:
        try:
            item = self.queue.get(timeout=timeout_s)
        except queue.Empty:
            return
        try:
            self._handle(item)
        except (FleetdError, *DOCKER_ERRORS) as e:  # one bad record never stops the loop
            logger.error(f"while handling {type(item).__name__}: {e}")
        except Exception:  # a bug: report it with its traceback, keep supervising
            logger.exception(f"BUG while handling {type(item).__name__}; please report it")

    def _handle(self, item: object) -> None:
        if isinstance(item, LogLine):
            self._on_line(item)
        elif isinstance(item, ContainerEvent):
            self._on_event(item)
        elif isinstance(item, Applied):
            self._on_applied(item)
        elif isinstance(item, FollowerEnded):
            follower = self.followers.get(item.container)
            if follower is not None and follower.container_id == item.container_id:
                self._remember_cursor(follower)
                del self.followers[item.container]
        elif isinstance(item, EventsEnded):
            logger.warning(f"Docker event stream ended ({item.error}); reconnecting")
            self.events = None
            self.client = None
        elif isinstance(item, Tick):
            self._on_tick(item.job)
        elif isinstance(item, Call):
            self._on_call(item)
        elif isinstance(item, Progress):
            self.activity[item.service] = item.text
            logger.info(f"{item.service}: {item.text}")
        elif isinstance(item, SettleDone):
            self._on_settled(item.result, item.abort)
        elif isinstance(item, HealthChecked):
            self._on_health(item)
        elif isinstance(item, MemberWarmed):
            self._on_member_warmed(item)

    def drain(self, timeout_s: float = 0.0) -> None:
        """Handle everything queued (tests and shutdown)."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._step(timeout_s=max(0.0, deadline - time.monotonic()) or 0.01)
            if self.queue.empty() and time.monotonic() >= deadline:
                return

    # --- logs and incidents ---------------------------------------------------------------

    def _on_line(self, line: LogLine) -> None:
        service = self.watched.get(line.container)
        if service is None:
            return
        if not self.seen_ns.setdefault(line.container, RecentStamps()).add(line.time_ns):
            return  # already handled (a new follower re-reads a little)
        match = line.match
        at = line.time_ns / 1e9
        kind = str(match.rule.incident_class)
        if not self.grouper.opens_incident(line.container, kind, at, line.run_ns or None):
            return
        # The cursor goes into the same atomic write as the incident, so a kill -9 right
        # after it never re-reads (and re-counts) this burst.
        self.state.log_cursors[line.container] = LogCursor(line.container_id, line.time_ns)
        seen = Observed(at, kind, match.rule.id, line.container, line.container_id, line.text)
        self._incident(service, seen)

    def _incident(self, service: str, seen: Observed) -> None:
        loading = self.settling.get(service)
        if loading is not None and seen.incident_class == VRAM_OOM:
            loading.set()  # the new model does not fit: its settle ends now
        svc = self.state.services[service]
        new, decision = transition(
            svc, seen, self.config.services[service], self.needs[service], self.policy
        )
        self.state.services[service] = new
        latency_ms = (self.clock() - seen.time) * 1000
        self.metrics.incident(service, seen.incident_class)
        self.metrics.detection_latency(service, latency_ms / 1000)
        logger.log(
            _level(decision),
            f"{service}: {seen.incident_class} incident ({seen.rule}) in "
            f"{seen.container}: {decision.reason} | evidence: {seen.evidence.strip()} "
            f"| detected {latency_ms:.0f} ms after the line",
        )
        if new is not svc:
            self._save()
        if decision.action is Action.STEP_DOWN:
            self._apply(service)
        elif decision.action is Action.EXHAUSTED:
            logger.critical(
                f"{service}: EXHAUSTED at rung {new.rung} ({new.model}): no smaller model "
                "left; stopping its containers so they do not crash-loop (kept for inspection)"
            )
            self._stop_containers(service)
        elif decision.action is Action.RESTART:
            self._restart_with_backoff(service)

    def _on_event(self, event: ContainerEvent) -> None:
        service = self.watched.get(event.container)
        if service is None:
            return
        if event.action == "start":
            self._follow(event.container, event.container_id, event.time_ns)
        elif event.action == "oom" or (event.action == "die" and event.exit_code == 137):
            if self.expected_stops.get(event.container, 0.0) > self.clock():
                return  # our own stop timing out, not a RAM kill
            rule = "docker.oom_event" if event.action == "oom" else "docker.exit_137"
            text = f"container {event.container} {event.action} (exit {event.exit_code})"
            self._incident(
                service,
                Observed(
                    event.time_ns / 1e9, HOST_OOM, rule, event.container, event.container_id, text
                ),
            )

    # --- applying changes -------------------------------------------------------------------

    def _apply(self, service: str) -> None:
        """Hand off the pending model and restart the service's containers, off the loop."""
        if service in self.busy:
            return
        svc = self.state.services[service]
        pending = svc.pending
        assert pending is not None
        if pending.gpu is None:  # the record shows what the GPUs held when it was made
            pending = replace(pending, gpu=self._gpu_reading())
            svc = self.state.services[service] = replace(svc, pending=pending)
        warning = write_handoff(self.store, self.config, service, pending.to_model)
        if warning:
            logger.warning(warning)
        self._start_worker(service, svc.model, pending.to_model)

    def _start_worker(self, service: str, old: str, model: str) -> None:
        """Prepare (pull, unload), restart, then settle (health, warm-up), off the loop.

        A restart that keeps the model (a GPU fault, failed health checks) only restarts:
        the health checks, not a settle, judge whether it helped."""
        self.busy.add(service)
        abort = threading.Event()  # identifies this change's settle too
        change = (
            ModelChange.for_service(self.config, service, self._reporter(service), abort)
            if old != model
            else None
        )
        if change is not None:
            self.settling[service] = abort
        threading.Thread(
            target=self._restart_worker,
            args=(service, self.config, old, model, change, abort),
            name=f"apply-{service}",
            daemon=True,
        ).start()

    def _restart_worker(
        self,
        service: str,
        config: FleetConfig,
        old: str,
        model: str,
        change: ModelChange | None,
        abort: threading.Event,
    ) -> None:
        error = None
        try:
            client = self.client
            if client is None:
                raise FleetdError("Docker is not reachable; the change applies when it is")
            if change is not None:
                change.prepare(old, model)
            restart_service(client, config, service, model, self._expect_stop)
        except (FleetdError, *DOCKER_ERRORS) as e:
            error = str(e)
        self.queue.put(Applied(service, error))
        if error is None and change is not None:
            self.queue.put(SettleDone(change.settle(model), abort))

    def _expect_stop(self, container: str, seconds: float) -> None:
        self.expected_stops[container] = self.clock() + seconds

    def _on_applied(self, done: Applied) -> None:
        self.busy.discard(done.service)
        if done.error is not None:
            self.settling.pop(done.service, None)  # this change's: it never got to settle
            self.activity.pop(done.service, None)
        svc = self.state.services.get(done.service)
        if svc is None or svc.pending is None:
            if done.error is not None:
                logger.error(f"{done.service}: restart failed: {done.error}")
            return
        waiting = self.waiters.pop(done.service, [])
        if done.error is not None:
            _, backoff = self.retry_at.get(done.service, (0.0, RECONCILE_S / 2))
            backoff = min(MAX_RETRY_S, backoff * 2)
            self.retry_at[done.service] = (time.monotonic() + backoff, backoff)
            message = f"{done.service}: could not apply {svc.pending.to_model}: {done.error}"
            logger.error(f"{message}; will retry in {backoff:.0f} s")
            for call, _ in waiting:
                call.fail("failed", f"{message}; the change is recorded and fleetd retries it")
            return
        self.retry_at.pop(done.service, None)
        new, record = apply_change(svc, done.service, self.clock())
        self.state.services[done.service] = new
        self.state.history.append(record)
        kind = transition_kind(record, waiting[0][0].op if waiting else None)
        if kind is not None:
            self.metrics.transition(done.service, *kind)
        self._save()
        logger.warning(
            f"{done.service}: now rung {record.to_rung} ({record.to_model}), was "
            f"rung {record.from_rung} ({record.from_model}): {record.reason}"
            + (f" | gpu: {record.gpu}" if record.gpu else "")
        )
        restarted = ", ".join(self.config.services[done.service].restarted)
        for call, asked in waiting:
            message = f"{asked}; restarted {restarted}"
            call.answer(
                200,
                {
                    "service": done.service,
                    "message": message,
                    "transition": transition_json(record),
                },
            )

    def _stop_containers(self, service: str) -> None:
        """Stop (not remove) a service's containers: Docker never restarts a manual stop."""
        client, names = self.client, self.config.services[service].restarted
        stop_s = self.config.policy.stop_timeout
        if client is None:
            return
        for name in names:
            self.expected_stops[name] = self.clock() + stop_s + 5

        def stop_all() -> None:
            for name in names:
                try:
                    client.containers.get(name).stop(timeout=int(stop_s))
                except DOCKER_ERRORS as e:
                    logger.error(f"{service}: could not stop {name}: {e}")

        threading.Thread(target=stop_all, name=f"stop-{service}", daemon=True).start()

    def _restart_with_backoff(self, service: str) -> None:
        svc = self.state.services[service]
        wait_s = min(MAX_BACKOFF_S, 2.0**svc.restarts)
        if svc.last_restart_at is not None and self.clock() < svc.last_restart_at + wait_s:
            logger.warning(f"{service}: restart held back ({wait_s:.0f} s backoff)")
            return
        self.state.services[service] = replace(
            svc, restarts=svc.restarts + 1, last_restart_at=self.clock()
        )
        self._save()
        if service not in self.busy:
            self._start_worker(service, svc.model, svc.model)

    # --- the control API (calls come from the socket's threads through the queue) ---------

    def _on_call(self, call: Call) -> None:
        try:
            self._answer(call)
        except ops.Refused as e:
            call.fail("refused", str(e))
        except UsageError as e:
            call.fail("usage", str(e))
        except FleetdError as e:
            call.fail("failed", str(e))
        except Exception as e:  # a bug: the caller gets an answer, the log the traceback
            logger.exception(f"BUG while answering {call.op}; please report it")
            call.fail("failed", f"internal error: {e!r}")

    def _answer(self, call: Call) -> None:
        from supervisor.cli.views import gpus_json, status_json

        if call.op == "status":
            report = status_json(self.state, self.config, self.clock(), call.service)
            for name, row in report["services"].items():
                health = self.health.get(name)
                row["health"] = health.to_json() if health is not None else None
                row["activity"] = self.activity.get(name)
            discovery = self._discover()
            report["gpus"] = gpus_json(discovery, self.config)
            report["daemon"] = {
                "pid": os.getpid(),
                "version": __version__,
                "started_at": self.started_at,
                "config": str(self.config_path),
                "docker": self.client is not None,
            }
            call.answer(200, report)
        elif call.op == "history":
            records = [t for t in self.state.history if call.service in (None, t.service)]
            call.answer(200, [transition_json(t) for t in records])
        elif call.op == "reload":
            call.answer(200, {"message": self.apply_config()})
        elif call.op == "warm":
            self._warm_member(call)
        else:
            self._operate(call)

    def _operate(self, call: Call) -> None:
        name, now = call.service or "", self.clock()
        if name in self.busy:
            raise ops.Refused(f"a change of {name} is being applied; try again in a few seconds")
        who = f"with fleetctl by {call.peer.who}"
        force = call.args.get("force") is True
        if call.op == "reset":
            outcome = ops.reset(self.state, self.config, name, now, who)
        elif call.op == "downgrade":
            outcome = ops.downgrade(self.state, self.config, name, now, who)
        elif call.op == "upgrade":
            outcome = ops.upgrade(self.state, self.config, name, now, who, self._fit, force)
        elif call.op == "pin":
            rung = str(call.args.get("rung", ""))
            outcome = ops.pin(self.state, self.config, name, rung, now, who, self._fit, force)
        else:
            outcome = ops.unpin(self.state, self.config, name, now, who)
        self._save()
        logger.warning(f"{outcome.message} ({call.op} {who})")
        if outcome.change is None:
            call.answer(200, outcome.to_json())
            return
        self.waiters.setdefault(name, []).append((call, outcome.message))
        self._apply(name)

    def _fit(self, service: str, rung: int) -> ops.Fit:
        pids = managed_pids(self.client, container_names(self.config)) if self.client else None
        return ops.check_fit(
            self.config, self.state, service, rung, self._discover(), pids or frozenset()
        )

    def _discover(self) -> Discovery:
        try:
            return resolve_gpus(self.config, (), self.nvml)
        except FleetdError as e:
            return Discovery(gpus=(), problem=str(e))

    # --- Docker connection, followers, periodic jobs --------------------------------------

    def _connect_docker(self) -> None:
        if self.client is not None or time.monotonic() < self._docker_retry_at:
            return
        try:
            client = self.docker_factory()
            client.ping()
        except DOCKER_ERRORS as e:
            logger.warning(
                f"Docker is not reachable ({e}); next try in at least "
                f"{self._docker_backoff_s:.0f} s"
            )
            self._docker_retry_at = time.monotonic() + self._docker_backoff_s
            self._docker_backoff_s = min(60.0, self._docker_backoff_s * 2)
            return
        self.client, self._docker_backoff_s = client, 1.0
        self.events = EventWatcher(client, self.clock(), self.queue)
        self.events.start()
        self._attach_all()

    def _attach_all(self) -> None:
        client = self.client
        if client is None:
            return
        for name in self.watched:
            if name in self.followers and self.followers[name].is_alive():
                continue
            try:
                container = client.containers.get(name)
            except DOCKER_ERRORS:
                continue  # not created yet: its start event attaches it
            if container.status == "running":
                self._follow(name, container.id, None)

    def _follow(self, name: str, container_id: str, started_ns: int | None) -> None:
        old = self.followers.get(name)
        same_run = old is not None and (started_ns is None or old.run_ns >= started_ns)
        if old is not None and old.is_alive() and old.container_id == container_id and same_run:
            return
        if self.client is None:
            return
        # Read from where we left off (the old follower's stream ends with its run; the
        # main loop drops what both read); a container never seen is read from its start
        # event, or from now when fleetd meets it already running.
        cursor = self.state.log_cursors.get(name)
        known = max(cursor.since_ns if cursor else 0, old.since_ns if old else 0)
        # Docker stamps a fast process's first lines a few ms before its start event, so a
        # container never read before is read from a little earlier (nothing of it can
        # have been counted yet).
        since = known or (started_ns - FIRST_READ_MARGIN_NS if started_ns else 0)
        since = since or int(self.clock() * 1e9)
        run_ns = started_ns or self._started_ns(name)
        detector = self.detectors[self.watched[name]]
        follower = LogFollower(
            self.client, name, container_id, since, self.queue, run_ns, detector.classify
        )
        self.followers[name] = follower
        follower.start()

    def _started_ns(self, name: str) -> int:
        try:
            assert self.client is not None
            started = self.client.containers.get(name).attrs["State"]["StartedAt"]
            return parse_docker_time_ns(started)
        except (KeyError, ValueError, *DOCKER_ERRORS):
            return 0

    def _remember_cursor(self, follower: LogFollower) -> None:
        self.state.log_cursors[follower.container] = LogCursor(
            follower.container_id, follower.since_ns
        )

    def _on_tick(self, job: str) -> None:
        if job == "reconcile":
            self._connect_docker()
            self._attach_all()
            for name, svc in self.state.services.items():
                svc = end_probation(end_cooldown(svc, self.clock(), self.policy), self.clock())
                self.state.services[name] = svc
                retry_at, _ = self.retry_at.get(name, (0.0, 0.0))
                due = time.monotonic() >= retry_at  # after a failure, back off
                if svc.pending is not None and name in self.config.services and due:
                    self._apply(name)
            self._publish()
        elif job.startswith("health:"):
            self._check_health(job.removeprefix("health:"))
        elif job in ("step_up", "step_up_window"):
            self._try_step_up(window_open=job == "step_up_window")
        elif job == "gpus":
            self._sample_gpus()
            self._publish()
        elif job == "checkpoint":
            for name, follower in self.followers.items():
                self._remember_cursor(follower)
                if follower.lag_s is not None:
                    self.metrics.follow_lag(name, follower.lag_s)
            self._save()
            self.notifier.send(f"STATUS={self.summary()}")

    def _sample_gpus(self) -> None:
        """Read NVML; a GPU lost or found again is reported once, never a crash."""
        if self.config.gpus != "auto":
            return
        discovery = self.nvml.discover()
        problems = {g.index: g.error for g in discovery.gpus if not g.valid}
        if discovery.problem:
            problems[-1] = discovery.problem
        for index, error in problems.items():
            if self.gpu_problems.get(index) != error:
                logger.error(f"GPU {index if index >= 0 else '(all)'}: {error}")
        for index in set(self.gpu_problems) - set(problems):
            logger.warning(f"GPU {index if index >= 0 else '(all)'} is back")
        self.gpu_problems, self.gpus = problems, discovery.gpus
        if self.client is not None and any(g.valid for g in discovery.gpus):
            self.managed = managed_pids(self.client, container_names(self.config))

    def _scheduler(self) -> BackgroundScheduler:
        scheduler = BackgroundScheduler(daemon=True)
        jobs = (("reconcile", RECONCILE_S), ("checkpoint", CHECKPOINT_S), ("gpus", GPU_SAMPLE_S))
        for job, every_s in jobs:
            scheduler.add_job(
                self.queue.put,
                "interval",
                args=[Tick(job)],
                seconds=every_s,
                id=job,
                coalesce=True,
                max_instances=1,
            )
        scheduler.add_listener(_log_job_error, EVENT_JOB_ERROR)
        self.scheduler = scheduler
        self._schedule_config_jobs()
        return scheduler

    def _schedule_config_jobs(self) -> None:
        """The jobs the config defines: health checks per service, the step-up window."""
        scheduler = self.scheduler
        if scheduler is None:
            return
        for job in scheduler.get_jobs():
            if job.id.startswith("health:") or job.id in ("step_up", "step_up_window"):
                job.remove()
        # Often enough to step up within a tenth of the wait (a minute for the default day).
        every_s = min(STEP_UP_CHECK_S, max(1.0, self.config.policy.step_up_after / 10))
        scheduler.add_job(
            self.queue.put, "interval", args=[Tick("step_up")], seconds=every_s,
            id="step_up", coalesce=True, max_instances=1,
        )  # fmt: skip
        for name, svc in self.config.services.items():
            if svc.health.enabled and endpoint_of(self.config, name) is not None:
                scheduler.add_job(
                    self.queue.put, "interval", args=[Tick(f"health:{name}")],
                    seconds=svc.health.interval, id=f"health:{name}", coalesce=True,
                    max_instances=1,
                )  # fmt: skip
        if self.config.policy.step_up_at:
            from apscheduler.triggers.cron import CronTrigger

            trigger = CronTrigger.from_crontab(self.config.policy.step_up_at, timezone="UTC")
            scheduler.add_job(
                self.queue.put, trigger, args=[Tick("step_up_window")], id="step_up_window",
                coalesce=True, max_instances=1,
            )  # fmt: skip

    # --- model lifecycle: settling a change, health checks, stepping back up ---------------

    def _on_settled(self, done: Settled, abort: threading.Event) -> None:
        if self.settling.get(done.service) is not abort:
            logger.debug(f"{done.service}: a newer change replaced {done.model}'s settle")
            return
        del self.settling[done.service]
        self.activity.pop(done.service, None)
        if done.ok:
            self._record_measured(done)
            logger.info(f"{done.service}: {done.model} {done.detail}{self._vram_note(done)}")
            return
        svc = self.state.services.get(done.service)
        if not done.oom or svc is None or done.service not in self.config.services:
            logger.error(f"{done.service}: {done.model} did not become ready: {done.detail}")
            self.activity[done.service] = f"not ready: {done.detail}"
            return
        if svc.pending is not None or done.service in self.busy or svc.model != done.model:
            return  # the OOM already moved it (probation), or a change is on its way
        new, decision = load_failed(
            svc, self.config.services[done.service], self.needs[done.service], self.clock()
        )
        self.state.services[done.service] = new
        self._save()
        logger.log(_level(decision), f"{done.service}: {decision.reason}")
        if decision.action is Action.STEP_DOWN:
            self._apply(done.service)
        elif decision.action is Action.EXHAUSTED:
            self._stop_containers(done.service)

    def _gpu_reading(self) -> str | None:
        """NVML's reading of every GPU now, in one line (None for declared GPUs)."""
        if self.config.gpus != "auto":
            return None
        readings = []
        for gpu in self.nvml.discover().gpus:
            if not gpu.valid or gpu.used_bytes is None:
                continue
            budget = format_size(gpu_budget_bytes(self.config, gpu))
            readings.append(
                f"GPU {gpu.index} {gpu.name}: {format_size(gpu.used_bytes)} used of "
                f"{format_size(gpu.total_bytes)}, fleet budget {budget}"
            )
        return "; ".join(readings) or None

    def _reporter(self, service: str) -> Callable[[str], None]:
        """A change's progress callback: its worker thread reports through the queue."""

        def report(text: str) -> None:
            self.queue.put(Progress(service, text))

        return report

    def _record_measured(self, done: Settled) -> None:
        """Keep what a settled model really used; the planner prices its rung with it."""
        if done.measured is not None:
            self.state.measured[done.model] = done.measured
            self._reprice()
            self._save()

    def _reprice(self) -> None:
        self.needs = _needs(self.config, self.state)

    def _vram_note(self, done: Settled) -> str:
        vram = done.measured.vram_bytes if done.measured else None
        if vram is None:
            return ""
        svc = self.config.services[done.service]
        rung = next((i for i, r in enumerate(svc.ladder) if r.model == done.model), None)
        planned = (
            f" (planned {format_size(self.needs[done.service][rung])})" if rung is not None else ""
        )
        return f"; {format_size(vram)} VRAM measured{planned}"

    def _warm_member(self, call: Call) -> None:
        """Load one member of an ensemble before its turn: the others are unloaded first
        (one fits the budget, not all), then it is pulled if missing, loaded and warmed."""
        name, model = call.service or "", str(call.args.get("model") or "")
        service = self.config.services.get(name)
        if service is None:
            raise UsageError(f"no service {name!r} in the config")
        members = [r.model for r in service.ensemble or []]
        if not members:
            raise ops.Refused(f"{name} has no `ensemble:`; warm loads one of its members")
        if model not in members:
            raise UsageError(f"{model!r} is not in {name}'s ensemble ({', '.join(members)})")
        if name in self.busy:
            raise ops.Refused(f"a change of {name} is being applied; try again in a few seconds")
        abort = threading.Event()
        report = self._reporter(name)
        change = ModelChange.for_service(self.config, name, report, abort)
        if change is None:
            raise ops.Refused(f"{name} has no `endpoint:` (or `port:`) for fleetd to reach Ollama")
        self.busy.add(name)

        def warm() -> None:
            try:
                assert isinstance(change.api, OllamaApi)
                loaded = {ollama_name(m.name) for m in change.api.loaded()}
                for other in members:
                    if other != model and ollama_name(other) in loaded:
                        report(f"unloading {other}")
                        change.api.unload(other)
                change.prepare(None, model)
                result = change.settle(model)
            except RuntimeApiError as e:
                result = Settled(name, model, False, str(e))
            self.queue.put(MemberWarmed(call, result))

        threading.Thread(target=warm, name=f"warm-{name}", daemon=True).start()

    def _on_member_warmed(self, done: MemberWarmed) -> None:
        result = done.result
        self.busy.discard(result.service)
        self.activity.pop(result.service, None)
        if not result.ok:
            logger.error(f"{result.service}: warming {result.model} failed: {result.detail}")
            done.call.fail("failed", f"{result.service}: {result.model}: {result.detail}")
            return
        self._record_measured(result)
        message = f"{result.service}: {result.model} {result.detail}{self._vram_note(result)}"
        logger.info(message)
        done.call.answer(
            200, {"service": result.service, "model": result.model, "message": message}
        )

    def _check_health(self, service: str) -> None:
        """One health check, off the loop; skipped while a change or a check is in flight."""
        svc = self.state.services.get(service)
        endpoint = endpoint_of(self.config, service) if service in self.config.services else None
        if svc is None or endpoint is None or service in self.busy or service in self.checking:
            return
        if svc.state is ServiceStatus.EXHAUSTED or service in self.settling:
            return
        api = api_for(self.config.services[service].runtime, endpoint)
        if api is None:
            return
        timeout = self.config.services[service].health.timeout
        self.checking.add(service)

        def check() -> None:
            try:
                api.health(timeout)
                self.queue.put(HealthChecked(service, True, None))
            except RuntimeApiError as e:
                self.queue.put(HealthChecked(service, False, str(e)))

        threading.Thread(target=check, name=f"health-{service}", daemon=True).start()

    def _on_health(self, result: HealthChecked) -> None:
        self.checking.discard(result.service)
        if result.service not in self.config.services or result.service in self.busy:
            return
        config = self.config.services[result.service].health
        health, verdict = observe(
            self.health.get(result.service, Health()), result.ok, result.error, self.clock(),
            config,
        )  # fmt: skip
        self.health[result.service] = health
        self._publish()
        if verdict.message:
            level = "INFO" if result.ok else "WARNING"
            logger.log(level, f"{result.service}: {verdict.message}")
        if verdict.restart:
            svc = self.state.services[result.service]
            self._start_worker(result.service, svc.model, svc.model)

    def _try_step_up(self, window_open: bool) -> None:
        """Step a quiet service one rung up when the bigger rung fits (predicted first)."""
        now = self.clock()
        for name, svc in list(self.state.services.items()):
            if name not in self.config.services or name in self.busy:
                continue
            if not step_up_due(svc, now, self.policy, self.started_at, window_open):
                continue
            fit = self._fit(name, svc.rung - 1)
            if not fit.fits:
                if self.step_up_notes.get(name) != fit.reason:
                    logger.info(f"{name}: a step up is due but rung {svc.rung - 1} {fit.reason}")
                self.step_up_notes[name] = fit.reason
                continue
            self.step_up_notes.pop(name, None)
            quiet = "in the off-peak window" if window_open else (
                f"no vram_oom for {format_duration(self.policy.step_up_after_s)}"
            )  # fmt: skip
            config = self.config.services[name]
            new = step_up(svc, config, self.needs[name], now, self.policy, f"{quiet}; {fit.reason}")
            self.state.services[name] = new
            self._save()
            assert new.pending is not None
            logger.warning(f"{name}: {new.pending.reason}")
            self._apply(name)

    # --- reload, stop, state ----------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: apply added/changed/removed services; keep the old config if invalid.

        Tells systemd RELOADING=1 first and READY=1 once done, so the unit shows
        "reloading" meanwhile (systemd 253+ with Type=notify-reload also waits for it)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={usec}")
        try:
            self.apply_config()
        except FleetdError as e:
            logger.error(f"reload refused, keeping the running config: {e}")
        finally:
            self.notifier.send("READY=1", f"STATUS={self.summary()}")

    def apply_config(self) -> str:
        """Re-read the config and apply it; raises (changing nothing) when it is invalid."""
        old = self.config
        try:
            config = load_config(self.config_path)
            self._index(config)
        except FleetdError:
            self._index(old)
            raise
        self.config = config
        self._schedule_config_jobs()
        if config.metrics != old.metrics:
            logger.warning("metrics: a changed `metrics:` setting applies when fleetd restarts")
        added = sorted(set(config.services) - set(old.services))
        removed = sorted(set(old.services) - set(config.services))
        changed = sorted(
            n
            for n in set(config.services) & set(old.services)
            if config.services[n] != old.services[n]
        )
        for name in changed:  # a changed ladder may have moved the current model
            svc = self.state.services[name]
            if svc.rung >= len(config.services[name].ladder):
                del self.state.services[name]
        self._settle(self._initial_plan() if added or changed else None)
        self._save()
        for container, follower in list(self.followers.items()):
            service = self.watched.get(container)
            if service is not None and service not in changed:
                continue
            self._remember_cursor(follower)
            follower.stop()  # gone, or its service's rules changed: re-attach below
            del self.followers[container]
        self._attach_all()
        summary = (
            f"config reloaded: added {added or '-'}, changed {changed or '-'}, "
            f"removed {removed or '-'}"
        )
        logger.info(summary)
        self.notifier.send(f"STATUS={self.summary()}")
        return summary

    def shutdown(self) -> None:
        for follower in list(self.followers.values()):
            self._remember_cursor(follower)
            follower.stop()
        if self.events is not None:
            self.events.stop()
        self._save()
        self.nvml.shutdown()
        logger.info("fleetd stopped")

    def stop(self) -> None:
        self._stop.set()

    def _save(self) -> None:
        self._publish()  # every change of state is saved: scrapes see it at the same time
        with self.store.lock():
            self.store.save(self.state)

    def _publish(self) -> None:
        """Hand the metrics an immutable snapshot; scrapes never read the loop's dicts."""
        config = self.config
        gpus = self.gpus if config.gpus == "auto" else declared_gpus(config.gpus)
        budgets = {g.index: gpu_budget_bytes(config, g, self.managed) for g in gpus if g.valid}
        snapshot = build_snapshot(
            config,
            self.state,
            gpus,
            self.needs,
            budgets,
            self.clock(),
            self.client is not None,
            dict(self.health),
        )
        self.metrics.publish(snapshot)

    def summary(self) -> str:
        parts = []
        for name in self.config.services:
            svc = self.state.services.get(name)
            if svc is not None:
                parts.append(f"{name}={svc.model} ({svc.state})")
        return ", ".join(parts) or "no services"

    def _install_signals(self) -> None:
        def on_stop(signum: int, frame: FrameType | None) -> None:
            self._stop.set()

        def on_reload(signum: int, frame: FrameType | None) -> None:
            self._reload.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_reload)


class RecentStamps:
    """The last `size` timestamps seen; `add` says whether a stamp is new."""

    def __init__(self, size: int = 1024) -> None:
        self._order: collections.deque[int] = collections.deque(maxlen=size)
        self._set: set[int] = set()

    def add(self, stamp: int) -> bool:
        if stamp in self._set:
            return False
        if len(self._order) == self._order.maxlen:
            self._set.discard(self._order[0])
        self._order.append(stamp)
        self._set.add(stamp)
        return True


def _needs(config: FleetConfig, state: FleetState | None) -> dict[str, list[int]]:
    """Each service's VRAM need per rung (measured figures preferred over estimates)."""
    measured = state.measured if state is not None else None
    return {
        name: [n.need_bytes for n in service_needs(config, svc, measured)]
        for name, svc in config.services.items()
    }


def _detector(service: ServiceConfig) -> Detector:
    extra = [compile_rule(r.id, r.incident_class, r.pattern) for r in service.rules]
    return Detector([*extra, *BUILTIN_RULES], runtime=service.runtime.value)


def _level(decision: Decision) -> str:
    return {
        Action.NONE: "INFO",
        Action.ALERT: "WARNING",
        Action.RESTART: "WARNING",
        Action.STEP_DOWN: "WARNING",
        Action.EXHAUSTED: "ERROR",
    }[decision.action]


def _log_job_error(event: JobExecutionEvent) -> None:
    logger.error(f"scheduled job {event.job_id} failed: {event.exception}")
