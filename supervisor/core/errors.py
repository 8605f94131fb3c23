"""The one exception root of fleetd and the errors users can act on."""

from __future__ import annotations


class FleetdError(Exception):
    """Base of every error fleetd reports to a user (never shown as a traceback)."""

    exit_code = 1


class ConfigError(FleetdError):
    """The fleet config (or a command-line value standing in for it) is invalid."""

    exit_code = 2


class UsageError(FleetdError):
    """A command was called with arguments that cannot work."""

    exit_code = 2


class EstimateError(FleetdError):
    """A model's VRAM need could not be estimated from its metadata."""

    exit_code = 2


class RenderError(FleetdError):
    """A compose file could not be rendered safely from the plan."""


def http_status(kind: str) -> int:
    """The control API's HTTP status for an error kind (usage, not_found, refused, failed)."""
    return {"usage": 400, "not_found": 404, "refused": 409}.get(kind, 500)
