"""Stencil kernels.  Each is written for the whole array and runs unchanged
on chunks through ``Engine.map(..., halo=h)``, bit for bit.

Every stencil writes only the interior: rows ``[h, n-h)`` of what it is
given and the columns that have all their neighbours.  The boundary rows and
columns of ``out`` keep their values (a fixed-value boundary): copy them in
once, for example by starting both buffers of a double-buffered loop from
the same array.
"""

import numpy as np
from numba import prange

from shmarray.kernels._jit import jit, jit_inline, jit_parallel

# Not kernels of the table: row loops, and the prange peers that run them on
# threads (benchmarks and `shmarray demo` time the engine against those).
HELPERS = ("_jacobi_row", "_heat_row", "jacobi_prange", "heat_step_prange")

# Normalised Gaussian weights (binomial approximations), for convolve().
GAUSS3 = np.outer([1.0, 2.0, 1.0], [1.0, 2.0, 1.0]) / 16.0
GAUSS5 = np.outer([1.0, 4.0, 6.0, 4.0, 1.0], [1.0, 4.0, 6.0, 4.0, 1.0]) / 256.0


@jit_inline
def _jacobi_row(out, inp, i):
    for j in range(1, inp.shape[1] - 1):
        out[i, j] = 0.25 * (inp[i - 1, j] + inp[i + 1, j] + inp[i, j - 1] + inp[i, j + 1])


@jit
def jacobi(out, inp):
    """One Jacobi sweep for Laplace's equation on a 2-D grid (halo 1):
    each interior point becomes the mean of its four neighbours.

    Sequential: ``jacobi(new, old)``.
    Engine:     ``eng.map(jacobi, new, old, halo=1)``.
    """
    for i in range(1, inp.shape[0] - 1):
        _jacobi_row(out, inp, i)


@jit_parallel
def jacobi_prange(out, inp):
    """``jacobi`` with numba's ``prange`` over the rows: the threads peer of
    the engine (the same rows loop, so the same bits)."""
    for i in prange(1, inp.shape[0] - 1):
        _jacobi_row(out, inp, i)


@jit_inline
def _heat_row(out, inp, i, alpha):
    for j in range(1, inp.shape[1] - 1):
        out[i, j] = inp[i, j] + alpha * (
            inp[i - 1, j] + inp[i + 1, j] + inp[i, j - 1] + inp[i, j + 1] - 4.0 * inp[i, j]
        )


@jit
def heat_step(out, inp, alpha):
    """One explicit step of 2-D heat diffusion (5-point stencil, halo 1);
    stable for ``alpha <= 0.25``.

    Sequential: ``heat_step(new, old, 0.2)``.
    Engine:     ``eng.map(heat_step, new, old, args=(0.2,), halo=1)``.
    """
    for i in range(1, inp.shape[0] - 1):
        _heat_row(out, inp, i, alpha)


@jit_parallel
def heat_step_prange(out, inp, alpha):
    """``heat_step`` with numba's ``prange`` over the rows: the threads peer
    that ``shmarray demo`` and ``shmarray bench`` time the engine against
    (the same row loop, so the same bits)."""
    for i in prange(1, inp.shape[0] - 1):
        _heat_row(out, inp, i, alpha)


@jit
def heat3d_step(out, inp, alpha):
    """One explicit step of 3-D heat diffusion (7-point stencil, halo 1);
    stable for ``alpha <= 1/6``.  Chunks split the first axis.

    Sequential: ``heat3d_step(new, old, 0.1)``.
    Engine:     ``eng.map(heat3d_step, new, old, args=(0.1,), halo=1)``.
    """
    n, m, p = inp.shape
    for i in range(1, n - 1):
        for j in range(1, m - 1):
            for k in range(1, p - 1):
                out[i, j, k] = inp[i, j, k] + alpha * (
                    inp[i - 1, j, k]
                    + inp[i + 1, j, k]
                    + inp[i, j - 1, k]
                    + inp[i, j + 1, k]
                    + inp[i, j, k - 1]
                    + inp[i, j, k + 1]
                    - 6.0 * inp[i, j, k]
                )


@jit
def convolve(out, inp, weights):
    """2-D correlation with a square, odd-sized ``weights`` (halo = its
    radius), as ``scipy.ndimage.correlate`` on the interior.  With
    ``GAUSS3`` or ``GAUSS5`` it is a Gaussian blur.

    Sequential: ``convolve(out, image, GAUSS5)``.
    Engine:     ``eng.map(convolve, out, image, args=(GAUSS5,), halo=2)``.
    """
    n, m = inp.shape
    r = weights.shape[0] // 2
    for i in range(r, n - r):
        for j in range(r, m - r):
            acc = 0.0
            for di in range(-r, r + 1):
                for dj in range(-r, r + 1):
                    acc += weights[di + r, dj + r] * inp[i + di, j + dj]
            out[i, j] = acc


@jit
def life_step(out, inp):
    """One generation of Conway's Game of Life on a 2-D array of 0/1 cells
    (any integer or bool dtype; halo 1).  Cells on the border stay as they
    are.

    Sequential: ``life_step(new, old)``.
    Engine:     ``eng.map(life_step, new, old, halo=1)``.
    """
    n, m = inp.shape
    for i in range(1, n - 1):
        for j in range(1, m - 1):
            live = 0
            for di in range(-1, 2):
                for dj in range(-1, 2):
                    if (di != 0 or dj != 0) and inp[i + di, j + dj]:
                        live += 1
            if inp[i, j]:
                out[i, j] = 1 if live == 2 or live == 3 else 0
            else:
                out[i, j] = 1 if live == 3 else 0
