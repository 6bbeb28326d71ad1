"""Lifecycle seen from outside: each victim runs in a child interpreter, and
the test looks at /dev/shm, the process table and the child's stderr."""

from __future__ import annotations

import textwrap
import time

import pytest

from conftest import gone, run_python
from processes import running

KERNEL = """
import numpy as np
import shmarray
from numba import njit

@njit
def scale(out, inp, s):
    for i in range(inp.shape[0]):
        out[i] = inp[i] * s
"""


def _gone(pids, names, within=10.0) -> bool:
    """Polls until every process of ``pids`` has exited and every block of
    ``names`` is gone (``within``: a hang detector)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(running(p) for p in pids) and all(gone(n) for n in names):
            return True
        time.sleep(0.05)
    return False


def _report(stdout: str) -> tuple[list[int], list[str]]:
    """The child prints 'pids: ...' and 'blocks: ...' lines."""
    pids, names = [], []
    for line in stdout.splitlines():
        if line.startswith("pids:"):
            pids = [int(p) for p in line.split()[1:]]
        if line.startswith("blocks:"):
            names = line.split()[1:]
    return pids, names


def test_kernel_defined_in_a_script_main(tmp_path):
    code = KERNEL + textwrap.dedent("""
        if __name__ == "__main__":
            with shmarray.Engine(workers=2) as eng:
                x = eng.from_numpy(np.arange(10.0))
                y = eng.empty(10)
                eng.map(scale, y, x, args=(2.0,))
                print("sum", y.sum())
    """)
    proc = run_python(code, file=str(tmp_path / "script.py"))
    assert "sum 90.0" in proc.stdout
    assert proc.stderr == ""


def test_kernel_defined_without_a_file_like_a_notebook_cell():
    # Under -c there is no __main__.__file__, as in Jupyter: the workers
    # cannot import the kernel and must receive it by value.
    code = KERNEL + textwrap.dedent("""
        def plain(a):
            a += 1.0

        with shmarray.Engine(workers=2) as eng:
            x = eng.from_numpy(np.arange(10.0))
            y = eng.empty(10)
            eng.map(scale, y, x, args=(2.0,))
            eng.map(plain, y)
            print("sum", y.sum())
    """)
    proc = run_python(code)
    assert "sum 100.0" in proc.stdout
    assert proc.stderr == ""


def test_interpreter_exit_without_close_cleans_up():
    code = KERNEL + textwrap.dedent("""
        eng = shmarray.Engine(workers=2)
        kept = [eng.from_numpy(np.arange(1000.0)), eng.zeros((100, 100))]
        eng.map(scale, kept[0], kept[0], args=(2.0,))
        print("pids:", *eng.worker_pids)
        print("blocks:", *[b.name for b in eng.blocks])
        # no close(), no with: the interpreter exits holding everything
    """)
    proc = run_python(code)
    pids, names = _report(proc.stdout)
    assert len(pids) == 2 and len(names) == 2
    assert _gone(pids, names)
    assert proc.stderr == ""


@pytest.mark.breaks_things
def test_killed_worker_leaves_no_tracker_warning_and_no_block():
    code = KERNEL + textwrap.dedent("""
        import os, signal, threading, time
        from numba import njit

        @njit
        def hold(flag):
            flag[0] = 1.0             # running: the killer may fire
            while flag[1] == 0.0:     # never released
                pass
            return 0.0

        def kill_when_running(flag, pid):
            while flag[0] == 0.0:
                time.sleep(0.001)
            os.kill(pid, signal.SIGKILL)

        with shmarray.Engine(workers=2) as eng:
            flag = eng.zeros(2)
            victim = eng.worker_pids[0]
            killer = threading.Thread(target=kill_when_running, args=(flag, victim))
            killer.start()
            try:
                eng.reduce(hold, flag, chunks=1)
            except shmarray.WorkerCrashedError as exc:
                print("crashed:", exc)
            killer.join()
            print("after:", eng.reduce(lambda a: float(a.sum()), flag))
            print("pids:", *eng.worker_pids, victim)
            print("blocks:", *[b.name for b in eng.blocks])
    """)
    proc = run_python(code)
    assert "crashed: worker" in proc.stdout and "SIGKILL" in proc.stdout
    assert "after:" in proc.stdout
    pids, names = _report(proc.stdout)
    assert _gone(pids, names)
    assert proc.stderr == ""
