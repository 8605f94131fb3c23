#!/usr/bin/env bash
# fleetd's whole loop on this machine, without a GPU, in well under a minute (`make demo-standin`; `make demo` runs a real llama-server).
#
#   1. the demo fleet: examples/demo/fleet.yaml; state and fleetd's log in state/demo/
#   2. `fleetctl plan` for it, and `fleetctl generate` for the model hand-off files
#   3. stand-in containers from fleetd-test/oom-emitter:1 (scripts/build-test-images.sh
#      builds it): `coder` (llama.cpp) on a pretend GPU of 3000 MiB, so its preferred
#      4000 MiB model runs out of memory; `chat` (Ollama), whose first model fits
#   4. `fleetd run` in the background, its log in state/demo/fleetd.log
#   5. the state before, 6. fleetd's log live until coder is on rung 1 (medium),
#   7. the state after, the history entry and coder's log with medium loaded,
#   8. on exit (Ctrl-C too): fleetd stopped with SIGTERM, the demo containers removed.
#
# Needs a Docker engine (scripts/ensure-docker.sh) and the test image; `make demo-standin` sees to
# both. Every run starts afresh: state/demo/ and the demo's containers are recreated.
# Environment: DEMO_TIMEOUT_S (default 90) bounds the wait for the step-down;
# NO_COLOR=1 turns off colour (it is off anyway when stdout is not a terminal).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

CONFIG=examples/demo/fleet.yaml
DEMO_DIR=state/demo # state/* is gitignored; this folder belongs to the demo alone
STATE=$DEMO_DIR/state
LOG=$DEMO_DIR/fleetd.log
PIDFILE=$DEMO_DIR/fleetd.pid
IMAGE=fleetd-test/oom-emitter:1
LABEL=org.fleetd.demo=1
CODER=fleetd-demo-coder
CHAT=fleetd-demo-chat
TIMEOUT_S=${DEMO_TIMEOUT_S:-90}
SETTLE_S=3 # watched after the step-down: medium fits, so nothing more happens

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

# This checkout's fleetctl and fleetd, from its venv (`make venv`) only: a fleetctl or fleetd
# elsewhere on PATH may be another version than the code this demo shows.
FLEETCTL=.venv/bin/fleetctl FLEETD=.venv/bin/fleetd PY=.venv/bin/python
for cmd in "$FLEETCTL" "$FLEETD" "$PY"; do
    [ -x "$cmd" ] || die "$ROOT/$cmd is missing: run \`make venv\` (or \`make demo\`, which does)"
done
command -v setsid >/dev/null 2>&1 || die "setsid not found (Debian's util-linux package)"

DOCKER_HINT="run \`make demo\` or \`make test\` (they install and start Docker when it is missing), or \`bash scripts/ensure-docker.sh\` as root"
command -v docker >/dev/null 2>&1 || die "Docker is not installed: $DOCKER_HINT"
docker info >/dev/null 2>&1 || die "the Docker engine does not answer: $DOCKER_HINT"
docker image inspect "$IMAGE" >/dev/null 2>&1 \
    || die "the image $IMAGE is missing: run \`bash scripts/build-test-images.sh oom-emitter\` (\`make demo\` does)"

# --- cleanup, also on Ctrl-C ----------------------------------------------------------------

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

remove_containers() {
    local ids
    ids=$(docker ps -aq --filter "label=$LABEL" 2>/dev/null) || return 0
    # shellcheck disable=SC2086 # a list of ids
    [ -z "$ids" ] || docker rm -f $ids >/dev/null 2>&1 || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$FLEETD_PID" ]; then
        stop_fleetd "$FLEETD_PID"
        wait "$FLEETD_PID" 2>/dev/null && fleetd_rc=0 || fleetd_rc=$?
        rm -f "$PIDFILE"
        say "stopped fleetd with SIGTERM (exit status $fleetd_rc)"
    fi
    remove_containers
    rm -f "$DEMO_DIR/py.err"
    say "removed the demo containers; fleetd's state and log stay in $DEMO_DIR/"
    exit "$rc"
}
trap cleanup EXIT
trap 'say; say "demo: interrupted"; exit 130' INT
trap 'exit 143' TERM

# A previous run killed before its cleanup: its fleetd (by its recorded pid, and only if
# that process is still the demo's fleetd) and its containers.
if [ -f "$PIDFILE" ]; then
    old=$(cat "$PIDFILE")
    if [[ $old =~ ^[0-9]+$ ]] && tr '\0' ' ' <"/proc/$old/cmdline" 2>/dev/null | grep -q -- "--config $CONFIG"; then
        say "demo: stopping the fleetd (pid $old) of an earlier demo"
        stop_fleetd "$old"
    fi
fi
remove_containers
rm -rf "$DEMO_DIR"
mkdir -p "$DEMO_DIR"

# --- helpers that read state.json ---------------------------------------------------------

# Python reading the script on stdin. Its stderr is shown only when it fails by itself: a
# Ctrl-C while it starts would print a KeyboardInterrupt traceback, and the trap exits first.
py() {
    "$PY" - "$@" 2>"$DEMO_DIR/py.err" || {
        cat "$DEMO_DIR/py.err" >&2
        return 1
    }
}

# One field of a service, or nothing when state.json is not there yet.
state_field() { # SERVICE FIELD
    py "$STATE/state.json" "$1" "$2" <<'EOF'
import json, signal, sys
signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C: die quietly, the script cleans up
try:
    with open(sys.argv[1]) as f:
        service = json.load(f)["services"].get(sys.argv[2], {})
except FileNotFoundError:
    service = {}
print(service.get(sys.argv[3], ""))
EOF
}

