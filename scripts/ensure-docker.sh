#!/usr/bin/env bash
# Make sure a Docker engine answers on this machine, installing and starting it if needed.
#
#   scripts/ensure-docker.sh        # what `make test` needs (the engine and the test tools)
#   scripts/ensure-docker.sh demo   # what `make demo` needs: the engine and busybox-static
#
# Idempotent: when `docker info` already works (and busybox-static, systemd-analyze and
# debootstrap are there) it does nothing. The compose CLIs, v1 and v2, are installed by
# scripts/ensure-compose.sh, which `make test` runs next. The machines fleetd is tested on
# run no systemd as PID 1, so dockerd is started by hand, detached, with its log in
# /tmp/dockerd.log.
# Prints one line per action taken; exits non-zero when the engine cannot be had.
set -euo pipefail

DOCKERD_LOG=${DOCKERD_LOG:-/tmp/dockerd.log}
APT_LOG=${APT_LOG:-/tmp/ensure-docker-apt.log}
WAIT_S=${DOCKERD_WAIT_S:-30}

say() { printf 'ensure-docker: %s\n' "$*"; }
die() { printf 'ensure-docker: error: %s\n' "$*" >&2; exit 1; }

engine_answers() { docker info >/dev/null 2>&1; }

# Debian packages this project needs: the engine and its client (docker.io), a static
# busybox for the tiny test images (busybox-static); and for the tests (not the demo)
# systemd-analyze to verify the unit file (systemd; nothing is started with it) and
# debootstrap for the Debian image the unit's end-to-end test boots systemd in.
missing_packages() {  # [demo]
    local missing=()
    # dockerd and debootstrap are in /usr/sbin, which a non-root PATH may lack.
    { command -v docker && { command -v dockerd || [ -x /usr/sbin/dockerd ]; }; } >/dev/null 2>&1 \
        || missing+=(docker.io)
    # busybox-static conflicts with the dynamic busybox package; ask dpkg, not PATH.
    dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed' \
        || missing+=(busybox-static)
    if [ "${1:-}" != demo ]; then
        command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
        command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
    fi
    if (( ${#missing[@]} > 0 )); then printf '%s\n' "${missing[@]}"; fi
}

install_packages() {
    local -a pkgs=("$@")
    [ "$(id -u)" -eq 0 ] || die "need root to apt-get install ${pkgs[*]} (run as root or install them yourself)"
    say "installing ${pkgs[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update && apt-get install -y "${pkgs[@]}"; } >"$APT_LOG" 2>&1; then
        tail -n 20 "$APT_LOG" >&2
        die "apt-get install ${pkgs[*]} failed (see $APT_LOG)"
    fi
}

dockerd_pid() {  # the pid of a live dockerd from its pid file, or nothing
    local pid
    pid=$(cat /var/run/docker.pid 2>/dev/null) || return 0
    [ -n "$pid" ] && [ -d "/proc/$pid" ] && printf '%s\n' "$pid"
    return 0
}

start_dockerd() {
    [ "$(id -u)" -eq 0 ] || die "docker info fails and only root can start dockerd here"
    local pid
    pid=$(dockerd_pid)
    if [ -n "$pid" ]; then
        say "dockerd (pid $pid) is running but not answering yet; waiting"
    else
        # A pid file left by a dead daemon makes dockerd refuse to start.
        rm -f /var/run/docker.pid
        say "starting dockerd (log: $DOCKERD_LOG)"
        # setsid + nohup: the daemon must outlive this script and the shell that called it.
        setsid nohup dockerd >"$DOCKERD_LOG" 2>&1 </dev/null &
    fi
    local start_s=$SECONDS
    until engine_answers; do
        if (( SECONDS - start_s >= WAIT_S )); then
            tail -n 20 "$DOCKERD_LOG" >&2 || true
            die "dockerd did not answer within ${WAIT_S}s (see $DOCKERD_LOG)"
        fi
        sleep 0.5
    done
    say "dockerd answers after $(( SECONDS - start_s ))s"
}

# The first `docker` on PATH is a newer client (28.x in /usr/local/bin) than the engine
# (Debian's 20.10, API 1.41). It negotiates the API version down by itself (28.2.2 does);
# should one ever not, name the version to pin rather than start a second dockerd.
refuse_client_mismatch() {
    local api
    api=$(/usr/bin/docker version --format '{{.Server.APIVersion}}' 2>/dev/null) || return 0
    die "the engine answers /usr/bin/docker (API $api) but not $(command -v docker): export DOCKER_API_VERSION=$api"
}

main() {
    case ${1:-} in
        "" | demo) ;;
        *) die "unknown argument '$1' (none, or 'demo')" ;;
    esac
    local -a missing
    mapfile -t missing < <(missing_packages "${1:-}")
    if (( ${#missing[@]} > 0 )); then
        install_packages "${missing[@]}"
    fi
    engine_answers && return 0
    [ ! -x /usr/bin/docker ] || refuse_client_mismatch
    start_dockerd
}

main "$@"
