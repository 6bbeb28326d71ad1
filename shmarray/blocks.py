"""Shared blocks: create, attach, unmap, unlink; and where they live.

Where blocks live (``Engine(storage=...)``)
-------------------------------------------
A :class:`Storage` makes an engine's blocks; the kind is chosen once per
engine (``storage_for``), and a block's name says which kind made it, so
workers, the watchdog and ``shmarray ls``/``gc`` need no other word:

=========  =================================  ================================
kind       a block is                         its name (``Block.name``)
=========  =================================  ================================
"shm"      a POSIX shared-memory object in    ``/sha-<owner pid>-<64 random
           ``/dev/shm`` (the default)         bits>``
"memfd"    anonymous shared memory            ``memfd:<owner pid>:<fd>:<dev>:
           (``memfd_create``): no name, no    <inode>``: the creator's
           size limit but memory's, freed     descriptor, which a worker opens
           by the kernel with the last        as ``/proc/<pid>/fd/<fd>`` (and
           process that maps it               checks the inode, so a reused
                                              descriptor is never mapped)
a path     a file in that directory, mapped   ``<directory>/sha-<owner pid>-
           shared: data bigger than           <64 random bits>``
           ``/dev/shm`` or than RAM
=========  =================================  ================================

Who does what, and how many times
---------------------------------
* The coordinator creates each block once (``Storage.create``, through
  :meth:`BlockTable.allocate`) and unlinks it once (``Storage.unlink``):
  when the last array over it dies, or when the engine closes, whichever
  comes first.  For a memfd block "unlink" closes the coordinator's
  descriptor, after which no worker can attach it any more: the same rule
  as a removed name.
* The coordinator never unmaps a block explicitly.  The mapping belongs to
  the arrays built on it and goes away with the last of them, so an array
  still held after ``Engine.close()`` stays readable.
* Workers attach a block at most once each (:func:`attach`) and unmap it
  when the coordinator tells them it is gone.
* For named blocks (shm, files) the coordinator holds a shared ``flock``
  on each block it created, for as long as it maps it: the proof of life
  ``shmarray gc`` tests, which a pid cannot give across pid namespaces
  (containers sharing ``/dev/shm``).  A memfd block needs none: it cannot
  outlive the processes that map it.
* Every block's space is reserved when it is made (``posix_fallocate``),
  so a full filesystem, or a machine out of memory, is an error at
  allocation and never a SIGBUS on first touch later (cpython #114390).
* Nobody registers a block with multiprocessing's resource tracker.  An
  attaching ``SharedMemory`` registers on 3.11 and 3.12 (cpython #82300) and
  the tracker then unlinks the coordinator's blocks when a worker exits, with
  a warning; ``track=False`` fixes that only from 3.13.  Calling
  ``_posixshmem`` directly behaves the same on every version we support.

Everything that depends on the operating system or the Python version is
decided here, once, at import.
"""

from __future__ import annotations

import abc
import bisect
import collections
import errno
import fcntl
import mmap
import os
import re
import secrets
import stat
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from shmarray.errors import EngineClosedError, SharedMemoryFullError

try:
    import _posixshmem
except ImportError as exc:  # Windows
    raise ImportError(
        "shmarray needs POSIX shared memory (Linux or macOS); "
        "this platform has no _posixshmem module"
    ) from exc

# Decided once, at import.
SHM_DIR: str | None = "/dev/shm" if os.path.isdir("/dev/shm") else None
_HAVE_FALLOCATE = hasattr(os, "posix_fallocate")  # not on macOS
_MMAP_KWARGS = {"trackfd": False} if sys.version_info >= (3, 13) else {}
_HAVE_PROC = os.path.isdir("/proc/self")
# memfd blocks reach workers through /proc/<pid>/fd: Linux only.
HAVE_MEMFD = hasattr(os, "memfd_create") and _HAVE_PROC
_MFD_FLAGS = getattr(os, "MFD_CLOEXEC", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)
# Reading a file into a block from several threads at once (eng.load).
HAVE_PREADV = hasattr(os, "preadv")

