"""Clients for the runtimes' HTTP APIs: what fleetd needs to change a model safely.

Paths and fields are the runtimes' documented ones:
- Ollama (docs/api.md in ollama/ollama): GET /api/version, GET /api/tags, POST /api/pull
  (streamed NDJSON: {"status"}, {"status", "digest", "total", "completed"}, ... {"status":
  "success"}, or {"error"}), POST /api/generate (`keep_alive: 0` with no prompt unloads;
  a non-streamed answer has load_duration, eval_count and eval_duration in nanoseconds),
  GET /api/ps (loaded models with `size_vram` in bytes).
- vLLM's OpenAI-compatible server: GET /health (200 when ready), GET /v1/models,
  POST /v1/completions (OpenAI's shape, with `usage.completion_tokens`).
- llama.cpp server (tools/server/README.md): GET /health (200 {"status": "ok"}, 503 while
  loading), POST /v1/completions (OpenAI's shape, plus llama.cpp's own `timings` with
  `predicted_per_second`).
- SGLang and TensorRT-LLM's trtllm-serve: GET /health, GET /v1/models, POST /v1/completions
  (OpenAI's shape), as vLLM.
- Text Generation Inference (docs/openapi.json): GET /health, POST /generate with
  `parameters.max_new_tokens` and `details: true` (answer: `details.generated_tokens`).
- Triton (KServe v2): GET /v2/health/ready; no warm-up (its model names are the
  repository's).

Which paths a client uses and what it can do are the runtime's registry entry
(supervisor.core.runtimes); each client names its runtime.

Every call has a timeout; every failure is a `RuntimeApiError` with the endpoint, the
path and what went wrong, in one line.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import requests

from supervisor.core.errors import FleetdError
from supervisor.core.runtimes import REGISTRY, Runtime, RuntimeSpec, spec_of

NS = 1e9


class RuntimeApiError(FleetdError):
    """A runtime's API did not do what was asked (unreachable, error answer, timeout)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status of an error answer; None when there was none


@dataclass(frozen=True)
class Warmed:
    """What a warm-up generation measured."""

    tokens: int
    seconds: float  # wall time of the request
    load_s: float | None  # time the runtime spent loading the model, when it says
    tokens_per_s: float | None

    def describe(self) -> str:
        parts = [f"{self.tokens} tokens in {self.seconds:.1f} s"]
        if self.load_s is not None:
            parts.append(f"load {self.load_s:.1f} s")
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:.1f} tokens/s")
        return ", ".join(parts)


@dataclass(frozen=True)
class PullProgress:
    status: str
    completed: int | None = None
    total: int | None = None
    digest: str | None = None  # the layer being downloaded (a model has several)

    def describe(self) -> str:
        if self.total:
            done = self.completed or 0
            return f"{self.status} {100 * done / self.total:.0f}% of {self.total / 2**20:.0f} MiB"
        return self.status


@dataclass(frozen=True)
class Loaded:
    name: str
    size_vram: int | None


