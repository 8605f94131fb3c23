"""fleetd under a real systemd (PID 1), installed the way README "Running under systemd" says.

Each test boots its own container from fleetd-test/systemd:1 (Debian bookworm, systemd,
/opt/fleetd holding fleetd's dependencies), installs the wheel of this checkout, the
sysusers file, a config and the unit as the README tells ops to, and checks what an ops
engineer sees: `systemctl`, `journalctl -u fleetd` and `fleetctl`. fleetd drives the host's
engine through its bind-mounted socket; the service it watches is a fleetd-test/oom-emitter
container on that engine. The state directory is a host folder mounted at /var/lib/fleetd,
so the emitter mounts its model hand-off folder from it (the file strategy, fleetd's
default) and the test reads state.json as it lies on disk.

What belongs to the container, not to the unit:
- the `docker` group is created with the gid of the host's socket before systemd-sysusers
  runs, as the docker.io package does on a real host;
- the host runs cgroup v1, whose name=systemd hierarchy is read-only in the container, so
  every start logs "Failed to attach <pid> to compat systemd cgroup ...": harmless, systemd
  tracks the service in the unified (v2) hierarchy, which is writable;
- `docker cp` cannot write into the --tmpfs mounts (/tmp, /run): files go through /var/tmp;
- systemd counts every start, manual or automatic, against StartLimitBurst=5 in 5 minutes;
  a test that starts fleetd again after a failure runs `systemctl reset-failed` first, as an
  operator would.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import docker
import pytest
import yaml
from docker.models.containers import Container

from tests.integration.fleet_harness import IMAGE as EMITTER_IMAGE
from tests.integration.fleet_harness import LADDER, SIZES

if TYPE_CHECKING:
    from .conftest import Cleanup

REPO_ROOT = Path(__file__).resolve().parents[2]
UNIT_FILE = REPO_ROOT / "systemd" / "fleetd.service"
SYSUSERS_FILE = REPO_ROOT / "systemd" / "fleetd.sysusers"

STAGING = "/var/tmp/fleetd-install"  # in the image's own file system, see above
STATE_DIR = "/var/lib/fleetd"
CONFIG = "/etc/fleetd/fleet.yaml"
FLEETCTL = "/opt/fleetd/bin/fleetctl"
DROP_IN_DIR = "/etc/systemd/system/fleetd.service.d"
CAPACITY_MIB = 3000  # the emitter's pretend GPU: big (4000 MiB) does not fit, medium does

BOOT_S = 30
START_S = 30
STEP_DOWN_S = 60
JOURNAL_S = 10
RESTART_S = 30  # the unit's RestartSec=5s, and a start

T = TypeVar("T")

# README "Running under systemd", step by step. /opt/fleetd is in the image already with
# fleetd's dependencies, so `pip install .` becomes: install the wheel of this checkout.
INSTALL = """
set -eu
cd {staging}
# What the docker.io package does on a real host: the socket's group exists before sysusers.
groupadd --non-unique --gid {docker_gid} docker
/opt/fleetd/bin/pip install --quiet --no-deps --no-index {wheel}
install -m 0644 fleetd.sysusers /usr/lib/sysusers.d/fleetd.conf
systemd-sysusers
install -d -m 0755 /etc/fleetd && install -m 0644 fleet.yaml {config}
/opt/fleetd/bin/fleetd check-config --config {config}
install -m 0644 fleetd.service /etc/systemd/system/fleetd.service
systemctl daemon-reload && systemctl enable --quiet fleetd
"""


@dataclass(frozen=True)
class Ran:
    argv: tuple[str, ...]
    exit_code: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"$ {' '.join(self.argv)}  (exit {self.exit_code})\n{self.stdout}{self.stderr}"


class SystemdHost:
    """A booted systemd container with fleetd installed; commands run in it as root."""

    def __init__(self, container: Container, state_dir: Path, emitter_name: str) -> None:
        self.container = container
        self.state_dir = state_dir  # the host folder mounted at STATE_DIR
        self.emitter_name = emitter_name  # the container of service `coder`

    # --- commands ---------------------------------------------------------------------

    def run(self, *argv: str, check: bool = True) -> Ran:
        exit_code, (out, err) = self.container.exec_run(list(argv), demux=True)
        ran = Ran(argv, exit_code, (out or b"").decode(), (err or b"").decode())
        assert not check or exit_code == 0, f"{ran}\n{self.diagnosis()}"
        return ran

    def as_user(self, user: str, *argv: str) -> Ran:
        return self.run("runuser", "-u", user, "--", *argv)

    def sh(self, script: str) -> Ran:
        return self.run("bash", "-c", script)

    def put(self, files: dict[str, bytes]) -> None:
        """Copy files into STAGING."""
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(f"{Path(STAGING).name}/{name}")
                info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
                tar.addfile(info, io.BytesIO(data))
        assert self.container.put_archive(str(Path(STAGING).parent), archive.getvalue())

    def install(self, wheel: Path, config: dict[str, Any], docker_gid: int) -> None:
        self.put(
            {
                wheel.name: wheel.read_bytes(),
                "fleetd.service": UNIT_FILE.read_bytes(),
                "fleetd.sysusers": SYSUSERS_FILE.read_bytes(),
                "fleet.yaml": yaml.safe_dump(config).encode(),
            }
        )
        self.sh(
            INSTALL.format(staging=STAGING, docker_gid=docker_gid, wheel=wheel.name, config=CONFIG)
        )

    def write_config(self, config: dict[str, Any]) -> None:
        self.put({"fleet.yaml": yaml.safe_dump(config).encode()})
        self.run("install", "-m", "0644", f"{STAGING}/fleet.yaml", CONFIG)

    def drop_in(self, name: str, service_section: str) -> None:
        """Add /etc/systemd/system/fleetd.service.d/NAME.conf and reload systemd."""
        self.put({f"{name}.conf": f"[Service]\n{service_section}".encode()})
        self.sh(
            f"install -D -m 0644 {STAGING}/{name}.conf {DROP_IN_DIR}/{name}.conf"
            " && systemctl daemon-reload"
        )

    # --- what an operator looks at --------------------------------------------------------

    def show(self, *properties: str) -> dict[str, str]:
        """`systemctl show fleetd -p ...` as a dict."""
        out = self.run("systemctl", "show", "fleetd", "-p", ",".join(properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *match: str) -> str:
        """Journal messages (no prefixes): fleetd's unit by default, or the given matches."""
        selector = match or ("-u", "fleetd")
        return self.run("journalctl", "--no-pager", "-o", "cat", *selector).stdout

    def status_json(self, user: str | None = None) -> dict[str, Any]:
        argv = (FLEETCTL, "status", "--json")
        ran = self.run(*argv) if user is None else self.as_user(user, *argv)
        return json.loads(ran.stdout)  # type: ignore[no-any-return]

    def coder(self) -> dict[str, Any]:
        return self.status_json()["services"]["coder"]  # type: ignore[no-any-return]

    def saved_state(self) -> dict[str, Any]:
        return json.loads((self.state_dir / "state.json").read_text())  # type: ignore[no-any-return]

    def why(self, *facts: object) -> str:
        """An assertion message: the facts, then the diagnosis."""
        return "\n".join([*map(str, facts), self.diagnosis()])

    def diagnosis(self) -> str:
        """`systemctl status` and the journal's tail: what a red run needs to be read."""
        status = self.run("systemctl", "status", "fleetd", "--no-pager", "-l", "-n0", check=False)
        journal = ("journalctl", "-u", "fleetd", "--no-pager", "-n", "60", "-o", "short-precise")
        tail = self.run(*journal, check=False)
        return (
            f"--- systemctl status fleetd\n{status.stdout}{status.stderr}"
            f"--- journalctl -u fleetd (last 60 lines)\n{tail.stdout}{tail.stderr}"
        )

    # --- waiting ---------------------------------------------------------------------------

    def wait_for(self, what: str, probe: Callable[[], T | None], timeout_s: float) -> T:
        """Poll `probe` until it returns something other than None."""
        deadline = time.monotonic() + timeout_s
        while (found := probe()) is None:
            if time.monotonic() >= deadline:
                raise AssertionError(f"no {what} within {timeout_s}s\n{self.diagnosis()}")
            time.sleep(0.2)
        return found

    def wait_for_journal(self, text: str, *match: str, timeout_s: float = JOURNAL_S) -> str:
        """The journal once it has a line containing `text` (journald may lag a little)."""
        return self.wait_for(
            f"journal line with {text!r}",
            lambda: journal if text in (journal := self.journal(*match)) else None,
            timeout_s,
        )

    def booted(self) -> str | None:
        state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
        return state if state in ("running", "degraded") else None

    def start(self) -> dict[str, str]:
        """`systemctl start fleetd`, which returns once fleetd has said READY=1."""
        self.run("systemctl", "start", "fleetd")
        unit = self.show("ActiveState", "SubState", "MainPID", "NRestarts")
        assert (unit["ActiveState"], unit["SubState"]) == ("active", "running"), (
            f"{unit}\n{self.diagnosis()}"
        )
        return unit

    def last_watchdog_ping(self) -> str:
        return self.show("WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]

    def restarted(self, old_pid: str, old_restarts: int) -> dict[str, str] | None:
        """The unit once systemd has restarted it: a new MainPID, active again."""
        unit = self.show("ActiveState", "SubState", "MainPID", "NRestarts")
        fresh = unit["MainPID"] not in ("0", old_pid) and int(unit["NRestarts"]) > old_restarts
        running = (unit["ActiveState"], unit["SubState"]) == ("active", "running")
        return unit if fresh and running else None


def fleet_config(emitter_name: str, **more_services: dict[str, Any]) -> dict[str, Any]:
    ladder = [{"model": model, "vram": vram} for model, vram in LADDER]
    coder = {"runtime": "llamacpp", "containers": [emitter_name], "ladder": ladder}
    return {
        "budget": 0.85,
        "gpus": [{"name": "test", "memory": "8GiB"}],
        "policy": {
            "incidents_to_step_down": 3,
            "incident_window": "10m",
            "cooldown": "1s",
            "burst_window": "1s",
            "stop_timeout": "2s",
        },
        "services": {"coder": coder, **more_services},
    }


@pytest.fixture
def host(
    tmp_path: Path,
    docker_client: docker.DockerClient,
    cleanup: Cleanup,
    docker_socket: Path,
    systemd_image: str,
    fleetd_wheel: Path,
    emitter_image: str,
) -> SystemdHost:
    """A fresh systemd container with fleetd installed and enabled, not started yet."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    suffix = uuid.uuid4().hex[:8]
    # ENVIRONMENT.md's recipe for systemd as PID 1 where --privileged is refused; the
    # image has STOPSIGNAL SIGRTMIN+3, ENTRYPOINT /sbin/init and an empty /etc/machine-id.
    container = docker_client.containers.run(
        systemd_image,
        name=f"fleetd-systemd-{suffix}",
        detach=True,
        labels=cleanup.labels,
        cap_add=["SYS_ADMIN"],
        security_opt=["seccomp=unconfined"],
        cgroupns="private",
        tmpfs={"/run": "", "/run/lock": "", "/tmp": ""},
        volumes={
            str(docker_socket): {"bind": "/var/run/docker.sock", "mode": "rw"},
            str(state_dir): {"bind": STATE_DIR, "mode": "rw"},
        },
    )
    host = SystemdHost(container, state_dir, emitter_name=f"coder-{suffix}")
    host.wait_for("finished boot (systemctl is-system-running)", host.booted, BOOT_S)
    host.install(fleetd_wheel, fleet_config(host.emitter_name), docker_socket.stat().st_gid)
    return host


def run_emitter(
    host: SystemdHost, client: docker.DockerClient, labels: dict[str, str]
) -> Container:
    """The coder's llama.cpp stand-in, reading the model fleetd hands off; it crash-loops
    (restart policy on-failure) while that model needs more than CAPACITY_MIB."""
    handoff = host.state_dir / "services" / "coder"
    assert (handoff / "model").is_file(), f"fleetd wrote no model file\n{host.diagnosis()}"
    return client.containers.run(
        EMITTER_IMAGE,
        name=host.emitter_name,
        detach=True,
        labels=labels,
        environment={
            "RUNTIME": "llamacpp",
            "CAPACITY_MIB": str(CAPACITY_MIB),
            "MODEL_SIZES": SIZES,
        },
        volumes={str(handoff): {"bind": "/run/fleetd", "mode": "ro"}},
        restart_policy={"Name": "on-failure"},
    )


def step_down(host: SystemdHost, client: docker.DockerClient, labels: dict[str, str]) -> Container:
    """Start fleetd and the coder's emitter on `big`; return once fleetd moved it to `medium`."""
    host.start()
    emitter = run_emitter(host, client, labels)
    host.wait_for(
        "step down of coder to rung 1 in `fleetctl status --json`",
        lambda: svc if (svc := host.coder())["rung"] == 1 else None,
        STEP_DOWN_S,
    )
    host.wait_for_journal("coder: now rung 1 (medium), was rung 0 (big)")
    return emitter


# --- the tests ------------------------------------------------------------------------------


def test_start_reaches_active_running_only_through_ready(host: SystemdHost) -> None:
    # The same fleetd without a notify socket cannot send READY=1: it runs, and systemd
    # still holds the unit in "activating" (until TimeoutStartSec would fail it).
    host.drop_in("no-notify", "UnsetEnvironment=NOTIFY_SOCKET\n")
    host.run("systemctl", "start", "--no-block", "fleetd")
    host.wait_for_journal("fleetd running")  # logged just after READY=1 would have gone
    unit = host.show("ActiveState", "SubState", "StatusText")
    assert (unit["ActiveState"], unit["SubState"]) == ("activating", "start"), host.why(unit)
    host.run("systemctl", "stop", "fleetd")
    host.run("rm", f"{DROP_IN_DIR}/no-notify.conf")
    host.run("systemctl", "daemon-reload")

    started = time.monotonic()
    host.run("systemctl", "start", "fleetd")  # blocks until READY=1 (Type=notify)
    elapsed_s = time.monotonic() - started

    unit = host.show("Type", "ActiveState", "SubState", "MainPID", "ExecMainPID", "StatusText")
    assert unit["Type"] == "notify", host.why(unit)
    assert (unit["ActiveState"], unit["SubState"]) == ("active", "running"), host.why(unit)
    assert unit["MainPID"] == unit["ExecMainPID"] != "0", host.why(unit)
    # STATUS= arrives with READY=1: fleetd's one-line summary, through the notify socket.
    assert unit["StatusText"] == "coder=big (steady)", host.why(unit)
    status = host.run("systemctl", "status", "fleetd", "--no-pager").stdout
    assert "Active: active (running)" in status, host.why(status)
    assert 'Status: "coder=big (steady)"' in status, host.why(status)
    assert elapsed_s < START_S, host.why(f"systemctl start took {elapsed_s:.1f}s")


def test_fleetctl_status_works_for_root_and_for_ordinary_users(host: SystemdHost) -> None:
    host.start()
    # ops, an operator in group fleetd, may use the control socket (mode 0660, in
    # RuntimeDirectory /run/fleetd, mode 0750); nobody, in none of fleetd's groups, may
    # not and is shown the saved state instead. Neither needs root.
    host.run("useradd", "--no-create-home", "--groups", "fleetd", "ops")

    for user, live in ((None, True), ("ops", True), ("nobody", False)):
        report = host.status_json(user)
        coder = report["services"]["coder"]
        seen = (coder["model"], coder["rung"], coder["state"])
        assert seen == ("big", 0, "steady"), host.why(user, report)
        assert (report["daemon"] is not None) == live, host.why(user, report)
        argv = (FLEETCTL, "status")
        table = (host.run(*argv) if user is None else host.as_user(user, *argv)).stdout
        [row] = [line for line in table.splitlines() if line.startswith("coder ")]
        # service, model, the rung's options ("-": none set), rung
        assert row.split()[:6] == ["coder", "big", "-", "0", "of", "5"], host.why(user, table)


def test_oom_lines_step_the_service_down_in_status_and_journal(
    host: SystemdHost, docker_client: docker.DockerClient, cleanup: Cleanup
) -> None:
    emitter = step_down(host, docker_client, cleanup.labels)

    coder = host.coder()
    assert (coder["model"], coder["rung"]) == ("medium", 1), host.why(coder)
    journal = host.journal()
    assert "coder: now rung 1 (medium), was rung 0 (big)" in journal, host.why()
    assert (
        "evidence: ggml_backend_cuda_buffer_type_alloc_buffer: allocating 4000.00 MiB on device 0:"
        " cudaMalloc failed: out of memory" in journal
    ), host.why()
    assert (host.state_dir / "services/coder/model").read_text().strip() == "medium", host.why()
    # The emitter, restarted by fleetd through the host's socket, now loads medium.
    host.wait_for(
        "the emitter serving medium",
        lambda: True if "main: model loaded" in emitter.logs(tail=10).decode() else None,
        JOURNAL_S,
    )


def test_reload_applies_an_added_service(host: SystemdHost) -> None:
    before = host.start()
    chat = {
        "runtime": "ollama",
        "containers": [f"chat-{uuid.uuid4().hex[:8]}"],  # not created: fleetd waits for it
        "ladder": [{"model": "llama3.2:3b", "vram": "2048MiB"}],
    }
    host.write_config(fleet_config(host.emitter_name, chat=chat))

    host.run("systemctl", "reload", "fleetd")  # ExecReload sends SIGHUP and returns

    host.wait_for_journal("config reloaded: added ['chat'], changed -, removed -")
    report = host.status_json()
    assert report["services"]["chat"]["model"] == "llama3.2:3b", host.why(report)
    assert report["services"]["coder"]["model"] == "big", host.why(report)
    after = host.show("ActiveState", "SubState", "MainPID", "NRestarts", "StatusText")
    assert after["MainPID"] == before["MainPID"] and after["NRestarts"] == "0", host.why(after)
    # STATUS= lists the services in the config's order (safe_dump sorts them).
    assert after["StatusText"] == "chat=llama3.2:3b (steady), coder=big (steady)", host.why(after)


def test_reload_refuses_a_bad_config_and_keeps_the_running_one(host: SystemdHost) -> None:
    before = host.start()
    bad = fleet_config(host.emitter_name)
    bad["services"]["coder"]["ladder"][0]["vram"] = "lots"
    host.write_config(bad)

    host.run("systemctl", "reload", "fleetd")

    host.wait_for_journal("reload refused, keeping the running config")
    after = host.show("ActiveState", "SubState", "MainPID")
    assert (after["ActiveState"], after["SubState"]) == ("active", "running"), host.why(after)
    assert after["MainPID"] == before["MainPID"], host.why(before, after)
    assert (coder := host.coder())["model"] == "big", host.why(coder)


def test_stop_exits_cleanly_and_leaves_the_state_intact(host: SystemdHost) -> None:
    pid = host.start()["MainPID"]
    running = host.status_json()

    started = time.monotonic()
    host.run("systemctl", "stop", "fleetd")
    elapsed_s = time.monotonic() - started

    unit = host.show("ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    assert unit == {
        "ActiveState": "inactive",
        "Result": "success",
        "ExecMainCode": "1",  # CLD_EXITED: it exited by itself, no signal killed it
        "ExecMainStatus": "0",
    }, host.why(unit)
    assert elapsed_s < 10, host.why(f"systemctl stop took {elapsed_s:.1f}s")
    host.wait_for_journal("fleetd stopped", f"_PID={pid}")
    state = host.saved_state()
    assert state["version"] == 1 and state["services"]["coder"]["model"] == "big", host.why(state)
    assert not list(host.state_dir.glob(".state.json.*")), host.why("a temp file is left")
    assert (report := host.status_json())["services"] == running["services"], host.why(report)


def test_kill_9_is_restarted_by_systemd_with_the_state_intact(
    host: SystemdHost, docker_client: docker.DockerClient, cleanup: Cleanup
) -> None:
    emitter = step_down(host, docker_client, cleanup.labels)
    before = host.show("MainPID", "NRestarts")
    emitter.reload()
    emitter_started = emitter.attrs["State"]["StartedAt"]

    host.run("kill", "-9", before["MainPID"])

    unit = host.wait_for(
        "restart by systemd after kill -9",
        lambda: host.restarted(before["MainPID"], int(before["NRestarts"])),
        RESTART_S,
    )
    new_run = host.wait_for_journal("fleetd running", f"_PID={unit['MainPID']}")
    assert "fleetd running: coder=medium" in new_run, host.why()
    assert "code=killed, status=9/KILL" in host.journal(), host.why()
    coder = host.coder()
    assert (coder["model"], coder["rung"]) == ("medium", 1), host.why(coder)
    history = host.saved_state()["history"]
    changes = [(h["from_model"], h["to_model"]) for h in history]
    assert changes == [("big", "medium")], host.why(history)
    assert (host.state_dir / "services/coder/model").read_text().strip() == "medium", host.why()
    emitter.reload()
    assert emitter.attrs["State"]["StartedAt"] == emitter_started, host.why("restarted again")


def test_a_hung_fleetd_is_killed_by_the_watchdog_and_restarted(host: SystemdHost) -> None:
    # The unit's WatchdogSec=30s, shortened so that a test can wait for it.
    host.drop_in("test", "WatchdogSec=3s\nTimeoutAbortSec=2s\nTimeoutStopSec=5s\nRestartSec=1s\n")
    before = host.start()
    assert (unit := host.show("WatchdogUSec"))["WatchdogUSec"] == "3s", host.why(unit)
    # fleetd pings: the time of the last ping moves on (it pings every WatchdogSec/2).
    first_ping = host.last_watchdog_ping()
    host.wait_for(
        "a watchdog ping from fleetd",
        lambda: ping if (ping := host.last_watchdog_ping()) != first_ping else None,
        JOURNAL_S,
    )

    host.run("kill", "-STOP", before["MainPID"])

    host.wait_for(
        "restart by systemd after the watchdog fired",
        lambda: host.restarted(before["MainPID"], int(before["NRestarts"])),
        RESTART_S,
    )
    journal = host.journal()
    assert "Watchdog timeout (limit 3s)!" in journal, host.why()
    assert "Failed with result 'watchdog'" in journal, host.why()


def test_the_sandbox_the_unit_promises_is_in_force(host: SystemdHost, docker_socket: Path) -> None:
    pid = host.start()["MainPID"]
    status = dict(
        line.split(":\t", 1) for line in host.run("cat", f"/proc/{pid}/status").stdout.splitlines()
    )
    fleetd_uid = host.run("id", "-u", "fleetd").stdout.strip()
    assert status["Uid"].split() == [fleetd_uid] * 4, host.why(status)
    assert str(docker_socket.stat().st_gid) in status["Groups"].split(), host.why(status)
    assert status["NoNewPrivs"] == "1", host.why(status)  # NoNewPrivileges=yes
    # SystemCallArchitectures=, RestrictAddressFamilies=, ... are a seccomp filter
    assert status["Seccomp"] == "2", host.why(status)
    for caps in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):  # CapabilityBoundingSet= (empty)
        assert int(status[caps], 16) == 0, host.why(status)

    # mount point -> (root of the mount in its file system, options); the last mount wins.
    mounts = {
        fields[4]: (fields[3], fields[5].split(","))
        for fields in (
            line.split() for line in host.run("cat", f"/proc/{pid}/mountinfo").stdout.splitlines()
        )
    }
    assert "ro" in mounts["/"][1], host.why(mounts)  # ProtectSystem=strict
    assert "rw" in mounts[STATE_DIR][1], host.why(mounts)  # StateDirectory=fleetd
    assert "rw" in mounts["/run/fleetd"][1], host.why(mounts)  # RuntimeDirectory=fleetd
    assert "ro" in mounts["/proc/sys"][1], host.why(mounts)  # ProtectKernelTunables=yes
    for hidden in ("/home", "/root", "/run/user"):  # ProtectHome=yes
        assert mounts[hidden][0].endswith("/inaccessible/dir"), host.why(mounts)
    assert "systemd-private-" in mounts["/tmp"][0], host.why(mounts)  # PrivateTmp=yes

    # RestrictAddressFamilies= keeps AF_INET: the metrics endpoint fleetd announces answers.
    served = re.search(r"metrics: serving (http://\S+)", host.journal())
    assert served is not None, host.why("fleetd announced no metrics endpoint")
    fetch = f"import urllib.request as u; print(u.urlopen({served[1]!r}, timeout=5).read())"
    scrape = host.run("/opt/fleetd/bin/python3", "-c", fetch)
    assert "fleetd_" in scrape.stdout, host.why(scrape)
