"""`fleetd`: the supervisor daemon's command."""

from __future__ import annotations

from pathlib import Path

import click

from supervisor import __version__
from supervisor.cli.common import (
    EXIT_OK,
    checkout_root,
    config_option,
    default_state_dir,
    read_config,
    run_cli,
    state_dir_option,
)
from supervisor.cli.logs import setup_logging
from supervisor.cli.paths import default_config_path
from supervisor.core.address import parse_address
from supervisor.core.config import DEFAULT_METRICS_ADDRESS
from supervisor.core.errors import UsageError
from supervisor.edges.control import SOCKET_ENV, default_socket, resolve_group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fleetd")
def cli() -> None:
    """The fleetd supervisor daemon; `fleetd run` is what systemd starts."""


@cli.command("check-config")
@config_option
def check_config(config_path: Path | None) -> int:
    """Validate the fleet config; exit 2 with every problem listed when it is invalid."""
    config = read_config(config_path)
    click.echo(f"{config.source}: ok ({len(config.services)} services)")
    return EXIT_OK


@cli.command()
@config_option
@state_dir_option
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar=SOCKET_ENV,
    default=None,
    help="Control socket for fleetctl [env FLEETD_SOCKET; default /run/fleetd/fleetd.sock, "
    "or STATE_DIR/fleetd.sock in a checkout].",
)
@click.option(
    "--socket-group",
    default=None,
    metavar="GROUP",
    help="Group (name or gid) given the control socket, mode 0660: its members may use "
    "fleetctl's changing commands [default: fleetd's own group].",
)
@click.option("--no-socket", is_flag=True, help="Serve no control socket.")
@click.option(
    "--metrics-address",
    metavar="HOST:PORT",
    default=None,
    callback=lambda _ctx, _param, value: _address(value),
    help="Serve Prometheus metrics at http://HOST:PORT/metrics, whatever the config's "
    f"`metrics:` says [default: metrics.address, {DEFAULT_METRICS_ADDRESS}]; port 0 picks "
    "a free port.",
)
@click.option("--no-metrics", is_flag=True, help="Serve no Prometheus metrics.")
def run(
    config_path: Path | None,
    state_dir: Path | None,
    log_level: str,
    socket_path: Path | None,
    socket_group: str | None,
    no_socket: bool,
    metrics_address: tuple[str, int] | None,
    no_metrics: bool,
) -> int:
    """Supervise the fleet in the foreground until SIGTERM (SIGHUP reloads the config).

    Follows the watched containers' logs through Docker, counts VRAM out-of-memory
    incidents, steps a service down its ladder after `policy.incidents_to_step_down`
    of them, records it in STATE_DIR/state.json and restarts the service's containers.
    """
    from supervisor.daemon import Daemon  # the daemon's imports are not needed elsewhere

    if metrics_address is not None and no_metrics:
        raise UsageError("--metrics-address and --no-metrics exclude each other")
    setup_logging(log_level.upper())
    state_dir = state_dir or default_state_dir()
    if no_socket:
        socket_path = None
    else:
        socket_path = socket_path or default_socket(state_dir, checkout_root() is not None)
    daemon = Daemon(
        config_path or default_config_path(),
        state_dir,
        socket_path=socket_path,
        socket_gid=resolve_group(socket_group),
        metrics_address=metrics_address,
        serve_metrics=not no_metrics,
    )
    return daemon.run()


def _address(value: str | None) -> tuple[str, int] | None:
    try:
        return None if value is None else parse_address(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def main() -> None:
    run_cli(cli, "fleetd")
