"""shmarray.dask: the same kernels on a Dask cluster (a LocalCluster with
worker processes on loopback), bit-identical to the local engine."""

from __future__ import annotations

import functools
import operator
import os
import signal
import time

import dask
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings

import shmarray
import shmarray.dask as sd
from shmarray.kernels.elementwise import triad
from shmarray.kernels.irregular import mandelbrot
from shmarray.kernels.montecarlo import pi_hits
from shmarray.kernels.reductions import (
    combine_min,
    combine_moments,
    histogram,
    min_index,
    moments,
    total,
)
from shmarray.kernels.stencils import heat_step, jacobi
from shmarray.kernels.table import mandelbrot_args
from shmarray.partition import split_rows
from test_kernel_model import box, layouts, padded

distributed = pytest.importorskip("distributed")


def local_cluster():
    """Two worker processes on loopback, as on a small cluster."""
    return distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=":0",
        silence_logs=50,
    )


@pytest.fixture(scope="module")
def client():
    with local_cluster() as cluster, distributed.Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def eng():
    with shmarray.Engine(workers=2) as engine:
        yield engine


CASES = {  # halo -> (kernel, args, arrays of 101 rows)
    0: (triad, (3.0,), lambda rng: (np.zeros(101), rng.random(101), rng.random(101))),
    1: (heat_step, (0.2,), lambda rng: 2 * (rng.random((101, 23)),)),
}


@pytest.mark.parametrize("chunks", [None, 1, 3, "sizes"])
@pytest.mark.parametrize("halo", [0, 1])
def test_map_matches_the_local_engine_bit_for_bit(client, eng, chunks, halo):
    kernel, args, make = CASES[halo]
    arrays = make(np.random.default_rng(0))
    if chunks == "sizes":
        chunks = (10, 40, 51 - 2 * halo)  # the interior rows, split
    local = [eng.from_numpy(a) for a in arrays]
    eng.map(kernel, *local, args=args, halo=halo, chunks=chunks)
    remote = sd.map(kernel, *arrays, args=args, halo=halo, chunks=chunks).compute()
    assert np.array_equal(remote, local[0])
    del local


def test_map_takes_dask_arrays_and_iterates(client, eng):
    import dask.array as da

    u = np.random.default_rng(1).random((64, 64))
    a, b = eng.from_numpy(u), eng.from_numpy(u)
    cur = da.from_array(u, chunks=(16, 64))
    for _ in range(5):
        eng.map(jacobi, b, a, halo=1, chunks=(15, 16, 16, 15))
        a, b = b, a
        cur = sd.map(jacobi, cur, cur, halo=1).persist()
    assert cur.chunks[0] == (16, 16, 16, 16)
    assert np.array_equal(cur.compute(), a)
    del a, b


def interior_chunks(n: int, count: int, halo: int) -> list[tuple[int, int]]:
    """The chunks that ``chunks=count`` gives, as documented: the interior
    rows ``[halo, n - halo)`` in ``count`` parts whose sizes differ by at
    most one, the longer ones first.  Written with NumPy's ``array_split``
    (which splits so), not with ``shmarray.partition``, whose
    ``split_rows`` both the engine and ``shmarray.dask`` use."""
    parts = np.array_split(np.arange(halo, n - halo), count)
    return [(int(p[0]), int(p[-1]) + 1) for p in parts if p.size]


def sequential_reduce(kernel, x, count: int, halo: int = 0, args=(), combine=operator.add):
    """The kernel run sequentially on each chunk (rows ``lo - halo`` to
    ``hi + halo``, as the contract says), combined from the left in chunk
    order."""
    parts = [
        kernel(x[lo - halo : hi + halo], *args) for lo, hi in interior_chunks(len(x), count, halo)
    ]
    return functools.reduce(combine, parts)


