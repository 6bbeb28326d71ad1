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

How a map runs (``Runner.run``): the static schedule gives each worker its
contiguous group of chunks, the same rows every call; the dynamic schedule
gives every worker the whole list, and they take chunks one at a time from
a shared counter.  The driver rings the busy workers, spins briefly on their
done words, then sleeps on their pipes and process sentinels until the last
one wakes it, a worker dies, the timeout passes, or somebody interrupts.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import os
import pickle
import select
import threading
import time
import warnings
import weakref
from typing import Any, Callable

import numpy as np

from shmarray import boundary, control
from shmarray.control import (ABORT, CHUNK, CHUNKS, COORD_ASLEEP, DONE, NEXT,
                              RAN, REPLY, STARTED, STOP)
from shmarray.descriptors import (WAKE, Define, Failed, Forget, Install, Rebind,
                                  Release, Values, decode, pack_args)
from shmarray.errors import (EngineClosedError, KernelError, MapCancelledError,
                             MapReport, RemoteTraceback, TaskTimeoutError,
                             WorkerCrashedError)
from shmarray.jobs import Call, JobCache, KernelTable, same_args
from shmarray.pool import Pool, WorkerProcess
from shmarray.progress import ChunkProgress
from shmarray.progress import resolve as resolve_progress

# How long the driver spins on the done words before it sleeps.  A map
# shorter than this returns about 10 us sooner (no wake-up); a longer one
# loses this much CPU to the spin, which yields to the workers meanwhile.
# Measured on the 2-vCPU reference VM: 50 us kept a 1024-square heat step
# within 8% of prange, where spinning for the whole map cost 2.5 times.
SPIN = 50e-6
SPIN_ROUNDS = 64             # rounds per call into the spin loop: about 6 us


class _NeverStarted(Exception):
    """A worker died before it took its ring."""

    def __init__(self, worker: WorkerProcess):
        super().__init__(worker.pid)
        self.worker = worker


class MapFuture(concurrent.futures.Future):
    """The future of a submitted map or reduce.

    ``cancel()`` follows the ``Future`` contract: it succeeds only while the
    map is queued.  ``stop()`` also ends a running map: the workers busy
    with it (maybe deep in a numba loop) are killed and replaced, and the
    future ends with ``MapCancelledError`` (a
    ``concurrent.futures.CancelledError``).
    """

    def __init__(self, interrupt: Callable[[], None]):
        super().__init__()
        self.stop_requested = False
        self._interrupt = interrupt

    def stop(self) -> bool:
        """Cancel the map if queued, stop it if running.  False if it had
        already finished."""
        if self.cancel():
            return True
        with self._condition:
            if self.done():
                return False
            self.stop_requested = True
        self._interrupt()
        return True


# Every open dispatcher, closed by one exit hook of our own, registered when
# this module is imported: a map still running is stopped, and the workers
# stopped, before hooks registered earlier (by the libraries shmarray
# imports) tear anything down.
_OPEN: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for dispatcher in list(_OPEN):
        dispatcher.close()


def _forget_all_in_child() -> None:
    """In a child forked from this process (by the user, or by a
    ``multiprocessing`` fork pool), every engine belongs to the parent: drop
    the child's copies of its pipes, so the parent's watchdog and workers
    still see the parent die, and make sure nothing here closes anything of
    the parent's at exit."""
    for dispatcher in list(_OPEN):
        dispatcher.forget_in_child()


os.register_at_fork(after_in_child=_forget_all_in_child)


