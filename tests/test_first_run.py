"""A first run with no ceremony, observed from outside: scripts without a
main guard (as a file, on stdin, with -c), objects of __main__ in args, one
clear error when workers cannot start, Ctrl-C while they start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from conftest import run_python
from test_lifecycle import _gone, _report

GUARDLESS = textwrap.dedent("""
    import dataclasses
    import numpy as np
    import shmarray
    from numba import njit

    print("module level runs")            # must print once, not once per worker

    @njit
    def scale(out, inp, s):
        for i in range(inp.shape[0]):
            out[i] = inp[i] * s

    @dataclasses.dataclass
    class Params:                          # a class defined in __main__
        factor: float
        offset: float

    def affine(out, inp, p, f):            # a plain-Python kernel
        out[:] = f(inp * p.factor + p.offset)

    with shmarray.Engine(workers=2) as eng:
        x = eng.from_numpy(np.arange(10.0))
        y = eng.empty(x.shape, x.dtype)
        eng.map(scale, y, x, args=(2.5,))
        print("scale", y.sum())
        eng.map(affine, y, x, args=(Params(2.0, 1.0), lambda v: v + 1))
        print("affine", y.sum())
        print("pids:", *eng.worker_pids)
        print("blocks:", *[b.name for b in eng.blocks])
""")

EXPECTED = ["module level runs", "scale 112.5", "affine 110.0"]


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [ln for ln in lines if not ln.startswith(("pids:", "blocks:"))] == EXPECTED
    pids, names = _report(proc.stdout)
    assert len(pids) == 2 and _gone(pids, names)
    assert proc.stderr == ""


def test_a_script_without_a_main_guard_runs_once(tmp_path):
    _check(run_python(GUARDLESS, file=str(tmp_path / "guardless.py"), check=False))


def test_a_script_piped_on_stdin_runs():
    _check(
        subprocess.run(
            [sys.executable, "-"], input=GUARDLESS, capture_output=True, text=True, timeout=120
        )
    )


def test_python_dash_c_runs():
    _check(run_python(GUARDLESS, check=False))


def test_a_failing_initializer_is_one_clear_error(tmp_path):
    code = textwrap.dedent("""
        import shmarray

        def needs_a_licence():
            raise ValueError("no licence server")

        eng = shmarray.Engine(workers=2, initializer=needs_a_licence)
    """)
    proc = run_python(code, file=str(tmp_path / "start.py"), check=False)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.count("Traceback (most recent call last)") == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("shmarray.errors.WorkerStartError: worker ")
    assert "its initializer raised ValueError: no licence server" in last
    assert "needs_a_licence, start.py line 5" in last


def test_ctrl_c_while_workers_start_raises_keyboard_interrupt():
    code = textwrap.dedent("""
        import os, signal, time
        import shmarray

        # Ctrl-C raises, as in a terminal, even when these tests run as a
        # background job (whose children inherit SIGINT ignored).
        signal.signal(signal.SIGINT, signal.default_int_handler)

        def slow_start():
            print("initializing", os.getpid(), flush=True)
            time.sleep(60)

        try:
            shmarray.Engine(workers=2, initializer=slow_start)
            print("started")
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        left = [n for n in os.listdir("/dev/shm") if n.startswith(f"sha-{os.getpid()}-")]
        print("left:", left)
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    workers = []
    while len(workers) < 1:
        line = proc.stdout.readline()
        assert line, proc.communicate()
        if line.startswith("[worker ") and " initializing " in line:
            workers.append(int(line.split()[-1]))  # tagged: forwarded
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "interrupted" in out and "left: []" in out
    assert _gone(workers, [])
    assert err == ""


