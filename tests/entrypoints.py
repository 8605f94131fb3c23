"""The project's own commands, found by path, never through the caller's PATH.

`make venv` installs the checkout into .venv with `pip install -e`, which writes the
`fleetctl` and `fleetd` scripts beside .venv/bin/python. Tests run those scripts (the ones
beside the Python running pytest), so a copy installed elsewhere on the machine can never
stand in for the code under test. `problems()` checks that this holds; tests/conftest.py
refuses to run the suite otherwise.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import supervisor

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COMMANDS = ("fleetctl", "fleetd")


def entry_point(name: str) -> str:
    """The absolute path of one of the project's commands, in the tests' own environment."""
    if name not in COMMANDS:
        raise ValueError(f"{name!r} is not one of fleetd's commands {COMMANDS}")
    return str(BIN / name)


def problems() -> list[str]:
    """Why the suite would test something other than this checkout; empty when all is well."""
    found = []
    if not _inside_repo(Path(supervisor.__file__)):
        found.append(f"pytest imports supervisor from {supervisor.__file__}, not from {REPO}")
    for name in COMMANDS:
        script = BIN / name
        if not script.is_file():
            found.append(f"{script} does not exist: run `make venv` (pip install -e .)")
            continue
        interpreter = _shebang(script)
        if interpreter is None or interpreter.resolve() != Path(sys.executable).resolve():
            found.append(f"{script} runs {interpreter}, not the tests' Python {sys.executable}")
    imported = _imported_by_a_subprocess()
    if not _inside_repo(Path(imported)):
        found.append(
            f"{sys.executable} (what {BIN / 'fleetctl'} runs) imports supervisor from"
            f" {imported}, not from {REPO}: reinstall with `pip install -e .`"
        )
    return found


def _inside_repo(path: Path) -> bool:
    return path.resolve().is_relative_to(REPO)


def _shebang(script: Path) -> Path | None:
    with script.open("rb") as f:
        first = f.readline().decode(errors="replace").strip()
    return Path(first[2:].split()[0]) if first.startswith("#!") and first[2:].strip() else None


def _imported_by_a_subprocess() -> str:
    """Where a command started from elsewhere (cwd /) finds the package, as a script does."""
    done = subprocess.run(
        [sys.executable, "-c", "import supervisor; print(supervisor.__file__)"],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=60,
        check=False,
    )
    return done.stdout.strip() or f"nowhere ({done.stderr.strip().splitlines()[-1:]})"
