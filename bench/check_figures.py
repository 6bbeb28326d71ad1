"""What the race check costs (``Engine.check``, ``shmarray.check``): a check
of a 2048^2 heat step and of a 50M STREAM triad, as a multiple of one
sequential run of the same kernel on the same arrays, the first check of a
shape (its buffers' pages touched for the first time) and the ones after
(the workers keep their private buffers, up to ``check.POOL_LIMIT``), with
the time each phase of a check takes; and a no-op map, which runs nothing
of the check, for the record.

Run: ``.venv/bin/python bench/check_figures.py [--quick] [--json FILE]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
from numba import njit

import shmarray
from shmarray.kernels.elementwise import triad
from shmarray.kernels.stencils import heat_step
from workloads import machine_info, save, summary

WORKERS = 2


@njit(cache=True)
def touch(x, by):
    for i in range(x.shape[0]):
        x[i] += by


def phases(eng) -> list:
    """Wrap ``eng.reduce`` so each phase of a check is timed."""
    log: list = []
    plain = eng.reduce

    def timed(kernel, *arrays, **options):
        started = time.perf_counter()
        try:
            return plain(kernel, *arrays, **options)
        finally:
            phase = getattr(getattr(kernel, "spec", None), "phase", "reduce")
            log.append((phase, time.perf_counter() - started))

    eng.reduce = timed
    return log


def check_figure(eng, name: str, kernel, arrays, args, halo: int, repeat: int) -> dict:
    """Sequential runs and checks, interleaved: (check / sequential)."""
    kernel(*arrays, *args)  # compiled
    log = phases(eng)
    seq, checks, cold = [], [], None
    for k in range(repeat + 1):
        started = time.perf_counter()
        kernel(*arrays, *args)
        seq.append(time.perf_counter() - started)
        log.clear()
        started = time.perf_counter()
        report = eng.check(kernel, *arrays, args=args, halo=halo)
        took = time.perf_counter() - started
        assert report.ok, str(report)
        if k == 0:
            cold = took
        else:
            checks.append(took)
    del eng.reduce
    by_phase: dict = {}
    for phase, t in log:
        by_phase[phase] = by_phase.get(phase, 0.0) + t
    ratios = [c / s for c, s in zip(checks, seq[1:])]
    return {
        "name": name,
        "sequential_ms": summary([s * 1e3 for s in seq]),
        "check_ms": summary([c * 1e3 for c in checks]),
        "first_check_ms": round(cold * 1e3, 1),
        "ratio": summary(ratios),
        "first_ratio": round(cold / statistics.median(seq), 1),
        "phases_ms_last": {p: round(t * 1e3, 1) for p, t in by_phase.items()},
    }


def noop_figure(eng, inner: int = 2000, repeat: int = 15) -> dict:
    x = eng.zeros(16)
    for _ in range(3000):
        eng.map(touch, x, args=(1.0,))
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(inner):
            eng.map(touch, x, args=(1.0,))
        times.append((time.perf_counter() - started) / inner * 1e6)
    return {"noop_map_us": summary(times)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json")
    a = p.parse_args()
    repeat = 2 if a.quick else 5
    fig: dict = {"machine": machine_info(), "workers": WORKERS}
    rng = np.random.default_rng(0)
    with shmarray.Engine(workers=WORKERS) as eng:
        n = 512 if a.quick else 2048
        u, v = eng.from_numpy(rng.random((n, n))), eng.zeros((n, n))
        fig["heat"] = check_figure(eng, f"heat step {n}^2", heat_step, (v, u), (0.2,), 1, repeat)
        del u, v
        m = 5_000_000 if a.quick else 50_000_000
        x, y, z = eng.zeros(m), eng.from_numpy(rng.random(m)), eng.from_numpy(rng.random(m))
        fig["triad"] = check_figure(eng, f"triad {m}", triad, (x, y, z), (3.0,), 0, repeat)
        del x, y, z
        fig.update(noop_figure(eng))
    m = fig["machine"]
    print(f"machine: {m['cpu']}, {m['usable_cpus']} CPUs; {WORKERS} workers; medians [quartiles]")
    for key in ("heat", "triad"):
        f = fig[key]
        r, c, s = f["ratio"], f["check_ms"], f["sequential_ms"]
        print(
            f"{f['name']:>20}: check {c['median']:.1f} ms, sequential {s['median']:.2f} ms: "
            f"{r['median']:.1f}x [{r['q1']:.1f}-{r['q3']:.1f}] (target <= 10); "
            f"first check {f['first_check_ms']:.1f} ms ({f['first_ratio']}x); "
            f"phases {f['phases_ms_last']}"
        )
    nm = fig["noop_map_us"]
    print(f"no-op map (no check): {nm['median']:.1f} us [{nm['q1']:.1f}-{nm['q3']:.1f}]")
    if a.json:
        save(fig, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
