"""The kernel model: where a chunk is (row_offset), which worker runs it
(worker_id), per-worker state (initializer), boundary conditions and any
split axis.  Properties compare with NumPy's pad and the sequential kernel,
bit for bit."""

from __future__ import annotations

import os
import signal

import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from numba import njit

import shmarray
from conftest import WORKER_COUNTS, engine_id, storage_for

MODES = ["wrap", "reflect", "symmetric", "edge", 2.5]


def box(out, inp, h):
    """A stencil for any number of dimensions, reaching h cells along every
    axis: written for the whole (padded) array, it runs on chunks too."""
    core = tuple(slice(h, s - h) for s in inp.shape)
    acc = inp[core] * 0.5
    for k in range(inp.ndim):
        for d in (-h, h):
            idx = tuple(
                slice(h + (d if j == k else 0), s - h + (d if j == k else 0))
                for j, s in enumerate(inp.shape)
            )
            acc = acc + inp[idx] * (k + 1.0)
    out[core] = acc


def padded(interior, h, mode):
    if isinstance(mode, str):
        return np.pad(interior, h, mode)
    return np.pad(interior, h, "constant", constant_values=mode)


@st.composite
def layouts(draw):
    ndim = draw(st.integers(1, 3))
    h = draw(st.integers(1, 2))
    mode = draw(st.sampled_from(MODES))
    need = h + 1 if mode == "reflect" else h
    interior = tuple(draw(st.integers(need, need + 5)) for _ in range(ndim))
    axis = draw(st.integers(0, ndim - 1))
    chunks = draw(st.one_of(st.none(), st.integers(1, 5)))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    order = draw(st.sampled_from(["C", "F"]))
    seed = draw(st.integers(0, 2**32 - 1))
    return interior, h, mode, axis, chunks, dtype, order, seed


@pytest.fixture(scope="module", params=WORKER_COUNTS, ids=engine_id)
def eng(request):
    with shmarray.Engine(workers=request.param, storage=storage_for(request.param)) as engine:
        yield engine


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(layouts())
def test_boundary_equals_numpy_pad_and_the_sequential_kernel(eng, case):
    interior, h, mode, axis, chunks, dtype, order, seed = case
    values = np.random.default_rng(seed).standard_normal(interior).astype(dtype)
    expected_in = padded(values, h, mode)
    expected_out = np.zeros_like(expected_in)
    box(expected_out, expected_in, h)

    shape = expected_in.shape
    inp = eng.zeros(shape, dtype, order=order)
    inp[tuple(slice(h, s - h) for s in shape)] = values  # ghosts left at 0
    out = eng.zeros(shape, dtype, order=order)
    eng.map(box, out, inp, args=(h,), halo=h, boundary=mode, axis=axis, chunks=chunks)
    assert np.array_equal(inp, expected_in)  # ghosts filled
    core = tuple(slice(h, s - h) for s in shape)
    assert np.array_equal(out[core], expected_out[core])
    del inp, out


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(layouts(), st.integers(1, 5))
def test_iterate_with_a_boundary_equals_pad_and_step_in_a_loop(eng, case, steps):
    interior, h, mode, axis, chunks, dtype, order, seed = case
    x = np.random.default_rng(seed).standard_normal(interior).astype(dtype)
    for _ in range(steps):
        p = padded(x, h, mode)
        o = np.zeros_like(p)
        box(o, p, h)
        x = o[tuple(slice(h, s - h) for s in p.shape)]
    shape = tuple(s + 2 * h for s in interior)
    a, b = eng.zeros(shape, dtype, order=order), eng.zeros(shape, dtype, order=order)
    core = tuple(slice(h, s - h) for s in shape)
    a[core] = np.random.default_rng(seed).standard_normal(interior).astype(dtype)
    last = eng.iterate(
        box, b, a, args=(h,), steps=steps, halo=h, boundary=mode, axis=axis, chunks=chunks
    )
    assert np.array_equal(last[core], x)
    del a, b, last


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.integers(1, 3).flatmap(
        lambda nd: st.tuples(
            st.lists(st.integers(1, 7), min_size=nd, max_size=nd),
            st.integers(0, nd - 1),
            st.integers(0, 2),
            st.one_of(st.none(), st.integers(1, 6)),
            st.sampled_from(["C", "F"]),
        )
    )
)
def test_any_axis_without_a_boundary(eng, case):
    shape, axis, h, chunks, order = case
    shape = list(shape)
    shape[axis] += 2 * h
    values = np.random.default_rng(sum(shape)).standard_normal(shape)
    inp = eng.from_numpy(np.asarray(values, order=order))
    out = eng.zeros(shape, order=order)
    expected = np.zeros(shape)

    def shifted(out, inp, h, axis):
        n = inp.shape[axis]
        lead = (slice(None),) * axis
        out[lead + (slice(h, n - h),)] = (
            inp[lead + (slice(0, n - 2 * h),)] + 2 * inp[lead + (slice(2 * h, n),)]
        )

    shifted(expected, values, h, axis)
    eng.map(shifted, out, inp, args=(h, axis), halo=h, axis=axis, chunks=chunks)
    assert np.array_equal(out, expected)
    del inp, out


