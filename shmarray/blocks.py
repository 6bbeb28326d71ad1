"""One POSIX shared-memory segment per allocation: create, attach, unmap, unlink.

Who does what, and how many times
---------------------------------
* The coordinator creates each segment once (:func:`create`, through
  :meth:`BlockTable.allocate`) and unlinks its name once: when the last array
  over it dies, or when the engine closes, whichever comes first.
* The coordinator never unmaps a segment explicitly.  The mapping belongs to
  the arrays built on it and goes away with the last of them, so an array
  still held after ``Engine.close()`` stays readable.
* Workers attach a segment at most once each (:func:`attach`) and unmap it
  when the coordinator tells them the name is gone.
* The coordinator holds a shared ``flock`` on each segment it created, for
  as long as it maps it: the proof of life ``shmarray gc`` tests, which a
  pid cannot give across pid namespaces (containers sharing ``/dev/shm``).
* Nobody registers a segment with multiprocessing's resource tracker.  An
  attaching ``SharedMemory`` registers on 3.11 and 3.12 (cpython #82300) and
  the tracker then unlinks the coordinator's blocks when a worker exits, with
  a warning; ``track=False`` fixes that only from 3.13.  Calling
  ``_posixshmem`` directly behaves the same on every version we support.

Everything that depends on the operating system or the Python version is
decided here, once, at import.
"""

from __future__ import annotations

import bisect
import collections
import errno
import fcntl
import mmap
import os
import re
import secrets
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from shmarray.errors import EngineClosedError, SharedMemoryFullError

try:
    import _posixshmem
except ImportError as exc:  # Windows
    raise ImportError(
        "shmarray needs POSIX shared memory (Linux or macOS); "
        "this platform has no _posixshmem module") from exc

# Decided once, at import.
SHM_DIR: str | None = "/dev/shm" if os.path.isdir("/dev/shm") else None
_HAVE_FALLOCATE = hasattr(os, "posix_fallocate")          # not on macOS
_MMAP_KWARGS = {"trackfd": False} if sys.version_info >= (3, 13) else {}
_HAVE_PROC = os.path.isdir("/proc/self")

# "/sha-<owner pid>-<64 random bits>": at most 29 characters with pid_max at
# its Linux ceiling (4194304), under macOS's 30-character limit.
PREFIX = "sha-"
_NAME_RE = re.compile(r"^/?sha-(\d{1,7})-([0-9a-f]{16})$")
MODE = 0o600


def new_name(owner_pid: int | None = None) -> str:
    """A fresh, unguessable block name tagged with its owner's pid.

    >>> name = new_name(1234)
    >>> name.startswith("/sha-1234-"), len(name) <= 30
    (True, True)
    """
    pid = os.getpid() if owner_pid is None else owner_pid
    return f"/{PREFIX}{pid}-{secrets.token_hex(8)}"


def owner_of(name: str) -> int | None:
    """The owner pid in a shmarray block name, or None if it is not one.

    >>> owner_of("/sha-1234-0123456789abcdef"), owner_of("psm_1234")
    (1234, None)
    """
    match = _NAME_RE.match(name)
    return int(match.group(1)) if match else None


