"""The whole loop against a real llama.cpp server (Debian's llama-server 0.7.0, CPU).

Real GGUF files written by tests/ggufmodels.py; `fleetctl plan` prices them,
`fleetctl generate` writes the project (`accelerator: cpu`: no GPU reservation),
Compose v2 starts it, `fleetd run` supervises it. The top rung cannot allocate its KV
cache under the container's address-space limit (a compose override file sets it, as
ops do): llama-server prints its own allocation errors and exits 1, Docker restarts it,
fleetd counts one incident per run (the service's rule classes the host-memory failure
as the capacity incident the ladder acts on, as on a CPU-only host), steps down, and the
smaller rung answers /health and a completion, warmed up and measured by its own report.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml

from tests.ggufmodels import GgufShape, write_gguf
from tests.integration.conftest import ComposeCli, build_test_image
from tests.integration.fleet_harness import Fleet
from tests.integration.servers import fleetctl, free_port, get, post_json

pytestmark = pytest.mark.integration

IMAGE = "fleetd-test/llamacpp:latest"
# The top rung: f16 weights (130 MiB) and a 32k context whose f16 KV cache is 512 MiB.
BIG = GgufShape(
    layers=4, n_embd=1024, n_head=16, n_ff=4096, context_length=32768, weight_type="f16"
)
SMALL = GgufShape(layers=2, n_embd=256, n_head=4, context_length=32768)
# Both rungs run a 32k context: a step down does not change llama-server's -c yet (issue
# 13), so the rungs differ by model only. The small one's KV cache is 64 MiB.
# The server's address-space limit (`ulimit -v`, KiB): the big rung's 512 MiB KV cache
# cannot be allocated under it, the small rung runs well inside.
ADDRESS_SPACE_KIB = 600_000
CAPACITY_RULE = {
    "id": "cpu-memory-is-capacity",
    "class": "vram_oom",
    "pattern": r"failed to allocate (?:CPU )?buffer|mmap failed: Cannot allocate memory",
}


@pytest.fixture(scope="module")
def llamacpp_image(docker_client: docker.DockerClient) -> str:
    return build_test_image(docker_client, "llamacpp", IMAGE)


class Project:
    """A generated compose project on this machine, brought down at the end."""

    def __init__(self, compose: ComposeCli, folder: Path, name: str) -> None:
        self.compose, self.folder, self.name = compose, folder, name
        self.files = ["compose.yml"]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        files = [arg for f in self.files for arg in ("-f", f)]
        argv = self.compose.command("-p", self.name, *files, *args)
        return subprocess.run(
            argv, cwd=self.folder, capture_output=True, text=True, timeout=300, check=False
        )

    def down(self) -> None:
        if (self.folder / "compose.yml").is_file():
            self.run("down", "-v", "--remove-orphans", "-t", "1")


@pytest.fixture
def project_name() -> str:
    return f"fleetd-e2e-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def world(
    tmp_path: Path,
    fleet: Fleet,
    llamacpp_image: str,
    compose_v2: ComposeCli,
    project_name: str,
) -> Iterator[tuple[Fleet, Project, int, str]]:
    """Models, config and a generated project; the project is brought down afterwards."""
    models = tmp_path / "models"
    models.mkdir()
    write_gguf(models / "big.gguf", BIG)
    write_gguf(models / "small.gguf", SMALL)
    port, container = free_port(), f"{project_name}-llm"
    service = {
        "runtime": "llamacpp",
        "image": llamacpp_image,
        "containers": [container],
        "port": port,
        "volumes": [f"{models}:/models:ro"],
        # One malloc arena: under the address-space limit, each concurrent request's own
        # 64 MiB arena could otherwise exhaust it (seen: 30 parallel /health calls).
        "environment": {"MALLOC_ARENA_MAX": "1"},
        "rules": [CAPACITY_RULE],
        "health": {"interval": "2s"},
        "warmup": {"tokens": 8, "timeout": "60s"},
        "ladder": [
            {"model": "/models/big.gguf", "metadata": str(models / "big.gguf"), "context": 32768},
            {
                "model": "/models/small.gguf",
                "metadata": str(models / "small.gguf"),
                "context": 32768,
            },
        ],
    }
    out = tmp_path / "compose"
    fleet.config.write_text(
        yaml.safe_dump(
            {
                "accelerator": "cpu",
                "compose_dir": str(out),
                "metrics": {"address": "127.0.0.1:0"},
                "policy": {"cooldown": "1s", "burst_window": "1s", "stop_timeout": "2s"},
                "services": {"llm": service},
            }
        )
    )
    project = Project(compose_v2, out, project_name)
    try:
        yield fleet, project, port, container
    finally:
        project.down()


def test_plan_prices_the_real_files_on_host_memory(world: tuple[Fleet, Project, int, str]) -> None:
    fleet, _, _, _ = world
    done = fleetctl("plan", "--config", str(fleet.config), "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    [device] = plan["gpus"]
    assert device["name"] == "host memory (CPU)"
    rungs = plan["services"]["llm"]["rungs"]
    assert [r["source"] for r in rungs] == ["gguf", "gguf"]
    big, small = (r["need_bytes"] for r in rungs)
    assert big > 512 * 1024**2 + os.path.getsize(fleet.tmp / "models" / "big.gguf") * 0.9
    assert small < big / 2  # each includes llama.cpp's 300 MiB overhead


def test_a_real_llama_server_that_cannot_allocate_is_stepped_down_and_the_smaller_rung_serves(
    world: tuple[Fleet, Project, int, str],
) -> None:
    fleet, project, port, container = world
    out = project.folder
    done = fleetctl(
        "generate", "--config", str(fleet.config), "--out", str(out),
        "--state-dir", str(fleet.state_dir),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    generated = yaml.safe_load((out / "compose.yml").read_text())
    assert "deploy" not in generated["services"]["llm"]  # no GPU reservation on a CPU host
    # The server's address space is limited by its shell (Docker's own `ulimits: {as: }`
    # applies to runc's set-up too, which then cannot start the container at all).
    shell, flag, script, *rest = generated["services"]["llm"]["entrypoint"]
    limited = [shell, flag, f"ulimit -v {ADDRESS_SPACE_KIB}; {script}", *rest]
    (out / "limits.yml").write_text(yaml.safe_dump({"services": {"llm": {"entrypoint": limited}}}))
    project.files.append("limits.yml")

    fleet.start()
    started = project.run("up", "-d")
    assert started.returncode == 0, started.stderr
    state = fleet.wait_for(
        "the step down", lambda s: s["services"].get("llm", {}).get("rung") == 1, 90
    )

    # fleetd acted on llama-server's own lines, one incident per failing run.
    [change] = state["history"]
    assert (change["from_model"], change["to_model"]) == ("/models/big.gguf", "/models/small.gguf")
    assert change["rule"] == "cpu-memory-is-capacity"
    assert "failed to allocate" in change["evidence"]
    counted = [line for line in fleet.log.read_text().splitlines() if "incident (" in line]
    assert len(counted) == 3, counted  # three runs failed, each printing several lines
    assert all("(cpu-memory-is-capacity)" in line for line in counted), counted

    # The smaller rung serves: health, then a real completion.
    deadline = time.monotonic() + 60
    while get(f"http://127.0.0.1:{port}/health")[0] != 200:
        assert time.monotonic() < deadline, fleet.log.read_text()
        time.sleep(0.2)
    reply = post_json(
        f"http://127.0.0.1:{port}/v1/completions", {"prompt": "hello", "max_tokens": 4}
    )
    assert reply["choices"][0]["text"] and reply["usage"]["completion_tokens"] >= 1
    assert reply["model"] == "/models/small.gguf"

    # Warmed up and measured by its own report; the planner prices the rung with it.
    state = fleet.wait_for(
        "the measured footprint",
        lambda s: (
            (s.get("measured", {}).get("/models/small.gguf") or {}).get("tokens_per_s")
            and (s.get("measured", {}).get("/models/small.gguf") or {}).get("parts")
        ),
        60,
    )
    seen = state["measured"]["/models/small.gguf"]
    assert seen["context"] == 32768 and seen["version"].startswith("b")
    assert seen["parts"]["model"] > 0 and seen["parts"]["kv"] > 0 and seen["parts"]["compute"] > 0
    assert seen["vram_bytes"] == sum(seen["parts"].values())
    status = fleetctl("status", "--state-dir", str(fleet.state_dir), "--json")
    assert status.returncode == 0, status.stderr
    row = json.loads(status.stdout)["services"]["llm"]
    assert row["measured"]["parts"] == seen["parts"] and row["measured"]["estimate_bytes"] > 0
    planned = fleetctl(
        "plan", "--config", str(fleet.config), "--state-dir", str(fleet.state_dir), "--json"
    )
    assert planned.returncode == 0, planned.stderr
    small = json.loads(planned.stdout)["services"]["llm"]["rungs"][1]
    assert small["source"] == "measured", small

    # The project stays in step: .env and the hand-off file name the small rung, so a
    # later `compose up` starts what fleetd chose.
    assert "FLEETD_LLM_MODEL=/models/small.gguf" in (out / ".env").read_text()
    handoff = fleet.state_dir / "services" / "llm" / "model"
    assert handoff.read_text().strip() == "/models/small.gguf"
    again = project.run("up", "-d", "--force-recreate")
    assert again.returncode == 0, again.stderr
    deadline = time.monotonic() + 60
    while get(f"http://127.0.0.1:{port}/health")[0] != 200:
        assert time.monotonic() < deadline, "the recreated container did not become healthy"
        time.sleep(0.2)
    assert fleet.state()["services"]["llm"]["rung"] == 1
    assert container in {c.name for c in fleet.client.containers.list()}


def test_a_silent_cgroup_kill_is_a_host_oom_from_dockers_state_and_no_step_down(
    world: tuple[Fleet, Project, int, str],
) -> None:
    """Under a cgroup memory limit the kernel kills llama-server without a line of its own
    (exit 137): fleetd still sees it, from Docker's event, as the host OOM it is."""
    fleet, project, _, _ = world
    out = project.folder
    done = fleetctl(
        "generate", "--config", str(fleet.config), "--out", str(out),
        "--state-dir", str(fleet.state_dir),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (out / "limits.yml").write_text(yaml.safe_dump({"services": {"llm": {"mem_limit": "64m"}}}))
    project.files.append("limits.yml")
    fleet.start()
    assert project.run("up", "-d").returncode == 0

    def host_oom_seen(state: dict[str, Any]) -> bool:
        incidents = state["services"].get("llm", {}).get("incidents", [])
        return any(i["class"] == "host_oom" for i in incidents)

    state = fleet.wait_for("a host_oom incident", host_oom_seen, 60)
    incidents = state["services"]["llm"]["incidents"]
    # Docker sends the kill as an `oom` event and a `die` with exit 137, in either order.
    assert {i["rule"] for i in incidents} <= {"docker.oom_event", "docker.exit_137"}, incidents
    assert all(i["class"] == "host_oom" for i in incidents)
    # Docker reports each kill twice (`oom`, then `die` with exit 137): one incident.
    for before, after in itertools.pairwise(incidents):
        assert after["time"] - before["time"] > 1.0, incidents
    assert state["services"]["llm"]["rung"] == 0 and not state["history"]  # never a step down
