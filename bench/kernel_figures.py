"""The kernel library's figures, side by side in one process, 2 workers:

* Mandelbrot 3000 x 1500, 300 iterations: speedup over sequential numba,
  static and dynamic schedules, on a symmetric and a lopsided view
* 2-D Jacobi 4096^2, 20 steps, halo 1: engine / numba prange
* per-step overhead of an iterated stencil, against a 4096^2 step
* histogram and variance of 100M float64: engine / prange
* GB/s of the memory-bound kernels next to the triad ceiling of this run

Run: ``.venv/bin/python bench/kernel_figures.py [--quick] [--json FILE]``
"""

from __future__ import annotations

import argparse
import sys
import time

import numba
import numpy as np

import shmarray
from peers import histogram_prange, jacobi_prange, mandelbrot_prange, moments_prange
from shmarray import kernels
from shmarray.kernels import TABLE
from shmarray.kernels.irregular import mandelbrot
from shmarray.kernels.reductions import combine_moments, histogram, moments, variance
from shmarray.kernels.stencils import heat_step, jacobi
from workloads import TriadPair, interleaved, machine_info, save, small_pages_copy

WORKERS = 2


def mandelbrot_figure(eng, height, width, max_iter, repeat):
    out = {}
    views = {
        "symmetric": (-2.0, 3.0 / width, -0.75, 1.5 / height),
        "lopsided": (-2.0, 3.0 / width, -0.2, 1.0 / height),
    }
    for view, (x0, dx, y0, dy) in views.items():
        args = (x0, dx, y0, dy, max_iter)
        seq_img = np.zeros((height, width), np.int32)
        stat_img = eng.zeros((height, width), np.int32)
        dyn_img = eng.zeros((height, width), np.int32)
        par_img = np.zeros((height, width), np.int32)
        fns = {
            "sequential": lambda: mandelbrot(seq_img, 0, *args),
            "static": lambda: eng.map(mandelbrot, stat_img, args=(shmarray.row_offset, *args)),
            "dynamic": lambda: eng.map(
                mandelbrot, dyn_img, args=(shmarray.row_offset, *args), schedule="dynamic"
            ),
            "prange": lambda: mandelbrot_prange(par_img, *args),
        }
        for f in fns.values():
            f()
        med = interleaved(fns, repeat=repeat)
        identical = all(np.array_equal(seq_img, im) for im in (stat_img, dyn_img, par_img))
        out[view] = {
            "seconds": med,
            "identical": identical,
            "speedup_static": med["sequential"] / med["static"],
            "speedup_dynamic": med["sequential"] / med["dynamic"],
            "speedup_prange": med["sequential"] / med["prange"],
        }
    return out


def jacobi_figure(eng, n, steps, repeat):
    rng = np.random.default_rng(0)
    u0 = rng.random((n, n))
    a, b = eng.from_numpy(u0), eng.from_numpy(u0)
    pa, pb = u0.copy(), u0.copy()
    sa, sb = small_pages_copy(u0), small_pages_copy(u0)

    def engine_run(schedule="static"):
        x, y = a, b
        for _ in range(steps):
            eng.map(jacobi, y, x, halo=1, schedule=schedule)
            x, y = y, x

    def prange_run(x=pa, y=pb):
        for _ in range(steps):
            jacobi_prange(y, x)
            x, y = y, x

    def sequential_run():
        x, y = pa, pb
        for _ in range(steps):
            jacobi(y, x)
            x, y = y, x

    engine_run(), prange_run()
    med = interleaved(
        {
            "engine": engine_run,
            "prange": prange_run,
            "prange_small_pages": lambda: prange_run(sa, sb),
            "engine_dynamic": lambda: engine_run("dynamic"),
        },
        repeat=repeat,
        pause=0.05,
    )
    # equal results: same start, same number of steps on both sides
    a[...] = u0
    b[...] = u0
    pa[...] = u0
    pb[...] = u0
    engine_run()
    prange_run()
    identical = bool(np.array_equal(a, pa) and np.array_equal(b, pb))
    t0 = time.perf_counter()
    sequential_run()
    seq = time.perf_counter() - t0
    return {
        "n": n,
        "steps": steps,
        "engine_s": med["engine"],
        "prange_s": med["prange"],
        "engine_dynamic_s": med["engine_dynamic"],
        "sequential_s": seq,
        "prange_small_pages_s": med["prange_small_pages"],
        "ratio": med["engine"] / med["prange"],
        "ratio_same_page_size": med["engine"] / med["prange_small_pages"],
        "identical": identical,
        "step_ms": med["engine"] / steps * 1e3,
    }


