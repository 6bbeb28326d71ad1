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
  once the last array over it has died (reaped by a thread of its own, so
  that no Ctrl-C can cut it short: :class:`BlockTable`), or when the engine
  closes, whichever comes first.  For a memfd block "unlink" closes the coordinator's
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
  (containers sharing ``/dev/shm``).  On Linux a block is made without a
  name (``O_TMPFILE``), locked, and only then named, so no block is ever
  seen unlocked; elsewhere ``gc`` also spares a block whose creator (the
  pid in its name) is alive (:func:`owner_alive`).  Liveness, never age,
  decides.  A memfd block needs none: it cannot outlive the processes that
  map it.
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
import logging
import mmap
import os
import queue
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

from shmarray import cgroups
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
# Named blocks are made without a name and linked once ready (Linux).
_O_TMPFILE = getattr(os, "O_TMPFILE", 0) if _HAVE_PROC else 0
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


def memory_available() -> tuple[int, int] | None:
    """(available, total) bytes that anonymous shared memory may take: the
    kernel's MemAvailable plus free swap, capped by what this process's
    cgroups may still charge (:func:`shmarray.cgroups.memory_left`: v1 and
    v2, every level up to the root); None where this cannot be read."""
    if not _HAVE_PROC:
        return None
    try:
        info = _meminfo()
        free = info["MemAvailable"] + info.get("SwapFree", 0)
        total = info["MemTotal"] + info.get("SwapTotal", 0)
    except (OSError, KeyError, ValueError):
        return None
    left = cgroups.memory_left()
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
    """EMFILE/ENFILE, said so a user can act on it: raise the soft limit
    where the hard one allows, and say what else to do where it does not."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        opened = len(os.listdir("/proc/self/fd")) if _HAVE_PROC else None
    except OSError:
        opened = None
    fewer = (
        "hold fewer descriptors: fewer live arrays (each block costs the "
        'coordinator one, two with storage="memfd": storage="shm" or a '
        "directory halves that), fewer workers, or close files you no longer "
        "need"
    )
    if exc.errno != errno.EMFILE:
        return OSError(
            exc.errno,
            f"cannot {doing}: the whole system is out of file descriptors "
            f"(fs.file-max). H{fewer[1:]}; or raise the system's limit as "
            f"root (`sysctl -w fs.file-max=...`).",
        )
    held = f" (it has {opened} open)" if opened is not None else ""
    unlimited = hard == resource.RLIM_INFINITY
    if unlimited or soft < hard:
        target = max(4 * soft, 4096) if unlimited else min(max(4 * soft, 4096), hard)
        ceiling = "no hard limit" if unlimited else f"the hard limit is {hard}"
        advice = (
            f"Raise it in the shell with `ulimit -n {target}`, or in Python "
            f"with resource.setrlimit(resource.RLIMIT_NOFILE, ({target}, "
            f"{'resource.RLIM_INFINITY' if unlimited else hard})), or {fewer}."
        )
    else:
        # soft == hard: `ulimit -n` cannot go higher without root.
        ceiling = "which is also the hard limit: only root can raise it"
        advice = (
            f"Either {fewer}; or have the hard limit raised (as root: "
            f"`ulimit -Hn {max(4 * hard, 4096)}` before starting Python, "
            f'"nofile" in /etc/security/limits.conf, LimitNOFILE= for a '
            f"systemd service, `docker run --ulimit nofile=...`)."
        )
    return OSError(
        exc.errno,
        f"cannot {doing}: this process is out of file descriptors{held}; "
        f"its limit (ulimit -n) is {soft}, {ceiling}. {advice}",
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


def _made_unnamed(
    directory: str, size: int, full, failed: Callable[[OSError], BaseException]
) -> tuple[str, mmap.mmap] | None:
    """A new named block in ``directory``, made as a file with no name
    (``O_TMPFILE``) that is locked, reserved and mapped before it is linked
    under a fresh name: nobody ever sees the block unlocked (``shmarray gc``
    cannot take it for an orphan, whatever pid namespace it looks from) or
    half made (a failure leaves no name).  Returns (path, mapping), or None
    where the system or the filesystem cannot (the caller then names the
    file first and locks it a moment later).  ``failed(exc)`` says why the
    file could not be opened."""
    try:
        fd = os.open(directory, _O_TMPFILE | os.O_RDWR | _O_CLOEXEC, MODE)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            return None  # no O_TMPFILE here (EISDIR: a kernel before 3.11)
        raise failed(exc) from None
    try:
        mm = _made(fd, size, True, full)
        while True:
            path = os.path.join(directory, new_name()[1:])
            try:
                # linkat(AT_SYMLINK_FOLLOW), which os.link calls only when
                # given a directory descriptor (else link(2), which would
                # link the /proc symlink itself); an absolute path ignores it.
                os.link(f"/proc/self/fd/{fd}", path, src_dir_fd=fd)
                return path, mm
            except FileExistsError:  # 64 random bits: never, but be correct
                continue
            except OSError as exc:
                if exc.errno in _FULL:
                    raise full(exc.errno) from None
                raise
    finally:
        os.close(fd)


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
        already gone.  Called by whichever thread reaps a dead block (see
        BlockTable), by ``close()``, and by the Pool for its control block:
        safe on any thread."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec!r}>"


class ShmStorage(Storage):
    """Named POSIX shared memory in /dev/shm (the default): found by name by
    other processes, ``shmarray ls``/``gc`` and the watchdog; bounded by the
    size of the /dev/shm mount."""

    spec = "shm"
    _unnamed = bool(_O_TMPFILE)  # False once /dev/shm refused O_TMPFILE

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
        if self._unnamed and SHM_DIR is not None:
            made = _made_unnamed(
                SHM_DIR, size, lambda _: self.full_error(size), lambda e: self._failed(e, size)
            )
            if made is not None:
                return "/" + os.path.basename(made[0]), made[1]
            self._unnamed = False
        while True:
            name = new_name()
            try:
                fd = _posixshmem.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=MODE)
                break
            except FileExistsError:  # 64 random bits: never, but be correct
                continue
            except OSError as exc:
                raise self._failed(exc, size) from None
        try:
            mm = _made(fd, size, True, lambda _: self.full_error(size))
        except BaseException:
            unlink(name)
            raise
        finally:
            os.close(fd)
        return name, mm

    def _failed(self, exc: OSError, size: int) -> BaseException:
        """What to raise when a new block's file cannot be opened."""
        if exc.errno == errno.ENOSPC:  # no inode left (nr_inodes)
            return self.full_error(size, inodes=True)
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            return out_of_descriptors(exc, "create a shared block")
        return exc

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
        self._unnamed = bool(_O_TMPFILE)  # False once the filesystem refused it

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

        def full(err: int) -> SharedMemoryFullError:
            return self.full_error(size, err)

        if self._unnamed:
            made = _made_unnamed(self.directory, size, full, lambda e: self._failed(e, size))
            if made is not None:
                return made
            self._unnamed = False  # a filesystem without O_TMPFILE (NFS, ...)
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
                raise self._failed(exc, size) from None
        try:
            mm = _made(fd, size, True, full)
        except BaseException:
            unlink(name)
            raise
        finally:
            os.close(fd)
        return name, mm

    def _failed(self, exc: OSError, size: int) -> BaseException:
        """What to raise when a new block's file cannot be opened."""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return self.full_error(size, exc.errno)
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            return out_of_descriptors(exc, "create a shared block")
        if exc.errno == errno.ENOENT and not os.path.lexists(self.directory):
            return FileNotFoundError(
                exc.errno,
                f"cannot create a block in the storage directory "
                f"{self.directory}: it no longer exists (removed while this "
                f"engine ran?). Its workers cannot be replaced either: close "
                f"this engine, and give the next one a storage= directory that "
                f"stays while it runs.",
            )
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.EROFS):
            return OSError(
                exc.errno,
                f"cannot create a block in the storage directory "
                f"{self.directory}: {exc.strerror}. Pass Engine(storage=...) "
                f"a directory you can write.",
            )
        return exc

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


