"""Never a wrong model: after any sequence of fleetctl changes, made without fleetd or
through a running one, the state, the hand-off files and the generated `.env` name the
same rung, and a change that is refused changes nothing.

The fleet is generated (`fleetctl generate`: compose.yml, .env and the hand-off files) and
kept current through `compose_dir:`. Without fleetd, fleetctl runs in this process as a
user runs it (its click entry, exit code and output) with Docker unreachable; with fleetd,
an in-process `Daemon` without Docker takes the control API's calls through its queue.
Either way a change is recorded and handed off, but no container is restarted: the state
keeps the change pending, and the rung it names is the one every file must describe.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any
from unittest import mock

import docker
import docker.errors
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from supervisor.analyzer import prices
from supervisor.cli import fleetctl
from supervisor.cli.common import run_cli
from supervisor.core.config import FleetConfig, load_config, model_env_var
from supervisor.core.ladder import apply_change
from supervisor.core.rungs import setup_for
from supervisor.core.state import FleetState, StateError
from supervisor.daemon import Daemon
from supervisor.daemon.handoff import write_handoff
from supervisor.edges import store as store_module
from supervisor.edges.control import Call, Peer, Response
from supervisor.edges.store import StateStore

GIB = 1024**3
GPU_BYTES = 16 * GIB
# Both top rungs fit the 16 GiB GPU's budget together (6000 + 7000 MiB of 13926 MiB), so
# the generated project starts every service on its top rung, where fleetctl puts a
# service fleetd has not run yet. chat's rung 1 does not fit beside web's top rung: a move
# up to it is refused unless forced.
CONFIG = """\
budget: 0.85
gpus: [{name: "test GPU", memory: 16GiB}]
compose_dir: compose
services:
  web:
    runtime: llamacpp
    containers: [web-1]
    ladder:
      - {model: big, vram: 6000MiB, context: 16384}
      - {model: big, vram: 5000MiB, context: 8192}
      - {model: big, vram: 4500MiB, context: 8192, kv_cache: q8_0}
      - {model: small, vram: 2000MiB, context: 4096}
      - {model: small, vram: 1500MiB}
  chat:
    runtime: vllm
    containers: [chat-1]
    ladder:
      - {model: org/large, vram: 7000MiB, context: 8192}
      - {model: org/large, vram: 8500MiB, context: 32768, kv_cache: fp8}
      - {model: org/small, vram: 3000MiB, kv_cache: fp8}
