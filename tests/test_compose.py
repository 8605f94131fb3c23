"""Tests for supervisor.analyzer.compose: the compose project rendered from a plan (no Docker).

Plans come from real configs written to tmp_path, priced by the analyzer on simulated
GPUs. Values the config refuses (hostile model names, ...) reach the renderer through
`model_construct`/`model_copy`, which skip validation: the renderer must not rely on the
config alone to keep a value from changing the compose file's structure.
"""

from __future__ import annotations

import json
import math
import shutil
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.analyzer import analyze
from supervisor.analyzer.compose import (
    ComposeProject,
    build_project,
    default_template_dir,
    model_env_var,
    quote,
)
from supervisor.core.config import FleetConfig, RungConfig, load_config
from supervisor.core.errors import ConfigError, RenderError
from supervisor.core.gpus import Discovery, Gpu, simulated_gpus
from supervisor.core.plan import FleetPlan
from supervisor.core.rungs import setup_for

GIB = 1024**3
MIB = 1024**2
REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"

# Values that would change a YAML document's structure (or a shell's, or compose's
# interpolation) if printed raw.
HOSTILE = [
    'a"b',
    "a'b",
    "a: b",
    "${HOME}",
    "$HOME",
    "$(rm -rf /)",
    "&a",
    "*a",
    "# comment",
    "\n  evil: true",
    "a\nb",
    "{a: b}",
    "[a, b]",
    "- item",
    "a\\nb",
    "x\r\ny: 1",
    "tab\there",
    "'; evil: true; '",
    '"\n    privileged: true\n  "',
]


# --- helpers -------------------------------------------------------------------------


def ollama(container: str, *ladder: dict[str, Any], **extra: Any) -> dict[str, Any]:
    rungs = list(ladder) or [{"model": "llama3.2:3b", "vram": "2GiB"}]
    return {"runtime": "ollama", "containers": [container], "ladder": rungs, **extra}


def vllm(container: str, *ladder: dict[str, Any], **extra: Any) -> dict[str, Any]:
    rungs = list(ladder) or [{"model": "Qwen/Qwen2.5-3B-Instruct", "vram": "5GiB"}]
    return {"runtime": "vllm", "containers": [container], "ladder": rungs, **extra}


def llamacpp(container: str, *ladder: dict[str, Any], **extra: Any) -> dict[str, Any]:
    rungs = list(ladder) or [{"model": "/models/small.gguf", "vram": "2GiB"}]
    return {"runtime": "llamacpp", "containers": [container], "ladder": rungs, **extra}


def generic(container: str, *ladder: dict[str, Any], **extra: Any) -> dict[str, Any]:
    rungs = list(ladder) or [{"model": "org/app-model", "vram": "1GiB"}]
    fields = {"image": "registry.example.com/app:1", **extra}
    return {"runtime": "generic", "containers": [container], "ladder": rungs, **fields}


def load(tmp_path: Path, services: dict[str, Any], **top: Any) -> FleetConfig:
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({**top, "services": services}, sort_keys=False))
    return load_config(path)


def plan_for(config: FleetConfig, *sizes: str) -> FleetPlan:
    return analyze(config, Discovery(gpus=simulated_gpus(sizes)))


def render(
    plan: FleetPlan, state_dir: Path, template_dir: Path | None = None
) -> tuple[ComposeProject, dict[str, Any]]:
    project = build_project(plan, state_dir, template_dir)
    return project, yaml.safe_load(project.compose_yaml)


def with_service(config: FleetConfig, name: str, **update: Any) -> FleetConfig:
    """The config with one service's fields replaced, without validation."""
    service = config.services[name].model_copy(update=update)
    return with_services(config, {**config.services, name: service})


def with_services(config: FleetConfig, services: dict[str, Any]) -> FleetConfig:
    changed = config.model_copy(update={"services": services})
    changed._source = config.source
    return changed


def unescape(value: str) -> str:
    """What compose makes of a scalar: `$$` is a literal `$`; a lone `$` would interpolate."""
    out, i = [], 0
    while i < len(value):
        if value[i] == "$":
            assert value[i + 1 : i + 2] == "$", f"compose would interpolate {value!r}"
            i += 1
        out.append(value[i])
        i += 1
    return "".join(out)


def shape(node: Any) -> Any:
    """A document's structure: keys and list lengths, with every scalar blanked out."""
    if isinstance(node, dict):
        return {k: shape(v) for k, v in node.items()}
    if isinstance(node, list):
        return [shape(v) for v in node]
    return type(node).__name__


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate mapping keys (as compose v2's parser does)."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    keys = [loader.construct_object(k, deep=True) for k, _ in node.value]
    duplicates = sorted({str(k) for k in keys if keys.count(k) > 1})
    if duplicates:
        raise yaml.constructor.ConstructorError(
            None, None, f"duplicate keys {duplicates}", node.start_mark
        )
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _no_duplicates,  # type: ignore[arg-type]
)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def multi_gpu(state_dir: Path) -> tuple[FleetPlan, ComposeProject, dict[str, Any]]:
    """examples/multi-gpu.yaml on its two declared 16 GiB GPUs."""
    config = load_config(EXAMPLES / "multi-gpu.yaml")
    assert config.gpus != "auto"
    plan = analyze(config, Discovery(gpus=simulated_gpus(["16GiB", "16GiB"])))
    assert plan.all_placed
    project, doc = render(plan, state_dir)
    return plan, project, doc


# --- GPU pinning -----------------------------------------------------------------------


def test_every_service_reserves_exactly_its_planned_gpu(
    multi_gpu: tuple[FleetPlan, ComposeProject, dict[str, Any]],
) -> None:
    plan, _, doc = multi_gpu
    assert list(doc["services"]) == list(plan.services)
    used = set()
    for name, service_plan in plan.services.items():
        devices = doc["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [
            {"driver": "nvidia", "device_ids": [str(service_plan.gpu)], "capabilities": ["gpu"]}
        ]
        used.add(service_plan.gpu)
    assert used == {0, 1}, "the example spreads over both GPUs"


def test_a_pinned_service_lands_on_its_pinned_gpu(tmp_path: Path, state_dir: Path) -> None:
    config = load(tmp_path, {"a": ollama("a", gpu=1), "b": vllm("b", gpu=[0])})
    plan = plan_for(config, "16GiB", "16GiB")
    assert (plan.services["a"].gpu, plan.services["b"].gpu) == (1, 0)
    _, doc = render(plan, state_dir)
    for name, gpu in (("a", "1"), ("b", "0")):
        device = doc["services"][name]["deploy"]["resources"]["reservations"]["devices"][0]
        assert device["device_ids"] == [gpu]
        assert device["driver"] == "nvidia"
        assert device["capabilities"] == ["gpu"]


