"""A plan for people (aligned tables) and for scripts (JSON)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from supervisor.cli.views import cell, safe
from supervisor.core.plan import FleetPlan, GpuPlan, ServicePlan
from supervisor.core.rungs import set_options
from supervisor.core.units import format_size


def plan_json(plan: FleetPlan) -> dict[str, Any]:
    found: dict[str, Any] = {
        "config": str(plan.config.source),
        "budget": plan.config.budget,
        "optimal": plan.optimal,
        "all_placed": plan.all_placed,
        "notes": list(plan.notes),
        "gpus": [_gpu_json(g) for g in plan.gpus],
        "services": {name: _service_json(s) for name, s in plan.services.items()},
    }
    if plan.on_swarm:  # `gpu`/`gpus` are then fleet-wide indexes into `gpus`
        for name, s in plan.services.items():
            found["services"][name]["node"] = _node_json(plan, s)
    return found


def _node_json(plan: FleetPlan, s: ServicePlan) -> dict[str, Any] | None:
    sites = [plan.gpu_plan(g).site for g in s.gpus]
    if not sites or sites[0] is None:
        return None
    return {
        "id": sites[0].node_id,
        "hostname": sites[0].hostname,
        "gpus": [{"index": site.local_index, "uuid": site.uuid} for site in sites if site],
        "budget_bytes": min(plan.gpu_plan(g).budget_bytes for g in s.gpus),
    }


def _gpu_json(g: GpuPlan) -> dict[str, Any]:
    site = (
        {}
        if g.site is None
        else {
            "node_id": g.site.node_id,
            "hostname": g.site.hostname,
            "local_index": g.site.local_index,
        }
    )
    return {
        **site,
        "index": g.gpu.index,
        "uuid": g.gpu.uuid,
        "name": g.gpu.name,
        "source": g.gpu.source,
        "valid": g.gpu.valid,
        "error": g.gpu.error,
        "total_bytes": g.gpu.total_bytes,
        "budget_bytes": g.budget_bytes,
        "unmanaged_bytes": g.unmanaged_bytes,
        "planned_bytes": g.planned_bytes,
        "headroom_bytes": g.headroom_bytes,
        "headroom_ratio": round(g.headroom_bytes / g.budget_bytes, 4) if g.budget_bytes else None,
        "ollama_limit": g.ollama_limit,
        "services": list(g.services),
    }


def _service_json(s: ServicePlan) -> dict[str, Any]:
    return {
        "model": s.model,
        "rung": s.rung,
        "gpu": s.gpu,
        "gpus": list(s.gpus),
        "runtime": s.service.runtime.value,
        "served_name": s.service.client_name,
        "need_bytes": s.need_bytes,
        "reason": s.reason,
        "rungs": [
            {
                "rung": v.need.rung,
                "model": v.need.model,
                "need_bytes": v.need.need_bytes,
                **_options(s, v.need.rung),
                "source": v.need.source,
                "detail": v.need.detail,
                "status": v.status,
                "reason": v.reason,
            }
            for v in s.rungs
        ],
    }


def _options(s: ServicePlan, rung: int) -> dict[str, object]:
    """A rung's options: context, parallel, kv_cache, tensor_parallel (null: the default)."""
    return dict(s.service.ladder[min(rung, len(s.service.ladder) - 1)].options)


def _shown_options(s: ServicePlan, rung: int) -> str:
    """The options a rung sets, as people read them; "" where it sets none."""
    return set_options(_options(s, rung))


def print_plan(plan: FleetPlan, console: Console) -> None:
    console.print(
        safe(f"Plan for {plan.config.source}: budget {plan.config.budget:.0%} of each GPU"),
        markup=False,
        highlight=False,
    )
    console.print()
    console.print(_node_gpu_table(plan) if plan.on_swarm else _gpu_table(plan))
    console.print()
    console.print(_node_service_table(plan) if plan.on_swarm else _service_table(plan))
    for s in plan.services.values():
        _print_ladder(s, console)
    for note in plan.notes:
        console.print(safe(f"note: {note}"), markup=False, highlight=False)
    if not plan.all_placed:
        unplaced = ", ".join(n for n, s in plan.services.items() if s.rung is None)
        console.print(safe(f"NOT PLACED: {unplaced}"), markup=False, highlight=False)


def _table(*columns: str) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold", show_edge=False)
    for column in columns:
        right = column in {"TOTAL", "BUDGET", "UNMANAGED", "PLANNED", "HEADROOM", "NEED"}
        table.add_column(column, justify="right" if right else "left", no_wrap=True)
    return table


