"""Where blocks live (``Engine(storage=...)``): /dev/shm, anonymous memory
(memfd) and files in a directory, with real kernels, real mounts and real
kills.

Mounts are made in a private mount namespace (``unshare -m``), which no
other process sees; a test that needs one is skipped, saying why, where
this user may not make one.
"""

from __future__ import annotations

import errno
import functools
import os
import select
import shlex
import signal
import stat
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest
from numba import njit

import shmarray
from conftest import STORAGE_DIR, gone, shm_entries
from shmarray import blocks
from shmarray.storage import hugepages

STORAGES = ["shm", "memfd", STORAGE_DIR]
IDS = ["shm", "memfd", "dir"]
needs_memfd = pytest.mark.skipif(not blocks.HAVE_MEMFD, reason="memfd_create and /proc: Linux")


@njit
def scale(out, inp, s):
    for i in range(out.shape[0]):
        out[i] = inp[i] * s


@njit
def smooth(out, inp):
    for i in range(1, inp.shape[0] - 1):
        out[i] = (inp[i - 1] + inp[i] + inp[i + 1]) / 3.0


@njit
def total(x):
    return x.sum()


# -- storage= and SHMARRAY_STORAGE ------------------------------------------------


@pytest.mark.parametrize(
    "value, exc, pattern",
    [
        (42, TypeError, "storage must be"),
        ("", ValueError, "Leave it unset"),
        ("/no/such/directory", ValueError, "does not exist. Create it first"),
        (__file__, ValueError, "is not a directory"),
    ],
)
def test_bad_storage_is_refused_before_anything_starts(value, exc, pattern):
    before = psutil.Process().children(recursive=True)
    with pytest.raises(exc, match=pattern):
        shmarray.Engine(workers=1, storage=value)
    assert psutil.Process().children(recursive=True) == before


def test_the_environment_variable_sets_the_storage_and_the_argument_wins(monkeypatch, storage_dir):
    monkeypatch.setenv("SHMARRAY_STORAGE", storage_dir)
    with shmarray.Engine(workers=1) as eng:
        assert eng.storage == storage_dir
        x = eng.zeros(10)
        assert os.path.dirname(eng.blocks[0].name) == storage_dir
        del x
    with shmarray.Engine(workers=1, storage="shm") as eng:
        assert eng.storage == "shm"
    monkeypatch.setenv("SHMARRAY_STORAGE", "/no/such/directory")
    with pytest.raises(ValueError, match="SHMARRAY_STORAGE must be"):
        shmarray.Engine(workers=1)


def test_a_relative_directory_is_made_absolute(monkeypatch, storage_dir):
    monkeypatch.chdir(os.path.dirname(storage_dir))
    from shmarray import options

    assert options.coerce_storage(os.path.basename(storage_dir)) == storage_dir
    import pathlib

    assert options.coerce_storage(pathlib.Path(storage_dir)) == storage_dir


# -- every feature on every storage -------------------------------------------------


def die_once(x, marker, lo):
    """Kills its own worker the first time it runs the chunk at row 0."""
    if lo == 0 and marker[0] == 0.0:
        marker[0] = 1.0
        os.kill(os.getpid(), signal.SIGKILL)
    x += 1.0


