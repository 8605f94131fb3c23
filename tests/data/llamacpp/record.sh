#!/usr/bin/env bash
# Record the real llama-server logs in this folder (test data, kept verbatim).
#
#   bash tests/data/llamacpp/record.sh            # every file; about a minute; Docker, root
#   bash tests/data/llamacpp/record.sh NAME...    # just these (file names without .log)
#
# Each run writes its GGUF with tests/ggufmodels.py (the same flags give the same bytes),
# starts the image of scripts/build-llamacpp-image.sh with `-lv 4` (the buffer report only
# appears at that verbosity), and saves `docker logs` below comment lines that say how it
# was made: the command, the GGUF flags and shape, the llama.cpp version, the date, the exit
# status. A run that starts is probed from the host (the image has no curl): /health, then
# one /v1/completions request, then stopped with SIGTERM (docker stop).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3

say() { printf 'record: %s\n' "$*" >&2; }
die() { printf 'record: error: %s\n' "$*" >&2; exit 1; }

# name | GGUF flags (tests/ggufmodels.py) | how it runs | llama-server arguments after -m
# How it runs: "serve" (published port, probed, stopped), "ulimit-v:KiB" (sh -c 'ulimit -v
# KiB; exec llama-server ...'), "memory:LIMIT" (docker run --memory LIMIT), "fail" (plain).
RUNS=(
    "tiny-c512-np1|--layers 2 --n-embd 256 --n-head 4|serve|-c 512 -np 1"
    "tiny-c2048-auto-np|--layers 2 --n-embd 256 --n-head 4|serve|-c 2048"
    "gqa-c4096-np4|--layers 4 --n-embd 512 --n-head 8 --n-head-kv 2 --vocab 1000|serve|-c 4096 -np 4"
    "gqa-c4096-np3-q8_0|--layers 4 --n-embd 512 --n-head 8 --n-head-kv 2 --vocab 1000|serve|-c 4096 -np 3 -ctk q8_0 -ctv q8_0"
    "f16-c8192-np2|--layers 3 --n-embd 768 --n-head 12 --n-head-kv 4 --n-ff 2048 --weight-type f16|serve|-c 8192 -np 2"
    "q8_0-v32k-c2000-q4_0|--layers 4 --n-embd 512 --n-head 8 --n-head-kv 2 --head-dim 128 --n-ff 1536 --vocab 32000 --weight-type q8_0|serve|-c 2000 -np 1 -ctk q4_0 -ctv q4_0"
    "fail-v-cache-q4_0-without-fa|--layers 4 --n-embd 512 --n-head 8 --n-head-kv 2 --vocab 1000|fail|-c 1024 -np 1 -ctk q4_0 -ctv q4_0 -fa off"
    "fail-model-mmap-ulimit|--layers 4 --n-embd 1024 --n-head 16 --n-ff 4096 --context-length 32768 --weight-type f16|ulimit-v:200000|-c 32768 -np 1"
    "fail-kv-ulimit|--layers 4 --n-embd 1024 --n-head 16 --n-ff 4096 --context-length 32768 --weight-type f16|ulimit-v:600000|-c 32768 -np 1"
    "fail-compute-ulimit|--layers 4 --n-embd 1024 --n-head 16 --n-ff 4096 --context-length 32768 --weight-type f16|ulimit-v:880000|-c 32768 -np 1"
    "killed-memory-64m|--layers 4 --n-embd 1024 --n-head 16 --n-ff 4096 --context-length 32768 --weight-type f16|memory:64m|-c 32768 -np 1"
)

# Wait for /health, send one completion; prints what it saw, fails if it saw no answer.
probe() {  # PORT
    "$PYTHON" - "$1" <<'PY'
import json, sys, time, urllib.error, urllib.request

base = f"http://127.0.0.1:{sys.argv[1]}"
deadline = time.monotonic() + 60
while True:
    try:
        with urllib.request.urlopen(base + "/health", timeout=2) as r:
            health = r.status
            break
    except (urllib.error.URLError, ConnectionError):
        if time.monotonic() > deadline:
            sys.exit("no /health answer in 60 s")
        time.sleep(0.1)
body = json.dumps({"prompt": "hello world", "max_tokens": 4}).encode()
request = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=120) as r:
    done = json.load(r)
