"""``shmarray gc`` and ``blocks.collect_orphans``: liveness, never age, decides.

A block may go only when no process holds its lock and its creator (the
pid in its name) is not a live process that started before the block was
made.  The live engines here run in child interpreters; the tests wait on
their pipes and pids, and their time limits only detect hangs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from shmarray import blocks

# A live engine making blocks as fast as it can while the test collects
# orphans of its pid in a tight loop.  Before the fix a block was named
# before it was locked, and `gc --min-age 0` unlinked it in between.
BUSY = textwrap.dedent("""
    import sys
    import shmarray
    from shmarray import blocks

    storage, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if path == "named-first":
        # What systems without O_TMPFILE do: name the block, then lock it.
        blocks.ShmStorage._unnamed = False
        blocks._O_TMPFILE = 0

    def fill(x):
        x[:] = 1.0

    failed = []
    with shmarray.Engine(workers=1, storage=storage) as eng:
        print("ready", flush=True)
        sys.stdin.readline()
        for i in range(n):
            try:
                x = eng.zeros(16)
                eng.map(fill, x)
                assert x.sum() == 16.0, x
            except Exception as exc:
                failed.append(f"{type(exc).__name__}: {exc}")
    print(len(failed), *failed[:3], sep="\\n", flush=True)
""")


@pytest.mark.parametrize(
    "where, path",
    [("shm", "unnamed"), ("dir", "unnamed"), ("shm", "named-first")],
    ids=["shm", "dir", "shm-named-first"],
)
def test_gc_in_a_tight_loop_never_removes_a_live_engines_blocks(where, path, storage_dir):
    storage = "shm" if where == "shm" else storage_dir
    directory = None if where == "shm" else storage_dir
    child = subprocess.Popen(
        [sys.executable, "-c", BUSY, storage, path, "800"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline() == "ready\n", child.stderr.read()
        child.stdin.write("go\n")
        child.stdin.flush()
        removed = []
        scans = 0
        deadline = time.monotonic() + 240  # a hang detector: it takes seconds
        while child.poll() is None and time.monotonic() < deadline:
            removed += blocks.collect_orphans(min_age=0, directory=directory, pids=[child.pid])
            scans += 1
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err
    assert scans > 10  # the loop did run beside the engine
    assert removed == [], [b.name for b in removed]
    assert out.splitlines()[0] == "0", out  # no map failed
    assert err == ""


HOLD = textwrap.dedent("""
    import sys
    from shmarray import blocks

    storage = blocks.storage_for(sys.argv[1])
    name, mm = storage.create(4096)   # no engine, so no watchdog
    print(name, flush=True)
    sys.stdin.read()                  # until killed
""")


@pytest.mark.breaks_things
@pytest.mark.parametrize("where", ["shm", "dir"])
def test_gc_removes_the_block_of_a_creator_killed_with_sigkill(where, storage_dir):
    storage = "shm" if where == "shm" else storage_dir
    directory = None if where == "shm" else storage_dir
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, storage],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    name = child.stdout.readline().strip()
    try:
        assert blocks.owner_of(name) == child.pid
        info = {b.name: b for b in blocks.scan(directory, pids=[child.pid])}[name]
        assert info.owner_alive is True
        assert blocks.collect_orphans(min_age=0, directory=directory, pids=[child.pid]) == []
        child.kill()
        assert child.wait(60) == -signal.SIGKILL  # reaped: no zombie stands in for it
        info = {b.name: b for b in blocks.scan(directory, pids=[child.pid])}[name]
        assert info.owner_alive is False
        # --min-age is an extra filter for dead owners' blocks ...
        assert blocks.collect_orphans(min_age=3600, directory=directory, pids=[child.pid]) == []
        # ... and liveness decides the rest.
        removed = blocks.collect_orphans(min_age=0, directory=directory, pids=[child.pid])
        assert [b.name for b in removed] == [name]
        assert not blocks.exists(name)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        blocks.unlink(name)


def _unlocked(directory: str, pid: int) -> str:
    """A block file named for ``pid`` that nobody locks: what a block looks
    like between being named and being locked where there is no O_TMPFILE,
    or after its creator died."""
    path = os.path.join(directory, blocks.new_name(pid)[1:])
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.ftruncate(fd, 4096)
    os.close(fd)
    return path


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(60)  # reaped: the pid names no process now
    return child.pid


def test_ls_and_gc_agree_on_unlocked_blocks(storage_dir):
    live = _unlocked(storage_dir, os.getpid())  # its creator (this process) lives
    dead = _unlocked(storage_dir, _dead_pid())
    try:
        found = {b.name: b.owner_alive for b in blocks.scan(storage_dir)}
        assert found == {live: True, dead: False}

        def shmarray(*args: str) -> str:
            proc = subprocess.run(
                [sys.executable, "-m", "shmarray", *args, "--dir", storage_dir],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert proc.returncode == 0 and proc.stderr == "", proc.stderr
            return proc.stdout

        rows = {line.split()[0]: line.split()[-1] for line in shmarray("ls").splitlines()[1:]}
        assert rows == {live: "alive", dead: "dead"}
        out = shmarray("gc", "--min-age", "0")
        assert f"unlinked {dead}" in out and "1 block(s) removed" in out
        assert os.path.exists(live) and not os.path.exists(dead)
    finally:
        for path in (live, dead):
            blocks.unlink(path)


def test_a_creator_is_alive_only_if_it_started_before_the_block():
    me = os.getpid()
    assert blocks.creator_alive(me, time.time())
    # A block made long before this process started: the pid was reused.
    assert not blocks.creator_alive(me, blocks.process_start_time(me) - 3600)
    assert not blocks.creator_alive(_dead_pid(), time.time())
    # An exited creator not yet reaped (a zombie) holds nothing.
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    made = time.time()
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, left unreaped
    try:
        assert not blocks.creator_alive(child.pid, made)
    finally:
        child.wait()
