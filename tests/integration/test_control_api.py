"""fleetctl driving a real `fleetd run` through its control socket, and on its own when no
fleetd runs, against real containers: each change is seen where a user would look (the
container's log, `fleetctl status`, the history)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from supervisor.edges.control import ControlClient, DaemonUnreachable
from tests.integration.fleet_harness import Fleet, at_rung

pytestmark = pytest.mark.integration


def fleetctl(
    fleet: Fleet, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    code = "from supervisor.cli.fleetctl import main; main()"
    where = ["--config", str(fleet.config), "--state-dir", str(fleet.state_dir)]
    if args[0] in ("history", "reload", "warm"):
        where = where[2:]
    return subprocess.run(
        [sys.executable, "-c", code, *args, *where],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "FLEETD_SOCKET": "", **(env or {})},
        timeout=120,
    )


def wait_for_socket(fleet: Fleet, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ControlClient(fleet.state_dir / "fleetd.sock").hello()
            return
        except DaemonUnreachable:
            assert fleet.process is not None and fleet.process.poll() is None, fleet.log.read_text()
            time.sleep(0.1)
    raise AssertionError(f"fleetd's socket never answered\n{fleet.log.read_text()}")


def logs_show(container: docker.models.containers.Container, text: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in container.logs(tail=40).decode():
            return True
        time.sleep(0.2)
    return False


def one_service(
    fleet: Fleet, capacity_mib: int, **extra: object
) -> docker.models.containers.Container:
    name = f"web-{uuid.uuid4().hex[:8]}"
    fleet.write_config({"web": fleet.service("llamacpp", name, **extra)}, cooldown="1s")
    (fleet.state_dir / "services/web").mkdir(parents=True)
    (fleet.state_dir / "services/web/model").write_text("big\n")
    return fleet.run_container(name, "llamacpp", capacity_mib=capacity_mib, OOM_INTERVAL_S="0.3")


def test_downgrade_and_reset_through_fleetd_restart_the_container(fleet: Fleet) -> None:
    container = one_service(fleet, capacity_mib=8000)  # everything fits
    fleet.start()
    wait_for_socket(fleet)

    r = fleetctl(fleet, "downgrade", "web")
    assert r.returncode == 0, r
    assert r.stdout.strip() == f"web: down to rung 1 of 5 (medium); restarted {container.name}"
    assert "not running" not in r.stderr
    # The reply comes once the container has been restarted into the new model.
    assert logs_show(container, "loading model 'medium'", timeout_s=10)
    status = json.loads(fleetctl(fleet, "status", "--json").stdout)
    web = status["services"]["web"]
    assert (web["model"], web["rung"], web["state"]) == ("medium", 1, "cooldown")
    assert status["daemon"]["pid"] == fleet.process.pid  # type: ignore[union-attr]
    [change] = json.loads(fleetctl(fleet, "history", "--json").stdout)
    assert change["actor"] == "fleetctl"
    assert change["reason"].startswith(f"downgrade with fleetctl by uid {os.getuid()}")

    r = fleetctl(fleet, "reset", "--all")
    assert r.returncode == 0, r
    assert r.stdout.strip() == f"web: back to rung 0 of 5 (big); restarted {container.name}"
    container.reload()
    assert logs_show(container, "loading model 'big'", timeout_s=10)
    assert fleet.state()["services"]["web"]["rung"] == 0
    assert fleet.stop() == 0


def test_a_pinned_service_is_not_stepped_down_until_unpinned(fleet: Fleet) -> None:
    name = f"web-{uuid.uuid4().hex[:8]}"
    fleet.write_config({"web": fleet.service("llamacpp", name)}, cooldown="1s")
    fleet.start()
    wait_for_socket(fleet)
    r = fleetctl(fleet, "pin", "web", "big")
    assert r.returncode == 0, r
    assert r.stdout.strip() == "web: pinned at rung 0 of 5 (big)"

    # big does not fit in 3000 MiB: the container crash-loops, fleetd counts and holds.
    fleet.run_container(name, "llamacpp", capacity_mib=3000, OOM_INTERVAL_S="0.3")
    state = fleet.wait_for(
        "4 incidents", lambda s: len(s["services"]["web"]["incidents"]) >= 4, timeout_s=60
    )
    assert (state["services"]["web"]["rung"], state["services"]["web"]["state"]) == (0, "pinned")
    assert "but rung 0 is pinned" in fleet.log.read_text()

    r = fleetctl(fleet, "unpin", "web")
    assert r.returncode == 0 and r.stdout.strip() == "web: unpinned at rung 0 of 5 (big)", r
    state = fleet.wait_for("a step down once unpinned", at_rung("web", 1), timeout_s=60)
    assert state["history"][-1]["actor"] == "fleetd"
    assert fleet.stop() == 0


def test_upgrade_is_refused_when_the_vram_check_fails_and_forced_with_force(
    fleet: Fleet,
) -> None:
    # The declared 8 GiB GPU gives a 6963 MiB budget: web's big (4000 MiB) does not fit
    # beside `other` at 3500 MiB, so fleetd starts web on medium, and keeps it there.
    name = f"web-{uuid.uuid4().hex[:8]}"
    other = fleet.service("llamacpp", f"other-{uuid.uuid4().hex[:8]}")
    other["ladder"] = [{"model": "solid", "vram": "3500MiB"}]
    fleet.write_config({"web": fleet.service("llamacpp", name), "other": other})
    fleet.state_dir.mkdir(parents=True)
    container = fleet.run_container(name, "llamacpp", capacity_mib=8000)
    fleet.start()
    wait_for_socket(fleet)
    status = json.loads(fleetctl(fleet, "status", "--json").stdout)  # answered once settled
    assert status["services"]["web"]["rung"] == 1

    r = fleetctl(fleet, "upgrade", "web")
    assert r.returncode == 1, r
    assert "web: rung 0 will not fit: needs 4000 MiB; the most room beside the other" in r.stderr
    assert "(--force to try anyway)" in r.stderr
    assert fleet.state()["services"]["web"]["rung"] == 1

    r = fleetctl(fleet, "upgrade", "web", "--force")
    assert r.returncode == 0, r
    assert logs_show(container, "loading model 'big'", timeout_s=10)
    change = fleet.state()["history"][-1]
    assert "forced; the VRAM check said: needs 4000 MiB" in change["reason"]
    assert fleet.stop() == 0


def test_without_fleetd_fleetctl_restarts_the_container_itself(fleet: Fleet) -> None:
    container = one_service(fleet, capacity_mib=8000)
    assert logs_show(container, "loading model 'big'", timeout_s=10)

    r = fleetctl(fleet, "downgrade", "web")
    assert r.returncode == 0, r
    assert "fleetd is not running" in r.stderr
    assert r.stdout.strip() == f"web: down to rung 1 of 5 (medium); restarted {container.name}"
    assert logs_show(container, "loading model 'medium'", timeout_s=10)
    assert (fleet.state_dir / "services/web/model").read_text() == "medium\n"

    fleet.start()  # fleetd takes the service where fleetctl left it
    wait_for_socket(fleet)
    time.sleep(1)
    state = fleet.state()
    assert state["services"]["web"]["rung"] == 1
    assert [t["actor"] for t in state["history"]] == ["fleetctl"]
    assert fleet.stop() == 0


def test_a_change_recorded_without_docker_is_completed_when_fleetd_starts(fleet: Fleet) -> None:
    container = one_service(fleet, capacity_mib=8000)
    no_docker = {"DOCKER_HOST": f"unix://{fleet.tmp}/no-docker.sock"}
    r = fleetctl(fleet, "downgrade", "web", env=no_docker)
    assert r.returncode == 0, r
    assert "the change applies when fleetd starts" in r.stdout
    assert "loading model 'medium'" not in container.logs().decode()

    fleet.start()
    state = fleet.wait_for("the recorded change completed", at_rung("web", 1), timeout_s=30)
    assert state["history"][-1]["actor"] == "fleetctl"
    assert logs_show(container, "loading model 'medium'", timeout_s=10)
    assert fleet.stop() == 0


# ---------------------------------------------------------------- who may use the socket

NOBODY = 65534
SOCKET_GROUP = 4242


@pytest.fixture
def open_fleet(docker_client: docker.DockerClient, cleanup: object) -> Iterator[Fleet]:
    """A fleet whose files other users can read (pytest's tmp dirs are root-only)."""
    with tempfile.TemporaryDirectory(prefix="fleetd-") as d:
        os.chmod(d, 0o755)
        f = Fleet(Path(d), docker_client, cleanup.labels)  # type: ignore[attr-defined]
        yield f
        if f.process is not None:
            f.stop()


def as_user(
    fleet: Fleet, uid: int, groups: list[int], *args: str
) -> subprocess.CompletedProcess[str]:
    """fleetctl with a real unprivileged uid: imports as root (this venv's Python lives
    under /root, which others cannot read), then drops to `uid` with only `groups` before
    anything touches the socket or the state."""
    code = (
        "import os, sys\n"
        "from supervisor.cli.fleetctl import main\n"
        # What fleetctl loads only when a command needs it, loaded here while still root.
        "import docker, supervisor.core.config, supervisor.daemon.lifecycle, supervisor.core.ops\n"
        "import supervisor.core.gpus, supervisor.daemon.handoff, supervisor.edges.managed\n"
        "import supervisor.edges.watch\n"
        f"os.setgroups({groups!r}); os.setgid({uid}); os.setuid({uid})\n"
        "main()\n"
    )
    where = ["--config", str(fleet.config), "--state-dir", str(fleet.state_dir)]
    return subprocess.run(
        [sys.executable, "-c", code, *args, *where],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "FLEETD_SOCKET": ""},
        timeout=60,
    )


