"""Batch work that survives failures and can be watched: the stream that
``Engine.imap`` returns, and the per-worker records of ``Engine.stats``
(the tracked rounds themselves are ``shmarray.tracked``)."""

from __future__ import annotations

import os
import queue
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from shmarray.dispatch import LATER, Waiting, ended_within

if TYPE_CHECKING:
    from shmarray.dispatch import MapFuture

_END = object()


class Sink:
    """Where the driver puts a streamed call's values, and how the consumer
    asks it to stop.  Held by the call; the consumer holds the ChunkStream
    around it, so dropping the stream can stop the call."""

    __slots__ = ("queue", "halted")

    def __init__(self):
        # A queue.Queue, not a SimpleQueue: the consumer waits with a
        # timeout while signals are held (dispatch.Waiting), and through
        # Python 3.12 SimpleQueue.get(timeout=...) can block for ever once a
        # signal interrupts it after its deadline has passed (a burst of
        # Ctrl-C hung an imap stream; fixed in 3.13).
        self.queue: queue.Queue = queue.Queue()
        self.halted = False

    def put(self, rows: tuple[int, int], value: Any) -> None:
        self.queue.put((rows, value))


class ChunkStream:
    """An iterator of ``(rows, value)``, one per chunk, as the chunks finish.

    What ``Engine.imap`` returns; ``rows`` is the chunk's ``(lo, hi)``.
    Closing it (``close()``, leaving a ``with`` block, or dropping it, as a
    ``for`` loop left by ``break`` does) stops the map: no worker takes a
    new chunk, those running finish theirs, and nothing is killed.  Ctrl-C
    while it waits for a chunk stops the map as it stops ``map``: the busy
    workers are killed and replaced.  Once it
    is exhausted, ``result`` is what ``reduce`` with the same arguments
    would return (the combined value, or a MapReport with
    ``errors="collect"``); with ``errors="raise"`` the first failure raises
    from the iteration, after the values that came before it.

    Attributes
    ----------
    result : object
        Once the stream is exhausted, what ``reduce`` would have returned;
        None until then.

    Examples
    --------
    ::

        with eng.imap(score, params, schedule="dynamic") as stream:
            for (lo, hi), value in stream:
                if value > threshold:
                    break                  # stops the map: no new chunk starts
    """

    def __init__(self, sink: Sink, future: MapFuture, interrupt: Callable[[], None]):
        self._sink = sink
        self._future = future
        self._interrupt = interrupt
        self._done = False
        self._pid = os.getpid()
        self.result: Any = None
        q = sink.queue
        future.add_done_callback(lambda f: q.put(_END))

    def __iter__(self) -> ChunkStream:
        return self

    def __next__(self) -> tuple[tuple[int, int], Any]:
        if self._done:
            raise StopIteration
        if os.getpid() != self._pid:
            raise RuntimeError(
                f"this imap stream belongs to process {self._pid}; a forked "
                f"child cannot read it. Create an Engine in the child instead."
            )
        try:
            # Ctrl-C while waiting: as for map, the workers are killed first.
            item = Waiting().wait(self._future, self._take)
        except BaseException:
            self._done = True
            raise
        if item is _END:
            self._done = True
            self.result = self._future.result()  # raises the map's error
            raise StopIteration
        return item

    def __enter__(self) -> ChunkStream:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _halt(self) -> bool:
        """Ask the driver to stop the map; False if it has ended."""
        if self._future.done():
            return False
        self._sink.halted = True
        if self._future.cancel():
            return False
        self._interrupt()
        return True

    def close(self) -> None:
        """Stop the map and wait for the chunks running to finish.

        No new chunk starts; nothing is killed.  Idempotent.
        """
        if self._future.done():  # nothing runs: nothing to stop, nothing held
            self._done = True
            return
        # Signals held from here (``Waiting``): a Ctrl-C in the loop's body
        # brings us here, and the next of its burst must not cut the halt
        # short (the map would run on); one kept stops the map, its running
        # chunks killed, before it is raised.
        waiting = Waiting()
        try:
            self._done = True
            self._halt()
        except BaseException:  # a bug: nothing of _halt's own raises
            waiting.close()
            raise
        future = self._future
        waiting.wait(future, lambda timeout: ended_within(future, timeout))

    def _take(self, timeout: float | None) -> Any:
        """The next item of the stream, if one comes within ``timeout``."""
        try:
            return self._sink.queue.get(timeout=timeout)
        except queue.Empty:
            return LATER

    def __del__(self) -> None:
        # Maybe in another thread (garbage collection): ask, do not wait.
        if not self._done and os.getpid() == self._pid:
            self._halt()


class WorkerStats(NamedTuple):
    """One worker, as ``Engine.stats()`` sees it.

    Attributes
    ----------
    worker : int
        Its index, 0 to workers - 1 (what ``shmarray.worker_id`` becomes).
    pid : int
        Its process id.
    rss : int
        Resident bytes, the shared blocks it maps included.
    uss : int
        Unique bytes: what it alone holds (``max_worker_memory`` limits
        this).
    tasks : int
        Chunks run by this process.
    kernels : int
        Kernels it holds.
    busy : float
        Seconds this process spent running jobs.
    replaced : int
        Times a worker in this place was replaced (crash, timeout,
        recycling).
    compiled : int
        Maps this process ran in its compiled serving loop (a map is
        served there once it is hot: ``Engine.prepare``'s at once, others
        after ``shmarray.worker.HOT_RUNS`` runs).
    """

    worker: int  # its index, 0 .. workers-1 (shmarray.worker_id)
    pid: int
    rss: int  # resident bytes, shared blocks it maps included
    uss: int  # unique bytes: what it alone holds
    tasks: int  # chunks run by this process
    kernels: int  # kernels it holds
    busy: float  # seconds this process spent running jobs
    replaced: int  # times a worker in this place was replaced
    compiled: int = 0  # maps run in the compiled serving loop
