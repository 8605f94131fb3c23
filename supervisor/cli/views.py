"""`fleetctl status` and `history` from the saved state (read-only: never moves a file)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from supervisor.core.errors import FleetdError
from supervisor.core.rungs import describe_options, set_options
from supervisor.core.state import STATE_FILE, FleetState, StateError
from supervisor.core.units import format_size

# Control characters (a container's log line may carry ANSI escapes, a carriage return or a
# bell) and the bidirectional overrides: shown escaped, never sent to the terminal raw.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def safe(text: object) -> str:
    """`text` with control characters written as escapes (`\\x1b`), for a terminal."""
    return _UNSAFE.sub(
        lambda m: (
            f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}"
        ),
        str(text),
    )


def cell(text: object) -> Text:
    """A table cell from text that is not fleetd's own: escaped, never read as markup."""
    return Text(safe(text))


def read_state(state_dir: Path) -> FleetState:
    path = state_dir / STATE_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FleetdError(
            f"{path}: no state yet (fleetd has not run with this state dir)"
        ) from None
    except OSError as e:
        raise FleetdError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return FleetState.from_bytes(data)
    except StateError as e:
        raise FleetdError(f"{path}: {e} (fleetd moves such a file aside when it starts)") from None


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _options_column(options: dict[str, Any] | None) -> str:
    """The rung's options for the status table: `context 8192, kv_cache q8_0`, or `-`."""
    return set_options(options) or "-"


def _options_text(options: dict[str, Any] | None) -> str:
    """` [context 8192, kv_cache q8_0]`; nothing for a record without options."""
    return "" if options is None else f" [{describe_options(options)}]"


def _change_text(last: dict[str, Any]) -> str:
    """`big -> small`; with the options where the model stays (`big [context 32768] -> ...`)."""
    if last["from_model"] != last["to_model"] or last.get("to_options") is None:
        return f"{last['from_model']} -> {last['to_model']}"
    before = describe_options(last.get("from_options"))
    after = describe_options(last.get("to_options"))
    return f"{last['from_model']} [{before}] -> [{after}]"


SERVICE_COLUMNS = (
    "SERVICE", "MODEL", "OPTIONS", "RUNG", "STATE", "HEALTH", "INCIDENTS", "LAST CHANGE",
)  # fmt: skip
GPU_COLUMNS = ("GPU", "NAME", "USED", "TOTAL", "BUDGET", "USED/BUDGET")