# --- host ports ------------------------------------------------------------------------


def _host_ports(doc: dict[str, Any]) -> dict[str, str]:
    return {name: svc["ports"][0] for name, svc in doc["services"].items() if "ports" in svc}


def test_three_ollama_services_get_consecutive_host_ports(tmp_path: Path, state_dir: Path) -> None:
    config = load(tmp_path, {n: ollama(n) for n in ("one", "two", "three")})
    plan = plan_for(config, "24GiB")  # a 24 GB card hosts three Ollama services
    assert plan.all_placed
    _, doc = render(plan, state_dir)
    # Allocated in name order, each to the container's own 11434, on loopback only.
    assert _host_ports(doc) == {
        "one": "127.0.0.1:11434:11434",
        "three": "127.0.0.1:11435:11434",
        "two": "127.0.0.1:11436:11434",
    }


def test_an_explicit_port_is_skipped_by_the_automatic_allocation(
    tmp_path: Path, state_dir: Path
) -> None:
    services = {"a": ollama("a"), "b": ollama("b", port=11434), "c": ollama("c")}
    plan = plan_for(load(tmp_path, services), "24GiB")
    _, doc = render(plan, state_dir)
    ports = _host_ports(doc)
    assert ports == {
        "a": "127.0.0.1:11435:11434",
        "b": "127.0.0.1:11434:11434",
        "c": "127.0.0.1:11436:11434",
    }
    host = [p.split(":")[1] for p in ports.values()]
    assert len(set(host)) == len(host)


def test_ports_never_collide_across_runtimes(tmp_path: Path, state_dir: Path) -> None:
    services = {
        "chat": ollama("chat"),
        "api": vllm("api"),
        "api2": vllm("api2", port=8001),
        "gguf": llamacpp("gguf", port=8000),  # takes vLLM's first automatic port
        "app": generic("app", port=9000),
        "quiet": generic("quiet"),  # no port asked, no default: not published
    }
    plan = plan_for(load(tmp_path, services), "48GiB")
    assert plan.all_placed
    _, doc = render(plan, state_dir)
    ports = _host_ports(doc)
    assert ports == {
        "chat": "127.0.0.1:11434:11434",
        "api": "127.0.0.1:8002:8000",
        "api2": "127.0.0.1:8001:8000",
        "gguf": "127.0.0.1:8000:8080",
        "app": "127.0.0.1:9000:9000",
    }
    assert "ports" not in doc["services"]["quiet"]


def test_two_services_asking_for_the_same_port_are_refused(tmp_path: Path, state_dir: Path) -> None:
    services = {"a": ollama("a", port=12000), "b": vllm("b", port=12000)}
    plan = plan_for(load(tmp_path, services), "24GiB")
    with pytest.raises(RenderError, match=r"'a'.*'b'.*12000"):
        build_project(plan, state_dir)


# --- runtime specifics -----------------------------------------------------------------


def test_ollama_environment_matches_the_rung(tmp_path: Path, state_dir: Path) -> None:
    services = {
        "plain": ollama("plain"),
        "busy": ollama("busy", {"model": "llama3.2:3b", "vram": "3GiB", "parallel": 4}),
        "long": ollama("long", {"model": "qwen2.5:0.5b", "vram": "1GiB", "context": 16384}),
    }
    plan = plan_for(load(tmp_path, services), "24GiB")
    project, doc = render(plan, state_dir)
    env = {name: _started_env(doc, name, project) for name in doc["services"]}
    for name in services:
        assert env[name]["OLLAMA_MAX_LOADED_MODELS"] == "1"
        assert env[name]["OLLAMA_KEEP_ALIVE"] == "-1"
        assert env[name]["OLLAMA_HOST"] == "0.0.0.0:11434"
        assert env[name]["FLEETD_MODEL_FILE"] == "/run/fleetd/model"
        assert all(isinstance(v, str) for v in env[name].values()), "compose wants strings"
    assert env["plain"]["OLLAMA_NUM_PARALLEL"] == "1"
    assert env["busy"]["OLLAMA_NUM_PARALLEL"] == "4"
    assert env["long"]["OLLAMA_CONTEXT_LENGTH"] == "16384"
    assert "OLLAMA_CONTEXT_LENGTH" not in env["plain"]


def test_ollama_follows_the_chosen_rung_not_the_first(tmp_path: Path, state_dir: Path) -> None:
    ladder = [
        {"model": "big:70b", "vram": "40GiB", "parallel": 8},
        {"model": "small:3b", "vram": "2GiB", "parallel": 2},
    ]
    plan = plan_for(load(tmp_path, {"a": ollama("a", *ladder)}), "12GiB")
    assert plan.services["a"].rung == 1
    project, doc = render(plan, state_dir)
    assert _started_env(doc, "a", project)["OLLAMA_NUM_PARALLEL"] == "2"
    assert "OLLAMA_NUM_PARALLEL" not in doc["services"]["a"]["environment"], (
        "the rung's, not compose's"
    )
    assert project.models == {"a": "small:3b"}
    assert project.env["FLEETD_A_MODEL"] == "small:3b"


def _vllm_args(
    doc: dict[str, Any], name: str, project: ComposeProject | None = None
) -> dict[str, str]:
    """The server's flags as it starts: the compose command, then the hand-off's `args`."""
    command = list(doc["services"][name]["command"])
    if project is not None:
        command += list(project.setups[name].args)
    return {k: v for k, v in zip(command[::2], command[1::2], strict=True)}


def _started_env(doc: dict[str, Any], name: str, project: ComposeProject) -> dict[str, str]:
    """The server's environment as it starts: compose's, then the hand-off's `env`."""
    return {**doc["services"][name]["environment"], **dict(project.setups[name].env)}


