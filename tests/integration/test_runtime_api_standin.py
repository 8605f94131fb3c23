"""fleetd-test/runtime-api stands in for the HTTP APIs of Ollama, vLLM and llama.cpp server.

The image (tests/images/runtime-api, built by scripts/build-test-images.sh FROM a debootstrap
Debian with python3) answers the paths fleetd calls with the real JSON shapes, status codes
and error wording, on a pretend GPU, with faults set by env or at run time (POST /_fault).
These tests pin that behaviour down against real containers, since fleetd's runtime-API
tests rely on it.

Where the API facts come from (the same list, longer, heads standin.py):
- Ollama: ollama/ollama docs/api.md (paths, fields, /api/pull's stream, load with an empty
  prompt, unload with keep_alive 0 and done_reason "unload", /api/ps, /api/tags);
  docs.ollama.com/api/errors.md ({"error": ...}, status codes, errors mid-stream);
  docs.ollama.com/api-reference/get-version.md; ollama/ollama server/routes.go (404 "model
  'x' not found" from /api/generate, `model "x" not found, try pulling it first` from
  /api/chat, other scheduling errors 500, done_reason "load"), server/download.go ("pulling
  <12 hex>" progress every 60 ms), server/images.go (the statuses after the download);
  github.com/ollama/ollama/issues/9782 (the runner's CUDA OOM error) and issues/1158 ("max
  retries exceeded: unexpected EOF").
- vLLM: vllm-project/vllm vllm/entrypoints/openai/api_server.py (the socket is bound but not
  listened on until the engine is up; /health 200 with an empty body, 503 when the engine is
  dead) and vllm/entrypoints/openai/protocol.py (ModelList, CompletionResponse, ErrorResponse).
- llama.cpp: ggml-org/llama.cpp tools/server/README.md (/health 200 {"status": "ok"}, 503
  {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}};
  /completion) and tools/server/server-task.cpp (the `timings` object, /v1/completions).
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import docker
import pytest
from docker.models.containers import Container

if TYPE_CHECKING:
    from .conftest import Cleanup

IMAGE = "fleetd-test/runtime-api:1"
PORTS = {"ollama": 11434, "vllm": 8000, "llamacpp": 8080}
CAPACITY_MIB = 3000
MODEL_SIZES = "big=4000,medium=2500,small=1000,tiny=500"
MIB = 1024 * 1024
TOKENS_PER_S = 40
RATE_TOLERANCE = 0.15  # measured tokens/s within 15% of TOKENS_PER_S
START_S = 10

OOM_ERROR = "llama runner process has terminated: cudaMalloc failed: out of memory"
# The same two lines fleetd-test/oom-emitter prints for Ollama (tests/integration/
# test_oom_emitter.py), for model "big" (4000 MiB).
OLLAMA_GGML_LINE = (
    "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 4000.00 MiB on device 0: "
    "cudaMalloc failed: out of memory"
)
OLLAMA_ERROR_LINE = (
    f'level=ERROR source=sched.go:455 msg="error loading llama server" error="{OOM_ERROR}"'
)
OOM_LINES = {
    "vllm": [
        "[core.py:396] torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.06 GiB.",
        "RuntimeError: Engine core initialization failed. See root cause above.",
    ],
    "llamacpp": [
        "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 4000.00 MiB on device 0: "
        "cudaMalloc failed: out of memory",
        "main: exiting due to model loading error",
    ],
}
LOADING_BODY = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}


# --- talking to a stand-in ----------------------------------------------------------------


@dataclass
class Reply:
    status: int
    content_type: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Standin:
    """One running stand-in container and HTTP to it, at its address on the bridge."""

    container: Container
    host: str
    port: int

    def call(self, method: str, path: str, body: Any = None, timeout_s: float = 10.0) -> Reply:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout_s)
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {} if data is None else {"Content-Type": "application/json"}
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            return Reply(response.status, response.getheader("Content-Type", ""), response.read())
        finally:
            conn.close()

    def get(self, path: str, timeout_s: float = 10.0) -> Reply:
        return self.call("GET", path, timeout_s=timeout_s)

    def post(self, path: str, body: Any, timeout_s: float = 10.0) -> Reply:
        return self.call("POST", path, body, timeout_s=timeout_s)

    def stream(self, path: str, body: Any, timeout_s: float = 10.0) -> Iterator[dict[str, Any]]:
        """POST, then yield each NDJSON object as its line arrives."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout_s)
        try:
            conn.request("POST", path, body=json.dumps(body).encode())
            response = conn.getresponse()
            assert response.status == 200, response.read()
            assert response.getheader("Content-Type") == "application/x-ndjson"
            for line in response:
                yield json.loads(line)
        finally:
            conn.close()

    def set_faults(self, **faults: Any) -> dict[str, Any]:
        reply = self.post("/_fault", faults)
        assert reply.status == 200, reply.body
        document: dict[str, Any] = reply.json()
        return document

    def stdout(self) -> str:
        return self.container.logs(stdout=True, stderr=False).decode()

    def stderr(self) -> str:
        return self.container.logs(stdout=False, stderr=True).decode()

    def requests_seen(self) -> list[str]:
        """The request lines the stand-in printed, "<METHOD> <path> <status>", in order."""
        prefix = "standin: "
        lines = self.stdout().splitlines()[1:]  # the first says what started
        return [line.removeprefix(prefix) for line in lines if line.startswith(prefix)]

    def wait_listening(self, timeout_s: float = START_S) -> float:
        """Seconds until a TCP connect succeeds (vLLM refuses until its engine is up)."""
        start = time.monotonic()
        while True:
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                return time.monotonic() - start
            except OSError:
                if time.monotonic() - start > timeout_s:
                    raise
                time.sleep(0.05)