@pytest.mark.skipif(os.getuid() != 0, reason="switching to another user needs root")
def test_only_the_socket_group_may_change_anything_and_status_never_needs_it(
    open_fleet: Fleet,
) -> None:
    fleet = open_fleet
    name = f"web-{uuid.uuid4().hex[:8]}"
    fleet.write_config({"web": fleet.service("llamacpp", name)})
    fleet.state_dir.mkdir(parents=True)
    fleet.run_container(name, "llamacpp", capacity_mib=8000)
    fleet.start(extra_args=["--socket-group", str(SOCKET_GROUP)])
    wait_for_socket(fleet)
    socket_stat = os.stat(fleet.state_dir / "fleetd.sock")
    assert (socket_stat.st_mode & 0o777, socket_stat.st_gid) == (0o660, SOCKET_GROUP)

    # Outside the group: status still works from the state file, changes are refused.
    # The socket listens before fleetd's first save (a socket in use fails fast): wait for
    # the file this user reads.
    fleet.wait_for("the first save", lambda s: "web" in s["services"], 30)
    status = as_user(fleet, NOBODY, [], "status", "--json")
    assert status.returncode == 0, status
    assert json.loads(status.stdout)["services"]["web"]["rung"] == 0
    assert "cannot use fleetd's control socket (permission denied" in status.stderr
    refused = as_user(fleet, NOBODY, [], "downgrade", "web")
    assert refused.returncode == 1, refused
    assert "permission denied" in refused.stderr and "Traceback" not in refused.stderr
    assert fleet.state()["services"]["web"]["rung"] == 0

    # The same user in the socket's group may.
    allowed = as_user(fleet, NOBODY, [SOCKET_GROUP], "downgrade", "web")
    assert allowed.returncode == 0, allowed
    state = fleet.state()
    assert state["services"]["web"]["rung"] == 1
    assert f"by uid {NOBODY}" in state["history"][-1]["reason"]
    assert fleet.stop() == 0
