"""Render the plan into a compose project (compose.yml + .env) from Jinja templates.

Safety: every `{{ }}` in a template must pass through `q` (a JSON-quoted scalar, which
is valid YAML, with `$` doubled so compose does not interpolate it) or be a number; the
environment's `finalize` refuses any other value. The rendered YAML is then parsed back
and compared with what was meant, so no value can change the file's structure.

A Swarm stack (`build_stack`) comes from the same runtime templates: each service is
placed on its planned node by ID, sees its planned GPUs by UUID through
NVIDIA_VISIBLE_DEVICES, and carries its rung as environment variables (the ones a service
update changes), since a node has no hand-off folder fleetd could write (docs/swarm.md).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from supervisor import __version__
from supervisor.core.config import ServiceConfig, check_volume, model_env_var
from supervisor.core.endpoints import host_ports
from supervisor.core.errors import RenderError
from supervisor.core.plan import FleetPlan, GpuPlan, ServicePlan
from supervisor.core.rungs import SWARM_MODEL_VARIABLE, RungSetup, setup_for
from supervisor.core.runtimes import RungOptions, RuntimeSpec, spec_of

if TYPE_CHECKING:  # jinja2 loads when a compose file is rendered, not before
    import jinja2

HANDOFF_DIR = "/run/fleetd"  # the start scripts in supervisor/runtimes/ read model from here


class Quoted(str):
    """A value already rendered as a safe YAML scalar."""


@dataclass(frozen=True)
class Healthcheck:
    test: list[str]
    interval: str = "30s"
    timeout: str = "10s"
    retries: int = 3
    start_period: str = "60s"


@dataclass(frozen=True)
class RenderedService:
    name: str
    template: str
    runtime: str
    container: str
    image: str
    gpu: int
    model: str
    handoff_mount: Quoted
    gpus: tuple[int, ...] = ()  # every GPU reserved (a tensor-parallel rung's); gpu first
    args: list[str] = field(default_factory=list)
    environment: list[tuple[str, Quoted]] = field(default_factory=list)
    volumes: list[Quoted] = field(default_factory=list)
    port_mapping: str | None = None
    start_script: str | None = None
    healthcheck: Healthcheck | None = None
    gpu_reservation: bool = True  # False on a CPU-only host (`accelerator: cpu`)
    shm_size: str | None = None
    # A Swarm stack's service (`build_stack`): its node, its port, its rolling update.
    node_id: str | None = None
    published_port: PublishedPort | None = None
    handoff_tmpfs: bool = False  # /run/fleetd as a tmpfs the start script fills from env
    update_order: str = "start-first"


@dataclass(frozen=True)
class PublishedPort:
    """A stack service's port, published on its node only (Swarm's `mode: host`)."""

    target: int
    published: int


@dataclass(frozen=True)
class StackFile:
    """A rendered Swarm stack: the file, each placed service's rung and node, and the
    services left out."""

    stack_yaml: str
    setups: dict[str, RungSetup]
    nodes: dict[str, str]  # service -> node ID
    skipped: list[str]


@dataclass(frozen=True)
class ComposeProject:
    compose_yaml: str
    env: dict[str, str]
    setups: dict[str, RungSetup]  # service -> its planned rung's hand-off
    skipped: list[str]  # services with no place in the plan

    @property
    def models(self) -> dict[str, str]:
        return {name: setup.model for name, setup in self.setups.items()}


def quote(value: object) -> Quoted:
    """A YAML double-quoted scalar (JSON is valid YAML) with `$` escaped for compose."""
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise RenderError(f"cannot render {value!r} into a compose file")
    return Quoted(_json_yaml(str(value).replace("$", "$$")))


def quote_raw(value: object) -> Quoted:
    """A quoted scalar whose `${VAR}` compose must interpolate (fleetd's own values only)."""
    return Quoted(_json_yaml(str(value)))


# YAML reads U+0085/U+2028/U+2029 as line breaks and refuses DEL, C1 controls, surrogates
# and U+FFFE/F; JSON leaves them raw with ensure_ascii=False, so escape them as \uXXXX.
_YAML_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\ufeff\ud800-\udfff\ufffe\uffff]")


