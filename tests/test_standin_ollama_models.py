"""The Ollama stand-in's model management (tests/images/runtime-api/standin.py): POST
/api/create, POST /api/copy, DELETE /api/delete and POST /api/show, checked as a client sees
them, with the stand-in run as a local process on a free port.

A created model must be a model like any other there: listed by /api/tags, loaded by
/api/generate on its base's weights and VRAM size, under its own name in /api/ps with the
num_ctx it was created with as context_length, and gone (unloaded too) once deleted.
Shapes and wording: ollama/ollama docs/api.md, api/types.go, server/routes.go and
server/create.go (see the stand-in's docstring)."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

STANDIN = Path(__file__).resolve().parent / "images" / "runtime-api" / "standin.py"
MIB = 1024**2
SIZES = "big=6000,medium=2500,small=1000"
LAYER = re.compile(r"(using existing|creating new) layer sha256:[0-9a-f]{64}")
GO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z")
LLAMA3_STOP = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@dataclass
class Reply:
    status: int
    content_type: str | None
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Ollama:
    """A running stand-in and HTTP to it."""

    process: subprocess.Popen[str]
    port: int

    def call(self, method: str, path: str, body: Any = None) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=data)
            response = conn.getresponse()
            return Reply(response.status, response.getheader("Content-Type"), response.read())
        finally:
            conn.close()

    def post(self, path: str, body: Any) -> Reply:
        return self.call("POST", path, body)

    def stream(self, path: str, body: Any) -> list[dict[str, Any]]:
        """POST a streamed request: every NDJSON line of the 200 answer."""
        reply = self.post(path, body)
        assert reply.status == 200, reply.body
        assert reply.content_type == "application/x-ndjson"
        return [json.loads(line) for line in reply.body.splitlines()]

    def create(self, **body: Any) -> list[dict[str, Any]]:
        return self.stream("/api/create", body)

    def show(self, model: str) -> dict[str, Any]:
        reply = self.post("/api/show", {"model": model})
        assert reply.status == 200, reply.body
        document: dict[str, Any] = reply.json()
        return document

    def tags(self) -> dict[str, dict[str, Any]]:
        return {m["name"]: m for m in self.call("GET", "/api/tags").json()["models"]}

    def ps(self) -> dict[str, dict[str, Any]]:
        return {m["name"]: m for m in self.call("GET", "/api/ps").json()["models"]}

    def stderr(self) -> str:
        """Everything it wrote to stderr; stops it."""
        self.process.terminate()
        _, err = self.process.communicate(timeout=5)
        return err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


StartOllama = Callable[..., Ollama]


@pytest.fixture
def start_ollama() -> Iterator[StartOllama]:
    started: list[Ollama] = []

    def start(**env: str) -> Ollama:
        port = free_port()
        environment = {
            "RUNTIME": "ollama",
            "PORT": str(port),
            "CAPACITY_MIB": "4000",
            "MODEL_SIZES": SIZES,
            "MODELS_PRESENT": "small",
            "TOKENS_PER_S": "2000",
            "PULL_MIB_PER_S": "100000",
            **env,
        }
        process = subprocess.Popen(
            [sys.executable, str(STANDIN)],
            env={**os.environ, **environment},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        ollama = Ollama(process, port)
        started.append(ollama)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return ollama
            except OSError:
                assert process.poll() is None, process.communicate()
                assert time.monotonic() < deadline, "the stand-in never listened"
                time.sleep(0.05)

    yield start
    for ollama in started:
        if ollama.process.poll() is None:
            ollama.process.kill()
        ollama.process.communicate()


@pytest.fixture
def ollama(start_ollama: StartOllama) -> Ollama:
    return start_ollama()


def param_line(key: str, value: str) -> str:
    """One line of /api/show's "parameters": Go's "%-30s %#v"."""
    return f"{key:<30} {value}"


# --- POST /api/create -----------------------------------------------------------------------


def test_create_from_a_present_model_streams_its_layers_then_success(ollama: Ollama) -> None:
    lines = ollama.create(
        model="mario", **{"from": "small"}, parameters={"num_ctx": 8192}, system="Be Mario."
    )

    statuses = [line["status"] for line in lines]
    assert statuses[-2:] == ["writing manifest", "success"]
    layers = statuses[:-2]
    assert all(LAYER.fullmatch(s) for s in layers), layers
    # weights and template are small's; the system prompt and the merged parameters are new
    assert [s.split(" layer ")[0] for s in layers] == [
        "using existing",
        "using existing",
        "creating new",
        "creating new",
    ]
    assert layers[0] == f"using existing layer sha256:{weights_of(ollama, 'small')}"

    again = ollama.create(
        model="mario", **{"from": "small"}, parameters={"num_ctx": 8192}, system="Be Mario."
    )
    assert all(line["status"].startswith("using existing") for line in again[:-2])


def weights_of(ollama: Ollama, model: str) -> str:
    """The sha256 of a model's weights blob, from the FROM line of its modelfile."""
    found = re.search(r"^FROM \S+/sha256-([0-9a-f]{64})$", ollama.show(model)["modelfile"], re.M)
    assert found, ollama.show(model)["modelfile"]
    return found.group(1)


