"""``shmarray bench``: every workload through every method, in one process.

Methods: sequential NumPy, sequential numba, numba ``prange``, the pickling
``ProcessPoolExecutor`` pattern (chunks sent as arguments, results sent
back), joblib/loky with its automatic memmapping, Dask's threaded scheduler
running the same numba kernels through ``map_blocks``/``map_overlap``, and
shmarray.  Workloads: STREAM triad, a histogram (a reduction), an iterated
heat stencil, Mandelbrot, and a no-op dispatch.  Parallel methods sweep
1..usable CPUs workers.  Every result is checked identical to sequential
numba's (``shmarray.timing.identical``); integer and elementwise workloads
were chosen so that "identical" means bit for bit for every method.

Timings are medians over rounds in which the methods alternate
(``shmarray.timing.interleaved``), so drift on a shared machine hits all of
them alike.

The parts: ``peers`` (the other methods' kernels and pools), ``workloads``
(data and runners), ``render`` (table and plots); this module runs them.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any

import numba
import numpy as np

from shmarray.report.peers import Pools, heat_prange, noop_kernel, triad_prange
from shmarray.report.render import METHODS, plots, table
from shmarray.report.workloads import SETUP, SIZES, WORKLOADS, nbytes_moved
from shmarray.timing import identical, interleaved, machine, medians

__all__ = [
    "run",
    "main",
    "table",
    "plots",
    "machine",
    "Result",
    "METHODS",
    "WORKLOADS",
    "SIZES",
    "heat_prange",
    "noop_kernel",
    "triad_prange",
]


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
    per_call_s: float | None = None  # noop: one dispatch


def triad_ceiling(n: int, threads: int, repeat: int) -> float:
    """STREAM triad bandwidth of numba prange on all usable CPUs (GB/s)."""
    numba.set_num_threads(threads)
    rng = np.random.default_rng(3)
    a, b, c = np.empty(n), rng.random(n), rng.random(n)
    triad_prange(a, b, c, 3.0)
    best = min(interleaved({"t": lambda: triad_prange(a, b, c, 3.0)}, max(repeat, 3))["t"])
    return 3 * a.nbytes / best / 1e9


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
            for fn in seq.values():  # warm up: compile
                fn()
            seq_times = medians(interleaved(seq, cfg["repeat"]))
            reference = seq["numba"]()
            base = seq_times["numba"]
            for method, t in seq_times.items():
                results.append(Result(workload, method, 1, t, identical(seq[method](), reference)))
            bar.update(1)
            for w in counts:
                pools = Pools(w)
                try:
                    par = runners(data, pools)
                    for fn in par.values():  # warm up: compile, start, attach
                        fn()
                    par_times = medians(interleaved(par, cfg["repeat"]))
                    for method, t in par_times.items():
                        results.append(
                            Result(workload, method, w, t, identical(par[method](), reference))
                        )
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