def _json_yaml(text: str) -> str:
    """A JSON string that YAML reads back unchanged (astral characters stay single)."""
    encoded = json.dumps(text, ensure_ascii=False)
    return _YAML_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", encoded)


def _finalize(value: object) -> object:
    if isinstance(value, Quoted) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise RenderError(f"template printed an unquoted value {value!r}; pipe it through `q`")


def default_template_dir() -> Path:
    """`templates/` of the checkout when run from one, else the copy inside the package."""
    checkout = Path(__file__).resolve().parents[2] / "templates"  # supervisor/analyzer/
    if (checkout / "compose.yml.j2").is_file():
        return checkout
    return Path(str(resources.files("supervisor") / "templates"))


def template_environment(template_dir: Path | None = None) -> jinja2.Environment:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir or default_template_dir())),
        undefined=jinja2.StrictUndefined,
        finalize=_finalize,
        autoescape=False,  # YAML, not HTML: `q` does the escaping
        keep_trailing_newline=True,
    )
    env.filters["q"] = quote
    env.filters["qraw"] = quote_raw
    return env


_SAFE_ENV_VALUE = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_./:@+~-"
)


# Held while a generated .env is read and rewritten: fleetd applies changes of several
# services at once, each in its own worker, and two of them reading the .env before either
# writes it would lose one service's model.
ENV_FILE_LOCK = threading.Lock()


def env_file_text(text: str, service: str, model: str) -> str:
    """A generated .env's text with FLEETD_<SERVICE>_MODEL set to `model`, every other
    line kept."""
    key = model_env_var(service)
    _check_env_value(f".env {key}", model)
    lines = [line for line in text.splitlines() if not line.startswith(f"{key}=")]
    return "\n".join([*lines, f"{key}={model}"]) + "\n"


def build_project(
    plan: FleetPlan, state_dir: Path, template_dir: Path | None = None
) -> ComposeProject:
    """Render the compose project for the placed services of a plan."""
    placed = [s for s in plan.services.values() if s.rung is not None and s.gpu is not None]
    ports = host_ports(plan.config)
    services = [_service(s, plan, ports.get(s.name)) for s in placed]
    volumes = sorted({_volume_source(v) for s in services for v in s.volumes if _is_named(v)})
    env = {"FLEETD_STATE_DIR": str(state_dir)}
    env.update({model_env_var(s.name): s.model for s in services})
    for name, value in env.items():  # .env has no quoting that compose v1 and v2 agree on
        _check_env_value("state dir" if name == "FLEETD_STATE_DIR" else f".env {name}", value)
    if ":" in str(state_dir):  # it becomes the source of a `src:dst:ro` mount
        raise RenderError(
            f"state dir {str(state_dir)!r} contains ':', which a bind mount cannot carry"
        )
    if not services:
        raise RenderError("no service is placed, so there is nothing to generate")
    text = _render(template_dir, plan, services, volumes)
    _verify(text, services, volumes)
    skipped = sorted(n for n, s in plan.services.items() if s.rung is None)
    setups = {s.name: _setup(s, plan) for s in placed}
    return ComposeProject(text, env, setups, skipped)


def _setup(svc: ServicePlan, plan: FleetPlan) -> RungSetup:
    """The planned rung's hand-off (its options reach the server through the start
    script, which reads them at every start)."""
    assert svc.rung is not None
    gpu_total = next((g.gpu.total_bytes for g in plan.gpus if g.gpu.index == svc.gpu), None)
    return setup_for(plan.config, svc.name, svc.rung, svc.need_bytes or 0, gpu_total)


