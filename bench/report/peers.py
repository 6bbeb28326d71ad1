"""The peers' kernels and machinery, at module level so process pools can
import them: numba ``prange`` versions of the workloads, the chunk functions
that ``ProcessPoolExecutor``, joblib and Dask run, and the pools for one
worker count."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor

import numba
import numpy as np
from numba import njit, prange

from shmarray.kernels.elementwise import triad
from shmarray.kernels.irregular import escape_row, mandelbrot
from shmarray.kernels.reductions import histogram
from shmarray.kernels.stencils import heat_step, heat_step_prange

ALPHA = 0.2


@njit(parallel=True, cache=True)
def triad_prange(a, b, c, s):
    for i in prange(a.shape[0]):
        a[i] = b[i] + s * c[i]


@njit(parallel=True)
def histogram_parts(x, bounds, lo, hi, nbins):
    parts = np.zeros((bounds.shape[0] - 1, nbins), np.int64)
    for t in prange(bounds.shape[0] - 1):
        parts[t] = histogram(x[bounds[t] : bounds[t + 1]], lo, hi, nbins)
    return parts


@njit(parallel=True, cache=True)
def mandelbrot_prange(out, x0, dx, y0, dy, max_iter):
    for i in prange(out.shape[0]):
        escape_row(out[i], x0, dx, y0 + i * dy, max_iter)


@njit(cache=True)
def noop_kernel(x):
    pass


@njit(parallel=True, cache=True)
def noop_prange(x):
    for _ in prange(x.shape[0]):
        pass


def nothing(*_):
    return None


def triad_chunk(b, c, s):
    a = np.empty_like(b)
    triad(a, b, c, s)
    return a


def hist_chunk(x, lo, hi, nbins):
    return histogram(x, lo, hi, nbins)


def heat_chunk(inp):
    """Rows [lo-1, hi+1) in, rows [lo, hi) of the next step out."""
    out = inp.copy()
    heat_step(out, inp, ALPHA)
    return out[1:-1]


def mandel_chunk(lo, hi, width, args):
    out = np.zeros((hi - lo, width), np.int32)
    mandelbrot(out, lo, *args)
    return out


def _heat_block(block):
    out = block.copy()
    heat_step(out, block, ALPHA)
    return out


def _mandel_block(block, args, block_info=None):
    lo, _ = block_info[None]["array-location"][0]
    out = np.zeros(block.shape, np.int32)
    mandelbrot(out, lo, *args)
    return out


def _hist_block(block, lo, hi, nbins):
    return histogram(block, lo, hi, nbins)


def bounds_for(n: int, parts: int) -> list[tuple[int, int]]:
    base, extra = divmod(n, parts)
    out, lo = [], 0
    for i in range(parts):
        hi = lo + base + (i < extra)
        out.append((lo, hi))
        lo = hi
    return out


class Pools:
    """The parallel machinery for one worker count, started once."""

    def __init__(self, workers: int):
        import shmarray

        self.workers = workers
        self.engine = shmarray.Engine(workers=workers)
        import multiprocessing

        self.ppe = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("forkserver")
        )
        from joblib import Parallel

        self.joblib = Parallel(n_jobs=workers, backend="loky")
        numba.set_num_threads(workers)

    def dask(self, collection):
        return collection.compute(scheduler="threads", num_workers=self.workers)

    def close(self):
        self.engine.close()
        self.ppe.shutdown(wait=True)


# The heat stencil's prange peer is the kernel library's own
# (``heat_step_prange``, the same row loop as ``heat_step``).
heat_prange = heat_step_prange
