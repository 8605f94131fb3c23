#!/bin/sh
# fleetd-test/oom-emitter entrypoint: imitates an LLM runtime starting with the model it
# was handed, for fleetd's integration tests. POSIX sh (busybox ash); it runs as PID 1.
#
# Environment (the whole interface):
#   RUNTIME            required: ollama | llamacpp | vllm | pytorch
#   CAPACITY_MIB       required: VRAM of the pretend GPU, whole MiB
#   MODEL_SIZES        optional: NAME=MiB,NAME=MiB,... (e.g. big=4000,small=1000);
#                      a model not listed needs 0 MiB, so it fits
#   MODEL_FROM_ENV     optional: 1 = take the model from $MODEL (fleetd's env hand-off);
#                      otherwise it is the first line of /run/fleetd/model (file hand-off)
#   MODEL              the model name when MODEL_FROM_ENV=1
#   VLLM_OOM           optional, vllm only: torch (default: the weights do not fit, PyTorch's
#                      OutOfMemoryError) | kv_cache (the weights fit, no VRAM is left for
#                      the KV cache: vLLM's own "No available memory for the cache blocks")
#   OOM_INTERVAL_S     optional, ollama only: seconds between OOM bursts (default 2;
#                      decimals allowed)
#   LOAD_DELAY_S       optional: seconds between the start line and the load's outcome
#                      (default 0; decimals allowed), a stand-in for loading time
#   HEALTH_PORT        optional: serve GET <anything> -> 200 {"status":"ok"} on this port
#                      once the server is up (ollama: always; others: only when it fits)
#   NOISE_LINES_PER_S  optional: also print about this many harmless lines a second
#   FLOOD              optional: 1 = also print harmless lines as fast as possible
#
# Outcomes:
#   no model           "emitter: no model handed off" on stderr, exit 2
#   bad configuration  "emitter: <what>" on stderr, exit 2
#   need > capacity    the runtime's real out-of-memory output; llamacpp, vllm and pytorch
#                      then exit 1 (the process dies); ollama keeps serving and repeats a
#                      two-line burst every OOM_INTERVAL_S (its server survives a runner)
#   it fits            the runtime's ready line plus benign lines that mention memory,
#                      then serve until SIGTERM/SIGINT, which exits 0 at once
# Streams follow the real programs: llama.cpp, Ollama and tracebacks write to stderr, vLLM's
# logger and the emitter's own start line to stdout.
set -u
set -f # model names are data, never globs

MODEL_FILE=/run/fleetd/model
CHILDREN=""
SLEEP_PID=""

out() { printf '%s\n' "$*"; }
err() { printf '%s\n' "$*" >&2; }
die() {
    err "emitter: $*"
    exit 2
}

# PID 1 ignores signals it has no handler for: without this trap `docker stop` would wait
# its whole timeout and then SIGKILL.
on_stop() {
    # shellcheck disable=SC2086 # a list of PIDs
    kill $CHILDREN $SLEEP_PID 2>/dev/null
    exit 0
}
trap on_stop TERM INT

# Sleep without blocking the trap: a foreground `sleep` would delay it until it ends.
pause() {
    sleep "$1" &
    SLEEP_PID=$!
    wait "$SLEEP_PID"
    SLEEP_PID=""
}

is_uint() {
    case $1 in '' | *[!0-9]*) return 1 ;; esac
}

is_seconds() { # 2, 0.5, 10.25
    case $1 in '' | .* | *. | *[!0-9.]* | *.*.*) return 1 ;; esac
}

trim() {
    set -- "${1#"${1%%[! ]*}"}"
    printf '%s' "${1%"${1##*[! ]}"}"
}

# MiB -> "G.GG" (two decimals, truncated) and "G.G"
gib2() { printf '%d.%02d' $(($1 / 1024)) $(($1 % 1024 * 100 / 1024)); }
gib1() { printf '%d.%d' $(($1 / 1024)) $(($1 % 1024 * 10 / 1024)); }
# MiB -> a size the way PyTorch's allocator message writes it ("1.50 GiB", "512.00 MiB")
torch_size() {
    if [ "$1" -ge 1024 ]; then
        printf '%s GiB' "$(gib2 "$1")"
    else
        printf '%d.00 MiB' "$1"
    fi
}

# Milliseconds for log timestamps: busybox date has no %N, so borrow /proc/uptime's.
millis() {
    read -r _up _idle </proc/uptime
    printf '%s0' "${_up#*.}"
}
ollama_time() { printf '%s.%sZ' "$(date -u +%Y-%m-%dT%H:%M:%S)" "$(millis)"; }
vllm_time() { date +'%m-%d %H:%M:%S'; }

# --- configuration ----------------------------------------------------------------------

RUNTIME=${RUNTIME:-}
case $RUNTIME in
    ollama | llamacpp | vllm | pytorch) ;;
    *) die "RUNTIME must be one of ollama, llamacpp, vllm, pytorch (got '$RUNTIME')" ;;
