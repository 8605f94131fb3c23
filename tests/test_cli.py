"""Tests for the `fleetctl` and `fleetd` commands, run as real subprocesses.

Subprocesses so exit codes, stdout and stderr are exactly what a user or a script sees.
Every run gets FLEETD_CONFIG and FLEETD_STATE_DIR in tmp_path, so nothing touches
/etc/fleetd or /var/lib/fleetd, and is checked for a Python traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from supervisor.cli import fleetctl, fleetd
from tests.entrypoints import entry_point

REPO = Path(__file__).resolve().parents[1]
FLEET = REPO / "examples" / "fleet.yaml"
MULTI = REPO / "examples" / "multi-gpu.yaml"

BAD_SIZE_CONFIG = """\
services:
  alpha:
    runtime: ollama
    containers: [alpha]
    ladder:
      - {model: "llama3.2:3b", vram: 2048MiB}
      - {model: "phi3:mini", vram: 12 potatoes}
"""
BAD_SIZE_LINE = 7


class Cli:
    """Runs the checkout's own commands (by path) with a private environment in tmp_path."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.state = tmp_path / "state"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETD_")}
        self.env["FLEETD_CONFIG"] = str(tmp_path / "no-default-config.yaml")
        self.env["FLEETD_STATE_DIR"] = str(self.state)
        self.env["COLUMNS"] = "200"

    def __call__(self, *args: str | Path, env: dict[str, str] | None = None) -> Result:
        done = subprocess.run(
            [entry_point(str(args[0])), *(str(a) for a in args[1:])],
            capture_output=True,
            text=True,
            cwd=self.tmp,
            env={**self.env, **(env or {})},
            timeout=60,
            check=False,
        )
        result = Result(done.returncode, done.stdout, done.stderr)
        assert "Traceback" not in done.stdout + done.stderr, result
        return result

    def write(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.write_text(text)
        return path


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def json(self) -> Any:
        return json.loads(self.out)

    def __repr__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


def _line_with(text: str, *words: str) -> str:
    lines = [line for line in text.splitlines() if all(w in line for w in words)]
    assert lines, f"no line with {words} in:\n{text}"
    return lines[0]


# --- plan ------------------------------------------------------------------------------


def test_plan_on_12gib_runs_the_preferred_model(cli: Cli) -> None:
    r = cli("fleetctl", "plan", "--config", FLEET, "--gpu", "12GiB")
    assert r.code == 0, r
    row = _line_with(r.out, "alpha", "ollama", "of 4")
    assert "llama3.2:3b" in row
    assert "NOT PLACED" not in r.out
    assert r.err == ""


def test_plan_on_2gib_steps_down_and_says_why(cli: Cli) -> None:
    r = cli("fleetctl", "plan", "--config", FLEET, "--gpu", "2GiB")
    assert r.code == 0, r
    assert "tinyllama:1.1b" in _line_with(r.out, "alpha", "ollama", "of 4")
    lines = r.out.splitlines()
    for model in ("llama3.2:3b", "phi3:mini"):
        at = next(i for i, line in enumerate(lines) if model in line and "declared" in line)
        why = lines[at + 1]
        assert "not chosen" in why and "budget" in why, why


def test_plan_json_for_scripts(cli: Cli) -> None:
    r = cli("fleetctl", "plan", "--config", FLEET, "--gpu", "12GiB", "--json")
    assert r.code == 0, r
    plan = r.json()
    assert isinstance(plan["gpus"], list) and len(plan["gpus"]) == 1
    assert plan["gpus"][0]["index"] == 0
    assert plan["gpus"][0]["total_bytes"] == 12 * 1024**3
    alpha = plan["services"]["alpha"]
    assert (alpha["model"], alpha["rung"], alpha["gpu"]) == ("llama3.2:3b", 0, 0)
    assert plan["all_placed"] is True


def test_plan_json_on_2gib_explains_the_rejected_rungs(cli: Cli) -> None:
    r = cli("fleetctl", "plan", "--config", FLEET, "--gpu", "2GiB", "--json")
    assert r.code == 0, r
    alpha = r.json()["services"]["alpha"]
    assert (alpha["model"], alpha["rung"]) == ("tinyllama:1.1b", 2)
    statuses = [(x["model"], x["status"]) for x in alpha["rungs"]]
    assert statuses == [
        ("llama3.2:3b", "rejected"),
        ("phi3:mini", "rejected"),
        ("tinyllama:1.1b", "chosen"),
        ("qwen2.5:0.5b", "not tried"),
    ]
    assert all("budget" in x["reason"] for x in alpha["rungs"][:2])


def test_plan_with_nothing_that_fits_exits_1_with_a_reason(cli: Cli) -> None:
    r = cli("fleetctl", "plan", "--config", FLEET, "--gpu", "300MiB", "--json")
    assert r.code == 1, r
    plan = r.json()
    alpha = plan["services"]["alpha"]
    assert alpha["model"] is None and alpha["rung"] is None and alpha["gpu"] is None
    assert alpha["reason"] and "qwen2.5:0.5b" in alpha["reason"]
    assert plan["all_placed"] is False

    text = cli("fleetctl", "plan", "--config", FLEET, "--gpu", "300MiB")
    assert text.code == 1, text
    assert "NOT PLACED: alpha" in text.out


def test_plan_of_the_multi_gpu_example_uses_its_declared_gpus(cli: Cli) -> None:
    r = cli("fleetctl", "plan", "--config", MULTI, "--json")
    assert r.code == 0, r
    plan = r.json()
    assert [g["source"] for g in plan["gpus"]] == ["declared", "declared"]
    assert set(plan["services"]) == {"chat", "openai", "coder", "summarizer"}
    assert all(s["gpu"] in (0, 1) for s in plan["services"].values())


def test_plan_reads_fleetd_config_from_the_environment(cli: Cli) -> None:
    r = cli("fleetctl", "plan", "--gpu", "12GiB", "--json", env={"FLEETD_CONFIG": str(FLEET)})
    assert r.code == 0, r
    assert r.json()["config"] == str(FLEET)


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ("fleetctl", "plan", "--gpu", "12GiB"),
        ("fleetctl", "plan", "--gpu", "12GiB", "--json"),
        ("fleetctl", "generate", "--gpu", "12GiB", "--out", "out"),
        ("fleetd", "check-config"),
    ],
    ids=["plan", "plan-json", "generate", "check-config"],
)
def test_a_bad_config_names_file_line_key_and_value(cli: Cli, command: tuple[str, ...]) -> None:
    config = cli.write("bad.yaml", BAD_SIZE_CONFIG)
    r = cli(*command, "--config", config)
    assert r.code == 2, r
    assert r.out == ""
    prog = command[0]
    assert r.err.startswith(f"{prog}: error: ")
    assert f"{config}:{BAD_SIZE_LINE}:" in r.err
    assert "services.alpha.ladder[1].vram" in r.err
    assert "'12 potatoes'" in r.err
    assert len(r.err.strip().splitlines()) == 1, "one line per problem"