class RuntimeApi:
    """One runtime's API client: health, and what its registry entry says it can do.

    Callers read the spec's flags (`can_pull`, `can_unload`, `reports_measured_vram`,
    `warmup_path`) before calling; a call the runtime cannot answer raises."""

    runtime: ClassVar[Runtime]

    def __init__(self, endpoint: str, session: requests.Session | None = None) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.session = session or requests.Session()

    @property
    def spec(self) -> RuntimeSpec:
        return spec_of(self.runtime)

    def health(self, timeout_s: float) -> None:
        """Return when the runtime says it is ready; raise RuntimeApiError otherwise."""
        self._request("GET", self._path(self.spec.health_path), timeout_s)

    def full_name(self, model: str) -> str:
        """The name the runtime reports a model under (Ollama: `llama3` is `llama3:latest`)."""
        return model

    def warm(self, model: str, prompt: str, tokens: int, timeout_s: float) -> Warmed:
        raise self._cannot("warm up a model")

    def present(self, model: str, timeout_s: float = 10.0) -> bool:
        raise self._cannot("list its models")

    def pull(
        self,
        model: str,
        progress: Callable[[PullProgress], None],
        timeout_s: float,
        abort: threading.Event | None = None,
    ) -> None:
        raise self._cannot("pull a model")

    def unload(self, model: str, timeout_s: float = 30.0) -> None:
        raise self._cannot("unload a model")

    def loaded(self, timeout_s: float = 10.0) -> list[Loaded]:
        raise self._cannot("list loaded models")

    def size_vram(self, model: str) -> int | None:
        raise self._cannot("report a model's VRAM")

    def create(
        self, name: str, source: str, parameters: dict[str, Any], timeout_s: float = 60.0
    ) -> None:
        raise self._cannot("create a model")

    def delete(self, name: str, timeout_s: float = 30.0) -> None:
        raise self._cannot("delete a model")

    def show(self, name: str, timeout_s: float = 10.0) -> dict[str, Any]:
        raise self._cannot("show a model")

    def _path(self, path: str | None) -> str:
        """A path from the registry entry; tests/test_runtimes.py checks each client's."""
        assert path is not None, f"the registry gives {self.runtime} no such path"
        return path

    def _cannot(self, what: str) -> RuntimeApiError:
        return RuntimeApiError(
            f"{self.spec.title} at {self.endpoint} cannot {what} through its API"
        )

    # --- plumbing ---------------------------------------------------------------------

    def _request(
        self, method: str, path: str, timeout_s: float, body: dict[str, Any] | None = None
    ) -> requests.Response:
        url = self.endpoint + path
        try:
            response = self.session.request(method, url, json=body, timeout=timeout_s)
        except requests.Timeout:
            raise RuntimeApiError(f"{method} {url}: no answer in {timeout_s:.0f} s") from None
        except requests.RequestException as e:
            raise RuntimeApiError(f"{method} {url}: {_reason(e)}") from None
        if response.status_code >= 400:
            raise RuntimeApiError(
                f"{method} {url}: HTTP {response.status_code}{_error(response)}",
                response.status_code,
            )
        return response

    def _json(
        self, method: str, path: str, timeout_s: float, body: dict[str, Any] | None = None
    ) -> Any:
        response = self._request(method, path, timeout_s, body)
        try:
            return response.json()
        except ValueError:
            raise RuntimeApiError(f"{method} {self.endpoint}{path}: answer is not JSON") from None


def _reason(error: requests.RequestException) -> str:
    text = str(error)
    if "Connection refused" in text:
        return "connection refused"
    if "Name or service not known" in text or "Failed to resolve" in text:
        return "unknown host"
    return text.splitlines()[0][:200]


def _error(response: requests.Response) -> str:
    try:
        document = response.json()
    except ValueError:
        text = response.text.strip()
        return f": {text[:200]}" if text else ""
    error = document.get("error") if isinstance(document, dict) else None
    if isinstance(error, dict):  # llama.cpp and OpenAI: {"error": {"message": ...}}
        error = error.get("message")
    return f": {error}" if error else ""


