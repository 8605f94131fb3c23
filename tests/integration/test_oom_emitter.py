"""fleetd-test/oom-emitter stands in for the LLM runtimes fleetd watches.

The image (tests/images/oom-emitter, built by scripts/build-test-images.sh) reads the model
handed off at /run/fleetd/model, or $MODEL with MODEL_FROM_ENV=1, and prints what the
chosen runtime really prints when that model does or does not fit in CAPACITY_MIB of VRAM.
These tests pin that behaviour down, since fleetd's detector and step-down tests rely on it:
the out-of-memory output carries the real wording; llama.cpp, vLLM and a plain PyTorch app
die of it while Ollama's server survives and fails again in two-line bursts; a model that
fits prints a ready line and memory words that are no incident, serves until stopped, and
stops at once on SIGTERM.
"""

from __future__ import annotations

import itertools
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import docker
import pytest
from docker.models.containers import Container

if TYPE_CHECKING:
    from .conftest import Cleanup

CAPACITY_MIB = 3000
MODEL_SIZES = "big=4000,medium=2500,small=1000"
HEALTH_PORT = 8080
WAIT_S = 15
STOP_BUDGET_S = 2.0  # well under stop(timeout=5): the SIGTERM trap works, no SIGKILL

RUNTIMES = ("llamacpp", "vllm", "pytorch", "ollama")
DYING_RUNTIMES = ("llamacpp", "vllm", "pytorch")

READY_LINE = {
    "llamacpp": "main: server is listening on http://0.0.0.0:8080 - starting the main loop",
    "vllm": "INFO:     Application startup complete.",
    "pytorch": "INFO:     Uvicorn running on http://0.0.0.0:8000 (Press CTRL+C to quit)",
    "ollama": 'level=INFO source=server.go:630 msg="llama runner started in 1.51 seconds"',
}
# Lines that mention memory on a healthy start and must not count as incidents.
BENIGN_MEMORY_LINE = {
    "llamacpp": "llama_kv_cache_unified:      CUDA0 KV buffer size =   448.00 MiB",
    "vllm": "gpu_memory_utilization=0.9",
    "pytorch": "loaded small: torch.cuda.memory_allocated()=1048576000 of 3145728000 bytes",
    "ollama": "load_tensors:        CUDA0 model buffer size =  1000.00 MiB",
}
# Exact text of each runtime's out-of-memory output for model "big" (4000 MiB) on a
# 3000 MiB GPU.
# The output of a model that does not fit, per runtime, each with the stream it is written
# to: dockerd copies stdout and stderr separately, so lines are in order within a stream
# only (a stdout line may be stamped between two stderr lines).
OOM_TEXT = {
    "llamacpp": [
        (
            "stderr",
            "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 4000.00 MiB on device 0: "
            "cudaMalloc failed: out of memory\n"
            "alloc_tensor_range: failed to allocate CUDA0 buffer of size 4194304000\n"
            "llama_model_load: error loading model: unable to allocate CUDA0 buffer\n"
            "llama_model_load_from_file_impl: failed to load model\n"
            "common_init_from_params: failed to load model 'big'\n",
        ),
        ("stderr", "main: exiting due to model loading error\n"),
    ],
    "vllm": [
        ("stdout", "[core.py:396] Traceback (most recent call last):\n"),
        ("stdout", '/vllm/v1/worker/gpu_model_runner.py", line 1332, in load_model\n'),
        (
            "stdout",
            "[core.py:396] torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.06 GiB. "
            "GPU 0 has a total capacity of 2.92 GiB of which 90.00 MiB is free. ",
        ),
        ("stderr", "\nRuntimeError: Engine core initialization failed. See root cause above.\n"),
    ],
    "pytorch": [
        ("stderr", "Traceback (most recent call last):\n"),
        ("stderr", '/torch/nn/modules/module.py", line 1150, in convert\n'),
        (
            "stderr",
            "\ntorch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.06 GiB. "
            "GPU 0 has a total capacity of 2.92 GiB of which 90.00 MiB is free. ",
        ),
    ],
}
OLLAMA_GGML_LINE = (
    "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 4000.00 MiB on device 0: "
    "cudaMalloc failed: out of memory"
)
OLLAMA_ERROR_LINE = (
    'level=ERROR source=sched.go:455 msg="error loading llama server" '
    'error="llama runner process has terminated: cudaMalloc failed: out of memory"'
)