def test_a_created_model_is_listed_with_its_base_weights_and_size(ollama: Ollama) -> None:
    ollama.create(model="mario", **{"from": "small"}, parameters={"num_ctx": 8192})

    tags = ollama.tags()
    assert set(tags) == {"small:latest", "mario:latest"}
    mario, small = tags["mario:latest"], tags["small:latest"]
    assert mario["model"] == "mario:latest"
    assert mario["size"] == small["size"] == 1000 * MIB
    assert mario["details"] == small["details"]
    assert re.fullmatch(r"[0-9a-f]{64}", mario["digest"]) and mario["digest"] != small["digest"]
    assert GO_TIME.fullmatch(mario["modified_at"])
    assert mario["modified_at"] >= small["modified_at"]
    assert weights_of(ollama, "mario") == weights_of(ollama, "small")


def test_show_reports_what_the_model_was_created_with(ollama: Ollama) -> None:
    ollama.create(
        model="mario",
        **{"from": "small"},
        parameters={"num_ctx": 8192, "temperature": 0.7, "seed": 1000000},
        system="You are Mario from Super Mario Bros.",
    )

    shown = ollama.show("mario")
    assert shown["parameters"].splitlines() == [
        param_line("num_ctx", "8192"),
        param_line("seed", "1e+06"),  # a JSON number is a float64 to Go's %#v
        *[param_line("stop", json.dumps(stop)) for stop in LLAMA3_STOP],
        param_line("temperature", "0.7"),
    ]
    assert shown["system"] == "You are Mario from Super Mario Bros."
    assert shown["template"] == ollama.show("small")["template"]
    assert "{{ .Prompt }}" in shown["template"]
    assert shown["details"] == {
        "parent_model": "small:latest",
        "format": "gguf",
        "family": "llama",
        "families": ["llama"],
        "parameter_size": "1.7B",
        "quantization_level": "Q4_K_M",
    }
    assert shown["capabilities"] == ["completion"]
    info = shown["model_info"]
    assert info["general.architecture"] == "llama"
    assert info["llama.context_length"] == 131072  # the training context, not num_ctx
    assert info["tokenizer.ggml.tokens"] == []  # emptied without "verbose"
    assert {"name", "type", "shape"} == set(shown["tensors"][0])
    assert GO_TIME.fullmatch(shown["modified_at"])

    modelfile = shown["modelfile"].splitlines()
    assert modelfile[:4] == [
        '# Modelfile generated by "ollama show"',
        "# To build a new Modelfile based on this, replace FROM with:",
        "# FROM mario:latest",
        "",
    ]
    assert re.fullmatch(r"FROM /root/\.ollama/models/blobs/sha256-[0-9a-f]{64}", modelfile[4])
    assert modelfile[5].startswith('TEMPLATE "{{ if .System }}')  # multi-line: quoted
    for line in (
        "SYSTEM You are Mario from Super Mario Bros.",
        "PARAMETER num_ctx 8192",
        "PARAMETER stop <|eot_id|>",
    ):
        assert line in modelfile


