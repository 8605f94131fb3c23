"""`fleetctl scan`, run as a real subprocess: classify a log offline, the way fleetd would.

The log mixes real incident lines (the built-in rules' own examples), a multi-line Python
traceback and real benign lines (rules.NOT_INCIDENTS), so the expected line numbers are
known exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from supervisor.core.rules import BUILTIN_RULES, NOT_INCIDENTS, Rule

REPO = Path(__file__).resolve().parents[1]
FLEETCTL = "from supervisor.cli.fleetctl import main; main()"


def _rule(rule_id: str) -> Rule:
    [rule] = [r for r in BUILTIN_RULES if r.id == rule_id]
    return rule


def _example(rule_id: str, index: int = 0) -> str:
    return _rule(rule_id).examples[index]


# A torch CUDA OOM as a whole traceback: only its last line is an incident.
TRACEBACK = [
    "Traceback (most recent call last):",
    '  File "/app/serve.py", line 41, in <module>',
    '    model = load_model(os.environ["MODEL"])',
    '  File "/usr/local/lib/python3.11/site-packages/torch/nn/modules/module.py", line 1150,'
    " in convert",
    "    return t.to(device, dtype if t.is_floating_point() else None, non_blocking)",
    _example("torch.cuda_oom", 1),
]

# (text, (class, rule) or None), in file order.
LOG: list[tuple[str, tuple[str, str] | None]] = [
    (NOT_INCIDENTS[0], None),
    (NOT_INCIDENTS[1], None),
    (_example("llamacpp.cuda_malloc_failed", 1), ("vram_oom", "llamacpp.cuda_malloc_failed")),
    (NOT_INCIDENTS[8], None),
    *[(line, None) for line in TRACEBACK[:-1]],
    (TRACEBACK[-1], ("vram_oom", "torch.cuda_oom")),
    ("", None),
    (_example("kernel.oom_kill", 1), ("host_oom", "kernel.oom_kill")),
    (NOT_INCIDENTS[-1], None),  # a prompt quoting an OOM, echoed by vLLM's request log
    (_example("cuda.illegal_address"), ("gpu_fault", "cuda.illegal_address")),
    (NOT_INCIDENTS[21], None),
    (_example("vllm.no_cache_blocks"), ("vram_oom", "vllm.no_cache_blocks")),
    (_example("cuda.error_oom"), ("vram_oom", "cuda.error_oom")),
    (NOT_INCIDENTS[-5], None),
]
EXPECTED = [
    (number, text, found) for number, (text, found) in enumerate(LOG, start=1) if found is not None
]


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


def scan(*args: str | Path, stdin: str | None = None, cwd: Path = REPO) -> Result:
    done = subprocess.run(
        [sys.executable, "-c", FLEETCTL, "scan", *map(str, args)],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
        check=False,
    )
    assert "Traceback (most recent call last)" not in done.stderr, done.stderr
    return Result(done.returncode, done.stdout, done.stderr)


@pytest.fixture
def log_file(tmp_path: Path) -> Path:
    path = tmp_path / "mixed.log"
    path.write_text("".join(text + "\n" for text, _ in LOG), encoding="utf-8")
    return path


def test_the_log_mixes_incidents_and_benign_lines() -> None:
    assert 5 <= len(EXPECTED) < len(LOG)  # guards the fixture itself


def test_human_output_lists_exactly_the_matching_lines(log_file: Path) -> None:
    result = scan(log_file)

    assert result.code == 0, result.err
    assert result.err == ""
    lines = result.out.splitlines()
    assert lines == [f"{n}: {cls} [{rule}] {text}" for n, text, (cls, rule) in EXPECTED]


def test_json_prints_one_object_per_classified_line(log_file: Path) -> None:
    result = scan(log_file, "--json")

    assert result.code == 0, result.err
    records = [json.loads(line) for line in result.out.splitlines()]
    assert records == [
        {"line": n, "class": cls, "rule": rule, "text": text} for n, text, (cls, rule) in EXPECTED
    ]
    assert all(list(r) == ["line", "class", "rule", "text"] for r in records)


def test_only_the_last_line_of_a_traceback_is_an_incident(tmp_path: Path) -> None:
    path = tmp_path / "tb.log"
    path.write_text("\n".join(TRACEBACK) + "\n")

    records = [json.loads(line) for line in scan(path, "--json").out.splitlines()]

    assert [(r["line"], r["rule"]) for r in records] == [(len(TRACEBACK), "torch.cuda_oom")]


def test_standard_input_is_read_for_a_dash(log_file: Path) -> None:
    text = log_file.read_text()

    from_file = scan(log_file, "--json")
    from_dash = scan("-", "--json", stdin=text)
    by_default = scan("--json", stdin=text)

    assert from_dash.code == by_default.code == 0
    assert from_dash.out == by_default.out == from_file.out


def test_windows_line_ends_and_ansi_colours_are_not_part_of_the_text() -> None:
    line = _example("cuda.error_oom")
    stdin = f"hello\r\n\x1b[31m{line}\x1b[0m\r\n"

    [record] = [json.loads(x) for x in scan("--json", stdin=stdin).out.splitlines()]

    assert record == {"line": 2, "class": "vram_oom", "rule": "cuda.error_oom", "text": line}


def _records(log: Path, *args: str) -> list[dict[str, object]]:
    return [json.loads(x) for x in scan(log, "--json", *args).out.splitlines()]


def test_every_runtime_reports_every_incident_line(log_file: Path) -> None:
    # One runtime's wording in another's service (an app relaying its server's log) counts.
    expected = [(number, hit[0]) for number, (_, hit) in enumerate(LOG, start=1) if hit]
    for runtime in ("generic", "vllm", "llamacpp", "ollama"):
        records = _records(log_file, "--runtime", runtime)
        assert [(r["line"], r["class"]) for r in records] == expected, runtime
    generic = {r["rule"] for r in _records(log_file, "--runtime", "generic")}
    assert {"llamacpp.cuda_malloc_failed", "vllm.no_cache_blocks"} <= generic


def test_ollama_leaves_out_only_its_own_fit_probes(tmp_path: Path) -> None:
    probe = (
        "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 9220.57 MiB on device 0:"
        " cudaMalloc failed: out of memory"
    )
    log = tmp_path / "ollama.log"
    log.write_text(f"{probe}\n{_example('ollama.runner_oom')}\n")

    assert [r["line"] for r in _records(log, "--runtime", "ollama")] == [2]
    assert [r["line"] for r in _records(log, "--runtime", "generic")] == [1, 2]


def test_an_unknown_runtime_is_a_usage_error(log_file: Path) -> None:
    result = scan(log_file, "--runtime", "nonsense")

    assert result.code == 2
    assert result.out == ""
    assert "nonsense" in result.err


@pytest.mark.parametrize("as_json", [False, True])
def test_no_match_exits_0_with_empty_output(tmp_path: Path, as_json: bool) -> None:
    path = tmp_path / "benign.log"
    path.write_text("\n".join(NOT_INCIDENTS) + "\n")

    result = scan(path, *(["--json"] if as_json else []))

    assert (result.code, result.out, result.err) == (0, "", "")


def test_an_empty_input_exits_0_with_empty_output(tmp_path: Path) -> None:
    path = tmp_path / "empty.log"
    path.write_text("")

    assert scan(path) == Result(0, "", "")
    assert scan("-", stdin="") == Result(0, "", "")


def test_a_missing_file_exits_2_with_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.log"

    result = scan(missing)

    assert result.code == 2
    assert result.out == ""
    [line] = result.err.splitlines()
    assert line.startswith("fleetctl: error: ")
    assert str(missing) in line
    assert "No such file" in line


def test_a_directory_exits_2_with_one_line(tmp_path: Path) -> None:
    result = scan(tmp_path, "--json")

    assert result.code == 2
    assert result.out == ""
    [line] = result.err.splitlines()
    assert line.startswith("fleetctl: error: ")
    assert str(tmp_path) in line
    assert "directory" in line.lower()


def test_help_describes_the_command() -> None:
    result = scan("--help")

    assert result.code == 0
    assert result.err == ""
    assert "Usage:" in result.out
    assert "[FILE|-]" in result.out
    for option in ("--runtime", "--json"):
        assert option in result.out
    assert "vllm" in result.out and "llamacpp" in result.out
