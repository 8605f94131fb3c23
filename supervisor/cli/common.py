"""What both commands share: error reporting, exit codes, config and state-dir options."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from supervisor.cli.paths import default_config_path
from supervisor.core.errors import FleetdError, UsageError

if TYPE_CHECKING:
    from supervisor.core.config import FleetConfig

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
STATE_DIR_ENV = "FLEETD_STATE_DIR"
DEFAULT_STATE_DIR = Path("/var/lib/fleetd")


def checkout_root() -> Path | None:
    """The source checkout fleetd runs from, if any (pyproject.toml beside the package)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "supervisor").is_dir() else None


def default_state_dir() -> Path:
    """FLEETD_STATE_DIR, else `state/` when run from a checkout, else /var/lib/fleetd."""
    if os.environ.get(STATE_DIR_ENV):
        return Path(os.environ[STATE_DIR_ENV])
    root = checkout_root()
    return root / "state" if root is not None else DEFAULT_STATE_DIR


def config_option(func: F) -> F:
    return click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path),
        default=None,
        help=f"Fleet config file [env FLEETD_CONFIG; default {default_config_path()}].",
    )(func)


def state_dir_option(func: F) -> F:
    return click.option(
        "--state-dir",
        type=click.Path(path_type=Path),
        default=None,
        help="State directory [env FLEETD_STATE_DIR; default state/ in a checkout, "
        "else /var/lib/fleetd].",
    )(func)


def gpu_option(func: F) -> F:
    return click.option(
        "--gpu",
        "gpu_specs",
        multiple=True,
        metavar="SIZE[:NAME]",
        callback=_at_most_gpus,
        help="Plan for a simulated GPU instead of the config's (repeatable), e.g. 24GiB:RTX 4090.",
    )(func)


def _at_most_gpus(
    _ctx: click.Context, _param: click.Parameter, specs: tuple[str, ...]
) -> tuple[str, ...]:
    from supervisor.core.config import MAX_GPUS  # the same bound as a config's `gpus:`

    if len(specs) > MAX_GPUS:
        raise UsageError(f"--gpu given {len(specs)} times; expected at most {MAX_GPUS} GPUs")
    return specs


def json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(func)


def read_config(path: Path | None) -> FleetConfig:
    from supervisor.core.config import load_config  # pydantic: only for commands that read it

    return load_config(path or default_config_path())


def run_cli(group: click.Group, prog: str, *, die_on_sigpipe: bool = False) -> None:
    """Run a click group; fleetd errors become one `prog: error: ...` line and an exit code."""
    if die_on_sigpipe:  # `fleetctl ... | head` ends quietly, as `cat` does
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        code = group.main(prog_name=prog, standalone_mode=False)
    except FleetdError as e:
        click.echo(f"{prog}: error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo(f"{prog}: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    sys.exit(code if isinstance(code, int) else EXIT_OK)