class Dispatcher:
    """Runs calls one at a time for every thread of one engine, and closes
    the engine's pool and blocks once.

    Holds no reference to the Engine, so the engine's finalizer can run.
    """

    def __init__(self, pool: Pool, table, cache: JobCache):
        self.pool = pool
        self.table = table
        self.runner = Runner(pool, table, cache)
        self._owner = os.getpid()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue: collections.deque = collections.deque()
        self._driver: int | None = None           # ident of the driving thread
        self._current: MapFuture | None = None    # the queued call now running
        self._thread: threading.Thread | None = None
        self._closing = False
        self._closed = False
        self._close_on_release = False
        _OPEN.add(self)

    @property
    def closing(self) -> bool:
        """Closed, or being closed: no new calls."""
        return self._closing

    # -- calls -----------------------------------------------------------------

    def run(self, call: Call) -> Any:
        """Run ``call`` and return its value; drive it here if idle."""
        driving = False
        try:
            with self._lock:
                self._check_open()
                if self._driver is None and not self._queue:
                    driving = True        # first: _let_go is then harmless
                    self._driver = threading.get_ident()
                else:
                    future = self._enqueue(call)
            if driving:
                values = self.runner.run(call, self._should_stop)
        finally:
            if driving:
                self._let_go()
        if driving:
            return finish(call, values)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            if self._closing and future.cancelled():
                self._check_open()
            raise
        except BaseException:
            future.stop()          # Ctrl-C while waiting stops it too
            raise

    def tidy(self) -> None:
        """Let workers unmap blocks that died, if no map is running (a
        mapped block still holds its memory)."""
        with self._lock:
            if self._closing or self._driver is not None or self._queue:
                return
            self._driver = threading.get_ident()
        try:
            self.runner.tidy()
        finally:
            self._let_go()

    def submit(self, call: Call) -> MapFuture:
        """Queue ``call``; returns at once."""
        with self._lock:
            self._check_open()
            return self._enqueue(call)

    def _check_open(self) -> None:
        if self._closing:
            raise EngineClosedError(
                "this Engine is closed (or closing): its blocks are unlinked "
                "and its workers stopped. Create a new Engine (preferably in "
                "a `with` block).")

    def _enqueue(self, call: Call) -> MapFuture:
        future = MapFuture(self.interrupt)
        self._queue.append((future, call))
        if self._thread is None:
            self._thread = threading.Thread(target=self._manage,
                                            name="shmarray-manager", daemon=True)
            self._thread.start()
        self._changed.notify_all()
        return future

    def _manage(self) -> None:
        """The manager thread: drive queued calls in order."""
        while True:
            with self._lock:
                while not self._closing and (self._driver is not None
                                             or not self._queue):
                    self._changed.wait()
                if self._closing:
                    return
                future, call = self._queue.popleft()
                if not future.set_running_or_notify_cancel():
                    del future, call      # release the caller's arrays now
                    continue
                self._driver = threading.get_ident()
                self._current = future
            # The future is settled after letting go, so its callbacks may
            # call the engine again.
            try:
                values = self.runner.run(call, self._should_stop)
            except BaseException as exc:
                self._let_go()
                future.set_exception(exc)
                del future, call, exc     # release the caller's arrays now
                continue
            self._let_go()
            try:
                future.set_result(finish(call, values))
            except BaseException as exc:  # combine raised
                future.set_exception(exc)
            del future, call, values

    def _let_go(self) -> None:
        with self._lock:
            self._driver = None
            self._current = None
            if self._queue or self._closing:
                self._changed.notify_all()
            shutdown = self._close_on_release
        if shutdown:
            self._shutdown()

    def _should_stop(self) -> BaseException | None:
        """Asked by the driver when interrupted: the error to end the map
        with, or None to go on."""
        if self._closing:
            return EngineClosedError(
                "the engine was closed while this map ran; its workers were "
                "stopped")
        current = self._current
        if current is not None and current.stop_requested:
            return MapCancelledError(
                "the map was stopped while running; its workers were replaced")
        return None

    def interrupt(self) -> None:
        """Make the driver ask ``_should_stop`` soon.  Any thread."""
        self.runner.interrupt()

    # -- closing ---------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Cancel queued calls, stop the running one, stop the pool, unlink
        every block.  Idempotent; from any thread; a no-op in a forked child,
        whose parent still owns everything.  Every step can be taken again,
        so a close interrupted by Ctrl-C is finished by the next call."""
        if os.getpid() != self._owner or self._closed:
            return
        with self._lock:
            self._closing = True
            queued = list(self._queue)
            self._queue.clear()
            self._changed.notify_all()
        for future, _ in queued:
            future.cancel()
        del queued
        self.interrupt()
        me = threading.get_ident()
        with self._lock:
            if self._driver == me:
                # Closed from inside the driver (a finalizer run by garbage
                # collection there): finish when it lets go.
                self._close_on_release = True
                return
            deadline = time.monotonic() + timeout
            while self._driver is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not self._changed.wait(left):
                    break
            stuck = self._driver is not None
        if stuck:
            warnings.warn("shmarray: a map did not stop within "
                          f"{timeout:.0f} s of close(); its workers are killed",
                          RuntimeWarning, stacklevel=3)
        self._shutdown()

    def forget_in_child(self) -> None:
        """See ``_forget_all_in_child``.  Takes no lock: another thread of
        the parent may have held one at the fork."""
        self._closing = self._closed = True
        self._thread = None
        self.pool.forget_in_child()
        self.runner.forget_in_child()

    def _shutdown(self) -> None:
        # Names first: even if stopping a worker goes wrong, /dev/shm is clean.
        for what, step in (("unlinking blocks", self.table.close),
                           ("stopping workers", self.pool.close),
                           ("closing the dispatcher", self.runner.close)):
            try:
                step()
            except Exception as exc:
                warnings.warn(f"shmarray: {what} failed: {exc!r}",
                              RuntimeWarning, stacklevel=3)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)
        self._closed = True


def finish(call: Call, values) -> Any:
    """The call's result: the values combined in chunk order, for reduce;
    for a tracked call (``values`` is its Tally), a MapReport with
    ``errors="collect"``, else the value, or the earliest failure raised."""
    if type(values) is Tally:
        return values.finish(call)
    if call.combine is None:
        return None
    return combined(call.combine, values)


def combined(combine: Callable, values: list) -> Any:
    result = values[0]
    for v in values[1:]:
        result = combine(result, v)
    return result


class Tally:
    """A tracked call's chunks, across the rounds that run them: values and
    failures by chunk index, attempts of the chunks whose worker died or
    timed out, and, for the round running, the workers lost in it."""

    def __init__(self, call: Call):
        self.chunks = call.job.plan.chunks
        self.values: dict[int, Any] = {}
        self.failed: dict[int, BaseException] = {}
        self.attempts: dict[int, int] = {}
        self.retried: set[int] = set()
        self.lost: list[tuple[WorkerProcess, BaseException]] = []
        self.lost_on: dict[int, BaseException] = {}   # chunk -> why its worker was lost
        self.stream = call.stream

    def final(self, i: int, retries: int, exc: BaseException | None) -> BaseException | None:
        """``exc``, noted as chunk ``i``'s last attempt when there were more."""
        if exc is not None and retries:
            lo, hi = self.chunks[i]
            exc.add_note(f"rows {lo}:{hi} failed {self.attempts[i]} times "
                         f"(retries={retries})")
        return exc

    def take(self, msg: Values) -> None:
        for i, v in zip(msg.indices, msg.values):
            if i not in self.values:
                self.values[i] = v
                if self.stream is not None:
                    self.stream.put(self.chunks[i], v)

    def finish(self, call: Call) -> Any:
        failed = [(self.chunks[i], self.failed[i]) for i in sorted(self.failed)]
        value = None
        if call.combine is not None and self.values:
            value = combined(call.combine, [self.values[i] for i in sorted(self.values)])
        if not call.collect:
            if failed:
                raise failed[0][1]
            return value
        return MapReport(failed, [self.chunks[i] for i in sorted(self.retried)],
                         value, len(self.chunks))