def test_show_of_a_pulled_model_has_no_parent_and_the_llama3_stops(ollama: Ollama) -> None:
    shown = ollama.show("small")
    assert shown["details"]["parent_model"] == ""
    assert shown["parameters"].splitlines() == [
        param_line("stop", json.dumps(stop)) for stop in LLAMA3_STOP
    ]
    assert "system" not in shown and "license" not in shown and "messages" not in shown

    override = ollama.post("/api/show", {"model": "small", "system": "Be brief."}).json()
    assert override["system"] == "Be brief."
    assert "SYSTEM Be brief." in override["modelfile"].splitlines()


def test_create_keeps_license_messages_and_template(ollama: Ollama) -> None:
    template = "{{ .System }} {{ .Prompt }} {{ if .Tools }}tools{{ end }}"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ollama.create(
        model="me/helper:v1",
        **{"from": "small"},
        template=template,
        license=["MIT", "Apache-2.0"],
        messages=messages,
    )

    shown = ollama.show("me/helper:v1")
    assert shown["template"] == template
    assert shown["license"] == "MIT\nApache-2.0"
    assert shown["messages"] == messages
    assert shown["capabilities"] == ["completion", "tools"]
    modelfile = shown["modelfile"].splitlines()
    assert f"TEMPLATE {template}" in modelfile
    licenses = [line for line in modelfile if line.startswith("LICENSE")]
    assert licenses == ["LICENSE MIT", "LICENSE Apache-2.0"]
    said = [line for line in modelfile if line.startswith("MESSAGE")]
    assert said == ["MESSAGE user hi", "MESSAGE assistant hello"]
    assert "me/helper:v1" in ollama.tags()


def test_create_unstreamed_answers_the_last_line(ollama: Ollama) -> None:
    reply = ollama.post("/api/create", {"model": "mario", "from": "small", "stream": False})
    assert (reply.status, reply.json()) == (200, {"status": "success"})
    assert reply.content_type == "application/json; charset=utf-8"
    assert "mario:latest" in ollama.tags()


def test_create_from_a_registry_model_not_present_pulls_it_first(ollama: Ollama) -> None:
    lines = ollama.create(model="big-ctx", **{"from": "medium"}, parameters={"num_ctx": 2048})

    statuses = [line["status"] for line in lines]
    assert statuses[0] == "pulling manifest"
    pulled = statuses.index("success")  # the pull's own success, then the create's
    assert statuses[pulled - 2 : pulled] == ["verifying sha256 digest", "writing manifest"]
    assert any(line.get("total") == 2500 * MIB for line in lines[:pulled])
    assert statuses[-2:] == ["writing manifest", "success"]
    assert statuses.count("success") == 2
    assert all(LAYER.fullmatch(s) for s in statuses[pulled + 1 : -2])
    assert set(ollama.tags()) == {"small:latest", "medium:latest", "big-ctx:latest"}
    assert ollama.tags()["big-ctx:latest"]["size"] == 2500 * MIB


