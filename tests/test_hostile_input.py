"""Issue 14: hostile or broken configs, options and state files, end to end through the
real commands: each is one clear `PROG: error: ...` line and exit 2 (config, usage) or 1
(environment, state), never a traceback, a hang or a file half-written."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.entrypoints import entry_point

REPO = Path(__file__).resolve().parents[1]
FLEET = (REPO / "examples" / "fleet.yaml").read_text()
# The example with declared GPUs instead of `gpus: auto`: plans without NVML.
DECLARED = FLEET.replace("gpus: auto", "gpus: [{name: G, memory: 12GiB}]  #")


def run(tmp_path: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """One of the project's commands, with state and Docker kept inside `tmp_path`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETD_")}
    env.update(
        FLEETD_CONFIG=str(tmp_path / "no-default-config.yaml"),
        FLEETD_STATE_DIR=str(tmp_path / "state"),
        DOCKER_HOST=f"unix://{tmp_path}/no-docker.sock",  # never the host's Docker
        COLUMNS="200",
    )
    done = subprocess.run(
        [entry_point(str(args[0])), *(str(a) for a in args[1:])],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,  # a hang fails here instead of stalling the suite
        check=False,
    )
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    return done


def _laughs() -> str:
    text = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        text += f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]\n"
    return text + "services: {}\n"


def _services(count: int) -> str:
    rows = [f"  s{i}: {{runtime: ollama, containers: [c{i}], ladder: [{{model: m, vram: 1GiB}}]}}"
            for i in range(count)]  # fmt: skip
    return "services:\n" + "\n".join(rows) + "\n"


DEEP = "(" * 2000 + "x" + ")" * 2000
RULE = f"    rules: [{{id: my.deep, class: vram_oom, pattern: '{DEEP}'}}]\n"
CONFIGS = {
    "billion laughs": (_laughs(), ": expands to more than 25000 values"),
    "a megabyte of values": ("[" + "1, " * 349_000 + "1]\n", ":1: more than 25000 keys and"),
    "an alias in itself": ("services: &a {x: *a}\n", ":1: services.x: an alias that contains"),
    "10,000 nested [": ("[" * 10_000 + "\n", ":1: invalid YAML: exceeded maximum nesting"),
    "a budget of 400 digits": ("budget: 1" + "0" * 400 + "\nservices: {}\n", ":1: budget: got 1"),
    "a size of 5,000 digits": (
        FLEET.replace("vram: 2048MiB", "vram: 1" + "0" * 5000),
        ":14: services.alpha.ladder[0].vram: a number of 5001 digits",
    ),
    "a lone surrogate as a GPU name": (
        DECLARED.replace("name: G", 'name: "\\ud800"'),
        ":4: invalid YAML: found invalid Unicode character escape code",
    ),
    "a rule of 2,000 nested groups": (FLEET + RULE, "nests its groups too deeply"),
    "1,000 services": (_services(1000), ":1: services: 1000 services; expected at most 256"),
}


@pytest.mark.parametrize(("text", "wanted"), CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("command", [("fleetd", "check-config"), ("fleetctl", "plan")])
def test_a_hostile_config_is_one_clear_line_and_exit_2(
    tmp_path: Path, command: tuple[str, str], text: str, wanted: str
) -> None:
    config = tmp_path / "fleet.yaml"
    config.write_text(text, encoding="utf-8")
    args = [*command, "--config", config] + (["--gpu", "12GiB"] if command[1] == "plan" else [])
    started = time.monotonic()
    done = run(tmp_path, *args)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"{command[0]}: error: {config}"), done.stderr
    assert wanted in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("source", ["fifo", "/dev/zero"])
def test_a_config_that_would_never_end_is_refused_without_reading(
    tmp_path: Path, source: str
) -> None:
    config = Path(source)
    if source == "fifo":
        config = tmp_path / "fleet.yaml"
        os.mkfifo(config)
    done = run(tmp_path, "fleetctl", "plan", "--config", config, "--gpu", "12GiB")
    assert done.returncode == 2
    assert done.stderr == f"fleetctl: error: {config}: cannot read config (is not a regular file)\n"


