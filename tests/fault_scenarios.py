"""Fault scenarios, each run as the victim in a child interpreter:

    python tests/fault_scenarios.py CASE

The child injects the fault, catches what the user would see, and prints
one JSON line: the error's type and message, seconds from injection to
error, whether the engine still ran a map afterwards, and the worker pids
and block names, so the parent can check from outside that all of them are
gone.  ``tests/test_faults.py`` asserts on these; ``bench/fault_table.py``
prints them as a table.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import time

import numpy as np
from numba import njit

import shmarray


@njit
def spin(x):
    i = 0
    while x[0] >= 0.0:          # x holds zeros: never ends
        i += 1
    return i


@njit
def scale(x, s):
    for i in range(x.shape[0]):
        x[i] *= s


def segfault(x):
    ctypes.string_at(0)


def hard_exit(x):
    os._exit(3)


def sys_exit(x):
    sys.exit(4)


def unpicklable_result(x):
    return lambda: None


def raises(x):
    raise ValueError("kernel rejected its input")


def allocate_forever(x):
    hog = []
    while True:
        hog.append(np.ones(2**20))


def _kill_soon(pid: int, sig: int, delay: float) -> list[float]:
    when: list[float] = []

    def fire():
        when.append(time.monotonic())
        os.kill(pid, sig)

    threading.Timer(delay, fire).start()
    return when


def run_case(case: str) -> dict:
    report: dict = {"case": case}
    with shmarray.Engine(workers=2) as eng:
        x = eng.zeros(1000)
        report["pids"] = list(eng.worker_pids)
        report["blocks"] = [b.name for b in eng.blocks]
        if case == "coordinator_sigkill":
            print(json.dumps(report), flush=True)
            eng.map(spin, x)            # the parent kills us in here
        injected = [time.monotonic()]
        try:
            if case == "worker_sigkill":
                injected = _kill_soon(eng.worker_pids[1], signal.SIGKILL, 0.3)
                eng.map(spin, x)
            elif case == "oom_kill":    # the OOM killer sends SIGKILL
                injected = _kill_soon(eng.worker_pids[0], signal.SIGKILL, 0.3)
                eng.map(allocate_forever, x, chunks=1)
            elif case == "segfault":
                eng.map(segfault, x)
            elif case == "os_exit":
                eng.map(hard_exit, x)
            elif case == "sys_exit":
                eng.map(sys_exit, x)
            elif case == "unpicklable_result":
                eng.reduce(unpicklable_result, x)
            elif case == "kernel_exception":
                eng.map(raises, x)
            elif case == "timeout":
                eng.map(spin, x, timeout=1.0, progress=False)   # stderr stays empty
            elif case == "idle_worker_killed":
                os.kill(eng.worker_pids[0], signal.SIGKILL)
                time.sleep(0.2)
                injected = [time.monotonic()]
                eng.map(scale, x, args=(2.0,))
            elif case == "shm_exhausted":
                free = shmarray.blocks.free_space()[0]
                eng.empty(free + 2**30, np.uint8)
            elif case == "sigint":
                print(json.dumps(report), flush=True)   # the parent sends SIGINT
                eng.map(spin, x)
            else:
                raise SystemExit(f"unknown case {case!r}")
            report["error"] = None
        except BaseException as exc:  # noqa: BLE001 - we report what users see
            report["error_at"] = time.monotonic()
            report["error"] = type(exc).__name__
            report["message"] = (str(exc).splitlines() or [""])[0][:300]
            report["is_shmarray_error"] = isinstance(exc, shmarray.ShmarrayError)
        report["seconds"] = time.monotonic() - injected[0] if injected else None
        try:
            y = eng.from_numpy(np.arange(10.0))
            eng.map(scale, y, args=(3.0,))
            report["usable"] = bool(np.array_equal(y, np.arange(10.0) * 3.0))
            del y
        except Exception as exc:  # noqa: BLE001
            report["usable"] = False
            report["usable_error"] = repr(exc)
        report["pids"] = sorted(set(report["pids"]) | set(eng.worker_pids))
        report["blocks"] = sorted(set(report["blocks"]) | {b.name for b in eng.blocks})
        del x
    return report


def observe(case: str, timeout: float = 120.0) -> dict:
    """Run ``case`` in a child interpreter (its own session, as a terminal
    job) and watch it from outside: its report, its stderr, and how long
    until its workers and blocks are gone."""
    import subprocess

    import psutil

    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), case],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    sent = None
    if case in ("sigint", "coordinator_sigkill"):
        first = json.loads(proc.stdout.readline())
        time.sleep(0.5)                          # deep inside the kernel by now
        sent = time.monotonic()
        if case == "sigint":
            os.killpg(proc.pid, signal.SIGINT)   # what Ctrl-C in a terminal does
        else:
            proc.kill()
    out, err = proc.communicate(timeout=timeout)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    report = json.loads(lines[-1]) if lines else {"case": case}
    if case == "coordinator_sigkill":
        report = dict(first, error=None, usable=None)
    if case == "sigint" and "error_at" in report:
        report["seconds"] = report["error_at"] - sent
    deadline = time.monotonic() + 10.0
    names = [n.lstrip("/") for n in report.get("blocks", [])]
    while True:
        alive = [p for p in report.get("pids", []) if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        left = [n for n in names if os.path.exists(f"/dev/shm/{n}")]
        if not (alive or left) or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    if case == "coordinator_sigkill":
        report["seconds"] = time.monotonic() - sent
    report.update(returncode=proc.returncode, stderr=err, workers_left=alive,
                  blocks_left=left)
    return report


CASES = ["worker_sigkill", "oom_kill", "segfault", "os_exit", "sys_exit",
         "unpicklable_result", "kernel_exception", "timeout", "sigint",
         "idle_worker_killed", "shm_exhausted", "coordinator_sigkill"]

if __name__ == "__main__":
    if sys.argv[1] == "sigint":
        # Like a terminal: the SIGINT that reaches our process group.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    print(json.dumps(run_case(sys.argv[1])), flush=True)