def test_create_from_a_model_nobody_has_ends_with_the_pull_error(ollama: Ollama) -> None:
    lines = ollama.create(model="mario", **{"from": "nowhere"})
    assert lines == [
        {"status": "pulling manifest"},
        {"error": "pull model manifest: file does not exist"},
    ]
    unstreamed = ollama.post("/api/create", {"model": "mario", "from": "nowhere", "stream": False})
    assert (unstreamed.status, unstreamed.json()) == (
        500,
        {"error": "pull model manifest: file does not exist"},
    )
    assert set(ollama.tags()) == {"small:latest"}


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({"model": "mario"}, 400, "neither 'from' or 'files' was specified"),
        ({"from": "small"}, 400, "invalid model name"),
        ({"model": "bad name", "from": "small"}, 400, "invalid model name"),
        ({"model": "mario", "from": "small", "quantize": "q8_0"}, 500,
         "quantization is only supported for F16 and F32 models"),
        ({"model": "mario", "from": "small", "system": 7}, 400,
         "json: cannot unmarshal number into Go struct field CreateRequest.system of type "
         "string"),
        ({"model": "mario", "from": "small", "parameters": [1]}, 400,
         "json: cannot unmarshal array into Go struct field CreateRequest.parameters of type "
         "map[string]interface {}"),
    ],
)  # fmt: skip
def test_create_refuses_what_ollama_refuses(
    ollama: Ollama, body: dict[str, Any], status: int, error: str
) -> None:
    for stream in (True, False):  # nothing streamed yet: the error is the whole answer
        reply = ollama.post("/api/create", {**body, "stream": stream})
        assert (reply.status, reply.json()) == (status, {"error": error})
        assert reply.content_type == "application/json; charset=utf-8"
    missing = ollama.call("POST", "/api/create")
    assert (missing.status, missing.json()) == (400, {"error": "missing request body"})
    assert set(ollama.tags()) == {"small:latest"}


# --- a created model at work: /api/generate and /api/ps ----------------------------------------


def test_generate_loads_a_created_model_with_its_num_ctx(ollama: Ollama) -> None:
    ollama.create(model="mario", **{"from": "small"}, parameters={"num_ctx": 8192})

    loaded = ollama.post("/api/generate", {"model": "mario"})
    assert loaded.status == 200
    assert (loaded.json()["model"], loaded.json()["done_reason"]) == ("mario", "load")
    [running] = ollama.ps().values()
    assert running["name"] == running["model"] == "mario:latest"
    assert running["size"] == running["size_vram"] == 1000 * MIB
    assert running["digest"] == ollama.tags()["mario:latest"]["digest"]
    assert running["context_length"] == 8192

    answer = ollama.post("/api/generate", {"model": "mario", "prompt": "hi", "stream": False})
    assert answer.status == 200 and answer.json()["response"]

    # MAX_LOADED 1: small takes mario's place, with Ollama's default context
    assert ollama.post("/api/generate", {"model": "small"}).status == 200
    assert {n: m["context_length"] for n, m in ollama.ps().items()} == {"small:latest": 4096}
    err = ollama.stderr()
    assert f"--ctx-size {8192 * 4} " in err and f"--ctx-size {4096 * 4} " in err


def test_recreating_a_loaded_model_reloads_it_with_the_new_context(ollama: Ollama) -> None:
    ollama.create(model="mario", **{"from": "small"}, parameters={"num_ctx": 8192})
    ollama.post("/api/generate", {"model": "mario"})
    ollama.create(model="mario", **{"from": "small"}, parameters={"num_ctx": 2048})

    assert ollama.ps()["mario:latest"]["context_length"] == 8192  # until it is asked for
    ollama.post("/api/generate", {"model": "mario"})
    running = ollama.ps()["mario:latest"]
    assert running["context_length"] == 2048
    assert running["digest"] == ollama.tags()["mario:latest"]["digest"]


def test_a_num_ctx_that_is_no_number_fails_the_load(ollama: Ollama) -> None:
    ollama.create(model="mario", **{"from": "small"}, parameters={"num_ctx": "lots"})
    reply = ollama.post("/api/generate", {"model": "mario", "prompt": "hi"})
    assert (reply.status, reply.json()) == (
        500,
        {"error": 'option "num_ctx" must be of type integer'},
    )
    assert ollama.ps() == {}