def _render(
    template_dir: Path | None,
    plan: FleetPlan,
    services: list[RenderedService],
    volumes: list[str],
    swarm: bool = False,
) -> str:
    import jinja2

    try:
        name = "stack.yml.j2" if swarm else "compose.yml.j2"
        template = template_environment(template_dir).get_template(name)
        return template.render(
            version=__version__,
            config_path=str(plan.config.source),
            gpus=[_gpu_label(g) for g in plan.gpus],
            services=services,
            volumes=volumes,
            swarm=swarm,
        )
    except jinja2.TemplateSyntaxError as e:
        raise RenderError(f"template {e.filename or e.name}:{e.lineno}: {e.message}") from e
    except jinja2.TemplateError as e:
        raise RenderError(f"template error: {e.message}") from e


def _gpu_label(g: GpuPlan) -> dict[str, Any]:
    label = f"{g.gpu.name} ({g.gpu.total_bytes / 1024**3:.1f} GiB)"
    if g.site is not None:
        label = f"{g.where} {g.site.uuid}: {label}"
    return {"index": g.gpu.index, "label": label}


def _volume_source(volume: Quoted) -> str:
    return str(json.loads(volume)).split(":")[0]


def _is_named(volume: Quoted) -> bool:
    source = _volume_source(volume)
    return bool(source) and not source.startswith(("/", ".", "~", "$"))


def _service(svc: ServicePlan, plan: FleetPlan, host_port: int | None) -> RenderedService:
    assert svc.rung is not None and svc.gpu is not None and svc.model is not None
    config = svc.service
    spec = _generated_spec(svc)
    rung = config.ladder[svc.rung]
    gpu_total = next(g.gpu.total_bytes for g in plan.gpus if g.gpu.index == svc.gpu)
    on_cpu = plan.config.accelerator == "cpu"
    # The container's own settings; the rung's options are in the hand-off folder.
    options = RungOptions(rung.context, rung.parallel, svc.need_bytes or 0, gpu_total, on_cpu)
    container_port = spec.port if spec.port is not None else host_port
    own = {"FLEETD_MODEL_FILE": quote(f"{HANDOFF_DIR}/model")}
    if config.model_env:
        own[config.model_env] = quote_raw("${" + model_env_var(svc.name) + "}")
    for volume in config.volumes:  # the config checks these; a config built in code too
        try:
            check_volume(volume)
        except ValueError as e:
            raise RenderError(f"service {svc.name!r}: volumes: {e}") from None
    clash = sorted(set(own) & set(config.environment))
    if clash:
        raise RenderError(
            f"service {svc.name!r}: environment sets {clash[0]}, which fleetd "
            "sets itself for the model hand-off"
        )
    # The config's environment overrides the runtime defaults (e.g. OLLAMA_KEEP_ALIVE).
    merged = {**dict(spec.env(options)), **dict(sorted(config.environment.items()))}
    env = list(own.items()) + [(k, quote(v)) for k, v in merged.items()]
    image = config.image or spec.image
    assert image is not None  # the config requires `image:` where the runtime has none
    return RenderedService(
        name=svc.name,
        template=spec.template or "",
        runtime=spec.name.value,
        container=config.containers[0],
        image=image,
        gpu=svc.gpu,
        gpus=svc.gpus or (svc.gpu,),
        model=svc.model,
        handoff_mount=quote_raw("${FLEETD_STATE_DIR}/services/" + svc.name + f":{HANDOFF_DIR}:ro"),
        args=[*spec.args(options), *config.args],
        environment=env,
        volumes=[quote(v.format(service=svc.name)) for v in spec.volumes]
        + [quote_raw(v) for v in config.volumes],  # written by ops: ${VAR} is theirs
        port_mapping=f"127.0.0.1:{host_port}:{container_port}" if host_port else None,
        start_script=spec.start_script,
        healthcheck=_healthcheck(spec, config.healthcheck),
        gpu_reservation=not on_cpu,
        shm_size=spec.shm_size,
    )


