"""fleetd's persistent state: the schema of `<state-dir>/state.json` and its codec (pure).

The file store (loading, atomic saving, the writers' lock, hand-off files) is
`supervisor/store.py`. The file is JSON (indent 2, mode 0644) written atomically, so a
crash or `kill -9` at any instant leaves either the previous or the new content:

    {"version": 1,
     "services": {"<name>": {"model", "rung", "state", "incidents", "changed_at",
                             "pinned", "pending", "restarts", "last_restart_at",
                             "probation_until", "step_up_failures", "step_up_not_before"}},
     "history": [{"time", "service", "from_rung", "to_rung", "from_model", "to_model",
                  "reason", "evidence", "rule", "container_id", "actor", "gpu",
                  "from_options", "to_options"}],
     "log_cursors": {"<container name>": {"container_id", "since_ns"}},
     "measured": {"<model> [<options>]": {"vram_bytes", "load_s", "tokens_per_s", "at",
                              "parts", "context", "parallel", "version", "estimate_bytes"}},
     "cordoned": {"<GPU index>": {"time", "reason", "evidence", "by", "uuid"}}}

Decoding is strict: an unknown key, a wrong type or a negative count is a schema problem
reported with its key path, the value and what was expected (the store moves such a
file aside and starts empty, with a note). History is append-only in memory; the file
keeps the newest `HISTORY_LIMIT` transitions. Services the config no longer lists are
kept: dropping them is the daemon's decision.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal, TypeVar

from supervisor.core.errors import FleetdError
from supervisor.core.rules import IncidentClass

SCHEMA_VERSION = 1
STATE_FILE = "state.json"
HISTORY_LIMIT = 10_000

Actor = Literal["fleetd", "fleetctl"]
T = TypeVar("T")

# Same rule as service names in the config; it also keeps `../` out of hand-off paths.
_SERVICE_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")


class StateError(FleetdError):
    """The state file or directory cannot be used (schema problem, permission, lock held)."""


class NewerStateError(StateError):
    """The state file was written by a fleetd with a newer schema than this one reads."""

    def __init__(self, version: int) -> None:
        super().__init__(
            f"version is {version}, expected {SCHEMA_VERSION} (written by a newer fleetd)"
        )
        self.version = version


class ServiceStatus(StrEnum):
    """Where a service stands on its ladder."""

    STEADY = "steady"
    COOLDOWN = "cooldown"
    EXHAUSTED = "exhausted"
    PINNED = "pinned"


@dataclass
class Incident:
    """One classified incident (a burst of log lines counts once); JSON key `class`."""

    time: float
    incident_class: IncidentClass
    rule: str
    container_id: str | None
    evidence: str


@dataclass
class PendingChange:
    """A decision recorded before it is applied, so a crash mid-change can finish it."""

    to_rung: int
    to_model: str
    reason: str
    decided_at: float
    evidence: str | None = None
    rule: str | None = None
    container_id: str | None = None
    actor: Actor = "fleetd"  # who decided: fleetd (an incident) or a person (fleetctl)
    probation_s: float | None = None  # a step up: on probation this long once applied
    gpu: str | None = None  # the GPU reading when it was decided (NVML), for the record


@dataclass
class ServiceState:
    """One service's place on its ladder and what led there."""

    model: str
    rung: int
    state: ServiceStatus = ServiceStatus.STEADY
    incidents: list[Incident] = field(default_factory=list)
    changed_at: float | None = None
    pinned: int | None = None
    pending: PendingChange | None = None
    restarts: int = 0
    last_restart_at: float | None = None
    probation_until: float | None = None  # after a step up: an OOM until then steps back
    step_up_failures: int = 0  # probations failed in a row: each doubles the wait
    step_up_not_before: float | None = None


