"""A first run, as a newcomer's scripts see it: three scripts without an
``if __name__ == "__main__":`` guard, run as files.

* lines printed, exit code and wall time on success, and on a deliberate
  start-up failure (an initializer that raises);
* engine start plus the first map, beside ``python -c "import numba"``;
* worker start for a script that imports a slow module at top level:
  shmarray's workers never import the script, multiprocessing's fork server
  and spawn workers do (the same script, guarded for them).

Run: ``.venv/bin/python bench/first_run_figures.py [--json FILE]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

from workloads import save

HEADER = textwrap.dedent("""
    import time
    T0 = time.perf_counter()
    import numpy as np
    import shmarray
    from numba import njit
""")

SCRIPTS = {
    # The contract's own example.
    "spec_example": HEADER
    + textwrap.dedent("""
        @njit
        def scale(out, inp, s):
            for i in range(inp.shape[0]):
                out[i] = inp[i] * s

        @njit
        def total(x):
            acc = 0.0
            for i in range(x.shape[0]):
                acc += x[i]
            return acc

        with shmarray.Engine(workers=2INIT) as eng:
            x = eng.from_numpy(np.random.rand(10**7))
            y = eng.empty(x.shape, x.dtype)
            eng.map(scale, y, x, args=(2.5,))
            print(f"first map after {time.perf_counter() - T0:.3f} s")
            print("total", round(eng.reduce(total, y) / 1e7, 2))
    """),
    # Parameters as a dataclass of the script, a plain-Python kernel.
    "dataclass_params": HEADER
    + textwrap.dedent("""
        import dataclasses

        @dataclasses.dataclass
        class Params:
            gain: float
            bias: float

        def affine(out, inp, p):
            out[:] = inp * p.gain + p.bias

        with shmarray.Engine(workers=2INIT) as eng:
            x = eng.from_numpy(np.arange(1000.0))
            y = eng.zeros(1000)
            eng.map(affine, y, x, args=(Params(2.0, 1.0),))
            print(f"first map after {time.perf_counter() - T0:.3f} s")
            print("sum", y.sum())
    """),
    # Data loaded at module level, then a stencil loop.
    "heat_loop": HEADER
    + textwrap.dedent("""
        from shmarray.kernels.stencils import heat_step

        grid = np.random.default_rng(0).random((1000, 1000))   # "loading data"
        print("loaded", grid.shape)

        with shmarray.Engine(workers=2INIT) as eng:
            a, b = eng.from_numpy(grid), eng.from_numpy(grid)
            eng.map(heat_step, b, a, args=(0.2,), halo=1)
            print(f"first map after {time.perf_counter() - T0:.3f} s")
            last = eng.iterate(heat_step, a, b, steps=99, args=(0.2,), halo=1)
            print("mean", round(float(last.mean()), 6))
    """),
}

FAILING_INIT = ", initializer=needs_a_licence"
FAILING_DEF = textwrap.dedent("""
    def needs_a_licence():
        raise RuntimeError("no licence server reachable")
""")

SLOW_MODULE = "import time\ntime.sleep(1.0)   # a heavy import: a model, a big table\n"

SLOW_SHMARRAY = textwrap.dedent("""
    import time
    T0 = time.perf_counter()
    import slowmod
    import numpy as np
    import shmarray

    def one(x):
        x[:] = 1.0

    t1 = time.perf_counter()
    with shmarray.Engine(workers=2) as eng:
        x = eng.zeros(8)
        eng.map(one, x)
        print("start_and_first_map", time.perf_counter() - t1)
""")

SLOW_MULTIPROCESSING = textwrap.dedent("""
    import time
    T0 = time.perf_counter()
    import slowmod
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    def one(i):
        return i

    if __name__ == "__main__":       # multiprocessing's children import this file
        t1 = time.perf_counter()
        ctx = multiprocessing.get_context("METHOD")
        with ProcessPoolExecutor(2, mp_context=ctx) as ex:
            list(ex.map(one, range(2)))
            print("start_and_first_map", time.perf_counter() - t1)
""")


def run_file(code: str, directory: str, name: str) -> dict:
    path = os.path.join(directory, name + ".py")
    with open(path, "w") as f:
        f.write(code)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, path], capture_output=True, text=True, timeout=300, cwd=directory
    )
    wall = time.perf_counter() - t0
    out = proc.stdout.splitlines()
    err = proc.stderr.splitlines()
    first = [float(ln.split()[-2]) for ln in out if ln.startswith("first map after")]
    return {
        "returncode": proc.returncode,
        "wall_s": wall,
        "stdout_lines": len(out),
        "stderr_lines": len(err),
        "lines": len(out) + len(err),
        "tracebacks": proc.stderr.count("Traceback (most recent call last)"),
        "first_map_s": first[0] if first else None,
        "last_stderr_line": err[-1] if err else "",
        "stdout": proc.stdout,
    }


def import_numba_s(runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import numba"], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def slow_import_figure(directory: str) -> dict:
    with open(os.path.join(directory, "slowmod.py"), "w") as f:
        f.write(SLOW_MODULE)
    out = {}
    for label, code in (
        ("shmarray", SLOW_SHMARRAY),
        ("multiprocessing_forkserver", SLOW_MULTIPROCESSING.replace("METHOD", "forkserver")),
        ("multiprocessing_spawn", SLOW_MULTIPROCESSING.replace("METHOD", "spawn")),
    ):
        r = run_file(code, directory, "slow_" + label)
        value = [
            float(ln.split()[1])
            for ln in r["stdout"].splitlines()
            if ln.startswith("start_and_first_map")
        ]
        out[label] = value[0] if value else None
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    fig: dict = {"scripts": {}, "failing": {}}
    with tempfile.TemporaryDirectory() as d:
        for name, code in SCRIPTS.items():
            fig["scripts"][name] = run_file(code.replace("INIT", ""), d, name)
            fig["failing"][name] = run_file(
                code.replace("INIT", FAILING_INIT).replace(
                    "import time\n", "import time\n" + FAILING_DEF, 1
                ),
                d,
                name + "_failing",
            )
        fig["import_numba_s"] = import_numba_s(5)
        fig["slow_import_start_s"] = slow_import_figure(d)
    for r in list(fig["scripts"].values()) + list(fig["failing"].values()):
        r.pop("stdout")
    print(
        f"{'script':<18} {'exit':>4} {'lines':>5} {'first map':>10} {'wall':>7}   "
        f"with a failing initializer: exit, lines (tracebacks), last line"
    )
    for name in SCRIPTS:
        ok, bad = fig["scripts"][name], fig["failing"][name]
        print(
            f"{name:<18} {ok['returncode']:>4} {ok['lines']:>5} "
            f"{ok['first_map_s']:>9.3f}s {ok['wall_s']:>6.2f}s   {bad['returncode']}, "
            f"{bad['lines']} ({bad['tracebacks']}), {bad['last_stderr_line'][:110]}"
        )
    print(f"python -c 'import numba': {fig['import_numba_s']:.3f} s")
    s = fig["slow_import_start_s"]
    print(
        "start + first task, a script importing a 1 s module at top level: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in s.items() if v is not None)
    )
    save(fig, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
