#!/usr/bin/env bash
# Make sure both Compose CLIs are on this machine: v2 (`docker compose`, what most users
# run) and v1 (`docker-compose` 1.29, what Debian bookworm ships). The tests validate every
# generated compose project with both (tests/integration/test_compose_cli.py).
#
#   scripts/ensure-compose.sh     # as root; `make test` runs it after ensure-docker.sh
#
# v1: bookworm's `docker-compose` package, with apt-get.
# v2: trixie's `docker-compose` 2.26.x package is a Docker CLI plugin that needs only libc.
#     It cannot be installed as a package beside v1 (both packages are named
#     docker-compose, and trixie's also takes /usr/bin/docker-compose), so the plugin alone
#     is taken from it: trixie's package index is fetched into a temporary apt state
#     directory (the system's apt sources and lists are not touched), `apt-get download`
#     fetches the .deb, and its plugin binary is copied to $COMPOSE_PLUGIN_DIR, a folder
#     every docker client searches (Debian's 20.10 and Docker's 28.x alike).
#
# Idempotent: when `docker compose version` works with every docker client on PATH and
# `docker-compose` is v1, it does nothing (well under a second). Prints one line per action
# taken; exits non-zero, saying why, when either cannot be had; without root it prints the
# command to run instead.
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian), COMPOSE_PLUGIN_DIR
# (default /usr/local/lib/docker/cli-plugins), APT_LOG (default /tmp/ensure-compose-apt.log).
set -euo pipefail

DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PLUGIN_DIR=${COMPOSE_PLUGIN_DIR:-/usr/local/lib/docker/cli-plugins}
APT_LOG=${APT_LOG:-/tmp/ensure-compose-apt.log}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
V2_SUITE=trixie

say() { printf 'ensure-compose: %s\n' "$*"; }
die() { printf 'ensure-compose: error: %s\n' "$*" >&2; exit 1; }

need_root() {  # what is missing
    [ "$(id -u)" -eq 0 ] && return 0
    die "$1 is missing and installing it needs root: run \`sudo bash $0\`"
}

# Every distinct docker client on PATH (/bin/docker is /usr/bin/docker on merged-/usr).
docker_clients() {
    local path
    type -aP docker | while read -r path; do readlink -f "$path"; done | awk '!seen[$0]++'
}

clients_without_v2() {  # the clients for which `docker compose` does not work
    local client
    while read -r client; do
        "$client" compose version >/dev/null 2>&1 || printf '%s\n' "$client"
    done < <(docker_clients)
}

v1_version() {  # what `docker-compose` on PATH reports, or nothing
    docker-compose version --short 2>/dev/null || true
}

ensure_v1() {
    local version
    # Fast path (`docker-compose version` takes a second): bookworm's package is installed.
    [[ $(dpkg-query -W -f='${Version}' docker-compose 2>/dev/null) == 1.* ]] \
        && command -v docker-compose >/dev/null 2>&1 && return 0
    version=$(v1_version)
    case $version in
        1.*) return 0 ;;
        "") ;;
        *) die "docker-compose on PATH ($(command -v docker-compose)) is Compose $version, not v1: install bookworm's docker-compose package (apt-get install docker-compose/bookworm)" ;;
    esac
    need_root "Compose v1 (docker-compose)"
    say "installing Compose v1 (bookworm's docker-compose) with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -q && apt-get install -y -q -o DPkg::Lock::Timeout=120 docker-compose; } \
        >"$APT_LOG" 2>&1; then
        tail -n 20 "$APT_LOG" >&2
        die "apt-get install docker-compose failed (see $APT_LOG)"
    fi
    version=$(v1_version)
    [[ $version == 1.* ]] || die "apt-get installed docker-compose, but \`docker-compose version\` says '${version:-nothing}'"
    say "Compose v1 $version"
}

