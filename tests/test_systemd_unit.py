"""The unit file is valid for systemd and keeps the promises the README makes about it."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "fleetd.service"


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser


def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is missing (scripts/ensure-docker.sh installs it)")
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart exists: point it at a stand-in for /opt/fleetd/bin/fleetd.
    fake = tmp_path / "fleetd"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    unit = tmp_path / "fleetd.service"
    unit.write_text(UNIT.read_text().replace("/opt/fleetd/bin/fleetd", str(fake)))

    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, check=False
    )

    problems = [line for line in result.stderr.splitlines() if str(unit) in line]
    assert result.returncode == 0 and not problems, result.stderr


def test_unit_is_notify_with_watchdog_reload_and_bounded_restarts() -> None:
    unit = _unit()
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["WatchdogSec"]
    assert service["Restart"] == "on-failure"
    assert "-HUP" in service["ExecReload"]
    assert int(unit["Unit"]["StartLimitBurst"]) > 0
    assert " run " in service["ExecStart"]
    for directory in ("StateDirectory", "RuntimeDirectory", "ConfigurationDirectory"):
        assert service[directory] == "fleetd"


def test_unit_is_hardened() -> None:
    service = _unit()["Service"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert service[key] == "yes", key
    assert service["ProtectSystem"] == "strict"
    assert service["User"] != "root" and service["SupplementaryGroups"] == "docker"
    assert service["CapabilityBoundingSet"] == ""
