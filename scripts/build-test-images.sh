#!/usr/bin/env bash
# Build the images the integration tests run, locally: there is no registry to pull from.
#
#   scripts/build-test-images.sh                # every image
#   scripts/build-test-images.sh oom-emitter    # just these (and what they are built FROM)
#
# An image is reused when `docker image inspect` finds its tag and its
# org.fleetd.test.context label matches the hash of what it was built from, so a run on
# a machine that has them is instant and an edited Dockerfile is rebuilt, not reused.
# An image built FROM another test image also records that image's ID in its context, so
# rebuilding the base rebuilds it too.
# To add an image: write tests/images/NAME/, a build_NAME function (a '-' in NAME is '_'
# there), and list NAME in IMAGES.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMAGES_DIR="$ROOT/tests/images"
IMAGES=(busybox oom-emitter)

export DOCKER_BUILDKIT=0   # no buildx on these machines; the legacy builder works offline

say() { printf 'build-test-images: %s\n' "$*"; }
die() { printf 'build-test-images: error: %s\n' "$*" >&2; exit 1; }

# Hash of every file in a build context (names and contents), for the reuse check.
context_hash() {
    (cd "$1" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) \
        | sha256sum | cut -c1-16
}

image_is_current() {  # TAG HASH
    local found
    found=$(docker image inspect --format '{{index .Config.Labels "org.fleetd.test.context"}}' "$1" 2>/dev/null) \
        || return 1
    [ "$found" = "$2" ]
}

# Build TAG from the prepared context dir CTX unless an image built from the same
# context is already there.
build_context() {  # TAG CTX
    local tag=$1 ctx=$2 hash start_s=$SECONDS
    hash=$(context_hash "$ctx")
    if image_is_current "$tag" "$hash"; then
        return 0
    fi
    say "building $tag"
    local out
    # Output only on failure: the 28.x client also warns that the legacy builder is deprecated.
    if ! out=$(docker build --label org.fleetd.test=1 --label "org.fleetd.test.context=$hash" \
            -t "$tag" "$ctx" 2>&1); then
        printf '%s\n' "$out" >&2
        die "docker build of $tag failed"
    fi
    # The image this tag pointed at before is now dangling; drop it (and only test images).
    docker image prune -f --filter label=org.fleetd.test=1 >/dev/null
    say "built $tag in $(( SECONDS - start_s ))s"
}

# fleetd-test/busybox:1 — FROM scratch plus Debian's static busybox with its applets
# linked into /bin (sh, cat, echo, sleep, nc, httpd, wget ...).
build_busybox() {
    local busybox=/bin/busybox ctx=$WORK/busybox
    dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed' \
        || die "busybox-static is not installed (run scripts/ensure-docker.sh)"
    mkdir -p "$ctx"
    cp -a "$IMAGES_DIR/busybox/." "$ctx/"
    cp "$busybox" "$ctx/busybox"
    build_context fleetd-test/busybox:1 "$ctx"
}

# fleetd-test/oom-emitter:1 — FROM fleetd-test/busybox:1 plus /emitter.sh, a stand-in for
# an LLM runtime that prints real-format CUDA out-of-memory output when the model handed
# off at /run/fleetd/model does not fit (its env interface is at the top of emitter.sh).
build_oom_emitter() {
    local base=fleetd-test/busybox:1 ctx=$WORK/oom-emitter
    build_busybox
    mkdir -p "$ctx"
    cp -a "$IMAGES_DIR/oom-emitter/." "$ctx/"
    # Not used by the Dockerfile: it puts the base image into the context hash.
    docker image inspect --format '{{.Id}}' "$base" >"$ctx/.base-image-id"
    build_context fleetd-test/oom-emitter:1 "$ctx"
}

main() {
    docker info >/dev/null 2>&1 || die "the Docker engine does not answer (run scripts/ensure-docker.sh)"
    (( $# > 0 )) || set -- "${IMAGES[@]}"
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
    local name
    for name in "$@"; do
        declare -F "build_${name//-/_}" >/dev/null || die "unknown image '$name' (known: ${IMAGES[*]})"
        "build_${name//-/_}"
    done
}

main "$@"