# -- row_offset and worker_id ---------------------------------------------------


@njit(cache=True)
def where_am_i(out, offset, wid):
    for i in range(out.shape[0]):
        out[i, 0] = offset + i  # the global row index
        out[i, 1] = wid


@pytest.mark.parametrize("schedule", ["static", "dynamic"])
@pytest.mark.parametrize("halo", [0, 2])
def test_row_offset_and_worker_id(eng, schedule, halo):
    n = 40
    out = eng.zeros((n, 2), np.int64)
    eng.map(
        where_am_i,
        out,
        args=(shmarray.row_offset, shmarray.worker_id),
        halo=halo,
        chunks=7,
        schedule=schedule,
    )
    # every row knows its index (halo rows of a chunk are written too, with
    # the same value, by whichever chunk comes last)
    assert np.array_equal(out[:, 0], np.arange(n))
    assert set(out[halo : n - halo, 1]) <= set(range(eng.workers))
    if schedule == "static":  # the same rows to the same worker, in order
        assert list(out[halo : n - halo, 1]) == sorted(out[halo : n - halo, 1])
    sequential = np.zeros((n, 2), np.int64)
    where_am_i(sequential, 0, 0)
    assert np.array_equal(sequential[:, 0], out[:, 0])
    del out


def test_a_replacement_keeps_its_worker_id():
    with shmarray.Engine(workers=2) as eng:
        out = eng.zeros((8, 2), np.int64)
        eng.map(where_am_i, out, args=(shmarray.row_offset, shmarray.worker_id))
        before = out[:, 1].copy()
        victim = eng.worker_pids[1]
        os.kill(victim, signal.SIGKILL)
        psutil.Process(victim).wait(10)
        out[:] = -1
        eng.map(where_am_i, out, args=(shmarray.row_offset, shmarray.worker_id))
        assert np.array_equal(out[:, 1], before) and set(before) == {0, 1}
        assert victim not in eng.worker_pids
        del out


# -- per-worker state ------------------------------------------------------------

STATE = {}


def remember(wid, factor):
    STATE["wid"], STATE["factor"], STATE["pid"] = wid, factor, os.getpid()


def report_state(out):
    out[:, 0] = STATE["wid"]
    out[:, 1] = STATE["factor"]
    out[:, 2] = STATE["pid"]


def test_an_initializer_sets_state_every_chunk_sees():
    with shmarray.Engine(workers=2, initializer=remember, initargs=(shmarray.worker_id, 7)) as eng:
        out = eng.zeros((20, 3), np.int64)
        eng.map(report_state, out, chunks=10, schedule="dynamic")
        assert set(out[:, 1]) == {7}
        for pid, wid in zip(out[:, 2], out[:, 0]):  # each chunk saw its worker's
            assert eng.worker_pids[wid] == pid
        # a replacement runs the initializer too, with its own worker_id
        victim = eng.worker_pids[0]
        os.kill(victim, signal.SIGKILL)
        psutil.Process(victim).wait(10)
        eng.map(report_state, out, chunks=2)
        assert list(out[:, 0]) == [0] * 10 + [1] * 10
        assert set(out[:, 2]) == set(eng.worker_pids)
        del out


# -- errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, exc, text",
    [
        (
            lambda e, a, b: e.map(box, b, a, args=(1,), halo=1, boundary="reflect"),
            ValueError,
            "needs at least 2",
        ),
        (
            lambda e, a, b: e.map(box, b, a, args=(1,), halo=0, boundary="wrap"),
            ValueError,
            "needs halo >= 1",
        ),
        (
            lambda e, a, b: e.map(box, b, a, args=(1,), halo=1, boundary="periodic"),
            ValueError,
            "boundary must be None",
        ),
        (lambda e, a, b: e.map(box, b, a, args=(1,), axis=2), ValueError, "out of range"),
        (lambda e, a, b: e.map(box, b, a, args=(1,), axis=1.0), TypeError, "axis must be an int"),
        (
            lambda e, a, b: e.map(box, b, a, args=((shmarray.row_offset,),)),
            ValueError,
            "inside a container",
        ),
    ],
)
def test_kernel_model_errors_before_anything_is_sent(eng, call, exc, text):
    a, b = eng.zeros((3, 10)), eng.zeros((3, 10))
    sent = eng._dispatcher.pool.seq
    with pytest.raises(exc, match=text):
        call(eng, a, b)
    assert eng._dispatcher.pool.seq == sent
    del a, b


def test_row_offset_in_initargs_is_refused():
    with pytest.raises(ValueError, match="no meaning in initargs"):
        shmarray.Engine(workers=1, initializer=remember, initargs=(shmarray.row_offset, 1))
