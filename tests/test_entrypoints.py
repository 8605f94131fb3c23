"""The suite tests this checkout and nothing installed elsewhere (tests/entrypoints.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.entrypoints import BIN, REPO, entry_point, problems


def test_the_commands_are_this_checkouts_scripts() -> None:
    assert problems() == []
    for name in ("fleetctl", "fleetd"):
        assert entry_point(name) == str(BIN / name)
        done = subprocess.run(
            [entry_point(name), "--version"], capture_output=True, text=True, check=True
        )
        assert done.stdout.startswith(f"{name}, version ")


def test_a_session_that_would_import_another_copy_stops_before_any_test(tmp_path: Path) -> None:
    other = tmp_path / "elsewhere"
    shutil.copytree(REPO / "supervisor", other / "supervisor")
    env = {**os.environ, "PYTHONPATH": str(other), "PYTEST_ADDOPTS": ""}

    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_units.py"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
        check=False,
    )

    assert done.returncode == 4, done.stdout + done.stderr
    assert f"imports supervisor from {other}/supervisor/__init__.py" in done.stdout
    assert " passed" not in done.stdout
