"""Contract tests: every promise of SPEC.md's fixed surface."""

from __future__ import annotations

import functools
import gc
import operator
import os
import warnings
import weakref

import numba
import numpy as np
import psutil
import pytest
import threadpoolctl
from numba import njit

import shmarray
from conftest import WORKER_COUNTS, block_entries, engine_id, gone, shm_entries, storage_for
from shmarray.kernels.stencils import heat_step
from shmarray.partition import split_rows


@pytest.fixture(scope="module", params=WORKER_COUNTS, ids=engine_id)
def engine(request):
    """The contract holds at any worker count: 2, and more than the cores;
    and on every storage (conftest.STORAGES)."""
    with shmarray.Engine(workers=request.param, storage=storage_for(request.param)) as eng:
        yield eng


@njit(cache=True)
def scale(out, inp, s):
    for i in range(inp.shape[0]):
        out[i] = inp[i] * s


@njit(cache=True)
def first_row(out, rows):
    """Writes, into every row of its chunk, the global index of the chunk's
    first row: the chunk boundaries become visible."""
    for i in range(out.shape[0]):
        out[i] = rows[0]


@njit(cache=True)
def halo_probe(out, rows, h):
    """For each interior row: the global index of the first row the kernel
    was given (lo - h)."""
    for i in range(h, out.shape[0] - h):
        out[i] = rows[0]


@njit(cache=True)
def row_sum(x):
    total = 0.0
    for i in range(x.shape[0]):
        total += x[i]
    return total


@njit(cache=True)
def chunk_start(rows):
    return (rows[0],) if rows.shape[0] else (-1,)


@njit(cache=True)
def stencil3(out, inp):
    for i in range(1, inp.shape[0] - 1):
        out[i] = 0.25 * inp[i - 1] + 0.5 * inp[i] + 0.25 * inp[i + 1]


@njit(cache=True)
def fails_on_negative(x):
    for i in range(x.shape[0]):
        if x[i] < 0:
            raise ValueError("negative value in chunk")


@njit(cache=True)
def matvec_rows(out, a, v):
    for i in range(a.shape[0]):
        acc = 0.0
        for j in range(a.shape[1]):
            acc += a[i, j] * v[j]
        out[i] = acc


@njit(cache=True)
def numba_threads(x):
    return numba.get_num_threads()


def blas_threads(x):
    return max(info["num_threads"] for info in threadpoolctl.threadpool_info())


def worker_pid(x):
    return (os.getpid(),)


class CountedKernel:
    """A plain-Python kernel that counts, in each worker, how many times it
    was unpickled: it must be sent once per worker, not once per call."""

    loads = 0

    def __init__(self):
        self.tag = "counted"

    def __call__(self, x):
        return CountedKernel.loads

    def __setstate__(self, state):
        self.__dict__.update(state)
        CountedKernel.loads += 1


class Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("this exception refuses to be pickled")


def raise_unpicklable(x):
    raise Unpicklable("cannot travel")


# -- allocation ------------------------------------------------------------


def test_allocations_are_plain_ndarrays_in_shared_blocks(engine):
    before = len(engine.blocks)
    x = engine.from_numpy(np.arange(12.0).reshape(3, 4))
    y = engine.empty((3, 4), np.float32)
    z = engine.zeros(5, dtype=np.int64)
    assert type(x) is np.ndarray and type(y) is np.ndarray and type(z) is np.ndarray
    assert x.dtype == np.float64 and y.dtype == np.float32 and z.dtype == np.int64
    assert np.array_equal(x, np.arange(12.0).reshape(3, 4))
    assert not z.any()
    assert len(engine.blocks) == before + 3
    for blk in engine.blocks:
        assert not gone(blk.name)


def test_from_numpy_keeps_fortran_order(engine):
    a = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    x = engine.from_numpy(a)
    assert x.flags.f_contiguous and np.array_equal(x, a)
    assert engine.from_numpy(a[:, ::2]).flags.c_contiguous


def test_dropping_the_last_array_unlinks_its_block(engine):
    x = engine.zeros(1000)
    name = engine.blocks[-1].name
    view = x[10:20]
    del x
    gc.collect()
    assert not gone(name)  # the view keeps it alive
    del view
    gc.collect()
    assert gone(name)


# -- map -------------------------------------------------------------------