def _field(document: Any, key: str, kind: type, where: str) -> Any:
    value = document.get(key) if isinstance(document, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise RuntimeApiError(f"{where}: answer has no {key!r} ({kind.__name__})")
    return value


# ---------------------------------------------------------------- Ollama


def ollama_name(model: str) -> str:
    """Ollama's full name of a model: `llama3` is `llama3:latest`."""
    last = model.rsplit("/", 1)[-1]
    return model if ":" in last else f"{model}:latest"


class OllamaApi(RuntimeApi):
    runtime = Runtime.OLLAMA

    def full_name(self, model: str) -> str:
        return ollama_name(model)

    def health(self, timeout_s: float) -> None:
        self._json("GET", self._path(self.spec.health_path), timeout_s)

    def present(self, model: str, timeout_s: float = 10.0) -> bool:
        document = self._json("GET", "/api/tags", timeout_s)
        models = _field(document, "models", list, f"{self.endpoint}/api/tags")
        names = {ollama_name(m.get("name", "")) for m in models if isinstance(m, dict)}
        return ollama_name(model) in names

    def pull(
        self,
        model: str,
        progress: Callable[[PullProgress], None],
        timeout_s: float,
        abort: threading.Event | None = None,
    ) -> None:
        """Pull a model, reporting each progress object; RuntimeApiError if it fails."""
        url = f"{self.endpoint}/api/pull"
        deadline = time.monotonic() + timeout_s
        try:
            # The read timeout applies between chunks: a stalled download fails, a slow one not.
            with self.session.post(
                url, json={"model": model, "stream": True}, stream=True, timeout=(10, 60)
            ) as response:
                if response.status_code >= 400:
                    raise RuntimeApiError(
                        f"POST {url} ({model}): HTTP {response.status_code}{_error(response)}",
                        response.status_code,
                    )
                for item in _ndjson(response.iter_lines()):
                    if "error" in item:
                        raise RuntimeApiError(f"pulling {model}: {item['error']}")
                    status = str(item.get("status", ""))
                    completed, total = item.get("completed"), item.get("total")
                    digest = item.get("digest")
                    progress(
                        PullProgress(
                            status,
                            completed if isinstance(completed, int) else None,
                            total if isinstance(total, int) else None,
                            digest if isinstance(digest, str) else None,
                        )
                    )
                    if status == "success":
                        return
                    if time.monotonic() > deadline:
                        raise RuntimeApiError(f"pulling {model}: not done in {timeout_s:.0f} s")
                    if abort is not None and abort.is_set():
                        raise RuntimeApiError(f"pulling {model}: abandoned")
        except requests.RequestException as e:
            raise RuntimeApiError(f"POST {url} ({model}): {_reason(e)}") from None
        raise RuntimeApiError(f"pulling {model}: the stream ended without success")

    def unload(self, model: str, timeout_s: float = 30.0) -> None:
        """Ask Ollama to free the model's memory now (keep_alive 0); a model it does not
        have is already unloaded (Ollama answers 404)."""
        try:
            self._json("POST", "/api/generate", timeout_s, {"model": model, "keep_alive": 0})
        except RuntimeApiError as e:
            if e.status != 404:
                raise

    def warm(self, model: str, prompt: str, tokens: int, timeout_s: float) -> Warmed:
        where = f"{self.endpoint}/api/generate ({model})"
        started = time.monotonic()
        body = {
            "model": model,
            "prompt": prompt,
            "stream": False,
            "options": {"num_predict": tokens},
        }
        document = self._json("POST", self._path(self.spec.warmup_path), timeout_s, body)
        seconds = time.monotonic() - started
        eval_count = _field(document, "eval_count", int, where)
        eval_ns = document.get("eval_duration")
        load_ns = document.get("load_duration")
        rate = eval_count / (eval_ns / NS) if isinstance(eval_ns, int) and eval_ns > 0 else None
        load = load_ns / NS if isinstance(load_ns, int) else None
        return Warmed(eval_count, seconds, load, rate)

    def loaded(self, timeout_s: float = 10.0) -> list[Loaded]:
        document = self._json("GET", "/api/ps", timeout_s)
        models = _field(document, "models", list, f"{self.endpoint}/api/ps")
        result = []
        for m in models:
            if isinstance(m, dict) and isinstance(m.get("name"), str):
                vram = m.get("size_vram")
                result.append(Loaded(m["name"], vram if isinstance(vram, int) else None))
        return result

    def size_vram(self, model: str) -> int | None:
        wanted = ollama_name(model)
        return next((m.size_vram for m in self.loaded() if ollama_name(m.name) == wanted), None)

    def create(
        self, name: str, source: str, parameters: dict[str, Any], timeout_s: float = 60.0
    ) -> None:
        """Create (or replace) model `name` from `source` with these parameters (e.g.
        num_ctx): POST /api/create {model, from, parameters}, as one answer."""
        body = {"model": name, "from": source, "parameters": parameters, "stream": False}
        document = self._json("POST", "/api/create", timeout_s, body)
        if isinstance(document, dict) and "error" in document:
            raise RuntimeApiError(f"creating {name} from {source}: {document['error']}")

    def delete(self, name: str, timeout_s: float = 30.0) -> None:
        """Remove model `name`; one Ollama does not have is already gone (404)."""
        try:
            self._request("DELETE", "/api/delete", timeout_s, {"model": name})
        except RuntimeApiError as e:
            if e.status != 404:
                raise

    def show(self, name: str, timeout_s: float = 10.0) -> dict[str, Any]:
        """POST /api/show: the model's details, its `parameters` text among them."""
        document = self._json("POST", "/api/show", timeout_s, {"model": name})
        if not isinstance(document, dict):
            raise RuntimeApiError(f"{self.endpoint}/api/show ({name}): answer is not an object")
        return document


def _ndjson(lines: Iterator[bytes]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            raise RuntimeApiError(f"pull stream: not JSON: {line[:100]!r}") from None
        if isinstance(item, dict):
            yield item


# ---------------------------------------------------------------- one model per server


class OpenAiServerApi(RuntimeApi):
    """A server of one model behind OpenAI's completions API (vLLM, SGLang, trtllm-serve)."""

    def warm(self, model: str, prompt: str, tokens: int, timeout_s: float) -> Warmed:
        # vLLM serves a model under the name it was started with: ask rather than guess.
        served = self._json("GET", "/v1/models", timeout_s)
        data = _field(served, "data", list, f"{self.endpoint}/v1/models")
        name = data[0].get("id", model) if data and isinstance(data[0], dict) else model
        path = self._path(self.spec.warmup_path)
        started = time.monotonic()
        body = {"model": name, "prompt": prompt, "max_tokens": tokens, "temperature": 0}
        document = self._json("POST", path, timeout_s, body)
        seconds = time.monotonic() - started
        usage = _field(document, "usage", dict, f"{self.endpoint}{path}")
        count = _field(usage, "completion_tokens", int, f"{self.endpoint}{path}")
        return Warmed(count, seconds, None, count / seconds if seconds > 0 else None)


class VllmApi(OpenAiServerApi):
    runtime = Runtime.VLLM


class SglangApi(OpenAiServerApi):
    runtime = Runtime.SGLANG


class TensorRtLlmApi(OpenAiServerApi):
    runtime = Runtime.TENSORRT


class LlamaCppApi(RuntimeApi):
    runtime = Runtime.LLAMACPP

    def warm(self, model: str, prompt: str, tokens: int, timeout_s: float) -> Warmed:
        # The OpenAI-compatible path; llama.cpp adds its own `timings` to the answer.
        path = self._path(self.spec.warmup_path)
        started = time.monotonic()
        body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0}
        document = self._json("POST", path, timeout_s, body)
        seconds = time.monotonic() - started
        where = f"{self.endpoint}{path}"
        usage = _field(document, "usage", dict, where)
        count = _field(usage, "completion_tokens", int, where)
        timings = document.get("timings") if isinstance(document, dict) else None
        rate = timings.get("predicted_per_second") if isinstance(timings, dict) else None
        if not isinstance(rate, int | float) or isinstance(rate, bool):
            rate = count / seconds if seconds > 0 else None
        return Warmed(count, seconds, None, float(rate) if rate is not None else None)


class TgiApi(RuntimeApi):
    runtime = Runtime.TGI

    def warm(self, model: str, prompt: str, tokens: int, timeout_s: float) -> Warmed:
        # TGI serves the one model it was started with; /generate takes no model name.
        path = self._path(self.spec.warmup_path)
        where = f"{self.endpoint}{path}"
        started = time.monotonic()
        parameters = {"max_new_tokens": tokens, "details": True, "do_sample": False}
        document = self._json("POST", path, timeout_s, {"inputs": prompt, "parameters": parameters})
        seconds = time.monotonic() - started
        details = _field(document, "details", dict, where)
        count = _field(details, "generated_tokens", int, where)
        return Warmed(count, seconds, None, count / seconds if seconds > 0 else None)


class TritonApi(RuntimeApi):
    runtime = Runtime.TRITON


def _clients() -> dict[Runtime, type[RuntimeApi]]:
    """Each runtime's client, by the class name its registry entry gives."""
    classes = {c.__name__: c for c in _subclasses(RuntimeApi)}
    return {s.name: classes[s.api] for s in REGISTRY.values() if s.api is not None}


def _subclasses(cls: type[RuntimeApi]) -> list[type[RuntimeApi]]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


API_FOR: dict[Runtime, type[RuntimeApi]] = _clients()


def api_for(runtime: Runtime, endpoint: str) -> RuntimeApi | None:
    """The client for a runtime's API, or None for runtimes without one (generic apps)."""
    kind = API_FOR.get(runtime)
    return kind(endpoint) if kind is not None else None