@dataclass
class Measured:
    """What a model really used once loaded, and how it warmed up: VRAM from the runtime's
    API (Ollama's /api/ps), or its own buffer report in the start-up log (llama.cpp), which
    also gives the parts and holds for the options it ran with."""

    vram_bytes: int | None
    load_s: float | None
    tokens_per_s: float | None
    at: float
    parts: dict[str, int] | None = None  # model, kv, compute, output (a buffer report)
    context: int | None = None  # the rung's options the report holds for (None: default)
    parallel: int | None = None
    version: str | None = None  # the runtime's build that reported it
    estimate_bytes: int | None = None  # the rung's estimated need when it was measured

    def holds_for(self, context: int | None, parallel: int | None) -> bool:
        """Whether the figure prices a rung with these options (an API figure, with no
        parts, is taken for any: Ollama reports what the loaded model uses)."""
        return self.parts is None or (self.context, self.parallel) == (context, parallel)


@dataclass
class Transition:
    """One change of rung, with its reason and the evidence line that caused it."""

    time: float
    service: str
    from_rung: int
    to_rung: int
    from_model: str
    to_model: str
    reason: str
    evidence: str | None = None
    rule: str | None = None
    container_id: str | None = None
    actor: Actor = "fleetd"
    gpu: str | None = None  # the GPU reading when the change was decided (NVML)
    # The options of both rungs (context, parallel, kv_cache, tensor_parallel); None in a
    # record written before rungs had options.
    from_options: dict[str, int | str | None] | None = None
    to_options: dict[str, int | str | None] | None = None


@dataclass
class LogCursor:
    """Where reading a container's log left off, so no line is read twice or missed."""

    container_id: str
    since_ns: int


@dataclass(frozen=True)
class Cordon:
    """A GPU fleetd no longer plans on: it faulted (Xid, off the bus, lost), or a person
    cordoned it; it stays so until `fleetctl uncordon`."""

    time: float
    reason: str  # "Xid 79", "GPU lost", "cordoned by a person"
    evidence: str | None = None  # the kernel line, the NVML event or error
    by: str = "fleetd"  # fleetd, or who ran fleetctl cordon
    uuid: str | None = None  # the GPU's UUID when known (its index may change at boot)


@dataclass
class FleetState:
    """Everything in state.json; `FleetState()` is the empty state."""

    version: int = SCHEMA_VERSION
    services: dict[str, ServiceState] = field(default_factory=dict)
    history: list[Transition] = field(default_factory=list)
    log_cursors: dict[str, LogCursor] = field(default_factory=dict)
    measured: dict[str, Measured] = field(default_factory=dict)  # by model name
    cordoned: dict[int, Cordon] = field(default_factory=dict)  # by GPU index

    def to_json(self) -> str:
        """The file's text: indent 2, services sorted, the newest HISTORY_LIMIT transitions."""
        document = {
            "version": self.version,
            "services": {
                name: _service_json(self.services[name]) for name in sorted(self.services)
            },
            "history": [transition_json(t) for t in self.history[-HISTORY_LIMIT:]],
            "log_cursors": {
                name: {"container_id": c.container_id, "since_ns": c.since_ns}
                for name, c in sorted(self.log_cursors.items())
            },
            "measured": {name: measured_json(m) for name, m in sorted(self.measured.items())},
            "cordoned": {str(i): cordon_json(c) for i, c in sorted(self.cordoned.items())},
        }
        return json.dumps(document, indent=2, allow_nan=False, ensure_ascii=False) + "\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> FleetState:
        """Decode the file's bytes: UTF-8 text, then as `from_json`."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise StateError(f"not UTF-8: {e.reason} at byte {e.start}") from None
        return cls.from_json(text)

    @classmethod
    def from_json(cls, text: str) -> FleetState:
        """Decode the file's text; a StateError names the key, the value and what was expected."""
        try:
            document = json.loads(text, parse_int=_int)
        except json.JSONDecodeError as e:
            raise StateError(f"not valid JSON: {e}") from e
        except RecursionError:
            raise StateError("not a state file: nested too deeply") from None
        return _decode_fleet(_Object(document, ""))


_MAX_INT_DIGITS = 4300  # Python's own limit for turning text into an int


def _int(digits: str) -> int:
    """An integer of the file, refused when it has more digits than Python converts."""
    if len(digits) > _MAX_INT_DIGITS:
        raise StateError(
            f"not a state file: a number of {len(digits)} digits ({digits[:20]}...), "
            f"expected at most {_MAX_INT_DIGITS}"
        )
    return int(digits)


# ---------------------------------------------------------------- encoding


