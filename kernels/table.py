"""Every kernel with its NumPy reference, its inputs and its checks.

The tests and the benchmarks both read this table, so neither drifts from
the other.  :func:`shmarray.kernels.run` uses it to check arguments.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from shmarray.descriptors import row_offset
from shmarray.kernels import (
    elementwise as ew,
    irregular,
    linalg,
    montecarlo,
    reductions as rd,
    stencils as st,
)


@dataclass(frozen=True)
class KernelSpec:
    """How to call one kernel, check its arguments and verify its result."""

    kernel: Callable
    kind: str  # "map" or "reduce"
    inputs: Callable[[np.random.Generator, int], tuple[tuple, tuple]]
    reference: Callable[[tuple, tuple], Any]  # NumPy: (arrays, args) -> result
    arrays: tuple[str, ...]  # per array: dtype kind and ndim, "f2"
    halo: int | Callable[[tuple], int] = 0  # or a function of the args
    combine: Callable = operator.add
    finish: Callable = lambda partial: partial  # noqa: E731
    rtol: float = 0.0  # against the NumPy reference
    atol: float = 0.0
    schedule: str = "static"
    check: Callable[[tuple, tuple], None] | None = None  # extra argument checks
    same_shape: bool = True  # arrays of the top ndim share a shape
    out: int | None = 0  # the array a map writes
    out_arg: int | None = None  # or the argument (a whole array) it writes
    boundary: str | float | None = None  # ghost cells filled as numpy.pad would
    notes: str = ""

    @property
    def name(self) -> str:
        return self.kernel.__name__

    def params(self) -> tuple[str, ...]:
        return tuple(inspect.signature(self.kernel.py_func).parameters)

    def halo_for(self, args: tuple) -> int:
        return self.halo(args) if callable(self.halo) else self.halo


def _f64(rng, *shape):
    return rng.standard_normal(shape)


def _rows(n):
    return np.arange(n, dtype=np.int64)


def _stencil_ref(core):
    def ref(arrays, args):
        out, inp = (a.copy() for a in arrays)
        core(out, inp, *args)
        return out

    return ref


def _jacobi_ref(out, inp):
    out[1:-1, 1:-1] = 0.25 * (inp[:-2, 1:-1] + inp[2:, 1:-1] + inp[1:-1, :-2] + inp[1:-1, 2:])


def heat_numpy(out, inp, alpha):
    """One 2-D heat step in NumPy, the same arithmetic as ``heat_step``."""
    c = inp[1:-1, 1:-1]
    out[1:-1, 1:-1] = c + alpha * (
        inp[:-2, 1:-1] + inp[2:, 1:-1] + inp[1:-1, :-2] + inp[1:-1, 2:] - 4.0 * c
    )


def _heat3d_ref(out, inp, alpha):
    c = inp[1:-1, 1:-1, 1:-1]
    out[1:-1, 1:-1, 1:-1] = c + alpha * (
        inp[:-2, 1:-1, 1:-1]
        + inp[2:, 1:-1, 1:-1]
        + inp[1:-1, :-2, 1:-1]
        + inp[1:-1, 2:, 1:-1]
        + inp[1:-1, 1:-1, :-2]
        + inp[1:-1, 1:-1, 2:]
        - 6.0 * c
    )


def _convolve_ref(out, inp, w):
    r = w.shape[0] // 2
    n, m = inp.shape
    acc = np.zeros((n - 2 * r, m - 2 * r))
    for di in range(-r, r + 1):
        for dj in range(-r, r + 1):
            acc += w[di + r, dj + r] * inp[r + di : n - r + di, r + dj : m - r + dj]
    out[r : n - r, r : m - r] = acc


def _life_ref(out, inp):
    live = np.zeros((inp.shape[0] - 2, inp.shape[1] - 2), np.int64)
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            if di or dj:
                live += inp[1 + di : inp.shape[0] - 1 + di, 1 + dj : inp.shape[1] - 1 + dj] != 0
    alive = inp[1:-1, 1:-1] != 0
    out[1:-1, 1:-1] = (alive & ((live == 2) | (live == 3))) | (~alive & (live == 3))


def mandelbrot_numpy(shape, rows, args):
    """Escape-time counts in NumPy, the same arithmetic as ``mandelbrot``."""
    x0, dx, y0, dy, max_iter = args
    cr = x0 + np.arange(shape[1]) * dx
    ci = y0 + np.asarray(rows).astype(np.float64) * dy
    cr, ci = np.broadcast_arrays(cr[None, :], ci[:, None])
    zr, zi = np.zeros_like(cr), np.zeros_like(cr)
    counts = np.zeros(cr.shape, np.int32)
    active = np.ones(cr.shape, bool)
    for _ in range(max_iter):
        active &= zr * zr + zi * zi <= 4.0
        if not active.any():
            break
        zr, zi = (
            np.where(active, zr * zr - zi * zi + cr, zr),
            np.where(active, 2.0 * zr * zi + ci, zi),
        )
        counts += active
    return counts


def _mandelbrot_ref(arrays, args):
    (out,) = arrays
    return mandelbrot_numpy(out.shape, np.arange(out.shape[0]), args[1:]).astype(out.dtype)


def _pi_ref(arrays, args):
    (counts,) = arrays
    _, samples, seed = args
    hits = 0
    for r in range(counts.shape[0]):
        u = np.random.RandomState(int(montecarlo.row_seed(seed, r))).random_sample(2 * samples)
        hits += int(np.count_nonzero(u[0::2] ** 2 + u[1::2] ** 2 <= 1.0))
    return hits


def _walks_ref(arrays, args):
    (out,) = arrays
    _, seed = args
    return np.stack(
        [
            np.cumsum(
                np.random.RandomState(int(montecarlo.row_seed(seed, r))).standard_normal(
                    out.shape[1]
                )
            )
            for r in range(out.shape[0])
        ]
    )


def _ghosted(rng, n, m, h=1):
    """A (n, m) array whose ghost cells (h on each side) hold garbage: the
    boundary fill must overwrite them."""
    a = rng.standard_normal((n, m))
    a[:h], a[-h:], a[:, :h], a[:, -h:] = 1e300, -1e300, 7e299, -7e299
    return a


def _padded_ref(core, mode, h=1):
    """Fill the ghosts as numpy.pad would, then run ``core``."""

    def ref(arrays, args):
        out, inp = (a.copy() for a in arrays)
        inner = inp[h:-h, h:-h]
        inp = np.pad(inner, h, mode)
        core(out, inp, *args)
        return out

    return ref


def _check_weights(arrays, args):
    (w,) = args
    w = np.asarray(w)
    if w.ndim != 2 or w.shape[0] != w.shape[1] or w.shape[0] % 2 == 0:
        raise ValueError(
            f"convolve: weights must be a square array of odd size (3x3, "
            f"5x5, ...); got shape {w.shape}."
        )


def _radius(args) -> int:
    return np.asarray(args[0]).shape[0] // 2


def _check_matmul(arrays, args):
    c, a = arrays
    (b,) = args
    if a.shape[1] != b.shape[0] or c.shape != (a.shape[0], b.shape[1]):
        raise ValueError(
            f"matmul_rows: shapes do not chain: c {c.shape} = a {a.shape} @ "
            f"b {b.shape}; need c (n, m), a (n, k), b (k, m)."
        )


def _check_histogram(arrays, args):
    lo, hi, nbins = args
    if not hi > lo or int(nbins) < 1:
        raise ValueError(
            f"histogram: need lo < hi and nbins >= 1; got lo={lo!r}, hi={hi!r}, nbins={nbins!r}."
        )


def mandelbrot_args(height: int, width: int, max_iter: int = 300) -> tuple:
    """The view arguments of :func:`kernels.irregular.mandelbrot` (after its
    ``row_offset``) for the usual view of the set ([-2, 1] x [-1.5, 1.5]) on
    a ``height`` x ``width`` image."""
    return (-2.0, 3.0 / width, -1.5, 3.0 / height, max_iter)


TABLE: tuple[KernelSpec, ...] = (
    KernelSpec(
        ew.axpy,
        "map",
        arrays=("f1", "f1"),
        rtol=1e-15,
        inputs=lambda rng, n: ((_f64(rng, n), _f64(rng, n)), (2.5,)),
        reference=lambda a, p: a[0] + p[0] * a[1],
    ),
    KernelSpec(
        ew.triad,
        "map",
        arrays=("f1", "f1", "f1"),
        rtol=1e-15,
        inputs=lambda rng, n: ((np.zeros(n), _f64(rng, n), _f64(rng, n)), (3.0,)),
        reference=lambda a, p: a[1] + p[0] * a[2],
    ),
    KernelSpec(
        ew.scale,
        "map",
        arrays=("f1", "f1"),
        inputs=lambda rng, n: ((np.zeros(n), _f64(rng, n)), (0.5,)),
        reference=lambda a, p: p[0] * a[1],
    ),
    KernelSpec(
        ew.clip,
        "map",
        arrays=("f1", "f1"),
        inputs=lambda rng, n: ((np.zeros(n), _f64(rng, n)), (-0.5, 0.7)),
        reference=lambda a, p: np.clip(a[1], *p),
    ),
    KernelSpec(
        ew.normalize,
        "map",
        arrays=("f1", "f1"),
        rtol=1e-15,
        inputs=lambda rng, n: ((np.zeros(n), _f64(rng, n) * 3 + 1), (1.0, 3.0)),
        reference=lambda a, p: (a[1] - p[0]) / p[1],
    ),
    KernelSpec(
        rd.total,
        "reduce",
        arrays=("f1",),
        rtol=1e-9,
        out=None,
        inputs=lambda rng, n: ((_f64(rng, n),), ()),
        reference=lambda a, p: np.sum(a[0]),
    ),
    KernelSpec(
        rd.dot,
        "reduce",
        arrays=("f1", "f1"),
        rtol=1e-9,
        out=None,
        inputs=lambda rng, n: ((_f64(rng, n), _f64(rng, n)), ()),
        reference=lambda a, p: np.dot(a[0], a[1]),
    ),
    KernelSpec(
        rd.min_index,
        "reduce",
        arrays=("f1",),
        out=None,
        combine=rd.combine_min,
        inputs=lambda rng, n: ((np.round(_f64(rng, n), 1),), (row_offset,)),
        reference=lambda a, p: (a[0].min(), int(np.argmin(a[0]))) if len(a[0]) else (np.inf, -1),
    ),
    KernelSpec(
        rd.max_index,
        "reduce",
        arrays=("f1",),
        out=None,
        combine=rd.combine_max,
        inputs=lambda rng, n: ((np.round(_f64(rng, n), 1),), (row_offset,)),
        reference=lambda a, p: (a[0].max(), int(np.argmax(a[0]))) if len(a[0]) else (-np.inf, -1),
    ),
    KernelSpec(
        rd.moments,
        "reduce",
        arrays=("f1",),
        rtol=1e-9,
        out=None,
        combine=rd.combine_moments,
        finish=rd.variance,
        inputs=lambda rng, n: ((_f64(rng, n) * 2 + 5,), ()),
        reference=lambda a, p: np.var(a[0]),
    ),
    KernelSpec(
        rd.histogram,
        "reduce",
        arrays=("f1",),
        out=None,
        check=_check_histogram,
        inputs=lambda rng, n: ((_f64(rng, n),), (-2.0, 2.0, 37)),
        reference=lambda a, p: np.histogram(a[0], p[2], (p[0], p[1]))[0],
    ),
    KernelSpec(
        st.jacobi,
        "map",
        arrays=("f2", "f2"),
        halo=1,
        inputs=lambda rng, n: ((_f64(rng, n, 37), _f64(rng, n, 37)), ()),
        reference=_stencil_ref(_jacobi_ref),
    ),
    KernelSpec(
        st.heat_step,
        "map",
        arrays=("f2", "f2"),
        halo=1,
        inputs=lambda rng, n: ((_f64(rng, n, 37), _f64(rng, n, 37)), (0.2,)),
        reference=_stencil_ref(heat_numpy),
    ),
    KernelSpec(
        st.heat_step,
        "map",
        arrays=("f2", "f2"),
        halo=1,
        boundary="wrap",
        notes="periodic heat step",
        inputs=lambda rng, n: ((np.zeros((n, 39)), _ghosted(rng, n, 39)), (0.2,)),
        reference=_padded_ref(heat_numpy, "wrap"),
    ),
    KernelSpec(
        st.heat3d_step,
        "map",
        arrays=("f3", "f3"),
        halo=1,
        rtol=1e-14,
        inputs=lambda rng, n: ((_f64(rng, n, 9, 11), _f64(rng, n, 9, 11)), (0.1,)),
        reference=_stencil_ref(_heat3d_ref),
    ),
    KernelSpec(
        st.convolve,
        "map",
        arrays=("f2", "f2"),
        halo=_radius,
        rtol=1e-14,
        check=_check_weights,
        notes="3x3 Gaussian blur",
        inputs=lambda rng, n: ((np.zeros((n, 41)), _f64(rng, n, 41)), (st.GAUSS3,)),
        reference=_stencil_ref(_convolve_ref),
    ),
    KernelSpec(
        st.convolve,
        "map",
        arrays=("f2", "f2"),
        halo=_radius,
        rtol=1e-14,
        check=_check_weights,
        notes="5x5 Gaussian blur",
        inputs=lambda rng, n: ((np.zeros((n, 41)), _f64(rng, n, 41)), (st.GAUSS5,)),
        reference=_stencil_ref(_convolve_ref),
    ),
    KernelSpec(
        st.convolve,
        "map",
        arrays=("f2", "f2"),
        halo=_radius,
        rtol=1e-14,
        check=_check_weights,
        boundary="reflect",
        notes="reflecting 3x3 blur",
        inputs=lambda rng, n: ((np.zeros((n, 41)), _ghosted(rng, n, 41)), (st.GAUSS3,)),
        reference=_padded_ref(lambda o, i, w: _convolve_ref(o, i, w), "reflect"),
    ),
    KernelSpec(
        st.life_step,
        "map",
        arrays=("u2", "u2"),
        halo=1,
        inputs=lambda rng, n: (
            (np.zeros((n, 43), np.uint8), (rng.random((n, 43)) < 0.35).astype(np.uint8)),
            (),
        ),
        reference=_stencil_ref(_life_ref),
    ),
    KernelSpec(
        irregular.mandelbrot,
        "map",
        arrays=("i2",),
        schedule="dynamic",
        inputs=lambda rng, n: (
            (np.zeros((n, 64), np.int32),),
            (row_offset, *mandelbrot_args(n, 64, 200)),
        ),
        reference=_mandelbrot_ref,
    ),
    KernelSpec(
        montecarlo.pi_hits,
        "reduce",
        arrays=("i1",),
        out=None,
        inputs=lambda rng, n: ((np.zeros(n, np.int64),), (row_offset, 200, 42)),
        reference=_pi_ref,
    ),
    KernelSpec(
        montecarlo.random_walks,
        "map",
        arrays=("f2",),
        rtol=1e-12,
        inputs=lambda rng, n: ((np.zeros((n, 50)),), (row_offset, 7)),
        reference=_walks_ref,
    ),
    KernelSpec(
        linalg.transpose_rows,
        "map",
        arrays=("f2",),
        out=None,
        out_arg=0,
        inputs=lambda rng, n: ((_f64(rng, n, 70),), (np.zeros((70, n)), row_offset)),
        reference=lambda a, p: a[0].T,
    ),
    KernelSpec(
        linalg.matmul_rows,
        "map",
        arrays=("f2", "f2"),
        rtol=1e-12,
        atol=1e-12,
        check=_check_matmul,
        same_shape=False,
        inputs=lambda rng, n: ((np.zeros((n, 29)), _f64(rng, n, 150)), (_f64(rng, 150, 29),)),
        reference=lambda a, p: a[1] @ p[0],
    ),
)


def spec_of(kernel: Callable, notes: str | None = None) -> KernelSpec:
    """The table entry of ``kernel`` (the first, unless ``notes`` picks one)."""
    for spec in TABLE:
        if spec.kernel is kernel and (notes is None or spec.notes == notes):
            return spec
    raise KeyError(f"{getattr(kernel, '__name__', kernel)!r} is not in shmarray.kernels.TABLE")
