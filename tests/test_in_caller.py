"""``Engine.prepare(..., in_caller=True)``: the caller runs the last
worker's share itself, between the ring and the wait.  Results are
bit-identical to ``map``'s at any worker count; the trade (no timeout, no
isolation, Ctrl-C answered when the share ends) is what the docs say."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from numba import njit

import shmarray
from conftest import run_python
from processes import running

HERE = os.path.dirname(os.path.abspath(__file__))


@njit(cache=True)
def heat(out, inp, c):
    n, m = inp.shape
    for i in range(1, n - 1):
        for j in range(1, m - 1):
            out[i, j] = inp[i, j] + c * (
                inp[i - 1, j] + inp[i + 1, j] + inp[i, j - 1] + inp[i, j + 1] - 4.0 * inp[i, j]
            )


@njit(cache=True)
def where_am_i(out, first, worker, scale):
    for i in range(out.shape[0]):
        out[i, 0] = first + i
        out[i, 1] = worker
        out[i, 2] = scale * (first + i)


@njit(cache=True)
def fails_at(out, first, bad_row):
    for i in range(out.shape[0]):
        if first + i == bad_row:
            raise ValueError("bad row")
        out[i] = 1.0


@pytest.mark.parametrize("n, chunks", [(97, None), (256, None), (256, 7)])
def test_a_loop_is_bit_identical_to_maps(engines, n, chunks):
    eng = engines
    rng = np.random.default_rng(n)
    start = rng.random((n, n // 2 + 3))
    u, v = eng.from_numpy(start), eng.zeros(start.shape)
    a, b = eng.from_numpy(start), eng.zeros(start.shape)
    step = eng.prepare(heat, v, u, args=(0.2,), halo=1, chunks=chunks, in_caller=True)
    for _ in range(9):
        step()
        step.swap()
        eng.map(heat, b, a, args=(0.2,), halo=1, chunks=chunks)
        a, b = b, a
    # 9 steps: the last result is in v (the prepared map) and in a (maps).
    np.testing.assert_array_equal(np.asarray(v), np.asarray(a))
    np.testing.assert_array_equal(np.asarray(u), np.asarray(b))
    del u, v, a, b, step


def test_the_callers_share_gets_its_rows_and_its_workers_index(engines):
    eng = engines
    out, ref = eng.zeros((50, 3)), eng.zeros((50, 3))
    args = (shmarray.row_offset, shmarray.worker_id, 0.5)
    eng.prepare(where_am_i, out, args=args, in_caller=True)()
    eng.map(where_am_i, ref, args=args)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    # The caller ran the last worker's rows, as that worker (index).
    assert out[-1, 1] == eng.workers - 1 or eng.workers > 50
    del out, ref


def test_a_kernel_error_in_the_callers_share_keeps_its_type_and_names_its_rows():
    # Its own engine: the round settles as any early end does, so a worker
    # still running is killed and replaced (a process of this test's own).
    with shmarray.Engine(workers=2) as engine:
        _kernel_errors(engine)


def _kernel_errors(engine) -> None:
    x = engine.zeros(100)
    step = engine.prepare(fails_at, x, args=(shmarray.row_offset, 99), in_caller=True)
    with pytest.raises(ValueError, match="bad row") as info:
        step()
    assert any(
        "in the calling process (in_caller=True) on rows 50:100" in note
        for note in getattr(info.value, "__notes__", [])
    ), info.value
    # A worker's failure is reported as from a worker; the engine goes on.
    on_worker = engine.prepare(fails_at, x, args=(shmarray.row_offset, 0), in_caller=True)
    with pytest.raises(ValueError) as info:
        on_worker()
    assert any("raised by the kernel in worker" in n for n in info.value.__notes__)
    ok = engine.prepare(fails_at, x, args=(shmarray.row_offset, -1), in_caller=True)
    ok()
    assert (x == 1.0).all()
    del x, step, on_worker, ok


@pytest.mark.parametrize(
    "options, said",
    [
        ({"schedule": "dynamic"}, 'schedule="dynamic"'),
        ({"halo": 1, "boundary": "wrap"}, "boundary="),
        ({"retries": 1}, "retries="),
        ({"errors": "collect"}, "errors='collect'"),
        ({"progress": True}, "shows no progress bar"),
    ],
)
def test_what_cannot_run_in_the_caller_is_refused(engine, options, said):
    x = engine.zeros((16, 4))
    with pytest.raises(ValueError, match="in_caller") as info:
        engine.prepare(heat, x, engine.zeros((16, 4)), args=(0.1,), in_caller=True, **options)
    assert said in str(info.value)
    with pytest.raises(TypeError, match="in_caller must be True or False"):
        engine.prepare(heat, x, x, args=(0.1,), in_caller="yes")  # type: ignore[arg-type]
    del x


def test_the_timeout_still_covers_the_workers_share():
    # Worker 0 holds its chunk; the caller's share is done at once: the
    # timeout ends the round and replaces the held worker.
    code = textwrap.dedent("""
        import time
        import numpy as np
        import shmarray
        from numba import njit

        @njit
        def hold_first(flags, first):
            if first == 0:
                while flags[0] == 0.0:
                    pass

        with shmarray.Engine(workers=2) as eng:
            flags = eng.zeros(8)
            before = eng.worker_pids
            step = eng.prepare(hold_first, flags, args=(shmarray.row_offset,),
                               timeout=1.0, in_caller=True)
            try:
                step()
            except shmarray.TaskTimeoutError as exc:
                print("timeout", before[0] not in eng.worker_pids, flush=True)
            flags[0] = 1.0
            step()
            print("after ok", flush=True)
    """)
    proc = run_python(code, timeout=120)
    assert proc.stdout.split("\n")[:2] == ["timeout True", "after ok"], proc.stdout
    assert proc.stderr == "", proc.stderr


def test_ctrl_c_in_the_callers_share_is_answered_when_the_share_ends():
    # The caller's share sends SIGINT to its own process (caller_signals) and
    # then writes its rows:
    # Python answers the signal when the compiled kernel returns, so the rows
    # are written, the step raises KeyboardInterrupt, and the engine goes on.
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {HERE!r})
        import numpy as np
        import shmarray
        from caller_signals import interrupt_the_caller

        with shmarray.Engine(workers=2) as eng:
            out = eng.zeros(10)
            step = eng.prepare(interrupt_the_caller, out,
                               args=(shmarray.row_offset, os.getpid()), in_caller=True)
            try:
                step()
                print("no interrupt")
            except KeyboardInterrupt:
                print("interrupted after the share:", bool(np.all(out[5:] == 1.0)))
            out[:] = 0.0
            step = eng.prepare(interrupt_the_caller, out,
                               args=(shmarray.row_offset, -1), in_caller=True)
            for _ in range(3):
                step()
            print("after:", bool(np.all(out == 1.0)))
    """)
    proc = run_python(code, timeout=120)
    assert proc.stdout.splitlines() == [
        "interrupted after the share: True",
        "after: True",
    ], proc.stdout + proc.stderr
    assert proc.stderr == "", proc.stderr