esac
CAPACITY_MIB=${CAPACITY_MIB:-}
is_uint "$CAPACITY_MIB" || die "CAPACITY_MIB must be a whole number of MiB (got '$CAPACITY_MIB')"
OOM_INTERVAL_S=${OOM_INTERVAL_S:-2}
is_seconds "$OOM_INTERVAL_S" || die "OOM_INTERVAL_S must be a number of seconds (got '$OOM_INTERVAL_S')"
LOAD_DELAY_S=${LOAD_DELAY_S:-0}
is_seconds "$LOAD_DELAY_S" || die "LOAD_DELAY_S must be a number of seconds (got '$LOAD_DELAY_S')"
NOISE_LINES_PER_S=${NOISE_LINES_PER_S:-0}
is_uint "$NOISE_LINES_PER_S" || die "NOISE_LINES_PER_S must be a whole number (got '$NOISE_LINES_PER_S')"
HEALTH_PORT=${HEALTH_PORT:-}
VLLM_OOM=${VLLM_OOM:-torch}
case $VLLM_OOM in torch | kv_cache) ;; *) die "VLLM_OOM must be torch or kv_cache (got '$VLLM_OOM')" ;; esac
[ -z "$HEALTH_PORT" ] || is_uint "$HEALTH_PORT" || die "HEALTH_PORT must be a port number (got '$HEALTH_PORT')"

if [ "${MODEL_FROM_ENV:-}" = 1 ]; then
    MODEL_NAME=${MODEL:-}
else
    MODEL_NAME=""
    # `read` fails on a last line without a newline but still fills the variable.
    [ -r "$MODEL_FILE" ] && { read -r MODEL_NAME <"$MODEL_FILE" || true; }
fi
MODEL_NAME=$(trim "$MODEL_NAME")
[ -n "$MODEL_NAME" ] || {
    err "emitter: no model handed off"
    exit 2
}

NEED_MIB=0
_ifs=$IFS
IFS=,
for _pair in ${MODEL_SIZES:-}; do
    IFS=$_ifs
    _pair=$(trim "$_pair")
    [ -n "$_pair" ] || continue
    case $_pair in *=*) ;; *) die "MODEL_SIZES entry '$_pair' is not NAME=MiB" ;; esac
    _size=$(trim "${_pair##*=}")
    is_uint "$_size" || die "MODEL_SIZES entry '$_pair' is not NAME=MiB"
    [ "$(trim "${_pair%=*}")" = "$MODEL_NAME" ] && NEED_MIB=$_size
done
IFS=$_ifs

# --- the runtimes' output ---------------------------------------------------------------
# Wording copied from the real programs' logs (sources in the report that came with this
# image); numbers are derived from NEED_MIB and CAPACITY_MIB so that they agree.

GPU_NAME="NVIDIA GeForce RTX 3090"
FREE_MIB=$((CAPACITY_MIB * 3 / 100)) # what is left free when the allocation fails