def _service_json(s: ServiceState) -> dict[str, object]:
    return {
        "model": s.model,
        "rung": s.rung,
        "state": s.state.value,
        "incidents": [_incident_json(i) for i in s.incidents],
        "changed_at": s.changed_at,
        "pinned": s.pinned,
        "pending": None if s.pending is None else _pending_json(s.pending),
        "restarts": s.restarts,
        "last_restart_at": s.last_restart_at,
        "probation_until": s.probation_until,
        "step_up_failures": s.step_up_failures,
        "step_up_not_before": s.step_up_not_before,
    }


def cordon_json(c: Cordon) -> dict[str, object]:
    return {"time": c.time, "reason": c.reason, "evidence": c.evidence, "by": c.by, "uuid": c.uuid}


def measured_json(m: Measured) -> dict[str, object]:
    found: dict[str, object] = {
        "vram_bytes": m.vram_bytes,
        "load_s": m.load_s,
        "tokens_per_s": m.tokens_per_s,
        "at": m.at,
    }
    if m.parts is not None:  # a buffer report: what it holds for, and its parts
        found.update(
            parts=dict(m.parts),
            context=m.context,
            parallel=m.parallel,
            version=m.version,
            estimate_bytes=m.estimate_bytes,
        )
    return found


def _incident_json(i: Incident) -> dict[str, object]:
    return {
        "time": i.time,
        "class": i.incident_class,
        "rule": i.rule,
        "container_id": i.container_id,
        "evidence": i.evidence,
    }


def _pending_json(p: PendingChange) -> dict[str, object]:
    return {
        "to_rung": p.to_rung,
        "to_model": p.to_model,
        "reason": p.reason,
        "decided_at": p.decided_at,
        "evidence": p.evidence,
        "rule": p.rule,
        "container_id": p.container_id,
        "actor": p.actor,
        "probation_s": p.probation_s,
        "gpu": p.gpu,
    }


def transition_json(t: Transition) -> dict[str, object]:
    """A transition as state.json writes it (also what `fleetctl history --json` prints)."""
    return {
        "time": t.time,
        "service": t.service,
        "from_rung": t.from_rung,
        "to_rung": t.to_rung,
        "from_model": t.from_model,
        "to_model": t.to_model,
        "reason": t.reason,
        "evidence": t.evidence,
        "rule": t.rule,
        "container_id": t.container_id,
        "actor": t.actor,
        "gpu": t.gpu,
        "from_options": t.from_options,
        "to_options": t.to_options,
    }


# ---------------------------------------------------------------- decoding

Convert = Callable[[object, str], T]


