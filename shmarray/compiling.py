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
gives to every worker it starts (``open_lock``; the Pool closes its copy
when it closes).  Before a worker first runs a job of a jitted kernel, it
compiles the kernel for the first chunk's argument types with a POSIX
record lock on that file held (``compile_first``).  The first worker to get
the lock compiles and writes the cache; the others find the signature
there and load it.  Those that find it compiled in their own process
already skip the lock.

The lock's owner is the process: the kernel drops it when the worker exits
or is killed, so a worker killed while compiling holds no one up.  A worker
waits for the lock in the kernel, as it would wait for its own compile; a
worker stopped (SIGSTOP) while it holds the lock holds up the others as a
stopped worker holds up the map, and the map's early end, which kills
every worker of the round, frees them all.
"""

from __future__ import annotations

import fcntl
import os
import tempfile

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


def compile_first(lock_fd: int, kernel, args: tuple) -> None:
    """Compile ``kernel`` (a numba dispatcher with ``cache=True``) for the
    types of ``args`` as a call with them would, holding the lock on
    ``lock_fd`` (-1: no lock), unless this process has that signature
    compiled already.  A kernel that caches nothing on disk is left to
    compile in its call, in every worker at once, as before.  An argument
    numba cannot type, or a compile that fails, is left to the call itself,
    which raises what it would have raised."""
    try:
        if kernel.stats.cache_path is None:
            return  # no cache on disk: nothing to race for
        sig = tuple(numba.typeof(a) for a in args)
    except Exception:
        return
    if sig in kernel.overloads:
        return
    locked = False
    try:
        if lock_fd >= 0:
            fcntl.lockf(lock_fd, fcntl.LOCK_EX, 1, 0)
            locked = True
        kernel.compile(sig)
    except Exception:
        pass  # the call compiles again and raises
    finally:
        if locked:
            fcntl.lockf(lock_fd, fcntl.LOCK_UN, 1, 0)
