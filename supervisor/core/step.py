"""The supervision step: every per-service decision of `fleetd run`, as one pure function.

    step(world, message, now) -> (world, effects)

The daemon receives messages (a matched log line, a Docker event, a timer tick, a control
request, a worker's result), hands each to `step` with the time, keeps the world it gets
back and carries out the effects (save the state, restart containers, answer a caller).
The step never touches Docker, NVML, files, threads or the clock, and never changes the
world it was given: the whole supervisor is tested here with plain values
(tests/test_step.py).

A change in flight has one phase per service (`Phase`), changed only in this module:

    IDLE      -> APPLYING   a decision (step down/up, a person's change, a restart)
    APPLYING  -> SETTLING   the containers restarted into a new model: health, warm-up
    APPLYING  -> IDLE       restarted with the same model (a GPU fault, failed health)
    APPLYING  -> RETRYING   the restart failed: the change stays recorded, retried later
    RETRYING  -> APPLYING   the retry is due (a reconcile tick)
    SETTLING  -> IDLE       the new model is ready, or failed to load (maybe a step down)
    IDLE      -> WARMING    a person asked to load an ensemble member
    WARMING   -> IDLE       it is loaded, or failed
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from supervisor.core import ops
from supervisor.core.backoff import APPLY_RETRY, GPU_FAULT_RESTART
from supervisor.core.config import FleetConfig
from supervisor.core.cordons import Move, moves_off, usable
from supervisor.core.endpoints import endpoint_of
from supervisor.core.errors import FleetdError, UsageError, http_status
from supervisor.core.gpus import Gpu
from supervisor.core.health import Health, observe, start_period_s
from supervisor.core.ladder import (
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
from supervisor.core.plan import RungNeed, gpu_budget_bytes
from supervisor.core.rules import IncidentClass, classify_event
from supervisor.core.rungs import RungSetup, measured_key, set_options, setup_for
from supervisor.core.runtimes import spec_of
from supervisor.core.state import (
    Cordon,
    FleetState,
    Incident,
    LogCursor,
    Measured,
    PendingChange,
    ServiceState,
    ServiceStatus,
    transition_json,
)
from supervisor.core.status import Live, gpus_json, status_json
from supervisor.core.units import format_duration, format_size

if TYPE_CHECKING:  # a worker's result; the module that makes it talks HTTP
    from supervisor.daemon.lifecycle import Settled


class Phase(StrEnum):
    IDLE = "idle"
    APPLYING = "applying"  # a worker prepares (pull, unload) and restarts the containers
    SETTLING = "settling"  # restarted into a new model: waiting for health and warm-up
    RETRYING = "retrying"  # the restart failed: retried when `retry_at` has passed
    WARMING = "warming"  # an ensemble member is being loaded on a person's request


@dataclass(frozen=True)
class Waiter:
    """A control call waiting for a change to be applied, and what it asked for."""

    call: int
    op: str
    asked: str


@dataclass(frozen=True)
class Flight:
    """What fleetd is doing with one service now; never saved (a restart starts afresh)."""

    phase: Phase = Phase.IDLE
    change: int = 0  # the id of the change in flight: results of older ones are stale
    new_model: bool = False  # the change loads another model (so a settle follows)
    activity: str | None = None  # what the change is doing now, for status and the log
    retry_at: float | None = None
    retries: int = 0  # failed restarts of the recorded change, for the backoff
    waiters: tuple[Waiter, ...] = ()
    health: Health = field(default_factory=Health)
    checking: bool = False  # a health check is in flight
    step_up_note: str | None = None  # why a due step up was not made (said once)
    # container -> when the run of the latest change started (epoch ns): a line of an
    # earlier run never counts against the rung the change brought
    runs: Mapping[str, int] = field(default_factory=dict)
    # the line that ended a new rung's settle (it ran out of memory while loading): the
    # evidence of the step down that follows, though the cooldown did not count it
    load_oom: Incident | None = None
    # a restart after a fault or a crash that the backoff holds back: made at this time
    restart_at: float | None = None

    @property
    def busy(self) -> bool:
        return self.phase in (Phase.APPLYING, Phase.WARMING)


@dataclass(frozen=True)
class World:
    """Everything the step decides from. `state` is what is saved; the rest is live."""

    config: FleetConfig
    state: FleetState
    needs: Mapping[str, Sequence[RungNeed]]  # per service, each rung priced (measured first)
    flights: Mapping[str, Flight] = field(default_factory=dict)
    gpus: tuple[Gpu, ...] = ()  # the latest NVML reading ("auto" GPUs only)
    gpu_problem: str | None = None
    managed: frozenset[int] = frozenset()  # host pids of the fleet's own containers
    bursts: BurstGrouper = field(default_factory=BurstGrouper)
    expected_stops: Mapping[str, float] = field(default_factory=dict)  # container -> until
    # container -> when its latest lines that matched a rule were stamped (the newest few)
    matched_at: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    # service -> the GPUs it is being moved to, off a cordoned one (its next restarts)
    moving: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    docker_up: bool = False
    docker_error: str | None = None  # why the engine is not reached (status shows it)
    started_at: float = 0.0
    daemon: Mapping[str, Any] = field(default_factory=dict)  # pid, version, config: status
    next_change: int = 1
    # Container name -> the service that watches it; derived from `config` when it is set.
    watched: Mapping[str, str] = field(default_factory=dict)
    # `mode: swarm`: service -> its task now (id, node, state, since), as the manager says
    tasks: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def policy(self) -> Policy:
        return Policy.from_config(self.config.policy)

    def flight(self, service: str) -> Flight:
        return self.flights.get(service) or Flight()

    def needs_bytes(self, service: str) -> list[int]:
        """The service's VRAM need per rung, in bytes."""
        return [n.need_bytes for n in self.needs[service]]


# --- messages: what the daemon hands the step ----------------------------------------


@dataclass(frozen=True)
class LineMatched:
    """A log line that a rule matched, from a container's follower."""

    container: str
    container_id: str
    time_ns: int
    run_ns: int  # when that run of the container started (0: unknown)
    rule: str
    incident_class: str
    text: str


@dataclass(frozen=True)
class ContainerEvent:
    container: str
    container_id: str
    action: str  # start, die, oom, destroy, health_status ...
    time_ns: int
    exit_code: int | None = None
    last_lines: tuple[str, ...] = ()  # a non-zero exit: what the run printed last
    explained: bool = False  # a line of the run's end matched a rule (the daemon read it)


@dataclass(frozen=True)
class Tick:
    """A timer: reconcile, health:<service>, step_up, step_up_window."""

    job: str


@dataclass(frozen=True)
class GpusRead:
    """NVML's reading (and, when known, the fleet's own GPU processes)."""

    gpus: tuple[Gpu, ...]
    problem: str | None = None
    managed: frozenset[int] | None = None  # None: unchanged


