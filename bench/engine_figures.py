"""The engine's figures, each a ratio against a peer run side by side:

* STREAM triad over 50M float64: engine map / numba prange (same threads)
* one-chunk no-op map round trip: engine / ProcessPoolExecutor.submit().result()
* engine start + first map of a cached kernel, beside `python -c "import numba"`
* peak memory of a map over a 2 GiB array: coordinator RSS beyond the array,
  and each worker's unique memory (USS)

Run: ``.venv/bin/python bench/engine_figures.py [--quick] [--json FILE]``
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor

import numba

import shmarray
from workloads import TriadPair, interleaved, machine_info, noop, nothing, save

STARTUP = textwrap.dedent("""
    import time
    t0 = time.perf_counter()
    import shmarray
    from shmarray.kernels.elementwise import triad
    t1 = time.perf_counter()
    with shmarray.Engine(workers=2) as eng:
        a, b, c = eng.zeros(1000), eng.zeros(1000), eng.zeros(1000)
        eng.map(triad, a, b, c, args=(3.0,))
        t2 = time.perf_counter()
    print(t1 - t0, t2 - t1)
""")

MEMORY = textwrap.dedent("""
    import json, sys, threading, time
    import numpy as np, psutil, shmarray
    from numba import njit

    @njit
    def scale(x, s):
        for i in range(x.shape[0]):
            x[i] *= s

    n = int(sys.argv[1])
    me = psutil.Process()
    peak = [0]
    done = threading.Event()

    def sample():                                   # RSS every millisecond
        while not done.is_set():
            peak[0] = max(peak[0], me.memory_info().rss)
            time.sleep(0.001)

    with shmarray.Engine(workers=2) as eng:
        eng.map(scale, eng.zeros(16), args=(1.0,))      # compile in the workers
        base = me.memory_info().rss
        sampler = threading.Thread(target=sample)
        sampler.start()
        x = eng.empty(n)
        x.fill(1.0)                                     # the array itself
        eng.map(scale, x, args=(2.0,))
        done.set()
        sampler.join()
        ok = bool(x[0] == 2.0 and x[-1] == 2.0)
        workers = [psutil.Process(p).memory_full_info() for p in eng.worker_pids]
        print(json.dumps({"nbytes": x.nbytes, "base_rss": base,
                          "peak_rss": max(peak[0], me.memory_info().rss), "ok": ok,
                          "worker_uss": [w.uss for w in workers],
                          "worker_rss": [w.rss for w in workers]}))
