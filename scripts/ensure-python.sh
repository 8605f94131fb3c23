#!/usr/bin/env bash
# Make sure $PYTHON (default python3) can make the checkout's .venv: it is there, at least
# the version pyproject.toml's requires-python names, and it has its venv module with
# ensurepip. `make venv` (and so `make example`, `make test` ...) runs this first.
#
# Why: Debian's base system has no python3, and Debian's python3 comes without ensurepip
# (that is the python3.X-venv package, which also brings CA certificates for pip); without
# it `python3 -m venv` fails half way and leaves a .venv with no pip in it.
# When $PYTHON is Debian's python3 (or missing, with the default name), the missing
# packages are installed with apt-get, which needs root. Any other Python is only checked.
# Idempotent and quiet when all is there; exits non-zero, with one line saying what to do,
# when it cannot be had.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
APT_LOG=${APT_LOG:-/tmp/ensure-python-apt.log}

say() { printf 'ensure-python: %s\n' "$*"; }
die() { printf 'ensure-python: error: %s\n' "$*" >&2; exit 1; }

# The lowest version pyproject.toml accepts, e.g. 3.11 (requires-python = ">=3.11").
MIN_VERSION=$(sed -n 's/^requires-python *= *">= *\([0-9][0-9.]*\)".*/\1/p' "$ROOT/pyproject.toml")
[ -n "$MIN_VERSION" ] || die "cannot read requires-python (\">=X.Y\") from pyproject.toml"

version_of() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }

new_enough() {  # PYTHON
    "$1" - "$MIN_VERSION" <<'PY' 2>/dev/null
import sys
sys.exit(sys.version_info[:2] < tuple(int(n) for n in sys.argv[1].split(".")[:2]))
PY
}

can_make_venv() { "$1" -c 'import ensurepip, venv' >/dev/null 2>&1; }

# The Debian package that owns the interpreter PYTHON resolves to, or nothing.
debian_package_of() {  # PYTHON
    local path
    path=$(command -v "$1") || return 0
    path=$(readlink -f "$path")
    command -v dpkg-query >/dev/null 2>&1 || return 0
    { dpkg-query -S "$path" 2>/dev/null || true; } | sed -n '1s/:.*//p'
}

apt_install() {
    local -a pkgs=("$@")
    command -v apt-get >/dev/null 2>&1 \
        || die "$PYTHON cannot make a venv and this is no Debian machine: install ${pkgs[*]} (or set PYTHON to a Python >= $MIN_VERSION with venv)"
    [ "$(id -u)" -eq 0 ] \
        || die "need root to install ${pkgs[*]}: run \`sudo apt-get install ${pkgs[*]}\`, then make again"
    say "installing ${pkgs[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -q && apt-get install -y -q "${pkgs[@]}"; } >"$APT_LOG" 2>&1; then
        tail -n 20 "$APT_LOG" >&2
        die "apt-get install ${pkgs[*]} failed (see $APT_LOG)"
    fi
}

main() {
    if ! command -v "$PYTHON" >/dev/null 2>&1; then
        [ "$PYTHON" = python3 ] || die "PYTHON=$PYTHON is not found"
        apt_install python3 python3-venv
        command -v python3 >/dev/null 2>&1 || die "python3 was installed but is not on PATH"
    fi

    local version package
    version=$(version_of "$PYTHON") || die "$PYTHON does not run"
    new_enough "$PYTHON" \
        || die "$PYTHON is Python $version; fleetd needs >= $MIN_VERSION (Debian bookworm's python3 or newer; or set PYTHON)"

    package=$(debian_package_of "$PYTHON")
    local -a missing=()
    if ! can_make_venv "$PYTHON"; then
        [ -n "$package" ] \
            || die "$PYTHON ($(command -v "$PYTHON")) has no venv/ensurepip module: install it, or set PYTHON to a Python that has"
        missing+=("python$version-venv")
    fi
    # Debian's pip reads the system's CA bundle (python3-pip-whl depends on ca-certificates;
    # checked here too, since without it pip cannot reach PyPI).
    if [ -n "$package" ] && [ ! -s /etc/ssl/certs/ca-certificates.crt ]; then
        missing+=(ca-certificates)
    fi
    (( ${#missing[@]} == 0 )) && return 0

    apt_install "${missing[@]}"
    can_make_venv "$PYTHON" || die "$PYTHON still cannot make a venv after installing ${missing[*]}"
}

main "$@"
