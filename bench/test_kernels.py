"""pytest-benchmark suites for the kernel library: shmarray against numba
prange (and sequential numba) on the same kernels, one group per workload."""

from __future__ import annotations

import numba
import numpy as np
import pytest

import shmarray
from peers import histogram_prange, jacobi_prange, mandelbrot_prange
from shmarray.kernels.irregular import mandelbrot
from shmarray.kernels.reductions import histogram
from shmarray.kernels.stencils import jacobi

H, W, ITER = 1500, 3000, 300
ARGS = (-2.0, 3.0 / W, -0.75, 1.5 / H, ITER)
N = 4096
BINS = (-4.0, 4.0, 256)


@pytest.fixture(scope="module")
def eng():
    numba.set_num_threads(2)
    with shmarray.Engine(workers=2) as engine:
        yield engine


@pytest.fixture(scope="module")
def images(eng):
    shared = eng.zeros((H, W), np.int32)
    private = np.zeros((H, W), np.int32)
    yield shared, private
    expected = np.zeros((H, W), np.int32)
    mandelbrot(expected, 0, *ARGS)
    assert np.array_equal(shared, expected) and np.array_equal(private, expected)


@pytest.mark.benchmark(group="mandelbrot 3000x1500x300")
def test_mandelbrot_shmarray_dynamic(benchmark, record, eng, images):
    shared, _ = images
    benchmark.pedantic(
        lambda: eng.map(mandelbrot, shared, args=(shmarray.row_offset, *ARGS), schedule="dynamic"),
        rounds=5,
        warmup_rounds=1,
    )
    record("shmarray")


@pytest.mark.benchmark(group="mandelbrot 3000x1500x300")
def test_mandelbrot_sequential(benchmark, record, images):
    _, private = images
    benchmark.pedantic(lambda: mandelbrot(private, 0, *ARGS), rounds=3, warmup_rounds=1)
    record("sequential numba")


@pytest.mark.benchmark(group="mandelbrot 3000x1500x300")
def test_mandelbrot_prange(benchmark, record, images):
    _, private = images
    benchmark.pedantic(lambda: mandelbrot_prange(private, *ARGS), rounds=5, warmup_rounds=1)
    record("numba prange")


@pytest.fixture(scope="module")
def grids(eng):
    u = np.random.default_rng(0).random((N, N))
    yield eng.from_numpy(u), eng.from_numpy(u), u.copy(), u.copy()


@pytest.mark.benchmark(group="jacobi 4096^2 step")
def test_jacobi_shmarray(benchmark, record, eng, grids):
    a, b, _, _ = grids
    benchmark.pedantic(lambda: eng.map(jacobi, b, a, halo=1), rounds=30, warmup_rounds=2)
    record("shmarray")


@pytest.mark.benchmark(group="jacobi 4096^2 step")
def test_jacobi_prange(benchmark, record, grids):
    _, _, pa, pb = grids
    benchmark.pedantic(lambda: jacobi_prange(pb, pa), rounds=30, warmup_rounds=2)
    record("numba prange")


@pytest.fixture(scope="module")
def samples(eng):
    x = np.random.default_rng(1).standard_normal(100_000_000)
    yield eng.from_numpy(x), x


@pytest.mark.benchmark(group="histogram 100M")
def test_histogram_shmarray(benchmark, record, eng, samples):
    shared, private = samples
    counts = benchmark.pedantic(
        lambda: eng.reduce(histogram, shared, args=BINS), rounds=7, warmup_rounds=1
    )
    assert np.array_equal(counts, histogram_prange(private, *BINS, 2))
    record("shmarray")


@pytest.mark.benchmark(group="histogram 100M")
def test_histogram_prange(benchmark, record, samples):
    _, private = samples
    benchmark.pedantic(lambda: histogram_prange(private, *BINS, 2), rounds=7, warmup_rounds=1)
    record("numba prange")
