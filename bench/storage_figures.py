"""Where blocks live, measured (issue 20): each storage against numba's
``prange`` on the same memory, and loading data with and without a second
copy.

* STREAM triad over N float64, and a loop of Jacobi sweeps on a 2-D grid,
  on "shm", "memfd" and a directory on a real filesystem: engine (map,
  iterate) / numba prange with as many threads as workers, both running on
  that storage's shared arrays; every method of every storage in the same
  interleaved rounds (A B C ..., ... C B A); medians, quartiles, and the
  per-round ratio.
* peak RSS (VmHWM) of the coordinator while bringing in a 512 MiB .npy:
  eng.load, from_numpy(np.load(mmap_mode="r")), and np.load + from_numpy,
  each in a fresh child interpreter, on each storage.
* time to bring in a 2 GiB .npy (page cache warm): eng.load on each
  storage, np.load, and np.load + from_numpy; interleaved rounds.

Run (on a shared machine, under the CPU lock)::

    flock /tmp/shmarray-cpu.lock .venv/bin/python bench/storage_figures.py

It writes ``bench/results/storage-<cpu>.json`` and ``.md`` (``--out DIR``
for elsewhere, ``--quick`` for small sizes).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap

import numba
import numpy as np

import shmarray
from shmarray import timing
from shmarray.kernels.elementwise import triad
from shmarray.kernels.stencils import jacobi, jacobi_prange
from shmarray.options import usable_cpus
from shmarray.report.peers import triad_prange
from shmarray.worker import HOT_RUNS

STORAGES = ("shm", "memfd", "dir")


def storage_value(kind: str, directory: str) -> str:
    return directory if kind == "dir" else kind


# -- compute on each storage ----------------------------------------------------------


def compute_figures(
    directory: str, workers: int, n: int, grid: int, steps: int, repeat: int
) -> dict:
    """Triad and Jacobi, engine and prange, on every storage: one engine per
    storage, all open at once, and every method of every storage in the
    same interleaved rounds, so a busy neighbour slows them all alike."""
    numba.set_num_threads(min(workers, numba.config.NUMBA_NUM_THREADS))
    rng = np.random.default_rng(0)
    engines = {
        kind: shmarray.Engine(workers=workers, storage=storage_value(kind, directory))
        for kind in STORAGES
    }
    try:
        triads, sweeps, reset, held = {}, {}, {}, {}
        u0 = rng.random((grid, grid))
        b0, c0 = rng.random(n), rng.random(n)
        for kind, eng in engines.items():
            # triad: a = b + s*c, the engine and prange each writing its own a
            b, c = eng.from_numpy(b0), eng.from_numpy(c0)
            a_eng, a_par = eng.empty(n), eng.empty(n)
            triads[f"{kind}/engine"] = lambda eng=eng, a=a_eng, b=b, c=c: eng.map(
                triad, a, b, c, args=(3.0,)
            )
            triads[f"{kind}/prange"] = lambda a=a_par, b=b, c=c: triad_prange(a, b, c, 3.0)
            # Jacobi: `steps` sweeps, double buffered, from the same grid each round
            bufs = {m: (eng.from_numpy(u0), eng.from_numpy(u0)) for m in ("engine", "prange")}

            def run_engine(eng=eng, new=bufs["engine"][0], old=bufs["engine"][1]):
                eng.iterate(jacobi, new, old, steps=steps, halo=1)

            def run_prange(new=bufs["prange"][0], old=bufs["prange"][1]):
                for _ in range(steps):
                    jacobi_prange(new, old)
                    new, old = old, new

            for m, run in (("engine", run_engine), ("prange", run_prange)):
                sweeps[f"{kind}/{m}"] = (run, steps)

                def again(pair=bufs[m]):
                    for buf in pair:
                        buf[...] = u0

                reset[f"{kind}/{m}"] = again
            held[kind] = (a_eng, a_par, bufs)
        # Compile, fault pages in, and let the workers compile their serving
        # loop, which they do for a job run a few times (worker.HOT_RUNS).
        for _ in range(HOT_RUNS + 2):
            for f in triads.values():
                f()
            for f, _ in sweeps.values():
                f()
        t_triad = timing.interleaved(triads, repeat, pause=0.02)
        t_jacobi = timing.interleaved(sweeps, repeat, pause=0.02, prepare=reset)
        last = int(steps % 2 == 0)  # the buffer of the last sweep
        out = {}
        for kind in STORAGES:
            a_eng, a_par, bufs = held[kind]
            tt = {m: t_triad[f"{kind}/{m}"] for m in ("engine", "prange")}
            tj = {m: t_jacobi[f"{kind}/{m}"] for m in ("engine", "prange")}
            out[kind] = {
                "triad": {
                    "n": n,
                    "bytes_moved": 3 * 8 * n,
                    "identical": bool(np.array_equal(a_eng, a_par)),
                    **{m: timing.summary(t) for m, t in tt.items()},
                    "engine_over_prange": timing.ratios(tt["engine"], tt["prange"]),
                },
                "jacobi": {
                    "grid": grid,
                    "steps": steps,
                    "identical": bool(np.array_equal(bufs["engine"][last], bufs["prange"][last])),
                    **{m: timing.summary(t) for m, t in tj.items()},
                    "engine_over_prange": timing.ratios(tj["engine"], tj["prange"]),
                },
            }
        del held, triads, sweeps, reset
        gc.collect()
        return out
    finally:
        for eng in engines.values():
            eng.close()


# -- peak memory --------------------------------------------------------------------

PEAK = textwrap.dedent("""
    import json, sys, numpy as np, shmarray

    def peak():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))

    how, storage, path = sys.argv[1:4]
    with shmarray.Engine(workers=2, storage=storage) as eng:
        eng.zeros(10)
        before = peak()
        if how == "eng.load":
            x = eng.load(path)
        elif how == "from_numpy(memmap)":
            x = eng.from_numpy(np.load(path, mmap_mode="r"))
        else:
            x = eng.from_numpy(np.load(path))
        print(json.dumps({"grown": peak() - before, "nbytes": x.nbytes}))
        del x