@pytest.mark.parametrize(
    ("need", "gpu"),
    [
        ("9GiB", "16GiB"),  # 0.5625 -> 0.57
        ("3GiB", "12GiB"),  # exactly 0.25
        ("5GiB", "24GiB"),  # 0.2083 -> 0.21
        ("1000MiB", "8GiB"),  # 0.1220 -> 0.13
        ("7GiB", "25GiB"),  # exactly 0.28 (floats would say 28.000000000000004 -> 0.29)
        ("44GiB", "80GiB"),  # exactly 0.55 (an H100 80GB)
    ],
)
def test_vllm_memory_share_is_need_over_total_rounded_up(
    tmp_path: Path, state_dir: Path, need: str, gpu: str
) -> None:
    rung = {"model": "Qwen/Qwen2.5-7B-Instruct", "vram": need, "context": 8192}
    plan = plan_for(load(tmp_path, {"api": vllm("api", rung)}), gpu)
    assert plan.services["api"].need_bytes is not None
    project, doc = render(plan, state_dir)
    args = _vllm_args(doc, "api", project)
    total = plan.gpus[0].gpu.total_bytes
    exact = Fraction(plan.services["api"].need_bytes, total)
    want = math.ceil(exact * 100)  # rounded up to whole percent, in exact arithmetic
    assert args["--gpu-memory-utilization"] == f"{want / 100:.2f}"
    assert Fraction(args["--gpu-memory-utilization"]) >= exact, "never less than the need"
    assert args["--max-model-len"] == "8192"
    assert args["--port"] == "8000"


def test_vllm_share_is_capped_and_context_optional(tmp_path: Path, state_dir: Path) -> None:
    rung = {"model": "org/whole-gpu", "vram": "16GiB"}  # no context
    plan = plan_for(load(tmp_path, {"api": vllm("api", rung)}, budget=1.0), "16GiB")
    assert plan.services["api"].rung == 0
    project, doc = render(plan, state_dir)
    args = _vllm_args(doc, "api", project)
    assert args["--gpu-memory-utilization"] == "0.99"
    assert "--max-model-len" not in args


def test_llamacpp_args_match_the_rung(tmp_path: Path, state_dir: Path) -> None:
    services = {
        "tuned": llamacpp(
            "tuned", {"model": "/m/a.gguf", "vram": "3GiB", "context": 8192, "parallel": 2}
        ),
        "plain": llamacpp("plain"),
    }
    plan = plan_for(load(tmp_path, services), "24GiB")
    project, doc = render(plan, state_dir)
    for name, ctx, slots in (("tuned", "8192", "2"), ("plain", "4096", "1")):
        args = _vllm_args(doc, name, project)
        assert args["-ngl"] == "999", "every layer on the GPU"
        assert args["-c"] == ctx
        assert args["-np"] == slots
        assert args["--port"] == "8080"
        entrypoint = doc["services"][name]["entrypoint"]
        assert entrypoint[:2] == ["/bin/sh", "-c"]
        assert "/run/fleetd/model" in entrypoint[2]


def test_healthchecks_are_present_per_runtime(
    multi_gpu: tuple[FleetPlan, ComposeProject, dict[str, Any]],
) -> None:
    _, _, doc = multi_gpu
    checks = {name: svc["healthcheck"] for name, svc in doc["services"].items()}
    assert checks["chat"]["test"] == ["CMD-SHELL", "ollama list >/dev/null 2>&1 || exit 1"]
    assert checks["openai"]["test"] == ["CMD", "curl", "-fsS", "http://127.0.0.1:8000/health"]
    # llama.cpp: curl where the image has it (upstream's), else bash's /dev/tcp (Debian's).
    kind, script = checks["coder"]["test"]
    assert kind == "CMD-SHELL"
    assert script.startswith("curl -fsS http://127.0.0.1:8080/health || bash -c ")
    assert "/dev/tcp/127.0.0.1/8080" in script and "GET /health" in script
    assert checks["summarizer"]["test"] == [
        "CMD-SHELL",
        "wget -qO- http://127.0.0.1:9000/healthz || exit 1",
    ]
    for check in checks.values():
        assert set(check) == {"test", "interval", "timeout", "retries", "start_period"}
        assert isinstance(check["retries"], int)
    assert checks["openai"]["start_period"] == "600s", "big models take minutes to load"


def test_a_generic_service_without_healthcheck_has_none(tmp_path: Path, state_dir: Path) -> None:
    plan = plan_for(load(tmp_path, {"app": generic("app")}), "8GiB")
    _, doc = render(plan, state_dir)
    assert "healthcheck" not in doc["services"]["app"]
    assert doc["services"]["app"]["image"] == "registry.example.com/app:1"


def test_restart_logging_and_labels_on_every_service(
    multi_gpu: tuple[FleetPlan, ComposeProject, dict[str, Any]],
) -> None:
    plan, _, doc = multi_gpu
    for name, svc in doc["services"].items():
        assert svc["restart"] == "unless-stopped"
        assert svc["logging"] == {
            "driver": "json-file",
            "options": {"max-size": "50m", "max-file": "3"},
        }
        assert svc["labels"] == {
            "org.fleetd.managed": "true",
            "org.fleetd.service": name,
            "org.fleetd.runtime": plan.services[name].service.runtime.value,
        }
        assert svc["container_name"] == plan.services[name].service.containers[0]


def test_default_images(multi_gpu: tuple[FleetPlan, ComposeProject, dict[str, Any]]) -> None:
    _, _, doc = multi_gpu
    images = {name: svc["image"] for name, svc in doc["services"].items()}
    assert images == {
        "chat": "ollama/ollama:latest",
        "openai": "vllm/vllm-openai:latest",
        "coder": "ghcr.io/ggml-org/llama.cpp:server-cuda",
        "summarizer": "registry.example.com/summarizer:1.4",
    }


# --- model hand-off --------------------------------------------------------------------


def test_handoff_mounts_the_service_directory_read_only(
    multi_gpu: tuple[FleetPlan, ComposeProject, dict[str, Any]],
) -> None:
    _, _, doc = multi_gpu
    for name, svc in doc["services"].items():
        mount = svc["volumes"][0]
        assert mount == f"${{FLEETD_STATE_DIR}}/services/{name}:/run/fleetd:ro"
        # The directory, not the file: an atomic rename replaces the file's inode.
        assert not mount.split(":")[0].endswith("/model")
        assert [v for v in svc["volumes"] if "/run/fleetd" in v] == [mount]
        assert svc["environment"]["FLEETD_MODEL_FILE"] == "/run/fleetd/model"


def test_env_file_carries_state_dir_and_each_model(
    multi_gpu: tuple[FleetPlan, ComposeProject, dict[str, Any]], state_dir: Path
) -> None:
    plan, project, _ = multi_gpu
    assert project.env == {
        "FLEETD_STATE_DIR": str(state_dir),
        "FLEETD_CHAT_MODEL": "llama3.1:8b",
        "FLEETD_OPENAI_MODEL": "Qwen/Qwen2.5-7B-Instruct",
        "FLEETD_CODER_MODEL": "/models/qwen2.5-coder-7b-instruct-q4_k_m.gguf",
        "FLEETD_SUMMARIZER_MODEL": "microsoft/Phi-3-mini-4k-instruct",
    }
    assert project.models == {name: s.model for name, s in plan.services.items()}
    assert project.skipped == []


