"""Every test runs under a leak check: no block left in /dev/shm, no child
process left alive."""

from __future__ import annotations

import gc
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from shmarray import blocks, launch

SHM_DIR = blocks.SHM_DIR


def shm_entries() -> set[str]:
    return set(os.listdir(SHM_DIR)) if SHM_DIR else set()


def _helper_pids() -> set[int]:
    """Long-lived helpers of this process, started once and shared: the
    shmarray fork server, and multiprocessing's fork server and resource
    tracker (which other libraries' pools start)."""
    pids = {launch.server_pid(),
            multiprocessing.forkserver._forkserver._forkserver_pid,
            multiprocessing.resource_tracker._resource_tracker._pid}
    return {p for p in pids if p}


def children() -> set[int]:
    me = psutil.Process()
    alive = set()
    for child in me.children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                alive.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return alive - _helper_pids()


@pytest.fixture(autouse=True)
def no_leaks(request):
    shm_before, kids_before = shm_entries(), children()
    yield
    deadline = time.monotonic() + 10.0
    while True:
        gc.collect()
        shm_left = shm_entries() - shm_before
        kids_left = children() - kids_before
        if not shm_left and not kids_left:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    # Clean up by name and pid, so the next test is judged on its own.
    for name in shm_left:
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except FileNotFoundError:
            pass
    for pid in kids_left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    pytest.fail(f"test left behind: blocks {sorted(shm_left)}, "
                f"processes {sorted(kids_left)}", pytrace=False)


def run_python(code: str, *, timeout: float = 120, file: str | None = None,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter: as a script file, or with ``-c``
    (no ``__main__.__file__``, as in a notebook)."""
    if file is not None:
        with open(file, "w") as f:
            f.write(code)
        proc = subprocess.run([sys.executable, file], capture_output=True,
                              text=True, timeout=timeout)
    else:
        proc = subprocess.run([sys.executable, "-c", code],
                              capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"child exited with {proc.returncode}\nstdout:\n{proc.stdout}\n"
            f"stderr:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def engine():
    """One engine shared by tests that only need a working pool."""
    import shmarray
    with shmarray.Engine(workers=2) as eng:
        yield eng
