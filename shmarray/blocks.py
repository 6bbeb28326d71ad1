"""Shared blocks: create, attach, unmap, unlink; and where they live.

A block is one shared segment per allocation, in the engine's storage
(``Engine(storage=...)``: ``"shm"``, the default, ``"memfd"`` or a
directory; the kinds and the names they give their blocks are tabled in
:mod:`shmarray.storage`).  A block's name says which kind made it, so any
process attaches a block by its name alone.

Where each part lives
---------------------
This module opens a block by its name, from any process (:func:`attach`,
:func:`exists`), and lets a reader drop the pages it is done with
(:func:`drop_pages`).  It re-exports the rest, so that every ``blocks.X``
of before the split still works:

* :mod:`shmarray.storage`: where blocks live, the :class:`Storage`
  contract and one module per kind, which creates (and, for a memfd block,
  ends) blocks; :mod:`shmarray.storage.base` also holds block names, the
  space probes and :func:`unlink`.
* :mod:`shmarray.blocktable`: the coordinator's live blocks
  (:class:`BlockTable`), the reaper thread, :func:`settle`.
* :mod:`shmarray.orphans`: blocks of every process, for ``shmarray ls`` /
  ``gc`` (:func:`scan`, :func:`owner_alive`, :func:`collect_orphans`).

Imports go one way, each module importing only those listed before it:
``storage``, ``blocktable``, ``orphans``, ``blocks``.

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

Everything about blocks that depends on the operating system or the
Python version is decided once, at import, in :mod:`shmarray.storage.base`.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat

# Re-exported ("X as X"): every name that lived here before storage,
# blocktable and orphans were split out stays importable as blocks.X.
from shmarray.blocktable import (
    Block as Block,
    BlockTable as BlockTable,
    address_of as address_of,
    blocks_of_other_engines as blocks_of_other_engines,
    settle as settle,
)
from shmarray.orphans import (
    GC_MIN_AGE as GC_MIN_AGE,
    BlockInfo as BlockInfo,
    collect_orphans as collect_orphans,
    creator_alive as creator_alive,
    lock_held as lock_held,
    owner_alive as owner_alive,
    process_start_time as process_start_time,
    scan as scan,
)
from shmarray.storage import (
    DirStorage as DirStorage,
    MemfdStorage as MemfdStorage,
    ShmStorage as ShmStorage,
    Storage as Storage,
    hugepages,
    storage_for as storage_for,
)
from shmarray.storage.base import (
    _MADV_DONTNEED,
    _MEMFD_RE,
    _MMAP_KWARGS,
    _O_CLOEXEC,
    _O_NOFOLLOW,
    _O_TMPFILE as _O_TMPFILE,  # tests read it
    HAVE_MEMFD as HAVE_MEMFD,
    HAVE_PREADV as HAVE_PREADV,
    MEMFD_PREFIX as MEMFD_PREFIX,
    MODE as MODE,
    PREFIX as PREFIX,
    SHM_DIR as SHM_DIR,
    STORAGE_KINDS as STORAGE_KINDS,
    _map,
    _posixshmem,
    format_bytes as format_bytes,
    free_space as free_space,
    kind_of as kind_of,
    memory_available as memory_available,
    new_name as new_name,
    out_of_descriptors as out_of_descriptors,
    owner_of as owner_of,
    unlink as unlink,
)


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
        mm = _map(fd, os.fstat(fd).st_size, **_MMAP_KWARGS)
        if hugepages.given(fd):
            hugepages.advise(mm)  # so this process maps the huge pages whole
        return mm
    finally:
        os.close(fd)


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
