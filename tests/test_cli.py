"""The command line, run as users run it."""

from __future__ import annotations

import subprocess
import sys


def shmarray(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shmarray", *args],
                          capture_output=True, text=True, timeout=300)


def test_demo_runs_the_real_job_and_leaves_nothing():
    proc = shmarray("demo", "--size", "400", "--steps", "20", "--workers", "2",
                    "--rounds", "1")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for line in ("sequential numba ", "numba prange, 2 threads ",
                 "shmarray, a loop of eng.map ", "shmarray, eng.iterate ",
                 "identical results : yes, all four bit for bit", "blocks used       :",
                 "after close       : 0 of those blocks left"):
        assert line in out, out
    assert out.count("/sha-") == 4
    assert proc.stderr == ""


def test_ls_and_gc_on_a_clean_machine():
    ls = shmarray("ls")
    assert ls.returncode == 0 and ls.stderr == ""
    gc = shmarray("gc")
    assert gc.returncode == 0 and "block(s) removed" in gc.stdout


def test_usage_errors_exit_nonzero():
    proc = shmarray("frobnicate")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
