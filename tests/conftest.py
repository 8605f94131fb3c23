"""Checks made once per test session, before any test runs."""

from __future__ import annotations

import pytest

from tests import entrypoints


def pytest_sessionstart(session: pytest.Session) -> None:
    # A suite that ran an installed copy of fleetd instead of this checkout once passed in CI
    # while `make test` failed on a fresh machine: refuse to run at all in that case.
    found = entrypoints.problems()
    if found:
        lines = "\n  ".join(found)
        pytest.exit(
            f"fleetd tests: not testing this checkout ({entrypoints.REPO}):\n  {lines}",
            returncode=4,
        )