# apt-get options for a private apt state in $1 that sees only trixie's main component.
private_apt_options() {
    local dir=$1
    printf '%s\n' \
        "-o" "Dir::Etc::SourceList=$dir/sources.list" \
        "-o" "Dir::Etc::SourceParts=$dir/sources.list.d" \
        "-o" "Dir::Etc::Preferences=$dir/preferences" \
        "-o" "Dir::Etc::PreferencesParts=$dir/preferences.d" \
        "-o" "Dir::State::Lists=$dir/lists" \
        "-o" "Dir::Cache=$dir/cache" \
        "-o" "APT::Sandbox::User=root"
}

# Fetch trixie's docker-compose .deb into $1 (a fresh temporary directory); print its path.
download_v2_deb() {
    local dir=$1
    mkdir -p "$dir/sources.list.d" "$dir/preferences.d" "$dir/lists/partial" \
        "$dir/cache/archives/partial"
    printf 'deb [signed-by=%s] %s %s main\n' "$KEYRING" "$DEBIAN_MIRROR" "$V2_SUITE" \
        >"$dir/sources.list"
    local -a opts
    mapfile -t opts < <(private_apt_options "$dir")
    if ! { apt-get "${opts[@]}" update -q \
        && (cd "$dir" && apt-get "${opts[@]}" download -q "docker-compose/$V2_SUITE"); } \
        >"$APT_LOG" 2>&1; then
        tail -n 20 "$APT_LOG" >&2
        die "could not download docker-compose from $DEBIAN_MIRROR $V2_SUITE (see $APT_LOG)"
    fi
    local debs=("$dir"/docker-compose_2.*.deb)
    [ -f "${debs[0]}" ] || die "$V2_SUITE's docker-compose is not Compose v2: $(cd "$dir" && ls ./*.deb)"
    printf '%s\n' "${debs[0]}"
}

install_v2_plugin() {  # from the .deb in $1, into $PLUGIN_DIR
    local deb=$1 dir
    dir=$(dirname "$deb")
    dpkg-deb --fsys-tarfile "$deb" \
        | tar -x -C "$dir" ./usr/libexec/docker/cli-plugins/docker-compose \
        || die "$deb holds no usr/libexec/docker/cli-plugins/docker-compose"
    mkdir -p "$PLUGIN_DIR"
    # Copy, then rename: a client running meanwhile never sees half a binary.
    install -m 0755 "$dir/usr/libexec/docker/cli-plugins/docker-compose" \
        "$PLUGIN_DIR/.docker-compose.new"
    mv -f "$PLUGIN_DIR/.docker-compose.new" "$PLUGIN_DIR/docker-compose"
}

ensure_v2() {
    local -a clients missing
    mapfile -t clients < <(docker_clients)
    (( ${#clients[@]} > 0 )) || die "no docker client on PATH: run scripts/ensure-docker.sh first"
    mapfile -t missing < <(clients_without_v2)
    (( ${#missing[@]} == 0 )) && return 0
    need_root "Compose v2 (\`docker compose\` for ${missing[*]})"
    say "installing Compose v2 ($V2_SUITE's docker-compose plugin) into $PLUGIN_DIR"
    local work deb
    work=$(mktemp -d /tmp/ensure-compose.XXXXXX)
    # shellcheck disable=SC2064  # expand now: $work is local
    trap "rm -rf '$work'" EXIT
    deb=$(download_v2_deb "$work")  # a plain assignment, so that its failure stops us
    install_v2_plugin "$deb"
    mapfile -t missing < <(clients_without_v2)
    (( ${#missing[@]} == 0 )) \
        || die "installed $PLUGIN_DIR/docker-compose, but \`docker compose\` still fails with ${missing[*]}"
    say "Compose v2 $("${clients[0]}" compose version --short) for ${clients[*]}"
}

main() {
    (( $# == 0 )) || die "takes no arguments"
    ensure_v1
    ensure_v2
}

main "$@"
