"""`fleetd run`: the wiring between the outside world and the supervision step.

Follower threads, the Docker event watcher, the scheduler's timers, the control socket's
threads and the workers that restart containers only put records on one queue. The main
loop turns each record into a message for `supervisor.core.step.step`, keeps the world it gets
back and carries out the effects it returns: saving the state, starting workers, answering
callers, counting metrics. Every decision is the step's. Nothing here blocks the loop: a
call to Docker or NVML runs in a worker or a lane (`offloop`), whose results come back
through the queue, so a hung engine or driver never delays an answer, a watchdog ping or
a stop. Signal handlers only set flags.
"""

from __future__ import annotations

import collections
import functools
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any

import docker
from apscheduler.events import EVENT_JOB_ERROR, JobExecutionEvent
from apscheduler.schedulers.background import BackgroundScheduler
from loguru import logger

from supervisor import __version__
from supervisor.analyzer import analyze, prices
from supervisor.core import step
from supervisor.core.address import format_address
from supervisor.core.backoff import DOCKER_RECONNECT
from supervisor.core.config import FleetConfig, ServiceConfig, load_config
from supervisor.core.detector import Detector, compile_rule
from supervisor.core.endpoints import endpoint_of
from supervisor.core.errors import FleetdError, UsageError
from supervisor.core.gpus import Discovery, Gpu, GpuReader, declared_gpus, resolve_gpus
from supervisor.core.plan import RungNeed, gpu_budget_bytes, place
from supervisor.core.rules import BUILTIN_RULES
from supervisor.core.rungs import RungSetup
from supervisor.core.runtimes import Runtime, spec_of
from supervisor.core.state import FleetState, LogCursor
from supervisor.core.step import ContainerEvent
from supervisor.daemon.handoff import change_model, swarm_variables, write_handoff
from supervisor.daemon.lifecycle import ModelChange, Settled, measured_from_report
from supervisor.daemon.offloop import Bounded, Lane, LoopTask
from supervisor.edges import engine, services
from supervisor.edges.control import Call, ControlServer
from supervisor.edges.engine import DockerError, EngineNotAnswering, parse_docker_time_ns
from supervisor.edges.gpufaults import (
    GpuFaultSeen,
    GpuWatchEnded,
    KernelLogWatcher,
    XidWatcher,
    lost_gpus,
)
from supervisor.edges.hostmem import device_reader
from supervisor.edges.managed import container_names, managed_pids
from supervisor.edges.metrics import FleetMetrics, build_snapshot, transition_kind
from supervisor.edges.nvml import GPU_LOST_ERRORS, Nvml
from supervisor.edges.runtime_api import RuntimeApiError, api_for
from supervisor.edges.sdnotify import Notifier
from supervisor.edges.store import StateStore
from supervisor.edges.swarm import SwarmGpus, require_manager
from supervisor.edges.watch import (
    EventsEnded,
    EventWatcher,
    FollowerEnded,
    LogFollower,
    LogLine,
    NodeBack,
    ServiceLogFollower,
    SwarmWatcher,
)

RECONCILE_S = 5.0
GPU_SAMPLE_S = 30.0
GPU_FRESH_S = 1.0  # a decision uses an NVML reading at most this old
FIRST_READ_MARGIN_NS = 2_000_000_000
CHECKPOINT_S = 5.0
STEP_UP_CHECK_S = 60.0
# How long a blocking read may hold up what waits for it: start-up for the engine, a
# decision for a GPU reading. Past that, it goes on without (the read keeps its thread).
ENGINE_WAIT_S = 2.0
NVML_WAIT_S = 2.0
EXIT_TAIL_LINES = 5  # lines of an unexplained exit kept as its evidence
EXIT_READ_LINES = 200  # lines before an exit searched for one that explains it
EXIT_TAIL_CHARS = 300  # of each
FOLLOWER_END_WAIT_S = 5.0  # for the log of a run that exited to be read to its end
NVML_START_WAIT_S = 10.0  # nvmlInit alone can take seconds without persistence mode


