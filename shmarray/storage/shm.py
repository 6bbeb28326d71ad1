"""``storage="shm"``, the default: named POSIX shared memory in /dev/shm
(:class:`ShmStorage`).

The coordinator makes and unlinks its blocks here; workers attach them by
name (:func:`shmarray.blocks.attach`).  What this kind needs of the system
(``SHM_DIR``, ``O_TMPFILE``, ``_posixshmem``) is decided once, at import,
in :mod:`shmarray.storage.base`.
"""

from __future__ import annotations

import errno
import mmap
import os

from shmarray.errors import SharedMemoryFullError
from shmarray.storage.base import (
    _ELSEWHERE,
    _O_TMPFILE,
    MODE,
    SHM_DIR,
    Storage,
    _made_named,
    _made_unnamed,
    _posixshmem,
    format_bytes,
    free_space,
    new_name,
    out_of_descriptors,
    unlink,
)


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
        return _made_named(fd, name, size, lambda _: self.full_error(size), unlink)

    def _failed(self, exc: OSError, size: int) -> BaseException:
        """What to raise when a new block's file cannot be opened."""
        if exc.errno == errno.ENOSPC:  # no inode left (nr_inodes)
            return self.full_error(size, inodes=True)
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            return out_of_descriptors(exc, "create a shared block")
        return exc

    def unlink(self, name: str) -> bool:
        return unlink(name)
