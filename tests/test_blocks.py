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
from shmarray import blocks, cgroups, options

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
    blocks.settle()  # earlier tests' dropped blocks are unlinked by now
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
    monkeypatch.setattr("shmarray.storage.shm.free_space", lambda: None)
    free = os.statvfs(SHM).f_bavail * os.statvfs(SHM).f_frsize
    blocks.settle()
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


def test_gc_keeps_a_block_whose_creator_lives_whatever_its_age_or_lock():
    # Nobody holds its lock any more (unmapped), but its creator, this
    # process, is alive: it stays, even with --min-age 0.  The blocks of
    # dead creators are tested in test_gc_liveness.py.
    name, mm = blocks.create(4096)
    assert {b.name: b for b in blocks.scan()}[name].owner_alive is True
    del mm
    try:
        assert blocks.lock_held(name) is False
        assert {b.name: b for b in blocks.scan()}[name].owner_alive is True
        mine = [os.getpid()]  # another program's orphans are not ours to clean
        assert name not in [b.name for b in blocks.collect_orphans(min_age=0, pids=mine)]
        assert blocks.exists(name)
    finally:
        blocks.unlink(name)


def test_blocks_are_made_without_a_name_where_linux_allows(storage_dir):
    # O_TMPFILE: made without a name, locked, reserved, then linked, so
    # `shmarray gc` never sees one unlocked (test_gc_liveness.py races it).
    if not blocks._O_TMPFILE:
        pytest.skip("no O_TMPFILE here: blocks are named, then locked")
    for storage in (blocks.ShmStorage(), blocks.DirStorage(storage_dir)):
        name, mm = storage.create(4096)
        try:
            assert storage._unnamed, storage  # this filesystem took O_TMPFILE
            assert blocks.lock_held(name) is True
            path = name if blocks.kind_of(name) == "file" else SHM + name
            st = os.stat(path)
            assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == 4096
            assert st.st_nlink == 1
        finally:
            storage.unlink(name)
            del mm


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


def test_attaching_a_block_whose_name_is_gone_says_why(tmp_path):
    # A storage directory removed while its engine ran: replacement workers
    # could not attach its blocks, and said only "No such file or directory".
    directory = tmp_path / "storage"
    directory.mkdir()
    storage = blocks.DirStorage(str(directory))
    name, mm = storage.create(4096)
    os.unlink(name)
    directory.rmdir()
    with pytest.raises(FileNotFoundError, match="its storage directory .* no longer exists"):
        blocks.attach(name)
    with pytest.raises(FileNotFoundError, match="no longer exists .*removed while"):
        storage.create(4096)
    name, mm = blocks.create(4096)
    blocks.unlink(name)
    with pytest.raises(FileNotFoundError, match="is gone: it was unlinked from /dev/shm"):
        blocks.attach(name)


# -- a block's death and Ctrl-C ------------------------------------------------------

# Arrays dropped while another process sends SIGINT as fast as it can (a
# thread of ours could not: it needs the GIL, which the dropping thread
# holds).  The handler raises KeyboardInterrupt only while a drop is under
# way (armed), so every one lands inside the `try` below, or inside whatever
# runs when the array dies.  Before the fix that was a weakref.finalize in
# Python: the interrupt was printed ("Exception ignored in: <finalize
# object>") and lost, and so were the unlink or the Release.
CTRL_C_WHILE_DROPPING = textwrap.dedent("""
    import os, signal, subprocess, sys
    import shmarray
    from shmarray import blocks

    armed = False
    caught = received = 0

    def handler(signum, frame):
        global armed, received
        received += 1
        if armed:
            armed = False
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    storm = (
        "import os, signal, sys, time\\n"
        "while True:\\n"
        "    os.kill(int(sys.argv[1]), signal.SIGINT)\\n"
        "    time.sleep(0.0002)\\n"
    )
    with shmarray.Engine(workers=1, storage=sys.argv[1]) as eng:
        sender = subprocess.Popen([sys.executable, "-c", storm, str(os.getpid())])
        try:
            while not received:  # the storm has begun
                signal.pause()
            dropped = []
            for _ in range(20):
                arrays = [eng.zeros(4) for _ in range(100)]
                dropped += [b.name for b in eng.blocks]
                while arrays:
                    try:
                        armed = True
                        arrays.pop()
                        for _ in range(300):  # work between drops, where most land
                            pass
                        armed = False
                    except KeyboardInterrupt:
                        caught += 1
            armed = False
        finally:
            sender.kill()
            sender.wait()
        left = [b.name for b in eng.blocks]         # the engine's own view
        named = [n for n in dropped if blocks.exists(n)]
        print(len(dropped), caught, len(left), len(named), flush=True)
""")