# "/sha-<owner pid>-<64 random bits>": at most 29 characters with pid_max at
# its Linux ceiling (4194304), under macOS's 30-character limit.
PREFIX = "sha-"
_NAME_RE = re.compile(r"^/?sha-(\d{1,7})-([0-9a-f]{16})$")
_MEMFD_RE = re.compile(r"^memfd:(\d{1,7}):(\d{1,9}):(\d{1,20}):(\d{1,20})$")
MEMFD_PREFIX = "memfd:"
MODE = 0o600
STORAGE_KINDS = ("shm", "memfd")  # or a directory path


def new_name(owner_pid: int | None = None) -> str:
    """A fresh, unguessable block name tagged with its owner's pid.

    >>> name = new_name(1234)
    >>> name.startswith("/sha-1234-"), len(name) <= 30
    (True, True)
    """
    pid = os.getpid() if owner_pid is None else owner_pid
    return f"/{PREFIX}{pid}-{secrets.token_hex(8)}"


def kind_of(name: str) -> str | None:
    """Which storage made the block ``name``: "shm", "memfd", "file" (a
    block in a directory), or None if it is no shmarray block name.

    >>> kind_of("/sha-1234-0123456789abcdef"), kind_of("memfd:1234:7:1:99")
    ('shm', 'memfd')
    >>> kind_of("/data/run/sha-1234-0123456789abcdef"), kind_of("/etc/passwd")
    ('file', None)
    """
    if name.startswith(MEMFD_PREFIX):
        return "memfd" if _MEMFD_RE.match(name) else None
    head, base = os.path.split(name)
    if not _NAME_RE.match(base):
        return None
    return "file" if head not in ("", "/") else "shm"


def owner_of(name: str) -> int | None:
    """The owner pid in a shmarray block name, or None if it is not one.

    >>> owner_of("/sha-1234-0123456789abcdef"), owner_of("psm_1234")
    (1234, None)
    >>> owner_of("memfd:1234:7:1:99"), owner_of("/scratch/sha-1234-0123456789abcdef")
    (1234, 1234)
    """
    kind = kind_of(name)
    if kind is None:
        return None
    match = _MEMFD_RE.match(name) if kind == "memfd" else _NAME_RE.match(os.path.basename(name))
    assert match is not None  # kind_of matched it
    return int(match.group(1))


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


def free_space(directory: str | None = None) -> tuple[int, int] | None:
    """(free, total) bytes of the filesystem of ``directory`` (default: the
    shared-memory filesystem), if it has one."""
    where = SHM_DIR if directory is None else directory
    if where is None:
        return None
    st = os.statvfs(where)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def _meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            parts = value.split()
            if parts:
                out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def _cgroup_memory_left() -> int | None:
    """Bytes this process's cgroup (v2) may still charge, if it is capped."""
    try:
        with open("/proc/self/cgroup") as f:
            path = next(line.split(":", 2)[2].strip() for line in f if line.startswith("0::"))
        base = os.path.join("/sys/fs/cgroup", path.lstrip("/"))
        with open(os.path.join(base, "memory.max")) as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open(os.path.join(base, "memory.current")) as f:
            return max(int(limit) - int(f.read().strip()), 0)
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def memory_available() -> tuple[int, int] | None:
    """(available, total) bytes that anonymous shared memory may take: the
    kernel's MemAvailable plus free swap, capped by a container's memory
    limit (cgroup v2); None where this cannot be read."""
    if not _HAVE_PROC:
        return None
    try:
        info = _meminfo()
        free = info["MemAvailable"] + info.get("SwapFree", 0)
        total = info["MemTotal"] + info.get("SwapTotal", 0)
    except (OSError, KeyError, ValueError):
        return None
    left = _cgroup_memory_left()
    if left is not None:
        free = min(free, left)
    return free, total