"""
SERVICES = ("web", "chat")
HANDOFF = ("model", "args", "env")
ONLINE, OFFLINE = ("fleetd",), ("stop fleetd",)  # switch between the two ways of working


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str


def _no_docker() -> docker.DockerClient:
    raise docker.errors.DockerException("no Docker in this test")


class Fleet:
    """A generated fleet in a temp dir, changed by fleetctl alone or through fleetd."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config_path = root / "fleet.yaml"
        self.config_path.write_text(CONFIG)
        self.state_dir = root / "state"
        self.env_file = root / "compose" / ".env"
        self.environ = {
            "DOCKER_HOST": f"unix://{root}/no-docker.sock",
            "FLEETD_SOCKET": str(root / "no-fleetd.sock"),
            "FLEETD_CONFIG": str(self.config_path),
            "FLEETD_STATE_DIR": str(self.state_dir),
        }
        self.config: FleetConfig = load_config(self.config_path)
        self.needs = prices(self.config)
        self.daemon: Daemon | None = None
        generated = self.fleetctl("generate", "--out", str(root / "compose"))
        assert generated.code == 0, generated

    def tree(self) -> dict[Path, bytes]:
        """Every file fleetctl and fleetd write (the state dir and the compose project)."""
        folders = (self.state_dir, self.env_file.parent)
        return {p: p.read_bytes() for f in folders for p in sorted(f.rglob("*")) if p.is_file()}

    def restore(self, tree: dict[Path, bytes]) -> None:
        """Back to `tree` exactly (as generated, for the next example)."""
        for folder in (self.state_dir, self.env_file.parent):
            shutil.rmtree(folder, ignore_errors=True)
        for path, data in tree.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

    # --- the two ways of making a change --------------------------------------------------

    def fleetctl(self, *args: str) -> Ran:
        """fleetctl as a user runs it (its entry point's error handling and exit code),
        in this process."""
        out, err = io.StringIO(), io.StringIO()
        code = 0
        with (
            mock.patch.object(sys, "argv", ["fleetctl", *args]),
            mock.patch.dict(os.environ, self.environ),
            redirect_stdout(out),
            redirect_stderr(err),
        ):
            try:
                run_cli(fleetctl.cli, "fleetctl")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
        return Ran(code, out.getvalue(), err.getvalue())

    def start_fleetd(self) -> None:
        self.daemon = Daemon(
            self.config_path, self.state_dir, docker_factory=_no_docker, serve_metrics=False
        )
        self.daemon.start()
        self._idle()

    def stop_fleetd(self) -> None:
        if self.daemon is not None:
            self._idle()
            self.daemon.shutdown()
            self.daemon = None

    def call(self, op: str, service: str | None, **args: Any) -> Response:
        """One control API call, answered by fleetd's main loop (and its workers)."""
        assert self.daemon is not None
        call = Call(op, service, args, Peer(os.getpid(), os.getuid(), os.getgid()))
        self.daemon.queue.put(call)
        deadline = time.monotonic() + 10
        while call.reply.empty():
            assert time.monotonic() < deadline, f"fleetd never answered {op} {service}"
            self.daemon.drain(0.01)
        self._idle()
        return call.reply.get_nowait()

    def _idle(self) -> None:
        """Until no change is being applied (a worker hands off, then finds no Docker)."""
        assert self.daemon is not None
        deadline = time.monotonic() + 10
        while True:
            self.daemon.drain(0.01)
            flights = self.daemon.world.flights.values()
            if self.daemon.queue.empty() and not any(f.busy for f in flights):
                return
            assert time.monotonic() < deadline, "a change was still being applied after 10 s"

    # --- what a person and the containers see ---------------------------------------------

    def state(self) -> FleetState:
        path = self.state_dir / "state.json"
        return FleetState.from_json(path.read_text()) if path.exists() else FleetState()

    def files(self) -> dict[str, bytes | None]:
        """state.json, every hand-off file and the .env, as bytes (None: missing)."""
        paths = [self.state_dir / "state.json", self.env_file]
        paths += [self.state_dir / "services" / s / f for s in SERVICES for f in HANDOFF]
        return {str(p.relative_to(self.root)): _read(p) for p in paths}

    def check_agreement(self, after: tuple[str, ...]) -> None:
        state = self.state()
        env = dict(
            line.split("=", 1) for line in self.env_file.read_text().splitlines() if "=" in line
        )
        for service in SERVICES:
            rung = target_rung(state, service)
            need = self.needs[service][rung].need_bytes
            setup = setup_for(self.config, service, rung, need, GPU_BYTES)
            folder = self.state_dir / "services" / service
            handed = {name: (folder / name).read_text() for name in HANDOFF}
            where = f"after {' '.join(after)}: {service} on rung {rung}"
            assert handed == setup.files(), f"{where}: the hand-off files say otherwise"
            assert env[model_env_var(service)] == setup.model, f"{where}: .env says otherwise"


def target_rung(state: FleetState, service: str) -> int:
    """The rung the state puts `service` on: its recorded change's, else its own (the top
    one when fleetd has not run with it yet)."""
    svc = state.services.get(service)
    if svc is None:
        return 0
    return svc.pending.to_rung if svc.pending is not None else svc.rung


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


# --- the operations --------------------------------------------------------------------

# A rung as a person gives it: an index or a model, valid or not.
RUNG_TEXTS = ("0", "1", "2", "3", "4", "5", "big", "small", "org/large", "org/small", "-1", "x")
service_names = st.sampled_from((*SERVICES, "gone"))
operations = st.one_of(
    st.tuples(st.just("downgrade"), service_names),
    st.tuples(st.just("upgrade"), service_names),
    st.tuples(st.just("upgrade"), service_names, st.just("--force")),
    st.tuples(st.just("reset"), st.one_of(service_names, st.just("--all"))),
    st.tuples(st.just("pin"), service_names, st.sampled_from(RUNG_TEXTS)),
    st.tuples(st.just("pin"), service_names, st.sampled_from(RUNG_TEXTS), st.just("--force")),
    st.tuples(st.just("unpin"), service_names),
    st.just(ONLINE),
    st.just(OFFLINE),
)


