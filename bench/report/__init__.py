"""``shmarray bench``: every workload through every method, in one process.

Methods: sequential NumPy, sequential numba, numba ``prange``, the pickling
``ProcessPoolExecutor`` pattern (chunks sent as arguments, results sent
back), joblib/loky with its automatic memmapping, Dask's threaded scheduler
running the same numba kernels through ``map_blocks``/``map_overlap``, and
shmarray.  Workloads: STREAM triad, a histogram (a reduction), an iterated
heat stencil, Mandelbrot, and a no-op dispatch.  Parallel methods sweep
1..usable CPUs workers.  Every result is checked equal to sequential
numba's; integer and elementwise workloads were chosen so that "equal"
means bit for bit for every method.

Timings are medians over rounds in which the methods alternate, so drift on
a shared machine hits all of them alike.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numba
import numpy as np
from numba import njit, prange

from shmarray import row_offset
from shmarray.kernels.elementwise import triad
from shmarray.kernels.irregular import escape_row, mandelbrot
from shmarray.kernels.reductions import histogram
from shmarray.kernels.stencils import heat_step
from shmarray.kernels.table import heat_numpy, mandelbrot_numpy

METHODS = ("numpy", "numba", "prange", "process_pool", "joblib", "dask_threads", "shmarray")
SEQUENTIAL = ("numpy", "numba")
WORKLOADS = ("triad", "histogram", "heat", "mandelbrot", "noop")
MEMORY_BOUND = ("triad", "histogram", "heat")

SIZES = {   # per workload: sizes for --tiny (tests), --quick, and the full run
    "tiny": dict(triad=200_000, histogram=400_000, heat=(128, 5), mandelbrot=(60, 120, 50),
                 noop=20, repeat=2),
    "quick": dict(triad=4_000_000, histogram=8_000_000, heat=(768, 10),
                  mandelbrot=(300, 600, 100), noop=200, repeat=3),
    "full": dict(triad=20_000_000, histogram=50_000_000, heat=(2048, 20),
                 mandelbrot=(600, 1200, 200), noop=300, repeat=5),
}
ALPHA = 0.2
BINS = (-4.0, 4.0, 64)


# -- peers' kernels (module level, so process pools can import them) --------

@njit(parallel=True, cache=True)
def triad_prange(a, b, c, s):
    for i in prange(a.shape[0]):
        a[i] = b[i] + s * c[i]


@njit(parallel=True)
def histogram_parts(x, bounds, lo, hi, nbins):
    parts = np.zeros((bounds.shape[0] - 1, nbins), np.int64)
    for t in prange(bounds.shape[0] - 1):
        parts[t] = histogram(x[bounds[t]:bounds[t + 1]], lo, hi, nbins)
    return parts


@njit(parallel=True, cache=True)
def heat_prange(out, inp, alpha):
    n, m = inp.shape
    for i in prange(1, n - 1):
        for j in range(1, m - 1):
            out[i, j] = inp[i, j] + alpha * (
                inp[i - 1, j] + inp[i + 1, j] + inp[i, j - 1] + inp[i, j + 1]
                - 4.0 * inp[i, j])


@njit(parallel=True, cache=True)
def mandelbrot_prange(out, x0, dx, y0, dy, max_iter):
    for i in prange(out.shape[0]):
        escape_row(out[i], x0, dx, y0 + i * dy, max_iter)


@njit(cache=True)
def noop_kernel(x):
    pass


@njit(parallel=True, cache=True)
def noop_prange(x):
    for i in prange(x.shape[0]):
        pass


def nothing(*_):
    return None


def triad_chunk(b, c, s):
    a = np.empty_like(b)
    triad(a, b, c, s)
    return a


def hist_chunk(x, lo, hi, nbins):
    return histogram(x, lo, hi, nbins)


def heat_chunk(inp):
    """Rows [lo-1, hi+1) in, rows [lo, hi) of the next step out."""
    out = inp.copy()
    heat_step(out, inp, ALPHA)
    return out[1:-1]


def mandel_chunk(lo, hi, width, args):
    out = np.zeros((hi - lo, width), np.int32)
    mandelbrot(out, lo, *args)
    return out


def _heat_block(block):
    out = block.copy()
    heat_step(out, block, ALPHA)
    return out


def _mandel_block(block, args, block_info=None):
    lo, _ = block_info[None]["array-location"][0]
    out = np.zeros(block.shape, np.int32)
    mandelbrot(out, lo, *args)
    return out


def _hist_block(block, lo, hi, nbins):
    return histogram(block, lo, hi, nbins)


def bounds_for(n: int, parts: int) -> list[tuple[int, int]]:
    base, extra = divmod(n, parts)
    out, lo = [], 0
    for i in range(parts):
        hi = lo + base + (i < extra)
        out.append((lo, hi))
        lo = hi
    return out


# -- methods -----------------------------------------------------------------

class Pools:
    """The parallel machinery for one worker count, started once."""

    def __init__(self, workers: int):
        import shmarray
        self.workers = workers
        self.engine = shmarray.Engine(workers=workers)
        import multiprocessing
        self.ppe = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"))
        from joblib import Parallel
        self.joblib = Parallel(n_jobs=workers, backend="loky")
        numba.set_num_threads(workers)

    def dask(self, collection):
        return collection.compute(scheduler="threads", num_workers=self.workers)

    def close(self):
        self.engine.close()
        self.ppe.shutdown(wait=True)


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
    out["process_pool"] = lambda: np.concatenate(list(pools.ppe.map(
        triad_chunk, [b[lo:hi] for lo, hi in parts], [c[lo:hi] for lo, hi in parts],
        [s] * w)))
    from joblib import delayed
    out["joblib"] = lambda: np.concatenate(pools.joblib(
        delayed(triad_chunk)(b[lo:hi], c[lo:hi], s) for lo, hi in parts))
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
        return {"numpy": lambda: np.histogram(x, nbins, (lo, hi))[0],
                "numba": lambda: histogram(x, lo, hi, nbins)}
    w = pools.workers
    parts = bounds_for(n, w)
    edges = np.array([p[0] for p in parts] + [n], np.int64)
    out = {"prange": lambda: histogram_parts(x, edges, lo, hi, nbins).sum(axis=0)}
    out["process_pool"] = lambda: sum(pools.ppe.map(
        hist_chunk, [x[a:b] for a, b in parts], [lo] * w, [hi] * w, [nbins] * w))
    from joblib import delayed
    out["joblib"] = lambda: sum(pools.joblib(
        delayed(hist_chunk)(x[a:b], lo, hi, nbins) for a, b in parts))
    import dask.array as da
    dx = da.from_array(x, chunks=(-(-n // w),))
    nblocks = len(dx.chunks[0])
    partial = dx.map_blocks(_hist_block, lo, hi, nbins, dtype=np.int64,
                            chunks=((nbins,) * nblocks,))
    out["dask_threads"] = lambda: pools.dask(partial).reshape(nblocks, nbins).sum(axis=0)
    eng = pools.engine
    X = eng.from_numpy(x)
    out["shmarray"] = lambda: eng.reduce(histogram, X, args=(lo, hi, nbins))
    return out


def _setup_heat(size, pools):
    n, steps = size
    u = np.zeros((n, n))
    u[n // 4:3 * n // 4, n // 4:3 * n // 4] = 100.0
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
        return {"numpy": loop(lambda o, i: heat_numpy(o, i, ALPHA), u.copy(), u.copy()),
                "numba": loop(lambda o, i: heat_step(o, i, ALPHA), u.copy(), u.copy())}
    w = pools.workers
    parts = bounds_for(n - 2, w)

    def chunked(mapper):
        def run():
            cur = u.copy()
            for _ in range(steps):
                pieces = mapper([cur[lo:hi + 2] for lo, hi in parts])
                nxt = cur.copy()
                nxt[1:-1] = np.concatenate(list(pieces))
                cur = nxt
            return cur
        return run

    from joblib import delayed
    out = {"prange": loop(lambda o, i: heat_prange(o, i, ALPHA), u.copy(), u.copy()),
           "process_pool": chunked(lambda xs: pools.ppe.map(heat_chunk, xs)),
           "joblib": chunked(lambda xs: pools.joblib(delayed(heat_chunk)(x) for x in xs))}
    import dask.array as da

    def dask_run():
        cur = u
        for _ in range(steps):
            d = da.from_array(cur, chunks=(-(-n // w), n))
            cur = pools.dask(d.map_overlap(_heat_block, depth={0: 1, 1: 0},
                                           boundary="none", dtype=float))
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
        return {"numpy": lambda: mandelbrot_numpy((h, w), np.arange(h), args),
                "numba": lambda: (mandelbrot(img, 0, *args), img)[1]}
    k = pools.workers
    img2 = np.zeros((h, w), np.int32)
    parts = bounds_for(h, 8 * k)            # irregular: more chunks than workers
    out = {"prange": lambda: (mandelbrot_prange(img2, *args), img2)[1]}
    out["process_pool"] = lambda: np.concatenate(list(pools.ppe.map(
        mandel_chunk, *zip(*[(lo, hi, w, args) for lo, hi in parts]))))
    from joblib import delayed
    out["joblib"] = lambda: np.concatenate(pools.joblib(
        delayed(mandel_chunk)(lo, hi, w, args) for lo, hi in parts))
    import dask.array as da
    blank = da.zeros((h, w), dtype=np.int32, chunks=(-(-h // (8 * k)), w))
    out["dask_threads"] = lambda: pools.dask(blank.map_blocks(_mandel_block, args,
                                                              dtype=np.int32))
    eng = pools.engine
    IMG = eng.zeros((h, w), np.int32)
    out["shmarray"] = lambda: (eng.map(mandelbrot, IMG, args=(row_offset, *args),
                                       schedule="dynamic"), IMG)[1]
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
    from joblib import delayed
    import dask
    eng = pools.engine
    X = eng.zeros(16)
    return {"prange": repeat(lambda: noop_prange(x)),
            "process_pool": repeat(lambda: pools.ppe.submit(nothing).result()),
            "joblib": repeat(lambda: pools.joblib([delayed(nothing)()])),
            "dask_threads": repeat(lambda: dask.delayed(nothing)().compute(
                scheduler="threads", num_workers=pools.workers)),
            "shmarray": repeat(lambda: eng.map(noop_kernel, X, chunks=1))}


SETUP = {"triad": (_setup_triad, triad_runners), "histogram": (_setup_histogram, histogram_runners),
         "heat": (_setup_heat, heat_runners), "mandelbrot": (_setup_mandelbrot, mandelbrot_runners),
         "noop": (_setup_noop, noop_runners)}


def nbytes_moved(workload: str, d: dict) -> int | None:
    """Bytes a run reads and writes, each array counted once per pass."""
    if workload == "triad":
        return 3 * d["b"].nbytes
    if workload == "histogram":
        return d["x"].nbytes
    if workload == "heat":
        return 2 * d["u"].nbytes * d["steps"]
    return None


# -- measuring -----------------------------------------------------------------

def interleaved(fns: dict[str, Callable], repeat: int, pause: float = 0.0,
                inner: int = 1) -> dict[str, float]:
    """Median seconds per call of each function over ``repeat`` rounds (of
    ``inner`` calls each) in which their order alternates, so drift on a
    shared machine hits all of them alike."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeat):
        for name in (names if r % 2 == 0 else names[::-1]):
            fn = fns[name]
            gc.disable()
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - t0) / inner)
            gc.enable()
            if pause:
                time.sleep(pause)
    return {n: statistics.median(t) for n, t in times.items()}


