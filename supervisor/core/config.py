"""The fleet config (`fleet.yaml`): its schema, defaults and validation.

Every field is parsed by a named converter that quotes the bad value; `load_config`
turns all problems into one `ConfigError` naming file, line, key, value and expectation.
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from supervisor.core.address import parse_address
from supervisor.core.errors import ConfigError
from supervisor.core.runtimes import REGISTRY, Runtime, RuntimeSpec, spec_of
from supervisor.core.runtimes.spec import RUNG_OPTIONS
from supervisor.core.units import format_size, parse_duration, parse_size
from supervisor.core.yamlsource import KeyPath, dotted, line_of, load_yaml_with_lines

# Outside the exporters' range 9100-9999 (all allocated on Prometheus's default port
# allocations page), Linux's ephemeral ports (32768-60999) and the runtimes' own ports.
DEFAULT_METRICS_PORT = 10464
DEFAULT_METRICS_ADDRESS = f"127.0.0.1:{DEFAULT_METRICS_PORT}"

SizeBytes = Annotated[int, BeforeValidator(parse_size)]
# Strict: pydantic's lax mode would read YAML `true` as 1 (`gpu: true` pinning GPU 1).
Int = Annotated[int, Field(strict=True)]
Float = Annotated[float, Field(strict=True)]
ServiceName = Annotated[str, AfterValidator(lambda v: _check_name(v, "service name"))]
Seconds = Annotated[float, BeforeValidator(parse_duration)]
Bool = Annotated[bool, Field(strict=True)]
ListenAddress = Annotated[str, BeforeValidator(lambda v: _check_address(v))]  # kept as written
# A name from the registry of runtimes; the error lists every accepted one.
RuntimeName = Annotated[Runtime, BeforeValidator(lambda v: _check_runtime(v))]

# The most services and declared GPUs a config may list: far above any host (NVML hosts
# have at most 16 GPUs), and small enough for the planner, which recurses once per service
# and bounds every remaining service at each step, and for one log follower per container.
MAX_SERVICES = 256
MAX_GPUS = 64


def _at_most(limit: int, what: str) -> BeforeValidator:
    """Refuse a list or mapping longer than `limit` before its items are validated."""

    def check(value: object) -> object:
        if isinstance(value, list | dict) and len(value) > limit:
            raise ValueError(f"{len(value)} {what}; expected at most {limit}")
        return value

    return BeforeValidator(check)


# Compose service/container names and model names: refused here rather than escaped
# later, because no runtime accepts whitespace, quotes or `$` in them anyway.
_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
_MODEL_RE = re.compile(r"^[A-Za-z0-9/][A-Za-z0-9._:/@+~-]*$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_URL_RE = re.compile(r"^https?://[A-Za-z0-9._\[\]:-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?$")


def _check_name(value: str, what: str) -> str:
    if not _NAME_RE.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a valid {what} (expected letters, digits, '_', '.', '-', "
            "starting with a letter or digit)"
        )
    return value


def _check_runtime(value: object) -> object:
    if isinstance(value, str):
        spec_of(value)  # raises ValueError listing the accepted names
    return value


# Compose's short volume syntax: [SOURCE:]TARGET[:MODE], TARGET absolute, MODE a comma list.
_VOLUME_MODES = frozenset({"ro", "rw", "z", "Z", "consistent", "cached", "delegated", "nocopy"})
VOLUME_EXPECTED = (
    "expected Compose's short syntax [SOURCE:]TARGET[:MODE], e.g. /srv/models:/models:ro, "
    "with TARGET an absolute path in the container and MODE ro, rw, z, Z"
)


def _volume_parts(entry: str) -> list[str]:
    """`entry` split at the colons that are not inside a `${...}` (Compose interpolates
    those first: `${MODELS:-/srv/m}:/models` is a source and a target)."""
    parts, current, depth = [], "", 0
    i = 0
    while i < len(entry):
        if entry.startswith("${", i):
            depth += 1
            current += "${"
            i += 2
            continue
        char = entry[i]
        if char == "}" and depth:
            depth -= 1
        if char == ":" and not depth:
            parts.append(current)
            current = ""
        else:
            current += char
        i += 1
    return [*parts, current]


def check_volume(entry: str) -> str:
    """Refuse a `volumes:` entry that Compose would refuse (or read as something else)."""
    parts = _volume_parts(entry)
    bad_char = any(not c.isprintable() or c in "\"'\n" for c in entry)
    if bad_char or not 1 <= len(parts) <= 3 or not all(parts[: len(parts)]):
        raise ValueError(f"{entry!r} is not a volume ({VOLUME_EXPECTED})")
    target = parts[0] if len(parts) == 1 else parts[1]
    if not target.startswith("/") or any(c.isspace() for c in target):
        raise ValueError(
            f"{entry!r}: {target!r} is not a path in the container ({VOLUME_EXPECTED})"
        )
    if len(parts) == 3 and not set(parts[2].split(",")) <= _VOLUME_MODES:
        raise ValueError(f"{entry!r}: {parts[2]!r} is not an access mode ({VOLUME_EXPECTED})")
    return entry


def model_env_var(service: str) -> str:
    """The `.env` variable that carries a service's model, e.g. FLEETD_ALPHA_MODEL."""
    return "FLEETD_" + "".join(c if c.isalnum() else "_" for c in service).upper() + "_MODEL"


