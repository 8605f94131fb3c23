#!/usr/bin/env bash
# fleetd's whole loop against a real llama.cpp server, on this machine's CPU (`make demo`).
#
#   1. two real GGUF models (tests/ggufmodels.py): big (f16, 32 KiB of KV cache per
#      token) and small, and a fleet.yaml with one llama.cpp service whose ladder is five
#      whole runtime configurations: big at 32k and 16k context, big at 16k with a q8_0 KV
#      cache, small at 16k and 4k (`accelerator: cpu`: host memory is the budget); clients
#      call it `assistant` on every rung
#   2. `fleetctl plan` and `fleetctl generate` for it
#   3. a compose override that limits the server's address space (`ulimit -v 450000`, as
#      ops limit a container): no KV cache of big fits under it, small's do
#   4. `fleetd run` in the background, 5. `docker compose up -d` the generated project
#   6. fleetd's log live: llama-server fails to allocate, exits 1, Docker restarts it;
#      fleetd steps the service down: its context, then its KV precision, then its model;
#      small answers /health, is warmed up and measured from llama-server's own report
#   7. llama-server's own lines, 8. `fleetctl status`, 9. a completion by the stable name,
#      10. `fleetctl downgrade` to small's 4k context, and the server's context after it,
#      11. `fleetctl history`
#   12. on exit (Ctrl-C and failures too): fleetd stopped with SIGTERM, the project brought
#      down, the temporary folder removed
#
# Needs a Docker engine (scripts/ensure-docker.sh; `make demo` sees to it) and the checkout's
# venv (`make venv`); builds the llama.cpp image (scripts/build-test-images.sh llamacpp,
# about 70 s and root the first time) and installs Compose v2 (scripts/ensure-compose.sh)
# when they are missing. About 15-25 s once they are there.
# Environment: DEMO_TIMEOUT_S (default 120) bounds the wait for the step-down and the
# warm-up; KEEP_DEMO=1 keeps the temporary folder (fleet.yaml, state, fleetd's log);
# NO_COLOR=1 turns off colour (it is off anyway when stdout is not a terminal).
# The stand-in variant, without llama.cpp, in seconds: `make demo-standin` (scripts/demo.sh).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

IMAGE=fleetd-test/llamacpp:latest
TIMEOUT_S=${DEMO_TIMEOUT_S:-120}
ADDRESS_SPACE_KIB=450000 # no KV cache of big fits under it (272 MiB and more); small runs well inside

if [ -t 1 ] && [ -z "${NO_COLOR:-}" ]; then
    BOLD=$'\e[1m' HIGHLIGHT=$'\e[1;33m' DIM=$'\e[2m' RESET=$'\e[0m'
else
    BOLD="" HIGHLIGHT="" DIM="" RESET=""
fi

say() { printf '%s\n' "$*"; }
step() { printf '\n%s== %s%s\n' "$BOLD" "$*" "$RESET"; }
die() {
    printf 'demo: error: %s\n' "$*" >&2
    exit 1
}

# --- what the demo needs ------------------------------------------------------------------

# This checkout's fleetctl, fleetd and python, from its venv only: whatever else is on PATH
# may be another version than the code this demo shows.
FLEETCTL=$ROOT/.venv/bin/fleetctl FLEETD=$ROOT/.venv/bin/fleetd PY=$ROOT/.venv/bin/python
for cmd in "$FLEETCTL" "$FLEETD" "$PY"; do
    [ -x "$cmd" ] || die "$cmd is missing: run \`make venv\` (or \`make demo\`, which does)"
done
command -v setsid >/dev/null 2>&1 || die "setsid not found (Debian's util-linux package)"
DOCKER_HINT="run \`make demo\` (it installs and starts Docker when it is missing), or \`bash scripts/ensure-docker.sh demo\` as root"
command -v docker >/dev/null 2>&1 || die "Docker is not installed: $DOCKER_HINT"
docker info >/dev/null 2>&1 || die "the Docker engine does not answer: $DOCKER_HINT"
bash scripts/build-test-images.sh llamacpp # instant when the image is current
bash scripts/ensure-compose.sh
docker compose version >/dev/null 2>&1 || die "\`docker compose\` (Compose v2) does not work"

