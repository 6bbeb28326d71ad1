"""Batch work: maps that finish despite failures (retries, errors="collect"),
results streamed as chunks finish (imap), what workers print and log, and
the per-worker records (stats, max_worker_memory).  Real workers, real
crashes (a segfault), real timeouts."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from numba import njit

import shmarray
from conftest import WORKER_COUNTS, engine_id, run_python, storage_for
from shmarray import control, row_offset
from shmarray.partition import assign_static

N, SIZE = 8, 10  # chunks of the maps below, rows a chunk
FAILS = {
    "exception": ValueError,
    "crash": shmarray.WorkerCrashedError,
    "timeout": shmarray.TaskTimeoutError,
}


def flaky(a, off, counts, bad, how, times):
    """Rows ``off..`` get their own numbers; the chunk at row ``bad`` fails
    its first ``times`` runs as ``how`` says.  ``counts`` counts the runs of
    each chunk."""
    c = off // SIZE
    counts[c] += 1
    if off == bad and counts[c] <= times:
        if how == "exception":
            raise ValueError(f"chunk at row {off}")
        if how == "crash":
            ctypes.string_at(0)  # a real segfault
        if how == "timeout":
            time.sleep(60)
    a[:] = np.arange(off, off + a.shape[0])
    return float(a.sum())


@pytest.fixture(params=WORKER_COUNTS, ids=engine_id)
def eng(request):
    # One per test: a replaced worker is a new process, which the leak check
    # would count against the test that happened to be running.
    with shmarray.Engine(workers=request.param, storage=storage_for(request.param)) as engine:
        # A worker's first run of `flaky` imports this module, pytest and
        # all, which on a loaded machine can pass the tests' timeout=1 by
        # itself: done here, so the timeouts measure the chunks.
        a, counts = fresh(engine)
        engine.map(flaky, a, args=(row_offset, counts, -1, "", 0), chunks=N)
        del a, counts
        yield engine


def fresh(eng):
    a = eng.empty(N * SIZE)
    a[:] = -1.0
    return a, eng.zeros(N, np.int64)


def expected_except(bad_rows=()):
    want = np.arange(N * SIZE, dtype=np.float64)
    for lo, hi in bad_rows:
        want[lo:hi] = -1.0
    return want


@pytest.mark.parametrize("schedule", ["static", "dynamic"])
@pytest.mark.parametrize("how", ["exception", "crash", "timeout"])
@pytest.mark.parametrize("k", [0, 5])
def test_collect_runs_every_other_chunk_and_names_the_failed_rows(eng, schedule, how, k):
    a, counts = fresh(eng)
    bad = k * SIZE
    report = eng.map(
        flaky,
        a,
        args=(row_offset, counts, bad, how, 1),
        chunks=N,
        schedule=schedule,
        errors="collect",
        timeout=1,
    )
    assert isinstance(report, shmarray.MapReport)
    assert not report.ok
    assert [rows for rows, _ in report.failed] == [(bad, bad + SIZE)]
    assert isinstance(report.failed[0][1], FAILS[how])
    assert report.retried == []
    np.testing.assert_array_equal(a, expected_except([(bad, bad + SIZE)]))
    assert counts.tolist() == [1] * N  # every chunk ran exactly once
    eng.map(flaky, a, args=(row_offset, counts, -1, "", 0), chunks=N)
    np.testing.assert_array_equal(a, expected_except())  # usable afterwards


@pytest.mark.parametrize("schedule", ["static", "dynamic"])
@pytest.mark.parametrize("how", ["crash", "timeout"])
def test_retries_recover_crashes_and_timeouts(eng, schedule, how):
    a, counts = fresh(eng)
    pids = set(eng.worker_pids)
    assert (
        eng.map(
            flaky,
            a,
            args=(row_offset, counts, 3 * SIZE, how, 1),
            chunks=N,
            schedule=schedule,
            retries=1,
            timeout=1,
        )
        is None
    )
    np.testing.assert_array_equal(a, expected_except())
    assert counts[3] == 2 and counts.sum() == N + 1
    assert len(pids - set(eng.worker_pids)) == 1  # one worker replaced

    a, counts = fresh(eng)
    report = eng.map(
        flaky,
        a,
        args=(row_offset, counts, 3 * SIZE, how, 1),
        chunks=N,
        schedule=schedule,
        retries=1,
        timeout=1,
        errors="collect",
    )
    assert report.ok and report.failed == []
    assert report.retried == [(3 * SIZE, 4 * SIZE)]


@pytest.mark.parametrize("schedule", ["static", "dynamic"])
def test_a_kernel_exception_is_not_retried(eng, schedule):
    a, counts = fresh(eng)
    with pytest.raises(ValueError, match="chunk at row 30") as info:
        eng.map(
            flaky,
            a,
            args=(row_offset, counts, 3 * SIZE, "exception", 1),
            chunks=N,
            schedule=schedule,
            retries=3,
        )
    assert counts[3] == 1
    assert "rows 30:40" in "".join(info.value.__notes__)
    assert isinstance(info.value.__cause__, shmarray.RemoteTraceback)


def test_retries_run_out(eng):
    a, counts = fresh(eng)
    with pytest.raises(shmarray.WorkerCrashedError, match="rows 30:40") as info:
        eng.map(
            flaky,
            a,
            args=(row_offset, counts, 3 * SIZE, "crash", 5),
            chunks=N,
            schedule="dynamic",
            retries=2,
        )
    assert info.value.rows == (30, 40)
    assert counts[3] == 3  # the first run and two retries
    report = eng.map(
        flaky,
        a,
        args=(row_offset, counts, 3 * SIZE, "crash", 99),
        chunks=N,
        retries=1,
        errors="collect",
    )
    assert [r for r, _ in report.failed] == [(30, 40)]


@pytest.mark.parametrize("schedule", ["static", "dynamic"])
def test_reduce_collects_the_value_of_the_chunks_that_succeeded(eng, schedule):
    a, counts = fresh(eng)
    report = eng.reduce(
        flaky,
        a,
        args=(row_offset, counts, 2 * SIZE, "crash", 1),
        chunks=N,
        schedule=schedule,
        errors="collect",
    )
    assert [r for r, _ in report.failed] == [(20, 30)]
    want = sum(
        float(np.arange(lo, lo + SIZE).sum()) for lo in range(0, N * SIZE, SIZE) if lo != 20
    )
    assert report.value == want
    a, counts = fresh(eng)
    value = eng.reduce(
        flaky,
        a,
        args=(row_offset, counts, 2 * SIZE, "crash", 1),
        chunks=N,
        schedule=schedule,
        retries=1,
    )
    assert value == float(np.arange(N * SIZE).sum())


def test_bad_arguments_are_refused_before_anything_runs(eng):
    a, counts = fresh(eng)
    # A value of the wrong type is a TypeError, one out of range a ValueError.
    for kw, exc in (
        ({"retries": -1}, ValueError),
        ({"retries": 1.5}, TypeError),
        ({"retries": True}, TypeError),
        ({"retries": None}, TypeError),
        ({"retries": False}, TypeError),
        ({"retries": 0.0}, TypeError),
        ({"errors": "ignore"}, ValueError),
        ({"errors": None}, ValueError),
    ):
        match = next(iter(kw))
        with pytest.raises(exc, match=match):
            eng.map(flaky, a, args=(row_offset, counts, -1, "", 0), **kw)
        with pytest.raises(exc, match=match):
            eng.imap(flaky, a, args=(row_offset, counts, -1, "", 0), **kw)
    with pytest.raises(ValueError, match="65536 chunks"):
        eng.map(
            flaky,
            eng.zeros(70000),
            args=(row_offset, counts, -1, "", 0),
            chunks=70000,
            errors="collect",
        )
    assert counts.sum() == 0
    eng.map(flaky, a, args=(row_offset, counts, -1, "", 0), chunks=N, retries=np.int64(1))
    assert counts.sum() == N


def whose(a, off, pids, crash_at):
    """Record which process ran each chunk; the chunk at ``crash_at``
    segfaults its first worker."""
    c = off // SIZE
    first = pids[c] == 0
    pids[c] = os.getpid()
    if off == crash_at and first:
        ctypes.string_at(0)
    a[:] = off


def test_a_crashed_worker_is_replaced_within_the_round(eng):
    """Static: the fresh worker takes the dead one's unfinished chunks at
    once, the other keeps its own (no round that waits for everything)."""
    a = eng.zeros(N * SIZE)
    pids = eng.zeros(N, np.int64)
    report = eng.map(
        whose, a, args=(row_offset, pids, 1 * SIZE), chunks=N, retries=1, errors="collect"
    )
    assert report.ok and report.retried == [(SIZE, 2 * SIZE)]
    owners = assign_static(N, eng.workers)  # chunk -> worker index
    dead, now = owners[1], eng.worker_pids
    for c in range(N):
        if owners[c] != dead:
            assert pids[c] == now[owners[c]]  # the others, untouched
        elif c >= 1:
            assert pids[c] == now[dead]  # the replacement, at once
        else:
            assert pids[c] not in now  # the one that died


def wait_for_gate(gate):
    """In a kernel: wait until the test lets it go (gate[0]); the 60 s only
    detect a hang."""
    deadline = time.monotonic() + 60
    while gate[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.001)


@contextlib.contextmanager
def released_at_stop(eng, gate):
    """Sets gate[0] once the call running is stopped: STOP set in the
    control block after the call's chunk 0 began (it sets gate[1]; STOP
    is cleared when a round begins).  Chunks that wait for gate[0] thus
    end only after STOP, so a worker that honours it starts no other
    chunk, whatever the machine's speed.  Yields a list that gets True if
    STOP was seen (and not the hang detector's 60 s)."""
    words = eng._dispatcher.pool.ctl.words
    stopped: list[bool] = []
    leaving = threading.Event()

    def relay():
        deadline = time.monotonic() + 60  # a hang detector
        while not leaving.is_set() and time.monotonic() < deadline:
            if gate[1] and control.load(words, control.STOP):
                stopped.append(True)
                break
            time.sleep(0.001)
        gate[0] = 1

    thread = threading.Thread(target=relay)
    thread.start()
    try:
        yield stopped
    finally:
        leaving.set()
        thread.join(60)


def test_raise_stops_the_rest_at_the_first_final_failure(eng):
    n = 20
    a, counts, gate = eng.zeros(n), eng.zeros(n, np.int64), eng.zeros(2, np.int64)
    with released_at_stop(eng, gate) as stopped:
        with pytest.raises(shmarray.WorkerCrashedError):
            for _ in eng.imap(
                slow_crash, a, args=(row_offset, counts, gate), chunks=n, schedule="dynamic"
            ):
                pass
    assert stopped
    # Every chunk but the crashed one waits for STOP: each worker ran one
    # chunk at most, and took no other after STOP.
    assert counts[0] == 1 and counts.sum() <= eng.workers, counts
    a, counts, gate = eng.zeros(n), eng.zeros(n, np.int64), eng.zeros(2, np.int64)
    with released_at_stop(eng, gate) as stopped:
        with pytest.raises(ValueError):
            eng.map(slow_fail, a, args=(row_offset, counts, gate), chunks=n, retries=1)
    assert stopped
    # Static: the failing chunk is the first worker's first; the last
    # worker's chunks stop too, at STOP, not at their end: it ran at most
    # the one it held when STOP came.
    last = n - n // eng.workers
    assert counts[last:].sum() <= 1, counts
    assert counts.sum() <= eng.workers, counts


def slow_crash(a, off, counts, gate):
    counts[off] += 1
    if off == 0:
        gate[1] = 1
        ctypes.string_at(0)
    wait_for_gate(gate)  # until the call is stopped
    return off


def slow_fail(a, off, counts, gate):
    counts[off] += 1
    if off == 0:
        gate[1] = 1
        raise ValueError("first chunk")
    wait_for_gate(gate)  # until the call is stopped


def test_an_idle_worker_killed_before_a_reduce_or_imap(tmp_path):
    # Found by a trial: the survivor's value, read before the dead worker
    # was noticed, was waited for again (forever).
    proc = run_python(
        textwrap.dedent("""
        import os, signal, shmarray

        def one(out):
            return 1

        with shmarray.Engine(workers=2) as eng:
            out = eng.zeros(100)
            for i in range(6):
                eng.map(one, out)
                os.kill(eng.worker_pids[i % 2], signal.SIGKILL)
                assert eng.reduce(one, out, timeout=5) == 2
                eng.map(one, out)
                os.kill(eng.worker_pids[i % 2], signal.SIGKILL)
                assert sorted(v for _, v in eng.imap(one, out, timeout=5)) == [1, 1]
        print("ok")
        """),
        file=str(tmp_path / "idle_kill.py"),
        timeout=60,
    )
    assert proc.stdout == "ok\n" and proc.stderr == ""


# -- imap ---------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["static", "dynamic"])
def test_imap_yields_every_chunk_exactly_once(eng, schedule):
    a, counts = fresh(eng)
    stream = eng.imap(flaky, a, args=(row_offset, counts, -1, "", 0), chunks=N, schedule=schedule)
    got = list(stream)
    assert sorted(rows for rows, _ in got) == [(lo, lo + SIZE) for lo in range(0, N * SIZE, SIZE)]
    for (lo, hi), value in got:
        assert value == float(np.arange(lo, hi).sum())
    assert stream.result == float(np.arange(N * SIZE).sum())
    assert counts.tolist() == [1] * N


def slow_row(a, off, counts, gate):
    counts[off] += 1
    if off == 0:
        gate[1] = 1  # the first value, at once
    else:
        wait_for_gate(gate)  # the others end only once the stream is stopped
    a[:] = off
    return off


@pytest.mark.parametrize("schedule", ["static", "dynamic"])
def test_abandoning_imap_stops_the_rest(eng, schedule):
    n = 40
    a, counts, gate = eng.zeros(n), eng.zeros(n, np.int64), eng.zeros(2, np.int64)
    with released_at_stop(eng, gate) as stopped:
        for _first in eng.imap(
            slow_row, a, args=(row_offset, counts, gate), chunks=n, schedule=schedule
        ):
            break  # dropped: the map stops
        # The next map waits its turn behind what was still running.
        eng.map(
            flaky, *fresh(eng)[:1], args=(row_offset, eng.zeros(N, np.int64), -1, "", 0), chunks=N
        )
    ran = int(counts.sum())
    # STOP was seen; or it came before any worker took a chunk but 0 (then
    # the next map's round cleared it, maybe before the relay looked).
    assert stopped or ran == 1, counts
    # Chunk 0, and at most one more a worker (held until the stop).
    assert 1 <= ran <= eng.workers + 1 and counts.max() == 1, counts
    gate = eng.zeros(2, np.int64)
    with released_at_stop(eng, gate) as stopped:
        with eng.imap(
            slow_row, a, args=(row_offset, counts, gate), chunks=n, schedule=schedule
        ) as stream:
            next(stream)
    assert stopped or int(counts.sum()) - ran == 1, counts  # as above
    assert int(counts.sum()) - ran <= eng.workers + 1  # close() waited, and stopped it
    settled = counts.copy()
    eng.map(flaky, *fresh(eng)[:1], args=(row_offset, eng.zeros(N, np.int64), -1, "", 0), chunks=N)
    np.testing.assert_array_equal(counts, settled)  # nothing ran after close


def test_imap_failures(eng):
    a, counts = fresh(eng)
    seen = []
    with pytest.raises(ValueError, match="chunk at row 30"):
        for rows, _ in eng.imap(
            flaky,
            a,
            args=(row_offset, counts, 30, "exception", 1),
            chunks=N,
            schedule="dynamic",
            errors="raise",
        ):
            seen.append(rows)
    assert (30, 40) not in seen
    a, counts = fresh(eng)
    stream = eng.imap(
        flaky, a, args=(row_offset, counts, 30, "crash", 1), chunks=N, errors="collect"
    )
    rows = sorted(r for r, _ in stream)
    assert (30, 40) not in rows and len(rows) == N - 1
    assert [r for r, _ in stream.result.failed] == [(30, 40)]


# -- stats and recycling by memory --------------------------------------------


def test_stats_count_each_process_from_its_start(eng):
    a, counts = fresh(eng)
    eng.map(flaky, a, args=(row_offset, counts, -1, "", 0), chunks=N)
    os.kill(eng.worker_pids[0], 9)
    eng.map(flaky, a, args=(row_offset, counts, -1, "", 0), chunks=2)
    fresh_one = eng.stats()[0]
    assert fresh_one.replaced == 1 and fresh_one.tasks == 1


def test_stats(eng):
    before = {s.worker: s for s in eng.stats()}
    a, counts = fresh(eng)
    eng.map(flaky, a, args=(row_offset, counts, -1, "", 0), chunks=N)
    after = eng.stats()
    assert [s.pid for s in after] == eng.worker_pids
    assert sum(s.tasks - before[s.worker].tasks for s in after) == N
    for s in after:
        assert s.rss > s.uss > 0 and s.kernels >= 1 and s.busy > 0
        assert s.replaced >= before[s.worker].replaced
    assert "tasks=" in repr(eng) and "replaced=" in repr(eng)


_hoard = []


def leak(a, megabytes):
    """Keep ``megabytes`` more of private memory in this worker, for good."""
    block = np.ones(megabytes * 2**17)  # touched: counted in USS
    _hoard.append(block)


def test_max_worker_memory_recycles_a_leaking_worker():
    with shmarray.Engine(workers=2, max_worker_memory=300 * 2**20) as eng:
        a = eng.zeros(2)
        pids = eng.worker_pids
        eng.map(leak, a, args=(16,))  # under the limit: kept
        assert eng.worker_pids == pids
        eng.map(leak, a, args=(400,))  # over: recycled after the map
        assert set(eng.worker_pids).isdisjoint(pids)
        stats = eng.stats()
        assert [s.replaced for s in stats] == [1, 1]
        assert all(s.uss < 300 * 2**20 for s in stats)


# -- output ---------------------------------------------------------------------


def test_prints_and_logging_reach_the_caller_tagged(tmp_path):
    proc = run_python(
        textwrap.dedent("""
        import logging, numpy as np
        from numba import njit
        import shmarray

        @njit
        def shout(a, off):
            print("numba says", off)
            a[:] = off

        def unfinished(a, off):
            print("no newline from", off, end="")

        def chatty(a, off):
            print("python says", off)
            logging.getLogger("chatty").warning("careful at %d", off)
            for i in range(500):
                print("line", off, i)

        if __name__ == "__main__":
            with shmarray.Engine(workers=2) as eng:
                a = eng.zeros(8)
                eng.map(shout, a, args=(shmarray.row_offset,))
                print("between")
                eng.map(chatty, a, args=(shmarray.row_offset,))
                eng.map(unfinished, a, args=(shmarray.row_offset,))
                print("end")
        """),
        file=str(tmp_path / "chatty.py"),
    )
    out = proc.stdout.splitlines()
    assert "[worker 0 rows 0:4] numba says 0" in out
    assert "[worker 1 rows 4:8] numba says 4" in out
    # A map's output shows before the map returns.
    assert out.index("between") > out.index("[worker 1 rows 4:8] numba says 4")
    assert "[worker 0 rows 0:4] python says 0" in out[out.index("between") :]
    assert sum(line.startswith("[worker 1 rows 4:8] line 4 ") for line in out) == 500
    assert out[-3:] == [
        "[worker 0 rows 0:4] no newline from 0",
        "[worker 1 rows 4:8] no newline from 4",
        "end",
    ] or out[-3:] == [
        "[worker 1 rows 4:8] no newline from 4",
        "[worker 0 rows 0:4] no newline from 0",
        "end",
    ]
    # A record logged in a worker is handled by the caller's logging, as a
    # record (tests/test_logging.py): with nothing configured here, Python's
    # last-resort handler prints its message, the worker's tag in front.
    assert "[worker 0 rows 0:4] careful at 0" in proc.stderr.splitlines()
    assert "[worker 1 rows 4:8] careful at 4" in proc.stderr.splitlines()


def test_a_print_right_before_a_segfault_is_not_lost(tmp_path):
    proc = run_python(
        textwrap.dedent("""
        import ctypes
        import shmarray

        def doomed(a, off):
            print("last words from", off)
            if off == 4:
                ctypes.string_at(0)

        if __name__ == "__main__":
            with shmarray.Engine(workers=2) as eng:
                report = eng.map(doomed, eng.zeros(8), args=(shmarray.row_offset,),
                                 errors="collect")
                print("failed:", [rows for rows, _ in report.failed])
        """),
        file=str(tmp_path / "doomed.py"),
    )
    out = proc.stdout.splitlines()
    assert "[worker 1 rows 4:8] last words from 4" in out
    assert out.index("[worker 1 rows 4:8] last words from 4") < out.index("failed: [(4, 8)]")


@njit(cache=True)
def blur(out, inp):
    for i in range(1, inp.shape[0] - 1):
        for j in range(1, inp.shape[1] - 1):
            out[i, j] = (inp[i - 1, j] + inp[i + 1, j] + inp[i, j - 1] + inp[i, j + 1]) / 4


@pytest.mark.parametrize("schedule", ["static", "dynamic"])
def test_a_tracked_map_with_a_boundary_matches_the_plain_one(eng, schedule):
    rng = np.random.default_rng(1)
    inp = eng.from_numpy(rng.random((34, 20)))
    plain, tracked = eng.zeros(inp.shape), eng.zeros(inp.shape)
    eng.map(blur, plain, inp, halo=1, boundary="wrap", chunks=4, schedule=schedule)
    report = eng.map(
        blur,
        tracked,
        inp,
        halo=1,
        boundary="wrap",
        chunks=4,
        schedule=schedule,
        errors="collect",
        retries=1,
    )
    assert report.ok
    np.testing.assert_array_equal(tracked, plain)


def test_shmarray_info_reports_a_fresh_engines_workers():
    proc = run_python(
        "import sys; from shmarray.cli import main; sys.exit(main(['info', '--json', '--engine']))"
    )
    import json

    fresh = json.loads(proc.stdout)["fresh_workers"]
    assert fresh["start_s"] > 0 and len(fresh["workers"]) >= 1
    for s in fresh["workers"]:
        assert s["rss"] > s["uss"] > 0 and s["tasks"] >= 1 and s["replaced"] == 0


def wait_to_be_seen(a, seen):
    """Print, then wait until the caller has seen the line (or give up)."""
    print("waiting to be seen", flush=True)
    end = time.monotonic() + 30
    while seen[0] == 0:
        if time.monotonic() > end:
            raise TimeoutError("the caller never saw the line")
        time.sleep(0.001)
    a[:] = 1


class Watcher:
    """A stand-in for sys.stdout that reacts to what workers print."""

    def __init__(self, seen):
        self.seen = seen
        self.text = ""

    def write(self, text):
        self.text += text
        if "waiting to be seen" in text:
            self.seen[0] = 1
        return len(text)

    def flush(self):
        pass


def test_output_is_forwarded_while_the_map_runs(eng):
    seen = eng.zeros(1, np.int64)
    a = eng.zeros(4)
    watcher = Watcher(seen)
    saved = sys.stdout
    sys.stdout = watcher
    try:
        eng.map(wait_to_be_seen, a, args=(seen,), chunks=1)
    finally:
        sys.stdout = saved
    assert a.tolist() == [1, 1, 1, 1]
    assert "rows 0:4] waiting to be seen\n" in watcher.text