def _check_rung_options(
    spec: RuntimeSpec, index: int, rung: RungConfig, where: str = "ladder"
) -> None:
    """A rung asking for an option its runtime cannot do is refused, naming what it can."""
    for option in RUNG_OPTIONS:
        value = rung.context_steps if option == "context" else getattr(rung, option)
        unset = value is None or (option == "tensor_parallel" and value == 1)
        if unset or option in spec.rung_options:
            continue
        accepted = ", ".join(o for o in RUNG_OPTIONS if o in spec.rung_options) or "none"
        raise PydanticCustomError(
            "fleetd",
            f"{spec.title} cannot set {option} per rung (runtime {spec.name.value} accepts: "
            f"{accepted})",
            {"at": (where, index, option)},
        )
    if rung.kv_cache is not None and rung.kv_cache not in spec.kv_cache_types:
        raise PydanticCustomError(
            "fleetd",
            f"got {rung.kv_cache!r}; expected one of {', '.join(spec.kv_cache_types)} "
            f"(the KV-cache types {spec.title} takes)",
            {"at": (where, index, "kv_cache")},
        )


def _check_address(value: object) -> object:
    parse_address(value)  # raises ValueError quoting the bad value
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Tokens = Annotated[Int, Field(gt=0, le=10_000_000)]