def _gone(name: str) -> FileNotFoundError:
    """Block ``name`` (shm or file) has no name any more: why, and what to
    do.  A process that mapped it still can use it; nobody else can."""
    where = os.path.dirname(name) if kind_of(name) == "file" else SHM_DIR or "shared memory"
    if not os.path.isdir(where):
        why = (
            f"its storage directory {where} no longer exists. No new worker "
            f"can join the engine that made it: close that engine, and give "
            f"the next one a storage= directory that stays while it runs"
        )
    else:
        why = (
            f"it was unlinked from {where}: by its engine (closed, or the "
            f"array freed), or by hand or a cleaner (`rm`, `shmarray gc`) "
            f"while its engine ran"
        )
    return FileNotFoundError(errno.ENOENT, f"block {name!r} is gone: {why}")


def _open_file(name: str) -> int:
    try:
        fd = os.open(name, os.O_RDWR | _O_CLOEXEC | _O_NOFOLLOW)
    except FileNotFoundError:
        raise _gone(name) from None
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
        try:
            fd = _posixshmem.shm_open(name, os.O_RDWR, mode=0)
        except FileNotFoundError:
            raise _gone(name) from None
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
    """Whether block ``name`` can still be attached (it was not unlinked).
    A block of this process whose arrays have died is unlinked first
    (:func:`settle`)."""
    settle()
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
_TABLES_LOCK = threading.Lock()  # a set must not grow while another thread copies it
_PID = os.getpid()  # kept current by _after_fork_in_child: no system call per use
_log = logging.getLogger("shmarray")


