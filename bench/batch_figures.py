"""Batch work's figures, side by side in one process, interleaved round by
round, 2 workers, on maps with no failure:

* the cost of ``errors="collect"`` and ``retries=1`` (a tracked map keeps
  one byte a chunk on the board and checks a stop word between chunks)
  against a plain ``map``: the triad over 2**24 float64 (2 chunks), a
  1000-chunk dynamic Mandelbrot (one row a chunk), and, as a worst case,
  the triad over 2**22 float64 cut into 1000 dynamic chunks of 4 us each;
* the cost of output forwarding: a plain map against the same map with
  the one per-map check of the output pipes skipped (the only thing
  forwarding adds to a map that prints nothing);
* ``imap``: the time from a chunk's kernel returning (its value is the
  ``time.perf_counter()`` it returned at; CLOCK_MONOTONIC is the same clock
  in every process) to the caller's loop receiving it.

Each ratio is the per-round ratio's median with its quartiles; results are
checked identical.

Run: ``.venv/bin/python bench/batch_figures.py [--quick] [--json FILE]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import shmarray
from shmarray.kernels.elementwise import triad
from shmarray.kernels.irregular import mandelbrot
from shmarray.kernels.table import mandelbrot_args
from workloads import machine_info, ratios, rounds, save, summary

WORKERS = 2


def overhead_figures(eng, repeat: int) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    big = [eng.from_numpy(rng.random(2**24)) for _ in range(2)] + [eng.empty(2**24)]
    small = [eng.from_numpy(rng.random(2**22)) for _ in range(2)] + [eng.empty(2**22)]
    image = eng.zeros((1000, 1000), np.int32)
    cases = {
        "triad 2^24, static": (
            lambda **kw: eng.map(triad, big[2], big[0], big[1], args=(3.0,), **kw),
            big[2],
        ),
        "mandelbrot 1000x1000, 1000 dynamic chunks": (
            lambda **kw: eng.map(
                mandelbrot,
                image,
                args=(shmarray.row_offset, *mandelbrot_args(1000, 1000, 200)),
                chunks=1000,
                schedule="dynamic",
                **kw,
            ),
            image,
        ),
        "triad 2^22, 1000 dynamic chunks (worst case)": (
            lambda **kw: eng.map(
                triad,
                small[2],
                small[0],
                small[1],
                args=(3.0,),
                chunks=1000,
                schedule="dynamic",
                **kw,
            ),
            small[2],
        ),
    }
    forwarder = eng._dispatcher.pool.forwarder
    real_pending = forwarder.pending

    def unforwarded(run):
        forwarder.pending = lambda: False
        try:
            run()
        finally:
            forwarder.pending = real_pending

    for name, (run, result) in cases.items():
        run()
        plain = result.copy()
        for kw in ({"errors": "collect"}, {"retries": 1}):
            result[...] = 0
            report = run(**kw)
            assert report is None or report.ok
            assert np.array_equal(result, plain), name
        times = rounds(
            {
                "plain": (run, 1),
                "collect": (lambda: run(errors="collect"), 1),
                "retries=1": (lambda: run(retries=1), 1),
                "no forwarding check": (lambda: unforwarded(run), 1),
            },
            repeat,
        )
        out[name] = {
            "plain_s": summary(times["plain"]),
            "collect/plain": ratios(times["collect"], times["plain"]),
            "retries=1/plain": ratios(times["retries=1"], times["plain"]),
            "plain/no forwarding check": ratios(times["plain"], times["no forwarding check"]),
            "identical": True,
        }
    return out


def stamp(out, off, busy):
    """Work for ``busy`` seconds, then return the moment the kernel ends."""
    end = time.perf_counter() + busy
    while time.perf_counter() < end:
        pass
    out[:] = off
    return time.perf_counter()


def imap_latency(eng, chunks: int, busy: float) -> dict:
    figures = {}
    for schedule in ("static", "dynamic"):
        a = eng.zeros(chunks)
        lags = []
        for _rows, returned in eng.imap(
            stamp, a, args=(shmarray.row_offset, busy), chunks=chunks, schedule=schedule
        ):
            lags.append(time.perf_counter() - returned)
        assert np.array_equal(a, np.arange(chunks)), schedule
        q = statistics.quantiles(lags, n=10)
        figures[schedule] = {
            "chunks": chunks,
            "chunk_s": busy,
            "median_us": statistics.median(lags) * 1e6,
            "p10_us": q[0] * 1e6,
            "p90_us": q[-1] * 1e6,
            "max_us": max(lags) * 1e6,
        }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="write the figures here")
    opts = parser.parse_args()
    repeat = 7 if opts.quick else 21
    with shmarray.Engine(workers=WORKERS) as eng:
        figures = {
            "machine": machine_info(),
            "workers": WORKERS,
            "command": "bench/batch_figures.py" + (" --quick" if opts.quick else ""),
            "overhead": overhead_figures(eng, repeat),
            "imap_latency": imap_latency(eng, 100 if opts.quick else 400, 0.005),
        }
    for name, f in figures["overhead"].items():
        print(
            f"{name}: plain {f['plain_s']['median'] * 1e3:.2f} ms; "
            + "; ".join(
                f"{k} {v['median']:.3f} [{v['q1']:.3f}-{v['q3']:.3f}]"
                for k, v in f.items()
                if "/" in k
            )
        )
    for schedule, f in figures["imap_latency"].items():
        print(
            f"imap {schedule}: chunk done -> yielded median {f['median_us']:.0f} us, "
            f"p90 {f['p90_us']:.0f} us, max {f['max_us']:.0f} us"
        )
    save(figures, opts.json)


if __name__ == "__main__":
    main()
