"""How fleetctl reaches fleetd: its control socket when it answers, else the state file.

The socket is `--socket` / FLEETD_SOCKET when given, else the one a running fleetd
recorded in STATE_DIR/daemon.lock, else the default. Without a daemon, changes are made
here under the state lock, exactly as fleetd would make them (`supervisor.core.ops`), and the
containers are restarted when Docker answers; a fleetd that holds the state directory
but does not answer is never worked around.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from supervisor.cli.common import checkout_root
from supervisor.core.errors import FleetdError
from supervisor.core.state import FleetState
from supervisor.edges.control import (
    ControlClient,
    DaemonUnreachable,
    Peer,
    SshControlClient,
    SshTarget,
    default_socket,
)
from supervisor.edges.store import DaemonInfo, StateStore

# The planner, NVML and Docker load only for the commands that use them: `fleetctl status`
# through a running fleetd needs none of them and starts in a fraction of the time.
if TYPE_CHECKING:
    from supervisor.core import ops
    from supervisor.core.config import FleetConfig
    from supervisor.core.gpus import Discovery
    from supervisor.core.rungs import RungSetup

EXIT_NO_DAEMON = 3


class NoDaemon(FleetdError):
    """The command needs a running fleetd and none answers (exit 3)."""

    exit_code = EXIT_NO_DAEMON


@dataclass
class Link:
    """fleetctl's view of the daemon: a client when it answers, else why not."""

    state_dir: Path
    socket: Path
    client: ControlClient | None
    why_not: str | None = None  # the socket's error when there is no client
    permission: bool = False  # the socket exists but this user may not use it
    holder: DaemonInfo | None = None  # a fleetd holding the state dir (even if silent)

    @property
    def store(self) -> StateStore:
        return StateStore(self.state_dir)

    def offline_note(self) -> str:
        """One stderr line: why the saved state is shown instead of the daemon's answer."""
        where = self.state_dir / "state.json"
        if self.permission:
            return f"cannot use fleetd's control socket ({self.why_not}); showing {where}"
        if self.holder is not None:
            return (
                f"fleetd (pid {self.holder.pid or 'unknown'}) holds {self.state_dir} but "
                f"does not answer ({self.why_not}); showing {where}"
            )
        return f"fleetd is not running ({self.why_not}); showing the saved state in {where}"

    def require(self) -> ControlClient:
        """The client, or exit 3 (1 when a live fleetd refuses this user)."""
        if self.client is not None:
            return self.client
        if self.permission:
            raise FleetdError(f"cannot use fleetd's control socket {self.socket}: {self.why_not}")
        raise NoDaemon(f"this needs a running fleetd: {self.why_not}")


def find_socket(state_dir: Path, socket_path: Path | None) -> tuple[Path, DaemonInfo | None]:
    """The socket to use (given, else the running fleetd's, else the default) and that
    fleetd, if one holds the state dir."""
    holder = StateStore(state_dir).running_daemon()
    if socket_path is None and holder is not None and holder.socket:
        socket_path = Path(holder.socket)
    if socket_path is None:
        socket_path = default_socket(state_dir, checkout_root() is not None)
    return socket_path, holder


def connect(state_dir: Path, socket_path: Path | None) -> Link:
    """Find and greet the daemon (a version mismatch is an error, not 'not running')."""
    socket_path, holder = find_socket(state_dir, socket_path)
    client = ControlClient(socket_path)
    try:
        client.hello()
    except DaemonUnreachable as e:
        return Link(state_dir, socket_path, None, e.reason, e.permission, holder)
    return Link(state_dir, socket_path, client, holder=holder)


def connect_host(url: str) -> Link:
    """Greet the fleetd of another host over ssh: online only, never its saved state
    (exit 3 when no fleetd runs there, 1 when ssh cannot reach it)."""
    target = SshTarget.parse(url)
    client = SshControlClient(target)
    try:
        client.hello()
    except DaemonUnreachable as e:
        raise NoDaemon(f"{url}: fleetd is not running there ({e.reason})") from None
    return Link(Path(target.socket or "."), client.path, client)


