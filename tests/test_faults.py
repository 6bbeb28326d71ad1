"""Faults, each injected into a victim running in a child interpreter and
observed from outside: the error it reports, its stderr (no resource-tracker
noise), and /dev/shm and the process table afterwards."""

from __future__ import annotations

import pytest

from fault_scenarios import observe
from processes import running as _running

# case -> (exception the user sees, text it must contain, seconds it may take).
# The seconds detect a hang, with 10x headroom and more: a case takes
# 0.01-0.1 s (the timeout case 1.02 s, for its timeout=1.0).
EXPECTED = {
    "worker_sigkill": ("WorkerCrashedError", "killed by SIGKILL", 5),
    "oom_kill": ("WorkerCrashedError", "killed by SIGKILL", 5),
    "segfault": ("WorkerCrashedError", "killed by SIGSEGV", 5),
    "os_exit": ("WorkerCrashedError", "exited with code 3", 5),
    "sys_exit": ("WorkerCrashedError", "exited with code 4", 5),
    "unpicklable_result": ("KernelError", "cannot be pickled back", 5),
    "kernel_exception": ("ValueError", "kernel rejected its input", 5),
    "timeout": ("TaskTimeoutError", "timeout=1.0", 3),
    "sigint": ("KeyboardInterrupt", "", 1),
    "idle_worker_killed": (None, None, 5),
    "shm_exhausted": ("SharedMemoryFullError", "--shm-size", 1),
    "out_of_inodes": ("SharedMemoryFullError", "no free inode left", 1),
    "forked_child_exit": (None, None, 5),
    "watchdog_killed": (None, None, 5),
    "huge_timeout": (None, None, 5),
    "evil_descriptor": ("ValueError", "refusing to map it", 5),
    "kernel_forks": (None, None, 5),
    "kernel_keyboard_interrupt": ("KeyboardInterrupt", "the kernel gave up", 5),
}


@pytest.mark.breaks_things
@pytest.mark.parametrize("case", list(EXPECTED))
def test_fault_gives_a_clear_error_and_leaves_nothing(case):
    error, text, seconds = EXPECTED[case]
    r = observe(case)
    if "skipped" in r:
        pytest.skip(r["skipped"])
    assert r["stderr"] == "", r["stderr"]
    assert r["returncode"] == 0, r
    assert r.get("error") == error, r
    if text:
        assert text in r["message"], r
    assert r["seconds"] < seconds, r
    assert r["usable"] is True, r
    assert r["workers_left"] == [] and r["blocks_left"] == [], r


@pytest.mark.breaks_things
@pytest.mark.parametrize(
    "case", ["coordinator_sigkill", "group_sigterm", "group_sighup", "group_sigkill"]
)
def test_a_killed_coordinator_is_cleaned_up_by_the_watchdog(case):
    r = observe(case)
    assert r["returncode"] < 0
    assert r["workers_left"] == [] and r["blocks_left"] == [], r
    assert r["seconds"] < 5, r  # a hang detector: the watchdog takes about 0.4 s
    assert r["stderr"] == "", r["stderr"]


@pytest.mark.breaks_things
def test_ctrl_c_during_close_then_close_again_finishes():
    r = observe("ctrl_c_during_close")
    assert r["returncode"] == 0 and r["closed"] is True, r
    assert r["workers_left"] == [] and r["blocks_left"] == [], r
    assert r["stderr"] == "", r["stderr"]


# stage, how -> (exception the caller sees, text in its message)
CRASH_CASES = {
    ("kernel_unpickling", "error"): ("Boom", "error on purpose"),
    ("kernel_unpickling", "exit"): ("WorkerCrashedError", "while loading the kernel"),
    ("kernel_unpickling", "segfault"): ("WorkerCrashedError", "SIGSEGV while loading"),
    ("run", "error"): ("Boom", "error on purpose"),
    ("run", "exit"): ("WorkerCrashedError", "exited with code 5 while running rows"),
    ("run", "segfault"): ("WorkerCrashedError", "SIGSEGV while running rows"),
    ("result_pickling", "error"): ("KernelError", "cannot be pickled back"),
    ("result_pickling", "exit"): ("WorkerCrashedError", "exited with code 5"),
    ("result_pickling", "segfault"): ("WorkerCrashedError", "SIGSEGV"),
    ("result_unpickling", "error"): ("KernelError", "could not be unpickled here"),
    ("result_unpickling", "exit"): ("KernelError", "could not be unpickled here"),
    ("result_unpickling", "segfault"): (None, None),  # the caller itself crashes
}


def run_crash_case(stage: str, how: str) -> dict:
    """One case in a child interpreter, observed from outside."""
    import json
    import os
    import subprocess
    import sys
    import time

    path = os.path.join(os.path.dirname(__file__), "crash_cases.py")
    proc = subprocess.run(
        [sys.executable, path, stage, how], capture_output=True, text=True, timeout=120
    )
    ended = time.monotonic()
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    report = dict(lines[-1], returncode=proc.returncode, stderr=proc.stderr)
    pids = set(report["pids"])
    names = [n.lstrip("/") for n in report["blocks"]]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        alive = [p for p in pids if _running(p)]  # one that exits as we look is gone
        left = [n for n in names if os.path.exists(f"/dev/shm/{n}")]
        if not alive and not left:
            break
        time.sleep(0.005)
    report.update(workers_left=alive, blocks_left=left, clean_after=time.monotonic() - ended)
    report.setdefault("seconds", float("nan"))
    return report


@pytest.mark.breaks_things
@pytest.mark.parametrize("case", list(CRASH_CASES), ids=lambda c: "-".join(c))
def test_crash_case(case):
    error, text = CRASH_CASES[case]
    r = run_crash_case(*case)
    assert r["workers_left"] == [] and r["blocks_left"] == [], r
    if error is None:
        # A segfault in the caller's own unpickling kills the caller (pickle
        # runs what the value says); the watchdog still cleans up.
        assert r["returncode"] == -11, r
        return
    assert r["returncode"] == 0, r
    assert r["error"] == error, r
    assert text in r["message"], r
    assert r["usable"] is True, r
    assert r["stderr"] == "", r["stderr"]
