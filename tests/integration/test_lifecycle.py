"""The model lifecycle end to end: a real `fleetd run` against runtime stand-in containers
(fleetd-test/runtime-api:1, Ollama's, vLLM's and llama.cpp's real paths and shapes), with
faults injected: pull, unload, warm-up and measure on a step down; a pull that fails
halfway; a model that cannot load; health checks, restarts and the circuit breaker;
stepping back up on probation."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from typing import Any

import pytest
from docker.models.containers import Container

from supervisor.edges.control import ControlClient
from tests.integration.fleet_harness import Fleet, at_rung

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("runtime_api_image")]

MIB = 1024**2
SIZES = "big=4000,medium=2500,small=1000"
LADDER = [
    {"model": "big", "vram": "4000MiB"},
    {"model": "medium", "vram": "2500MiB"},
    {"model": "small", "vram": "1000MiB"},
]
PORT = {"ollama": 11434, "vllm": 8000, "llamacpp": 8080}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_standin(
    fleet: Fleet,
    runtime: str,
    name: str,
    service: str,
    capacity_mib: int,
    **env: str,
) -> tuple[Container, str]:
    """A stand-in container published on a loopback port; returns it and its endpoint."""
    port = free_port()
    handoff = fleet.state_dir / "services" / service
    handoff.mkdir(parents=True, exist_ok=True)
    container = fleet.client.containers.run(
        "fleetd-test/runtime-api:1",
        name=name,
        detach=True,
        labels=fleet.labels,
        environment={
            "RUNTIME": runtime,
            "CAPACITY_MIB": str(capacity_mib),
            "MODEL_SIZES": SIZES,
            **env,
        },
        ports={f"{PORT[runtime]}/tcp": ("127.0.0.1", port)},
        volumes={str(handoff): {"bind": "/run/fleetd", "mode": "ro"}},
        restart_policy={"Name": "on-failure"},
    )
    return container, f"http://127.0.0.1:{port}"


def call(endpoint: str, path: str, body: Any = None) -> tuple[int, Any]:
    request = urllib.request.Request(
        endpoint + path,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="GET" if body is None else "POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def wait_until_up(endpoint: str, path: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            call(endpoint, path)
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{endpoint} never answered")


def live_status(fleet: Fleet) -> dict[str, Any]:
    return ControlClient(fleet.state_dir / "fleetd.sock").call("GET", "/v1/status")  # type: ignore[no-any-return]


def wait_socket(fleet: Fleet) -> None:
    fleet.wait_for("fleetd's socket", lambda s: (fleet.state_dir / "fleetd.sock").exists(), 20)


def requests_seen(container: Container) -> list[str]:
    return [
        line.removeprefix("standin: ")
        for line in container.logs(stderr=False).decode().splitlines()
        if line.startswith("standin: ")
    ]


def test_ollama_step_down_pulls_unloads_warms_up_and_measures(fleet: Fleet) -> None:
    name = f"ollama-{uuid.uuid4().hex[:8]}"
    # medium is not downloaded yet; a pull of its 2500 MiB takes about 2.5 s.
    container, endpoint = run_standin(
        fleet, "ollama", name, "chat", 3000, MODELS_PRESENT="big,small", PULL_MIB_PER_S="1000"
    )
    chat = {
        "runtime": "ollama",
        "containers": [name],
        "restart": [],  # Ollama serves any model it has: nothing to restart, only to load
        "endpoint": endpoint,
        "health": {"interval": "1s", "start_period": "0s"},
        "ladder": [LADDER[0], {**LADDER[1], "context": 8192}, LADDER[2]],
    }
    fleet.write_config({"chat": chat})
    wait_until_up(endpoint, "/api/version")
    fleet.start()
    wait_socket(fleet)

    # The app asks for big three times; each load runs out of memory (500, and the
    # runner's OOM lines in the container's log, which fleetd follows).
    for _ in range(3):
        status, body = call(
            endpoint, "/api/generate", {"model": "big", "prompt": "hi", "stream": False}
        )
        assert status == 500 and "out of memory" in body["error"]
        time.sleep(1.2)  # past the burst window: three incidents

    activities: set[str] = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        row = live_status(fleet)["services"]["chat"]
        if row["activity"]:
            activities.add(row["activity"])
        if row["measured"] and row["measured"]["vram_bytes"]:
            break
        time.sleep(0.1)
    state = fleet.state()
    svc = state["services"]["chat"]
    assert (svc["rung"], svc["model"]) == (1, "medium"), fleet.log.read_text()
    assert any(a.startswith("pulling medium") for a in activities), activities
    measured = state["measured"]["medium [context 8192]"]  # kept for the rung's options
    assert measured["vram_bytes"] == 2500 * MIB  # Ollama's /api/ps, not the estimate
    assert measured["tokens_per_s"] > 0 and measured["load_s"] is not None

    calls = requests_seen(container)
    pull = calls.index("POST /api/pull 200")
    create = calls.index("POST /api/create 200")  # the stable name, made from the new rung
    warm = next(i for i, c in enumerate(calls) if c == "POST /api/generate 200" and i > create)
    assert pull < create < warm
    assert calls.index("GET /api/ps 200", warm) > warm  # measured after the warm-up
    # Clients call `chat` on every rung: it is medium now, with the rung's context.
    [loaded] = call(endpoint, "/api/ps")[1]["models"]  # big is gone
    assert (loaded["name"], loaded["context_length"]) == ("chat:latest", 8192)
    _, shown = call(endpoint, "/api/show", {"model": "chat"})
    assert shown["details"]["parent_model"].startswith("medium")
    assert re.search(r"^num_ctx\s+8192$", shown["parameters"], re.M), shown["parameters"]
    status, answer = call(
        endpoint, "/api/generate", {"model": "chat", "prompt": "hi", "stream": False}
    )
    assert status == 200 and answer["model"] == "chat"
    assert (
        "ready in" in fleet.log.read_text() and "warming up chat (medium)" in fleet.log.read_text()
    )
    assert fleet.stop() == 0


def test_a_pull_that_fails_halfway_keeps_the_old_model_and_is_retried(fleet: Fleet) -> None:
    name = f"ollama-{uuid.uuid4().hex[:8]}"
    _, endpoint = run_standin(
        fleet, "ollama", name, "chat", 3000, MODELS_PRESENT="big", FAULT_PULL_FAIL_AT="0.5"
    )
    chat = {"runtime": "ollama", "containers": [name], "restart": [], "endpoint": endpoint,
            "ladder": LADDER}  # fmt: skip
    fleet.write_config({"chat": chat})
    wait_until_up(endpoint, "/api/version")
    fleet.start()
    wait_socket(fleet)
    for _ in range(3):
        call(endpoint, "/api/generate", {"model": "big", "prompt": "hi", "stream": False})
        time.sleep(1.2)

    fleet.wait_for(
        "the failed pull in the log",
        lambda s: "pulling medium: max retries exceeded" in fleet.log.read_text(),
        30,
    )
    svc = fleet.state()["services"]["chat"]
    assert (svc["rung"], svc["pending"]["to_model"]) == (0, "medium")  # recorded, not applied
    assert "will retry in" in fleet.log.read_text()

    call(endpoint, "/_fault", {"pull_fail_at": None})  # the registry is reachable again
    state = fleet.wait_for("the retried change", at_rung("chat", 1), timeout_s=30)
    assert state["history"][-1]["to_model"] == "medium"
    assert fleet.stop() == 0


def test_a_model_that_cannot_load_is_stepped_past_at_once(fleet: Fleet) -> None:
    name = f"coder-{uuid.uuid4().hex[:8]}"
    # 2000 MiB: big and medium run out of memory while loading, small fits.
    _, endpoint = run_standin(fleet, "llamacpp", name, "coder", 2000, LOAD_DELAY_S="1")
    coder = {"runtime": "llamacpp", "containers": [name], "endpoint": endpoint,
             "ladder": LADDER}  # fmt: skip
    # A long cooldown: without the lifecycle, medium's OOMs would be ignored for a minute.
    fleet.write_config({"coder": coder}, cooldown="60s")
    (fleet.state_dir / "services/coder/model").write_text("big\n")
    fleet.start()

    state = fleet.wait_for("small, past medium", at_rung("coder", 2), timeout_s=60)
    first, second = state["history"]
    assert (first["from_model"], first["to_model"]) == ("big", "medium")
    assert (second["from_model"], second["to_model"]) == ("medium", "small")
    assert second["reason"].startswith("medium ran out of memory while loading: step down")
    assert second["time"] - first["time"] < 10  # seconds, not the 300 s warm-up timeout
    fleet.wait_for("small warmed up", lambda s: "small" in s.get("measured", {}), 30)
    assert fleet.state()["measured"]["small"]["tokens_per_s"] > 0
    assert fleet.stop() == 0


def test_failing_health_restarts_then_opens_the_breaker_and_flapping_does_not(
    fleet: Fleet,
) -> None:
    sick, flappy = f"sick-{uuid.uuid4().hex[:8]}", f"flappy-{uuid.uuid4().hex[:8]}"
    sick_c, sick_at = run_standin(
        fleet, "vllm", sick, "sick", 8000, MODEL_FROM_ENV="1", MODEL="small", FAULT_HEALTH="fail"
    )
    flappy_c, flappy_at = run_standin(
        fleet, "vllm", flappy, "flappy", 8000, MODEL_FROM_ENV="1", MODEL="small",
        FAULT_HEALTH="ok,fail",
    )  # fmt: skip
    health = {"interval": "0.3s", "timeout": "1s", "unhealthy_after": 2, "healthy_after": 2,
              "breaker_after": 2, "breaker_reset": "1h", "start_period": "0s"}  # fmt: skip
    services = {
        "sick": {"runtime": "vllm", "containers": [sick], "endpoint": sick_at, "health": health,
                 "ladder": LADDER[2:]},
        "flappy": {"runtime": "vllm", "containers": [flappy], "endpoint": flappy_at,
                   "health": health, "ladder": LADDER[2:]},
    }  # fmt: skip
    fleet.write_config(services)
    wait_until_up(sick_at, "/version")
    wait_until_up(flappy_at, "/version")
    started_before = sick_c.attrs["State"]["StartedAt"]
    fleet.start()
    wait_socket(fleet)

    fleet.wait_for(
        "the breaker to open", lambda s: "circuit breaker OPEN" in fleet.log.read_text(), 60
    )
    log = fleet.log.read_text()
    assert log.count("sick: unhealthy after 2 failed checks (") >= 3
    assert log.count("; restarting") == 2  # breaker_after restarts, then no more
    sick_c.reload()
    assert sick_c.attrs["State"]["StartedAt"] != started_before  # really restarted
    row = live_status(fleet)["services"]
    assert (row["sick"]["health"]["status"], row["sick"]["health"]["breaker"]) == (
        "unhealthy",
        "open",
    )
    time.sleep(2)  # open: no restart however long it fails
    assert fleet.log.read_text().count("; restarting") == 2
    assert "flappy: unhealthy" not in fleet.log.read_text()
    assert live_status(fleet)["services"]["flappy"]["health"]["status"] in ("healthy", "unknown")
    flappy_c.reload()
    assert flappy_c.status == "running"
    assert fleet.stop() == 0


def test_a_step_up_on_probation_goes_back_down_and_waits_twice_as_long(fleet: Fleet) -> None:
    name = f"coder-{uuid.uuid4().hex[:8]}"
    # 3000 MiB: big never fits, medium does. The planner (8 GiB declared) thinks big fits,
    # so fleetd keeps trying it once quiet, and the runtime keeps proving otherwise.
    _, endpoint = run_standin(fleet, "llamacpp", name, "coder", 3000, LOAD_DELAY_S="0.5")
    coder = {"runtime": "llamacpp", "containers": [name], "endpoint": endpoint,
             "ladder": LADDER}  # fmt: skip
    fleet.write_config({"coder": coder}, policy={"step_up_after": "3s", "probation": "30s"})
    (fleet.state_dir / "services/coder/model").write_text("big\n")
    fleet.start()

    def tries(state: dict[str, Any]) -> int:
        return sum(1 for t in state.get("history", []) if t["reason"].startswith("step up"))

    state = fleet.wait_for("two step-up tries", lambda s: tries(s) >= 2, timeout_s=90)
    ups = [t for t in state["history"] if t["reason"].startswith("step up")]
    backs = [t for t in state["history"] if t["reason"].startswith("vram_oom on probation")]
    assert "on probation for 30s" in ups[0]["reason"]
    assert backs and "next step up in 6s at the earliest (1 failed in a row)" in backs[0]["reason"]
    # The first try failed after it was made, and the next may come 6 s (twice 3 s) after
    # that failure at the earliest: so at least 6 s after the first try.
    assert ups[1]["time"] - ups[0]["time"] >= 6
    state = fleet.wait_for("back on medium", at_rung("coder", 1), timeout_s=30)
    assert state["services"]["coder"]["step_up_failures"] >= 1
    assert fleet.stop() == 0


def test_a_quiet_probation_keeps_the_step_up(fleet: Fleet) -> None:
    name = f"coder-{uuid.uuid4().hex[:8]}"
    _, endpoint = run_standin(fleet, "llamacpp", name, "coder", 8000)
    coder = {"runtime": "llamacpp", "containers": [name], "endpoint": endpoint,
             "ladder": LADDER}  # fmt: skip
    fleet.write_config({"coder": coder}, policy={"step_up_after": "2s", "probation": "3s"})
    (fleet.state_dir / "services/coder/model").write_text("medium\n")
    (fleet.state_dir / "state.json").write_text(
        json.dumps({"version": 1, "services": {"coder": {"model": "medium", "rung": 1}}})
    )
    fleet.start()

    state = fleet.wait_for(
        "the step up to big, its probation over",
        lambda s: (
            s["services"]["coder"]["rung"] == 0
            and s["services"]["coder"]["probation_until"] is None
        ),
        timeout_s=60,
    )
    [up] = state["history"]
    assert up["reason"].startswith(
        "step up rung 1 of 3 (medium, 2500 MiB) -> rung 0 of 3 (big, 4000 MiB)"
    )
    assert state["services"]["coder"]["step_up_failures"] == 0
    assert (fleet.state_dir / "services/coder/model").read_text() == "big\n"
    assert fleet.stop() == 0


def test_an_ensemble_keeps_one_member_loaded_and_warms_the_next_on_request(
    fleet: Fleet,
) -> None:
    name = f"pipe-{uuid.uuid4().hex[:8]}"
    # 3000 MiB holds medium (2500) or small (1000), not both; the stand-in would keep two
    # loaded (MAX_LOADED=2) and run out of memory, unless fleetd unloads the other first.
    container, endpoint = run_standin(
        fleet, "ollama", name, "pipe", 3000, MODELS_PRESENT="medium", MAX_LOADED="2"
    )
    pipe = {
        "runtime": "ollama",
        "containers": [name],
        "restart": [],
        "endpoint": endpoint,
        "ensemble": [{"model": "medium", "vram": "2500MiB"}, {"model": "small", "vram": "1000MiB"}],
    }
    fleet.write_config({"pipe": pipe})
    wait_until_up(endpoint, "/api/version")
    fleet.start()
    wait_socket(fleet)
    assert (
        call(endpoint, "/api/generate", {"model": "medium", "prompt": "hi", "stream": False})[0]
        == 200
    )

    from tests.integration.test_control_api import fleetctl

    r = fleetctl(fleet, "warm", "pipe", "small")
    assert r.returncode == 0, r
    assert r.stdout.startswith("pipe: small ready in") and "1000 MiB VRAM measured" in r.stdout
    loaded = [m["name"] for m in call(endpoint, "/api/ps")[1]["models"]]
    assert loaded == ["small:latest"]  # medium was unloaded first; small was pulled
    r = fleetctl(fleet, "warm", "pipe", "medium")
    assert r.returncode == 0, r
    assert [m["name"] for m in call(endpoint, "/api/ps")[1]["models"]] == ["medium:latest"]

    r = fleetctl(fleet, "warm", "pipe", "big")
    assert r.returncode == 2 and "'big' is not in pipe's ensemble (medium, small)" in r.stderr, r
    status = json.loads(fleetctl(fleet, "status", "--json").stdout)
    assert status["services"]["pipe"]["ensemble"] == ["medium", "small"]
    assert "POST /api/pull 200" in requests_seen(container)
    assert fleet.stop() == 0


def test_a_recreated_vllm_gets_each_rungs_options_and_memory_share(fleet: Fleet) -> None:
    """The env hand-off (`model_env:`): each change recreates the container with the rung's
    model, options and runtime flags; vLLM's share of the GPU follows the rung's need."""
    name = f"vllm-{uuid.uuid4().hex[:8]}"
    _, endpoint = run_standin(fleet, "vllm", name, "llm", 8000)
    llm = {
        "runtime": "vllm",
        "containers": [name],
        "model_env": "MODEL",
        "endpoint": endpoint,
        "warmup": {"enabled": False},
        "ladder": [
            {"model": "big", "vram": "4000MiB", "context": 8192},
            {"model": "big", "vram": "2500MiB", "context": 4096, "kv_cache": "fp8"},
            {"model": "small", "vram": "1000MiB"},
        ],
    }
    fleet.write_config({"llm": llm})  # one declared GPU of 8 GiB
    fleet.start()
    wait_socket(fleet)

    def env_of() -> dict[str, str]:
        found = fleet.client.containers.get(name)
        return dict(item.split("=", 1) for item in found.attrs["Config"]["Env"])

    shares = []
    for rung, context, kv, share in ((1, "4096", "fp8", "0.31"), (2, None, None, "0.13")):
        down = subprocess.run(
            [sys.executable, "-c", "from supervisor.cli.fleetctl import main; main()",
             "downgrade", "llm", "--config", str(fleet.config), "--state-dir",
             str(fleet.state_dir)],
            capture_output=True, text=True, timeout=120, check=False,
            env={**os.environ, "FLEETD_SOCKET": ""},
        )  # fmt: skip
        assert down.returncode == 0, down.stdout + down.stderr + fleet.log.read_text()
        fleet.wait_for(f"rung {rung}", at_rung("llm", rung), timeout_s=60)
        env = env_of()
        assert env["MODEL"] == ("big" if rung == 1 else "small")
        assert env.get("FLEETD_CONTEXT") == context and env.get("FLEETD_KV_CACHE") == kv
        assert env["FLEETD_SERVED_NAME"] == "llm"
        args = env["FLEETD_ARGS"].split()
        flags = dict(zip(args[::2], args[1::2], strict=True))
        assert flags.get("--max-model-len") == context and flags.get("--kv-cache-dtype") == kv
        assert flags["--gpu-memory-utilization"] == share  # the rung's need over 8 GiB
        assert flags["--served-model-name"] == "llm"
        shares.append(float(share))
        # The same rung in the hand-off files, for a later start of a generated container.
        handed = (fleet.state_dir / "services" / "llm" / "args").read_text().split()
        assert handed == args
    assert shares == sorted(shares, reverse=True)  # each step down frees its difference
    history = fleet.state()["history"]
    assert [(t["from_options"]["context"], t["to_options"]["context"]) for t in history] == [
        (8192, 4096),
        (4096, None),
    ]
    assert fleet.stop() == 0