@dataclass(frozen=True)
class DockerState:
    up: bool
    error: str | None = None  # why not, when not up


@dataclass(frozen=True)
class TasksSeen:
    """`mode: swarm`: each service's current task as the manager reports it (for status)."""

    tasks: Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True)
class Checkpoint:
    """Where each follower has read up to, saved so a restart of fleetd reads on."""

    cursors: Mapping[str, LogCursor]


@dataclass(frozen=True)
class Request:
    """A control call: status, history, reset, downgrade, upgrade, pin, unpin, warm."""

    call: int
    op: str
    service: str | None
    args: Mapping[str, Any]
    who: str  # who asked, for the history


@dataclass(frozen=True)
class GpuFault:
    """A GPU failed (a critical Xid, off the bus, lost to NVML): cordon it, move its
    services to healthy GPUs."""

    gpu: int
    reason: str  # "Xid 79", "fallen off the bus", "GPU lost"
    evidence: str
    source: str  # where it was seen: nvml-event, kernel-log, nvml
    uuid: str | None = None


@dataclass(frozen=True)
class StopExpected:
    """A worker is about to stop a container: its exit is ours, not a RAM kill."""

    container: str
    until: float


@dataclass(frozen=True)
class Applied:
    """A worker restarted (or failed to restart) a service's containers."""

    service: str
    change: int
    error: str | None
    settles: bool = False  # a new model: `SettleDone` follows (health, warm-up)
    # When each restarted container's new run started (epoch ns, Docker's StartedAt):
    # lines of earlier runs were printed by the rung the service has left.
    runs: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class SettleDone:
    change: int
    result: Settled


@dataclass(frozen=True)
class Progress:
    service: str
    change: int
    text: str


@dataclass(frozen=True)
class HealthChecked:
    service: str
    ok: bool
    error: str | None
    started_at: float | None = None  # a failed check: when the checked run started (epoch s)


@dataclass(frozen=True)
class FootprintRead:
    """The runtime's own report of what a run of `rung` allocated (its start-up log)."""

    service: str
    model: str
    measured: Measured
    rung: int | None = None  # None: the rung the service is on, if it runs `model`


@dataclass(frozen=True)
class MemberWarmed:
    call: int
    change: int
    result: Settled
    refused: str | None = None  # fleetd cannot reach the service's runtime at all


@dataclass(frozen=True)
class Repriced:
    """The VRAM needs per rung, priced again (after a measurement or a reload)."""

    needs: Mapping[str, Sequence[RungNeed]]


@dataclass(frozen=True)
class Resume:
    """fleetd started: complete the changes a restart of fleetd interrupted."""


@dataclass(frozen=True)
class Reconfigure:
    """A config to run with: at start-up, or a reload (SIGHUP, `fleetctl reload`).

    `planned` is the planner's rung for each service (None: it fits nowhere), given for
    services that have no rung yet; `needs` are the new config's VRAM needs per rung."""

    config: FleetConfig
    needs: Mapping[str, Sequence[RungNeed]]
    planned: Mapping[str, int | None]
    starting: bool = False
    call: int | None = None  # a `fleetctl reload` waiting for the outcome


Message = (
    LineMatched
    | ContainerEvent
    | Tick
    | GpusRead
    | DockerState
    | TasksSeen
    | Checkpoint
    | Request
    | StopExpected
    | Applied
    | SettleDone
    | Progress
    | HealthChecked
    | FootprintRead
    | MemberWarmed
    | Repriced
    | Resume
    | Reconfigure
    | GpuFault
)


# --- effects: what the daemon carries out ---------------------------------------------


@dataclass(frozen=True)
class Save:
    """Write state.json (atomically) and publish the metrics snapshot."""


@dataclass(frozen=True)
class Publish:
    """Publish the metrics snapshot (nothing to save)."""


@dataclass(frozen=True)
class Log:
    level: str  # DEBUG INFO WARNING ERROR CRITICAL
    text: str


@dataclass(frozen=True)
class Restart:
    """Restart the service's containers on `model`, handing `setup` off first for a
    recorded change; a worker reports `Applied`, then `SettleDone` when it settles a new
    rung (another model, or the same one with other options)."""

    service: str
    change: int
    old_model: str
    model: str
    handoff: bool  # a recorded change (write the hand-off), not a restart of the same
    setup: RungSetup  # what the rung hands its container (a recreate sets it again)
    new_rung: bool = False  # the rung changes: prepare and settle it


@dataclass(frozen=True)
class AbortSettle:
    """The model being loaded ran out of VRAM: end that change's wait now."""

    service: str
    change: int


@dataclass(frozen=True)
class StopContainers:
    service: str
    containers: tuple[str, ...]
    timeout_s: float


@dataclass(frozen=True)
class CheckHealth:
    service: str


@dataclass(frozen=True)
class WarmMember:
    service: str
    change: int
    call: int
    model: str
    others: tuple[str, ...]  # the ensemble's other members, unloaded first


@dataclass(frozen=True)
class Reply:
    call: int
    status: int
    body: Any


@dataclass(frozen=True)
class CountIncident:
    service: str
    incident_class: str
    latency_s: float


@dataclass(frozen=True)
class CountTransition:
    service: str
    record: Any  # state.Transition
    op: str | None


@dataclass(frozen=True)
class Reprice:
    """A measurement was recorded: price the rungs again (the daemon answers `Repriced`)."""


@dataclass(frozen=True)
class WriteModel:
    """Write the service's hand-off files (and the compose .env when it has one)."""

    service: str
    setup: RungSetup

    @property
    def model(self) -> str:
        return self.setup.model


@dataclass(frozen=True)
class ForgetName:
    """Delete the stable model fleetd created for a service that left the config."""

    service: str
    runtime: str
    endpoint: str
    name: str


@dataclass(frozen=True)
class Reattach:
    """Follow these services' containers afresh (their rules changed, or they are gone)."""

    services: frozenset[str]


Effect = (
    Save
    | Publish
    | Log
    | Restart
    | AbortSettle
    | StopContainers
    | CheckHealth
    | WarmMember
    | Reply
    | CountIncident
    | CountTransition
    | Reprice
    | WriteModel
    | Reattach
    | ForgetName
)


def fail(call: int, kind: str, message: str) -> Reply:
    return Reply(call, http_status(kind), {"error": message, "kind": kind})


# --- the step ------------------------------------------------------------------------


def step(world: World, message: Message, now: float) -> tuple[World, list[Effect]]:
    """One message in: the next world and what to do, in order."""
    turn = _Turn(world, now)
    handler = _HANDLERS[type(message)]
    handler(turn, message)
    return turn.finish()