def test_every_problem_is_listed(cli: Cli) -> None:
    config = cli.write(
        "bad.yaml",
        "budget: 2\nservices:\n  alpha:\n    runtime: olama\n    containers: [alpha]\n"
        "    ladder: [{model: x, vram: 1GiB}]\n",
    )
    r = cli("fleetd", "check-config", "--config", config)
    assert r.code == 2, r
    assert f"{config}:1: budget" in r.err
    assert f"{config}:4: services.alpha.runtime" in r.err
    assert "'olama'" in r.err


def test_invalid_yaml_exits_2_with_its_line(cli: Cli) -> None:
    config = cli.write("broken.yaml", "services:\n  alpha: [\n")
    r = cli("fleetctl", "plan", "--config", config, "--gpu", "12GiB")
    assert r.code == 2, r
    assert f"{config}:" in r.err and "invalid YAML" in r.err


@pytest.mark.parametrize("how", ["option", "environment"])
def test_a_missing_config_exits_2_with_a_clear_message(cli: Cli, how: str) -> None:
    missing = cli.tmp / "nowhere" / "fleet.yaml"
    if how == "option":
        r = cli("fleetctl", "plan", "--gpu", "12GiB", "--config", missing)
    else:
        r = cli("fleetctl", "plan", "--gpu", "12GiB", env={"FLEETD_CONFIG": str(missing)})
    assert r.code == 2, r
    assert r.err.startswith("fleetctl: error: ")
    assert str(missing) in r.err and "cannot read config" in r.err


