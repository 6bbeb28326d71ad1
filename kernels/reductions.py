"""Reductions: each kernel returns a *partial* for its chunk, and a
``combine_*`` function merges two partials.  ``Engine.reduce`` merges them in
chunk order, so a result is deterministic for a given ``chunks``.

Kernels that report a position take ``row_offset``, the global index of
their first row (0 sequentially, ``shmarray.row_offset`` through the
engine).
"""

import math

import numpy as np

from shmarray.kernels._jit import jit


@jit
def total(x):
    """Sum of a 1-D chunk of numbers (float, int or complex), accumulated in
    the array's dtype.  Combine with ``operator.add``.

    Four interleaved accumulators: a single running sum is bound by the
    latency of one addition per element (8 GB/s here); four keep the memory
    bus busy.  The order is fixed, so the result is deterministic.

    Sequential: ``total(x)``.
    Engine:     ``eng.reduce(total, x)``.
    """
    zero = np.zeros(1, x.dtype)[0]
    a0 = a1 = a2 = a3 = zero
    n = x.shape[0]
    i = 0
    while i + 4 <= n:
        a0 += x[i]
        a1 += x[i + 1]
        a2 += x[i + 2]
        a3 += x[i + 3]
        i += 4
    tail = zero
    while i < n:
        tail += x[i]
        i += 1
    return ((a0 + a1) + (a2 + a3)) + tail


@jit
def dot(x, y):
    """Dot product of two 1-D chunks (four interleaved accumulators, as in
    :func:`total`).  Combine with ``operator.add``.

    Sequential: ``dot(x, y)``.
    Engine:     ``eng.reduce(dot, x, y)``.
    """
    a0 = a1 = a2 = a3 = 0.0
    n = x.shape[0]
    i = 0
    while i + 4 <= n:
        a0 += x[i] * y[i]
        a1 += x[i + 1] * y[i + 1]
        a2 += x[i + 2] * y[i + 2]
        a3 += x[i + 3] * y[i + 3]
        i += 4
    tail = 0.0
    while i < n:
        tail += x[i] * y[i]
        i += 1
    return ((a0 + a1) + (a2 + a3)) + tail


@jit
def min_index(x, row_offset):
    """``(minimum, global index of its first occurrence)`` of a 1-D chunk;
    a NaN wins, as in ``np.min`` / ``np.argmin``.  Empty: ``(inf, -1)``.
    Combine with :func:`combine_min`.

    Sequential: ``min_index(x, 0)``.
    Engine:     ``eng.reduce(min_index, x, args=(shmarray.row_offset,),
                combine=combine_min)``.
    """
    best, where = np.inf, -1
    for i in range(x.shape[0]):
        v = x[i]
        if np.isnan(v):
            return v, row_offset + i
        if v < best or where == -1:
            best, where = v, row_offset + i
    return best, where


@jit
def max_index(x, row_offset):
    """``(maximum, global index of its first occurrence)``; see
    :func:`min_index`.  Empty: ``(-inf, -1)``.  Combine with
    :func:`combine_max`.

    Sequential: ``max_index(x, 0)``.
    Engine:     ``eng.reduce(max_index, x, args=(shmarray.row_offset,),
                combine=combine_max)``.
    """
    best, where = -np.inf, -1
    for i in range(x.shape[0]):
        v = x[i]
        if np.isnan(v):
            return v, row_offset + i
        if v > best or where == -1:
            best, where = v, row_offset + i
    return best, where


def _combine_extreme(a, b, better):
    if a[1] == -1:
        return b
    if b[1] == -1:
        return a
    if math.isnan(a[0]):
        return a
    if math.isnan(b[0]):
        return b
    if better(b[0], a[0]) or (b[0] == a[0] and b[1] < a[1]):
        return b
    return a


def combine_min(a, b):
    """Merge two ``(value, index)`` partials of :func:`min_index`."""
    return _combine_extreme(a, b, lambda u, v: u < v)


def combine_max(a, b):
    """Merge two ``(value, index)`` partials of :func:`max_index`."""
    return _combine_extreme(a, b, lambda u, v: u > v)


