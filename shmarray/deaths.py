"""What went wrong in a worker, told so a user can act: a crash, a timeout,
a kernel's own exception brought back as itself.

Pure functions of what the control block and the worker's messages say;
the driver (``shmarray.rounds``) decides what to do about it.
"""

from __future__ import annotations

import pickle

from shmarray.control import ControlBlock
from shmarray.descriptors import Failed
from shmarray.errors import KernelError, RemoteTraceback, TaskTimeoutError, WorkerCrashedError


def death_error(ctl: ControlBlock, dead, groups: tuple, chunks) -> WorkerCrashedError:
    """Worker ``dead`` died mid-map: what it was doing (``groups``: the
    round's (worker, indices, chunks)), and the likely causes."""
    death, exitcode = dead.describe_death(), dead.exitcode
    k = ctl.chunk(dead.index)
    if k < 0:  # took the ring, died before its first chunk
        group = next((g for g in groups if g[0] == dead.index), groups[0])
        rows = (group[2][0][0], group[2][-1][1])
        what = (
            f"while loading the kernel or the arguments for rows "
            f"{rows[0]}:{rows[1]}. Likely causes: unpickling the kernel "
            f"or an argument in the worker failed hard (it segfaulted, or "
            f"called sys.exit)"
        )
    else:
        rows = chunks[min(k, len(chunks) - 1)]
        what = (
            f"while running rows {rows[0]}:{rows[1]} (chunk {k}). Likely "
            f"causes: a segfault in the kernel (out-of-bounds indexing with "
            f"boundscheck off), the out-of-memory killer, or "
            f"os._exit/sys.exit in the kernel"
        )
    return WorkerCrashedError(
        f"{death} {what}. The worker was replaced; the engine is usable.",
        pid=dead.pid,
        exitcode=exitcode,
        rows=rows,
    )


def chunk_timeout(ctl: ControlBlock, w, timeout: float, chunks) -> TaskTimeoutError:
    """Worker ``w`` of a tracked map ran past ``timeout`` on its chunk."""
    k = ctl.chunk(w.index)
    where = (
        f"rows {chunks[k][0]}:{chunks[k][1]} (chunk {k})" if 0 <= k < len(chunks) else "a chunk"
    )
    return TaskTimeoutError(
        f"{where} did not finish within timeout={timeout} s; worker {w.pid} "
        f"was killed (a numba loop cannot be interrupted) and replaced.",
        timeout,
    )


def map_timeout(pids: list[int], timeout: float) -> TaskTimeoutError:
    """A map ran past ``timeout``; the workers ``pids`` were still busy."""
    return TaskTimeoutError(
        f"map did not finish within timeout={timeout} s; the workers "
        f"still running (pids {pids}) have been replaced. A numba loop "
        f"cannot be interrupted, so they were killed.",
        timeout,
    )


def unpicklable_value(pid: int, exc: BaseException) -> KernelError:
    return KernelError(
        f"a value the kernel returned in worker {pid} could not be unpickled "
        f"here ({type(exc).__name__}: {exc}). Return numbers, tuples or NumPy "
        f"arrays.",
        type(exc).__name__,
    )


def remote_exception(reply: Failed, pid: int, rows: tuple[int, int] | None) -> BaseException:
    """The kernel's exception as itself, with the worker traceback as cause."""
    exc: BaseException | None = None
    if reply.error:
        try:
            exc = pickle.loads(reply.error)
        except Exception:
            exc = None
    if exc is None:
        exc = KernelError(f"{reply.type_name}: {reply.message}", reply.type_name)
    exc.__cause__ = RemoteTraceback(reply.traceback)
    where = f" on rows {rows[0]}:{rows[1]}" if rows is not None else ""
    exc.add_note(f"raised by the kernel in worker {pid}{where}")
    return exc