def step_overhead_figure(eng, steps):
    """Per-step cost of a map whose kernel does almost nothing: the floor
    an iterated stencil pays per step."""
    a, b = eng.zeros((64, 64)), eng.zeros((64, 64))
    heat_step(np.zeros((64, 64)), np.zeros((64, 64)), 0.1)

    def loop():
        x, y = a, b
        for _ in range(steps):
            eng.map(heat_step, y, x, args=(0.1,), halo=1)
            x, y = y, x

    loop()
    med = interleaved({"loop": loop}, repeat=7)
    return {"per_step_us": med["loop"] / steps * 1e6}


def reduction_figures(eng, n, repeat):
    rng = np.random.default_rng(1)
    data = rng.standard_normal(n)
    x = eng.from_numpy(data)
    lo, hi, nbins = -4.0, 4.0, 256
    fns = {
        "histogram_engine": lambda: eng.reduce(histogram, x, args=(lo, hi, nbins)),
        "histogram_prange": lambda: histogram_prange(data, lo, hi, nbins, WORKERS),
        "variance_engine": lambda: variance(eng.reduce(moments, x, combine=combine_moments)),
        "variance_prange": lambda: variance(moments_prange(data, WORKERS)),
    }
    for f in fns.values():
        f()
    med = interleaved(fns, repeat=repeat, pause=0.02)
    hist_same = bool(np.array_equal(fns["histogram_engine"](), fns["histogram_prange"]()))
    var_same = fns["variance_engine"]() == fns["variance_prange"]()
    return {
        "n": n,
        "histogram": {
            "engine_s": med["histogram_engine"],
            "prange_s": med["histogram_prange"],
            "ratio": med["histogram_engine"] / med["histogram_prange"],
            "identical": hist_same,
            "engine_GBps": 8 * n / med["histogram_engine"] / 1e9,
        },
        "variance": {
            "engine_s": med["variance_engine"],
            "prange_s": med["variance_prange"],
            "ratio": med["variance_engine"] / med["variance_prange"],
            "identical": bool(var_same),
            "engine_GBps": 8 * n / med["variance_engine"] / 1e9,
        },
    }