print(f"/health {health}, /v1/completions {r.status} ({done['usage']['completion_tokens']} tokens)")
PY
}

free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Run one entry; sets CMD (the docker command as run), STATUS and NOTE; log text to $1.
run_entry() {  # LOG HOW ARGS...
    local log=$1 how=$2 cid port
    shift 2
    local mount=(-v "$MODELS:/models:ro")
    NOTE=""
    case $how in
        serve)
            port=$(free_port)
            CMD=(docker run -d "${mount[@]}" -p "127.0.0.1:$port:8080" "$IMAGE" "$@" --host 0.0.0.0 --port 8080)
            cid=$("${CMD[@]}")
            NOTE=$(probe "$port") || NOTE="probe failed: $NOTE"
            docker stop -t 10 "$cid" >/dev/null
            ;;
        ulimit-v:*)
            CMD=(docker run -d "${mount[@]}" --entrypoint /bin/sh "$IMAGE"
                 -c "ulimit -v ${how#ulimit-v:}; exec llama-server $* --port 8080")
            cid=$("${CMD[@]}")
            ;;
        memory:*)
            CMD=(docker run -d "${mount[@]}" --memory "${how#memory:}" "$IMAGE" "$@" --port 8080)
            cid=$("${CMD[@]}")
            ;;
        fail)
            CMD=(docker run -d "${mount[@]}" "$IMAGE" "$@" --port 8080)
            cid=$("${CMD[@]}")
            ;;
    esac
    STATUS=$(docker wait "$cid")
    local oom
    oom=$(docker inspect -f '{{.State.OOMKilled}}' "$cid")
    [ "$oom" = false ] || NOTE="${NOTE:+$NOTE; }OOMKilled=$oom"
    docker logs "$cid" >"$log" 2>&1
    docker rm -f "$cid" >/dev/null
}

# The words as a shell would read them back: plain words bare, others in single quotes.
shell_words() {  # WORD...
    local word quoted=()
    for word in "$@"; do
        if [[ $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
            quoted+=("$word")
        else
            quoted+=("'${word//\'/\'\\\'\'}'")
        fi
    done
    printf '%s' "${quoted[*]}"
}

record() {  # ENTRY
    local name flags how args
    IFS='|' read -r name flags how args <<<"$1"
    local model=$MODELS/$name.gguf out=$HERE/$name.log body=$WORK/$name.body
    local -a flag_words arg_words
    read -ra flag_words <<<"$flags"
    read -ra arg_words <<<"$args"
    local shape
    shape=$("$PYTHON" -m tests.ggufmodels "$model" "${flag_words[@]}")
    run_entry "$body" "$how" -m "/models/$name.gguf" "${arg_words[@]}" -lv 4
    local cmd
    cmd=$(shell_words "${CMD[@]}")
    cmd=${cmd//"$MODELS"/MODELS}
    {
        printf '# llama-server start-up log, recorded by tests/data/llamacpp/record.sh; verbatim below these lines\n'
        printf '# command: %s\n' "$cmd"
        printf '# gguf: python -m tests.ggufmodels MODELS/%s.gguf %s\n' "$name" "$flags"
        printf '# shape: %s, sha256 %s\n' "${shape#*: }" "$(sha256sum "$model" | cut -c1-64)"
        printf '# llama.cpp: %s (%s)\n' "$VERSION" "$IMAGE"
        printf '# date: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
        printf '# exit status: %s%s\n' "$STATUS" "${NOTE:+ ($NOTE)}"
        cat "$body"
    } >"$out"
    say "$name: exit $STATUS${NOTE:+ ($NOTE)}"
}

main() {
    cd "$ROOT"
    IMAGE=$(bash scripts/build-llamacpp-image.sh | tail -n 1)
    VERSION=$(docker run --rm "$IMAGE" --version 2>&1 | tr '\n' ' ' | sed 's/ *$//')
    WORK=$(mktemp -d)
    MODELS=$WORK/models
    mkdir -p "$MODELS"
    trap 'rm -rf "$WORK"' EXIT
    local entry wanted
    for entry in "${RUNS[@]}"; do
        if (( $# > 0 )); then
            for wanted in "$@"; do
                [ "${entry%%|*}" != "$wanted" ] || record "$entry"
            done
        else
            record "$entry"
        fi
    done
}

main "$@"