class _Turn:
    """One step's working copy: the world's mutable parts are copied before any change,
    so the world passed in is never modified."""

    def __init__(self, world: World, now: float) -> None:
        self.world, self.now = world, now
        self.state = FleetState(
            version=world.state.version,
            services=dict(world.state.services),
            history=world.state.history,  # shared: a turn that adds a record copies it
            log_cursors=dict(world.state.log_cursors),
            measured=dict(world.state.measured),
            cordoned=dict(world.state.cordoned),
        )
        self.flights = dict(world.flights)
        self.expected_stops = dict(world.expected_stops)
        self.bursts = world.bursts.copy()
        self.effects: list[Effect] = []
        self.changes: dict[str, Any] = {}

    # the world as this turn leaves it
    def finish(self) -> tuple[World, list[Effect]]:
        world = replace(
            self.world,
            state=self.state,
            flights=self.flights,
            expected_stops=self.expected_stops,
            bursts=self.bursts,
            **self.changes,
        )
        return world, self.effects

    @property
    def config(self) -> FleetConfig:
        return self.world.config

    def flight(self, service: str) -> Flight:
        return self.flights.get(service) or Flight()

    def set_flight(self, service: str, **changes: Any) -> Flight:
        flight = replace(self.flight(service), **changes)
        self.flights[service] = flight
        return flight

    def log(self, level: str, text: str) -> None:
        self.effects.append(Log(level, text))

    def save(self) -> None:
        if Save() not in self.effects:
            self.effects.append(Save())

    def new_change(self) -> int:
        change = self.changes.get("next_change", self.world.next_change)
        self.changes["next_change"] = change + 1
        return int(change)


# --- incidents ------------------------------------------------------------------------


def _on_line(turn: _Turn, line: LineMatched) -> None:
    service = turn.world.watched.get(line.container)
    if service is None:
        return
    # Any matched line explains the container's exit that follows, counted or not (a
    # line of the run a change is leaving is not counted, but its exit is no crash loop).
    recent = turn.world.matched_at.get(line.container, ())
    stamp = line.time_ns / 1e9
    turn.changes["matched_at"] = {**turn.world.matched_at, line.container: (*recent[-7:], stamp)}
    if _printed_by_the_rung_left(turn, service, line):
        turn.log(
            "DEBUG",
            f"{service}: not counted, printed by the run before the change: {line.text.strip()}",
        )
        return
    at = line.time_ns / 1e9
    if not turn.bursts.opens_incident(line.container, line.incident_class, at, line.run_ns or None):
        return  # a later line of a burst already counted
    # The cursor goes into the same save as the incident: a kill -9 right after it never
    # re-reads (and re-counts) this burst.
    turn.state.log_cursors[line.container] = LogCursor(line.container_id, line.time_ns)
    seen = Observed(
        at,
        IncidentClass(line.incident_class),
        line.rule,
        line.container,
        line.container_id,
        line.text,
    )
    _incident(turn, service, seen)


# After Docker reports a `kill` (a stop by fleetd or a person sends one), the container's
# exit within this long is that stop's.
PERSON_STOP_S = 30.0


def _printed_by_the_rung_left(turn: _Turn, service: str, line: LineMatched) -> bool:
    """Whether the line comes from a run of a container that a change in flight is about
    to restart (it runs the rung being left), or from a run older than the one the latest
    change started. A runtime may print its error twice (vLLM: its logger, then the
    engine process's traceback) and Docker may restart a failed container before fleetd
    does: none of that is about the new rung."""
    flight = turn.flight(service)
    restarted = turn.config.services[service].restarted
    if flight.phase is Phase.APPLYING and flight.new_model and line.container in restarted:
        return True
    started = flight.runs.get(line.container)
    if started is None:
        return False
    return (line.run_ns or line.time_ns) < started


def _on_event(turn: _Turn, event: ContainerEvent) -> None:
    service = turn.world.watched.get(event.container)
    if service is None:
        return
    if event.action == "start":  # a new run: the stop that was expected is over
        turn.expected_stops.pop(event.container, None)
        return
    if event.action == "kill":  # someone stops it (`docker stop`, `docker kill`): its exit
        until = turn.now + PERSON_STOP_S  # that follows is neither a RAM kill nor a crash
        turn.expected_stops[event.container] = max(
            until, turn.expected_stops.get(event.container, 0.0)
        )
        return
    rule = classify_event(event.action, event.exit_code)
    if rule is None:
        return
    if turn.expected_stops.get(event.container, 0.0) > turn.now:
        return  # a stop fleetd or a person made, not a RAM kill or a crash
    runtime = spec_of(turn.config.services[service].runtime)
    if rule.incident_class == IncidentClass.CRASH and runtime.api is None:
        return  # an app may finish its work and exit 0; only a server never does
    if rule.incident_class == IncidentClass.CRASH_LOOP and _explained(turn, event):
        return  # a line already told why (and counted as what it is)
    crash_loop = rule.incident_class == IncidentClass.CRASH_LOOP  # each exit is its own run
    opens = turn.bursts.opens_incident(event.container, rule.incident_class, event.time_ns / 1e9)
    if not (opens or crash_loop):
        return  # one kill: Docker's `oom` event, then its `die` with exit 137
    text = f"container {event.container} {event.action} (exit {event.exit_code})"
    if crash_loop:
        last = " | ".join(line.strip() for line in event.last_lines) or "(nothing)"
        text = f"container {event.container} exited {event.exit_code}; its last lines: {last}"
    seen = Observed(
        event.time_ns / 1e9,
        rule.incident_class,
        rule.id,
        event.container,
        event.container_id,
        text,
    )
    _incident(turn, service, seen)


# A non-zero exit this soon after a line that matched a rule is that line's doing.
EXPLAINED_S = 30.0


def _explained(turn: _Turn, event: ContainerEvent) -> bool:
    """Whether a line of the container's log matched a rule shortly before it exited, or
    among the run's last lines (the daemon reads them at the exit); or the exit code is
    unknown (nothing to go on)."""
    if event.exit_code is None or event.explained:
        return True
    died = event.time_ns / 1e9
    return any(
        died - EXPLAINED_S <= at <= died for at in turn.world.matched_at.get(event.container, ())
    )


def _incident(turn: _Turn, service: str, seen: Observed) -> None:
    flight = turn.flight(service)
    if (
        seen.incident_class == VRAM_OOM
        and flight.new_model
        and flight.phase
        in (
            Phase.APPLYING,
            Phase.SETTLING,
        )
    ):
        turn.effects.append(AbortSettle(service, flight.change))  # the new model does not fit
        if flight.load_oom is None:
            oom = Incident(
                seen.time, seen.incident_class, seen.rule, seen.container_id, seen.evidence
            )
            turn.set_flight(service, load_oom=oom)
    svc = turn.state.services[service]
    new, decision = transition(
        svc, seen, turn.config.services[service], turn.world.needs_bytes(service), turn.world.policy
    )
    turn.state.services[service] = new
    latency_s = turn.now - seen.time
    turn.effects.append(CountIncident(service, seen.incident_class, latency_s))
    turn.log(
        _level(decision),
        f"{service}: {seen.incident_class} incident ({seen.rule}) in "
        f"{seen.container}: {decision.reason} | evidence: {seen.evidence.strip()} "
        f"| detected {latency_s * 1000:.0f} ms after the line",
    )
    if new is not svc:
        turn.save()
    _act(turn, service, decision)


