"""The workloads of ``shmarray bench``: for each, its data (``setup``) and
the functions that run it by every method (``runners``), sequentially
(``pools`` None) or with the pools of one worker count."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from shmarray import row_offset
from shmarray.kernels.elementwise import triad
from shmarray.kernels.irregular import mandelbrot
from shmarray.kernels.reductions import histogram
from shmarray.kernels.stencils import heat_step
from shmarray.kernels.table import heat_numpy, mandelbrot_numpy
from shmarray.report.peers import (
    ALPHA,
    _heat_block,
    _hist_block,
    _mandel_block,
    bounds_for,
    heat_chunk,
    heat_prange,
    hist_chunk,
    histogram_parts,
    mandel_chunk,
    mandelbrot_prange,
    noop_kernel,
    noop_prange,
    nothing,
    triad_chunk,
    triad_prange,
)

WORKLOADS = ("triad", "histogram", "heat", "mandelbrot", "noop")
MEMORY_BOUND = ("triad", "histogram", "heat")

SIZES = {  # per workload: sizes for --tiny (tests), --quick, and the full run
    "tiny": dict(
        triad=200_000,
        histogram=400_000,
        heat=(128, 5),
        mandelbrot=(60, 120, 50),
        noop=20,
        repeat=2,
    ),
    "quick": dict(
        triad=4_000_000,
        histogram=8_000_000,
        heat=(768, 10),
        mandelbrot=(300, 600, 100),
        noop=200,
        repeat=3,
    ),
    "full": dict(
        triad=20_000_000,
        histogram=50_000_000,
        heat=(2048, 20),
        mandelbrot=(600, 1200, 200),
        noop=300,
        repeat=5,
    ),
}
BINS = (-4.0, 4.0, 64)


def _setup_triad(n, pools):
    rng = np.random.default_rng(0)
    b, c = rng.random(n), rng.random(n)
    return {"b": b, "c": c, "s": 3.0}


def triad_runners(d, pools) -> dict[str, Callable]:
    b, c, s = d["b"], d["c"], d["s"]
    n = len(b)
    out = {}
    if pools is None:
        a1, a2 = np.empty(n), np.empty(n)
        out["numpy"] = lambda: np.add(b, np.multiply(s, c), out=a1)
        out["numba"] = lambda: (triad(a2, b, c, s), a2)[1]
        return out
    w = pools.workers
    a3 = np.empty(n)
    out["prange"] = lambda: (triad_prange(a3, b, c, s), a3)[1]
    parts = bounds_for(n, w)
    out["process_pool"] = lambda: np.concatenate(
        list(
            pools.ppe.map(
                triad_chunk,
                [b[lo:hi] for lo, hi in parts],
                [c[lo:hi] for lo, hi in parts],
                [s] * w,
            )
        )
    )
    from joblib import delayed

    out["joblib"] = lambda: np.concatenate(
        pools.joblib(delayed(triad_chunk)(b[lo:hi], c[lo:hi], s) for lo, hi in parts)
    )
    import dask.array as da

    db = da.from_array(b, chunks=(-(-n // w),))
    dc = da.from_array(c, chunks=(-(-n // w),))
    out["dask_threads"] = lambda: pools.dask(da.map_blocks(triad_chunk, db, dc, s, dtype=float))
    eng = pools.engine
    A, B, C = eng.empty(n), eng.from_numpy(b), eng.from_numpy(c)
    out["shmarray"] = lambda: (eng.map(triad, A, B, C, args=(s,)), A)[1]
    return out


def _setup_histogram(n, pools):
    return {"x": np.random.default_rng(1).standard_normal(n)}


def histogram_runners(d, pools):
    x = d["x"]
    lo, hi, nbins = BINS
    n = len(x)
    if pools is None:
        return {
            "numpy": lambda: np.histogram(x, nbins, (lo, hi))[0],
            "numba": lambda: histogram(x, lo, hi, nbins),
        }
    w = pools.workers
    parts = bounds_for(n, w)
    edges = np.array([p[0] for p in parts] + [n], np.int64)
    out = {"prange": lambda: histogram_parts(x, edges, lo, hi, nbins).sum(axis=0)}
    out["process_pool"] = lambda: sum(
        pools.ppe.map(hist_chunk, [x[a:b] for a, b in parts], [lo] * w, [hi] * w, [nbins] * w)
    )
    from joblib import delayed

    out["joblib"] = lambda: sum(
        pools.joblib(delayed(hist_chunk)(x[a:b], lo, hi, nbins) for a, b in parts)
    )
    import dask.array as da

    dx = da.from_array(x, chunks=(-(-n // w),))
    nblocks = len(dx.chunks[0])
    partial = dx.map_blocks(
        _hist_block, lo, hi, nbins, dtype=np.int64, chunks=((nbins,) * nblocks,)
    )
    out["dask_threads"] = lambda: pools.dask(partial).reshape(nblocks, nbins).sum(axis=0)
    eng = pools.engine
    X = eng.from_numpy(x)
    out["shmarray"] = lambda: eng.reduce(histogram, X, args=(lo, hi, nbins))
    return out


def _setup_heat(size, pools):
    n, steps = size
    u = np.zeros((n, n))
    u[n // 4 : 3 * n // 4, n // 4 : 3 * n // 4] = 100.0
    u += np.random.default_rng(2).random((n, n))
    return {"u": u, "steps": steps}


def heat_runners(d, pools):
    u, steps = d["u"], d["steps"]
    n = u.shape[0]

    def loop(step, a, b):
        def run():
            np.copyto(a, u)
            np.copyto(b, u)
            x, y = a, b
            for _ in range(steps):
                step(y, x)
                x, y = y, x
            return x

        return run

    if pools is None:
        return {
            "numpy": loop(lambda o, i: heat_numpy(o, i, ALPHA), u.copy(), u.copy()),
            "numba": loop(lambda o, i: heat_step(o, i, ALPHA), u.copy(), u.copy()),
        }
    w = pools.workers
    parts = bounds_for(n - 2, w)

    def chunked(mapper):
        def run():
            cur = u.copy()
            for _ in range(steps):
                pieces = mapper([cur[lo : hi + 2] for lo, hi in parts])
                nxt = cur.copy()
                nxt[1:-1] = np.concatenate(list(pieces))
                cur = nxt
            return cur

        return run

    from joblib import delayed

    out = {
        "prange": loop(lambda o, i: heat_prange(o, i, ALPHA), u.copy(), u.copy()),
        "process_pool": chunked(lambda xs: pools.ppe.map(heat_chunk, xs)),
        "joblib": chunked(lambda xs: pools.joblib(delayed(heat_chunk)(x) for x in xs)),
    }
    import dask.array as da

    def dask_run():
        cur = u
        for _ in range(steps):
            d = da.from_array(cur, chunks=(-(-n // w), n))
            cur = pools.dask(
                d.map_overlap(_heat_block, depth={0: 1, 1: 0}, boundary="none", dtype=float)
            )
        return cur

    out["dask_threads"] = dask_run
    eng = pools.engine
    A, B = eng.from_numpy(u), eng.from_numpy(u)
    out["shmarray"] = loop(lambda o, i: eng.map(heat_step, o, i, args=(ALPHA,), halo=1), A, B)
    return out


def _setup_mandelbrot(size, pools):
    h, w, iters = size
    return {"h": h, "w": w, "args": (-2.0, 3.0 / w, -0.2, 1.0 / h, iters)}


def mandelbrot_runners(d, pools):
    h, w, args = d["h"], d["w"], d["args"]
    if pools is None:
        img = np.zeros((h, w), np.int32)
        return {
            "numpy": lambda: mandelbrot_numpy((h, w), np.arange(h), args),
            "numba": lambda: (mandelbrot(img, 0, *args), img)[1],
        }
    k = pools.workers
    img2 = np.zeros((h, w), np.int32)
    parts = bounds_for(h, 8 * k)  # irregular: more chunks than workers
    out = {"prange": lambda: (mandelbrot_prange(img2, *args), img2)[1]}
    out["process_pool"] = lambda: np.concatenate(
        list(pools.ppe.map(mandel_chunk, *zip(*[(lo, hi, w, args) for lo, hi in parts])))
    )
    from joblib import delayed

    out["joblib"] = lambda: np.concatenate(
        pools.joblib(delayed(mandel_chunk)(lo, hi, w, args) for lo, hi in parts)
    )
    import dask.array as da

    blank = da.zeros((h, w), dtype=np.int32, chunks=(-(-h // (8 * k)), w))
    out["dask_threads"] = lambda: pools.dask(blank.map_blocks(_mandel_block, args, dtype=np.int32))
    eng = pools.engine
    IMG = eng.zeros((h, w), np.int32)
    out["shmarray"] = lambda: (
        eng.map(mandelbrot, IMG, args=(row_offset, *args), schedule="dynamic"),
        IMG,
    )[1]
    return out


def _setup_noop(calls, pools):
    return {"calls": calls}


def noop_runners(d, pools):
    calls = d["calls"]

    def repeat(fn):
        def run():
            for _ in range(calls):
                fn()

        return run

    x = np.zeros(16)
    if pools is None:
        return {"numba": repeat(lambda: noop_kernel(x))}
    import dask
    from joblib import delayed

    eng = pools.engine
    X = eng.zeros(16)
    return {
        "prange": repeat(lambda: noop_prange(x)),
        "process_pool": repeat(lambda: pools.ppe.submit(nothing).result()),
        "joblib": repeat(lambda: pools.joblib([delayed(nothing)()])),
        "dask_threads": repeat(
            lambda: dask.delayed(nothing)().compute(scheduler="threads", num_workers=pools.workers)
        ),
        "shmarray": repeat(lambda: eng.map(noop_kernel, X, chunks=1)),
    }


SETUP = {
    "triad": (_setup_triad, triad_runners),
    "histogram": (_setup_histogram, histogram_runners),
    "heat": (_setup_heat, heat_runners),
    "mandelbrot": (_setup_mandelbrot, mandelbrot_runners),
    "noop": (_setup_noop, noop_runners),
}


def nbytes_moved(workload: str, d: dict) -> int | None:
    """Bytes a run reads and writes, each array counted once per pass."""
    if workload == "triad":
        return 3 * d["b"].nbytes
    if workload == "histogram":
        return d["x"].nbytes
    if workload == "heat":
        return 2 * d["u"].nbytes * d["steps"]
    return None