# --- cleanup, also on Ctrl-C ----------------------------------------------------------------

WORK=$(mktemp -d "${TMPDIR:-/tmp}/fleetd-demo.XXXXXX")
PROJECT=$(basename "$WORK" | tr 'A-Z.' 'a-z-')
CONTAINER=$PROJECT-llm
FLEETD_PID=""

stop_fleetd() { # SIGTERM, then SIGKILL after 10 s
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    say "demo: fleetd (pid $pid) ignored SIGTERM for 10 s; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$? fleetd_rc
    trap - EXIT INT TERM
    if [ -n "$FLEETD_PID" ]; then
        stop_fleetd "$FLEETD_PID"
        wait "$FLEETD_PID" 2>/dev/null && fleetd_rc=0 || fleetd_rc=$?
        say "stopped fleetd with SIGTERM (exit status $fleetd_rc)"
    fi
    # By project name, from a folder without a compose file: whatever `up` got to create.
    if (cd "$WORK" && docker compose -p "$PROJECT" down -v --remove-orphans -t 1 >/dev/null 2>&1); then
        say "brought the compose project $PROJECT down"
    else
        say "demo: could not bring the compose project $PROJECT down" >&2
    fi
    if [ -n "${KEEP_DEMO:-}" ]; then
        say "kept $WORK (KEEP_DEMO is set)"
    else
        rm -rf "$WORK"
        say "removed $WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'say; say "demo: interrupted"; exit 130' INT
trap 'exit 143' TERM

MODELS=$WORK/models COMPOSE_DIR=$WORK/compose STATE=$WORK/state
CONFIG=$WORK/fleet.yaml LOG=$WORK/fleetd.log
mkdir -p "$MODELS"

# --- helpers ------------------------------------------------------------------------------------

# Python reading the script on stdin. Its stderr is shown only when it fails by itself: a
# Ctrl-C while it starts would print a KeyboardInterrupt traceback, and the trap exits first.
py() {
    "$PY" - "$@" 2>"$WORK/py.err" || {
        cat "$WORK/py.err" >&2
        return 1
    }
}

# "yes" once the service is on rung 3 (small, 16k) and it is warmed up and measured.
settled() {
    py "$STATE/state.json" <<'EOF'
import json, signal, sys
signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C: die quietly, the script cleans up
try:
    with open(sys.argv[1]) as f:
        state = json.load(f)
except (FileNotFoundError, ValueError):
    state = {"services": {}}
rung = state["services"].get("llm", {}).get("rung")
measured = state.get("measured", {}).get("/models/small.gguf [context 16384]") or {}
print("yes" if rung == 3 and measured.get("tokens_per_s") and measured.get("parts") else "no")
EOF
}

# fleetd's new log lines, the interesting ones; once the project is up, each with the
# seconds since `compose up` when this loop saw it (it looks every 0.2 s). Writing to a
# file, fleetd prefixes journald's <priority> rather than a time; drop it.
SHOWN=0 UP_AT=""
show_new_log() {
    local total line seen="      "
    total=$(wc -l <"$LOG")
    ((total > SHOWN)) || return 0
    [ -z "$UP_AT" ] || seen=$(awk -v now="$(date +%s.%N)" -v start="$UP_AT" \
        'BEGIN { printf "%5.1fs", now - start }')
    while IFS= read -r line; do
        line=${line#<[0-9]>}
        case $line in
            *"metrics: serving"* | *"state: no state yet"* | "DEBUG:"*) ;;
            *": step down "* | *": now rung "*) printf '%s%s %s%s\n' "$HIGHLIGHT" "$seen" "$line" "$RESET" ;;
            *) printf '%s %s\n' "$seen" "$line" ;;
        esac
    done < <(sed -n "$((SHOWN + 1)),${total}p" "$LOG")
    SHOWN=$total
}

