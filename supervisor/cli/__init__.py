"""Command-line entry points: `fleetd` (the daemon) and `fleetctl` (people and scripts)."""
