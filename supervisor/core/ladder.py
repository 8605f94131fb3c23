"""The ladder state machine: an incident in, a decision out. Pure: no Docker, files or clock.

States (`ServiceStatus`) and their edges, each made only in `transition()` and
`apply_change()`/`end_cooldown()`:

    STEADY    -> STEADY     incident counted, fewer than N in the window
    STEADY    -> (pending)  N vram_oom incidents in the window: step down (decision recorded)
    (pending) -> COOLDOWN   the change applied: new rung, counters cleared
    COOLDOWN  -> STEADY     the cooldown has passed
    STEADY    -> EXHAUSTED  N incidents at the bottom rung: no smaller model, stop restarting
    PINNED    -> PINNED     a person holds the rung: incidents are recorded, never acted on
    STEADY    -> (pending)  no incident for `step_up_after` (or a `step_up_at` time), and
                            the bigger rung fits: one rung up, on probation
    probation -> (pending)  one vram_oom incident before `probation_until`: straight back
                            down, and the wait before the next try doubles
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from supervisor.core.config import PolicyConfig, RungConfig, ServiceConfig
from supervisor.core.rules import IncidentClass
from supervisor.core.rungs import set_options
from supervisor.core.state import Incident, PendingChange, ServiceState, ServiceStatus, Transition
from supervisor.core.units import format_duration, format_size

# The one incident-class type (rules.IncidentClass), under the names the ladder reads.
VRAM_OOM, GPU_FAULT, HOST_OOM = (
    IncidentClass.VRAM_OOM,
    IncidentClass.GPU_FAULT,
    IncidentClass.HOST_OOM,
)


class Action(StrEnum):
    NONE = "none"  # recorded or ignored; nothing to do
    STEP_DOWN = "step_down"  # apply `pending`: hand off the smaller model and restart
    EXHAUSTED = "exhausted"  # no smaller rung: say so loudly, stop restarting
    RESTART = "restart"  # a GPU fault: restart the container, never step down
    ALERT = "alert"  # host RAM OOM, or a pinned service: report, change nothing


@dataclass(frozen=True)
class Policy:
    incidents_to_step_down: int = 3
    window_s: float = 600.0
    cooldown_s: float = 60.0
    step_up_after_s: float = 86400.0  # 0: never by time alone
    probation_s: float = 1800.0

    @classmethod
    def from_config(cls, policy: PolicyConfig) -> Policy:
        return cls(
            policy.incidents_to_step_down,
            policy.incident_window,
            policy.cooldown,
            policy.step_up_after,
            policy.probation,
        )

    def step_up_wait_s(self, failures: int) -> float:
        """How long to wait before the next step up after `failures` failed probations."""
        return float((self.step_up_after_s or 86400.0) * 2.0**failures)


@dataclass(frozen=True)
class Observed:
    """One incident seen in a container's log (a burst of matching lines counts once)."""

    time: float  # the first line's timestamp (epoch seconds)
    incident_class: IncidentClass
    rule: str
    container: str
    container_id: str | None
    evidence: str  # the first matching line


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str


def next_rung_down(needs_bytes: Sequence[int], current: int) -> int | None:
    """The first rung below `current` that needs less VRAM than `current` (a ladder is a
    preference order, not a size order, so rungs that are no smaller are skipped)."""
    for rung in range(current + 1, len(needs_bytes)):
        if needs_bytes[rung] < needs_bytes[current]:
            return rung
    return None


# A runtime's own error naming the longest context that would fit: vLLM V1 ("... the
# estimated maximum model length is 12288"), V0 ("... stored in KV cache (7344)").
_LONGEST_CONTEXT = re.compile(
    r"estimated maximum model length is (\d+)|tokens that can be stored in KV cache \((\d+)\)"
)


def longest_context(evidence: str | None) -> int | None:
    """The longest context a runtime's error says would fit, or None if it names none."""
    found = _LONGEST_CONTEXT.search(evidence or "")
    if found is None:
        return None
    return int(found.group(1) or found.group(2))


def context_within(
    service: ServiceConfig, needs_bytes: Sequence[int], current: int, longest: int
) -> int | None:
    """Where a step down goes when the runtime said the longest context that fits: the
    rung of the same model with the largest context at or below `longest`; without one,
    the first rung that is not that model with a longer (or the model's own) context.
    Only rungs that need less than `current`; None if there is none."""
    model = service.ladder[current].model
    below = [
        r for r in range(current + 1, len(service.ladder)) if needs_bytes[r] < needs_bytes[current]
    ]
    same = [r for r in below if service.ladder[r].model == model]
    fitting = [r for r in same if (service.ladder[r].context or longest + 1) <= longest]
    if fitting:
        return max(fitting, key=lambda r: (service.ladder[r].context or 0, -r))
    return next((r for r in below if r not in same), None)


