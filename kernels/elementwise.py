"""Elementwise kernels: one output row per input row, no halo."""

from kernels._jit import jit


@jit
def triad(a, b, c, s):
    """STREAM triad, ``a = b + s * c``, over 1-D arrays.

    Sequential: ``triad(a, b, c, 3.0)``.
    Engine:     ``eng.map(triad, a, b, c, args=(3.0,))``.
    """
    for i in range(a.shape[0]):
        a[i] = b[i] + s * c[i]
