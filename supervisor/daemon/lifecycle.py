"""One change of model, done completely: before the restart and after it.

    prepare (before the containers restart), as the runtime's registry entry allows
      can_pull:   the new model is pulled if the runtime does not have it (progress
                  reported; Ollama: `/api/tags`, `/api/pull`)
      can_unload: the old one is unloaded so its VRAM is free (Ollama: `keep_alive: 0`)
    restart (supervisor.daemon.handoff: the model file, then restart or recreate)
    settle (after)
      wait until the runtime answers its health check (its `health_path`), preload and
      warm up with a short generation (its `warmup_path`, when it has one), and measure:
      load time and tokens/s from the response, VRAM where `reports_measured_vram`, the
      report of what it allocated in its start-up log where `footprint_in_log`
      (llama.cpp's buffer report, vLLM's weights and KV cache)

A pull that fails leaves the old model running (the change is retried later). While
settling, an out-of-memory line in the service's log (fleetd's detector sets `abort`)
ends the wait at once: the new model does not fit, and fleetd knows it in milliseconds
rather than at the warm-up timeout.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from loguru import logger

from supervisor.core.config import FleetConfig, ServiceConfig
from supervisor.core.endpoints import endpoint_of
from supervisor.core.errors import FleetdError
from supervisor.core.footprint import runtime_footprint
from supervisor.core.rungs import RungSetup
from supervisor.core.runtimes import spec_of
from supervisor.core.state import Measured
from supervisor.core.units import format_size
from supervisor.edges.runtime_api import PullProgress, RuntimeApi, RuntimeApiError, api_for

PULL_TIMEOUT_S = 6 * 3600.0  # a 70B model over a slow link
READY_POLL_S = 0.1  # a health GET every 0.1 s while a new model loads: cheap, and no wait
REPORT_EVERY_S = 2.0


class LoadFailed(RuntimeApiError):
    """The new model ran out of memory while loading (seen in the service's log)."""


@dataclass(frozen=True)
class Settled:
    """How a change ended once the containers were restarted (queued to the main loop)."""

    service: str
    model: str
    ok: bool
    detail: str
    measured: Measured | None = None
    oom: bool = False
    rung: int | None = None  # the rung settled (None: an ensemble member, by model)


class ModelChange:
    """prepare() and settle() for one service's change; runs in a worker thread."""

    def __init__(
        self,
        service: str,
        config: ServiceConfig,
        api: RuntimeApi,
        report: Callable[[str], None],
        abort: threading.Event,
        clock: Callable[[], float] = time.time,
        read_log: Callable[[], list[str]] | None = None,
    ) -> None:
        """`read_log` gives the lines the service's container printed since it started
        (for a runtime that reports its footprint there); None: nothing is read."""
        self.service, self.config, self.api = service, config, api
        self.spec = spec_of(config.runtime)
        self.report, self.abort, self.clock = report, abort, clock
        self.read_log = read_log

    @classmethod
    def for_service(
        cls,
        fleet: FleetConfig,
        service: str,
        report: Callable[[str], None],
        abort: threading.Event,
        clock: Callable[[], float] = time.time,
        read_log: Callable[[], list[str]] | None = None,
    ) -> ModelChange | None:
        endpoint = endpoint_of(fleet, service)
        config = fleet.services[service]
        api = api_for(config.runtime, endpoint) if endpoint else None
        if api is None:
            return None
        return cls(service, config, api, report, abort, clock, read_log)

    def prepare(self, old: str | None, setup: RungSetup | str) -> None:
        """Before the restart: pull the new rung's model where the runtime can, unload what
        the service had loaded, and (Ollama) create the stable name from the new rung. A
        model name alone (an ensemble's member): pull it, nothing else."""
        new = setup if isinstance(setup, str) else setup.model
        # Runtimes that cannot pull or unload load the model at start from what they hold.
        if self.spec.can_pull and not self.api.present(new):
            self._pull(new)
        if isinstance(setup, str):
            return
        named = self._names_a_model()
        if self.spec.can_unload:
            # What the old rung loaded: the stable name (it stands for the old rung until
            # it is created again) and the old model, for clients that call it by name.
            loaded = [setup.served_name] if named else []
            loaded += [old] if old is not None and old != new else []
            present = {self.api.full_name(m.name) for m in self.api.loaded()} if named else None
            for name in dict.fromkeys(loaded):
                if present is None or self.api.full_name(name) in present:
                    self.report(f"unloading {name}")
                    self.api.unload(name)
        if named:
            context = setup.option_map.get("context")
            parameters = {"num_ctx": context} if context else {}
            shown = f" (num_ctx {context})" if context else ""
            self.report(f"naming {setup.served_name}: {new}{shown}")
            self.api.create(setup.served_name, new, parameters)

    def _names_a_model(self) -> bool:
        """Whether fleetd keeps a stable model of the service's name in the runtime (Ollama
        creates one per change; an ensemble's apps name its members)."""
        return self.spec.can_create and self.config.ensemble is None

    def client_model(self, setup: RungSetup) -> str:
        """The name a client (and the warm-up) calls the running rung by."""
        if self._names_a_model() or (self.spec.names_model and not self.spec.swaps_models):
            return setup.served_name
        return setup.model

    def unload_others(self, others: Iterable[str]) -> None:
        """Unload the models named that the runtime has loaded (an ensemble's other
        members), so one member's budget holds; nothing where it cannot unload."""
        if not self.spec.can_unload:
            return
        loaded = {self.api.full_name(m.name) for m in self.api.loaded()}
        for other in others:
            if self.api.full_name(other) in loaded:
                self.report(f"unloading {other}")
                self.api.unload(other)

    def _pull(self, model: str) -> None:
        last_at = [0.0]

        def progress(p: PullProgress) -> None:
            now = time.monotonic()
            if now - last_at[0] >= REPORT_EVERY_S or p.status == "success":
                last_at[0] = now
                self.report(f"pulling {model}: {p.describe()}")

        self.report(f"pulling {model}")
        self.api.pull(model, progress, PULL_TIMEOUT_S, self.abort)

    def settle(self, setup: RungSetup | str) -> Settled:
        """Wait for health, warm up (by the name clients call), measure; never raises (the
        result says what failed). A model name alone: an ensemble member, warmed as named."""
        started = self.clock()
        model = setup if isinstance(setup, str) else setup.model
        called = setup if isinstance(setup, str) else self.client_model(setup)
        rung = None if isinstance(setup, str) else setup.rung
        try:
            deadline = time.monotonic() + self.config.warmup.timeout
            self._wait_ready(deadline)
            warmed = None
            if self.config.warmup.enabled and self.spec.warmup_path is not None:
                self.report(f"warming up {called}" + (f" ({model})" if called != model else ""))
                remaining = max(1.0, deadline - time.monotonic())
                warm = self.config.warmup
                warmed = self.api.warm(called, warm.prompt, warm.tokens, remaining)
            vram = self.api.size_vram(called) if self.spec.reports_measured_vram else None
        except LoadFailed as e:
            return Settled(self.service, model, False, str(e), oom=True, rung=rung)
        except RuntimeApiError as e:
            if self.abort.is_set():
                return Settled(self.service, model, False, _OOM, oom=True, rung=rung)
            return Settled(self.service, model, False, str(e), rung=rung)
        measured = self._from_report(model, rung) or Measured(
            vram_bytes=vram, load_s=None, tokens_per_s=None, at=self.clock()
        )
        measured.load_s = warmed.load_s if warmed else None
        measured.tokens_per_s = warmed.tokens_per_s if warmed else None
        ready_s = self.clock() - started
        detail = f"ready in {ready_s:.1f} s" + (f"; warm-up {warmed.describe()}" if warmed else "")
        if measured.parts is not None and measured.vram_bytes is not None:
            detail += f"; {format_size(measured.vram_bytes)} allocated by its own report"
        return Settled(self.service, model, True, detail, measured, rung=rung)

    def _from_report(self, model: str, rung: int | None) -> Measured | None:
        """The footprint the runtime printed at start, for the rung that runs `model`;
        None where it prints none or the log cannot be read (the estimate stays)."""
        if not self.spec.footprint_in_log or self.read_log is None or rung is None:
            return None
        try:
            lines = self.read_log()
        except FleetdError as e:
            logger.warning(f"{self.service}: cannot read the buffer report of {model}: {e}")
            return None
        return measured_from_report(self.service, self.config, rung, lines, self.clock())

    def _wait_ready(self, deadline: float) -> None:
        timeout = self.config.health.timeout
        last_error = "no answer yet"
        while True:
            if self.abort.is_set():
                raise LoadFailed(_OOM)
            try:
                self.api.health(min(timeout, max(0.5, deadline - time.monotonic())))
                return
            except RuntimeApiError as e:
                last_error = str(e)
            if time.monotonic() >= deadline:
                raise RuntimeApiError(
                    f"not ready after {self.config.warmup.timeout:.0f} s ({last_error})"
                )
            self.abort.wait(READY_POLL_S)


_OOM = "the new model ran out of memory while loading (see the log line above)"


def measured_from_report(
    service: str, config: ServiceConfig, rung_index: int, lines: list[str], now: float
) -> Measured | None:
    """The runtime's buffer report in a run's log, as the measured need of the rung
    (with that rung's options); None, with a warning, when there is none."""
    spec = spec_of(config.runtime)
    assert spec.footprint_in_log is not None
    rung = config.ladder[min(rung_index, len(config.ladder) - 1)]
    model = rung.model
    found = runtime_footprint(spec.footprint_in_log, lines)
    if found is None:
        logger.warning(f"{service}: {model} printed no report of what it allocated")
        return None
    context, parallel = rung.context, rung.parallel
    asked = context or (None if spec.context_is_model_max else spec.default_context)
    if not found.ran_with(asked, parallel or 1):
        # The run had other options than the rung's (a container started with an older
        # rung's arguments): the figure holds for what ran, and does not price this rung.
        logger.warning(
            f"{service}: {model} ran with context {found.context} and {found.slots} slots, "
            f"not its rung's {asked} and {parallel or 1}: its report is kept "
            "for those, the rung keeps its estimate"
        )
        context, parallel = found.context, found.slots
    return Measured(
        vram_bytes=found.total_bytes,
        load_s=None,
        tokens_per_s=None,
        at=now,
        parts=found.parts,
        context=context,
        parallel=parallel,
        version=found.version,
    )
