"""What a person asks of fleetctl (supervisor.core.ops): reset, downgrade, upgrade, pin, unpin,
and the VRAM check that guards every move up; pure functions on a state, no daemon."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.analyzer import prices
from supervisor.core import ops
from supervisor.core.config import FleetConfig, load_config
from supervisor.core.errors import UsageError
from supervisor.core.gpus import Discovery, Gpu, GpuProcess
from supervisor.core.ladder import apply_change
from supervisor.core.state import FleetState, Incident, ServiceState, ServiceStatus

GIB = 1024**3
WHO = "with fleetctl by uid 0 (root)"
NOW = 1_800_000_000.0

CONFIG = """
budget: 0.85
gpus: [{name: "test GPU", memory: 8GiB}]
services:
  web:
    runtime: llamacpp
    containers: [web-1]
    ladder:
      - {model: big, vram: 4000MiB}
      - {model: medium, vram: 2500MiB}
      - {model: wide, vram: 2600MiB}
      - {model: small, vram: 1000MiB}
  chat:
    runtime: llamacpp
    containers: [chat-1]
    ladder:
      - {model: large, vram: 3000MiB}
      - {model: tiny, vram: 500MiB}
"""


@pytest.fixture
def config(tmp_path: Path) -> FleetConfig:
    path = tmp_path / "fleet.yaml"
    path.write_text(CONFIG)
    return load_config(path)


def at(rung: int, model: str, **kwargs: object) -> ServiceState:
    return ServiceState(model=model, rung=rung, **kwargs)  # type: ignore[arg-type]


def fits(name: str, rung: int) -> ops.Fit:
    return ops.Fit(True, "fits on GPU 0")


def does_not_fit(name: str, rung: int) -> ops.Fit:
    return ops.Fit(False, "needs 3.9 GiB; 1.2 GiB left on GPU 0")


def test_downgrade_takes_the_next_rung_even_when_it_is_not_smaller(config: FleetConfig) -> None:
    # An automatic step down from medium skips `wide` (it needs more); a person does not.
    state = FleetState(services={"web": at(1, "medium")})
    outcome = ops.downgrade(state, config, "web", NOW, WHO)
    assert outcome.change is not None
    assert (outcome.change.to_rung, outcome.change.to_model) == (2, "wide")
    assert outcome.change.actor == "fleetctl"
    assert WHO in outcome.change.reason
    assert state.services["web"].pending == outcome.change
    assert state.services["web"].rung == 1  # moves only once the restart is done


def test_downgrade_at_the_bottom_is_refused_and_changes_nothing(config: FleetConfig) -> None:
    state = FleetState(services={"web": at(3, "small")})
    before = state.services["web"]
    with pytest.raises(ops.Refused, match=r"already at the bottom, rung 3 of 4 \(small\)"):
        ops.downgrade(state, config, "web", NOW, WHO)
    assert state.services["web"] is before


def test_a_pinned_service_refuses_downgrade_and_upgrade(config: FleetConfig) -> None:
    state = FleetState(services={"web": at(1, "medium", pinned=1, state=ServiceStatus.PINNED)})
    with pytest.raises(ops.Refused, match="pinned at rung 1; `fleetctl unpin web`"):
        ops.downgrade(state, config, "web", NOW, WHO)
    with pytest.raises(ops.Refused, match="pinned at rung 1"):
        ops.upgrade(state, config, "web", NOW, WHO, fits)


def test_upgrade_is_refused_with_the_vram_reason_unless_forced(config: FleetConfig) -> None:
    state = FleetState(services={"web": at(1, "medium")})
    with pytest.raises(ops.Refused, match=r"rung 0 will not fit: needs 3.9 GiB.*--force"):
        ops.upgrade(state, config, "web", NOW, WHO, does_not_fit)
    assert state.services["web"].pending is None

    outcome = ops.upgrade(state, config, "web", NOW, WHO, does_not_fit, force=True)
    assert outcome.change is not None and outcome.change.to_model == "big"
    assert "forced; the VRAM check said: needs 3.9 GiB" in outcome.change.reason


def test_upgrade_at_the_top_is_refused(config: FleetConfig) -> None:
    state = FleetState(services={"web": at(0, "big")})
    with pytest.raises(ops.Refused, match="already at the top"):
        ops.upgrade(state, config, "web", NOW, WHO, fits)


def test_reset_goes_to_the_top_and_clears_counters_and_pin(config: FleetConfig) -> None:
    incident = Incident(NOW - 5, "vram_oom", "llamacpp.cuda_malloc", "c0ffee", "out of memory")
    state = FleetState(services={"web": at(3, "small", incidents=[incident], pinned=3, restarts=4)})
    outcome = ops.reset(state, config, "web", NOW, WHO)
    svc = state.services["web"]
    assert outcome.change is not None and outcome.change.to_model == "big"
    assert (svc.incidents, svc.pinned, svc.restarts) == ([], None, 0)

    # Once applied, the history records who did it.
    new, record = apply_change(svc, "web", NOW + 1)
    assert (new.rung, new.model, new.state) == (0, "big", ServiceStatus.COOLDOWN)
    assert record.actor == "fleetctl" and record.reason == f"reset {WHO}"


def test_reset_at_the_top_only_clears_counters(config: FleetConfig) -> None:
    incident = Incident(NOW - 5, "vram_oom", "llamacpp.cuda_malloc", None, "out of memory")
    state = FleetState(services={"web": at(0, "big", incidents=[incident])})
    outcome = ops.reset(state, config, "web", NOW, WHO)
    assert outcome.change is None
    assert state.services["web"].incidents == []
    assert "already at rung 0 of 4 (big)" in outcome.message


def test_reset_at_the_top_replaces_a_recorded_change_so_its_handoff_follows(
    config: FleetConfig,
) -> None:
    # A downgrade recorded but not applied (fleetd handed it off, then found no Docker):
    # the reset must be handed off too, or the files keep naming the downgraded rung.
    pending = ops.downgrade(FleetState(services={"web": at(0, "big")}), config, "web", NOW, WHO)
    state = FleetState(services={"web": at(0, "big", pending=pending.change)})
    outcome = ops.reset(state, config, "web", NOW, WHO)
    assert outcome.change is not None and outcome.change.to_rung == 0
    assert state.services["web"].pending == outcome.change
    assert "instead of the recorded change to rung 1" in outcome.message


def test_reset_of_an_exhausted_service_restarts_it_even_on_the_same_rung(
    config: FleetConfig,
) -> None:
    state = FleetState(services={"chat": at(0, "large", state=ServiceStatus.EXHAUSTED)})
    outcome = ops.reset(state, config, "chat", NOW, WHO)
    assert outcome.change is not None and outcome.change.to_rung == 0
    assert "exhausted" in outcome.message


def test_pin_by_model_name_moves_and_holds(config: FleetConfig) -> None:
    state = FleetState(services={"web": at(0, "big")})
    outcome = ops.pin(state, config, "web", "small", NOW, WHO, does_not_fit)
    assert outcome.change is not None and outcome.change.to_rung == 3  # down: no check
    new, _ = apply_change(state.services["web"], "web", NOW)
    assert (new.rung, new.pinned, new.state) == (3, 3, ServiceStatus.PINNED)


def test_pin_up_is_vram_checked_and_pin_in_place_restarts_nothing(config: FleetConfig) -> None:
    state = FleetState(services={"web": at(3, "small")})
    with pytest.raises(ops.Refused, match="will not fit"):
        ops.pin(state, config, "web", "0", NOW, WHO, does_not_fit)
    outcome = ops.pin(state, config, "web", "3", NOW, WHO, does_not_fit)
    assert outcome.change is None
    assert state.services["web"].state is ServiceStatus.PINNED


def test_unpin_lets_incidents_count_again(config: FleetConfig) -> None:
    state = FleetState(services={"web": at(2, "wide", pinned=2, state=ServiceStatus.PINNED)})
    outcome = ops.unpin(state, config, "web", NOW, WHO)
    assert outcome.change is None
    assert (state.services["web"].pinned, state.services["web"].state) == (
        None,
        ServiceStatus.STEADY,
    )
    assert "was not pinned" in ops.unpin(state, config, "web", NOW, WHO).message


@pytest.mark.parametrize("text", ["4", "huge", "-1", ""])
def test_a_bad_rung_names_the_choices(config: FleetConfig, text: str) -> None:
    state = FleetState()
    with pytest.raises(UsageError, match=r"expected one of 0 \(big\), 1 \(medium\)"):
        ops.pin(state, config, "web", text, NOW, WHO, fits)
    assert state.services == {}


def test_an_unknown_service_is_a_usage_error_listing_the_services(config: FleetConfig) -> None:
    state = FleetState(services={"old": at(0, "x")})
    with pytest.raises(
        UsageError, match=r"no service 'old' in the config \(it is in the saved state only\)"
    ):
        ops.downgrade(state, config, "old", NOW, WHO)


def test_a_service_fleetd_has_not_run_yet_starts_from_the_top(config: FleetConfig) -> None:
    state = FleetState()
    outcome = ops.downgrade(state, config, "chat", NOW, WHO)
    assert outcome.change is not None and outcome.change.to_model == "tiny"


# ---------------------------------------------------------------- the VRAM check


def gpu(total_gib: float, used_gib: float | None = None, *pids: tuple[int, float]) -> Gpu:
    total = int(total_gib * GIB)
    used = None if used_gib is None else int(used_gib * GIB)
    return Gpu(
        index=0,
        name="test GPU",
        total_bytes=total,
        source="nvml" if used is not None else "declared",
        used_bytes=used,
        free_bytes=None if used is None else total - used,
        processes=tuple(GpuProcess(pid, int(g * GIB)) for pid, g in pids),
    )


def test_check_fit_counts_the_other_services_at_their_current_rungs(config: FleetConfig) -> None:
    # 8 GiB x 0.85 = 6.8 GiB. web big (4000 MiB) + chat large (3000 MiB) = 6.8+ GiB: no;
    # with chat down on tiny (500 MiB) it fits.
    discovery = Discovery(gpus=(gpu(8),))
    both_top = FleetState(services={"web": at(1, "medium"), "chat": at(0, "large")})
    refused = ops.check_fit(config, both_top, "web", 0, discovery, prices(config))
    assert not refused.fits
    # budget 6963 MiB - chat's 3000 MiB = 3963 MiB of room for big's 4000 MiB
    assert refused.reason == (
        "needs 4000 MiB; the most room beside the other services is 3963 MiB on GPU 0 "
        "(37 MiB short)"
    )

    chat_down = FleetState(services={"web": at(1, "medium"), "chat": at(1, "tiny")})
    allowed = ops.check_fit(config, chat_down, "web", 0, discovery, prices(config))
    assert allowed.fits, allowed.reason
    assert "fits on GPU 0" in allowed.reason


def test_check_fit_subtracts_memory_held_by_processes_outside_the_fleet(
    config: FleetConfig,
) -> None:
    state = FleetState(services={"web": at(1, "medium"), "chat": at(1, "tiny")})
    # Another program holds 3 GiB on the GPU: big no longer fits beside tiny.
    busy = Discovery(gpus=(gpu(8, 3.2, (4242, 3.0)),))
    assert not ops.check_fit(config, state, "web", 0, busy, prices(config)).fits
    # The same 3 GiB held by the fleet's own container (pid known as ours) does not count.
    assert ops.check_fit(config, state, "web", 0, busy, prices(config), frozenset({4242})).fits


def test_check_fit_without_any_gpu_reading_says_it_cannot_check(config: FleetConfig) -> None:
    no_gpu = Discovery(gpus=(), problem="no NVIDIA GPU found: NVML: Driver Not Loaded")
    result = ops.check_fit(config, FleetState(), "web", 0, no_gpu, prices(config))
    assert not result.fits
    assert result.reason == "cannot check the VRAM: no NVIDIA GPU found: NVML: Driver Not Loaded"


def test_a_saved_rung_past_the_ladders_end_is_refused_but_a_reset_mends_it(
    config: FleetConfig,
) -> None:
    """The config lost rungs since fleetd saved rung 7: a downgrade, an upgrade or a pin
    say so and point to reset (they used to raise IndexError); the reset goes to the top."""
    state = FleetState(services={"web": at(7, "gone")})
    for attempt in (
        lambda: ops.downgrade(state, config, "web", 1.0, "by test"),
        lambda: ops.upgrade(state, config, "web", 1.0, "by test", fits),
        lambda: ops.pin(state, config, "web", "1", 1.0, "by test", fits),
    ):
        with pytest.raises(ops.Refused, match=r"rung 7 \(gone\), past the end of its 4-rung"):
            attempt()
    assert state.services["web"].pending is None  # nothing changed
    outcome = ops.reset(state, config, "web", 1.0, "by test")
    assert outcome.change is not None and outcome.change.to_rung == 0
