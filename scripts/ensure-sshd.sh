#!/usr/bin/env bash
# Make sure an OpenSSH server binary (sshd) is installed, for the `fleetctl --host ssh://`
# integration test (tests/integration/test_ssh_host.py), which runs its own sshd on a
# random port with a temporary host key and config. Nothing is started or configured here:
# the machine's own ssh service and /etc/ssh are left alone.
#
# Idempotent: when /usr/sbin/sshd and ssh-keygen exist it does nothing.
# Prints one line per action taken; exits non-zero when sshd cannot be had.
set -euo pipefail

APT_LOG=${APT_LOG:-/tmp/ensure-sshd-apt.log}

say() { printf 'ensure-sshd: %s\n' "$*"; }
die() { printf 'ensure-sshd: error: %s\n' "$*" >&2; exit 1; }

have_sshd() {
    { command -v sshd || [ -x /usr/sbin/sshd ]; } >/dev/null 2>&1 \
        && command -v ssh >/dev/null 2>&1 && command -v ssh-keygen >/dev/null 2>&1
}

main() {
    have_sshd && return 0
    [ "$(id -u)" -eq 0 ] || die "need root to apt-get install openssh-server (run as root or install it yourself)"
    say "installing openssh-server with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    # Without systemd as PID 1 the package's postinst cannot start the service; policy-rc.d
    # (if any) and invoke-rc.d failing are harmless: the test starts its own sshd.
    if ! { apt-get install -y --no-install-recommends openssh-server \
            || { apt-get update && apt-get install -y --no-install-recommends openssh-server; }; \
         } >"$APT_LOG" 2>&1; then
        tail -n 20 "$APT_LOG" >&2
        die "apt-get install openssh-server failed (see $APT_LOG)"
    fi
    have_sshd || die "openssh-server is installed but sshd is missing"
    say "sshd installed: $(command -v sshd || echo /usr/sbin/sshd)"
}

main "$@"
