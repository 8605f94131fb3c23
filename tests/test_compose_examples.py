"""The committed compose examples are what the templates generate today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {
    "fleet": ["--config", "examples/fleet.yaml", "--gpu", "12GiB:RTX 4070 SUPER"],
    "multi-gpu": ["--config", "examples/multi-gpu.yaml"],
}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_committed_example_is_current(tmp_path: Path, name: str) -> None:
    code = "from supervisor.cli.fleetctl import main; main()"
    args = [
        *EXAMPLES[name],
        "--out",
        str(tmp_path),
        "--state-dir",
        "/var/lib/fleetd",
        "--no-model-files",
    ]
    result = subprocess.run(
        [sys.executable, "-c", code, "generate", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for file in ("compose.yml", ".env"):
        committed = (ROOT / "compose" / "examples" / name / file).read_text()
        assert (tmp_path / file).read_text() == committed, (
            f"compose/examples/{name}/{file} is stale: run scripts/regen-compose-examples.sh"
        )