def run(fleet: Fleet, op: tuple[str, ...]) -> bool:
    """Make one change, the way the fleet works now; False when it was refused."""
    if op == ONLINE:
        if fleet.daemon is None:
            fleet.start_fleetd()
        return True
    if op == OFFLINE:
        fleet.stop_fleetd()
        return True
    if fleet.daemon is None:
        ran = fleet.fleetctl(*op)  # an error not fleetd's own would raise here
        assert ran.code in (0, 1, 2, 3), ran
        return ran.code == 0
    return _through_fleetd(fleet, op)


def _through_fleetd(fleet: Fleet, op: tuple[str, ...]) -> bool:
    if op == ("reload",):
        return fleet.call("reload", None).status == 200
    name, service, *rest = op
    force = "--force" in rest
    rung = next((r for r in rest if r != "--force"), None)
    services = SERVICES if service == "--all" else (service,)
    refused = False
    for each in services:
        answer = fleet.call(name, each, force=force, **({"rung": rung} if rung else {}))
        assert answer.status in (200, 400, 409, 500), answer
        if answer.status == 500:  # recorded and handed off, but no Docker to restart with
            assert "Docker is not reachable" in str(answer.body), answer
        refused |= answer.status in (400, 409)
    return not refused


@contextlib.contextmanager
def configs_read_once() -> Iterator[None]:
    """fleetctl and fleetd read the config on every call; here each unchanged file is
    parsed once (the YAML parser with line numbers takes most of a call's time)."""
    read = functools.cache(lambda path, text: load_config(path))
    cached = mock.Mock(side_effect=lambda path: read(path, path.read_text()))
    with (
        mock.patch("supervisor.core.config.load_config", cached),
        mock.patch("supervisor.daemon.load_config", cached),
    ):
        yield


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with TemporaryDirectory(prefix="fleetd-agree-") as d, configs_read_once():
        yield Fleet(Path(d))


@pytest.fixture
def clean(fleet: Fleet) -> Iterator[Fleet]:
    """The module's fleet, put back as generated afterwards."""
    generated = fleet.tree()
    try:
        yield fleet
    finally:
        fleet.stop_fleetd()
        fleet.restore(generated)


# --- any sequence ------------------------------------------------------------------------


