"""`fleetctl --host ssh://...`: which hosts a command is for, and `status`/`history` of
several hosts at once (each asked over ssh in parallel; one host down hides no other)."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import click
from rich.console import Console

from supervisor.cli.common import EXIT_FAILURE, EXIT_OK, F
from supervisor.cli.link import connect_host
from supervisor.cli.views import echo, print_history, print_hosts_status
from supervisor.core.errors import FleetdError, UsageError
from supervisor.edges.control import HOST_ENV

_HOSTS_KEY = "fleetctl.hosts"  # in click's context meta, shared by the group and its commands
MAX_PARALLEL = 16


def host_option(func: F) -> F:
    """`--host URL`, repeatable, before or after the command name; FLEETD_HOST otherwise."""
    return click.option(
        "--host",
        multiple=True,
        metavar="ssh://[USER@]HOST[:PORT][/SOCKET]",
        expose_value=False,
        callback=_remember,
        help="Ask that host's fleetd over ssh (repeatable for status and history) "
        "[env FLEETD_HOST, space-separated].",
    )(func)


def _remember(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> None:
    if value:
        ctx.meta.setdefault(_HOSTS_KEY, []).extend(value)


def chosen_hosts() -> list[str]:
    """The hosts given with --host, else FLEETD_HOST's; empty: this host, as always."""
    ctx = click.get_current_context(silent=True)
    given = list(ctx.meta.get(_HOSTS_KEY, [])) if ctx is not None else []
    hosts = given or os.environ.get(HOST_ENV, "").split()
    return list(dict.fromkeys(hosts))  # each once, in the order given


def one_host(hosts: list[str]) -> str:
    if len(hosts) > 1:
        raise UsageError(
            f"--host given {len(hosts)} hosts: only `status` and `history` take several"
        )
    return hosts[0]


@dataclass(frozen=True)
class HostFailed:
    """A host that gave no answer: the error as fleetctl would print it."""

    message: str
    exit_code: int


def ask_hosts(hosts: list[str], path: str) -> dict[str, Any]:
    """`GET path` from each host's fleetd: its answer, or a HostFailed."""
    with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(hosts))) as pool:
        futures = {host: pool.submit(_ask, host, path) for host in hosts}
    return {host: future.result() for host, future in futures.items()}


def _ask(host: str, path: str) -> Any:
    try:
        client = connect_host(host).require()
        return client.call("GET", path)
    except FleetdError as e:
        text = str(e)
        return HostFailed(text if text.startswith(host) else f"{host}: {text}", e.exit_code)


def _report_failures(answers: dict[str, Any]) -> int:
    failed = [a for a in answers.values() if isinstance(a, HostFailed)]
    for failure in failed:
        click.echo(f"fleetctl: error: {failure.message}", err=True)
    return EXIT_FAILURE if failed else EXIT_OK


def _as_json(answers: dict[str, Any]) -> str:
    return json.dumps(
        {h: {"error": a.message} if isinstance(a, HostFailed) else a for h, a in answers.items()},
        indent=2,
    )


def status_of_hosts(hosts: list[str], service: str | None, as_json: bool) -> int:
    """One table of every host's services (a HOST column); exit 1 when a host failed."""
    # Never truncate a cell (as single-host status): room for the longest host besides.
    width = max(Console().width, 160 + max(len(h) for h in hosts))
    console = Console(highlight=False, width=width)
    answers = ask_hosts(hosts, f"/v1/status{f'?service={service}' if service else ''}")
    if as_json:
        click.echo(_as_json(answers))
    else:
        reports = {h: a for h, a in answers.items() if not isinstance(a, HostFailed)}
        print_hosts_status(reports, console)
    return _report_failures(answers)


def history_of_hosts(hosts: list[str], service: str | None, as_json: bool) -> int:
    """Each host's transitions under its name; exit 1 when a host failed."""
    answers = ask_hosts(hosts, f"/v1/history{f'?service={service}' if service else ''}")
    if as_json:
        click.echo(_as_json(answers))
        return _report_failures(answers)
    for host, answer in answers.items():
        if not isinstance(answer, HostFailed):
            echo(f"{host}:")
            print_history(answer, as_json=False)
    return _report_failures(answers)