@pytest.mark.parametrize("storage", ["shm", "memfd", "dir"])
def test_a_ctrl_c_while_arrays_die_loses_no_unlink_and_no_release(storage, storage_dir):
    if storage == "memfd" and not blocks.HAVE_MEMFD:
        pytest.skip("memfd_create and /proc: Linux")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            CTRL_C_WHILE_DROPPING,
            storage_dir if storage == "dir" else storage,
        ],
        capture_output=True,
        text=True,
        timeout=300,  # a hang detector: it takes seconds
    )
    assert proc.returncode == 0, proc.stderr
    dropped, caught, left, named = map(int, proc.stdout.split())
    assert dropped == 2000 and caught > 0  # the storm did interrupt drops
    # Before close: every dropped block is out of the engine's index and
    # unlinked, and no interrupt was swallowed on the way.
    assert (left, named) == (0, 0)
    assert "Exception ignored" not in proc.stderr
    assert proc.stderr == ""


# -- out of descriptors ---------------------------------------------------------------

DESCRIPTORS = textwrap.dedent("""
    import errno, resource, sys
    from shmarray import blocks

    soft, hard = int(sys.argv[1]), int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    print(blocks.out_of_descriptors(OSError(errno.EMFILE, "Too many open files"), "map a block"))
    if sys.argv[3] == "exhaust":
        storage, held = blocks.storage_for("memfd"), []
        try:
            while True:
                held.append(storage.create(8))
        except OSError as exc:
            print(exc)
""")


def _out_of_descriptors(soft: int, hard: int, exhaust: bool = False) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", DESCRIPTORS, str(soft), str(hard), "exhaust" if exhaust else "-"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return proc.stdout.splitlines()


def test_out_of_descriptors_at_the_hard_limit_says_what_can_be_done():
    # soft == hard: `ulimit -n 1024` cannot help, and the message said so.
    messages = _out_of_descriptors(1024, 1024, exhaust=blocks.HAVE_MEMFD)
    for message in messages:
        assert "ulimit -n 1024`" not in message and "(1024, 1024)" not in message
        assert "limit (ulimit -n) is 1024, which is also the hard limit" in message
        assert "only root can raise it" in message and "limits.conf" in message
        assert "fewer live arrays" in message and 'storage="memfd"' in message
    if blocks.HAVE_MEMFD:
        assert messages[1].startswith("[Errno 24] cannot "), messages  # create or map


def test_out_of_descriptors_below_the_hard_limit_says_how_to_raise_it():
    (message,) = _out_of_descriptors(256, 1024)
    assert "limit (ulimit -n) is 256, the hard limit is 1024" in message
    assert "`ulimit -n 1024`" in message
    assert "resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))" in message


# -- cgroups: CPUs and memory, read in one place -----------------------------------------


def _fake_cgroups(tmp_path, memberships: str, mounts: dict[str, tuple[str, str, str]], files):
    """A fake /proc/self (its cgroup and mountinfo) whose mounts lead into
    tmp_path: ``mounts`` maps a mount point under tmp_path to (root,
    fstype, super options); ``files`` maps paths under tmp_path to text."""
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(memberships)
    lines = [
        f"{30 + i} 1 0:{30 + i} {root} {tmp_path / point} rw - {fstype} {fstype} {opts}"
        for i, (point, (root, fstype, opts)) in enumerate(mounts.items())
    ]
    (proc / "mountinfo").write_text("\n".join(lines) + "\n")
    for path, text in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    return str(proc)