@pytest.mark.parametrize("spec", ["banana", "0GiB", "-1GiB", "12 parsecs"])
def test_a_bad_gpu_option_exits_2(cli: Cli, spec: str) -> None:
    r = cli("fleetctl", "plan", "--config", FLEET, "--gpu", spec)
    assert r.code == 2, r
    assert r.err.startswith("fleetctl: error: --gpu ")
    assert repr(spec) in r.err and "SIZE" in r.err


def test_an_unknown_option_is_a_usage_error(cli: Cli) -> None:
    r = cli("fleetctl", "plan", "--no-such-option")
    assert r.code == 2, r
    assert "no-such-option" in r.err


# --- generate --------------------------------------------------------------------------


def _read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line)


def test_generate_writes_compose_env_and_model_file(cli: Cli) -> None:
    out, state = cli.tmp / "out", cli.tmp / "elsewhere"
    r = cli(
        "fleetctl",
        "generate",
        "--config",
        FLEET,
        "--gpu",
        "12GiB",
        "--out",
        out,
        "--state-dir",
        state,
    )
    assert r.code == 0, r
    doc = yaml.safe_load((out / "compose.yml").read_text())
    assert list(doc["services"]) == ["alpha"]
    assert doc["services"]["alpha"]["volumes"][0] == (
        "${FLEETD_STATE_DIR}/services/alpha:/run/fleetd:ro"
    )
    assert _read_env(out / ".env") == {
        "FLEETD_STATE_DIR": str(state.resolve()),
        "FLEETD_ALPHA_MODEL": "llama3.2:3b",
    }
    assert (state / "services" / "alpha" / "model").read_text() == "llama3.2:3b\n"
    assert not cli.state.exists(), "--state-dir wins over FLEETD_STATE_DIR"
    assert str(out / "compose.yml") in r.out and "1 service)" in r.out
    assert "llama3.2:3b" in r.out


def test_generate_defaults_the_state_dir_from_the_environment(cli: Cli) -> None:
    r = cli("fleetctl", "generate", "--config", FLEET, "--gpu", "2GiB", "--out", "out")
    assert r.code == 0, r
    assert (cli.state / "services" / "alpha" / "model").read_text() == "tinyllama:1.1b\n"
    env = _read_env(cli.tmp / "out" / ".env")
    assert env["FLEETD_STATE_DIR"] == str(cli.state.resolve())
    assert env["FLEETD_ALPHA_MODEL"] == "tinyllama:1.1b"


def test_generate_with_a_relative_state_dir_writes_an_absolute_one(cli: Cli) -> None:
    r = cli(
        "fleetctl",
        "generate",
        "--config",
        FLEET,
        "--gpu",
        "12GiB",
        "--out",
        "out",
        "--state-dir",
        "rel/state",
    )
    assert r.code == 0, r
    env = _read_env(cli.tmp / "out" / ".env")
    assert env["FLEETD_STATE_DIR"] == str((cli.tmp / "rel" / "state").resolve())
    assert (cli.tmp / "rel" / "state" / "services" / "alpha" / "model").is_file()


