"""The figures of a Python loop of small maps, each side by side with numba
prange in one process, interleaved round by round, with identical results:

* what one map costs: a no-op through ``eng.map`` (tuple ``args`` and an
  integer ``chunks``; a list ``args`` and a chunk list ``[8, 8]``), through
  a prepared map (``eng.prepare``), and prange's own fork-join (2 threads);
* a heat loop (a 5-point stencil, one map per step, the grid swapped by
  Python between steps) at 256^2 to 2048^2: a loop of ``eng.map``, a loop
  of a prepared map and ``eng.iterate``, each over prange on private arrays;
* the same 1024^2 heat loop with 5 workers on this machine's CPUs against 2
  workers, under one wait policy (``--wait``, default ``auto``);
* the CPU seconds an engine left idle for 10 s costs, after a burst of maps.

Run: ``.venv/bin/python bench/loop_figures.py [--quick] [--wait auto] [--json FILE]``
"""

from __future__ import annotations

import argparse
import sys
import time

import numba
import numpy as np
import psutil
from numba import njit, prange as numba_prange

import shmarray
from shmarray.kernels.stencils import heat_step, heat_step_prange
from shmarray.worker import HOT_RUNS
from workloads import machine_info, ratios, repeated, rounds, save, summary

ALPHA = 0.2
WORKERS = 2
ROWS = WORKERS * 8  # the no-op maps: 8 rows a worker


@njit(cache=True)
def touch(x, by):
    """The least a map can do: one write per row of its chunk."""
    for i in range(x.shape[0]):
        x[i] += by


@njit(parallel=True, cache=True)
def touch_prange(x, by):
    for i in numba_prange(x.shape[0]):
        x[i] += by


def noop_figure(eng, repeat: int, inner: int) -> dict:
    """One map of 16 rows through each path, against prange on the same body."""
    xs = {name: eng.zeros(ROWS) for name in ("tuple", "list", "prepared")}
    px = np.zeros(ROWS)
    step = eng.prepare(touch, xs["prepared"], args=(1.0,))

    fns = {
        "map_tuple_int": repeated(
            lambda: eng.map(touch, xs["tuple"], args=(1.0,), chunks=WORKERS), inner
        ),
        "map_list_chunklist": repeated(
            lambda: eng.map(touch, xs["list"], args=[1.0], chunks=[8] * WORKERS), inner
        ),
        "prepared": repeated(step, inner),
        "prange": repeated(lambda: touch_prange(px, 1.0), inner),
    }
    for fn, _ in fns.values():
        fn()
    t = rounds(fns, repeat)
    identical = all(np.array_equal(x, px) for x in xs.values())
    out = {name: summary([v * 1e6 for v in times]) for name, times in t.items()}
    return {
        "us": out,
        "identical": identical,
        "list_over_tuple": ratios(t["map_list_chunklist"], t["map_tuple_int"]),
        "map_over_prange": ratios(t["map_tuple_int"], t["prange"]),
        "prepared_over_prange": ratios(t["prepared"], t["prange"]),
    }