def test_model_env_service_reads_its_model_from_the_env_file(
    multi_gpu: tuple[FleetPlan, ComposeProject, dict[str, Any]],
) -> None:
    _, project, doc = multi_gpu
    env = doc["services"]["summarizer"]["environment"]
    # A single `$`: compose must interpolate this one from .env.
    assert env["SUMMARIZER_MODEL"] == "${FLEETD_SUMMARIZER_MODEL}"
    assert "FLEETD_SUMMARIZER_MODEL" in project.env
    assert env["LOG_LEVEL"] == "info"
    for name in ("chat", "openai", "coder"):
        assert not any("${" in v for v in doc["services"][name]["environment"].values())


@pytest.mark.parametrize(
    ("service", "variable"),
    [("alpha", "FLEETD_ALPHA_MODEL"), ("my-app.v2", "FLEETD_MY_APP_V2_MODEL")],
)
def test_model_env_variable_names(service: str, variable: str) -> None:
    assert model_env_var(service) == variable


def test_model_env_variable_of_a_dotted_service_name(tmp_path: Path, state_dir: Path) -> None:
    services = {"my-app.v2": generic("app", model_env="APP_MODEL")}
    project, doc = render(plan_for(load(tmp_path, services), "8GiB"), state_dir)
    env = doc["services"]["my-app.v2"]["environment"]
    assert env["APP_MODEL"] == "${FLEETD_MY_APP_V2_MODEL}"
    assert project.env["FLEETD_MY_APP_V2_MODEL"] == "org/app-model"
    mount = doc["services"]["my-app.v2"]["volumes"][0]
    assert mount == "${FLEETD_STATE_DIR}/services/my-app.v2:/run/fleetd:ro"


def test_start_scripts_escape_dollars_for_compose(
    multi_gpu: tuple[FleetPlan, ComposeProject, dict[str, Any]],
) -> None:
    _, _, doc = multi_gpu
    chat = doc["services"]["chat"]["entrypoint"][2]
    assert "$$!" in chat and "$$(cat /run/fleetd/model)" in chat
    assert "$!" in unescape(chat)
    assert '"$(cat /run/fleetd/model)"' in unescape(chat)
    for name in ("openai", "coder"):
        script = doc["services"][name]["entrypoint"][2]
        assert "exec " in unescape(script)
        assert '"$(cat /run/fleetd/model)" "$@"' in unescape(script)
    # llama-server from PATH (Debian's package) or /app (upstream's images).
    coder = unescape(doc["services"]["coder"]["entrypoint"][2])
    assert 'bin=$(command -v llama-server || echo /app/llama-server); exec "$bin"' in coder


# --- volumes ---------------------------------------------------------------------------


def test_named_volumes_are_declared_and_bind_mounts_are_not(
    multi_gpu: tuple[FleetPlan, ComposeProject, dict[str, Any]],
) -> None:
    _, _, doc = multi_gpu
    assert doc["volumes"] == {"huggingface-cache": {}, "ollama-chat": {}}
    assert "/srv/models:/models:ro" in doc["services"]["coder"]["volumes"]
    assert "ollama-chat:/root/.ollama" in doc["services"]["chat"]["volumes"]


def test_no_volumes_section_without_named_volumes(tmp_path: Path, state_dir: Path) -> None:
    plan = plan_for(load(tmp_path, {"g": llamacpp("g", volumes=["/srv/m:/m:ro"])}), "8GiB")
    _, doc = render(plan, state_dir)
    assert set(doc) == {"services"}


def test_user_named_volume_is_declared(tmp_path: Path, state_dir: Path) -> None:
    plan = plan_for(load(tmp_path, {"app": generic("app", volumes=["appdata:/data"])}), "8GiB")
    _, doc = render(plan, state_dir)
    assert doc["volumes"] == {"appdata": {}}


# --- unplaced services -----------------------------------------------------------------


def test_an_unplaced_service_is_left_out_and_listed(tmp_path: Path, state_dir: Path) -> None:
    services = {
        "alpha": ollama("alpha"),
        "huge": vllm("huge", {"model": "org/405b", "vram": "800GiB"}),
    }
    plan = plan_for(load(tmp_path, services), "12GiB")
    assert plan.services["huge"].rung is None
    project, doc = render(plan, state_dir)
    assert project.skipped == ["huge"]
    assert list(doc["services"]) == ["alpha"]
    assert "FLEETD_HUGE_MODEL" not in project.env
    assert project.models == {"alpha": "llama3.2:3b"}
    assert "huggingface-cache" not in doc.get("volumes", {})


def test_nothing_placed_renders_an_empty_project_or_refuses_cleanly(
    tmp_path: Path, state_dir: Path
) -> None:
    plan = plan_for(load(tmp_path, {"alpha": ollama("alpha")}), "1GiB")
    assert plan.services["alpha"].rung is None
    try:
        project = build_project(plan, state_dir)
    except RenderError:
        return  # a clear refusal is fine too
    assert project.skipped == ["alpha"]
    assert project.models == {}
    assert yaml.safe_load(project.compose_yaml) == {"services": {}}


# --- the state dir -------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["/tmp/with space", "/tmp/quo'te", "/tmp/$HOME", "/tmp/a\nb", "/tmp/a#b"]
)
def test_a_state_dir_unsafe_for_the_env_file_is_refused(tmp_path: Path, bad: str) -> None:
    plan = plan_for(load(tmp_path, {"alpha": ollama("alpha")}), "8GiB")
    with pytest.raises(RenderError, match="state dir"):
        build_project(plan, Path(bad))


def test_a_state_dir_with_a_colon_is_refused(tmp_path: Path) -> None:
    plan = plan_for(load(tmp_path, {"alpha": ollama("alpha")}), "8GiB")
    with pytest.raises(RenderError, match="state dir"):
        build_project(plan, tmp_path / "a:b")