StartStandin = Callable[..., Standin]


@pytest.fixture
def start_standin(
    docker_client: docker.DockerClient,
    runtime_api_image: str,
    cleanup: Cleanup,
    tmp_path: Path,
) -> StartStandin:
    """Start a stand-in; `env` adds to or overrides the runtime, capacity and sizes.

    ``model_file``, when given, is handed off at /run/fleetd/model (mounted read-only).
    Waits until the port answers a connect unless ``wait=False``.
    """

    def start(
        runtime: str, model_file: str | None = None, wait: bool = True, **env: str
    ) -> Standin:
        volumes = {}
        if model_file is not None:
            handoff = tmp_path / f"handoff-{uuid.uuid4().hex[:8]}"
            handoff.mkdir()
            (handoff / "model").write_text(f"{model_file}\n")
            volumes[str(handoff)] = {"bind": "/run/fleetd", "mode": "ro"}
        environment = {
            "RUNTIME": runtime,
            "CAPACITY_MIB": str(CAPACITY_MIB),
            "MODEL_SIZES": MODEL_SIZES,
            "TOKENS_PER_S": str(TOKENS_PER_S),
            **env,
        }
        container = docker_client.containers.run(
            runtime_api_image,
            detach=True,
            name=f"fleetd-test-runtime-api-{uuid.uuid4().hex[:12]}",
            environment=environment,
            labels=cleanup.labels,
            volumes=volumes,
        )
        container.reload()
        standin = Standin(
            container, container.attrs["NetworkSettings"]["IPAddress"], PORTS[runtime]
        )
        if wait:
            standin.wait_listening()
        return standin

    return start


def wait_for_exit(container: Container, timeout_s: float = START_S) -> int:
    status: int = container.wait(timeout=timeout_s)["StatusCode"]
    return status


def rate_ok(tokens: int, duration_ns: int) -> bool:
    measured = tokens / (duration_ns / 1e9)
    return abs(measured - TOKENS_PER_S) <= RATE_TOLERANCE * TOKENS_PER_S


def is_go_time(value: Any) -> bool:
    """An RFC 3339 instant as Go writes it (the fraction may have up to 9 digits)."""
    if not isinstance(value, str) or not re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)", value
    ):
        return False
    return datetime.fromisoformat(value).tzinfo is not None