""")


def task_bytes_figure() -> dict:
    """Pickled bytes of one job definition (3 arrays, 2 chunks) by array
    size.  A repeat of the job sends no message at all: only a ring in the
    control block."""
    from shmarray.descriptors import Define, describe, encode

    out = {}
    with shmarray.Engine(workers=1) as eng:
        for n in (10, 10_000_000):
            arrays = [eng.zeros(n) for _ in range(3)]
            msg = Define(
                1,
                1,
                tuple(describe(a, eng._dispatcher.table) for a in arrays),
                (2.5,),
                0,
                ((0, n // 2), (n // 2, n)),
                (0, 1),
                False,
                False,
            )
            out[str(n)] = len(encode(msg))
    return out


def _wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def triad_figure(n: int, repeat: int) -> dict:
    with shmarray.Engine(workers=2) as eng:
        pair = TriadPair(eng, n, threads=2)
        med = interleaved(
            {
                "engine": pair.engine,
                "prange": pair.prange,
                "prange_small_pages": pair.prange_small_pages,
                "prange_on_shared": pair.prange_on_shared,
            },
            repeat=repeat,
            pause=0.02,
        )
        pair.engine()
        pair.prange()
        pair.prange_small_pages()
        identical = pair.identical()
    gbs = 4 * 8 * n / 1e9  # read b, c; write a (+ write-allocate)
    return {
        "n": n,
        "engine_s": med["engine"],
        "prange_s": med["prange"],
        "prange_small_pages_s": med["prange_small_pages"],
        "prange_on_shared_s": med["prange_on_shared"],
        "ratio": med["engine"] / med["prange"],
        "ratio_same_page_size": med["engine"] / med["prange_small_pages"],
        "engine_GBps": gbs / med["engine"],
        "prange_GBps": gbs / med["prange"],
        "identical": identical,
    }


def roundtrip_figure(batches: int, inner: int) -> dict:
    ctx = multiprocessing.get_context("forkserver")
    with shmarray.Engine(workers=2) as eng, ProcessPoolExecutor(2, mp_context=ctx) as ex:
        x = eng.zeros(16)
        one_chunk = lambda: eng.map(noop, x, chunks=1)  # noqa: E731
        ppe = lambda: ex.submit(nothing).result()  # noqa: E731
        for _ in range(200):
            one_chunk(), ppe()
        med = interleaved({"engine": one_chunk, "ppe": ppe}, repeat=batches, inner=inner)
    return {
        "engine_us": med["engine"] * 1e6,
        "ppe_us": med["ppe"] * 1e6,
        "ratio": med["engine"] / med["ppe"],
    }


def startup_figure(runs: int) -> dict:
    subprocess.run([sys.executable, "-c", STARTUP], check=True, capture_output=True)
    starts, imports = [], []
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, "-c", STARTUP], check=True, capture_output=True, text=True
        ).stdout.split()
        imports.append(float(out[0]))
        starts.append(float(out[1]))
    numba_import = [_wall([sys.executable, "-c", "import numba"]) for _ in range(runs)]
    return {
        "engine_start_first_map_s": statistics.median(starts),
        "import_shmarray_s": statistics.median(imports),
        "python_import_numba_s": statistics.median(numba_import),
    }


def memory_figure(nbytes: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", MEMORY, str(nbytes // 8)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    m = json.loads(out)
    beyond = m["peak_rss"] - m["base_rss"] - m["nbytes"]
    return {
        "array_bytes": m["nbytes"],
        "ok": m["ok"],
        "coordinator_beyond_array_bytes": beyond,
        "coordinator_beyond_array_pct": 100 * beyond / m["nbytes"],
        "worker_uss_MB": [u / 1e6 for u in m["worker_uss"]],
        "worker_rss_MB": [r / 1e6 for r in m["worker_rss"]],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller arrays")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    quick = args.quick

    fig = {"machine": machine_info()}
    fig["triad"] = triad_figure(n=5_000_000 if quick else 50_000_000, repeat=10 if quick else 40)
    fig["machine"]["threading_layer"] = numba.threading_layer()
    fig["roundtrip"] = roundtrip_figure(batches=5 if quick else 21, inner=200)
    fig["startup"] = startup_figure(runs=2 if quick else 5)
    fig["memory"] = memory_figure(2**27 if quick else 2**31)
    fig["task_bytes"] = task_bytes_figure()

    t, r, s, m = fig["triad"], fig["roundtrip"], fig["startup"], fig["memory"]
    v = fig["machine"]["versions"]
    print(
        f"machine: {fig['machine']['cpu']}, {fig['machine']['usable_cpus']} CPUs, "
        f"Python {v['python']}, numba {v['numba']} ({fig['machine']['threading_layer']})"
    )
    thp = fig["machine"]["transparent_hugepage"]
    print(f"transparent huge pages: anonymous [{thp['enabled']}], shmem [{thp['shmem_enabled']}]")
    print(
        f"triad {t['n']:,} float64   engine {t['engine_s'] * 1e3:7.2f} ms  "
        f"prange {t['prange_s'] * 1e3:7.2f} ms  ratio {t['ratio']:.3f} (target <= 1.05)  "
        f"identical {t['identical']}"
    )
    print(
        f"  same page size        prange on 4 KiB pages {t['prange_small_pages_s'] * 1e3:7.2f} ms  "
        f"ratio {t['ratio_same_page_size']:.3f}  [prange on the shared arrays "
        f"{t['prange_on_shared_s'] * 1e3:.2f} ms]"
    )
    print(
        f"no-op round trip      engine {r['engine_us']:7.1f} us  "
        f"PPE    {r['ppe_us']:7.1f} us  ratio {r['ratio']:.3f} (target <= 0.25)"
    )
    print(
        f"start + first map     {s['engine_start_first_map_s']:.3f} s   "
        f"(python -c 'import numba': {s['python_import_numba_s']:.3f} s; "
        f"import shmarray: {s['import_shmarray_s']:.3f} s)"
    )
    print(
        f"map over {m['array_bytes'] / 2**30:.2f} GiB  coordinator RSS beyond the array "
        f"{m['coordinator_beyond_array_bytes'] / 1e6:.1f} MB "
        f"({m['coordinator_beyond_array_pct']:.2f}%, target <= 5%)  worker USS "
        f"{', '.join(f'{u:.1f}' for u in m['worker_uss_MB'])} MB (target < 100)"
    )
    print(
        "bytes per job definition (3 arrays, 2 chunks): "
        + ", ".join(f"{int(n):,} elements: {b}" for n, b in fig["task_bytes"].items())
    )
    save(fig, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
