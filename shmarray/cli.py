"""The ``shmarray`` command: demo, ls, gc."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from shmarray import blocks


def _demo(args: argparse.Namespace) -> int:
    import statistics

    import numba
    import numpy as np

    import shmarray
    from shmarray.kernels.stencils import heat_step, heat_step_prange as heat_prange

    n, steps, alpha, rounds = args.size, args.steps, 0.2, args.rounds
    u0 = np.zeros((n, n))
    yy, xx = np.ogrid[:n, :n]
    u0[(yy - n / 2) ** 2 + (xx - n / 3) ** 2 < (n / 8) ** 2] = 100.0

    print(f"shmarray demo: 2-D heat diffusion on a {n} x {n} float64 grid, "
          f"{steps} steps (5-point stencil, halo 1, double buffered)")
    with shmarray.Engine(workers=args.workers) as eng:
        workers = eng.workers
        numba.set_num_threads(min(workers, numba.config.NUMBA_NUM_THREADS))
        grids = {"sequential": (u0.copy(), u0.copy()), "prange": (u0.copy(), u0.copy()),
                 "map": (eng.from_numpy(u0), eng.from_numpy(u0)),
                 "iterate": (eng.from_numpy(u0), eng.from_numpy(u0))}

        def loop(step, name):
            def run():
                cur, nxt = grids[name]
                for _ in range(steps):
                    step(nxt, cur)
                    cur, nxt = nxt, cur
            return run

        def iterate():
            cur, nxt = grids["iterate"]
            eng.iterate(heat_step, nxt, cur, steps=steps, args=(alpha,), halo=1)

        methods = {
            "sequential": loop(lambda o, i: heat_step(o, i, alpha), "sequential"),
            "prange": loop(lambda o, i: heat_prange(o, i, alpha), "prange"),
            "map": loop(lambda o, i: eng.map(heat_step, o, i, args=(alpha,), halo=1), "map"),
            "iterate": iterate,
        }
        # Compile everywhere first, on a small grid of the same types.
        small = np.zeros((8, 8))
        heat_step(small.copy(), small, alpha)
        heat_prange(small.copy(), small, alpha)
        warm = eng.zeros((8, 8)), eng.zeros((8, 8))
        eng.map(heat_step, *warm, args=(alpha,), halo=1)
        eng.iterate(heat_step, *warm, steps=2, args=(alpha,), halo=1)
        del warm
        # Rounds in alternating order, each starting from the same grid.
        times: dict[str, list[float]] = {k: [] for k in methods}
        names = list(methods)
        for r in range(rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                for grid in grids[name]:
                    grid[...] = u0
                t0 = time.perf_counter()
                methods[name]()
                times[name].append(time.perf_counter() - t0)
        last = steps % 2                       # which buffer holds the result
        results = {k: v[last] for k, v in grids.items()}
        identical = all(np.array_equal(results["sequential"], r) for r in results.values())
        median = {k: statistics.median(v) for k, v in times.items()}
        seq = median["sequential"]
        labels = {"sequential": "sequential numba",
                  "prange": f"numba prange, {numba.get_num_threads()} threads",
                  "map": "shmarray, a loop of eng.map",
                  "iterate": "shmarray, eng.iterate"}
        print(f"  {workers} workers ({eng.start_method}); each time is the median of "
              f"{rounds} rounds run in alternating order")
        print(f"  {'':34} {'time':>9} {'speedup':>9}")
        for name in names:
            note = "   (threads in one process: the ceiling here)" if name == "prange" else ""
            print(f"  {labels[name]:<34} {median[name]:8.3f}s {seq / median[name]:8.2f}x{note}")
        print(f"  identical results : {'yes, all four bit for bit' if identical else 'NO'}")
        a = results["map"]
        print(f"  warm cells (>1)   : {np.count_nonzero(u0 > 1):,} at the start, "
              f"{np.count_nonzero(a > 1):,} after {steps} steps")
        used = [blk for blk in eng.blocks if blk.size >= a.nbytes]
        storage = eng.storage
        print("  blocks used       :")
        for blk in used:
            print(f"    {blk.name}  {blocks.format_bytes(blk.size)}")
        del a, results, grids
    left = [blk.name for blk in used if blocks.exists(blk.name)]
    print(f"  after close       : {len(left)} of those blocks left "
          f"({storage}), workers stopped")
    return 0 if identical and not left else 1


def threading_layer() -> str:
    """numba's threading layer, which it picks when a parallel kernel first
    runs: so run a tiny one (public API only)."""
    import numba
    try:
        return numba.threading_layer()
    except ValueError:
        pass

    @numba.njit(parallel=True)
    def touch(x):
        for i in numba.prange(x.shape[0]):
            x[i] = i

    import numpy as np
    touch(np.zeros(2))
    return numba.threading_layer()


def info() -> dict:
    """What ``shmarray info`` reports, as a dict."""
    import numba
    import numpy as np

    from shmarray import launch, options, pool

    layer = threading_layer()
    space = blocks.free_space()
    return {
        "usable_cpus": options.usable_cpus(),
        "default_workers": options.usable_cpus(),
        "start_method": pool.DEFAULT_START_METHOD,
        "start_methods_available": list(launch.METHODS),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba_threading_layer": layer,
        "shm_dir": blocks.SHM_DIR,
        "storage": options.coerce_storage(None),
        "memfd_available": blocks.HAVE_MEMFD,
        "shm_free_bytes": space[0] if space else None,
        "shm_total_bytes": space[1] if space else None,
        "blocks": [{"name": b.name, "size": b.size, "owner_pid": b.owner_pid,
                    "owner_alive": b.owner_alive} for b in blocks.scan()],
        "fresh_workers": fresh_workers(),
    }


def fresh_workers() -> dict:
    """What a fresh engine's workers cost here: start-up time, and each
    worker's ``Engine.stats()`` record after one small map."""
    import time

    import numpy as np

    from shmarray import Engine
    from shmarray.kernels.elementwise import scale

    t0 = time.perf_counter()
    with Engine() as eng:
        started = time.perf_counter() - t0
        x = eng.zeros(1024)
        eng.map(scale, x, x, args=(2.0,))
        stats = [s._asdict() for s in eng.stats()]
        del x
    return {"start_s": started, "workers": stats}