def test_map_runs_in_place(engine):
    x = engine.from_numpy(np.arange(10.0))
    y = engine.empty(x.shape)
    assert engine.map(scale, y, x, args=(2.5,)) is None
    assert np.array_equal(y, np.arange(10.0) * 2.5)


@pytest.mark.parametrize("chunks", [None, 1, 3, 7, (2, 5, 3)])
def test_map_passes_each_chunk_as_rows_lo_to_hi(engine, chunks):
    n = 10
    rows = engine.from_numpy(np.arange(n))
    out = engine.zeros(n, np.int64)
    engine.map(first_row, out, rows, chunks=chunks)
    expected = np.empty(n, np.int64)
    for lo, hi in split_rows(n, chunks, 0, default=engine.workers):
        expected[lo:hi] = lo
    assert np.array_equal(out, expected)


@pytest.mark.parametrize("halo", [1, 2])
def test_halo_passes_rows_lo_minus_h_to_hi_plus_h(engine, halo):
    n = 12
    rows = engine.from_numpy(np.arange(n))
    out = engine.from_numpy(np.full(n, -1))
    engine.map(halo_probe, out, rows, args=(halo,), halo=halo, chunks=3)
    expected = np.full(n, -1)
    for lo, hi in split_rows(n, 3, halo):
        expected[lo:hi] = lo - halo
    assert np.array_equal(out, expected)


@pytest.mark.parametrize("chunks", [None, 2, 5, 17])
def test_stencil_with_halo_is_bit_identical_to_whole_array(engine, chunks):
    rng = np.random.default_rng(1)
    u = rng.random((101, 37))
    seq_out = u.copy()
    heat_step(seq_out, u, 0.21)
    x = engine.from_numpy(u)
    y = engine.from_numpy(u)
    engine.map(heat_step, y, x, args=(0.21,), halo=1, chunks=chunks)
    assert np.array_equal(y, seq_out)

    v = rng.random(1000)
    seq1 = v.copy()
    stencil3(seq1, v)
    a, b = engine.from_numpy(v), engine.from_numpy(v)
    engine.map(stencil3, b, a, halo=1, chunks=chunks)
    assert np.array_equal(b, seq1)


def test_views_of_shared_arrays_are_recognised(engine):
    base = engine.from_numpy(np.arange(24.0).reshape(6, 4))
    for view in (base[1:5], base.T, base[::2], base[::-1], base[:, 1], base[1:5, ::-2]):
        out = engine.zeros(view.shape)
        engine.map(scale, out, view, args=(3.0,))
        assert np.array_equal(out, np.asarray(view) * 3.0)
    # and as outputs: the kernel writes through the view into the base
    engine.map(scale, base[::2], base[1::2], args=(1.0,))
    assert np.array_equal(base[::2], base[1::2])


def test_shared_arrays_in_args_arrive_whole(engine):
    rng = np.random.default_rng(2)
    a = engine.from_numpy(rng.random((50, 8)))
    v = engine.from_numpy(rng.random(8))
    out = engine.zeros(50)
    engine.map(matvec_rows, out, a, args=(v,), chunks=4)
    expected = np.empty(50)
    matvec_rows(expected, np.asarray(a), np.asarray(v))
    assert np.array_equal(out, expected)


# -- reduce ----------------------------------------------------------------


def test_reduce_combines_in_chunk_order(engine):
    rows = engine.from_numpy(np.arange(20))
    starts = engine.reduce(chunk_start, rows, chunks=5)
    assert starts == (0, 4, 8, 12, 16)


@pytest.mark.parametrize("chunks", [1, 2, 3, 8])
def test_reduce_is_deterministic_for_given_chunks(engine, chunks):
    data = np.random.default_rng(3).standard_normal(100_003) * 1e6
    x = engine.from_numpy(data)
    results = {engine.reduce(row_sum, x, chunks=chunks) for _ in range(5)}
    assert len(results) == 1
    parts = [row_sum(data[lo:hi]) for lo, hi in split_rows(len(data), chunks)]
    assert results.pop() == functools.reduce(operator.add, parts)


def test_reduce_with_custom_combine_and_empty_rows(engine):
    x = engine.from_numpy(np.arange(10.0))
    assert engine.reduce(row_sum, x, combine=max, chunks=5) == row_sum(np.arange(8.0, 10.0))
    assert engine.reduce(row_sum, engine.zeros(0)) == 0.0


