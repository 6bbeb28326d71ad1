"""The command line, run as users run it."""

from __future__ import annotations

import os
import subprocess
import sys


def shmarray(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shmarray", *args], capture_output=True, text=True, timeout=300
    )


def test_demo_runs_the_real_job_and_leaves_nothing():
    proc = shmarray("demo", "--size", "400", "--steps", "20", "--workers", "2", "--rounds", "1")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for line in (
        "sequential numba ",
        "numba prange, 2 threads ",
        "shmarray, a loop of eng.map ",
        "shmarray, eng.iterate ",
        "identical results : yes, all four bit for bit",
        "blocks used       :",
        "after close       : 0 of those blocks left",
    ):
        assert line in out, out
    assert out.splitlines()[1].startswith("  machine: ")
    assert "free now; load average " in out
    assert out.count("/sha-") == 4
    assert proc.stderr == ""


def test_ls_and_gc_for_one_pid():
    ls = shmarray("ls")
    assert ls.returncode == 0 and ls.stderr == ""
    # Our own pid: its blocks are alive, and another program's orphans are
    # not the tests' to remove.
    gc = shmarray("gc", "--pid", str(os.getpid()))
    assert gc.returncode == 0 and gc.stdout == "0 block(s) removed\n" and gc.stderr == ""
    ls = shmarray("ls", "--pid", "1")
    assert ls.returncode == 0 and ls.stdout.startswith("no shmarray blocks created by pid 1 in ")


def test_usage_errors_exit_nonzero():
    proc = shmarray("frobnicate")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_version_and_a_bare_command():
    version = shmarray("--version")
    assert version.returncode == 0 and version.stdout == f"shmarray {shmarray_version()}\n"
    bare = shmarray()
    assert bare.returncode == 0 and bare.stderr == ""
    assert bare.stdout.startswith("usage: shmarray")
    for command in ("demo", "bench", "info", "ls", "gc"):
        assert f"    {command} " in bare.stdout


def shmarray_version() -> str:
    import shmarray as package

    return package.__version__


def test_every_flag_is_documented():
    import argparse

    from shmarray.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, command in [("shmarray", parser), *sub.choices.items()]:
        assert command.description, name
        for action in command._actions:
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)
    assert {"--tiny", "--quick", "--out", "--max-workers"} <= set(
        sub.choices["bench"]._option_string_actions
    )
    assert {"--size", "--steps", "--workers", "--rounds"} <= set(
        sub.choices["demo"]._option_string_actions
    )


def test_info_shows_the_version_and_starts_nothing():
    # No engine, no worker, no compiled kernel: what took seconds before.
    code = (
        "import json, psutil, sys; from shmarray import cli, __version__\n"
        "d = cli.info()\n"
        "assert d['shmarray'] == __version__ and 'fresh_workers' not in d, d\n"
        "assert psutil.Process().children() == []\n"
        "assert d['numba_threading_layer'] in ('tbb', 'omp', 'workqueue'), d\n"
        "sys.exit(cli.main(['info']))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"shmarray           : {shmarray_version()}\n")
    assert "a fresh engine" not in proc.stdout and proc.stderr == ""


def test_the_demo_says_when_the_machine_is_busy():
    from shmarray.cli import load_report

    idle = load_report({"load": (0.1, 0.2, 0.3), "usable": 8, "free": 7.6}, 8)
    assert idle == [
        "machine: 8 usable CPUs, 7.6 free now; load average 0.10, 0.20, 0.30 (1, 5, 15 min)"
    ]
    busy = load_report({"load": (3.1, 2.5, 2.0), "usable": 2, "free": 0.7}, 2)
    assert len(busy) == 2 and busy[1].startswith(
        "hint: the machine is busy (other programs use 1.3 of 2 CPUs)"
    )
    # Fewer workers than CPUs need only as many free.
    assert len(load_report({"load": (1, 1, 1), "usable": 8, "free": 2.5}, 2)) == 1


def test_machine_load_measures_this_machine():
    from shmarray.cli import machine_load

    load = machine_load(interval=0.05)
    assert len(load["load"]) == 3 and load["usable"] >= 1
    assert 0 <= load["free"] <= load["usable"]
