"""Every test runs under a leak check: no shmarray block left in /dev/shm,
or in the session's storage directories, by the test's own processes, and
no child process left alive.

The check judges only what this test session made.  A shmarray block name
carries its creator's pid (``/sha-<pid>-<random>``, and the same file name
in a storage directory), and the session records the pid of every process
it starts (``subprocess.Popen``, ``os.fork``) besides its own and the
descendants it can see, so a block of another program, or another user's
shmarray, is never judged, never listed and never deleted.  File-backed
blocks are looked for only under :data:`STORAGE_ROOT`, a private directory
this session made; memfd blocks have no name and cannot outlive their
processes, so the process check covers them.
"""

from __future__ import annotations

import gc
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

from shmarray import blocks, launch

SHM_DIR = blocks.SHM_DIR

# A suite started in the background by a non-interactive shell (`make test
# &`) inherits SIGINT ignored, and so would every child interpreter the
# tests start: the tests of Ctrl-C would see nothing happen.  Here Ctrl-C
# raises KeyboardInterrupt, as at a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Every engine fixture runs at 2 workers and at more workers than this
# machine's cores (3 and 5 on 2 cores): bugs of N workers hide at 2.  The
# test modules' kernels are compiled with cache=True, so the workers of the
# 3- and 5-worker engines load what the first engine's workers compiled
# rather than each compiling every kernel again.
WORKER_COUNTS = (2, 3, 5)

# ... and each count on another storage, so every suite covers every storage
# without running three times: 2 workers on /dev/shm, 3 on memfd, 5 on
# files in a directory (under /tmp: a real filesystem where it is one).
# The directories are made in pytest_configure, by pytest's process only:
# workers import this module too (with a test module's kernels), and must
# create nothing.
STORAGE_ROOT = os.path.join(
    tempfile.gettempdir(), f"shmarray-tests-{os.getpid()}-{secrets.token_hex(8)}"
)
STORAGE_DIR = os.path.join(STORAGE_ROOT, "engines")
STORAGES = {2: "shm", 3: "memfd" if blocks.HAVE_MEMFD else "shm", 5: STORAGE_DIR}


def pytest_configure(config):
    os.mkdir(STORAGE_ROOT, 0o700)  # fails if anything is there: never shared
    os.mkdir(STORAGE_DIR, 0o700)


def storage_for(workers: int) -> str:
    """The storage the suites pair with ``workers`` (see STORAGES)."""
    return STORAGES.get(workers, "shm")


def engine_id(workers: int) -> str:
    """A test id naming the worker count and its storage: "3w-memfd"."""
    storage = storage_for(workers)
    return f"{workers}w-{'dir' if storage == STORAGE_DIR else storage}"


# -- the processes this session started ---------------------------------------------

OURS: set[int] = {os.getpid()}


class _RecordingPopen(subprocess.Popen):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        OURS.add(self.pid)


subprocess.Popen = _RecordingPopen  # child interpreters, the fork server
_real_fork = os.fork


def _recording_fork() -> int:
    pid = _real_fork()
    if pid:
        OURS.add(pid)
    return pid


os.fork = _recording_fork  # os.fork in tests, multiprocessing's fork


def _note_descendants() -> None:
    try:
        for child in psutil.Process().children(recursive=True):
            OURS.add(child.pid)
    except psutil.Error:
        pass


def shm_entries() -> set[str]:
    """The shmarray blocks in /dev/shm made by this session's processes
    (names without the leading slash).  This process's dead blocks are
    reaped first (their names leave a moment after their arrays die)."""
    if not SHM_DIR:
        return set()
    blocks.settle()
    _note_descendants()
    out = set()
    for name in os.listdir(SHM_DIR):
        pid = blocks.owner_of(name)
        if pid is not None and pid in OURS:
            out.add(name)
    return out


def dir_entries() -> set[str]:
    """The block files under STORAGE_ROOT made by this session's processes
    (absolute paths)."""
    blocks.settle()
    _note_descendants()
    out: set[str] = set()
    for here, _, files in os.walk(STORAGE_ROOT):
        for name in files:
            pid = blocks.owner_of(name)
            if pid is not None and pid in OURS:
                out.add(os.path.join(here, name))
    return out


def block_entries() -> set[str]:
    """shm_entries() and dir_entries() together."""
    return shm_entries() | dir_entries()


def gone(name: str) -> bool:
    """Whether block ``name`` (any storage; a /dev/shm name with or without
    its slash) can no longer be attached."""
    return not blocks.exists(name)


@pytest.fixture
def storage_dir():
    """A fresh directory for file-backed blocks, under STORAGE_ROOT (so the
    leak check judges what is made there); removed afterwards."""
    path = tempfile.mkdtemp(dir=STORAGE_ROOT)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def pytest_sessionfinish(session, exitstatus):
    """Remove STORAGE_ROOT: this session's private directory."""
    shutil.rmtree(STORAGE_ROOT, ignore_errors=True)


def _helper_pids() -> set[int]:
    """Long-lived helpers of this process, started once and shared: the
    shmarray fork server, and multiprocessing's fork server and resource
    tracker (which other libraries' pools start)."""
    pids = {
        launch.server_pid(),
        multiprocessing.forkserver._forkserver._forkserver_pid,
        multiprocessing.resource_tracker._resource_tracker._pid,
    }
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
    shm_before, kids_before = block_entries(), children()
    yield
    deadline = time.monotonic() + 10.0
    while True:
        gc.collect()
        shm_left = block_entries() - shm_before
        kids_left = children() - kids_before
        if not shm_left and not kids_left:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    # Clean up what is ours, by name and by pid, so the next test is
    # judged on its own.  Nothing else is touched.
    for name in shm_left:
        blocks.unlink(name if os.path.isabs(name) else "/" + name)
    for pid in kids_left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    pytest.fail(
        f"test left behind: blocks {sorted(shm_left)}, processes {sorted(kids_left)}",
        pytrace=False,
    )


def run_python(
    code: str, *, timeout: float = 120, file: str | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter: as a script file, or with ``-c``
    (no ``__main__.__file__``, as in a notebook)."""
    if file is not None:
        with open(file, "w") as f:
            f.write(code)
        proc = subprocess.run(
            [sys.executable, file], capture_output=True, text=True, timeout=timeout
        )
    else:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
        )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"child exited with {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


@pytest.fixture(scope="session")
def engine():
    """One 2-worker engine shared by tests that only need a working pool."""
    import shmarray

    with shmarray.Engine(workers=2) as eng:
        yield eng


@pytest.fixture(scope="module", params=WORKER_COUNTS, ids=engine_id)
def engines(request):
    """An engine at each of WORKER_COUNTS, one per module and count, each on
    its storage (STORAGES): the suites that must hold at any worker count
    and on any storage take this one."""
    import shmarray

    with shmarray.Engine(workers=request.param, storage=storage_for(request.param)) as eng:
        yield eng