def transition(
    svc: ServiceState,
    seen: Observed,
    service: ServiceConfig,
    needs_bytes: Sequence[int],
    policy: Policy,
) -> tuple[ServiceState, Decision]:
    """Record an incident and decide; the only place incidents change a service's state."""
    if svc.changed_at is not None and seen.time < svc.changed_at:
        return svc, Decision(Action.NONE, "ignored: a line from before the last change")
    on_probation = svc.probation_until is not None and seen.time < svc.probation_until
    if on_probation and seen.incident_class == VRAM_OOM and svc.pinned is None:
        return _probation_failed(svc, seen, service, needs_bytes, policy)
    cooling = svc.changed_at is not None and seen.time < svc.changed_at + policy.cooldown_s
    if cooling and seen.incident_class == VRAM_OOM:
        # The new model is still loading and warming up: do not count yet.
        return svc, Decision(Action.NONE, "ignored: within the cooldown after a change")
    incident = Incident(seen.time, seen.incident_class, seen.rule, seen.container_id, seen.evidence)
    recent = [i for i in svc.incidents if i.time > seen.time - policy.window_s]
    svc = replace(svc, incidents=[*recent, incident])
    if seen.incident_class == GPU_FAULT:
        return svc, Decision(Action.RESTART, f"GPU fault ({seen.rule}): restart, never step down")
    if seen.incident_class == IncidentClass.CRASH:
        return svc, Decision(
            Action.RESTART, f"crash ({seen.rule}): it stopped by itself: restart, never step down"
        )
    if seen.incident_class == IncidentClass.CRASH_LOOP:
        exits = sum(i.incident_class == IncidentClass.CRASH_LOOP for i in svc.incidents)
        return svc, Decision(
            Action.RESTART,
            f"crash_loop ({seen.rule}): {exits} unexplained exits in "
            f"{format_duration(policy.window_s)}: restart (backing off), never step down; "
            "its last lines are in the evidence, for a rule to explain them",
        )
    if seen.incident_class == IncidentClass.START_FAILURE:
        return svc, Decision(
            Action.ALERT,
            f"start_failure ({seen.rule}): it cannot start, for the cause in the evidence; "
            "a restart or a smaller rung does not fix that",
        )
    if seen.incident_class != VRAM_OOM:
        return svc, Decision(
            Action.ALERT,
            f"{seen.incident_class} ({seen.rule}): not a VRAM problem, so no step down",
        )
    return _count_vram(svc, service, needs_bytes, policy)


def _count_vram(
    svc: ServiceState, service: ServiceConfig, needs_bytes: Sequence[int], policy: Policy
) -> tuple[ServiceState, Decision]:
    oom = [i for i in svc.incidents if i.incident_class == VRAM_OOM]
    window = format_duration(policy.window_s)
    counted = f"{len(oom)} vram_oom incidents in {window}"
    if svc.state is ServiceStatus.EXHAUSTED:
        return svc, Decision(Action.ALERT, f"{counted}, and the service is already exhausted")
    if len(oom) < policy.incidents_to_step_down:
        return svc, Decision(Action.NONE, f"{counted} ({policy.incidents_to_step_down} step down)")
    if svc.pinned is not None:
        return svc, Decision(Action.ALERT, f"{counted}, but rung {svc.pinned} is pinned")
    # The newest incident whose line names the longest context that fits, if any says so.
    named = [i for i in oom if longest_context(i.evidence) is not None]
    return _step_down(svc, service, needs_bytes, counted, oom[-1].time, (named or oom)[-1])


def _step_down(
    svc: ServiceState,
    service: ServiceConfig,
    needs_bytes: Sequence[int],
    why: str,
    at: float,
    evidence: Incident | None,
) -> tuple[ServiceState, Decision]:
    """STEADY -> (pending) to the next rung that needs less, or -> EXHAUSTED at the bottom."""
    target = next_rung_down(needs_bytes, svc.rung)
    if target is None:
        reason = f"{why} at rung {svc.rung} ({svc.model}), and no rung below needs less VRAM"
        return replace(svc, state=ServiceStatus.EXHAUSTED), Decision(Action.EXHAUSTED, reason)
    longest = longest_context(evidence.evidence if evidence is not None else None)
    jump = None if longest is None else context_within(service, needs_bytes, svc.rung, longest)
    reason = f"{why}: step down {_rung_text(service, needs_bytes, svc.rung)} -> "
    if jump is not None:
        target = jump
        same = service.ladder[target].model == svc.model
        reason += _rung_text(service, needs_bytes, target) + (
            f": the runtime says the longest context that fits is {longest} tokens, so "
            + (
                "straight to the largest context step at or below it"
                if same
                else f"past every step of {svc.model} (none is that short)"
            )
        )
    else:
        reason += _rung_text(service, needs_bytes, target) + _skipped(needs_bytes, svc.rung, target)
    pending = _pending(service, target, reason, at, evidence)
    return replace(svc, pending=pending), Decision(Action.STEP_DOWN, reason)


