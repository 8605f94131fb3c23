"""Fuzzing the config loader (supervisor.core.config.load_config) and `fleetctl generate`.

A config file, whatever its bytes, either loads or is a ConfigError (one line a person can
act on), never another exception and never a hang. A config that loads either generates a
compose project that parses as YAML, or is refused with the output folder and the state
dir as they were. Seeds: the example configs, as text and as parsed documents, mutated.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from supervisor.cli import fleetctl
from supervisor.core.config import load_config
from supervisor.core.errors import ConfigError, FleetdError
from tests.fuzz.fuzzing import (
    ODD_SCALARS,
    TALLY,
    bounded,
    fuzz_settings,
    mutated_text,
    mutated_tree,
    odd_values,
)

pytestmark = pytest.mark.fuzz

REPO = Path(__file__).resolve().parents[2]
SEEDS = [REPO / "examples" / "fleet.yaml", REPO / "examples" / "multi-gpu.yaml"]
SEEDS.append(REPO / "examples" / "demo" / "fleet.yaml")
SEED_TEXTS = [p.read_text() for p in SEEDS]
SEED_TREES = [yaml.safe_load(t) for t in SEED_TEXTS]
LOAD_S = 5.0
GENERATE_S = 20.0

# Every key the schema knows, so that mutations reach the validators behind them.
KEYS = """budget accelerator gpus ollama_instances_per_gpu compose_dir policy metrics services
name memory incidents_to_step_down incident_window cooldown burst_window stop_timeout
step_up_after step_up_at probation enabled address runtime containers watch restart ladder
priority gpu image port model_env served_name environment args volumes healthcheck rules
endpoint ensemble health warmup model vram metadata context parallel kv_cache
tensor_parallel id class pattern interval timeout unhealthy_after healthy_after
breaker_after breaker_reset start_period prompt tokens""".split()  # noqa: SIM905 (a paragraph reads better than 60 strings)

YAML_TOKENS = [
    ": ", "- ", "{", "}", "[", "]", ",", "&a ", "*a", "<<: *a", "? ", "|", ">-", "#", "---\n",
    "...\n", "%YAML 1.1\n", "!!binary ", "!!python/object/apply:os.system ['id'] ",
    "!!float ", "!!int ", "!!set ", "!!omap ", "\t", "\x00", "\ufeff", "\r", "\x85",
    "\u2028", "'", '"', "~", "null", "yes", "on", ".inf", ".nan", "0x1F", "0o17", "1_000",
    "1e999", "9" * 5000, "=", "<<", "%",
]  # fmt: skip

# Values a config might really hold, so that mutated configs still load often enough for
# `generate` to be tried on them.
PLAUSIBLE: list[Any] = [
    "1GiB", "2048MiB", "512MiB", "6.2GB", "100GiB", "1KiB", 1, 2, 8, 64, 8192, 131072,
    "llama3.2:3b", "Qwen/Qwen2.5-7B-Instruct", "/models/x.gguf", "m", "a-b_c.d",
    "fleet-x", "x", "ollama", "vllm", "llamacpp", "generic", "registry.example.com/a:1",
    ["a"], ["/srv/models:/models:ro"], ["named:/data"], {"A": "1"}, {"K": "a b"},
    ["--flag"], "q8_0", "f16", "wget -qO- http://127.0.0.1:9000/ || exit 1",
    "http://127.0.0.1:11434", "0 3 * * *", "30s", "10m", "/dev/zero", 0.85, 1.0,
]  # fmt: skip
plausible_values = st.sampled_from(PLAUSIBLE) | st.sampled_from(ODD_SCALARS) | odd_values


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fleetd-fuzz-config-") as d:
        yield Path(d)


def load(work: Path, data: bytes) -> str:
    """Load `data` as a config: 'accepted' or 'refused'; anything else fails the test."""
    path = work / "fleet.yaml"
    path.write_bytes(data)
    try:
        with bounded(LOAD_S):
            load_config(path)
    except ConfigError as e:
        assert str(e).strip(), "a ConfigError says what is wrong"
        return "refused"
    return "accepted"


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


ENV_LINE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=[^\n]*\n")
OLD_COMPOSE = b"# the project of an earlier run\nservices: {}\n"


def generate(work: Path, case: int) -> str:
    """Run `fleetctl generate` on work/fleet.yaml into a folder holding an earlier project."""
    here = work / f"generate-{case}"
    out, state = here / "out", here / "state"
    out.mkdir(parents=True)
    (out / "compose.yml").write_bytes(OLD_COMPOSE)
    (out / ".env").write_bytes(b"OLD=1\n")
    before = files(here)
    args = ["generate", "--config", str(work / "fleet.yaml"), "--gpu", "24GiB:fuzz GPU"]
    args += ["--gpu", "8GiB", "--out", str(out), "--state-dir", str(state)]
    try:
        with bounded(GENERATE_S):
            code = fleetctl.cli.main(args, prog_name="fleetctl", standalone_mode=False)
    except (FleetdError, click.ClickException):
        assert files(here) == before, "a refused generate leaves every file as it was"
        return "generate refused"
    assert code in (0, 1), code
    compose = yaml.safe_load((out / "compose.yml").read_text())
    assert isinstance(compose, dict) and isinstance(compose.get("services"), dict), compose
    env = (out / ".env").read_text()
    assert all(ENV_LINE.fullmatch(line) for line in env.splitlines(keepends=True)), env
    return "generated" if code == 0 else "generated, a service left out"


@fuzz_settings(300)
@given(st.binary(max_size=3000) | st.text(max_size=1000).map(str.encode))
@example(b"")
@example(b"\xff\xfe")
@example(b"services:\n  a: &a [*a]\n")
def test_any_bytes_load_or_are_a_config_error(work: Path, data: bytes) -> None:
    TALLY["config: any bytes"][load(work, data)] += 1


@fuzz_settings(400)
@given(st.sampled_from(SEED_TEXTS).flatmap(lambda seed: mutated_text(seed, YAML_TOKENS)))
def test_edited_example_configs_load_or_are_a_config_error(work: Path, text: str) -> None:
    TALLY["config: edited example text"][load(work, text.encode())] += 1


CASES = iter(range(10**9))


def load_and_generate(work: Path, tree: Any, surface: str) -> None:
    try:
        text = yaml.safe_dump(tree, allow_unicode=True)
    except yaml.YAMLError:  # a value PyYAML cannot write: nothing to test
        return
    outcome = load(work, text.encode())
    TALLY[surface][outcome] += 1
    if outcome == "accepted":
        TALLY["generate: configs that load"][generate(work, next(CASES))] += 1


@fuzz_settings(250)
@given(st.sampled_from(SEED_TREES).flatmap(lambda seed: mutated_tree(seed, KEYS, plausible_values)))
def test_changed_example_documents_load_and_generate_or_are_refused(work: Path, tree: Any) -> None:
    load_and_generate(work, tree, "config: changed example documents")


# Values that stay plausible and keys that stay in place: most of these configs load, so
# that `generate` meets names, sizes, volumes and variables it has not seen.
plausible_changes = st.sampled_from(SEED_TREES).flatmap(
    lambda seed: mutated_tree(seed, KEYS, st.sampled_from(PLAUSIBLE), ("replace", "repeat"))
)


@fuzz_settings(100)
@given(plausible_changes)
def test_plausibly_changed_examples_generate_or_are_refused(work: Path, tree: Any) -> None:
    load_and_generate(work, tree, "config: plausibly changed examples")