llamacpp_start() { # llama-server, build b5xxx (mid 2025); all of its log goes to stderr
    err "main: binding port with default address family"
    err "main: HTTP server is listening, hostname: 0.0.0.0, port: 8080, http threads: 15"
    err "main: loading model"
    err "srv    load_model: loading model '$MODEL_NAME'"
    err "llama_model_load_from_file_impl: using device CUDA0 ($GPU_NAME) - $((CAPACITY_MIB - FREE_MIB)) MiB free"
    err "load_tensors: loading model tensors, this can take a while... (mmap = true)"
}
llamacpp_oom() {
    err "ggml_backend_cuda_buffer_type_alloc_buffer: allocating $NEED_MIB.00 MiB on device 0: cudaMalloc failed: out of memory"
    err "alloc_tensor_range: failed to allocate CUDA0 buffer of size $((NEED_MIB * 1048576))"
    err "llama_model_load: error loading model: unable to allocate CUDA0 buffer"
    err "llama_model_load_from_file_impl: failed to load model"
    err "common_init_from_params: failed to load model '$MODEL_NAME'"
    err "srv    load_model: failed to load model, '$MODEL_NAME'"
    err "srv    operator(): operator(): cleaning up before exit..."
    err "main: exiting due to model loading error"
    exit 1
}
llamacpp_ready() {
    err "load_tensors: offloaded 29/29 layers to GPU"
    err "load_tensors:        CUDA0 model buffer size = $(printf '%5d' "$NEED_MIB").00 MiB"
    err "llama_kv_cache_unified:      CUDA0 KV buffer size =   448.00 MiB"
    err "llama_context:      CUDA0 compute buffer size =   300.75 MiB"
    err "srv          init: initializing slots, n_slots = 4"
    err "main: model loaded"
    err "main: server is listening on http://0.0.0.0:8080 - starting the main loop"
    err "srv  update_slots: all slots are idle"
}

VLLM_SITE=/usr/local/lib/python3.12/dist-packages
vllm_start() { # vLLM 0.8.5, V1 engine; its logger writes to stdout
    out "INFO $(vllm_time) [__init__.py:239] Automatically detected platform cuda."
    out "INFO $(vllm_time) [api_server.py:1043] vLLM API server version 0.8.5"
    out "INFO $(vllm_time) [api_server.py:1044] args: Namespace(subparser='serve', model_tag='$MODEL_NAME', host=None, port=8000, model='$MODEL_NAME', dtype='auto', max_model_len=None, tensor_parallel_size=1, gpu_memory_utilization=0.9, swap_space=4, enforce_eager=False)"
    out "INFO $(vllm_time) [core.py:58] Initializing a V1 LLM engine (v0.8.5) with config: model='$MODEL_NAME', dtype=torch.bfloat16, max_seq_len=8192, device_config=cuda, seed=None"
    out "INFO $(vllm_time) [gpu_model_runner.py:1329] Starting to load model $MODEL_NAME..."
}
vllm_oom() {
    _t=$(vllm_time)
    _p="ERROR $_t [core.py:396]"
    [ "$VLLM_OOM" = torch ] || vllm_kv_cache_oom "$_p"
    _in_use=$((CAPACITY_MIB - FREE_MIB))
    out "$_p EngineCore failed to start."
    out "$_p Traceback (most recent call last):"
    out "$_p   File \"$VLLM_SITE/vllm/v1/engine/core.py\", line 387, in run_engine_core"
    out "$_p     engine_core = EngineCoreProc(*args, **kwargs)"
    out "$_p   File \"$VLLM_SITE/vllm/v1/engine/core.py\", line 64, in __init__"
    out "$_p     self.model_executor = executor_class(vllm_config)"
    out "$_p   File \"$VLLM_SITE/vllm/executor/uniproc_executor.py\", line 47, in _init_executor"
    out "$_p     self.collective_rpc(\"load_model\")"
    out "$_p   File \"$VLLM_SITE/vllm/v1/worker/gpu_worker.py\", line 162, in load_model"
    out "$_p     self.model_runner.load_model()"
    out "$_p   File \"$VLLM_SITE/vllm/v1/worker/gpu_model_runner.py\", line 1332, in load_model"
    out "$_p     self.model = get_model(vllm_config=self.vllm_config)"
    out "$_p torch.OutOfMemoryError: CUDA out of memory. Tried to allocate $(torch_size $((NEED_MIB - _in_use))). GPU 0 has a total capacity of $(gib2 "$CAPACITY_MIB") GiB of which $FREE_MIB.00 MiB is free. Including non-PyTorch memory, this process has $(torch_size "$_in_use") memory in use. Of the allocated memory $(torch_size $((_in_use * 9 / 10))) is allocated by PyTorch, and 1.84 MiB is reserved by PyTorch but unallocated. If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
    err "Traceback (most recent call last):"
    err "  File \"$VLLM_SITE/vllm/v1/engine/core_client.py\", line 404, in _wait_for_engine_startup"
    err "    raise RuntimeError(\"Engine core initialization failed. \""
    err "RuntimeError: Engine core initialization failed. See root cause above."
    exit 1
}
vllm_kv_cache_oom() { # vLLM 0.8.5 V1: the weights loaded, the KV cache check fails
    out "INFO $(vllm_time) [gpu_model_runner.py:1347] Model loading took $(gib2 "$NEED_MIB") GiB and 4.12 seconds"
    out "INFO $(vllm_time) [gpu_worker.py:227] Available KV cache memory: -$(gib2 $((NEED_MIB - CAPACITY_MIB))) GiB"
    out "$1 EngineCore failed to start."
    out "$1 Traceback (most recent call last):"
    out "$1   File \"$VLLM_SITE/vllm/v1/engine/core.py\", line 387, in run_engine_core"
    out "$1     engine_core = EngineCoreProc(*args, **kwargs)"
    out "$1   File \"$VLLM_SITE/vllm/v1/engine/core.py\", line 71, in __init__"
    out "$1     self._initialize_kv_caches(vllm_config)"
    out "$1   File \"$VLLM_SITE/vllm/v1/core/kv_cache_utils.py\", line 528, in check_enough_kv_cache_memory"
    out "$1     raise ValueError(\"No available memory for the cache blocks. \""
    out "$1 ValueError: No available memory for the cache blocks. Try increasing \`gpu_memory_utilization\` when initializing the engine."
    err "RuntimeError: Engine core initialization failed. See root cause above."
    exit 1
}
vllm_ready() {
    out "INFO $(vllm_time) [gpu_model_runner.py:1347] Model loading took $(gib2 "$NEED_MIB") GiB and 4.12 seconds"
    _kv=$((CAPACITY_MIB * 9 / 10 - NEED_MIB))
    [ "$_kv" -ge 0 ] || _kv=0
    out "INFO $(vllm_time) [gpu_worker.py:227] Available KV cache memory: $(gib2 "$_kv") GiB"
    out "INFO $(vllm_time) [kv_cache_utils.py:634] GPU KV cache size: 120,448 tokens"
    out "INFO $(vllm_time) [api_server.py:1090] Starting vLLM API server on http://0.0.0.0:8000"
    err "INFO:     Started server process [1]"
    err "INFO:     Waiting for application startup."
    err "INFO:     Application startup complete."
}