# -- kernels of every kind -------------------------------------------------


def test_plain_python_callables_work(engine):
    x = engine.from_numpy(np.arange(6.0))
    assert engine.reduce(lambda a: float(a.sum()), x) == 15.0
    engine.map(functools.partial(np.multiply, 2.0, out=None), x)  # no-op value
    closure_factor = 3.0

    def triple(a):
        a *= closure_factor

    engine.map(triple, x)
    assert np.array_equal(x, np.arange(6.0) * 3.0)


def test_kernel_is_sent_once_per_worker(engine):
    kernel = CountedKernel()
    x = engine.zeros(engine.workers * 4)
    for _ in range(20):
        engine.map(lambda *_: None, x)  # unrelated traffic
        counts = engine.reduce(kernel, x, combine=lambda a, b: a + b, chunks=engine.workers)
    assert counts == engine.workers  # each worker unpickled it exactly once


def test_dynamic_schedule_spreads_chunks_and_keeps_order(engine):
    rows = engine.from_numpy(np.arange(64))
    starts = engine.reduce(chunk_start, rows, chunks=16, schedule="dynamic")
    assert starts == tuple(range(0, 64, 4))
    pids = engine.reduce(worker_pid, rows, chunks=16, schedule="dynamic")
    assert len(pids) == 16 and set(pids) <= set(engine.worker_pids)


def test_same_rows_go_to_the_same_worker(engine):
    x = engine.zeros(64)
    first = engine.reduce(worker_pid, x, chunks=8)
    for _ in range(10):
        assert engine.reduce(worker_pid, x, chunks=8) == first
    assert len(set(first)) == engine.workers


def test_workers_run_numba_and_blas_single_threaded(engine):
    x = engine.zeros(engine.workers)
    assert engine.reduce(numba_threads, x, combine=max) == 1
    assert engine.reduce(blas_threads, x, combine=max) == 1


# -- errors ----------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["static", "dynamic"])
def test_kernel_exception_keeps_type_and_worker_traceback(engine, schedule):
    x = engine.from_numpy(np.array([1.0, 2.0, -3.0, 4.0]))
    with pytest.raises(ValueError, match="negative value in chunk") as info:
        engine.map(fails_on_negative, x, chunks=4, schedule=schedule)
    cause = info.value.__cause__
    assert isinstance(cause, shmarray.RemoteTraceback)
    # The worker's traceback: the kernel's frame, and the error it raised.
    assert "in fails_on_negative" in str(cause)
    assert str(cause).rstrip().endswith("ValueError: negative value in chunk")
    assert any("rows 2:3" in note for note in info.value.__notes__)
    # the engine is still usable
    engine.map(scale, x, x, args=(2.0,))
    assert np.array_equal(x, [2.0, 4.0, -6.0, 8.0])


def test_python_exception_traceback_names_the_line(engine):
    def divide(a):
        return 1 / 0

    with pytest.raises(ZeroDivisionError) as info:
        engine.reduce(divide, engine.zeros(3))
    assert "return 1 / 0" in str(info.value.__cause__)


def test_unpicklable_exception_becomes_kernel_error(engine):
    with pytest.raises(shmarray.KernelError, match="Unpicklable: cannot travel"):
        engine.map(raise_unpicklable, engine.zeros(3))
    engine.map(scale, engine.zeros(3), engine.zeros(3), args=(1.0,))


@pytest.fixture
def sent(engine):
    """The number of Run messages the engine sends during the test."""
    pool = engine._dispatcher.pool
    start = pool.seq
    return lambda: pool.seq - start


