"""`fleetctl`: plan the fleet, generate compose files (and, with the daemon, control it)."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console

from supervisor import __version__
from supervisor.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    F,
    config_option,
    default_state_dir,
    gpu_option,
    json_option,
    read_config,
    run_cli,
    state_dir_option,
)
from supervisor.cli.hosts import (
    chosen_hosts,
    history_of_hosts,
    host_option,
    one_host,
    status_of_hosts,
)
from supervisor.cli.link import (
    Link,
    NoDaemon,
    connect,
    connect_host,
    discover,
    find_socket,
    fleet_pids,
    operate_offline,
    uncordon_offline,
)
from supervisor.cli.views import echo, read_state
from supervisor.core.errors import FleetdError, UsageError
from supervisor.core.runtimes import Runtime
from supervisor.core.state import FleetState, Measured, transition_json
from supervisor.edges.control import SOCKET_ENV, DaemonUnreachable, pump_stdio
from supervisor.edges.fsutil import remove_temps, write_all
from supervisor.edges.store import HANDOFF_FILES, STALE_TEMP_S

# The planner (numpy, gguf), compose rendering and NVML load in the commands that use
# them, so that `fleetctl status` and `history` start quickly.
if TYPE_CHECKING:
    from supervisor.analyzer.compose import ComposeProject
    from supervisor.core.config import FleetConfig
    from supervisor.core.gpus import Discovery
    from supervisor.core.nodesetup import FileEdit, NodePlan
    from supervisor.core.plan import FleetPlan
    from supervisor.core.rungs import RungSetup


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fleetctl")
@host_option
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Plan, generate and control a fleet of LLM serving containers on GPU hosts.

    Exit codes: 0 ok, 1 failure (a service that fits nowhere, a refused change),
    2 usage or config error, 3 the command needs a running fleetd and none answers.
    """
    name = ctx.invoked_subcommand
    command = cli.get_command(ctx, name) if name else None
    runs_here = command is not None and not any(p.name == "host" for p in command.params)
    if runs_here and ctx.meta.get("fleetctl.hosts"):
        raise click.UsageError(
            f"--host: `fleetctl {name}` runs on this machine, not through another "
            f"host's fleetd; run it there (ssh HOST fleetctl {name} ...)"
        )


def _plan(
    config: FleetConfig,
    gpu_specs: tuple[str, ...],
    quiet: bool = False,
    state_dir: Path | None = None,
    swarm: bool = False,
) -> FleetPlan:
    if swarm:
        return _swarm_plan(config, gpu_specs, quiet, state_dir)
    from supervisor.analyzer import analyze
    from supervisor.core.gpus import resolve_gpus
    from supervisor.edges.hostmem import device_reader

    nvml = device_reader(config)
    try:
        discovery = resolve_gpus(config, gpu_specs, nvml)
    finally:
        nvml.shutdown()
    if discovery.problem and not quiet:  # the text plan prints it among its notes
        click.echo(f"fleetctl: {discovery.problem}", err=True)
    measured = _measured(state_dir, quiet) if state_dir is not None else None
    return analyze(config, discovery, fleet_pids(config, discovery), measured)


def _swarm_plan(
    config: FleetConfig, gpu_specs: tuple[str, ...], quiet: bool, state_dir: Path | None
) -> FleetPlan:
    """The plan across the nodes of the swarm DOCKER_HOST's engine manages."""
    from supervisor.analyzer import prices
    from supervisor.core.plan import place
    from supervisor.edges import engine
    from supervisor.edges.swarm import read_swarm

    if gpu_specs:
        raise UsageError("--gpu and --swarm: a swarm's GPUs are read from its nodes (pick one)")
    client = engine.from_env()
    try:
        swarm = read_swarm(client)
    finally:
        client.close()
    if swarm.discovery.problem and not quiet:
        click.echo(f"fleetctl: {swarm.discovery.problem}", err=True)
    measured = _measured(state_dir, quiet) if state_dir is not None else None
    return place(config, swarm.discovery, prices(config, measured), sites=swarm.sites)


