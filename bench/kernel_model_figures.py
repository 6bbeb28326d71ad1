"""The kernel model's figures, side by side in one process, interleaved
round by round, with identical results, 2 workers:

* periodic 2-D heat, 2048^2, 100 steps: ``Engine.iterate`` with
  ``boundary="wrap"`` against numba prange (2 threads) running the same
  step on arrays whose ghost cells it refreshes itself each step, on
  private arrays and on the engine's shared ones (the floor for processes);
* ``row_offset`` against the same kernel reading a shared ``rows`` array
  (the global index of every row), for Mandelbrot and the Monte Carlo
  kernels, all through the engine;
* a (3, 4096, 4096) float32 RGB stack split on axis 0, 1 and 2: speedup
  over sequential numba on the whole stack.

Run: ``.venv/bin/python bench/kernel_model_figures.py [--quick] [--json FILE]``
"""

from __future__ import annotations

import argparse
import sys

import numba
import numpy as np
from numba import njit, prange

import shmarray
from shmarray.kernels.irregular import escape_row, mandelbrot
from shmarray.kernels.montecarlo import pi_hits, random_walks, row_hits, walk_row
from shmarray.kernels.stencils import heat_step
from shmarray.kernels.table import mandelbrot_args
from shmarray.report.peers import heat_prange
from workloads import machine_info, ratios, rounds, save, summary

ALPHA = 0.2
WORKERS = 2


# -- Periodic heat: the prange peer refreshes its own ghost cells ---------


@njit(parallel=True, cache=True)
def wrap_ghosts_prange(a):
    """One ghost cell a side, filled as ``numpy.pad(interior, 1, "wrap")``
    would: axis 0 over the interior columns, then axis 1 over all rows."""
    n, m = a.shape
    for j in prange(1, m - 1):
        a[0, j] = a[n - 2, j]
        a[n - 1, j] = a[1, j]
    for i in prange(n):
        a[i, 0] = a[i, m - 2]
        a[i, m - 1] = a[i, 1]


def periodic_heat_figure(eng, n: int, steps: int, repeat: int) -> dict:
    rng = np.random.default_rng(n)
    u0 = np.zeros((n + 2, n + 2))
    u0[1:-1, 1:-1] = rng.random((n, n))
    ea, eb = eng.from_numpy(u0), eng.from_numpy(u0)  # engine
    sa, sb = eng.from_numpy(u0), eng.from_numpy(u0)  # prange on shared
    pa, pb = u0.copy(), u0.copy()  # prange, private

    def engine():
        eng.iterate(heat_step, eb, ea, steps=steps, args=(ALPHA,), halo=1, boundary="wrap")

    def prange_run(a, b):
        def run():
            x, y = a, b
            for _ in range(steps):
                wrap_ghosts_prange(x)  # as the engine does: both arrays
                wrap_ghosts_prange(y)
                heat_prange(y, x, ALPHA)
                x, y = y, x

        return run

    fns = {
        "engine": (engine, steps),
        "prange": (prange_run(pa, pb), steps),
        "prange_on_shared": (prange_run(sa, sb), steps),
    }
    for fn, _ in fns.values():
        fn()
    t = rounds(fns, repeat)
    # The same number of steps from the same grid on every side; and the
    # engine's first step equals numpy.pad plus the sequential step.
    identical = all(
        np.array_equal(ea, x) and np.array_equal(eb, y) for x, y in ((pa, pb), (sa, sb))
    )
    check_in = np.pad(u0[1:-1, 1:-1], 1, "wrap")
    check_out = np.zeros_like(u0)
    heat_step(check_out, check_in, ALPHA)
    first = eng.from_numpy(np.zeros_like(u0))
    eng.map(heat_step, first, eng.from_numpy(u0), args=(ALPHA,), halo=1, boundary="wrap")
    matches_pad = bool(np.array_equal(first[1:-1, 1:-1], check_out[1:-1, 1:-1]))
    return {
        "n": n,
        "steps": steps,
        "identical": identical,
        "matches_numpy_pad": matches_pad,
        "per_step_us": {k: summary([s * 1e6 for s in v]) for k, v in t.items()},
        "engine_over_prange": ratios(t["engine"], t["prange"]),
        "engine_over_prange_on_shared": ratios(t["engine"], t["prange_on_shared"]),
        "prange_on_shared_over_prange": ratios(t["prange_on_shared"], t["prange"]),
    }