def uncordon_offline(link: Link, gpu: int) -> dict[str, object]:
    """Lift a cordon in the saved state (no fleetd runs to do it)."""
    from supervisor.core.ops import Refused

    store = link.store
    with store.lock():
        loaded = store.load()
        state = loaded.state
        if state.cordoned.pop(gpu, None) is None:
            raise Refused(f"GPU {gpu} is not cordoned")
        store.save(state)
    return {"gpu": gpu, "cordoned": False}


def local_who() -> str:
    return f"with fleetctl by {Peer(os.getpid(), os.getuid(), os.getgid()).who}"


def discover(config: FleetConfig | None) -> Discovery:
    """The GPUs as this process reads them (NVML, or the config's declared ones)."""
    from supervisor.core.gpus import Discovery, resolve_gpus
    from supervisor.edges.hostmem import device_reader

    if config is None:
        return Discovery(gpus=())
    nvml = device_reader(config)
    try:
        return resolve_gpus(config, (), nvml)
    except FleetdError as e:
        return Discovery(gpus=(), problem=str(e))
    finally:
        nvml.shutdown()


def fleet_pids(config: FleetConfig | None, discovery: Discovery) -> frozenset[int]:
    """The host pids of the fleet's own containers, when NVML lists GPU processes (so the
    budget leaves out only others' memory); empty when Docker does not answer."""
    from supervisor.edges.managed import managed_pids_if_reachable

    if config is None or not any(g.processes for g in discovery.gpus):
        return frozenset()
    pids, problem = managed_pids_if_reachable(config)
    if problem:
        click.echo(f"fleetctl: {problem}", err=True)
    return pids


def operate_offline(
    link: Link, config: FleetConfig, op: str, service: str, rung: str | None, force: bool
) -> dict[str, Any]:
    """Make the change without a daemon: under the state lock, then restart through Docker.

    Returns the answer as the daemon would give it, plus "applied" (false: the change is
    recorded and fleetd makes it when it starts)."""
    if link.holder is not None:
        raise FleetdError(
            f"fleetd (pid {link.holder.pid or 'unknown'}) holds {link.state_dir} but does not "
            f"answer on {link.socket} ({link.why_not}); refusing to change the state behind it"
        )
    store = link.store
    try:
        return _operate_locked(store, link, config, op, service, rung, force)
    finally:
        store.adopt()  # files a root fleetctl wrote stay writable by the fleetd user


def _operate_locked(
    store: StateStore,
    link: Link,
    config: FleetConfig,
    op: str,
    service: str,
    rung: str | None,
    force: bool,
) -> dict[str, Any]:
    from supervisor.core import ops

    with store.lock():
        if store.running_daemon() is not None:  # it started since we looked
            raise FleetdError(f"fleetd started on {link.state_dir} meanwhile; run this again")
        loaded = store.load()
        for note in loaded.notes:
            if not note.startswith("no state yet"):
                click.echo(f"fleetctl: state: {note}", err=True)
        state = loaded.state
        now = time.time()
        who = f"{local_who()}, fleetd not running"

        def fit(name: str, target: int) -> ops.Fit:
            from supervisor.analyzer import prices

            discovery = discover(config)
            pids = fleet_pids(config, discovery)
            needs = prices(config, state.measured)
            return ops.check_fit(config, state, name, target, discovery, needs, pids)

        outcome = ops.dispatch(op, state, config, service, now, who, fit, rung or "", force)
        setup = _save_and_hand_off(store, config, state, service)
        answer: dict[str, Any] = {**outcome.to_json(), "applied": outcome.change is None}
        if outcome.change is not None and setup is not None:
            answer.update(_apply_offline(store, config, state, setup, outcome.message))
    return answer