def _measured(state_dir: Path, quiet: bool) -> dict[str, Measured] | None:
    """What fleetd measured (state.json), read without changing anything: a state file
    that cannot be read leaves the estimates, with a note."""
    path = state_dir / "state.json"
    try:
        return FleetState.from_bytes(path.read_bytes()).measured
    except FileNotFoundError:
        return None
    except (OSError, FleetdError) as e:
        if not quiet:
            click.echo(f"fleetctl: {path}: not read ({e}); pricing by estimates", err=True)
        return None


SWARM_HELP = (
    "Plan across the nodes of the swarm that DOCKER_HOST's engine manages, with the GPUs "
    "`fleetctl node init` published on each (docs/swarm.md)."
)


@cli.command()
@config_option
@gpu_option
@json_option
@click.option("--swarm", is_flag=True, help=SWARM_HELP)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Price rungs with what fleetd measured there (state.json, read only); "
    "default: estimates only.",
)
def plan(
    config_path: Path | None,
    gpu_specs: tuple[str, ...],
    as_json: bool,
    swarm: bool,
    state_dir: Path | None,
) -> int:
    """Show which rung of each ladder runs on which GPU, and why.

    Per GPU: budget, planned VRAM and headroom; per service: the chosen rung, how each
    VRAM need was obtained (declared, estimated from the model's file, or measured by
    fleetd with --state-dir), and why each more-preferred rung did not fit. With --swarm,
    per service also its node and its GPUs there (a service never spans nodes).
    Exits 0 when every service is placed, 1 when one is not.
    """
    from supervisor.cli.report import plan_json, print_plan

    result = _plan(
        read_config(config_path), gpu_specs, quiet=not as_json, state_dir=state_dir, swarm=swarm
    )
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
    "-o",
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Directory for compose.yml and .env (created if missing); with --swarm, the "
    "stack file to write (default: print it).",
)
@click.option(
    "--swarm",
    is_flag=True,
    help="Write a Swarm stack file planned across the nodes of the swarm DOCKER_HOST's "
    "engine manages (docs/swarm.md).",
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
    out_dir: Path | None,
    swarm: bool,
    template_dir: Path | None,
    no_model_files: bool,
) -> int:
    """Write a compose project sized to the plan: compose.yml and .env.

    Also writes each service's hand-off files (STATE_DIR/services/NAME/model, args, env:
    the planned rung's model and options) when they do not exist yet; existing ones belong
    to fleetd, which keeps them on the rung it runs, and are left alone.
    With --swarm: one stack file for `docker stack deploy -c`, each service pinned to its
    planned node and GPUs and its rung in its environment; no hand-off files (a node has
    no state dir of fleetd's).
    Exits 0 when every service is placed, 1 when one is not (it is left out of the file).
    """
    if swarm:
        return _generate_stack(config_path, gpu_specs, out_dir, template_dir)
    if out_dir is None:
        raise UsageError("Missing option '--out' (the directory for compose.yml and .env)")
    if template_dir is not None and not (template_dir / "compose.yml.j2").is_file():
        raise UsageError(f"--templates {template_dir}: no compose.yml.j2 there")
    result = _plan(read_config(config_path), gpu_specs)
    state = (state_dir or default_state_dir()).resolve()
    from supervisor.analyzer.compose import build_project

    project = build_project(result, state, template_dir)  # raises before anything is written
    # Every folder first, so a folder that cannot be made leaves nothing half-written.
    folders = [] if no_model_files else [state / "services" / n for n in project.setups]
    folders.append(out_dir)
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FleetdError(f"cannot create {folder}: {e.strerror or e}") from None
    remove_temps(out_dir, "compose.yml", ".env", older_than_s=STALE_TEMP_S)  # a killed run's
    texts = {
        out_dir / "compose.yml": project.compose_yaml,
        out_dir / ".env": "".join(f"{k}={v}\n" for k, v in project.env.items()),
    }
    handed_off = [] if no_model_files else _new_handoffs(project, state)
    for folder, setup in handed_off:
        remove_temps(folder, *HANDOFF_FILES, older_than_s=STALE_TEMP_S)
        files = setup.files()  # `model` last: a container that sees it finds args and env
        texts.update({folder / name: files[name] for name in ("args", "env", "model")})
    try:
        write_all(texts)  # all or nothing: a full disk leaves the old files, every one
    except OSError as e:
        raise FleetdError(
            f"cannot write {e.filename}: {e.strerror or e} (no file was changed)"
        ) from None
    count = len(project.models)
    click.echo(
        f"wrote {out_dir / 'compose.yml'} ({count} service{'s' * (count != 1)}) "
        f"and {out_dir / '.env'}"
    )
    for folder, setup in handed_off:
        click.echo(f"wrote {folder}/{{model,args,env}} ({setup.model}, {setup.describe()})")
    for service in project.skipped:
        click.echo(
            f"fleetctl: {service} is NOT PLACED and was left out: "
            f"{result.services[service].reason}",
            err=True,
        )
    return EXIT_OK if not project.skipped else EXIT_FAILURE


