"""Blocks: names, permissions, reservation, and the ls/gc scan."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from numba import njit

import shmarray
from conftest import run_python, shm_entries
from shmarray import blocks

SHM = blocks.SHM_DIR


def test_names_are_short_tagged_and_unguessable():
    names = {blocks.new_name() for _ in range(10_000)}
    assert len(names) == 10_000
    for name in list(names)[:100]:
        assert len(name) <= 30
        assert blocks.owner_of(name) == os.getpid()
        token = name.rsplit("-", 1)[1]
        assert len(token) == 16 and int(token, 16) >= 0  # 64 random bits
    assert len(blocks.new_name(4_194_304)) <= 30  # Linux pid_max


def test_blocks_are_created_0600_and_reserved(engine):
    free_before = blocks.free_space()[0]
    x = engine.empty(64 * 2**20, np.uint8)  # 64 MiB, never touched
    name = engine.blocks[-1].name
    st = os.stat(f"{SHM}{name}")
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()
    # posix_fallocate took the pages now: free space dropped by the size
    assert free_before - blocks.free_space()[0] >= 60 * 2**20
    del x


def test_request_larger_than_free_space_is_a_memory_error_at_once(engine):
    free = blocks.free_space()[0]
    before = shm_entries()
    with pytest.raises(MemoryError) as info:
        engine.empty(free + 2**30, np.uint8)
    err = info.value
    assert isinstance(err, shmarray.SharedMemoryFullError)
    assert err.requested == free + 2**30 and err.path == SHM
    assert "--shm-size" in str(err) and "free of" in str(err)
    assert shm_entries() == before
    y = engine.zeros(10)  # still usable
    assert not y.any()


def test_posix_fallocate_failure_leaves_no_block(engine, monkeypatch):
    # The statvfs check can pass while the reservation fails (another
    # process took the space in between): the half-made block must go.
    monkeypatch.setattr(blocks, "free_space", lambda: None)
    free = os.statvfs(SHM).f_bavail * os.statvfs(SHM).f_frsize
    before = shm_entries()
    with pytest.raises(shmarray.SharedMemoryFullError, match="free of"):
        engine.empty(free + 2**30, np.uint8)
    assert shm_entries() == before


def test_scan_and_gc_touch_only_shmarray_blocks_of_dead_owners():
    # A block whose owner died with no safety net at all (not even the
    # watchdog, which an engine would have started): made directly.
    code = textwrap.dedent("""
        import os
        from shmarray import blocks
        name, mm = blocks.create(4096)
        print(name, flush=True)
        os._exit(0)
    """)
    proc = run_python(code)
    orphan = proc.stdout.split()[0]
    foreign = "psm_not_ours_" + os.urandom(4).hex()
    fd = os.open(f"{SHM}/{foreign}", os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
    try:
        with shmarray.Engine(workers=1) as eng:
            mine = eng.zeros(10)
            my_name = eng.blocks[0].name
            found = {b.name: b for b in blocks.scan()}
            assert found[orphan].owner_alive is False
            assert found[my_name].owner_alive is True
            assert "/" + foreign not in found

            ls = subprocess.run(
                [sys.executable, "-m", "shmarray", "ls"],
                capture_output=True,
                text=True,
                check=True,
            )
            assert orphan in ls.stdout and my_name in ls.stdout
            # --pid: the dead creator's blocks only (the tests never clean
            # another program's orphans).
            only = ["--pid", str(blocks.owner_of(orphan))]
            ls = subprocess.run(
                [sys.executable, "-m", "shmarray", "ls", *only],
                capture_output=True,
                text=True,
                check=True,
            )
            assert orphan in ls.stdout and "dead" in ls.stdout and my_name not in ls.stdout
            gc = subprocess.run(
                [sys.executable, "-m", "shmarray", "gc", "--min-age", "0", *only],
                capture_output=True,
                text=True,
                check=True,
            )
            assert f"unlinked {orphan}" in gc.stdout and "1 block(s) removed" in gc.stdout
            assert gc.stderr == ""
            left = shm_entries()
            assert orphan.lstrip("/") not in left
            assert my_name.lstrip("/") in left
            assert os.path.exists(f"{SHM}/{foreign}")  # another program's: untouched
            del mine
    finally:
        os.unlink(f"{SHM}/{foreign}")
        blocks.unlink(orphan)


HOLDER = textwrap.dedent("""
    import fcntl, os, sys, time
    from shmarray import blocks
    # A block whose name claims a pid that is dead here, held by a live
    # process: what another pid namespace sharing /dev/shm looks like.
    name = f"/sha-{sys.argv[1]}-{os.urandom(8).hex()}"
    import _posixshmem
    fd = _posixshmem.shm_open(name, os.O_CREAT | os.O_RDWR, mode=0o600)
    os.ftruncate(fd, 4096)
    fcntl.flock(fd, fcntl.LOCK_SH)
    print(name, flush=True)
    sys.stdin.read()              # hold the lock until told to go
