"""The coordinator's live blocks: one :class:`BlockTable` per engine, and
the reaper thread that unlinks a block once the last array over it has
died.

The table makes and ends its blocks through the engine's
:class:`~shmarray.storage.Storage`; who creates, unmaps and unlinks a
block, and how many times, is told in :mod:`shmarray.blocks`.  Nothing
here depends on the operating system: that is decided once, at import, in
:mod:`shmarray.storage.base`.
"""

from __future__ import annotations

import bisect
import collections
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from shmarray.errors import EngineClosedError
from shmarray.interrupts import SIGNALS
from shmarray.storage import ShmStorage, Storage


def address_of(buf: np.ndarray) -> int:
    return buf.__array_interface__["data"][0]


@dataclass(frozen=True)
class Block:
    """One live segment as the coordinator sees it."""

    name: str
    size: int
    address: int


_TABLES: weakref.WeakSet = weakref.WeakSet()  # every engine's table
_TABLES_LOCK = threading.Lock()  # a set must not grow while another thread copies it
_PID = os.getpid()  # kept current by _after_fork_in_child: no system call per use
_log = logging.getLogger("shmarray")


def _tables() -> list[BlockTable]:
    with _TABLES_LOCK:
        return list(_TABLES)


def blocks_of_other_engines(array: np.ndarray, mine: BlockTable) -> Block | None:
    """The block of another live engine that holds ``array``, if any."""
    data = address_of(array)
    for table in _tables():
        if table is not mine and not table.closed:
            found = table.locate(data, data + max(array.nbytes, 1))
            if found is not None:
                return found
    return None


def settle() -> None:
    """Wait until every block of this process whose arrays have died is
    unlinked (:meth:`BlockTable.settle`): what this process then sees of
    its own blocks, in /dev/shm or anywhere, is current."""
    for table in _tables():
        table.settle()


class _Wake(weakref.ref):
    """A weak reference to a block's mapping whose death wakes the reaper,
    naming the table to reap (a weak reference to it)."""

    __slots__ = ("table",)
    table: weakref.ref


class _Reaper:
    """The thread that reaps blocks whose arrays died, one per process.

    A KeyboardInterrupt is raised only in the main thread, at any bytecode,
    and one raised inside a weakref callback or a finalizer is printed
    ("Exception ignored in ...") and lost, with whatever the callback had
    left to do: the unlink, the Release.  So a mapping's death runs no
    Python code at all: its two weak references call C functions,
    ``deque.append`` (the table's record of the dead) and
    ``SimpleQueue.put`` (this thread's wake-up), and the reaping is done
    later, by code that can be cut short anywhere and lose nothing
    (:meth:`BlockTable._reap`): here, where no signal is ever raised, at
    once; or by whichever thread first needs it done
    (:meth:`BlockTable.settle`).

    Started with the first block of a process, and again in a forked
    child, which starts with no thread and a fresh queue (the parent's
    blocks it inherited wake nobody there); a daemon, so it never keeps the
    interpreter alive.
    """

    def __init__(self) -> None:
        self.forget()

    def forget(self) -> None:
        """A fresh start; in a forked child, where the parent's thread and
        queue are not ours."""
        self.wake: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def running(self) -> None:
        """Start the thread unless it runs (a failure, at interpreter
        shutdown, leaves reaping to ``settle`` and ``close``)."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                thread = threading.Thread(target=self._run, name="shmarray-reaper", daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # "can't create new thread at interpreter shutdown"
                    return
                self._thread = thread

    def _run(self) -> None:
        while True:
            # The tables to reap, by identity: a weak reference to a table
            # that died before anything hashed it cannot be hashed (a set
            # of them killed this thread: "weak object has gone away").
            first = self.wake.get().table
            tables = {id(first): first}
            # One wake-up per burst of deaths rather than per death: a
            # thread woken at once takes the GIL from the main thread at its
            # next system call, which doubled the cost of a loop of
            # `y = eng.zeros(n)` (the main thread reaps inline there).
            time.sleep(_REAP_DELAY)
            while True:
                try:
                    ref = self.wake.get_nowait().table
                except queue.Empty:
                    break
                tables[id(ref)] = ref
            for ref in tables.values():
                table = ref()
                try:
                    if table is not None:
                        table._reap()
                except Exception:  # never die: later deaths need this thread
                    _log.exception("shmarray: reaping the blocks of dead arrays failed")
                del table


# Seconds the reaper lets deaths gather before it reaps them.
_REAP_DELAY = 0.005
_REAPER = _Reaper()


def _after_fork_in_child() -> None:
    """The parent's reaper may have held any of these locks at the fork."""
    global _PID, _TABLES_LOCK
    _PID = os.getpid()
    _REAPER.forget()
    _TABLES_LOCK = threading.Lock()
    for table in list(_TABLES):
        table._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


