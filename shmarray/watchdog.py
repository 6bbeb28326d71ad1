"""The last safety net: a small process that cleans up after a coordinator
that died without closing its engine (``kill -9``, a segfault, the OOM
killer).

One watchdog per engine.  It holds the read end of a pipe, the *lifeline*,
whose write end only the coordinator holds, and learns the workers' pids
(with their start times, so a recycled pid is never killed) through it.
When the engine closes, the coordinator says goodbye and the watchdog exits
quietly.  When the lifeline reaches end-of-file without a goodbye, the
coordinator is dead: the watchdog unlinks every block whose name carries the
coordinator's pid, kills the workers that are still running (one may be deep
in a numba loop and never read its pipe again), and exits.

Why not multiprocessing's resource tracker?  It unlinks what was registered
with it, but (1) it prints a "leaked shared_memory objects" warning for each
block on the way, (2) it does not stop worker processes, and (3) on 3.11
and 3.12 a worker that attaches through ``SharedMemory`` registers the block
too and gets it unlinked under the coordinator (cpython #82300).  shmarray
registers nothing with it.
"""

from __future__ import annotations

import os
import signal
from multiprocessing.connection import Connection
from typing import NamedTuple

from shmarray import blocks, launch


class Workers(NamedTuple):
    """The current workers, as (pid, start time) pairs."""
    processes: tuple[tuple[int, float | None], ...]


BYE = "bye"


def main(lifeline_fd: int, owner_pid: int) -> None:
    """Watchdog entry point (started by ``shmarray.launch``, in a session of
    its own: signals to the caller's process group do not reach it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the coordinator decides
    lifeline = Connection(lifeline_fd, writable=False)
    workers: tuple[tuple[int, float | None], ...] = ()
    while True:
        try:
            msg = lifeline.recv()
        except (EOFError, OSError):
            break                                   # the coordinator is gone
        if msg == BYE:
            return
        if isinstance(msg, Workers):
            workers = msg.processes
    for name in (b.name for b in blocks.scan() if b.owner_pid == owner_pid):
        blocks.unlink(name)
    for pid, started in workers:
        # Only a process that is still the one we were told about: a pid the
        # system reused since belongs to someone else.
        if started is not None and blocks.process_start_time(pid) == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class Watchdog:
    """The coordinator's side: starts the watchdog process, keeps it told of
    the current workers, and says goodbye at close.

    Created and closed by the Pool, once.
    """

    child = None
    _lifeline = None

    def __init__(self, method: str, owner_pid: int):
        life_r, life_w = os.pipe()
        try:
            self.child = launch.start(method, "shmarray.watchdog:main",
                                      (launch.Fd(0), owner_pid), [life_r])
        except BaseException:
            os.close(life_w)
            raise
        finally:
            os.close(life_r)
        self._lifeline = Connection(life_w, readable=False)

    def fileno(self) -> int:
        """The lifeline's write end: nobody else may hold it."""
        return self._lifeline.fileno()

    def tell(self, processes: list[tuple[int, float | None]]) -> None:
        """The current workers, as (pid, start time) pairs."""
        self._lifeline.send(Workers(tuple(processes)))

    def close(self, timeout: float) -> None:
        """Say goodbye and wait for the watchdog to exit.  Idempotent."""
        if self._lifeline is not None:
            try:
                self._lifeline.send(BYE)
            except OSError:
                pass
            self._lifeline.close()
            self._lifeline = None
        child, self.child = self.child, None
        if child is not None:
            if child.join(timeout) is None:
                child.kill()
                child.join(1.0)
            child.close()
