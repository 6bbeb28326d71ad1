"""The ``shmarray`` command: demo, bench, info, ls, gc.

Imports stay inside the subcommands, and none but ``demo``, ``bench`` and
``info --engine`` compiles a kernel or starts a worker.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from shmarray import blocks
from shmarray.storage import hugepages


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

    print(
        f"shmarray demo: 2-D heat diffusion, {n} x {n} float64, {steps} steps "
        f"(5-point stencil, halo 1)"
    )
    for line in load_report(machine_load(), args.workers or _default_workers()):
        print(f"  {line}")
    with shmarray.Engine(workers=args.workers) as eng:
        workers = eng.workers
        numba.set_num_threads(min(workers, numba.config.NUMBA_NUM_THREADS))
        grids = {
            "sequential": (u0.copy(), u0.copy()),
            "prange": (u0.copy(), u0.copy()),
            "map": (eng.from_numpy(u0), eng.from_numpy(u0)),
            "iterate": (eng.from_numpy(u0), eng.from_numpy(u0)),
        }

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
            for name in names if r % 2 == 0 else names[::-1]:
                for grid in grids[name]:
                    grid[...] = u0
                t0 = time.perf_counter()
                methods[name]()
                times[name].append(time.perf_counter() - t0)
        last = steps % 2  # which buffer holds the result
        results = {k: v[last] for k, v in grids.items()}
        identical = all(np.array_equal(results["sequential"], r) for r in results.values())
        median = {k: statistics.median(v) for k, v in times.items()}
        seq = median["sequential"]
        labels = {
            "sequential": "sequential numba",
            "prange": f"numba prange, {numba.get_num_threads()} threads",
            "map": "shmarray, a loop of eng.map",
            "iterate": "shmarray, eng.iterate",
        }
        print(
            f"  {workers} workers ({eng.start_method}); each time is the median of "
            f"{rounds} rounds run in alternating order"
        )
        print(f"  {'':34} {'time':>9} {'speedup':>9}")
        for name in names:
            note = "   (threads sharing one process)" if name == "prange" else ""
            print(f"  {labels[name]:<34} {median[name]:8.3f}s {seq / median[name]:8.2f}x{note}")
        print(f"  identical results : {'yes, all four bit for bit' if identical else 'NO'}")
        a = results["map"]
        print(
            f"  warm cells (>1)   : {np.count_nonzero(u0 > 1):,} at the start, "
            f"{np.count_nonzero(a > 1):,} after {steps} steps"
        )
        used = [blk for blk in eng.blocks if blk.size >= a.nbytes]
        storage = eng.storage
        print("  blocks used       :")
        for blk in used:
            print(f"    {blk.name}  {blocks.format_bytes(blk.size)}")
        # Drop every array before the engine closes, so its blocks go now.
        del a, results
        grids.clear()
    left = [blk.name for blk in used if blocks.exists(blk.name)]
    print(f"  after close       : {len(left)} of those blocks left ({storage}), workers stopped")
    return 0 if identical and not left else 1


def machine_load(interval: float = 0.3) -> dict:
    """How busy the machine is before the demo starts its workers: the load
    averages, the usable CPUs (``options.usable_cpus``: affinity and cgroup
    quota), and how many of those are really free, from each usable CPU's
    idle share over ``interval`` seconds (capped by the quota).  The load
    average says how many processes wanted a CPU over the last minute; the
    idle share is what the workers will find now."""
    import psutil

    from shmarray import options

    usable = options.usable_cpus()
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    busy = psutil.cpu_percent(interval=interval, percpu=True)
    if cpus is not None and busy and max(cpus) < len(busy):
        busy = [busy[c] for c in cpus]
    idle = sum(100.0 - b for b in busy) / 100.0 if busy else float(usable)
    return {"load": os.getloadavg(), "usable": usable, "free": min(idle, usable)}


def load_report(load: dict, workers: int | str) -> list[str]:
    """The demo's lines about the machine: always the load, and a hint when
    other programs leave the workers too few CPUs for a fair speedup (fewer
    than 80% of the CPUs the workers could use)."""
    usable, free = load["usable"], load["free"]
    lines = [
        f"machine: {usable} usable CPUs, {free:.1f} free now; load average "
        f"{', '.join(f'{x:.2f}' for x in load['load'])} (1, 5, 15 min)"
    ]
    wanted = min(workers, usable) if isinstance(workers, int) else usable
    if free < 0.8 * wanted:
        lines.append(
            f"hint: the machine is busy (other programs use {usable - free:.1f} "
            f"of {usable} CPUs): the workers compete with them, so expect a "
            f"poor speedup; run again when it is idle for fair figures"
        )
    return lines


def threading_layer() -> str:
    """numba's threading layer, which it picks when its thread pool first
    starts (at a parallel kernel's first run).  Started here directly, as
    that first run would (6 ms); compiling a tiny parallel kernel to the
    same end took seconds.  ``_launch_threads`` is numba's internal function
    for it: should it move, info says so rather than compile."""
    import numba

    try:
        return numba.threading_layer()
    except ValueError:
        pass
    try:
        from numba.np.ufunc.parallel import _launch_threads

        _launch_threads()
        return numba.threading_layer()
    except Exception as exc:
        return f"unknown ({type(exc).__name__}: {exc})"


def _default_workers() -> int | str:
    from shmarray import options

    try:
        return options.coerce_workers(None)
    except ValueError as exc:
        return str(exc)


def info(engine: bool = False) -> dict:
    """What ``shmarray info`` reports, as a dict; ``engine``: also start a
    fresh engine and report its workers (``fresh_workers``), which takes
    seconds where the rest takes milliseconds."""
    import numba
    import numpy as np

    import shmarray
    from shmarray import launch, options, pool

    layer = threading_layer()
    space = blocks.free_space()
    data = {
        "shmarray": shmarray.__version__,
        "usable_cpus": options.usable_cpus(),
        "default_workers": _default_workers(),
        "start_method": pool.DEFAULT_START_METHOD,
        "start_methods_available": list(launch.METHODS),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba_threading_layer": layer,
        "shm_dir": blocks.SHM_DIR,
        "storage": options.coerce_storage(None),
        "memfd_available": blocks.HAVE_MEMFD,
        "huge_pages": hugepages.report(blocks.SHM_DIR),
        "shm_free_bytes": space[0] if space else None,
        "shm_total_bytes": space[1] if space else None,
        "blocks": [
            {
                "name": b.name,
                "size": b.size,
                "owner_pid": b.owner_pid,
                "owner_alive": b.owner_alive,
            }
            for b in blocks.scan()
        ],
    }
    if engine:
        data["fresh_workers"] = fresh_workers()
    return data


def fresh_workers() -> dict:
    """What a fresh engine's workers cost here: start-up time, and each
    worker's ``Engine.stats()`` record after one small map."""
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


INFO_BLOCKS = 10  # blocks `shmarray info` lists (ls lists all)


def _info(args: argparse.Namespace) -> int:
    data = info(engine=args.engine)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    free = data["shm_free_bytes"]
    print(f"shmarray           : {data['shmarray']}")
    print(
        f"usable CPUs        : {data['usable_cpus']} (default workers: {data['default_workers']})"
    )
    print(
        f"start method       : {data['start_method']} (available: "
        f"{', '.join(data['start_methods_available'])})"
    )
    print(f"python / numpy     : {data['python']} / {data['numpy']}")
    print(f"numba              : {data['numba']}, threading layer {data['numba_threading_layer']}")
    if free is not None:
        print(
            f"shared memory      : {data['shm_dir']}, {blocks.format_bytes(free)} "
            f"free of {blocks.format_bytes(data['shm_total_bytes'])}"
        )
    print(
        f"storage            : {data['storage']} (Engine(storage=...) or "
        f"SHMARRAY_STORAGE; memfd {'available' if data['memfd_available'] else 'not available here'})"
    )
    _print_huge(data["huge_pages"], data["shm_dir"])
    if "fresh_workers" in data:
        _print_fresh(data["fresh_workers"])
    shown = data["blocks"][:INFO_BLOCKS]
    print(f"live blocks        : {len(data['blocks'])}")
    for b in shown:
        print(
            f"  {b['name']:<30} {blocks.format_bytes(b['size']):>10}  owner "
            f"{b['owner_pid']} {_state(b['owner_alive'])}"
        )
    if len(data["blocks"]) > len(shown):
        print(f"  ... and {len(data['blocks']) - len(shown)} more: `shmarray ls` lists them all")
    return 0


def _print_huge(huge: dict, shm_dir: str | None) -> None:
    """Whether shared blocks get transparent huge pages (as NumPy's private
    arrays do), and the one-line fix for each kind that gets none."""
    setting = huge["shmem_enabled"]
    if setting is None:
        print("huge pages         : none for shared memory (no transparent huge pages here)")
        return
    memfd = "yes" if huge["memfd"] else "no"
    said = f"memfd {memfd} (shmem_enabled={setting})"
    if shm_dir is not None:
        shm = "yes" if huge["shm"] else "no"
        said += f", {shm_dir} {shm} (huge={huge['shm_huge'] or 'never'})"
    print(f"huge pages         : {said}")
    for kind, fix in huge["fixes"].items():
        where = "memfd" if kind == "memfd" else shm_dir
        print(f"  to give {where} blocks huge pages (as root): {fix}")


def _print_fresh(fresh: dict) -> None:
    stats = fresh["workers"]
    print(
        f"a fresh engine     : {len(stats)} workers started in {fresh['start_s']:.2f} s; "
        f"each holds {_mib(min(s['uss'] for s in stats))}-"
        f"{_mib(max(s['uss'] for s in stats))} of its own memory (USS), "
        f"{_mib(max(s['rss'] for s in stats))} resident"
    )
    for s in stats:
        print(
            f"  worker {s['worker']}: pid {s['pid']}, RSS {_mib(s['rss'])}, "
            f"USS {_mib(s['uss'])}, {s['tasks']} tasks, {s['kernels']} kernels, "
            f"busy {s['busy'] * 1e3:.1f} ms, replaced {s['replaced']} times"
        )


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


BENCH_NEEDS = ("matplotlib", "joblib", "dask", "distributed")


def _bench(args: argparse.Namespace) -> int:
    import importlib
    import importlib.util

    missing = [m for m in BENCH_NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        print(
            f"shmarray bench compares against peers it cannot find here "
            f"({', '.join(missing)}). Install them with: "
            f"pip install 'shmarray[bench]'",
            file=sys.stderr,
        )
        return 2
    # By name: shmarray.report installs from bench/report (package-dir in
    # pyproject.toml), which a checker of shmarray/ alone cannot see.
    report = importlib.import_module("shmarray.report")
    size = "tiny" if args.tiny else "quick" if args.quick else "full"
    return report.main(size, args.out, args.max_workers)


def _where(args: argparse.Namespace) -> str | None:
    """``--dir``, checked: None for /dev/shm."""
    if args.dir is None:
        return None
    path = os.path.abspath(args.dir)
    if not os.path.isdir(path):
        raise SystemExit(
            f"shmarray {args.command}: --dir {args.dir!r} is not a "
            f"directory; pass the directory given as Engine(storage=...)."
        )
    return path


def _ls(args: argparse.Namespace) -> int:
    where = _where(args)
    found = blocks.scan(where, pids=args.pid)
    if not found:
        whose = f" created by pid {', '.join(map(str, args.pid))}" if args.pid else ""
        print(f"no shmarray blocks{whose} in {where or blocks.SHM_DIR}")
        return 0
    width = max(30, *(len(b.name) for b in found))
    print(f"{'name':<{width}} {'size':>10} {'owner pid':>10}  owner is")
    for b in found:
        print(
            f"{b.name:<{width}} {blocks.format_bytes(b.size):>10} "
            f"{b.owner_pid:>10}  {_state(b.owner_alive)}"
        )
    return 0


def _state(alive: bool | None) -> str:
    return {True: "alive", False: "dead", None: "unknown"}[alive]


def _gc(args: argparse.Namespace) -> int:
    removed = blocks.collect_orphans(args.min_age, _where(args), pids=args.pid)
    for b in removed:
        print(
            f"unlinked {b.name} ({blocks.format_bytes(b.size)}, created by pid "
            f"{b.owner_pid}, which is dead; no live process holds it)"
        )
    print(f"{len(removed)} block(s) removed")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser: every subcommand, every flag with its help."""
    from shmarray import __version__

    parser = argparse.ArgumentParser(
        prog="shmarray",
        description="Shared-memory NumPy arrays with numba kernels run in "
        "place by a pool of worker processes.",
        epilog="Run `shmarray COMMAND --help` for a command's options.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"shmarray {__version__}",
        help="print shmarray's version and exit",
    )
    sub = parser.add_subparsers(
        dest="command",
        metavar="COMMAND",
        title="commands",
        help="one of these (none: print this help)",
    )

    def command(name: str, help: str) -> argparse.ArgumentParser:
        # The one-line help in `shmarray --help`, and the description of
        # `shmarray NAME --help`.
        return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")

    p = command("demo", "heat diffusion: sequential numba vs the engine")
    p.add_argument("--size", type=int, default=3000, metavar="N", help="grid side (default 3000)")
    p.add_argument("--steps", type=int, default=300, metavar="N", help="time steps (default 300)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="worker processes (default: usable CPUs)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        metavar="N",
        help="rounds of every method, in alternating order (default 3)",
    )
    p.set_defaults(func=_demo)

    p = command("bench", "every workload through every method, with plots")
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--quick", action="store_true", help="small sizes, few repeats: under 2 minutes on 2 CPUs"
    )
    group.add_argument(
        "--tiny",
        action="store_true",
        help="smallest sizes: checks every method end to end (tests)",
    )
    p.add_argument("--out", metavar="DIR", help="directory for bench.json and the PNG plots")
    p.add_argument(
        "--max-workers",
        type=int,
        default=None,
        metavar="N",
        help="sweep workers from 1 to this (default: usable CPUs)",
    )
    p.set_defaults(func=_bench)

    p = command("info", "versions, CPUs, start method, numba, /dev/shm space, live blocks")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--engine",
        action="store_true",
        help="also start a fresh engine and report its workers: "
        "start-up time and memory (takes seconds)",
    )
    p.set_defaults(func=_info)

    dir_help = (
        "look in this directory (blocks of Engine(storage=DIR)) instead of "
        "/dev/shm; memfd blocks have no name and need no cleaning"
    )
    pid_help = (
        "only blocks created by this process id (repeat for more): a crashed "
        "job's, leaving everyone else's alone"
    )
    p = command("ls", "list shmarray blocks: name, size, owner pid, owner alive")
    p.add_argument("--dir", metavar="PATH", help=dir_help)
    p.add_argument("--pid", type=int, action="append", metavar="PID", help=pid_help)
    p.set_defaults(func=_ls)

    p = command(
        "gc",
        "unlink shmarray blocks whose owner is dead: no process holds their "
        "lock and their creator is not alive",
    )
    p.add_argument(
        "--min-age",
        type=float,
        default=blocks.GC_MIN_AGE,
        metavar="SECONDS",
        help="also leave dead owners' blocks younger than this many seconds "
        f"alone (default {blocks.GC_MIN_AGE:g}); liveness, not age, decides: "
        f"a block whose creator is alive is kept whatever its age",
    )
    p.add_argument("--dir", metavar="PATH", help=dir_help)
    p.add_argument("--pid", type=int, action="append", metavar="PID", help=pid_help)
    p.set_defaults(func=_gc)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