@pytest.mark.breaks_things
def test_a_segfault_in_the_callers_share_ends_the_caller_and_leaves_nothing():
    # No isolation for the caller's share: the kernel's crash is the
    # caller's.  The watchdog still takes its workers and blocks.
    code = textwrap.dedent("""
        import ctypes, json, sys
        import numpy as np
        import shmarray

        def crash_in_caller(out, first):
            if first > 0:
                ctypes.string_at(0)  # SIGSEGV, here in the caller
            out[:] = 1.0

        eng = shmarray.Engine(workers=2)
        out = eng.zeros(10)
        pool = eng._dispatcher.pool
        print(json.dumps({"pids": eng.worker_pids + [pool.watchdog.child.pid],
                          "blocks": [b.name for b in eng.blocks] + [pool._control_name]}),
              flush=True)
        eng.prepare(crash_in_caller, out, args=(shmarray.row_offset,), in_caller=True)()
        print("survived", flush=True)
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGSEGV, (out, err)
    report = json.loads(out.splitlines()[0])
    assert "survived" not in out
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        alive = [p for p in report["pids"] if running(p)]
        left = [n for n in report["blocks"] if shmarray.blocks.exists(n)]
        if not (alive or left):
            break
        time.sleep(0.01)
    assert alive == [] and left == [], (alive, left)


def test_the_same_arrays_prepared_with_and_without_in_caller_are_two_jobs(engines):
    # Alternating, each gives map's rows, and the last worker runs only the
    # steps it is rung for (the plain prepared map's and map's).
    eng = engines
    x = eng.zeros((40, 3))
    args = (shmarray.row_offset, shmarray.worker_id, 1.0)
    mine = eng.prepare(where_am_i, x, args=args, in_caller=True)
    plain = eng.prepare(where_am_i, x, args=args)
    before = eng.stats()[-1].tasks
    results = []
    for call in (mine, plain, lambda x=x: eng.map(where_am_i, x, args=args)) * 3:
        x[:] = -1.0
        call()
        results.append(np.array(x))
    assert all(np.array_equal(r, results[0]) for r in results)
    assert eng.stats()[-1].tasks - before == 6 or eng.workers > 40
    del x, mine, plain
