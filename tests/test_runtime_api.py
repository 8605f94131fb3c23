"""fleetd's runtime API clients and its change procedure (supervisor.edges.runtime_api,
supervisor.daemon.lifecycle) against the runtime stand-in (tests/images/runtime-api/standin.py)
run as a local process: a real HTTP server with Ollama's, vLLM's and llama.cpp's paths
and JSON shapes, and injected faults. tests/integration/ runs it as a container."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from supervisor.core.config import ServiceConfig, WarmupConfig
from supervisor.core.rungs import RungSetup
from supervisor.daemon.lifecycle import ModelChange
from supervisor.edges.runtime_api import (
    LlamaCppApi,
    OllamaApi,
    PullProgress,
    RuntimeApiError,
    SglangApi,
    TensorRtLlmApi,
    TgiApi,
    TritonApi,
    VllmApi,
    api_for,
)

STANDIN = Path(__file__).resolve().parent / "images" / "runtime-api" / "standin.py"
MIB = 1024**2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Standin:
    def __init__(self, process: subprocess.Popen[str], port: int) -> None:
        self.process, self.port = process, port
        self.endpoint = f"http://127.0.0.1:{port}"

    def fault(self, **faults: object) -> None:
        request = urllib.request.Request(
            f"{self.endpoint}/_fault",
            data=json.dumps(faults).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200

    def output(self) -> str:
        self.process.terminate()
        out, err = self.process.communicate(timeout=5)
        return out + err


@pytest.fixture
def standin(tmp_path: Path) -> Iterator[Callable[..., Standin]]:
    started: list[Standin] = []

    def start(runtime: str, wait: bool = True, **env: str) -> Standin:
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, str(STANDIN)],
            env={**os.environ, "RUNTIME": runtime, "PORT": str(port), **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        s = Standin(process, port)
        started.append(s)
        deadline = time.monotonic() + 10
        while wait and time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert process.poll() is None, process.communicate()
                time.sleep(0.05)
        return s

    yield start
    for s in started:
        if s.process.poll() is None:
            s.process.kill()
            s.process.communicate()


StartStandin = Callable[..., Standin]
OLLAMA = {"CAPACITY_MIB": "4000", "MODEL_SIZES": "big=6000,medium=2500,small=1000"}


def test_ollama_pull_streams_progress_and_then_the_model_is_there(standin: StartStandin) -> None:
    s = standin("ollama", MODELS_PRESENT="", PULL_MIB_PER_S="20000", **OLLAMA)
    api = OllamaApi(s.endpoint)
    assert not api.present("medium")
    seen: list[PullProgress] = []
    api.pull("medium", seen.append, timeout_s=30)
    assert seen[-1].status == "success"
    layers: dict[str, list[int]] = {}
    for p in seen:
        if p.digest and p.completed is not None:
            layers.setdefault(p.digest, []).append(p.completed)
    assert layers, seen
    for done in layers.values():  # each layer's progress only goes forward
        assert done == sorted(done)
    assert api.present("medium") and api.present("medium:latest")


def test_a_pull_that_fails_halfway_is_an_error_and_leaves_no_model(standin: StartStandin) -> None:
    s = standin("ollama", MODELS_PRESENT="", FAULT_PULL_FAIL_AT="0.5", **OLLAMA)
    api = OllamaApi(s.endpoint)
    with pytest.raises(RuntimeApiError, match="pulling medium: max retries exceeded"):
        api.pull("medium", lambda p: None, timeout_s=30)
    assert not api.present("medium")


def test_ollama_warm_up_reports_honest_timings_and_ps_the_vram(standin: StartStandin) -> None:
    s = standin(
        "ollama", MODELS_PRESENT="medium,small", TOKENS_PER_S="40", LOAD_DELAY_S="0.3", **OLLAMA
    )
    api = OllamaApi(s.endpoint)
    warmed = api.warm("medium", "Say hello.", 10, timeout_s=30)
    assert warmed.tokens == 10
    assert warmed.tokens_per_s is not None and 30 < warmed.tokens_per_s < 50
    assert warmed.load_s is not None and warmed.load_s >= 0.3
    assert api.size_vram("medium") == 2500 * MIB
    api.unload("medium")
    assert api.size_vram("medium") is None
    api.unload("never-pulled")  # nothing to unload is not an error


def test_a_model_too_big_for_the_gpu_fails_with_ollamas_oom_error(standin: StartStandin) -> None:
    s = standin("ollama", MODELS_PRESENT="big", **OLLAMA)
    with pytest.raises(RuntimeApiError, match=r"HTTP 500: .*cudaMalloc failed: out of memory"):
        OllamaApi(s.endpoint).warm("big", "Say hello.", 10, timeout_s=30)
    assert "out of memory" in s.output()  # the runner's log line, for fleetd's detector


def test_llamacpp_health_is_503_while_loading_then_warm_up_reads_its_timings(
    standin: StartStandin,
) -> None:
    s = standin(
        "llamacpp", MODEL_FROM_ENV="1", MODEL="medium", LOAD_DELAY_S="1", TOKENS_PER_S="50",
        **OLLAMA,
    )  # fmt: skip
    api = LlamaCppApi(s.endpoint)
    with pytest.raises(RuntimeApiError, match="HTTP 503: Loading model"):
        api.health(2)
    time.sleep(1.2)
    api.health(2)
    warmed = api.warm("medium", "Say hello.", 8, timeout_s=30)
    assert warmed.tokens == 8 and warmed.tokens_per_s is not None
    assert 40 < warmed.tokens_per_s < 60


def test_vllm_warm_up_uses_the_served_model_name(standin: StartStandin) -> None:
    s = standin("vllm", MODEL_FROM_ENV="1", MODEL="medium", **OLLAMA)
    api = VllmApi(s.endpoint)
    api.health(2)
    warmed = api.warm("ignored-name", "Say hello.", 5, timeout_s=30)
    assert warmed.tokens == 5


# ---------------------------------------------------------------- the change procedure


def service(runtime: str, endpoint: str, **warmup: object) -> ServiceConfig:
    return ServiceConfig.model_validate(
        {
            "runtime": runtime,
            "containers": ["c"],
            "endpoint": endpoint,
            "ladder": [{"model": "medium", "vram": "2500MiB"}],
            "warmup": WarmupConfig.model_validate({"timeout": "20s", **warmup}),
        }
    )


def setup(model: str, **options: object) -> RungSetup:
    """The hand-off of a rung running `model` for service `svc` (its stable name)."""
    return RungSetup("svc", 0, model, tuple(options.items()), "svc", None, (), ())


def change_for(config: ServiceConfig, reports: list[str], abort: threading.Event) -> ModelChange:
    assert config.endpoint is not None
    api = api_for(config.runtime, config.endpoint)
    assert api is not None
    return ModelChange("svc", config, api, reports.append, abort)


def test_prepare_pulls_the_missing_model_and_unloads_the_old_one(standin: StartStandin) -> None:
    s = standin("ollama", MODELS_PRESENT="big,small", MAX_LOADED="2", **OLLAMA)
    api = OllamaApi(s.endpoint)
    api.warm("small", "hi", 1, timeout_s=10)
    assert api.size_vram("small") == 1000 * MIB
    reports: list[str] = []
    change = change_for(service("ollama", s.endpoint), reports, threading.Event())

    change.prepare("small", setup("medium", context=8192))
    assert api.present("medium")
    assert api.size_vram("small") is None  # its VRAM is free before the new one loads
    assert reports[0] == "pulling medium" and "unloading small" in reports
    assert reports[-1] == "naming svc: medium (num_ctx 8192)"
    assert any(r.startswith("pulling medium: success") for r in reports)
    shown = api.show("svc")  # clients call the service's name: the rung's model and options
    assert shown["details"]["parent_model"].startswith("medium")
    assert re.search(r"^num_ctx\s+8192$", shown["parameters"], re.M)

    settled = change.settle(setup("medium", context=8192))
    assert settled.ok, settled.detail
    assert "warming up svc (medium)" in reports
    assert settled.measured is not None and settled.measured.vram_bytes == 2500 * MIB
    assert settled.measured.tokens_per_s is not None
    assert "warm-up 10 tokens" in settled.detail


def test_a_warm_up_slower_than_its_timeout_is_reported_not_hung(standin: StartStandin) -> None:
    s = standin("ollama", MODELS_PRESENT="medium", FAULT_GENERATE_DELAY_S="30", **OLLAMA)
    config = service("ollama", s.endpoint, timeout="2s")
    started = time.monotonic()
    settled = change_for(config, [], threading.Event()).settle("medium")
    assert not settled.ok and not settled.oom
    assert "no answer in" in settled.detail
    assert time.monotonic() - started < 6


def test_an_oom_seen_in_the_log_ends_the_wait_at_once(standin: StartStandin) -> None:
    # llama.cpp stays "Loading model" for 30 s; the log shows the OOM after 0.3 s.
    s = standin("llamacpp", MODEL_FROM_ENV="1", MODEL="medium", LOAD_DELAY_S="30", **OLLAMA)
    abort = threading.Event()
    threading.Timer(0.3, abort.set).start()
    started = time.monotonic()
    settled = change_for(service("llamacpp", s.endpoint), [], abort).settle("medium")
    assert settled.oom and not settled.ok
    assert time.monotonic() - started < 2


def test_health_flapping_then_ready_settles(standin: StartStandin) -> None:
    s = standin("vllm", MODEL_FROM_ENV="1", MODEL="medium", FAULT_HEALTH="fail,fail,ok", **OLLAMA)
    settled = change_for(service("vllm", s.endpoint), [], threading.Event()).settle("medium")
    assert settled.ok, settled.detail


def test_an_endpoint_is_named_never_guessed(tmp_path: Path) -> None:
    from supervisor.core.config import load_config
    from supervisor.core.endpoints import endpoint_of

    rung = "ladder: [{model: m, vram: 1GiB}]"
    text = f"""