BAD_MAPS = [
    (
        "mismatched lengths",
        ValueError,
        "same length along axis 0",
        lambda e, x: e.map(scale, x, e.zeros(5), args=(1.0,)),
    ),
    (
        "private array",
        ValueError,
        r"eng\.from_numpy",
        lambda e, x: e.map(scale, x, np.zeros(10), args=(1.0,)),
    ),
    (
        "list instead of array",
        TypeError,
        "NumPy arrays made by this engine",
        lambda e, x: e.map(scale, x, [0.0] * 10, args=(1.0,)),
    ),
    (
        "0-d array",
        ValueError,
        "has 0 dimension",
        lambda e, x: e.map(scale, x[0:1].reshape(()), x, args=(1.0,)),
    ),
    ("no arrays", TypeError, "at least one array", lambda e, x: e.map(scale)),
    (
        "kernel not callable",
        TypeError,
        "kernel must be callable",
        lambda e, x: e.map("scale", x, x),
    ),
    ("args not a tuple", TypeError, r"args=\(2\.5,\)", lambda e, x: e.map(scale, x, x, args=2.5)),
    (
        "chunks zero",
        ValueError,
        "chunks must be at least 1",
        lambda e, x: e.map(scale, x, x, args=(1.0,), chunks=0),
    ),
    (
        "chunks float",
        TypeError,
        "chunks must be None, an int",
        lambda e, x: e.map(scale, x, x, args=(1.0,), chunks=2.5),
    ),
    (
        "chunk sizes wrong sum",
        ValueError,
        "adds up to 9 rows",
        lambda e, x: e.map(scale, x, x, args=(1.0,), chunks=(4, 5)),
    ),
    (
        "chunk size zero",
        ValueError,
        "positive ints",
        lambda e, x: e.map(scale, x, x, args=(1.0,), chunks=(10, 0)),
    ),
    (
        "negative halo",
        ValueError,
        "non-negative int",
        lambda e, x: e.map(scale, x, x, args=(1.0,), halo=-1),
    ),
    (
        "halo too large",
        ValueError,
        "at least 12 rows",
        lambda e, x: e.map(scale, x, x, args=(1.0,), halo=6),
    ),
    (
        "float halo",
        TypeError,
        "halo must be",
        lambda e, x: e.map(scale, x, x, args=(1.0,), halo=1.0),
    ),
    (
        "bad combine",
        TypeError,
        "combine must be a callable",
        lambda e, x: e.reduce(row_sum, x, combine="add"),
    ),
    (
        "bad schedule",
        ValueError,
        "schedule must be 'static'",
        lambda e, x: e.map(scale, x, x, args=(1.0,), schedule="guided"),
    ),
    (
        "bad timeout",
        ValueError,
        "timeout must be positive",
        lambda e, x: e.map(scale, x, x, args=(1.0,), timeout=0),
    ),
]


@pytest.mark.parametrize("case", BAD_MAPS, ids=[c[0] for c in BAD_MAPS])
def test_bad_map_arguments_fail_before_anything_is_sent(engine, sent, case):
    _, exc_type, pattern, call = case
    x = engine.from_numpy(np.arange(10.0))
    with pytest.raises(exc_type, match=pattern):
        call(engine, x)
    assert sent() == 0
    assert np.array_equal(x, np.arange(10.0))


BAD_ALLOCATIONS = [
    ("negative shape", ValueError, "negative sizes", lambda e: e.empty((2, -1))),
    ("float shape", TypeError, "shape must be", lambda e: e.zeros(2.5)),
    ("object dtype", TypeError, "Object arrays", lambda e: e.empty(3, dtype=object)),
    (
        "object array",
        TypeError,
        "Object arrays",
        lambda e: e.from_numpy(np.array([1, "a"], dtype=object)),
    ),
    (
        "structured dtype",
        TypeError,
        "structured dtype",
        lambda e: e.zeros(3, dtype=[("a", "f8"), ("b", "i4")]),
    ),
    ("not a dtype", TypeError, "not a NumPy dtype", lambda e: e.empty(3, dtype="nope")),
    ("bad order", ValueError, "order must be", lambda e: e.empty(3, order="K")),
]


@pytest.mark.parametrize("case", BAD_ALLOCATIONS, ids=[c[0] for c in BAD_ALLOCATIONS])
def test_bad_allocations_are_refused(engine, case):
    _, exc_type, pattern, call = case
    before, live = block_entries(), len(engine.blocks)
    with pytest.raises(exc_type, match=pattern):
        call(engine)
    assert block_entries() == before and len(engine.blocks) == live


@pytest.mark.parametrize(
    "workers, exc_type", [(0, ValueError), (-2, ValueError), (1.5, TypeError), ("2", TypeError)]
)
def test_bad_worker_counts(workers, exc_type):
    with pytest.raises(exc_type, match="workers"):
        shmarray.Engine(workers=workers)