# --- duplicate keys ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("service", "key"),
    [
        pytest.param(
            ollama("a", environment={"OLLAMA_KEEP_ALIVE": "5m"}),
            "OLLAMA_KEEP_ALIVE",
            id="user-overrides-runtime-env",
        ),
        pytest.param(
            generic("a", model_env="APP_MODEL", environment={"APP_MODEL": "x"}),
            "APP_MODEL",
            id="user-env-shadows-model_env",
        ),
        pytest.param(
            generic("a", environment={"FLEETD_MODEL_FILE": "/elsewhere"}),
            "FLEETD_MODEL_FILE",
            id="user-env-shadows-handoff-file",
        ),
    ],
)
def test_rendered_environment_never_repeats_a_key(
    tmp_path: Path, state_dir: Path, service: dict[str, Any], key: str
) -> None:
    plan = plan_for(load(tmp_path, {"a": service}), "8GiB")
    try:
        project = build_project(plan, state_dir)
    except RenderError:
        return  # refusing the clash is as good as resolving it
    yaml.load(project.compose_yaml, Loader=_StrictLoader)  # a SafeLoader subclass


def test_the_strict_loader_catches_duplicates() -> None:
    with pytest.raises(yaml.YAMLError, match="duplicate"):
        yaml.load("a: 1\na: 2\n", Loader=_StrictLoader)


def test_the_rendered_example_has_no_duplicate_keys(
    multi_gpu: tuple[FleetPlan, ComposeProject, dict[str, Any]],
) -> None:
    _, project, doc = multi_gpu
    assert yaml.load(project.compose_yaml, Loader=_StrictLoader) == doc


# --- the config refuses hostile names ----------------------------------------------


@pytest.mark.parametrize(
    "model",
    [
        "llama\nevil: true",
        'llama"3',
        "llama'3",
        "${X}",
        "$(id)",
        "&anchor",
        "*alias",
        "{a: b}",
        "llama 3",
        "# c",
        "",
        "llama3.2:3b\n",  # what a `model: |` block scalar gives
    ],
)
def test_the_config_refuses_hostile_model_names(tmp_path: Path, model: str) -> None:
    with pytest.raises(ConfigError, match=r"ladder\[0\]\.model"):
        load(tmp_path, {"alpha": ollama("alpha", {"model": model, "vram": "1GiB"})})


@pytest.mark.parametrize(
    "services",
    [
        {"alpha\n": ollama("alpha")},
        {"alpha": ollama("alpha\n")},
        {"alpha": generic("alpha", model_env="APP_MODEL\n")},
        {"alpha": generic("alpha", environment={"X\n": "v"})},
    ],
    ids=["service", "container", "model_env", "environment-name"],
)
def test_the_config_refuses_names_with_a_trailing_newline(
    tmp_path: Path, services: dict[str, Any]
) -> None:
    with pytest.raises(ConfigError):
        load(tmp_path, services)


# --- hostile values reaching the renderer anyway --------------------------------------


def _base_config(tmp_path: Path) -> FleetConfig:
    services = {
        "alpha": ollama("alpha"),
        "app": generic("app", model_env="APP_MODEL", environment={"X": "plain"}),
    }
    return load(tmp_path, services)


def _render_or_refuse(config: FleetConfig, state_dir: Path) -> ComposeProject | None:
    plan = plan_for(config, "24GiB")
    assert plan.all_placed
    try:
        return build_project(plan, state_dir)
    except RenderError:
        return None


def _assert_same_structure(doc: dict[str, Any], baseline: dict[str, Any]) -> None:
    assert list(doc) == list(baseline)
    assert list(doc["services"]) == list(baseline["services"])
    assert shape(doc["services"]) == shape(baseline["services"])
    for value in (doc.get("volumes") or {}).values():
        assert value == {}


@pytest.fixture
def baseline(tmp_path: Path, state_dir: Path) -> dict[str, Any]:
    project = build_project(plan_for(_base_config(tmp_path), "24GiB"), state_dir)
    doc: dict[str, Any] = yaml.safe_load(project.compose_yaml)
    return doc


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_environment_value_round_trips(
    tmp_path: Path, state_dir: Path, baseline: dict[str, Any], value: str
) -> None:
    config = with_service(_base_config(tmp_path), "app", environment={"X": value})
    project = _render_or_refuse(config, state_dir)
    if project is None:
        return
    doc = yaml.safe_load(project.compose_yaml)
    _assert_same_structure(doc, baseline)
    assert unescape(doc["services"]["app"]["environment"]["X"]) == value
    assert doc["services"]["app"]["environment"]["APP_MODEL"] == "${FLEETD_APP_MODEL}"


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_image_round_trips(
    tmp_path: Path, state_dir: Path, baseline: dict[str, Any], value: str
) -> None:
    config = with_service(_base_config(tmp_path), "app", image=value)
    project = _render_or_refuse(config, state_dir)
    if project is None:
        return
    doc = yaml.safe_load(project.compose_yaml)
    _assert_same_structure(doc, baseline)
    assert unescape(doc["services"]["app"]["image"]) == value


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_volume_round_trips(
    tmp_path: Path, state_dir: Path, baseline: dict[str, Any], value: str
) -> None:
    # `volumes` are written by ops, so compose interpolation (${MODELS_DIR}) is theirs to
    # use: the value arrives exactly as written, and still cannot change the structure.
    volume = f"{value}:/data"
    config = with_service(_base_config(tmp_path), "app", volumes=[volume])
    project = _render_or_refuse(config, state_dir)
    if project is None:
        return
    doc = yaml.safe_load(project.compose_yaml)
    assert list(doc) == ["services", "volumes"]
    assert list(doc["services"]) == ["alpha", "app"]
    app, want = doc["services"]["app"], baseline["services"]["app"]
    assert set(app) == set(want)
    assert shape({k: v for k, v in app.items() if k != "volumes"}) == shape(
        {k: v for k, v in want.items() if k != "volumes"}
    )
    assert app["volumes"][0] == want["volumes"][0], "the hand-off mount is untouched"
    assert app["volumes"][1:] == [volume]
    assert doc["services"]["alpha"] == baseline["services"]["alpha"]
    extra = set(doc["volumes"]) - set(baseline.get("volumes") or {})
    assert extra <= {volume.split(":")[0]}
    assert all(v == {} for v in doc["volumes"].values())


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_model_name_cannot_change_the_compose_file(
    tmp_path: Path, state_dir: Path, baseline: dict[str, Any], value: str
) -> None:
    rung = RungConfig.model_construct(model=value, vram=GIB, metadata=None)
    config = with_service(_base_config(tmp_path), "app", ladder=[rung])
    project = _render_or_refuse(config, state_dir)
    if project is None:
        return
    doc = yaml.safe_load(project.compose_yaml)
    assert doc == baseline, "the model only travels through .env and the hand-off file"
    assert project.models["app"] == value


