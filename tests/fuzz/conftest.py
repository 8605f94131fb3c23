"""Prints what each fuzzer tried at the end of the run (the numbers of docs/reliability.md)."""

from __future__ import annotations

import pytest

from tests.fuzz.fuzzing import SCALE, TALLY


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TALLY:
        return
    terminalreporter.section(f"fuzz cases (FLEETD_FUZZ_SCALE={SCALE})")
    for surface, outcomes in sorted(TALLY.items()):
        detail = ", ".join(f"{n} {outcome}" for outcome, n in sorted(outcomes.items()))
        terminalreporter.write_line(f"{surface}: {sum(outcomes.values())} cases ({detail})")