def test_bad_start_method():
    with pytest.raises(ValueError, match="start_method must be one of"):
        shmarray.Engine(workers=1, start_method="teleport")


def test_an_array_of_another_engine_is_refused(engine):
    with shmarray.Engine(workers=1) as other:
        theirs = other.zeros(4)
        with pytest.raises(ValueError, match="another Engine's shared memory"):
            engine.map(scale, engine.zeros(4), theirs, args=(1.0,))
        with pytest.raises(ValueError, match=r"args\[0\] lives in another Engine"):
            engine.map(matvec_rows, engine.zeros(4), engine.zeros((4, 4)), args=(theirs,))
        del theirs


def test_a_large_private_array_in_args_warns_once():
    with shmarray.Engine(workers=1) as eng:
        out, a = eng.zeros(4), eng.zeros((4, 300_000))
        v = np.ones(300_000)  # 2.4 MB, private
        with pytest.warns(shmarray.CopyWarning, match=r"args\[0\] is a private array"):
            eng.map(matvec_rows, out, a, args=(v,))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            eng.map(matvec_rows, out, a, args=(np.ones(300_000),))  # once only
        del out, a


# -- lifecycle -------------------------------------------------------------


def test_close_is_idempotent_and_cleans_up():
    eng = shmarray.Engine(workers=2)
    x = eng.from_numpy(np.arange(100.0))
    names = [b.name.lstrip("/") for b in eng.blocks]
    pids = eng.worker_pids
    eng.close()
    eng.close()
    assert eng.closed and "closed" in repr(eng)
    assert not set(names) & shm_entries()
    assert not any(
        psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids
    )
    for call in (
        lambda: eng.map(scale, x, x, args=(1.0,)),
        lambda: eng.reduce(row_sum, x),
        lambda: eng.empty(3),
    ):
        with pytest.raises(shmarray.EngineClosedError, match="closed"):
            call()
    with pytest.raises(ValueError):  # EngineClosedError is a ValueError
        eng.zeros(3)


def test_arrays_stay_readable_after_close():
    with shmarray.Engine(workers=2) as eng:
        x = eng.from_numpy(np.arange(1_000_000.0))
        y = eng.empty(x.shape)
        eng.map(scale, y, x, args=(2.0,))
        view = y[::1000]
        names = {b.name.lstrip("/") for b in eng.blocks}
    assert names and not names & shm_entries()
    assert y.sum() == 2.0 * x.sum()
    assert view[3] == 6000.0
    y[0] = 42.0  # still writable memory: it is ours now
    assert view[0] == 42.0


def test_exception_in_with_block_still_cleans_up():
    with pytest.raises(RuntimeError, match="user code failed"):
        with shmarray.Engine(workers=1) as eng:
            eng.zeros(1000)
            pids = eng.worker_pids
            raise RuntimeError("user code failed")
    assert eng.closed
    assert not any(
        psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids
    )


def test_garbage_collection_closes_an_abandoned_engine():
    eng = shmarray.Engine(workers=1)
    eng.zeros(10)
    ref = weakref.ref(eng)
    del eng
    gc.collect()
    assert ref() is None  # the safety nets hold no strong reference
    # the leak fixture checks that the block and the worker are gone


# Under pytest-xdist the test process has threads of its own (execnet's),
# and Python 3.12+ warns about fork() in a threaded process: the harness's
# doing, not the engine's.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.parametrize("method", ["forkserver", "spawn", "fork"])
def test_every_start_method_works(method):
    with shmarray.Engine(workers=2, start_method=method) as eng:
        assert eng.start_method == method
        x = eng.from_numpy(np.arange(8.0))
        eng.map(scale, x, x, args=(2.0,))
        assert np.array_equal(x, np.arange(8.0) * 2.0)
        del x


def test_workers_are_recycled_without_losing_tasks():
    with shmarray.Engine(workers=2, max_tasks_per_worker=3) as eng:
        rows = eng.from_numpy(np.arange(40))
        seen = []
        for _ in range(7):
            starts = eng.reduce(chunk_start, rows, chunks=8)
            assert starts == tuple(range(0, 40, 5))  # every chunk ran
            seen.append(tuple(eng.worker_pids))
        # static: one task per worker per map, so workers are replaced as
        # maps 3 and 6 return
        assert seen[0] == seen[1] != seen[2]
        assert seen[2] == seen[3] == seen[4] != seen[5] == seen[6]
        del rows
    with pytest.raises(ValueError, match="max_tasks_per_worker"):
        shmarray.Engine(workers=1, max_tasks_per_worker=0)