# -- row_offset against a rows array --------------------------------------


@njit(cache=True)
def mandelbrot_rows(out, rows, x0, dx, y0, dy, max_iter):
    """``irregular.mandelbrot`` reading each row's global index from
    ``rows`` instead of computing ``row_offset + i``."""
    for i in range(out.shape[0]):
        escape_row(out[i], x0, dx, y0 + rows[i] * dy, max_iter)


@njit(cache=True)
def pi_hits_rows(counts, rows, samples, seed):
    total = 0
    for i in range(counts.shape[0]):
        counts[i] = row_hits(seed, rows[i], samples)
        total += counts[i]
    return total


@njit(cache=True)
def random_walks_rows(out, rows, seed):
    for i in range(out.shape[0]):
        walk_row(out[i], seed, rows[i])


def row_offset_figure(eng, quick: bool, repeat: int) -> dict:
    h, w = (600, 1200) if quick else (1500, 3000)
    rows = eng.from_numpy(np.arange(max(h, 200_000), dtype=np.int64))
    margs = mandelbrot_args(h, w, 300)
    img_o, img_r = eng.zeros((h, w), np.int32), eng.zeros((h, w), np.int32)
    n_pi, samples = (20_000, 200) if quick else (200_000, 200)
    cnt_o, cnt_r = eng.zeros(n_pi, np.int64), eng.zeros(n_pi, np.int64)
    walks = (20_000, 500) if quick else (100_000, 500)
    wlk_o, wlk_r = eng.zeros(walks), eng.zeros(walks)
    hits = {}
    cases = {
        "mandelbrot": (
            lambda: eng.map(
                mandelbrot, img_o, args=(shmarray.row_offset, *margs), schedule="dynamic"
            ),
            lambda: eng.map(mandelbrot_rows, img_r, rows[:h], args=margs, schedule="dynamic"),
            lambda: np.array_equal(img_o, img_r),
        ),
        "pi_hits": (
            lambda: hits.__setitem__(
                "offset", eng.reduce(pi_hits, cnt_o, args=(shmarray.row_offset, samples, 42))
            ),
            lambda: hits.__setitem__(
                "rows", eng.reduce(pi_hits_rows, cnt_r, rows[:n_pi], args=(samples, 42))
            ),
            lambda: hits["offset"] == hits["rows"] and np.array_equal(cnt_o, cnt_r),
        ),
        "random_walks": (
            lambda: eng.map(random_walks, wlk_o, args=(shmarray.row_offset, 7)),
            lambda: eng.map(random_walks_rows, wlk_r, rows[: walks[0]], args=(7,)),
            lambda: np.array_equal(wlk_o, wlk_r),
        ),
    }
    out = {}
    for name, (offset, rows_array, same) in cases.items():
        offset(), rows_array()
        t = rounds({"row_offset": (offset, 1), "rows_array": (rows_array, 1)}, repeat)
        out[name] = {
            "identical": bool(same()),
            "row_offset_ms": summary([v * 1e3 for v in t["row_offset"]]),
            "rows_array_ms": summary([v * 1e3 for v in t["rows_array"]]),
            "ratio": ratios(t["row_offset"], t["rows_array"]),
        }
    out["mandelbrot"]["shape"] = (h, w)
    out["pi_hits"]["rows"], out["pi_hits"]["samples"] = n_pi, samples
    out["random_walks"]["shape"] = walks
    return out


# -- Any axis: an RGB stack ------------------------------------------------


@njit(cache=True)
def gamma(out, inp, g):
    """``out = inp ** g`` for arrays of any layout (3-D)."""
    for c in range(inp.shape[0]):
        for i in range(inp.shape[1]):
            for j in range(inp.shape[2]):
                out[c, i, j] = inp[c, i, j] ** g


