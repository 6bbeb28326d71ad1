"""Stencil kernels.  Each is written for the whole array and runs unchanged
on chunks through ``Engine.map(..., halo=h)``."""

from kernels._jit import jit


@jit
def heat_step(out, inp, alpha):
    """One explicit step of 2-D heat diffusion (5-point stencil, halo 1).

    Writes ``out[1:-1, 1:-1]``; the boundary rows and columns of ``out`` are
    left as they are (fixed-value boundary: copy them in once).

    Sequential: ``heat_step(new, old, 0.2)``.
    Engine:     ``eng.map(heat_step, new, old, args=(0.2,), halo=1)``.
    """
    n, m = inp.shape
    for i in range(1, n - 1):
        for j in range(1, m - 1):
            out[i, j] = inp[i, j] + alpha * (
                inp[i - 1, j] + inp[i + 1, j] + inp[i, j - 1] + inp[i, j + 1]
                - 4.0 * inp[i, j])
