"""A library of numba kernels for shmarray.

Every kernel is a plain ``@njit`` loop body that writes into its output in
place and allocates nothing in its hot loop, so the same function runs
sequentially on whole arrays and, through ``Engine.map`` /
``Engine.reduce``, on chunks of rows.  Call them directly, or through
:func:`run`, which checks the arguments against :data:`TABLE` first and
applies each reduction's combine and finish steps.

Kernels that need their global position (Mandelbrot rows, Monte Carlo
streams, the index of a minimum, a transpose) take ``row_offset``: 0
sequentially, ``shmarray.row_offset`` through the engine, which fills in
the global index of the chunk's first row.  Table entries with a
``boundary`` run on arrays that carry ghost cells, filled first as
``numpy.pad`` would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from shmarray import boundary
from shmarray.descriptors import row_offset, worker_id
from shmarray.kernels.table import TABLE, KernelSpec, mandelbrot_args, spec_of

__all__ = ["TABLE", "KernelSpec", "run", "standardize", "spec_of", "mandelbrot_args"]

_KINDS = {"f": ("f",), "i": ("i", "u"), "u": ("u", "i", "b")}
_KIND_NAMES = {
    "f": "a floating dtype (float32 or float64)",
    "i": "an integer dtype",
    "u": "an integer or bool dtype (0/1 cells)",
}


def check_arguments(spec: KernelSpec, arrays: tuple, args: tuple) -> None:
    """Raise TypeError/ValueError naming the kernel and the parameter when
    ``arrays``/``args`` do not fit ``spec``."""
    params = spec.params()
    n_arr = len(spec.arrays)
    array_names, arg_names = params[:n_arr], params[n_arr:]
    if len(arrays) != n_arr or len(args) != len(arg_names):
        raise TypeError(
            f"kernels.{spec.name} takes {n_arr} array(s) ({', '.join(array_names)}) "
            f"and {len(arg_names)} argument(s) in args ({', '.join(arg_names) or 'none'}); "
            f"got {len(arrays)} array(s) and {len(args)} argument(s)."
        )
    for a, name, want in zip(arrays, array_names, spec.arrays):
        kind, ndim = want[0], int(want[1])
        if not isinstance(a, np.ndarray):
            raise TypeError(
                f"kernels.{spec.name}: {name} must be a NumPy array; got {type(a).__name__}."
            )
        if a.dtype.kind not in _KINDS[kind]:
            raise TypeError(
                f"kernels.{spec.name}: {name} has dtype {a.dtype}; expected "
                f"{_KIND_NAMES[kind]}. Convert with {name}.astype(...) or "
                f"allocate it with the right dtype."
            )
        if a.ndim != ndim:
            raise ValueError(f"kernels.{spec.name}: {name} must be {ndim}-D; got shape {a.shape}.")
    lengths = {a.shape[0] for a in arrays}
    if len(lengths) > 1:
        raise ValueError(
            f"kernels.{spec.name}: arrays must have the same number of rows; got "
            + ", ".join(f"{n} {a.shape}" for n, a in zip(array_names, arrays))
            + "."
        )
    top = max(a.ndim for a in arrays)
    shapes = {a.shape for a in arrays if a.ndim == top}
    if spec.same_shape and len(shapes) > 1:
        raise ValueError(
            f"kernels.{spec.name}: mismatched shapes "
            + ", ".join(f"{n} {a.shape}" for n, a in zip(array_names, arrays) if a.ndim == top)
            + "; they must be equal."
        )
    if spec.check is not None:
        spec.check(arrays, args)
    halo = spec.halo_for(args)
    rows = arrays[0].shape[0]
    if halo and rows < 2 * halo + 1:
        raise ValueError(
            f"kernels.{spec.name} reaches {halo} row(s) to each side, so it needs "
            f"at least {2 * halo + 1} rows; the arrays have {rows}."
        )


def run(
    kernel: Callable,
    *arrays: np.ndarray,
    args: tuple = (),
    engine=None,
    chunks=None,
    schedule: str | None = None,
    notes: str | None = None,
) -> Any:
    """Check the arguments, then run ``kernel`` sequentially (``engine=None``)
    or through ``engine`` with the table's halo, combine and schedule.

    Returns None for a map, the finished value for a reduction (for example
    the variance for :func:`kernels.reductions.moments`).

    >>> import numpy as np
    >>> from shmarray import kernels
    >>> from shmarray.kernels.reductions import moments
    >>> float(kernels.run(moments, np.array([1.0, 2.0, 3.0, 4.0])))
    1.25
    """
    spec = spec_of(kernel, notes)
    args = tuple(args)
    check_arguments(spec, arrays, args)
    halo = spec.halo_for(args)
    if engine is None:
        # What the engine does first, and what it fills in for each chunk.
        if spec.boundary is not None:
            for a in arrays:
                boundary.fill(a, halo, spec.boundary)
        result = kernel(*arrays, *[0 if a is row_offset or a is worker_id else a for a in args])
    elif spec.kind == "map":
        engine.map(
            kernel,
            *arrays,
            args=args,
            halo=halo,
            chunks=chunks,
            schedule=schedule or spec.schedule,
            boundary=spec.boundary,
        )
        return None
    else:
        result = engine.reduce(
            kernel,
            *arrays,
            args=args,
            combine=spec.combine,
            halo=halo,
            chunks=chunks,
            schedule=schedule or spec.schedule,
            boundary=spec.boundary,
        )
    return spec.finish(result) if spec.kind == "reduce" else None


def standardize(out: np.ndarray, x: np.ndarray, engine=None, chunks=None) -> tuple[float, float]:
    """``out = (x - mean) / std`` in two passes: mergeable moments, then the
    fused normalize.  Returns ``(mean, std)``."""
    from shmarray.kernels.elementwise import normalize
    from shmarray.kernels.reductions import combine_moments, moments

    if engine is None:
        n, mean, m2 = moments(x)
    else:
        n, mean, m2 = engine.reduce(moments, x, combine=combine_moments, chunks=chunks)
    std = float(np.sqrt(m2 / n)) if n else float("nan")
    run(normalize, out, x, args=(mean, std), engine=engine, chunks=chunks)
    return mean, std
