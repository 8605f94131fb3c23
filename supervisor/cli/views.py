"""`fleetctl status` and `history` from the saved state (read-only: never moves a file)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.table import Table

from supervisor.errors import FleetdError, UsageError
from supervisor.state import (
    STATE_FILE,
    FleetState,
    ServiceState,
    StateError,
    Transition,
    measured_json,
    transition_json,
)
from supervisor.units import format_size

if TYPE_CHECKING:
    from supervisor.config import FleetConfig
    from supervisor.gpus import Discovery


def read_state(state_dir: Path) -> FleetState:
    path = state_dir / STATE_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FleetdError(
            f"{path}: no state yet (fleetd has not run with this state dir)"
        ) from None
    except OSError as e:
        raise FleetdError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return FleetState.from_json(text)
    except StateError as e:
        raise FleetdError(f"{path}: {e} (fleetd moves such a file aside when it starts)") from None


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _last(state: FleetState, service: str) -> Transition | None:
    return next((t for t in reversed(state.history) if t.service == service), None)


def status_json(
    state: FleetState, config: FleetConfig | None, now: float, service: str | None = None
) -> dict[str, Any]:
    """What `fleetctl status --json` prints (the daemon adds "gpus" and "daemon")."""
    from supervisor.lifecycle import endpoint_of  # the runtime clients: only when needed

    if service is not None and service not in state.services:
        known = ", ".join(sorted(state.services)) or "none yet"
        raise UsageError(f"no service {service!r} in the state; services: {known}")
    services = {}
    for name, svc in state.services.items():
        if service is not None and name != service:
            continue
        window = config.policy.incident_window if config else None
        last = _last(state, name)
        services[name] = {
            "model": svc.model,
            "rung": svc.rung,
            "rungs": len(config.services[name].ladder)
            if config and name in config.services
            else None,
            "state": str(svc.state),
            "in_config": None if config is None else name in config.services,
            "incidents_in_window": _recent(svc, now, window),
            "pinned": svc.pinned,
            "pending": None if svc.pending is None else svc.pending.to_model,
            "last_transition": None if last is None else transition_json(last),
            "probation_until": svc.probation_until,
            "step_up_not_before": svc.step_up_not_before,
            "measured": _measured(state, svc.model),
            "endpoint": endpoint_of(config, name) if config and name in config.services else None,
            "ensemble": _members(config, name),
            "health": None,  # fleetd's live view only (a check result, the circuit breaker)
            "activity": None,  # fleetd's live view only (a pull's progress, a warm-up)
        }
    return {"services": services, "gpus": [], "gpu_problem": None, "daemon": None}


def gpus_json(discovery: Discovery, config: FleetConfig | None) -> list[dict[str, Any]]:
    """Per GPU: memory used and total (when NVML reads it) against the fleet's budget."""
    budget = config.budget if config is not None else None
    return [
        {
            "index": g.index,
            "name": g.name,
            "uuid": g.uuid,
            "source": g.source,
            "total_bytes": g.total_bytes,
            "used_bytes": g.used_bytes,
            "free_bytes": g.free_bytes,
            "budget_bytes": None if budget is None else int(budget * g.total_bytes),
            "error": g.error,
        }
        for g in discovery.gpus
    ]


def _members(config: FleetConfig | None, name: str) -> list[str] | None:
    service = config.services.get(name) if config is not None else None
    return [r.model for r in service.ensemble] if service and service.ensemble else None


def _measured(state: FleetState, model: str) -> dict[str, Any] | None:
    seen = state.measured.get(model)
    return None if seen is None else measured_json(seen)


def _recent(svc: ServiceState, now: float, window_s: float | None) -> int:
    return sum(1 for i in svc.incidents if window_s is None or i.time > now - window_s)