def _info(args: argparse.Namespace) -> int:
    data = info()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    free = data["shm_free_bytes"]
    print(f"usable CPUs        : {data['usable_cpus']} (default workers: "
          f"{data['default_workers']})")
    print(f"start method       : {data['start_method']} (available: "
          f"{', '.join(data['start_methods_available'])})")
    print(f"python / numpy     : {data['python']} / {data['numpy']}")
    print(f"numba              : {data['numba']}, threading layer "
          f"{data['numba_threading_layer']}")
    if free is not None:
        print(f"shared memory      : {data['shm_dir']}, {blocks.format_bytes(free)} "
              f"free of {blocks.format_bytes(data['shm_total_bytes'])}")
    print(f"storage            : {data['storage']} (Engine(storage=...) or "
          f"SHMARRAY_STORAGE; memfd {'available' if data['memfd_available'] else 'not available here'})")
    fresh = data["fresh_workers"]
    stats = fresh["workers"]
    print(f"a fresh engine     : {len(stats)} workers started in {fresh['start_s']:.2f} s; "
          f"each holds {_mib(min(s['uss'] for s in stats))}-"
          f"{_mib(max(s['uss'] for s in stats))} of its own memory (USS), "
          f"{_mib(max(s['rss'] for s in stats))} resident")
    for s in stats:
        print(f"  worker {s['worker']}: pid {s['pid']}, RSS {_mib(s['rss'])}, "
              f"USS {_mib(s['uss'])}, {s['tasks']} tasks, {s['kernels']} kernels, "
              f"busy {s['busy'] * 1e3:.1f} ms, replaced {s['replaced']} times")
    print(f"live blocks        : {len(data['blocks'])}")
    for b in data["blocks"]:
        print(f"  {b['name']:<30} {blocks.format_bytes(b['size']):>10}  owner "
              f"{b['owner_pid']} {'alive' if b['owner_alive'] else 'dead'}")
    return 0


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