def _pending(
    service: ServiceConfig, target: int, reason: str, at: float, evidence: Incident | None
) -> PendingChange:
    """A change to `target` decided at `at`, carrying the incident that proved it."""
    return PendingChange(
        to_rung=target,
        to_model=service.ladder[target].model,
        reason=reason,
        decided_at=at,
        evidence=evidence.evidence if evidence else None,
        rule=evidence.rule if evidence else None,
        container_id=evidence.container_id if evidence else None,
    )


def _probation_failed(
    svc: ServiceState,
    seen: Observed,
    service: ServiceConfig,
    needs_bytes: Sequence[int],
    policy: Policy,
) -> tuple[ServiceState, Decision]:
    """An OOM on the rung just stepped up to: back to the rung below, wait twice as long."""
    target = min(svc.rung + 1, len(service.ladder) - 1)
    failures = svc.step_up_failures + 1
    wait = policy.step_up_wait_s(failures)
    reason = (
        f"vram_oom on probation at {_rung_text(service, needs_bytes, svc.rung)}: back down to "
        f"{_rung_text(service, needs_bytes, target)}; next step up in {format_duration(wait)} "
        f"at the earliest ({failures} failed in a row)"
    )
    incident = Incident(seen.time, seen.incident_class, seen.rule, seen.container_id, seen.evidence)
    pending = _pending(service, target, reason, seen.time, incident)
    svc = replace(
        svc,
        incidents=[*svc.incidents, incident],
        pending=pending,
        probation_until=None,
        step_up_failures=failures,
        step_up_not_before=seen.time + wait,
    )
    return svc, Decision(Action.STEP_DOWN, reason)


def load_failed(
    svc: ServiceState,
    service: ServiceConfig,
    needs_bytes: Sequence[int],
    now: float,
    evidence: Incident | None = None,
) -> tuple[ServiceState, Decision]:
    """The rung just changed to ran out of memory while loading (`evidence`: the line that
    said so): that is proof enough, so step down now (to the next rung that needs less)
    instead of waiting for N incidents."""
    why = f"{svc.model} ran out of memory while loading"
    found = evidence or (svc.incidents[-1] if svc.incidents else None)
    return _step_down(svc, service, needs_bytes, why, now, found)


def step_up_due(
    svc: ServiceState, now: float, policy: Policy, quiet_since: float, window_open: bool
) -> bool:
    """Time to try the next rung up? Only from a settled, unpinned state below the top:
    after `step_up_after` without a vram_oom incident, or in an off-peak window after an
    incident window's quiet; never before `step_up_not_before` (doubling on failures)."""
    if svc.rung == 0 or svc.pinned is not None or svc.pending is not None:
        return False
    if svc.state not in (ServiceStatus.STEADY, ServiceStatus.EXHAUSTED):
        return False
    if svc.probation_until is not None or now < (svc.step_up_not_before or 0.0):
        return False
    last = max(
        [quiet_since, svc.changed_at or 0.0]
        + [i.time for i in svc.incidents if i.incident_class == VRAM_OOM]
    )
    if window_open and now - last >= policy.window_s:
        return True
    return policy.step_up_after_s > 0 and now - last >= policy.step_up_after_s


def step_up(
    svc: ServiceState,
    service: ServiceConfig,
    needs_bytes: Sequence[int],
    now: float,
    policy: Policy,
    why: str,
) -> ServiceState:
    """STEADY -> (pending): one rung up, to be applied on probation."""
    target = svc.rung - 1
    reason = (
        f"step up {_rung_text(service, needs_bytes, svc.rung)} -> "
        f"{_rung_text(service, needs_bytes, target)}: {why}; on probation for "
        f"{format_duration(policy.probation_s)}"
    )
    pending = replace(_pending(service, target, reason, now, None), probation_s=policy.probation_s)
    return replace(svc, pending=pending)


def end_probation(svc: ServiceState, now: float) -> ServiceState:
    """Probation passed without an OOM: the step up stands, failures start afresh."""
    if svc.probation_until is not None and now >= svc.probation_until:
        return replace(svc, probation_until=None, step_up_failures=0, step_up_not_before=None)
    return svc