@pytest.mark.parametrize("storage", STORAGES, ids=IDS)
def test_every_feature_on_every_storage(storage):
    with shmarray.Engine(workers=2, storage=storage) as eng:
        n = 1000
        a = np.random.default_rng(1).random(n)
        x = eng.from_numpy(a)
        y = eng.zeros(n)
        eng.map(scale, y, x, args=(2.0,), timeout=60)  # map
        assert np.array_equal(y, a * 2.0)
        eng.map(smooth, y, x, halo=1, chunks=7, timeout=60)  # halo
        ref = np.zeros(n)
        smooth(ref, a)
        assert np.array_equal(y[1:-1], ref[1:-1])
        g, h = eng.from_numpy(a), eng.zeros(n)  # boundary
        eng.map(smooth, h, g, halo=1, boundary="wrap", timeout=60)
        padded = np.pad(a[1:-1], 1, mode="wrap")
        ref = np.zeros(n)
        smooth(ref, padded)
        assert np.array_equal(h[1:-1], ref[1:-1])
        u, v = eng.from_numpy(a), eng.from_numpy(a)  # iterate
        last = eng.iterate(smooth, v, u, steps=5, halo=1, timeout=60)
        p, q = a.copy(), a.copy()
        for _ in range(5):
            smooth(q, p)
            p, q = q, p
        assert np.array_equal(last, p)
        quarters = [(0, 250), (250, 500), (500, 750), (750, 1000)]
        assert eng.reduce(total, x, chunks=4) == sum(total(a[lo:hi]) for lo, hi in quarters)
        parts = dict(eng.imap(total, x, chunks=4))  # imap
        assert parts == {rows: total(a[slice(*rows)]) for rows in quarters}
        step = eng.prepare(scale, y, x, args=(3.0,))  # prepare
        step()
        assert np.array_equal(y, a * 3.0)
        marker, z = eng.zeros(1), eng.zeros(n)  # retries
        report = eng.map(
            die_once,
            z,
            args=(marker, shmarray.row_offset),
            chunks=2,
            retries=1,
            errors="collect",
            timeout=60,
        )
        assert report.ok and len(report.retried) == 1
        assert np.array_equal(z, np.ones(n))
        names = [b.name for b in eng.blocks]
        assert all(
            blocks.kind_of(nm) == {"shm": "shm", "memfd": "memfd"}.get(storage, "file")
            for nm in names
        )
        control = eng._dispatcher.pool._control_name
        assert blocks.kind_of(control) == blocks.kind_of(names[0])  # the control block too
        del x, y, g, h, u, v, last, p, q, step, marker, z
    assert all(gone(nm) for nm in names) and gone(control)


@pytest.mark.parametrize("storage", STORAGES, ids=IDS)
def test_dask_backend_takes_arrays_of_every_storage(storage):
    # shmarray.dask never attaches blocks by name: Dask ships block data,
    # so an engine's arrays of any storage are plain input to it.
    da = pytest.importorskip("dask.array")
    import shmarray.dask

    with shmarray.Engine(workers=2, storage=storage) as eng:
        a = np.random.default_rng(2).random(200)
        x = eng.from_numpy(a)
        out = shmarray.dask.map(smooth, eng.zeros(200), x, halo=1, chunks=3)
        got = out.compute(scheduler="threads")
        ref = np.zeros(200)
        smooth(ref, a)
        assert np.array_equal(got[1:-1], ref[1:-1])
        back = eng.from_numpy(da.from_array(a, chunks=50))
        assert np.array_equal(back, a)
        del x, back


# -- memfd ---------------------------------------------------------------------------


@needs_memfd
def test_memfd_blocks_have_no_name_in_dev_shm_and_close_with_the_engine():
    before = shm_entries()
    with shmarray.Engine(workers=2, storage="memfd") as eng:
        x = eng.from_numpy(np.arange(1000.0))
        eng.map(scale, x, x, args=(2.0,))
        names = [b.name for b in eng.blocks] + [eng._dispatcher.pool._control_name]
        assert all(n.startswith("memfd:") for n in names)
        assert all(blocks.owner_of(n) == os.getpid() for n in names)
        assert shm_entries() == before  # nothing in /dev/shm
        assert not any(gone(n) for n in names)
    assert all(gone(n) for n in names)
    assert x[10] == 20.0  # still readable


@needs_memfd
def test_a_memfd_name_whose_descriptor_was_reused_is_never_mapped():
    storage = blocks.MemfdStorage()
    old, mm_old = storage.create(4096)
    storage.unlink(old)  # closes the descriptor ...
    new, mm_new = storage.create(4096)  # ... which the next block may reuse
    try:
        with pytest.raises(FileNotFoundError, match="is gone"):
            blocks.attach(old)
        mm = blocks.attach(new)
        mm[:4] = b"abcd"
        assert mm_new[:4] == b"abcd"
        mm.close()
    finally:
        storage.unlink(new)