def format_bytes(n: float) -> str:
    """
    >>> format_bytes(1536), format_bytes(3 * 2**30)
    ('1.5 KiB', '3.0 GiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def free_space() -> tuple[int, int] | None:
    """(free, total) bytes of the shared-memory filesystem, if it has one."""
    if SHM_DIR is None:
        return None
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def _full_error(nbytes: int, inodes: bool = False) -> SharedMemoryFullError:
    space = free_space()
    free, total = space if space else (0, 0)
    where = SHM_DIR or "shared memory"
    what = (f"{where} has no free inode left (it holds as many files as its "
            f"nr_inodes allows), with {format_bytes(free)} free of "
            f"{format_bytes(total)}" if inodes else
            f"{where} has {format_bytes(free)} free of {format_bytes(total)}")
    return SharedMemoryFullError(
        f"cannot allocate {format_bytes(nbytes)} ({nbytes} bytes) of shared "
        f"memory: {what}. Drop arrays you no longer need (their blocks "
        f"are freed with the last reference), run `shmarray gc` to remove "
        f"blocks left by dead processes, or make {where} larger "
        f"(Docker: `docker run --shm-size=8g ...`; Linux: "
        f"`mount -o remount,size=8G /dev/shm`).",
        requested=nbytes, free=free, path=SHM_DIR)


def out_of_descriptors(exc: OSError, doing: str) -> OSError:
    """EMFILE/ENFILE, said so a user can act on it."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        opened = len(os.listdir("/proc/self/fd")) if _HAVE_PROC else None
    except OSError:
        opened = None
    which = ("this process" if exc.errno == errno.EMFILE else "the whole system")
    held = f" (it has {opened} open)" if opened is not None and exc.errno == errno.EMFILE else ""
    return OSError(exc.errno,
                   f"cannot {doing}: {which} is out of file descriptors{held}; the "
                   f"limit (ulimit -n) is {soft}, at most {hard}. Raise it in the "
                   f"shell with `ulimit -n {min(max(4 * soft, 4096), hard)}`, or in "
                   f"Python with resource.setrlimit(resource.RLIMIT_NOFILE, ...), "
                   f"or close files you no longer need.")


def _map(fd: int, size: int, **kwargs) -> mmap.mmap:
    return mmap.mmap(fd, size, mmap.MAP_SHARED,
                     mmap.PROT_READ | mmap.PROT_WRITE, **kwargs)


def _reserve(fd: int, size: int) -> None:
    """Give the segment its pages now, so a full tmpfs is an error here and
    never a SIGBUS on first touch later (cpython #114390)."""
    if _HAVE_FALLOCATE:
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise  # ENOSPC and real failures; filesystems without
                #        fallocate fall through to ftruncate
    os.ftruncate(fd, size)


def create(nbytes: int) -> tuple[str, mmap.mmap]:
    """Create, reserve and map a new segment of ``max(nbytes, 1)`` bytes.

    Raises SharedMemoryFullError at once when the filesystem cannot hold it.
    Leaves nothing behind on failure.
    """
    size = max(int(nbytes), 1)
    space = free_space()
    if space is not None and size > space[0]:
        raise _full_error(size)
    while True:
        name = new_name()
        try:
            fd = _posixshmem.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR,
                                      mode=MODE)
            break
        except FileExistsError:  # 64 random bits: never, but be correct
            continue
        except OSError as exc:
            if exc.errno == errno.ENOSPC:   # no inode left (nr_inodes)
                raise _full_error(size, inodes=True) from None
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise out_of_descriptors(exc, "create a shared block") from None
            raise
    try:
        # The lock belongs to the open file, which the mapping keeps (mmap
        # holds a duplicate of the descriptor): it lasts as long as the
        # mapping, and a dead process holds none.
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            _reserve(fd, size)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise _full_error(size) from None
            raise
        try:
            mm = _map(fd, size)       # keeps a duplicate descriptor before 3.13
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise out_of_descriptors(exc, "map a shared block") from None
            raise
    except BaseException:
        unlink(name)
        raise
    finally:
        os.close(fd)
    return name, mm


def attach(name: str) -> mmap.mmap:
    """Map an existing segment read-write (worker side).  Registers nothing,
    and keeps no descriptor where Python allows (3.13: ``trackfd=False``)."""
    fd = _posixshmem.shm_open(name, os.O_RDWR, mode=0)
    try:
        return _map(fd, os.fstat(fd).st_size, **_MMAP_KWARGS)
    finally:
        os.close(fd)


def unlink(name: str) -> bool:
    """Remove a segment's name; False if it was already gone."""
    try:
        _posixshmem.shm_unlink(name)
        return True
    except FileNotFoundError:
        return False


