"""Properties: chunks tile the rows exactly, and parallel equals sequential
bit for bit over dtypes, shapes, memory orders, chunkings, halos and
strided views."""

from __future__ import annotations

import functools
import operator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from numba import njit

import shmarray
from conftest import WORKER_COUNTS, engine_id, storage_for
from shmarray.partition import assign_static, split_rows

DTYPES = [np.float32, np.float64, np.int32, np.int64, np.complex128, np.bool_]


@njit(cache=True)
def stencil(out, inp, h):
    for i in range(h, inp.shape[0] - h):
        out[i] = inp[i - h] * 2 + inp[i + h]


@njit(cache=True)
def interior_sum(inp, h):
    return np.sum(inp[h : inp.shape[0] - h])


@st.composite
def row_chunking(draw, max_rows=60):
    halo = draw(st.integers(0, 3))
    n = draw(st.integers(2 * halo, max_rows))
    rows = n - 2 * halo
    kind = draw(st.sampled_from(["none", "count", "sizes"]))
    if kind == "none":
        chunks = None
    elif kind == "count":
        chunks = draw(st.integers(1, 12))
    else:
        cuts = sorted(draw(st.sets(st.integers(1, max(rows - 1, 1)), max_size=8)))
        cuts = [c for c in cuts if c < rows]
        edges = [0, *cuts, rows]
        chunks = tuple(b - a for a, b in zip(edges, edges[1:]) if b > a)
    return n, halo, chunks


@given(row_chunking(max_rows=10_000), st.integers(1, 16))
def test_chunks_tile_the_interior_exactly(case, workers):
    n, halo, chunks = case
    parts = split_rows(n, chunks, halo, default=workers)
    assert parts[0][0] == halo and parts[-1][1] == n - halo
    for (lo, hi), (lo2, _) in zip(parts, parts[1:]):
        assert hi == lo2 and lo < hi
    if n > 2 * halo:
        assert all(lo < hi for lo, hi in parts)
        expected = chunks if isinstance(chunks, int) else (workers if chunks is None else None)
        if expected is not None:
            assert len(parts) == min(expected, n - 2 * halo)
    else:
        assert parts == ((halo, halo),)
    owners = assign_static(len(parts), workers)
    assert list(owners) == sorted(owners) and set(owners) <= set(range(workers))


@st.composite
def arrays_and_layout(draw):
    n, halo, chunks = draw(row_chunking())
    dtype = draw(st.sampled_from(DTYPES))
    tail = draw(st.sampled_from([(), (3,), (2, 4)]))
    order = draw(st.sampled_from(["C", "F"]))
    view = draw(st.sampled_from(["plain", "every_other_row", "reversed", "column_slice"]))
    seed = draw(st.integers(0, 2**32 - 1))
    return n, halo, chunks, dtype, tail, order, view, seed


def _make(eng, n, dtype, tail, order, view, rng):
    """A shared input array of n rows, possibly a strided view of a bigger
    block, and the same values as a private C-ordered copy."""
    rows = 2 * n if view == "every_other_row" else n
    extra = (1,) if view == "column_slice" and tail else ()
    shape = (rows, *tail[:-1], tail[-1] + 1) if extra else (rows, *tail)
    values = (rng.standard_normal(shape) * 50).astype(dtype)
    if dtype is np.complex128:
        values = values + 1j * (rng.standard_normal(shape) * 50)
    base = eng.from_numpy(np.asarray(values, order=order))
    if view == "every_other_row":
        shared = base[::2]
    elif view == "reversed":
        shared = base[::-1]
    elif extra:
        shared = base[..., :-1]
    else:
        shared = base
    return shared, np.ascontiguousarray(shared)


# Each property runs at every worker count, so with fewer examples each than
# it had at one count (120, 80, 60): more worker counts, fewer examples.
# derandomize: every worker count gets the same examples, whose kernels the
# workers of the later engines load from numba's cache (cache=True) instead
# of compiling each dtype and layout again; and a failure replays as it is.
@pytest.fixture(scope="module", params=WORKER_COUNTS, ids=engine_id)
def eng(request):
    with shmarray.Engine(workers=request.param, storage=storage_for(request.param)) as engine:
        yield engine


@settings(
    max_examples=35,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(arrays_and_layout())
def test_map_equals_sequential_bit_for_bit(eng, case):
    n, halo, chunks, dtype, tail, order, view, seed = case
    rng = np.random.default_rng(seed)
    shared_in, private_in = _make(eng, n, dtype, tail, order, view, rng)
    shared_out = eng.zeros((n, *tail), dtype, order=order)
    private_out = np.zeros((n, *tail), dtype)

    stencil(private_out, private_in, halo)
    eng.map(stencil, shared_out, shared_in, args=(halo,), halo=halo, chunks=chunks)

    assert np.array_equal(shared_out, private_out)
    assert np.array_equal(shared_in, private_in)  # inputs untouched


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(arrays_and_layout())
def test_reduce_equals_sequential_chunk_by_chunk(eng, case):
    n, halo, chunks, dtype, tail, order, view, seed = case
    rng = np.random.default_rng(seed)
    shared_in, private_in = _make(eng, n, dtype, tail, order, view, rng)

    got = eng.reduce(interior_sum, shared_in, args=(halo,), halo=halo, chunks=chunks)
    parts = [
        interior_sum(private_in[lo - halo : hi + halo], halo)
        for lo, hi in split_rows(n, chunks, halo, default=eng.workers)
    ]
    expected = functools.reduce(operator.add, parts)
    assert got == expected and type(got) is type(expected)


@njit(cache=True)
def smooth(out, inp, h):
    for i in range(h, inp.shape[0] - h):
        out[i] = (inp[i - h] + inp[i] + inp[i + h]) * 0.25


@settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    row_chunking(),
    st.integers(0, 7),
    st.sampled_from([np.float32, np.float64]),
    st.sampled_from([(), (3,)]),
    st.sampled_from(["C", "F"]),
    st.integers(0, 2**32 - 1),
)
def test_iterate_equals_the_loop_of_maps_bit_for_bit(eng, case, steps, dtype, tail, order, seed):
    n, halo, chunks = case
    values = np.random.default_rng(seed).standard_normal((n, *tail)).astype(dtype)
    a, b = np.array(values), np.array(values[::-1])
    for _ in range(steps):  # what the user's loop does
        smooth(b, a, halo)
        a, b = b, a
    out = eng.from_numpy(np.asarray(values[::-1], order=order))
    inp = eng.from_numpy(np.asarray(values, order=order))
    last = eng.iterate(smooth, out, inp, args=(halo,), steps=steps, halo=halo, chunks=chunks)
    assert last is (out if steps % 2 else inp)
    assert np.array_equal(last, a)
    assert np.array_equal(out if steps % 2 == 0 else inp, b)
