"""Elementwise kernels over 1-D arrays: each output element depends only on
the same element of the inputs, so any chunking gives the same result.

For contiguous n-d arrays pass ``a.reshape(-1)`` views (free for C order).
"""

from shmarray.kernels._jit import jit


@jit
def axpy(y, x, a):
    """``y += a * x`` in place.

    Sequential: ``axpy(y, x, 2.0)``.
    Engine:     ``eng.map(axpy, y, x, args=(2.0,))``.
    """
    for i in range(y.shape[0]):
        y[i] += a * x[i]


@jit
def triad(a, b, c, s):
    """STREAM triad, ``a = b + s * c``.

    Sequential: ``triad(a, b, c, 3.0)``.
    Engine:     ``eng.map(triad, a, b, c, args=(3.0,))``.
    """
    for i in range(a.shape[0]):
        a[i] = b[i] + s * c[i]


@jit
def scale(out, x, s):
    """``out = s * x``.

    Sequential: ``scale(out, x, 0.5)``.
    Engine:     ``eng.map(scale, out, x, args=(0.5,))``.
    """
    for i in range(out.shape[0]):
        out[i] = s * x[i]


@jit
def clip(out, x, lo, hi):
    """``out = min(max(x, lo), hi)``, as ``np.clip`` (NaN stays NaN).

    Sequential: ``clip(out, x, -1.0, 1.0)``.
    Engine:     ``eng.map(clip, out, x, args=(-1.0, 1.0))``.
    """
    for i in range(out.shape[0]):
        v = x[i]
        if v < lo:
            v = lo
        elif v > hi:
            v = hi
        out[i] = v


@jit
def normalize(out, x, mean, std):
    """``out = (x - mean) / std`` in one pass (fused subtract and divide).

    Get ``mean`` and ``std`` first from :func:`kernels.reductions.moments`;
    :func:`kernels.standardize` does both passes.

    Sequential: ``normalize(out, x, m, s)``.
    Engine:     ``eng.map(normalize, out, x, args=(m, s))``.
    """
    for i in range(out.shape[0]):
        out[i] = (x[i] - mean) / std