@pytest.mark.parametrize(
    ("gpus", "wanted"),
    [
        (["9" * 400 + "GiB"], "is larger than 1 PiB, the most fleetd accepts"),
        ([f"{n}GiB" for n in range(1, 66)], "--gpu given 65 times; expected at most 64 GPUs"),
    ],
    ids=["400 nines", "65 GPUs"],
)
@pytest.mark.parametrize("command", ["plan", "generate"])
def test_a_gpu_option_beyond_any_host_is_a_usage_error(
    tmp_path: Path, command: str, gpus: list[str], wanted: str
) -> None:
    config = tmp_path / "fleet.yaml"
    config.write_text(FLEET)
    options = [part for spec in gpus for part in ("--gpu", spec)]
    out = ["--out", tmp_path / "out"] if command == "generate" else []
    done = run(tmp_path, "fleetctl", command, "--config", config, *options, *out)
    assert done.returncode == 2 and wanted in done.stderr, done.stderr
    assert done.stderr.startswith("fleetctl: error: --gpu ") and not (tmp_path / "out").exists()


def test_a_declared_gpu_name_that_looks_like_markup_is_printed_as_written(tmp_path: Path) -> None:
    config = tmp_path / "fleet.yaml"
    config.write_text(DECLARED.replace("name: G", "name: 'RTX [/] [bold]x'"))
    done = run(tmp_path, "fleetctl", "plan", "--config", config)
    assert done.returncode == 0, done.stderr
    assert "RTX [/] [bold]x" in done.stdout


# --- the state file --------------------------------------------------------------------


def _transition(at: float) -> dict[str, object]:
    return {"time": at, "service": "alpha", "from_rung": 0, "to_rung": 1,
            "from_model": "llama3.2:3b", "to_model": "phi3:mini", "reason": "r",
            "actor": "fleetd"}  # fmt: skip


def _state(services: dict[str, object], history: list[object] | None = None) -> str:
    return json.dumps({"version": 1, "services": services, "history": history or []})


STATES = {
    "an integer of 5,000 digits": (
        '{"version": 1, "measured": {"m": {"at": 1' + "0" * 5000 + "}}}",
        "not a state file: a number of 5001 digits (10000000000000000000...), expected at most",
    ),
    "100,000 nested [": ("[" * 100_000, "not a state file: nested too deeply"),
    "a time of 1e20": (
        _state({"alpha": {"model": "phi3:mini", "rung": 1}}, [_transition(1e20)]),
        "history[0].time is 1e+20, expected a time in epoch seconds before the year 10000",
    ),
    "a lone surrogate in a model": (
        '{"version": 1, "services": {"alpha": {"model": "x\\ud800", "rung": 1}}}',
        'services.alpha.model is "x\\ud800", expected text (no lone surrogate',
    ),
    "a lone surrogate in a name": (
        '{"version": 1, "services": {"al\\ud800": {"model": "x", "rung": 1}}}',
        'services: key "al\\ud800", expected text',
    ),
}


@pytest.mark.parametrize(("text", "wanted"), STATES.values(), ids=STATES.keys())
@pytest.mark.parametrize("command", ["status", "history"])
def test_a_state_file_the_decoder_cannot_take_is_named_and_left_alone(
    tmp_path: Path, command: str, text: str, wanted: str
) -> None:
    state = tmp_path / "state" / "state.json"
    state.parent.mkdir()
    state.write_text(text)
    done = run(tmp_path, "fleetctl", command)
    assert done.returncode == 1, done.stderr
    error = done.stderr.splitlines()[-1]
    assert error.startswith(f"fleetctl: error: {state}: ") and wanted in error, done.stderr
    assert "moves such a file aside" in error and state.read_text() == text


def test_a_state_file_that_is_not_utf8_is_named_by_status(tmp_path: Path) -> None:
    state = tmp_path / "state" / "state.json"
    state.parent.mkdir()
    state.write_bytes(b'{"version": 1, "services": {"\xff": 1}}')
    done = run(tmp_path, "fleetctl", "status")
    assert done.returncode == 1 and "not UTF-8" in done.stderr