_ELSEWHERE = (
    'keep blocks elsewhere: Engine(storage="memfd") (anonymous shared '
    "memory, bounded by the machine's memory, not by /dev/shm) or "
    'Engine(storage="/a/directory") (files on a disk, for data bigger '
    "than /dev/shm or RAM); the environment variable SHMARRAY_STORAGE "
    "sets it for every engine"
)


def out_of_descriptors(exc: OSError, doing: str) -> OSError:
    """EMFILE/ENFILE, said so a user can act on it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        opened = len(os.listdir("/proc/self/fd")) if _HAVE_PROC else None
    except OSError:
        opened = None
    which = "this process" if exc.errno == errno.EMFILE else "the whole system"
    held = f" (it has {opened} open)" if opened is not None and exc.errno == errno.EMFILE else ""
    return OSError(
        exc.errno,
        f"cannot {doing}: {which} is out of file descriptors{held}; the "
        f"limit (ulimit -n) is {soft}, at most {hard}. Raise it in the "
        f"shell with `ulimit -n {min(max(4 * soft, 4096), hard)}`, or in "
        f"Python with resource.setrlimit(resource.RLIMIT_NOFILE, ...), "
        f"or close files you no longer need.",
    )


def _map(fd: int, size: int, **kwargs) -> mmap.mmap:
    return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, **kwargs)


def _reserve(fd: int, size: int) -> None:
    """Give the block its pages (or disk blocks) now, so a full filesystem
    is an error here and never a SIGBUS on first touch later (cpython
    #114390).  glibc writes the blocks itself where the filesystem has no
    fallocate."""
    if _HAVE_FALLOCATE:
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise  # ENOSPC and real failures; filesystems without
                #        fallocate fall through to ftruncate
    os.ftruncate(fd, size)


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EFBIG)


def _made(fd: int, size: int, lock: bool, full) -> mmap.mmap:
    """Lock (named blocks), reserve and map a new block's descriptor;
    ``full(errno)`` is the error when its space cannot be reserved."""
    if lock:
        # The lock belongs to the open file, which the mapping keeps (mmap
        # holds a duplicate of the descriptor): it lasts as long as the
        # mapping, and a dead process holds none.
        fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        _reserve(fd, size)
    except OSError as exc:
        if exc.errno in _FULL:
            raise full(exc.errno) from None
        raise
    try:
        return _map(fd, size)  # keeps a duplicate descriptor before 3.13
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            raise out_of_descriptors(exc, "map a shared block") from None
        raise


class Storage(abc.ABC):
    """Where one engine's blocks live: the contract every kind fulfils.

    One per engine, made by :func:`storage_for` and held by the engine's
    BlockTable (its arrays) and Pool (the control block).  Only the
    coordinator calls it: ``create`` makes and maps a block, ``unlink``
    ends it once (the mappings stay with their arrays).  Workers attach by
    name with the module's :func:`attach`, which needs no Storage.
    """

    #: what ``Engine(storage=...)`` was given, normalised
    spec: str
    #: a block outlives its processes unless unlinked: the watchdog and
    #: ``shmarray gc`` must know its name
    leaks: bool = True

    @abc.abstractmethod
    def create(self, nbytes: int) -> tuple[str, mmap.mmap]:
        """Create, reserve and map a new block of ``max(nbytes, 1)`` bytes.

        Raises SharedMemoryFullError at once when it cannot be held.
        Leaves nothing behind on failure."""

    @abc.abstractmethod
    def unlink(self, name: str) -> bool:
        """End block ``name`` (no new attach will succeed); False if it was
        already gone.  Safe from a finalizer on any thread."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec!r}>"


class ShmStorage(Storage):
    """Named POSIX shared memory in /dev/shm (the default): found by name by
    other processes, ``shmarray ls``/``gc`` and the watchdog; bounded by the
    size of the /dev/shm mount."""

    spec = "shm"

    def full_error(self, nbytes: int, inodes: bool = False) -> SharedMemoryFullError:
        space = free_space()
        free, total = space if space else (0, 0)
        where = SHM_DIR or "shared memory"
        what = (
            f"{where} has no free inode left (it holds as many files as its "
            f"nr_inodes allows), with {format_bytes(free)} free of "
            f"{format_bytes(total)}"
            if inodes
            else f"{where} has {format_bytes(free)} free of {format_bytes(total)}"
        )
        return SharedMemoryFullError(
            f"cannot allocate {format_bytes(nbytes)} ({nbytes} bytes) of shared "
            f"memory: {what}. Drop arrays you no longer need (their blocks "
            f"are freed with the last reference), run `shmarray gc` to remove "
            f"blocks left by dead processes, make {where} larger "
            f"(Docker: `docker run --shm-size=8g ...`; Linux: "
            f"`mount -o remount,size=8G /dev/shm`), or {_ELSEWHERE}.",
            requested=nbytes,
            free=free,
            path=SHM_DIR,
            storage="shm",
        )

    def create(self, nbytes: int) -> tuple[str, mmap.mmap]:
        size = max(int(nbytes), 1)
        space = free_space()
        if space is not None and size > space[0]:
            raise self.full_error(size)
        while True:
            name = new_name()
            try:
                fd = _posixshmem.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=MODE)
                break
            except FileExistsError:  # 64 random bits: never, but be correct
                continue
            except OSError as exc:
                if exc.errno == errno.ENOSPC:  # no inode left (nr_inodes)
                    raise self.full_error(size, inodes=True) from None
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    raise out_of_descriptors(exc, "create a shared block") from None
                raise
        try:
            mm = _made(fd, size, True, lambda _: self.full_error(size))
        except BaseException:
            unlink(name)
            raise
        finally:
            os.close(fd)
        return name, mm

    def unlink(self, name: str) -> bool:
        return unlink(name)


