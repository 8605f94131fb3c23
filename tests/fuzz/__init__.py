"""Fuzzers for the surfaces that take hostile input: the config loader and `fleetctl
generate`, the state decoder, the control API (docs/reliability.md has their results)."""
