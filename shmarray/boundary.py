"""Ghost cells: what ``boundary=`` fills, and who fills which part.

With ``boundary`` set, every array carries ``halo`` ghost cells on each side
of every axis, and before a map they are filled from the cells inside,
exactly as ``numpy.pad(interior, halo, mode)`` would.  ``numpy.pad`` pads
one axis after another: padding axis ``k`` covers the full (already padded)
extent of the axes before it and only the interior of the axes after it,
which is what makes the corners come out as they do.  Filling in place in
that order, with plain copies, gives the same bits.

The workers fill in parallel, each the part next to its own rows, in two
stages (``ghost_copies``): the axes before the split axis; then the split
axis's two ghost slabs (by the workers holding the first and the last
rows) and the axes after it.  ``readers`` says whose rows each worker reads
while filling and computing, so it waits only for those.

Pure functions; ``shmarray.options`` checks ``boundary=`` before anything
is sent.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

MODES = ("wrap", "reflect", "symmetric", "edge")


class Boundary(NamedTuple):
    """A checked ``boundary=``: a numpy.pad mode, or "constant" and its
    value."""

    mode: str
    value: complex = 0.0  # a number: int, float or complex


def _sources(n: int, h: int, mode: str) -> tuple[slice | None, slice | None]:
    """Along one axis of ``n`` cells (ghosts included), the cells the lower
    and upper ghost slabs ([0, h) and [n-h, n)) copy, in order; None for a
    constant.

    >>> _sources(10, 2, "wrap")
    (slice(6, 8, None), slice(2, 4, None))
    >>> _sources(10, 2, "reflect")
    (slice(4, 2, -1), slice(6, 4, -1))
    >>> _sources(10, 2, "symmetric")
    (slice(3, 1, -1), slice(7, 5, -1))
    """
    if mode == "wrap":
        return slice(n - 2 * h, n - h), slice(h, 2 * h)
    if mode == "reflect":
        return slice(2 * h, h, -1), slice(n - h - 2, n - 2 * h - 2, -1)
    if mode == "symmetric":
        return slice(2 * h - 1, h - 1, -1), slice(n - h - 1, n - 2 * h - 1, -1)
    if mode == "edge":
        return slice(h, h + 1), slice(n - h - 1, n - h)
    return None, None


def _neg_safe(s: slice) -> slice:
    """A step -1 slice whose stop went below 0 means 'to the start'."""
    if s.step == -1 and s.stop is not None and s.stop < 0:
        return slice(s.start, None, -1)
    return s


class Copy(NamedTuple):
    """``dst`` (an index tuple) gets ``src`` (an index tuple) or ``value``."""

    dst: tuple
    src: tuple | None
    value: complex


def _axis_copies(shape, h, b: Boundary, k: int, region: dict[int, slice]) -> list[Copy]:
    """Fill axis ``k``'s two ghost slabs over ``region`` (the other axes'
    extents)."""
    n = shape[k]
    lo_src, hi_src = _sources(n, h, b.mode)
    out = []
    for dst_k, src_k in ((slice(0, h), lo_src), (slice(n - h, n), hi_src)):
        dst = tuple(dst_k if j == k else region[j] for j in range(len(shape)))
        src = (
            None
            if src_k is None
            else tuple(_neg_safe(src_k) if j == k else region[j] for j in range(len(shape)))
        )
        out.append(Copy(dst, src, b.value))
    return out


def ghost_copies(
    shape: tuple[int, ...],
    h: int,
    b: Boundary,
    axis: int,
    rows: tuple[int, int],
    first: bool,
    last: bool,
) -> tuple[list[Copy], list[Copy]]:
    """The copies that fill the ghost cells next to the interior rows
    ``rows`` (along ``axis``), in two stages: the axes before ``axis``; then
    ``axis`` itself (the lower slab if ``first``, the upper if ``last``) and
    the axes after it.  All workers' copies together equal numpy.pad."""
    full = {j: slice(None) for j in range(len(shape))}
    inner = {j: slice(h, shape[j] - h) for j in range(len(shape))}
    lo, hi = rows
    mine = slice(lo - (h if first else 0), hi + (h if last else 0))
    before: list[Copy] = []
    after: list[Copy] = []
    for k in range(len(shape)):
        if k == axis:
            region = {j: (full[j] if j < k else inner[j]) for j in range(len(shape))}
            for c in _axis_copies(shape, h, b, k, region):
                is_lower = c.dst[k].start == 0
                if (is_lower and first) or (not is_lower and last):
                    after.append(c)
            continue
        region = {j: (full[j] if j < k else inner[j]) for j in range(len(shape))}
        # Along the split axis: the rows of this worker (with the ghost rows
        # it fills, once they exist: only for axes after the split axis).
        region[axis] = slice(lo, hi) if k < axis else mine
        (before if k < axis else after).extend(_axis_copies(shape, h, b, k, region))
    return before, after


def apply(array: np.ndarray, copies: list[Copy]) -> None:
    for c in copies:
        if c.src is None:
            array[c.dst] = c.value
        else:
            array[c.dst] = array[c.src]


def fill(array: np.ndarray, halo: int, boundary: object, axis: int = 0) -> None:
    """Fill ``array``'s ghost cells in place, as ``numpy.pad(interior, halo,
    mode)`` would: what the engine does before a map with ``boundary=``,
    for running the same kernel sequentially.

    >>> a = np.arange(16.0).reshape(4, 4)
    >>> fill(a, 1, "wrap")
    >>> bool(np.array_equal(a, np.pad(a[1:-1, 1:-1], 1, "wrap")))
    True
    """
    from shmarray.options import check_ghosts, coerce_boundary

    b = boundary if isinstance(boundary, Boundary) else coerce_boundary(boundary)
    if b is None:
        return  # boundary=None: there are no ghost cells
    check_ghosts(array.shape, halo, b, "the array")
    before, after = ghost_copies(
        array.shape, halo, b, axis, (halo, array.shape[axis] - halo), True, True
    )
    apply(array, before)
    apply(array, after)


def readers(groups: list[tuple[int, int]], n: int, h: int, b: Boundary | None) -> list[set[int]]:
    """For each group of interior rows (in row order), the other groups it
    must wait for between stages: those whose rows it reads (its halo, and
    the sources of the ghost slabs it fills) and those that read its rows.

    >>> readers([(1, 5), (5, 9)], 10, 1, Boundary("wrap"))
    [{1}, {0}]
    >>> readers([(1, 4), (4, 6), (6, 9)], 10, 1, None)
    [{1}, {0, 2}, {1}]
    """

    def owner(r: int) -> int:
        for g, (lo, hi) in enumerate(groups):
            if lo <= r < hi:
                return g
        return 0 if r < groups[0][0] else len(groups) - 1

    reads: list[set[int]] = []
    for g, (lo, hi) in enumerate(groups):
        rows = set(range(max(lo - h, 0), min(hi + h, n)))
        if b is not None and b.mode != "constant":
            lo_src, hi_src = _sources(n, h, b.mode)
            assert lo_src is not None and hi_src is not None  # not a constant
            if g == 0:
                rows.update(range(n)[_neg_safe(lo_src)])
            if g == len(groups) - 1:
                rows.update(range(n)[_neg_safe(hi_src)])
        reads.append({owner(r) for r in rows})
    out: list[set[int]] = [set() for _ in groups]
    for g, rs in enumerate(reads):
        for o in rs:
            if o != g:
                out[g].add(o)
                out[o].add(g)
    return out