# The lines of llama-server's runs that tell the story (its log holds every run of the
# container): the first run whole, the runs between counted, the last run whole.
server_story() {
    docker logs "$CONTAINER" 2>&1 | grep -E \
        "loading model '|failed to allocate buffer of|exiting due to|KV buffer size =|model loaded" \
        | grep -v "output buffer size" | awk -v dim="$DIM" -v reset="$RESET" '
            /loading model \047/ { runs++ }
            { line[NR] = $0; run[NR] = runs }
            END {
                for (i = 1; i <= NR; i++) {
                    if (run[i] == 1 || run[i] == runs) { print line[i]; continue }
                    if (run[i] != said) {
                        said = run[i]
                        print dim "... (run " run[i] " of " runs ": the same lines)" reset
                    }
                }
            }'
}

fleetd_alive() {
    kill -0 "$FLEETD_PID" 2>/dev/null && return 0
    show_new_log
    die "fleetd exited (its log: $LOG; KEEP_DEMO=1 keeps it)"
}

# --- 1, 2: the models, the fleet and its plan ---------------------------------------------------

step "1. Two real GGUF models (tests/ggufmodels.py) and a one-service fleet in $WORK/"
"$PY" -m tests.ggufmodels "$MODELS/big.gguf" --layers 8 --n-embd 1024 --n-head 16 \
    --n-ff 1024 --context-length 65536 --weight-type f16
"$PY" -m tests.ggufmodels "$MODELS/small.gguf" --layers 2 --n-embd 256 --n-head 4 \
    --context-length 65536
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$CONFIG" <<EOF
accelerator: cpu # no GPU here: the budget is host memory, no GPU reservation
compose_dir: $COMPOSE_DIR
metrics: {address: "127.0.0.1:0"}
policy: {incidents_to_step_down: 3, cooldown: 1s, burst_window: 1s, stop_timeout: 2s}
services:
  llm:
    runtime: llamacpp
    image: $IMAGE
    containers: [$CONTAINER]
    port: $PORT
    volumes: ["$MODELS:/models:ro"]
    environment: {MALLOC_ARENA_MAX: "1"} # one malloc arena under the address-space limit
    rules: # on a CPU host, a buffer llama.cpp cannot allocate is the capacity incident
      - id: cpu-memory-is-capacity
        class: vram_oom
        pattern: 'failed to allocate (?:CPU )?buffer|mmap failed: Cannot allocate memory'
    health: {interval: 2s}
    warmup: {tokens: 8, timeout: 60s}
    served_name: assistant # what clients call, on every rung
    ladder: # whole runtime configurations, preferred first
      - {model: /models/big.gguf, metadata: $MODELS/big.gguf, context: [32768, 16384]}
      - {model: /models/big.gguf, metadata: $MODELS/big.gguf, context: 16384, kv_cache: q8_0}
      - {model: /models/small.gguf, metadata: $MODELS/small.gguf, context: [16384, 4096]}
EOF
sed -n '/^services:/,$p' "$CONFIG"

step "2. fleetctl plan, fleetctl generate"
"$FLEETCTL" plan --config "$CONFIG"
"$FLEETCTL" generate --config "$CONFIG" --out "$COMPOSE_DIR" --state-dir "$STATE"

# --- 3: the address-space limit ---------------------------------------------------------------

step "3. limits.yml: the generated entrypoint's script under \`ulimit -v $ADDRESS_SPACE_KIB\`"
# The shell's limit, not Docker's `ulimits: {as: }`: that one applies to runc's set-up too,
# which then cannot start the container at all.
py "$COMPOSE_DIR/compose.yml" "$COMPOSE_DIR/limits.yml" "$ADDRESS_SPACE_KIB" <<'EOF'
import sys, yaml
with open(sys.argv[1]) as f:
    shell, flag, script, *rest = yaml.safe_load(f)["services"]["llm"]["entrypoint"]
