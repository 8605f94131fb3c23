"""`fleetctl --host ssh://...` against a real sshd on this machine: two fleetds, each
reached over ssh through this checkout's `fleetctl dial-stdio`, shown in one table.

The sshd is the test's own: a random port on 127.0.0.1, a temporary host key and
authorized key, its own config file (`-f`); the machine's ssh setup is never touched.
scripts/ensure-sshd.sh installs openssh-server (`make test` runs it).
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from supervisor.edges.control import ControlClient, DaemonUnreachable
from tests.entrypoints import entry_point
from tests.integration.conftest import Cleanup, _unavailable
from tests.integration.fleet_harness import Fleet

pytestmark = pytest.mark.integration

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, timeout=30
    )


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert process.poll() is None, f"sshd exited: {log.read_text()}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"sshd never listened on {port}: {log.read_text()}")


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A private sshd; yields the environment that makes fleetctl's ssh use it."""
    if not os.access(SSHD, os.X_OK) or shutil.which("ssh") is None:
        _unavailable("no sshd or ssh here; run scripts/ensure-sshd.sh")
    where = tmp_path / "sshd"
    where.mkdir()
    _keygen(where / "host_key")
    _keygen(where / "client_key")
    shutil.copy(where / "client_key.pub", where / "authorized_keys")
    port = _free_port()
    config = where / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {where / 'host_key'}\n"
        f"AuthorizedKeysFile {where / 'authorized_keys'}\nPidFile {where / 'sshd.pid'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation dir
    log = where / "sshd.log"
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=log.open("wb"))
    try:
        _wait_for_port(port, process, log)
        yield {
            "FLEETD_SSH_OPTS": (
                f"-i {where / 'client_key'} -o IdentitiesOnly=yes -o StrictHostKeyChecking=no "
                "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
            ),
            # This checkout's fleetctl, never one from the remote PATH.
            "FLEETD_REMOTE_FLEETCTL": entry_point("fleetctl"),
            "SSH_URL": f"ssh://{getpass.getuser()}@127.0.0.1:{port}",
        }
    finally:
        process.terminate()
        process.wait(timeout=10)


def fleetctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [entry_point("fleetctl"), *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "FLEETD_SOCKET": "", "FLEETD_HOST": "", **env},
        timeout=120,
    )


def _start_fleet(fleet: Fleet, service: str) -> None:
    container = f"{service}-{uuid.uuid4().hex[:8]}"
    fleet.write_config({service: fleet.service("llamacpp", container)})
    (fleet.state_dir / "services" / service).mkdir(parents=True)
    (fleet.state_dir / "services" / service / "model").write_text("big\n")
    fleet.run_container(container, "llamacpp", capacity_mib=8000)
    fleet.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            ControlClient(fleet.state_dir / "fleetd.sock").hello()
            return
        except DaemonUnreachable:
            assert fleet.process is not None and fleet.process.poll() is None, fleet.log.read_text()
            time.sleep(0.1)
    raise AssertionError(f"fleetd's socket never answered\n{fleet.log.read_text()}")


@pytest.fixture
def two_fleets(
    tmp_path: Path, docker_client: docker.DockerClient, cleanup: Cleanup, emitter_image: str
) -> Iterator[tuple[Fleet, Fleet]]:
    fleets = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        fleets.append(Fleet(tmp_path / name, docker_client, cleanup.labels))
    try:
        _start_fleet(fleets[0], "alpha")
        _start_fleet(fleets[1], "beta")
        yield fleets[0], fleets[1]
    finally:
        for f in fleets:
            if f.process is not None:
                f.process.kill()
                f.process.wait()


