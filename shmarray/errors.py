"""The exceptions shmarray raises itself.

A kernel's own exception is not wrapped: it reaches the caller with its
original type, and the worker's traceback rides along as ``__cause__``
(a :class:`RemoteTraceback`), as in ``concurrent.futures.process``.
"""

from __future__ import annotations

import concurrent.futures


class ShmarrayError(Exception):
    """Base class of every error shmarray raises on its own account."""


class EngineClosedError(ShmarrayError, ValueError):
    """The engine was used after ``close()``."""


class SharedMemoryFullError(ShmarrayError, MemoryError):
    """The engine's storage cannot hold the requested block: /dev/shm, the
    machine's memory (``storage="memfd"``) or a directory's disk.
    ``path``: the filesystem that is full (None for memfd); ``storage``:
    the engine's ``storage=``."""

    def __init__(self, message: str, requested: int, free: int, path: str | None,
                 storage: str = "shm"):
        super().__init__(message)
        self.requested = requested
        self.free = free
        self.path = path
        self.storage = storage

    def __reduce__(self):
        return type(self), (str(self), self.requested, self.free, self.path,
                            self.storage)


class WorkerCrashedError(ShmarrayError):
    """A worker process died while it held a chunk."""

    def __init__(self, message: str, pid: int, exitcode: int | None,
                 rows: tuple[int, int] | None):
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode
        self.rows = rows

    def __reduce__(self):
        return type(self), (str(self), self.pid, self.exitcode, self.rows)


class TaskTimeoutError(ShmarrayError, TimeoutError):
    """A map or reduce ran past its ``timeout``; its busy workers were replaced."""

    def __init__(self, message: str, timeout: float):
        super().__init__(message)
        self.timeout = timeout

    def __reduce__(self):
        return type(self), (str(self), self.timeout)


class MapCancelledError(ShmarrayError, concurrent.futures.CancelledError):
    """A submitted map was cancelled while it ran; its workers were replaced."""


class WorkerStartError(ShmarrayError):
    """A worker process did not come up."""


class KernelError(ShmarrayError):
    """A kernel raised an exception that could not be sent back as itself."""

    def __init__(self, message: str, type_name: str):
        super().__init__(message)
        self.type_name = type_name

    def __reduce__(self):
        return type(self), (str(self), self.type_name)


class CopyWarning(UserWarning):
    """An argument is copied to the workers with every call: slow, and the
    kernel's writes to it are lost."""


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker, as text."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class MapReport:
    """What a map or reduce with ``errors="collect"`` returns.

    ``ok``: no chunk failed.  ``failed``: ``((lo, hi), exception)`` for each
    chunk that failed for good, in chunk order; the exception carries the
    worker's traceback as its ``__cause__``.  ``retried``: the rows of the
    chunks that succeeded only after their worker died or timed out.
    ``value``: for ``reduce``, the chunks that succeeded combined in chunk
    order (None if none did).
    """

    __slots__ = ("failed", "retried", "value", "chunks")

    def __init__(self, failed: list, retried: list, value, chunks: int):
        self.failed = failed
        self.retried = retried
        self.value = value
        self.chunks = chunks

    @property
    def ok(self) -> bool:
        return not self.failed

    def __repr__(self) -> str:
        parts = [f"{self.chunks - len(self.failed)} of {self.chunks} chunks ok"]
        if self.retried:
            parts.append(f"{len(self.retried)} after a retry")
        for (lo, hi), exc in self.failed[:3]:
            parts.append(f"rows {lo}:{hi} failed: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}")
        if len(self.failed) > 3:
            parts.append(f"... {len(self.failed) - 3} more failed")
        return "<MapReport " + "; ".join(parts) + ">"