def doc_example(name: str, page: str = "docs/guide/kernels.md") -> str:
    """The code block that follows ``<!-- example: NAME`` on a page of the
    README or the documentation: the tests run what the page shows, as
    written."""
    with open(os.path.join(os.path.dirname(__file__), "..", page)) as f:
        text = f.read()
    after = text.split(f"<!-- example: {name}", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_seed_a_generator_example_works_from_a_script(tmp_path):
    # The initializer and the kernel come by value from the script's
    # __main__; they must share one namespace per worker, as in one process.
    proc = run_python(doc_example("seed-generator"), file=str(tmp_path / "noise.py"))
    assert proc.stdout.startswith("mean ") and proc.stderr == ""
    mean, std = (float(w.rstrip(",")) for w in proc.stdout.split()[1::2])
    assert abs(mean) < 0.01 and abs(std - 1.0) < 0.01


def test_the_readme_example_works_as_written(tmp_path):
    proc = run_python(doc_example("first-map", page="README.md"), file=str(tmp_path / "first.py"))
    assert proc.stderr == ""
    words = proc.stdout.split()
    assert words[0] == "sum" and words[2] == "mean"
    # 2.5 times the mean of 10**7 uniform numbers
    assert abs(float(words[3]) - 1.25) < 0.01


CACHED_KERNEL = textwrap.dedent("""
    import os
    from numba import njit

    @njit(cache=True)
    def fill(x, value):
        for i in range(x.shape[0]):
            x[i] = value

    @njit(cache=True)
    def step(x, value):
        for i in range(x.shape[0]):
            x[i] += value

    def compiled(kernel):
        # What this process's copy of kernel did: compiled, or loaded from
        # the cache on disk.
        return (sum(kernel.stats.cache_misses.values()),
                sum(kernel.stats.cache_hits.values()))

    def compiles_here(x):
        return [(os.getpid(), *compiled(fill), *compiled(step))]
""")


def test_workers_meeting_a_cached_kernel_on_a_fresh_cache_compile_it_once(tmp_path):
    # numba writes a cache's index before the code it names, so workers
    # compiling one kernel at once can load what an older numba or source
    # left under that name ("LLVM bitcode parsing error" in a map).  The
    # first worker compiles and writes the cache; the others load it.
    (tmp_path / "cachedkernel.py").write_text(CACHED_KERNEL)
    script = textwrap.dedent(f"""
        import operator, os, sys
        sys.path.insert(0, {str(tmp_path)!r})
        import shmarray, cachedkernel
        with shmarray.Engine(workers=3) as eng:
            x = eng.zeros(300)
            eng.map(cachedkernel.fill, x, args=(2.0,), chunks=3)
            print("filled", bool((x == 2.0).all()))
            # The caller runs a share of a prepared map, beside the workers.
            eng.prepare(cachedkernel.step, x, args=(1.0,), chunks=3, in_caller=True)()
            print("stepped", bool((x == 3.0).all()))
            seen = set(eng.reduce(cachedkernel.compiles_here, x, chunks=3,
                                  combine=operator.add))
        print("workers", len(seen))
        print("fill compiled", sum(s[1] for s in seen), "loaded", sum(s[2] for s in seen))
        print("step compiled", sum(s[3] for s in seen), "loaded", sum(s[4] for s in seen),
              "in the caller", *cachedkernel.compiled(cachedkernel.step))
        # A worker started later (forked from this process, which has
        # closed its copy of the engine's lock by then) waits its turn too.
        with shmarray.Engine(workers=3, start_method="fork") as eng:
            i = eng.zeros(300, dtype="int64")
            eng.map(lambda v: None, i)
            victim = eng.worker_pids[0]
            os.kill(victim, 9)
            while eng.worker_pids[0] == victim:  # replaced within a map
                try:
                    eng.map(lambda v: None, i)
                except shmarray.WorkerCrashedError:
                    pass
            eng.map(cachedkernel.fill, i, args=(5,), chunks=3)
            seen = set(eng.reduce(cachedkernel.compiles_here, i, chunks=3,
                                  combine=operator.add))
        print("fill on int64 compiled", sum(s[1] for s in seen), "loaded", sum(s[2] for s in seen))
    """)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "filled True",
        "stepped True",
        "workers 3",
        "fill compiled 1 loaded 2",
        # the caller compiles first; the two workers left load its code
        "step compiled 0 loaded 2 in the caller 1 0",
        "fill on int64 compiled 1 loaded 2",
    ], proc.stdout
    assert proc.stderr == ""


DECLINED = textwrap.dedent("""
    import numpy as np
    from numba import njit

    TABLE = np.arange(200_000.0)  # a large global: numba refers to it by address

    @njit(cache=True)
    def from_table(x):  # so numba compiles it and caches nothing
        x[0] = TABLE[5]
""")


def test_a_kernel_numba_compiles_but_will_not_cache_keeps_no_worker_waiting(tmp_path):
    # Workers take turns compiling a cached kernel so the later ones load
    # what the first wrote.  For a kernel numba declines to cache, turns
    # gain nothing: after two compiles the lock file says so, and a third
    # worker compiles at once, even while another holds the lock.
    import fcntl

    from shmarray import compiling

    (tmp_path / "declined.py").write_text(DECLINED)
    child = textwrap.dedent(f"""
        import sys
        import warnings
        sys.path.insert(0, {str(tmp_path)!r})
        warnings.simplefilter("ignore")  # numba's "cannot cache" warning
        import numpy as np
        import declined
        from shmarray import compiling
        x = np.zeros(1)
        compiling.compile_first(int(sys.argv[1]), declined.from_table, (x,))
        declined.from_table(x)  # as the worker's call does next
        print(sum(declined.from_table.stats.cache_misses.values()), x[0], flush=True)
    """)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    lock = compiling.open_lock()
    try:

        def worker() -> str:
            proc = subprocess.run(
                [sys.executable, "-c", child, str(lock)],
                pass_fds=(lock,),
                capture_output=True,
                text=True,
                timeout=60,  # a third worker that waited would wait for ever
                env=env,
            )
            assert proc.returncode == 0, proc.stderr
            return proc.stdout.strip()

        assert [worker(), worker()] == ["1 5.0", "1 5.0"]  # each compiled: nothing cached
        fcntl.lockf(lock, fcntl.LOCK_EX, 1, 0)  # another worker's turn, held
        assert worker() == "1 5.0"
    finally:
        os.close(lock)