""")


def test_gc_keeps_a_block_whose_pid_looks_dead_but_whose_owner_lives():
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, dead],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    name = holder.stdout.readline().strip()
    try:
        assert blocks.owner_of(name) == int(dead)
        info = {b.name: b for b in blocks.scan()}[name]
        assert info.owner_alive is True
        gc = subprocess.run(
            [sys.executable, "-m", "shmarray", "gc", "--min-age", "0", "--pid", dead],
            capture_output=True,
            text=True,
            check=True,
        )
        assert name not in gc.stdout
        assert name.lstrip("/") in shm_entries()
        holder.stdin.close()  # the owner exits: now it is dead
        holder.wait(30)
        assert {b.name: b for b in blocks.scan()}[name].owner_alive is False
        gc = subprocess.run(
            [sys.executable, "-m", "shmarray", "gc", "--min-age", "0", "--pid", dead],
            capture_output=True,
            text=True,
            check=True,
        )
        assert f"unlinked {name}" in gc.stdout
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        blocks.unlink(name)


def test_gc_leaves_young_blocks_alone():
    name, mm = blocks.create(4096)
    assert {b.name: b for b in blocks.scan()}[name].owner_alive is True
    del mm  # unmapped: nobody holds it now
    try:
        assert {b.name: b for b in blocks.scan()}[name].owner_alive is False
        mine = [os.getpid()]  # another program's orphans are not ours to clean
        assert name not in [b.name for b in blocks.collect_orphans(min_age=60, pids=mine)]
        assert name in [b.name for b in blocks.collect_orphans(min_age=0, pids=mine)]
    finally:
        blocks.unlink(name)


def test_a_live_block_holds_one_descriptor_in_the_coordinator(engine):
    # mmap keeps a duplicate descriptor, which holds the block's lock (the
    # proof of life for `shmarray gc`) on every Python version.
    import psutil

    me = psutil.Process()
    before = me.num_fds()
    arrays = [engine.zeros(10) for _ in range(20)]
    assert me.num_fds() - before == 20
    del arrays


def test_workers_keep_no_descriptor_per_block_from_313(engine):
    # Workers map with trackfd=False where Python has it (3.13+): the branch
    # blocks.py picks at import.  This checks whichever one runs.
    import psutil

    worker = psutil.Process(engine.worker_pids[0])

    @njit
    def touch(x):
        x[0] = 1.0

    arrays = [engine.zeros(10) for _ in range(20)]
    engine.map(touch, arrays[0], chunks=1)
    before = worker.num_fds()
    for a in arrays[1:]:
        engine.map(touch, a, chunks=1)
    grown = worker.num_fds() - before
    assert grown == (0 if sys.version_info >= (3, 13) else 19)
    del arrays


def _block_mappings(pid: int) -> int:
    """How many of process ``pid``'s mappings are shmarray blocks, on any
    storage (a /dev/shm or directory ``sha-`` name, or a shmarray memfd)."""
    import psutil

    paths = [m.path for m in psutil.Process(pid).memory_maps(grouped=False)]
    return sum(os.path.basename(p).startswith(("sha-", "memfd:shmarray-")) for p in paths)


def _descriptors(pid: int) -> dict[str, str]:
    """What process ``pid``'s descriptors point at, for a failure message."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return out


def test_a_freed_block_is_unmapped_everywhere_when_the_next_map_returns(engines):
    # The Release rides with the next map's ring; every worker handles it
    # before running that map and keeps no reference of its own (a stray
    # one kept the mapping, and its descriptor, alive for a while).
    @njit
    def touch(x):
        x[0] = 1.0

    import psutil

    n = engines.workers
    x = engines.zeros(n)
    workers = [psutil.Process(p) for p in engines.worker_pids]
    before = None
    for round in range(5):
        y = engines.zeros((n, 4096))
        engines.map(touch, y, chunks=n)  # every worker maps it
        if before is not None:
            assert [_block_mappings(w.pid) for w in workers] == [b[0] + 1 for b in before]
        del y
        engines.map(touch, x, chunks=n)
        now = [(_block_mappings(w.pid), w.num_fds()) for w in workers]
        if round < 2:
            # The first round compiles each worker's compiled path for
            # both argument types, after its reply (numba may hold a file
            # open meanwhile); the rounds after it compile nothing.
            before = now
        assert now == before, (round, [_descriptors(w.pid) for w in workers])
