"""Transparent huge pages for shared blocks, where the kernel gives them.

NumPy asks the kernel for transparent huge pages (2 MiB) for its private
arrays; shared memory gets them only where the system allows it:

* memfd blocks live on the kernel's internal shmem mount, governed by
  ``/sys/kernel/mm/transparent_hugepage/shmem_enabled``: ``always``,
  ``within_size`` and ``advise`` (with ``madvise(MADV_HUGEPAGE)``) give
  them, ``never`` and ``deny`` do not;
* a tmpfs (``/dev/shm``, or a directory given as storage) follows its
  mount's ``huge=`` option (``never`` when absent);
* ``force`` gives them to every shmem file, ``deny`` to none.

Where they would be given, a new block is mapped, advised and populated
through its mapping, in that order: the kernel decides a page's size when
it first allocates it, and only a fault in an advised mapping allocates a
huge one (``fallocate`` first would give small pages for good).
``MADV_POPULATE_WRITE`` (Linux 5.14) reports a full filesystem as an error
where a first touch would raise SIGBUS; older kernels reserve with
``fallocate`` as elsewhere.  Every process that maps a block advises its
own mapping too, so its page tables map the huge pages whole.

This module only reads the settings; changing them is root's (``shmarray
info`` prints the one-line fix).  Nothing here raises: a system without
transparent huge pages, ``/proc`` or ``madvise`` gets small pages.
"""

from __future__ import annotations

import errno
import functools
import mmap
import os

SHMEM_ENABLED = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)
# Linux's value; Python's mmap module names it only when built against
# headers that have it.
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
_GIVING = ("always", "within_size", "advise")
FIX_MEMFD = f"echo advise | sudo tee {SHMEM_ENABLED}"


def shmem_enabled() -> str | None:
    """The kernel's shmem setting (the bracketed word of
    :data:`SHMEM_ENABLED`), or None where there is none."""
    try:
        with open(SHMEM_ENABLED) as f:
            words = f.read().split()
    except OSError:
        return None
    return next((w[1:-1] for w in words if w.startswith("[")), None)


@functools.lru_cache(maxsize=16)
def _tmpfs_huge(dev: int) -> str | None:
    """The ``huge=`` option of the tmpfs mounted as device ``dev``
    (``"never"`` where it has none), or None if ``dev`` is no tmpfs mount
    of this process's mount namespace (memfd's internal mount is not).
    Read once per device and process: a remount takes effect for engines
    of processes started after it (``shmem_enabled`` is read every time)."""
    major, minor = os.major(dev), os.minor(dev)
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        # id parent major:minor root point options ... - fstype source super
        fields = line.split()
        if len(fields) < 3 or fields[2] != f"{major}:{minor}" or " - " not in line:
            continue
        after = line.split(" - ", 1)[1].split()
        if not after or after[0] != "tmpfs":
            return None
        for option in (after[2] if len(after) > 2 else "").split(","):
            if option.startswith("huge="):
                return option[5:]
        return "never"
    return None


def _is_memfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")
    except OSError:
        return False


def given(fd: int) -> bool:
    """Whether the kernel would back the shared file ``fd`` with huge pages
    in an advised mapping."""
    if _MADV_HUGEPAGE is None:
        return False
    setting = shmem_enabled()
    if setting is None or setting == "deny":
        return False
    try:
        huge = _tmpfs_huge(os.fstat(fd).st_dev)
    except OSError:
        return False
    if huge is not None:  # a tmpfs mount: its own huge= decides
        return setting == "force" or huge in _GIVING
    if _is_memfd(fd):
        return setting == "force" or setting in _GIVING
    return False  # a disk filesystem


def advise(mapping: mmap.mmap) -> None:
    """Ask for huge pages for ``mapping`` (silent where refused)."""
    if _MADV_HUGEPAGE is not None:
        try:
            mapping.madvise(_MADV_HUGEPAGE)
        except OSError:
            pass


def populate(mapping: mmap.mmap) -> bool:
    """Allocate ``mapping``'s pages now, through it (so advised ones come
    huge).  False where this kernel cannot (before 5.14): the caller
    reserves otherwise.  A full filesystem or memory raises OSError with
    ENOSPC."""
    try:
        mapping.madvise(MADV_POPULATE_WRITE)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        if exc.errno in (errno.EFAULT, errno.ENOMEM):
            # EFAULT: a page would have raised SIGBUS (no space left).
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
        raise
    return True


def report(shm_dir: str | None) -> dict:
    """Whether shared memory gets huge pages here, for ``shmarray info``:
    the shmem setting, ``/dev/shm``'s ``huge=``, and the fix for each kind
    that gets none."""
    setting = shmem_enabled()
    memfd = setting is not None and (setting == "force" or setting in _GIVING)
    shm_huge = None
    if shm_dir is not None:
        try:
            shm_huge = _tmpfs_huge(os.stat(shm_dir).st_dev)
        except OSError:
            shm_huge = None
    shm = (
        setting is not None
        and setting != "deny"
        and (setting == "force" or (shm_huge or "never") in _GIVING)
    )
    if _MADV_HUGEPAGE is None:
        memfd = shm = False
    fixes = {}
    if setting is not None and not memfd:
        fixes["memfd"] = FIX_MEMFD
    if setting is not None and shm_dir is not None and not shm:
        fixes["shm"] = f"sudo mount -o remount,huge=advise {shm_dir}"
    return {
        "shmem_enabled": setting,
        "shm_huge": shm_huge,
        "memfd": memfd,
        "shm": shm,
        "fixes": fixes,
    }