def steps_for(n: int) -> int:
    return max(20, int(4e7 // (n * n)))


def warm_rounds(steps: int) -> int:
    """Rounds of ``steps`` alternating maps (two jobs) that make both jobs
    hot in the workers (``worker.HOT_RUNS`` runs each), so that no timed
    round pays for compiling the workers' serving loop."""
    return 1 + 2 * HOT_RUNS // steps


def heat_figure(eng, n: int, repeat: int) -> dict:
    steps = steps_for(n)
    u0 = np.random.default_rng(n).random((n, n))
    ma, mb = eng.from_numpy(u0), eng.from_numpy(u0)  # a loop of eng.map
    qa, qb = eng.from_numpy(u0), eng.from_numpy(u0)  # a loop of a prepared map
    ia, ib = eng.from_numpy(u0), eng.from_numpy(u0)  # eng.iterate
    pa, pb = u0.copy(), u0.copy()  # prange, private arrays
    step = eng.prepare(heat_step, qb, qa, args=(ALPHA,), halo=1)

    def maps():
        x, y = ma, mb
        for _ in range(steps):
            eng.map(heat_step, y, x, args=(ALPHA,), halo=1)
            x, y = y, x

    def prepared():
        for _ in range(steps):
            step()
            step.swap()

    def iterate():
        eng.iterate(heat_step, ib, ia, steps=steps, args=(ALPHA,), halo=1)

    def prange():
        x, y = pa, pb
        for _ in range(steps):
            heat_step_prange(y, x, ALPHA)
            x, y = y, x

    fns = {
        "maps": (maps, steps),
        "prepared": (prepared, steps),
        "iterate": (iterate, steps),
        "prange": (prange, steps),
    }
    for _ in range(warm_rounds(steps)):
        for fn, _ in fns.values():
            fn()
    t = rounds(fns, repeat)
    # every side ran the same number of steps from the same grid
    identical = all(
        np.array_equal(a, pa) and np.array_equal(b, pb) for a, b in ((ma, mb), (qa, qb), (ia, ib))
    )
    return {
        "n": n,
        "steps_per_round": steps,
        "identical": identical,
        "per_step_us": {k: summary([s * 1e6 for s in v]) for k, v in t.items()},
        "maps_over_prange": ratios(t["maps"], t["prange"]),
        "prepared_over_prange": ratios(t["prepared"], t["prange"]),
        "iterate_over_prange": ratios(t["iterate"], t["prange"]),
    }


def workers_figure(wait: str, n: int, repeat: int, many: int) -> dict:
    """The same heat loop of maps on an engine of ``many`` workers and one
    of 2, each round one engine's loop after the other's."""
    steps = steps_for(n)
    u0 = np.random.default_rng(n).random((n, n))
    with (
        shmarray.Engine(workers=WORKERS, wait=wait) as few,
        shmarray.Engine(workers=many, wait=wait) as lots,
    ):
        arrays = {e: (e.from_numpy(u0), e.from_numpy(u0)) for e in (few, lots)}

        def loop(eng):
            def run():
                x, y = arrays[eng]
                for _ in range(steps):
                    eng.map(heat_step, y, x, args=(ALPHA,), halo=1)
                    x, y = y, x

            return run, steps

        fns = {"2w": loop(few), f"{many}w": loop(lots)}
        for _ in range(warm_rounds(steps)):
            for fn, _ in fns.values():
                fn()
        t = rounds(fns, repeat, pause=0.05)
        identical = all(np.array_equal(a, b) for a, b in zip(arrays[few], arrays[lots]))
    return {
        "n": n,
        "wait": wait,
        "workers": many,
        "identical": identical,
        "per_step_us": {k: summary([s * 1e6 for s in v]) for k, v in t.items()},
        "many_over_2": ratios(t[f"{many}w"], t["2w"]),
    }


def idle_figure(eng, seconds: float) -> dict:
    """CPU seconds used by the coordinator and every worker of an engine
    left alone for ``seconds`` right after a burst of maps."""
    x = eng.zeros(ROWS)
    for _ in range(1000):
        eng.map(touch, x, args=(1.0,))
    procs = [psutil.Process()] + [psutil.Process(p) for p in eng.worker_pids]

    def cpu() -> list[float]:
        return [sum(p.cpu_times()[:2]) for p in procs]

    before = cpu()
    time.sleep(seconds)  # what is measured is the idleness itself
    used = [a - b for a, b in zip(cpu(), before)]
    return {
        "seconds": seconds,
        "cpu_s_total": sum(used),
        "cpu_s_coordinator": used[0],
        "cpu_s_workers": used[1:],
    }


def q(s: dict, fmt: str = ".2f") -> str:
    return f"{s['median']:{fmt}} [{s['q1']:{fmt}}-{s['q3']:{fmt}}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, fewer sizes")
    parser.add_argument(
        "--wait",
        default="auto",
        choices=("auto", "spin", "passive"),
        help="the wait policy of every engine (default: auto)",
    )
    parser.add_argument(
        "--many", type=int, default=5, help="the worker count set against 2 workers (default: 5)"
    )
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    quick = args.quick
    numba.set_num_threads(WORKERS)
    fig: dict = {"machine": machine_info(), "workers": WORKERS, "wait": args.wait}
    sizes = (256, 1024) if quick else (256, 512, 1024, 2048)
    with shmarray.Engine(workers=WORKERS, wait=args.wait) as eng:
        fig["noop"] = noop_figure(eng, repeat=5 if quick else 21, inner=2000)
        fig["heat"] = [heat_figure(eng, n, repeat=5 if quick else 15) for n in sizes]
        fig["idle"] = idle_figure(eng, 2.0 if quick else 10.0)
    fig["workers_5_vs_2"] = workers_figure(
        args.wait, 1024, repeat=5 if quick else 11, many=args.many
    )
    fig["machine"]["threading_layer"] = numba.threading_layer()

    m, v = fig["machine"], fig["machine"]["versions"]
    print(
        f"machine: {m['cpu']}, {m['usable_cpus']} CPUs, Python {v['python']}, numba "
        f"{v['numba']} ({m['threading_layer']}); {WORKERS} workers, wait={args.wait}, "
        f"prange on {WORKERS} threads; medians [quartiles] over rounds"
    )
    n = fig["noop"]
    print(
        "no-op map, us:  "
        + "   ".join(f"{k} {q(s, '.1f')}" for k, s in n["us"].items())
        + f"   identical {n['identical']}"
    )
    print(
        f"  list args + chunk list over tuple + int: {q(n['list_over_tuple'], '.3f')}"
        "  (target <= 1.3)"
    )
    print("heat loop, us per step (maps, prepared, iterate, prange) and over prange [quartiles]:")
    for h in fig["heat"]:
        s = h["per_step_us"]
        print(
            f"  {h['n']:>5}^2  {s['maps']['median']:8.1f} {s['prepared']['median']:8.1f} "
            f"{s['iterate']['median']:8.1f} {s['prange']['median']:8.1f}   maps "
            f"{q(h['maps_over_prange'], '.3f')}  prepared {q(h['prepared_over_prange'], '.3f')}"
            f"  iterate {q(h['iterate_over_prange'], '.3f')}  identical {h['identical']}"
        )
    w = fig["workers_5_vs_2"]
    print(
        f"heat loop {w['n']}^2, {w['workers']} workers over 2 (wait={w['wait']}): "
        f"{q(w['many_over_2'], '.3f')}  (target <= 1.3)  identical {w['identical']}"
    )
    i = fig["idle"]
    print(
        f"idle {i['seconds']:.0f} s: {i['cpu_s_total']:.3f} CPU s in all (coordinator "
        f"{i['cpu_s_coordinator']:.3f}, workers "
        f"{', '.join(f'{x:.3f}' for x in i['cpu_s_workers'])})"
    )
    save(fig, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