def assert_details(details: Any) -> None:
    assert isinstance(details, dict)
    for key in ("format", "family", "parameter_size", "quantization_level"):
        assert isinstance(details[key], str), key
    assert isinstance(details["families"], list)


# --- Ollama ---------------------------------------------------------------------------------


def test_ollama_paths_answer_with_the_documented_shapes(start_standin: StartStandin) -> None:
    ollama = start_standin("ollama", MODELS_PRESENT="small")

    root = ollama.get("/")
    assert (root.status, root.body) == (200, b"Ollama is running")
    version = ollama.get("/api/version")
    assert version.status == 200 and isinstance(version.json()["version"], str)

    [tag] = ollama.get("/api/tags").json()["models"]
    assert tag["name"] == tag["model"] == "small:latest"
    assert tag["size"] == 1000 * MIB and isinstance(tag["size"], int)
    assert re.fullmatch(r"[0-9a-f]{64}", tag["digest"])
    assert is_go_time(tag["modified_at"])
    assert_details(tag["details"])

    assert ollama.get("/api/ps").json() == {"models": []}
    loaded = ollama.post("/api/generate", {"model": "small"})
    assert loaded.status == 200
    assert loaded.json() | {"created_at": "-"} == {
        "model": "small",
        "created_at": "-",
        "response": "",
        "done": True,
        "done_reason": "load",
    }
    assert is_go_time(loaded.json()["created_at"])

    [running] = ollama.get("/api/ps").json()["models"]
    assert running["name"] == running["model"] == "small:latest"
    assert running["size"] == running["size_vram"] == 1000 * MIB
    assert running["digest"] == tag["digest"]
    assert is_go_time(running["expires_at"])
    assert_details(running["details"])

    missing = ollama.post("/api/generate", {"model": "medium", "prompt": "hi"})
    assert (missing.status, missing.json()) == (404, {"error": "model 'medium' not found"})
    chat = ollama.post(
        "/api/chat", {"model": "medium", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert (chat.status, chat.json()) == (
        404,
        {"error": 'model "medium" not found, try pulling it first'},
    )
    no_body = ollama.call("POST", "/api/generate")
    assert (no_body.status, no_body.json()) == (400, {"error": "missing request body"})
    assert ollama.get("/api/nothing").status == 404

    assert ollama.requests_seen()[:4] == [
        "GET / 200",
        "GET /api/version 200",
        "GET /api/tags 200",
        "GET /api/ps 200",
    ]


def test_generate_reports_honest_timings(start_standin: StartStandin) -> None:
    ollama = start_standin("ollama", MODELS_PRESENT="small", LOAD_DELAY_S="0.4")

    start = time.monotonic()
    first = ollama.post(
        "/api/generate",
        {"model": "small", "prompt": "say hi", "stream": False, "options": {"num_predict": 10}},
    )
    wall_s = time.monotonic() - start
    answer = first.json()
    assert first.status == 200 and answer["done"] is True and answer["done_reason"] == "length"
    assert answer["eval_count"] == 10 and isinstance(answer["response"], str)
    assert rate_ok(answer["eval_count"], answer["eval_duration"])
    assert answer["load_duration"] >= 0.4e9  # this request loaded the model
    assert answer["prompt_eval_count"] >= 1 and answer["prompt_eval_duration"] > 0
    parts = answer["load_duration"] + answer["prompt_eval_duration"] + answer["eval_duration"]
    assert parts <= answer["total_duration"] <= wall_s * 1e9

    pieces = list(
        ollama.stream(
            "/api/generate", {"model": "small", "prompt": "again", "options": {"num_predict": 6}}
        )
    )
    *tokens, done = pieces
    assert all(p["done"] is False and isinstance(p["response"], str) for p in tokens)
    assert len(tokens) == done["eval_count"] == 6
    assert done["done"] is True and done["response"] == ""
    assert done["load_duration"] < 0.1e9  # already loaded
    assert rate_ok(done["eval_count"], done["eval_duration"])

    chat = ollama.post(
        "/api/chat",
        {"model": "small", "messages": [{"role": "user", "content": "hi"}], "stream": False},
    ).json()
    assert chat["message"]["role"] == "assistant" and chat["message"]["content"]
    assert chat["done_reason"] == "stop" and rate_ok(chat["eval_count"], chat["eval_duration"])


def test_pull_streams_progress_and_ends_with_success(start_standin: StartStandin) -> None:
    ollama = start_standin("ollama", PULL_MIB_PER_S="4000")  # 2500 MiB: about 0.6 s

    start = time.monotonic()
    lines = list(ollama.stream("/api/pull", {"model": "medium"}))
    assert time.monotonic() - start >= 0.5

    assert lines[0] == {"status": "pulling manifest"}
    assert [line["status"] for line in lines[-3:]] == [
        "verifying sha256 digest",
        "writing manifest",
        "success",
    ]
    downloads = [line for line in lines if "digest" in line]
    model_blob = downloads[0]["digest"]
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", model_blob)
    progress = [d.get("completed", 0) for d in downloads if d["digest"] == model_blob]
    assert len(progress) >= 5
    assert progress == sorted(progress) and progress[0] < progress[-1]
    assert progress[-1] == downloads[0]["total"] == 2500 * MIB
    for d in downloads:
        assert d["status"] == f"pulling {d['digest'][7:19]}"
    assert not any("error" in line for line in lines)

    names = [m["name"] for m in ollama.get("/api/tags").json()["models"]]
    assert names == ["medium:latest"]
    unstreamed = ollama.post("/api/pull", {"model": "medium", "stream": False})
    assert (unstreamed.status, unstreamed.json()) == (200, {"status": "success"})


def test_failed_pull_ends_with_an_error_line_and_no_model(start_standin: StartStandin) -> None:
    ollama = start_standin("ollama", PULL_MIB_PER_S="8000", FAULT_PULL_FAIL_AT="0.5")

    *progress, last = list(ollama.stream("/api/pull", {"model": "medium"}))
    assert last == {"error": "max retries exceeded: unexpected EOF"}
    total = 2500 * MIB
    completed = [line.get("completed", 0) for line in progress if "digest" in line]
    assert 0 < completed[-1] <= total // 2
    assert not any(line.get("status") == "success" for line in progress)
    assert ollama.get("/api/tags").json() == {"models": []}
    missing = ollama.post("/api/generate", {"model": "medium"})
    assert missing.status == 404

    unknown = list(ollama.stream("/api/pull", {"model": "nowhere"}))
    assert unknown == [
        {"status": "pulling manifest"},
        {"error": "pull model manifest: file does not exist"},
    ]
    failed = ollama.post("/api/pull", {"model": "medium", "stream": False})
    assert (failed.status, failed.json()) == (
        500,
        {"error": "max retries exceeded: unexpected EOF"},
    )

    ollama.set_faults(pull_fail_at=None)  # at run time: the next pull goes through
    assert list(ollama.stream("/api/pull", {"model": "medium"}))[-1] == {"status": "success"}
    assert [m["name"] for m in ollama.get("/api/tags").json()["models"]] == ["medium:latest"]


def loaded_names(ollama: Standin) -> list[str]:
    return sorted(m["name"] for m in ollama.get("/api/ps").json()["models"])


def test_keep_alive_0_unloads_and_loading_makes_room(start_standin: StartStandin) -> None:
    ollama = start_standin("ollama", MODELS_PRESENT="small,tiny,medium", MAX_LOADED="2")

    for model in ("small", "tiny"):
        assert ollama.post("/api/generate", {"model": model}).json()["done_reason"] == "load"
    assert loaded_names(ollama) == ["small:latest", "tiny:latest"]
    vram = sum(m["size_vram"] for m in ollama.get("/api/ps").json()["models"])
    assert vram == 1500 * MIB

    # 2500 MiB does not fit beside 1500 on 3000: the least recently used one (small) goes.
    assert ollama.post("/api/generate", {"model": "medium"}).status == 200
    assert loaded_names(ollama) == ["medium:latest", "tiny:latest"]

    unloaded = ollama.post("/api/generate", {"model": "medium", "keep_alive": 0})
    assert unloaded.status == 200
    assert unloaded.json()["done_reason"] == "unload" and unloaded.json()["response"] == ""
    assert loaded_names(ollama) == ["tiny:latest"]
    chat = ollama.post("/api/chat", {"model": "tiny", "messages": [], "keep_alive": "0s"})
    assert chat.json()["done_reason"] == "unload"
    assert chat.json()["message"] == {"role": "assistant", "content": ""}
    assert ollama.get("/api/ps").json() == {"models": []}


def test_a_model_too_big_fails_with_the_oom_error_and_log_lines(
    start_standin: StartStandin,
) -> None:
    ollama = start_standin("ollama", MODELS_PRESENT="big,small")
    assert ollama.post("/api/generate", {"model": "small"}).status == 200

    failed = ollama.post("/api/generate", {"model": "big", "prompt": "hi", "stream": False})
    assert (failed.status, failed.json()) == (500, {"error": OOM_ERROR})
    stderr = ollama.stderr()
    assert OLLAMA_GGML_LINE in stderr and OLLAMA_ERROR_LINE in stderr
    # The server survives its runner; small was unloaded to make room and stays so.
    assert ollama.get("/api/version").status == 200
    assert ollama.get("/api/ps").json() == {"models": []}


# --- vLLM and llama.cpp server --------------------------------------------------------------


def test_vllm_refuses_connections_while_loading_then_serves(
    start_standin: StartStandin,
) -> None:
    vllm = start_standin("vllm", model_file="small", LOAD_DELAY_S="1.5", wait=False)

    with pytest.raises(ConnectionRefusedError):
        vllm.get("/health")
    assert vllm.wait_listening() >= 0.8  # what was left of LOAD_DELAY_S=1.5 after the start
    health = vllm.get("/health")
    assert (health.status, health.body, health.content_type) == (200, b"", "")

    [card] = vllm.get("/v1/models").json()["data"]
    assert card["id"] == "small" and card["object"] == "model" and card["owned_by"] == "vllm"
    assert isinstance(card["max_model_len"], int)

    start = time.monotonic()
    reply = vllm.post("/v1/completions", {"model": "small", "prompt": "Hello", "max_tokens": 10})
    assert time.monotonic() - start >= 10 / TOKENS_PER_S
    completion = reply.json()
    assert reply.status == 200 and completion["object"] == "text_completion"
    assert completion["id"].startswith("cmpl-") and completion["model"] == "small"
    [choice] = completion["choices"]
    assert isinstance(choice["text"], str) and choice["finish_reason"] == "length"
    usage = completion["usage"]
    assert usage["completion_tokens"] == 10
    assert usage["total_tokens"] == usage["prompt_tokens"] + 10

    wrong = vllm.post("/v1/completions", {"model": "other", "prompt": "Hello"})
    assert (wrong.status, wrong.json()) == (
        404,
        {
            "object": "error",
            "message": "The model `other` does not exist.",
            "type": "NotFoundError",
            "param": None,
            "code": 404,
        },
    )


def test_llamacpp_answers_503_while_loading_then_200(start_standin: StartStandin) -> None:
    llamacpp = start_standin("llamacpp", MODEL_FROM_ENV="1", MODEL="small", LOAD_DELAY_S="1.5")

    loading = llamacpp.get("/health")
    assert (loading.status, loading.json()) == (503, LOADING_BODY)
    assert llamacpp.post("/completion", {"prompt": "x"}).json() == LOADING_BODY
    statuses = []
    deadline = time.monotonic() + START_S
    while not statuses or statuses[-1] != 200:
        assert time.monotonic() < deadline
        statuses.append(llamacpp.get("/health").status)
        time.sleep(0.05)
    assert set(statuses) == {503, 200}
    assert llamacpp.get("/health").json() == {"status": "ok"}

    reply = llamacpp.post("/completion", {"prompt": "Hello there", "n_predict": 10})
    answer = reply.json()
    assert reply.status == 200 and answer["stop"] is True and answer["stop_type"] == "limit"
    assert isinstance(answer["content"], str) and answer["tokens_predicted"] == 10
    timings = answer["timings"]
    for key in ("prompt_n", "predicted_n"):
        assert isinstance(timings[key], int), key
    for key in ("prompt_ms", "prompt_per_second", "predicted_ms", "predicted_per_second"):
        assert isinstance(timings[key], float), key
    assert timings["predicted_n"] == 10
    assert rate_ok(10, int(timings["predicted_ms"] * 1e6))
    assert abs(timings["predicted_per_second"] - TOKENS_PER_S) <= RATE_TOLERANCE * TOKENS_PER_S

    oai = llamacpp.post("/v1/completions", {"prompt": "Hello", "max_tokens": 5}).json()
    assert oai["object"] == "text_completion" and oai["usage"]["completion_tokens"] == 5
    assert oai["choices"][0]["finish_reason"] == "length" and oai["timings"]["predicted_n"] == 5


@pytest.mark.parametrize("runtime", ["vllm", "llamacpp"])
def test_a_model_too_big_kills_the_server_with_its_oom_lines(
    start_standin: StartStandin, runtime: str
) -> None:
    server = start_standin(runtime, MODEL_FROM_ENV="1", MODEL="big", wait=False)

    assert wait_for_exit(server.container) == 1
    output = server.stdout() + server.stderr()
    for line in OOM_LINES[runtime]:
        assert line in output


# --- faults -------------------------------------------------------------------------------

PROBE = {"ollama": "/api/version", "vllm": "/health", "llamacpp": "/health"}
FAILED = {"ollama": 500, "vllm": 503, "llamacpp": 503}


@pytest.mark.parametrize("runtime", ["ollama", "vllm", "llamacpp"])
def test_the_health_cycle_is_followed(start_standin: StartStandin, runtime: str) -> None:
    server = start_standin(runtime, MODEL_FROM_ENV="1", MODEL="small", FAULT_HEALTH="ok,fail,fail")

    statuses = [server.get(PROBE[runtime]).status for _ in range(6)]
    bad = FAILED[runtime]
    assert statuses == [200, bad, bad, 200, bad, bad]

    server.set_faults(health="fail,ok")  # at run time; the cycle starts over
    assert [server.get(PROBE[runtime]).status for _ in range(3)] == [bad, 200, bad]
    server.set_faults(health=None)
    assert {server.get(PROBE[runtime]).status for _ in range(3)} == {200}


def test_post_fault_changes_behaviour_at_run_time(start_standin: StartStandin) -> None:
    ollama = start_standin("ollama", MODELS_PRESENT="small")

    assert ollama.get("/_fault").json() == {
        "pull_fail_at": None,
        "generate_delay_s": 0.0,
        "health": "",
        "down": "",
    }
    assert ollama.set_faults(down="close")["down"] == "close"
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        ollama.get("/api/version")
    ollama.set_faults(down="hang")
    with pytest.raises(TimeoutError):
        ollama.get("/api/tags", timeout_s=0.5)
    ollama.set_faults(down=None)
    assert ollama.get("/api/version").status == 200

    ollama.set_faults(generate_delay_s=1.0)
    warm_up = {"model": "small", "prompt": "hi", "stream": False, "options": {"num_predict": 2}}
    with pytest.raises(TimeoutError):
        ollama.post("/api/generate", warm_up, timeout_s=0.3)
    ollama.set_faults(generate_delay_s=0)
    assert ollama.post("/api/generate", warm_up, timeout_s=2).status == 200

    bad = ollama.post("/_fault", {"down": "sideways"})
    assert bad.status == 400 and "down" in bad.json()["error"].lower()

    seen = ollama.requests_seen()
    # The delayed generation still answers (into a closed connection), late: leave it out.
    assert [line for line in seen if not line.startswith("POST /api/generate")] == [
        "GET /_fault 200",
        "POST /_fault 200",
        "GET /api/version down=close",
        "POST /_fault 200",
        "GET /api/tags down=hang",
        "POST /_fault 200",
        "GET /api/version 200",
        "POST /_fault 200",
        "POST /_fault 200",
        "POST /_fault 400",
    ]
    assert "POST /api/generate 200" in seen