""")

PEAK_METHODS = ("eng.load", "from_numpy(memmap)", "np.load + from_numpy")


def write_npy(path: str, nbytes: int) -> None:
    """A float64 .npy of ``nbytes`` of data, written 8 MiB at a time."""
    n, slab = nbytes // 8, 2**20
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f8", "fortran_order": False, "shape": (n,)}
        )
        for k in range(n // slab):
            f.write(np.full(slab, float(k)).tobytes())


def peak_figures(path: str, directory: str) -> dict:
    out = {}
    for kind in STORAGES:
        for how in PEAK_METHODS:
            proc = subprocess.run(
                [sys.executable, "-c", PEAK, how, storage_value(kind, directory), path],
                capture_output=True,
                text=True,
                check=True,
                timeout=600,
            )
            got = json.loads(proc.stdout)
            out.setdefault(kind, {})[how] = {**got, "ratio": got["grown"] / got["nbytes"]}
    return out


# -- time to load ----------------------------------------------------------------------


def load_figures(path: str, directory: str, workers: int, repeat: int) -> dict:
    engines = {
        kind: shmarray.Engine(workers=workers, storage=storage_value(kind, directory))
        for kind in STORAGES
    }
    try:
        held = []

        def keep(fn):
            def run():
                held.append(fn())

            return run

        def drop():
            held.clear()
            gc.collect()

        methods = {
            f"eng.load ({kind})": keep(lambda e=e: e.load(path)) for kind, e in engines.items()
        }
        methods["np.load"] = keep(lambda: np.load(path))
        methods["np.load + from_numpy (memfd)"] = keep(
            lambda: engines["memfd"].from_numpy(np.load(path))
        )
        with open(path, "rb") as f:  # the page cache is warm
            while f.read(64 * 2**20):
                pass
        times = timing.interleaved(methods, repeat, prepare={m: drop for m in methods})
        drop()
    finally:
        for e in engines.values():
            e.close()
    size = os.path.getsize(path)
    return {
        "bytes": size,
        **{
            m: {**timing.summary(t), "gb_per_s": size / 1e9 / timing.summary(t)["median"]}
            for m, t in times.items()
        },
    }


# -- report -------------------------------------------------------------------------------


def markdown(figures: dict) -> str:
    m = figures["machine"]
    lines = [
        f"# Storage figures: {m['cpu']}",
        "",
        f"{m['usable_cpus']} usable CPUs, {m['memory_bytes'] / 2**30:.1f} GiB, "
        f"{m['os']}; Python {m['versions']['python']}, NumPy "
        f"{m['versions']['numpy']}, numba {m['versions']['numba']}.  "
        f"Directory storage: `{figures['directory']}` ({figures['directory_fs']}).",
        f"Load average (1, 5, 15 min) at the start {figures['load_average']['start']}, "
        f"at the end {figures['load_average']['end']}: other tenants share these "
        f"CPUs, which widens the quartiles.",
        "",
        f"Command: `{figures['command']}`",
        "",
        f"## Compute on each storage ({figures['workers']} workers; prange with as "
        f"many threads, on the same storage's arrays)",
        "",
        "Times are medians of interleaved rounds [quartiles]; the ratio is the "
        "median of per-round engine/prange ratios.",
        "",
        "| storage | triad engine | triad prange | engine/prange | "
        "Jacobi engine (per sweep) | Jacobi prange | engine/prange |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, f in figures["compute"].items():
        t, j = f["triad"], f["jacobi"]

        def cell(s, unit=1e3):
            return f"{s['median'] * unit:.2f} ms [{s['q1'] * unit:.2f}-{s['q3'] * unit:.2f}]"

        lines.append(
            f"| {kind} | {cell(t['engine'])} | {cell(t['prange'])} | "
            f"{t['engine_over_prange']['median']:.2f} | {cell(j['engine'])} | "
            f"{cell(j['prange'])} | {j['engine_over_prange']['median']:.2f} |"
        )
    f0 = next(iter(figures["compute"].values()))
    lines += [
        "",
        f"Triad over {f0['triad']['n']:,} float64 ({f0['triad']['bytes_moved'] / 1e6:.0f} "
        f"MB moved a call); Jacobi on a {f0['jacobi']['grid']}x{f0['jacobi']['grid']} "
        f"grid, {f0['jacobi']['steps']} sweeps a round (engine: `eng.iterate`).  "
        f"Results identical engine vs prange: "
        f"{all(f['triad']['identical'] and f['jacobi']['identical'] for f in figures['compute'].values())}.",
        "",
        f"## Peak memory bringing in a {figures['peak_bytes'] / 2**20:.0f} MiB .npy "
        f"(coordinator VmHWM growth / array)",
        "",
        "| storage | " + " | ".join(PEAK_METHODS) + " |",
        "|---|" + "---|" * len(PEAK_METHODS),
    ]
    for kind, f in figures["peak"].items():
        lines.append(
            f"| {kind} | " + " | ".join(f"{f[h]['ratio']:.3f}x" for h in PEAK_METHODS) + " |"
        )
    lf = figures["load"]
    lines += [
        "",
        f"## Time to bring in a {lf['bytes'] / 2**30:.1f} GiB .npy (page cache warm)",
        "",
        "| method | median | quartiles | GB/s |",
        "|---|---|---|---|",
    ]
    for name, s in lf.items():
        if name == "bytes":
            continue
        lines.append(
            f"| {name} | {s['median']:.3f} s | {s['q1']:.3f}-{s['q3']:.3f} s | "
            f"{s['gb_per_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def filesystem(path: str) -> str:
    best, kind = "", "?"
    with open("/proc/mounts") as f:
        for line in f:
            dev, point, fstype = line.split()[:3]
            if path.startswith(point) and len(point) > len(best):
                best, kind = point, f"{fstype} on {dev}"
    return kind


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few rounds")
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "results"),
        help="directory for storage-<cpu>.json and .md",
    )
    parser.add_argument(
        "--dir", default=None, help="parent of the directory storage (default: the temp dir)"
    )
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    workers = args.workers or usable_cpus()
    q = args.quick
    n, grid, steps, repeat = (2 * 10**6, 500, 10, 5) if q else (20 * 10**6, 2000, 20, 15)
    peak_bytes, load_bytes, load_repeat = (
        (64 * 2**20, 128 * 2**20, 3) if q else (512 * 2**20, 2 * 2**30, 5)
    )
    root = tempfile.mkdtemp(prefix="shmarray-storage-bench-", dir=args.dir)
    directory = os.path.join(root, "blocks")
    os.mkdir(directory, 0o700)
    try:
        figures = {
            "machine": timing.machine(),
            "workers": workers,
            "directory": directory,
            "directory_fs": filesystem(directory),
            "command": " ".join(["python", "bench/storage_figures.py", *sys.argv[1:]]),
            "load_average": {"start": [round(x, 2) for x in os.getloadavg()]},
            "peak_bytes": peak_bytes,
            "compute": {},
        }
        print("compute ...", file=sys.stderr, flush=True)
        figures["compute"] = compute_figures(directory, workers, n, grid, steps, repeat)
        small = os.path.join(root, "peak.npy")
        write_npy(small, peak_bytes)
        print("peak memory ...", file=sys.stderr, flush=True)
        figures["peak"] = peak_figures(small, directory)
        os.unlink(small)
        big = os.path.join(root, "load.npy")
        write_npy(big, load_bytes)
        print("time to load ...", file=sys.stderr, flush=True)
        figures["load"] = load_figures(big, directory, workers, load_repeat)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    figures["load_average"]["end"] = [round(x, 2) for x in os.getloadavg()]
    cpu = re.sub(
        r"[^a-z0-9]+",
        "-",
        figures["machine"]["cpu"].lower().replace("(r)", "").replace("(tm)", ""),
    ).strip("-")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"storage-{cpu}{'-quick' if q else ''}")
    with open(stem + ".json", "w") as f:
        json.dump(figures, f, indent=2)
        f.write("\n")
    report = markdown(figures)
    with open(stem + ".md", "w") as f:
        f.write(report)
    print(report)
    print(f"written: {stem}.json, {stem}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
