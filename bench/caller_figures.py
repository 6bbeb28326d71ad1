"""The caller computing a share (``prepare(in_caller=True)``) and huge pages
for shared memory, each side by side with numba prange in one process,
interleaved round by round, with identical results:

* a no-op step: ``eng.map``, a prepared map, a prepared map with
  ``in_caller=True``, the kernel called on its rows from Python (the
  caller's share alone) and prange's fork-join (2 threads); for the first
  three, where the scheduler put the caller among the workers and how long
  each process ran and waited for a CPU (``/proc/PID/schedstat``); and
  ``eng.map`` and a prepared map with 1 worker, where no CPU is shared;
* a heat loop (5-point stencil, one step per call, the grid swapped by
  Python) at 256^2 to 2048^2: the prepared map with and without
  ``in_caller``, and ``eng.iterate``, against prange on the same shared
  memory and on private NumPy arrays;
* Jacobi 4096^2, 20 steps: a loop of ``eng.map`` and an ``in_caller``
  prepared loop against prange on private arrays and on the same memory.

``--huge`` (as root, Linux): sets ``shmem_enabled`` to ``advise`` for the
run and restores what it was, even when interrupted, so that memfd blocks
get transparent huge pages; use it with ``--storage memfd``.  Every report
names the kernel's settings and how much shared memory sat on huge pages
(``ShmemHugePages``) while the figures ran.

Run: ``.venv/bin/python bench/caller_figures.py [--quick] [--storage memfd]
[--huge] [--json FILE]``
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import statistics
import sys
import time

import numba
import numpy as np

import shmarray
from loop_figures import touch, touch_prange
from peers import jacobi_prange
from shmarray.kernels.stencils import heat_step, heat_step_prange, jacobi
from shmarray.storage import hugepages
from workloads import machine_info, ratios, repeated, rounds, save, summary

ALPHA = 0.2
WORKERS = 2
ROWS = WORKERS * 8


def prepared_steps(step, steps: int):
    """``run(count)``: ``count`` steps of a prepared map, swapped after each."""

    def run(count=steps):
        for _ in range(count):
            step()
            step.swap()

    return run


def prange_steps(kernel, x, y, steps: int, *args):
    """``run(count)``: ``count`` steps of a prange stencil ``kernel(out,
    inp, *args)`` from ``x`` into ``y``, swapped after each."""

    def run(count=steps):
        a, b = x, y
        for _ in range(count):
            kernel(b, a, *args)
            a, b = b, a

    return run


def meminfo() -> dict:
    """``ShmemHugePages`` and ``AnonHugePages`` (kB) from /proc/meminfo."""
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("ShmemHugePages", "AnonHugePages"):
                    out[key + "_kB"] = int(rest.split()[0])
    except OSError:
        pass
    return out


@contextlib.contextmanager
def shmem_advise(wanted: bool):
    """``shmem_enabled`` set to ``advise`` for the block (root only), then
    restored, also on SIGTERM or Ctrl-C."""
    if not wanted:
        yield None
        return
    before = hugepages.shmem_enabled()
    if before is None:
        raise SystemExit("--huge: this kernel has no transparent huge pages for shmem")
    try:
        with open(hugepages.SHMEM_ENABLED, "w") as f:
            f.write("advise")
    except OSError as exc:
        raise SystemExit(
            f"--huge needs root: cannot write {hugepages.SHMEM_ENABLED}: {exc}"
        ) from None
    old_term = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        yield before
    finally:
        with open(hugepages.SHMEM_ENABLED, "w") as f:
            f.write(before)
        signal.signal(signal.SIGTERM, old_term)


def schedstat(pid: int) -> tuple[int, int] | None:
    """(ns on a CPU, ns runnable but waiting for one) of process ``pid``'s
    main thread so far, from Linux's /proc/PID/schedstat; None elsewhere."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            run, wait, _ = f.read().split()
        return int(run), int(wait)
    except (OSError, ValueError):
        return None


