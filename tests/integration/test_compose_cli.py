"""Generated compose projects against the real compose CLIs' `config` command.

Every test runs with both CLIs (the `compose_cli` fixture, ids `compose-v1` and
`compose-v2`): v1 `docker-compose config` (1.29, bookworm's) and v2 `docker compose
config` (the CLI plugin, trixie's 2.26). `fleetctl generate` writes compose.yml and .env
for several GPU layouts; compose must accept them, interpolate `${FLEETD_STATE_DIR}` from
the .env into the hand-off mount, and turn the templates' `$$` into a literal `$`. No
engine is needed: `config` only parses and interpolates.

Notes on reading `config` output: both versions re-escape every literal `$` as `$$` when
they print the interpolated file (so the output is valid input again). A value printed as
`$$!` therefore holds `$!`; had compose not turned the file's `$$!` into `$!`, it would
print `$$$$!`. v2 is read from its JSON output (see EXACT_OUTPUT); it prints volumes and
ports in their long syntax, adds each service's default network and prints unset keys as
null; `interpolated` turns that back into v1's shape, so that one assertion holds for both.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from supervisor.analyzer import analyze
from supervisor.analyzer.compose import build_project
from supervisor.core.config import FleetConfig, RungConfig, load_config
from supervisor.core.errors import RenderError
from supervisor.core.gpus import Discovery, simulated_gpus
from tests.entrypoints import entry_point
from tests.integration.conftest import ComposeCli

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = {
    "fleet": REPO / "examples" / "fleet.yaml",
    "multi": REPO / "examples" / "multi-gpu.yaml",
}
LAYOUTS = {
    "6GiB": ["6GiB"],
    "8GiB": ["8GiB"],
    "12GiB": ["12GiB"],
    "24GiB": ["24GiB"],
    "2x16GiB": ["16GiB", "16GiB"],
}

REAL_MODELS = ("llama3.2:3b", "hf.co/org/Model-GGUF:Q4_K_M", "/models/a-7b.Q4_K_M.gguf")
HOSTILE = [
    'a"b',
    "a'b",
    "a: b",
    "${HOME}",
    "$HOME",
    "$$",
    "$(rm -rf /)",
    "&a",
    "*a",
    "# comment",
    "\n  evil: true",
    "a\nb",
    "{a: b}",
    "- item",
    "a\\nb",
    "tab\there",
    "'; evil: true; '",
    "",
]


def _clean_env() -> dict[str, str]:
    """The environment minus anything that would override .env or pick other files."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("FLEETD_", "COMPOSE_"))}


def compose_config(
    compose_cli: ComposeCli, project: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        compose_cli.command(
            "--project-directory",
            str(project),
            "-f",
            str(project / "compose.yml"),
            "--env-file",
            str(project / ".env"),
            "config",
            *extra,
        ),
        capture_output=True,
        text=True,
        cwd=project,
        env=_clean_env(),
        timeout=60,
        check=False,
    )


# v2's YAML printer drops a value's leading newline ("\n  evil: true" prints as a block
# scalar holding "  evil: true"), though the container gets the value whole (checked with
# `docker compose create` and `docker inspect`, compose 2.26.1); its JSON output is exact.
EXACT_OUTPUT = {"v1": (), "v2": ("--format", "json")}


def interpolated(compose_cli: ComposeCli, project: Path) -> dict[str, Any]:
    """What `config` prints, its services in v1's shape whichever version printed them."""
    done = compose_config(compose_cli, project, *EXACT_OUTPUT[compose_cli.version])
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = yaml.safe_load(done.stdout)
    for service in doc.get("services", {}).values():
        as_v1(service)
    return doc


def as_v1(service: dict[str, Any]) -> None:
    """Rewrite v2's long-syntax volumes and ports, its implied network and its JSON nulls
    (`"entrypoint": null`) as v1 prints them."""
    for key in [key for key, value in service.items() if value is None]:
        del service[key]
    if service.get("networks") == {"default": None}:
        del service["networks"]
    for key, short in (("volumes", _short_volume), ("ports", _short_port)):
        if key in service:
            service[key] = [v if isinstance(v, str) else short(v) for v in service[key]]


def _short_volume(volume: dict[str, Any]) -> str:
    mode = "ro" if volume.get("read_only") else "rw"
    return f"{volume['source']}:{volume['target']}:{mode}"


def _short_port(port: dict[str, Any]) -> str:
    host = f"{port['host_ip']}:" if port.get("host_ip") else ""
    return f"{host}{port['published']}:{port['target']}/{port.get('protocol', 'tcp')}"


def literal(printed: str) -> str:
    """The value behind compose's printed (re-escaped) form."""
    return printed.replace("$$", "$")


