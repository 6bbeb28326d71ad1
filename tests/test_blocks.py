"""Blocks: names, permissions, reservation, and the ls/gc scan."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import shmarray
from shmarray import blocks

from conftest import run_python, shm_entries

SHM = blocks.SHM_DIR


def test_names_are_short_tagged_and_unguessable():
    names = {blocks.new_name() for _ in range(10_000)}
    assert len(names) == 10_000
    for name in list(names)[:100]:
        assert len(name) <= 30
        assert blocks.owner_of(name) == os.getpid()
        token = name.rsplit("-", 1)[1]
        assert len(token) == 16 and int(token, 16) >= 0     # 64 random bits
    assert len(blocks.new_name(4_194_304)) <= 30            # Linux pid_max


def test_blocks_are_created_0600_and_reserved(engine):
    free_before = blocks.free_space()[0]
    x = engine.empty(64 * 2**20, np.uint8)      # 64 MiB, never touched
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
    y = engine.zeros(10)                      # still usable
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

            ls = subprocess.run([sys.executable, "-m", "shmarray", "ls"],
                                capture_output=True, text=True, check=True)
            assert orphan in ls.stdout and "dead" in ls.stdout
            gc = subprocess.run([sys.executable, "-m", "shmarray", "gc"],
                                capture_output=True, text=True, check=True)
            assert f"unlinked {orphan}" in gc.stdout
            assert gc.stderr == ""
            left = shm_entries()
            assert orphan.lstrip("/") not in left
            assert my_name.lstrip("/") in left and foreign in left
            del mine
    finally:
        os.unlink(f"{SHM}/{foreign}")
        blocks.unlink(orphan)


def test_owner_alive_rejects_a_reused_pid():
    # Our own pid, but "created" before this process started: not the owner.
    assert blocks.owner_alive(os.getpid(), created=1e9) is False
    assert blocks.owner_alive(os.getpid(), created=2e9) is True


def test_live_blocks_hold_a_file_descriptor_only_before_313(engine):
    # mmap keeps a duplicate descriptor unless trackfd=False (3.13+): the
    # branch blocks.py picks at import.  This checks whichever one runs.
    import psutil
    me = psutil.Process()
    before = me.num_fds()
    arrays = [engine.zeros(10) for _ in range(20)]
    grown = me.num_fds() - before
    assert grown == (0 if sys.version_info >= (3, 13) else 20)
    del arrays