RunEmitter = Callable[..., Container]


@pytest.fixture
def run_emitter(
    docker_client: docker.DockerClient,
    emitter_image: str,
    cleanup: Cleanup,
    tmp_path: Path,
) -> RunEmitter:
    """Start an emitter with its hand-off directory mounted read-only at /run/fleetd.

    ``model_file`` is written to ``model`` there (none: the directory stays empty);
    ``env`` adds to or overrides the runtime, capacity and sizes.
    """
    started = 0

    def run(runtime: str, model_file: str | None = None, **env: str) -> Container:
        nonlocal started
        started += 1
        handoff_dir = tmp_path / f"handoff-{started}"
        handoff_dir.mkdir()
        if model_file is not None:
            (handoff_dir / "model").write_text(f"{model_file}\n")
        environment = {
            "RUNTIME": runtime,
            "CAPACITY_MIB": str(CAPACITY_MIB),
            "MODEL_SIZES": MODEL_SIZES,
            **env,
        }
        return docker_client.containers.run(
            emitter_image,
            detach=True,
            environment=environment,
            labels=cleanup.labels,
            volumes={str(handoff_dir): {"bind": "/run/fleetd", "mode": "ro"}},
        )

    return run


def logs_of(container: Container) -> str:
    logs: bytes = container.logs()  # stdout and stderr: the runtimes write to both
    return logs.decode()


def wait_for_log(container: Container, *texts: str, count: int = 1) -> str:
    """Poll the logs until each of ``texts`` occurs ``count`` times; return them.

    Wait for every line a test needs rather than for the last one printed: dockerd copies
    stdout and stderr separately, so a line on one can show up before an earlier one on
    the other.
    """
    deadline = time.monotonic() + WAIT_S
    while True:
        logs = logs_of(container)
        if all(logs.count(text) >= count for text in texts):
            return logs
        if time.monotonic() > deadline:
            pytest.fail(f"{texts!r} not each {count}x in the logs after {WAIT_S}s:\n{logs}")
        time.sleep(0.05)


def exit_code(container: Container) -> int:
    status: int = container.wait(timeout=WAIT_S)["StatusCode"]
    return status


def is_running(container: Container) -> bool:
    container.reload()
    running: bool = container.attrs["State"]["Running"]
    return running


def stop_seconds(container: Container) -> float:
    """Stop as fleetd and compose do (SIGTERM, SIGKILL after 5 s); return how long it took."""
    start = time.monotonic()
    container.stop(timeout=5)
    took = time.monotonic() - start
    container.reload()
    assert container.attrs["State"]["ExitCode"] == 0, "the SIGTERM trap exits 0"
    return took


def line_times(container: Container, text: str) -> list[float]:
    """When the engine received each log line containing ``text`` (epoch seconds)."""
    logs: bytes = container.logs(timestamps=True)
    times = []
    for line in logs.decode().splitlines():
        stamp, _, message = line.partition(" ")
        if text in message:
            whole, _, fraction = stamp.rstrip("Z").partition(".")
            when = datetime.fromisoformat(whole).replace(tzinfo=UTC)
            times.append(when.timestamp() + float(f"0.{fraction or 0}"))
    return times


def get_health(container: Container) -> tuple[int, bytes]:
    """GET the health endpoint, retrying while ``nc`` is not listening yet."""
    container.reload()
    address = container.attrs["NetworkSettings"]["IPAddress"]
    url = f"http://{address}:{HEALTH_PORT}/health"
    deadline = time.monotonic() + 5
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status, response.read()
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.parametrize("runtime", DYING_RUNTIMES)
def test_model_too_big_prints_the_real_oom_and_the_process_dies(
    run_emitter: RunEmitter, runtime: str
) -> None:
    container = run_emitter(runtime, "big")

    assert exit_code(container) == 1
    # The start line goes to stdout, most runtimes' output to stderr; dockerd copies the two
    # streams separately, so only within one stream is the order of lines certain.
    stdout: bytes = container.logs(stderr=False)
    assert stdout.decode().startswith(
        f"emitter: runtime={runtime} model=big need=4000MiB capacity={CAPACITY_MIB}MiB\n"
    )
    streams = {"stdout": stdout.decode(), "stderr": container.logs(stdout=False).decode()}
    for stream, text in OOM_TEXT[runtime]:
        assert text in streams[stream], f"{text!r} missing from {stream}:\n{streams[stream]}"


