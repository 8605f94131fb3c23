"""Tests for supervisor.core.detector and supervisor.core.rules: real log lines in, incident
classes out.

The examples and NOT_INCIDENTS lines come from the runtimes' own output (see each rule's
source); every one is run here, for every runtime: every rule applies to every service.
"""

from __future__ import annotations

import re

import pytest

from supervisor.core.detector import (
    CLASS_PRIORITY,
    Detector,
    Match,
    compile_rule,
    required_literals,
    scan_lines,
)
from supervisor.core.rules import (
    BUILTIN_RULES,
    HANDLED_LINES,
    KNOWN_RUNTIMES,
    NOT_INCIDENTS,
    IncidentClass,
    Rule,
)

ALL_RUNTIMES: list[str | None] = [None, *sorted(KNOWN_RUNTIMES)]
RULES_BY_ID = {rule.id: rule for rule in BUILTIN_RULES}
EXAMPLES = [
    pytest.param(rule, example, id=f"{rule.id}[{i}]")
    for rule in BUILTIN_RULES
    for i, example in enumerate(rule.examples)
]
GPU_FAULT_EXAMPLES = [
    pytest.param(example, id=f"{rule.id}[{i}]")
    for rule in BUILTIN_RULES
    if rule.incident_class is IncidentClass.GPU_FAULT
    for i, example in enumerate(rule.examples)
]

# A 15-line vLLM engine failure as it reaches `docker logs`: only the last line is evidence.
TRACEBACK = """\
ERROR 05-08 14:46:12 [core.py:396] EngineCore failed to start.
Traceback (most recent call last):
  File "/usr/local/lib/python3.12/dist-packages/vllm/v1/engine/core.py", line 387, in run_engine_core
    engine_core = EngineCoreProc(*args, **kwargs)
  File "/usr/local/lib/python3.12/dist-packages/vllm/v1/engine/core.py", line 329, in __init__
    super().__init__(vllm_config, executor_class, log_stats)
  File "/usr/local/lib/python3.12/dist-packages/vllm/v1/engine/core.py", line 71, in __init__
    self._initialize_kv_caches(vllm_config)
  File "/usr/local/lib/python3.12/dist-packages/vllm/v1/worker/gpu_model_runner.py", line 1548, in profile_run
    hidden_states = self._dummy_run(self.max_num_tokens)
  File "/usr/local/lib/python3.12/dist-packages/torch/nn/modules/module.py", line 1751, in _call_impl
    return forward_call(*args, **kwargs)
  File "/usr/local/lib/python3.12/dist-packages/vllm/model_executor/layers/activation.py", line 85, in forward
    return self.act_fn(x)
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.64 GiB of which 1.06 GiB is free.
"""  # noqa: E501

# Ollama >= 0.12 fits a model by trying allocations and backing off; these lines from
# ollama/ollama#13303 were followed by a smaller layout, not by a failure.
OLLAMA_FIT_PROBE = (
    "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 9220.57 MiB on device 0:"
    " cudaMalloc failed: out of memory",
    "ggml_gallocr_reserve_n: failed to allocate CUDA0 buffer of size 9668469760",
)


# --- the rules as data ------------------------------------------------------------------


def test_rule_ids_are_unique_and_runtimes_known() -> None:
    assert len(RULES_BY_ID) == len(BUILTIN_RULES)
    for rule in BUILTIN_RULES:
        assert rule.runtimes is None or rule.runtimes <= KNOWN_RUNTIMES, rule.id
        assert rule.examples, f"{rule.id} has no example"
        assert rule.description and "\n" not in rule.description, rule.id
        assert rule.source, rule.id


def test_every_builtin_rule_is_behind_the_prefilter() -> None:
    # A rule without required literals would run its regex on every line.
    for rule in BUILTIN_RULES:
        assert required_literals(rule.pattern), rule.id


@pytest.mark.parametrize(("rule", "example"), EXAMPLES)
def test_example_matches_its_own_rule(rule: Rule, example: str) -> None:
    assert re.search(rule.pattern, example), f"{rule.id} does not match {example!r}"


