"""``storage="/a/directory"``: files in a directory, mapped shared
(:class:`DirStorage`).

The coordinator makes and unlinks its blocks here; workers attach them by
path (:func:`shmarray.blocks.attach`).  What this kind needs of the system
(``O_TMPFILE``, ``O_NOFOLLOW``, fallocate) is decided once, at import, in
:mod:`shmarray.storage.base`.
"""

from __future__ import annotations

import errno
import mmap
import os

from shmarray.errors import SharedMemoryFullError
from shmarray.storage.base import (
    _O_CLOEXEC,
    _O_NOFOLLOW,
    _O_TMPFILE,
    MODE,
    Storage,
    _made_named,
    _made_unnamed,
    format_bytes,
    free_space,
    new_name,
    out_of_descriptors,
    unlink,
)


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
        return _made_named(fd, name, size, full, unlink)

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