def _act(turn: _Turn, service: str, decision: Decision) -> None:
    if decision.action is Action.STEP_DOWN:
        _apply(turn, service)
    elif decision.action is Action.EXHAUSTED:
        svc = turn.state.services[service]
        turn.log(
            "CRITICAL",
            f"{service}: EXHAUSTED at rung {svc.rung} ({svc.model}): no smaller model "
            "left; stopping its containers so they do not crash-loop (kept for inspection)",
        )
        _stop_containers(turn, service)
    elif decision.action is Action.RESTART:
        _restart_after_fault(turn, service)


# --- applying changes ------------------------------------------------------------------


def _apply(turn: _Turn, service: str) -> None:
    """Hand off the pending model and restart the service's containers (a worker)."""
    if turn.flight(service).busy:
        return  # the change in flight finishes first; the pending one is retried
    svc = turn.state.services[service]
    pending = svc.pending
    assert pending is not None, "_apply needs a recorded decision"
    if pending.gpu is None:  # the record shows what the GPUs held when it was made
        pending = replace(pending, gpu=gpu_reading(turn.world))
        svc = turn.state.services[service] = replace(svc, pending=pending)
    new_rung = pending.to_rung != svc.rung or pending.to_model != svc.model
    _restart(turn, service, svc.model, pending.to_model, pending.to_rung, new_rung)


def _restart(
    turn: _Turn, service: str, old: str, model: str, rung: int | None = None, new_rung: bool = False
) -> None:
    """Restart the service's containers; with `rung`, a recorded change to that rung is
    handed off first (its setup: model, options, stable name)."""
    change = turn.new_change()
    turn.set_flight(
        service,
        phase=Phase.APPLYING,
        change=change,
        new_model=new_rung,
        retry_at=None,
        load_oom=None,  # a new change: the line that ended the last one's settle is old
    )
    svc = turn.state.services.get(service)
    at = rung if rung is not None else (svc.rung if svc is not None else 0)
    moving = turn.changes.get("moving", turn.world.moving).get(service)
    setup = rung_setup(turn.world, service, at, turn.state, moving)
    turn.effects.append(Restart(service, change, old, model, rung is not None, setup, new_rung))


def rung_setup(
    world: World,
    service: str,
    rung: int,
    state: FleetState | None = None,
    gpus: tuple[int, ...] | None = None,
) -> RungSetup:
    """What `service` on `rung` hands its container, sized by the plan on the GPUs as
    last read (vLLM's share of its GPU follows the rung); `gpus` when it moves to them."""
    from supervisor.core.gpus import Discovery

    needs = world.needs.get(service) or ()
    need = needs[min(rung, len(needs) - 1)].need_bytes if needs else 0
    state = state or world.state
    discovery = Discovery(gpus=usable(world.gpus, state.cordoned), problem=world.gpu_problem)
    total = ops.gpu_total_for(
        world.config, state, service, rung, discovery, world.needs, world.managed
    )
    setup = setup_for(world.config, service, rung, need, total)
    return setup if gpus is None else replace(setup, gpus=gpus)


def _on_applied(turn: _Turn, done: Applied) -> None:
    flight = turn.flight(done.service)
    if flight.change != done.change or flight.phase is not Phase.APPLYING:
        return
    svc = turn.state.services.get(done.service)
    settles = done.error is None and done.settles
    turn.set_flight(
        done.service,
        phase=Phase.SETTLING if settles else Phase.IDLE,
        new_model=settles,
        activity=flight.activity if settles else None,
        runs={**flight.runs, **dict(done.runs)},
    )
    if svc is None or svc.pending is None:
        if done.error is not None:
            turn.log("ERROR", f"{done.service}: restart failed: {done.error}")
        return
    if done.error is not None:
        _retry_later(turn, done.service, svc.pending.to_model, done.error)
        return
    new, record = apply_change(svc, done.service, turn.now, turn.config.services.get(done.service))
    turn.state.services[done.service] = new
    turn.state.history = [*turn.state.history, record]
    waiters = flight.waiters
    turn.set_flight(done.service, waiters=(), retries=0)
    turn.effects.append(CountTransition(done.service, record, waiters[0].op if waiters else None))
    turn.save()
    turn.log(
        "WARNING",
        f"{done.service}: now rung {record.to_rung} ({record.to_model}"
        f"{_with_options(record.to_options)}), was rung {record.from_rung} "
        f"({record.from_model}{_with_options(record.from_options)}): {record.reason}"
        + (f" | gpu: {record.gpu}" if record.gpu else ""),
    )
    restarted = ", ".join(turn.config.services[done.service].restarted)
    for waiter in waiters:
        body = {
            "service": done.service,
            "message": f"{waiter.asked}; restarted {restarted}",
            "transition": transition_json(record),
        }
        turn.effects.append(Reply(waiter.call, 200, body))


def _with_options(options: Mapping[str, object] | None) -> str:
    """`, context 8192` for a rung that sets options; nothing for one that sets none."""
    text = set_options(options)
    return f", {text}" if text else ""


def _retry_later(turn: _Turn, service: str, model: str, error: str) -> None:
    flight = turn.flight(service)
    retries = flight.retries + 1
    wait_s = APPLY_RETRY.delay_s(retries)
    turn.set_flight(
        service, phase=Phase.RETRYING, retry_at=turn.now + wait_s, retries=retries, waiters=()
    )
    message = f"{service}: could not apply {model}: {error}"
    turn.log("ERROR", f"{message}; will retry in {wait_s:.0f} s")
    for waiter in flight.waiters:
        turn.effects.append(
            fail(waiter.call, "failed", f"{message}; the change is recorded and fleetd retries it")
        )


def _restart_after_fault(turn: _Turn, service: str) -> None:
    """A GPU fault or a crash: restart with the same model, backing off (the count
    decays). A restart the backoff holds back is made when the wait is over (the
    reconcile), never dropped: a container nobody restarts would stay down."""
    svc = turn.state.services[service]
    failures = GPU_FAULT_RESTART.failures_now(svc.restarts, svc.last_restart_at, turn.now)
    wait_s = GPU_FAULT_RESTART.delay_s(failures)
    if failures and svc.last_restart_at is not None and turn.now < svc.last_restart_at + wait_s:
        due = svc.last_restart_at + wait_s
        if turn.flight(service).restart_at != due:
            turn.log(
                "WARNING",
                f"{service}: restart held back ({wait_s:.0f} s backoff): in {due - turn.now:.1f} s",
            )
        turn.set_flight(service, restart_at=due)
        return
    turn.state.services[service] = replace(svc, restarts=failures + 1, last_restart_at=turn.now)
    turn.set_flight(service, restart_at=None)
    turn.save()
    if not turn.flight(service).busy:
        _restart(turn, service, svc.model, svc.model)


