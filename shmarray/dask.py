"""The same kernels, with the same semantics, on Dask.

When one machine is not enough, ``shmarray.dask.map`` and
``shmarray.dask.reduce`` run an Engine kernel over ``dask.array`` blocks on
whatever scheduler is current: a ``dask.distributed`` cluster at any address
(``Client("tcp://...")``), a ``LocalCluster``, or Dask's threads.  Dask owns
scheduling, data movement and worker failure; this module only maps the
Engine's semantics onto it:

* rows are chunked along axis 0 (other axes are one chunk each);
* kernels work in place, on a copy of each block; ``map`` returns the dask
  array of the first argument as the kernel leaves it;
* ``halo=h`` becomes ``map_overlap`` with depth ``h`` along axis 0 and no
  boundary padding, so every kernel call sees exactly the rows an Engine
  chunk would;
* ``reduce`` combines the per-block values in block order.

``chunks`` means what it means for ``Engine.map``: a number of chunks or a
sequence of sizes of the *interior* rows (``n - 2*halo``).  The first and
last Dask blocks also hold the ``halo`` rows at the array's edges, so the
same ``chunks`` gives the same kernel calls, and bit-identical results, on
both.  Unlike the local engine, Dask moves block data between processes and
nodes: use it when the data or the work outgrows one machine.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Callable

import numpy as np

try:
    import dask
    import dask.array as da
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError("shmarray.dask needs Dask: pip install 'shmarray[dask]'") from exc

from shmarray.partition import coerce_halo, split_rows
from shmarray.pool import usable_cpus

__all__ = ["map", "reduce", "row_chunks"]


def row_chunks(n_rows: int, chunks: object, halo: int) -> tuple[int, ...]:
    """Dask row-chunk sizes for Engine-style ``chunks`` over ``n_rows``.

    >>> row_chunks(10, 2, 1)           # interior rows 1..9 in two chunks of 4
    (5, 5)
    >>> row_chunks(10, (2, 6), 1)
    (3, 7)
    """
    parts = split_rows(n_rows, chunks, halo, default=usable_cpus())
    sizes = [hi - lo for lo, hi in parts]
    sizes[0] += halo
    sizes[-1] += halo
    return tuple(s for s in sizes if s) or (n_rows,)


def _as_dask(arrays: tuple, chunks: object, halo: int) -> list:
    if not arrays:
        raise TypeError("shmarray.dask needs at least one array after the kernel.")
    for a in arrays:
        if not isinstance(a, (da.Array, np.ndarray)):
            raise TypeError(f"arrays must be dask or NumPy arrays; got "
                            f"{type(a).__name__}.")
    lengths = {a.shape[0] if a.ndim else None for a in arrays}
    if None in lengths:
        raise ValueError("arrays need at least one dimension: map splits axis 0.")
    if len(lengths) > 1:
        raise ValueError(f"all arrays must have the same length along axis 0; got "
                         f"{[a.shape[0] for a in arrays]}.")
    n = arrays[0].shape[0]
    first = next((a for a in arrays if isinstance(a, da.Array)), None)
    if chunks is None and first is not None:
        rows = first.chunks[0]
    else:
        rows = row_chunks(n, chunks, halo)
    out = []
    for a in arrays:
        if isinstance(a, da.Array):
            a = a.rechunk((rows,) + tuple(-1 for _ in a.shape[1:]))
        else:
            a = da.from_array(a, chunks=(rows,) + tuple(-1 for _ in a.shape[1:]))
        out.append(a)
    return out


def _in_place(kernel: Callable, args: tuple, *blocks):
    copies = [np.array(b, copy=True) for b in blocks]
    kernel(*copies, *args)
    return copies[0]


def map(kernel: Callable, *arrays, args=(), halo: int = 0, chunks=None,
        name: str | None = None):
    """The dask array of the first argument after
    ``kernel(*[a[lo-halo:hi+halo] for a in arrays], *args)`` ran on every
    chunk of rows, as ``Engine.map`` would leave it.  Lazy: call
    ``.compute()`` (or ``.persist()``) on the scheduler of your choice.

    ``name``: the output's key name.  By default Dask derives it from the
    inputs, so mapping the same kernel over the same arrays again reuses a
    result still held in the cluster; a fresh name forces a new run.
    """
    if not callable(kernel):
        raise TypeError(f"kernel must be callable; got {kernel!r}.")
    if not isinstance(args, (tuple, list)):
        raise TypeError(f"args must be a tuple; write args=({args!r},) for one.")
    halo = coerce_halo(halo)
    blocks = _as_dask(arrays, chunks, halo)
    fn = functools.partial(_in_place, kernel, tuple(args))
    first = blocks[0]
    named = {} if name is None else {"name": name}
    meta = np.empty((0,) * first.ndim, first.dtype)
    if halo == 0:
        return da.map_blocks(fn, *blocks, dtype=first.dtype, chunks=first.chunks,
                             meta=meta, **named)
    depth = [{0: halo, **{i: 0 for i in range(1, b.ndim)}} for b in blocks]
    return da.map_overlap(fn, *blocks, depth=depth, boundary="none", trim=True,
                          dtype=first.dtype, align_arrays=False, meta=meta, **named)


def reduce(kernel: Callable, *arrays, args=(), combine: Callable = operator.add,
           halo: int = 0, chunks=None, scheduler=None) -> Any:
    """``Engine.reduce`` on Dask: the kernel's value for every chunk of rows,
    combined in chunk order.  Computes now, on ``scheduler`` (default: the
    current one, such as an active ``distributed.Client``)."""
    if not callable(kernel) or not callable(combine):
        raise TypeError("kernel and combine must be callable.")
    if not isinstance(args, (tuple, list)):
        raise TypeError(f"args must be a tuple; write args=({args!r},) for one.")
    halo = coerce_halo(halo)
    blocks = _as_dask(arrays, chunks, halo)
    if halo:
        blocks = [da.overlap.overlap(b, depth={0: halo, **{i: 0 for i in range(1, b.ndim)}},
                                     boundary="none") for b in blocks]
    per_array = [b.to_delayed().reshape(-1) for b in blocks]
    call = dask.delayed(kernel, pure=True)
    parts = [call(*row, *args) for row in zip(*per_array)]
    total = dask.delayed(functools.reduce, pure=True)(combine, parts)
    return total.compute(scheduler=scheduler)