def generate(
    tmp_path: Path, config: Path, gpus: list[str]
) -> tuple[Path, Path, subprocess.CompletedProcess[str]]:
    out, state = tmp_path / "out", tmp_path / "state"
    gpu_args = [arg for size in gpus for arg in ("--gpu", size)]
    done = subprocess.run(
        [
            entry_point("fleetctl"),
            "generate",
            "--config",
            str(config),
            *gpu_args,
            "--out",
            str(out),
            "--state-dir",
            str(state),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_clean_env(),
        timeout=60,
        check=False,
    )
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    return out, state, done


def write_project(out: Path, compose_yaml: str, env: dict[str, str]) -> Path:
    """Write what `fleetctl generate` writes, the way it writes it."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "compose.yml").write_text(compose_yaml)
    (out / ".env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    return out


CASES = [
    pytest.param(EXAMPLES[example], sizes, id=f"{example}-{layout}")
    for example in EXAMPLES
    for layout, sizes in LAYOUTS.items()
] + [pytest.param(EXAMPLES["multi"], [], id="multi-declared")]


@pytest.mark.parametrize(("config", "gpus"), CASES)
def test_generated_project_passes_compose_config(
    compose_cli: ComposeCli, tmp_path: Path, config: Path, gpus: list[str]
) -> None:
    out, state, done = generate(tmp_path, config, gpus)
    assert done.returncode in (0, 1), done.stderr
    if done.returncode == 1:
        assert "NOT PLACED" in done.stderr, done.stderr

    quiet = compose_config(compose_cli, out, "-q")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == ""

    raw = yaml.safe_load((out / "compose.yml").read_text())
    doc = interpolated(compose_cli, out)
    assert set(doc["services"]) == set(raw["services"])
    assert doc["services"], "every layout here places at least one service"
    for name, service in doc["services"].items():
        mount = f"{state.resolve()}/services/{name}:/run/fleetd:ro"
        assert mount in service["volumes"], service["volumes"]
        assert (state / "services" / name / "model").is_file()
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices == raw["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert service["labels"]["org.fleetd.managed"] == "true"
        assert service["restart"] == "unless-stopped"
    host_ports = [p.split(":")[1] for s in doc["services"].values() for p in s.get("ports", [])]
    assert len(host_ports) == len(set(host_ports)), host_ports


def test_compose_turns_the_start_scripts_double_dollars_into_one(
    compose_cli: ComposeCli, tmp_path: Path
) -> None:
    out, _, done = generate(tmp_path, EXAMPLES["multi"], [])
    assert done.returncode == 0, done.stderr
    raw = yaml.safe_load((out / "compose.yml").read_text())["services"]
    doc = interpolated(compose_cli, out)["services"]

    chat_file, chat = raw["chat"]["entrypoint"][2], doc["chat"]["entrypoint"][2]
    assert "pid=$$!" in chat_file and "$$$$" not in chat_file
    assert chat == chat_file, "printed re-escaped: `$$` in the output is one `$` inside"
    script = literal(chat)
    assert "pid=$!;" in script and "kill -TERM $pid" in script and "wait $pid" in script
    assert 'ollama pull "$(cat /run/fleetd/model)"' in script
    assert "$$" not in script

    for name in ("openai", "coder"):
        script = literal(doc[name]["entrypoint"][2])
        assert '"$(cat /run/fleetd/model)" "$@"' in script, script
        assert "$$" not in script

    # `${...}` with a single `$` is interpolated: the model_env variable comes from .env.
    assert doc["summarizer"]["environment"]["SUMMARIZER_MODEL"] == (
        "microsoft/Phi-3-mini-4k-instruct"
    )


def test_the_env_file_is_what_compose_interpolates(compose_cli: ComposeCli, tmp_path: Path) -> None:
    out, state, done = generate(tmp_path, EXAMPLES["fleet"], ["12GiB"])
    assert done.returncode == 0, done.stderr
    moved = tmp_path / "moved-state"
    env = (out / ".env").read_text().replace(str(state.resolve()), str(moved))
    (out / ".env").write_text(env)
    doc = interpolated(compose_cli, out)
    assert f"{moved}/services/alpha:/run/fleetd:ro" in doc["services"]["alpha"]["volumes"]


# --- hostile values rendered directly ---------------------------------------------------


def _config(tmp_path: Path) -> FleetConfig:
    path = tmp_path / "fleet.yaml"
    path.write_text(
        "services:\n"
        "  app:\n"
        "    runtime: generic\n"
        "    image: registry.example.com/app:1\n"
        "    containers: [app]\n"
        "    model_env: APP_MODEL\n"
        "    ladder: [{model: org/app-model, vram: 1GiB}]\n"
    )
    return load_config(path)


def _with(config: FleetConfig, **update: Any) -> FleetConfig:
    service = config.services["app"].model_copy(update=update)
    changed = config.model_copy(update={"services": {"app": service}})
    changed._source = config.source
    return changed


def test_hostile_environment_values_survive_compose_exactly(
    compose_cli: ComposeCli, tmp_path: Path
) -> None:
    values = {f"H{i}": value for i, value in enumerate(HOSTILE)}
    config = _with(_config(tmp_path), environment=values, healthcheck=HOSTILE[3] + " || exit 1")
    plan = analyze(config, Discovery(gpus=simulated_gpus(["8GiB"])))
    state = tmp_path / "state"
    project = build_project(plan, state)  # must not refuse: these are legal env values
    out = write_project(tmp_path / "out", project.compose_yaml, project.env)

    quiet = compose_config(compose_cli, out, "-q")
    assert quiet.returncode == 0, quiet.stderr
    service = interpolated(compose_cli, out)["services"]["app"]
    env = service["environment"]
    assert {k: literal(env[k]) for k in values} == values
    assert set(env) == {*values, "FLEETD_MODEL_FILE", "APP_MODEL"}
    assert env["APP_MODEL"] == "org/app-model"
    assert literal(service["healthcheck"]["test"][1]) == "${HOME} || exit 1"
    assert f"{state}/services/app:/run/fleetd:ro" in service["volumes"]
    assert set(service) == {
        "container_name",
        "deploy",
        "environment",
        "healthcheck",
        "image",
        "labels",
        "logging",
        "restart",
        "volumes",
    }


@pytest.mark.parametrize(
    "model",
    [
        *REAL_MODELS,
        'a"b',
        "a'b",
        "a: b",
        "$(rm -rf /)",
        "&a",
        "*a",
        "# comment",
        "{a: b}",
        "x\nFLEETD_STATE_DIR=/etc",  # would redirect the hand-off mount
        "a\nb",
        "${HOME}",  # dotenv would interpolate it
        "a #b",  # dotenv would drop ` #b` as a comment
    ],
)
def test_hostile_model_reaches_the_container_exactly_or_is_refused(
    compose_cli: ComposeCli, tmp_path: Path, model: str
) -> None:
    rung = RungConfig.model_construct(model=model, vram=1024**3, metadata=None)
    config = _with(_config(tmp_path), ladder=[rung])
    plan = analyze(config, Discovery(gpus=simulated_gpus(["8GiB"])))
    state = tmp_path / "state"
    try:
        project = build_project(plan, state)
    except RenderError:
        assert model not in REAL_MODELS
        return
    out = write_project(tmp_path / "out", project.compose_yaml, project.env)
    service = interpolated(compose_cli, out)["services"]["app"]
    assert literal(service["environment"]["APP_MODEL"]) == model
    assert f"{state}/services/app:/run/fleetd:ro" in service["volumes"]


# --- config-accepted values compose must also accept ------------------------------------


def test_a_volume_with_a_variable_passes_compose_config(
    compose_cli: ComposeCli, tmp_path: Path
) -> None:
    config = tmp_path / "fleet.yaml"
    config.write_text(
        "services:\n"
        "  app:\n"
        "    runtime: generic\n"
        "    image: busybox\n"
        "    containers: [app]\n"
        '    volumes: ["${HOME}/models:/models:ro"]\n'
        "    ladder: [{model: x, vram: 1GiB}]\n"
    )
    out, _, done = generate(tmp_path, config, ["8GiB"])
    if done.returncode != 0:
        assert done.stderr.startswith("fleetctl: error: ")  # a clear refusal is fine
        return
    quiet = compose_config(compose_cli, out, "-q")
    assert quiet.returncode == 0, quiet.stderr


def test_a_state_dir_with_a_colon_is_refused_or_works(
    compose_cli: ComposeCli, tmp_path: Path
) -> None:
    out, state = tmp_path / "out", tmp_path / "st:ate"
    done = subprocess.run(
        [
            entry_point("fleetctl"),
            "generate",
            "--config",
            str(EXAMPLES["fleet"]),
            "--gpu",
            "12GiB",
            "--out",
            str(out),
            "--state-dir",
            str(state),
        ],
        capture_output=True,
        text=True,
        env=_clean_env(),
        timeout=60,
        check=False,
    )
    assert "Traceback" not in done.stderr
    if done.returncode != 0:
        assert not out.exists()
        return
    quiet = compose_config(compose_cli, out, "-q")
    assert quiet.returncode == 0, quiet.stderr