def print_status(report: dict[str, Any], console: Console) -> None:
    table = Table(box=None, pad_edge=False, header_style="bold", show_edge=False)
    for column in ("SERVICE", "MODEL", "RUNG", "STATE", "HEALTH", "INCIDENTS", "LAST CHANGE"):
        table.add_column(column, no_wrap=True)
    for name, row in report["services"].items():
        last = row["last_transition"]
        change = (
            "-"
            if last is None
            else (f"{_when(last['time'])} {last['from_model']} -> {last['to_model']}")
        )
        rungs = f" of {row['rungs']}" if row["rungs"] else ""
        state_text = row["state"] + (" (not in config)" if row["in_config"] is False else "")
        table.add_row(
            name,
            row["model"],
            f"{row['rung']}{rungs}",
            state_text,
            _health_text(row),
            str(row["incidents_in_window"]),
            change,
        )
    console.print(table)
    _print_gpus(report, console)
    for name, row in report["services"].items():
        notes = []
        if row.get("activity"):
            notes.append(str(row["activity"]))
        if row.get("probation_until"):
            notes.append(f"on probation until {_when(row['probation_until'])}")
        measured = row.get("measured")
        if measured and measured.get("vram_bytes"):
            rate = measured.get("tokens_per_s")
            speed = f", {rate:.1f} tokens/s" if rate else ""
            notes.append(f"measured {format_size(measured['vram_bytes'])} VRAM{speed}")
        if notes:
            console.print(f"{name}: {'; '.join(notes)}", markup=False, highlight=False)
        last = row["last_transition"]
        if last is not None and last["evidence"]:
            console.print(
                f"{name}: {last['reason']}", markup=False, highlight=False, soft_wrap=True
            )
            console.print(
                f"  evidence: {last['evidence']}", markup=False, highlight=False, soft_wrap=True
            )


def _health_text(row: dict[str, Any]) -> str:
    health = row.get("health")
    if health is None:
        return "-"
    text = str(health["status"])
    if health["breaker"] != "closed":
        text += f", breaker {health['breaker'].replace('_', '-')}"
    return text


def _print_gpus(report: dict[str, Any], console: Console) -> None:
    if report.get("gpu_problem"):
        console.print(f"GPUs: {report['gpu_problem']}", markup=False, highlight=False)
    if not report.get("gpus"):
        return
    table = Table(box=None, pad_edge=False, header_style="bold", show_edge=False)
    for column in ("GPU", "NAME", "USED", "TOTAL", "BUDGET", "USED/BUDGET"):
        table.add_column(column, no_wrap=True)
    for g in report["gpus"]:
        if g["error"]:
            table.add_row(str(g["index"]), g["name"], "-", "-", "-", f"unusable: {g['error']}")
            continue
        used, budget = g["used_bytes"], g["budget_bytes"]
        share = f"{100 * used / budget:.0f}%" if used is not None and budget else "-"
        table.add_row(
            str(g["index"]),
            g["name"],
            "-" if used is None else format_size(used),
            format_size(g["total_bytes"]),
            "-" if budget is None else format_size(budget),
            share if g["source"] == "nvml" else f"{share} ({g['source']}, no reading)",
        )
    console.print()
    console.print(table)


def print_history(transitions: list[dict[str, Any]], as_json: bool) -> None:
    """Transitions as `transition_json` gives them (from the daemon or the file)."""
    if as_json:
        click.echo(json.dumps(transitions, indent=2))
        return
    if not transitions:
        click.echo("no transitions yet")
    for t in transitions:
        click.echo(
            f"{_when(t['time'])}  {t['service']}: rung {t['from_rung']} {t['from_model']} -> "
            f"rung {t['to_rung']} {t['to_model']} ({t['actor']})"
        )
        click.echo(f"    reason: {t['reason']}")
        if t["evidence"]:
            rule = f"  [{t['rule']}]" if t["rule"] else ""
            click.echo(f"    evidence: {t['evidence']}{rule}")
        if t.get("gpu"):
            click.echo(f"    gpu: {t['gpu']}")