def _stop_containers(turn: _Turn, service: str) -> None:
    """Stop (not remove) a service's containers: Docker never restarts a manual stop."""
    names = tuple(turn.config.services[service].restarted)
    stop_s = turn.config.policy.stop_timeout
    for name in names:
        turn.expected_stops[name] = turn.now + stop_s + 5
    turn.effects.append(StopContainers(service, names, stop_s))


def _on_stop_expected(turn: _Turn, message: StopExpected) -> None:
    turn.expected_stops[message.container] = max(
        message.until, turn.expected_stops.get(message.container, 0.0)
    )


# --- settling a change, health, stepping up -----------------------------------------


def _on_progress(turn: _Turn, progress: Progress) -> None:
    flight = turn.flight(progress.service)
    if flight.change == progress.change and flight.phase is not Phase.IDLE:
        turn.set_flight(progress.service, activity=progress.text)
        turn.log("INFO", f"{progress.service}: {progress.text}")
    else:  # a change a newer one replaced, finishing its wait: not what runs now
        turn.log("DEBUG", f"{progress.service}: (an earlier change) {progress.text}")


def _on_settled(turn: _Turn, done: SettleDone) -> None:
    result = done.result
    name = result.service
    flight = turn.flight(name)
    if flight.change != done.change or flight.phase is not Phase.SETTLING:
        turn.log("DEBUG", f"{name}: a newer change replaced {result.model}'s settle")
        return
    turn.set_flight(name, phase=Phase.IDLE, activity=None, new_model=False)
    if result.ok:
        _record_measured(turn, result)
        turn.log("INFO", f"{name}: {result.model} {result.detail}{_vram_note(turn, result)}")
        return
    svc = turn.state.services.get(name)
    if not result.oom or svc is None or name not in turn.config.services:
        turn.log("ERROR", f"{name}: {result.model} did not become ready: {result.detail}")
        turn.set_flight(name, activity=f"not ready: {result.detail}")
        return
    if svc.pending is not None or svc.model != result.model:
        return  # the OOM already moved it (probation), or a change is on its way
    new, decision = load_failed(
        svc, turn.config.services[name], turn.world.needs_bytes(name), turn.now, flight.load_oom
    )
    turn.state.services[name] = new
    turn.save()
    turn.log(_level(decision), f"{name}: {decision.reason}")
    _act(turn, name, decision)


def _record_measured(turn: _Turn, result: Settled) -> None:
    """Keep what a settled model really used; the planner prices its rung with it."""
    if result.measured is not None:
        rung = _rung_of(turn, result.service, result.model, result.rung)
        key = _measured_key(turn, result.service, result.model, rung)
        _keep_measured(turn, result.service, key, result.measured, rung)


def _rung_of(turn: _Turn, service: str, model: str, rung: int | None) -> int | None:
    """The rung a result is about: its own, else the service's when it runs `model`."""
    if rung is not None:
        return rung
    svc = turn.state.services.get(service)
    return svc.rung if svc is not None and svc.model == model else None


def _measured_key(turn: _Turn, service: str, model: str, rung: int | None) -> str:
    """Where a measurement of `model` (on `rung`, when known) is kept: by the rung's model
    and options; an ensemble's member by its own entry."""
    config = turn.config.services.get(service)
    if config is None:
        return model
    if rung is None or config.ensemble is not None:
        member = next((r for r in config.ensemble or config.ladder if r.model == model), None)
        return measured_key(member) if member is not None else model
    return measured_key(config.ladder[min(rung, len(config.ladder) - 1)])


def _keep_measured(
    turn: _Turn, service: str, key: str, new: Measured, rung: int | None = None
) -> None:
    """Record a measurement, keeping what the other source knew: a buffer report (from the
    log) and a warm-up (from the API) arrive separately for the same run. A report keeps
    the estimate it replaces beside it, for `status`."""
    old = turn.state.measured.get(key)
    if old is not None:
        if new.parts is None and old.parts is not None and new.vram_bytes is None:
            new = replace(
                old, load_s=new.load_s, tokens_per_s=new.tokens_per_s, at=new.at
            )  # a warm-up of the run whose report is known
        elif new.tokens_per_s is None and old.tokens_per_s is not None:
            new = replace(new, load_s=old.load_s, tokens_per_s=old.tokens_per_s)
    if new.parts is not None and new.estimate_bytes is None:
        new = replace(new, estimate_bytes=_estimate_of(turn, service, rung, old))
    turn.state.measured[key] = new
    turn.effects.append(Reprice())
    turn.save()


def _estimate_of(turn: _Turn, service: str, rung: int | None, old: Measured | None) -> int | None:
    """What the plan priced the rung at before any measurement of it."""
    needs = turn.world.needs.get(service, ())
    need = needs[rung] if rung is not None and rung < len(needs) else None
    if need is not None and need.source != "measured":
        return need.need_bytes
    return old.estimate_bytes if old is not None else None


def _on_footprint(turn: _Turn, read: FootprintRead) -> None:
    """The runtime reported what its run allocated: the rung it runs is priced with it."""
    svc = turn.state.services.get(read.service)
    rung = _rung_of(turn, read.service, read.model, read.rung)
    left = svc is None or svc.rung != rung or svc.model != read.model
    if left or read.service not in turn.config.services:
        return  # a run of a rung the service has left
    key = _measured_key(turn, read.service, read.model, rung)
    estimate = _estimate_of(turn, read.service, rung, turn.state.measured.get(key))
    was = f" (estimated {format_size(estimate)} with overhead)" if estimate else ""
    size = format_size(read.measured.vram_bytes or 0)
    turn.log("INFO", f"{read.service}: {read.model} allocated {size} by its own report{was}")
    _keep_measured(turn, read.service, key, replace(read.measured, estimate_bytes=estimate), rung)


def _vram_note(turn: _Turn, result: Settled) -> str:
    vram = result.measured.vram_bytes if result.measured else None
    if vram is None:
        return ""
    rung = _rung_of(turn, result.service, result.model, result.rung)
    needs = turn.world.needs_bytes(result.service)
    planned = f" (planned {format_size(needs[rung])})" if rung is not None else ""
    memory = "host memory" if turn.config.accelerator == "cpu" else "VRAM"
    return f"; {format_size(vram)} {memory} measured{planned}"