class Daemon:
    def __init__(
        self,
        config_path: Path,
        state_dir: Path,
        docker_factory: Callable[[], docker.DockerClient] = engine.client_from_env,
        clock: Callable[[], float] = time.time,
        nvml: GpuReader | None = None,
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
        self.scheduler: BackgroundScheduler | None = None
        self.store = StateStore(state_dir, clock=clock)
        self.docker_factory = docker_factory
        self.notifier = Notifier()
        self.client: docker.DockerClient | None = None
        self.followers: dict[str, LogFollower] = {}
        self.fault_watchers: list[XidWatcher | KernelLogWatcher] = []
        self.events: EventWatcher | SwarmWatcher | None = None
        # container -> stamps of the matched lines handled lately: an old and a new follower
        # of one container may both deliver a line (dropped once), while lines stamped out of
        # order across stdout and stderr must all count
        self.seen_ns: dict[str, RecentStamps] = {}
        self.calls: dict[int, Call] = {}  # control calls not answered yet, by id
        self.aborts: dict[int, threading.Event] = {}  # change id -> ends its settle early
        self._next_call = 1
        self._reported_runs: dict[str, str] = {}
        self._handed: dict[
            str, RungSetup
        ] = {}  # `mode: swarm`: each service's rung  # container -> the run whose report was read
        self._gpus_read_at = float("-inf")
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._docker_retry_at = 0.0
        self._docker_failures = 0
        # Docker calls the loop needs (connect, attach) run in order in one lane; GPU
        # readings (NVML, and the fleet's PIDs from Docker) in another, ahead of the
        # messages that wait for them, which keep their order (`_waiting` of them).
        self.engine_lane = Lane("engine", self.queue)
        self.reads = Lane("reads", self.queue)
        self._waiting = 0
        # container -> its events that came while its exit waits for its last lines
        self._held_events: dict[str, list[ContainerEvent]] = {}
        self._read_nvml: Bounded[Discovery] = Bounded("nvml", NVML_WAIT_S)
        self._read_pids: Bounded[frozenset[int]] = Bounded("docker-pids", ENGINE_WAIT_S)
        self._read_nvml_start: Bounded[Discovery] = Bounded("nvml-start", NVML_START_WAIT_S)
        self._gpu_read_problem: str | None = None  # why the last GPU reading was missed
        self._lane_read_at = float("-inf")  # when the reads lane last read NVML
        config = load_config(config_path)  # invalid: fail before anything
        self.nvml = nvml or self._gpu_reader(config)
        self.detectors = _detectors(config)
        info = {"pid": os.getpid(), "version": __version__, "config": str(config_path)}
        self.world = step.initial_world(
            config, FleetState(), _needs(config, None), clock(), {**info, "started_at": clock()}
        )
        self.metrics = FleetMetrics()
        self.metrics_at = self._metrics_address(metrics_address, serve_metrics)

    def _gpu_reader(self, config: FleetConfig) -> GpuReader:
        """NVML (or host memory); in `mode: swarm`, the GPUs the swarm's nodes published."""
        if config.mode == "swarm":
            return SwarmGpus(self.docker_factory)
        return device_reader(config)

    @property
    def config(self) -> FleetConfig:
        return self.world.config

    @property
    def state(self) -> FleetState:
        return self.world.state

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

    # --- the step and its effects -----------------------------------------------------

    def feed(self, message: step.Message) -> None:
        """One message through the step; its effects carried out in order."""
        self.world, effects = step.step(self.world, message, self.clock())
        for effect in effects:
            self._carry_out(effect)

    def _carry_out(self, effect: step.Effect) -> None:
        handler = _EFFECTS.get(type(effect))
        assert handler is not None, f"no handler for {type(effect).__name__}"
        handler(self, effect)

    def _save(self, _: object = None) -> None:
        self._publish()  # every change of state is saved: scrapes see it at the same time
        with self.store.lock():
            self.store.save(self.state)

    def _publish(self, _: object = None) -> None:
        """Hand the metrics an immutable snapshot; scrapes never read the loop's dicts."""
        world = self.world
        config = world.config
        gpus = world.gpus if config.gpus == "auto" else declared_gpus(config.gpus)
        budgets = {g.index: gpu_budget_bytes(config, g, world.managed) for g in gpus if g.valid}
        health = {n: f.health for n, f in world.flights.items() if f.health.last_check_at}
        needs = {name: world.needs_bytes(name) for name in world.needs}
        snapshot = build_snapshot(
            config, world.state, gpus, needs, budgets, self.clock(), world.docker_up, health
        )
        self.metrics.publish(snapshot)

    def _log(self, effect: step.Log) -> None:
        logger.log(effect.level, effect.text)

    def _reply(self, effect: step.Reply) -> None:
        call = self.calls.pop(effect.call, None)
        if call is not None:
            call.answer(effect.status, effect.body)

    def _count_incident(self, effect: step.CountIncident) -> None:
        self.metrics.incident(effect.service, effect.incident_class)
        self.metrics.detection_latency(effect.service, effect.latency_s)

    def _count_transition(self, effect: step.CountTransition) -> None:
        kind = transition_kind(effect.record, effect.op)
        if kind is not None:
            self.metrics.transition(effect.service, *kind)

    def _reprice(self, _: object = None) -> None:
        self.feed(step.Repriced(_needs(self.config, self.state)))

    def _write_model(self, effect: step.WriteModel) -> None:
        try:
            warning = write_handoff(self.store, self.config, effect.setup)
        except FleetdError as e:  # a full disk: the files stay as they were, all of them
            logger.error(f"{effect.service}: cannot hand off rung {effect.setup.rung}: {e}")
            return
        if warning:
            logger.warning(f"{effect.service}: {warning}")
        if self.config.mode == "swarm":
            self._handed[effect.service] = effect.setup
            self._align_swarm({effect.service: effect.setup})

    def _align_swarm(self, setups: Mapping[str, RungSetup]) -> None:
        """`mode: swarm`: a service whose spec does not carry the rung the state names (a
        stack deployed again from its file, or a change made while fleetd was down) is
        updated onto it, in the engine lane; Swarm rolls its tasks."""
        client, config = self.client, self.config
        if client is None:
            return  # done when the engine is connected

        def align() -> list[object]:
            for name, setup in setups.items():
                if name not in config.services:
                    continue
                changes = swarm_variables(config, name, setup)
                for container in config.services[name].restarted:
                    swarm = config.swarm_service(container)
                    try:
                        spec = services.inspect(client, swarm)["Spec"]["TaskTemplate"]
                        env = spec.get("ContainerSpec", {}).get("Env") or []
                        if services.env_matches(env, changes):
                            continue
                        logger.warning(
                            f"{name}: service {swarm} does not run rung {setup.rung} "
                            f"({setup.model}) that the state names; updating it"
                        )
                        services.update_env(client, swarm, changes)
                    except services.NoSuchService:
                        logger.info(f"{name}: service {swarm} is not deployed (yet)")
                    except DockerError as e:
                        logger.error(f"{name}: cannot align service {swarm}: {e}")
            return []

        self.engine_lane.submit(align)

    def _forget_name(self, effect: step.ForgetName) -> None:
        """Delete a removed service's stable model from its runtime, in a worker: the
        runtime may be gone with the service, which is only worth a note."""

        def forget() -> None:
            api = api_for(Runtime(effect.runtime), effect.endpoint)
            try:
                if api is not None:
                    api.delete(effect.name)
                    logger.info(f"{effect.service}: deleted its stable model {effect.name}")
            except RuntimeApiError as e:
                logger.info(f"{effect.service}: its stable model {effect.name} stays: {e}")

        threading.Thread(target=forget, name=f"forget-{effect.service}", daemon=True).start()

    def _abort_settle(self, effect: step.AbortSettle) -> None:
        abort = self.aborts.get(effect.change)
        if abort is not None:
            abort.set()

    def _restart(self, effect: step.Restart) -> None:
        """The change procedure (handoff.change_model) in a worker: hand off, prepare (pull,
        unload), restart, then settle (health, warm-up). A restart that keeps the model (a
        GPU fault, failed health checks) only restarts: the health checks judge it."""
        abort = threading.Event()
        if effect.new_rung:  # another model, or the same one with other options
            self.aborts[effect.change] = abort
        if self.config.mode == "swarm":
            self._handed[effect.service] = effect.setup  # what a later alignment keeps
        threading.Thread(
            target=self._restart_worker,
            args=(effect, self.config, abort),
            name=f"apply-{effect.service}",
            daemon=True,
        ).start()

    def _restart_worker(
        self, effect: step.Restart, config: FleetConfig, abort: threading.Event
    ) -> None:
        name, change = effect.service, effect.change

        def restarted(settles: bool) -> None:
            runs = self._runs_of(config.services[name].restarted)
            self.queue.put(step.Applied(name, change, None, settles, runs))

        try:
            result = change_model(
                self.client,
                self.store,
                config,
                name,
                effect.old_model,
                effect.setup,
                report=self._reporter(name, change),
                abort=abort,
                restarted=restarted,
                expect_stop=self._expect_stop,
                handoff=effect.handoff,
                new_rung=effect.new_rung,
            )
        except FleetdError as e:
            self.queue.put(step.Applied(name, change, str(e)))
            return
        if result is not None:
            self.queue.put(step.SettleDone(change, result))

    def _runs_of(self, containers: list[str]) -> tuple[tuple[str, int], ...]:
        """When each container's current run started (a worker calls it after a restart);
        one that cannot be inspected is left out (its old lines may then count)."""
        runs = []
        for name in containers:
            started = self._started_ns(name)
            if started:
                runs.append((name, started))
        return tuple(runs)

    def _expect_stop(self, container: str, seconds: float) -> None:
        """From a worker, before it stops a container: queued ahead of the stop's events."""
        self.queue.put(step.StopExpected(container, self.clock() + seconds))

    def _stop_containers(self, effect: step.StopContainers) -> None:
        """Stop (not remove) a service's containers: Docker never restarts a manual stop."""
        client = self.client
        if client is None:
            return

        swarm = self.config.mode == "swarm"
        config = self.config

        def stop_all() -> None:
            for name in effect.containers:
                try:
                    if swarm:  # no task at all: replicas 0 (`docker service scale S=0`)
                        services.scale(client, config.swarm_service(name), 0)
                        continue
                    engine.stop(client, name, int(effect.timeout_s))
                except DockerError as e:
                    logger.error(f"{effect.service}: {e}")

        threading.Thread(target=stop_all, name=f"stop-{effect.service}", daemon=True).start()

    def _check_health(self, effect: step.CheckHealth) -> None:
        """One health check, off the loop."""
        name = effect.service
        endpoint = endpoint_of(self.config, name) if name in self.config.services else None
        api = api_for(self.config.services[name].runtime, endpoint) if endpoint else None
        if api is None:
            self.queue.put(step.HealthChecked(name, False, "no runtime endpoint to check"))
            return
        timeout = self.config.services[name].health.timeout

        container = self.config.services[name].containers[0]

        def check() -> None:
            try:
                api.health(timeout)
                self.queue.put(step.HealthChecked(name, True, None))
            except RuntimeApiError as e:
                started_ns = self._started_ns(container)  # still loading, or hung?
                started = started_ns / 1e9 if started_ns else None
                self.queue.put(step.HealthChecked(name, False, str(e), started))
                return
            self._read_footprint(name)

        threading.Thread(target=check, name=f"health-{name}", daemon=True).start()

    def _read_footprint(self, name: str) -> None:
        """Once per run of a healthy service whose runtime prints its buffer report at
        start (llama.cpp), read it and price the running rung with it. Runs in a health
        check's thread: two Docker calls, once per container start."""
        service = self.config.services.get(name)
        current = self.state.services.get(name)
        if service is None or current is None or not spec_of(service.runtime).footprint_in_log:
            return
        if self.config.mode == "swarm":
            return  # a task's report is read by the change's settle (its read_log)
        model, rung = current.model, current.rung
        container, client = service.containers[0], self.client
        if client is None:
            return
        try:
            run = engine.started_ns(client, container)
            if self._reported_runs.get(container) == run:
                return
            lines = engine.run_log(client, container)
        except DockerError as e:
            logger.warning(f"{name}: cannot read the buffer report of {model}: {e}")
            return
        self._reported_runs[container] = run
        measured = measured_from_report(name, service, rung, lines, self.clock())
        if measured is not None:
            self.queue.put(step.FootprintRead(name, model, measured, rung))

    def _warm_member(self, effect: step.WarmMember) -> None:
        """Load one member of an ensemble before its turn: the others are unloaded first
        (one fits the budget, not all), then it is pulled if missing, loaded and warmed."""
        name, model = effect.service, effect.model
        abort = threading.Event()
        report = self._reporter(name, effect.change)
        change = ModelChange.for_service(self.config, name, report, abort)
        if change is None:
            runtime = spec_of(self.config.services[name].runtime).title
            why = f"{name} has no `endpoint:` (or `port:`) for fleetd to reach {runtime}"
            result = Settled(name, model, False, why)
            self.queue.put(step.MemberWarmed(effect.call, effect.change, result, refused=why))
            return

        def warm() -> None:
            try:
                change.unload_others(effect.others)
                change.prepare(None, model)
                result = change.settle(model)
            except RuntimeApiError as e:
                result = Settled(name, model, False, str(e))
            self.queue.put(step.MemberWarmed(effect.call, effect.change, result))

        threading.Thread(target=warm, name=f"warm-{name}", daemon=True).start()

    def _reporter(self, service: str, change: int) -> Callable[[str], None]:
        """A change's progress callback: its worker thread reports through the queue."""

        def report(text: str) -> None:
            self.queue.put(step.Progress(service, change, text))

        return report

    def _reattach(self, effect: step.Reattach) -> None:
        watched = self.world.watched
        for container, follower in list(self.followers.items()):
            service = watched.get(container)
            if service is not None and service not in effect.services:
                continue
            self._remember_cursor(follower)
            follower.stop()  # gone, or its service's rules changed: re-attach below
            del self.followers[container]
        self._attach_all()

    # --- start-up -------------------------------------------------------------------

    def start(self) -> None:
        """Load the state, settle every service on a rung and hand off its model."""
        with self.store.lock():
            loaded = self.store.load()
        for note in loaded.notes:  # a missing file is normal on the first start
            logger.log("INFO" if note.startswith("no state yet") else "WARNING", f"state: {note}")
        config, state = self.config, loaded.state
        self.world = step.initial_world(
            config, state, _needs(config, state), self.world.started_at, self.world.daemon
        )
        # Docker first, so the plan can tell the fleet's own GPU processes from others';
        # followers only queue lines, which the loop handles once `run` starts. Each read
        # is waited for a bounded time: a hung engine or driver delays the start, never
        # stops it.
        self._connect_at_start()
        discovery, pids, lost = self._read_for_plan(config, self.client, self._read_nvml_start)
        if lost:
            self._engine_lost(self.client, lost)
        planned = self._planned(config, discovery, pids)
        self.feed(step.Reconfigure(config, self.world.needs, planned, starting=True))
        self.feed(step.Resume())
        for gpu in discovery.gpus:  # lost before fleetd started: nothing to compare with
            if gpu.error in GPU_LOST_ERRORS:
                self.feed(step.GpuFault(gpu.index, "GPU lost", gpu.error or "", "nvml", gpu.uuid))
        self._watch_gpu_faults(config)

    def _watch_gpu_faults(self, config: FleetConfig) -> None:
        """NVML's critical Xid events (GPUs read by NVML), and the config's kernel log."""
        if config.gpus == "auto" and isinstance(self.nvml, Nvml):
            self.fault_watchers.append(XidWatcher(self.nvml, self.queue))
        if config.kernel_log is not None:
            path = config.resolve(config.kernel_log)
            self.fault_watchers.append(KernelLogWatcher(path, self.queue))
        for watcher in self.fault_watchers:
            watcher.start()

    def _read_for_plan(
        self, config: FleetConfig, client: docker.DockerClient | None, read_nvml: Bounded[Any]
    ) -> tuple[Discovery, frozenset[int] | None, str | None]:
        """The GPUs to plan on (NVML, or the config's declared ones), the fleet's PIDs, and
        why the engine was lost if it did not answer; each read waited for a bounded time."""
        if config.gpus != "auto":
            return self._discover(config), None, None
        done, found, _ = read_nvml(lambda: self._discover(config))
        if not done or found is None:
            why = f"NVML did not answer within {read_nvml.wait_s:g} s"
            return Discovery(gpus=(), problem=why), None, None
        if client is None:
            return found, None, None
        return (found, *self._fleet_pids(client, container_names(config)))

    def _fleet_pids(
        self, client: docker.DockerClient, names: set[str]
    ) -> tuple[frozenset[int] | None, str | None]:
        """The fleet's host PIDs (None when Docker did not list them in time), and why the
        engine is lost when it did not answer."""
        if self.config.mode == "swarm":  # tasks run on any node: no host PIDs to read
            names = set()
        _, pids, error = self._read_pids(lambda: managed_pids(client, names))
        return pids, str(error) if isinstance(error, EngineNotAnswering) else None

    def _planned(
        self, config: FleetConfig, discovery: Discovery, pids: frozenset[int] | None
    ) -> dict[str, int | None]:
        """Put the GPUs read into the world, and return the planner's rung per service on
        them (empty without GPUs)."""
        if discovery.problem:
            logger.info(discovery.problem)
        pids = pids or frozenset()
        self.feed(step.GpusRead(discovery.gpus, discovery.problem, pids))
        self._gpus_read_at = time.monotonic()
        if not discovery.gpus:
            return {}
        if isinstance(self.nvml, SwarmGpus):  # each service on one node, as generate did
            needs = prices(config, None)
            plan = place(config, discovery, needs, pids, sites=self.nvml.sites)
        else:
            plan = analyze(config, discovery, pids)
        return {name: p.rung for name, p in plan.services.items()}

    def _discover(self, config: FleetConfig) -> Discovery:
        try:
            return resolve_gpus(config, (), self.nvml)
        except FleetdError as e:
            return Discovery(gpus=(), problem=str(e))

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
        except FleetdError as e:  # one bad record never stops the loop
            logger.error(f"while handling {type(item).__name__}: {e}")
        except Exception:  # a bug: report it with its traceback, keep supervising
            logger.exception(f"BUG while handling {type(item).__name__}; please report it")

    def _handle(self, item: object) -> None:
        if isinstance(item, LoopTask):
            item.apply()
        elif isinstance(item, LogLine):
            self._on_line(item)
        elif isinstance(item, ContainerEvent):
            self._on_event(item)
        elif isinstance(item, FollowerEnded):
            follower = self.followers.get(item.container)
            if follower is not None and id(follower) == item.follower:
                self._remember_cursor(follower)
                del self.followers[item.container]
        elif isinstance(item, GpuFaultSeen):
            self._on_gpu_fault(item)
        elif isinstance(item, GpuWatchEnded):
            logger.info(f"GPU faults: {item.source} not watched: {item.error}")
        elif isinstance(item, NodeBack):
            self._reopen_logs(item)
        elif isinstance(item, EventsEnded):
            logger.warning(f"Docker event stream ended ({item.error}); reconnecting")
            self.events = None
            self.client = None
            self.feed(step.DockerState(up=False, error=f"event stream ended: {item.error}"))
        elif isinstance(item, step.Tick):
            self._on_tick(item)
        elif isinstance(item, Call):
            self._on_call(item)
        elif isinstance(item, step.SettleDone | step.MemberWarmed):
            self.aborts.pop(item.change, None)
            self._when_fresh(item)
        else:
            self.feed(item)  # type: ignore[arg-type]  # the workers' results are messages

    def _reopen_logs(self, back: NodeBack) -> None:
        """A lost node is back: every service log is read again from where it was (the
        streams opened before deliver nothing more of that node; lines read twice are
        dropped by their stamps)."""
        logger.info(
            f"swarm node {back.name or back.node_id[:12]} is ready again: reading the "
            "services' logs on from where they were"
        )
        for container, follower in list(self.followers.items()):
            self._remember_cursor(follower)
            follower.stop()
            del self.followers[container]
        self._attach_all()

    def drain(self, timeout_s: float = 0.0) -> None:
        """Handle everything queued, and the messages waiting for a GPU reading (tests and
        shutdown; those are given up after NVML_WAIT_S past `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        give_up = deadline + NVML_WAIT_S + 1.0
        while True:
            self._step(timeout_s=max(0.0, deadline - time.monotonic()) or 0.01)
            now = time.monotonic()
            if self.queue.empty() and now >= deadline and (self._waiting == 0 or now > give_up):
                return

    def _on_line(self, line: LogLine) -> None:
        if line.container not in self.world.watched:
            return
        if not self.seen_ns.setdefault(line.container, RecentStamps()).add(line.time_ns):
            return  # already handled (a new follower re-reads a little)
        rule = line.match.rule
        self._when_fresh(
            step.LineMatched(
                line.container,
                line.container_id,
                line.time_ns,
                line.run_ns,
                rule.id,
                str(rule.incident_class),
                line.match.line,
            )
        )

    def _on_event(self, event: ContainerEvent) -> None:
        if event.container not in self.world.watched:
            return
        held = self._held_events.get(event.container)
        if held is not None:  # its exit waits for its last lines: keep the order
            held.append(event)
            return
        if event.action == "start":
            self._follow(event.container, event.container_id, event.time_ns)
        elif event.action == "die" and event.exit_code not in (None, 0, 137) and self.client:
            self._with_last_lines(self.client, event)
            return
        self._when_fresh(event)

    def _with_last_lines(self, client: docker.DockerClient, event: ContainerEvent) -> None:
        """A non-zero exit goes to the step with the lines its run printed last (read in a
        worker): if nothing explains it, they are the evidence a person writes a rule from.
        The container's later events wait for it."""
        self._held_events[event.container] = []
        detector = self.detectors[self.world.watched[event.container]]
        follower = self.followers.get(event.container)
        if follower is not None and follower.container_id != event.container_id:
            follower = None  # (a service's follower reads on past a task: never waited for)
        swarm = self.config.swarm_service(event.container) if self.config.mode == "swarm" else None

        def read() -> None:
            # Docker may report the exit before the log stream has given the run's last
            # lines: the follower's stream ends with the run, and every line it read is on
            # the queue before it ends. Then a line that explains the exit comes first.
            if follower is not None:
                follower.join(FOLLOWER_END_WAIT_S)
            try:
                if swarm is not None:
                    lines = services.last_lines(client, swarm, event.container_id, EXIT_READ_LINES)
                else:
                    lines = engine.last_lines(client, event.container_id, EXIT_READ_LINES)
            except DockerError:
                lines = []
            # A line of its own log that a rule knows explains the exit, whether or not a
            # follower read it (a run that ends at once may be over before one attaches).
            explained = any(detector.classify(line) is not None for line in lines)
            kept = tuple(line[:EXIT_TAIL_CHARS] for line in lines[-EXIT_TAIL_LINES:])
            # a Swarm task that never started printed nothing: its error is the evidence
            read = replace(event, last_lines=kept or event.last_lines, explained=explained)
            self.queue.put(LoopTask(lambda: self._exit_read(read)))

        threading.Thread(target=read, name=f"tail-{event.container}", daemon=True).start()

    def _exit_read(self, event: ContainerEvent) -> None:
        held = self._held_events.pop(event.container, [])
        self._when_fresh(event)
        for later in held:
            self._on_event(later)

    # --- GPU readings: fresh before a decision, read off the loop -------------------------

    def _when_fresh(self, message: step.Message, with_pids: bool = False) -> None:
        """Feed `message` once the GPU reading is fresh: at most GPU_FRESH_S old, and with
        the fleet's PIDs (a Docker call) when a fit is to be checked. At once when it is
        (or the GPUs are declared); else after a read in the reads lane, behind the
        messages already waiting there, so none overtakes another."""
        if self.config.gpus != "auto":
            self._feed_checked(message)
            return
        fresh = time.monotonic() - self._gpus_read_at < GPU_FRESH_S
        if fresh and not with_pids and self._waiting == 0:
            self._feed_checked(message)
            return
        self._waiting += 1
        client = self.client if with_pids else None
        names = container_names(self.config)

        def read_then_feed() -> list[object]:
            records = self._read_gpus(client, names, force=with_pids)
            return [*records, LoopTask(lambda: self._fed_when_fresh(message))]

        self.reads.submit(read_then_feed)

    def _fed_when_fresh(self, message: step.Message) -> None:
        self._waiting -= 1
        self._feed_checked(message)

    def _feed_checked(self, message: step.Message) -> None:
        """Feed a message; a caller's request that hits a bug still gets an answer."""
        if not isinstance(message, step.Request):
            self.feed(message)
            return
        try:
            self.feed(message)
        except Exception as e:  # a bug: the caller gets an answer, the log the traceback
            logger.exception(f"BUG while answering {message.op}; please report it")
            self._reply(step.fail(message.call, "failed", f"internal error: {e!r}"))

    def _read_gpus(
        self, client: docker.DockerClient | None, names: set[str], force: bool
    ) -> list[object]:
        """In the reads lane: NVML (and, given a client, the fleet's PIDs) as records for
        the loop. None when this lane read NVML less than GPU_FRESH_S ago (unless forced),
        or NVML did not answer within NVML_WAIT_S: the decision uses the last reading."""
        if not force and time.monotonic() - self._lane_read_at < GPU_FRESH_S:
            return []
        done, discovery, error = self._read_nvml(self.nvml.discover)
        if not done or discovery is None:
            why = f"NVML did not answer within {NVML_WAIT_S:g} s" if not done else repr(error)
            return [LoopTask(lambda: self._gpus_not_read(why))]
        self._lane_read_at = time.monotonic()
        records: list[object] = []
        pids = None
        if client is not None and any(g.valid for g in discovery.gpus):
            pids, lost = self._fleet_pids(client, names)
            if lost is not None:
                records.append(LoopTask(lambda: self._engine_lost(client, lost)))
        read = step.GpusRead(discovery.gpus, discovery.problem, pids)
        return [*records, LoopTask(lambda: self._gpus_read(read))]

    def _gpus_read(self, read: step.GpusRead) -> None:
        if self._gpu_read_problem is not None:
            logger.info("NVML answers again")
            self._gpu_read_problem = None
        before = Discovery(gpus=self.world.gpus)
        self.feed(read)
        self._gpus_read_at = time.monotonic()
        if isinstance(self.nvml, SwarmGpus):
            return  # a node down takes its GPUs out of the swarm's list: no GPU fault
        for lost in lost_gpus(before, Discovery(gpus=read.gpus), self.clock()):
            self._on_gpu_fault(lost, before.gpus)  # a lost GPU's record no longer names it

    def _on_gpu_fault(self, seen: GpuFaultSeen, gpus: tuple[Gpu, ...] | None = None) -> None:
        """A fault a watcher saw, for the GPU of the reading (the world's) it names."""
        gpu = next((g for g in gpus or self.world.gpus if _names(seen, g)), None)
        if gpu is None:
            logger.warning(f"GPU fault of a GPU fleetd does not know ({seen.reason}): "
                           f"{seen.evidence!r}")  # fmt: skip
            return
        fault = step.GpuFault(gpu.index, seen.reason, seen.evidence, seen.source, gpu.uuid)
        self._when_fresh(fault, with_pids=True)  # its services' moves check their fit

    def _gpus_not_read(self, why: str) -> None:
        if self._gpu_read_problem != why:
            logger.warning(f"{why}; deciding on the last GPU reading")
            self._gpu_read_problem = why

    # --- the control API (calls come from the socket's threads through the queue) ---------

    def _on_call(self, call: Call) -> None:
        call_id = self._next_call
        self._next_call += 1
        self.calls[call_id] = call
        if call.op == "reload":
            self.apply_config(call_id)
            return
        who = f"with fleetctl by {call.peer.who}"
        request = step.Request(call_id, call.op, call.service, dict(call.args), who)
        self._when_fresh(request, with_pids=call.op in ("upgrade", "pin", "cordon"))

    # --- Docker connection, followers, periodic jobs --------------------------------------

    def _connect_docker(self) -> None:
        """Try the engine (off the loop) unless connected or backing off."""
        if self.client is not None or time.monotonic() < self._docker_retry_at:
            return
        self.engine_lane.submit(self._connect_job, key="connect")

    def _connect_job(self) -> list[object]:
        try:
            client = engine.connect(self.docker_factory)
            if self.config.mode == "swarm":
                try:
                    hint = "`mode: swarm` needs fleetd on a manager (where `docker node ls` works)"
                    require_manager(client, hint)
                except DockerError:
                    client.close()
                    raise
        except DockerError as e:
            error = str(e)
            return [LoopTask(lambda: self._engine_failed(error))]
        return [LoopTask(lambda: self._engine_connected(client))]

    def _connect_at_start(self) -> None:
        """Connect before the first plan, waiting at most ENGINE_WAIT_S; an engine that
        has not answered by then is tried again in the background."""
        done, records, _ = Bounded[list[object]]("engine-start", ENGINE_WAIT_S)(self._connect_job)
        if not done or records is None:
            self._engine_failed(f"Docker is not reachable: no answer within {ENGINE_WAIT_S:g} s")
            return
        for record in records:
            self._handle(record)

    def _engine_connected(self, client: docker.DockerClient) -> None:
        if self.client is not None:  # a late answer to an earlier try
            client.close()
            return
        self.client, self._docker_failures = client, 0
        self.feed(step.DockerState(up=True))
        if self.config.mode == "swarm":
            self.events = SwarmWatcher(
                client, self.clock(), self.queue, self._swarm_services, self._tasks_seen
            )
        else:
            self.events = EventWatcher(client, self.clock(), self.queue)
        self.events.start()
        self._attach_all()
        if self.config.mode == "swarm":
            self._align_swarm(dict(self._handed))

    def _swarm_services(self) -> dict[str, str]:
        """`mode: swarm`, from the task reader's thread: each watched name's Swarm service."""
        config = self.config
        return {name: config.swarm_service(name) for name in list(self.world.watched)}

    def _tasks_seen(self, tasks: dict[str, dict[str, Any] | None]) -> None:
        """From the task reader's thread: the services' tasks now, for status."""
        self.queue.put(step.TasksSeen({k: v or {} for k, v in tasks.items()}))

    def _engine_failed(self, error: str) -> None:
        self._docker_failures += 1
        wait_s = DOCKER_RECONNECT.delay_s(self._docker_failures)
        logger.warning(f"{error}; next try in at least {wait_s:.0f} s")
        self._docker_retry_at = time.monotonic() + wait_s
        self.feed(step.DockerState(up=False, error=error))

    def _engine_lost(self, client: docker.DockerClient | None, error: str) -> None:
        """A call to the connected engine got no answer: ping it again before any other."""
        if client is None or client is not self.client:
            return
        logger.warning(f"{error}; reconnecting")
        self.client = None
        if self.events is not None:
            self.events.stop()
            self.events = None
        self.feed(step.DockerState(up=False, error=error))

    def _ping_engine(self) -> None:
        """Ask the connected engine for a sign of life: a hung one is noticed (and shown
        by `fleetctl status`) even when nothing else calls it."""
        client = self.client
        if client is None:
            return

        def ping() -> list[object]:
            try:
                engine.ping(client)
            except DockerError as e:
                error = str(e)
                return [LoopTask(lambda: self._engine_lost(client, error))]
            return []

        self.engine_lane.submit(ping, key="ping")

    def _attach_all(self) -> None:
        """Follow every watched container that runs and has no follower yet; the engine is
        asked off the loop. One not created yet is attached by its start event."""
        client = self.client
        names = [n for n in self.world.watched if not self._followed(n)]
        if client is None or not names:
            return

        swarm = self.config.mode == "swarm"

        def find() -> list[object]:
            found: list[tuple[str, str, int]] = []
            for name in names:
                try:
                    run = (
                        self._swarm_run(client, name) if swarm else engine.current_run(client, name)
                    )
                except EngineNotAnswering as e:
                    return [LoopTask(functools.partial(self._engine_lost, client, str(e)))]
                except DockerError:
                    continue
                if run is not None:
                    found.append((name, run[0], _stamp_ns(run[1]) if run[1] else 0))
            return [LoopTask(lambda: self._attach_found(client, found))]

        self.engine_lane.submit(find, key="attach")

    def _swarm_run(self, client: docker.DockerClient, name: str) -> tuple[str, str] | None:
        """`mode: swarm`: a service's log is followed whole (every task) while it exists:
        ("", "") when it does, None when it is not deployed."""
        try:
            services.inspect(client, self.config.swarm_service(name))
        except services.NoSuchService:
            return None
        return "", ""

    def _followed(self, name: str) -> bool:
        follower = self.followers.get(name)
        return follower is not None and follower.is_alive()

    def _attach_found(self, client: docker.DockerClient, found: list[tuple[str, str, int]]) -> None:
        if client is not self.client:
            return
        for name, container_id, started_ns in found:
            if name in self.world.watched:
                self._follow(name, container_id, started_ns)

    def _follow(self, name: str, container_id: str, started_ns: int) -> None:
        """Follow a container's current run (`started_ns`: when it started, 0 if unknown)."""
        old = self.followers.get(name)
        same_run = old is not None and old.run_ns >= started_ns
        if old is not None and old.is_alive() and old.container_id == container_id and same_run:
            return
        if self.client is None:
            return
        # Read from where we left off (the old follower's stream ends with its run; the
        # main loop drops what both read); a container never seen is read from its start
        # event, or from now when fleetd meets it already running.
        cursor = self.state.log_cursors.get(name)
        known = max(cursor.since_ns if cursor else 0, old.since_ns if old else 0)
        run_ns = started_ns
        # A container never read before is read from its start when it started after
        # fleetd did (its start event, or a reconcile that met it before that event came),
        # else from fleetd's start: what it printed while fleetd was starting (the control
        # socket already answers) is not lost, what it printed before is not fleetd's.
        # Docker stamps a fast process's first lines a few ms before its start event: start
        # a little earlier (nothing of this run can have been counted yet).
        fleetd_started_ns = int(self.world.started_at * 1e9)
        if known:
            since = known
        elif run_ns >= fleetd_started_ns:
            since = run_ns - FIRST_READ_MARGIN_NS
        else:
            since = fleetd_started_ns
        detector = self.detectors[self.world.watched[name]]
        follower: LogFollower
        if self.config.mode == "swarm":
            if old is not None and old.is_alive():
                return  # one follower reads every task of the service
            service = self.config.swarm_service(name)
            follower = ServiceLogFollower(
                self.client, name, service, since, self.queue, detector.classify
            )
        else:
            follower = LogFollower(
                self.client, name, container_id, since, self.queue, run_ns, detector.classify
            )
        self.followers[name] = follower
        follower.start()

    def _started_ns(self, name: str) -> int:
        try:
            assert self.client is not None
            if self.config.mode == "swarm":  # a task is a run: when it was created
                task = services.current_task(self.client, self.config.swarm_service(name))
                return task.created_ns if task is not None else 0
            return parse_docker_time_ns(engine.started_ns(self.client, name))
        except (KeyError, ValueError, DockerError):
            return 0

    def _remember_cursor(self, follower: LogFollower) -> None:
        self._checkpoint({follower.container: follower})

    def _checkpoint(self, followers: Mapping[str, LogFollower]) -> None:
        cursors = {n: LogCursor(f.container_id, f.since_ns) for n, f in followers.items()}
        self.feed(step.Checkpoint(cursors))

    def _on_tick(self, tick: step.Tick) -> None:
        if tick.job == "reconcile":
            self._connect_docker()
            self._ping_engine()
            self._attach_all()
        elif tick.job in ("step_up", "step_up_window"):
            self._when_fresh(tick, with_pids=True)
            return
        elif tick.job == "gpus":
            self._sample_gpus()
            return
        elif tick.job == "checkpoint":
            for name, follower in self.followers.items():
                if follower.lag_s is not None:
                    self.metrics.follow_lag(name, follower.lag_s)
            self._checkpoint(self.followers)
            self.notifier.send(f"STATUS={self.summary()}")
            return
        self.feed(tick)

    def _sample_gpus(self) -> None:
        """Read NVML (off the loop) and publish; a GPU lost or found again is reported once
        (by the step), never a crash."""
        if self.config.gpus != "auto":
            self._publish()
            return
        client, names = self.client, container_names(self.config)

        def sample() -> list[object]:
            return [*self._read_gpus(client, names, force=True), LoopTask(self._publish)]

        self.reads.submit(sample, key="sample")

    def _scheduler(self) -> BackgroundScheduler:
        scheduler = BackgroundScheduler(daemon=True)
        jobs = (("reconcile", RECONCILE_S), ("checkpoint", CHECKPOINT_S), ("gpus", GPU_SAMPLE_S))
        for job, every_s in jobs:
            scheduler.add_job(
                self.queue.put,
                "interval",
                args=[step.Tick(job)],
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
            self.queue.put, "interval", args=[step.Tick("step_up")], seconds=every_s,
            id="step_up", coalesce=True, max_instances=1,
        )  # fmt: skip
        for name, svc in self.config.services.items():
            endpoint = endpoint_of(self.config, name)
            has_health = spec_of(svc.runtime).health_path is not None
            if svc.health.enabled and endpoint is not None and has_health:
                scheduler.add_job(
                    self.queue.put, "interval", args=[step.Tick(f"health:{name}")],
                    seconds=svc.health.interval, id=f"health:{name}", coalesce=True,
                    max_instances=1,
                )  # fmt: skip
        if self.config.policy.step_up_at:
            from apscheduler.triggers.cron import CronTrigger

            trigger = CronTrigger.from_crontab(self.config.policy.step_up_at, timezone="UTC")
            scheduler.add_job(
                self.queue.put, trigger, args=[step.Tick("step_up_window")], id="step_up_window",
                coalesce=True, max_instances=1,
            )  # fmt: skip

    # --- reload, stop ---------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: apply added/changed/removed services; keep the old config if invalid.

        Tells systemd RELOADING=1 first and READY=1 once done, so the unit shows
        "reloading" meanwhile (systemd 253+ with Type=notify-reload also waits for it)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={usec}")
        self.apply_config(done=lambda: self.notifier.send("READY=1", f"STATUS={self.summary()}"))

    def apply_config(
        self, call: int | None = None, done: Callable[[], None] = lambda: None
    ) -> None:
        """Re-read the config and hand it to the step (`done` once it is applied, or
        refused); an invalid one changes nothing. The GPUs are read again off the loop."""
        try:
            config = load_config(self.config_path)
            detectors = _detectors(config)
            old = self.config
            if (config.mode, config.swarm) != (old.mode, old.swarm):
                raise UsageError(
                    f"{self.config_path}: mode/swarm changed ({old.mode}, stack "
                    f"{old.swarm.stack} -> {config.mode}, stack {config.swarm.stack}): "
                    "what fleetd watches changes with them; restart fleetd to apply it"
                )
        except FleetdError as e:
            logger.error(f"reload refused, keeping the running config: {e}")
            if call is not None:
                kind = "usage" if isinstance(e, UsageError) else "failed"
                self._reply(step.fail(call, kind, str(e)))
            done()
            return
        if config.accelerator != self.config.accelerator:  # GPUs <-> host memory
            self._close_nvml()
            self.nvml = self._gpu_reader(config)
        client = self.client

        def read_then_apply() -> list[object]:
            discovery, pids, lost = self._read_for_plan(config, client, self._read_nvml)
            records = [LoopTask(lambda: self._engine_lost(client, lost))] if lost else []
            apply = LoopTask(lambda: self._reconfigure(config, detectors, discovery, pids, call))
            return [*records, apply, LoopTask(done)]

        if config.gpus == "auto":
            self.reads.submit(read_then_apply)
        else:  # nothing to wait for
            for record in read_then_apply():
                self._handle(record)

    def _reconfigure(
        self,
        config: FleetConfig,
        detectors: dict[str, Detector],
        discovery: Discovery,
        pids: frozenset[int] | None,
        call: int | None,
    ) -> None:
        old = self.config
        self.detectors = detectors
        # GPUs are read again (the declared ones may have changed); a service added, or
        # changed (its ladder may have moved), is placed by the planner
        planned = self._planned(config, discovery, pids)
        moved = {n for n, svc in config.services.items() if svc != old.services.get(n)}
        planned = {n: r for n, r in planned.items() if n in moved}
        self.feed(step.Reconfigure(config, _needs(config, self.state), planned, call=call))
        self._schedule_config_jobs()
        self.notifier.send(f"STATUS={self.summary()}")

    def shutdown(self) -> None:
        for watcher in self.fault_watchers:
            watcher.stop()
        for follower in list(self.followers.values()):
            follower.stop()
        self._checkpoint(self.followers)
        if self.events is not None:
            self.events.stop()
        self._close_nvml()
        logger.info("fleetd stopped")

    def _close_nvml(self) -> None:
        """nvmlShutdown, waited for at most NVML_WAIT_S: a hung driver never holds a stop."""
        done, _, _ = Bounded[None]("nvml-shutdown", NVML_WAIT_S)(self.nvml.shutdown)
        if not done:
            logger.warning(f"NVML did not shut down within {NVML_WAIT_S:g} s; going on")

    def stop(self) -> None:
        self._stop.set()

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


_EFFECTS: dict[type, Callable[[Daemon, Any], None]] = {
    step.Save: Daemon._save,
    step.Publish: Daemon._publish,
    step.Log: Daemon._log,
    step.Restart: Daemon._restart,
    step.AbortSettle: Daemon._abort_settle,
    step.StopContainers: Daemon._stop_containers,
    step.CheckHealth: Daemon._check_health,
    step.WarmMember: Daemon._warm_member,
    step.Reply: Daemon._reply,
    step.CountIncident: Daemon._count_incident,
    step.CountTransition: Daemon._count_transition,
    step.Reprice: Daemon._reprice,
    step.WriteModel: Daemon._write_model,
    step.ForgetName: Daemon._forget_name,
    step.Reattach: Daemon._reattach,
}


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


def _names(seen: GpuFaultSeen, gpu: Gpu) -> bool:
    """Whether a fault record names this GPU (by UUID, PCI bus id, or index)."""
    if seen.gpu_uuid is not None:
        return seen.gpu_uuid == gpu.uuid
    if seen.pci_bus_id is not None:
        return seen.pci_bus_id == gpu.pci_bus_id
    return seen.index == gpu.index


def _stamp_ns(stamp: str) -> int:
    """Docker's StartedAt in epoch ns; 0 (unknown) for a stamp it should never write."""
    try:
        return parse_docker_time_ns(stamp)
    except ValueError:
        return 0


def _needs(config: FleetConfig, state: FleetState | None) -> dict[str, list[RungNeed]]:
    """Each service's rungs priced (measured figures preferred over estimates)."""
    return prices(config, state.measured if state is not None else None)


def _detectors(config: FleetConfig) -> dict[str, Detector]:
    return {name: _detector(svc) for name, svc in config.services.items()}


def _detector(service: ServiceConfig) -> Detector:
    extra = [compile_rule(r.id, r.incident_class, r.pattern) for r in service.rules]
    return Detector([*extra, *BUILTIN_RULES], runtime=service.runtime.value)


def _log_job_error(event: JobExecutionEvent) -> None:
    logger.error(f"scheduled job {event.job_id} failed: {event.exception}")
