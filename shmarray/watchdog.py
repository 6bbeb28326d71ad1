"""The last safety net: a small process that cleans up after a coordinator
that died without closing its engine (``kill -9``, a segfault, the OOM
killer, SIGTERM or SIGHUP to its process group).

One watchdog per engine, started by ``shmarray.launch`` in a session of its
own, so signals to the caller's process group (Ctrl-C, ``timeout``,
SLURM's ``scancel``) do not reach it.  It holds the read end of a pipe, the
*lifeline*, whose write end only the coordinator holds (a child the
coordinator forks closes its copy at once), and learns through it the
workers' pids (with their start times, so a recycled pid is never killed)
and the name of every block the engine creates and unlinks.  When the
engine closes, the coordinator says goodbye and the watchdog exits quietly.
When the lifeline reaches end-of-file without a goodbye, the coordinator is
dead: the watchdog unlinks exactly the blocks it was told about (never
anything else in ``/dev/shm``, whatever its name), kills the workers that
are still running (one may be deep in a numba loop and never read its pipe
again), and exits.

Why not multiprocessing's resource tracker?  It unlinks what was registered
with it, but (1) it prints a "leaked shared_memory objects" warning for each
block on the way, (2) it does not stop worker processes, and (3) on 3.11
and 3.12 a worker that attaches through ``SharedMemory`` registers the block
too and gets it unlinked under the coordinator (cpython #82300).  shmarray
registers nothing with it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import warnings
from multiprocessing.connection import Connection
from typing import NamedTuple

from shmarray import blocks, launch

log = logging.getLogger(__name__)


class Workers(NamedTuple):
    """The current workers, as (pid, start time) pairs."""

    processes: tuple[tuple[int, float | None], ...]


class Blocks(NamedTuple):
    """Block names the engine created, and names it has unlinked since."""

    created: tuple[str, ...]
    gone: tuple[str, ...]


BYE = "bye"


def main(lifeline_fd: int) -> None:
    """Watchdog entry point (see the module's docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator decides
    lifeline = Connection(lifeline_fd, writable=False)
    workers: tuple[tuple[int, float | None], ...] = ()
    names: set[str] = set()
    while True:
        try:
            msg = lifeline.recv()
        except (EOFError, OSError):
            break  # the coordinator is gone
        if msg == BYE:
            return
        if isinstance(msg, Workers):
            workers = msg.processes
        elif isinstance(msg, Blocks):
            names.update(msg.created)
            names.difference_update(msg.gone)
    clean_up(names, workers)


def clean_up(names: set[str], workers) -> None:
    """Unlink ``names`` and kill ``workers``; one failure stops nothing."""
    for name in names:
        try:
            blocks.unlink(name)
        except OSError:
            pass
    for pid, started in workers:
        # Only a process that is still the one we were told about: a pid the
        # system reused since belongs to someone else.
        if started is not None and blocks.process_start_time(pid) == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


class Watchdog:
    """The coordinator's side: starts the watchdog process, keeps it told of
    the workers and the blocks, and says goodbye at close.

    Created and closed by the Pool, once.  Any thread may report blocks
    (allocations happen anywhere), so sending takes a lock.  A watchdog that
    died (killed on its own) is started again, and told everything, the
    next time there is news or the driver checks (``check``); if that fails
    too, one warning says the safety net is gone, and the engine carries
    on.
    """

    child = None
    _lifeline = None

    def __init__(self, method: str):
        self._method = method
        self._lock = threading.Lock()
        self._workers: tuple[tuple[int, float | None], ...] = ()
        self._names: set[str] = set()
        self._warned = False
        self._start()

    def _start(self) -> None:
        life_r, life_w = os.pipe()
        try:
            self.child = launch.start(
                self._method, "shmarray.watchdog:main", (launch.Fd(0),), [life_r]
            )
        except BaseException:
            os.close(life_w)
            raise
        finally:
            os.close(life_r)
        self._lifeline = Connection(life_w, readable=False)

    def check(self) -> None:
        """Restart the watchdog if it has died, by its own word (its pidfd
        or pipe, without waiting): the driver asks every ``OUTPUT_POLL``
        seconds while maps run (``shmarray.rounds``), since a loop of maps
        over the same arrays has no news to send, and a dead watchdog is
        otherwise found only by the next send."""
        child = self.child
        if child is not None and child.exited():
            with self._lock:
                if self.child is child:
                    self._restart()

    def _send(self, msg) -> None:
        """Send under the lock; restart a dead watchdog and tell it all."""
        if self._lifeline is not None:
            try:
                self._lifeline.send(msg)
                return
            except (OSError, AttributeError):
                pass
        self._restart()

    def _restart(self) -> None:
        """Start a new watchdog in place of a dead one, and tell it the
        workers and blocks (under the lock)."""
        try:
            self._retire()
            self._start()
            lifeline = self._lifeline
            assert lifeline is not None  # _start() made it
            lifeline.send(Workers(self._workers))
            lifeline.send(Blocks(tuple(self._names), ()))
            log.warning(
                "the engine's watchdog died; restarted it as pid %s",
                getattr(self.child, "pid", None),
            )
        except Exception as exc:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"shmarray: the engine's watchdog died and could not "
                    f"be restarted ({exc!r}); if this process is killed, "
                    f"`shmarray gc` removes its blocks",
                    RuntimeWarning,
                    stacklevel=4,
                )

    def tell(self, processes: list[tuple[int, float | None]]) -> None:
        """The current workers, as (pid, start time) pairs."""
        with self._lock:
            self._workers = tuple(processes)
            self._send(Workers(self._workers))

    def blocks(self, created: tuple[str, ...] = (), gone: tuple[str, ...] = ()) -> None:
        """Blocks created, and blocks unlinked, since the last report."""
        with self._lock:
            self._names.update(created)
            self._names.difference_update(gone)
            self._send(Blocks(tuple(created), tuple(gone)))

    def _retire(self) -> None:
        if self._lifeline is not None:
            self._lifeline.close()
            self._lifeline = None
        child, self.child = self.child, None
        if child is not None:
            child.kill()
            child.join(1.0)
            child.close()

    def close(self, timeout: float) -> None:
        """Say goodbye and wait for the watchdog to exit.  Idempotent."""
        with self._lock:
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

    def forget_in_child(self) -> None:
        """In a forked child: drop the lifeline's write end, which only the
        coordinator may hold, and touch nothing else."""
        if self._lifeline is not None:
            self._lifeline.close()
            self._lifeline = None
        self.child = None