@needs_memfd
def test_a_memfd_block_is_released_when_its_last_array_dies():
    with shmarray.Engine(workers=2, storage="memfd") as eng:
        me = psutil.Process()
        x = eng.zeros(10)
        eng.map(scale, x, x, args=(1.0,))
        name = eng.blocks[-1].name
        y = eng.zeros(10)
        fds = me.num_fds()
        del x  # its descriptor closes now
        assert gone(name)
        assert me.num_fds() < fds
        eng.map(scale, y, y, args=(1.0,))  # and the workers unmap it
        del y


SMALL_SHM = textwrap.dedent("""
    import os, numpy as np, shmarray
    from numba import njit

    @njit
    def fill(x, v, offset):
        for i in range(x.shape[0]):
            x[i] = v + offset + i

    @njit
    def total(x):
        return x.sum()

    print("mount size:", os.statvfs("/dev/shm").f_blocks * os.statvfs("/dev/shm").f_frsize)
    n = 64 * 2**20                               # 512 MiB of float64
    with shmarray.Engine(workers=2, storage="shm") as eng:
        try:
            eng.empty(n)
        except shmarray.SharedMemoryFullError as exc:
            print("refused:", exc)
    with shmarray.Engine(workers=2, storage="memfd") as eng:
        x = eng.empty(n)
        eng.map(fill, x, args=(1.0, shmarray.row_offset), chunks=4, timeout=120)
        print("listing:", sorted(os.listdir("/dev/shm")))
        s = eng.reduce(total, x, timeout=120)
        print("ok:", x.nbytes, s == float(n * (n - 1) // 2 + n), x[0], x[-1] == n)
        del x
""")


@functools.cache
def private_mounts() -> str:
    """ "" if this user may mount a tmpfs in a private mount namespace; else
    why not."""
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {STORAGE_DIR}"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return (
            f"cannot mount a tmpfs in a private mount namespace here "
            f"(unshare -m + mount): {probe.stderr.strip() or probe.returncode}"
        )
    return ""


def run_with_tmpfs(code: str, mounts: dict[str, str], timeout: float = 300):
    """``code`` in a child interpreter in a private mount namespace, with a
    tmpfs of the given size (e.g. "64m") mounted at each path first."""
    reason = private_mounts()
    if reason:
        pytest.skip(reason)
    steps = [
        f"mount -t tmpfs -o size={size},mode=1777 tmpfs {shlex.quote(path)}"
        for path, size in mounts.items()
    ]
    script = " && ".join(steps + [f"exec {shlex.quote(sys.executable)} -c {shlex.quote(code)}"])
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=timeout
    )


@needs_memfd
@pytest.mark.breaks_things
def test_memfd_maps_512_mib_where_dev_shm_has_64():
    proc = run_with_tmpfs(SMALL_SHM, {"/dev/shm": "64m"})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "mount size: 67108864" in out  # the small mount took
    refused = out.split("refused:", 1)[1].splitlines()[0]
    assert "/dev/shm has" in refused and 'storage="memfd"' in refused
    assert "listing: []" in out  # not even the control block lives there
    assert "ok: 536870912 True 1.0 True" in out
    assert proc.stderr == ""


# -- huge pages -------------------------------------------------------------------

HUGE = textwrap.dedent("""
    import os, numpy as np, shmarray
    from numba import njit

    @njit
    def fill(out, first):
        for i in range(out.shape[0]):
            out[i, :] = first + i

    def pmd_kb(pid):
        # kB of /dev/shm files that process pid maps with huge pages (the
        # caller's mapping was made before its block had a name).
        total, inside = 0, False
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split()[0]
                if "-" in head and not head.endswith(":"):
                    inside = " /dev/shm/" in line
                elif inside and head == "ShmemPmdMapped:":
                    total += int(line.split()[1])
        return total

    with shmarray.Engine(workers=2, storage="shm") as eng:
        a = eng.zeros((1024, 1024))                  # 8 MiB: four huge pages
        eng.map(fill, a, args=(shmarray.row_offset,))
        want = np.repeat(np.arange(1024.0), 1024).reshape(1024, 1024)
        print("same:", bool(np.array_equal(a, want)))
        print("caller:", pmd_kb(os.getpid()) >= 4096)
        print("workers:", [pmd_kb(p) >= 2048 for p in eng.worker_pids])
        del a
""")


