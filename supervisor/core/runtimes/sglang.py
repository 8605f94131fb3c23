"""SGLang's server: one model, loaded at start, OpenAI-compatible API."""

from __future__ import annotations

from supervisor.core.runtimes.spec import RungOptions, Runtime, RuntimeSpec, flag


def _rung_args(options: RungOptions) -> tuple[str, ...]:
    share = options.memory_share
    tp = options.tensor_parallel
    return (
        *flag("--context-length", options.context),
        *flag("--max-running-requests", options.parallel),
        *flag("--kv-cache-dtype", options.kv_cache),
        *flag("--tp-size", tp if tp > 1 else None),
        *flag("--mem-fraction-static", None if share is None else f"{share:.2f}"),
        *flag("--served-model-name", options.served_name),
    )


SPEC = RuntimeSpec(
    name=Runtime.SGLANG,
    title="SGLang",
    summary="sglang.launch_server; one model, loaded at start, OpenAI-compatible API",
    model_handoff=(
        "`model_env:` on recreate, for a command that reads that variable "
        "(e.g. `--model-path $MODEL`); "
        "fleetd generates no container"
    ),
    options_handoff=(
        "`model_env:` recreate: FLEETD_ARGS holds --context-length, --max-running-requests, "
        "--kv-cache-dtype, --tp-size, --mem-fraction-static and --served-model-name for "
        "the command to append (e.g. `--model-path $MODEL $FLEETD_ARGS`)"
    ),
    names_model="--served-model-name (in FLEETD_ARGS)",
    not_done=(
        "no generated compose service (run the container yourself and name it in "
        "`containers:`); no pull, unload or measured VRAM"
    ),
    rung_args=_rung_args,
    takes_memory_share=True,
    rung_options=frozenset({"context", "parallel", "kv_cache", "tensor_parallel"}),
    kv_cache_types=("auto", "fp8_e5m2", "fp8_e4m3"),
    api="SglangApi",
    health_path="/health",
    start_period_s=600.0,
    warmup_path="/v1/completions",
    # SGLang reserves a static share of the GPU for its KV pool, like vLLM.
    overhead_mib=1024,
    context_is_model_max=True,
    one_sequence_at_start=True,
)