def test_map_timeout_replaces_the_stuck_worker():
    @njit
    def spin_forever(x):
        i = 0
        while x[0] >= 0.0:  # never false: x is zeros
            i += 1
        return i

    with shmarray.Engine(workers=2) as eng:
        x = eng.zeros(4)
        before = eng.worker_pids
        with pytest.raises(TimeoutError, match="timeout=0.5") as info:
            eng.map(spin_forever, x, timeout=0.5)
        assert isinstance(info.value, shmarray.TaskTimeoutError)
        after = eng.worker_pids
        assert after != before
        eng.map(scale, x, x, args=(1.0,))
        del x


@pytest.mark.breaks_things
@pytest.mark.parametrize("schedule", ["static", "dynamic"])
def test_worker_exit_raises_worker_crashed_and_engine_recovers(schedule):
    def die(x):
        if x.shape[0] and x[0] >= 4:
            os._exit(7)

    with shmarray.Engine(workers=2) as eng:
        x = eng.from_numpy(np.arange(8.0))
        with pytest.raises(shmarray.WorkerCrashedError, match="exited with code 7") as info:
            eng.map(die, x, chunks=2, schedule=schedule)
        assert info.value.rows == (4, 8) and info.value.exitcode == 7
        eng.map(scale, x, x, args=(2.0,))
        assert np.array_equal(x, np.arange(8.0) * 2.0)
        del x


# -- iterate ---------------------------------------------------------------


@njit(cache=True)
def fails_at_step(out, inp, flag_row):
    """Counts steps in out; raises once the count in its rows reaches 3."""
    for i in range(1, inp.shape[0] - 1):
        out[i] = inp[i] + 1.0
        if out[i] >= 3.0 and flag_row[0] == 1.0:
            raise ValueError("step three went wrong")


def test_iterate_returns_the_last_output_and_matches_the_loop(engine):
    u = np.random.default_rng(5).random((64, 16))
    a, b = engine.from_numpy(u), engine.from_numpy(u)
    last = engine.iterate(heat_step, b, a, steps=5, args=(0.2,), halo=1, chunks=3)
    x, y = u.copy(), u.copy()
    for _ in range(5):
        heat_step(y, x, 0.2)
        x, y = y, x
    assert last is b and np.array_equal(last, x)
    assert engine.iterate(heat_step, b, a, steps=0, args=(0.2,), halo=1) is a
    del a, b, last


def test_a_failing_step_raises_and_stops_every_worker(engine):
    a, b = engine.zeros(40), engine.zeros(40)
    flag = engine.from_numpy(np.array([1.0]))
    with pytest.raises(ValueError, match="step three went wrong"):
        engine.iterate(fails_at_step, b, a, steps=50, args=(flag,), halo=1)
    flag[0] = 0.0
    last = engine.iterate(fails_at_step, b, a, steps=2, args=(flag,), halo=1)
    assert np.all(last[1:-1] >= 2.0)  # usable afterwards
    del a, b, flag, last


@pytest.mark.parametrize(
    "call, exc, text",
    [
        (
            lambda e, a, b: e.iterate(heat_step, b, a, steps=-1, args=(0.2,), halo=1),
            ValueError,
            "steps must be a non-negative",
        ),
        (
            lambda e, a, b: e.iterate(heat_step, b, a, steps=2.0, args=(0.2,), halo=1),
            TypeError,
            "steps must be an int",
        ),
        (
            lambda e, a, b: e.iterate(heat_step, b[:, :3], a, steps=2, args=(0.2,), halo=1),
            ValueError,
            "same shape and dtype",
        ),
        (
            lambda e, a, b: e.iterate(heat_step, a, a, steps=2, args=(0.2,), halo=1),
            ValueError,
            "separate arrays",
        ),
    ],
)
def test_bad_iterate_arguments_fail_before_anything_is_sent(engine, sent, call, exc, text):
    a, b = engine.zeros((10, 4)), engine.zeros((10, 4))
    with pytest.raises(exc, match=text):
        call(engine, a, b)
    assert sent() == 0
    del a, b