def address_of(buf: np.ndarray) -> int:
    return buf.__array_interface__["data"][0]


@dataclass(frozen=True)
class Block:
    """One live segment as the coordinator sees it."""
    name: str
    size: int
    address: int


_TABLES: weakref.WeakSet = weakref.WeakSet()      # every engine's table


def blocks_of_other_engines(array: np.ndarray, mine: BlockTable) -> Block | None:
    """The block of another live engine that holds ``array``, if any."""
    data = address_of(array)
    for table in list(_TABLES):
        if table is not mine and not table.closed:
            found = table.locate(data, data + max(array.nbytes, 1))
            if found is not None:
                return found
    return None


class BlockTable:
    """The coordinator's live blocks, indexed by the address they map at.

    One per engine.  Creates every block (``allocate``) and unlinks every
    name exactly once: from a finalizer on the mapping when the last array
    over it dies, or from ``close()``.  Holds no strong reference to any
    mapping, so memory lives exactly as long as the arrays do.

    The finalizers may run inside garbage collection on any thread, even
    while this thread holds the lock; they therefore only unlink and append
    to deques, and the index is purged under the lock on the next use.
    CPython unmaps an mmap before it calls the finalizer, without holding
    the GIL, so a new block can be mapped over a dead one's addresses before
    the dead one is reported: a new block therefore evicts every entry it
    overlaps, and a late report removes only the block it names.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._starts: list[int] = []
        self._blocks: dict[int, Block] = {}
        self._finalizers: dict[str, weakref.finalize] = {}
        self._dead: collections.deque[tuple[int, str]] = collections.deque()
        self._released: collections.deque[str] = collections.deque()
        self._descriptors: dict = {}
        self.closed = False
        self.warned_copy = False        # a CopyWarning was shown for this engine
        self.on_create: Callable[[str], object] | None = None   # told each new name (the watchdog)
        _TABLES.add(self)

    @property
    def descriptors(self) -> dict:
        """A cache for ``descriptors.describe``, valid while no block dies:
        a dead block's addresses may be mapped again by a new one."""
        if self._dead:
            with self._lock:
                self._purge()
        if len(self._descriptors) > 4096:
            self._descriptors = {}
        return self._descriptors

    def allocate(self, nbytes: int) -> np.ndarray:
        """A new block; returns a uint8 array of ``nbytes`` over it."""
        with self._lock:
            if self.closed:
                raise EngineClosedError("this engine is closed; create a new one")
            name, mm = create(nbytes)
            if self.on_create is not None:
                self.on_create(name)
            buf = np.frombuffer(mm, dtype=np.uint8)
            start = address_of(buf)
            self._purge()
            self._evict(start, start + len(mm))
            bisect.insort(self._starts, start)
            self._blocks[start] = Block(name, len(mm), start)
            fin = weakref.finalize(mm, self._mapping_died, start, name,
                                   self._dead, self._released, os.getpid())
            fin.atexit = False  # Engine.close() covers interpreter exit
            self._finalizers[name] = fin
        return buf[:nbytes]

    @staticmethod
    def _mapping_died(start, name, dead, released, owner) -> None:
        if os.getpid() != owner:
            return           # a forked child's copy: the parent owns the name
        unlink(name)
        dead.append((start, name))
        released.append(name)

    def _purge(self) -> None:
        if self._dead:
            self._descriptors = {}
        while self._dead:
            start, name = self._dead.popleft()
            self._finalizers.pop(name, None)
            block = self._blocks.get(start)
            if block is None or block.name != name:
                continue     # that address already holds a newer block
            self._starts.pop(bisect.bisect_left(self._starts, start))
            del self._blocks[start]

    def _evict(self, lo: int, hi: int) -> None:
        """Forget blocks over [lo, hi): they are unmapped, whatever their
        finalizers have said so far."""
        i = bisect.bisect_right(self._starts, lo) - 1
        if i < 0 or self._blocks[self._starts[i]].address + self._blocks[self._starts[i]].size <= lo:
            i += 1                   # the block before lo ends before it
        while i < len(self._starts) and self._starts[i] < hi:
            del self._blocks[self._starts.pop(i)]
            self._descriptors = {}

    def locate(self, lo: int, hi: int) -> Block | None:
        """The live block holding bytes [lo, hi), if any."""
        with self._lock:
            self._purge()
            i = bisect.bisect_right(self._starts, lo) - 1
            if i < 0:
                return None
            block = self._blocks[self._starts[i]]
            return block if hi <= block.address + block.size else None

    def has_released(self) -> bool:
        return bool(self._released)

    def take_released(self) -> tuple[str, ...]:
        """Names unlinked since the last call: workers should unmap them."""
        out = []
        while self._released:
            out.append(self._released.popleft())
        return tuple(out)

    def live(self) -> list[Block]:
        with self._lock:
            self._purge()
            return [self._blocks[s] for s in self._starts]

    def close(self) -> list[str]:
        """Unlink every live name.  Mappings stay with their arrays."""
        with self._lock:
            self.closed = True
            self._purge()
            names = []
            for start in self._starts:
                name = self._blocks[start].name
                if self._finalizers[name].detach() is not None:
                    unlink(name)
                    names.append(name)
            self._starts.clear()
            self._blocks.clear()
            self._finalizers.clear()
            self._released.clear()
            self._descriptors = {}
            return names