def _check_health(turn: _Turn, service: str) -> None:
    """Start one health check unless a change or a check is in flight."""
    svc = turn.state.services.get(service)
    flight = turn.flight(service)
    if svc is None or service not in turn.config.services or flight.checking:
        return
    if flight.phase is not Phase.IDLE or svc.state is ServiceStatus.EXHAUSTED:
        return
    turn.set_flight(service, checking=True)
    turn.effects.append(CheckHealth(service))


def _on_health(turn: _Turn, result: HealthChecked) -> None:
    flight = turn.set_flight(result.service, checking=False)
    if result.service not in turn.config.services or flight.busy:
        return
    service = turn.config.services[result.service]
    config = service.health
    if not result.ok and result.started_at is not None:
        grace_s = start_period_s(service)
        if turn.now - result.started_at < grace_s:  # still loading: not a failure yet
            turn.log(
                "DEBUG",
                f"{result.service}: not answering yet, {turn.now - result.started_at:.0f} s "
                f"into its {grace_s:.0f} s start period ({result.error})",
            )
            return
    health, verdict = observe(flight.health, result.ok, result.error, turn.now, config)
    turn.set_flight(result.service, health=health)
    turn.effects.append(Publish())
    if verdict.message:
        turn.log("INFO" if result.ok else "WARNING", f"{result.service}: {verdict.message}")
    if verdict.restart:
        svc = turn.state.services[result.service]
        _restart(turn, result.service, svc.model, svc.model)


def _try_step_up(turn: _Turn, window_open: bool) -> None:
    """Step a quiet service one rung up when the bigger rung fits (predicted first)."""
    policy = turn.world.policy
    for name, svc in list(turn.state.services.items()):
        if name not in turn.config.services or turn.flight(name).phase is not Phase.IDLE:
            continue
        if not step_up_due(svc, turn.now, policy, turn.world.started_at, window_open):
            continue
        fit = _fit(turn, name, svc.rung - 1)
        if not fit.fits:
            if turn.flight(name).step_up_note != fit.reason:
                turn.log("INFO", f"{name}: a step up is due but rung {svc.rung - 1} {fit.reason}")
            turn.set_flight(name, step_up_note=fit.reason)
            continue
        turn.set_flight(name, step_up_note=None)
        quiet = (
            "in the off-peak window"
            if window_open
            else f"no vram_oom for {format_duration(policy.step_up_after_s)}"
        )
        config, needs = turn.config.services[name], turn.world.needs_bytes(name)
        new = step_up(svc, config, needs, turn.now, policy, f"{quiet}; {fit.reason}")
        turn.state.services[name] = new
        turn.save()
        assert new.pending is not None
        turn.log("WARNING", f"{name}: {new.pending.reason}")
        _apply(turn, name)


def _fit(turn: _Turn, service: str, rung: int) -> ops.Fit:
    from supervisor.core.gpus import Discovery

    world = turn.world
    discovery = Discovery(gpus=usable(world.gpus, turn.state.cordoned), problem=world.gpu_problem)
    return ops.check_fit(
        turn.config, turn.state, service, rung, discovery, world.needs, world.managed
    )


# --- ticks and readings ----------------------------------------------------------------


def _on_tick(turn: _Turn, tick: Tick) -> None:
    if tick.job == "reconcile":
        _reconcile(turn)
    elif tick.job.startswith("health:"):
        _check_health(turn, tick.job.removeprefix("health:"))
    elif tick.job in ("step_up", "step_up_window"):
        _try_step_up(turn, window_open=tick.job == "step_up_window")


def _reconcile(turn: _Turn) -> None:
    """End cooldowns and probations that have passed; retry changes that are due."""
    policy = turn.world.policy
    for name, svc in list(turn.state.services.items()):
        svc = end_probation(end_cooldown(svc, turn.now, policy), turn.now)
        turn.state.services[name] = svc
        flight = turn.flight(name)
        held = flight.restart_at
        if held is not None and turn.now >= held and name in turn.config.services:
            _restart_after_fault(turn, name)  # the backoff is over
            flight = turn.flight(name)
        due = flight.phase is not Phase.RETRYING or turn.now >= (flight.retry_at or 0.0)
        if svc.pending is not None and name in turn.config.services and due:
            if flight.phase is Phase.RETRYING:
                turn.set_flight(name, phase=Phase.IDLE)
            _apply(turn, name)
    turn.effects.append(Publish())


def _on_resume(turn: _Turn, _: Resume) -> None:
    for name, svc in list(turn.state.services.items()):
        if svc.pending is not None and name in turn.config.services:
            turn.log("WARNING", f"{name}: completing a change interrupted by a restart of fleetd")
            _apply(turn, name)


def _on_gpus(turn: _Turn, read: GpusRead) -> None:
    """A new NVML reading; a GPU lost or found again is said once."""
    before = _gpu_problems(turn.world.gpus, turn.world.gpu_problem)
    after = _gpu_problems(read.gpus, read.problem)
    for index, error in after.items():
        if before.get(index) != error:
            turn.log("ERROR", f"GPU {index if index >= 0 else '(all)'}: {error}")
    for index in set(before) - set(after):
        turn.log("WARNING", f"GPU {index if index >= 0 else '(all)'} is back")
    turn.changes.update(gpus=read.gpus, gpu_problem=read.problem)
    if read.managed is not None:
        turn.changes["managed"] = read.managed


def _gpu_problems(gpus: Sequence[Gpu], problem: str | None) -> dict[int, str | None]:
    problems = {g.index: g.error for g in gpus if not g.valid}
    if problem:
        problems[-1] = problem
    return problems


def _on_docker(turn: _Turn, message: DockerState) -> None:
    turn.changes["docker_up"] = message.up
    turn.changes["docker_error"] = None if message.up else message.error


def _on_tasks(turn: _Turn, seen: TasksSeen) -> None:
    turn.changes["tasks"] = {**turn.world.tasks, **seen.tasks}


def _on_checkpoint(turn: _Turn, checkpoint: Checkpoint) -> None:
    turn.state.log_cursors.update(checkpoint.cursors)
    turn.save()


def _on_repriced(turn: _Turn, priced: Repriced) -> None:
    turn.changes["needs"] = dict(priced.needs)


# --- the control API -------------------------------------------------------------------


def _on_request(turn: _Turn, request: Request) -> None:
    try:
        _answer(turn, request)
    except ops.Refused as e:
        turn.effects.append(fail(request.call, "refused", str(e)))
    except UsageError as e:
        turn.effects.append(fail(request.call, "usage", str(e)))
    except FleetdError as e:
        turn.effects.append(fail(request.call, "failed", str(e)))


