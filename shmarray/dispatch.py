"""Running maps: one driver at a time, from any thread, never blocking a
caller that did not ask to wait.

Who drives.  Every pipe and process of the pool is used by one thread at a
time, the *driver*.  A blocking ``map`` on an idle engine drives its own map
in the calling thread: handing it to another thread and back would cost two
thread wake-ups (tens of microseconds) per map.  Otherwise, and for every
``submit``, the call is queued and the engine's manager thread drives the
queue in order; a blocking ``map`` then waits on its own future.  ``close()``
from any thread cancels what is queued, stops the running map with
``EngineClosedError``, waits for the driver to let go, and stops the pool.

How a map runs once driven is ``shmarray.rounds``'s business.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import inspect
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from typing import Any

from shmarray.blocktable import BlockTable
from shmarray.errors import EngineClosedError, MapCancelledError
from shmarray.interrupts import SIGNALS, at_exit, drop
from shmarray.jobs import Call, JobCache
from shmarray.pool import Pool
from shmarray.rounds import Runner
from shmarray.tracked import Tally, combined


class MapFuture(concurrent.futures.Future):
    """The future of a submitted map or reduce.

    A ``concurrent.futures.Future``, made by ``Engine.submit`` and
    ``Engine.submit_reduce``: its result is what ``map`` or ``reduce``
    returns, its exception what they raise.  ``cancel()`` follows the
    ``Future`` contract: it succeeds only while the map is queued.
    ``stop()`` also ends a running map: the workers busy with it (maybe
    deep in a numba loop) are killed and replaced, and the future ends
    with ``MapCancelledError`` (a ``concurrent.futures.CancelledError``).

    Examples
    --------
    ::

        future = eng.submit(kernel, y, x)
        if not future.done():
            future.stop()
    """

    def __init__(self, interrupt: Callable[[], None]):
        super().__init__()
        # Set once no worker of this map runs (it finished, was settled, or
        # never started): what a caller that gives up waiting waits for.
        self._quiet: concurrent.futures.Future = concurrent.futures.Future()
        self._stop_requested = False
        self._committed = False  # the driver has settled the outcome
        self._stop_lock = threading.Lock()
        self._interrupt = interrupt

    def stop(self) -> bool:
        """Cancel the map if queued, stop it if running.

        From any thread; it returns at once, before the workers are
        replaced.

        Returns
        -------
        bool
            False if the map had already finished.  True: the future ends
            cancelled (``CancelledError`` for a map still queued,
            ``MapCancelledError`` for one that was running).
        """
        if self.cancel():
            return True
        with self._stop_lock:
            if self._committed or self.done():
                return False
            self._stop_requested = True
        self._interrupt()
        return True

    def stop_and_wait(self) -> None:
        """``stop()``, then wait until no worker of the map runs, with the
        main thread's signals held and dropped (``interrupts.SIGNALS``): a
        caller that gives up waiting returns only once nothing of the map
        writes its arrays any more.  (The main thread's own waits hold
        their signals from before they begin: ``Waiting``.)"""
        self.stop()
        held = SIGNALS.hold(drop)  # the later signals of a burst
        try:
            self.await_quiet()
        finally:
            if held:
                SIGNALS.release()

    def await_quiet(self) -> None:
        """Wait until no worker of the map runs (the driver settled it, or
        it never ran), for at most SETTLE_LIMIT: a hang detector."""
        try:
            self._quiet.result(SETTLE_LIMIT)
        except concurrent.futures.TimeoutError:
            warnings.warn(
                f"shmarray: a stopped map's workers did not end within "
                f"{SETTLE_LIMIT:.0f} s; they may still write its arrays",
                RuntimeWarning,
                stacklevel=4,
            )

    def cancel(self) -> bool:
        if super().cancel():
            self._set_quiet()  # it never ran
            return True
        return False

    def _set_quiet(self) -> None:
        """No worker of the map runs any more (the driver's word)."""
        try:
            self._quiet.set_result(None)
        except concurrent.futures.InvalidStateError:
            pass  # said already

    def _commit(self) -> bool:
        """The driver's last word on a map that ran: False if a stop came
        first (then it ends with MapCancelledError, as ``stop`` promised),
        else True, and a later ``stop`` returns False."""
        with self._stop_lock:
            if self._stop_requested:
                return False
            self._committed = True
            return True


# How long a caller that gave up on a map waits for its workers to be
# ended: the driver's settling takes milliseconds; this is a hang
# detector, not an expectation.
SETTLE_LIMIT = 60.0


# How often the main thread, waiting for a map that another thread drives,
# looks whether a Ctrl-C came: the handler's exception is held then, so it
# cannot cut the wait short itself (``Waiting``).
WAIT_SLICE = 0.05

# What a ``Waiting.wait`` getter returns when its slice passed with nothing.
LATER = object()


class Waiting:
    """A wait of the calling thread for a map that another thread drives:
    a blocking map queued behind another thread's, an imap stream's next
    chunk, a stream's close.

    In the main thread, a Ctrl-C (or a SIGTERM handler's exception) must
    not end such a wait while the map's workers still write its arrays,
    nor may the next Ctrl-C of a burst cut short the stopping of the map.
    So the signals are held (``interrupts.SIGNALS``) from the moment the
    wait may begin (before the map is queued) until it is over: the first
    exception is kept, and the wait, taken in slices of WAIT_SLICE, sees
    it, stops the map, waits until no worker of it runs, and raises it.
    Before, the exception was raised into the wait and the map stopped
    after it, when the next Ctrl-C of the burst could land first (found by
    the chaos test, seed 58362380: a map's rows written 0.22 s after its
    KeyboardInterrupt).  In another thread nothing is held: one plain wait.
    """

    __slots__ = ("held", "caught")

    def __init__(self) -> None:
        self.caught: BaseException | None = None
        self.held = SIGNALS.hold(self._catch)

    def _catch(self, exc: BaseException) -> None:
        if self.caught is None:  # the first of a burst; the rest fold into it
            self.caught = exc

    def wait(self, future: MapFuture, get: Callable[[float | None], Any]) -> Any:
        """What ``get(timeout)`` returns (``get`` returns LATER when its
        slice passed with nothing; given None, it blocks), or raise.  Ends
        the span: call once."""
        if not self.held:
            try:
                return get(None)
            except BaseException:
                if not future.done():  # an exception while waiting: stop the map too
                    future.stop_and_wait()
                raise
        try:
            while self.caught is None:
                got = get(WAIT_SLICE)
                if got is not LATER:
                    return got
        finally:
            # Signals still held: one caught by now (the map's end, an imap
            # chunk or the map's error came with it) stops the map too.
            try:
                if self.caught is not None and not future._quiet.done():
                    future.stop()
                    future.await_quiet()
            finally:
                self.close()  # whatever came (await_quiet's warning as an error)
            # One caught in the last bytecodes before the close is raised
            # as if it came just after the wait returned.
            if self.caught is not None:
                raise self.caught
        raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover

    def close(self) -> None:
        """End the span (when the wait never began: the map was not queued)."""
        if self.held:
            self.held = False
            SIGNALS.release()


def result_within(future: concurrent.futures.Future, timeout: float | None) -> Any:
    """``future.result()`` once it is done within ``timeout``; else LATER
    (a getter for ``Waiting.wait``)."""
    if timeout is not None:
        try:
            future.exception(timeout)  # raises nothing of the map's own
        except concurrent.futures.TimeoutError:
            return LATER
    return future.result()


def ended_within(future: concurrent.futures.Future, timeout: float | None) -> Any:
    """None once ``future`` is done within ``timeout``; else LATER.
    (Not ``concurrent.futures.wait``: it counts a cancelled future done
    only once its executor has seen the cancel, and a queued map's
    manager may never see it: the engine closed meanwhile.  Found by the
    chaos test: an imap stream that cancelled its queued map waited for
    ever in its close.)"""
    try:
        future.exception(timeout)
    except concurrent.futures.CancelledError:
        pass
    except concurrent.futures.TimeoutError:
        return LATER
    return None


# Every open dispatcher, closed by one exit hook of our own, registered when
# this module is imported: a map still running is stopped, and the workers
# stopped, before hooks registered earlier (by the libraries shmarray
# imports) tear anything down.
_OPEN: weakref.WeakSet = weakref.WeakSet()


def _close_all() -> None:
    for dispatcher in list(_OPEN):
        dispatcher.close()


atexit.register(at_exit, _close_all)


def _forget_all_in_child() -> None:
    """In a child forked from this process (by the user, or by a
    ``multiprocessing`` fork pool), every engine belongs to the parent: drop
    the child's copies of its pipes, so the parent's watchdog and workers
    still see the parent die, and make sure nothing here closes anything of
    the parent's at exit."""
    for dispatcher in list(_OPEN):
        dispatcher.forget_in_child()


os.register_at_fork(after_in_child=_forget_all_in_child)


_get_ident = threading.get_ident


def _stopped() -> MapCancelledError:
    return MapCancelledError("the map was stopped while running; its workers were replaced")


class Dispatcher:
    """Runs calls one at a time for every thread of one engine, and closes
    the engine's pool and blocks once.

    Holds no reference to the Engine, so the engine's finalizer can run.
    """

    def __init__(self, pool: Pool, table, cache: JobCache):
        self.pool = pool
        self.table = table
        self.runner = Runner(pool, table, cache, self._should_stop)
        self._owner = os.getpid()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue: collections.deque = collections.deque()
        self._driver: int | None = None  # ident of the driving thread
        self._current: MapFuture | None = None  # the queued call now running
        self._thread: threading.Thread | None = None
        self._manager: int | None = None  # its ident, once it runs
        self._closing = False
        self._closed = False
        self._close_on_release = False
        self._shutdown_lock = threading.Lock()  # one _shutdown at a time
        self._handed_off = False  # a thread of its own runs close() (see there)
        # What the main thread's span catches once its call has given the
        # driver's role back (``_let_go``): the first of a burst.
        self._late: BaseException | None = None
        self._keep_late = self._late_catch  # bound once: every map passes it
        _OPEN.add(self)

    @property
    def closing(self) -> bool:
        """Closed, or being closed: no new calls."""
        return self._closing

    # -- calls -----------------------------------------------------------------

    def run(self, call: Call) -> Any:
        """Run ``call`` and return its value; drive it here if idle.

        In the main thread, SIGINT's and SIGTERM's exceptions are held
        (``interrupts.SIGNALS``) from before the driver's role is taken
        until it is given back: what they raise ends the round
        (``Interrupts.catch``) and is raised once the round is settled and
        the role given back.  A signal's exception raised anywhere in
        between could leave the role taken (every later call would queue
        behind a driver that is gone) or cut the settling short.  When
        another thread drives, this thread waits (``Waiting``)."""
        waiting = None
        with self._lock:
            self._check_open()
            manager = self._manager
            if manager is not None and manager == _get_ident():
                # A done-callback of a queued call, run by the manager
                # thread: queued, this call would wait for the one thread
                # that drives the queue.  It goes first, once the driver
                # of the moment lets go.
                while self._driver is not None and not self._closing:
                    self._changed.wait(WAIT_SLICE)
                self._check_open()
                held = self._drive()
            elif self._driver is None and not self._queue:
                held = self._drive()
            else:
                # From before it is queued, a Ctrl-C stops this map before
                # it is raised.
                waiting = Waiting()
                try:
                    future = self._enqueue(call)
                except BaseException:
                    waiting.close()  # not queued after all
                    raise
        if waiting is None:
            try:
                values = self.runner.run(call)
            except BaseException:
                # One that came as it failed folds into the failure, the
                # first of a burst.
                self._give_back(held)
                raise
            caught = self._give_back(held)
            if caught is not None:
                raise caught  # one that came as the call ended well
            return finish(call, values)
        try:
            return waiting.wait(future, lambda timeout: result_within(future, timeout))
        except concurrent.futures.CancelledError:
            if self._closing and future.cancelled():
                self._check_open()
            raise

    def tidy(self) -> None:
        """Let workers unmap blocks that died, if no map is running (a
        mapped block still holds its memory).  Signals are held as in
        ``run``: the role is given back whatever comes."""
        with self._lock:
            if self._closing or self._driver is not None or self._queue:
                return
            held = self._drive()
        try:
            self.runner.tidy()
        except BaseException:
            self._give_back(held)
            raise
        caught = self._give_back(held)
        if caught is not None:
            raise caught

    def submit(self, call: Call) -> MapFuture:
        """Queue ``call``; returns at once."""
        with self._lock:
            self._check_open()
            return self._enqueue(call)

    def _check_open(self) -> None:
        if self._closing:
            if os.getpid() != self._owner:  # a forked child's copy: as Engine._live says it
                raise RuntimeError(
                    f"this Engine belongs to process {self._owner}; a forked "
                    "child cannot use it. Create an Engine in the child instead."
                )
            raise EngineClosedError(
                "this Engine is closed (or closing): its blocks are unlinked "
                "and its workers stopped. Create a new Engine (preferably in "
                "a `with` block)."
            )

    def _enqueue(self, call: Call) -> MapFuture:
        future = MapFuture(self.interrupt)
        self._queue.append((future, call))
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._manage, name="shmarray-manager", daemon=True
            )
            self._thread.start()
        self._changed.notify_all()
        return future

    def _manage(self) -> None:
        """The manager thread: drive queued calls in order."""
        self._manager = _get_ident()
        while True:
            with self._lock:
                while not self._closing and (self._driver is not None or not self._queue):
                    self._changed.wait()
                if self._closing:
                    return
                future, call = self._queue.popleft()
                if not future.set_running_or_notify_cancel():
                    del future, call  # release the caller's arrays now
                    continue
                self._drive()  # not the main thread: nothing held
                self._current = future
            # The future is settled after letting go, so its callbacks may
            # call the engine again.
            try:
                values = self.runner.run(call, future._set_quiet)
            except BaseException as raised:
                self._let_go()
                # a map stopped in time ends as stopped, whatever it raised
                failure = raised if future._commit() else _stopped()
                future.set_exception(failure)
                del future, call, failure  # release the caller's arrays now
                continue
            self._let_go()
            try:
                if not future._commit():
                    raise _stopped()
                future.set_result(finish(call, values))
            except BaseException as exc:  # combine raised, or stopped
                future.set_exception(exc)
            del future, call, values

    def _drive(self) -> bool:
        """Take the driver's role (under the lock); in the main thread, hold
        its signals first (True: release them once the role is given
        back).  A signal's exception before the hold leaves the role
        untaken; one after it is the round's (``Runner.catch``)."""
        self.runner.begin()
        held = SIGNALS.hold(self.runner.catch)
        self._driver = _get_ident()
        return held

    def _let_go(self, held: bool = False) -> BaseException | None:
        """Give the driver's role back.  ``held``: the main thread's span
        is open: what it caught for this call is taken and returned, and
        what it catches until it closes is kept in ``_late``, both under
        the lock, before another thread can take the role (whose ``begin``
        would forget what was caught, and whose round the next Ctrl-C
        would end)."""
        caught = None
        with self._lock:
            if held:  # in this order: a signal in between lands in one of them
                self._late = None  # (a burst's last, left as the last call ended)
                SIGNALS.retarget(self._keep_late)
                caught = self.runner.interrupts.take_caught()
            self._driver = None
            self._current = None
            if self._queue or self._closing:
                self._changed.notify_all()
            shutdown = self._close_on_release
        if shutdown:
            self._shutdown()
        return caught

    def _give_back(self, held: bool) -> BaseException | None:
        """Give the driver's role back (``_let_go``), then close the main
        thread's span if ``held``: what a signal raised for this call
        meanwhile, the first of a burst, or None."""
        caught = self._let_go(held)
        if held:
            SIGNALS.release()
            if caught is None:
                caught = self._late
            self._late = None
        return caught

    def _late_catch(self, exc: BaseException) -> None:
        if self._late is None:  # the first of a burst; the rest fold into it
            self._late = exc

    def _should_stop(self) -> BaseException | None:
        """Asked by the driver when interrupted: the error to end the map
        with, or None to go on."""
        if self._closing:
            return EngineClosedError(
                "the engine was closed while this map ran; its workers were stopped"
            )
        current = self._current
        if current is not None and current._stop_requested:
            return _stopped()
        return None

    def interrupt(self) -> None:
        """Make the driver ask ``_should_stop`` soon.  Any thread."""
        self.runner.interrupt()

    # -- closing ---------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Cancel queued calls, stop the running one, stop the pool, unlink
        every block.  Idempotent; from any thread; a no-op in a forked child,
        whose parent still owns everything.  In the main thread, a Ctrl-C
        (or a SIGTERM handler's exception) as it cancels the queued calls
        is raised once it is done; one while it waits for the running map
        to stop cuts it short, and the next call finishes the job.  Called
        by a signal handler or a finalizer inside a lock that closing
        takes, it returns at once and a thread of its own closes the
        engine once that lock is let go."""
        if os.getpid() != self._owner or self._closed:
            return
        if _within_a_lock(self):
            # Called by a signal handler (or a finalizer) that ran while
            # this thread held a lock that closing takes: waiting for it
            # here would wait for ever.  Closing from now on (no new call
            # starts, the running one is stopped), and another thread, one
            # for a burst of such calls, finishes once the lock is let go.
            self._closing = True
            self.interrupt()
            if not self._handed_off:
                self._handed_off = True
                threading.Thread(target=self.close, args=(timeout,), name="shmarray-close").start()
            return
        # In the main thread, signals are held while the queue is emptied
        # and every future on it cancelled: cut short there, a queued
        # call's future would stay pending for ever, and its waiter with
        # it.  What they raised then is raised once the close is done.
        # (Held no longer: a close that waits for a stuck driver can be cut
        # short by Ctrl-C, and the next call finishes it in a hurry.)
        kept: list[BaseException] = []

        def keep(exc: BaseException) -> None:
            if not kept:  # the first of a burst; the rest fold into it
                kept.append(exc)

        held = SIGNALS.hold(keep)
        try:
            with self._lock:
                self._closing = True
                queued = list(self._queue)
                self._queue.clear()
                self._changed.notify_all()
            for future, _ in queued:
                try:
                    future.cancel()  # runs its done-callbacks, here
                except BaseException as exc:  # a callback's own: the rest first
                    keep(exc)
            del queued
            self.interrupt()
        finally:
            if held:
                SIGNALS.release()
        me = threading.get_ident()
        with self._lock:
            if self._driver == me:
                # Closed from inside the driver (a finalizer run by garbage
                # collection there): finish when it lets go.
                self._close_on_release = True
                if kept:
                    raise kept[0]
                return
            deadline = time.monotonic() + timeout
            while self._driver is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not self._changed.wait(left):
                    break
            stuck = self._driver is not None
        if stuck:
            warnings.warn(
                "shmarray: a map did not stop within "
                f"{timeout:.0f} s of close(); its workers are killed",
                RuntimeWarning,
                stacklevel=3,
            )
        self._shutdown()
        if kept:
            raise kept[0]

    def forget_in_child(self) -> None:
        """See ``_forget_all_in_child``.  Takes no lock: another thread of
        the parent may have held one at the fork."""
        self._closing = self._closed = True
        self._thread = self._manager = None
        self.pool.forget_in_child()
        self.runner.forget_in_child()

    def _shutdown(self) -> None:
        with self._shutdown_lock:  # two closing threads: the second waits
            if self._closed:
                return
            # Names first: even if stopping a worker goes wrong, /dev/shm is clean.
            for what, step in (
                ("unlinking blocks", self.table.close),
                ("stopping workers", self.pool.close),
                ("closing the dispatcher", self.runner.close),
            ):
                try:
                    step()
                except Exception as exc:
                    warnings.warn(
                        f"shmarray: {what} failed: {exc!r}", RuntimeWarning, stacklevel=3
                    )
            self._closed = True
        # Outside the lock: the manager thread may be closing too (a
        # done-callback's close), and waits for it.
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)
        if all(d._closed for d in list(_OPEN)):
            SIGNALS.restore()  # the last engine: the user's handlers, as they were


def _within_a_lock(dispatcher: Dispatcher) -> bool:
    """Whether the calling thread, further down its stack, runs code that
    holds a lock ``dispatcher.close()`` takes (its own, its shutdown's, its
    block table's), or may: then close() was called from within it, by a
    signal handler or a finalizer that ran there.  Judged by the code on
    the stack, and by whether its lock is held at all (by this thread or
    another): it may send to another thread a close() that was safe to run
    here, never the other way round.  tests/test_dispatch.py checks that
    the sets below name every function with such a ``with`` block."""
    frame = inspect.currentframe()
    if frame is None:  # no frames on this Python: judge by nothing
        return False
    frame = frame.f_back  # close() itself
    frame = frame.f_back if frame is not None else None  # its caller
    while frame is not None:
        code = frame.f_code
        if code in _DISPATCHER_LOCKING and dispatcher._lock.locked():
            return True
        if code is _SHUTDOWN and dispatcher._shutdown_lock.locked():
            return True
        if code in _TABLE_LOCKING and dispatcher.table._lock.locked():
            return True
        frame = frame.f_back
    return False


def finish(call: Call, values) -> Any:
    """The call's result: the values combined in chunk order, for reduce;
    for a tracked call (``values`` is its Tally), a MapReport with
    ``errors="collect"``, else the value, or the earliest failure raised."""
    if type(values) is Tally:
        return values.finish(call)
    if call.combine is None:
        return None
    return combined(call.combine, values)


# The functions that take a lock close() takes (those they call run below
# them on the stack): see ``_within_a_lock``.
_DISPATCHER_LOCKING = frozenset(
    f.__code__
    for f in (
        Dispatcher.run,
        Dispatcher.tidy,
        Dispatcher.submit,
        Dispatcher.close,
        Dispatcher._let_go,
        Dispatcher._manage,  # (a finalizer may run in the manager thread)
    )
)
_SHUTDOWN = Dispatcher._shutdown.__code__
_TABLE_LOCKING = frozenset(
    f.__code__
    for f in (
        BlockTable._allocate,
        BlockTable._reap,
        BlockTable.locate,
        BlockTable.take_released,
        BlockTable.live,
        BlockTable.close,
    )
)
