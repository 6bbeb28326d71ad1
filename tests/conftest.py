"""Every test runs under a leak check: no shmarray block left in /dev/shm by
the test's own processes, and no child process left alive.

The check judges only what this test session made.  A shmarray block name
carries its creator's pid (``/sha-<pid>-<random>``), and the session
records the pid of every process it starts (``subprocess.Popen``,
``os.fork``) besides its own and the descendants it can see, so a block of
another program, or another user's shmarray, is never judged, never
listed and never deleted.
"""

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

# Every engine fixture runs at 2 workers and at more workers than this
# machine's cores (3 and 5 on 2 cores): bugs of N workers hide at 2.  The
# test modules' kernels are compiled with cache=True, so the workers of the
# 3- and 5-worker engines load what the first engine's workers compiled
# rather than each compiling every kernel again.
WORKER_COUNTS = (2, 3, 5)

# -- the processes this session started ---------------------------------------------

OURS: set[int] = {os.getpid()}


class _RecordingPopen(subprocess.Popen):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        OURS.add(self.pid)


subprocess.Popen = _RecordingPopen      # child interpreters, the fork server
_real_fork = os.fork


def _recording_fork() -> int:
    pid = _real_fork()
    if pid:
        OURS.add(pid)
    return pid


os.fork = _recording_fork               # os.fork in tests, multiprocessing's fork


def _note_descendants() -> None:
    try:
        for child in psutil.Process().children(recursive=True):
            OURS.add(child.pid)
    except psutil.Error:
        pass


def shm_entries() -> set[str]:
    """The shmarray blocks in /dev/shm made by this session's processes
    (names without the leading slash)."""
    if not SHM_DIR:
        return set()
    _note_descendants()
    out = set()
    for name in os.listdir(SHM_DIR):
        pid = blocks.owner_of(name)
        if pid is not None and pid in OURS:
            out.add(name)
    return out


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
        OURS.add(child.pid)
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
    # Clean up what is ours, by name and by pid, so the next test is
    # judged on its own.  Nothing else is touched.
    for name in shm_left:
        blocks.unlink("/" + name)
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
    """One 2-worker engine shared by tests that only need a working pool."""
    import shmarray
    with shmarray.Engine(workers=2) as eng:
        yield eng


@pytest.fixture(scope="module", params=WORKER_COUNTS, ids=lambda n: f"{n}w")
def engines(request):
    """An engine at each of WORKER_COUNTS, one per module and count: the
    suites that must hold at any worker count take this one."""
    import shmarray
    with shmarray.Engine(workers=request.param) as eng:
        yield eng
