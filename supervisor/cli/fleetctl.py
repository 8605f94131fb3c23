"""`fleetctl`: plan the fleet, generate compose files (and, with the daemon, control it)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
from rich.console import Console

from supervisor import __version__
from supervisor.analyzer import FleetPlan, analyze
from supervisor.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    config_option,
    default_state_dir,
    gpu_option,
    json_option,
    read_config,
    run_cli,
    state_dir_option,
)
from supervisor.compose import build_project
from supervisor.config import FleetConfig
from supervisor.errors import FleetdError, UsageError
from supervisor.fsutil import atomic_write
from supervisor.gpus import Nvml, resolve_gpus
from supervisor.managed import managed_pids_if_reachable
from supervisor.report import plan_json, print_plan


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fleetctl")
def cli() -> None:
    """Plan, generate and control a fleet of LLM serving containers on GPU hosts.

    Exit codes: 0 ok, 1 failure (e.g. a service that fits nowhere), 2 usage or config error.
    """


def _plan(config: FleetConfig, gpu_specs: tuple[str, ...], quiet: bool = False) -> FleetPlan:
    nvml = Nvml()
    try:
        discovery = resolve_gpus(config, gpu_specs, nvml)
    finally:
        nvml.shutdown()
    if discovery.problem and not quiet:  # the text plan prints it among its notes
        click.echo(f"fleetctl: {discovery.problem}", err=True)
    pids: frozenset[int] = frozenset()
    if any(g.processes for g in discovery.gpus):  # only NVML readings list processes
        pids, problem = managed_pids_if_reachable(config)
        if problem:
            click.echo(f"fleetctl: {problem}", err=True)
    return analyze(config, discovery, pids)


@cli.command()
@config_option
@gpu_option
@json_option
def plan(config_path: Path | None, gpu_specs: tuple[str, ...], as_json: bool) -> int:
    """Show which rung of each ladder runs on which GPU, and why.

    Per GPU: budget, planned VRAM and headroom; per service: the chosen rung, how each
    VRAM need was obtained, and why each more-preferred rung did not fit.
    Exits 0 when every service is placed, 1 when one is not.
    """
    result = _plan(read_config(config_path), gpu_specs, quiet=not as_json)
    if as_json:
        click.echo(json.dumps(plan_json(result), indent=2))
    else:
        # Never truncate a table cell: scripts and pagers get the full width.
        print_plan(result, Console(highlight=False, width=max(Console().width, 160)))
    return EXIT_OK if result.all_placed else EXIT_FAILURE


@cli.command()
@config_option
@gpu_option
@state_dir_option
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    required=True,
    help="Directory for compose.yml and .env (created if missing).",
)
@click.option(
    "--templates",
    "template_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Jinja templates to use instead of the built-in ones.",
)
@click.option(
    "--no-model-files",
    is_flag=True,
    help="Do not write the hand-off files (when generating for another host).",
)
def generate(
    config_path: Path | None,
    gpu_specs: tuple[str, ...],
    state_dir: Path | None,
    out_dir: Path,
    template_dir: Path | None,
    no_model_files: bool,
) -> int:
    """Write a compose project sized to the plan: compose.yml and .env.

    Also writes each service's model hand-off file (STATE_DIR/services/NAME/model) when it
    does not exist yet; an existing one belongs to fleetd and is left alone.
    Exits 0 when every service is placed, 1 when one is not (it is left out of the file).
    """
    if template_dir is not None and not (template_dir / "compose.yml.j2").is_file():
        raise UsageError(f"--templates {template_dir}: no compose.yml.j2 there")
    result = _plan(read_config(config_path), gpu_specs)
    state = (state_dir or default_state_dir()).resolve()
    project = build_project(result, state, template_dir)  # raises before anything is written
    atomic_write(out_dir / "compose.yml", project.compose_yaml)
    atomic_write(out_dir / ".env", "".join(f"{k}={v}\n" for k, v in project.env.items()))
    count = len(project.models)
    click.echo(
        f"wrote {out_dir / 'compose.yml'} ({count} service{'s' * (count != 1)}) "
        f"and {out_dir / '.env'}"
    )
    for service, model in project.models.items():
        handoff = state / "services" / service / "model"
        if not no_model_files and not handoff.exists():
            atomic_write(handoff, model + "\n")
            click.echo(f"wrote {handoff} ({model})")
    for service in project.skipped:
        click.echo(
            f"fleetctl: {service} is NOT PLACED and was left out: "
            f"{result.services[service].reason}",
            err=True,
        )
    return EXIT_OK if not project.skipped else EXIT_FAILURE


@cli.command()
@click.argument("source", default="-", metavar="[FILE|-]")
@click.option(
    "--runtime",
    type=click.Choice(
        ["ollama", "vllm", "llamacpp", "tgi", "sglang", "tensorrt", "triton", "generic"]
    ),
    default=None,
    help="Use only the rules for this runtime (default: every rule).",
)
@json_option
def scan(source: str, runtime: str | None, as_json: bool) -> int:
    """Classify a log offline, the way fleetd would: one result per incident line.

    Reads FILE, or standard input for `-`. With --json, prints one JSON object per
    classified line: {"line": N, "class": ..., "rule": ..., "text": ...}.
    Exits 0 whether or not anything matched, 2 when the input cannot be read.
    """
    from supervisor.detector import Detector, scan_lines

    detector = Detector(runtime=runtime)
    try:
        stream = click.open_file(source, "r", encoding="utf-8", errors="replace")
    except OSError as e:
        raise UsageError(f"cannot read {source}: {e.strerror or e}") from None
    with stream:
        try:
            for number, match in scan_lines(stream, detector):
                _print_match(number, match.rule.incident_class, match.rule.id, match.line, as_json)
        except OSError as e:
            raise UsageError(f"cannot read {source}: {e.strerror or e}") from None
    return EXIT_OK


def _print_match(number: int, kind: str, rule: str, text: str, as_json: bool) -> None:
    text = text.rstrip("\n")
    if as_json:
        record = {"line": number, "class": str(kind), "rule": rule, "text": text}
        click.echo(json.dumps(record))
    else:
        click.echo(f"{number}: {kind} [{rule}] {text}")


def _optional_config(config_path: Path | None) -> FleetConfig | None:
    """The config when it loads; status still works from the state alone when it does not."""
    try:
        return read_config(config_path)
    except FleetdError as e:
        click.echo(f"fleetctl: config not used ({str(e).splitlines()[0]})", err=True)
        return None


@cli.command()
@click.argument("service", required=False)
@config_option
@state_dir_option
@json_option
def status(
    service: str | None, config_path: Path | None, state_dir: Path | None, as_json: bool
) -> int:
    """Per service: model, rung, state, incidents in the window, last change and its evidence.

    Reads the saved state (STATE_DIR/state.json); it never changes it.
    """
    from supervisor.cli.views import print_status, read_state, status_json

    directory = state_dir or default_state_dir()
    state = read_state(directory)
    config = _optional_config(config_path)
    report = status_json(state, config, time.time())
    if service is not None:
        if service not in report["services"]:
            raise UsageError(f"no service {service!r} in {directory / 'state.json'}")
        report["services"] = {service: report["services"][service]}
    click.echo(f"fleetctl: showing the saved state in {directory / 'state.json'}", err=True)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        print_status(report, state, Console(highlight=False, width=max(Console().width, 160)))
    return EXIT_OK


@cli.command()
@click.argument("service", required=False)
@state_dir_option
@json_option
def history(service: str | None, state_dir: Path | None, as_json: bool) -> int:
    """Every change of rung, oldest first, with its reason and evidence line."""
    from supervisor.cli.views import print_history, read_state

    state = read_state(state_dir or default_state_dir())
    transitions = [t for t in state.history if service is None or t.service == service]
    print_history(transitions, as_json)
    return EXIT_OK


def main() -> None:
    run_cli(cli, "fleetctl", die_on_sigpipe=True)