def _tables() -> list[BlockTable]:
    with _TABLES_LOCK:
        return list(_TABLES)


def blocks_of_other_engines(array: np.ndarray, mine: BlockTable) -> Block | None:
    """The block of another live engine that holds ``array``, if any."""
    data = address_of(array)
    for table in _tables():
        if table is not mine and not table.closed:
            found = table.locate(data, data + max(array.nbytes, 1))
            if found is not None:
                return found
    return None


def settle() -> None:
    """Wait until every block of this process whose arrays have died is
    unlinked (:meth:`BlockTable.settle`): what this process then sees of
    its own blocks, in /dev/shm or anywhere, is current."""
    for table in _tables():
        table.settle()


class _Wake(weakref.ref):
    """A weak reference to a block's mapping whose death wakes the reaper,
    naming the table to reap (a weak reference to it)."""

    __slots__ = ("table",)
    table: weakref.ref


class _Reaper:
    """The thread that reaps blocks whose arrays died, one per process.

    A KeyboardInterrupt is raised only in the main thread, at any bytecode,
    and one raised inside a weakref callback or a finalizer is printed
    ("Exception ignored in ...") and lost, with whatever the callback had
    left to do: the unlink, the Release.  So a mapping's death runs no
    Python code at all: its two weak references call C functions,
    ``deque.append`` (the table's record of the dead) and
    ``SimpleQueue.put`` (this thread's wake-up), and the reaping is done
    later, by code that can be cut short anywhere and lose nothing
    (:meth:`BlockTable._reap`): here, where no signal is ever raised, at
    once; or by whichever thread first needs it done
    (:meth:`BlockTable.settle`).

    Started with the first block of a process, and again in a forked
    child, which starts with no thread and a fresh queue (the parent's
    blocks it inherited wake nobody there); a daemon, so it never keeps the
    interpreter alive.
    """

    def __init__(self) -> None:
        self.forget()

    def forget(self) -> None:
        """A fresh start; in a forked child, where the parent's thread and
        queue are not ours."""
        self.wake: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def running(self) -> None:
        """Start the thread unless it runs (a failure, at interpreter
        shutdown, leaves reaping to ``settle`` and ``close``)."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                thread = threading.Thread(target=self._run, name="shmarray-reaper", daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # "can't create new thread at interpreter shutdown"
                    return
                self._thread = thread

    def _run(self) -> None:
        while True:
            tables = {self.wake.get().table}
            # One wake-up per burst of deaths rather than per death: a
            # thread woken at once takes the GIL from the main thread at its
            # next system call, which doubled the cost of a loop of
            # `y = eng.zeros(n)` (the main thread reaps inline there).
            time.sleep(_REAP_DELAY)
            while True:
                try:
                    tables.add(self.wake.get_nowait().table)
                except queue.Empty:
                    break
            for ref in tables:
                table = ref()
                try:
                    if table is not None:
                        table._reap()
                except Exception:  # never die: later deaths need this thread
                    _log.exception("shmarray: reaping the blocks of dead arrays failed")
                del table


# Seconds the reaper lets deaths gather before it reaps them.
_REAP_DELAY = 0.005
_REAPER = _Reaper()


def _after_fork_in_child() -> None:
    """The parent's reaper may have held any of these locks at the fork."""
    global _PID, _TABLES_LOCK
    _PID = os.getpid()
    _REAPER.forget()
    _TABLES_LOCK = threading.Lock()
    for table in list(_TABLES):
        table._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