def _parse_env_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines, as the simplest .env reader takes them (later lines win)."""
    parsed = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            parsed[key] = value
    return parsed


@pytest.mark.parametrize(
    "value",
    ["x\nFLEETD_STATE_DIR=/etc", "a\nb", "\n  evil: true", "${HOME}", "a #b", "a b"],
)
def test_hostile_model_name_cannot_inject_into_the_env_file(
    tmp_path: Path, state_dir: Path, value: str
) -> None:
    rung = RungConfig.model_construct(model=value, vram=GIB, metadata=None)
    config = with_service(_base_config(tmp_path), "app", ladder=[rung])
    project = _render_or_refuse(config, state_dir)
    if project is None:
        return
    # Written the way `fleetctl generate` writes it.
    text = "".join(f"{k}={v}\n" for k, v in project.env.items())
    assert _parse_env_file(text) == project.env
    assert all(not set(v) & set(" \t\r\n\"'$#\\") for v in project.env.values())


@pytest.mark.parametrize("value", [*HOSTILE, "alpha"])
def test_hostile_service_name_round_trips_or_is_refused(
    tmp_path: Path, state_dir: Path, value: str
) -> None:
    config = _base_config(tmp_path)
    config = with_services(config, {value: config.services["app"]})
    project = _render_or_refuse(config, state_dir)
    if project is None:
        return
    doc = yaml.safe_load(project.compose_yaml)
    assert list(doc) == ["services"]
    assert list(doc["services"]) == [value]
    service = doc["services"][value]
    assert service["labels"]["org.fleetd.service"] == value
    assert service["volumes"] == [f"${{FLEETD_STATE_DIR}}/services/{value}:/run/fleetd:ro"]
    assert "$" not in value, "a `$` in the name would be interpolated by compose"


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_container_name_round_trips_or_is_refused(
    tmp_path: Path, state_dir: Path, baseline: dict[str, Any], value: str
) -> None:
    config = with_service(_base_config(tmp_path), "app", containers=[value])
    project = _render_or_refuse(config, state_dir)
    if project is None:
        return
    doc = yaml.safe_load(project.compose_yaml)
    _assert_same_structure(doc, baseline)
    assert unescape(doc["services"]["app"]["container_name"]) == value


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_environment_name_round_trips_or_is_refused(
    tmp_path: Path, state_dir: Path, baseline: dict[str, Any], value: str
) -> None:
    config = with_service(_base_config(tmp_path), "app", environment={value: "v"})
    project = _render_or_refuse(config, state_dir)
    if project is None:
        return
    doc = yaml.safe_load(project.compose_yaml)
    assert list(doc["services"]) == ["alpha", "app"]
    app, want = doc["services"]["app"], baseline["services"]["app"]
    assert shape({**app, "environment": None}) == shape({**want, "environment": None})
    assert doc["services"]["alpha"] == baseline["services"]["alpha"]
    env = app["environment"]
    assert list(env) == ["FLEETD_MODEL_FILE", "APP_MODEL", value]
    assert env[value] == "v"


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_healthcheck_round_trips(tmp_path: Path, state_dir: Path, value: str) -> None:
    config = with_service(_base_config(tmp_path), "app", healthcheck=value)
    project = _render_or_refuse(config, state_dir)
    if project is None:
        return
    doc = yaml.safe_load(project.compose_yaml)
    assert list(doc["services"]) == ["alpha", "app"]
    check = doc["services"]["app"]["healthcheck"]
    assert set(check) == {"test", "interval", "timeout", "retries", "start_period"}
    assert check["test"][0] == "CMD-SHELL"
    assert [unescape(part) for part in check["test"][1:]] == [value]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_gpu_name_stays_in_the_comment(
    tmp_path: Path, state_dir: Path, baseline: dict[str, Any], value: str
) -> None:
    gpu = Gpu(index=0, name=value, total_bytes=24 * GIB, source="simulated")
    plan = analyze(_base_config(tmp_path), Discovery(gpus=(gpu,)))
    doc = yaml.safe_load(build_project(plan, state_dir).compose_yaml)
    assert doc == baseline


def test_hostile_config_path_stays_in_the_comment(
    tmp_path: Path, state_dir: Path, baseline: dict[str, Any]
) -> None:
    config = _base_config(tmp_path)
    config._source = Path("/tmp/x\nservices:\n  evil: {}\n#")
    doc = yaml.safe_load(build_project(plan_for(config, "24GiB"), state_dir).compose_yaml)
    assert doc == baseline


# --- quote and the template guard -----------------------------------------------------


@pytest.mark.parametrize("value", [*HOSTILE, "", "plain", "ünï", "\x00\x1b[31m"])
def test_quote_is_a_yaml_scalar_with_dollars_doubled(value: str) -> None:
    quoted = quote(value)
    assert "\n" not in quoted, "one line, whatever the value"
    assert yaml.safe_load(f"k: {quoted}\n") == {"k": value.replace("$", "$$")}


@settings(database=None, max_examples=300)
@given(
    st.text(
        alphabet=st.characters(
            exclude_categories=("Cs",),
            exclude_characters="\x85\u2028\u2029\ufffe\uffff"
            + "".join(map(chr, range(0x7F, 0xA0))),
        )
    )
)
def test_quote_round_trips_any_text(value: str) -> None:
    quoted = quote(value)
    assert yaml.safe_load(f"k: [{quoted}]\n") == {"k": [value.replace("$", "$$")]}
    assert json.loads(quoted) == value.replace("$", "$$")


@pytest.mark.parametrize("value", ["hi \U0001f44b", "\U0001d11e clef", "\U00020000"])
def test_quote_round_trips_characters_beyond_the_bmp(value: str) -> None:
    assert yaml.safe_load(quote(value)) == value


def test_an_environment_value_with_an_emoji_renders(tmp_path: Path, state_dir: Path) -> None:
    services = {"app": generic("app", environment={"GREETING": "hi \U0001f44b"})}
    _, doc = render(plan_for(load(tmp_path, services), "8GiB"), state_dir)
    assert doc["services"]["app"]["environment"]["GREETING"] == "hi \U0001f44b"


@pytest.mark.parametrize(
    "char",
    [
        "\u2028",
        "\u2029",
        "\ufeff",
        "\t",
        "\x00",
        "\x1b",
        "\xa0",
        "\x85",
        "\x7f",
        "\x9f",
        "\ufffe",
    ],
)
def test_quote_round_trips_special_characters(char: str) -> None:
    value = f"a{char}b"
    assert yaml.safe_load(f"k: {quote(value)}\n") == {"k": value}


@pytest.mark.parametrize("char", ["\x85", "\u2028", "\u2029"])
def test_a_line_break_character_in_a_gpu_name_stays_in_the_comment(
    tmp_path: Path, state_dir: Path, baseline: dict[str, Any], char: str
) -> None:
    gpu = Gpu(index=0, name=f"RTX{char}x-evil: 1", total_bytes=24 * GIB, source="simulated")
    plan = analyze(_base_config(tmp_path), Discovery(gpus=(gpu,)))
    doc = yaml.safe_load(build_project(plan, state_dir).compose_yaml)
    assert doc == baseline


@pytest.mark.parametrize("field", ["volumes", "healthcheck"])
def test_a_next_line_character_is_kept_or_refused(
    tmp_path: Path, state_dir: Path, field: str
) -> None:
    value = "a\x85b"
    update: dict[str, Any] = {"volumes": [f"/{value}:/data"]} if field == "volumes" else {}
    update |= {"healthcheck": value} if field == "healthcheck" else {}
    project = _render_or_refuse(with_service(_base_config(tmp_path), "app", **update), state_dir)
    if project is None:
        return
    app = yaml.safe_load(project.compose_yaml)["services"]["app"]
    got = app["volumes"][1] if field == "volumes" else app["healthcheck"]["test"][1]
    assert got in (f"/{value}:/data", value)


@pytest.mark.parametrize("value", [None, True, False, ["a"], {"a": 1}, b"bytes"])
def test_quote_refuses_non_scalars(value: object) -> None:
    with pytest.raises(RenderError):
        quote(value)


def test_quote_renders_numbers_as_strings() -> None:
    assert quote(3) == '"3"'
    assert yaml.safe_load(quote(1.5)) == "1.5"


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    """A copy of the built-in templates to break."""
    copy = tmp_path / "templates"
    shutil.copytree(default_template_dir(), copy)
    assert (copy / "compose.yml.j2").is_file()
    return copy


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path.name}"
    path.write_text(text.replace(old, new, 1))


def _example_plan(tmp_path: Path) -> FleetPlan:
    return plan_for(load(tmp_path, {"alpha": ollama("alpha")}), "12GiB")


def test_the_copied_templates_render_like_the_builtin_ones(
    tmp_path: Path, state_dir: Path, templates: Path
) -> None:
    plan = _example_plan(tmp_path)
    assert build_project(plan, state_dir, templates) == build_project(plan, state_dir)


@pytest.mark.parametrize(
    ("file", "old", "new"),
    [
        ("ollama.yml.j2", "image: {{ svc.image | q }}", "image: {{ svc.image }}"),
        (
            "_common.yml.j2",
            "container_name: {{ svc.container | q }}",
            "container_name: {{ svc.container }}",
        ),
        ("ollama.yml.j2", "    image:", "    # {{ svc.model }}\n    image:"),  # even a comment
        ("compose.yml.j2", "services:", "# {{ version }}\nservices:"),
        ("_common.yml.j2", "    restart:", "    # {{ svc.healthcheck is none }}\n    restart:"),
        ("_common.yml.j2", "    restart:", "    # {{ 1.5 }}\n    restart:"),
    ],
    ids=["image", "container", "model-in-comment", "version", "bool", "float"],
)
def test_a_template_printing_a_raw_value_is_refused(
    tmp_path: Path, state_dir: Path, templates: Path, file: str, old: str, new: str
) -> None:
    _edit(templates / file, old, new)
    with pytest.raises(RenderError, match="unquoted"):
        build_project(_example_plan(tmp_path), state_dir, templates)


def test_a_template_may_print_an_integer(tmp_path: Path, state_dir: Path, templates: Path) -> None:
    _edit(templates / "_common.yml.j2", "    restart:", "    # gpu {{ svc.gpu }}\n    restart:")
    project = build_project(_example_plan(tmp_path), state_dir, templates)
    assert "# gpu 0" in project.compose_yaml


def test_a_template_that_changes_a_value_is_caught_by_the_check(
    tmp_path: Path, state_dir: Path, templates: Path
) -> None:
    # Quoted, so `finalize` lets it through; parsing the result back catches it.
    _edit(templates / "_common.yml.j2", "{{ svc.container | q }}", '{{ "other" | q }}')
    with pytest.raises(RenderError, match="container_name"):
        build_project(_example_plan(tmp_path), state_dir, templates)


def test_a_template_that_adds_a_top_level_key_is_caught(
    tmp_path: Path, state_dir: Path, templates: Path
) -> None:
    _edit(templates / "compose.yml.j2", "services:", "networks: {}\nservices:")
    with pytest.raises(RenderError, match="top-level"):
        build_project(_example_plan(tmp_path), state_dir, templates)


def test_a_template_that_writes_invalid_yaml_is_caught(
    tmp_path: Path, state_dir: Path, templates: Path
) -> None:
    _edit(templates / "compose.yml.j2", "services:", "services: [\n")
    with pytest.raises(RenderError, match="not valid YAML"):
        build_project(_example_plan(tmp_path), state_dir, templates)


def test_a_template_that_moves_the_gpu_is_caught(
    tmp_path: Path, state_dir: Path, templates: Path
) -> None:
    _edit(
        templates / "_common.yml.j2",
        "[{% for gpu in svc.gpus %}{{ gpu | string | q }}{% if not loop.last %}, {% endif %}"
        "{% endfor %}]",
        '["7"]',
    )
    with pytest.raises(RenderError, match="gpu"):
        build_project(_example_plan(tmp_path), state_dir, templates)


# --- CPU-only hosts (`accelerator: cpu`) ---------------------------------------------------


def test_a_cpu_only_host_gets_no_gpu_reservation_and_llamacpp_offloads_nothing(
    tmp_path: Path, state_dir: Path
) -> None:
    services = {"c": llamacpp("c"), "v": vllm("v")}
    cpu_plan = plan_for(load(tmp_path, services, accelerator="cpu"), "32GiB")
    _, doc = render(cpu_plan, state_dir)
    for name in ("c", "v"):
        assert "deploy" not in doc["services"][name], "no NVIDIA reservation on a CPU host"
    args = doc["services"]["c"]["command"]
    assert args[args.index("-ngl") + 1] == "0"
    gpu_plan = plan_for(load(tmp_path, services), "32GiB")
    _, gpu_doc = render(gpu_plan, state_dir)
    assert gpu_doc["services"]["c"]["deploy"]["resources"]["reservations"]["devices"]
    gpu_args = gpu_doc["services"]["c"]["command"]
    assert gpu_args[gpu_args.index("-ngl") + 1] == "999"


def test_llamacpp_is_started_with_the_verbosity_that_prints_its_buffer_report(
    tmp_path: Path, state_dir: Path
) -> None:
    _, doc = render(plan_for(load(tmp_path, {"c": llamacpp("c")}), "8GiB"), state_dir)
    args = doc["services"]["c"]["command"]
    assert args[args.index("-lv") + 1] == "4"


def test_vllm_gets_the_shared_memory_it_needs(tmp_path: Path, state_dir: Path) -> None:
    _, doc = render(plan_for(load(tmp_path, {"v": vllm("v")}), "16GiB"), state_dir)
    assert doc["services"]["v"]["shm_size"] == "8gb"  # Docker's default is 64 MiB


@pytest.mark.parametrize(
    ("runtime", "image", "port", "shm", "flags"),
    [
        (
            "tgi",
            "ghcr.io/huggingface/text-generation-inference:latest",
            80,
            "1gb",
            ["--max-total-tokens", "8192", "--max-concurrent-requests", "4"],
        ),
        (
            "sglang",
            "lmsysorg/sglang:latest",
            30000,
            "32gb",
            ["--context-length", "8192", "--max-running-requests", "4"],
        ),
    ],
)
def test_tgi_and_sglang_services_are_generated_with_the_rungs_arguments(
    tmp_path: Path,
    state_dir: Path,
    runtime: str,
    image: str,
    port: int,
    shm: str,
    flags: list[str],
) -> None:
    rung = {"model": "org/model-7b", "vram": "6GiB", "context": 8192, "parallel": 4}
    service = {"runtime": runtime, "containers": ["s"], "ladder": [rung]}
    project, doc = render(plan_for(load(tmp_path, {"s": service}), "16GiB"), state_dir)
    svc = doc["services"]["s"]
    assert (svc["image"], svc["shm_size"]) == (image, shm)
    assert svc["ports"] == [f"127.0.0.1:{port}:{port}"]
    assert svc["healthcheck"]["test"][-1] == f"http://127.0.0.1:{port}/health"
    assert "/run/fleetd/model" in svc["entrypoint"][2]
    args = list(project.setups["s"].args)
    assert args[: len(flags)] == flags and args[-2:] == ["--served-model-name", "s"]
    if runtime == "sglang":  # its KV pool is the plan's share of the GPU, like vLLM's
        share = args[args.index("--mem-fraction-static") + 1]
        assert 0.0 < float(share) < 0.85


def test_vllm_on_a_cpu_host_takes_no_gpu_share_and_extra_args_come_after_fleetds(
    tmp_path: Path, state_dir: Path
) -> None:
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    services = {"v": vllm("v", environment=env, args=["--enforce-eager", "--seed", "$x"])}
    project, doc = render(plan_for(load(tmp_path, services, accelerator="cpu"), "32GiB"), state_dir)
    command = doc["services"]["v"]["command"]
    assert "--gpu-memory-utilization" not in [*command, *project.setups["v"].args]
    assert command[-3:] == ["--enforce-eager", "--seed", "$$x"]  # quoted, $ escaped
    assert doc["services"]["v"]["environment"]["VLLM_CPU_KVCACHE_SPACE"] == "1"
    gpu_project, _ = render(plan_for(load(tmp_path, services), "32GiB"), state_dir)
    assert "--gpu-memory-utilization" in gpu_project.setups["v"].args


# --- the start scripts read the rung's hand-off ---------------------------------------


@pytest.mark.parametrize(
    ("runtime", "binary"),
    [
        ("vllm", "vllm"),
        ("llamacpp", "llama-server"),
        ("tgi", "text-generation-launcher"),
        ("sglang", "python3"),
    ],
)
def test_the_start_script_starts_the_server_with_the_rungs_hand_off(
    tmp_path: Path, runtime: str, binary: str
) -> None:
    """The generated entrypoint, run by a real /bin/sh against hand-off files: the server
    gets the container's own arguments, then the rung's, and the rung's environment."""
    import subprocess

    from supervisor.core.runtimes import spec_of

    handoff = tmp_path / "handoff"
    handoff.mkdir()
    (handoff / "model").write_text("/models/m.gguf\n")
    (handoff / "args").write_text("-c\n8192\n--alias\nchat bot\n")
    (handoff / "env").write_text("CUDA_VISIBLE_DEVICES=0,1\nEXTRA=a b\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / binary
    fake.write_text(
        '#!/bin/sh\nfor a in "$@"; do echo "arg:$a"; done\n'
        'echo "env:$CUDA_VISIBLE_DEVICES|$EXTRA"\n'
    )
    fake.chmod(0o755)
    script = str(spec_of(runtime).start_script).replace("/run/fleetd", str(handoff))

    def start() -> list[str]:  # the entrypoint with the compose file's own arguments
        return subprocess.run(
            ["/bin/sh", "-c", script, binary, "--port", "1"],
            capture_output=True,
            text=True,
            check=True,
            env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
        ).stdout.splitlines()

    out = start()
    args = [line.removeprefix("arg:") for line in out if line.startswith("arg:")]
    assert args[-6:] == ["--port", "1", "-c", "8192", "--alias", "chat bot"]
    assert "/models/m.gguf" in args
    assert out[-1] == "env:0,1|a b"
    for name in ("args", "env"):
        (handoff / name).unlink()  # a hand-off folder of an older fleetd: no options
    out = start()
    assert [line for line in out if line.startswith("arg:")][-2:] == ["arg:--port", "arg:1"]


def test_a_tensor_parallel_rung_reserves_all_its_gpus_and_a_step_down_frees_one(
    tmp_path: Path, state_dir: Path
) -> None:
    """Two GPUs of 24 GiB: a rung that needs 15 GiB on each of two is placed across both,
    compose reserves both, vLLM gets --tensor-parallel-size 2 and a share of each GPU."""
    two = {"model": "org/big", "vram": "15GiB", "tensor_parallel": 2}
    one = {"model": "org/big-awq", "vram": "12GiB"}
    config = load(tmp_path, {"api": vllm("api", two, one)})
    plan = plan_for(config, "24GiB", "24GiB")
    assert (plan.services["api"].rung, plan.services["api"].gpus) == (0, (0, 1))
    assert [g.planned_bytes for g in plan.gpus] == [15 * 1024**3] * 2
    project, doc = render(plan, state_dir)
    reserved = doc["services"]["api"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert reserved["device_ids"] == ["0", "1"]
    args = _vllm_args(doc, "api", project)
    assert args["--tensor-parallel-size"] == "2"
    assert args["--gpu-memory-utilization"] == "0.63"
    small = setup_for(config, "api", 1, 12 * 1024**3, 24 * 1024**3)
    assert "--tensor-parallel-size" not in small.args
