"""Monte Carlo with reproducible random streams.

Every *row* draws from its own stream, seeded from ``(seed, global row
index)`` (``row_offset + i``: ``shmarray.row_offset`` through the engine, 0
sequentially); chunks, workers and scheduling decide only who computes a
row, never what it draws.  Integer results therefore match for any worker count
and any ``chunks``.  The kernels reseed numba's generator of the calling
thread.
"""

import numpy as np

from shmarray.kernels._jit import jit

# Building blocks of the kernels below (one row each), not kernels.
HELPERS = ("row_seed", "row_hits", "walk_row")


@jit
def row_seed(seed, row):
    """A 32-bit seed for row ``row`` of a run seeded with ``seed``
    (SplitMix64's finaliser, so neighbouring rows get unrelated streams)."""
    z = np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(row)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return np.uint32(z & np.uint64(0xFFFFFFFF))


@jit
def row_hits(seed, row, samples):
    """Row ``row``'s count for :func:`pi_hits`, from its own stream."""
    np.random.seed(row_seed(seed, row))
    hits = 0
    for _ in range(samples):
        x = np.random.random()
        y = np.random.random()
        if x * x + y * y <= 1.0:
            hits += 1
    return hits


@jit
def walk_row(out_row, seed, row):
    """Row ``row`` of :func:`random_walks`, from its own stream."""
    np.random.seed(row_seed(seed, row))
    acc = 0.0
    for j in range(out_row.shape[0]):
        acc += np.random.standard_normal()
        out_row[j] = acc


@jit
def pi_hits(counts, row_offset, samples, seed):
    """Points inside the quarter unit circle out of ``samples`` uniform
    points per row: each row's count in ``counts`` (int64), the chunk's
    total returned.  ``4 * hits / (len(counts) * samples)`` estimates pi.
    Combine with ``operator.add`` (integers: exact in any order).

    Sequential: ``pi_hits(np.zeros(n, np.int64), 0, 10_000, 42)``.
    Engine:     ``eng.reduce(pi_hits, counts, args=(shmarray.row_offset, 10_000, 42))``.
    """
    total = 0
    for i in range(counts.shape[0]):
        counts[i] = row_hits(seed, row_offset + i, samples)
        total += counts[i]
    return total


@jit
def random_walks(out, row_offset, seed):
    """Fill each row of ``out`` (2-D float64) with a Gaussian random walk
    drawn from that row's own stream.

    Sequential: ``random_walks(paths, 0, 42)``.
    Engine:     ``eng.map(random_walks, paths, args=(shmarray.row_offset, 42))``.
    """
    for i in range(out.shape[0]):
        walk_row(out[i], seed, row_offset + i)