def test_generate_with_a_bad_config_writes_nothing(cli: Cli) -> None:
    config = cli.write("bad.yaml", BAD_SIZE_CONFIG)
    out, state = cli.tmp / "out", cli.tmp / "st"
    r = cli(
        "fleetctl",
        "generate",
        "--config",
        config,
        "--gpu",
        "12GiB",
        "--out",
        out,
        "--state-dir",
        state,
    )
    assert r.code == 2, r
    assert not out.exists() and not state.exists() and not cli.state.exists()


def test_generate_that_cannot_render_writes_nothing(cli: Cli) -> None:
    config = cli.write(
        "ports.yaml",
        "services:\n"
        "  a: {runtime: ollama, containers: [a], port: 9000, ladder: [{model: m, vram: 1GiB}]}\n"
        "  b: {runtime: ollama, containers: [b], port: 9000, ladder: [{model: m, vram: 1GiB}]}\n",
    )
    out = cli.tmp / "out"
    r = cli("fleetctl", "generate", "--config", config, "--gpu", "24GiB", "--out", out)
    assert r.code == 1, r
    assert r.err.startswith("fleetctl: error: ") and "9000" in r.err
    assert not out.exists() and not cli.state.exists()


def test_generate_keeps_an_existing_model_file(cli: Cli) -> None:
    handoff = cli.state / "services" / "alpha" / "model"
    handoff.parent.mkdir(parents=True)
    handoff.write_text("qwen2.5:0.5b\n")  # fleetd stepped down; the file is its
    r = cli("fleetctl", "generate", "--config", FLEET, "--gpu", "12GiB", "--out", "out")
    assert r.code == 0, r
    assert handoff.read_text() == "qwen2.5:0.5b\n"
    assert str(handoff) not in r.out
    assert (cli.tmp / "out" / "compose.yml").is_file()


def test_generate_overwrites_its_own_compose_files(cli: Cli) -> None:
    out = cli.tmp / "out"
    out.mkdir()
    (out / "compose.yml").write_text("stale: true\n")
    (out / ".env").write_text("STALE=1\n")
    r = cli("fleetctl", "generate", "--config", FLEET, "--gpu", "12GiB", "--out", out)
    assert r.code == 0, r
    assert "stale" not in (out / "compose.yml").read_text()
    assert "STALE" not in _read_env(out / ".env")


def test_generate_with_an_unplaced_service_exits_1_and_says_so(cli: Cli) -> None:
    config = cli.write(
        "fleet.yaml",
        FLEET.read_text() + "  huge:\n    runtime: vllm\n    containers: [huge]\n"
        "    ladder:\n      - {model: org/405b, vram: 800GiB}\n",
    )
    out = cli.tmp / "out"
    r = cli("fleetctl", "generate", "--config", config, "--gpu", "12GiB", "--out", out)
    assert r.code == 1, r
    assert "huge is NOT PLACED" in r.err
    assert "800" in r.err or "nearest" in r.err, "the reason comes with it"
    doc = yaml.safe_load((out / "compose.yml").read_text())
    assert list(doc["services"]) == ["alpha"]
    assert "FLEETD_HUGE_MODEL" not in _read_env(out / ".env")
    assert not (cli.state / "services" / "huge").exists()
    assert (cli.state / "services" / "alpha" / "model").is_file()


def test_generate_with_nothing_placed_exits_1_without_a_traceback(cli: Cli) -> None:
    r = cli("fleetctl", "generate", "--config", FLEET, "--gpu", "300MiB", "--out", "out")
    assert r.code == 1, r
    assert "NOT PLACED" in r.err or r.err.startswith("fleetctl: error: ")


def test_generate_needs_out(cli: Cli) -> None:
    r = cli("fleetctl", "generate", "--config", FLEET, "--gpu", "12GiB")
    assert r.code == 2, r
    assert "--out" in r.err