def last_cpu(pid: int) -> int | None:
    """The CPU that process ``pid``'s main thread last ran on (field 39 of
    /proc/PID/stat), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[36])
    except (OSError, ValueError, IndexError):
        return None


def placed(run, pids: list[int], calls: int, log: list):
    """``run`` that also notes, in ``log``, each process of ``pids`` (the
    caller first, then the workers): per call, the microseconds it spent on
    a CPU and waiting for one, and the CPU it was on as the round ended.
    Where the scheduler puts the caller among the workers decides how long
    a short map takes; this is what shows it."""

    def noted():
        before = [schedstat(p) for p in pids]
        run()
        after = [schedstat(p) for p in pids]
        if None in before or None in after:
            return
        log.append(
            {
                "cpus": [last_cpu(p) for p in pids],
                "run_us": [(b[0] - a[0]) / calls / 1e3 for a, b in zip(before, after)],
                "wait_us": [(b[1] - a[1]) / calls / 1e3 for a, b in zip(before, after)],
            }
        )

    return noted


def placement(times: list[float], log: list[dict]) -> dict:
    """Rounds grouped by where the caller ended them: alone on its CPU, or
    on the CPU of worker i; per group, the rounds, their median us per
    call, and the mean us on a CPU and waiting per call of each process
    (caller first)."""
    groups: dict[str, list] = {}
    for t, entry in zip(times, log):
        me, *workers = entry["cpus"]
        where = (
            "caller alone"
            if me not in workers
            else "caller with worker " + ",".join(str(i) for i, c in enumerate(workers) if c == me)
        )
        groups.setdefault(where, []).append((t, entry))
    out = {}
    for where, rows in sorted(groups.items()):
        n = len(rows)
        out[where] = {
            "rounds": n,
            "us": statistics.median(t * 1e6 for t, _ in rows),
            "run_us": [
                sum(e["run_us"][i] for _, e in rows) / n for i in range(len(rows[0][1]["run_us"]))
            ],
            "wait_us": [
                sum(e["wait_us"][i] for _, e in rows) / n
                for i in range(len(rows[0][1]["wait_us"]))
            ],
        }
    return out


def noop_figure(eng, repeat: int, inner: int) -> dict:
    xs = {name: eng.zeros(ROWS) for name in ("map", "prepared", "in_caller", "alone")}
    px = np.zeros(ROWS)
    plain = eng.prepare(touch, xs["prepared"], args=(1.0,))
    caller = eng.prepare(touch, xs["in_caller"], args=(1.0,), in_caller=True)
    share = xs["alone"][ROWS // WORKERS :]

    fns = {
        "map": repeated(lambda: eng.map(touch, xs["map"], args=(1.0,)), inner),
        "prepared": repeated(plain, inner),
        "in_caller": repeated(caller, inner),
        "share_alone": repeated(lambda: touch(share, 1.0), inner),
        "prange": repeated(lambda: touch_prange(px, 1.0), inner),
    }
    pids = [os.getpid()] + [w.pid for w in eng._dispatcher.pool.workers]
    logs: dict[str, list] = {k: [] for k in ("map", "prepared", "in_caller")}
    for k, log in logs.items():
        fn, calls = fns[k]
        fns[k] = (placed(fn, pids, calls, log), calls)
    for fn, _ in fns.values():
        fn()
    for log in logs.values():
        log.clear()  # the warm-up's
    t = rounds(fns, repeat)
    identical = all(np.array_equal(xs[k], px) for k in ("map", "prepared", "in_caller"))
    return {
        "us": {k: summary([v * 1e6 for v in times]) for k, times in t.items()},
        "placement": {k: placement(t[k], log) for k, log in logs.items()},
        "identical": identical,
        "in_caller_over_prange": ratios(t["in_caller"], t["prange"]),
        "in_caller_over_prepared": ratios(t["in_caller"], t["prepared"]),
    }


def one_worker_figure(storage: str, repeat: int, inner: int) -> dict:
    """The no-op ``eng.map`` and prepared map of an engine of one worker,
    against prange on 2 threads: the caller and its one worker each have a
    CPU of their own, so this is the map path without the context switches
    of three processes on two CPUs."""
    with shmarray.Engine(workers=1, storage=storage) as eng:
        xs, px = {k: eng.zeros(ROWS) for k in ("map", "prepared")}, np.zeros(ROWS)
        step = eng.prepare(touch, xs["prepared"], args=(1.0,))

        fns = {
            "map": repeated(lambda: eng.map(touch, xs["map"], args=(1.0,)), inner),
            "prepared": repeated(step, inner),
            "prange": repeated(lambda: touch_prange(px, 1.0), inner),
        }
        for fn, _ in fns.values():
            fn()
        t = rounds(fns, repeat)
        identical = all(np.array_equal(x, px) for x in xs.values())
    return {
        "us": {k: summary([v * 1e6 for v in ts]) for k, ts in t.items()},
        "identical": identical,
    }


def breakdown(eng, calls: int = 200_000) -> dict:
    """Where a prepared ``in_caller`` no-op step's microseconds go: the
    step as a user calls it, then each layer under it called alone, from
    outside in (the dispatcher's run, the round, the caller's share; the
    difference between two is that layer's own Python).  Reaches into the
    engine's private parts: a measurement, not an API."""
    from shmarray import rounds as rounds_module

    x = eng.zeros(ROWS)
    step = eng.prepare(touch, x, args=(1.0,), in_caller=True)
    call = step._calls[0]
    runner = eng._dispatcher.runner
    layers = {
        "step": step,
        "runner_run": lambda: runner.run(call),
        "round": lambda: runner.round(call, call.job),
        "share": lambda: rounds_module.run_share(call),
        "kernel": functools.partial(touch, call.share[0][0], 1.0),
    }
    out = {}
    for name, fn in layers.items():
        for _ in range(calls // 10):
            fn()
        best = []
        for _ in range(5):
            t0 = time.perf_counter_ns()
            for _ in range(calls // 5):
                fn()
            best.append((time.perf_counter_ns() - t0) / (calls // 5) / 1e3)
        out[name] = summary(best)
    return out


def steps_for(n: int) -> int:
    """Steps in one timed round: about 50 ms of prange at any size, a loop
    long enough that one wake-up does not decide its time; even, so that
    every side ends a round with its result in the same array."""
    return max(20, int(4e8 // (n * n)) // 2 * 2)


WARM = 4  # untimed steps before each timed round (an even count: the same parity)


def timed(sides: dict, steps: int, repeat: int) -> dict[str, list[float]]:
    """Seconds per step of each side (``side(count)`` runs ``count`` steps),
    interleaved round by round.  Each timed round starts warm: ``WARM``
    untimed steps first wake the side's workers or threads after the pause
    between sides, as they are awake in a long loop; every side runs the
    same steps, so their results stay comparable bit for bit."""
    return rounds(
        {k: (fn, steps) for k, fn in sides.items()},
        repeat,
        prepare={k: functools.partial(fn, WARM) for k, fn in sides.items()},
    )


def heat_figure(eng, n: int, repeat: int) -> dict:
    steps = steps_for(n)
    u0 = np.random.default_rng(n).random((n, n))
    grids = {
        k: (eng.from_numpy(u0), eng.from_numpy(u0))
        for k in ("prepared", "in_caller", "iterate", "shared")
    }
    pa, pb = u0.copy(), u0.copy()
    plain = eng.prepare(
        heat_step, grids["prepared"][1], grids["prepared"][0], args=(ALPHA,), halo=1
    )
    caller = eng.prepare(
        heat_step,
        grids["in_caller"][1],
        grids["in_caller"][0],
        args=(ALPHA,),
        halo=1,
        in_caller=True,
    )

    def iterate(count=steps):
        eng.iterate(
            heat_step, grids["iterate"][1], grids["iterate"][0], steps=count, args=(ALPHA,), halo=1
        )

    sides = {
        "prepared": prepared_steps(plain, steps),
        "in_caller": prepared_steps(caller, steps),
        "iterate": iterate,
        "prange_shared": prange_steps(heat_step_prange, *grids["shared"], steps, ALPHA),
        "prange": prange_steps(heat_step_prange, pa, pb, steps, ALPHA),
    }
    for _ in range(3):
        for fn in sides.values():
            fn()
    t = timed(sides, steps, repeat)
    identical = all(np.array_equal(a, pa) and np.array_equal(b, pb) for a, b in grids.values())
    return {
        "n": n,
        "steps_per_round": steps,
        "identical": identical,
        "per_step_us": {k: summary([s * 1e6 for s in v]) for k, v in t.items()},
        "in_caller_over_prange_shared": ratios(t["in_caller"], t["prange_shared"]),
        "in_caller_over_prange": ratios(t["in_caller"], t["prange"]),
        "prepared_over_prange_shared": ratios(t["prepared"], t["prange_shared"]),
        "iterate_over_prange_shared": ratios(t["iterate"], t["prange_shared"]),
        "prange_shared_over_prange": ratios(t["prange_shared"], t["prange"]),
    }


def jacobi_figure(eng, n: int, steps: int, repeat: int) -> dict:
    u0 = np.random.default_rng(1).random((n, n))
    grids = {k: (eng.from_numpy(u0), eng.from_numpy(u0)) for k in ("maps", "in_caller", "shared")}
    pa, pb = u0.copy(), u0.copy()
    caller = eng.prepare(
        jacobi, grids["in_caller"][1], grids["in_caller"][0], halo=1, in_caller=True
    )

    def maps(count=steps):
        x, y = grids["maps"]
        for _ in range(count):
            eng.map(jacobi, y, x, halo=1)
            x, y = y, x

    sides = {
        "maps": maps,
        "in_caller": prepared_steps(caller, steps),
        "prange_shared": prange_steps(jacobi_prange, *grids["shared"], steps),
        "prange": prange_steps(jacobi_prange, pa, pb, steps),
    }
    for fn in sides.values():
        fn()
    t = timed(sides, steps, repeat)
    identical = all(np.array_equal(a, pa) and np.array_equal(b, pb) for a, b in grids.values())
    return {
        "n": n,
        "steps": steps,
        "identical": identical,
        "per_step_ms": {k: summary([s * 1e3 for s in v]) for k, v in t.items()},
        "maps_over_prange": ratios(t["maps"], t["prange"]),
        "in_caller_over_prange": ratios(t["in_caller"], t["prange"]),
        "maps_over_prange_shared": ratios(t["maps"], t["prange_shared"]),
        "prange_shared_over_prange": ratios(t["prange_shared"], t["prange"]),
    }


def q(s: dict, fmt: str = ".3f") -> str:
    return f"{s['median']:{fmt}} [{s['q1']:{fmt}}-{s['q3']:{fmt}}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, fewer sizes")
    parser.add_argument("--storage", default="shm", help="the engine's storage (default: shm)")
    parser.add_argument(
        "--huge", action="store_true", help="as root: shmem_enabled=advise for the run, restored"
    )
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    quick = args.quick
    numba.set_num_threads(WORKERS)
    sizes = (256, 1024) if quick else (256, 512, 1024, 2048)
    with shmem_advise(args.huge) as before:
        fig: dict = {
            "machine": machine_info(),
            "workers": WORKERS,
            "storage": args.storage,
            "shmem_enabled_set": "advise" if args.huge else None,
            "shmem_enabled_before": before,
            "meminfo_before": meminfo(),
        }
        with shmarray.Engine(workers=WORKERS, storage=args.storage) as eng:
            fig["noop"] = noop_figure(eng, repeat=5 if quick else 21, inner=2000)
            fig["breakdown_us"] = breakdown(eng, 20_000 if quick else 200_000)
            fig["heat"] = [heat_figure(eng, n, repeat=5 if quick else 15) for n in sizes]
            fig["jacobi"] = jacobi_figure(
                eng, 1024 if quick else 4096, steps=20, repeat=3 if quick else 11
            )
            fig["meminfo_during"] = meminfo()  # the arrays are still alive
        fig["noop_one_worker"] = one_worker_figure(args.storage, 5 if quick else 21, 2000)
    fig["machine"]["threading_layer"] = numba.threading_layer()

    m, v = fig["machine"], fig["machine"]["versions"]
    thp = m["transparent_hugepage"]
    print(
        f"machine: {m['cpu']}, {m['usable_cpus']} CPUs, Python {v['python']}, numba "
        f"{v['numba']} ({m['threading_layer']}); {WORKERS} workers (or 1 + the caller), "
        f"storage {args.storage}; prange on {WORKERS} threads; medians [quartiles]"
    )
    print(
        f"huge pages: anonymous [{thp['enabled']}], shmem [{thp['shmem_enabled']}]"
        f"{' (set by this run, was ' + str(before) + ')' if args.huge else ''}; "
        f"ShmemHugePages {fig['meminfo_during'].get('ShmemHugePages_kB')} kB, "
        f"AnonHugePages {fig['meminfo_during'].get('AnonHugePages_kB')} kB with the arrays alive"
    )
    n = fig["noop"]
    print(
        "no-op, us: "
        + "  ".join(f"{k} {q(s, '.2f')}" for k, s in n["us"].items())
        + f"  identical {n['identical']}  (target: in_caller <= 4)"
    )
    print(
        "  where the scheduler put the caller (as each round ended), rounds, median us a"
        " call, and per call the us each process (caller, workers) ran / waited for a CPU:"
    )
    for side, groups in n["placement"].items():
        for where, g in groups.items():
            use = ", ".join(f"{r:.1f}/{w:.1f}" for r, w in zip(g["run_us"], g["wait_us"]))
            print(f"    {side:9} {where:20} {g['rounds']:3}  {g['us']:6.2f}  {use}")
    o = fig["noop_one_worker"]
    print(
        "  with 1 worker (the caller and the worker each on a CPU of its own), us: "
        + "  ".join(f"{k} {q(s, '.2f')}" for k, s in o["us"].items())
        + f"  identical {o['identical']}"
    )
    b = {k: v["median"] for k, v in fig["breakdown_us"].items()}
    print(
        f"  where a prepared in_caller no-op step's {b['step']:.2f} us go: "
        f"PreparedMap and the dispatcher {b['step'] - b['runner_run']:.2f}, the runner "
        f"(signals held, output) {b['runner_run'] - b['round']:.2f}, the round's Python "
        f"and compiled ring and wait {b['round'] - b['share']:.2f}, the caller's share "
        f"{b['share']:.2f} (of which the kernel call {b['kernel']:.2f})"
    )
    print("heat loop, us per step, and in_caller over prange on the same memory / private:")
    for h in fig["heat"]:
        s = h["per_step_us"]
        print(
            f"  {h['n']:>5}^2  prepared {s['prepared']['median']:8.1f}  in_caller "
            f"{s['in_caller']['median']:8.1f}  prange shared {s['prange_shared']['median']:8.1f}"
            f"  iterate {s['iterate']['median']:8.1f}"
            f"  private {s['prange']['median']:8.1f}   in_caller/shared "
            f"{q(h['in_caller_over_prange_shared'])}  in_caller/private "
            f"{q(h['in_caller_over_prange'])}  identical {h['identical']}"
        )
    j = fig["jacobi"]
    s = j["per_step_ms"]
    print(
        f"jacobi {j['n']}^2, ms per step: maps {s['maps']['median']:.3f}  in_caller "
        f"{s['in_caller']['median']:.3f}  prange shared {s['prange_shared']['median']:.3f}  "
        f"private {s['prange']['median']:.3f};  maps/private {q(j['maps_over_prange'])}  "
        f"in_caller/private {q(j['in_caller_over_prange'])}  shared/private "
        f"{q(j['prange_shared_over_prange'])}  identical {j['identical']}"
    )
    save(fig, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
