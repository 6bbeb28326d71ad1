"""Faults, each injected into a victim running in a child interpreter and
observed from outside: the error it reports, its stderr (no resource-tracker
noise), and /dev/shm and the process table afterwards."""

from __future__ import annotations

import pytest

from fault_scenarios import observe

# case -> (exception the user sees, text it must contain, seconds it may take)
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
}


@pytest.mark.breaks_things
@pytest.mark.parametrize("case", list(EXPECTED))
def test_fault_gives_a_clear_error_and_leaves_nothing(case):
    error, text, seconds = EXPECTED[case]
    r = observe(case)
    assert r["stderr"] == "", r["stderr"]
    assert r["returncode"] == 0, r
    assert r.get("error") == error, r
    if text:
        assert text in r["message"], r
    assert r["seconds"] < seconds, r
    assert r["usable"] is True, r
    assert r["workers_left"] == [] and r["blocks_left"] == [], r


@pytest.mark.breaks_things
def test_killed_coordinator_is_cleaned_up_by_the_watchdog():
    r = observe("coordinator_sigkill")
    assert r["returncode"] == -9
    assert r["workers_left"] == [] and r["blocks_left"] == [], r
    assert r["seconds"] < 5, r
    assert r["stderr"] == "", r["stderr"]
