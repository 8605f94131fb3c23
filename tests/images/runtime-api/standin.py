#!/usr/bin/env python3
"""fleetd-test/runtime-api: a stand-in for the HTTP APIs of Ollama, vLLM and llama.cpp server.

One stdlib-only program (Debian bookworm's python3, 3.11) that answers the paths fleetd calls
with the real paths, JSON shapes, status codes and error wording, on a pretend GPU, and with
faults a test sets at start (environment) or at run time (POST /_fault). It runs as PID 1.

Environment (the whole interface):
  RUNTIME             required: ollama | vllm | llamacpp
  CAPACITY_MIB        required: VRAM of the pretend GPU, whole MiB
  MODEL_SIZES         optional: NAME=MiB,NAME=MiB,... the VRAM a model takes when loaded, and
                      for Ollama also its download size. A model not listed takes 0 MiB (vllm,
                      llamacpp); Ollama's registry does not know it, so pulling it fails
  PORT                optional: default 11434 (ollama), 8000 (vllm), 8080 (llamacpp)
  TOKENS_PER_S        optional: generation speed, really slept and reported in the timings
                      (default 50; decimals allowed); prompts are read 10 times as fast
  LOAD_DELAY_S        optional: seconds a model takes to load (default 0; decimals allowed).
                      ollama: added to each load (load_duration); llamacpp: everything but
                      /v1/models answers 503 "Loading model" until then; vllm: the port is not
                      listened on until then, so connections are refused (vLLM binds its socket
                      before loading but listens only once the engine is up)
  ollama only:
  MODELS_PRESENT      optional: comma list of models already downloaded ("x" means "x:latest")
  PULL_MIB_PER_S      optional: download speed of /api/pull (default 10000; decimals allowed)
  MAX_LOADED          optional: models kept loaded at once, like OLLAMA_MAX_LOADED_MODELS
                      (default 1); loading one more unloads the least recently used first
  vllm and llamacpp only:
  MODEL_FROM_ENV      optional: 1 = the served model is $MODEL (fleetd's env hand-off);
                      otherwise it is the first line of /run/fleetd/model (the file hand-off)
  MODEL               the served model when MODEL_FROM_ENV=1
  faults at start (the same keys as POST /_fault, see below):
  FAULT_PULL_FAIL_AT, FAULT_GENERATE_DELAY_S, FAULT_HEALTH, FAULT_DOWN

Test-only paths, on every runtime, never in the real programs:
  GET /_fault         200 with the current faults as a JSON object
  POST /_fault        a JSON object setting any of these keys (null clears one); answers the
                      new set, or 400 {"error": ...} naming a bad key or value:
    pull_fail_at      0..1: /api/pull streams progress up to this fraction of the model's
                      blob, then {"error": "max retries exceeded: unexpected EOF"}, and the
                      model is not present afterwards (ollama)
    generate_delay_s  seconds slept before each generation (warm-up slower than a timeout)
    health            a cycle such as "ok,ok,fail" (or a list), one entry per health probe:
                      GET /health (vllm: 503 empty; llamacpp: 503 "Loading model"), GET or
                      HEAD / and GET /api/version (ollama: 500 {"error": ...}); setting it
                      restarts the cycle
    down              "hang": accept, read the request, never answer (until cleared, then
                      close); "close": close the connection without an answer. /_fault
                      itself always answers

Endpoints:
  ollama    GET|HEAD /, GET /api/version, GET /api/tags, GET /api/ps, POST /api/pull,
            POST /api/generate, POST /api/chat, POST /api/create, POST /api/copy,
            DELETE /api/delete, POST /api/show
  vllm      GET /health, GET /version, GET /v1/models, POST /v1/completions
  llamacpp  GET /health (/v1/health), GET /v1/models (/models), POST /completion,
            POST /v1/completions
  Streaming: /api/pull, /api/create, /api/generate and /api/chat stream NDJSON unless
  "stream": false; vllm and llamacpp answer non-streamed only. An error line ends a stream;
  an error before any line is the whole answer, {"error"} with its status.

Ollama's models: each one present is a manifest of layers (weights, template, parameters,
and what /api/create adds: system, license, messages), every pulled model a Llama-3-shaped
GGUF with the Llama 3 template and its stop parameters.
  /api/create   {"model", "from", "parameters", "system", "template", "license",
                "messages", "stream"}: a new model on the weights of `from` (its VRAM size
                too), its parameters merged over those of `from`. A `from` not present is
                pulled first, as Ollama does, its pull lines and "success" included; one the
                registry (MODEL_SIZES) does not know ends in the pull's error. "files" and
                "adapters" need blobs the stand-in does not keep: 400; "quantize" fails as
                on any Q4_K_M model
  /api/copy     {"source", "destination"}: 200 with no body; 404 {"error": 'model "x" not
                found'}
  /api/delete   {"model"}: 200 with no body, the model unloaded first if loaded (what
                `ollama rm` does before it calls DELETE); 404 {"error": "model 'x' not found"}
  /api/show     {"model", "system"}: modelfile, parameters ("%-30s %#v" lines, keys sorted
                where Go's map order is random), template, system, details (parent_model:
                the `from` a model was created from), messages, model_info, tensors,
                capabilities, modified_at; "verbose" is answered as without it
  A model's num_ctx (default 4096, OLLAMA_CONTEXT_LENGTH's) is the context it loads with:
  /api/ps reports it as context_length (a field of Ollama 0.10.0 and later) and the runner
  start line as --ctx-size, 4 parallel slots of it. A created model loads under its own name
  and digest; re-creating a loaded one reloads it on its next request.

Outcomes:
  a model that does not fit (more than CAPACITY_MIB less what stays loaded)
    ollama    the request answers 500 {"error": "llama runner process has terminated:
              cudaMalloc failed: out of memory"} and the same two out-of-memory lines as
              fleetd-test/oom-emitter go to stderr; the server keeps serving
    vllm, llamacpp  their out-of-memory output (as fleetd-test/oom-emitter prints it) and
              exit 1 after LOAD_DELAY_S
  bad configuration   "standin: <what>" on stderr, exit 2
  SIGTERM/SIGINT      exit 0 at once
Each request also prints one line to stdout, "standin: <METHOD> <path> <status>" (or
"down=hang" / "down=close"), so a test sees what was called, in order.

Where the API facts come from:
  Ollama  ollama/ollama docs/api.md (paths, request fields, /api/pull stream, /api/generate
          fields, load with an empty prompt, unload with keep_alive 0 and done_reason
          "unload", /api/ps and /api/tags fields); docs.ollama.com/api/errors.md and
          docs.ollama.com/api-reference/get-version.md (error body {"error"}, status codes,
          errors mid-stream, /api/version); ollama/ollama server/routes.go
          (GenerateHandler: 404 "model 'x' not found", done_reason "load"; ChatHandler and
          handleScheduleError: 404 `model "x" not found, try pulling it first`, other
          scheduling errors 500; PsHandler sorting; ListHandler: newest first; waitForStream:
          500 for a non-streamed failure; streamResponse: an error ends the stream;
          CopyHandler, DeleteHandler, ShowHandler and GetModelInfo: fields, 400 'source "x" is
          invalid', "model is required", 404 wording, the parameters text and modelfile
          header); server/create.go (CreateHandler, createModel, setParameters merging over
          the base's: "using existing layer" / "creating new layer sha256:<hex>", "writing
          manifest", "success"; "neither 'from' or 'files' was specified"); server/model.go
          (parseFromModel pulls a missing base); server/images.go (Model.String: the
          modelfile, Capabilities); parser/parser.go (modelfile quoting); api/types.go
          (CreateRequest, CopyRequest, DeleteRequest, ShowRequest, ShowResponse,
          ProcessModelResponse.context_length, added in v0.10.0 by #11331 as num_ctx per
          parallel slot); envconfig/config.go (OLLAMA_CONTEXT_LENGTH 4096); cmd/cmd.go
          (DeleteHandler unloads before deleting); server/download.go (progress "pulling
          <12 hex>" every 60 ms with digest, total, completed); server/images.go (verifying
          sha256 digest, writing manifest, success); llm/status.go (the runner's
          "cudaMalloc failed" line becomes the error);
          github.com/ollama/ollama/issues/9782 ("Error: llama runner process has terminated:
          cudaMalloc failed: out of memory"); issues/1158 and /1668 ("max retries exceeded:
          unexpected EOF" ending a pull)
  vLLM    vllm-project/vllm vllm/entrypoints/openai/api_server.py (create_server_socket
          binds without listening before the engine starts; /health 200 empty, 503 only
          when the engine is dead) and vllm/entrypoints/openai/protocol.py (ModelCard,
          CompletionResponse, UsageInfo, ErrorResponse; "The model `x` does not exist.",
          NotFoundError 404)
  llama.cpp  ggml-org/llama.cpp tools/server/README.md (/health 200 {"status": "ok"} or
          503 {"error": {"code": 503, "message": "Loading model", "type":
          "unavailable_error"}}; /completion options and response) and
          tools/server/server-task.cpp (result_timings::to_json, the OAI completion shape)
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import urlsplit

MODEL_FILE = "/run/fleetd/model"
DEFAULT_PORT = {"ollama": 11434, "vllm": 8000, "llamacpp": 8080}
OLLAMA_VERSION = "0.6.8"
VLLM_VERSION = "0.8.5"
LLAMACPP_BUILD = "b5478-f5cd27b7"
GPU_NAME = "NVIDIA GeForce RTX 3090"
MIB = 1024 * 1024
DEFAULT_REPLY_TOKENS = 12  # a reply that ends by itself (EOS) when no limit is asked
PROMPT_SPEEDUP = 10  # prompt tokens are read this many times faster than generated
PULL_TICK_S = 0.06  # Ollama reports download progress every 60 ms
VLLM_MAX_MODEL_LEN = 8192
KEEP_ALIVE_DEFAULT_S = 300.0
DEFAULT_NUM_CTX = 4096  # Ollama's OLLAMA_CONTEXT_LENGTH default
NUM_PARALLEL = 4  # the slots Ollama 0.6.8 runs a model with when it fits
OLLAMA_BLOBS = "/root/.ollama/models/blobs"
LLAMA3_TEMPLATE = (
    "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>"
    "{{ end }}{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}"
    "<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}"
    "<|eot_id|>"
)
LLAMA3_STOP = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven")


class ConfigError(Exception):
    """A bad environment value; the message says which and why."""


class FaultError(ValueError):
    """A bad fault key or value, from the environment or POST /_fault."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key} {problem}")
        self.key = key
        self.problem = problem


