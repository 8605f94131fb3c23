"""Classify one container log line: VRAM exhaustion, GPU fault, host RAM OOM, or nothing.

Pure and line-at-a-time: grouping a burst of matching lines into one incident, and counting
incidents, belong to the caller. Most lines match nothing, so a line is first checked for
literals that every match of some rule must contain (derived from the patterns themselves);
only lines that pass run the regular expressions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from supervisor.core.rules import BUILTIN_RULES, HANDLED_LINES, KNOWN_RUNTIMES, IncidentClass, Rule

# A line can fit rules of two classes ("illegal memory access" names memory). The class
# whose action is the least harmful wins: a GPU fault or a host OOM never steps a service
# down, and a wrong step-down is the costly mistake.
CLASS_PRIORITY = (
    IncidentClass.GPU_FAULT,
    IncidentClass.CRASH,
    IncidentClass.START_FAILURE,
    IncidentClass.HOST_OOM,
    IncidentClass.VRAM_OOM,
)

_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
_DOCKER_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d) ")
# Request logs that echo what a user typed (vLLM, SGLang): a prompt quoting an OOM is not one.
_REQUEST_ECHO = re.compile(r"Received request \S+: prompt: |Receive: obj=GenerateReqInput\(")
_BUILTIN = frozenset(BUILTIN_RULES)
_RULE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_MIN_NEEDLE_LEN = 3
_QUANTIFIER = re.compile(r"\{\d*(?:,\d*)?\}")


@dataclass(frozen=True)
class Match:
    """A line that matched a rule; `line` is the line without ANSI codes or its line break."""

    rule: Rule
    line: str

    @property
    def incident_class(self) -> IncidentClass:
        return self.rule.incident_class


class Detector:
    """Classifies lines with every rule; a runtime orders them and names what it handles itself.

    Whatever the runtime, every rule applies: an app's log carries the errors of the model
    server it calls, and one runtime's wording turns up in another's (Ollama runs ggml).
    The runtime only decides which rule is tried first inside a class (its own, then those
    of any runtime, then the others', so a match names the runtime's own rule), and which
    lines it prints and recovers from by itself (`HANDLED_LINES`).
    """

    def __init__(self, rules: Sequence[Rule] = BUILTIN_RULES, runtime: str | None = None) -> None:
        if runtime is not None and runtime not in KNOWN_RUNTIMES:
            known = ", ".join(sorted(KNOWN_RUNTIMES))
            raise ValueError(f"runtime {runtime!r} is not one of {known}")
        self.runtime = runtime
        self.rules = tuple(sorted(rules, key=lambda r: _rule_order(r, runtime)))
        self._ordered = tuple((rule, _compile(rule.id, rule.pattern)) for rule in self.rules)
        self._handled = tuple(
            re.compile(h.pattern)
            for h in HANDLED_LINES
            if runtime is not None and h.runtime == runtime
        )
        literals = [required_literals(rule.pattern) for rule in self.rules]
        # Rules with no required literal (per-service ones, say) run on every line.
        self._unfiltered = tuple(
            c for c, lits in zip(self._ordered, literals, strict=True) if lits is None
        )
        self._needles = _shortest_cover(n for lits in literals if lits for n in lits)

    def classify(self, line: str) -> Match | None:
        """The first matching rule, trying classes in CLASS_PRIORITY order, else None."""
        text = line.rstrip("\r\n")
        if "\x1b" in text:
            text = _ANSI.sub("", text)
        lower = text.lower()
        checks = self._unfiltered
        for needle in self._needles:
            if needle in lower:
                checks = self._ordered
                break
        if not checks or _REQUEST_ECHO.search(text):
            return None
        body = _DOCKER_TIMESTAMP.sub("", text, count=1)
        for rule, regex in checks:
            if regex.search(body):
                if any(h.match(body) for h in self._handled):
                    return None
                return Match(rule, text)
        return None


def _rule_order(rule: Rule, runtime: str | None) -> tuple[int, int]:
    """Built-in GPU-fault rules first: no rule of a person's makes a GPU fault a reason to
    step down. Then the service's own rules (from fleet.yaml), before the other built-in
    ones: a person wrote them to say what a line means for this service (on a CPU-only
    host, that a host-memory failure is the capacity incident its ladder acts on). Then
    the built-in host and VRAM rules by class (CLASS_PRIORITY); inside a class the
    runtime's, then those of any runtime, then the other runtimes'."""
    if rule not in _BUILTIN:
        return 1, 0
    owner = 2 if rule.runtimes is None else (1 if runtime in rule.runtimes else 3)
    rank = CLASS_PRIORITY.index(rule.incident_class)
    return (0 if rank == 0 else rank + 1), owner


def compile_rule(id: str, incident_class: str, pattern: str) -> Rule:
    """A per-service rule from the config. Raises ValueError saying what is wrong with it."""
    if not isinstance(id, str) or not _RULE_ID.match(id):
        raise ValueError(f"rule id {id!r} is not a name such as my.rule (letters, digits, . _ -)")
    if id in {rule.id for rule in BUILTIN_RULES}:
        raise ValueError(f"rule id {id!r} is already a built-in rule; choose another id")
    try:
        cls = IncidentClass(incident_class)
    except ValueError:
        classes = ", ".join(c.value for c in IncidentClass)
        raise ValueError(f"rule {id!r}: class {incident_class!r} is not one of {classes}") from None
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"rule {id!r}: pattern {pattern!r} is not a non-empty regex string")
    if _compile(id, pattern).search(""):
        raise ValueError(f"rule {id!r}: pattern {pattern!r} matches an empty line, so every line")
    return Rule(
        id=id,
        incident_class=cls,
        pattern=pattern,
        runtimes=None,
        description="per-service rule from fleet.yaml",
        examples=(),
        source="fleet.yaml",
    )


def scan_lines(lines: Iterable[str], detector: Detector) -> Iterator[tuple[int, Match]]:
    """(1-based line number, match) for every line that matches a rule."""
    for number, line in enumerate(lines, start=1):
        match = detector.classify(line)
        if match is not None:
            yield number, match


def required_literals(pattern: str) -> frozenset[str] | None:
    """Lower-cased literals such that every match of `pattern` contains one; None if unsure.

    Conservative by construction: each top-level alternative contributes its longest run of
    plain characters outside any group, class, escape sequence or quantified character.
    """
    if _compile("pattern", pattern).flags & re.VERBOSE:
        return None  # whitespace in the pattern is not literal
    needles = set()
    for branch in _top_level_branches(pattern):
        longest = max(_literal_runs(branch), key=len)
        if len(longest) < _MIN_NEEDLE_LEN:
            return None
        needles.add(longest.lower())
    return frozenset(needles)


def _compile(rule_id: str, pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"rule {rule_id!r}: pattern {pattern!r} is not a valid regex: {e}") from e
    except RecursionError:  # Python's regex parser recurses once per nested group
        shown = pattern if len(pattern) <= 60 else pattern[:57] + "..."
        raise ValueError(
            f"rule {rule_id!r}: pattern {shown!r} nests its groups too deeply to compile "
            "(expected a regex of a few levels)"
        ) from None


def _shortest_cover(needles: Iterable[str]) -> tuple[str, ...]:
    """Drop needles that contain another needle: finding the shorter one is enough."""
    unique = sorted(set(needles), key=len)
    kept: list[str] = []
    for needle in unique:
        if not any(k in needle for k in kept):
            kept.append(needle)
    return tuple(kept)


def _top_level_branches(pattern: str) -> list[str]:
    branches, start, i = [], 0, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
        elif c in "([":
            i = _skip_group(pattern, i)
        elif c == "|":
            branches.append(pattern[start:i])
            start = i = i + 1
        else:
            i += 1
    branches.append(pattern[start:])
    return branches


def _literal_runs(branch: str) -> list[str]:
    runs: list[str] = []
    run, i = "", 0
    while i < len(branch):
        c = branch[i]
        if c == "\\" and i + 1 < len(branch) and not branch[i + 1].isalnum():
            run, i = run + branch[i + 1], i + 2  # escaped punctuation stands for itself
        elif c in "*+?{":
            runs.append(run[:-1])  # the character before is optional or repeated
            quantifier = _QUANTIFIER.match(branch, i) if c == "{" else None
            run, i = "", quantifier.end() if quantifier else i + 1
        elif c in "\\([.^$":
            runs.append(run)
            run = ""
            if c == "\\":
                i = _skip_escape(branch, i)
            elif c in "([":
                i = _skip_group(branch, i)
            else:
                i += 1
        else:
            run, i = run + c, i + 1
    runs.append(run)
    return runs


def _skip_escape(pattern: str, i: int) -> int:
    """Index after an alphanumeric escape such as \\d, \\x1b, \\u00e9, \\N{...} or \\12."""
    kind = pattern[i + 1 : i + 2]
    end = i + 2
    if kind in ("x", "u", "U"):
        end += {"x": 2, "u": 4, "U": 8}[kind]
    elif kind == "N":
        end = pattern.find("}", end) + 1 or len(pattern)
    elif kind.isdigit():
        while end < len(pattern) and pattern[end].isdigit():
            end += 1
    return end


def _skip_group(pattern: str, i: int) -> int:
    """Index after the group `(...)` or class `[...]` that starts at i."""
    if pattern[i] == "[":
        j = i + 1
        if pattern[j : j + 1] == "^":
            j += 1
        if pattern[j : j + 1] == "]":
            j += 1  # a ] first in a class is literal
        while j < len(pattern) and pattern[j] != "]":
            j += 2 if pattern[j] == "\\" else 1
        return j + 1
    depth, j = 0, i
    while j < len(pattern):
        c = pattern[j]
        if c == "\\":
            j += 2
            continue
        if c == "[":
            j = _skip_group(pattern, j)
            continue
        depth += {"(": 1, ")": -1}.get(c, 0)
        j += 1
        if depth == 0:
            return j
    return j
