"""What every storage kind shares: the :class:`Storage` contract, block
names, the space probes, and the making of a block (reserve, lock, map).

Everything that depends on the operating system or the Python version is
decided here, once, at import (the constants below the imports), for all
of shmarray's blocks: the storage kinds, :mod:`shmarray.blocks` and
:mod:`shmarray.orphans` import what they need of it and decide nothing
themselves.  This module imports nothing of shmarray's but ``cgroups``
and ``storage.hugepages``.
"""

from __future__ import annotations

import abc
import errno
import fcntl
import mmap
import os
import re
import secrets
import sys
from collections.abc import Callable

from shmarray import cgroups
from shmarray.storage import hugepages

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
    ``full(errno)`` is the error when its space cannot be reserved.  Where
    the kernel gives shared memory huge pages, the block is mapped and
    advised first and reserved through its mapping (see
    :mod:`shmarray.storage.hugepages`)."""
    if lock:
        # The lock belongs to the open file, which the mapping keeps (mmap
        # holds a duplicate of the descriptor): it lasts as long as the
        # mapping, and a dead process holds none.
        fcntl.flock(fd, fcntl.LOCK_SH)
    huge = hugepages.given(fd)
    try:
        if huge:
            os.ftruncate(fd, size)
        else:
            _reserve(fd, size)
    except OSError as exc:
        if exc.errno in _FULL:
            raise full(exc.errno) from None
        raise
    try:
        mm = _map(fd, size)  # keeps a duplicate descriptor before 3.13
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            raise out_of_descriptors(exc, "map a shared block") from None
        raise
    if huge:
        try:
            hugepages.advise(mm)
            if not hugepages.populate(mm):
                _reserve(fd, size)
        except BaseException as exc:
            mm.close()
            if isinstance(exc, OSError) and exc.errno in _FULL:
                raise full(exc.errno) from None
            raise
    return mm


def _made_named(
    fd: int, name: str, size: int, full, unlink: Callable[[str], object]
) -> tuple[str, mmap.mmap]:
    """``_made`` for a block whose file already has its name (locked a
    moment after it was named): a failure unlinks the name; the descriptor
    is closed either way (the mapping keeps its own)."""
    try:
        mm = _made(fd, size, True, full)
    except BaseException:
        unlink(name)
        raise
    finally:
        os.close(fd)
    return name, mm


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
        try:
            while True:
                path = os.path.join(directory, new_name()[1:])
                try:
                    # linkat(AT_SYMLINK_FOLLOW), which os.link calls only
                    # when given a directory descriptor (else link(2), which
                    # would link the /proc symlink itself); an absolute path
                    # ignores it.
                    os.link(f"/proc/self/fd/{fd}", path, src_dir_fd=fd)
                    return path, mm
                except FileExistsError:  # 64 random bits: never, but be correct
                    continue
                except OSError as exc:
                    if exc.errno in _FULL:
                        raise full(exc.errno) from None
                    raise
        except BaseException:
            mm.close()  # its own descriptor too, not left to the traceback
            raise
    finally:
        os.close(fd)


class Storage(abc.ABC):
    """Where one engine's blocks live: the contract every kind fulfils.

    One per engine, made by :func:`storage_for` and held by the engine's
    BlockTable (its arrays) and Pool (the control block).  Only the
    coordinator calls it: ``create`` makes and maps a block, ``unlink``
    ends it once (the mappings stay with their arrays).  Workers attach by
    name with :func:`shmarray.blocks.attach`, which needs no Storage.
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