class ApiError(Exception):
    """An answer other than success, with the status and body the real runtime sends."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"{status} {body}")
        self.status = status
        self.body = body


# --- output -------------------------------------------------------------------------------


def out(line: str) -> None:
    print(line, flush=True)


def err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def ollama_time() -> str:
    """The time= field of Ollama's slog lines: UTC, milliseconds."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


def vllm_time() -> str:
    return time.strftime("%m-%d %H:%M:%S")


def go_time(ns: int | None = None) -> str:
    """A UTC instant as Go's time.RFC3339Nano writes it (the fraction without trailing 0s)."""
    ns = time.time_ns() if ns is None else ns
    seconds, fraction = divmod(ns, 1_000_000_000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    digits = f"{fraction:09d}".rstrip("0")
    return f"{stamp}.{digits}Z" if digits else f"{stamp}Z"


def gib2(mib: int) -> str:
    return f"{mib // 1024}.{mib % 1024 * 100 // 1024:02d}"


def gib1(mib: int) -> str:
    return f"{mib // 1024}.{mib % 1024 * 10 // 1024}"


def torch_size(mib: int) -> str:
    return f"{gib2(mib)} GiB" if mib >= 1024 else f"{mib}.00 MiB"


# --- configuration ------------------------------------------------------------------------


def env_uint(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw and default is not None:
        return default
    if not raw.isdigit():
        raise ConfigError(f"{name} must be a whole number (got '{raw}')")
    return int(raw)


def env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a non-negative number (got '{raw}')")
    return value


def parse_sizes(raw: str, normalise: Callable[[str], str]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for entry in (e.strip() for e in raw.split(",")):
        if not entry:
            continue
        name, sep, size = entry.rpartition("=")
        if not sep or not name.strip() or not size.strip().isdigit():
            raise ConfigError(f"MODEL_SIZES entry '{entry}' is not NAME=MiB")
        sizes[normalise(name.strip())] = int(size.strip())
    return sizes


def served_model() -> str:
    """The model handed off to a single-model runtime, as fleetd-test/oom-emitter reads it."""
    if os.environ.get("MODEL_FROM_ENV") == "1":
        name = os.environ.get("MODEL", "")
    else:
        try:
            with open(MODEL_FILE, encoding="utf-8") as f:
                name = f.readline()
        except OSError:
            name = ""
    return name.strip()


def ollama_name(name: str) -> str:
    """Ollama's full name for a model: the tag defaults to "latest"."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


@dataclass
class Config:
    runtime: str
    capacity_mib: int
    sizes: dict[str, int]
    port: int
    tokens_per_s: float
    load_delay_s: float
    models_present: list[str]
    pull_mib_per_s: float
    max_loaded: int
    model: str


def load_config() -> Config:
    runtime = os.environ.get("RUNTIME", "")
    if runtime not in DEFAULT_PORT:
        raise ConfigError(f"RUNTIME must be one of ollama, vllm, llamacpp (got '{runtime}')")
    normalise = ollama_name if runtime == "ollama" else str.strip
    tokens_per_s = env_seconds("TOKENS_PER_S", 50.0)
    pull_mib_per_s = env_seconds("PULL_MIB_PER_S", 10000.0)
    if tokens_per_s <= 0 or pull_mib_per_s <= 0:
        raise ConfigError("TOKENS_PER_S and PULL_MIB_PER_S must be above 0")
    config = Config(
        runtime=runtime,
        capacity_mib=env_uint("CAPACITY_MIB"),
        sizes=parse_sizes(os.environ.get("MODEL_SIZES", ""), normalise),
        port=env_uint("PORT", DEFAULT_PORT[runtime]),
        tokens_per_s=tokens_per_s,
        load_delay_s=env_seconds("LOAD_DELAY_S", 0.0),
        models_present=[
            ollama_name(n.strip()) for n in os.environ.get("MODELS_PRESENT", "").split(",")
        ],
        pull_mib_per_s=pull_mib_per_s,
        max_loaded=env_uint("MAX_LOADED", 1),
        model="" if runtime == "ollama" else served_model(),
    )
    config.models_present = [n for n in config.models_present if n != ":latest"]
    if config.max_loaded < 1:
        raise ConfigError("MAX_LOADED must be 1 or more")
    if runtime != "ollama" and not config.model:
        raise ConfigError("no model handed off")
    return config


# --- faults -------------------------------------------------------------------------------


class Faults:
    """The faults in force; read by request threads, changed by POST /_fault."""

    KEYS = ("pull_fail_at", "generate_delay_s", "health", "down")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.pull_fail_at: float | None = None
        self.generate_delay_s = 0.0
        self.health: list[str] = []
        self.down = ""
        self._probes = 0

    def from_env(self) -> None:
        values: dict[str, Any] = {}
        for key in self.KEYS:
            raw = os.environ.get(f"FAULT_{key.upper()}", "").strip()
            if raw:
                values[key] = raw if key in ("health", "down") else _number(raw, key)
        try:
            self.update(values)
        except FaultError as e:
            raise ConfigError(f"FAULT_{e.key.upper()} {e.problem}") from e

    def update(self, values: dict[str, Any]) -> None:
        """Validate every value first, then apply them all; FaultError names a bad one."""
        parsed = {key: self._parse(key, value) for key, value in values.items()}
        with self._lock:
            for key, value in parsed.items():
                setattr(self, key, value)
                if key == "health":
                    self._probes = 0

    @staticmethod
    def _parse(key: str, value: Any) -> Any:
        if key == "pull_fail_at":
            if value is None:
                return None
            if not _is_number(value) or not 0 <= value <= 1:
                raise FaultError(key, f"must be a number from 0 to 1 (got {value!r})")
            return float(value)
        if key == "generate_delay_s":
            if value is None:
                return 0.0
            if not _is_number(value) or value < 0:
                raise FaultError(key, f"must be seconds, 0 or more (got {value!r})")
            return float(value)
        if key == "health":
            return _health_cycle(value)
        if key == "down":
            if value in (None, "", "hang", "close"):
                return value or ""
            raise FaultError(key, f'must be "hang", "close" or "" (got {value!r})')
        raise FaultError(key, f"is no fault (known: {', '.join(Faults.KEYS)})")

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "pull_fail_at": self.pull_fail_at,
                "generate_delay_s": self.generate_delay_s,
                "health": ",".join(self.health),
                "down": self.down,
            }

    def probe_ok(self) -> bool:
        """The next entry of the health cycle (no cycle: healthy)."""
        with self._lock:
            if not self.health:
                return True
            entry = self.health[self._probes % len(self.health)]
            self._probes += 1
            return entry == "ok"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _number(raw: str, key: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"FAULT_{key.upper()} must be a number (got '{raw}')") from None


def _health_cycle(value: Any) -> list[str]:
    if value is None:
        return []
    entries = value.split(",") if isinstance(value, str) else value
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise FaultError("health", f'must be a string like "ok,fail" or a list (got {value!r})')
    cycle = [e.strip() for e in entries if e.strip()]
    if any(e not in ("ok", "fail") for e in cycle):
        raise FaultError("health", f'entries must be "ok" or "fail" (got {value!r})')
    return cycle


# --- the HTTP side ------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    """One request: the fault gate, then the runtime's route for (method, path)."""

    protocol_version = "HTTP/1.1"
    body = b""
    server: Server

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_HEAD = do_DELETE = do_PUT = do_GET

    @property
    def route_path(self) -> str:
        return urlsplit(self.path).path

    def _dispatch(self) -> None:
        # Read the whole body first: one left unread would be taken for the next request.
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length > 0 else b""
        app = self.server.app
        if self.route_path != "/_fault" and app.faults.down:
            self._go_down(app.faults)
            return
        try:
            app.route(self)
        except ApiError as e:
            self.reply_json(e.status, e.body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _go_down(self, faults: Faults) -> None:
        mode = faults.down
        out(f"standin: {self.command} {self.path} down={mode}")
        while mode == "hang" and faults.down == "hang":
            time.sleep(0.05)
        self.close_connection = True

    # Replaces the default access log (stderr, Apache style) with one stdout line a request.
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        out(f"standin: {self.command} {self.path} {code}")

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def reply(self, status: int, body: bytes, content_type: str | None) -> None:
        self.send_response(status)
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def reply_json(self, status: int, document: Any) -> None:
        self.reply(status, json.dumps(document).encode(), "application/json; charset=utf-8")

    def reply_text(self, status: int, text: str) -> None:
        self.reply(status, text.encode(), "text/plain; charset=utf-8")

    def stream_ndjson(self, documents: Iterator[dict[str, Any]]) -> None:
        """Chunked application/x-ndjson, one object a line, flushed as each comes."""
        # Like Go's net/http, the status line goes out with the first object, not before.
        first = next(documents, None)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for document in itertools.chain([] if first is None else [first], documents):
            line = json.dumps(document).encode() + b"\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, app: Runtime) -> None:
        self.app = app
        super().__init__(("0.0.0.0", port), Handler)


# --- what every runtime shares ------------------------------------------------------------

Route = Callable[[Handler], None]


class Runtime:
    """Routes, faults and the generation every stand-in shares."""

    def __init__(self, config: Config, faults: Faults) -> None:
        self.config = config
        self.faults = faults
        self.routes: dict[tuple[str, str], Route] = {
            ("GET", "/_fault"): self.get_fault,
            ("POST", "/_fault"): self.post_fault,
        }

    def route(self, h: Handler) -> None:
        handler = self.routes.get((h.command, h.route_path))
        if handler is None:
            self.not_found(h)
        else:
            handler(h)

    def not_found(self, h: Handler) -> None:
        h.reply_text(404, "404 page not found")

    def get_fault(self, h: Handler) -> None:
        h.reply_json(200, self.faults.snapshot())

    def post_fault(self, h: Handler) -> None:
        try:
            values = json.loads(h.body or b"null")
        except ValueError as e:
            raise ApiError(400, {"error": f"_fault: invalid JSON: {e}"}) from None
        if not isinstance(values, dict):
            raise ApiError(400, {"error": "_fault: the body must be a JSON object"})
        try:
            self.faults.update(values)
        except FaultError as e:
            raise ApiError(400, {"error": f"_fault: {e}"}) from None
        h.reply_json(200, self.faults.snapshot())

    def need_mib(self, model: str) -> int:
        return self.config.sizes.get(model, 0)

    def start_generation(self, prompt: str, limit: int | None) -> Generation:
        """A generation of `limit` tokens (none: a short reply), after any injected delay."""
        delay_s = self.faults.generate_delay_s
        if delay_s:
            time.sleep(delay_s)
        hit_limit = limit is not None and limit > 0
        return Generation(
            prompt_n=max(1, len(prompt.split())),
            count=limit if limit is not None and hit_limit else DEFAULT_REPLY_TOKENS,
            hit_limit=hit_limit,
            tokens_per_s=self.config.tokens_per_s,
        )

    def generate(self, prompt: str, limit: int | None) -> Generation:
        """A whole generation, its time really spent."""
        gen = self.start_generation(prompt, limit)
        for _ in gen.run():
            pass
        return gen

    def run(self) -> None:
        """Serve until SIGTERM."""
        Server(self.config.port, self).serve_forever()


@dataclass
class Generation:
    """Tokens produced at TOKENS_PER_S in real time, and the durations measured doing it."""

    prompt_n: int
    count: int
    hit_limit: bool
    tokens_per_s: float
    prompt_ns: int = 0
    eval_ns: int = 0
    tokens: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    def run(self) -> Iterator[str]:
        """Read the prompt, then yield each token when it is due; the timings fill in."""
        start = time.perf_counter_ns()
        time.sleep(self.prompt_n / (self.tokens_per_s * PROMPT_SPEEDUP))
        self.prompt_ns = time.perf_counter_ns() - start
        start = time.perf_counter_ns()
        for i in range(self.count):
            time.sleep(1 / self.tokens_per_s)
            token = WORDS[i % len(WORDS)]
            self.tokens.append(token if i == 0 else f" {token}")
            yield self.tokens[-1]
        self.eval_ns = time.perf_counter_ns() - start


def json_body(h: Handler, missing: str = "missing request body") -> dict[str, Any]:
    raw = h.body
    if not raw.strip():
        raise ApiError(400, {"error": missing})
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise ApiError(400, {"error": f"invalid JSON: {e}"}) from None
    if not isinstance(body, dict):
        raise ApiError(400, {"error": "the body must be a JSON object"})
    return body


def int_option(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# --- Ollama -------------------------------------------------------------------------------


@dataclass
class Loaded:
    name: str
    size_mib: int
    expires_at: float  # epoch seconds; math.inf: kept loaded forever
    last_used: float  # monotonic, for least-recently-used eviction
    digest: str  # of the manifest it was loaded from: a re-created model reloads
    context_length: int


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def go_json(value: Any) -> str:
    """What Go's json.Encoder writes: compact, map keys sorted, <>& escaped, a newline."""
    text = json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escape)
    return text + "\n"


@dataclass
class Present:
    """A model on disk: what the layers of its manifest hold."""

    name: str
    size_mib: int
    modified_ns: int
    weights: str  # sha256 hex of the GGUF blob; a created model shares its base's
    template: str = LLAMA3_TEMPLATE
    parameters: dict[str, Any] = field(default_factory=lambda: {"stop": list(LLAMA3_STOP)})
    system: str = ""
    licenses: list[str] = field(default_factory=list)
    messages: list[dict[str, str]] = field(default_factory=list)
    parent_model: str = ""  # the model it was created from

    def layers(self) -> list[tuple[str, int]]:
        """(sha256 hex, bytes) of each layer, in the order createModel leaves them."""
        texts = [self.template, *([self.system] if self.system else []), *self.licenses]
        texts += [go_json(self.parameters)] if self.parameters else []
        texts += [go_json(self.messages)] if self.messages else []
        blobs = [(sha256_hex(t), len(t.encode())) for t in texts]
        return [(self.weights, self.size_mib * MIB), *blobs]

    @property
    def digest(self) -> str:
        """The manifest's: the same layers (a copy) have the same digest."""
        return sha256_hex(" ".join(blob for blob, _ in self.layers()))

    @property
    def num_ctx(self) -> int:
        """The context it loads with; ApiError 500 as Ollama's options check answers."""
        value = self.parameters.get("num_ctx")
        if value is None:
            return DEFAULT_NUM_CTX
        if not _is_number(value):
            raise ApiError(500, {"error": 'option "num_ctx" must be of type integer'})
        return int(value)


def weights_blob(name: str) -> str:
    """The sha256 hex of a registry model's GGUF blob."""
    return sha256_hex(f"{name}/model")


def parameter_count(size_mib: int) -> int:
    return int(size_mib * MIB / 0.6)  # about 0.6 bytes a parameter at Q4_K_M


def details(size_mib: int, parent_model: str = "") -> dict[str, Any]:
    return {
        "parent_model": parent_model,
        "format": "gguf",
        "family": "llama",
        "families": ["llama"],
        "parameter_size": f"{parameter_count(size_mib) / 1e9:.1f}B",
        "quantization_level": "Q4_K_M",
    }


# --- Ollama: what /api/show reports of a model -------------------------------------------

LLAMA3_SHAPE: dict[str, Any] = {  # Llama 3 8B's GGUF metadata, whatever the model's size
    "llama.attention.head_count": 32,
    "llama.attention.head_count_kv": 8,
    "llama.attention.layer_norm_rms_epsilon": 1e-05,
    "llama.block_count": 32,
    "llama.context_length": 131072,
    "llama.embedding_length": 4096,
    "llama.feed_forward_length": 14336,
    "llama.rope.dimension_count": 128,
    "llama.rope.freq_base": 500000,
    "llama.vocab_size": 128256,
}


def model_info(size_mib: int) -> dict[str, Any]:
    """GGUF metadata as /api/show lists it, long arrays emptied as without "verbose"."""
    return {
        "general.architecture": "llama",
        "general.file_type": 15,  # Q4_K_M
        "general.parameter_count": parameter_count(size_mib),
        "general.quantization_version": 2,
        **LLAMA3_SHAPE,
        "tokenizer.ggml.bos_token_id": 128000,
        "tokenizer.ggml.eos_token_id": 128009,
        "tokenizer.ggml.merges": [],
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.token_type": [],
        "tokenizer.ggml.tokens": [],
    }


def tensors() -> list[dict[str, Any]]:
    """The tensors of a Q4_K_M Llama 3 8B GGUF: name, type, shape."""
    embd, ffn, kv, vocab = 4096, 14336, 1024, 128256
    block = [
        ("attn_norm", "F32", [embd]), ("attn_q", "Q4_K", [embd, embd]),
        ("attn_k", "Q4_K", [embd, kv]), ("attn_v", "Q6_K", [embd, kv]),
        ("attn_output", "Q4_K", [embd, embd]), ("ffn_norm", "F32", [embd]),
        ("ffn_gate", "Q4_K", [embd, ffn]), ("ffn_up", "Q4_K", [embd, ffn]),
        ("ffn_down", "Q6_K", [ffn, embd]),
    ]  # fmt: skip
    rows = [("token_embd.weight", "Q4_K", [embd, vocab])]
    for i in range(LLAMA3_SHAPE["llama.block_count"]):
        rows += [(f"blk.{i}.{name}.weight", kind, shape) for name, kind, shape in block]
    rows += [("output_norm.weight", "F32", [embd]), ("output.weight", "Q6_K", [embd, vocab])]
    return [{"name": name, "type": kind, "shape": shape} for name, kind, shape in rows]


def go_number(value: float) -> str:
    """A float64 as Go's %v writes it: shortest digits, e-notation below 1e-4 or from 1e6."""
    number = Decimal(repr(float(value))).normalize()
    if -4 <= number.adjusted() < 6:
        return f"{number:f}"
    mantissa, _, power = f"{number:e}".partition("e")
    return f"{mantissa}e{power[0]}{int(power[1:]):02d}"


def go_text(value: Any, quoted: bool) -> str:
    """A decoded JSON value as Go's %#v (quoted) or %v writes it."""
    if isinstance(value, bool):
        return str(value).lower()
    if _is_number(value):
        return go_number(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False) if quoted else value
    return "<nil>" if value is None else json.dumps(value)


def parameter_values(parameters: dict[str, Any]) -> list[tuple[str, Any]]:
    """(key, value) for each parameter, one a list entry; keys sorted."""
    pairs: list[tuple[str, Any]] = []
    for key in sorted(parameters):
        value = parameters[key]
        pairs += [(key, v) for v in value] if isinstance(value, list) else [(key, value)]
    return pairs


def modelfile_quote(text: str) -> str:
    """parser.quote: quotes only a value a Modelfile line could not hold bare."""
    if "\n" in text or text.startswith(" ") or text.endswith(" "):
        return f'"""{text}"""' if '"' in text else f'"{text}"'
    return text


def modelfile(model: Present, system: str) -> str:
    """The Modelfile /api/show reports (Model.String under its two comment lines)."""
    lines = [
        '# Modelfile generated by "ollama show"',
        "# To build a new Modelfile based on this, replace FROM with:",
        f"# FROM {model.name}",
        "",
        f"FROM {OLLAMA_BLOBS}/sha256-{model.weights}",
        f"TEMPLATE {modelfile_quote(model.template)}",
    ]
    lines += [f"SYSTEM {modelfile_quote(system)}"] if system else []
    lines += [
        f"PARAMETER {key} {modelfile_quote(go_text(value, quoted=False))}"
        for key, value in parameter_values(model.parameters)
    ]
    lines += [f"LICENSE {modelfile_quote(text)}" for text in model.licenses]
    lines += [f"MESSAGE {m['role']} {modelfile_quote(m['content'])}" for m in model.messages]
    return "\n".join(lines) + "\n"


def show_document(model: Present, system: str = "") -> dict[str, Any]:
    """POST /api/show's answer; `system` (the request's) replaces the model's own."""
    system = system or model.system
    capabilities = ["completion"]
    capabilities += ["tools"] if re.search(r"\.Tools\b", model.template) else []
    capabilities += ["insert"] if re.search(r"\.Suffix\b", model.template) else []
    document: dict[str, Any] = {
        "license": "\n".join(model.licenses),
        "modelfile": modelfile(model, system),
        "parameters": "\n".join(
            f"{key:<30} {go_text(value, quoted=True)}"
            for key, value in parameter_values(model.parameters)
        ),
        "template": model.template,
        "system": system,
        "details": details(model.size_mib, model.parent_model),
        "messages": model.messages,
        "model_info": model_info(model.size_mib),
        "tensors": tensors(),
        "capabilities": capabilities,
        "modified_at": go_time(model.modified_ns),
    }
    # Go's omitempty: no key for an empty string or list
    return {k: v for k, v in document.items() if v not in ("", [])}


# --- Ollama: the bodies of /api/create, /api/copy, /api/delete -----------------------------

_NAME = re.compile(r"(?:[A-Za-z0-9][\w.-]*/){0,2}[A-Za-z0-9][\w.-]{0,79}(?::\w[\w.-]{0,79})?")
_JSON_KINDS = {str: "string", bool: "bool", int: "number", float: "number", list: "array"}


def valid_name(name: str) -> bool:
    """[host/][namespace/]model[:tag], as model.ParseName accepts it."""
    return _NAME.fullmatch(name) is not None


def go_field(body: dict[str, Any], key: str, want: type, go_type: str, struct: str) -> Any:
    """body[key] when its JSON type is what Go's binding wants (null: absent), else 400."""
    value = body.get(key)
    if value is None or isinstance(value, want):
        return value
    kind = _JSON_KINDS.get(type(value), "object")
    message = f"json: cannot unmarshal {kind} into Go struct field {struct}.{key} of type {go_type}"
    raise ApiError(400, {"error": message})


@dataclass
class CreateRequest:
    """A checked POST /api/create body: a new model on the layers of `base`."""

    name: str
    base: str
    template: str
    system: str
    parameters: dict[str, Any]
    licenses: list[str]
    messages: list[dict[str, str]]
    quantize: str

    def model(self, base: Present) -> Present:
        """What createModel writes: `base`'s layers, these replacing or merged over them."""
        return Present(
            name=self.name,
            size_mib=base.size_mib,
            modified_ns=time.time_ns(),
            weights=base.weights,
            template=self.template or base.template,
            parameters={**base.parameters, **self.parameters},
            system=self.system or base.system,
            licenses=base.licenses + self.licenses,
            messages=self.messages or base.messages,
            parent_model=base.name,
        )


CREATE_FIELDS: dict[str, tuple[type, str]] = {
    "model": (str, "string"),
    "name": (str, "string"),
    "from": (str, "string"),
    "template": (str, "string"),
    "system": (str, "string"),
    "quantize": (str, "string"),
    "quantization": (str, "string"),
    "stream": (bool, "bool"),
    "parameters": (dict, "map[string]interface {}"),
    "messages": (list, "[]api.Message"),
    "files": (dict, "map[string]string"),
    "adapters": (dict, "map[string]string"),
}


def parse_create(body: dict[str, Any]) -> CreateRequest:
    """The request, or ApiError 400 with CreateHandler's answer, in its order of checks."""
    fields = {k: go_field(body, k, *kind, "CreateRequest") for k, kind in CREATE_FIELDS.items()}
    if fields["files"] or fields["adapters"]:
        raise ApiError(400, {"error": 'standin: no blobs are kept here, create "from" a model'})
    name = fields["model"] or fields["name"] or ""
    base = fields["from"] or ""
    if not valid_name(name) or (base and not valid_name(base)):
        raise ApiError(400, {"error": "invalid model name"})
    if not base:
        raise ApiError(400, {"error": "neither 'from' or 'files' was specified"})
    return CreateRequest(
        name=ollama_name(name),
        base=ollama_name(base),
        template=fields["template"] or "",
        system=fields["system"] or "",
        parameters=fields["parameters"] or {},
        licenses=_licenses(body.get("license")),
        messages=_messages(fields["messages"] or []),
        quantize=fields["quantize"] or fields["quantization"] or "",
    )


def _licenses(value: Any) -> list[str]:
    """CreateRequest.license: a string or a list of them."""
    if value is None:
        return []
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise ApiError(400, {"error": f"license must be a string or a list of them: {value!r}"})
    return [t for t in texts if t]


def _messages(value: list[Any]) -> list[dict[str, str]]:
    fine = all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    )
    if not fine:
        raise ApiError(400, {"error": "messages: each must have a string role and content"})
    return [{"role": m["role"], "content": m["content"]} for m in value]


_GO_DURATION = re.compile(r"([0-9]*\.?[0-9]+)(ns|us|µs|ms|s|m|h)")
_GO_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_s(value: Any) -> float:
    """Ollama's keep_alive: seconds as a number, or a Go duration; negative keeps forever."""
    if value is None:
        return KEEP_ALIVE_DEFAULT_S
    if _is_number(value):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _go_duration_s(value)
    else:
        raise ApiError(400, {"error": f"invalid keep_alive {json.dumps(value)}"})
    return math.inf if seconds < 0 else seconds


def _go_duration_s(text: str) -> float:
    sign, rest = (-1.0, text[1:]) if text.startswith("-") else (1.0, text.lstrip("+"))
    if rest == "0":
        return 0.0
    parts = _GO_DURATION.findall(rest)
    if not parts or "".join(n + u for n, u in parts) != rest:
        raise ApiError(400, {"error": f'time: invalid duration "{text}"'})
    return sign * sum(float(n) * _GO_UNIT_S[u] for n, u in parts)


class Ollama(Runtime):
    """ollama serve: a registry of present models and a scheduler of loaded ones."""

    OOM_ERROR = "llama runner process has terminated: cudaMalloc failed: out of memory"

    def __init__(self, config: Config, faults: Faults) -> None:
        super().__init__(config, faults)
        self.lock = threading.Lock()  # guards present and loaded
        self.load_lock = threading.Lock()  # one load at a time, as Ollama's scheduler does
        stamp = time.time_ns()
        self.present = {
            n: Present(n, self.need_mib(n), stamp, weights_blob(n))
            for n in dict.fromkeys(config.models_present)
        }
        self.loaded: dict[str, Loaded] = {}
        self.routes.update(
            {
                ("GET", "/"): self.root,
                ("HEAD", "/"): self.root,
                ("GET", "/api/version"): self.version,
                ("GET", "/api/tags"): self.tags,
                ("GET", "/api/ps"): self.ps,
                ("POST", "/api/pull"): self.pull,
                ("POST", "/api/generate"): self.generate_route,
                ("POST", "/api/chat"): self.chat_route,
                ("POST", "/api/create"): self.create,
                ("POST", "/api/copy"): self.copy,
                ("DELETE", "/api/delete"): self.delete,
                ("POST", "/api/show"): self.show,
            }
        )

    def run(self) -> None:
        port = self.config.port
        capacity = self.config.capacity_mib
        err(
            f"time={ollama_time()} level=INFO source=routes.go:1300 "
            f'msg="Listening on [::]:{port} (version {OLLAMA_VERSION})"'
        )
        err(f'time={ollama_time()} level=INFO source=gpu.go:217 msg="looking for compatible GPUs"')
        err(
            f'time={ollama_time()} level=INFO source=types.go:130 msg="inference compute" '
            "id=GPU-5f3e9c1a-2b7d-4e61-9a0c-3d8f1b6e4c27 library=cuda variant=v12 compute=8.6 "
            f'driver=12.4 name="{GPU_NAME}" total="{gib1(capacity)} GiB" '
            f'available="{gib1(max(capacity - 300, 0))} GiB"'
        )
        super().run()

    # health probes: GET|HEAD / and GET /api/version
    def _probe(self, h: Handler) -> bool:
        if self.faults.probe_ok():
            return True
        h.reply_json(500, {"error": "injected fault: health"})
        return False

    def root(self, h: Handler) -> None:
        if self._probe(h):
            h.reply_text(200, "Ollama is running")

    def version(self, h: Handler) -> None:
        if self._probe(h):
            h.reply_json(200, {"version": OLLAMA_VERSION})

    def tags(self, h: Handler) -> None:
        with self.lock:
            # newest first, by the second (ListHandler compares Unix seconds, stably)
            present = sorted(self.present.values(), key=lambda p: -(p.modified_ns // 10**9))
            models = [
                {
                    "name": p.name,
                    "model": p.name,
                    "modified_at": go_time(p.modified_ns),
                    "size": p.size_mib * MIB,
                    "digest": p.digest,
                    "details": details(p.size_mib),
                }
                for p in present
            ]
        h.reply_json(200, {"models": models})

    def ps(self, h: Handler) -> None:
        with self.lock:
            self._expire()
            running = sorted(self.loaded.values(), key=lambda m: -m.expires_at)
            models = [self._ps_entry(m) for m in running]
        h.reply_json(200, {"models": models})

    @staticmethod
    def _ps_entry(m: Loaded) -> dict[str, Any]:
        if math.isinf(m.expires_at):  # Go adds its largest duration to now
            expires_ns = time.time_ns() + (2**63 - 1)
        else:
            expires_ns = int(m.expires_at * 1e9)
        return {
            "name": m.name,
            "model": m.name,
            "size": m.size_mib * MIB,
            "digest": m.digest,
            "details": details(m.size_mib),
            "expires_at": go_time(expires_ns),
            "size_vram": m.size_mib * MIB,
            "context_length": m.context_length,
        }

    # --- /api/pull ---

    def pull(self, h: Handler) -> None:
        body = json_body(h)
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ApiError(400, {"error": "invalid model name"})
        progress = self._pull_progress(ollama_name(name.strip()))
        self._reply_progress(h, progress, stream=body.get("stream") is not False)

    @staticmethod
    def _reply_progress(h: Handler, progress: Iterator[dict[str, Any]], stream: bool) -> None:
        """Stream the lines, or answer the last; an error before any line answers alone."""
        first = next(progress)
        progress = itertools.chain([first], progress)
        if stream and "error" not in first:
            h.stream_ndjson(progress)
            return
        latest: dict[str, Any] = {}
        for document in progress:
            if "error" in document:
                h.reply_json(500, document)
                return
            latest = document
        h.reply_json(200, latest)

    def _pull_progress(self, name: str) -> Iterator[dict[str, Any]]:
        yield {"status": "pulling manifest"}
        if name not in self.config.sizes:
            yield {"error": "pull model manifest: file does not exist"}
            return
        with self.lock:
            already = name in self.present
        model = Present(name, self.config.sizes[name], 0, weights_blob(name))
        fail_at = self.faults.pull_fail_at
        for i, (blob, total) in enumerate(model.layers()):
            stop_at = None if already or fail_at is None or i > 0 else int(total * fail_at)
            yield from self._download(blob, total, done=already, stop_at=stop_at)
            if stop_at is not None:
                yield {"error": "max retries exceeded: unexpected EOF"}
                return
        yield {"status": "verifying sha256 digest"}
        yield {"status": "writing manifest"}
        model.modified_ns = time.time_ns()
        with self.lock:
            self.present[name] = model
        yield {"status": "success"}

    def _download(
        self, blob: str, total: int, done: bool, stop_at: int | None
    ) -> Iterator[dict[str, Any]]:
        """Progress of one blob every 60 ms at PULL_MIB_PER_S, as Ollama's ticker reports it."""
        status = {"status": f"pulling {blob[:12]}", "digest": f"sha256:{blob}", "total": total}
        end = total if stop_at is None else stop_at
        rate = self.config.pull_mib_per_s * MIB
        start = time.monotonic()
        completed = total if done else 0
        while True:
            # Go's omitempty: no "completed" key until some bytes have arrived.
            yield {**status, "completed": completed} if completed else dict(status)
            if completed >= end:
                return
            time.sleep(PULL_TICK_S)
            completed = min(end, int((time.monotonic() - start) * rate))

    # --- /api/create, /api/copy, /api/delete, /api/show ---

    def create(self, h: Handler) -> None:
        body = json_body(h)
        request = parse_create(body)
        self._reply_progress(h, self._create_progress(request), body.get("stream") is not False)

    def _create_progress(self, request: CreateRequest) -> Iterator[dict[str, Any]]:
        with self.lock:
            base = self.present.get(request.base)
        if base is None:  # parseFromModel pulls a base it does not have, lines and all
            for document in self._pull_progress(request.base):
                yield document
                if "error" in document:
                    return
            with self.lock:
                base = self.present[request.base]
        if request.quantize:  # createModel's answer for a model already quantized
            yield {"error": "quantization is only supported for F16 and F32 models"}
            return
        model = request.model(base)
        with self.lock:
            kept = {blob for p in self.present.values() for blob, _ in p.layers()}
        for blob, _ in model.layers():
            verb = "using existing" if blob in kept else "creating new"
            yield {"status": f"{verb} layer sha256:{blob}"}
        yield {"status": "writing manifest"}
        with self.lock:
            self.present[model.name] = model
        yield {"status": "success"}

    def copy(self, h: Handler) -> None:
        body = json_body(h)
        source = go_field(body, "source", str, "string", "CopyRequest") or ""
        destination = go_field(body, "destination", str, "string", "CopyRequest") or ""
        for role, name in (("source", source), ("destination", destination)):
            if not valid_name(name):
                raise ApiError(400, {"error": f"{role} {json.dumps(name)} is invalid"})
        with self.lock:
            model = self.present.get(ollama_name(source))
            if model is None:
                raise ApiError(404, {"error": f"model {json.dumps(source)} not found"})
            if model.name != ollama_name(destination):  # the manifest file, copied as is
                copied = replace(model, name=ollama_name(destination), modified_ns=time.time_ns())
                self.present[copied.name] = copied
        h.reply(200, b"", None)

    def delete(self, h: Handler) -> None:
        body = json_body(h)
        asked = go_field(body, "model", str, "string", "DeleteRequest") or ""
        asked = asked or go_field(body, "name", str, "string", "DeleteRequest") or ""
        if not valid_name(asked):
            raise ApiError(400, {"error": f"name {json.dumps(asked)} is invalid"})
        with self.lock:
            if self.present.pop(ollama_name(asked), None) is None:
                raise ApiError(404, {"error": f"model '{asked}' not found"})
            self.loaded.pop(ollama_name(asked), None)  # as `ollama rm` unloads it first
        h.reply(200, b"", None)

    def show(self, h: Handler) -> None:
        body = json_body(h)
        asked = go_field(body, "model", str, "string", "ShowRequest") or ""
        asked = asked or go_field(body, "name", str, "string", "ShowRequest") or ""
        system = go_field(body, "system", str, "string", "ShowRequest") or ""
        if not asked:
            raise ApiError(400, {"error": "model is required"})
        if not valid_name(asked):
            raise ApiError(400, {"error": "invalid model name"})
        with self.lock:
            model = self.present.get(ollama_name(asked))
        if model is None:
            raise ApiError(404, {"error": f"model '{asked}' not found"})
        h.reply_json(200, show_document(model, system))

    # --- scheduling ---

    def _expire(self) -> None:
        now = time.time()
        for name in [n for n, m in self.loaded.items() if m.expires_at <= now]:
            del self.loaded[name]

    def _used_mib(self) -> int:
        return sum(m.size_mib for m in self.loaded.values())

    def _evict_lru(self) -> None:
        oldest = min(self.loaded.values(), key=lambda m: m.last_used)
        del self.loaded[oldest.name]

    def ensure_loaded(self, name: str, keep_s: float) -> None:
        """Load `name` unless loaded, unloading others to make room; ApiError 500 on OOM."""
        with self.load_lock:
            with self.lock:
                self._expire()
                model = self.present.get(name)
                if model is None:  # deleted since the request looked
                    raise ApiError(404, {"error": f"model '{name}' not found"})
                running = self.loaded.get(name)
                if running is not None and running.digest == model.digest:
                    self._touch(name, keep_s)
                    return
                self.loaded.pop(name, None)  # re-created since it loaded: the scheduler reloads
                num_ctx = model.num_ctx
                self._make_room(model.size_mib)
            time.sleep(self.config.load_delay_s)
            with self.lock:
                self.loaded[name] = Loaded(name, model.size_mib, 0.0, 0.0, model.digest, num_ctx)
                self._touch(name, keep_s)
            self._print_ready(model.size_mib, model.weights, num_ctx)

    def _make_room(self, need_mib: int) -> None:
        """Unload the least recently used until `need_mib` fits; ApiError 500 if it cannot."""
        while self.loaded and (
            len(self.loaded) >= self.config.max_loaded
            or self._used_mib() + need_mib > self.config.capacity_mib
        ):
            self._evict_lru()
        if need_mib > self.config.capacity_mib - self._used_mib():
            self._print_oom(need_mib)
            raise ApiError(500, {"error": self.OOM_ERROR})

    def _touch(self, name: str, keep_s: float) -> None:
        model = self.loaded.get(name)
        if model is not None:
            model.expires_at = time.time() + keep_s
            model.last_used = time.monotonic()

    def unload(self, name: str) -> None:
        with self.lock:
            self.loaded.pop(name, None)

    @staticmethod
    def _print_oom(need_mib: int) -> None:
        err(
            f"ggml_backend_cuda_buffer_type_alloc_buffer: allocating {need_mib}.00 MiB on "
            "device 0: cudaMalloc failed: out of memory"
        )
        err(
            f'time={ollama_time()} level=ERROR source=sched.go:455 msg="error loading llama '
            f'server" error="{Ollama.OOM_ERROR}"'
        )

    @staticmethod
    def _print_ready(need_mib: int, weights: str, num_ctx: int) -> None:
        err(
            f'time={ollama_time()} level=INFO source=server.go:405 msg="starting llama server" '
            f'cmd="/usr/bin/ollama runner --model {OLLAMA_BLOBS}/sha256-{weights} --ctx-size '
            f"{num_ctx * NUM_PARALLEL} --batch-size 512 --n-gpu-layers 29 --threads 8 "
            f'--parallel {NUM_PARALLEL} --port 35331"'
        )
        err(f"load_tensors:        CUDA0 model buffer size = {need_mib:5d}.00 MiB")
        err("llama_kv_cache_init:      CUDA0 KV buffer size =   448.00 MiB")
        err(
            f"time={ollama_time()} level=INFO source=server.go:630 "
            'msg="llama runner started in 1.51 seconds"'
        )

    # --- /api/generate and /api/chat ---

    def generate_route(self, h: Handler) -> None:
        self._complete(h, chat=False)

    def chat_route(self, h: Handler) -> None:
        self._complete(h, chat=True)

    def _complete(self, h: Handler, chat: bool) -> None:
        started = time.perf_counter_ns()
        body = json_body(h)
        model = body.get("model")
        asked = model if isinstance(model, str) else ""
        name = ollama_name(asked) if asked else ""
        keep_s = keep_alive_s(body.get("keep_alive"))
        prompt = self._prompt(body, chat)
        with self.lock:
            present = name in self.present
        if not present:
            if chat and prompt:  # the scheduler's answer (handleScheduleError)
                raise ApiError(404, {"error": f'model "{asked}" not found, try pulling it first'})
            raise ApiError(404, {"error": f"model '{asked}' not found"})
        if not prompt and "keep_alive" in body and keep_s < 1:
            self.unload(name)
            h.reply_json(200, self._final(asked, chat, "unload"))
            return
        self.ensure_loaded(name, keep_s)
        load_ns = time.perf_counter_ns() - started
        if not prompt:
            h.reply_json(200, self._final(asked, chat, "load"))
            return
        self._answer(h, body, chat, started, load_ns)
        self._touch_locked(name, keep_s)

    def _touch_locked(self, name: str, keep_s: float) -> None:
        with self.lock:
            self._touch(name, keep_s)

    @staticmethod
    def _prompt(body: dict[str, Any], chat: bool) -> str:
        if not chat:
            prompt = body.get("prompt")
            return prompt if isinstance(prompt, str) else ""
        messages = body.get("messages")
        if not isinstance(messages, list):
            return ""
        return " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))

    @staticmethod
    def _final(model: str, chat: bool, reason: str) -> dict[str, Any]:
        document: dict[str, Any] = {"model": model, "created_at": go_time()}
        if chat:
            document["message"] = {"role": "assistant", "content": ""}
        else:
            document["response"] = ""
        document.update({"done": True, "done_reason": reason})
        return document

    def _answer(
        self, h: Handler, body: dict[str, Any], chat: bool, started: int, load_ns: int
    ) -> None:
        options = body.get("options") if isinstance(body.get("options"), dict) else {}
        limit = int_option(options or {}, "num_predict")
        stream = body.get("stream") is not False
        model = body["model"]
        if not stream:
            gen = self.generate(self._prompt(body, chat), limit)
            h.reply_json(200, self._done(model, chat, gen, gen.text, started, load_ns))
            return
        h.stream_ndjson(self._stream(model, chat, body, limit, started, load_ns))

    def _stream(
        self,
        model: str,
        chat: bool,
        body: dict[str, Any],
        limit: int | None,
        started: int,
        load_ns: int,
    ) -> Iterator[dict[str, Any]]:
        gen = self.start_generation(self._prompt(body, chat), limit)
        for token in gen.run():
            piece: dict[str, Any] = {"model": model, "created_at": go_time()}
            if chat:
                piece["message"] = {"role": "assistant", "content": token}
            else:
                piece["response"] = token
            piece["done"] = False
            yield piece
        yield self._done(model, chat, gen, "", started, load_ns)

    @staticmethod
    def _done(
        model: str, chat: bool, gen: Generation, text: str, started: int, load_ns: int
    ) -> dict[str, Any]:
        document: dict[str, Any] = {"model": model, "created_at": go_time()}
        if chat:
            document["message"] = {"role": "assistant", "content": text}
        else:
            document["response"] = text
        document.update({"done": True, "done_reason": "length" if gen.hit_limit else "stop"})
        if not chat:
            document["context"] = list(range(1, gen.prompt_n + len(gen.tokens) + 1))
        document.update(
            {
                "total_duration": time.perf_counter_ns() - started,
                "load_duration": load_ns,
                "prompt_eval_count": gen.prompt_n,
                "prompt_eval_duration": gen.prompt_ns,
                "eval_count": len(gen.tokens),
                "eval_duration": gen.eval_ns,
            }
        )
        return document


# --- the single-model runtimes: vLLM and llama.cpp server ---------------------------------


class SingleModel(Runtime):
    """A server started for one model that dies when it does not fit."""

    def __init__(self, config: Config, faults: Faults) -> None:
        super().__init__(config, faults)
        self.need = self.need_mib(config.model)
        self.free_mib = config.capacity_mib * 3 // 100  # left free when the allocation fails
        self.loading = threading.Event()
        self.loading.set()

    @property
    def fits(self) -> bool:
        return self.need <= self.config.capacity_mib

    def load_then(self, ready: Callable[[], None], oom: Callable[[], None]) -> None:
        time.sleep(self.config.load_delay_s)
        if not self.fits:
            oom()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)  # the real server dies of it, listening socket and all
        ready()
        self.loading.clear()


class Vllm(SingleModel):
    """vllm serve MODEL (V1 engine, OpenAI-compatible API server)."""

    SITE = "/usr/local/lib/python3.12/dist-packages"

    def __init__(self, config: Config, faults: Faults) -> None:
        super().__init__(config, faults)
        self.routes.update(
            {
                ("GET", "/health"): self.health,
                ("GET", "/version"): self.version,
                ("GET", "/v1/models"): self.models,
                ("POST", "/v1/completions"): self.completions,
            }
        )

    def run(self) -> None:
        self._print_start()
        # The engine loads before the API server listens: until then nothing answers.
        self.load_then(self._print_ready, self._print_oom)
        super().run()

    def error(self, status: int, kind: str, message: str) -> ApiError:
        return ApiError(
            status, {"object": "error", "message": message, "type": kind, "param": None,
                     "code": status},
        )  # fmt: skip

    def not_found(self, h: Handler) -> None:
        h.reply_json(404, {"detail": "Not Found"})  # FastAPI's answer to an unknown path

    def health(self, h: Handler) -> None:
        # Starlette's bare Response: no body, no Content-Type.
        h.reply(200 if self.faults.probe_ok() else 503, b"", None)

    def version(self, h: Handler) -> None:
        h.reply_json(200, {"version": VLLM_VERSION})

    def models(self, h: Handler) -> None:
        name = self.config.model
        card = {
            "id": name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "vllm",
            "root": name,
            "parent": None,
            "max_model_len": VLLM_MAX_MODEL_LEN,
            "permission": [self._permission()],
        }
        h.reply_json(200, {"object": "list", "data": [card]})

    @staticmethod
    def _permission() -> dict[str, Any]:
        return {
            "id": f"modelperm-{random.getrandbits(128):032x}",
            "object": "model_permission",
            "created": int(time.time()),
            "allow_create_engine": False,
            "allow_sampling": True,
            "allow_logprobs": True,
            "allow_search_indices": False,
            "allow_view": True,
            "allow_fine_tuning": False,
            "organization": "*",
            "group": None,
            "is_blocking": False,
        }

    def completions(self, h: Handler) -> None:
        try:
            body = json.loads(h.body or b"null")
        except ValueError as e:
            raise self.error(400, "BadRequestError", f"JSON decode error: {e}") from None
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            raise self.error(400, "BadRequestError", "prompt: a string is required")
        model = body.get("model") or self.config.model
        if model != self.config.model:
            raise self.error(404, "NotFoundError", f"The model `{model}` does not exist.")
        limit = int_option(body, "max_tokens")
        gen = self.generate(body["prompt"], 16 if limit is None else limit)
        choice = {
            "index": 0,
            "text": gen.text,
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
            "prompt_logprobs": None,
        }
        usage = {
            "prompt_tokens": gen.prompt_n,
            "total_tokens": gen.prompt_n + len(gen.tokens),
            "completion_tokens": len(gen.tokens),
            "prompt_tokens_details": None,
        }
        h.reply_json(
            200,
            {
                "id": f"cmpl-{random.getrandbits(128):032x}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": self.config.model,
                "choices": [choice],
                "usage": usage,
            },
        )

    def _print_start(self) -> None:
        model, port = self.config.model, self.config.port
        prefix = f"INFO {vllm_time()}"
        out(f"{prefix} [__init__.py:239] Automatically detected platform cuda.")
        out(f"{prefix} [api_server.py:1043] vLLM API server version {VLLM_VERSION}")
        out(
            f"{prefix} [api_server.py:1044] args: Namespace(subparser='serve', "
            f"model_tag='{model}', host=None, port={port}, model='{model}', dtype='auto', "
            "max_model_len=None, tensor_parallel_size=1, gpu_memory_utilization=0.9, "
            "swap_space=4, enforce_eager=False)"
        )
        out(
            f"{prefix} [core.py:58] Initializing a V1 LLM engine (v{VLLM_VERSION}) with "
            f"config: model='{model}', dtype=torch.bfloat16, max_seq_len={VLLM_MAX_MODEL_LEN}, "
            "device_config=cuda, seed=None"
        )
        out(f"{prefix} [gpu_model_runner.py:1329] Starting to load model {model}...")

    def _print_oom(self) -> None:
        prefix = f"ERROR {vllm_time()} [core.py:396]"
        in_use = self.config.capacity_mib - self.free_mib
        frames = [
            ("vllm/v1/engine/core.py", 387, "run_engine_core",
             "engine_core = EngineCoreProc(*args, **kwargs)"),
            ("vllm/v1/engine/core.py", 64, "__init__",
             "self.model_executor = executor_class(vllm_config)"),
            ("vllm/executor/uniproc_executor.py", 47, "_init_executor",
             'self.collective_rpc("load_model")'),
            ("vllm/v1/worker/gpu_worker.py", 162, "load_model",
             "self.model_runner.load_model()"),
            ("vllm/v1/worker/gpu_model_runner.py", 1332, "load_model",
             "self.model = get_model(vllm_config=self.vllm_config)"),
        ]  # fmt: skip
        out(f"{prefix} EngineCore failed to start.")
        out(f"{prefix} Traceback (most recent call last):")
        for path, line, function, code in frames:
            out(f'{prefix}   File "{self.SITE}/{path}", line {line}, in {function}')
            out(f"{prefix}     {code}")
        out(
            f"{prefix} torch.OutOfMemoryError: CUDA out of memory. Tried to allocate "
            f"{torch_size(self.need - in_use)}. GPU 0 has a total capacity of "
            f"{gib2(self.config.capacity_mib)} GiB of which {self.free_mib}.00 MiB is free. "
            f"Including non-PyTorch memory, this process has {torch_size(in_use)} memory in "
            f"use. Of the allocated memory {torch_size(in_use * 9 // 10)} is allocated by "
            "PyTorch, and 1.84 MiB is reserved by PyTorch but unallocated. If reserved but "
            "unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_"
            "segments:True to avoid fragmentation.  See documentation for Memory Management  "
            "(https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
        )
        err("Traceback (most recent call last):")
        err(
            f'  File "{self.SITE}/vllm/v1/engine/core_client.py", line 404, in '
            "_wait_for_engine_startup"
        )
        err('    raise RuntimeError("Engine core initialization failed. "')
        err("RuntimeError: Engine core initialization failed. See root cause above.")

    def _print_ready(self) -> None:
        prefix = f"INFO {vllm_time()}"
        kv_mib = max(self.config.capacity_mib * 9 // 10 - self.need, 0)
        out(
            f"{prefix} [gpu_model_runner.py:1347] Model loading took {gib2(self.need)} GiB "
            "and 4.12 seconds"
        )
        out(f"{prefix} [gpu_worker.py:227] Available KV cache memory: {gib2(kv_mib)} GiB")
        out(f"{prefix} [kv_cache_utils.py:634] GPU KV cache size: 120,448 tokens")
        out(
            f"{prefix} [api_server.py:1090] Starting vLLM API server on "
            f"http://0.0.0.0:{self.config.port}"
        )
        err("INFO:     Started server process [1]")
        err("INFO:     Waiting for application startup.")
        err("INFO:     Application startup complete.")


class Llamacpp(SingleModel):
    """llama-server -m MODEL: listens at once, answers 503 while the model loads."""

    def __init__(self, config: Config, faults: Faults) -> None:
        super().__init__(config, faults)
        self.routes.update(
            {
                ("GET", "/health"): self.health,
                ("GET", "/v1/health"): self.health,
                ("GET", "/models"): self.models,
                ("GET", "/v1/models"): self.models,
                ("POST", "/completion"): self.completion,
                ("POST", "/completions"): self.completion,
                ("POST", "/v1/completions"): self.oai_completions,
            }
        )

    LOADING: ClassVar[dict[str, Any]] = {
        "error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}
    }

    def run(self) -> None:
        self._print_start()
        if self.config.load_delay_s:
            loader = threading.Thread(
                target=self.load_then, args=(self._print_ready, self._print_oom), daemon=True
            )
            loader.start()
        else:  # too quick to see: no window in which a probe could meet the loading answer
            self.load_then(self._print_ready, self._print_oom)
        super().run()

    def route(self, h: Handler) -> None:
        # The server answers while loading, but only /models and the loading error.
        allowed = h.route_path in ("/models", "/v1/models", "/_fault")
        if self.loading.is_set() and not allowed:
            h.reply_json(503, self.LOADING)
            return
        super().route(h)

    def not_found(self, h: Handler) -> None:
        h.reply_json(404, self._error(404, "File Not Found", "not_found_error"))

    @staticmethod
    def _error(code: int, message: str, kind: str) -> dict[str, Any]:
        return {"error": {"code": code, "message": message, "type": kind}}

    def health(self, h: Handler) -> None:
        if self.faults.probe_ok():
            h.reply_json(200, {"status": "ok"})
        else:
            h.reply_json(503, self.LOADING)

    def models(self, h: Handler) -> None:
        meta = {
            "vocab_type": 2,
            "n_vocab": 128256,
            "n_ctx_train": 131072,
            "n_embd": 4096,
            "n_params": int(self.need * MIB / 0.6),
            "size": self.need * MIB,
        }
        entry = {
            "id": self.config.model,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "llamacpp",
            "meta": meta,
        }
        h.reply_json(200, {"object": "list", "data": [entry]})

    def _body(self, h: Handler) -> dict[str, Any]:
        try:
            return json_body(h)
        except ApiError as e:
            raise ApiError(400, self._error(400, e.body["error"], "invalid_request_error")) from e

    def _prompt(self, body: dict[str, Any]) -> str:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise ApiError(
                400, self._error(400, '"prompt" must be a string', "invalid_request_error")
            )
        return prompt

    @staticmethod
    def _timings(gen: Generation) -> dict[str, Any]:
        prompt_ms = gen.prompt_ns / 1e6
        predicted_ms = gen.eval_ns / 1e6
        n = len(gen.tokens)
        return {
            "cache_n": 0,
            "prompt_n": gen.prompt_n,
            "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / gen.prompt_n,
            "prompt_per_second": gen.prompt_n / prompt_ms * 1e3 if prompt_ms else 0.0,
            "predicted_n": n,
            "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / n if n else 0.0,
            "predicted_per_second": n / predicted_ms * 1e3 if predicted_ms else 0.0,
        }

    def completion(self, h: Handler) -> None:
        body = self._body(h)
        prompt = self._prompt(body)
        limit = int_option(body, "n_predict")
        gen = self.generate(prompt, limit)
        h.reply_json(
            200,
            {
                "index": 0,
                "content": gen.text,
                "tokens": [],
                "id_slot": 0,
                "stop": True,
                "model": self.config.model,
                "tokens_predicted": len(gen.tokens),
                "tokens_evaluated": gen.prompt_n,
                "generation_settings": {"n_predict": -1 if limit is None else limit},
                "prompt": prompt,
                "has_new_line": False,
                "truncated": False,
                "stop_type": "limit" if gen.hit_limit else "eos",
                "stopping_word": "",
                "tokens_cached": gen.prompt_n + len(gen.tokens),
                "timings": self._timings(gen),
            },
        )

    def oai_completions(self, h: Handler) -> None:
        body = self._body(h)
        limit = int_option(body, "max_tokens")
        gen = self.generate(self._prompt(body), limit)
        choice = {
            "text": gen.text,
            "index": 0,
            "logprobs": None,
            "finish_reason": "length" if gen.hit_limit else "stop",
        }
        usage = {
            "completion_tokens": len(gen.tokens),
            "prompt_tokens": gen.prompt_n,
            "total_tokens": gen.prompt_n + len(gen.tokens),
        }
        h.reply_json(
            200,
            {
                "choices": [choice],
                "created": int(time.time()),
                "model": body.get("model") or self.config.model,
                "system_fingerprint": LLAMACPP_BUILD,
                "object": "text_completion",
                "usage": usage,
                "id": f"chatcmpl-{random.getrandbits(128):032x}",
                "timings": self._timings(gen),
            },
        )

    def _print_start(self) -> None:
        model, port, capacity = self.config.model, self.config.port, self.config.capacity_mib
        err("main: binding port with default address family")
        err(f"main: HTTP server is listening, hostname: 0.0.0.0, port: {port}, http threads: 15")
        err("main: loading model")
        err(f"srv    load_model: loading model '{model}'")
        err(
            f"llama_model_load_from_file_impl: using device CUDA0 ({GPU_NAME}) - "
            f"{capacity - self.free_mib} MiB free"
        )
        err("load_tensors: loading model tensors, this can take a while... (mmap = true)")

    def _print_oom(self) -> None:
        model, need = self.config.model, self.need
        err(
            f"ggml_backend_cuda_buffer_type_alloc_buffer: allocating {need}.00 MiB on device 0: "
            "cudaMalloc failed: out of memory"
        )
        err(f"alloc_tensor_range: failed to allocate CUDA0 buffer of size {need * MIB}")
        err("llama_model_load: error loading model: unable to allocate CUDA0 buffer")
        err("llama_model_load_from_file_impl: failed to load model")
        err(f"common_init_from_params: failed to load model '{model}'")
        err(f"srv    load_model: failed to load model, '{model}'")
        err("srv    operator(): operator(): cleaning up before exit...")
        err("main: exiting due to model loading error")

    def _print_ready(self) -> None:
        err("load_tensors: offloaded 29/29 layers to GPU")
        err(f"load_tensors:        CUDA0 model buffer size = {self.need:5d}.00 MiB")
        err("llama_kv_cache_unified:      CUDA0 KV buffer size =   448.00 MiB")
        err("llama_context:      CUDA0 compute buffer size =   300.75 MiB")
        err("srv          init: initializing slots, n_slots = 4")
        err("main: model loaded")
        err(
            f"main: server is listening on http://0.0.0.0:{self.config.port} - "
            "starting the main loop"
        )
        err("srv  update_slots: all slots are idle")


# --- main ---------------------------------------------------------------------------------

RUNTIMES: dict[str, type[Runtime]] = {"ollama": Ollama, "vllm": Vllm, "llamacpp": Llamacpp}


def main() -> int:
    # PID 1 ignores signals it has no handler for: without these `docker stop` would wait.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    faults = Faults()
    try:
        config = load_config()
        faults.from_env()
    except ConfigError as e:
        err(f"standin: {e}")
        return 2
    out(
        f"standin: runtime={config.runtime} port={config.port} "
        f"capacity={config.capacity_mib}MiB model={config.model or '-'}"
    )
    try:
        RUNTIMES[config.runtime](config, faults).run()
    except OSError as e:  # the port is taken, most likely
        err(f"standin: cannot serve on port {config.port}: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
