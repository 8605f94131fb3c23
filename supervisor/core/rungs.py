"""A rung as its container receives it: the model, the runtime's arguments and environment
for the rung's options, and the stable name clients call. Pure.

One `RungSetup` feeds both hand-off strategies, so they cannot drift apart:
- files (`model`, `args`, `env` in `<state-dir>/services/<service>/`), read by the start
  scripts of generated containers at every start (`READ_HANDOFF` in runtimes/spec.py);
- environment variables, for a container fleetd recreates (`model_env:`): the model under
  that name, the options as FLEETD_CONTEXT, FLEETD_PARALLEL, FLEETD_KV_CACHE,
  FLEETD_TENSOR_PARALLEL, FLEETD_SERVED_NAME, the runtime's arguments for the rung as
  FLEETD_ARGS (space-separated), and the runtime's own variables for the rung.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from supervisor.core.config import FleetConfig, RungConfig
from supervisor.core.runtimes import RungOptions, spec_of

# The variables a recreate sets from the rung's options (None: removed when unset).
OPTION_VARIABLES = {
    "context": "FLEETD_CONTEXT",
    "parallel": "FLEETD_PARALLEL",
    "kv_cache": "FLEETD_KV_CACHE",
    "tensor_parallel": "FLEETD_TENSOR_PARALLEL",
}
SERVED_NAME_VARIABLE = "FLEETD_SERVED_NAME"
# `mode: swarm`: the variable a stack's service reads its model from (`model_env:` names
# another); a change of rung is a service update of these variables.
SWARM_MODEL_VARIABLE = "FLEETD_MODEL"
ARGS_VARIABLE = "FLEETD_ARGS"


@dataclass(frozen=True)
class RungSetup:
    """Everything one rung hands its container."""

    service: str
    rung: int
    model: str
    options: tuple[tuple[str, object], ...]  # context, parallel, kv_cache, tensor_parallel
    served_name: str
    memory_share: float | None  # of each GPU, where the runtime takes a share (vLLM)
    args: tuple[str, ...]  # the runtime's arguments for the rung, after its own
    env: tuple[tuple[str, str], ...]  # the runtime's variables for the rung
    gpus: tuple[int, ...] | None = None  # moving to these GPUs (off a cordoned one)

    @property
    def option_map(self) -> dict[str, object]:
        return dict(self.options)

    def files(self) -> dict[str, str]:
        """The hand-off files' contents: `model`, `args` (one per line), `env` (NAME=VALUE)."""
        return {
            "model": self.model + "\n",
            "args": "".join(a + "\n" for a in self.args),
            "env": "".join(f"{k}={v}\n" for k, v in self.env),
        }

    def variables(self, model_env: str) -> dict[str, str | None]:
        """What a recreate sets (None: removed): the model under `model_env`, then the rest."""
        found: dict[str, str | None] = {model_env: self.model}
        for option, name in OPTION_VARIABLES.items():
            value = self.option_map.get(option)
            found[name] = None if value is None else str(value)
        found[SERVED_NAME_VARIABLE] = self.served_name
        found[ARGS_VARIABLE] = " ".join(self.args) or None
        found.update(dict(self.env))
        return found

    def describe(self) -> str:
        """`context 8192, kv_cache q8_0` (the options set), or `default options`."""
        return describe_options(self.option_map)


def setup_for(
    config: FleetConfig,
    service: str,
    rung: int,
    need_bytes: int,
    gpu_total_bytes: int | None,
) -> RungSetup:
    """The setup of `service` on `rung`, whose plan gives it `need_bytes` per GPU of
    `gpu_total_bytes` (None: the GPU is not known, so no share is set)."""
    svc = config.services[service]
    spec = spec_of(svc.runtime)
    chosen = svc.ladder[min(rung, len(svc.ladder) - 1)]
    served = svc.client_name
    options = RungOptions(
        context=chosen.context,
        parallel=chosen.parallel,
        need_bytes=need_bytes,
        gpu_total_bytes=gpu_total_bytes or 0,
        on_cpu=config.accelerator == "cpu",
        kv_cache=chosen.kv_cache,
        tensor_parallel=chosen.tensor_parallel,
        served_name=served if spec.names_model and not spec.swaps_models else None,
    )
    return RungSetup(
        service=service,
        rung=rung,
        model=chosen.model,
        options=tuple(chosen.options.items()),
        served_name=served,
        memory_share=options.memory_share if spec.takes_memory_share else None,
        args=spec.rung_args(options),
        env=spec.rung_env(options),
    )


def set_options(options: Mapping[str, object] | None) -> str:
    """The options a rung sets, as a person reads them (`context 8192, kv_cache q8_0`);
    "" when it sets none (every one the runtime's default)."""
    shown = [
        f"{k} {v}"
        for k, v in (options or {}).items()
        if v is not None and (k, v) != ("tensor_parallel", 1)
    ]
    return ", ".join(shown)


def describe_options(options: Mapping[str, object] | None) -> str:
    """A rung's options as a person reads them, `default options` when it sets none."""
    return set_options(options) or "default options"


def measured_key(rung: RungConfig) -> str:
    """The key a rung's measurement is kept under in state.json's `measured`: the model's
    name, with the options that change what it allocates (`m [context 8192, kv_cache q8_0]`);
    rungs of one model with other options are priced apart."""
    options = describe_options(rung.options)
    return rung.model if options == "default options" else f"{rung.model} [{options}]"