class MemfdStorage(Storage):
    """Anonymous shared memory (``memfd_create``, Linux): no name, so
    nothing to leak and nothing for /dev/shm's size to bound; the kernel
    frees a block when the last process that maps it or holds its
    descriptor is gone, however it ended.

    The coordinator keeps each block's descriptor (close-on-exec) until the
    block is unlinked; workers open it as ``/proc/<pid>/fd/<fd>`` and check
    its inode.  Costs one descriptor per live block (two before Python
    3.13, whose mmap keeps a duplicate).
    """

    spec = "memfd"
    leaks = False

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._pid = os.getpid()

    def full_error(self, nbytes: int, err: int | None = None) -> SharedMemoryFullError:
        space = memory_available()
        free, total = space if space else (0, 0)
        what = (
            f"this machine has {format_bytes(free)} available of "
            f"{format_bytes(total)} (memory and swap, within any container "
            f"limit)"
            if space
            else "the kernel refused it"
        )
        if err is not None:
            what += f" ({os.strerror(err)})"
        return SharedMemoryFullError(
            f"cannot allocate {format_bytes(nbytes)} ({nbytes} bytes) of "
            f'anonymous shared memory (storage="memfd"): {what}. Drop arrays '
            f"you no longer need (their blocks are freed with the last "
            f"reference), use fewer or smaller arrays, or keep the data in "
            f'files: Engine(storage="/a/directory") on a disk with room.',
            requested=nbytes,
            free=free,
            path=None,
            storage="memfd",
        )

    def create(self, nbytes: int) -> tuple[str, mmap.mmap]:
        size = max(int(nbytes), 1)
        space = memory_available()
        if space is not None and size > space[0]:
            raise self.full_error(size)
        try:
            fd = os.memfd_create(f"shmarray-{self._pid}", _MFD_FLAGS)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise out_of_descriptors(exc, "create a shared block") from None
            raise
        try:
            mm = _made(fd, size, False, lambda err: self.full_error(size, err))
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        name = f"{MEMFD_PREFIX}{self._pid}:{fd}:{st.st_dev}:{st.st_ino}"
        self._fds[name] = fd
        return name, mm

    def unlink(self, name: str) -> bool:
        fd = self._fds.pop(name, None)  # at most once: the number may be reused
        if fd is None:
            return False
        os.close(fd)
        return True