def _equal(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


@dataclass
class Result:
    workload: str
    method: str
    workers: int
    seconds: float
    identical: bool
    gbps: float | None = None
    fraction_of_ceiling: float | None = None
    speedup_vs_numba: float | None = None
    per_call_s: float | None = None     # noop: one dispatch


def triad_ceiling(n: int, threads: int, repeat: int) -> float:
    """STREAM triad bandwidth of numba prange on all usable CPUs (GB/s)."""
    numba.set_num_threads(threads)
    rng = np.random.default_rng(3)
    a, b, c = np.empty(n), rng.random(n), rng.random(n)
    triad_prange(a, b, c, 3.0)
    best = min(interleaved({"t": lambda: triad_prange(a, b, c, 3.0)}, 1)["t"]
               for _ in range(max(repeat, 3)))
    return 3 * a.nbytes / best / 1e9


def machine() -> dict:
    from shmarray import options
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {"python": platform.python_version(), "numpy": np.__version__,
                "numba": numba.__version__}
    for mod in ("joblib", "dask", "distributed", "matplotlib", "shmarray"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    return {"cpu": cpu, "usable_cpus": options.usable_cpus(), "os": platform.platform(),
            "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "versions": versions}


def run(size: str = "quick", max_workers: int | None = None, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    from shmarray import options
    cfg = SIZES[size]
    cpus = max_workers or options.usable_cpus()
    counts = list(range(1, cpus + 1))
    report: dict[str, Any] = {"machine": machine(), "size": size, "workers": counts}
    report["ceiling_GBps"] = triad_ceiling(cfg["triad"], cpus, cfg["repeat"])
    results: list[Result] = []
    total = len(WORKLOADS) * (1 + len(counts))
    from shmarray.progress import can_show
    bar = tqdm(total=total, desc="shmarray bench", disable=not (progress and can_show()))
    try:
        for workload in WORKLOADS:
            setup, runners = SETUP[workload]
            data = setup(cfg[workload], None)
            moved = nbytes_moved(workload, data)
            seq = runners(data, None)
            for fn in seq.values():               # warm up: compile
                fn()
            seq_times = interleaved(seq, cfg["repeat"])
            reference = seq["numba"]()
            base = seq_times["numba"]
            for method, t in seq_times.items():
                results.append(Result(workload, method, 1, t,
                                      _equal(seq[method](), reference)))
            bar.update(1)
            for w in counts:
                pools = Pools(w)
                try:
                    par = runners(data, pools)
                    for fn in par.values():       # warm up: compile, start, attach
                        fn()
                    par_times = interleaved(par, cfg["repeat"])
                    for method, t in par_times.items():
                        results.append(Result(workload, method, w, t,
                                              _equal(par[method](), reference)))
                finally:
                    pools.close()
                bar.update(1)
            for r in results:
                if r.workload == workload:
                    r.speedup_vs_numba = base / r.seconds
                    if workload == "noop":
                        r.per_call_s = r.seconds / data["calls"]
                    if moved is not None:
                        r.gbps = moved / r.seconds / 1e9
                        r.fraction_of_ceiling = r.gbps / report["ceiling_GBps"]
    finally:
        bar.close()
        _stop_peers()
    report["results"] = [asdict(r) for r in results]
    return report


def _stop_peers() -> None:
    """joblib keeps its loky workers for reuse; stop them, so the report
    leaves no process behind."""
    try:
        from joblib.externals.loky import get_reusable_executor
        get_reusable_executor().shutdown(wait=True)
    except ImportError:
        pass


# -- reporting -------------------------------------------------------------------

def _time(r: dict) -> str:
    t = r["per_call_s"] or r["seconds"]
    if r["per_call_s"]:
        return f"{t * 1e6:,.1f} us/call"
    return f"{t * 1e3:,.2f} ms" if t < 10 else f"{t:,.2f} s"


def table(report: dict) -> str:
    """The report as aligned columns, every column wide enough for its
    widest cell (a 200 ms call no longer runs into the worker count)."""
    rows = report["results"]
    top = max(report["workers"])
    head = ("workload", "method", "workers", "time", "vs numba", "GB/s", "ceiling", "equal")
    cells = []
    for r in rows:
        if r["method"] not in SEQUENTIAL and r["workers"] != top:
            continue
        cells.append((r["workload"], r["method"], str(r["workers"]), _time(r),
                      f"{r['speedup_vs_numba']:.2f}x",
                      f"{r['gbps']:.1f}" if r["gbps"] is not None else "-",
                      f"{r['fraction_of_ceiling']:.0%}"
                      if r["fraction_of_ceiling"] is not None else "-",
                      "yes" if r["identical"] else "NO"))
    widths = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head))]
    left = {0, 1, 7}

    def line(c) -> str:
        return "  ".join(v.ljust(w) if i in left else v.rjust(w)
                         for i, (v, w) in enumerate(zip(c, widths))).rstrip()

    return "\n".join([f"machine: {report['machine']['cpu']}, "
                      f"{report['machine']['usable_cpus']} usable CPUs; triad ceiling "
                      f"{report['ceiling_GBps']:.1f} GB/s (numba prange, {top} threads)",
                      line(head), *map(line, cells)])


HIGHLIGHT = "shmarray"
# One colour per method, fixed; shmarray alone is red, drawn thick, edged.
COLORS = {"numpy": "#7f7f7f", "numba": "#4d4d4d", "prange": "#2ca02c",
          "process_pool": "#9467bd", "joblib": "#8c564b", "dask_threads": "#1f77b4",
          "shmarray": "#d62728"}


def _style(method: str) -> dict:
    if method == HIGHLIGHT:
        return dict(color=COLORS[method], linewidth=2.8, zorder=5)
    return dict(color=COLORS[method], linewidth=1.2, alpha=0.8)


def plots(report: dict, out_dir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = report["results"]
    top = max(report["workers"])
    cpu = report["machine"]["cpu"]
    paths = []

    def bars(ax, pick, values):
        names = [r["method"] for r in pick]
        drawn = ax.bar(names, values, color=[COLORS[n] for n in names])
        for bar, n in zip(drawn, names):
            if n == HIGHLIGHT:
                bar.set_edgecolor("black")
                bar.set_linewidth(1.5)
        ax.tick_params(axis="x", rotation=60)
        for label in ax.get_xticklabels():
            if label.get_text() == HIGHLIGHT:
                label.set_fontweight("bold")

    # Times: lower is better.
    fig, axes = plt.subplots(1, len(WORKLOADS), figsize=(4 * len(WORKLOADS), 4.4))
    for ax, workload in zip(axes, WORKLOADS):
        pick = [r for r in rows if r["workload"] == workload
                and (r["method"] in SEQUENTIAL or r["workers"] == top)]
        bars(ax, pick, [r["per_call_s"] or r["seconds"] for r in pick])
        numba_t = [r["per_call_s"] or r["seconds"] for r in pick if r["method"] == "numba"]
        if numba_t:
            ref = ax.axhline(numba_t[0], color="grey", linestyle=":", linewidth=1)
        ax.set_yscale("log")
        ax.set_title(workload + (" (per call)" if workload == "noop" else ""))
        ax.set_ylabel("seconds, lower is better")
    fig.legend([ref], ["sequential numba (1.0x)"], loc="lower center", fontsize=8,
               frameon=False)
    fig.suptitle(f"Time per method, parallel methods with {top} workers: {cpu}")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    paths.append(os.path.join(out_dir, "times.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # Speedup against workers: higher is better, 1.0x is sequential numba.
    fig, axes = plt.subplots(1, len(WORKLOADS), figsize=(4 * len(WORKLOADS), 4.6))
    handles = {}
    for ax, workload in zip(axes, WORKLOADS):
        for method in METHODS:
            pts = sorted((r["workers"], r["speedup_vs_numba"]) for r in rows
                         if r["workload"] == workload and r["method"] == method
                         and method not in SEQUENTIAL)
            if pts:
                (h,) = ax.plot(*zip(*pts), marker="o", label=method, **_style(method))
                handles[method] = h
        (h,) = ax.plot(report["workers"], report["workers"], "k--", linewidth=1,
                       label="ideal (linear)")
        handles["ideal (linear)"] = h
        h = ax.axhline(1.0, color="grey", linestyle=":", linewidth=1,
                       label="1.0x: sequential numba")
        handles["1.0x: sequential numba"] = h
        ax.set_title(workload)
        ax.set_xlabel("workers / threads")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_yscale("log")
        ax.set_ylabel("speedup over numba, higher is better")
    fig.legend(list(handles.values()), list(handles), loc="lower center",
               ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(f"Speedup against workers: {cpu}")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    paths.append(os.path.join(out_dir, "speedup.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # Bandwidth: higher is better, up to the triad ceiling.
    fig, axes = plt.subplots(1, len(MEMORY_BOUND), figsize=(4.5 * len(MEMORY_BOUND), 4.8))
    for ax, workload in zip(axes, MEMORY_BOUND):
        pick = [r for r in rows if r["workload"] == workload
                and (r["method"] in SEQUENTIAL or r["workers"] == top)]
        bars(ax, pick, [r["gbps"] for r in pick])
        ceiling = ax.axhline(report["ceiling_GBps"], color="k", linestyle="--",
                             linewidth=1, label="triad ceiling (prange)")
        ax.set_title(workload)
        ax.set_ylabel("GB/s, higher is better")
    fig.legend([ceiling], ["triad ceiling (numba prange)"], loc="lower center",
               fontsize=8, frameon=False)
    fig.suptitle(f"Memory bandwidth, parallel methods with {top} workers: {cpu}")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    paths.append(os.path.join(out_dir, "bandwidth.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def main(size: str, out_dir: str | None, max_workers: int | None = None) -> int:
    report = run(size, max_workers)
    print(table(report))
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "bench.json")
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        written = [path, *plots(report, out_dir)]
        print("wrote " + ", ".join(written))
    bad = [r for r in report["results"] if not r["identical"]]
    if bad:
        print(f"{len(bad)} result(s) differ from sequential numba", file=sys.stderr)
        return 1
    return 0