def _save_and_hand_off(
    store: StateStore, config: FleetConfig, state: FleetState, service: str
) -> RungSetup | None:
    """Save the state and hand off the rung it puts `service` on (a recorded change's,
    before it is applied), all or nothing: the hand-off files and the compose `.env` go to
    temp files, the state is saved, then the temp files replace them. So the files name
    the state's rung whatever happens next (no Docker, a crash), and a full disk changes
    nothing. Returns the rung's setup (None: the service is not in the state yet)."""
    svc = state.services.get(service)
    if svc is None:  # nothing decided about it (an unpin of a service fleetd never ran)
        store.save(state)
        return None
    rung = svc.pending.to_rung if svc.pending is not None else svc.rung
    setup = _offline_setup(config, state, service, rung)
    saved = False

    def save() -> None:
        nonlocal saved
        store.save(state)
        saved = True

    try:
        store.write_handoff(setup, _env_file_update(config, setup), then=save)
    except FleetdError as e:
        if not saved:
            raise FleetdError(f"{service}: {e}; nothing was changed") from None
        raise FleetdError(
            f"{service}: the change is recorded, but handing it off failed ({e}); "
            "fleetd completes it when it starts"
        ) from None
    return setup


def _env_file_update(config: FleetConfig, setup: RungSetup) -> dict[Path, str]:
    """The compose `.env` (`compose_dir`) with the rung's model, so `docker compose up`
    agrees; nothing when no `.env` was generated there."""
    from supervisor.analyzer.compose import env_file_text

    if config.compose_dir is None:
        return {}
    path = config.resolve(config.compose_dir) / ".env"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        click.echo(f"fleetctl: {setup.service}: {path} does not exist; not updated", err=True)
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise FleetdError(f"cannot read {path}: {e}") from None
    return {path: env_file_text(text, setup.service, setup.model)}


def _offline_setup(config: FleetConfig, state: FleetState, service: str, rung: int) -> RungSetup:
    """The rung's hand-off, sized by the plan on the GPUs as read now (as fleetd would)."""
    from supervisor.analyzer import prices
    from supervisor.core import ops
    from supervisor.core.rungs import setup_for

    discovery = discover(config)
    needs = prices(config, state.measured)
    pids = fleet_pids(config, discovery)
    total = ops.gpu_total_for(config, state, service, rung, discovery, needs, pids)
    need = needs[service][min(rung, len(needs[service]) - 1)].need_bytes
    return setup_for(config, service, rung, need, total)


def _apply_offline(
    store: StateStore, config: FleetConfig, state: FleetState, setup: RungSetup, asked: str
) -> dict[str, Any]:
    """The daemon's change procedure (handoff.change_model), run here once `setup` is handed
    off: pull and unload where the runtime does that, restart, wait for health and warm up."""
    import threading

    from supervisor.core.ladder import apply_change
    from supervisor.core.rungs import measured_key
    from supervisor.daemon.handoff import change_model
    from supervisor.edges import engine
    from supervisor.edges.engine import DockerError

    service = setup.service
    svc = state.services[service]
    pending = svc.pending
    assert pending is not None
    try:
        client = engine.from_env()
    except DockerError as e:
        return {
            "applied": False,
            "message": (
                f"{asked}: recorded and handed off; {e}, so the change applies when fleetd starts"
            ),
        }

    def restarted(settles: bool) -> None:  # the containers run the new model: record it
        new, record = apply_change(
            state.services[service], service, time.time(), config.services[service]
        )
        state.services[service] = new
        state.history.append(record)
        store.save(state)

    def report(text: str) -> None:
        click.echo(f"fleetctl: {service}: {text}", err=True)

    new_rung = pending.to_rung != svc.rung or pending.to_model != svc.model
    try:
        result = change_model(
            client, store, config, service, svc.model, setup, report=report,
            abort=threading.Event(), restarted=restarted, handoff=False, new_rung=new_rung,
        )  # fmt: skip
    except FleetdError as e:
        raise FleetdError(
            f"{service}: the change to {pending.to_model} is recorded, but applying it "
            f"failed ({e}); fleetd completes it when it starts"
        ) from None
    restarted_names = ", ".join(config.services[service].restarted)
    message = f"{asked}; restarted {restarted_names}"
    if result is not None and result.ok:
        if result.measured is not None:
            rung = config.services[service].ladder[pending.to_rung]
            state.measured[measured_key(rung)] = result.measured
            store.save(state)
        message += f"; {result.model} {result.detail}"
    elif result is not None:
        message += f"; but {result.model} did not become ready: {result.detail}"
    return {"applied": True, "message": message}
