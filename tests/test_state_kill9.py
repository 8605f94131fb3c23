"""state.json survives `kill -9` at any instant: a writer is killed mid-save, again and again."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from supervisor.core.state import FleetState, ServiceState
from supervisor.edges.store import StateStore

KILLS = 20
MAX_DELAY_S = 0.050
SAVES_PER_RUN = 2000
REPO = Path(__file__).resolve().parent.parent

# Resumes from the saved state, then saves a growing state (one more restart and one more
# transition each time), printing the counter after each save has returned.
WRITER = f"""
import sys, time
from pathlib import Path
from supervisor.core.state import Transition
from supervisor.edges.store import StateStore
store = StateStore(Path(sys.argv[1]))
with store.lock():
    result = store.load()
    assert result.notes == (), result.notes
    state = result.state
    alpha = state.services["alpha"]
    print("ready", flush=True)
    for _ in range({SAVES_PER_RUN}):
        alpha.restarts += 1
        alpha.last_restart_at = time.time()
        reason = f"save {{alpha.restarts}}"
        state.history.append(Transition(time.time(), "alpha", 0, 1, "a", "b", reason, "x" * 200))
        store.save(state)
        print(alpha.restarts, flush=True)
"""


def _run_and_kill(state_dir: Path, delay_s: float) -> tuple[int, int | None]:
    """Start a writer, SIGKILL it `delay_s` after it is ready; its exit code and last save."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(state_dir)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    time.sleep(delay_s)
    proc.send_signal(signal.SIGKILL)
    lines = proc.stdout.read().split()
    returncode = proc.wait()
    return returncode, int(lines[-1]) if lines else None


def test_state_survives_sigkill_at_random_moments(tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    store = StateStore(tmp_path / "state")
    store.save(FleetState(services={"alpha": ServiceState(model="llama3.2:3b", rung=0)}))
    counter, killed_mid_run = 0, 0

    for kill in range(KILLS):
        returncode, last_saved = _run_and_kill(store.state_dir, rng.uniform(0, MAX_DELAY_S))
        killed_mid_run += returncode == -signal.SIGKILL
        where = f"kill {kill}, seed {seed}"
        with store.lock(blocking=False):  # the kernel released the dead writer's lock
            result = store.load()
        assert result.notes == (), f"{where}: {result.notes}"
        loaded = result.state.services["alpha"].restarts
        assert loaded >= counter, f"{where}: counter went back from {counter} to {loaded}"
        if last_saved is not None:  # a save that returned is on disk; one more may be too
            assert last_saved <= loaded <= last_saved + 1, f"{where}: {last_saved=} {loaded=}"
        if loaded:  # the counter and the history come from the same save, never a mix
            assert result.state.history[-1].reason == f"save {loaded}", where
        counter = loaded

    assert killed_mid_run >= KILLS // 2, "the writer finished before most kills: nothing tested"
    assert counter > 0