def axis_figure(eng, shape: tuple[int, ...], repeat: int) -> dict:
    rgb = np.random.default_rng(3).random(shape, dtype=np.float32)
    src = eng.from_numpy(rgb)
    outs = {k: eng.zeros(shape, np.float32) for k in (0, 1, 2)}
    seq = np.zeros(shape, np.float32)
    g = np.float32(1 / 2.2)
    fns = {"sequential": (lambda: gamma(seq, rgb, g), 1)}
    for k, out in outs.items():
        fns[f"axis {k}"] = (lambda k=k, out=out: eng.map(gamma, out, src, args=(g,), axis=k), 1)
    for fn, _ in fns.values():
        fn()
    t = rounds(fns, repeat)
    identical = all(np.array_equal(seq, o) for o in outs.values())
    seq_med = summary(t["sequential"])["median"]
    res = {
        "shape": shape,
        "dtype": "float32",
        "identical": identical,
        "seconds": {k: summary(v) for k, v in t.items()},
    }
    for k in (0, 1, 2):
        res[f"speedup_axis_{k}"] = seq_med / summary(t[f"axis {k}"])["median"]
    return res


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller arrays, fewer rounds")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    q = args.quick
    numba.set_num_threads(WORKERS)
    fig: dict = {"machine": machine_info(), "workers": WORKERS}
    with shmarray.Engine(workers=WORKERS) as eng:
        fig["periodic_heat"] = periodic_heat_figure(
            eng, 512 if q else 2048, 100, repeat=5 if q else 15
        )
        fig["row_offset"] = row_offset_figure(eng, q, repeat=5 if q else 11)
        fig["axis"] = axis_figure(
            eng, (3, 1024, 1024) if q else (3, 4096, 4096), repeat=3 if q else 9
        )
    fig["machine"]["threading_layer"] = numba.threading_layer()

    m, v = fig["machine"], fig["machine"]["versions"]
    print(
        f"machine: {m['cpu']}, {m['usable_cpus']} CPUs, Python {v['python']}, "
        f"numba {v['numba']} ({m['threading_layer']}); {WORKERS} workers, prange on "
        f"{WORKERS} threads; medians [quartiles] of per-round ratios"
    )
    h = fig["periodic_heat"]
    s = h["per_step_us"]
    r, rs, fl = (
        h["engine_over_prange"],
        h["engine_over_prange_on_shared"],
        h["prange_on_shared_over_prange"],
    )
    print(
        f"periodic heat {h['n']}^2, {h['steps']} steps, us per step: engine "
        f"{s['engine']['median']:.0f}, prange {s['prange']['median']:.0f}, prange on shared "
        f"{s['prange_on_shared']['median']:.0f}"
    )
    print(
        f"  engine / prange {r['median']:.3f} [{r['q1']:.3f}-{r['q3']:.3f}] (target <= 1.05);"
        f" engine / prange on shared {rs['median']:.3f} [{rs['q1']:.3f}-{rs['q3']:.3f}];"
        f" prange on shared / prange {fl['median']:.3f}; identical {h['identical']},"
        f" equals numpy.pad + sequential {h['matches_numpy_pad']}"
    )
    for name, f in fig["row_offset"].items():
        r = f["ratio"]
        print(
            f"{name:<13} row_offset {f['row_offset_ms']['median']:8.2f} ms  rows array "
            f"{f['rows_array_ms']['median']:8.2f} ms  ratio {r['median']:.3f} "
            f"[{r['q1']:.3f}-{r['q3']:.3f}]  identical {f['identical']}"
        )
    a = fig["axis"]
    print(
        f"RGB {a['shape']} float32, gamma: sequential {a['seconds']['sequential']['median']:.3f} s;"
        f" speedup axis 0 {a['speedup_axis_0']:.2f}, axis 1 {a['speedup_axis_1']:.2f},"
        f" axis 2 {a['speedup_axis_2']:.2f}; identical {a['identical']}"
    )
    save(fig, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