def test_status_of_two_hosts_over_ssh_in_one_table(
    sshd: dict[str, str], two_fleets: tuple[Fleet, Fleet]
) -> None:
    a, b = two_fleets
    host_a = f"{sshd['SSH_URL']}{a.state_dir / 'fleetd.sock'}"
    host_b = f"{sshd['SSH_URL']}{b.state_dir / 'fleetd.sock'}"

    r = fleetctl(sshd, "status", "--host", host_a, "--host", host_b)
    assert r.returncode == 0, r
    print(r.stdout)
    lines = r.stdout.splitlines()
    assert lines[0].split()[:2] == ["HOST", "SERVICE"]
    assert any(line.startswith(host_a) and " alpha " in line for line in lines), r.stdout
    assert any(line.startswith(host_b) and " beta " in line for line in lines), r.stdout

    # Before the command name, and as JSON: an object keyed by host.
    r = fleetctl(sshd, "--host", host_a, "--host", host_b, "status", "--json")
    assert r.returncode == 0, r
    report = json.loads(r.stdout)
    assert list(report) == [host_a, host_b]
    assert list(report[host_a]["services"]) == ["alpha"]
    assert list(report[host_b]["services"]) == ["beta"]

    # A change on one host over ssh, then both hosts' history: each under its own name.
    r = fleetctl(sshd, "downgrade", "alpha", "--host", host_a)
    assert r.returncode == 0, r
    r = fleetctl(sshd, "history", "--host", host_a, "--host", host_b, "--json")
    assert r.returncode == 0, r
    history = json.loads(r.stdout)
    assert list(history) == [host_a, host_b]
    [change] = history[host_a]
    moved = (change["service"], change["from_model"], change["to_model"])
    assert moved == ("alpha", "big", "medium"), change
    assert change["actor"] == "fleetctl"
    assert history[host_b] == []
    r = fleetctl(sshd, "history", "--host", host_a, "--host", host_b)
    assert r.returncode == 0, r
    text = r.stdout.splitlines()
    at_a, at_b = text.index(f"{host_a}:"), text.index(f"{host_b}:")
    assert at_a < at_b and any("alpha: rung 0 big" in line for line in text[at_a:at_b]), r.stdout
    assert text[at_b + 1 :] == ["no transitions yet"], r.stdout

    # FLEETD_HOST with one host: that host's plain status, through its fleetd.
    r = fleetctl({**sshd, "FLEETD_HOST": host_b}, "status", "--json")
    assert r.returncode == 0, r
    assert list(json.loads(r.stdout)["services"]) == ["beta"]

    # One host's fleetd stopped: the other still shows; one error line names the stopped one.
    b.stop()
    r = fleetctl(sshd, "status", "--host", host_a, "--host", host_b)
    assert r.returncode == 1, r
    assert " alpha " in r.stdout and "beta" not in r.stdout, r.stdout
    errors = r.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"fleetctl: error: {host_b}: "), r.stderr
    assert "fleetd is not running there" in errors[0], r.stderr
    r = fleetctl(sshd, "status", "--json", "--host", host_a, "--host", host_b)
    assert r.returncode == 1, r
    report = json.loads(r.stdout)
    assert "alpha" in report[host_a]["services"] and "not running" in report[host_b]["error"]

    # That host alone: exit 3, as for a local fleetd that is not running; no traceback.
    r = fleetctl(sshd, "status", "--host", host_b)
    assert r.returncode == 3, r
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


def test_a_bad_host_is_one_clear_line(sshd: dict[str, str], tmp_path: Path) -> None:
    closed = f"ssh://{getpass.getuser()}@127.0.0.1:{_free_port()}"
    r = fleetctl(sshd, "status", "--host", closed)
    assert r.returncode == 1, r
    assert r.stderr.startswith(f"fleetctl: error: {closed}: ssh failed: "), r.stderr
    assert r.stderr.count("\n") == 1, r.stderr

    # The remote fleetctl missing: named, with the variable that sets it.
    r = fleetctl({**sshd, "FLEETD_REMOTE_FLEETCTL": "/nonexistent/fleetctl"}, "status",
                 "--host", f"{sshd['SSH_URL']}{tmp_path / 'x.sock'}")  # fmt: skip
    assert r.returncode == 1, r
    assert "FLEETD_REMOTE_FLEETCTL" in r.stderr and r.stderr.count("\n") == 1, r.stderr

    # Not an ssh URL: a usage error (exit 2).
    r = fleetctl(sshd, "status", "--host", "tcp://127.0.0.1:1")
    assert r.returncode == 2, r

    # A changing command takes one host only.
    r = fleetctl(sshd, "reset", "web", "--host", closed, "--host", sshd["SSH_URL"])
    assert r.returncode == 2 and "only `status` and `history`" in r.stderr, r