@pytest.mark.parametrize(("rule", "example"), EXAMPLES)
def test_example_gets_the_rule_class_for_every_runtime(rule: Rule, example: str) -> None:
    for runtime in ALL_RUNTIMES:
        if any(h.runtime == runtime and re.match(h.pattern, example) for h in HANDLED_LINES):
            continue  # that runtime recovers from it (test_handled_lines_...)
        match = Detector(runtime=runtime).classify(example)
        assert match is not None, f"{rule.id}: no match for runtime {runtime}"
        assert match.rule.incident_class is rule.incident_class, (runtime, match.rule.id)


@pytest.mark.parametrize("runtime", ALL_RUNTIMES)
@pytest.mark.parametrize("line", NOT_INCIDENTS)
def test_not_incidents_match_nothing(line: str, runtime: str | None) -> None:
    match = Detector(runtime=runtime).classify(line)
    assert match is None, f"{match and match.rule.id} matched {line!r}"


# --- classes ----------------------------------------------------------------------------


@pytest.mark.parametrize("runtime", ALL_RUNTIMES)
@pytest.mark.parametrize("line", GPU_FAULT_EXAMPLES)
def test_gpu_faults_are_never_vram_oom(line: str, runtime: str | None) -> None:
    match = Detector(runtime=runtime).classify(line)
    assert match is None or match.rule.incident_class is IncidentClass.GPU_FAULT


@pytest.mark.parametrize(
    "line",
    [
        "RuntimeError: CUDA error: an illegal memory access was encountered",
        "Error: llama runner process has terminated: CUDA error: unspecified launch failure",
        "Failed to initialize NVML: Unknown Error",
        "NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, GPU has fallen off the bus.",
    ],
)
def test_named_gpu_faults(line: str) -> None:
    for runtime in ALL_RUNTIMES:
        match = Detector(runtime=runtime).classify(line)
        assert match is not None and match.incident_class is IncidentClass.GPU_FAULT, runtime


def test_gpu_faults_beat_a_services_rule_which_beats_the_other_built_in_rules() -> None:
    greedy = compile_rule("my.greedy", "vram_oom", r"memory")
    detector = Detector(rules=(greedy, *BUILTIN_RULES))
    fault = detector.classify("RuntimeError: CUDA error: an illegal memory access was encountered")
    kill = detector.classify("Memory cgroup out of memory: Killed process 15617 (python3)")
    assert fault is not None and fault.rule.id == "cuda.illegal_address"  # never a step down
    # A person's rule says what a line means for the service (a CPU-only host's RAM is its
    # capacity): it wins over the built-in host_oom reading.
    assert kill is not None and kill.rule.id == "my.greedy"
    plain = Detector().classify("Memory cgroup out of memory: Killed process 15617 (python3)")
    assert plain is not None and plain.rule.id == "kernel.oom_kill"
    assert CLASS_PRIORITY[0] is IncidentClass.GPU_FAULT
    assert CLASS_PRIORITY[-1] is IncidentClass.VRAM_OOM


def test_host_oom_lines_are_not_vram() -> None:
    detector = Detector()
    for line in ("Killed", "  what():  std::bad_alloc", "MemoryError"):
        match = detector.classify(line)
        assert match is not None and match.incident_class is IncidentClass.HOST_OOM, line
    torch_oom = detector.classify("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate")
    assert torch_oom is not None and torch_oom.incident_class is IncidentClass.VRAM_OOM


# --- a burst of lines -------------------------------------------------------------------


@pytest.mark.parametrize("runtime", [None, "vllm", "generic"])
def test_traceback_matches_only_its_evidence_line(runtime: str | None) -> None:
    lines = TRACEBACK.splitlines()
    assert len(lines) == 15
    found = list(scan_lines(lines, Detector(runtime=runtime)))
    assert [number for number, _ in found] == [15]
    _, match = found[0]
    assert match.rule.id == "torch.cuda_oom"
    assert match.incident_class is IncidentClass.VRAM_OOM
    assert match.line == lines[14]


