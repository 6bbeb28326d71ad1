"""The dispatch layer's figures, each side by side with numba prange in one
process, interleaved round by round, with identical results:

* a no-op map with 2 workers against a no-op prange fork-join (2 threads);
* an iterated 5-point heat stencil at several grid sizes: the engine as a
  Python loop of maps and as one ``Engine.iterate`` call, each over numba
  prange on private arrays (as a user's prange code has them), with prange
  on the engine's shared arrays beside them (the floor for processes);
* STREAM triad over 50M float64 and Jacobi 4096^2: engine / prange on the
  same shared arrays;
* CPU seconds an engine left idle for 10 s costs, coordinator and workers.

Run: ``.venv/bin/python bench/dispatch_figures.py [--quick] [--json FILE]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numba
import numpy as np
import psutil
from numba import njit, prange as numba_prange

import shmarray
from peers import jacobi_prange
from shmarray.kernels.elementwise import triad
from shmarray.kernels.stencils import heat_step, jacobi
from shmarray.report.peers import heat_prange, noop_kernel, triad_prange
from workloads import machine_info, ratios, rounds, save, summary

ALPHA = 0.2
WORKERS = 2


@njit(cache=True)
def touch(x):
    """The least a map can do: one write per row of its chunk."""
    for i in range(x.shape[0]):
        x[i] += 1.0


@njit(parallel=True, cache=True)
def touch_prange(x):
    for i in numba_prange(x.shape[0]):
        x[i] += 1.0


def noop_figure(eng, repeat: int, inner: int) -> dict:
    """A map of 16 rows that does (almost) nothing: what a map costs.  prange
    gets the same body; an empty prange loop is optimised away."""
    x = eng.zeros(WORKERS * 8)
    px = np.zeros(WORKERS * 8)

    def engine():
        for _ in range(inner):
            eng.map(touch, x)

    def prange():
        for _ in range(inner):
            touch_prange(px)

    engine(), prange()
    t = rounds({"engine": (engine, inner), "prange": (prange, inner)}, repeat)
    assert np.array_equal(x, px)
    return {
        "engine_us": summary([v * 1e6 for v in t["engine"]]),
        "prange_us": summary([v * 1e6 for v in t["prange"]]),
        "ratio": ratios(t["engine"], t["prange"]),
    }


def heat_figure(eng, n: int, repeat: int) -> dict:
    steps = max(20, int(4e7 // (n * n)))
    rng = np.random.default_rng(n)
    u0 = rng.random((n, n))
    ea, eb = eng.from_numpy(u0), eng.from_numpy(u0)  # engine, a loop of maps
    ia, ib = eng.from_numpy(u0), eng.from_numpy(u0)  # engine, iterate
    sa, sb = eng.from_numpy(u0), eng.from_numpy(u0)  # prange on shared
    pa, pb = u0.copy(), u0.copy()  # prange, private
    qa, qb = u0.copy(), u0.copy()  # sequential

    def loop(step, a, b):
        def run():
            x, y = a, b
            for _ in range(steps):
                step(y, x)
                x, y = y, x

        return run

    def eng_step(out, inp):
        eng.map(heat_step, out, inp, args=(ALPHA,), halo=1)

    def prange_step(out, inp):
        heat_prange(out, inp, ALPHA)

    def seq_step(out, inp):
        heat_step(out, inp, ALPHA)

    def iterate():
        eng.iterate(heat_step, ib, ia, steps=steps, args=(ALPHA,), halo=1)

    fns = {
        "engine": (loop(eng_step, ea, eb), steps),
        "engine_iterate": (iterate, steps),
        "prange": (loop(prange_step, pa, pb), steps),
        "prange_on_shared": (loop(prange_step, sa, sb), steps),
        "sequential": (loop(seq_step, qa, qb), steps),
    }
    for fn, _ in fns.values():
        fn()
    t = rounds(fns, repeat)
    # Every side has run the same number of steps from the same grid.
    identical = all(
        np.array_equal(ea, other) and np.array_equal(eb, other_b)
        for other, other_b in ((ia, ib), (pa, pb), (sa, sb), (qa, qb))
    )
    per_step = {k: summary([s * 1e6 for s in v]) for k, v in t.items()}
    return {
        "n": n,
        "steps_per_round": steps,
        "identical": identical,
        "per_step_us": per_step,
        "engine_speedup": statistics.median(t["sequential"]) / statistics.median(t["engine"]),
        "prange_speedup": statistics.median(t["sequential"]) / statistics.median(t["prange"]),
        "engine_over_prange": ratios(t["engine"], t["prange"]),
        "iterate_over_prange": ratios(t["engine_iterate"], t["prange"]),
        "iterate_over_prange_on_shared": ratios(t["engine_iterate"], t["prange_on_shared"]),
        "engine_over_prange_on_shared": ratios(t["engine"], t["prange_on_shared"]),
        "prange_on_shared_over_prange": ratios(t["prange_on_shared"], t["prange"]),
    }


def triad_figure(eng, n: int, repeat: int) -> dict:
    rng = np.random.default_rng(0)
    b, c = eng.from_numpy(rng.random(n)), eng.from_numpy(rng.random(n))
    a, a2 = eng.empty(n), eng.empty(n)

    def engine():
        eng.map(triad, a, b, c, args=(3.0,))

    def prange():
        triad_prange(a2, b, c, 3.0)

    engine(), prange()
    t = rounds({"engine": (engine, 1), "prange_on_shared": (prange, 1)}, repeat)
    identical = bool(np.array_equal(a, a2))
    return {
        "n": n,
        "identical": identical,
        "engine_ms": summary([v * 1e3 for v in t["engine"]]),
        "prange_on_shared_ms": summary([v * 1e3 for v in t["prange_on_shared"]]),
        "ratio": ratios(t["engine"], t["prange_on_shared"]),
    }


def jacobi_figure(eng, n: int, steps: int, repeat: int) -> dict:
    u0 = np.random.default_rng(1).random((n, n))
    ea, eb = eng.from_numpy(u0), eng.from_numpy(u0)
    sa, sb = eng.from_numpy(u0), eng.from_numpy(u0)

    def engine():
        x, y = ea, eb
        for _ in range(steps):
            eng.map(jacobi, y, x, halo=1)
            x, y = y, x

    def prange():
        x, y = sa, sb
        for _ in range(steps):
            jacobi_prange(y, x)
            x, y = y, x

    engine(), prange()
    t = rounds({"engine": (engine, steps), "prange_on_shared": (prange, steps)}, repeat)
    identical = bool(np.array_equal(ea, sa) and np.array_equal(eb, sb))
    return {
        "n": n,
        "steps": steps,
        "identical": identical,
        "engine_ms": summary([v * 1e3 for v in t["engine"]]),
        "prange_on_shared_ms": summary([v * 1e3 for v in t["prange_on_shared"]]),
        "ratio": ratios(t["engine"], t["prange_on_shared"]),
    }


def idle_figure(eng, seconds: float) -> dict:
    """CPU seconds used by the coordinator and every worker of an engine
    left alone for ``seconds`` right after a burst of maps."""
    x = eng.zeros(1000)
    for _ in range(1000):
        eng.map(noop_kernel, x)
    procs = [psutil.Process()] + [psutil.Process(p) for p in eng.worker_pids]

    def cpu() -> list[float]:
        return [sum(p.cpu_times()[:2]) for p in procs]

    before = cpu()
    time.sleep(seconds)
    after = cpu()
    used = [a - b for a, b in zip(after, before)]
    return {
        "seconds": seconds,
        "cpu_s_total": sum(used),
        "cpu_s_coordinator": used[0],
        "cpu_s_workers": used[1:],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, fewer sizes")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    quick = args.quick
    numba.set_num_threads(WORKERS)
    fig: dict = {"machine": machine_info(), "workers": WORKERS}
    sizes = (256, 1024) if quick else (256, 512, 1024, 2048, 3000)
    with shmarray.Engine(workers=WORKERS) as eng:
        fig["noop"] = noop_figure(eng, repeat=5 if quick else 21, inner=2000)
        fig["heat"] = [heat_figure(eng, n, repeat=5 if quick else 15) for n in sizes]
        fig["triad"] = triad_figure(
            eng, 5_000_000 if quick else 50_000_000, repeat=5 if quick else 21
        )
        fig["jacobi"] = jacobi_figure(
            eng, 1024 if quick else 4096, steps=20, repeat=3 if quick else 11
        )
        fig["idle"] = idle_figure(eng, 2.0 if quick else 10.0)
    fig["machine"]["threading_layer"] = numba.threading_layer()

    m, v = fig["machine"], fig["machine"]["versions"]
    print(
        f"machine: {m['cpu']}, {m['usable_cpus']} CPUs, Python {v['python']}, "
        f"numba {v['numba']} ({m['threading_layer']}); {WORKERS} workers, "
        f"prange on {WORKERS} threads; medians [quartiles] over rounds"
    )
    r = fig["noop"]
    print(
        f"no-op map        engine {r['engine_us']['median']:6.1f} us "
        f"[{r['engine_us']['q1']:.1f}-{r['engine_us']['q3']:.1f}]   prange "
        f"{r['prange_us']['median']:5.1f} us [{r['prange_us']['q1']:.1f}-"
        f"{r['prange_us']['q3']:.1f}]   (target: engine <= 20 us)"
    )
    print(
        "iterated heat, us per step: sequential, prange, prange on shared, engine "
        "loop of maps, engine.iterate;\n  then over prange [quartiles]: loop of "
        "maps, iterate; and prange on shared over prange; identical"
    )
    for h in fig["heat"]:
        s = h["per_step_us"]
        e, i = h["engine_over_prange"], h["iterate_over_prange"]
        sh = h["prange_on_shared_over_prange"]
        print(
            f"  {h['n']:>5}^2  {s['sequential']['median']:8.1f} {s['prange']['median']:8.1f} "
            f"{s['prange_on_shared']['median']:8.1f} {s['engine']['median']:8.1f} "
            f"{s['engine_iterate']['median']:8.1f}   loop {e['median']:.3f} [{e['q1']:.3f}-"
            f"{e['q3']:.3f}]  iterate {i['median']:.3f} [{i['q1']:.3f}-{i['q3']:.3f}]  "
            f"shared {sh['median']:.3f}  {h['identical']}"
        )
    for name in ("triad", "jacobi"):
        f = fig[name]
        print(
            f"{name:<8} n={f['n']:<10} engine {f['engine_ms']['median']:7.2f} ms  "
            f"prange on shared {f['prange_on_shared_ms']['median']:7.2f} ms  ratio "
            f"{f['ratio']['median']:.3f} [{f['ratio']['q1']:.3f}-{f['ratio']['q3']:.3f}]"
            f"  (target <= 1.05)  identical {f['identical']}"
        )
    i = fig["idle"]
    print(
        f"idle {i['seconds']:.0f} s: {i['cpu_s_total']:.3f} CPU s in all (coordinator "
        f"{i['cpu_s_coordinator']:.3f}, workers "
        f"{', '.join(f'{w:.3f}' for w in i['cpu_s_workers'])}; target <= 0.05)"
    )
    save(fig, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
