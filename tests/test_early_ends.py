"""A map that ends early leaves no writer behind: when a call that runs a
map leaves by an exception, none of its workers still runs.

Each case runs a victim in a child interpreter (``tests/burst.py``): every
chunk of its call spins until released and only then writes its rows; a
burst of three Ctrl-C, 50 ms apart, lands while they all run; the victim
releases them the moment the call raised and watches its arrays for two
seconds.  Before the round had one place that ends it early (``settle``:
every busy worker killed first, then reaped, signals held meanwhile), the
second Ctrl-C cut the one-at-a-time kill loop short and the workers not
yet killed wrote their rows after ``KeyboardInterrupt`` was raised.
"""

from __future__ import annotations

import pytest

import burst
from conftest import storage_for

CASES = [("map", 2), ("map", 3), ("map", 5)] + [(how, 5) for how in burst.HOWS if how != "map"]


@pytest.mark.breaks_things
@pytest.mark.parametrize("how, workers", CASES, ids=[f"{h}-{w}w" for h, w in CASES])
def test_a_burst_of_ctrl_c_leaves_no_worker_writing(how, workers):
    report = burst.trial(how, workers, storage_for(workers))
    assert report["returncode"] == 0 and report["stderr"] == "", report
    assert report["raised"], f"the call ended before the burst: {report}"
    assert report["changed"] == [], (
        f"rows {report['changed']} changed after the {how} raised KeyboardInterrupt: "
        f"a worker of the map was still running"
    )
    assert report["after"], "the next map did not work"