PT_SITE=/usr/local/lib/python3.11/site-packages
pytorch_start() { # a plain transformers + uvicorn app on torch 2.3 (torch.cuda.OutOfMemoryError)
    out "loading $MODEL_NAME on cuda:0"
}
pytorch_oom() {
    _in_use=$((CAPACITY_MIB - FREE_MIB))
    err "Traceback (most recent call last):"
    err "  File \"/app/serve.py\", line 41, in <module>"
    err "    model = load_model(os.environ[\"MODEL\"])"
    err "  File \"/app/serve.py\", line 23, in load_model"
    err "    return AutoModelForCausalLM.from_pretrained(name, torch_dtype=torch.float16).to(\"cuda\")"
    err "  File \"$PT_SITE/transformers/modeling_utils.py\", line 2905, in to"
    err "    return super().to(*args, **kwargs)"
    err "  File \"$PT_SITE/torch/nn/modules/module.py\", line 1152, in to"
    err "    return self._apply(convert)"
    err "  File \"$PT_SITE/torch/nn/modules/module.py\", line 825, in _apply"
    err "    param_applied = fn(param)"
    err "  File \"$PT_SITE/torch/nn/modules/module.py\", line 1150, in convert"
    err "    return t.to(device, dtype if t.is_floating_point() or t.is_complex() else None, non_blocking)"
    err "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate $(torch_size $((NEED_MIB - _in_use))). GPU 0 has a total capacity of $(gib2 "$CAPACITY_MIB") GiB of which $FREE_MIB.00 MiB is free. Process 48213 has $(torch_size "$_in_use") memory in use. Of the allocated memory $(torch_size $((_in_use * 9 / 10))) is allocated by PyTorch, and 118.33 MiB is reserved by PyTorch but unallocated. If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
    exit 1
}
pytorch_ready() {
    out "loaded $MODEL_NAME: torch.cuda.memory_allocated()=$((NEED_MIB * 1048576)) of $((CAPACITY_MIB * 1048576)) bytes"
    err "INFO:     Started server process [1]"
    err "INFO:     Waiting for application startup."
    err "INFO:     Application startup complete."
    err "INFO:     Uvicorn running on http://0.0.0.0:8000 (Press CTRL+C to quit)"
}