class DirStorage(Storage):
    """Files in a directory, mapped shared: for data bigger than /dev/shm or
    than RAM (the kernel writes pages back to the disk as it needs).  Made
    with the care of /dev/shm blocks: owner-only (0600), unguessable names
    tagged with the owner's pid, space reserved on the disk up front,
    locked while mapped, and removed like them (close, finalizer, watchdog,
    ``shmarray gc --dir``)."""

    def __init__(self, directory: str):
        self.spec = self.directory = directory

    def full_error(self, nbytes: int, err: int | None = None) -> SharedMemoryFullError:
        try:
            free, total = free_space(self.directory) or (0, 0)
        except OSError:
            free = total = 0
        why = {
            errno.EDQUOT: " (your disk quota is used up)",
            errno.EFBIG: " (the filesystem cannot hold a file this large)",
        }.get(err or 0, "")
        return SharedMemoryFullError(
            f"cannot allocate {format_bytes(nbytes)} ({nbytes} bytes) in "
            f"{self.directory} (storage={self.directory!r}): its filesystem has "
            f"{format_bytes(free)} free of {format_bytes(total)}{why}. Drop arrays "
            f"you no longer need, free space there (`shmarray gc --dir "
            f"{self.directory}` removes blocks of dead processes), or pass "
            f"storage= a directory on a filesystem with room (`df -h` lists "
            f'them), or storage="memfd" if the data fits in memory.',
            requested=nbytes,
            free=free,
            path=self.directory,
            storage=self.directory,
        )

    def create(self, nbytes: int) -> tuple[str, mmap.mmap]:
        size = max(int(nbytes), 1)
        try:
            space = free_space(self.directory)
        except FileNotFoundError:
            space = None  # os.open below says it clearly
        if space is not None and size > space[0]:
            raise self.full_error(size)
        while True:
            name = os.path.join(self.directory, new_name()[1:])
            try:
                fd = os.open(
                    name, os.O_CREAT | os.O_EXCL | os.O_RDWR | _O_CLOEXEC | _O_NOFOLLOW, MODE
                )
                break
            except FileExistsError:
                continue
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise self.full_error(size, exc.errno) from None
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    raise out_of_descriptors(exc, "create a shared block") from None
                if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.EROFS):
                    raise OSError(
                        exc.errno,
                        f"cannot create a block in the storage "
                        f"directory {self.directory}: {exc.strerror}. Pass "
                        f"Engine(storage=...) a directory you can write.",
                    ) from None
                raise
        try:
            mm = _made(fd, size, True, lambda err: self.full_error(size, err))
        except BaseException:
            unlink(name)
            raise
        finally:
            os.close(fd)
        return name, mm

    def unlink(self, name: str) -> bool:
        return unlink(name)


def storage_for(spec: str) -> Storage:
    """The Storage for a checked ``storage=`` value (``options.coerce_storage``)."""
    if spec == "shm":
        return ShmStorage()
    if spec == "memfd":
        return MemfdStorage()
    return DirStorage(spec)


def _open_memfd(name: str) -> int:
    """The descriptor of memfd block ``name``, opened anew through its
    creator's ``/proc/<pid>/fd``; checked to be that very file."""
    match = _MEMFD_RE.match(name)
    if match is None:
        raise ValueError(f"{name!r} is not a memfd block's name")
    pid, fd, dev, ino = (int(g) for g in match.groups())
    path = f"/proc/{pid}/fd/{fd}"
    try:
        new = os.open(path, os.O_RDWR | _O_CLOEXEC)
    except FileNotFoundError:
        raise FileNotFoundError(
            errno.ENOENT,
            f"block {name!r} is gone: its creator (pid {pid}) has closed it or exited",
        ) from None
    except PermissionError:
        raise PermissionError(
            errno.EACCES,
            f"cannot open {path} to attach block {name!r}: this "
            f"process may not look at process {pid}'s descriptors (another "
            f"user, a /proc mounted with hidepid, or a security policy). Use "
            f'Engine(storage="shm") or a directory instead.',
        ) from None
    st = os.fstat(new)
    if (st.st_dev, st.st_ino) != (dev, ino):
        os.close(new)
        raise FileNotFoundError(
            errno.ENOENT,
            f"block {name!r} is gone: descriptor {fd} of process {pid} now refers to another file",
        )
    return new


