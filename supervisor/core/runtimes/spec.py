"""What a runtime is, as plain data: the `RuntimeSpec` each module of this package fills in.

Pure: no Docker, HTTP, NVML or template engine here. The API client is named, not
imported (`api` is a class name in supervisor.edges.runtime_api), and every capability is a
flag the callers read instead of checking a client's type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class Runtime(StrEnum):
    """The runtimes a config can name; each has a module of the same name beside this one."""

    OLLAMA = "ollama"
    VLLM = "vllm"
    LLAMACPP = "llamacpp"
    TGI = "tgi"
    SGLANG = "sglang"
    TENSORRT = "tensorrt"
    TRITON = "triton"
    GENERIC = "generic"


@dataclass(frozen=True)
class RungOptions:
    """What a generated container is told about the rung it runs."""

    context: int | None
    parallel: int | None
    need_bytes: int
    gpu_total_bytes: int
    on_cpu: bool = False  # `accelerator: cpu`: no GPU, host memory holds everything


@dataclass(frozen=True)
class ContainerCheck:
    """The healthcheck a generated compose file gives the runtime's container."""

    test: tuple[str, ...]
    start_period: str = "60s"


def no_settings(options: RungOptions) -> tuple[str, ...]:
    return ()


def no_env(options: RungOptions) -> tuple[tuple[str, str], ...]:
    return ()


@dataclass(frozen=True)
class RuntimeSpec:
    """Everything fleetd knows about one runtime, read by the config, the planner, the
    estimate, the compose renderer, the change procedure, `scan` and the docs."""

    name: Runtime
    title: str  # as people write it, e.g. "llama.cpp server"
    summary: str  # one line for docs/runtimes.md
    model_handoff: str  # how the selected model reaches the container (docs)
    options_handoff: str  # how a rung's context and parallel slots reach it (docs)
    not_done: str  # what fleetd does not do for it, said plainly (docs); "" if nothing

    # Generated compose files (`fleetctl generate`); template None: fleetd does not
    # generate this runtime's container, it watches and restarts one that ops run.
    template: str | None = None  # file under templates/
    image: str | None = None  # default image; None with a template: `image:` is required
    port: int | None = None  # the port it serves in its container, and the first host port
    start_script: str | None = None  # reads the hand-off file, then starts the server
    volumes: tuple[str, ...] = ()  # `{service}` stands for the service's name
    container_check: ContainerCheck | None = None
    shm_size: str | None = None  # /dev/shm the container needs beyond Docker's 64 MiB
    env: Callable[[RungOptions], tuple[tuple[str, str], ...]] = no_env
    args: Callable[[RungOptions], tuple[str, ...]] = no_settings

    # The runtime's HTTP API (supervisor.edges.runtime_api); None: fleetd makes no API calls.
    api: str | None = None  # the client's class name
    health_path: str | None = None  # GET, 2xx when ready
    # After a start, failed health checks are not counted for this long: loading a large
    # model takes minutes, and a restart would only start the load again.
    start_period_s: float = 0.0
    warmup_path: str | None = None  # POST, a short generation; None: no warm-up

    # Capabilities, read instead of checking a client's type.
    can_pull: bool = False  # fetches a model it does not have through its API
    can_unload: bool = False  # frees a loaded model's VRAM through its API
    reports_measured_vram: bool = False  # says how much VRAM a loaded model really uses
    # It prints what it allocated at start; the parser's name (core/footprint.py).
    footprint_in_log: str | None = None
    swaps_models: bool = False  # one server loads models in turn: `ensemble:` is allowed
    instance_limited: bool = False  # counts against `ollama_instances_per_gpu`

    # The VRAM estimate (supervisor.analyzer.estimate).
    overhead_mib: int = 500  # CUDA context and the runtime's own buffers
    default_context: int = 4096
    context_is_model_max: bool = False  # with no `context:`, it allocates the model's max
    one_sequence_at_start: bool = False  # its KV pool is a share of the GPU: parallel not counted
    # llama-server's sizing: -c split over the -np slots (each share padded to 256 cells),
    # one micro-batch of compute, no vocabulary term (measured: bench/estimate_accuracy.py)
    sized_as_llama_server: bool = False

    @property
    def generated(self) -> bool:
        """Whether `fleetctl generate` can write this runtime's container."""
        return self.template is not None

    @property
    def needs_image(self) -> bool:
        return self.generated and self.image is None
