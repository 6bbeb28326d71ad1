"""The same kernels, with the same semantics, on Dask.

When one machine is not enough, ``shmarray.dask.map`` and
``shmarray.dask.reduce`` run an Engine kernel over ``dask.array`` blocks on
whatever scheduler is current: a ``dask.distributed`` cluster at any address
(``Client("tcp://...")``), a ``LocalCluster``, or Dask's threads.  Dask owns
scheduling, data movement and worker failure; this module only maps the
Engine's semantics onto it:

* arrays are chunked along ``axis`` (other axes are one chunk each), and
  ``chunks`` means what it means for ``Engine.map``: a number of chunks or
  a sequence of sizes of the *interior* rows (``n - 2*halo``), so the same
  ``chunks`` gives the same kernel calls, and bit-identical results;
* every kernel call sees exactly the rows an Engine chunk would: ``halo``
  becomes Dask's ``overlap`` along ``axis`` with no boundary padding;
* ``boundary=`` fills the ghost cells as ``numpy.pad`` would: with Dask's
  own overlap boundaries where they mean the same ("wrap" is Dask's
  "periodic", "symmetric" its "reflect", "edge" its "nearest", a number a
  constant) and with ``dask.array.pad`` for numpy's "reflect", which Dask's
  overlap has no name for;
* ``shmarray.row_offset`` in ``args`` becomes each call's first global row;
  ``shmarray.worker_id`` is refused (Dask's workers have no fixed index);
* kernels work in place, on a copy of each block; ``map`` returns the dask
  array of the first argument as the kernel leaves it, ghost cells filled;
  ``reduce`` combines the per-block values in block order.

Unlike the local engine, Dask moves block data between processes and nodes:
use it when the data or the work outgrows one machine.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    import dask
    import dask.array as da
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError("shmarray.dask needs Dask: pip install 'shmarray[dask]'") from exc

from shmarray.boundary import Boundary
from shmarray.descriptors import row_offset, worker_id
from shmarray.options import (
    check_boundary,
    check_combine,
    check_kernel,
    check_placeholders,
    coerce_args,
    coerce_axis,
    coerce_boundary,
    coerce_halo,
    usable_cpus,
)
from shmarray.partition import split_rows

__all__ = ["map", "reduce", "row_chunks"]

# numpy.pad's mode -> the same fill by Dask's overlap; numpy's "reflect"
# (the edge cell not repeated) has none.
OVERLAP_BOUNDARY = {"wrap": "periodic", "symmetric": "reflect", "edge": "nearest"}


def row_chunks(n_rows: int, chunks: object, halo: int) -> tuple[int, ...]:
    """Dask row-chunk sizes for Engine-style ``chunks`` over ``n_rows``.

    >>> row_chunks(10, 2, 1)           # interior rows 1..9 in two chunks of 4
    (5, 5)
    >>> row_chunks(10, (2, 6), 1)
    (3, 7)
    """
    sizes = [hi - lo for lo, hi in split_rows(n_rows, chunks, halo, default=usable_cpus())]
    sizes[0] += halo
    sizes[-1] += halo
    return tuple(s for s in sizes if s) or (n_rows,)


@dataclass(frozen=True)
class _Plan:
    """One map or reduce: where each kernel call's rows lie along ``axis``."""

    axis: int
    halo: int
    boundary: Boundary | None
    parts: tuple[tuple[int, int], ...]  # interior rows [lo, hi) of each call

    def sizes(self) -> tuple[int, ...]:
        """Row sizes of the blocks the calls own (the first and the last
        also own the halo rows at the edges)."""
        sizes = [hi - lo for lo, hi in self.parts]
        sizes[0] += self.halo
        sizes[-1] += self.halo
        return tuple(sizes)

    def blocks(self, a: da.Array | np.ndarray) -> da.Array:
        """``a`` as a dask array whose block ``k`` is what call ``k`` gets:
        rows ``[lo - halo, hi + halo)`` along ``axis``, every other axis
        whole, ghost cells filled."""
        h, ax, b = self.halo, self.axis, self.boundary
        whole = {i: -1 for i in range(a.ndim) if i != ax}
        if b is not None and self._overlap_fills(b, a.shape):
            inner = tuple(slice(h, n - h) for n in a.shape)
            x = _dask(a)[inner].rechunk({ax: tuple(hi - lo for lo, hi in self.parts), **whole})
            fill = OVERLAP_BOUNDARY.get(b.mode, b.value)
            return da.overlap.overlap(
                x, depth={i: h for i in range(a.ndim)}, boundary={i: fill for i in range(a.ndim)}
            )
        x = _dask(a)
        if b is not None:  # numpy's "reflect"
            inner = tuple(slice(h, n - h) for n in a.shape)
            x = da.pad(x[inner], h, mode=b.mode)
        x = x.rechunk({ax: self.sizes(), **whole})
        if not h:
            return x
        return da.overlap.overlap(
            x, depth={i: (h if i == ax else 0) for i in range(a.ndim)}, boundary="none"
        )

    def _overlap_fills(self, b: Boundary, shape: tuple[int, ...]) -> bool:
        """Dask's overlap can fill the ghosts: it knows the mode, and no
        block is thinner than the ghost layer."""
        h = self.halo
        return (
            b.mode in (*OVERLAP_BOUNDARY, "constant")
            and min(hi - lo for lo, hi in self.parts) >= h
            and all(n - 2 * h >= h for i, n in enumerate(shape) if i != self.axis)
        )

    def args(self, args: tuple, k: int) -> tuple:
        lo = self.parts[k][0] - self.halo
        return tuple(lo if v is row_offset else v for v in args)

    def own(self, block: np.ndarray, k: int) -> np.ndarray:
        """The rows of call ``k``'s block that call owns in the result."""
        lo = 0 if k == 0 else self.halo
        hi = block.shape[self.axis] - (0 if k == len(self.parts) - 1 else self.halo)
        return block[(slice(None),) * self.axis + (slice(lo, hi),)]


