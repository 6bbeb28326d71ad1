"""Figures for non-blocking maps and for Dask, side by side in one process:

* event-loop responsiveness: an asyncio heartbeat every 10 ms while a
  ~2 s ``map_async`` runs, and the same while a blocking ``map`` runs
* Dask (LocalCluster, 2 worker processes) against the local engine (2
  workers), same kernels, same chunking: Jacobi 20 steps, triad, and the
  bytes Dask's own metrics say moved between workers

Run: ``.venv/bin/python bench/async_dask_figures.py [--quick] [--json FILE]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

import numpy as np
from numba import njit

import shmarray
from shmarray.kernels.elementwise import triad
from shmarray.kernels.stencils import jacobi
from workloads import machine_info, save


@njit
def busy(x, iterations):
    acc = 0.0
    for _ in range(iterations):
        acc = acc * 0.999999 + x[0]
    return acc


def calibrate(eng, x, seconds: float) -> int:
    eng.map(busy, x, args=(10,))  # compile in the workers first
    n = 10**8
    t0 = time.perf_counter()
    eng.map(busy, x, args=(n,))
    return int(n * seconds / (time.perf_counter() - t0))


def heartbeat_figure(eng, seconds: float) -> dict:
    x = eng.zeros(2 * eng.workers)
    iterations = calibrate(eng, x, seconds)

    async def measure(blocking: bool) -> dict:
        late: list[float] = []
        stop = False

        async def heartbeat():
            while not stop:
                t = time.perf_counter()
                await asyncio.sleep(0.01)
                late.append(time.perf_counter() - t - 0.01)

        hb = asyncio.create_task(heartbeat())
        await asyncio.sleep(0.05)
        late.clear()
        t0 = time.perf_counter()
        if blocking:
            eng.map(busy, x, args=(iterations,))  # holds the loop
            await asyncio.sleep(0)
        else:
            await eng.map_async(busy, x, args=(iterations,))
        took = time.perf_counter() - t0
        await asyncio.sleep(0.02)
        stop = True
        await hb
        ms = np.array(late) * 1e3
        return {
            "map_seconds": took,
            "beats": len(ms),
            "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max()),
        }

    out = {"map_async": asyncio.run(measure(False)), "blocking_map": asyncio.run(measure(True))}
    return out


def _transfer_bytes(client) -> int:
    return sum(client.run(lambda dask_worker: dask_worker.transfer_outgoing_bytes_total).values())


def dask_figures(eng, n: int, steps: int, triad_n: int, repeat: int) -> dict:
    import dask.array as da
    import distributed

    import shmarray.dask as sd

    cluster = distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=":0",
        silence_logs=40,
    )
    client = distributed.Client(cluster)
    try:
        rng = np.random.default_rng(0)
        u = rng.random((n, n))
        # the same field on both sides; Dask's copy lives on its workers
        a, b = eng.from_numpy(u), eng.from_numpy(u)
        rows = sd.row_chunks(n, 2, 1)
        start = client.persist(da.from_array(u, chunks=(rows, n)))
        distributed.wait(start)

        def local_jacobi():
            x, y = a, b
            for _ in range(steps):
                eng.map(jacobi, y, x, halo=1, chunks=2)
                x, y = y, x
            return x

        def dask_jacobi(run: int = 0):
            cur = start
            for step in range(steps):
                cur = sd.map(jacobi, cur, cur, halo=1, name=f"jacobi-{run}-{step}").persist()
            distributed.wait(cur)
            return cur

        # Dask names results by their inputs, and persisting a graph whose
        # result it still holds returns that result without computing: every
        # run gets names of its own.
        local_jacobi()
        distributed.wait(dask_jacobi())
        cur = None
        t_local, t_dask, moved = [], [], []
        for run in range(1, repeat + 1):
            np.copyto(a, u)
            np.copyto(b, u)
            t0 = time.perf_counter()
            local_result = local_jacobi()
            t_local.append(time.perf_counter() - t0)
            before = _transfer_bytes(client)
            cur = None
            t0 = time.perf_counter()
            cur = dask_jacobi(run)
            t_dask.append(time.perf_counter() - t0)
            moved.append(_transfer_bytes(client) - before)
        identical = bool(np.array_equal(cur.compute(), local_result))
        placement = client.who_has(start)
        jac = {
            "n": n,
            "steps": steps,
            "local_s": statistics.median(t_local),
            "workers_holding_blocks": len({w for ws in placement.values() for w in ws}),
            "dask_s": statistics.median(t_dask),
            "identical": identical,
            "dask_transfer_bytes": int(statistics.median(moved)),
            "array_bytes": u.nbytes,
        }
        jac["ratio_dask_over_local"] = jac["dask_s"] / jac["local_s"]

        bb, cc = rng.random(triad_n), rng.random(triad_n)
        A, B, C = eng.empty(triad_n), eng.from_numpy(bb), eng.from_numpy(cc)
        chunks = sd.row_chunks(triad_n, 2, 0)
        db = client.persist(da.from_array(bb, chunks=chunks))
        dc = client.persist(da.from_array(cc, chunks=chunks))
        dz = client.persist(da.zeros(triad_n, chunks=chunks))
        distributed.wait([db, dc, dz])

        def dask_triad(run: int = 0):
            r = sd.map(triad, dz, db, dc, args=(3.0,), name=f"triad-{run}").persist()
            distributed.wait(r)
            return r

        eng.map(triad, A, B, C, args=(3.0,))
        dask_triad()
        r = None
        tl, td, mv = [], [], []
        for run in range(1, repeat + 1):
            t0 = time.perf_counter()
            eng.map(triad, A, B, C, args=(3.0,))
            tl.append(time.perf_counter() - t0)
            before = _transfer_bytes(client)
            r = None
            t0 = time.perf_counter()
            r = dask_triad(run)
            td.append(time.perf_counter() - t0)
            mv.append(_transfer_bytes(client) - before)
        tri = {
            "n": triad_n,
            "local_s": statistics.median(tl),
            "dask_s": statistics.median(td),
            "identical": bool(np.array_equal(r.compute(), A)),
            "dask_transfer_bytes": int(statistics.median(mv)),
        }
        tri["ratio_dask_over_local"] = tri["dask_s"] / tri["local_s"]
        return {"jacobi": jac, "triad": tri}
    finally:
        client.close()
        cluster.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    q = args.quick
    fig = {"machine": machine_info()}
    with shmarray.Engine(workers=2) as eng:
        fig["heartbeat"] = heartbeat_figure(eng, 0.5 if q else 2.0)
        fig["dask"] = dask_figures(
            eng, 1024 if q else 4096, 20, 2_000_000 if q else 20_000_000, repeat=2 if q else 5
        )
    h = fig["heartbeat"]
    for name, v in h.items():
        print(
            f"heartbeat during {name:13s} ({v['map_seconds']:.2f} s): {v['beats']} beats, "
            f"lateness p50 {v['p50_ms']:.2f} ms, p99 {v['p99_ms']:.2f} ms, max {v['max_ms']:.1f} ms"
            + ("  (target p99 < 20 ms)" if name == "map_async" else "")
        )
    for name, v in fig["dask"].items():
        print(
            f"{name:7s} local {v['local_s'] * 1e3:9.1f} ms  dask {v['dask_s'] * 1e3:9.1f} ms  "
            f"dask/local {v['ratio_dask_over_local']:6.1f}  moved between Dask workers "
            f"{v['dask_transfer_bytes'] / 1e6:.1f} MB  identical {v['identical']}"
        )
    save(fig, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