def _shown(value: object) -> str:
    """A value as it appears in the file, short; containers by their kind."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(where: str, value: object, expected: str) -> StateError:
    return StateError(f"{where or 'the top level'} is {_shown(value)}, expected {expected}")


# JSON's `"\ud800"` decodes to a lone surrogate: not a character, so nothing could print,
# log or save it again.
_SURROGATE = re.compile("[\ud800-\udfff]")
_TEXT = "text (no lone surrogate such as \\ud800)"


class _Object:
    """A JSON object being decoded: typed reads by key, each error naming the key path."""

    def __init__(self, value: object, where: str) -> None:
        if not isinstance(value, dict):
            raise _bad(where, value, "an object")
        for key in value:
            if _SURROGATE.search(key):
                raise StateError(f"{where or 'the top level'}: key {_shown(key)}, expected {_TEXT}")
        self.data: dict[str, object] = value
        self.where = where
        self._read: set[str] = set()

    def path(self, key: str) -> str:
        """The dotted path of `key` inside this object."""
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, convert: Convert[T]) -> T:
        """The value at a required `key`, converted."""
        self._read.add(key)
        if key not in self.data:
            raise StateError(f"{self.where or 'the top level'}: missing key {key!r}")
        return convert(self.data[key], self.path(key))

    def opt(self, key: str, convert: Convert[T], default: T) -> T:
        """The value at an optional `key`, converted, or `default` when the key is absent."""
        self._read.add(key)
        return convert(self.data[key], self.path(key)) if key in self.data else default

    def done(self) -> None:
        """Refuse keys nobody read: a typo must not silently drop a value."""
        unknown = sorted(set(self.data) - self._read)
        if unknown:
            raise StateError(
                f"{self.where or 'the top level'}: unknown key {unknown[0]!r} "
                f"(expected one of {', '.join(sorted(self._read))})"
            )


def _str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise _bad(where, value, "a string")
    if _SURROGATE.search(value):
        raise _bad(where, value, _TEXT)
    return value


def _count(value: object, where: str) -> int:
    # bool is an int in Python; `true` is not a rung.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad(where, value, "a non-negative integer")
    return value


# The end of year 9999, the last time a calendar (and `fleetctl history`) can show.
_LAST_SECOND = 253_402_300_799


def _seconds(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(where, value, "a time in epoch seconds (a number)")
    if abs(value) > _LAST_SECOND:
        raise _bad(where, value, "a time in epoch seconds before the year 10000")
    return float(value)


def _nullable(convert: Convert[T]) -> Convert[T | None]:
    def read(value: object, where: str) -> T | None:
        return None if value is None else convert(value, where)

    return read


def _status(value: object, where: str) -> ServiceStatus:
    if isinstance(value, str) and value in set(ServiceStatus):
        return ServiceStatus(value)
    raise _bad(where, value, "one of " + ", ".join(f'"{s}"' for s in ServiceStatus))


def _incident_class(value: object, where: str) -> IncidentClass:
    if isinstance(value, str) and value in set(IncidentClass):
        return IncidentClass(value)
    raise _bad(where, value, "one of " + ", ".join(f'"{c}"' for c in IncidentClass))


def _actor(value: object, where: str) -> Actor:
    if value == "fleetd":
        return "fleetd"
    if value == "fleetctl":
        return "fleetctl"
    raise _bad(where, value, '"fleetd" or "fleetctl"')


def _list_of(convert: Callable[[_Object], T]) -> Convert[list[T]]:
    def read(value: object, where: str) -> list[T]:
        if not isinstance(value, list):
            raise _bad(where, value, "a list")
        return [convert(_Object(item, f"{where}[{n}]")) for n, item in enumerate(value)]

    return read


def _map_of(convert: Callable[[_Object], T]) -> Convert[dict[str, T]]:
    def read(value: object, where: str) -> dict[str, T]:
        outer = _Object(value, where)
        return {key: convert(_Object(item, outer.path(key))) for key, item in outer.data.items()}

    return read


def _version(value: object, where: str) -> int:
    version = _count(value, where)
    if version > SCHEMA_VERSION:
        raise NewerStateError(version)
    if version != SCHEMA_VERSION:
        raise _bad(where, value, str(SCHEMA_VERSION))
    return version


def _decode_fleet(o: _Object) -> FleetState:
    state = FleetState(
        version=o.get("version", _version),
        services=o.opt("services", _map_of(_decode_service), {}),
        history=o.opt("history", _list_of(_decode_transition), []),
        log_cursors=o.opt("log_cursors", _map_of(_decode_cursor), {}),
        measured=o.opt("measured", _map_of(_decode_measured), {}),
        cordoned=_gpu_keys(o.opt("cordoned", _map_of(_decode_cordon), {}), o.where),
    )
    o.done()
    return state


def _gpu_keys(found: dict[str, Cordon], where: str) -> dict[int, Cordon]:
    """`cordoned` is keyed by GPU index, written as a string (JSON keys are)."""
    cordoned = {}
    for key, cordon in found.items():
        if not key.isascii() or not key.isdigit() or len(key) > 4:
            raise _bad(f"{where + '.' if where else ''}cordoned.{key}", key, "a GPU index")
        cordoned[int(key)] = cordon
    return cordoned


def _decode_cordon(o: _Object) -> Cordon:
    cordon = Cordon(
        time=o.get("time", _seconds),
        reason=o.get("reason", _str),
        evidence=o.opt("evidence", _nullable(_str), None),
        by=o.get("by", _str),
        uuid=o.opt("uuid", _nullable(_str), None),
    )
    o.done()
    return cordon


def _decode_service(o: _Object) -> ServiceState:
    service = ServiceState(
        model=o.get("model", _str),
        rung=o.get("rung", _count),
        state=o.opt("state", _status, ServiceStatus.STEADY),
        incidents=o.opt("incidents", _list_of(_decode_incident), []),
        changed_at=o.opt("changed_at", _nullable(_seconds), None),
        pinned=o.opt("pinned", _nullable(_count), None),
        pending=o.opt("pending", _nullable(_decode_pending_value), None),
        restarts=o.opt("restarts", _count, 0),
        last_restart_at=o.opt("last_restart_at", _nullable(_seconds), None),
        probation_until=o.opt("probation_until", _nullable(_seconds), None),
        step_up_failures=o.opt("step_up_failures", _count, 0),
        step_up_not_before=o.opt("step_up_not_before", _nullable(_seconds), None),
    )
    o.done()
    return service


def _decode_incident(o: _Object) -> Incident:
    incident = Incident(
        time=o.get("time", _seconds),
        incident_class=o.get("class", _incident_class),
        rule=o.get("rule", _str),
        container_id=o.opt("container_id", _nullable(_str), None),
        evidence=o.get("evidence", _str),
    )
    o.done()
    return incident


def _decode_pending_value(value: object, where: str) -> PendingChange:
    o = _Object(value, where)
    pending = PendingChange(
        to_rung=o.get("to_rung", _count),
        to_model=o.get("to_model", _str),
        reason=o.get("reason", _str),
        decided_at=o.get("decided_at", _seconds),
        evidence=o.opt("evidence", _nullable(_str), None),
        rule=o.opt("rule", _nullable(_str), None),
        container_id=o.opt("container_id", _nullable(_str), None),
        actor=o.opt("actor", _actor, "fleetd"),
        probation_s=o.opt("probation_s", _nullable(_seconds), None),
        gpu=o.opt("gpu", _nullable(_str), None),
    )
    o.done()
    return pending


def _decode_transition(o: _Object) -> Transition:
    transition = Transition(
        time=o.get("time", _seconds),
        service=o.get("service", _str),
        from_rung=o.get("from_rung", _count),
        to_rung=o.get("to_rung", _count),
        from_model=o.get("from_model", _str),
        to_model=o.get("to_model", _str),
        reason=o.get("reason", _str),
        evidence=o.opt("evidence", _nullable(_str), None),
        rule=o.opt("rule", _nullable(_str), None),
        container_id=o.opt("container_id", _nullable(_str), None),
        actor=o.get("actor", _actor),
        gpu=o.opt("gpu", _nullable(_str), None),
        from_options=o.opt("from_options", _nullable(_options), None),
        to_options=o.opt("to_options", _nullable(_options), None),
    )
    o.done()
    return transition


def _decode_measured(o: _Object) -> Measured:
    measured = Measured(
        vram_bytes=o.opt("vram_bytes", _nullable(_count), None),
        load_s=o.opt("load_s", _nullable(_seconds), None),
        tokens_per_s=o.opt("tokens_per_s", _nullable(_seconds), None),
        at=o.get("at", _seconds),
        parts=o.opt("parts", _nullable(_counts), None),
        context=o.opt("context", _nullable(_count), None),
        parallel=o.opt("parallel", _nullable(_count), None),
        version=o.opt("version", _nullable(_str), None),
        estimate_bytes=o.opt("estimate_bytes", _nullable(_count), None),
    )
    o.done()
    return measured


def _counts(value: object, where: str) -> dict[str, int]:
    outer = _Object(value, where)
    return {key: _count(item, outer.path(key)) for key, item in outer.data.items()}


_OPTION_NAMES = ("context", "parallel", "kv_cache", "tensor_parallel")


def _options(value: object, where: str) -> dict[str, int | str | None]:
    """A rung's options: each of context, parallel, kv_cache, tensor_parallel (or null)."""
    outer = _Object(value, where)
    found: dict[str, int | str | None] = {}
    for key in _OPTION_NAMES:
        convert = _nullable(_str) if key == "kv_cache" else _nullable(_count)
        found[key] = outer.opt(key, convert, None)
    outer.done()
    return found


def _decode_cursor(o: _Object) -> LogCursor:
    cursor = LogCursor(container_id=o.get("container_id", _str), since_ns=o.get("since_ns", _count))
    o.done()
    return cursor