@settings(
    max_examples=int(os.environ.get("FLEETD_AGREEMENT_EXAMPLES", "25")),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(ops=st.lists(operations, max_size=10))
# Without fleetd and without Docker, the change was recorded but not handed off.
@example(ops=[("downgrade", "web")])
# The report: fleetd handed the downgrade off (its restart failed), then a reset
# at the top rung cleared the change and left the files on the downgraded rung.
@example(ops=[ONLINE, ("downgrade", "web"), OFFLINE, ("reset", "web")])
@example(ops=[ONLINE, ("downgrade", "chat"), ("reset", "chat")])
def test_state_handoff_and_env_agree_after_any_sequence(
    fleet: Fleet, ops: list[tuple[str, ...]]
) -> None:
    generated = fleet.tree()
    try:
        fleet.check_agreement(("generate",))
        for op in ops:
            before = fleet.files()
            if not run(fleet, op):
                assert fleet.files() == before, f"{' '.join(op)} was refused but changed files"
            fleet.check_agreement(op)
    finally:
        fleet.stop_fleetd()
        fleet.restore(generated)


def test_changes_of_two_services_applied_at_once_both_reach_the_env_file(clean: Fleet) -> None:
    # Found by the property test (a flaky failure): fleetd applies each service's change
    # in its own worker, and two workers updating the .env at once lost one model.
    store = StateStore(clean.state_dir)
    setups = [
        setup_for(clean.config, "web", 3, 0, None),
        setup_for(clean.config, "chat", 2, 0, None),
    ]
    real_stage = store_module._stage

    def slow_stage(path: Path, text: str) -> Path:
        time.sleep(0.2)  # both workers have read the .env by now, unless they take turns
        return real_stage(path, text)

    with mock.patch("supervisor.edges.store._stage", slow_stage):
        workers = [
            threading.Thread(target=write_handoff, args=(store, clean.config, setup))
            for setup in setups
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    text = clean.env_file.read_text()
    for setup in setups:
        assert f"{model_env_var(setup.service)}={setup.model}\n" in text


def test_a_reload_keeps_handing_off_a_recorded_change(clean: Fleet) -> None:
    for op in (("downgrade", "web"), ONLINE, ("reload",)):
        assert run(clean, op), op
        clean.check_agreement(op)


# --- a full disk ---------------------------------------------------------------------------


@contextlib.contextmanager
def disk_full_at(path: Path) -> Iterator[None]:
    """Writes of `path` (of the temp files beside it that replace it) fail as on a full
    disk: their fsync says ENOSPC, as a filesystem that allocates late does."""
    real_fsync = os.fsync
    prefix = f"{path.parent}/.{path.name}."

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(prefix):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    with mock.patch("os.fsync", fsync):
        yield


def applied(fleet: Fleet) -> None:
    """Every recorded change applied, as fleetd does once the containers run it."""
    state = fleet.state()
    for name, svc in state.services.items():
        if svc.pending is not None:
            state.services[name], _ = apply_change(svc, name, time.time())
    StateStore(fleet.state_dir).save(state)


# A change of model, options and .env: web from rung 2 (big) down to 3 (small), or from
# rung 3 back to the top.
CHANGES = {"downgrade": ("pin", "web", "2"), "reset": ("pin", "web", "3")}
FULL = ("state/services/web/args", "compose/.env", "state/state.json", "state/services/web/model")


@pytest.mark.parametrize("full", FULL)
@pytest.mark.parametrize("op", sorted(CHANGES))
def test_a_full_disk_during_a_change_is_one_line_and_changes_nothing(
    clean: Fleet, op: str, full: str
) -> None:
    assert run(clean, CHANGES[op])
    assert run(clean, ("unpin", "web"))
    applied(clean)
    before = clean.files()

    with disk_full_at(clean.root / full):
        ran = clean.fleetctl(op, "web")

    assert ran.code == 1, ran
    assert ran.out == ""
    errors = [line for line in ran.err.splitlines() if "error" in line]
    cause = f"cannot write {clean.root / full}: No space left on device"
    assert errors == [f"fleetctl: error: web: {cause}; nothing was changed"], ran
    assert clean.files() == before
    assert not list(clean.root.rglob(".*.tmp")), "a temp file was left behind"
    clean.check_agreement((op, "web"))


def test_a_handoff_that_fails_after_the_state_is_saved_says_so_and_fleetd_completes_it(
    clean: Fleet,
) -> None:
    # Only the renames come after the state is saved: they need no room, but may fail.
    model = clean.state_dir / "services" / "web" / "model"
    real_replace = os.replace

    def replace(src: str | Path, dst: str | Path) -> None:
        if Path(dst) == model:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_replace(src, dst)

    with mock.patch("os.replace", replace):
        ran = clean.fleetctl("pin", "web", "3")

    assert ran.code == 1, ran
    errors = [line for line in ran.err.splitlines() if "error" in line]
    assert errors == [
        f"fleetctl: error: web: the change is recorded, but handing it off failed (cannot "
        f"replace {model}: Input/output error); fleetd completes it when it starts"
    ], ran
    assert clean.state().services["web"].pending is not None
    assert not list(clean.root.rglob(".*.tmp")), "a temp file was left behind"
    assert run(clean, ONLINE)  # fleetd hands the recorded change off again
    clean.check_agreement(("pin", "web", "3"))


def test_fleetd_hands_off_all_or_nothing_when_the_env_file_cannot_be_written(
    clean: Fleet,
) -> None:
    before = clean.files()
    setup = setup_for(clean.config, "web", 3, 0, None)
    with disk_full_at(clean.env_file), pytest.raises(StateError, match="No space left"):
        write_handoff(StateStore(clean.state_dir), clean.config, setup)
    assert clean.files() == before  # not the model file either: it would disagree with .env
