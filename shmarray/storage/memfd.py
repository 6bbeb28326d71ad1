"""``storage="memfd"``: anonymous shared memory, Linux only
(:class:`MemfdStorage`).

The coordinator makes its blocks here and keeps their descriptors; a
worker opens one through ``/proc/<pid>/fd/<fd>`` by the block's name
(:func:`shmarray.blocks.attach`).  Whether this kind exists here
(``HAVE_MEMFD``) is decided once, at import, in
:mod:`shmarray.storage.base`.
"""

from __future__ import annotations

import errno
import mmap
import os

from shmarray.errors import SharedMemoryFullError
from shmarray.storage.base import (
    _MFD_FLAGS,
    MEMFD_PREFIX,
    Storage,
    _made,
    format_bytes,
    memory_available,
    out_of_descriptors,
)


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
