"""Where blocks live (``Engine(storage=...)``): one module per kind.

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

The kinds: :mod:`~shmarray.storage.shm`, :mod:`~shmarray.storage.memfd`
and :mod:`~shmarray.storage.directory`, a module each.  The contract they
fulfil and what they share (block names, space probes, the making of a
block, the unlink of a named one) is :mod:`~shmarray.storage.base`, where
everything that depends on the operating system or the Python version is
decided, once, at import.  Only the coordinator makes and ends blocks; a
worker attaches one by its name alone (:func:`shmarray.blocks.attach`),
with no Storage.  Nothing here imports :mod:`shmarray.blocks`.
"""

from __future__ import annotations

from shmarray.storage.base import Storage
from shmarray.storage.directory import DirStorage
from shmarray.storage.memfd import MemfdStorage
from shmarray.storage.shm import ShmStorage

__all__ = ["DirStorage", "MemfdStorage", "ShmStorage", "Storage", "storage_for"]


def storage_for(spec: str) -> Storage:
    """The Storage for a checked ``storage=`` value (``options.coerce_storage``)."""
    if spec == "shm":
        return ShmStorage()
    if spec == "memfd":
        return MemfdStorage()
    return DirStorage(spec)
