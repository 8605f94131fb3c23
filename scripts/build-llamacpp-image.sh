#!/usr/bin/env bash
# Build a Docker image that runs the real llama.cpp server on CPU, with no registry:
# Debian forky's llama.cpp-tools (llama.cpp 0.7.0, /usr/bin/llama-server, CPU backend) in a
# debootstrap root filesystem, imported with `docker import`.
#
#   scripts/build-llamacpp-image.sh          # build unless current; last stdout line: the tag
#
# The tag is fleetd-test/llamacpp:<16 hex digits of this script's sha256>, so an edited
# recipe builds a new image and an unchanged one is reused (`docker image inspect`); the
# image is also tagged fleetd-test/llamacpp:latest. A build takes about 70 s and root.
#
# Running it, like the upstream server image (arguments only) or with a command:
#   docker run --rm -v DIR:/models -p 127.0.0.1:PORT:8080 TAG -m /models/x.gguf --host 0.0.0.0 --port 8080
#   docker run --rm -v DIR:/models TAG llama-server -m /models/x.gguf ...
#   docker run --rm --entrypoint /bin/sh TAG -c 'ulimit -v 500000; exec llama-server ...'
# There is no curl or wget inside: probe /health from the host through a published port.
set -euo pipefail

REPO=fleetd-test/llamacpp
SUITE=forky
MIRROR=http://deb.debian.org/debian
# Debian's debootstrap has no script named forky yet; testing and unstable share sid's.
SUITE_SCRIPT=/usr/share/debootstrap/scripts/sid
PACKAGES=llama.cpp-tools,ca-certificates
ENTRYPOINT=/usr/local/bin/llamacpp-entrypoint

say() { printf 'build-llamacpp-image: %s\n' "$*" >&2; }
die() { printf 'build-llamacpp-image: error: %s\n' "$*" >&2; exit 1; }

recipe_hash() {
    sha256sum "${BASH_SOURCE[0]}" | cut -c1-16
}

ensure_debootstrap() {
    [ "$(id -u)" -eq 0 ] || die "building $TAG needs root (debootstrap makes device nodes and chroots)"
    command -v debootstrap >/dev/null 2>&1 && [ -r "$SUITE_SCRIPT" ] && return 0
    say "installing debootstrap with apt-get"
    local log=$WORK/apt.log
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update \
            && DEBIAN_FRONTEND=noninteractive apt-get install -y debootstrap; } >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        die "apt-get install debootstrap failed"
    fi
    [ -r "$SUITE_SCRIPT" ] || die "debootstrap has no $SUITE_SCRIPT to build $SUITE with"
}

make_rootfs() {  # DIR
    local rootfs=$1 log=$WORK/debootstrap.log
    say "debootstrap $SUITE ($PACKAGES) from $MIRROR"
    if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" \
            "$SUITE_SCRIPT" >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        die "debootstrap of $SUITE failed (log above)"
    fi
    [ -x "$rootfs/usr/bin/llama-server" ] || die "llama.cpp-tools installed no /usr/bin/llama-server"
    # What a container never needs: docs, manuals, translations, apt's caches.
    rm -rf "$rootfs"/usr/share/{doc,man,info,locale}/* "$rootfs"/var/cache/apt/archives/*.deb \
        "$rootfs"/var/lib/apt/lists/*
    write_entrypoint "$rootfs$ENTRYPOINT"
}

# Arguments alone start llama-server, as the upstream image does; a first argument that is
# not an option is a command to run (llama-server itself, sh, llama-cli ...).
write_entrypoint() {  # PATH
    cat >"$1" <<'SH'
#!/bin/sh
case "${1:-}" in
    ''|-*) exec /usr/bin/llama-server "$@" ;;
esac
exec "$@"
SH
    chmod 0755 "$1"
}

import_rootfs() {  # DIR
    tar -C "$1" -c . | docker import \
        -c "LABEL org.fleetd.test=1" -c "LABEL org.fleetd.test.recipe=$HASH" \
        -c "ENTRYPOINT [\"$ENTRYPOINT\"]" -c 'EXPOSE 8080' \
        - "$TAG" >/dev/null
    docker tag "$TAG" "$REPO:latest"
}

main() {
    docker info >/dev/null 2>&1 || die "the Docker engine does not answer (run scripts/ensure-docker.sh)"
    HASH=$(recipe_hash)
    TAG=$REPO:$HASH
    if docker image inspect "$TAG" >/dev/null 2>&1; then
        docker tag "$TAG" "$REPO:latest"
        printf '%s\n' "$TAG"
        return 0
    fi
    local start_s=$SECONDS
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
    ensure_debootstrap
    make_rootfs "$WORK/rootfs"
    import_rootfs "$WORK/rootfs"
    say "built $TAG in $(( SECONDS - start_s ))s"
    printf '%s\n' "$TAG"
}

main "$@"