def test_cgroup_v2_limits_are_read_at_every_level_up_to_the_root(tmp_path):

    proc = _fake_cgroups(
        tmp_path,
        "0::/jobs/run\n",
        {"cg": ("/", "cgroup2", "rw")},
        {
            "cg/jobs/run/cpu.max": "max 100000\n",  # the leaf: no quota
            "cg/jobs/run/memory.max": "max\n",
            "cg/jobs/run/memory.current": "100\n",
            "cg/jobs/cpu.max": "150000 100000\n",  # its parent: 1.5 CPUs
            "cg/jobs/memory.max": "1000\n",
            "cg/jobs/memory.current": "300\n",
        },
    )
    assert cgroups.cpu_quota(proc) == 1.5
    assert cgroups.memory_left(proc) == 700
    assert options.cgroup_cpus(proc) == 1.5


def test_cgroup_v1_limits_and_the_tightest_of_both_versions(tmp_path):

    proc = _fake_cgroups(
        tmp_path,
        "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n",
        {
            # A container without its own cgroup namespace: the mount
            # shows its group as the root.
            "cpu": ("/docker/abc", "cgroup", "rw,cpu,cpuacct"),
            "memory": ("/docker/abc", "cgroup", "rw,memory"),
            "unified": ("/", "cgroup2", "rw"),
        },
        {
            "cpu/cpu.cfs_quota_us": "250000\n",
            "cpu/cpu.cfs_period_us": "100000\n",
            "memory/memory.limit_in_bytes": "2000\n",
            "memory/memory.usage_in_bytes": "500\n",
            "unified/memory.max": "1200\n",  # tighter, in the other version
            "unified/memory.current": "0\n",
        },
    )
    assert cgroups.cpu_quota(proc) == 2.5
    assert cgroups.memory_left(proc) == 1200
    (tmp_path / "unified/memory.max").write_text("max\n")
    assert cgroups.memory_left(proc) == 1500
    (tmp_path / "memory/memory.limit_in_bytes").write_text(f"{2**63 - 4096}\n")  # v1's "none"
    assert cgroups.memory_left(proc) is None


def test_cgroups_that_cannot_be_read_mean_no_limit(tmp_path):

    assert cgroups.cpu_quota(str(tmp_path / "nothing")) is None
    assert cgroups.memory_left(str(tmp_path / "nothing")) is None
    proc = _fake_cgroups(
        tmp_path,
        "0::/a\n",
        {"cg": ("/b", "cgroup2", "rw")},  # a mount that does not show our group
        {"cg/cpu.max": "100000 100000\n"},
    )
    assert cgroups.cpu_quota(proc) is None


def test_usable_cpus_and_memory_available_honour_the_cgroups(monkeypatch):

    monkeypatch.setattr(cgroups, "cpu_quota", lambda proc="/proc/self": 1.2)
    assert options.usable_cpus() == min(2, len(os.sched_getaffinity(0)))
    monkeypatch.setattr(cgroups, "cpu_quota", lambda proc="/proc/self": 0.5)
    assert options.usable_cpus() == 1
    monkeypatch.setattr(cgroups, "memory_left", lambda proc="/proc/self": 12345)
    assert blocks.memory_available()[0] == 12345


def test_an_array_that_outlives_its_engines_table_leaves_the_reaper_running():
    # The engine, and with it its block table, dies while an array of it
    # lives; the array's death then wakes the reaper with a weak reference
    # to the dead table that nothing had hashed, and putting it in a set
    # killed the thread ("TypeError: weak object has gone away", on
    # stderr; seen under load in test_storage).
    code = textwrap.dedent("""
        import gc, time, weakref
        import shmarray
        from shmarray import blocktable

        eng = shmarray.Engine(workers=1)
        x = eng.zeros(10)
        # The block's wake-up, held as the reaper's queue holds it once the
        # mapping's death put it there: here the table dies first.
        (wake,) = [w for _, _, w in eng._dispatcher.table._pending.values()]
        table = weakref.ref(eng._dispatcher.table)
        eng.close()
        del eng
        gc.collect()
        print("table gone:", table() is None)
        del x  # its mapping dies: the reaper is woken for the dead table
        deadline = time.monotonic() + 5.0  # a hang detector
        while not blocktable._REAPER.wake.empty() and time.monotonic() < deadline:
            time.sleep(0.001)
        thread = blocktable._REAPER._thread
        thread.join(1.0)  # returns at once if it died; an observation window
        print("reaper alive:", thread.is_alive())
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert proc.stdout.splitlines() == ["table gone: True", "reaper alive: True"], (
        proc.stdout + proc.stderr
    )
    assert proc.stderr == ""