@pytest.mark.parametrize("halo", [0, 2])
@pytest.mark.parametrize("chunks", [1, 4, 7])
def test_reduce_matches_a_sequential_reference_bit_for_bit(client, eng, halo, chunks):
    # Both sides equal a reference computed without shmarray's chunking: a
    # wrong split changes the rounding of the sums (and, with a halo, which
    # rows are counted twice).
    x = np.random.default_rng(2).standard_normal(10_001) * 100
    X = eng.from_numpy(x)
    expected = sequential_reduce(total, x, chunks, halo)
    assert sd.reduce(total, x, halo=halo, chunks=chunks) == expected
    assert eng.reduce(total, X, halo=halo, chunks=chunks) == expected
    expected = sequential_reduce(moments, x, chunks, combine=combine_moments)
    assert sd.reduce(moments, x, combine=combine_moments, chunks=chunks) == expected
    assert eng.reduce(moments, X, combine=combine_moments, chunks=chunks) == expected
    args = (-300.0, 300.0, 32)
    expected = sequential_reduce(histogram, x, chunks, args=args)
    assert np.array_equal(sd.reduce(histogram, x, args=args, chunks=chunks), expected)
    assert np.array_equal(eng.reduce(histogram, X, args=args, chunks=chunks), expected)
    # The chunks themselves: each one's first row (row_offset) and length.
    spans = lambda a, row: ((row, len(a)),)
    want = tuple((lo, hi - lo) for lo, hi in interior_chunks(len(x), chunks, 0))
    assert sd.reduce(spans, x, args=(shmarray.row_offset,), chunks=chunks) == want
    assert eng.reduce(spans, X, args=(shmarray.row_offset,), chunks=chunks) == want
    del X


def test_reduce_combines_in_chunk_order(client):
    rows = np.arange(20)
    assert sd.reduce(lambda r: (int(r[0]),), rows, chunks=5) == (0, 4, 8, 12, 16)
    assert sd.reduce(lambda r: (int(r[0]),), rows, chunks=5, combine=lambda a, b: b + a) == (
        16,
        12,
        8,
        4,
        0,
    )


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(layouts())
def test_boundary_and_axis_match_the_engine_and_numpy_pad(eng, case):
    # Dask's own overlap fills "wrap", "symmetric", "edge" and constants;
    # dask.array.pad fills numpy's "reflect": both must give pad's bits.
    interior, h, mode, axis, chunks, dtype, order, seed = case
    shape = tuple(s + 2 * h for s in interior)
    parts = split_rows(shape[axis], chunks, h, default=2)
    assume(len(parts) == 1 or min(hi - lo for lo, hi in parts) >= h)
    values = np.random.default_rng(seed).standard_normal(interior).astype(dtype)
    core = tuple(slice(h, s - h) for s in shape)
    inp = np.full(shape, np.nan, dtype, order=order)  # garbage ghosts
    inp[core] = values
    out = np.zeros(shape, dtype, order=order)
    local_in, local_out = eng.from_numpy(inp), eng.from_numpy(out)
    eng.map(box, local_out, local_in, args=(h,), halo=h, boundary=mode, axis=axis, chunks=chunks)
    with dask.config.set(scheduler="sync"):
        remote = sd.map(
            box, out, inp, args=(h,), halo=h, boundary=mode, axis=axis, chunks=chunks
        ).compute()
        filled = sd.map(
            lambda a: None, inp, halo=h, boundary=mode, axis=axis, chunks=chunks
        ).compute()
    assert np.array_equal(remote, local_out)
    assert np.array_equal(filled, padded(values, h, mode))
    assert np.array_equal(filled, local_in)
    del local_in, local_out


def test_row_offset_kernels_match_on_a_cluster(client, eng):
    args = (shmarray.row_offset, *mandelbrot_args(90, 64, 100))
    local = eng.zeros((90, 64), np.int32)
    eng.map(mandelbrot, local, args=args, chunks=7, schedule="dynamic")
    remote = sd.map(mandelbrot, np.zeros((90, 64), np.int32), args=args, chunks=5)
    assert np.array_equal(remote.compute(), local)
    expected = np.zeros((90, 64), np.int32)
    mandelbrot(expected, 0, *args[1:])
    assert np.array_equal(local, expected)

    counts = eng.zeros(300, np.int64)
    hits = eng.reduce(pi_hits, counts, args=(shmarray.row_offset, 50, 3), chunks=4)
    assert (
        sd.reduce(pi_hits, np.zeros(300, np.int64), args=(shmarray.row_offset, 50, 3), chunks=7)
        == hits
        == pi_hits(np.zeros(300, np.int64), 0, 50, 3)
    )
    x = np.round(np.random.default_rng(5).standard_normal(1000), 1)
    assert sd.reduce(min_index, x, args=(shmarray.row_offset,), combine=combine_min, chunks=6) == (
        x.min(),
        int(np.argmin(x)),
    )
    del local, counts