class Runner:
    """Runs one call on the pool: sends what each busy worker lacks, rings,
    waits, collects values and errors.  Called by the driver only, except
    ``interrupt``."""

    def __init__(self, pool: Pool, table, cache: JobCache):
        self.pool = pool
        self.table = table
        self.cache = cache
        self.kernels = KernelTable()
        self.defined: dict[int, frozenset[str]] = {}   # job key -> its blocks
        self.dirty = False           # a map was abandoned half-way
        self._tally: Tally | None = None  # the tracked call running
        self._forgets = 0            # Forget and Release messages sent
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # -- from any thread ---------------------------------------------------------

    def interrupt(self) -> None:
        """Wake the driver wherever it waits: its spin watches ABORT, its
        sleep the wake pipe."""
        if self.pool.ctl.size:
            control.store(self.pool.ctl, ABORT, 1)
        try:
            os.write(self._wake_w, b"!")
        except OSError:
            pass           # already pending, or closed

    def close(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    forget_in_child = close          # the wake pipe is this process's own

    # -- the driver ----------------------------------------------------------------

    def run(self, call: Call, should_stop: Callable[[], BaseException | None]) -> Any:
        """Run ``call``: its values in chunk order (reduce) or None; for a
        tracked call, its Tally.

        Raises the earliest failing chunk's exception, WorkerCrashedError,
        TaskTimeoutError, or what ``should_stop`` returns when interrupted;
        every worker is idle or replaced when it returns, except after an
        interruption of the cleanup itself, which the next run repairs.
        What the workers printed is forwarded before it returns.
        """
        self._should_stop = should_stop
        try:
            if call.job.tracked:
                return self._tracked(call)
            return self._round(call, call.job)
        finally:
            forwarder = self.pool.forwarder
            if forwarder.begun or forwarder.pending():
                forwarder.drain()

    def _round(self, call: Call, job) -> list | None:
        """One ring of ``job`` on its workers; see ``run``."""
        args = call.args
        # The lean path: this job ran before, every worker it uses still
        # holds it with these arguments, and nothing is pending.  Then a map
        # is a ring and a wait.
        if (job.ready != self._forgets or job.ready_pool != self.pool.generation
                or self.dirty or self.table.has_released() or self.cache.forgotten
                or not (args is job.ready_args or same_args(job.ready_args, args))):
            self._prepare(job, args)
        busy = job.busy
        pool = self.pool
        pool.seq += 1
        seq = pool.seq
        if (job.dynamic or job.tracked) and job.boundary is not None and job.indices is None:
            # Chunks with no fixed owners to fill ghosts next to (or that
            # may run again elsewhere): the caller fills them (copies of the
            # surface only).
            for a in call.arrays:
                boundary.fill(a, job.halo, job.boundary, job.axis)
        if job.dynamic or job.iterated or job.boundary is not None or job.tracked:
            pool.ctl[NEXT] = 0
            pool.ctl[STOP] = 0
            if call.stream is not None and call.stream.halted:
                pool.ctl[STOP] = 1
        self.dirty = True
        # Messages read while waiting, kept if a worker found dead before it
        # took its ring makes us wait again.
        self._inbox = {}
        try:
            for w in busy:
                self._ring(w, job, seq, call.steps)
            while True:
                try:
                    values = self._wait(busy, seq, call, job)
                    break
                except _NeverStarted as lost:
                    # Dead before it took the ring (killed while idle):
                    # nothing ran, so a fresh worker takes the same chunks.
                    i = busy.index(lost.worker)
                    self._replace(lost.worker.index)
                    key, payload, _ = self.kernels.entry(job.kernel)
                    w, indices, chunks = job.groups[i]
                    busy[i] = self._provide(w, key, payload, job, args, indices, chunks)
                    self._ring(busy[i], job, seq, call.steps)
        except BaseException:
            self._abandon(busy, seq)
            raise
        finally:
            if not job.cached:
                self.cache.forgotten.append(job.key)
        self.dirty = False
        if pool.max_tasks is not None or pool.max_memory is not None:
            self._recycle(busy, job.dynamic)
        return values

    def _tracked(self, call: Call) -> Tally:
        """Run a tracked call in rounds: the first as planned (a worker
        that crashes in it is replaced within it, see ``_respawn``), then,
        while chunks are left that never ran, whose value was lost, or
        whose worker crashed or timed out (fewer than ``retries`` times),
        a dynamic round of just those.  A kernel's exception is final.
        Stops early when failures are not collected and one is final, or
        when the imap stream is closed."""
        job = call.job
        tally = Tally(call)
        n = len(job.plan.chunks)
        board = control.board(self.pool.ctl)
        todo = list(range(n))
        round_job = job
        while todo:
            if round_job is job:
                board[:n] = control.PENDING
            else:
                board[todo] = control.PENDING
            tally.lost = []
            tally.lost_on = {}
            self._tally = tally
            try:
                self._round(call, round_job)
            finally:
                self._tally = None
            if (round_job is job and not tally.lost and not tally.failed
                    and (not job.want_values or len(tally.values) == n)
                    and (board[:n] == control.FINISHED).all()):
                break                 # the usual case: every chunk finished
            lost_on = tally.lost_on
            self._replace_all([w for w, _ in tally.lost])
            # A worker lost on a chunk made progress too: an attempt counted.
            again, progress = [], any(k >= 0 for k in lost_on)
            for i in todo:
                state = board[i]
                if state == control.FINISHED and (not job.want_values or i in tally.values):
                    progress = True
                    if i in tally.attempts:
                        tally.retried.add(i)
                elif state == control.FAILED and i in tally.failed:
                    progress = True
                elif state == control.RUNNING:
                    progress = True
                    tally.attempts[i] = tally.attempts.get(i, 0) + 1
                    if tally.attempts[i] > call.retries:
                        lo, hi = tally.chunks[i]
                        why = lost_on.get(i) or WorkerCrashedError(
                            f"the worker running rows {lo}:{hi} was lost",
                            pid=0, exitcode=None, rows=(lo, hi))
                        tally.failed[i] = tally.final(i, call.retries, why)
                    else:
                        again.append(i)
                else:
                    again.append(i)          # never taken, or its value lost
            if call.stream is not None and call.stream.halted:
                break
            if tally.failed and not call.collect:
                break
            if again and not progress:
                # Nothing ran: every worker died before its first chunk
                # (loading the kernel or the arguments).  Trying again would
                # do the same.
                exc = tally.lost[0][1] if tally.lost else WorkerCrashedError(
                    "no chunk could run", pid=0, exitcode=None, rows=None)
                for i in again:
                    tally.failed[i] = exc
                break
            todo = again
            if todo:
                round_job = job.retry(self.cache.new_key(), todo)
        return tally

    def _prepare(self, job, args: tuple) -> None:
        """Make every worker ``job`` uses hold it, its kernel and ``args``."""
        if self.dirty:
            self.pool.recover(self._wake_r, self._closing)
            self.dirty = False
        if self.table.has_released() or self.cache.forgotten:
            self.tidy()
        key, payload, evicted = self.kernels.entry(job.kernel)
        if evicted:
            self._forget(kernels=evicted)
        if job.groups is None:
            job.groups = self._groups(job)
            job.done_at = np.array([control.slot(w) + DONE for w, _, _ in job.groups],
                                   np.int64)
        job.busy = [self._provide(w, key, payload, job, args, indices, chunks)
                    for w, indices, chunks in job.groups]
        # Valid until a worker is replaced or something is forgotten.
        # (Bound, so the job holds descriptors, never the caller's arrays.)
        job.ready, job.ready_pool = self._forgets, self.pool.generation
        job.ready_args = job.bind(args)

    def _groups(self, job) -> tuple:
        """(worker, chunk indices, chunks) for each worker the job uses:
        static, each its own group; dynamic, every worker all chunks."""
        chunks = job.plan.chunks
        if not job.dynamic:
            return job.plan.groups
        indices = job.indices or tuple(range(len(chunks)))
        return tuple((w, indices, chunks)
                     for w in range(min(self.pool.size, len(chunks))))

    @staticmethod
    def _neighbours(job, index: int) -> tuple[int, ...]:
        """Where the control lines start of the workers that worker
        ``index`` waits for between the stages of a staged job (iterated, or
        with ghost cells to fill): those whose rows it reads, and those that
        read its rows (see ``boundary.readers``)."""
        if job.dynamic or job.tracked or not (job.iterated or job.boundary is not None):
            return ()
        order = [w for w, _, _ in job.groups]      # groups run in row order
        rows = [(chunks[0][0], chunks[-1][1]) for _, _, chunks in job.groups]
        n = job.plan.chunks[-1][1] + job.halo
        waits = boundary.readers(rows, n, job.halo, job.boundary)[order.index(index)]
        return tuple(control.slot(order[g]) for g in sorted(waits))

    def _ring(self, w: WorkerProcess, job, seq: int, steps: int) -> None:
        w.rung = seq
        if control.ring(self.pool.ctl, w.at, job.key, w.sent, steps, seq):
            w.wake()

    def _closing(self) -> bool:
        return isinstance(self._should_stop(), EngineClosedError)

    def tidy(self) -> None:
        """Before a map: tell workers which blocks are gone and which jobs
        are forgotten."""
        released = self.table.take_released()
        if released:
            self.pool.watchdog.blocks(gone=released)
            gone = set(released)
            self.cache.drop_blocks(gone)
            dropped = [k for k, b in self.defined.items() if b & gone]
            for k in dropped:
                del self.defined[k]
            self._forgets += 1
            for w in self.pool.workers:
                for k in dropped:
                    w.jobs.pop(k, None)
                self._send(w, Release(released))
        forgotten = []
        while self.cache.forgotten:
            forgotten.append(self.cache.forgotten.popleft())
        if forgotten:
            self._forget(jobs=forgotten)

    def _forget(self, kernels=(), jobs=()) -> None:
        self._forgets += 1
        for k in jobs:
            self.defined.pop(k, None)
        for w in self.pool.workers:
            ks = tuple(k for k in kernels if k in w.kernels)
            js = tuple(k for k in jobs if k in w.jobs)
            if ks or js:
                w.kernels.difference_update(ks)
                for k in js:
                    del w.jobs[k]
                self._send(w, Forget(ks, js))

    def _send(self, w: WorkerProcess, msg) -> None:
        """A message that matters only to a live worker."""
        try:
            w.send(msg)
        except OSError:
            pass            # dead: replaced before it is given work

    def _provide(self, index: int, key: int, payload: bytes, job, args: tuple,
                 indices: tuple, chunks: tuple) -> WorkerProcess:
        """Worker ``index`` with the kernel, the job and ``args``; a worker
        found dead while idle is replaced (nothing was lost)."""
        w = self.pool.workers[index]
        try:
            if key not in w.kernels:
                w.send(Install(key, payload))
                w.kernels.add(key)
            held = w.jobs.get(job.key)
            if held is None:
                bound = job.bind(args)
                w.send(Define(job.key, key, job.descriptors, pack_args(bound),
                              job.halo, chunks, indices, job.want_values,
                              job.dynamic, job.iterated,
                              self._neighbours(job, index), job.axis,
                              None if job.dynamic or job.tracked or job.boundary is None
                              else tuple(job.boundary), job.mode))
                w.jobs[job.key] = bound
                self.defined[job.key] = job.blocks
            elif held is not args and not same_args(held, args):
                bound = job.bind(args)
                w.send(Rebind(job.key, pack_args(bound)))
                w.jobs[job.key] = bound
            return w
        except OSError:
            self._replace(index)
            return self._provide(index, key, payload, job, args, indices, chunks)

    def _wait(self, busy: list[WorkerProcess], seq: int, call: Call, job) -> list | None:
        ctl = self.pool.ctl
        done_at = job.done_at
        now = time.monotonic()
        deadline = None if call.timeout is None else now + call.timeout
        spin_until = now + SPIN
        # Asked-for progress shows even for a quick map, and streamed values
        # as they come: no spin then.
        while call.progress is not True and call.stream is None:
            left = control.wait_done(ctl, done_at, seq, SPIN_ROUNDS)
            if left == 0:
                return self._collect(busy, seq, call, job, self._inbox)
            if left < 0:
                self._check_interrupt()
            elif time.monotonic() > spin_until:
                break
        return self._sleep(busy, seq, call, job, done_at, deadline)

    def _check_interrupt(self) -> None:
        control.store(self.pool.ctl, ABORT, 0)
        try:
            while os.read(self._wake_r, 512):
                pass
        except OSError:
            pass
        exc = self._should_stop()
        if exc is not None:
            raise exc
        tally = self._tally
        if tally is not None and tally.stream is not None and tally.stream.halted:
            control.store(self.pool.ctl, STOP, 1)    # imap closed: no new chunks

    def _sleep(self, busy, seq, call, job, done_at, deadline) -> list | None:
        """Wait asleep: on the busy workers' pipes and sentinels and the
        wake pipe.  The last worker to finish wakes us.  In a tracked call,
        a worker that dies or times out is set aside (``_lose``) and the
        others go on."""
        ctl = self.pool.ctl
        tally = self._tally
        poller = select.poll()
        by_fd: dict[int, tuple[WorkerProcess | None, bool]] = {self._wake_r: (None, False)}
        poller.register(self._wake_r, select.POLLIN)
        for w in busy:
            for fd, is_sentinel in ((w.results.fileno(), False), (w.sentinel, True)):
                poller.register(fd, select.POLLIN)
                by_fd[fd] = (w, is_sentinel)
        forwarder = self.pool.forwarder
        output = set(forwarder.fds)       # what kernels print, shown as it comes
        for fd in output:
            poller.register(fd, select.POLLIN)
        inbox = self._inbox
        progress = None
        mode = resolve_progress(call.progress)
        if mode is not False:
            progress = ChunkProgress(len(job.plan.chunks) * call.steps, mode,
                                     getattr(job.kernel, "__name__", "map"))
        try:
            while True:
                control.store(ctl, COORD_ASLEEP, 1)
                left = control.wait_done(ctl, done_at, seq, 1)
                if left == 0:
                    break
                if left < 0:
                    self._check_interrupt()
                    continue
                waits = []
                if deadline is not None:
                    now = time.monotonic()
                    if now >= deadline:
                        if tally is None:
                            raise self._timed_out(busy, seq, call.timeout)
                        for w in self._unfinished(busy, seq):
                            w.kill()
                            self._lose(w, seq, poller, by_fd, self._timeout_error(
                                w, call.timeout, tally.chunks))
                        continue
                    waits.append(deadline - now)
                if progress is not None:
                    ahead = progress.wait()
                    waits.append(0.2 if ahead is None else ahead)
                # poll() takes at most 2**31-1 ms: a longer timeout is waited
                # for in slices.
                ms = -1 if not waits else min(max(1, int(min(waits) * 1000) + 1),
                                              2**31 - 1)
                events = poller.poll(ms)
                control.store(ctl, COORD_ASLEEP, 0)
                shown = [fd for fd, _ in events if fd in output]
                if shown:
                    for fd in forwarder.forward(shown):
                        poller.unregister(fd)
                        output.discard(fd)
                for fd, _ in events:
                    if fd not in by_fd:
                        continue                  # output, or set aside
                    w, is_sentinel = by_fd[fd]
                    if w is None:
                        self._check_interrupt()
                    elif is_sentinel:
                        poller.unregister(fd)
                        del by_fd[fd]
                        at = control.slot(w.index)
                        if ctl[at + DONE] >= seq:
                            continue              # finished, then died
                        if ctl[at + STARTED] < seq:
                            raise _NeverStarted(w)
                        if tally is None:
                            raise self._crashed(w, busy, seq, call)
                        self._lose(w, seq, poller, by_fd,
                                   self._death_error(w, job, tally.chunks))
                        started = time.monotonic()
                        new = self._respawn(w, busy, seq, call, job)
                        if deadline is not None:
                            # Starting a worker is not the kernels' time.
                            deadline += time.monotonic() - started
                        if new is not None:
                            for fd, is_sentinel in ((new.results.fileno(), False),
                                                    (new.sentinel, True)):
                                poller.register(fd, select.POLLIN)
                                by_fd[fd] = (new, is_sentinel)
                            # The dead worker's descriptor numbers may now be
                            # the new one's: the rest of these events are
                            # stale.  Poll again.
                            break
                    else:
                        self._read_into(w, inbox, poller, fd)
                if progress is not None:
                    progress.update_to(self._ran(busy, seq))
        finally:
            control.store(ctl, COORD_ASLEEP, 0)
            if progress is not None:
                progress.update_to(self._ran(busy, seq))
                progress.close()
        return self._collect(busy, seq, call, job, inbox)

    def _lose(self, w: WorkerProcess, seq: int, poller, by_fd: dict,
              exc: BaseException) -> None:
        """Set aside worker ``w`` of a tracked call, dead or killed: read
        what it left in its pipe now (its descriptors are closed, and their
        numbers reused, when it is replaced), and wait for it no more
        (unless ``_respawn`` puts a new one in its place)."""
        self._inbox.setdefault(w, []).extend(self._rest(w))
        for fd in [fd for fd, (o, _) in by_fd.items() if o is w]:
            del by_fd[fd]
            try:
                poller.unregister(fd)
            except KeyError:
                pass                  # at end-of-file already
        self._tally.lost.append((w, exc))
        self._tally.lost_on[int(self.pool.ctl[w.at + CHUNK])] = exc
        control.store(self.pool.ctl, w.at + DONE, seq)

    def _respawn(self, dead: WorkerProcess, busy: list, seq: int, call: Call,
                 job) -> WorkerProcess | None:
        """A tracked round lost ``dead`` to a crash: settle the chunk it was
        running (one attempt more: run again, or failed for good), and
        unless the call must stop now, start a fresh worker in its place
        and ring it in this same round, so the round goes on with every
        worker: with the same job under the dynamic schedule (it takes
        chunks from the shared counter), with the dead worker's unfinished
        chunks under the static one.  None if nobody was started."""
        tally = self._tally
        ctl = self.pool.ctl
        board = control.board(ctl)
        k = int(ctl[dead.at + CHUNK])
        if k < 0:
            return None   # died loading the kernel: a new one would too
        exc = tally.lost[-1][1]
        if board[k] == control.RUNNING:
            tally.attempts[k] = tally.attempts.get(k, 0) + 1
            if tally.attempts[k] > call.retries:
                tally.failed[k] = tally.final(k, call.retries, exc)
                board[k] = control.FAILED
            else:
                board[k] = control.PENDING
        stop = (k in tally.failed and not call.collect) or (
            call.stream is not None and call.stream.halted)
        if stop:
            control.store(ctl, STOP, 1)    # raise now: start nothing new
            return None
        if job.dynamic:
            rerun = job
            indices = job.groups[0][1]
        else:
            group = next(g for g in job.groups if g[0] == dead.index)
            indices = [i for i in group[1] if board[i] == control.PENDING]
            if not indices:
                return None
            rerun = job.retry(self.cache.new_key(), indices)
            rerun.dynamic = False          # its own rows: others may rerun too
            self.cache.forgotten.append(rerun.key)
            indices = rerun.indices
        # The new worker must answer this ring: it starts as if it had
        # answered the one before.
        control.store(ctl, dead.at + DONE, seq - 1)
        self._replace(dead.index)
        new = self.pool.workers[dead.index]
        key, payload, _ = self.kernels.entry(job.kernel)
        self._provide(new.index, key, payload, rerun, call.args, indices,
                      rerun.plan.chunks)
        self._ring(new, rerun, seq, call.steps)
        busy[busy.index(dead)] = new
        return new

    def _ran(self, busy, seq: int) -> int:
        """Chunks of ring ``seq`` done so far."""
        ctl = self.pool.ctl
        return sum(int(ctl[w.at + RAN]) for w in busy if ctl[w.at + STARTED] == seq)

    def _read_into(self, w: WorkerProcess, inbox: dict, poller, fd: int) -> None:
        """Read what woke us: wake frames go, messages wait in ``inbox``;
        streamed values are taken at once."""
        try:
            data = w.results.recv_bytes()
        except (EOFError, OSError):
            poller.unregister(fd)          # dying: its sentinel will tell
            return
        if not data:
            return
        if self._tally is not None and self._tally.stream is not None:
            try:
                msg = decode(data)
            except Exception:
                msg = None                 # _collect decodes it again, and says why
            if type(msg) is Values:
                self._tally.take(msg)
                data = None                # counted, and taken
            elif msg is not None:
                data = msg
        inbox.setdefault(w, []).append(data)

    def _collect(self, busy, seq, call, job, inbox=None) -> list | None:
        """Every worker is done: read their replies, raise the earliest
        failing chunk's error, or return the values in chunk order.  In a
        tracked call, the values and errors go to the tally instead, and a
        lost worker's pipe is read to its end."""
        ctl = self.pool.ctl
        tally = self._tally
        if not job.want_values and tally is None:
            for w in busy:
                if ctl[w.at + REPLY]:
                    break
            else:
                return None
        values = [None] * len(job.plan.chunks) if job.want_values else None
        chunks = job.plan.chunks if tally is None else tally.chunks
        lost = set() if tally is None else {id(w) for w, _ in tally.lost}
        problems = []
        readers = busy if tally is None else busy + [w for w, _ in tally.lost
                                                     if w not in busy]
        for w in readers:
            held = (inbox or {}).get(w, [])
            if id(w) in lost:
                messages = held + self._rest(w)
            else:
                waiting = int(ctl[w.at + REPLY])
                messages = held[:waiting]
                try:
                    messages += [w.recv_bytes() for _ in range(waiting - len(messages))]
                except (EOFError, OSError):
                    raise self._crashed(w, busy, seq, call) from None
            for data in messages:
                if data is None:
                    continue                   # a streamed value, taken
                try:
                    msg = data if type(data) is not bytes else decode(data)
                except KeyboardInterrupt:
                    raise
                except BaseException as exc:   # SystemExit too: it is the value's
                    problems.append((-1, KernelError(
                        f"a value the kernel returned in worker {w.pid} could not "
                        f"be unpickled here ({type(exc).__name__}: {exc}). Return "
                        f"numbers, tuples or NumPy arrays.", type(exc).__name__)))
                    continue
                if type(msg) is Failed:
                    problems.append((msg.index, remote_exception(
                        msg, w.pid, chunks[msg.index] if msg.index >= 0 else None)))
                elif type(msg) is Values:
                    if tally is not None:
                        tally.take(msg)
                    elif values is not None:
                        for i_, v in zip(msg.indices, msg.values):
                            values[i_] = v
        if tally is not None:
            for index, exc in problems:
                if index >= 0:
                    tally.failed.setdefault(index, exc)
                else:
                    raise exc
            return None
        if problems:
            raise min(problems, key=lambda p: p[0])[1]
        return values

    @staticmethod
    def _rest(w: WorkerProcess) -> list:
        """What a dead worker left in its results pipe."""
        out = []
        try:
            while w.results.poll(0):
                data = w.results.recv_bytes()
                if data != WAKE:
                    out.append(data)
        except (EOFError, OSError):
            pass
        return out

    def _timed_out(self, busy, seq, timeout) -> TaskTimeoutError:
        stuck = self._unfinished(busy, seq)
        pids = sorted(w.pid for w in stuck)
        self._replace_all(stuck)
        return TaskTimeoutError(
            f"map did not finish within timeout={timeout} s; the workers "
            f"still running (pids {pids}) have been replaced. A numba loop "
            f"cannot be interrupted, so they were killed.", timeout)

    def _timeout_error(self, w: WorkerProcess, timeout, chunks) -> TaskTimeoutError:
        k = int(self.pool.ctl[w.at + CHUNK])
        where = (f"rows {chunks[k][0]}:{chunks[k][1]} (chunk {k})" if 0 <= k < len(chunks)
                 else "a chunk")
        return TaskTimeoutError(
            f"{where} did not finish within timeout={timeout} s; worker {w.pid} "
            f"was killed (a numba loop cannot be interrupted) and replaced.", timeout)

    def _crashed(self, dead: WorkerProcess, busy, seq, call) -> WorkerCrashedError:
        """A worker died mid-map: the map fails at once, and the workers
        still busy with its other chunks (maybe for hours) are replaced too."""
        exc = self._death_error(dead, call.job, call.job.plan.chunks)
        self._replace_all(self._unfinished(busy, seq) + [dead])
        return exc

    def _death_error(self, dead: WorkerProcess, job, chunks) -> WorkerCrashedError:
        death, exitcode = dead.describe_death(), dead.exitcode
        k = int(self.pool.ctl[dead.at + CHUNK])
        if k < 0:                 # took the ring, died before its first chunk
            group = job.groups[[w for w, _, _ in job.groups].index(dead.index)]
            rows = (group[2][0][0], group[2][-1][1])
            what = (f"while loading the kernel or the arguments for rows "
                    f"{rows[0]}:{rows[1]}. Likely causes: unpickling the kernel "
                    f"or an argument in the worker failed hard (it segfaulted, or "
                    f"called sys.exit)")
        else:
            rows = chunks[min(k, len(chunks) - 1)]
            what = (f"while running rows {rows[0]}:{rows[1]} (chunk {k}). Likely "
                    f"causes: a segfault in the kernel (out-of-bounds indexing with "
                    f"boundscheck off), the out-of-memory killer, or "
                    f"os._exit/sys.exit in the kernel")
        return WorkerCrashedError(
            f"{death} {what}. The worker was replaced; the engine is usable.",
            pid=dead.pid, exitcode=exitcode, rows=rows)

    def _unfinished(self, busy, seq) -> list[WorkerProcess]:
        ctl = self.pool.ctl
        return [w for w in busy if ctl[w.at + DONE] < seq]

    def _replace_all(self, procs: list[WorkerProcess]) -> None:
        """Kill ``procs`` and start their replacements (unless closing)."""
        seen = set()
        for w in procs:
            if w.index in seen or self.pool.workers[w.index] is not w:
                continue
            seen.add(w.index)
            w.kill()
        if self._closing():
            return
        for index in seen:
            self._replace(index)

    def _replace(self, index: int, graceful: bool = False) -> WorkerProcess:
        """A new worker in place of ``index``; interruptible by close()."""
        return self.pool.replace(index, graceful, wake=self._wake_r,
                                 closing=self._closing)

    def _abandon(self, busy, seq) -> None:
        """The map ends early (interrupted, timed out, crashed, stopped):
        nothing of it may survive into the next map."""
        self.dirty = True
        stuck = [w for w in self._unfinished(busy, seq)
                 if self.pool.workers[w.index] is w]
        if stuck:
            self._replace_all(stuck)
        self.dirty = False

    def _recycle(self, busy, dynamic: bool) -> None:
        """Replace, gracefully, the workers past ``max_tasks_per_worker``
        tasks or ``max_worker_memory`` bytes of unique memory."""
        limit, memory = self.pool.max_tasks, self.pool.max_memory
        ctl = self.pool.ctl
        for w in busy:
            if self.pool.workers[w.index] is not w:
                continue                     # replaced already
            if limit is not None:
                if dynamic:
                    now = int(ctl[w.at + CHUNKS])
                    w.tasks_run += now - w.chunks_seen
                    w.chunks_seen = now
                else:
                    w.tasks_run += 1
                if w.tasks_run >= limit:
                    self._replace(w.index, graceful=True)
                    continue
            if memory is not None and w.over_memory(memory):
                self._replace(w.index, graceful=True)


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
