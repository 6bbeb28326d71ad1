"""Blocks of every process, for ``shmarray ls`` / ``shmarray gc``.

:func:`scan` finds shmarray's blocks in the shared-memory filesystem or in
a storage directory; :func:`owner_alive` judges whether a block's owner
lives, by the process's own word (a lock it holds; its pid, with the time
it started), never by age; :func:`collect_orphans` removes the blocks of
dead owners.  What this needs of the system (``SHM_DIR``, /proc) is
decided once, at import, in :mod:`shmarray.storage.base`.
"""

from __future__ import annotations

import fcntl
import os
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass

from shmarray.blocktable import settle
from shmarray.storage.base import (
    _HAVE_PROC,
    _O_CLOEXEC,
    _O_NOFOLLOW,
    SHM_DIR,
    kind_of,
    owner_of,
    unlink,
)


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