class BlockTable:
    """The coordinator's live blocks, indexed by the address they map at.

    One per engine.  Creates every block (``allocate``) and unlinks every
    name exactly once: once the last array over the block has died
    (``_reap``), or from ``close()``.  Holds no strong reference to any
    mapping, so memory lives exactly as long as the arrays do.

    A block's death is recorded by C code (``_dead``, see :class:`_Reaper`)
    and reaped under the lock by the reaper thread, or first by any method
    that needs it done (``settle``): every method that reads the index or
    the released names settles first, so a freed block's space is back
    before the next ``allocate``, as if the unlink had been synchronous.
    Reaping a block unlinks its name, records it for the workers' Release
    (``take_released``) and drops it from the index; each step can be done
    again harmlessly, and the record is dropped last, so a reaping cut
    short anywhere (a Ctrl-C in the main thread) is finished by the next.
    Between a death and its reaping the name stays in /dev/shm for a few
    milliseconds (the reaper gathers deaths for ``_REAP_DELAY``, then needs
    the GIL): this process's own views, ``exists`` and ``scan``, settle
    first.  (A memfd block's "unlink" closes its descriptor: a reaping cut
    between forgetting and closing it leaks that descriptor rather than
    ever closing a number that may have been reused.)

    CPython unmaps an mmap before the references are told, so a new block
    can be mapped over a dead one's addresses before the dead one is
    reaped: a new block therefore evicts every entry it overlaps, and a
    late reaping removes only the block it names.  A forked child's copy
    of a table reaps nothing: the parent owns the names.
    """

    def __init__(self, storage: Storage | None = None) -> None:
        self.storage = storage if storage is not None else ShmStorage()
        self._owner = _PID
        self._me = weakref.ref(self)
        self._lock = threading.Lock()
        self._starts: list[int] = []
        self._blocks: dict[int, Block] = {}
        # the reference that reports each live block's death -> (start,
        # name, the reference that wakes the reaper); both go with the entry
        self._pending: dict[weakref.ref, tuple[int, str, _Wake]] = {}
        self._dead: collections.deque[weakref.ref] = collections.deque()
        self._released: dict[str, None] = {}  # an ordered set: adding twice is harmless
        self._descriptors: dict = {}
        self.closed = False
        self.warned_copy = False  # a CopyWarning was shown for this engine
        self.on_create: Callable[[str], object] | None = (
            None  # told each new name that can leak (the watchdog)
        )
        with _TABLES_LOCK:
            _TABLES.add(self)

    @property
    def descriptors(self) -> dict:
        """A cache for ``descriptors.describe``, valid while no block dies:
        a dead block's addresses may be mapped again by a new one."""
        self.settle()
        if len(self._descriptors) > 4096:
            self._descriptors = {}
        return self._descriptors

    def allocate(self, nbytes: int) -> np.ndarray:
        """A new block; returns a uint8 array of ``nbytes`` over it.  In the
        main thread, SIGINT and SIGTERM are held from before the block is
        made until it is recorded (then raised): a Ctrl-C in between would
        leave a block that ``close()`` cannot name, mapped by a frame of the
        exception's traceback."""
        caught: list[BaseException] = []
        held = SIGNALS.hold(caught.append)
        try:
            return self._allocate(nbytes)
        finally:
            if held:
                SIGNALS.release()
                if caught:
                    raise caught[0]

    def _allocate(self, nbytes: int) -> np.ndarray:
        _REAPER.running()
        with self._lock:
            if self.closed:
                raise EngineClosedError("this engine is closed; create a new one")
            self._reap_locked()  # the space of blocks that died is free again
            name, mm = self.storage.create(nbytes)
            buf = np.frombuffer(mm, dtype=np.uint8)
            start = address_of(buf)
            # Its death is told by C callbacks only (see _Reaper), set up
            # first so that close() knows the name whatever comes next.
            # CPython calls the newest reference's callback first: the
            # death is recorded before the reaper is woken.
            wake = _Wake(mm, _REAPER.wake.put)
            wake.table = self._me
            self._pending[weakref.ref(mm, self._dead.append)] = (start, name, wake)
            if self.on_create is not None and self.storage.leaks:
                self.on_create(name)
            self._evict(start, start + len(mm))
            self._blocks[start] = Block(name, len(mm), start)  # before _starts: see _forget
            bisect.insort(self._starts, start)
        return buf[:nbytes]

    def settle(self) -> None:
        """Reap every block whose arrays have died, if the reaper has not
        yet: their names are unlinked, recorded and out of the index when
        this returns (or raises: a Ctrl-C here leaves the rest to the next
        reaping, and loses nothing)."""
        if self._dead and _PID == self._owner:
            self._reap()

    def _reap(self) -> None:
        with self._lock:
            self._reap_locked()

    def _reap_locked(self) -> None:
        """Reap each recorded death: unlink, record the Release, forget.
        Every step may be cut short and done again (the unlink of a gone
        name is a no-op, ``_released`` is a set, ``_forget`` checks); the
        entry and then the record go last."""
        if not self._dead or _PID != self._owner:
            return  # nothing died, or a forked child's copy: the parent owns the names
        while self._dead:
            ref = self._dead[0]
            entry = self._pending.get(ref)
            if entry is not None:  # else reaped already, or close() unlinked it
                start, name, _ = entry
                try:
                    self.storage.unlink(name)
                except OSError as exc:
                    _log.warning("shmarray: could not unlink block %s: %s", name, exc)
                self._released[name] = None
                self._forget(start, name)
                self._pending.pop(ref, None)
            if self._dead and self._dead[0] is ref:
                self._dead.popleft()

    def _forget(self, start: int, name: str) -> None:
        """Drop block ``name`` at ``start`` from the index, if it is still
        there; ``_starts`` first, so a cut leaves nothing ``locate`` sees."""
        block = self._blocks.get(start)
        if block is not None and block.name == name:  # else a newer block is there
            i = bisect.bisect_left(self._starts, start)
            if i < len(self._starts) and self._starts[i] == start:
                self._starts.pop(i)
            del self._blocks[start]
        self._descriptors = {}

    def _evict(self, lo: int, hi: int) -> None:
        """Forget blocks over [lo, hi): they are unmapped, whatever their
        reaping has done so far."""
        i = bisect.bisect_right(self._starts, lo) - 1
        if (
            i < 0
            or self._blocks[self._starts[i]].address + self._blocks[self._starts[i]].size <= lo
        ):
            i += 1  # the block before lo ends before it
        while i < len(self._starts) and self._starts[i] < hi:
            self._blocks.pop(self._starts.pop(i), None)
            self._descriptors = {}

    def locate(self, lo: int, hi: int) -> Block | None:
        """The live block holding bytes [lo, hi), if any."""
        with self._lock:
            self._reap_locked()
            i = bisect.bisect_right(self._starts, lo) - 1
            if i < 0:
                return None
            block = self._blocks[self._starts[i]]
            return block if hi <= block.address + block.size else None

    def has_released(self) -> bool:
        """Whether blocks died since the last ``take_released``."""
        return bool(self._released or self._dead)

    def take_released(self) -> tuple[str, ...]:
        """Names unlinked since the last call: workers should unmap them."""
        with self._lock:
            self._reap_locked()
            out = tuple(self._released)
            self._released.clear()
            return out

    def live(self) -> list[Block]:
        with self._lock:
            self._reap_locked()
            return [self._blocks[s] for s in self._starts]

    def close(self) -> list[str]:
        """Unlink every name not unlinked yet, of the blocks still in use
        and of those whose arrays died a moment ago alike; returns them.
        Mappings stay with their arrays, and their deaths are no longer
        reported."""
        with self._lock:
            self.closed = True
            names = []
            for _, name, _ in self._pending.values():
                if self.storage.unlink(name):
                    names.append(name)
            self._pending.clear()  # the references go, and with them their callbacks
            self._starts.clear()
            self._blocks.clear()
            self._released.clear()
            self._descriptors = {}
            return names
