"""A kernel's first compile in the workers, one worker at a time.

numba's on-disk cache (``cache=True``) is not safe for processes that
compile one function at the same moment: a process writes the cache's index
before the compiled code the index names, so another process that reads the
new index in between loads the file an older numba or an older source left
under that name (numba issues #4807 and #10128: "LLVM bitcode parsing
error", segfaults).  An engine's workers all meet a kernel's new signature
in the same map, so by design they would race there, on every fresh cache,
after every edit of the kernel's file and every upgrade of numba.

So each engine has one lock: a file with no name that the Pool makes and
gives to every worker it starts, a copy each (``open_lock``; the Pool
closes its own when it closes).  Before a worker first runs a job of a
jitted kernel, it compiles the kernel for the first chunk's argument types
with a POSIX record lock on the file's first byte held
(``compile_first``).  The first worker to get the lock compiles and writes
the cache; the others find the signature there and load it.  Those that
find it compiled in their own process already skip the lock, and so do
all of them once the file's table says the ordering gains nothing (a
kernel numba compiles but does not cache).  ``prepare(in_caller=True)``
compiles the caller's share in the caller the same way, before any
worker meets it.

The lock's owner is the process: the kernel drops it when the worker exits
or is killed, so a worker killed while compiling holds no one up.  A worker
waits for the lock in the kernel, as it would wait for its own compile; a
worker stopped (SIGSTOP) while it holds the lock holds up the others as a
stopped worker holds up the map, and the map's early end, which kills
every worker of the round, frees them all.
"""

from __future__ import annotations

import fcntl
import inspect
import os
import tempfile
import zlib

import numba


def open_lock() -> int:
    """A new lock file's descriptor, not inherited (the launcher passes it
    on by hand): a temporary file unlinked as it is made, so nothing is
    left behind.  -1 if none can be made: the workers then compile as
    numba alone would, all at once."""
    try:
        with tempfile.TemporaryFile() as f:
            return os.dup(f.fileno())
    except OSError:
        return -1


# What the lock file says of a kernel's signature: one byte of a table after
# the lock's own byte, found by a hash of the kernel's code and the
# signature (two that share a byte lose some ordering, never a result).
# UNORDERED: a second worker compiled it again (numba declines to cache some
# functions: dynamic globals, lifted loops) or compiling it failed, so the
# workers still to come gain nothing by waiting their turn.
_SLOTS = 4096
_UNSEEN, _COMPILED, _UNORDERED = 0, 1, 2


def compile_first(lock_fd: int, kernel, args: tuple) -> None:
    """Compile ``kernel`` (a numba dispatcher with ``cache=True``) for the
    types of ``args`` as a call with them would, holding the lock on
    ``lock_fd``, unless this process has that signature compiled already.
    Left to the call itself, in every worker at once as numba alone would:
    a kernel that caches nothing on disk, one whose parameters have
    defaults or ``*args`` (the call types those its own way), arguments
    numba cannot type, and a signature the table says UNORDERED.  A
    compile that fails is left to the call too, which raises what it would
    have raised."""
    try:
        if lock_fd < 0 or kernel.stats.cache_path is None:
            return  # no lock, or no cache on disk: nothing to race for
        func = kernel.py_func
        code = func.__code__
        if code.co_argcount != len(args) or code.co_flags & _STAR_ARGS or code.co_kwonlyargcount:
            return
        sig = tuple(numba.typeof(a) for a in args)
        if sig in kernel.overloads:
            return
        key = f"{code.co_filename}:{code.co_firstlineno}:{func.__qualname__}:{sig}"
        slot = 1 + zlib.crc32(key.encode()) % _SLOTS
        if _state(lock_fd, slot) == _UNORDERED:
            return
        fcntl.lockf(lock_fd, fcntl.LOCK_EX, 1, 0)
    except Exception:
        return
    try:
        state = _state(lock_fd, slot)
        if state == _UNORDERED:
            return
        before = _misses(kernel)
        try:
            kernel.compile(sig)
        except Exception:
            state = _UNORDERED  # the call compiles again and raises
        else:
            if state == _UNSEEN:
                state = _COMPILED
            elif _misses(kernel) > before:
                state = _UNORDERED  # compiled twice: the cache keeps nothing of it
        os.pwrite(lock_fd, bytes((state,)), slot)
    except OSError:
        pass
    finally:
        try:
            fcntl.lockf(lock_fd, fcntl.LOCK_UN, 1, 0)
        except OSError:
            pass  # closed meanwhile (an engine closed as it prepared a map)


_STAR_ARGS = inspect.CO_VARARGS | inspect.CO_VARKEYWORDS


def _state(lock_fd: int, slot: int) -> int:
    got = os.pread(lock_fd, 1, slot)
    return got[0] if got else _UNSEEN


def _misses(kernel) -> int:
    return sum(kernel.stats.cache_misses.values())