def _answer(turn: _Turn, request: Request) -> None:
    if request.op == "status":
        report = status_report(turn.finish()[0], request.service, turn.now)
        turn.effects.append(Reply(request.call, 200, report))
    elif request.op == "history":
        records = [t for t in turn.state.history if request.service in (None, t.service)]
        turn.effects.append(Reply(request.call, 200, [transition_json(t) for t in records]))
    elif request.op == "warm":
        _warm_member(turn, request)
    elif request.op in ("cordon", "uncordon"):
        _cordon_request(turn, request)
    elif request.op in _OPS:
        _operate(turn, request)
    else:
        raise UsageError(f"unknown operation {request.op!r}")


_OPS = ("reset", "downgrade", "upgrade", "pin", "unpin")


def _operate(turn: _Turn, request: Request) -> None:
    name = request.service or ""
    if turn.flight(name).busy:
        raise ops.Refused(f"a change of {name} is being applied; try again in a few seconds")
    force = request.args.get("force") is True
    outcome = ops.dispatch(
        request.op,
        turn.state,
        turn.config,
        name,
        turn.now,
        request.who,
        lambda service, rung: _fit(turn, service, rung),
        rung=str(request.args.get("rung", "")),
        force=force,
    )
    turn.save()
    turn.log("WARNING", f"{outcome.message} ({request.op} {request.who})")
    if outcome.change is None:
        turn.effects.append(Reply(request.call, 200, outcome.to_json()))
        return
    flight = turn.flight(name)
    waiter = Waiter(request.call, request.op, outcome.message)
    turn.set_flight(name, waiters=(*flight.waiters, waiter))
    if flight.phase is Phase.RETRYING:
        turn.set_flight(name, phase=Phase.IDLE)
    _apply(turn, name)


def _warm_member(turn: _Turn, request: Request) -> None:
    """Load one member of an ensemble before its turn (the others are unloaded first)."""
    name, model = request.service or "", str(request.args.get("model") or "")
    service = turn.config.services.get(name)
    if service is None:
        raise UsageError(f"no service {name!r} in the config")
    members = [r.model for r in service.ensemble or []]
    if not members:
        raise ops.Refused(f"{name} has no `ensemble:`; warm loads one of its members")
    if model not in members:
        raise UsageError(f"{model!r} is not in {name}'s ensemble ({', '.join(members)})")
    if turn.flight(name).busy:
        raise ops.Refused(f"a change of {name} is being applied; try again in a few seconds")
    change = turn.new_change()
    turn.set_flight(name, phase=Phase.WARMING, change=change, new_model=False)
    others = tuple(m for m in members if m != model)
    turn.effects.append(WarmMember(name, change, request.call, model, others))


def _on_member_warmed(turn: _Turn, done: MemberWarmed) -> None:
    result = done.result
    flight = turn.flight(result.service)
    if flight.change == done.change and flight.phase is Phase.WARMING:
        turn.set_flight(result.service, phase=Phase.IDLE, activity=None)
    if done.refused is not None:
        turn.effects.append(fail(done.call, "refused", done.refused))
        return
    if not result.ok:
        turn.log("ERROR", f"{result.service}: warming {result.model} failed: {result.detail}")
        turn.effects.append(
            fail(done.call, "failed", f"{result.service}: {result.model}: {result.detail}")
        )
        return
    _record_measured(turn, result)
    message = f"{result.service}: {result.model} {result.detail}{_vram_note(turn, result)}"
    turn.log("INFO", message)
    body = {"service": result.service, "model": result.model, "message": message}
    turn.effects.append(Reply(done.call, 200, body))


def status_report(world: World, service: str | None, now: float) -> dict[str, Any]:
    """`fleetctl status` from the running fleetd: the saved state plus its live view."""
    from supervisor.core.gpus import Discovery

    flights = world.flights.items()
    live = Live(
        # a service's health is known once a check has answered
        health={n: f.health.to_json() for n, f in flights if f.health.last_check_at},
        activity={n: f.activity for n, f in flights},
        daemon={**world.daemon, "docker": world.docker_up, "docker_error": world.docker_error},
        tasks=world.tasks,
    )
    report = status_json(world.state, world.config, now, service, live)
    gpus = usable(world.gpus, world.state.cordoned)
    discovery = Discovery(gpus=gpus, problem=world.gpu_problem)
    report["gpus"] = gpus_json(discovery, world.config, world.managed)
    report["gpu_problem"] = world.gpu_problem
    return report


# --- reconfiguring: start-up and reload ---------------------------------------------------


def _on_reconfigure(turn: _Turn, message: Reconfigure) -> None:
    old, new = turn.config, message.config
    added = sorted(set(new.services) - set(old.services))
    removed = sorted(set(old.services) - set(new.services))
    changed = sorted(
        n for n in set(new.services) & set(old.services) if new.services[n] != old.services[n]
    )
    for name in changed:  # a changed ladder may have moved the current model
        svc = turn.state.services.get(name)
        if svc is not None and svc.rung >= len(new.services[name].ladder):
            del turn.state.services[name]
    turn.world = replace(turn.world, config=new, needs=dict(message.needs), watched=watched_by(new))
    turn.changes.update(config=new, needs=dict(message.needs), watched=turn.world.watched)
    if turn.bursts.window_s != new.policy.burst_window:  # a burst spanning a reload stays one
        turn.bursts = BurstGrouper(new.policy.burst_window, turn.bursts)
    _settle(turn, message.planned)
    turn.save()
    if message.starting:
        return
    turn.effects.append(Reattach(frozenset(changed) | frozenset(removed)))
    for name in removed:  # the stable model fleetd created for it goes with it
        gone = old.services[name]
        endpoint = endpoint_of(old, name)
        if spec_of(gone.runtime).can_create and gone.ensemble is None and endpoint:
            turn.effects.append(ForgetName(name, gone.runtime.value, endpoint, gone.client_name))
    summary = (
        f"config reloaded: added {added or '-'}, changed {changed or '-'}, removed {removed or '-'}"
    )
    turn.log("INFO", summary)
    if old.metrics != new.metrics:
        turn.log("WARNING", "metrics: a changed `metrics:` setting applies when fleetd restarts")
    if message.call is not None:
        turn.effects.append(Reply(message.call, 200, {"message": summary}))


def _settle(turn: _Turn, planned: Mapping[str, int | None]) -> None:
    """Each service on its persisted rung, else the plan's, else the top; hand each off
    (a recorded change's rung, when there is one)."""
    for name, service in turn.config.services.items():
        current = turn.state.services.get(name)
        if current is None or current.rung >= len(service.ladder):
            rung = planned.get(name) or 0
            current = ServiceState(model=service.ladder[rung].model, rung=rung)
            turn.log("INFO", f"{name}: starting at rung {rung} ({current.model})")
        elif current.model != service.ladder[current.rung].model:
            current = replace(current, model=service.ladder[current.rung].model)
        turn.state.services[name] = current
        # The rung the state names: a recorded change's (which its apply hands off first
        # anyway), else the current one; a reload never hands the old rung back.
        pending = current.pending
        named = pending.to_rung if pending and pending.to_rung < len(service.ladder) else None
        setup = rung_setup(turn.world, name, current.rung if named is None else named, turn.state)
        turn.effects.append(WriteModel(name, setup))
    for name in sorted(set(turn.state.services) - set(turn.config.services)):
        turn.log("INFO", f"{name}: no longer in the config; its state is kept")


