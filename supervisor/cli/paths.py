"""Where fleetd's config lives by default: kept apart from supervisor.core.config so that the
command lines can name it without importing pydantic (fleetctl status starts faster)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_CONFIG_PATH = Path("/etc/fleetd/fleet.yaml")
CONFIG_ENV = "FLEETD_CONFIG"


def default_config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)
