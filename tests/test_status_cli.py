"""`fleetctl status` and `history` read the saved state and never change it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.core.state import (
    FleetState,
    Incident,
    ServiceState,
    ServiceStatus,
    Transition,
)
from supervisor.edges.store import StateStore

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "fleet.yaml"


def fleetctl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    code = "from supervisor.cli.fleetctl import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, check=False
    )


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    store = StateStore(tmp_path)
    evidence = "ggml_backend_cuda_buffer_type_alloc_buffer: ... cudaMalloc failed: out of memory"
    state = FleetState(
        services={
            "alpha": ServiceState(
                model="tinyllama:1.1b",
                rung=2,
                state=ServiceStatus.COOLDOWN,
                incidents=[Incident(9e9, "vram_oom", "llamacpp.x", "c1", evidence)],
            ),
            "gone": ServiceState(model="old", rung=0),
        },
        history=[
            Transition(
                1.7e9,
                "alpha",
                0,
                2,
                "llama3.2:3b",
                "tinyllama:1.1b",
                "3 vram_oom incidents in 10m",
                evidence,
                "llamacpp.x",
                "c1",
            )
        ],
    )
    store.save(state)
    return tmp_path


def test_status_json_has_model_rung_and_state_per_service(state_dir: Path) -> None:
    before = (state_dir / "state.json").read_bytes()
    r = fleetctl("status", "--json", "--state-dir", state_dir, "--config", CONFIG)
    assert r.returncode == 0, r.stderr
    alpha = json.loads(r.stdout)["services"]["alpha"]
    assert (alpha["model"], alpha["rung"], alpha["state"], alpha["rungs"]) == (
        "tinyllama:1.1b",
        2,
        "cooldown",
        4,
    )
    assert alpha["last_transition"]["from_model"] == "llama3.2:3b"
    assert json.loads(r.stdout)["services"]["gone"]["in_config"] is False
    assert "state.json" in r.stderr  # where it read from, on stderr: stdout stays JSON
    assert (state_dir / "state.json").read_bytes() == before


def test_status_table_shows_the_last_change_and_its_evidence(state_dir: Path) -> None:
    r = fleetctl("status", "alpha", "--state-dir", state_dir, "--config", CONFIG)
    assert r.returncode == 0, r.stderr
    assert "2 of 4" in r.stdout and "llama3.2:3b -> tinyllama:1.1b" in r.stdout
    assert "evidence: ggml_backend_cuda_buffer_type_alloc_buffer" in r.stdout
    assert "gone" not in r.stdout


def test_status_shows_why_a_service_cannot_start(tmp_path: Path) -> None:
    shm = (
        "RuntimeError: Insufficient space in /dev/shm for shared-memory allocation: 160 MiB"
        " required, 64 MiB free. Increase /dev/shm (e.g. --shm-size or --ipc=host)"
    )
    failed = Incident(1.8e9, "start_failure", "vllm.shm_insufficient", "c1", shm)
    state = FleetState(services={"alpha": ServiceState("llama3.2:3b", 0, incidents=[failed])})
    StateStore(tmp_path).save(state)
    r = fleetctl("status", "--json", "--state-dir", tmp_path, "--config", CONFIG)
    assert r.returncode == 0, r.stderr
    last = json.loads(r.stdout)["services"]["alpha"]["last_incident"]
    assert (last["class"], last["rule"], last["evidence"]) == (
        "start_failure",
        "vllm.shm_insufficient",
        shm,
    )
    r = fleetctl("status", "alpha", "--state-dir", tmp_path, "--config", CONFIG)
    assert "last incident start_failure (vllm.shm_insufficient)" in r.stdout
    assert "Insufficient space in /dev/shm" in r.stdout


def test_status_of_an_unknown_service_is_a_usage_error(state_dir: Path) -> None:
    r = fleetctl("status", "nope", "--state-dir", state_dir, "--config", CONFIG)
    assert r.returncode == 2 and "no service 'nope'" in r.stderr


def test_status_without_state_says_so_and_a_corrupt_file_is_left_alone(tmp_path: Path) -> None:
    r = fleetctl("status", "--state-dir", tmp_path, "--config", CONFIG)
    assert r.returncode == 1 and "no state yet" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "state.json").write_text("{not json")
    r = fleetctl("status", "--state-dir", tmp_path, "--config", CONFIG)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert (tmp_path / "state.json").read_text() == "{not json"


def test_history_lists_transitions_with_reason_and_evidence(state_dir: Path) -> None:
    r = fleetctl("history", "--state-dir", state_dir)
    assert r.returncode == 0
    assert "rung 0 llama3.2:3b -> rung 2 tinyllama:1.1b" in r.stdout
    assert "reason: 3 vram_oom incidents in 10m" in r.stdout
    records = json.loads(fleetctl("history", "alpha", "--json", "--state-dir", state_dir).stdout)
    assert [(h["from_rung"], h["to_rung"]) for h in records] == [(0, 2)]
    assert json.loads(fleetctl("history", "gone", "--json", "--state-dir", state_dir).stdout) == []


def test_text_from_containers_reaches_the_terminal_escaped_and_never_as_markup(
    tmp_path: Path,
) -> None:
    """A log line carrying ANSI escapes, a bell and a bidi override, and a model name that
    looks like Rich markup: shown escaped, as written, in `status` and `history`;
    `--json` keeps them verbatim."""
    evidence = "CUDA error: out of memory \x1b[2J\x1b[31mgotcha\x07 \u202eevil"
    model = "[/]org/[bold]model"
    state = FleetState(
        services={"alpha": ServiceState(model=model, rung=1)},
        history=[Transition(1.7e9, "alpha", 0, 1, "big", model, "3 vram_oom", evidence)],
    )
    StateStore(tmp_path).save(state)
    for args in (("status",), ("history",)):
        done = fleetctl(*args, "--state-dir", tmp_path)
        assert done.returncode == 0, done.stderr
        assert "\x1b" not in done.stdout and "\x07" not in done.stdout
        assert "\u202e" not in done.stdout
        assert "\\x1b[2J\\x1b[31mgotcha\\x07 \\u202eevil" in done.stdout
        assert model in done.stdout  # the brackets as written, not read as markup
    raw = json.loads(fleetctl("history", "--state-dir", tmp_path, "--json").stdout)
    assert raw[0]["evidence"] == evidence and raw[0]["to_model"] == model