@pytest.mark.parametrize("huge", ["advise", None])
def test_blocks_get_huge_pages_where_their_tmpfs_gives_them(huge):
    # /dev/shm mounted with huge=advise (a private mount): the caller and
    # each worker map the block's pages 2 MiB at a time; mounted without
    # it, as most systems have it, they map none.
    options = "256m" + (f",huge={huge}" if huge else "")
    proc = run_with_tmpfs(HUGE, {"/dev/shm": options}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    given = huge is not None or hugepages.shmem_enabled() == "force"
    assert proc.stdout.splitlines() == [
        "same: True",
        f"caller: {given}",
        f"workers: {[given, given]}",
    ], proc.stdout + proc.stderr
    assert proc.stderr == ""


FULL_HUGE = textwrap.dedent("""
    import mmap, os
    from shmarray.storage import hugepages

    fd = os.open("/dev/shm/too-big", os.O_CREAT | os.O_RDWR, 0o600)
    os.ftruncate(fd, 8 << 20)                         # on a 4 MiB tmpfs
    mm = mmap.mmap(fd, 8 << 20)
    hugepages.advise(mm)
    try:
        print("populated:", hugepages.populate(mm))
    except OSError as exc:
        print("refused:", os.strerror(exc.errno))
""")


def test_a_block_populated_past_its_tmpfs_is_an_error_not_a_sigbus():
    # Where huge pages are given, a block is reserved through its mapping
    # (MADV_POPULATE_WRITE): no room is an OSError, which the storage turns
    # into SharedMemoryFullError, and never a SIGBUS on first touch.
    proc = run_with_tmpfs(FULL_HUGE, {"/dev/shm": "4m,huge=advise"}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    said = proc.stdout.strip()
    assert said in ("refused: No space left on device", "populated: False"), said


def test_info_says_whether_shared_memory_gets_huge_pages_and_how_to_give_them():
    proc = subprocess.run(
        [sys.executable, "-m", "shmarray", "info"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    try:
        with open("/sys/kernel/mm/transparent_hugepage/shmem_enabled") as f:
            setting = f.read().split("[")[1].split("]")[0]
    except OSError:
        assert "huge pages         : none for shared memory" in proc.stdout
        return
    line = next(x for x in lines if x.startswith("huge pages"))
    memfd = setting in ("always", "within_size", "advise", "force")
    assert f"memfd {'yes' if memfd else 'no'} (shmem_enabled={setting})" in line
    fix = "echo advise | sudo tee /sys/kernel/mm/transparent_hugepage/shmem_enabled"
    assert any(x.endswith(fix) for x in lines) == (not memfd)


# -- everything killed at once -----------------------------------------------------

HOLDER = textwrap.dedent("""
    import os, sys, numpy as np, shmarray
    from shmarray import launch
    from numba import njit

    @njit
    def fill(x, v):
        for i in range(x.shape[0]):
            x[i] = v

    eng = shmarray.Engine(workers=2, storage=sys.argv[1])
    x = eng.empty(int(sys.argv[2]) // 8)
    eng.map(fill, x, args=(1.0,), timeout=120)      # every worker maps it
    pool = eng._dispatcher.pool
    print("pids:", os.getpid(), *eng.worker_pids, pool.watchdog.child.pid,
          launch.server_pid(), flush=True)
    print("blocks:", *[b.name for b in eng.blocks], pool._control_name, flush=True)
    sys.stdin.read()                                 # until killed
""")


def shmem() -> int:
    """Shared memory the kernel holds (tmpfs, memfd, shm), in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Shmem in /proc/meminfo")


def exits(pids: list[int]):
    """Watch ``pids``, which must be alive now (the caller holds what keeps
    them so); returns ``wait(within)``: True once every one of them has
    exited (a zombie counts: it runs no more), False if one still runs
    after ``within`` seconds, a limit that only detects a hang.

    By pidfd, which turns readable when its process exits and cannot name
    another process that reuses the pid; without pidfds (Linux < 5.3), by
    psutil, a process that has vanished counting as exited."""
    fds: list[int] = []
    try:
        for pid in pids:
            try:
                fds.append(os.pidfd_open(pid))
            except ProcessLookupError:
                pass  # gone already
    except (AttributeError, OSError):
        for fd in fds:
            os.close(fd)
        procs = []
        for pid in pids:
            try:
                procs.append(psutil.Process(pid))  # its start time, taken now
            except psutil.NoSuchProcess:
                pass

        def ended(p: psutil.Process) -> bool:
            try:
                return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        return lambda within: poll(lambda: all(ended(p) for p in procs), within)

    def wait(within: float) -> bool:
        waiting = select.poll()
        for fd in fds:
            waiting.register(fd, select.POLLIN)
        left, deadline = set(fds), time.monotonic() + within
        try:
            while left:
                ms = (deadline - time.monotonic()) * 1000
                if ms <= 0:
                    return False
                for fd, _ in waiting.poll(ms):
                    waiting.unregister(fd)
                    left.discard(fd)
            return True
        finally:
            for fd in fds:
                os.close(fd)

    return wait


def poll(predicate, within: float) -> bool:
    """Poll for a state no event announces (a block gone, memory freed);
    ``within`` only detects a hang."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.mark.breaks_things
@pytest.mark.parametrize("storage", STORAGES, ids=IDS)
def test_everything_killed_at_once(storage):
    """SIGKILL of the coordinator, its watchdog, its fork server and its
    workers, all at once (stopped first, so none of them reacts): memfd
    leaves no shared memory behind; a named block stays, as the issue says,
    until `shmarray gc` removes it."""
    size = 512 * 2**20
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, storage, str(size)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pids = [int(p) for p in holder.stdout.readline().split()[1:]]
        names = holder.stdout.readline().split()[1:]
        assert len(pids) == 5 and names, holder.communicate(timeout=30)
        procs = [psutil.Process(p) for p in pids]  # exactly those, by start time
        exited = exits(pids)  # all alive: the holder waits on its stdin
        during = shmem()
        for p in procs:  # none reacts to the others' death
            p.send_signal(signal.SIGSTOP)
        for p in procs:
            p.send_signal(signal.SIGKILL)
        holder.wait(60)
        assert exited(60), "a process outlived its SIGKILL by 60 s"
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        for pipe in (holder.stdin, holder.stdout, holder.stderr):
            pipe.close()
    if storage == "memfd":
        # The kernel frees it with the last mapping: within moments.
        assert poll(lambda: during - shmem() >= 0.9 * size, 20), (during, shmem())
        assert all(gone(n) for n in names)
        return
    block = names[0]
    assert not gone(block)  # left behind: nobody was alive
    where = ["--pid", str(blocks.owner_of(block))]  # no other program's orphans
    if storage != "shm":
        where += ["--dir", storage]
    args = ["gc", "--min-age", "0", *where]
    ls = subprocess.run(
        [sys.executable, "-m", "shmarray", "ls", *args[3:]],
        capture_output=True,
        text=True,
        check=True,
    )
    assert block in ls.stdout and "dead" in ls.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "shmarray", *args], capture_output=True, text=True, check=True
    )
    assert f"unlinked {block}" in proc.stdout and proc.stderr == ""
    assert all(gone(n) for n in names)
    if storage == "shm":
        assert poll(lambda: during - shmem() >= 0.9 * size, 20), (during, shmem())


# -- files in a directory -----------------------------------------------------------


def test_directory_blocks_are_private_reserved_and_removed(storage_dir):
    old = os.umask(0)  # even with a permissive umask
    try:
        with shmarray.Engine(workers=2, storage=storage_dir) as eng:
            x = eng.empty(8 * 2**20, np.uint8)  # never touched
            eng.map(scale, x, x, args=(1,), timeout=60)
            name = eng.blocks[-1].name
            assert os.path.dirname(name) == storage_dir
            assert blocks.owner_of(name) == os.getpid()
            st = os.stat(name)
            assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()
            assert st.st_blocks * 512 >= 8 * 2**20  # reserved on the disk
            found = {b.name: b for b in blocks.scan(storage_dir)}
            assert found[name].owner_alive is True
            ls = subprocess.run(
                [sys.executable, "-m", "shmarray", "ls", "--dir", storage_dir],
                capture_output=True,
                text=True,
                check=True,
            )
            assert name in ls.stdout and "alive" in ls.stdout
            del x
            eng.zeros(1)
            assert gone(name)
    finally:
        os.umask(old)
    assert os.listdir(storage_dir) == []


def test_a_worker_maps_only_private_regular_files(storage_dir):
    name = os.path.join(storage_dir, blocks.new_name()[1:])
    with open(name, "wb") as f:
        f.write(b"\0" * 4096)
    os.chmod(name, 0o644)  # readable by others
    with pytest.raises(PermissionError, match="mode 0600"):
        blocks.attach(name)
    link = os.path.join(storage_dir, blocks.new_name()[1:])
    os.chmod(name, 0o600)
    os.symlink(name, link)
    with pytest.raises(OSError) as info:
        blocks.attach(link)  # never through a link
    assert info.value.errno == errno.ELOOP
    blocks.attach(name).close()


ORPHAN = textwrap.dedent("""
    import os, sys
    from shmarray import blocks
    name, mm = blocks.DirStorage(sys.argv[1]).create(4096)
    print(name, flush=True)
    os._exit(0)                    # no engine, no watchdog: an orphan
""")


def test_gc_dir_removes_only_orphans_of_shmarray(storage_dir):
    orphan = subprocess.run(
        [sys.executable, "-c", ORPHAN, storage_dir], capture_output=True, text=True, check=True
    ).stdout.strip()
    foreign = os.path.join(storage_dir, "sha-1-notours")  # not our name form
    lookalike = os.path.join(storage_dir, blocks.new_name(1)[1:] + ".bak")
    for path in (foreign, lookalike):
        open(path, "w").close()
    with shmarray.Engine(workers=1, storage=storage_dir) as eng:
        mine = eng.zeros(10)
        gc = subprocess.run(
            [sys.executable, "-m", "shmarray", "gc", "--min-age", "0", "--dir", storage_dir],
            capture_output=True,
            text=True,
            check=True,
        )
        assert f"unlinked {orphan}" in gc.stdout and "1 block(s) removed" in gc.stdout
        assert not os.path.exists(orphan)
        assert os.path.exists(eng.blocks[0].name)  # alive: kept
        assert os.path.exists(foreign) and os.path.exists(lookalike)
        del mine
    bad = subprocess.run(
        [sys.executable, "-m", "shmarray", "ls", "--dir", "/no/such/dir"],
        capture_output=True,
        text=True,
    )
    assert (
        bad.returncode != 0 and "not a directory" in bad.stderr and "Traceback" not in bad.stderr
    )


@pytest.mark.breaks_things
def test_the_watchdog_removes_directory_blocks_of_a_killed_coordinator(storage_dir):
    size = 1 << 20
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, storage_dir, str(size)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pids = [int(p) for p in holder.stdout.readline().split()[1:]]
        names = holder.stdout.readline().split()[1:]
        assert len(pids) == 5 and names, holder.communicate(timeout=30)
        assert all(os.path.dirname(n) == storage_dir for n in names)
        # The two workers and the watchdog, watched while the holder keeps
        # them alive (it waits on its stdin): one may exit as soon as the
        # coordinator is killed, and a vanished process has nothing to ask.
        exited = exits(pids[1:4])
        holder.kill()  # the coordinator alone
        holder.wait(60)
        # The watchdog unlinks the blocks, kills the workers, then exits:
        # once all three have exited, the blocks must be gone.
        assert exited(60), "the watchdog or a worker still runs 60 s after the coordinator died"
        assert [n for n in names if not gone(n)] == []
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        holder.stdout.close()
        holder.stderr.close()
        holder.stdin.close()


@pytest.mark.breaks_things
def test_a_full_disk_is_a_clear_error_and_never_a_sigbus(storage_dir):
    code = textwrap.dedent(f"""
        import os, numpy as np, shmarray
        from shmarray import blocks
        where = {storage_dir!r}
        with shmarray.Engine(workers=2, storage=where) as eng:
            try:
                eng.empty(32 * 2**20, np.uint8)           # 32 MiB on a 16 MiB disk
            except shmarray.SharedMemoryFullError as exc:
                print("checked:", exc.path == where, exc.storage == where, exc)
            # The free-space check can pass while the reservation fails
            # (another process took the space): posix_fallocate says so.
            real = blocks.free_space
            blocks.free_space = lambda directory=None: None
            try:
                eng.empty(32 * 2**20, np.uint8)
            except shmarray.SharedMemoryFullError as exc:
                print("reserved:", exc)
            blocks.free_space = real
            print("left:", sorted(os.listdir(where)))
            x = eng.from_numpy(np.arange(1000.0))        # still usable
            print("ok:", x.sum())
            del x
    """)
    proc = run_with_tmpfs(code, {storage_dir: "16m"})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    checked = out.split("checked:", 1)[1].splitlines()[0].strip()
    assert checked.startswith("True True cannot allocate 32.0 MiB")
    assert f"in {storage_dir}" in checked and 'storage="memfd"' in checked
    assert "free of 16.0 MiB" in checked
    reserved = out.split("reserved:", 1)[1].splitlines()[0].strip()
    assert "cannot allocate 32.0 MiB" in reserved
    left = out.split("left:", 1)[1].splitlines()[0]
    assert left.count("sha-") == 1  # the control block only
    assert "ok: 499500.0" in out
    assert proc.stderr == ""


# -- SharedMemoryFullError names the storage option ------------------------------


def test_a_full_dev_shm_names_the_other_storages(engine):
    free = blocks.free_space()[0]
    with pytest.raises(shmarray.SharedMemoryFullError) as info:
        engine.empty(free + 2**30, np.uint8)
    msg = str(info.value)
    assert 'storage="memfd"' in msg and "SHMARRAY_STORAGE" in msg and "--shm-size" in msg
    assert info.value.storage == "shm"


@needs_memfd
def test_memfd_beyond_the_machines_memory_is_a_clear_error():
    with shmarray.Engine(workers=1, storage="memfd") as eng:
        available, total = blocks.memory_available()
        with pytest.raises(shmarray.SharedMemoryFullError) as info:
            eng.empty(total + 2**30, np.uint8)
        err = info.value
        assert err.storage == "memfd" and err.path is None
        assert 'storage="memfd"' in str(err) and 'storage="/a/directory"' in str(err)
        assert eng.zeros(3).sum() == 0.0


@pytest.mark.breaks_things
def test_a_removed_storage_directory_is_named_when_a_worker_cannot_be_replaced(storage_dir):
    # The directory goes while the engine runs, then a worker dies: its
    # replacement cannot map the engine's control block.  The error says
    # so, and that the engine is still open, not that it was never started.
    code = textwrap.dedent(f"""
        import os, shutil, signal
        import psutil
        import numpy as np
        import shmarray

        where = os.path.join({storage_dir!r}, "engine")
        os.mkdir(where)
        with shmarray.Engine(workers=2, storage=where) as eng:
            x = eng.zeros(8)
            eng.map(lambda a: a.fill(1.0), x)
            shutil.rmtree(where)
            victim = eng.worker_pids[0]
            os.kill(victim, signal.SIGKILL)
            psutil.Process(victim).wait(30)
            for _ in range(2):
                try:
                    eng.map(lambda a: a.fill(2.0), x)
                except shmarray.WorkerStartError as exc:
                    print("error:", exc)
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, (proc.stdout, proc.stderr)
    for line in errors:
        assert "no longer exists" in line and "It was to replace worker 0" in line, line
        assert "was not started" not in line
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