class BlockTable:
    """The coordinator's live blocks, indexed by the address they map at.

    One per engine.  Creates every block (``allocate``) and unlinks every
    name exactly once: once the last array over the block has died
    (``_reap``), or from ``close()``.  Holds no strong reference to any
    mapping, so memory lives exactly as long as the arrays do.

    A block's death is recorded by C code (``_dead``, see :class:`_Reaper`)
    and reaped under the lock by the reaper thread, or first by any method
    that needs it done (``settle``): every method that reads the index or
    the released names settles first, so a freed block's space is back
    before the next ``allocate``, as if the unlink had been synchronous.
    Reaping a block unlinks its name, records it for the workers' Release
    (``take_released``) and drops it from the index; each step can be done
    again harmlessly, and the record is dropped last, so a reaping cut
    short anywhere (a Ctrl-C in the main thread) is finished by the next.
    Between a death and its reaping the name stays in /dev/shm for a few
    milliseconds (the reaper gathers deaths for ``_REAP_DELAY``, then needs
    the GIL): this process's own views, ``exists`` and ``scan``, settle
    first.  (A memfd block's "unlink" closes its descriptor: a reaping cut
    between forgetting and closing it leaks that descriptor rather than
    ever closing a number that may have been reused.)

    CPython unmaps an mmap before the references are told, so a new block
    can be mapped over a dead one's addresses before the dead one is
    reaped: a new block therefore evicts every entry it overlaps, and a
    late reaping removes only the block it names.  A forked child's copy
    of a table reaps nothing: the parent owns the names.
    """

    def __init__(self, storage: Storage | None = None) -> None:
        self.storage = storage if storage is not None else ShmStorage()
        self._owner = _PID
        self._me = weakref.ref(self)
        self._lock = threading.Lock()
        self._starts: list[int] = []
        self._blocks: dict[int, Block] = {}
        # the reference that reports each live block's death -> (start,
        # name, the reference that wakes the reaper); both go with the entry
        self._pending: dict[weakref.ref, tuple[int, str, _Wake]] = {}
        self._dead: collections.deque[weakref.ref] = collections.deque()
        self._released: dict[str, None] = {}  # an ordered set: adding twice is harmless
        self._descriptors: dict = {}
        self.closed = False
        self.warned_copy = False  # a CopyWarning was shown for this engine
        self.on_create: Callable[[str], object] | None = (
            None  # told each new name that can leak (the watchdog)
        )
        with _TABLES_LOCK:
            _TABLES.add(self)

    @property
    def descriptors(self) -> dict:
        """A cache for ``descriptors.describe``, valid while no block dies:
        a dead block's addresses may be mapped again by a new one."""
        self.settle()
        if len(self._descriptors) > 4096:
            self._descriptors = {}
        return self._descriptors

    def allocate(self, nbytes: int) -> np.ndarray:
        """A new block; returns a uint8 array of ``nbytes`` over it."""
        _REAPER.running()
        with self._lock:
            if self.closed:
                raise EngineClosedError("this engine is closed; create a new one")
            self._reap_locked()  # the space of blocks that died is free again
            name, mm = self.storage.create(nbytes)
            buf = np.frombuffer(mm, dtype=np.uint8)
            start = address_of(buf)
            # Its death is told by C callbacks only (see _Reaper), set up
            # first so that close() knows the name whatever comes next.
            # CPython calls the newest reference's callback first: the
            # death is recorded before the reaper is woken.
            wake = _Wake(mm, _REAPER.wake.put)
            wake.table = self._me
            self._pending[weakref.ref(mm, self._dead.append)] = (start, name, wake)
            if self.on_create is not None and self.storage.leaks:
                self.on_create(name)
            self._evict(start, start + len(mm))
            self._blocks[start] = Block(name, len(mm), start)  # before _starts: see _forget
            bisect.insort(self._starts, start)
        return buf[:nbytes]

    def settle(self) -> None:
        """Reap every block whose arrays have died, if the reaper has not
        yet: their names are unlinked, recorded and out of the index when
        this returns (or raises: a Ctrl-C here leaves the rest to the next
        reaping, and loses nothing)."""
        if self._dead and _PID == self._owner:
            self._reap()

    def _reap(self) -> None:
        with self._lock:
            self._reap_locked()

    def _reap_locked(self) -> None:
        """Reap each recorded death: unlink, record the Release, forget.
        Every step may be cut short and done again (the unlink of a gone
        name is a no-op, ``_released`` is a set, ``_forget`` checks); the
        entry and then the record go last."""
        if not self._dead or _PID != self._owner:
            return  # nothing died, or a forked child's copy: the parent owns the names
        while self._dead:
            ref = self._dead[0]
            entry = self._pending.get(ref)
            if entry is not None:  # else reaped already, or close() unlinked it
                start, name, _ = entry
                try:
                    self.storage.unlink(name)
                except OSError as exc:
                    _log.warning("shmarray: could not unlink block %s: %s", name, exc)
                self._released[name] = None
                self._forget(start, name)
                self._pending.pop(ref, None)
            if self._dead and self._dead[0] is ref:
                self._dead.popleft()

    def _forget(self, start: int, name: str) -> None:
        """Drop block ``name`` at ``start`` from the index, if it is still
        there; ``_starts`` first, so a cut leaves nothing ``locate`` sees."""
        block = self._blocks.get(start)
        if block is not None and block.name == name:  # else a newer block is there
            i = bisect.bisect_left(self._starts, start)
            if i < len(self._starts) and self._starts[i] == start:
                self._starts.pop(i)
            del self._blocks[start]
        self._descriptors = {}

    def _evict(self, lo: int, hi: int) -> None:
        """Forget blocks over [lo, hi): they are unmapped, whatever their
        reaping has done so far."""
        i = bisect.bisect_right(self._starts, lo) - 1
        if (
            i < 0
            or self._blocks[self._starts[i]].address + self._blocks[self._starts[i]].size <= lo
        ):
            i += 1  # the block before lo ends before it
        while i < len(self._starts) and self._starts[i] < hi:
            self._blocks.pop(self._starts.pop(i), None)
            self._descriptors = {}

    def locate(self, lo: int, hi: int) -> Block | None:
        """The live block holding bytes [lo, hi), if any."""
        with self._lock:
            self._reap_locked()
            i = bisect.bisect_right(self._starts, lo) - 1
            if i < 0:
                return None
            block = self._blocks[self._starts[i]]
            return block if hi <= block.address + block.size else None

    def has_released(self) -> bool:
        """Whether blocks died since the last ``take_released``."""
        return bool(self._released or self._dead)

    def take_released(self) -> tuple[str, ...]:
        """Names unlinked since the last call: workers should unmap them."""
        with self._lock:
            self._reap_locked()
            out = tuple(self._released)
            self._released.clear()
            return out

    def live(self) -> list[Block]:
        with self._lock:
            self._reap_locked()
            return [self._blocks[s] for s in self._starts]

    def close(self) -> list[str]:
        """Unlink every name not unlinked yet, of the blocks still in use
        and of those whose arrays died a moment ago alike; returns them.
        Mappings stay with their arrays, and their deaths are no longer
        reported."""
        with self._lock:
            self.closed = True
            names = []
            for _, name, _ in self._pending.values():
                if self.storage.unlink(name):
                    names.append(name)
            self._pending.clear()  # the references go, and with them their callbacks
            self._starts.clear()
            self._blocks.clear()
            self._released.clear()
            self._descriptors = {}
            return names