def _open_file(name: str) -> int:
    fd = os.open(name, os.O_RDWR | _O_CLOEXEC | _O_NOFOLLOW)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        os.close(fd)
        raise PermissionError(
            errno.EACCES,
            f"refusing to map {name!r}: a block is a regular file "
            f"of this user, readable by nobody else (mode 0600); this one is not",
        )
    return fd


def attach(name: str) -> mmap.mmap:
    """Map an existing block read-write (worker side), whatever storage made
    it.  Registers nothing, and keeps no descriptor where Python allows
    (3.13: ``trackfd=False``)."""
    kind = kind_of(name)
    if kind == "memfd":
        fd = _open_memfd(name)
    elif kind == "file":
        fd = _open_file(name)
    else:
        fd = _posixshmem.shm_open(name, os.O_RDWR, mode=0)
    try:
        return _map(fd, os.fstat(fd).st_size, **_MMAP_KWARGS)
    finally:
        os.close(fd)


def unlink(name: str) -> bool:
    """Remove a named block (shm or file); False if it was already gone.  A
    memfd block has no name: only its Storage can end it (False here)."""
    kind = kind_of(name)
    try:
        if kind == "file":
            os.unlink(name)
        elif kind == "memfd":
            return False
        else:
            _posixshmem.shm_unlink(name)
        return True
    except FileNotFoundError:
        return False


def exists(name: str) -> bool:
    """Whether block ``name`` can still be attached (it was not unlinked)."""
    kind = kind_of(name)
    if kind == "memfd":
        try:
            os.close(_open_memfd(name))
            return True
        except OSError:
            return False
    if kind == "file":
        return os.path.exists(name)
    return SHM_DIR is not None and os.path.exists(SHM_DIR + "/" + name.lstrip("/"))


def create(nbytes: int) -> tuple[str, mmap.mmap]:
    """A new /dev/shm block (``ShmStorage().create``)."""
    return ShmStorage().create(nbytes)


