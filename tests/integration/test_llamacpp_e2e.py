"""The whole loop against a real llama.cpp server (Debian's llama-server 0.7.0, CPU).

Real GGUF files written by tests/ggufmodels.py; `fleetctl plan` prices them,
`fleetctl generate` writes the project (`accelerator: cpu`: no GPU reservation),
Compose v2 starts it, `fleetd run` supervises it. The ladder is whole runtime
configurations: the big model at two contexts, then with a q8_0 KV cache, then a small
model at two contexts. Under the container's address-space limit (a compose override
file sets it, as ops do) no rung of the big model can allocate its KV cache:
llama-server prints its own allocation errors and exits 1, Docker restarts it, fleetd
counts the incidents (the service's rule classes the host-memory failure as the capacity
incident the ladder acts on, as on a CPU-only host) and steps down: context first, then
KV precision, then the model. Each failed run's own error names the KV buffer it could
not allocate, so the test checks that each step frees what the plan said it would. Every
run is started with the service's stable name (`--alias`, from the hand-off args; the
shell traces each `exec`). The small rung answers under that name, warmed up and measured
by its own report; a `downgrade` to its shorter context reaches the server, name unchanged.
"""

from __future__ import annotations

import itertools
import json
import os
import re
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
# The big model: f16 weights (113 MiB) and 32 KiB of f16 KV cache per token (8 layers):
# 1 GiB at 32k, 512 MiB at 16k, 272 MiB at 16k in q8_0.
BIG = GgufShape(
    layers=8, n_embd=1024, n_head=16, n_ff=1024, context_length=65536, weight_type="f16"
)
SMALL = GgufShape(layers=2, n_embd=256, n_head=4, context_length=65536)  # 32 MiB KV at 16k
# The server's address-space limit (`ulimit -v`, KiB). Measured peaks without it:
# the big model at 16k in q8_0 reaches 565k (its KV buffer 279k of it, 286k before), the
# small one at 16k 206k: every big rung fails at its KV buffer, the small ones run.
ADDRESS_SPACE_KIB = 450_000
SERVED_NAME = "assistant"
LADDER_KV = {  # the KV buffer each big rung asks for (llama-server's own report)
    0: 1024 * 1024**2,
    1: 512 * 1024**2,
    2: 272 * 1024**2,
}
# The compute buffer of the big model at 16k in q8_0: under the limit the server never
# reaches it (its KV buffer fails first), so this is its own report without the limit
# (`sched_reserve: CPU compute buffer size = 30.05 MiB`, this image).
BIG_Q8_COMPUTE_BYTES = round(30.05 * 1024**2)
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
    big = str(write_gguf(models / "big.gguf", BIG))
    small = str(write_gguf(models / "small.gguf", SMALL))
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
        "served_name": SERVED_NAME,
        "ladder": [
            {"model": "/models/big.gguf", "metadata": big, "context": [32768, 16384]},
            {"model": "/models/big.gguf", "metadata": big, "context": 16384, "kv_cache": "q8_0"},
            {"model": "/models/small.gguf", "metadata": small, "context": [16384, 4096]},
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
    service = plan["services"]["llm"]
    assert service["served_name"] == SERVED_NAME
    rungs = service["rungs"]
    assert [r["source"] for r in rungs] == ["gguf"] * 5
    assert [(r["context"], r["kv_cache"]) for r in rungs] == [
        (32768, None), (16384, None), (16384, "q8_0"), (16384, None), (4096, None)
    ]  # fmt: skip
    needs = [r["need_bytes"] for r in rungs]
    assert needs == sorted(needs, reverse=True) and len(set(needs)) == 5
    weights = os.path.getsize(fleet.tmp / "models" / "big.gguf")
    assert needs[0] > LADDER_KV[0] + weights * 0.9  # each includes llama.cpp's 300 MiB overhead


def _wait_healthy(port: int, fleet: Fleet, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while get(f"http://127.0.0.1:{port}/health")[0] != 200:
        assert time.monotonic() < deadline, fleet.log.read_text()[-4000:]
        time.sleep(0.2)


def _serves_as_the_stable_name(port: int, context: int) -> None:
    """The server runs the rung's context and answers under the service's stable name."""
    status, body = get(f"http://127.0.0.1:{port}/props")
    assert status == 200 and json.loads(body)["default_generation_settings"]["n_ctx"] == context
    status, body = get(f"http://127.0.0.1:{port}/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == [SERVED_NAME]
    reply = post_json(
        f"http://127.0.0.1:{port}/v1/completions",
        {"model": SERVED_NAME, "prompt": "hello", "max_tokens": 4},
    )
    assert reply["choices"][0]["text"] and reply["usage"]["completion_tokens"] >= 1
    assert reply["model"] == SERVED_NAME


def _server_runs(server_log: str) -> list[list[str]]:
    """The container's log cut into llama-server's runs, each from its shell-traced `exec`."""
    runs: list[list[str]] = []
    for line in server_log.splitlines():
        if line.startswith("+ exec "):
            runs.append([])
        if runs:
            runs[-1].append(line)
    return runs


def _started_as(run: list[str]) -> tuple[str | None, ...]:
    """The model, context, KV type and alias a run's `exec` line gave llama-server."""
    argv = run[0].split()

    def value(flag: str) -> str | None:
        return argv[argv.index(flag) + 1] if flag in argv else None

    return value("-m"), value("-c"), value("-ctk"), value("--alias")


def _buffers_bytes(run: list[str], part: str) -> int:
    """What one run's buffer report gives for a part (model, KV, compute, output), summed."""
    pattern = re.compile(rf"{part} buffer size =\s*(\d+\.\d+) MiB")
    return sum(round(float(m.group(1)) * 1024**2) for line in run if (m := pattern.search(line)))


def _failed_kv_bytes(lines: list[str]) -> list[int]:
    """The sizes of the buffers llama-server could not allocate, line by line."""
    pattern = re.compile(r"failed to allocate (?:CPU )?buffer of size (\d+)")
    return [int(m.group(1)) for line in lines if (m := pattern.search(line))]


def test_a_real_llama_server_steps_down_context_then_kv_type_then_model_under_one_name(
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
    handoff = fleet.state_dir / "services" / "llm"
    args = (handoff / "args").read_text()
    assert args.split("\n")[:4] == ["-c", "32768", "-np", "1"]
    assert f"\n--alias\n{SERVED_NAME}\n" in args, args
    planned = json.loads(fleetctl("plan", "--config", str(fleet.config), "--json").stdout)
    # All priced by one formula from the GGUF files, each with the runtime's same overhead:
    # it cancels in a difference of two rungs' needs.
    assert [r["source"] for r in planned["services"]["llm"]["rungs"]] == ["gguf"] * 5
    needs = [r["need_bytes"] for r in planned["services"]["llm"]["rungs"]]
    # The server's address space is limited by its shell (Docker's own `ulimits: {as: }`
    # applies to runc's set-up too, which then cannot start the container at all); `set -x`
    # traces the `exec` of each run, with the arguments it handed over.
    shell, flag, script, *rest = generated["services"]["llm"]["entrypoint"]
    limited = [shell, flag, f"ulimit -v {ADDRESS_SPACE_KIB}; set -x; {script}", *rest]
    (out / "limits.yml").write_text(yaml.safe_dump({"services": {"llm": {"entrypoint": limited}}}))
    project.files.append("limits.yml")

    fleet.start()
    started = project.run("up", "-d")
    assert started.returncode == 0, started.stderr
    state = fleet.wait_for(
        "three steps down", lambda s: s["services"].get("llm", {}).get("rung") == 3, 240
    )

    # Context first, then KV precision, then the model: fleetd acted on llama-server's own
    # lines, and each failed run names the KV buffer it could not allocate.
    history = state["history"]
    assert [(t["from_rung"], t["to_rung"]) for t in history] == [(0, 1), (1, 2), (2, 3)]
    assert [(t["to_model"], t["to_options"]["context"], t["to_options"]["kv_cache"])
            for t in history] == [
        ("/models/big.gguf", 16384, None),
        ("/models/big.gguf", 16384, "q8_0"),
        ("/models/small.gguf", 16384, None),
    ]  # fmt: skip
    assert history[0]["from_options"]["context"] == 32768
    assert all(t["rule"] == "cpu-memory-is-capacity" for t in history), history
    # The server's own log, run after run: the KV buffer each rung asked for, in order.
    server_log = fleet.client.containers.get(container).logs().decode(errors="replace")
    tried = list(dict.fromkeys(_failed_kv_bytes(server_log.splitlines())))
    assert tried == [LADDER_KV[0], LADDER_KV[1], LADDER_KV[2]]
    for transition, size in zip(history, tried, strict=True):  # each record, its rung's line
        assert f"buffer of size {size}" in transition["evidence"], transition["evidence"]
    # Each step frees what the plan said: the plan's drop in need is the drop in the KV
    # buffer the server really asked for (and a little of the compute buffer's mask).
    for rung in (0, 1):
        freed = tried[rung] - tried[rung + 1]
        assert freed <= needs[rung] - needs[rung + 1] <= freed * 1.05, (rung, needs)
    counted = [line for line in fleet.log.read_text().splitlines() if "incident (" in line]
    assert len(counted) >= 3 and all("(cpu-memory-is-capacity)" in c for c in counted), counted

    # The small rung serves under the stable name, at its context.
    _wait_healthy(port, fleet)
    _serves_as_the_stable_name(port, 16384)
    server_log = fleet.client.containers.get(container).logs().decode(errors="replace")
    last_runs = {_started_as(run): run for run in _server_runs(server_log)}  # by rung
    # Every run, rung by rung, was started with the stable name.
    assert list(last_runs) == [
        ("/models/big.gguf", "32768", None, SERVED_NAME),
        ("/models/big.gguf", "16384", None, SERVED_NAME),
        ("/models/big.gguf", "16384", "q8_0", SERVED_NAME),
        ("/models/small.gguf", "16384", None, SERVED_NAME),
    ]  # fmt: skip
    # The model step frees what the plan said: the big model's weights and the q8_0 KV
    # buffer it asked for (its last run's report and error) plus its compute buffer (never
    # reached here, BIG_Q8_COMPUTE_BYTES), less every buffer the small model's run
    # allocated. Within 5%, as above (here the plan is 2 MiB over: its compute buffers).
    big = last_runs["/models/big.gguf", "16384", "q8_0", SERVED_NAME]
    small = last_runs["/models/small.gguf", "16384", None, SERVED_NAME]
    big_bytes = _buffers_bytes(big, "model") + _failed_kv_bytes(big)[0] + BIG_Q8_COMPUTE_BYTES
    small_bytes = sum(_buffers_bytes(small, p) for p in ("model", "KV", "compute", "output"))
    freed = big_bytes - small_bytes
    assert freed <= needs[2] - needs[3] <= freed * 1.05, (freed, needs)

    # Warmed up and measured by its own report, kept for that rung (model and options).
    key = "/models/small.gguf [context 16384]"
    state = fleet.wait_for(
        "the measured footprint",
        lambda s: (
            (s.get("measured", {}).get(key) or {}).get("tokens_per_s")
            and (s.get("measured", {}).get(key) or {}).get("parts")
        ),
        60,
    )
    seen = state["measured"][key]
    assert seen["context"] == 16384 and seen["version"].startswith("b")
    assert seen["parts"]["model"] > 0 and seen["parts"]["kv"] > 0 and seen["parts"]["compute"] > 0
    assert seen["vram_bytes"] == sum(seen["parts"].values())
    status = fleetctl("status", "--state-dir", str(fleet.state_dir), "--json")
    assert status.returncode == 0, status.stderr
    row = json.loads(status.stdout)["services"]["llm"]
    assert row["measured"]["parts"] == seen["parts"] and row["measured"]["estimate_bytes"] > 0
    assert row["options"]["context"] == 16384 and row["served_name"] == SERVED_NAME
    planned = json.loads(
        fleetctl(
            "plan", "--config", str(fleet.config), "--state-dir", str(fleet.state_dir), "--json"
        ).stdout
    )
    rungs = planned["services"]["llm"]["rungs"]
    assert rungs[3]["source"] == "measured" and rungs[4]["source"] == "gguf", rungs

    # A person's downgrade to the same model's shorter context: the server restarts with
    # it, and clients keep calling the same name.
    down = fleetctl(
        "downgrade", "llm", "--config", str(fleet.config), "--state-dir", str(fleet.state_dir)
    )
    assert down.returncode == 0, down.stdout + down.stderr
    fleet.wait_for("the downgrade", lambda s: s["services"]["llm"]["rung"] == 4, 60)
    _wait_healthy(port, fleet)
    _serves_as_the_stable_name(port, 4096)
    args = (handoff / "args").read_text()
    assert "-c\n4096\n" in args and f"\n--alias\n{SERVED_NAME}\n" in args, args
    server_log = fleet.client.containers.get(container).logs().decode(errors="replace")
    assert _started_as(_server_runs(server_log)[-1]) == (
        "/models/small.gguf", "4096", None, SERVED_NAME
    )  # fmt: skip

    # The project stays in step: .env and the hand-off files name the rung fleetd chose, so
    # a later `compose up` starts it again.
    assert "FLEETD_LLM_MODEL=/models/small.gguf" in (out / ".env").read_text()
    assert (handoff / "model").read_text().strip() == "/models/small.gguf"
    again = project.run("up", "-d", "--force-recreate")
    assert again.returncode == 0, again.stderr
    _wait_healthy(port, fleet)
    _serves_as_the_stable_name(port, 4096)
    assert fleet.state()["services"]["llm"]["rung"] == 4
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
