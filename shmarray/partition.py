"""Rows to chunks, chunks to workers.  Pure functions, run before any work
is sent (their arguments are checked by ``shmarray.options``).

A map over ``n`` rows with halo ``h`` partitions the interior rows
``[h, n - h)`` into chunks ``(lo, hi)``; each array reaches the kernel as
rows ``[lo - h, hi + h)``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from shmarray.options import check_rows, check_sizes, coerce_chunks

Chunk = tuple[int, int]


def split_rows(n_rows: int, chunks: object, halo: int = 0, default: int = 1) -> tuple[Chunk, ...]:
    """Partition the interior rows into chunks.

    ``chunks`` is None (use ``default`` chunks), a number of chunks, or a
    sequence of chunk sizes that add up to the interior rows.  There is
    always at least one chunk: with no interior rows it is empty, so a
    reduction still gets its kernel's value for no rows.

    >>> split_rows(10, None, default=3)
    ((0, 4), (4, 7), (7, 10))
    >>> split_rows(10, 2, halo=1)
    ((1, 5), (5, 9))
    >>> split_rows(6, (1, 2, 3))
    ((0, 1), (1, 3), (3, 6))
    >>> split_rows(3, 8)                   # never more chunks than rows
    ((0, 1), (1, 2), (2, 3))
    >>> split_rows(0, 4)
    ((0, 0),)
    >>> split_rows(6, (2, 2))
    Traceback (most recent call last):
    ...
    ValueError: chunks=(2, 2) adds up to 4 rows, but there are 6 rows to split (rows 0 to 6 with halo=0). Pass sizes that add up to 6, or a number of chunks.
    """
    start, stop = check_rows(n_rows, halo)
    rows = stop - start
    chunks = coerce_chunks(chunks)
    if chunks is None:
        chunks = default
    if isinstance(chunks, int):
        count = max(1, min(chunks, rows))
        base, extra = divmod(rows, count)
        sizes = [base + (i < extra) for i in range(count)]
    else:
        sizes = check_sizes(chunks, start, stop, halo)
    out = []
    lo = start
    for size in sizes:
        out.append((lo, lo + size))
        lo += size
    return tuple(out) if out else ((start, start),)


def assign_static(n_chunks: int, n_workers: int) -> tuple[int, ...]:
    """Worker of each chunk: contiguous runs, the same every call, so a worker
    sees the same rows (and keeps their pages mapped) map after map.

    >>> assign_static(4, 2)
    (0, 0, 1, 1)
    >>> assign_static(3, 2)
    (0, 0, 1)
    >>> assign_static(1, 4)
    (0,)
    """
    return tuple(i * n_workers // n_chunks for i in range(n_chunks))


class Plan(NamedTuple):
    """Where every chunk of one map goes."""

    chunks: tuple[Chunk, ...]
    # (worker, indices of its chunks, its chunks), for each busy worker
    groups: tuple[tuple[int, tuple[int, ...], tuple[Chunk, ...]], ...]


def plan(n_rows: int, chunks: object, halo: int, workers: int) -> Plan:
    """Split and assign, remembering recent answers: a loop of maps over the
    same arrays asks the same question every step (4 us saved per map).

    >>> plan(10, None, 0, 2).groups
    ((0, (0,), ((0, 5),)), (1, (1,), ((5, 10),)))
    """
    return _plan(n_rows, coerce_chunks(chunks), halo, workers)


# Enough chunks that the last one to finish is short, few enough that the
# ~70 us per chunk stays small against real work.
DYNAMIC_CHUNKS_PER_WORKER = 8


def plan_for(n_rows: int, chunks: object, halo: int, n_workers: int, dynamic: bool) -> Plan:
    """The chunks a map will use: ``chunks`` as given, else one per worker
    (static) or DYNAMIC_CHUNKS_PER_WORKER per worker (dynamic)."""
    if chunks is None and dynamic:
        chunks = DYNAMIC_CHUNKS_PER_WORKER * n_workers
    return plan(n_rows, chunks, halo, n_workers)


@functools.lru_cache(maxsize=256)
def _plan(n_rows: int, chunks: int | tuple[int, ...] | None, halo: int, workers: int) -> Plan:
    parts = split_rows(n_rows, chunks, halo, default=workers)
    owners = assign_static(len(parts), workers)
    groups = []
    for w in sorted(set(owners)):
        idx = tuple(i for i, o in enumerate(owners) if o == w)
        groups.append((w, idx, tuple(parts[i] for i in idx)))
    return Plan(parts, tuple(groups))