_BLOCK = 256


@jit
def moments(x):
    """``(count, mean, M2)`` of a 1-D chunk, where M2 is the sum of squared
    deviations from the mean.  Combine with :func:`combine_moments`; finish
    with :func:`variance`.

    Blocks of 256 values get their own mean and M2 in two passes while they
    sit in cache, then merge into the running partial by Chan's formula, the
    same one ``combine_moments`` uses across chunks.  Per-element Welford
    updates divide once per value and ran at 1.2 GB/s; this runs near
    memory speed with the same accuracy.

    Sequential: ``variance(moments(x))``.
    Engine:     ``variance(eng.reduce(moments, x, combine=combine_moments))``.
    """
    n, mean, m2 = 0, 0.0, 0.0
    size = x.shape[0]
    for start in range(0, size, _BLOCK):
        stop = min(start + _BLOCK, size)
        nb = stop - start
        s0 = s1 = s2 = s3 = 0.0
        i = start
        while i + 4 <= stop:
            s0 += x[i]
            s1 += x[i + 1]
            s2 += x[i + 2]
            s3 += x[i + 3]
            i += 4
        while i < stop:
            s0 += x[i]
            i += 1
        bmean = ((s0 + s1) + (s2 + s3)) / nb
        q0 = q1 = q2 = q3 = 0.0
        i = start
        while i + 4 <= stop:
            d0 = x[i] - bmean
            d1 = x[i + 1] - bmean
            d2 = x[i + 2] - bmean
            d3 = x[i + 3] - bmean
            q0 += d0 * d0
            q1 += d1 * d1
            q2 += d2 * d2
            q3 += d3 * d3
            i += 4
        while i < stop:
            d0 = x[i] - bmean
            q0 += d0 * d0
            i += 1
        bm2 = (q0 + q1) + (q2 + q3)
        total_n = n + nb
        delta = bmean - mean
        mean += delta * nb / total_n
        m2 += bm2 + delta * delta * n * nb / total_n
        n = total_n
    return n, mean, m2


def combine_moments(a, b):
    """Merge two ``(count, mean, M2)`` partials (Chan, Golub and LeVeque)."""
    na, ma, m2a = a
    nb, mb, m2b = b
    n = na + nb
    if n == 0:
        return 0, 0.0, 0.0
    delta = mb - ma
    mean = ma + delta * nb / n
    return n, mean, m2a + m2b + delta * delta * na * nb / n


def variance(partial, ddof=0):
    """Variance from a ``(count, mean, M2)`` partial, as ``np.var(ddof=)``."""
    n, _, m2 = partial
    return m2 / (n - ddof) if n - ddof > 0 else math.nan


@jit
def histogram(x, lo, hi, nbins):
    """Counts of a 1-D chunk in ``nbins`` equal bins over ``[lo, hi]``, as
    ``np.histogram(x, nbins, (lo, hi))``: the last bin includes ``hi``;
    values outside the range and NaN are not counted.  Partials (int64
    arrays) combine with ``operator.add``.

    Sequential: ``histogram(x, 0.0, 1.0, 64)``.
    Engine:     ``eng.reduce(histogram, x, args=(0.0, 1.0, 64))``.
    """
    counts = np.zeros(nbins, np.int64)
    # NumPy's own arithmetic, so values on a bin edge land where NumPy puts
    # them: edges as np.linspace makes them, index from the scaled offset,
    # then corrected against the edges.
    step = (hi - lo) / nbins
    edges = np.empty(nbins + 1)
    for k in range(nbins):
        edges[k] = k * step + lo
    edges[nbins] = hi
    norm = nbins / (hi - lo)
    for i in range(x.shape[0]):
        v = x[i]
        if v >= lo and v <= hi:
            b = int((v - lo) * norm)
            if b == nbins:
                b -= 1
            if v < edges[b]:
                b -= 1
            elif v >= edges[b + 1] and b != nbins - 1:
                b += 1
            counts[b] += 1
    return counts