def _generated_spec(svc: ServicePlan) -> RuntimeSpec:
    """The runtime's spec; RenderError where fleetd has no template for it."""
    spec = spec_of(svc.service.runtime)
    if not spec.generated:
        raise RenderError(
            f"service {svc.name!r}: fleetd does not generate {spec.title} containers "
            f"(runtime {spec.name.value}); run it yourself and let fleetd watch and restart "
            "it (see docs/runtimes.md), or leave it out of the config you generate from"
        )
    return spec


def _healthcheck(spec: RuntimeSpec, custom: str | None) -> Healthcheck | None:
    if custom:
        return Healthcheck(test=["CMD-SHELL", custom])
    check = spec.container_check
    if check is None:
        return None
    return Healthcheck(test=list(check.test), start_period=check.start_period)


def _check_env_value(what: str, value: str) -> None:
    if not value or not set(value) <= _SAFE_ENV_VALUE:
        raise RenderError(
            f"{what} {value!r} cannot be written to .env safely "
            "(expected letters, digits and _./:@+~- only)"
        )


def _verify(
    text: str, services: list[RenderedService], volumes: list[str], swarm: bool = False
) -> None:
    """Parse the rendered file back: its structure and values must be exactly the plan's."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RenderError(f"rendered compose file is not valid YAML: {e}") from e
    expected_top = {"services"} | ({"volumes"} if volumes else set())
    if not isinstance(doc, dict) or set(doc) != expected_top:
        raise RenderError(f"rendered compose file has top-level keys {sorted(doc or {})}")
    if list(doc["services"]) != [s.name for s in services]:
        raise RenderError(f"rendered services {list(doc['services'])} differ from the plan")
    for svc in services:
        _verify_service(doc["services"][svc.name], svc, swarm)


def _verify_service(got: dict[str, Any], svc: RenderedService, swarm: bool = False) -> None:
    escaped = {k: json.loads(v) for k, v in svc.environment}
    checks: list[tuple[str, object, object]] = [
        ("image", got.get("image"), svc.image.replace("$", "$$")),
        ("environment", got.get("environment"), escaped),
        ("command", got.get("command"), [a.replace("$", "$$") for a in svc.args] or None),
    ]
    if swarm:
        checks += _stack_checks(got, svc)
    else:
        checks += [
            ("container_name", got.get("container_name"), svc.container),
            (
                "gpu",
                _reserved_gpus(got),
                [str(g) for g in svc.gpus or (svc.gpu,)] if svc.gpu_reservation else None,
            ),
        ]
    for key, value, want in checks:
        if value != want:
            raise RenderError(f"service {svc.name!r}: rendered {key} {value!r}, expected {want!r}")


def _stack_checks(got: dict[str, Any], svc: RenderedService) -> list[tuple[str, object, object]]:
    """A stack service runs on its node by ID, under no container name, with no device
    reservation (Swarm refuses one) and fleetd's labels on the service."""
    deploy = got.get("deploy") or {}
    labels = {
        "org.fleetd.managed": "true",
        "org.fleetd.service": svc.name,
        "org.fleetd.runtime": svc.runtime,
    }
    return [
        ("container_name", got.get("container_name"), None),
        ("placement", deploy.get("placement"), {"constraints": [f"node.id == {svc.node_id}"]}),
        ("deploy.resources", deploy.get("resources"), None),
        ("deploy.labels", deploy.get("labels"), labels),
        ("labels", got.get("labels"), labels),
    ]