ollama_start() { # ollama serve 0.6.8 in Docker (OLLAMA_HOST=0.0.0.0); slog writes to stderr
    err "time=$(ollama_time) level=INFO source=routes.go:1300 msg=\"Listening on [::]:11434 (version 0.6.8)\""
    err "time=$(ollama_time) level=INFO source=gpu.go:217 msg=\"looking for compatible GPUs\""
    err "time=$(ollama_time) level=INFO source=types.go:130 msg=\"inference compute\" id=GPU-5f3e9c1a-2b7d-4e61-9a0c-3d8f1b6e4c27 library=cuda variant=v12 compute=8.6 driver=12.4 name=\"$GPU_NAME\" total=\"$(gib1 "$CAPACITY_MIB") GiB\" available=\"$(gib1 $((CAPACITY_MIB - 300))) GiB\""
}
ollama_oom_burst() { # the runner's ggml line, then the server's report of the dead runner
    err "ggml_backend_cuda_buffer_type_alloc_buffer: allocating $NEED_MIB.00 MiB on device 0: cudaMalloc failed: out of memory"
    pause 0.05
    err "time=$(ollama_time) level=ERROR source=sched.go:455 msg=\"error loading llama server\" error=\"llama runner process has terminated: cudaMalloc failed: out of memory\""
}
ollama_ready() {
    err "time=$(ollama_time) level=INFO source=server.go:405 msg=\"starting llama server\" cmd=\"/usr/bin/ollama runner --model /root/.ollama/models/blobs/sha256-6a0746a1ec1aef3e7ec53868f220ff6e389f6f8ef87a01d77c96807de94ca2aa --ctx-size 8192 --batch-size 512 --n-gpu-layers 29 --threads 8 --parallel 4 --port 35331\""
    err "load_tensors:        CUDA0 model buffer size = $(printf '%5d' "$NEED_MIB").00 MiB"
    err "llama_kv_cache_init:      CUDA0 KV buffer size =   448.00 MiB"
    err "time=$(ollama_time) level=INFO source=server.go:630 msg=\"llama runner started in 1.51 seconds\""
}

# --- background chatter -----------------------------------------------------------------

noise() { # about $1 harmless lines a second, in batches every 100 ms from 10/s up
    if [ "$1" -ge 10 ]; then
        _batch=$(($1 / 10)) _us=100000
    else
        _batch=1 _us=$((1000000 / $1))
    fi
    _n=0
    while :; do
        _i=0
        while [ "$_i" -lt "$_batch" ]; do
            _i=$((_i + 1)) _n=$((_n + 1))
            out "INFO: request $_n done in $((_n % 47 + 3)) ms"
        done
        usleep "$_us"
    done
}

serve_health() {
    [ -n "$HEALTH_PORT" ] || return 0
    nc -ll -p "$HEALTH_PORT" -e /health.sh &
    CHILDREN="$CHILDREN $!"
}

serve_forever() {
    serve_health
    while :; do pause 3600; done
}

# --- run --------------------------------------------------------------------------------

out "emitter: runtime=$RUNTIME model=$MODEL_NAME need=${NEED_MIB}MiB capacity=${CAPACITY_MIB}MiB"
if [ "$NOISE_LINES_PER_S" -gt 0 ]; then
    noise "$NOISE_LINES_PER_S" &
    CHILDREN="$CHILDREN $!"
fi
if [ "${FLOOD:-}" = 1 ]; then
    yes "INFO flood line" &
    CHILDREN="$CHILDREN $!"
fi

"${RUNTIME}_start"
[ "$LOAD_DELAY_S" = 0 ] || pause "$LOAD_DELAY_S"

if [ "$NEED_MIB" -le "$CAPACITY_MIB" ]; then
    "${RUNTIME}_ready"
    serve_forever
fi

if [ "$RUNTIME" != ollama ]; then
    "${RUNTIME}_oom" # exits 1
fi
# Ollama's server outlives its runner: it stays up (and healthy) and fails again on the
# next request for the model.
serve_health
while :; do
    ollama_oom_burst
    pause "$OOM_INTERVAL_S"
done