class RungConfig(_Strict):
    """One rung of a service's ladder: a model and the options it runs with (a whole
    runtime configuration); the need is declared or estimated from metadata.

    `context: [32768, 16384, 8192]` is one rung per value, in that order: the service's
    `ladder` holds them expanded, each with one context (`written` is the config's own)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    model: str
    vram: SizeBytes | None = None  # per GPU the rung spans
    metadata: Path | None = None
    context_steps: Tokens | Annotated[list[Tokens], Field(min_length=1)] | None = Field(
        default=None, alias="context"
    )
    parallel: Annotated[Int, Field(gt=0, le=65536)] | None = None
    kv_cache: str | None = None
    tensor_parallel: Annotated[Int, Field(ge=1, le=64)] = 1

    @property
    def context(self) -> int | None:
        """The context of an expanded rung (the first step of a written one)."""
        steps = self.context_steps
        return steps[0] if isinstance(steps, list) else steps

    @property
    def options(self) -> dict[str, object]:
        """The options this rung sets (for plans, history and status)."""
        return {
            "context": self.context,
            "parallel": self.parallel,
            "kv_cache": self.kv_cache,
            "tensor_parallel": self.tensor_parallel,
        }

    def expanded(self) -> list[RungConfig]:
        """One rung per context step, in the order written."""
        if not isinstance(self.context_steps, list):
            return [self]
        return [self.model_copy(update={"context_steps": c}) for c in self.context_steps]

    @field_validator("context_steps")
    @classmethod
    def _steps_distinct(cls, value: int | list[int] | None) -> int | list[int] | None:
        if isinstance(value, list) and len(set(value)) != len(value):
            raise ValueError(f"context steps {value} repeat a value (expected each once)")
        return value

    @field_validator("model")
    @classmethod
    def _model_name(cls, value: str) -> str:
        if not _MODEL_RE.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a model name (expected letters, digits and ._:/@+~- "
                "with no spaces, quotes or control characters)"
            )
        return value

    @model_validator(mode="after")
    def _steps_priced(self) -> RungConfig:
        steps = self.context_steps
        if isinstance(steps, list) and len(steps) > 1 and self.vram is not None:
            raise ValueError(
                f"rung {self.model!r} declares one `vram:` for {len(steps)} "
                "context steps, so every step would need the same and a step down would "
                "skip them all (expected `metadata:` to price each step, or one rung per "
                "context with its own `vram:`)"
            )
        return self

    @model_validator(mode="after")
    def _need_known(self) -> RungConfig:
        if self.vram is None and self.metadata is None:
            raise ValueError(
                f"rung {self.model!r} has no VRAM need (expected `vram: SIZE`, e.g. 2048MiB, "
                "or `metadata: PATH` to a GGUF file or Hugging Face model folder)"
            )
        return self


class RuleConfig(_Strict):
    """An extra log rule for one service (see docs/detector.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    id: str
    incident_class: Literal["vram_oom", "gpu_fault", "host_oom", "start_failure", "crash"] = Field(
        alias="class"
    )
    pattern: str

    @model_validator(mode="after")
    def _compiles(self) -> RuleConfig:
        from supervisor.core.detector import compile_rule  # the detector's own checks, at load

        compile_rule(self.id, self.incident_class, self.pattern)
        return self


class HealthConfig(_Strict):
    """fleetd's own checks of a service's runtime API (`endpoint`), and its circuit breaker."""

    enabled: Bool = True
    interval: Seconds = 30.0
    timeout: Seconds = 5.0
    unhealthy_after: Annotated[Int, Field(ge=1)] = 3  # failures in a row
    healthy_after: Annotated[Int, Field(ge=1)] = 2  # successes in a row
    breaker_after: Annotated[Int, Field(ge=1)] = 5  # restarts that did not bring health back
    breaker_reset: Seconds = 60.0  # open -> half-open: one more restart is tried
    # After a run starts, failed checks are not counted for this long (None: the runtime's
    # own, e.g. vLLM 600 s): a server loading a large model is not hung.
    start_period: Seconds | None = None


class WarmupConfig(_Strict):
    """The short generation fleetd runs on a new model before calling the change done."""

    enabled: Bool = True
    prompt: str = "Say hello."
    tokens: Annotated[Int, Field(ge=1, le=4096)] = 10
    timeout: Seconds = 300.0  # loading a large model from disk takes minutes


class ServiceConfig(_Strict):
    """A served model or app: what runs it, which containers are its, and its ladder."""

    runtime: RuntimeName
    # Host mode: the containers the service runs in (required). `mode: swarm`: services
    # of the stack, by their name in the stack file (default: the service's own name).
    containers: list[str] = Field(default_factory=list)
    watch: list[str] | None = None
    restart: list[str] | None = None
    ladder: Annotated[list[RungConfig], Field(min_length=1)]
    priority: Int = 0
    gpu: Annotated[Int, Field(ge=0)] | list[Annotated[Int, Field(ge=0)]] | None = None
    image: str | None = None
    port: Annotated[Int, Field(ge=1, le=65535)] | None = None
    model_env: str | None = None
    # The model name clients call, the same on every rung (default: the service's name).
    served_name: str | None = None
    environment: dict[str, str] = Field(default_factory=dict)
    # Extra arguments for a generated container's server, after fleetd's own (e.g. vLLM's
    # --enforce-eager or --trust-remote-code).
    args: list[str] = Field(default_factory=list)
    volumes: list[str] = Field(default_factory=list)
    healthcheck: str | None = None
    rules: list[RuleConfig] = Field(default_factory=list)
    endpoint: str | None = None  # the runtime's API, e.g. http://127.0.0.1:11434
    # Models one app uses one after another (runtimes that swap models in one server, as
    # Ollama does): instead of a ladder, the service is budgeted for its largest member.
    ensemble: Annotated[list[RungConfig], Field(min_length=2)] | None = None
    health: HealthConfig = HealthConfig()
    warmup: WarmupConfig = WarmupConfig()
    _name: str = PrivateAttr(default="")
    _written: list[RungConfig] = PrivateAttr(default_factory=list)

    @field_validator("served_name")
    @classmethod
    def _served(cls, value: str | None) -> str | None:
        if value is not None and not _MODEL_RE.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a model name clients can call (expected letters, digits "
                "and ._:/@+~- with no spaces)"
            )
        return value

    @field_validator("volumes")
    @classmethod
    def _volumes(cls, value: list[str]) -> list[str]:
        for i, entry in enumerate(value):
            try:
                check_volume(entry)
            except ValueError as e:  # at its own line: `volumes[i]`
                raise PydanticCustomError("fleetd", str(e), {"at": (i,)}) from None
        return value

    @field_validator("containers", "watch", "restart")
    @classmethod
    def _container_names(cls, value: list[str] | None) -> list[str] | None:
        for name in value or []:
            _check_name(name, "container name")
        return value

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and not _URL_RE.fullmatch(value):
            raise ValueError(
                f"{value!r} is not an endpoint (expected http://HOST:PORT, e.g. "
                "http://127.0.0.1:11434)"
            )
        return value.rstrip("/") if value else value

    @field_validator("model_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_RE.fullmatch(value):
            raise ValueError(f"{value!r} is not an environment variable name")
        return value

    @field_validator("environment")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _ENV_RE.fullmatch(name):
                raise ValueError(f"{name!r} is not an environment variable name")
        return value

    @model_validator(mode="before")
    @classmethod
    def _ensemble_stands_for_the_ladder(cls, data: Any) -> Any:
        """An ensemble service has no `ladder:`; a placeholder passes validation and is
        replaced by the ensemble's first member below."""
        if isinstance(data, dict) and "ensemble" in data:
            if "ladder" in data:
                raise ValueError("give `ladder:` or `ensemble:`, not both")
            data = {**data, "ladder": [{"model": "ensemble", "vram": 1}]}
        return data

    @model_validator(mode="after")
    def _ensemble_ladder(self) -> ServiceConfig:
        if self.ensemble is not None:
            if not spec_of(self.runtime).swaps_models:
                swappers = [s for s in REGISTRY.values() if s.swaps_models]
                names = " or ".join(s.name.value for s in swappers)
                titles = ", ".join(s.title for s in swappers)
                raise ValueError(
                    f"an `ensemble:` needs runtime {names} (got {self.runtime.value}): only "
                    f"{titles} swaps between models in one server"
                )
            object.__setattr__(self, "ladder", [self.ensemble[0]])
        return self

    @model_validator(mode="after")
    def _rung_options_and_steps(self) -> ServiceConfig:
        """Each rung sets only the options its runtime understands; then the context steps
        expand into rungs of their own (`written_ladder` keeps the config's rungs)."""
        spec = spec_of(self.runtime)
        for i, rung in enumerate(self.ladder):
            _check_rung_options(spec, i, rung)
        for i, rung in enumerate(self.ensemble or []):
            _check_rung_options(spec, i, rung, "ensemble")
            if isinstance(rung.context_steps, list):
                raise PydanticCustomError(
                    "fleetd",
                    "context steps on an ensemble member (expected one context: an ensemble "
                    "is one rung)",
                    {"at": ("ensemble", i, "context")},
                )
        for i, flag_ in enumerate(self.args):
            name = flag_.split("=", 1)[0]
            if name in spec.rung_flags:
                raise PydanticCustomError(
                    "fleetd",
                    f"{flag_!r}: fleetd sets {name} from the running rung (expected the "
                    "rung's options instead: context, parallel, kv_cache, tensor_parallel, "
                    "and `served_name:` for the name clients call)",
                    {"at": ("args", i)},
                )
        self._written = list(self.ladder)
        object.__setattr__(self, "ladder", [r for w in self.ladder for r in w.expanded()])
        return self

    @property
    def written_ladder(self) -> list[RungConfig]:
        """The ladder as the config wrote it (context steps not yet expanded)."""
        return self._written or self.ladder

    @property
    def client_name(self) -> str:
        """The name clients call: `served_name:`, else the service's name (set by the fleet)."""
        return self.served_name or self._name

    @model_validator(mode="after")
    def _image_when_no_default(self) -> ServiceConfig:
        if spec_of(self.runtime).needs_image and self.image is None:
            raise ValueError(
                f"a `{self.runtime.value}` service needs `image:` (the app's container image; "
                "fleetd has no default for it)"
            )
        return self

    @property
    def pinned_gpus(self) -> frozenset[int] | None:
        if self.gpu is None:
            return None
        return frozenset([self.gpu] if isinstance(self.gpu, int) else self.gpu)

    @property
    def watched(self) -> list[str]:
        return self.watch if self.watch is not None else self.containers

    @property
    def restarted(self) -> list[str]:
        return self.restart if self.restart is not None else self.containers


class GpuDeclaration(_Strict):
    """A GPU declared in the config instead of discovered through NVML."""

    name: str = "declared GPU"
    memory: SizeBytes

    @field_validator("memory")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value <= 0:
            raise ValueError(f"{value!r} is not a positive size")
        return value


class PolicyConfig(_Strict):
    """When incidents step a service down, and how long fleetd waits after a change."""

    incidents_to_step_down: Annotated[Int, Field(ge=1)] = 3
    incident_window: Seconds = 600.0
    cooldown: Seconds = 60.0
    burst_window: Seconds = 2.0
    stop_timeout: Seconds = 10.0
    # Stepping back up: after this long without incidents (0: never by time), and/or at
    # the times of a cron expression (an off-peak window), one rung on probation.
    step_up_after: Seconds = 86400.0
    step_up_at: str | None = None
    probation: Seconds = 1800.0

    @field_validator("step_up_at")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(value, timezone="UTC")
        except ValueError as e:
            raise ValueError(
                f"{value!r} is not a cron expression ({e}; expected 5 fields: minute hour "
                "day month weekday, e.g. '0 3 * * *' for 03:00 UTC)"
            ) from None
        return value


class MetricsConfig(_Strict):
    """The Prometheus endpoint `fleetd run` serves (docs/observability.md)."""

    enabled: Bool = True
    address: ListenAddress = DEFAULT_METRICS_ADDRESS

    @property
    def host(self) -> str:
        return parse_address(self.address)[0]

    @property
    def port(self) -> int:
        return parse_address(self.address)[1]


class SwarmConfig(_Strict):
    """`mode: swarm`: the stack the fleet is deployed as (`docker stack deploy -c
    stack.yml STACK`); Swarm names each service `STACK_<name>`."""

    stack: Annotated[str, AfterValidator(lambda v: _check_stack(v))] = "fleet"


def _check_stack(value: str) -> str:
    if not _STACK_RE.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a stack name (expected a letter or digit, then letters, "
            "digits, '_' or '-', at most 63 characters)"
        )
    return value


_STACK_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_-]{0,62}$")


class FleetConfig(_Strict):
    """The whole `fleet.yaml`."""

    # host: one Docker host, containers by name (compose). swarm: fleetd on a Swarm
    # manager supervises the stack's services (docs/swarm.md).
    mode: Literal["host", "swarm"] = "host"
    swarm: SwarmConfig = SwarmConfig()
    budget: Annotated[Float, Field(gt=0, le=1)] = 0.85
    # What runs the models: NVIDIA GPUs, or the CPUs (a CPU-only host: fleetd plans against
    # host memory and generates containers without GPU reservations; docs/runtimes.md).
    accelerator: Literal["nvidia", "cpu"] = "nvidia"
    gpus: Annotated[Literal["auto"] | list[GpuDeclaration], _at_most(MAX_GPUS, "GPUs")] = "auto"
    ollama_instances_per_gpu: Literal["auto"] | Annotated[Int, Field(ge=1)] = "auto"
    compose_dir: Path | None = None  # where `fleetctl generate` wrote; its .env is kept current
    # A kernel log fleetd follows for GPU faults (`NVRM: Xid`, off the bus): /dev/kmsg,
    # /var/log/kern.log; none by default (NVML's Xid events are watched anyway).
    kernel_log: Path | None = None
    policy: PolicyConfig = PolicyConfig()
    metrics: MetricsConfig = MetricsConfig()
    services: Annotated[dict[ServiceName, ServiceConfig], _at_most(MAX_SERVICES, "services")]
    _source: Path = PrivateAttr(default=Path("fleet.yaml"))

    @model_validator(mode="after")
    def _handoff_variables_distinct(self) -> FleetConfig:
        """Each service's model reaches a generated `.env` under its own variable: names
        that differ only in case or in '-', '.', '_' would share one (and run one
        service's model in the other)."""
        owner: dict[str, str] = {}
        for name in self.services:
            variable = model_env_var(name)
            if variable in owner:
                raise PydanticCustomError(
                    "fleetd",
                    f"services {owner[variable]!r} and {name!r} would share the variable "
                    f"{variable} that hands a generated container its model (expected names "
                    "that differ in more than case and '-', '.', '_')",
                    {"at": ("services", name)},
                )
            owner[variable] = name
        return self

    @model_validator(mode="after")
    def _services_named(self) -> FleetConfig:
        for name, service in self.services.items():
            service._name = name
        return self

    @model_validator(mode="after")
    def _containers_by_mode(self) -> FleetConfig:
        """Host mode names each service's containers; in swarm mode a service is, by
        default, the stack's service of the same name."""
        for name, service in self.services.items():
            if service.containers:
                continue
            if self.mode == "swarm":
                object.__setattr__(service, "containers", [name])
                continue
            given = "got []" if "containers" in service.model_fields_set else "missing"
            raise PydanticCustomError(
                "fleetd",
                f"{given}: expected at least 1 name of a container this service runs in, e.g. "
                f"containers: [{name}] (only `mode: swarm` defaults them)",
                {"at": ("services", name, "containers")},
            )
        return self

    def swarm_service(self, name: str) -> str:
        """The Swarm service a stack service `name` is deployed as: `STACK_name`."""
        return f"{self.swarm.stack}_{name}"

    @model_validator(mode="after")
    def _containers_unique(self) -> FleetConfig:
        owner: dict[str, str] = {}
        for name, service in self.services.items():
            for container in service.containers:
                if container in owner:
                    raise ValueError(
                        f"container {container!r} belongs to both {owner[container]!r} and "
                        f"{name!r} (expected each container in one service)"
                    )
                owner[container] = name
        return self

    @property
    def source(self) -> Path:
        return self._source

    def resolve(self, path: Path) -> Path:
        """A path from the config, relative to the config file's folder."""
        return path if path.is_absolute() else self._source.parent / path


def load_config(path: Path) -> FleetConfig:
    """Read and validate a fleet config; every problem is reported in one ConfigError."""
    data, lines = load_yaml_with_lines(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: expected a mapping with at least `services:`")
    try:
        config = FleetConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_report(_relevant(e.errors()), lines, path)) from None
    config._source = path
    return config


def _relevant(errors: list[ErrorDetails]) -> list[ErrorDetails]:
    """Drop a union branch's complaint when another branch got further into the value.

    `gpus: [{memroy: 12GiB}]` fails both as `'auto'` and as a list; only the list's
    complaint about `memroy` helps the reader.
    """
    paths = [_yaml_path(error["loc"]) for error in errors]
    return [
        error
        for error, at in zip(errors, paths, strict=True)
        if _yaml_path(error["loc"]) == error["loc"]
        or not any(len(other) > len(at) and other[: len(at)] == at for other in paths)
    ]


MAX_KEYS_REPORTED = 20  # a file of thousands of mistakes is read no further than this


def _report(errors: list[ErrorDetails], lines: dict[KeyPath, int], path: Path) -> str:
    """One line per bad key; a union's alternatives merge (`expected 'auto' or a list`)."""
    by_key: dict[str, list[str]] = {}
    left_out: set[str] = set()
    for error in errors:
        at = _yaml_path(error["loc"]) + tuple((error.get("ctx") or {}).get("at", ()))
        line = line_of(lines, at)
        where = f"{path}:{line}" if line is not None else str(path)
        key = f"{where}: {dotted(at)}"
        if key not in by_key and len(by_key) == MAX_KEYS_REPORTED:
            left_out.add(key)
            continue
        by_key.setdefault(key, []).append(_explain(error, at))
    report = [f"{key}: {_merge(reasons)}" for key, reasons in by_key.items()]
    if left_out:
        report.append(f"{path}: and {len(left_out)} more keys with problems")
    return "\n".join(report)


def _merge(reasons: list[str]) -> str:
    got = reasons[0].split("; expected ")[0]
    if len(reasons) > 1 and all(r.startswith(got + "; expected ") for r in reasons):
        return f"{got}; expected " + " or ".join(r.split("; expected ", 1)[1] for r in reasons)
    return "; ".join(dict.fromkeys(reasons))


def _yaml_path(loc: tuple[int | str, ...]) -> KeyPath:
    # pydantic adds entries for union members and dict keys; keep only real YAML keys.
    skip = {"[key]", "literal['auto']", "list[GpuDeclaration]", "int", "list[int]"}
    return tuple(
        p
        for p in loc
        if not (isinstance(p, str) and (p in skip or "[" in p or p.startswith("constrained-")))
    )


def _explain(error: ErrorDetails, at: KeyPath) -> str:
    kind, message, value = error["type"], error["msg"], error.get("input")
    if kind == "value_error":
        return message.removeprefix("Value error, ")
    if kind == "fleetd":  # fleetd's own check, at a key below the model that made it
        return message
    if kind == "missing":
        return "missing (this key is required)"
    if kind == "extra_forbidden":
        allowed = ", ".join(_allowed_keys(at[:-1]))
        return f"unknown key (expected one of: {allowed})"
    if kind == "too_short":
        return f"got {_show(value)}; expected at least {error['ctx']['min_length']} item(s)"
    expected = message.removeprefix("Input should be ").removeprefix("Input ")
    return f"got {_show(value)}; expected {expected}"


def _show(value: object) -> str:
    """A value as the report quotes it: long ones cut, big byte counts also as a size."""
    text = repr(value) if not isinstance(value, int) or value < 10**60 else f"{str(value)[:20]}..."
    if len(text) > 60:
        text = text[:57] + "..."
    if isinstance(value, int) and not isinstance(value, bool) and 1024**2 < value <= 2**50:
        return f"{text} ({format_size(value)})"
    return text


def _allowed_keys(at: KeyPath) -> list[str]:
    """The keys a mapping at this path accepts, found by walking the annotations."""
    annotation: Any = FleetConfig
    for part in at:
        annotation = _child(annotation, part)
    model = _child(annotation, None)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return []
    return sorted(field.alias or name for name, field in model.model_fields.items())


def _child(annotation: Any, part: str | int | None) -> Any:
    """Step from a type to the type of its `part` (None: the model itself, if any)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if part is None:
            return annotation
        fields = {f.alias or n: f for n, f in annotation.model_fields.items()}
        field = fields.get(str(part))
        return field.annotation if field is not None else None
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list and isinstance(part, int):
        return args[0]
    if origin is dict and isinstance(part, str):
        return args[1]
    if origin in (Union, types.UnionType, Annotated):
        for arg in args:
            found = _child(arg, part)
            if found is not None:
                return found
    return None