def _gpu_table(plan: FleetPlan) -> Table:
    table = _table("GPU", "NAME", "TOTAL", "BUDGET", "UNMANAGED", "PLANNED", "HEADROOM", "SERVICES")
    for g in plan.gpus:
        if not g.gpu.valid:
            table.add_row(
                str(g.gpu.index),
                cell(g.gpu.name),
                "-",
                "-",
                "-",
                "-",
                "-",
                cell(f"unusable: {g.gpu.error}"),
            )
            continue
        share = f" ({g.headroom_bytes / g.budget_bytes:.0%})" if g.budget_bytes else ""
        table.add_row(
            str(g.gpu.index),
            cell(g.gpu.name),
            format_size(g.gpu.total_bytes),
            format_size(g.budget_bytes),
            format_size(g.unmanaged_bytes),
            format_size(g.planned_bytes),
            format_size(g.headroom_bytes) + share,
            ", ".join(g.services) or "-",
        )
    if not plan.gpus:
        table.add_row("-", "no GPU", "", "", "", "", "", "")
    return table


def _service_table(plan: FleetPlan) -> Table:
    table = _table("SERVICE", "RUNTIME", "RUNG", "MODEL", "OPTIONS", "NEED", "SOURCE", "GPU")
    for s in plan.services.values():
        if s.rung is None:
            table.add_row(s.name, s.service.runtime.value, "-", "NOT PLACED", "-", "-", "-", "-")
            continue
        verdict = s.rungs[s.rung]
        table.add_row(
            s.name,
            s.service.runtime.value,
            f"{s.rung} of {len(s.rungs)}",
            cell(verdict.need.model),
            _shown_options(s, s.rung) or "-",
            format_size(verdict.need.need_bytes),
            verdict.need.source,
            ",".join(str(g) for g in s.gpus) or str(s.gpu),
        )
    return table


def _node_gpu_table(plan: FleetPlan) -> Table:
    """The GPUs of a Swarm plan, node by node."""
    table = _table(
        "NODE", "GPU", "UUID", "NAME", "TOTAL", "BUDGET", "PLANNED", "HEADROOM", "SERVICES"
    )
    for g in plan.gpus:
        assert g.site is not None
        share = f" ({g.headroom_bytes / g.budget_bytes:.0%})" if g.budget_bytes else ""
        table.add_row(
            cell(g.site.node),
            str(g.site.local_index),
            cell(g.site.uuid),
            cell(g.gpu.name),
            format_size(g.gpu.total_bytes),
            format_size(g.budget_bytes),
            format_size(g.planned_bytes),
            format_size(g.headroom_bytes) + share,
            ", ".join(g.services) or "-",
        )
    return table


def _node_service_table(plan: FleetPlan) -> Table:
    """Per service of a Swarm plan: its node, its GPUs there, its rung, need vs budget."""
    table = _table(
        "SERVICE", "RUNTIME", "RUNG", "MODEL", "OPTIONS", "NEED", "BUDGET", "NODE", "GPU"
    )
    for s in plan.services.values():
        if s.rung is None:
            table.add_row(
                s.name, s.service.runtime.value, "-", "NOT PLACED", "-", "-", "-", "-", "-"
            )
            continue
        gpus = [plan.gpu_plan(g) for g in s.gpus]
        sites = [g.site for g in gpus if g.site]
        table.add_row(
            s.name,
            s.service.runtime.value,
            f"{s.rung} of {len(s.rungs)}",
            cell(s.rungs[s.rung].need.model),
            _shown_options(s, s.rung) or "-",
            format_size(s.rungs[s.rung].need.need_bytes),
            format_size(min(g.budget_bytes for g in gpus)),
            cell(sites[0].node),
            cell(", ".join(f"{site.local_index} ({site.uuid[:12]})" for site in sites)),
        )
    return table


def _print_ladder(s: ServicePlan, console: Console) -> None:
    console.print(f"\n{s.name} ({s.service.runtime.value}) ladder:", highlight=False, markup=False)
    for v in s.rungs:
        mark = {"chosen": "->", "rejected": " x", "not tried": "  "}[v.status]
        line = f"  {mark} {v.need.rung} {v.need.model:<24} {format_size(v.need.need_bytes):>9}  "
        options = _shown_options(s, v.need.rung)
        line += (f"[{options}] " if options else "") + f"{v.need.source}: {v.need.detail}"
        console.print(safe(line), highlight=False, markup=False, soft_wrap=True)
        if v.reason:
            console.print(
                f"       not chosen: {v.reason}", highlight=False, markup=False, soft_wrap=True
            )
    if s.reason:
        console.print(f"     {s.reason}", highlight=False, markup=False, soft_wrap=True)
