"""numba prange peers of the library kernels.  Each splits its work the way
the engine's static schedule does (one equal chunk per thread, the same row
ranges), so both sides give bit-identical results.

No ``cache=True`` here: these call library kernels, and numba's cache does
not notice when a callee in another file changes (a stale peer once gave
different variances from the engine)."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from shmarray.kernels.reductions import combine_moments, moments
from shmarray.kernels.stencils import heat_step, jacobi, jacobi_prange
from shmarray.report.peers import bounds_for, histogram_parts, mandelbrot_prange


@njit(parallel=True)
def _moment_parts(x, bounds):
    k = bounds.shape[0] - 1
    n = np.zeros(k, np.int64)
    mean = np.zeros(k)
    m2 = np.zeros(k)
    for t in prange(k):
        n[t], mean[t], m2[t] = moments(x[bounds[t] : bounds[t + 1]])
    return n, mean, m2


def edges_for(n: int, parts: int) -> np.ndarray:
    """Row boundaries of ``parts`` equal chunks, as the engine splits them."""
    return np.array([lo for lo, _ in bounds_for(n, parts)] + [n], np.int64)


def histogram_prange(x, lo, hi, nbins, threads):
    parts = histogram_parts(x, edges_for(len(x), threads), lo, hi, nbins)
    out = parts[0].copy()
    for p in parts[1:]:
        out = out + p
    return out


def moments_prange(x, threads):
    n, mean, m2 = _moment_parts(x, edges_for(len(x), threads))
    acc = (int(n[0]), float(mean[0]), float(m2[0]))
    for t in range(1, len(n)):
        acc = combine_moments(acc, (int(n[t]), float(mean[t]), float(m2[t])))
    return acc


__all__ = [
    "jacobi_prange",
    "mandelbrot_prange",
    "histogram_prange",
    "moments_prange",
    "heat_step",
    "jacobi",
]
