"""Throwaway Docker engines for tests that must change an engine's daemon config or swarm
state: the machine's own engine (/var/run/docker.sock) is shared and is never touched.

`throwaway_engine` starts this machine's `dockerd` with its own data root, exec root,
pidfile, socket, containerd namespace and `--config-file`, without a bridge or iptables
rules, optionally inside a network namespace; on exit it stops the daemon, unmounts
whatever is left under its roots and removes them. `linked_namespaces` makes network
namespaces joined by a veth pair (10.213.0.1 and 10.213.0.2), so that two engines are two
swarm nodes on one machine. Both clean up on every exit, failed starts included.

Engines that run swarm mode go into a namespace even alone: swarm mode binds 7946 (and
VXLAN 4789) and creates a `docker_gwbridge` interface, which in the machine's own
namespace would collide with the shared engine's single-node swarm tests.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors

DOCKERD = shutil.which("dockerd") or "/usr/sbin/dockerd"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0  # a swarm manager takes a few seconds to shut its raft down
LOG_TAIL_LINES = 30
SUBNET_PREFIX = "10.213.0"  # namespaced node addresses: .1, .2 (never routed outside)


class EngineError(Exception):
    """A throwaway engine or its network could not be set up."""


@dataclass(frozen=True)
class Engine:
    """A running throwaway dockerd and a client connected to it."""

    root: Path  # holds data/, exec/, docker.sock, docker.pid, dockerd.log
    client: docker.DockerClient
    process: subprocess.Popen[bytes]
    netns: str | None

    @property
    def socket(self) -> Path:
        return self.root / "docker.sock"

    @property
    def base_url(self) -> str:
        return f"unix://{self.socket}"

    def log_tail(self) -> str:
        return _tail(self.root / "dockerd.log")


def missing_tools() -> str | None:
    """Why throwaway engines cannot run here (no dockerd, not root), or None."""
    if not Path(DOCKERD).is_file():
        return "no dockerd binary here; run scripts/ensure-docker.sh"
    if os.geteuid() != 0:
        return "a throwaway dockerd needs root"
    return None


def missing_netns_tools() -> str | None:
    """Why network namespaces cannot be made here, or None."""
    for tool in ("ip", "nsenter"):
        if shutil.which(tool) is None:
            return f"no `{tool}` here (iproute2, util-linux): cannot make network namespaces"
    return missing_tools()


@contextmanager
def throwaway_engine(daemon_json: Path, netns: str | None = None) -> Iterator[Engine]:
    """A dockerd of its own configured by `daemon_json`, in network namespace `netns`
    (None: the machine's); stopped, unmounted and removed on exit, whatever happened.
    Raises EngineError with the tail of dockerd's log when it does not answer in time."""
    # The socket path must stay under 108 bytes: a short dir in /tmp, not pytest's tmp_path.
    root = Path(tempfile.mkdtemp(prefix="fleetd-engine-", dir="/tmp"))
    process: subprocess.Popen[bytes] | None = None
    try:
        process = _start(root, daemon_json, netns)
        client = _wait_until_up(root, process)
        try:
            yield Engine(root=root, client=client, process=process, netns=netns)
        finally:
            client.close()
    finally:
        if process is not None:
            _stop(process, root)
        _unmount_under(root)
        shutil.rmtree(root, ignore_errors=True)


def _start(root: Path, daemon_json: Path, netns: str | None) -> subprocess.Popen[bytes]:
    # Never the shared engine's `moby` namespace. containerd takes [A-Za-z0-9] runs joined
    # by one of `._-`: mkdtemp's random part may hold `_` (`fleetd-engine-_8j4k211` was
    # refused), so only its letters and digits are kept.
    namespace = "fleetdtest" + "".join(c for c in root.name if c.isalnum())
    argv = [
        DOCKERD,
        f"--data-root={root / 'data'}",
        f"--exec-root={root / 'exec'}",
        f"--pidfile={root / 'docker.pid'}",
        f"--host=unix://{root / 'docker.sock'}",
        f"--config-file={daemon_json}",
        f"--containerd-namespace={namespace}",
        f"--containerd-plugins-namespace={namespace}-plugins",
        "--bridge=none",
        "--iptables=false",
        *(["--ip6tables=false"] if _supports("--ip6tables") else []),
    ]
    if netns is not None:
        # nsenter, not `ip netns exec`: that one remounts /sys, hiding the cgroup mounts
        # dockerd needs ("Devices cgroup isn't mounted").
        argv = ["nsenter", f"--net=/run/netns/{netns}", "--", *argv]
    with open(root / "dockerd.log", "wb") as log:
        # A session of its own: a Ctrl-C meant for pytest must not reach it before teardown.
        return subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip


@functools.cache
def _supports(flag: str) -> bool:
    shown = subprocess.run(
        [DOCKERD, "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    return flag in shown.stdout


def _wait_until_up(root: Path, process: subprocess.Popen[bytes]) -> docker.DockerClient:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise EngineError(
                f"dockerd exited ({process.returncode}) before it answered; "
                f"{root / 'dockerd.log'} ends:\n{_tail(root / 'dockerd.log')}"
            )
        client = _connect(root / "docker.sock")
        if client is not None:
            return client
        if time.monotonic() > deadline:
            raise EngineError(
                f"dockerd did not answer on {root / 'docker.sock'} within "
                f"{START_TIMEOUT_S:.0f} s; {root / 'dockerd.log'} ends:\n"
                f"{_tail(root / 'dockerd.log')}"
            )
        time.sleep(0.2)


def _connect(socket: Path) -> docker.DockerClient | None:
    if not socket.is_socket():
        return None
    try:
        # Negotiated: Debian's engine speaks API 1.41, older than docker-py's default.
        client = docker.DockerClient(base_url=f"unix://{socket}", version="auto", timeout=30)
        client.ping()
    except docker.errors.DockerException:
        return None
    return client


def _stop(process: subprocess.Popen[bytes], root: Path) -> None:
    """SIGTERM, a wait, then SIGKILL; and the containerd it started, should it outlive it."""
    containerd = _pid_in(root / "exec" / "containerd" / "containerd.pid")
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if containerd is not None:
        _kill_if_alive(containerd, process.pid)


def _pid_in(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _kill_if_alive(pid: int, parent: int) -> None:
    """SIGKILL the containerd dockerd `parent` started, if it still runs: checked by its
    parent process id (1 once orphaned) and its command, so a reused pid is left alone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return  # gone
    ppid = int(stat.rpartition(")")[2].split()[1])
    if b"containerd" in cmdline.split(b"\0")[0] and ppid in (parent, 1):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _unmount_under(root: Path) -> None:
    """Detach every mount left at or below `root`, deepest first (dockerd unmounts its own
    on a clean stop; a killed one leaves its data-root bind and netns files)."""
    prefix = str(root.resolve())
    for point in sorted(_mount_points(), key=lambda p: p.count("/"), reverse=True):
        if point == prefix or point.startswith(prefix + "/"):
            subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)


def _mount_points() -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        # Field 5 is the mount point, with spaces and such written as octal escapes.
        point = line.split()[4]
        points.append(point.encode().decode("unicode_escape"))
    return points


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"(cannot read {path}: {e.strerror})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


# --- network namespaces -------------------------------------------------------------------


@dataclass(frozen=True)
class Namespace:
    """A network namespace with its loopback up and, when linked, one address."""

    name: str
    address: str  # what a swarm node here advertises: 127.0.0.1 when not linked


@contextmanager
def linked_namespaces(count: int) -> Iterator[list[Namespace]]:
    """`count` (1 or 2) fresh network namespaces; two are joined by a veth pair on
    10.213.0.0/24. Deleted on exit (with their veths and whatever dockerd made there)."""
    if count not in (1, 2):
        raise ValueError(f"linked_namespaces: 1 or 2 namespaces, not {count}")
    tag = uuid.uuid4().hex[:8]
    names = [f"fleetd-test-{tag}-{i}" for i in range(1, count + 1)]
    made: list[str] = []
    try:
        for name in names:
            _ip("netns", "add", name)
            made.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        if count == 1:
            yield [Namespace(names[0], "127.0.0.1")]
            return
        yield _link(names[0], names[1])
    finally:
        for name in reversed(made):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)


def _link(first: str, second: str) -> list[Namespace]:
    # Interface names are per namespace: the same short name on both sides is fine.
    _ip("link", "add", "fleet0", "netns", first, "type", "veth",
        "peer", "name", "fleet0", "netns", second)  # fmt: skip
    linked = []
    for number, name in enumerate((first, second), start=1):
        address = f"{SUBNET_PREFIX}.{number}"
        _ip("-n", name, "addr", "add", f"{address}/24", "dev", "fleet0")
        _ip("-n", name, "link", "set", "fleet0", "up")
        linked.append(Namespace(name, address))
    return linked


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise EngineError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")