def test_generate_refuses_a_template_dir_without_compose_template(cli: Cli) -> None:
    empty = cli.tmp / "templates"
    empty.mkdir()
    r = cli(
        "fleetctl",
        "generate",
        "--config",
        FLEET,
        "--gpu",
        "12GiB",
        "--out",
        "out",
        "--templates",
        empty,
    )
    assert r.code == 2, r
    assert "compose.yml.j2" in r.err
    assert not (cli.tmp / "out").exists()


def test_generate_refuses_a_template_printing_a_raw_value(cli: Cli) -> None:
    templates = cli.tmp / "templates"
    shutil.copytree(REPO / "templates", templates)
    common = templates / "_common.yml.j2"
    common.write_text(common.read_text().replace("{{ svc.container | q }}", "{{ svc.container }}"))
    r = cli(
        "fleetctl",
        "generate",
        "--config",
        FLEET,
        "--gpu",
        "12GiB",
        "--out",
        "out",
        "--templates",
        templates,
    )
    assert r.code == 1, r
    assert r.err.startswith("fleetctl: error: ") and "unquoted" in r.err
    assert not (cli.tmp / "out").exists()


@pytest.mark.parametrize(
    ("file", "edit"),
    [
        ("compose.yml.j2", "{% if %}\n"),  # TemplateSyntaxError
        ("compose.yml.j2", "{% include 'missing.j2' %}\n"),  # TemplateNotFound
    ],
    ids=["syntax-error", "missing-include"],
)
def test_a_broken_template_is_reported_without_a_traceback(cli: Cli, file: str, edit: str) -> None:
    templates = cli.tmp / "templates"
    shutil.copytree(REPO / "templates", templates)
    (templates / file).write_text((templates / file).read_text() + edit)
    r = cli(
        "fleetctl",
        "generate",
        "--config",
        FLEET,
        "--gpu",
        "12GiB",
        "--out",
        "out",
        "--templates",
        templates,
    )
    assert r.code in (1, 2), r
    assert r.err.startswith("fleetctl: error: ")
    assert not (cli.tmp / "out").exists()


# --- fleetd check-config -------------------------------------------------------------


@pytest.mark.parametrize("config", [FLEET, MULTI], ids=["fleet", "multi-gpu"])
def test_check_config_accepts_the_examples(cli: Cli, config: Path) -> None:
    r = cli("fleetd", "check-config", "--config", config)
    assert r.code == 0, r
    services = len(yaml.safe_load(config.read_text())["services"])
    assert r.out.strip() == f"{config}: ok ({services} services)"


def test_check_config_reads_fleetd_config(cli: Cli) -> None:
    r = cli("fleetd", "check-config", env={"FLEETD_CONFIG": str(MULTI)})
    assert r.code == 0, r
    assert str(MULTI) in r.out


def test_check_config_without_any_config_exits_2(cli: Cli) -> None:
    r = cli("fleetd", "check-config")
    assert r.code == 2, r
    assert "no-default-config.yaml" in r.err, "FLEETD_CONFIG is the default"


# --- help and version ----------------------------------------------------------------


def _commands() -> list[tuple[str, ...]]:
    found: list[tuple[str, ...]] = [("fleetctl",), ("fleetd",)]
    found += [("fleetctl", name) for name in fleetctl.cli.commands]
    found += [("fleetd", name) for name in fleetd.cli.commands]
    return found


@pytest.mark.parametrize("command", _commands(), ids=" ".join)
def test_every_command_has_help(cli: Cli, command: tuple[str, ...]) -> None:
    r = cli(*command, "--help")
    assert r.code == 0, r
    assert r.out.startswith(f"Usage: {command[0]}")
    assert "--help" in r.out
    assert r.err == ""


def test_the_commands_promised_so_far_exist() -> None:
    assert {"plan", "generate"} <= set(fleetctl.cli.commands)
    assert "check-config" in fleetd.cli.commands


@pytest.mark.parametrize("prog", ["fleetctl", "fleetd"])
def test_version(cli: Cli, prog: str) -> None:
    r = cli(prog, "--version")
    assert r.code == 0, r
    assert r.out.startswith(f"{prog}, version ")


