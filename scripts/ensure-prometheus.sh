#!/usr/bin/env bash
# Make sure a real Prometheus and promtool are on this machine, for the metrics tests
# (tests/integration/test_prometheus.py). Installs Debian's `prometheus` package when
# either is missing; nothing is started (the test runs its own Prometheus on loopback).
# Idempotent and quiet when both are there; exits non-zero when they cannot be had.
set -euo pipefail

APT_LOG=${APT_LOG:-/tmp/ensure-prometheus-apt.log}

say() { printf 'ensure-prometheus: %s\n' "$*"; }
die() { printf 'ensure-prometheus: error: %s\n' "$*" >&2; exit 1; }

have_both() { command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; }

main() {
    have_both && return 0
    [ "$(id -u)" -eq 0 ] || die "need root to apt-get install prometheus (run as root or install it yourself)"
    say "installing Debian's prometheus package with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    # No recommends: they would bring node_exporter and its collectors, which no test uses.
    if ! { apt-get update -q && apt-get install -y -q --no-install-recommends prometheus; } \
        >"$APT_LOG" 2>&1; then
        tail -n 20 "$APT_LOG" >&2
        die "apt-get install prometheus failed (see $APT_LOG)"
    fi
    have_both || die "prometheus was installed but prometheus/promtool are not on PATH"
    say "$(prometheus --version 2>&1 | head -n 1)"
}

main "$@"