def test_scan_lines_numbers_from_one_and_accepts_line_breaks() -> None:
    lines = ["INFO starting\n", "Killed\n", "INFO restarting\n", "MemoryError\r\n"]
    found = [(number, match.line) for number, match in scan_lines(lines, Detector())]
    assert found == [(2, "Killed"), (4, "MemoryError")]


# --- runtimes ---------------------------------------------------------------------------


def test_every_rule_fires_for_every_runtime() -> None:
    # An app's log carries its model server's errors: the issue-10 case, llama.cpp's wording
    # in a generic service, and a vLLM rule in a llama.cpp service.
    line = (
        "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 2148.12 MiB on device 0:"
        " cudaMalloc failed: out of memory"
    )
    for runtime in ("generic", "vllm", "llamacpp", "tgi"):
        match = Detector(runtime=runtime).classify(line)
        assert match is not None and match.rule.id == "llamacpp.cuda_malloc_failed", runtime
    vllm_line = RULES_BY_ID["vllm.no_cache_blocks"].examples[0]
    for runtime in ALL_RUNTIMES:
        match = Detector(runtime=runtime).classify(vllm_line)
        assert match is not None and match.rule.id == "vllm.no_cache_blocks", runtime


@pytest.mark.parametrize("runtime", ALL_RUNTIMES)
def test_a_runtime_keeps_every_rule_and_tries_its_own_first(runtime: str | None) -> None:
    rules = Detector(runtime=runtime).rules
    assert sorted(r.id for r in rules) == sorted(RULES_BY_ID)
    for cls in IncidentClass:
        owners = [r.runtimes for r in rules if r.incident_class is cls]
        own = [runtime is not None and o is not None and runtime in o for o in owners]
        assert own == sorted(own, reverse=True), (runtime, cls)
        shared = [o is None for o in owners if not (runtime is not None and o and runtime in o)]
        assert shared == sorted(shared, reverse=True), (runtime, cls)


@pytest.mark.parametrize(
    ("runtime", "rule_id"),
    [("ollama", "ollama.runner_oom"), ("llamacpp", "llamacpp.model_load_alloc")],
)
def test_the_runtime_own_rule_names_a_line_two_runtimes_word_alike(
    runtime: str, rule_id: str
) -> None:
    line = (
        "Error: llama runner process has terminated: error loading model: unable to allocate"
        " backend buffer"
    )
    match = Detector(runtime=runtime).classify(line)
    assert match is not None and match.rule.id == rule_id


def test_service_rules_are_tried_before_the_runtime_own() -> None:
    mine = compile_rule("my.loader", "vram_oom", r"unable to allocate backend buffer")
    line = "Error: llama runner process has terminated: error loading model: unable to allocate"
    match = Detector(rules=(*BUILTIN_RULES, mine), runtime="ollama").classify(
        line + " backend buffer"
    )
    assert match is not None and match.rule is mine


def test_handled_lines_are_exempt_only_in_their_runtime() -> None:
    for handled in HANDLED_LINES:
        for example in handled.examples:
            assert Detector().classify(example) is not None, example  # some rule matches it
            assert Detector(runtime=handled.runtime).classify(example) is None, example
            for other in sorted(KNOWN_RUNTIMES - {handled.runtime}):
                match = Detector(runtime=other).classify(example)
                assert match is not None and match.incident_class is IncidentClass.VRAM_OOM


def test_unknown_runtime_is_refused() -> None:
    with pytest.raises(ValueError, match="'lmstudio' is not one of"):
        Detector(runtime="lmstudio")


# --- line clean-up ----------------------------------------------------------------------


def test_ansi_coloured_lines_still_match_and_are_reported_plain() -> None:
    line = (
        "\x1b[1;31mERROR\x1b[0m 05-08 14:46:12 [core.py:396] torch.OutOfMemoryError: CUDA out of"
        " memory. Tried to allocate 2.00 GiB."
    )
    match = Detector(runtime="vllm").classify(line)
    assert match is not None and match.rule.id == "torch.cuda_oom"
    assert "\x1b" not in match.line and match.line.startswith("ERROR 05-08")


def test_ansi_codes_inside_the_words_do_not_hide_a_match() -> None:
    match = Detector().classify("CUDA error: \x1b[31mout of memory\x1b[0m")
    assert match is not None and match.rule.id == "cuda.error_oom"