def _dask(a) -> da.Array:
    return a if isinstance(a, da.Array) else da.from_array(a, chunks=-1)


def _plan(kernel, arrays: tuple, args, halo, chunks, boundary, axis) -> _Plan:
    check_kernel(kernel)
    args = coerce_args(args)
    if not arrays:
        raise TypeError("shmarray.dask needs at least one array after the kernel.")
    for a in arrays:
        if not isinstance(a, (da.Array, np.ndarray)):
            raise TypeError(f"arrays must be dask or NumPy arrays; got {type(a).__name__}.")
    if any(a.ndim == 0 for a in arrays):
        raise ValueError("arrays need at least one dimension: map splits one axis.")
    axis = coerce_axis(axis, arrays)
    if any(a.ndim <= axis for a in arrays):
        raise ValueError(
            f"every array needs an axis {axis} to split; got "
            f"{[a.ndim for a in arrays]} dimensions."
        )
    lengths = [a.shape[axis] for a in arrays]
    if len(set(lengths)) > 1:
        raise ValueError(f"all arrays must have the same length along axis {axis}; got {lengths}.")
    check_placeholders(args)
    if any(v is worker_id for v in args):
        raise ValueError(
            "shmarray.worker_id has no meaning on Dask: its workers have no "
            "fixed index and run several blocks at once. Allocate scratch "
            "inside the kernel, or use the local Engine."
        )
    halo = coerce_halo(halo)
    b = coerce_boundary(boundary)
    if b is not None:
        check_boundary(b, arrays, halo)
    n = lengths[0]
    first = next((a for a in arrays if isinstance(a, da.Array)), None)
    if chunks is None and first is not None:
        chunks = _interior_sizes(first.chunks[axis], n, halo)
    parts = tuple(split_rows(n, chunks, halo, default=usable_cpus()))
    thin = [hi - lo for lo, hi in parts if hi - lo < halo]
    if len(parts) > 1 and thin:
        raise ValueError(
            f"on Dask every chunk needs at least halo={halo} rows (its overlap "
            f"takes the halo from the next chunk alone); chunks={chunks!r} "
            f"gives one of {thin[0]}. Pass fewer chunks."
        )
    return _Plan(axis, halo, b, parts)


def _interior_sizes(rows: tuple[int, ...], n: int, halo: int) -> tuple[int, ...] | None:
    """The interior rows of existing Dask chunks, as ``chunks=`` sizes."""
    edges = np.clip(np.cumsum((0,) + tuple(rows)), halo, n - halo)
    sizes = tuple(int(s) for s in np.diff(edges) if s)
    return sizes or None


def _call(kernel: Callable, plan: _Plan, args: tuple, *blocks, block_id=None):
    k = block_id[plan.axis]
    copies = [np.array(b, copy=True) for b in blocks]
    kernel(*copies, *plan.args(args, k))
    return plan.own(copies[0], k)


def map(
    kernel: Callable,
    *arrays,
    args=(),
    halo: int = 0,
    chunks=None,
    boundary=None,
    axis: int = 0,
    name: str | None = None,
):
    """The dask array of the first argument after
    ``kernel(*[a[lo-halo:hi+halo] for a in arrays], *args)`` ran on every
    chunk of rows along ``axis``, as ``Engine.map`` would leave it (with
    ``boundary``, ghost cells filled first as ``numpy.pad`` would).  Lazy:
    call ``.compute()`` (or ``.persist()``) on the scheduler of your choice.

    ``name``: the output's key name.  By default Dask derives it from the
    inputs, so mapping the same kernel over the same arrays again reuses a
    result still held in the cluster; a fresh name forces a new run.
    """
    plan = _plan(kernel, arrays, args, halo, chunks, boundary, axis)
    blocks = [plan.blocks(a) for a in arrays]
    first = arrays[0]
    out_chunks = tuple(plan.sizes() if i == plan.axis else (n,) for i, n in enumerate(first.shape))
    named = {} if name is None else {"name": name}
    return da.map_blocks(
        functools.partial(_call, kernel, plan, tuple(args)),
        *blocks,
        chunks=out_chunks,
        dtype=first.dtype,
        meta=np.empty((0,) * first.ndim, first.dtype),
        **named,
    )


def reduce(
    kernel: Callable,
    *arrays,
    args=(),
    combine: Callable = operator.add,
    halo: int = 0,
    chunks=None,
    boundary=None,
    axis: int = 0,
    scheduler=None,
) -> Any:
    """``Engine.reduce`` on Dask: the kernel's value for every chunk of rows
    along ``axis``, combined in chunk order.  Computes now, on ``scheduler``
    (default: the current one, such as an active ``distributed.Client``)."""
    check_combine(combine)
    plan = _plan(kernel, arrays, args, halo, chunks, boundary, axis)
    per_array = [
        np.moveaxis(plan.blocks(a).to_delayed(), plan.axis, 0).reshape(-1) for a in arrays
    ]
    call = dask.delayed(kernel, pure=True)
    parts = [call(*row, *plan.args(tuple(args), k)) for k, row in enumerate(zip(*per_array))]
    total = dask.delayed(functools.reduce, pure=True)(combine, parts)
    return total.compute(scheduler=scheduler)