def _rung_text(service: ServiceConfig, needs_bytes: Sequence[int], rung: int) -> str:
    return describe_rung(service, rung, needs_bytes[rung])


def describe_rung(service: ServiceConfig, rung: int, need_bytes: int | None = None) -> str:
    """A rung as every message and history record writes it: `rung 1 of 4 (medium, 2.4 GiB)`
    (the VRAM need when it is known), with the options it sets: `rung 2 of 5 (big,
    context 16384, kv_cache q8_0, 717 MiB)`."""
    size = "" if need_bytes is None else f", {format_size(need_bytes)}"
    entry = service.ladder[rung]
    options = set_options(entry.options)
    shown = f", {options}" if options else ""
    return f"rung {rung} of {len(service.ladder)} ({entry.model}{shown}{size})"


def _skipped(needs_bytes: Sequence[int], current: int, target: int) -> str:
    if target == current + 1:
        return ""
    skipped = ", ".join(str(r) for r in range(current + 1, target))
    return f" (skipped rung {skipped}: needs no less VRAM than rung {current})"


def apply_change(
    svc: ServiceState, service_name: str, now: float, service: ServiceConfig | None = None
) -> tuple[ServiceState, Transition]:
    """(pending) -> COOLDOWN: the pending change took effect; counters start afresh. With
    the service's config, the record carries the options of both rungs."""
    pending = svc.pending
    assert pending is not None, "apply_change needs a recorded decision"
    ladder = service.ladder if service is not None else []
    record = Transition(
        time=now,
        service=service_name,
        from_rung=svc.rung,
        to_rung=pending.to_rung,
        from_model=svc.model,
        to_model=pending.to_model,
        reason=pending.reason,
        evidence=pending.evidence,
        rule=pending.rule,
        container_id=pending.container_id,
        actor=pending.actor,
        gpu=pending.gpu,
        from_options=_options_of(ladder, svc.rung),
        to_options=_options_of(ladder, pending.to_rung),
    )
    status = ServiceStatus.PINNED if svc.pinned is not None else ServiceStatus.COOLDOWN
    svc = replace(
        svc,
        rung=pending.to_rung,
        model=pending.to_model,
        state=status,
        incidents=[],
        changed_at=now,
        pending=None,
        probation_until=now + pending.probation_s if pending.probation_s else None,
    )
    return svc, record


def _options_of(ladder: Sequence[RungConfig], rung: int) -> dict[str, int | str | None] | None:
    if rung >= len(ladder):
        return None
    options = ladder[rung].options
    return {k: v if isinstance(v, int | str) else None for k, v in options.items()}


def end_cooldown(svc: ServiceState, now: float, policy: Policy) -> ServiceState:
    """COOLDOWN -> STEADY once the cooldown has passed."""
    cooling = svc.state is ServiceStatus.COOLDOWN and svc.changed_at is not None
    if cooling and now >= (svc.changed_at or 0.0) + policy.cooldown_s:
        return replace(svc, state=ServiceStatus.STEADY)
    return svc


class BurstGrouper:
    """Matching lines of one container within `window_s` of an incident's first line are
    that incident: a traceback, or a ggml line plus a runner line, counts once. Anchored on
    the first line (not chained), so a server failing every second is many incidents; a
    new run of the container (a restart) always opens a new one, so a crash loop counts."""

    def __init__(self, window_s: float = 2.0, previous: BurstGrouper | None = None) -> None:
        self.window_s = window_s
        self._first: dict[tuple[str, str], tuple[float, int | None]] = (
            dict(previous._first) if previous is not None else {}
        )

    def opens_incident(
        self, container: str, incident_class: str, time: float, run: int | None = None
    ) -> bool:
        key = (container, incident_class)
        first = self._first.get(key)
        if first is not None:
            first_time, first_run = first
            new_run = run is not None and first_run is not None and run != first_run
            if not new_run and first_time <= time <= first_time + self.window_s:
                return False
        self._first[key] = (time, run)
        return True

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BurstGrouper):
            return NotImplemented
        return (self.window_s, self._first) == (other.window_s, other._first)

    __hash__ = None  # type: ignore[assignment]  # mutable: equal by value, never a key

    def copy(self) -> BurstGrouper:
        """An independent copy: the step works on one and leaves the world it got unchanged."""
        return BurstGrouper(self.window_s, self)

    def seed(self, container: str, incident_class: str, time: float) -> None:
        """Remember an incident recorded before a restart of fleetd (its run unknown)."""
        key = (container, incident_class)
        if key not in self._first or self._first[key][0] < time:
            self._first[key] = (time, None)