def test_docker_timestamp_prefix_is_ignored_by_whole_line_rules() -> None:
    line = "2024-05-01T12:00:00.123456789Z Killed"
    match = Detector().classify(line)
    assert match is not None and match.rule.id == "shell.killed"
    assert match.line == line  # the evidence keeps its time
    assert Detector().classify("2024-05-01T12:00:00.123456789Z job Killed by user") is None


def test_a_prompt_echoed_by_the_request_log_is_not_an_incident() -> None:
    echo = (
        "INFO 10-01 18:43:27 logger.py:36] Received request cmpl-1: prompt: 'what does"
        " RuntimeError: CUDA error: out of memory mean?', params: SamplingParams(n=1)"
    )
    assert Detector().classify(echo) is None


# --- per-service rules ------------------------------------------------------------------


def test_compile_rule_makes_a_rule_for_any_runtime() -> None:
    rule = compile_rule("my.rule", "vram_oom", r"GGML_ASSERT: .*out of memory")
    assert rule.incident_class is IncidentClass.VRAM_OOM
    assert rule.runtimes is None and rule.pattern == r"GGML_ASSERT: .*out of memory"
    detector = Detector(rules=(*BUILTIN_RULES, rule), runtime="ollama")
    match = detector.classify("GGML_ASSERT: ggml.c:123: out of memory")
    assert match == Match(rule, "GGML_ASSERT: ggml.c:123: out of memory")


def test_a_rule_without_literals_runs_on_every_line() -> None:
    rule = compile_rule("my.exit", "gpu_fault", r"^E\d+$")
    assert required_literals(rule.pattern) is None
    match = Detector(rules=(*BUILTIN_RULES, rule)).classify("E42")
    assert match is not None and match.rule is rule


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("my.rule", "vram_oom", "CUDA (out of memory"), "is not a valid regex"),
        (("my.rule", "vram", "out of memory"), "class 'vram' is not one of vram_oom"),
        (("my.rule", "vram_oom", ""), "is not a non-empty regex"),
        (("my.rule", "vram_oom", ".*"), "matches an empty line"),
        (("my.rule", "vram_oom", "(oom)?"), "matches an empty line"),
        (("", "vram_oom", "oom"), "rule id '' is not a name"),
        (("my rule", "vram_oom", "oom"), "rule id 'my rule' is not a name"),
        (("torch.cuda_oom", "vram_oom", "oom"), "is already a built-in rule"),
        (("my.deep", "vram_oom", "(" * 2000 + "x" + ")" * 2000), "nests its groups too deeply"),
    ],
)
def test_compile_rule_errors_say_what_is_wrong(args: tuple[str, str, str], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        compile_rule(*args)


def test_detector_names_the_rule_with_a_bad_pattern() -> None:
    bad = Rule("bad.rule", IncidentClass.VRAM_OOM, "(", None, "broken", (), "test")
    message = "rule 'bad.rule': pattern '(' is not a valid regex"
    with pytest.raises(ValueError, match=re.escape(message)):
        Detector(rules=(bad,))


# --- the prefilter ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        (r"foo\.bar", {"foo.bar"}),
        (r"colou?r", {"colo"}),
        (r"a{2,3}bcd", {"bcd"}),
        (r"(?:x|y)zzz", {"zzz"}),
        (r"\x1bABC", {"abc"}),
        (r"[abc]def\d+", {"def"}),
        (r"NVRM: Xid|fallen off", {"nvrm: xid", "fallen off"}),
        (r"abc|de", None),
        (r"(?x) foo bar ", None),
        (r"(?i)Killed", {"killed"}),
    ],
)
def test_required_literals(pattern: str, expected: set[str] | None) -> None:
    literals = required_literals(pattern)
    assert (set(literals) if literals is not None else None) == expected


def test_every_example_contains_a_required_literal_of_its_rule() -> None:
    for rule in BUILTIN_RULES:
        literals = required_literals(rule.pattern) or frozenset()
        for example in rule.examples:
            assert any(lit in example.lower() for lit in literals), (rule.id, example)