def test_generate_into_folders_it_cannot_make_is_a_clear_error_and_writes_nothing(
    tmp_path: Path,
) -> None:
    config = Path(__file__).resolve().parents[1] / "examples" / "fleet.yaml"
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    out, state = tmp_path / "out", tmp_path / "state"
    for args, wanted in (
        (["--out", str(blocker / "x"), "--state-dir", str(state)], f"cannot create {blocker}/x"),
        (["--out", str(out), "--state-dir", str(blocker / "s")], f"cannot create {blocker}/s"),
    ):
        done = subprocess.run(
            [sys.executable, "-c", "from supervisor.cli.fleetctl import main; main()",
             "generate", "--config", str(config), "--gpu", "12GiB", *args],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert wanted in done.stderr
    written = [p for p in (*out.rglob("*"), *state.rglob("*")) if p.is_file()]
    assert written == []  # nothing half-written (the folders it could make may stay, empty)


def test_plan_shows_a_path_and_a_gpu_name_that_look_like_markup_as_written(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "br[/]x"  # a folder "br[" holding "]x"
    folder.mkdir(parents=True)
    config = folder / "fleet.yaml"
    config.write_text((Path(__file__).resolve().parents[1] / "examples/fleet.yaml").read_text())
    done = subprocess.run(
        [sys.executable, "-c", "from supervisor.cli.fleetctl import main; main()",
         "plan", "--config", str(config), "--gpu", "12GiB:GPU [/]bold \x1b[31m"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"Plan for {config}:" in done.stdout
    assert "GPU [/]bold \\x1b[31m" in done.stdout and "\x1b" not in done.stdout


# --- node init ------------------------------------------------------------------------

# fleetctl as a user runs it, with NVML replaced by a tests/fakenvml.py scenario (its
# name is the first argument).
NODE_INIT = """\
import sys
from supervisor.edges import nvml
from tests import fakenvml
fake = getattr(fakenvml, sys.argv.pop(1))()
class FakeNvml(nvml.Nvml):
    def __init__(self) -> None:
        super().__init__(fake)
nvml.Nvml = FakeNvml
from supervisor.cli.fleetctl import main
main()
"""

DAEMON_JSON = """\
{
    "log-driver": "journald",
    "labels": ["rack=r1"],
    "node-generic-resources": ["SSD=ssd0"]
}
"""

RUNTIME_TOML = """\
disable-require = false
#swarm-resource = "DOCKER_RESOURCE_GPU"

[nvidia-container-cli]
load-kmods = true
"""


@pytest.fixture
def node(tmp_path: Path) -> tuple[Path, Path]:
    """A node's daemon.json and the NVIDIA runtime's config.toml, in tmp_path."""
    daemon = tmp_path / "docker" / "daemon.json"
    runtime = tmp_path / "nvidia-container-runtime" / "config.toml"
    for path, text in ((daemon, DAEMON_JSON), (runtime, RUNTIME_TOML)):
        path.parent.mkdir()
        path.write_text(text)
    return daemon, runtime


def node_init(node: tuple[Path, Path], *args: str, gpus: str = "three_good_gpus") -> Result:
    daemon, runtime = node
    done = subprocess.run(
        [sys.executable, "-c", NODE_INIT, gpus, "node", "init",
         "--daemon-config", str(daemon), "--runtime-config", str(runtime), *args],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    result = Result(done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stdout + done.stderr, result
    return result


def files_in(node: tuple[Path, Path]) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for folder in {n.parent for n in node} for p in folder.iterdir()}


def test_node_init_dry_run_prints_the_diff_and_changes_nothing(node: tuple[Path, Path]) -> None:
    before = files_in(node)
    r = node_init(node, "--dry-run")
    assert r.code == 0, r
    assert '+        "NVIDIA-GPU=GPU-good0",' in r.out
    assert '+        "org.fleetd.gpu.2.uuid=GPU-good2",' in r.out
    assert '-#swarm-resource = "DOCKER_RESOURCE_GPU"\n+swarm-resource = "DOCKER_RESOURCE_N' in r.out
    assert f"{node[0]}: would change (dry run)" in r.out
    assert files_in(node) == before


def test_node_init_writes_backs_up_and_a_second_run_changes_nothing(
    node: tuple[Path, Path],
) -> None:
    daemon, runtime = node
    r = node_init(node)
    assert r.code == 0, r
    config = json.loads(daemon.read_text())
    assert config["log-driver"] == "journald" and config["default-runtime"] == "nvidia"
    assert config["node-generic-resources"][0] == "SSD=ssd0"
    assert "NVIDIA-GPU=GPU-good1" in config["node-generic-resources"]
    assert 'swarm-resource = "DOCKER_RESOURCE_NVIDIA-GPU"\n' in runtime.read_text()
    backups = sorted(p for n in node for p in n.parent.glob(f"{n.name}.fleetd-backup-*"))
    assert [p.read_text() for p in backups] == [DAEMON_JSON, RUNTIME_TOML]
    assert f"apply: dockerd --validate --config-file {daemon} && systemctl restart docker" in r.out
    assert f"undo: cp -p {backups[0]} {daemon} && cp -p {backups[1]} {runtime}" in r.out

    after = files_in(node)
    again = node_init(node)
    assert again.code == 0, again
    assert f"{daemon}: already set up, unchanged" in again.out
    assert f"{runtime}: already set up, unchanged" in again.out
    assert files_in(node) == after, "no new backup, no file rewritten"


@pytest.mark.parametrize(
    ("daemon_text", "gpus", "expected"),
    [
        ('{"debug": true,', "three_good_gpus", "daemon.json: not valid JSON (line 1, col"),
        ('["debug"]', "three_good_gpus", "daemon.json: expected a JSON object"),
        (DAEMON_JSON, "driver_not_loaded", "no NVIDIA GPU found: NVML: Driver Not Loaded"),
        (DAEMON_JSON, "lost_gpu_among_good_ones", "GPU 1: cannot be advertised to Swarm"),
    ],
)
def test_node_init_refuses_in_one_line_and_touches_nothing(
    node: tuple[Path, Path], daemon_text: str, gpus: str, expected: str
) -> None:
    node[0].write_text(daemon_text)
    before = files_in(node)
    r = node_init(node, gpus=gpus)
    assert r.code == 1, r
    assert r.err.startswith("fleetctl: error: ") and r.err.count("\n") == 1, r
    assert expected in r.err and r.err.rstrip().endswith("nothing was changed")
    assert files_in(node) == before


def test_node_init_without_the_toolkit_config_needs_skip_runtime_config(
    node: tuple[Path, Path],
) -> None:
    daemon, runtime = node
    runtime.unlink()
    r = node_init(node)
    assert r.code == 1 and "the NVIDIA Container Toolkit is not installed" in r.err, r
    assert "--skip-runtime-config" in r.err and daemon.read_text() == DAEMON_JSON

    done = subprocess.run(
        [sys.executable, "-c", NODE_INIT, "three_good_gpus", "node", "init",
         "--daemon-config", str(daemon), "--skip-runtime-config", "--json"],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert [f["path"] for f in answer["files"]] == [str(daemon)]
    assert answer["files"][0]["changed"] and answer["restart_docker"]
    assert answer["files"][0]["backup"].startswith(f"{daemon}.fleetd-backup-")
    assert [g["uuid"] for g in answer["gpus"]] == ["GPU-good0", "GPU-good1", "GPU-good2"]
    assert not runtime.exists()


def test_node_init_has_help(cli: Cli) -> None:
    r = cli("fleetctl", "node", "init", "--help")
    assert r.code == 0, r
    assert "--dry-run" in r.out and "--skip-runtime-config" in r.out
