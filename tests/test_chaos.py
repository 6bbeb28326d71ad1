"""A short, fixed-seed chaos run (``tests/chaos.py``): random calls from
several threads while workers are killed, stopped and continued, maps are
stopped, the caller gets Ctrl-C (alone, in bursts of 2-4, and while its
map waits behind another thread's), the watchdog is killed and the engine
is closed at random.  Every invariant is checked, and each episode is
observed from outside: among them, that a call raises only what the
episode caused (a crash only after a kill, a timeout only with a
``timeout``, ...), that no array changes after the call that wrote it has
left, and that a killed watchdog runs again after the next map.  ``make
stress`` runs the same for as long as you like."""

from __future__ import annotations

import pytest

import chaos

# Fixed seeds, one per worker count (2, and more than this machine's cores).
EPISODES = [(11, 2), (12, 3), (13, 5)]


@pytest.mark.breaks_things
@pytest.mark.parametrize("seed, workers", EPISODES, ids=[f"seed{s}-{w}w" for s, w in EPISODES])
def test_chaos_episode_keeps_every_invariant(seed, workers):
    report = chaos.run_episode(seed, workers)
    assert not report["failures"], (
        f"seed {seed} ({workers} workers) broke invariants; replay with "
        f"`python tests/chaos.py --seed {seed} --workers {workers}`:\n"
        + "\n".join(report["failures"])
    )
    assert report["calls"] > 0