# -- Blocks of every process, for `shmarray ls` / `shmarray gc` -------------


@dataclass(frozen=True)
class BlockInfo:
    """A shmarray block found in the shared-memory filesystem (or in a
    storage directory).

    ``owner_alive`` is the verdict ``shmarray ls`` shows and ``shmarray
    gc`` obeys (:func:`owner_alive`): True when a process holds the block's
    lock or its creator (the pid in its name) is alive, False when neither,
    None when this user cannot tell (another user's block)."""

    name: str
    size: int
    owner_pid: int
    owner_alive: bool | None
    uid: int
    age: float  # seconds since it was made (or last changed: its ctime)


def _boot_time() -> float:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime"):
                return float(line.split()[1])
    raise OSError("no btime in /proc/stat")


def _proc_stat(pid: int) -> tuple[str, float]:
    """(state, start time in seconds since the epoch) of process ``pid``
    from /proc; raises OSError if there is none."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    try:
        return fields[0], _boot_time() + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (IndexError, ValueError) as exc:
        raise OSError(f"cannot read /proc/{pid}/stat: {exc}") from None


def process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), if known."""
    if not _HAVE_PROC:
        return None
    try:
        return _proc_stat(pid)[1]
    except OSError:
        return None


# /proc counts a process's start in clock ticks since boot, and gives the
# boot time (btime) in whole seconds, which also moves a little when the
# clock is set: a process that seems to have started up to this long after
# a block was made may still be its creator, and is taken for it.
_START_SLACK = 2.0