def _reserved_gpus(got: dict[str, Any]) -> object:
    """The device ids a rendered service reserves; None when it reserves no GPU."""
    if "deploy" not in got:
        return None
    return got["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]


# --- a Swarm stack ----------------------------------------------------------------------

# What a stack service's start script does first: a task's node has no hand-off folder
# fleetd writes, so the script fills the tmpfs at /run/fleetd from the rung's variables
# (the model, and FLEETD_ARGS one argument per line), then runs the runtime's own start
# script unchanged. MODEL_VARIABLE stands for the variable that holds the model.
STACK_PREAMBLE = (
    "d=/run/fleetd; mkdir -p $d && printf '%s\\n' \"${MODEL_VARIABLE}\" > $d/model && "
    ": > $d/args && set -f && for a in ${FLEETD_ARGS-}; do printf '%s\\n' \"$a\" >> $d/args; "
    "done; set +f; "
)


def stack_model_variable(service: ServiceConfig) -> str:
    """The variable a stack service's model is in: `model_env:`, else FLEETD_MODEL (the one
    fleetd's service update changes, supervisor/daemon/handoff.py)."""
    return service.model_env or SWARM_MODEL_VARIABLE


def build_stack(plan: FleetPlan, template_dir: Path | None = None) -> StackFile:
    """Render a Swarm stack for the placed services of a plan made across Swarm nodes."""
    if not plan.on_swarm:
        raise RenderError("a stack needs a plan across Swarm nodes (fleetctl plan --swarm)")
    placed = [s for s in plan.services.values() if s.rung is not None and s.gpu is not None]
    if not placed:
        raise RenderError("no service is placed, so there is nothing to generate")
    ports = host_ports(plan.config)
    services = [_stack_service(s, plan, ports.get(s.name)) for s in placed]
    volumes = sorted({_volume_source(v) for s in services for v in s.volumes if _is_named(v)})
    text = _render(template_dir, plan, services, volumes, swarm=True)
    _verify_stack(text, services, volumes)
    skipped = sorted(n for n, s in plan.services.items() if s.rung is None)
    setups = {s.name: _setup(s, plan) for s in placed}
    nodes = {s.name: s.node_id or "" for s in services}
    return StackFile(text, setups, nodes, skipped)


def _stack_service(svc: ServicePlan, plan: FleetPlan, host_port: int | None) -> RenderedService:
    """The compose service, turned into a stack service: pinned to its node and GPUs by
    ID and UUID, its rung in its environment."""
    import dataclasses

    base = _service(svc, plan, host_port)
    sites = [plan.gpu_plan(g).site for g in base.gpus]
    assert all(sites) and len({s.node_id for s in sites if s}) == 1  # the planner's groups
    spec = spec_of(svc.service.runtime)
    model_var = stack_model_variable(svc.service)
    own: dict[str, Quoted] = {}
    if base.gpu_reservation:
        own["NVIDIA_VISIBLE_DEVICES"] = quote(",".join(s.uuid for s in sites if s))
    rung_vars = _setup(svc, plan).variables(model_var)
    own.update({k: quote(v) for k, v in rung_vars.items() if v is not None})
    theirs = [(k, v) for k, v in base.environment if k not in {"FLEETD_MODEL_FILE", model_var}]
    clash = sorted(set(own) & {k for k, _ in theirs})
    if clash:
        raise RenderError(
            f"service {svc.name!r}: environment sets {clash[0]}, which a stack service "
            "gets from its plan (its GPUs or its rung)"
        )
    script = (
        STACK_PREAMBLE.replace("MODEL_VARIABLE", model_var) + spec.start_script
        if spec.start_script
        else None
    )
    port = None
    if base.port_mapping and host_port is not None:
        port = PublishedPort(int(base.port_mapping.rsplit(":", 1)[1]), host_port)
    return dataclasses.replace(
        base,
        environment=[*own.items(), *theirs],
        start_script=script,
        node_id=sites[0].node_id if sites[0] else None,
        published_port=port,
        handoff_tmpfs=script is not None,
        # Stop-first for a service on GPUs: two rungs at once may not fit the GPU (what the
        # ladder is there to avoid), and the update of a task that keeps failing (a step
        # down) races its restart: start-first can leave two tasks in one slot (seen on
        # Docker 20.10). And for a port published on the node: the old task holds it until
        # it stops, so a new task cannot start first there.
        update_order="stop-first" if port or base.gpu_reservation else "start-first",
    )


def _verify_stack(text: str, services: list[RenderedService], volumes: list[str]) -> None:
    """Parse the rendered stack back: structure and values must be exactly the plan's."""
    _verify(text, services, volumes, swarm=True)
