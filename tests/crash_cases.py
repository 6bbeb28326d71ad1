"""Crash cases, after loky's ``crash_cases``: three ways to fail (an
exception, ``sys.exit``, a segfault) at four stages of a call (unpickling
the kernel in the worker, running it, pickling its value in the worker,
unpickling that value in the coordinator).

``python tests/crash_cases.py STAGE HOW`` runs one case as the victim and
prints one JSON line: what the caller saw, whether the engine still worked
afterwards, and the pids and blocks to check from outside.  Used by
``tests/test_faults.py`` and ``bench/fault_table.py``.
"""

from __future__ import annotations

import ctypes
import json
import sys
import time

STAGES = ("kernel_unpickling", "run", "result_pickling", "result_unpickling")
HOWS = ("error", "exit", "segfault")


class Boom(Exception):
    """The failure an 'error' case raises."""


def fail(how: str):
    if how == "error":
        raise Boom(f"{how} on purpose")
    if how == "exit":
        sys.exit(5)
    ctypes.string_at(0)  # segfault


def _fail_on_load(how: str):
    fail(how)


class FailsToUnpickle:
    """Pickles fine; fails when unpickled."""

    def __init__(self, how: str):
        self.how = how

    def __reduce__(self):
        return _fail_on_load, (self.how,)


class FailsToPickle:
    """Fails when pickled."""

    def __init__(self, how: str):
        self.how = how

    def __reduce__(self):
        fail(self.how)


class KernelThatFailsToUnpickle(FailsToUnpickle):
    def __call__(self, x):
        return 0.0


def kernel_for(stage: str, how: str):
    if stage == "kernel_unpickling":
        return KernelThatFailsToUnpickle(how)
    if stage == "run":
        return lambda x: fail(how)
    if stage == "result_pickling":
        return lambda x: FailsToPickle(how)
    return lambda x: FailsToUnpickle(how)


def run_case(stage: str, how: str) -> dict:
    import numpy as np

    import shmarray

    report: dict = {"stage": stage, "how": how}
    with shmarray.Engine(workers=2) as eng:
        x = eng.zeros(100)
        report["pids"] = eng.worker_pids + [eng._dispatcher.pool.watchdog.child.pid]
        report["blocks"] = [b.name for b in eng.blocks] + [eng._dispatcher.pool._control_name]
        print(json.dumps(report), flush=True)  # before a coordinator crash
        started = time.monotonic()
        try:
            eng.reduce(kernel_for(stage, how), x)
            report["error"] = None
        except BaseException as exc:  # what the user sees
            report["error"] = type(exc).__name__
            report["message"] = (str(exc).splitlines() or [""])[0][:200]
        report["seconds"] = time.monotonic() - started
        y = eng.from_numpy(np.arange(10.0))
        eng.map(lambda a: a.__imul__(3.0), y)
        report["usable"] = bool(np.array_equal(y, np.arange(10.0) * 3.0))
        report["pids"] = sorted(set(report["pids"]) | set(eng.worker_pids))
        del x, y
    return report


if __name__ == "__main__":
    print(json.dumps(run_case(sys.argv[1], sys.argv[2])), flush=True)