def _generate_stack(
    config_path: Path | None,
    gpu_specs: tuple[str, ...],
    out_file: Path | None,
    template_dir: Path | None,
) -> int:
    """`generate --swarm`: the stack file, written whole or printed."""
    if template_dir is not None and not (template_dir / "stack.yml.j2").is_file():
        raise UsageError(f"--templates {template_dir}: no stack.yml.j2 there")
    if out_file is not None and out_file.is_dir():
        raise UsageError(f"--out {out_file}: is a directory (expected the stack file's path)")
    result = _plan(read_config(config_path), gpu_specs, quiet=out_file is None, swarm=True)
    from supervisor.analyzer.compose import build_stack

    stack = build_stack(result, template_dir)  # raises before anything is written
    if out_file is None:
        click.echo(stack.stack_yaml, nl=False)
    else:
        try:
            write_all({out_file: stack.stack_yaml})
        except OSError as e:
            raise FleetdError(f"cannot write {e.filename}: {e.strerror or e}") from None
        count = len(stack.setups)
        click.echo(f"wrote {out_file} ({count} service{'s' * (count != 1)})")
    for service in stack.skipped:
        click.echo(
            f"fleetctl: {service} is NOT PLACED and was left out: "
            f"{result.services[service].reason}",
            err=True,
        )
    return EXIT_OK if not stack.skipped else EXIT_FAILURE


def _new_handoffs(project: ComposeProject, state: Path) -> list[tuple[Path, RungSetup]]:
    """The hand-off folders to write, with their rungs: those without a model file (one
    that exists is fleetd's own: it keeps the files of the rung it runs)."""
    folders = [(state / "services" / name, setup) for name, setup in project.setups.items()]
    return [(folder, setup) for folder, setup in folders if not (folder / "model").exists()]


@cli.command()
@click.argument("source", default="-", metavar="[FILE|-]")
@click.option(
    "--runtime",
    type=click.Choice(sorted(r.value for r in Runtime)),  # the registry of runtimes
    default=None,
    help=(
        "Read the log as this runtime's service would: every rule still applies, its own"
        " rules name a match first, and lines it recovers from itself are left out."
    ),
)
@json_option
def scan(source: str, runtime: str | None, as_json: bool) -> int:
    """Classify a log offline, the way fleetd would: one result per incident line.

    Reads FILE, or standard input for `-`. With --json, prints one JSON object per
    classified line: {"line": N, "class": ..., "rule": ..., "text": ...}.
    Exits 0 whether or not anything matched, 2 when the input cannot be read.
    """
    from supervisor.core.detector import Detector, scan_lines

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


def socket_option(func: F) -> F:
    """--socket, and --host: a command that talks to fleetd can talk to another host's."""
    return host_option(_socket_only(func))


def _socket_only(func: F) -> F:
    return click.option(
        "--socket",
        "socket_path",
        type=click.Path(path_type=Path, dir_okay=False),
        envvar=SOCKET_ENV,
        default=None,
        help="fleetd's control socket [env FLEETD_SOCKET; default: the one the running "
        "fleetd recorded in STATE_DIR, else /run/fleetd/fleetd.sock].",
    )(func)


def _optional_config(config_path: Path | None) -> FleetConfig | None:
    """The config when it loads; status still works from the state alone when it does not."""
    try:
        return read_config(config_path)
    except FleetdError as e:
        click.echo(f"fleetctl: config not used ({str(e).splitlines()[0]})", err=True)
        return None