def test_ollama_survives_and_repeats_two_line_bursts(run_emitter: RunEmitter) -> None:
    container = run_emitter("ollama", "big", OOM_INTERVAL_S="1", HEALTH_PORT=str(HEALTH_PORT))

    wait_for_log(container, OLLAMA_ERROR_LINE, count=3)
    wait_for_log(container, 'msg="Listening on [::]:11434 (version 0.6.8)"')
    assert is_running(container), "Ollama's server outlives its failed runner"
    assert get_health(container) == (200, b'{"status":"ok"}')

    ggml, errors = line_times(container, OLLAMA_GGML_LINE), line_times(container, OLLAMA_ERROR_LINE)
    assert len(ggml) >= len(errors) >= 3
    # One incident is the runner's ggml line and the server's ERROR line, close together;
    # incidents are OOM_INTERVAL_S apart.
    for runner_line, server_line in zip(ggml, errors, strict=False):
        assert 0 <= server_line - runner_line < 0.5
    assert all(later - earlier > 0.8 for earlier, later in itertools.pairwise(ggml))

    assert stop_seconds(container) < STOP_BUDGET_S


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_model_that_fits_is_ready_without_oom_text_and_stops_at_once(
    run_emitter: RunEmitter, runtime: str
) -> None:
    container = run_emitter(runtime, "small", HEALTH_PORT=str(HEALTH_PORT))

    logs = wait_for_log(container, READY_LINE[runtime], BENIGN_MEMORY_LINE[runtime])
    assert "out of memory" not in logs.lower()
    assert get_health(container) == (200, b'{"status":"ok"}')
    time.sleep(0.3)
    assert is_running(container)

    assert stop_seconds(container) < STOP_BUDGET_S


@pytest.mark.parametrize(
    ("model_env", "model_file", "expected"),
    [
        ("big", None, "main: exiting due to model loading error"),
        ("small", None, READY_LINE["llamacpp"]),
        ("small", "big", READY_LINE["llamacpp"]),  # the env strategy ignores the file
    ],
)
def test_model_from_env(
    run_emitter: RunEmitter, model_env: str, model_file: str | None, expected: str
) -> None:
    container = run_emitter("llamacpp", model_file, MODEL_FROM_ENV="1", MODEL=model_env)

    wait_for_log(container, expected, f"emitter: runtime=llamacpp model={model_env} ")
    if model_env == "big":
        assert exit_code(container) == 1
    else:
        assert stop_seconds(container) < STOP_BUDGET_S


@pytest.mark.parametrize("env", [{}, {"MODEL_FROM_ENV": "1"}])
def test_no_model_handed_off_exits_2(run_emitter: RunEmitter, env: dict[str, str]) -> None:
    container = run_emitter("vllm", None, **env)

    assert exit_code(container) == 2
    assert logs_of(container) == "emitter: no model handed off\n"


def test_model_missing_from_sizes_needs_nothing_and_fits(run_emitter: RunEmitter) -> None:
    container = run_emitter("vllm", "qwen2.5:0.5b")

    wait_for_log(container, READY_LINE["vllm"], "model=qwen2.5:0.5b need=0MiB")
    assert stop_seconds(container) < STOP_BUDGET_S


def test_noise_lines_arrive_at_about_the_asked_rate(run_emitter: RunEmitter) -> None:
    container = run_emitter("llamacpp", "small", NOISE_LINES_PER_S="50")

    wait_for_log(container, "INFO: request 100 done in ")
    times = line_times(container, "INFO: request ")
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert 25 < rate < 75, rate
    assert "out of memory" not in logs_of(container).lower()
    assert stop_seconds(container) < STOP_BUDGET_S


def test_flood_prints_as_fast_as_it_can_and_still_stops_at_once(
    run_emitter: RunEmitter,
) -> None:
    container = run_emitter("llamacpp", "small", FLOOD="1")
    time.sleep(0.5)
    assert stop_seconds(container) < STOP_BUDGET_S

    # Read only the head: dockerd delivers 60-80k lines/s, the flood writes far more.
    wanted, seen = 10_000, 0
    stream = container.logs(stream=True, follow=False)
    try:
        for chunk in stream:
            seen += chunk.count(b"INFO flood line\n")
            if seen >= wanted:
                break
    finally:
        stream.close()
    assert seen >= wanted