# fleetctl asks the running fleetd (or, before it runs, reads the saved state and says so
# on stderr).
print_state() {
    "$FLEETCTL" status --config "$CONFIG" --state-dir "$STATE" 2>/dev/null
}

print_history() {
    "$FLEETCTL" history --state-dir "$STATE"
}

# fleetd's log lines from line $SHOWN on, with the step-down highlighted. Writing to a file,
# fleetd prefixes journald's <priority> rather than a time; drop it.
SHOWN=0
show_new_log() {
    local total line
    total=$(wc -l <"$LOG")
    ((total > SHOWN)) || return 0
    while IFS= read -r line; do
        line=${line#<[0-9]>}
        case $line in
            *": step down "* | *": now rung "*) printf '%s>> %s%s\n' "$HIGHLIGHT" "$line" "$RESET" ;;
            *) printf '   %s\n' "$line" ;;
        esac
    done < <(sed -n "$((SHOWN + 1)),${total}p" "$LOG")
    SHOWN=$total
}

fleetd_alive() {
    kill -0 "$FLEETD_PID" 2>/dev/null && return 0
    show_new_log
    die "fleetd exited (see $LOG)"
}

# --- 1, 2: the fleet and its plan -------------------------------------------------------------

step "1. The demo fleet: $CONFIG, state in $STATE/"
say "coder (llama.cpp) and chat (Ollama) on a declared 8 GiB GPU; policy: 3 incidents step down"

step "2. fleetctl plan --config $CONFIG"
"$FLEETCTL" plan --config "$CONFIG"
say "${DIM}(fleetctl generate: the compose file a real host would run, and each service's model hand-off file)${RESET}"
"$FLEETCTL" generate --config "$CONFIG" --out "$DEMO_DIR/compose" --state-dir "$STATE"

# --- 3: the stand-in containers ---------------------------------------------------------------

step "3. Stand-in runtimes from $IMAGE (no GPU: each gets a pretend one)"
run_stand_in() { # NAME SERVICE RUNTIME CAPACITY_MIB MODEL_SIZES
    docker run --detach --name "$1" --label "$LABEL" --restart on-failure \
        --env "RUNTIME=$3" --env "CAPACITY_MIB=$4" --env "MODEL_SIZES=$5" \
        --volume "$ROOT/$STATE/services/$2:/run/fleetd:ro" \
        "$IMAGE" >/dev/null
    say "$1: $3 with $4 MiB, reads /run/fleetd/model ($(cat "$STATE/services/$2/model"))"
}
run_stand_in "$CODER" coder llamacpp 3000 "big=4000,medium=2500,small=1000"
run_stand_in "$CHAT" chat ollama 4000 "llama3.2:3b=2048,llama3.2:1b=1300,qwen2.5:0.5b=600"

# --- 4, 5: fleetd, and the state it starts from --------------------------------------------------

step "4. fleetd run --config $CONFIG --state-dir $STATE (log: $LOG)"
# In its own session, so a Ctrl-C reaches only this script, whose cleanup sends SIGTERM.
NOTIFY_SOCKET="" setsid "$FLEETD" run --config "$CONFIG" --state-dir "$STATE" >"$LOG" 2>&1 &
FLEETD_PID=$!
printf '%s\n' "$FLEETD_PID" >"$PIDFILE"
say "fleetd pid $FLEETD_PID"
for ((i = 0; i < 150; i++)); do # fleetd writes state.json as it starts
    [ -s "$STATE/state.json" ] && break
    fleetd_alive
    sleep 0.1
done
[ -s "$STATE/state.json" ] || die "fleetd wrote no $STATE/state.json within 15 s (see $LOG)"

step "5. State before"
print_state

# --- 6: the loop, live --------------------------------------------------------------------------

step "6. fleetd's log, live, until coder is on rung 1 (timeout ${TIMEOUT_S}s)"
start_s=$SECONDS
until [ "$(state_field coder rung)" = 1 ]; do
    fleetd_alive
    show_new_log
    ((SECONDS - start_s < TIMEOUT_S)) || die "coder did not reach rung 1 within ${TIMEOUT_S}s (see $LOG)"
    sleep 0.3
done
reached_s=$((SECONDS - start_s))
end=$((SECONDS + SETTLE_S))
while ((SECONDS < end)); do # a little longer: medium fits, nothing more happens
    fleetd_alive
    show_new_log
    sleep 0.3
done
show_new_log
say "${DIM}(coder reached rung 1 after ${reached_s}s; ${SETTLE_S}s later it is still there)${RESET}"

# --- 7: the outcome -------------------------------------------------------------------------------

step "7. State after"
print_state
[ "$(state_field coder rung)" = 1 ] || die "coder left rung 1 (see $LOG)"
[ "$(state_field chat rung)" = 0 ] || die "chat left rung 0 (see $LOG)"

step "7. The history entry (state.json)"
print_history

step "7. $CODER's log since its last start: medium loaded"
# Both streams since the current run started (their interleaving is Docker's, not ours).
docker logs --since "$(docker inspect -f '{{.State.StartedAt}}' "$CODER")" "$CODER" 2>&1 | tail -n 12

# --- 8: cleanup runs on exit ------------------------------------------------------------------------

step "8. Cleaning up"