def _link(state_dir: Path | None, socket_path: Path | None) -> Link:
    """This host's fleetd (or its saved state), or with --host that host's fleetd."""
    hosts = chosen_hosts()
    if hosts:
        return connect_host(one_host(hosts))
    return connect(state_dir or default_state_dir(), socket_path)


def _complete_service(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Service names for shell completion: the state's, else the config's."""
    state_dir = ctx.params.get("state_dir") or default_state_dir()
    try:
        names = set(read_state(state_dir).services)
    except FleetdError:
        names = set()
    if not names:
        with contextlib.suppress(FleetdError):
            names = set(read_config(ctx.params.get("config_path")).services)
    return sorted(n for n in names if n.startswith(incomplete))


SERVICE = click.argument("service", shell_complete=_complete_service)
OPTIONAL_SERVICE = click.argument("service", required=False, shell_complete=_complete_service)


@cli.command()
@OPTIONAL_SERVICE
@config_option
@state_dir_option
@socket_option
@json_option
def status(
    service: str | None,
    config_path: Path | None,
    state_dir: Path | None,
    socket_path: Path | None,
    as_json: bool,
) -> int:
    """Per service: model, rung, state, incidents in the window, last change and its
    evidence; per GPU: memory used and total against the budget.

    Asks the running fleetd; when none answers, reads the saved state (never changing
    it) and says so on stderr. `--json` prints the same object either way.
    """
    from supervisor.cli.views import print_status
    from supervisor.core.status import gpus_json, status_json  # the config schema: here only

    hosts = chosen_hosts()
    if len(hosts) > 1:
        return status_of_hosts(hosts, service, as_json)
    link = _link(state_dir, socket_path)
    if link.client is not None:
        query = f"?service={service}" if service else ""
        report = link.client.call("GET", f"/v1/status{query}")
    else:
        click.echo(f"fleetctl: {link.offline_note()}", err=True)
        state = read_state(link.state_dir)
        config = _optional_config(config_path)
        report = status_json(state, config, time.time(), service)
        discovery = discover(config)
        report["gpus"] = gpus_json(discovery, config, fleet_pids(config, discovery))
        report["gpu_problem"] = discovery.problem
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        print_status(report, _console())
    return EXIT_OK


@cli.command()
@OPTIONAL_SERVICE
@state_dir_option
@socket_option
@json_option
def history(
    service: str | None, state_dir: Path | None, socket_path: Path | None, as_json: bool
) -> int:
    """Every change of rung, oldest first, with its reason and evidence line."""
    from supervisor.cli.views import print_history

    hosts = chosen_hosts()
    if len(hosts) > 1:
        return history_of_hosts(hosts, service, as_json)
    link = _link(state_dir, socket_path)
    if link.client is not None:
        query = f"?service={service}" if service else ""
        records = link.client.call("GET", f"/v1/history{query}")
    else:
        click.echo(f"fleetctl: {link.offline_note()}", err=True)
        state = read_state(link.state_dir)
        records = [transition_json(t) for t in state.history if service in (None, t.service)]
    print_history(records, as_json)
    return EXIT_OK


def _operate(
    op: str,
    services: list[str],
    config_path: Path | None,
    state_dir: Path | None,
    socket_path: Path | None,
    as_json: bool,
    rung: str | None = None,
    force: bool = False,
) -> int:
    """Run one operation per service, through fleetd or, without one, here."""
    link = _link(state_dir, socket_path)
    client = link.client
    if client is None and link.permission:
        link.require()  # a live fleetd this user may not use: never work around it
    config = None if client is not None else read_config(config_path)
    if client is None and link.holder is None:
        note = f"fleetd is not running ({link.why_not}); changing the state here"
        click.echo(f"fleetctl: {note}", err=True)
    answers = []
    for service in services:
        if client is not None:
            body = {"rung": rung, "force": force}
            answer = client.call("POST", f"/v1/services/{service}/{op}", body)
            answer.setdefault("applied", True)
        else:
            assert config is not None
            answer = operate_offline(link, config, op, service, rung, force)
        answers.append(answer)
        if not as_json:
            click.echo(answer["message"])
    if as_json:
        click.echo(json.dumps(answers if len(answers) != 1 else answers[0], indent=2))
    return EXIT_OK


def _all_services(
    config_path: Path | None, state_dir: Path | None, socket_path: Path | None
) -> list[str]:
    link = _link(state_dir, socket_path)
    if link.client is not None:
        report = link.client.call("GET", "/v1/status")
        return [n for n, row in report["services"].items() if row["in_config"]]
    return list(read_config(config_path).services)


@cli.command()
@click.argument("service", required=False, shell_complete=_complete_service)
@click.option("--all", "all_services", is_flag=True, help="Reset every service in the config.")
@config_option
@state_dir_option
@socket_option
@json_option
def reset(
    service: str | None,
    all_services: bool,
    config_path: Path | None,
    state_dir: Path | None,
    socket_path: Path | None,
    as_json: bool,
) -> int:
    """Back to the top rung, counters cleared, pin removed (restarts if the model changes)."""
    if (service is None) == (not all_services):
        raise UsageError("give a SERVICE or --all (not both)")
    if service is not None:
        services = [service]
    else:
        services = _all_services(config_path, state_dir, socket_path)
    return _operate("reset", services, config_path, state_dir, socket_path, as_json)


@cli.command()
@SERVICE
@config_option
@state_dir_option
@socket_option
@json_option
def downgrade(
    service: str,
    config_path: Path | None,
    state_dir: Path | None,
    socket_path: Path | None,
    as_json: bool,
) -> int:
    """Step down to the next rung now, whatever its size, and restart the containers."""
    return _operate("downgrade", [service], config_path, state_dir, socket_path, as_json)


FORCE = click.option("--force", is_flag=True, help="Skip the VRAM check (it is still reported).")


@cli.command()
@SERVICE
@FORCE
@config_option
@state_dir_option
@socket_option
@json_option
def upgrade(
    service: str,
    force: bool,
    config_path: Path | None,
    state_dir: Path | None,
    socket_path: Path | None,
    as_json: bool,
) -> int:
    """One rung up, refused (exit 1) with the reason when the VRAM check says it will not
    fit beside the other services, unless --force."""
    return _operate("upgrade", [service], config_path, state_dir, socket_path, as_json, force=force)


@cli.command()
@SERVICE
@click.argument("rung", metavar="RUNG")
@FORCE
@config_option
@state_dir_option
@socket_option
@json_option
def pin(
    service: str,
    rung: str,
    force: bool,
    config_path: Path | None,
    state_dir: Path | None,
    socket_path: Path | None,
    as_json: bool,
) -> int:
    """Hold SERVICE on RUNG (its 0-based index or its model): incidents are recorded but
    never move it. Moving up to pin is VRAM-checked like `upgrade`."""
    return _operate(
        "pin", [service], config_path, state_dir, socket_path, as_json, rung=rung, force=force
    )


@cli.command()
@SERVICE
@config_option
@state_dir_option
@socket_option
@json_option
def unpin(
    service: str,
    config_path: Path | None,
    state_dir: Path | None,
    socket_path: Path | None,
    as_json: bool,
) -> int:
    """Let incidents move SERVICE along its ladder again."""
    return _operate("unpin", [service], config_path, state_dir, socket_path, as_json)


@cli.command()
@click.argument("gpu", type=int, metavar="GPU")
@click.option("--reason", default="cordoned by a person", help="Why (shown by status).")
@state_dir_option
@socket_option
@json_option
def cordon(
    gpu: int, reason: str, state_dir: Path | None, socket_path: Path | None, as_json: bool
) -> int:
    """Plan nothing on GPU (its index) any more, and move the services it runs to the
    other GPUs (the largest rung that fits there, else stopped). Needs a running fleetd."""
    link = _link(state_dir, socket_path)
    client = link.require()
    answer = client.call("POST", f"/v1/gpus/{gpu}/cordon", {"reason": reason})
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return EXIT_OK
    echo(f"GPU {gpu} cordoned: fleetd plans nothing on it until `fleetctl uncordon {gpu}`")
    for move in answer["moves"]:
        where = "stopped" if move["rung"] is None else "moving"
        echo(f"{move['service']}: {where}: {move['reason']}")
    return EXIT_OK


@cli.command()
@click.argument("gpu", type=int, metavar="GPU")
@state_dir_option
@socket_option
@json_option
def uncordon(gpu: int, state_dir: Path | None, socket_path: Path | None, as_json: bool) -> int:
    """Plan on GPU again (services move back only as the planner and step-ups decide).
    Without fleetd, the saved state is changed here."""
    link = _link(state_dir, socket_path)
    if link.client is not None:
        answer = link.client.call("POST", f"/v1/gpus/{gpu}/uncordon", {})
    else:
        if link.permission:
            link.require()
        answer = uncordon_offline(link, gpu)
    if as_json:
        click.echo(json.dumps(answer, indent=2))
    else:
        echo(f"GPU {gpu} uncordoned: fleetd plans on it again")
    return EXIT_OK


@cli.command()
@SERVICE
@click.argument("model")
@state_dir_option
@socket_option
def warm(service: str, model: str, state_dir: Path | None, socket_path: Path | None) -> int:
    """Load MODEL, a member of SERVICE's ensemble, before its turn: fleetd unloads the
    other members, pulls MODEL if missing, loads it and warms it up, then answers with
    its load time, speed and VRAM. Exits 3 when no fleetd answers."""
    client = _link(state_dir, socket_path).require()
    click.echo(client.call("POST", f"/v1/services/{service}/warm", {"model": model})["message"])
    return EXIT_OK


@cli.command()
@state_dir_option
@socket_option
def reload(state_dir: Path | None, socket_path: Path | None) -> int:
    """Make the running fleetd re-read its config (as `systemctl reload fleetd` does).

    Exits 3 when no fleetd answers, 2 when the new config is invalid (fleetd keeps the
    one it runs).
    """
    client = _link(state_dir, socket_path).require()
    click.echo(client.call("POST", "/v1/reload")["message"])
    return EXIT_OK


@cli.command("dial-stdio", hidden=True)
@state_dir_option
@_socket_only
def dial_stdio(state_dir: Path | None, socket_path: Path | None) -> int:
    """Copy stdin and stdout to this host's control socket: what `fleetctl --host ssh://`
    runs here over ssh (as `docker system dial-stdio` does). Exits 3 when no fleetd answers."""
    path, _ = find_socket(state_dir or default_state_dir(), socket_path)
    try:
        pump_stdio(path)
    except DaemonUnreachable as e:
        if e.permission:  # a live fleetd this ssh user may not use: exit 1, not "not running"
            raise FleetdError(f"cannot use fleetd's control socket: {e.reason}") from None
        raise NoDaemon(f"fleetd is not running on this host ({e.reason})") from None
    return EXIT_OK


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> int:
    """Print the shell's completion script for fleetctl.

    e.g. `fleetctl completion bash > /etc/bash_completion.d/fleetctl`; service names
    complete from the saved state (else the config).
    """
    from click.shell_completion import get_completion_class

    completer = get_completion_class(shell)
    assert completer is not None
    click.echo(completer(cli, {}, "fleetctl", "_FLEETCTL_COMPLETE").source())
    return EXIT_OK


@cli.group()
def node() -> None:
    """Set up this host as a GPU node of a Docker Swarm."""


@node.command("init")
@click.option(
    "--daemon-config",
    "daemon_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Docker's daemon config [default /etc/docker/daemon.json].",
)
@click.option(
    "--runtime-config",
    "runtime_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="The NVIDIA container runtime's config "
    "[default /etc/nvidia-container-runtime/config.toml].",
)
@click.option(
    "--skip-runtime-config",
    "skip_runtime",
    is_flag=True,
    help="Leave the runtime's config.toml alone (set swarm-resource there yourself).",
)
@click.option("--dry-run", is_flag=True, help="Print the changes as a diff; change nothing.")
@json_option
def node_init(
    daemon_path: Path | None,
    runtime_path: Path | None,
    skip_runtime: bool,
    dry_run: bool,
    as_json: bool,
) -> int:
    """Tell this node's Docker about its GPUs (read through NVML), so Swarm places GPU
    tasks here and each task sees only the GPUs Swarm gave it.

    daemon.json gets one NVIDIA-GPU generic resource per GPU UUID, org.fleetd.gpu.*
    engine labels (each GPU's UUID, name and memory) and the nvidia runtime as the
    default; the runtime's config.toml gets swarm-resource = "DOCKER_RESOURCE_NVIDIA-GPU".
    Every other setting is kept, a file that changes is first copied to
    FILE.fleetd-backup-<UTC time>, and a second run changes nothing. Docker is not
    restarted: the command prints how. Exits 1, changing nothing, when NVML, a GPU or a
    file cannot be read.
    """
    from supervisor.core.nodesetup import plan_node_init
    from supervisor.edges import nodefiles

    if skip_runtime and runtime_path is not None:
        raise UsageError("--runtime-config and --skip-runtime-config: give one of them")
    daemon_path = daemon_path or nodefiles.DAEMON_CONFIG
    daemon_text = nodefiles.read_daemon_config(daemon_path)
    runtime = None
    if not skip_runtime:
        runtime_path = runtime_path or nodefiles.RUNTIME_CONFIG
        runtime = (str(runtime_path), nodefiles.read_runtime_config(runtime_path))
    plan = plan_node_init(_node_gpus(), (str(daemon_path), daemon_text), runtime)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    backups = {} if dry_run else nodefiles.write_edits(plan.edits, stamp)
    if as_json:
        click.echo(json.dumps(_node_init_json(plan, backups, dry_run), indent=2))
    else:
        _print_node_init(plan, backups, dry_run)
    return EXIT_OK


def _node_gpus() -> Discovery:
    """This host's GPUs as NVML reads them (never the config's declared ones)."""
    from supervisor.edges.nvml import Nvml

    nvml = Nvml()
    try:
        return nvml.discover()
    finally:
        nvml.shutdown()


def _node_init_json(
    plan: NodePlan, backups: dict[str, Path | None], dry_run: bool
) -> dict[str, object]:
    return {
        "dry_run": dry_run,
        "gpus": [vars(gpu) for gpu in plan.gpus],
        "files": [
            {
                "path": edit.path,
                "changed": edit.changed,
                "created": edit.changed and edit.old_text is None,
                "backup": str(backups[edit.path]) if backups.get(edit.path) else None,
                "diff": edit.diff(),
            }
            for edit in plan.edits
        ],
        "notes": list(plan.notes),
        "restart_docker": plan.edits[0].changed,
    }


def _print_node_init(plan: NodePlan, backups: dict[str, Path | None], dry_run: bool) -> None:
    from supervisor.core.units import format_size

    for gpu in plan.gpus:
        echo(f"GPU {gpu.index}: {gpu.uuid}  {gpu.name}  {format_size(gpu.memory_bytes)}")
    for edit in plan.edits:
        for line in edit.diff().splitlines():
            echo(line)
    for edit in plan.edits:
        echo(f"{edit.path}: {_node_file_outcome(edit, backups, dry_run)}")
    for note in plan.notes:
        echo(f"note: {note}")
    changed = [edit for edit in plan.edits if edit.changed]
    if dry_run or not changed:
        return
    daemon = plan.edits[0]
    restart = " && systemctl restart docker" if daemon.changed else ""
    if daemon.changed:
        echo(f"apply: dockerd --validate --config-file {daemon.path}{restart}")
    else:  # the runtime reads its config.toml at each container start
        echo("apply: nothing to restart; containers started from now on use it")
    undo = [
        f"cp -p {backups[e.path]} {e.path}" if backups.get(e.path) else f"rm {e.path}"
        for e in changed
    ]
    echo(f"undo: {' && '.join(undo)}{restart}")


def _node_file_outcome(edit: FileEdit, backups: dict[str, Path | None], dry_run: bool) -> str:
    if not edit.changed:
        return "already set up, unchanged"
    if dry_run:
        return "would be created" if edit.old_text is None else "would change (dry run)"
    if edit.old_text is None:
        return "created"
    return f"changed (backup: {backups[edit.path]})"


def _console() -> Console:
    # Never truncate a table cell: scripts and pagers get the full width.
    return Console(highlight=False, width=max(Console().width, 160))


def main() -> None:
    run_cli(cli, "fleetctl", die_on_sigpipe=True)
