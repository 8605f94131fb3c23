"""`fleetd`: the supervisor daemon's command."""

from __future__ import annotations

from pathlib import Path

import click

from supervisor import __version__
from supervisor.cli.common import EXIT_OK, config_option, read_config, run_cli


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fleetd")
def cli() -> None:
    """The fleetd supervisor (the daemon itself arrives with `fleetd run`)."""


@cli.command("check-config")
@config_option
def check_config(config_path: Path | None) -> int:
    """Validate the fleet config; exit 2 with every problem listed when it is invalid."""
    config = read_config(config_path)
    click.echo(f"{config.source}: ok ({len(config.services)} services)")
    return EXIT_OK


def main() -> None:
    run_cli(cli, "fleetd")