# -- Blocks of every process, for `shmarray ls` / `shmarray gc` -------------

@dataclass(frozen=True)
class BlockInfo:
    """A shmarray block found in the shared-memory filesystem.
    ``owner_alive``: True when a live process holds its lock, False when
    none does, None when this user cannot tell (another user's block)."""
    name: str
    size: int
    owner_pid: int
    owner_alive: bool | None
    uid: int
    age: float                     # seconds since it was created


def _boot_time() -> float:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime"):
                return float(line.split()[1])
    raise OSError("no btime in /proc/stat")


def process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), if known."""
    if not _HAVE_PROC:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return _boot_time() + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def lock_held(name: str) -> bool | None:
    """Whether a live process maps the block ``name`` as its creator (holds
    its lock); None if this user may not look, or it is gone.  Unlike a pid
    test this holds across pid namespaces: a container sharing /dev/shm has
    its own pids, and the pid in a name may belong to anybody here."""
    if SHM_DIR is None:
        return None
    try:
        fd = os.open(os.path.join(SHM_DIR, name.lstrip("/")), os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def scan() -> list[BlockInfo]:
    """Every shmarray block in the shared-memory filesystem, sorted by name.

    Only names of shmarray's own form are considered; anything else in
    /dev/shm is never listed and never touched.
    """
    if SHM_DIR is None:
        return []
    found = []
    for entry in os.scandir(SHM_DIR):
        pid = owner_of(entry.name)
        if pid is None:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        found.append(BlockInfo("/" + entry.name, st.st_size, pid,
                               lock_held(entry.name), st.st_uid,
                               time.time() - st.st_ctime))
    return sorted(found, key=lambda b: b.name)


# A block is locked a moment after it is created: younger ones are left
# alone, whatever their lock says.
GC_MIN_AGE = 5.0


def collect_orphans(min_age: float = GC_MIN_AGE) -> list[BlockInfo]:
    """Unlink this user's shmarray blocks that no live process holds;
    returns those removed.  In doubt (cannot look, younger than
    ``min_age`` seconds), leave it."""
    removed = []
    for info in scan():
        # Nobody holds the lock of a dead creator, and nobody can take it
        # back: the verdict still holds when we unlink.
        if (info.owner_alive is False and info.uid == os.getuid()
                and info.age >= min_age and unlink(info.name)):
            removed.append(info)
    return removed