services:
  named: {{runtime: ollama, containers: [a], endpoint: "http://10.0.0.5:11434/", {rung}}}
  ported: {{runtime: vllm, containers: [b], port: 8100, {rung}}}
  plain: {{runtime: llamacpp, containers: [c], {rung}}}
  app: {{runtime: generic, containers: [d], image: "x:1", port: 9000, {rung}}}
"""
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    config = load_config(path)
    assert endpoint_of(config, "named") == "http://10.0.0.5:11434"
    assert endpoint_of(config, "ported") == "http://127.0.0.1:8100"
    assert endpoint_of(config, "plain") is None  # no port, no compose_dir: no API calls
    assert endpoint_of(config, "app") is None  # a generic app has no runtime API
    # With compose_dir, the fleet runs the generated file: the port it publishes.
    path.write_text("compose_dir: out\n" + text)
    assert endpoint_of(load_config(path), "plain") == "http://127.0.0.1:8080"


# ---------------------------------------------------------------- runtimes without a stand-in

# Answers by (method, path): status and JSON body, as each runtime documents them.
Routes = dict[tuple[str, str], tuple[int, object]]


@pytest.fixture
def fake() -> Iterator[Callable[[Routes], tuple[str, list[tuple[str, str, object]]]]]:
    """A local HTTP server that answers fixed routes and records each request."""
    servers: list[ThreadingHTTPServer] = []

    def start(routes: Routes) -> tuple[str, list[tuple[str, str, object]]]:
        seen: list[tuple[str, str, object]] = []

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                seen.append((method, self.path, body))
                status, document = routes.get((method, self.path), (404, {"error": "no route"}))
                data = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._answer("GET")

            def do_POST(self) -> None:
                self._answer("POST")

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{server.server_address[1]}", seen

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


Fake = Callable[[Routes], tuple[str, list[tuple[str, str, object]]]]
COMPLETION = {"choices": [{"text": " Hello!"}], "usage": {"completion_tokens": 5}}


def test_tgi_health_and_warm_up_through_generate(fake: Fake) -> None:
    answer = {"generated_text": " Hello!", "details": {"generated_tokens": 7}}
    endpoint, seen = fake({("GET", "/health"): (200, {}), ("POST", "/generate"): (200, answer)})
    api = TgiApi(endpoint)
    api.health(2)
    warmed = api.warm("ignored", "Say hello.", 7, timeout_s=5)
    assert warmed.tokens == 7 and warmed.tokens_per_s is not None
    body = seen[-1][2]
    assert isinstance(body, dict) and body["inputs"] == "Say hello."
    assert body["parameters"]["max_new_tokens"] == 7 and body["parameters"]["details"] is True


@pytest.mark.parametrize("client", [SglangApi, TensorRtLlmApi])
def test_openai_servers_warm_up_with_the_served_model_name(
    fake: Fake, client: type[SglangApi] | type[TensorRtLlmApi]
) -> None:
    endpoint, seen = fake(
        {
            ("GET", "/health"): (200, {}),
            ("GET", "/v1/models"): (200, {"data": [{"id": "served/name"}]}),
            ("POST", "/v1/completions"): (200, COMPLETION),
        }
    )
    api = client(endpoint)
    api.health(2)
    assert api.warm("ladder-name", "Say hello.", 5, timeout_s=5).tokens == 5
    body = seen[-1][2]
    assert isinstance(body, dict) and body["model"] == "served/name"


def test_triton_health_is_its_ready_endpoint_and_it_has_no_warm_up(fake: Fake) -> None:
    endpoint, seen = fake({("GET", "/v2/health/ready"): (200, {})})
    api = TritonApi(endpoint)
    api.health(2)
    assert seen == [("GET", "/v2/health/ready", None)]
    with pytest.raises(RuntimeApiError, match="cannot warm up a model"):
        api.warm("m", "hi", 1, timeout_s=2)


def test_health_that_is_not_ready_is_an_error_with_its_status(fake: Fake) -> None:
    endpoint, _ = fake({("GET", "/health"): (503, {"error": "loading"})})
    with pytest.raises(RuntimeApiError, match="HTTP 503: loading") as raised:
        TgiApi(endpoint).health(2)
    assert raised.value.status == 503


def test_unload_decides_by_the_status_code_not_the_words(fake: Fake) -> None:
    gone, _ = fake({("POST", "/api/generate"): (404, {"error": "no such model"})})
    OllamaApi(gone).unload("x")  # 404: nothing loaded, whatever the wording
    broken, _ = fake({("POST", "/api/generate"): (500, {"error": "runner not found"})})
    with pytest.raises(RuntimeApiError, match="HTTP 500") as raised:
        OllamaApi(broken).unload("x")  # "not found" in a server error is still an error
    assert raised.value.status == 500


def test_a_change_on_triton_waits_for_health_and_skips_the_warm_up(fake: Fake) -> None:
    endpoint, seen = fake({("GET", "/v2/health/ready"): (200, {})})
    reports: list[str] = []
    change = change_for(service("triton", endpoint), reports, threading.Event())
    change.prepare("small", setup("medium"))  # Triton cannot pull or unload: nothing to do
    settled = change.settle("medium")
    assert settled.ok, settled.detail
    assert settled.measured is not None and settled.measured.vram_bytes is None
    assert [path for _, path, _ in seen] == ["/v2/health/ready"] and reports == []


def test_a_change_on_tgi_warms_up_through_generate(fake: Fake) -> None:
    answer = {"generated_text": " Hi", "details": {"generated_tokens": 10}}
    endpoint, _ = fake({("GET", "/health"): (200, {}), ("POST", "/generate"): (200, answer)})
    reports: list[str] = []
    settled = change_for(service("tgi", endpoint), reports, threading.Event()).settle("medium")
    assert settled.ok and "warm-up 10 tokens" in settled.detail, settled.detail
    assert reports == ["warming up medium"]


def test_unload_others_unloads_only_the_loaded_members_by_their_full_name(fake: Fake) -> None:
    endpoint, seen = fake(
        {
            ("GET", "/api/ps"): (200, {"models": [{"name": "embed:latest", "size_vram": 1}]}),
            ("POST", "/api/generate"): (200, {"done": True}),
        }
    )
    reports: list[str] = []
    change = change_for(service("ollama", endpoint), reports, threading.Event())
    change.unload_others(["embed", "chat:7b"])  # `embed` is Ollama's `embed:latest`
    posts = [body for method, _, body in seen if method == "POST"]
    assert posts == [{"model": "embed", "keep_alive": 0}] and reports == ["unloading embed"]


def test_unload_others_asks_nothing_of_a_runtime_that_cannot_unload(fake: Fake) -> None:
    endpoint, seen = fake({})
    change_for(service("vllm", endpoint), [], threading.Event()).unload_others(["a", "b"])
    assert seen == []