def initial_world(
    config: FleetConfig,
    state: FleetState,
    needs: Mapping[str, Sequence[RungNeed]],
    started_at: float,
    daemon: Mapping[str, Any],
) -> World:
    """The world fleetd starts with: bursts recorded before a restart stay one incident."""
    bursts = BurstGrouper(config.policy.burst_window)
    names = {c.container_id: name for name, c in state.log_cursors.items()}
    for svc in state.services.values():
        for incident in svc.incidents:
            container = names.get(incident.container_id or "")
            if container is not None:
                bursts.seed(container, incident.incident_class, incident.time)
    return World(
        config=config,
        state=state,
        needs=dict(needs),
        bursts=bursts,
        started_at=started_at,
        daemon=dict(daemon),
        watched=watched_by(config),
    )


def watched_by(config: FleetConfig) -> Mapping[str, str]:
    """Container name -> the service that watches it."""
    return {c: n for n, svc in config.services.items() for c in svc.watched}


# --- cordoned GPUs ---------------------------------------------------------------------------


def _on_gpu_fault(turn: _Turn, fault: GpuFault) -> None:
    """A GPU failed: cordon it (once) and move what ran on it; never a step-down."""
    if fault.gpu in turn.state.cordoned:
        return
    uuid = fault.uuid or next((g.uuid for g in turn.world.gpus if g.index == fault.gpu), None)
    cordon = Cordon(turn.now, fault.reason, fault.evidence, f"fleetd ({fault.source})", uuid)
    _cordon(turn, fault.gpu, cordon)


def _cordon(turn: _Turn, gpu: int, cordon: Cordon) -> list[Move]:
    turn.state.cordoned[gpu] = cordon
    turn.save()
    evidence = f" | evidence: {cordon.evidence}" if cordon.evidence else ""
    turn.log("CRITICAL", f"GPU {gpu} cordoned ({cordon.reason}, by {cordon.by}){evidence}")
    world = turn.world
    moves = moves_off(turn.config, turn.state, gpu, world.gpus, world.needs, world.managed)
    for move in moves:
        _move(turn, move, f"GPU {gpu} cordoned ({cordon.reason})", cordon.evidence)
    turn.effects.append(Publish())
    return moves


def _move(turn: _Turn, move: Move, why: str, evidence: str | None) -> None:
    name = move.service
    if move.rung is None:
        turn.log("ERROR", f"{name}: {why}; {move.reason}: stopping its containers")
        _stop_containers(turn, name)
        return
    moving = dict(turn.changes.get("moving", turn.world.moving))
    moving[name] = move.gpus
    turn.changes["moving"] = moving
    svc = turn.state.services[name]
    if move.rung == svc.rung:
        turn.log("WARNING", f"{name}: {why}: {move.reason}")
        if not turn.flight(name).busy:
            _restart(turn, name, svc.model, svc.model)
        return
    to_model = turn.config.services[name].ladder[move.rung].model
    pending = PendingChange(
        move.rung, to_model, f"{why}: {move.reason}", turn.now, evidence, actor="fleetd"
    )
    turn.state.services[name] = replace(svc, pending=pending)
    turn.save()
    turn.log("WARNING", f"{name}: {pending.reason}")
    _apply(turn, name)


def _cordon_request(turn: _Turn, request: Request) -> None:
    gpu = request.args.get("gpu")
    known = {g.index for g in turn.world.gpus}
    if not isinstance(gpu, int) or isinstance(gpu, bool) or gpu not in known:
        listed = ", ".join(map(str, sorted(known))) or "none"
        raise UsageError(f"GPU {gpu!r}: expected the index of a GPU fleetd knows ({listed})")
    if request.op == "uncordon":
        if turn.state.cordoned.pop(gpu, None) is None:
            raise ops.Refused(f"GPU {gpu} is not cordoned")
        turn.save()
        turn.log("WARNING", f"GPU {gpu} uncordoned ({request.who}); it is planned on again")
        turn.effects.append(Publish())
        turn.effects.append(Reply(request.call, 200, {"gpu": gpu, "cordoned": False}))
        return
    if gpu in turn.state.cordoned:
        raise ops.Refused(f"GPU {gpu} is already cordoned ({turn.state.cordoned[gpu].reason})")
    reason = str(request.args.get("reason") or "cordoned by a person")
    uuid = next((g.uuid for g in turn.world.gpus if g.index == gpu), None)
    moves = _cordon(turn, gpu, Cordon(turn.now, reason, None, request.who, uuid))
    body = {
        "gpu": gpu,
        "cordoned": True,
        "moves": [
            {"service": m.service, "from_rung": m.from_rung, "rung": m.rung,
             "gpus": list(m.gpus), "reason": m.reason}
            for m in moves
        ],
    }  # fmt: skip
    turn.effects.append(Reply(request.call, 200, body))


# --- helpers shared with the daemon --------------------------------------------------------


def gpu_reading(world: World) -> str | None:
    """NVML's last reading of every GPU, in one line, with the fleet's budget on each."""
    if world.config.gpus != "auto":
        return None
    readings = []
    for gpu in world.gpus:
        if not gpu.valid or gpu.used_bytes is None:
            continue
        budget = format_size(gpu_budget_bytes(world.config, gpu, world.managed))
        readings.append(
            f"GPU {gpu.index} {gpu.name}: {format_size(gpu.used_bytes)} used of "
            f"{format_size(gpu.total_bytes)}, fleet budget {budget}"
        )
    return "; ".join(readings) or None


def _level(decision: Decision) -> str:
    return {
        Action.NONE: "INFO",
        Action.ALERT: "WARNING",
        Action.RESTART: "WARNING",
        Action.STEP_DOWN: "WARNING",
        Action.EXHAUSTED: "ERROR",
    }[decision.action]


_HANDLERS: dict[type, Any] = {
    LineMatched: _on_line,
    ContainerEvent: _on_event,
    Tick: _on_tick,
    GpusRead: _on_gpus,
    DockerState: _on_docker,
    TasksSeen: _on_tasks,
    Checkpoint: _on_checkpoint,
    Request: _on_request,
    StopExpected: _on_stop_expected,
    Applied: _on_applied,
    SettleDone: _on_settled,
    Progress: _on_progress,
    HealthChecked: _on_health,
    FootprintRead: _on_footprint,
    MemberWarmed: _on_member_warmed,
    Repriced: _on_repriced,
    Resume: _on_resume,
    Reconfigure: _on_reconfigure,
    GpuFault: _on_gpu_fault,
}