def test_a_created_model_too_big_for_the_gpu_fails_like_its_base(
    start_ollama: StartOllama,
) -> None:
    ollama = start_ollama(MODELS_PRESENT="big")
    ollama.create(model="huge", **{"from": "big"}, parameters={"num_ctx": 8192})
    reply = ollama.post("/api/generate", {"model": "huge"})
    assert reply.status == 500
    assert reply.json() == {
        "error": "llama runner process has terminated: cudaMalloc failed: out of memory"
    }


# --- POST /api/copy -------------------------------------------------------------------------


def test_copy_makes_the_same_model_under_another_name(ollama: Ollama) -> None:
    ollama.create(model="mario", **{"from": "small"}, parameters={"num_ctx": 8192})

    reply = ollama.post("/api/copy", {"source": "mario", "destination": "mario-backup"})
    assert (reply.status, reply.body, reply.content_type) == (200, b"", None)

    tags = ollama.tags()
    assert set(tags) == {"small:latest", "mario:latest", "mario-backup:latest"}
    assert tags["mario-backup:latest"]["digest"] == tags["mario:latest"]["digest"]
    assert tags["mario-backup:latest"]["size"] == 1000 * MIB
    copied = ollama.show("mario-backup")
    assert param_line("num_ctx", "8192") in copied["parameters"].splitlines()
    assert copied["details"]["parent_model"] == "small:latest"

    ollama.post("/api/generate", {"model": "mario-backup"})
    assert list(ollama.ps()) == ["mario-backup:latest"]
    assert ollama.ps()["mario-backup:latest"]["context_length"] == 8192


def test_copy_of_a_missing_or_unnamed_model_is_refused(ollama: Ollama) -> None:
    missing = ollama.post("/api/copy", {"source": "ghost", "destination": "x"})
    assert (missing.status, missing.json()) == (404, {"error": 'model "ghost" not found'})
    unnamed = ollama.post("/api/copy", {"source": "small"})
    assert (unnamed.status, unnamed.json()) == (400, {"error": 'destination "" is invalid'})
    no_source = ollama.post("/api/copy", {"destination": "x"})
    assert (no_source.status, no_source.json()) == (400, {"error": 'source "" is invalid'})
    assert set(ollama.tags()) == {"small:latest"}


# --- DELETE /api/delete and /api/show's errors ----------------------------------------------


def test_delete_removes_and_unloads_the_model(ollama: Ollama) -> None:
    ollama.create(model="mario", **{"from": "small"}, parameters={"num_ctx": 8192})
    ollama.post("/api/generate", {"model": "mario"})
    assert list(ollama.ps()) == ["mario:latest"]

    deleted = ollama.call("DELETE", "/api/delete", {"model": "mario"})
    assert (deleted.status, deleted.body) == (200, b"")
    assert ollama.ps() == {}
    assert set(ollama.tags()) == {"small:latest"}
    assert ollama.show("small")  # the base stays

    gone = {"error": "model 'mario' not found"}
    again = ollama.call("DELETE", "/api/delete", {"model": "mario"})
    assert (again.status, again.json()) == (404, gone)
    shown = ollama.post("/api/show", {"model": "mario"})
    assert (shown.status, shown.json()) == (404, gone)
    generate = ollama.post("/api/generate", {"model": "mario", "prompt": "hi"})
    assert (generate.status, generate.json()) == (404, gone)


def test_delete_and_show_refuse_requests_without_a_model(ollama: Ollama) -> None:
    unnamed = ollama.call("DELETE", "/api/delete", {})
    assert (unnamed.status, unnamed.json()) == (400, {"error": 'name "" is invalid'})
    assert ollama.post("/api/delete", {"model": "small"}).status == 404  # DELETE only
    shown = ollama.post("/api/show", {})
    assert (shown.status, shown.json()) == (400, {"error": "model is required"})
    no_body = ollama.call("POST", "/api/show")
    assert (no_body.status, no_body.json()) == (400, {"error": "missing request body"})
    assert set(ollama.tags()) == {"small:latest"}