def bandwidth_figures(eng, n, repeat):
    """GB/s (bytes of every array the kernel reads or writes, counted once)
    of each memory-bound kernel in the table, sequential and through the
    engine, on inputs of about ``n`` elements per array."""
    memory_bound = (
        "axpy",
        "triad",
        "scale",
        "clip",
        "normalize",
        "total",
        "dot",
        "moments",
        "jacobi",
        "heat_step",
    )
    out = {}
    rng = np.random.default_rng(2)
    for spec in TABLE:
        if spec.name not in memory_bound:
            continue
        rows = n if spec.arrays[0][1] == "1" else int(np.sqrt(n))
        arrays, args = spec.inputs(rng, rows)
        if spec.arrays[0][1] == "2":  # square grids for the 2-D stencils
            arrays = tuple(rng.standard_normal((rows, rows)) for _ in arrays)
        nbytes = sum(a.nbytes for a in arrays)
        shared = tuple(eng.from_numpy(a) for a in arrays)
        med = interleaved(
            {
                "sequential": lambda: kernels.run(spec.kernel, *arrays, args=args),
                "engine": lambda: kernels.run(spec.kernel, *shared, args=args, engine=eng),
            },
            repeat=repeat,
            pause=0.01,
        )
        out[spec.name] = {
            "bytes": nbytes,
            "sequential_GBps": nbytes / med["sequential"] / 1e9,
            "engine_GBps": nbytes / med["engine"] / 1e9,
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    q = args.quick
    numba.set_num_threads(WORKERS)
    fig = {"machine": machine_info(), "workers": WORKERS}
    with shmarray.Engine(workers=WORKERS) as eng:
        pair = TriadPair(eng, 5_000_000 if q else 50_000_000, threads=WORKERS)
        med = interleaved({"engine": pair.engine, "prange": pair.prange}, repeat=10 if q else 20)
        triad_bytes = 3 * 8 * len(pair.a)
        fig["triad_ceiling_GBps"] = {
            "engine": triad_bytes / med["engine"] / 1e9,
            "prange": triad_bytes / med["prange"] / 1e9,
        }
        fig["mandelbrot"] = mandelbrot_figure(
            eng, *((500, 1000) if q else (1500, 3000)), 300, repeat=3 if q else 7
        )
        fig["jacobi"] = jacobi_figure(eng, 1024 if q else 4096, 20, repeat=3 if q else 9)
        fig["step_overhead"] = step_overhead_figure(eng, 200 if q else 1000)
        fig["reductions"] = reduction_figures(
            eng, 10_000_000 if q else 100_000_000, repeat=5 if q else 15
        )
        fig["bandwidth"] = bandwidth_figures(
            eng, 2_000_000 if q else 20_000_000, repeat=5 if q else 11
        )

    m, j, r = fig["mandelbrot"], fig["jacobi"], fig["reductions"]
    print(
        f"machine: {fig['machine']['cpu']}, {fig['machine']['usable_cpus']} CPUs, "
        f"{WORKERS} workers / threads"
    )
    for view, v in m.items():
        s = v["seconds"]
        print(
            f"mandelbrot {view:9s} sequential {s['sequential']:.3f} s  static "
            f"{s['static']:.3f} s ({v['speedup_static']:.2f}x)  dynamic {s['dynamic']:.3f} s "
            f"({v['speedup_dynamic']:.2f}x, target >= 1.95)  prange {s['prange']:.3f} s "
            f"({v['speedup_prange']:.2f}x)  identical {v['identical']}"
        )
    print(
        f"jacobi {j['n']}^2 x {j['steps']}  engine {j['engine_s']:.3f} s  prange "
        f"{j['prange_s']:.3f} s  ratio {j['ratio']:.3f} (target <= 1.05)  dynamic "
        f"{j['engine_dynamic_s']:.3f} s  sequential {j['sequential_s']:.3f} s  "
        f"identical {j['identical']}"
    )
    print(
        f"  same page size: prange on 4 KiB pages {j['prange_small_pages_s']:.3f} s  "
        f"ratio {j['ratio_same_page_size']:.3f}"
    )
    print(
        f"iterated stencil: {fig['step_overhead']['per_step_us']:.0f} us per step of "
        f"overhead vs {j['step_ms']:.1f} ms per {j['n']}^2 step "
        f"({fig['step_overhead']['per_step_us'] / 1e3 / j['step_ms']:.2%})"
    )
    for name in ("histogram", "variance"):
        v = r[name]
        print(
            f"{name} of {r['n']:,}  engine {v['engine_s'] * 1e3:.1f} ms  prange "
            f"{v['prange_s'] * 1e3:.1f} ms  ratio {v['ratio']:.3f} (target <= 1.10)  "
            f"identical {v['identical']}"
        )
    c = fig["triad_ceiling_GBps"]
    print(f"GB/s (triad ceiling this run: engine {c['engine']:.1f}, prange {c['prange']:.1f})")
    for name, v in fig["bandwidth"].items():
        print(
            f"  {name:10s} sequential {v['sequential_GBps']:6.1f}  engine "
            f"{v['engine_GBps']:6.1f}  ({v['engine_GBps'] / c['engine']:.0%} of ceiling)"
        )
    save(fig, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