def test_any_axis_on_a_cluster(client, eng):
    # An RGB stack split along its last axis, as a Fortran-ordered array wants.
    rgb = np.asfortranarray(np.random.default_rng(4).random((3, 40, 50)))
    local_in, local_out = eng.from_numpy(rgb), eng.zeros(rgb.shape, order="F")
    eng.map(box, local_out, local_in, args=(1,), halo=1, boundary="wrap", axis=-1)
    remote = sd.map(
        box, np.zeros_like(rgb), rgb, args=(1,), halo=1, boundary="wrap", axis=-1
    ).compute()
    assert np.array_equal(remote, local_out)
    del local_in, local_out


def test_bad_arguments(client):
    with pytest.raises(ValueError, match="same length"):
        sd.map(triad, np.zeros(3), np.zeros(4), np.zeros(3), args=(1.0,))
    with pytest.raises(TypeError, match="args must be a tuple"):
        sd.map(triad, np.zeros(3), np.zeros(3), np.zeros(3), args=1.0)
    with pytest.raises(ValueError, match="halo=3 needs"):
        sd.map(heat_step, np.zeros((4, 4)), np.zeros((4, 4)), args=(0.1,), halo=3)
    with pytest.raises(TypeError, match="dask or NumPy"):
        sd.map(triad, [0.0], [0.0], [0.0], args=(1.0,))
    with pytest.raises(ValueError, match="worker_id has no meaning on Dask"):
        sd.map(triad, np.zeros(3), np.zeros(3), np.zeros(3), args=(shmarray.worker_id,))
    with pytest.raises(ValueError, match="inside a container"):
        sd.map(triad, np.zeros(3), np.zeros(3), np.zeros(3), args=((shmarray.row_offset,),))
    with pytest.raises(ValueError, match="every chunk needs at least halo=2 rows"):
        sd.map(
            heat_step, np.zeros((20, 4)), np.zeros((20, 4)), args=(0.1,), halo=2, chunks=(1, 15)
        )
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        sd.map(heat_step, np.zeros((20, 4)), np.zeros((20, 4)), args=(0.1,), axis=2)
    with pytest.raises(ValueError, match="boundary='reflect' needs at least 2"):
        sd.map(
            heat_step,
            np.zeros((20, 3)),
            np.zeros((20, 3)),
            args=(0.1,),
            halo=1,
            boundary="reflect",
        )
    with pytest.raises(ValueError, match="boundary must be None"):
        sd.reduce(total, np.zeros(20), halo=1, boundary="periodic")


def held_double(out, inp, started, go):
    """Doubles, once let go: first leaves a file named after its worker's
    pid in the folder ``started`` (the test then knows which process is at
    work), then waits until the file ``go`` exists, so a kill lands inside
    the chunk whatever the machine's load."""
    open(os.path.join(started, str(os.getpid())), "w").close()
    deadline = time.monotonic() + 300  # a hang detector: the test makes it at once
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{go} never appeared")
        time.sleep(0.001)
    out[...] = 2 * inp


@pytest.mark.breaks_things
def test_a_killed_dask_worker_is_retried(tmp_path):
    # A cluster of its own: the nanny restarts the victim, and everything
    # it starts must be gone when the test ends.
    started, go = tmp_path / "started", tmp_path / "go"
    started.mkdir()
    with local_cluster() as cluster, distributed.Client(cluster) as client:
        x = np.arange(400.0).reshape(40, 10)
        lazy = sd.map(held_double, np.zeros_like(x), x, args=(str(started), str(go)), chunks=40)
        future = client.compute(lazy)
        workers = set(client.run(os.getpid).values())
        deadline = time.monotonic() + 60
        while not (busy := workers & {int(p.name) for p in started.iterdir()}):
            assert time.monotonic() < deadline, "no chunk started within 60 s"
            time.sleep(0.01)
        os.kill(busy.pop(), signal.SIGKILL)  # a worker in the middle of a chunk
        go.touch()
        # One death is within Dask's allowed failures (3): the lost tasks
        # run again elsewhere, with the same result.
        result = future.result(timeout=120)
        assert np.array_equal(result, 2 * x)


def test_row_chunks_matches_engine_chunks():
    assert sd.row_chunks(10, 2, 0) == (5, 5)
    assert sd.row_chunks(10, 2, 1) == (5, 5)
    assert sd.row_chunks(10, (2, 6), 1) == (3, 7)
    assert sum(sd.row_chunks(1000, None, 3)) == 1000
