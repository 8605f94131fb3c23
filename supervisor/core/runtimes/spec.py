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


# The start scripts' first words: export the rung's variables (`env`, NAME=VALUE lines) and
# append the rung's arguments (`args`, one per line) to the container's own, from the
# hand-off folder fleetd rewrites at every change (POSIX sh; a missing file is no change).
READ_HANDOFF = (
    "d=/run/fleetd; "
    'if [ -f $d/env ]; then while IFS= read -r kv; do [ -n "$kv" ] && export "$kv"; '
    "done < $d/env; fi; "
    'if [ -f $d/args ]; then while IFS= read -r a; do set -- "$@" "$a"; done < $d/args; fi; '
)

# The options a rung may carry besides its model (config `ladder:` keys); each runtime
# accepts those its spec lists in `rung_options`.
RUNG_OPTIONS = ("context", "parallel", "kv_cache", "tensor_parallel")


@dataclass(frozen=True)
class RungOptions:
    """What a container is told about the rung it runs (the runtime's flags and env)."""

    context: int | None
    parallel: int | None
    need_bytes: int  # per GPU the rung spans
    gpu_total_bytes: int
    on_cpu: bool = False  # `accelerator: cpu`: no GPU, host memory holds everything
    kv_cache: str | None = None  # None: the runtime's default type
    tensor_parallel: int = 1  # GPUs the rung spans
    served_name: str | None = None  # the stable name clients call, whatever the rung

    @property
    def memory_share(self) -> float | None:
        """The share of each GPU the plan gives this rung (vLLM's --gpu-memory-utilization);
        None on a CPU-only host or without a GPU size."""
        if self.on_cpu or self.gpu_total_bytes <= 0:
            return None
        return min(0.99, -(-self.need_bytes * 100 // self.gpu_total_bytes) / 100)


@dataclass(frozen=True)
class ContainerCheck:
    """The healthcheck a generated compose file gives the runtime's container."""

    test: tuple[str, ...]
    start_period: str = "60s"


def no_settings(options: RungOptions) -> tuple[str, ...]:
    return ()


def no_env(options: RungOptions) -> tuple[tuple[str, str], ...]:
    return ()


def flag(name: str, value: object | None) -> tuple[str, ...]:
    """`(name, value)` as arguments, or nothing when the value is unset."""
    return () if value is None else (name, str(value))


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
    # The container's own settings, the same on every rung (in the compose file).
    env: Callable[[RungOptions], tuple[tuple[str, str], ...]] = no_env
    args: Callable[[RungOptions], tuple[str, ...]] = no_settings
    # What changes with the rung (its options, the stable name): written to the hand-off
    # folder at every change, which the start script reads (docs/runtimes.md), or set as
    # environment variables on a recreate (`model_env:`).
    rung_env: Callable[[RungOptions], tuple[tuple[str, str], ...]] = no_env
    rung_args: Callable[[RungOptions], tuple[str, ...]] = no_settings
    # Which of RUNG_OPTIONS a rung may set, and the KV-cache types it accepts.
    rung_options: frozenset[str] = frozenset({"context", "parallel"})
    kv_cache_types: tuple[str, ...] = ()
    # The runtime's flags that rung_args sets: a service's `args:` may not set them too.
    rung_flags: tuple[str, ...] = ()
    names_model: str | None = None  # how the stable name reaches it (docs); None: it cannot
    takes_memory_share: bool = False  # it is told its share of each GPU (RungOptions)

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
    can_create: bool = False  # makes a named model from another with options (/api/create)
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