BENCH_NEEDS = ("matplotlib", "joblib", "dask", "distributed")


def _bench(args: argparse.Namespace) -> int:
    import importlib.util
    missing = [m for m in BENCH_NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        print(f"shmarray bench compares against peers it cannot find here "
              f"({', '.join(missing)}). Install them with: "
              f"pip install 'shmarray[bench]'", file=sys.stderr)
        return 2
    from shmarray import report
    size = "tiny" if args.tiny else "quick" if args.quick else "full"
    return report.main(size, args.out, args.max_workers)


def _where(args: argparse.Namespace) -> str | None:
    """``--dir``, checked: None for /dev/shm."""
    if args.dir is None:
        return None
    path = os.path.abspath(args.dir)
    if not os.path.isdir(path):
        raise SystemExit(f"shmarray {args.command}: --dir {args.dir!r} is not a "
                         f"directory; pass the directory given as Engine(storage=...).")
    return path


def _ls(args: argparse.Namespace) -> int:
    where = _where(args)
    found = blocks.scan(where)
    if not found:
        print(f"no shmarray blocks in {where or blocks.SHM_DIR}")
        return 0
    width = max(30, *(len(b.name) for b in found))
    print(f"{'name':<{width}} {'size':>10} {'owner pid':>10}  owner")
    for b in found:
        print(f"{b.name:<{width}} {blocks.format_bytes(b.size):>10} "
              f"{b.owner_pid:>10}  {_state(b.owner_alive)}")
    return 0


def _state(alive: bool | None) -> str:
    return {True: "alive", False: "dead", None: "unknown"}[alive]


def _gc(args: argparse.Namespace) -> int:
    removed = blocks.collect_orphans(args.min_age, _where(args))
    for b in removed:
        print(f"unlinked {b.name} ({blocks.format_bytes(b.size)}, created by pid "
              f"{b.owner_pid}; no live process holds it)")
    print(f"{len(removed)} block(s) removed")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="shmarray",
        description="Shared-memory NumPy arrays with numba kernels run in "
                    "place by a pool of worker processes.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="heat diffusion: sequential numba vs the engine")
    p.add_argument("--size", type=int, default=3000, help="grid side (default 3000)")
    p.add_argument("--steps", type=int, default=300, help="time steps (default 300)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: usable CPUs)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of every method, in alternating order (default 3)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("bench", help="every workload through every method, with plots")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true",
                       help="small sizes, few repeats: under 2 minutes on 2 CPUs")
    group.add_argument("--tiny", action="store_true",
                       help="smallest sizes: checks every method end to end (tests)")
    p.add_argument("--out", help="directory for bench.json and the PNG plots")
    p.add_argument("--max-workers", type=int, default=None,
                   help="sweep workers from 1 to this (default: usable CPUs)")
    p.set_defaults(func=_bench)

    p = sub.add_parser("info", help="CPUs, start method, numba, /dev/shm space, live blocks")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_info)

    dir_help = ("look in this directory (blocks of Engine(storage=DIR)) instead of "
                "/dev/shm; memfd blocks have no name and need no cleaning")
    p = sub.add_parser("ls", help="list shmarray blocks: name, size, owner pid, owner alive")
    p.add_argument("--dir", metavar="PATH", help=dir_help)
    p.set_defaults(func=_ls)

    p = sub.add_parser("gc", help="unlink shmarray blocks that no live process "
                                  "holds (their creator is dead)")
    p.add_argument("--min-age", type=float, default=blocks.GC_MIN_AGE,
                   help="leave blocks younger than this many seconds alone "
                        f"(default {blocks.GC_MIN_AGE:g}: a block is locked a "
                        f"moment after it is created)")
    p.add_argument("--dir", metavar="PATH", help=dir_help)
    p.set_defaults(func=_gc)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