limited = [shell, flag, f"ulimit -v {sys.argv[3]}; {script}", *rest]
with open(sys.argv[2], "w") as f:
    yaml.safe_dump({"services": {"llm": {"entrypoint": limited}}}, f, width=1000)
EOF
cat "$COMPOSE_DIR/limits.yml"

# --- 4, 5: fleetd, then the project ------------------------------------------------------------

step "4. fleetd run --config fleet.yaml (log: $LOG)"
# In its own session, so a Ctrl-C reaches only this script, whose cleanup sends SIGTERM.
NOTIFY_SOCKET="" FLEETD_SOCKET="" setsid "$FLEETD" run --config "$CONFIG" --state-dir "$STATE" \
    >"$LOG" 2>&1 &
FLEETD_PID=$!
say "fleetd pid $FLEETD_PID"
for ((i = 0; i < 150; i++)); do # it says so once it follows the containers' logs
    grep -q "fleetd running" "$LOG" && break
    fleetd_alive
    sleep 0.1
done
grep -q "fleetd running" "$LOG" || die "fleetd did not start within 15 s (see $LOG)"
show_new_log

step "5. docker compose -p $PROJECT -f compose.yml -f limits.yml up -d"
UP_AT=$(date +%s.%N)
(cd "$COMPOSE_DIR" && docker compose -p "$PROJECT" -f compose.yml -f limits.yml up -d 2>&1)

# --- 6: the loop, live ------------------------------------------------------------------------

step "6. fleetd's log, live (seconds since compose up), until small serves, warmed up and measured"
until [ "$(settled)" = yes ] && grep -q "llm: healthy" "$LOG"; do
    fleetd_alive
    show_new_log
    awk -v now="$(date +%s.%N)" -v start="$UP_AT" -v limit="$TIMEOUT_S" \
        'BEGIN { exit !(now - start < limit) }' \
        || die "no step-down and warm-up within ${TIMEOUT_S}s (KEEP_DEMO=1 keeps $LOG)"
    sleep 0.2
done
show_new_log

# --- 7-10: the outcome ------------------------------------------------------------------------------

step "7. llama-server's own lines (docker logs $CONTAINER, abridged)"
server_story

step "8. fleetctl status"
"$FLEETCTL" status --config "$CONFIG" --state-dir "$STATE"

step "9. A completion by the stable name: POST http://127.0.0.1:$PORT/v1/completions {\"model\": \"assistant\"}"
completion() {
    py "http://127.0.0.1:$PORT" <<'EOF'
import json, sys, urllib.request
with urllib.request.urlopen(sys.argv[1] + "/props", timeout=10) as reply:
    print(f"n_ctx: {json.load(reply)['default_generation_settings']['n_ctx']}")
body = json.dumps({"model": "assistant", "prompt": "Hello", "max_tokens": 8}).encode()
request = urllib.request.Request(sys.argv[1] + "/v1/completions", body, {"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=60) as reply:
    answer = json.load(reply)
print(f"model: {answer['model']}")
print(f"text: {answer['choices'][0]['text']!r}")
print(f"usage: {answer['usage']}")
EOF
}
completion

step "10. fleetctl downgrade llm: small's shorter context, same name"
"$FLEETCTL" downgrade llm --config "$CONFIG" --state-dir "$STATE"
for ((i = 0; i < 300; i++)); do # healthy again on the new rung
    py "http://127.0.0.1:$PORT/health" <<'EOF' && break
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as reply:
        sys.exit(0 if reply.status == 200 else 1)
except OSError:
    sys.exit(1)
EOF
    fleetd_alive
    sleep 0.2
done
completion

step "11. fleetctl history"
"$FLEETCTL" history --state-dir "$STATE"

step "12. Cleaning up"