def test_a_state_file_fleetctl_cannot_take_is_moved_aside_before_a_change(tmp_path: Path) -> None:
    """A lone surrogate in a model name decoded, and then saving it again raised
    UnicodeEncodeError: now it is set aside like any corrupt file and the change is made."""
    config = tmp_path / "fleet.yaml"
    config.write_text(DECLARED)
    folder = tmp_path / "state"
    folder.mkdir()
    bad = '{"version": 1, "services": {"alpha": {"model": "x\\ud800", "rung": 0}}}'
    (folder / "state.json").write_text(bad)
    done = run(tmp_path, "fleetctl", "pin", "alpha", "1", "--config", config)
    assert done.returncode == 0, done.stderr
    assert "state.json was corrupt (services.alpha.model is" in done.stderr
    (aside,) = folder.glob("state.json.corrupt-*")
    assert aside.read_text() == bad
    assert json.loads((folder / "state.json").read_text())["services"]["alpha"]["pinned"] == 1


def test_a_rung_past_the_end_of_the_ladder_is_refused_with_the_way_out(tmp_path: Path) -> None:
    config = tmp_path / "fleet.yaml"
    config.write_text(DECLARED)
    folder = tmp_path / "state"
    folder.mkdir()
    text = _state({"alpha": {"model": "gone:1b", "rung": 9}})
    (folder / "state.json").write_text(text)
    done = run(tmp_path, "fleetctl", "downgrade", "alpha", "--config", config)
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines()[-1].startswith("fleetctl: error: ")
    assert "fleetctl reset alpha" in done.stderr
    assert (folder / "state.json").read_text() == text


def test_a_model_name_that_looks_like_markup_is_shown_as_written(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    folder.mkdir()
    history = [{**_transition(1.0), "to_model": "[/][bold]y"}]
    (folder / "state.json").write_text(_state({"alpha": {"model": "[/]x", "rung": 1}}, history))
    status = run(tmp_path, "fleetctl", "status")
    assert status.returncode == 0 and "[/]x" in status.stdout, status.stderr
    history_run = run(tmp_path, "fleetctl", "history")
    assert history_run.returncode == 0 and "[/][bold]y" in history_run.stdout


# --- generate --------------------------------------------------------------------------


def test_generate_into_a_state_dir_it_cannot_write_changes_no_file(tmp_path: Path) -> None:
    """The hand-off folder refuses files (sysfs does, even for root): compose.yml and .env
    used to be written first, then a traceback or an error with the project half-made."""
    config, out = tmp_path / "fleet.yaml", tmp_path / "out"
    config.write_text(FLEET)
    out.mkdir()
    (out / "compose.yml").write_text("the old project\n")
    services = tmp_path / "state" / "services"
    services.mkdir(parents=True)
    (services / "alpha").symlink_to("/sys")
    done = run(tmp_path, "fleetctl", "generate", "--config", config, "--gpu", "12GiB",
               "--out", out, "--state-dir", tmp_path / "state")  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(f"fleetctl: error: cannot write {services}/alpha/args: ")
    assert done.stderr.rstrip().endswith("(no file was changed)")
    assert sorted(p.name for p in out.iterdir()) == ["compose.yml"]
    assert (out / "compose.yml").read_text() == "the old project\n"


def test_generate_removes_the_temp_files_a_killed_run_left(tmp_path: Path) -> None:
    config, out = tmp_path / "fleet.yaml", tmp_path / "out"
    config.write_text(FLEET)
    handoff = tmp_path / "state" / "services" / "alpha"
    handoff.mkdir(parents=True)
    out.mkdir()
    old = [out / ".compose.yml.k1.tmp", out / "..env.k2.tmp", handoff / ".args.k4.tmp"]
    fresh = out / ".compose.yml.k3.tmp"  # another run may be writing it now
    for temp in [*old, fresh]:
        temp.write_text("partial")
    for temp in old:
        os.utime(temp, (time.time() - 3600, time.time() - 3600))
    done = run(tmp_path, "fleetctl", "generate", "--config", config, "--gpu", "12GiB",
               "--out", out, "--state-dir", tmp_path / "state")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == [".compose.yml.k3.tmp", ".env", "compose.yml"]
    assert sorted(p.name for p in handoff.iterdir()) == ["args", "env", "model"]