def _table(columns: tuple[str, ...]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold", show_edge=False)
    for column in columns:
        table.add_column(column, no_wrap=True)
    return table


def _service_cells(name: str, row: dict[str, Any]) -> list[Text | str]:
    last = row["last_transition"]
    change = "-" if last is None else f"{_when(last['time'])} {_change_text(last)}"
    rungs = f" of {row['rungs']}" if row["rungs"] else ""
    state_text = row["state"] + (" (not in config)" if row["in_config"] is False else "")
    return [
        cell(name),
        cell(row["model"]),
        cell(_options_column(row.get("options"))),
        f"{row['rung']}{rungs}",
        cell(state_text),
        cell(_health_text(row)),
        str(row["incidents_in_window"]),
        cell(change),
    ]


def print_hosts_status(reports: dict[str, dict[str, Any]], console: Console) -> None:
    """Several hosts' status reports: one services table and one GPU table, a HOST column
    first (the per-service notes stay with `fleetctl --host H status`)."""
    table = _table(("HOST", *SERVICE_COLUMNS))
    for host, report in reports.items():
        for name, row in report["services"].items():
            table.add_row(cell(host), *_service_cells(name, row))
    console.print(table)
    gpus = _table(("HOST", *GPU_COLUMNS))
    for host, report in reports.items():
        for g in report.get("gpus") or []:
            gpus.add_row(cell(host), *_gpu_cells(g))
    if gpus.row_count:
        console.print()
        console.print(gpus)
    for host, report in reports.items():
        if report.get("gpu_problem"):
            console.print(safe(f"{host}: GPUs: {report['gpu_problem']}"), markup=False)


def print_status(report: dict[str, Any], console: Console) -> None:
    table = _table(SERVICE_COLUMNS)
    for name, row in report["services"].items():
        table.add_row(*_service_cells(name, row))
    console.print(table)
    _print_gpus(report, console)
    _print_cordons(report, console)
    for name, row in report["services"].items():
        notes = []
        if row.get("task"):
            notes.append(_task_text(row["task"]))
        if row.get("activity"):
            notes.append(str(row["activity"]))
        if row.get("probation_until"):
            notes.append(f"on probation until {_when(row['probation_until'])}")
        measured = row.get("measured")
        if measured and measured.get("vram_bytes"):
            notes.append(_measured_text(measured))
        if notes:
            console.print(safe(f"{name}: {'; '.join(notes)}"), markup=False, highlight=False)
        incident = row.get("last_incident")
        last = row["last_transition"]
        if incident and (last is None or incident["time"] > last["time"]):
            console.print(
                safe(
                    f"{name}: last incident {incident['class']} ({incident['rule']}) at "
                    f"{_when(incident['time'])}: {incident['evidence']}"
                ),
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
        if last is not None and last["evidence"]:
            console.print(
                safe(f"{name}: {last['reason']}"), markup=False, highlight=False, soft_wrap=True
            )
            console.print(
                safe(f"  evidence: {last['evidence']}"),
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
    _print_engine(report.get("daemon"), console)


def _task_text(task: dict[str, Any]) -> str:
    """`mode: swarm`: where the service runs now."""
    node = task.get("node") or task.get("node_id") or "?"
    since = f" since {_when(task['since'])}" if task.get("since") else ""
    return f"task {str(task.get('id', ''))[:12]} on node {node} ({task.get('state', '?')}{since})"


def _print_engine(daemon: dict[str, Any] | None, console: Console) -> None:
    """A running fleetd that does not reach the Docker engine says so, and why."""
    if not daemon or daemon.get("docker") is not False:
        return
    why = daemon.get("docker_error") or "not connected yet"
    text = f"Docker engine: not answering ({why}); reading logs and restarts wait for it"
    console.print(safe(text), markup=False, highlight=False, soft_wrap=True)


def _measured_text(measured: dict[str, Any]) -> str:
    """`measured 81.1 MiB (its own report: weights 59.2 MiB + KV 4.0 MiB + compute 18.0 MiB;
    estimated 402 MiB with overhead), 281.2 tokens/s`."""
    text = f"measured {format_size(measured['vram_bytes'])}"
    parts = measured.get("parts")
    if parts:
        names = {"model": "weights", "kv": "KV", "compute": "compute", "output": "output"}
        listed = " + ".join(f"{names.get(k, k)} {format_size(v)}" for k, v in parts.items() if v)
        estimate = measured.get("estimate_bytes")
        vs = f"; estimated {format_size(estimate)} with overhead" if estimate else ""
        text += f" (its own report: {listed}{vs})"
    else:
        text += " VRAM"
    rate = measured.get("tokens_per_s")
    return text + (f", {rate:.1f} tokens/s" if rate else "")


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
        console.print(safe(f"GPUs: {report['gpu_problem']}"), markup=False, highlight=False)
    if not report.get("gpus"):
        return
    table = _table(GPU_COLUMNS)
    for g in report["gpus"]:
        table.add_row(*_gpu_cells(g))
    console.print()
    console.print(table)


def _gpu_cells(g: dict[str, Any]) -> list[Text | str]:
    if g["error"]:
        return [str(g["index"]), cell(g["name"]), "-", "-", "-", cell(f"unusable: {g['error']}")]
    used, budget = g["used_bytes"], g["budget_bytes"]
    share = f"{100 * used / budget:.0f}%" if used is not None and budget else "-"
    return [
        str(g["index"]),
        cell(g["name"]),
        "-" if used is None else format_size(used),
        format_size(g["total_bytes"]),
        "-" if budget is None else format_size(budget),
        share if g["source"] in ("nvml", "host") else f"{share} ({g['source']}, no reading)",
    ]


def _print_cordons(report: dict[str, Any], console: Console) -> None:
    """Each cordoned GPU: why, since when, by whom (`fleetctl uncordon GPU` lifts it)."""
    for index, cordon in (report.get("cordoned") or {}).items():
        evidence = f" | evidence: {cordon['evidence']}" if cordon.get("evidence") else ""
        text = (
            f"GPU {index} cordoned {_when(cordon['time'])} by {cordon['by']}: "
            f"{cordon['reason']}; fleetd plans nothing on it until `fleetctl uncordon "
            f"{index}`{evidence}"
        )
        console.print(safe(text), markup=False, highlight=False, soft_wrap=True)


def echo(text: str) -> None:
    """One line for a person: control characters escaped (`--json` keeps them verbatim)."""
    click.echo(safe(text))


def print_history(transitions: list[dict[str, Any]], as_json: bool) -> None:
    """Transitions as `transition_json` gives them (from the daemon or the file)."""
    if as_json:
        click.echo(json.dumps(transitions, indent=2))
        return
    if not transitions:
        click.echo("no transitions yet")
    for t in transitions:
        echo(
            f"{_when(t['time'])}  {t['service']}: rung {t['from_rung']} {t['from_model']}"
            f"{_options_text(t.get('from_options'))} -> rung {t['to_rung']} {t['to_model']}"
            f"{_options_text(t.get('to_options'))} ({t['actor']})"
        )
        echo(f"    reason: {t['reason']}")
        if t["evidence"]:
            rule = f"  [{t['rule']}]" if t["rule"] else ""
            echo(f"    evidence: {t['evidence']}{rule}")
        if t.get("gpu"):
            echo(f"    gpu: {t['gpu']}")