def creator_alive(pid: int, made: float) -> bool:
    """Whether process ``pid`` is alive and started before ``made`` (seconds
    since the epoch; a block's ctime), give or take :data:`_START_SLACK`:
    whether the creator of a block made then, whose name says ``pid``,
    may still live.  A process that started later only reuses the pid.  In
    doubt (cannot look), True.  Without /proc: ``kill(pid, 0)``, no time
    check."""
    if not _HAVE_PROC:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        state, started = _proc_stat(pid)
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return True
    if state in ("Z", "X"):  # exited, not yet reaped: holds nothing
        return False
    return started <= made + _START_SLACK


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


def owner_alive(name: str, made: float) -> bool | None:
    """Liveness of block ``name`` made at ``made`` (its ctime), by the
    process's own word, never by age: True if a process holds its lock or
    its creator is alive (:func:`creator_alive`); False if neither; None if
    the lock cannot be tested (another user's block) and the creator is not
    alive.

    Both tests, because each has a gap the other closes.  Where a block is
    named before it is locked (no ``O_TMPFILE``: macOS, NFS), its creator
    is alive in between; the lock holds across pid namespaces, where the
    pid in a name means nothing.  A dead verdict cannot turn: a dead
    creator takes no lock, and nobody else holds one (a probe like this
    one takes it for a moment, and then reads as a holder: kept)."""
    held = lock_held(name)
    if held:
        return True
    pid = owner_of(name)
    if pid is not None and creator_alive(pid, made):
        return True
    return held


def scan(directory: str | None = None, pids: Iterable[int] | None = None) -> list[BlockInfo]:
    """Every shmarray block in the shared-memory filesystem, or in
    ``directory`` (blocks of ``storage=directory``), sorted by name; only
    those created by ``pids``, if given.

    Only regular files with names of shmarray's own form are considered;
    anything else there is never listed and never touched.  Blocks of this
    process whose arrays have died are unlinked first (:func:`settle`).
    """
    where = SHM_DIR if directory is None else directory
    if where is None:
        return []
    settle()
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
        alive = owner_alive(name, st.st_ctime)
        found.append(BlockInfo(name, st.st_size, pid, alive, st.st_uid, time.time() - st.st_ctime))
    return sorted(found, key=lambda b: b.name)


# Not a test of liveness (owner_alive is): an extra margin, by default, for
# blocks whose owner is already judged dead.
GC_MIN_AGE = 5.0


def collect_orphans(
    min_age: float = GC_MIN_AGE,
    directory: str | None = None,
    pids: Iterable[int] | None = None,
) -> list[BlockInfo]:
    """Unlink this user's shmarray blocks (in /dev/shm, or in ``directory``;
    only those created by ``pids``, if given) whose owner is dead: no
    process holds the block's lock and its creator (the pid in its name)
    is not a live process that started before the block was made
    (:func:`owner_alive`).  Returns those removed.

    A block whose creator is alive is never removed, whatever ``min_age``
    says; ``min_age`` only spares dead owners' blocks younger than that
    many seconds.  In doubt (another user's block, cannot look), leave it.
    """
    removed = []
    for info in scan(directory, pids):
        # A dead verdict stays true until the unlink (see owner_alive).
        if (
            info.owner_alive is False
            and info.uid == os.getuid()
            and info.age >= min_age
            and unlink(info.name)
        ):
            removed.append(info)
    return removed
