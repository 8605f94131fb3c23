"""`fleetctl cordon` / `uncordon` against a real `fleetd run`: a person takes a GPU out of
the plan, its service is moved, status and the state keep the cordon."""

from __future__ import annotations

import json
import subprocess
import uuid
from typing import Any

from tests.entrypoints import entry_point
from tests.integration.fleet_harness import Fleet


def fleetctl(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    command = [entry_point("fleetctl"), *args, "--state-dir", str(fleet.state_dir)]
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


def test_a_person_cordons_a_gpu_and_its_service_moves(fleet: Fleet) -> None:
    name = f"absent-{uuid.uuid4().hex[:8]}"  # never started: the move is decided, not run
    services = {"chat": fleet.service("llamacpp", name)}
    fleet.write_config(
        services, gpus=[{"name": "a", "memory": "8GiB"}, {"name": "b", "memory": "8GiB"}]
    )
    fleet.start()
    fleet.wait_for("fleetd's socket", lambda s: (fleet.state_dir / "fleetd.sock").exists(), 20)
    fleet.wait_for("the state", lambda s: "chat" in s["services"], 20)

    done = fleetctl(fleet, "cordon", "0", "--reason", "fan failing", "--json")
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    moved = {m["service"]: m for m in answer["moves"]}
    cordoned = 0
    if not moved:  # the planner had put chat on GPU 1: cordon that one instead
        assert fleetctl(fleet, "uncordon", "0").returncode == 0
        done = fleetctl(fleet, "cordon", "1", "--reason", "fan failing", "--json")
        answer, cordoned = json.loads(done.stdout), 1
        moved = {m["service"]: m for m in answer["moves"]}
    assert moved["chat"]["gpus"] == [1 - cordoned] and moved["chat"]["rung"] == 0

    state = fleet.state()
    assert state["cordoned"][str(cordoned)]["reason"] == "fan failing"
    assert state["services"]["chat"]["incidents"] == []
    shown = fleetctl(fleet, "status")
    assert f"GPU {cordoned} cordoned" in shown.stdout and "fan failing" in shown.stdout
    again = fleetctl(fleet, "cordon", str(cordoned))
    assert again.returncode == 1 and "already cordoned" in again.stderr
    unknown = fleetctl(fleet, "cordon", "7")
    assert unknown.returncode == 2 and "expected the index of a GPU fleetd knows" in unknown.stderr

    assert fleet.stop() == 0
    offline = fleetctl(fleet, "cordon", "1")
    assert offline.returncode == 3 and "needs a running fleetd" in offline.stderr
    lifted = fleetctl(fleet, "uncordon", str(cordoned))  # without fleetd: the state here
    assert lifted.returncode == 0, lifted.stderr
    assert fleet.state()["cordoned"] == {}
