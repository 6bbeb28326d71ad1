"""The exceptions shmarray raises itself.

A kernel's own exception is not wrapped: it reaches the caller with its
original type, and the worker's traceback rides along as ``__cause__``
(a :class:`RemoteTraceback`), as in ``concurrent.futures.process``.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any


class ShmarrayError(Exception):
    """Base class of every error shmarray raises on its own account.

    A kernel's own exception is not one: it reaches the caller as itself.
    """


class EngineClosedError(ShmarrayError, ValueError):
    """The engine was used after ``close()``.

    Also what a map running when ``close()`` came ends with.  A
    ``ValueError``, as for a closed file.
    """


class SharedMemoryFullError(ShmarrayError, MemoryError):
    """The engine's storage cannot hold the requested block: /dev/shm, the
    machine's memory (``storage="memfd"``) or a directory's disk.

    Attributes
    ----------
    requested : int
        Bytes asked for.
    free : int
        Bytes free there when it was asked.
    path : str or None
        The filesystem that is full (``/dev/shm`` or the directory); None for
        memfd, or where there is no shared-memory filesystem.
    storage : str
        The engine's ``storage=``.
    """

    def __init__(
        self, message: str, requested: int, free: int, path: str | None, storage: str = "shm"
    ):
        super().__init__(message)
        self.requested = requested
        self.free = free
        self.path = path
        self.storage = storage

    def __reduce__(self):
        return type(self), (str(self), self.requested, self.free, self.path, self.storage)


class WorkerCrashedError(ShmarrayError):
    """A worker process died while it held a chunk.

    The worker was replaced; the engine stays usable.  The message names
    the signal or exit code, and the chunk's rows.

    Attributes
    ----------
    pid : int
        The dead worker's process id.
    exitcode : int or None
        Its exit code (minus the signal number if a signal killed it); None
        if it was not known yet.
    rows : tuple of (int, int) or None
        The rows ``(lo, hi)`` of the chunk it was running, if known.
    """

    def __init__(self, message: str, pid: int, exitcode: int | None, rows: tuple[int, int] | None):
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode
        self.rows = rows

    def __reduce__(self):
        return type(self), (str(self), self.pid, self.exitcode, self.rows)


class TaskTimeoutError(ShmarrayError, TimeoutError):
    """A map or reduce ran past its ``timeout``; its busy workers were replaced.

    Attributes
    ----------
    timeout : float
        The ``timeout`` it ran past, in seconds.
    """

    def __init__(self, message: str, timeout: float):
        super().__init__(message)
        self.timeout = timeout

    def __reduce__(self):
        return type(self), (str(self), self.timeout)


class MapCancelledError(ShmarrayError, concurrent.futures.CancelledError):
    """A submitted map was stopped while it ran; its workers were replaced.

    What ``MapFuture.stop()`` ends a running map with: a
    ``concurrent.futures.CancelledError``.
    """


class WorkerStartError(ShmarrayError):
    """A worker process did not come up.

    Attributes
    ----------
    remote_traceback : str or None
        The worker's traceback as text, when it raised while starting
        (in its initializer, or importing the worker code).
    """

    remote_traceback: str | None = None


class KernelError(ShmarrayError):
    """A kernel raised an exception that could not be sent back as itself.

    It stands in for an exception that cannot be pickled; the message holds
    the original's type and text, and ``__cause__`` the worker's traceback.

    Attributes
    ----------
    type_name : str
        The name of the original exception's type.
    """

    def __init__(self, message: str, type_name: str):
        super().__init__(message)
        self.type_name = type_name

    def __reduce__(self):
        return type(self), (str(self), self.type_name)


class RaceError(ShmarrayError, ValueError):
    """A race check (``check=True``, ``SHMARRAY_CHECK=1``) found the kernel
    writing outside its rows, reading what another chunk writes, or
    depending on the chunking.

    The arrays hold what one run of the kernel over the whole array (a
    sequential run) leaves, unless the kernel writes past the end of its
    view (then it is not run again, and the arrays are as they were).

    Attributes
    ----------
    report : CheckReport
        What the check found (``str(report)`` reads as a list).
    """

    def __init__(self, report, sequential: bool = True):
        then = (
            "The arrays hold what the kernel run once over the whole array leaves "
            "(a sequential run)."
            if sequential
            else "The arrays are as they were: the kernel writes past the end of its "
            "view, which past the end of the whole array is not the array's memory."
        )
        super().__init__(
            f"{report}\n{then} See 'Finding races in your kernel' in the documentation."
        )
        self.report = report


class PythonKernelWarning(UserWarning):
    """A kernel that is a plain Python function with a loop: every chunk
    runs in the interpreter, typically 10 to 100 times slower than the same
    loop compiled with numba's ``@njit``.

    Shown once per kernel.  A kernel that only calls NumPy (no Python
    loop) is not warned about.  Silence it with
    ``warnings.filterwarnings("ignore", category=shmarray.PythonKernelWarning)``.
    """


class CopyWarning(UserWarning):
    """A private array in ``args`` is copied to the workers with every call.

    Slow for a large array, and the kernel's writes to it are lost: copy it
    into shared memory once with ``Engine.from_numpy`` and pass that.
    Shown once per engine, for arrays over 1 MiB.
    """


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker, as text.

    Set as the ``__cause__`` of a kernel's exception re-raised in the
    caller, so the traceback printed shows where the worker failed.

    Attributes
    ----------
    tb : str
        The formatted traceback.
    """

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class MapReport:
    """What a map or reduce with ``errors="collect"`` returns.

    Every chunk that can run does; the report says which failed and why.

    Attributes
    ----------
    ok : bool
        No chunk failed.
    failed : list of ((int, int), BaseException)
        ``((lo, hi), exception)`` for each chunk that failed for good, in
        chunk order; the exception carries the worker's traceback as its
        ``__cause__``.
    retried : list of (int, int)
        The rows of the chunks that succeeded only after their worker died
        or timed out (see ``retries``).
    value : object
        For ``reduce``, the values of the chunks that succeeded, combined
        in chunk order (None if none did); None for ``map``.
    chunks : int
        How many chunks the call had.

    Examples
    --------
    ::

        report = eng.map(kernel, y, x, errors="collect", retries=1)
        if not report.ok:
            for (lo, hi), exc in report.failed:
                print(f"rows {lo}:{hi} failed: {exc!r}")
    """

    __slots__ = ("failed", "retried", "value", "chunks")

    failed: list[tuple[tuple[int, int], BaseException]]
    retried: list[tuple[int, int]]
    value: Any
    chunks: int

    def __init__(
        self,
        failed: list[tuple[tuple[int, int], BaseException]],
        retried: list[tuple[int, int]],
        value: Any,
        chunks: int,
    ):
        self.failed = failed
        self.retried = retried
        self.value = value
        self.chunks = chunks

    @property
    def ok(self) -> bool:
        """No chunk failed."""
        return not self.failed

    def __repr__(self) -> str:
        parts = [f"{self.chunks - len(self.failed)} of {self.chunks} chunks ok"]
        if self.retried:
            parts.append(f"{len(self.retried)} after a retry")
        for (lo, hi), exc in self.failed[:3]:
            parts.append(
                f"rows {lo}:{hi} failed: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}"
            )
        if len(self.failed) > 3:
            parts.append(f"... {len(self.failed) - 3} more failed")
        return "<MapReport " + "; ".join(parts) + ">"