def drop_pages(mapping: mmap.mmap, start: int, stop: int) -> None:
    """This process is done reading bytes [start, stop) of a file mapping:
    their pages leave its resident set (the page cache keeps them; a
    shared mapping's writes are kept too).  Never call it on a private
    (copy-on-write) mapping: its changes would be lost.  A no-op where
    madvise is missing."""
    if _MADV_DONTNEED is None:
        return
    page = mmap.PAGESIZE
    lo = max(start, 0) // page * page
    hi = min(-(-stop // page) * page, len(mapping))
    if hi > lo:
        mapping.madvise(_MADV_DONTNEED, lo, hi - lo)


def address_of(buf: np.ndarray) -> int:
    return buf.__array_interface__["data"][0]


@dataclass(frozen=True)
class Block:
    """One live segment as the coordinator sees it."""

    name: str
    size: int
    address: int


_TABLES: weakref.WeakSet = weakref.WeakSet()  # every engine's table


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

    def __init__(self, storage: Storage | None = None) -> None:
        self.storage = storage if storage is not None else ShmStorage()
        self._lock = threading.Lock()
        self._starts: list[int] = []
        self._blocks: dict[int, Block] = {}
        self._finalizers: dict[str, weakref.finalize] = {}
        self._dead: collections.deque[tuple[int, str]] = collections.deque()
        self._released: collections.deque[str] = collections.deque()
        self._descriptors: dict = {}
        self.closed = False
        self.warned_copy = False  # a CopyWarning was shown for this engine
        self.on_create: Callable[[str], object] | None = (
            None  # told each new name that can leak (the watchdog)
        )
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
            name, mm = self.storage.create(nbytes)
            if self.on_create is not None and self.storage.leaks:
                self.on_create(name)
            buf = np.frombuffer(mm, dtype=np.uint8)
            start = address_of(buf)
            self._purge()
            self._evict(start, start + len(mm))
            bisect.insort(self._starts, start)
            self._blocks[start] = Block(name, len(mm), start)
            fin = weakref.finalize(
                mm,
                self._mapping_died,
                start,
                name,
                self._dead,
                self._released,
                os.getpid(),
                self.storage.unlink,
            )
            fin.atexit = False  # Engine.close() covers interpreter exit
            self._finalizers[name] = fin
        return buf[:nbytes]

    @staticmethod
    def _mapping_died(start, name, dead, released, owner, unlink_block) -> None:
        if os.getpid() != owner:
            return  # a forked child's copy: the parent owns the name
        unlink_block(name)
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
                continue  # that address already holds a newer block
            self._starts.pop(bisect.bisect_left(self._starts, start))
            del self._blocks[start]

    def _evict(self, lo: int, hi: int) -> None:
        """Forget blocks over [lo, hi): they are unmapped, whatever their
        finalizers have said so far."""
        i = bisect.bisect_right(self._starts, lo) - 1
        if (
            i < 0
            or self._blocks[self._starts[i]].address + self._blocks[self._starts[i]].size <= lo
        ):
            i += 1  # the block before lo ends before it
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
                    self.storage.unlink(name)
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
    age: float  # seconds since it was created


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
    """Whether a live process maps the block ``name`` (in /dev/shm, or a
    block file's path) as its creator (holds its lock); None if this user
    may not look, or it is gone.  Unlike a pid test this holds across pid
    namespaces: a container sharing /dev/shm has its own pids, and the pid
    in a name may belong to anybody here."""
    path = name if kind_of(name) == "file" else os.path.join(SHM_DIR or "/", name.lstrip("/"))
    try:
        fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
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


def scan(directory: str | None = None, pids: Iterable[int] | None = None) -> list[BlockInfo]:
    """Every shmarray block in the shared-memory filesystem, or in
    ``directory`` (blocks of ``storage=directory``), sorted by name; only
    those created by ``pids``, if given.

    Only regular files with names of shmarray's own form are considered;
    anything else there is never listed and never touched.
    """
    where = SHM_DIR if directory is None else directory
    if where is None:
        return []
    only = None if pids is None else set(pids)
    found = []
    for entry in os.scandir(where):
        pid = owner_of(entry.name)
        if pid is None or (only is not None and pid not in only):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        name = "/" + entry.name if directory is None else os.path.join(where, entry.name)
        found.append(
            BlockInfo(name, st.st_size, pid, lock_held(name), st.st_uid, time.time() - st.st_ctime)
        )
    return sorted(found, key=lambda b: b.name)


# A block is locked a moment after it is created: younger ones are left
# alone, whatever their lock says.
GC_MIN_AGE = 5.0


def collect_orphans(
    min_age: float = GC_MIN_AGE,
    directory: str | None = None,
    pids: Iterable[int] | None = None,
) -> list[BlockInfo]:
    """Unlink this user's shmarray blocks (in /dev/shm, or in ``directory``;
    only those created by ``pids``, if given) that no live process holds;
    returns those removed.  In doubt (cannot look, younger than ``min_age``
    seconds), leave it."""
    removed = []
    for info in scan(directory, pids):
        # Nobody holds the lock of a dead creator, and nobody can take it
        # back: the verdict still holds when we unlink.
        if (
            info.owner_alive is False
            and info.uid == os.getuid()
            and info.age >= min_age
            and unlink(info.name)
        ):
            removed.append(info)
    return removed
