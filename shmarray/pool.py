"""Starting, feeding and watching the worker processes.

How a map flows, and who owns what::

    coordinator (Engine.map -> Pool.run)              worker i (worker.main)
    ------------------------------------              ----------------------
    rows -> chunks -> worker of each chunk
    per worker with chunks:
      Release(names)        (blocks unlinked since)  -> unmap them
      Install(key, kernel)  (first use only)         -> kernels[key] = kernel
      Run(seq, key, descriptors, args, chunks) --tasks pipe-->
                                                        attach each block once
                                                        kernel(*rows) in place
    wait on every busy worker's results pipe   <--results pipe--
    and process sentinel                                Done(seq, values)
                                                      | Failed(seq, chunk, exc)
    values in chunk order -> caller

* The pool owns the processes and both ends of their pipes in the
  coordinator; each worker owns the other ends.  Messages are small named
  tuples, pickled as plain tagged tuples (``descriptors.encode``); array
  data never goes through a pipe.
* A kernel is pickled once per engine and sent once per worker, then named
  by an integer key.  Pickling a numba dispatcher by value costs 0.13 ms
  and 1.3 KB, and unpickling it in a fresh worker means compiling it again;
  a key costs nothing.
* Static schedule: one Run per worker per map, carrying all its chunks, so
  a map costs one message each way per busy worker whatever the chunk
  count, and a worker sees the same rows every call.  Dynamic schedule: one
  chunk per Run, two in flight per worker, the next chunk going to whichever
  worker replies first (irregular work).
* A worker that dies, times out or is interrupted mid-map is killed if
  needed and replaced before ``run`` returns, so no stale reply can reach a
  later map.
"""

from __future__ import annotations

import collections
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import pickle
import select
import signal
import threading
import time
from typing import Any

from shmarray import blocks
from shmarray import watchdog
from shmarray import worker as worker_module
from shmarray.descriptors import (Failed, Forget, Install, Ready, Release, Run,
                                  Stop, decode, encode, kernel_payload)
from shmarray.errors import (KernelError, RemoteTraceback, TaskTimeoutError,
                             WorkerCrashedError, WorkerStartError)
from shmarray.partition import Plan
from shmarray.progress import ChunkProgress

DEFAULT_START_METHOD = ("forkserver"
                        if "forkserver" in multiprocessing.get_all_start_methods()
                        else "spawn")


# How long the coordinator polls for replies before it sleeps.  Waking a
# sleeping process through a pipe costs about 100 us on the reference VM; a
# reply caught while polling costs about 5 us.  Each empty poll yields the
# CPU, so a worker sharing it is not held up.  Measured on 2 CPUs, 2
# workers, a map of two tiny chunks: 250 us with no polling on either side,
# 180 us polling without yielding, 105 us with this and worker.SPIN.
SPIN = 300e-6


class MapAborted(Exception):
    """Raised inside Pool.run when a running map is cancelled."""


def usable_cpus() -> int:
    """CPUs this process may run on (affinity and cgroup-aware where the
    Python version can tell)."""
    if hasattr(os, "process_cpu_count"):        # 3.13+
        return os.process_cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def get_context(method: str | None) -> multiprocessing.context.BaseContext:
    """The multiprocessing context for ``method`` (default: forkserver).

    forkserver is the default on every Python we support (3.14 made it
    Python's own default on Linux): workers fork from a small, single-purpose
    server that has imported numpy and numba once, so they start in
    milliseconds, share those pages, and never inherit the caller's threads
    or locks.  ``fork`` is offered but unsafe once the caller runs threads
    (numba's parallel layer, BLAS, Jupyter); ``spawn`` is safe and slow.
    """
    method = DEFAULT_START_METHOD if method is None else method
    available = multiprocessing.get_all_start_methods()
    if method not in available:
        raise ValueError(
            f"start_method must be one of {available}; got {method!r} "
            f"instead.")
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        # Keep the caller's preload list and add ours; it only takes effect
        # if the fork server is not running yet.
        server = multiprocessing.forkserver._forkserver
        preload = list(getattr(server, "_preload_modules", ["__main__"]))
        if worker_module.__name__ not in preload:
            ctx.set_forkserver_preload(preload + [worker_module.__name__])
    return ctx


class KernelTable:
    """Kernels by key, with their pickled payload.

    Holds each kernel strongly so its ``id()`` cannot be reused while the key
    lives; the least recently used kernel is dropped past ``capacity``.
    """

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self._entries: collections.OrderedDict[int, tuple[int, Any, bytes]] = (
            collections.OrderedDict())
        self._next_key = 0

    def entry(self, kernel) -> tuple[int, bytes, list[int]]:
        """(key, payload, keys evicted to make room)."""
        found = self._entries.get(id(kernel))
        if found is not None:
            self._entries.move_to_end(id(kernel))
            return found[0], found[2], []
        payload = kernel_payload(kernel)
        self._next_key += 1
        self._entries[id(kernel)] = (self._next_key, kernel, payload)
        evicted = []
        while len(self._entries) > self.capacity:
            evicted.append(self._entries.popitem(last=False)[1][0])
        return self._next_key, payload, evicted


class Slot:
    """One worker process and the coordinator's ends of its two pipes.

    Created and stopped only by the Pool.  ``kernels`` are the keys this
    process already holds.
    """

    def __init__(self, ctx, index: int, owner_pid: int, close_fds: tuple = ()):
        self.index = index
        task_r, self.tasks = ctx.Pipe(duplex=False)
        self.results, result_w = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=worker_module.main,
            args=(task_r, result_w, owner_pid, close_fds),
            name=f"shmarray-worker-{index}", daemon=True)
        try:
            self.process.start()
        finally:
            task_r.close()
            result_w.close()
        self.pid = self.process.pid
        self.sentinel = self.process.sentinel
        self.kernels: set[int] = set()
        self.ready = False
        self.tasks_run = 0

    def send(self, msg) -> None:
        self.tasks.send_bytes(encode(msg))

    def describe_death(self) -> str:
        self.process.join(1.0)
        code = self.process.exitcode
        if code is None:
            return f"worker {self.pid} stopped answering"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"worker {self.pid} was killed by {name}"
        return f"worker {self.pid} exited with code {code}"

    def kill(self) -> None:
        """End the process now (it may be deep in a numba loop)."""
        if self.process.exitcode is None:
            try:
                self.process.kill()
            except OSError:
                pass
        self.process.join(5.0)

    def close(self, timeout: float) -> None:
        """Ask the worker to stop, then make sure it did; close the pipes."""
        if self.process.exitcode is None:
            try:
                self.send(Stop())
            except OSError:
                pass
            self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.terminate()
            self.process.join(1.0)
        self.kill()
        self.tasks.close()
        self.results.close()
        self.process.close()


class Pool:
    """A fixed number of persistent worker processes, and their watchdog.

    The Engine creates one pool and closes it once.  The pool starts every
    worker, replaces one that dies, times out or is interrupted, recycles
    one that has run ``max_tasks`` tasks (between maps, so no task is lost),
    and stops all of them in ``close()``.  Its watchdog process cleans up if
    the coordinator dies without closing.  Not thread-safe: the Engine
    serialises calls.
    """

    slots: list[Slot] = []          # so close() works after a failed __init__
    _watchdog = None
    _lifeline = None
    _wake_r = _wake_w = -1

    def __init__(self, n_workers: int, start_method: str | None = None,
                 startup_timeout: float = 120.0, max_tasks: int | None = None):
        self.start_method = start_method or DEFAULT_START_METHOD
        self._ctx = get_context(start_method)
        self._owner = os.getpid()
        self._max_tasks = max_tasks
        self._startup_timeout = startup_timeout
        self._kernels = KernelTable()
        self._seq = 0
        # One poller for every worker's results pipe and process sentinel,
        # kept across calls: building a selector per wait cost 40 us a map.
        self._poller = select.poll()
        self._by_fd: dict[int, tuple[Slot | None, bool]] = {}
        # A pipe that interrupt() writes to, to wake a wait from another thread.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poller.register(self._wake_r, select.POLLIN)
        self._by_fd[self._wake_r] = (None, False)
        self.slots = []
        try:
            self._start_watchdog()
            for i in range(n_workers):
                self.slots.append(self._watch(self._new_slot(i)))
            self._await_ready(self.slots)
            self._tell_watchdog()
        except BaseException:
            self.close()
            raise

    def _start_watchdog(self) -> None:
        life_r, self._lifeline = self._ctx.Pipe(duplex=False)
        self._watchdog = self._ctx.Process(
            target=watchdog.main,
            args=(life_r, self._owner, self._forked_fds()),
            name="shmarray-watchdog", daemon=True)
        try:
            self._watchdog.start()
        finally:
            life_r.close()

    def _forked_fds(self) -> tuple[int, ...]:
        """Descriptors a *forked* child inherits but must not keep: while any
        process holds the lifeline's write end, the watchdog never sees the
        coordinator die.  Children of the fork server or spawn inherit
        nothing."""
        if self.start_method != "fork" or self._lifeline is None:
            return ()
        return (self._lifeline.fileno(),)

    def _new_slot(self, index: int) -> Slot:
        return Slot(self._ctx, index, self._owner, self._forked_fds())

    def _tell_watchdog(self) -> None:
        self._lifeline.send(watchdog.Workers(tuple(
            (s.pid, blocks.process_start_time(s.pid)) for s in self.slots)))

    @property
    def pids(self) -> list[int]:
        return [s.pid for s in self.slots]

    def _await_ready(self, slots: list[Slot]) -> None:
        deadline = time.monotonic() + self._startup_timeout
        waiting = {s.results: s for s in slots if not s.ready}
        waiting.update({s.sentinel: s for s in slots if not s.ready})
        while any(not s.ready for s in slots):
            left = deadline - time.monotonic()
            ready = multiprocessing.connection.wait(list(waiting), max(left, 0))
            if not ready:
                raise WorkerStartError(
                    f"workers did not start within {self._startup_timeout:.0f} "
                    f"s; the machine may be overloaded. Pass a larger "
                    f"startup_timeout= to Engine.")
            for obj in ready:
                slot = waiting[obj]
                if slot.ready:
                    continue
                try:
                    msg = decode(slot.results.recv_bytes())
                except (EOFError, OSError):
                    msg = None
                if not isinstance(msg, Ready):
                    raise WorkerStartError(
                        f"{slot.describe_death()} while starting (its "
                        f"traceback is on stderr). The usual cause: with the "
                        f"'{self.start_method}' start method each worker "
                        f"imports your main script, so a script that creates "
                        f"an Engine at module level must guard it with "
                        f"`if __name__ == \"__main__\":`.")
                slot.ready = True

    def _watch(self, slot: Slot) -> Slot:
        for fd, is_sentinel in ((slot.results.fileno(), False), (slot.sentinel, True)):
            self._poller.register(fd, select.POLLIN)
            self._by_fd[fd] = (slot, is_sentinel)
        return slot

    def _unwatch(self, slot: Slot) -> None:
        for fd in (slot.results.fileno(), slot.sentinel):
            if self._by_fd.get(fd, (None,))[0] is slot:
                self._poller.unregister(fd)
                del self._by_fd[fd]

    def _replace(self, slot: Slot, graceful: bool = False) -> Slot:
        """A new worker in ``slot``'s place.  Kills the old one unless
        ``graceful`` (recycling an idle worker)."""
        self._unwatch(slot)
        if not graceful:
            slot.kill()
        slot.close(5.0 if graceful else 0.0)
        new = self._watch(self._new_slot(slot.index))
        self.slots[slot.index] = new
        self._await_ready([new])
        self._tell_watchdog()
        return new

    def _send(self, slot: Slot, msg) -> Slot:
        """Send, replacing a worker found dead while idle (nothing was lost)."""
        try:
            slot.send(msg)
            return slot
        except OSError:
            slot = self._replace(slot)
            slot.send(msg)
            return slot

    def run(self, kernel, arrays: tuple, args: tuple, halo: int, plan: Plan,
            want_values: bool, released: tuple[str, ...] = (),
            timeout: float | None = None, dynamic: bool = False,
            progress: ChunkProgress | None = None,
            abort: threading.Event | None = None) -> list | None:
        """Run ``kernel`` on every chunk of ``plan``.

        Static: each worker gets its group of chunks in one message.
        Dynamic: chunks are handed out one at a time, in order, to whichever
        worker is free, two in flight per worker so none waits for the next.
        Returns the kernel's values in chunk order (if ``want_values``).
        Raises the first failing chunk's exception, WorkerCrashedError or
        TimeoutError; every worker is idle or replaced when it returns.
        """
        key, payload, evicted = self._kernels.entry(kernel)
        if evicted:
            self._forget(evicted)
        if released:
            self.release(released)
        self._seq += 1
        seq = self._seq
        chunks = plan.chunks
        values: list | None = [None] * len(chunks) if want_values else None
        problems: list[tuple[int, BaseException]] = []
        inflight: dict[Slot, collections.deque] = {}
        crashed: list[tuple[Slot, list]] = []
        queue = collections.deque(range(len(chunks))) if dynamic else None

        def send(slot: Slot, idx: tuple[int, ...]) -> None:
            if key not in slot.kernels:
                slot = self._send(slot, Install(key, payload))
                slot.kernels.add(key)
            slot = self._send(slot, Run(seq, key, arrays, args, halo,
                                        tuple(chunks[i] for i in idx), want_values))
            inflight.setdefault(slot, collections.deque()).append(idx)

        def on_reply(slot: Slot, reply) -> None:
            idx = inflight[slot].popleft()
            slot.tasks_run += 1
            if progress is not None:
                progress.update(len(idx))
            if type(reply) is Failed:
                i = idx[reply.index]
                problems.append((i, remote_exception(reply, slot.pid, chunks[i])))
            elif values is not None:
                for i, v in zip(idx, reply.values):
                    values[i] = v
            if queue and not problems and not crashed:
                send(self.slots[slot.index], (queue.popleft(),))

        try:
            if dynamic:
                for _ in range(2):
                    for slot in self.slots:
                        if queue:
                            send(slot, (queue.popleft(),))
            else:
                for w, idx, _ in plan.groups:
                    send(self.slots[w], idx)
            self._drive(inflight, seq, timeout, on_reply, crashed, progress, abort)
        except BaseException:
            # Interrupted (Ctrl-C) or timed out: the busy workers may be deep
            # in a kernel.  Kill and replace them so nothing stale survives.
            for slot, pending in inflight.items():
                if pending and self.slots[slot.index] is slot:
                    self._replace(slot)
            raise

        # A crash fails the map at once: the workers still busy with its
        # other chunks (maybe for hours) are stopped and replaced too.
        for slot, pending in inflight.items():
            if pending and self.slots[slot.index] is slot:
                self._replace(slot)
        for slot, lost in crashed:
            death, exitcode = slot.describe_death(), slot.process.exitcode
            self._replace(slot)
            first = lost[0]
            rows = (chunks[first[0]][0], chunks[first[-1]][1])
            which = (f"chunk {first[0]}" if len(first) == 1
                     else f"chunks {first[0]} to {first[-1]}")
            problems.append((first[0], WorkerCrashedError(
                f"{death} while running rows {rows[0]}:{rows[1]} ({which}). "
                f"Likely causes: a segfault in the "
                f"kernel (out-of-bounds indexing with boundscheck off), the "
                f"out-of-memory killer, or os._exit/sys.exit in the kernel. "
                f"The worker was replaced; the engine is usable.",
                pid=slot.pid, exitcode=exitcode, rows=rows)))
        if self._max_tasks is not None:
            for slot in list(self.slots):
                if slot.tasks_run >= self._max_tasks:
                    self._replace(slot, graceful=True)
        if problems:
            # The earliest chunk's problem, so the error is deterministic.
            raise min(problems, key=lambda p: p[0])[1]
        return values

    def _drive(self, inflight: dict[Slot, collections.deque], seq: int,
               timeout: float | None, on_reply, crashed: list,
               progress: ChunkProgress | None = None,
               abort: threading.Event | None = None) -> None:
        """Wait until no worker has a message in flight, handing each reply
        to ``on_reply`` (which may send more).  Appends to ``crashed`` each
        worker that died with work in flight, and that work."""
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        spin_until = now + SPIN
        dead_idle = []
        while any(inflight.values()) and not crashed:
            if abort is not None and abort.is_set():
                raise MapAborted()
            now = time.monotonic()
            if now < spin_until:
                events = self._poller.poll(0)
                if not events:
                    os.sched_yield()
            elif deadline is None and (progress is None or progress.wait() is None):
                events = self._poller.poll()
            else:
                if deadline is not None and now >= deadline:
                    busy = [s.pid for s, q in inflight.items() if q]
                    raise TaskTimeoutError(
                        f"map did not finish within timeout={timeout} s; the "
                        f"workers still running (pids {sorted(busy)}) have "
                        f"been replaced. A numba loop cannot be interrupted, "
                        f"so they were killed.", timeout)
                waits = [t for t in (None if deadline is None else deadline - now,
                                     None if progress is None else progress.wait())
                         if t is not None]
                events = self._poller.poll(max(1, int(min(waits) * 1000) + 1))
                if progress is not None:
                    progress.tick()
            for fd, _ in events:
                entry = self._by_fd.get(fd)
                if entry is None:  # unwatched earlier in this batch of events
                    continue
                slot, is_sentinel = entry
                if slot is None:   # interrupt(): the abort flag is checked above
                    self._drain_wake()
                    continue
                if not inflight.get(slot):
                    if is_sentinel:  # an idle worker died: replace it later
                        self._unwatch(slot)
                        dead_idle.append(slot)
                    continue
                reply = None
                if not is_sentinel or slot.results.poll():
                    try:
                        reply = decode(slot.results.recv_bytes())
                    except (EOFError, OSError):
                        reply = None
                if reply is None:
                    self._unwatch(slot)  # its sentinel is not news any more
                    crashed.append((slot, list(inflight.pop(slot))))
                    break
                elif reply.seq != seq:
                    raise AssertionError(
                        f"reply to map {reply.seq} arrived during map {seq}")
                else:
                    on_reply(slot, reply)
        for slot in dead_idle:
            self._replace(slot)

    def interrupt(self) -> None:
        """Wake a map waiting in another thread (it then checks its abort
        flag).  Safe to call from any thread."""
        try:
            os.write(self._wake_w, b"!")
        except (BlockingIOError, OSError):
            pass           # already pending, or the pool is closed

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except (BlockingIOError, OSError):
            pass

    def _forget(self, keys: list[int]) -> None:
        for slot in self.slots:
            for key in keys:
                if key in slot.kernels:
                    slot.kernels.discard(key)
                    self._send(slot, Forget(key))

    def release(self, names: tuple[str, ...]) -> None:
        """Tell every worker to unmap these unlinked blocks."""
        for slot in self.slots:
            try:
                slot.send(Release(names))
            except OSError:
                pass  # a dead worker holds no mapping

    def close(self, timeout: float = 5.0) -> None:
        """Stop every worker, politely then by force, then the watchdog.
        Idempotent."""
        slots, self.slots = self.slots, []
        for slot in slots:
            try:
                slot.send(Stop())
            except OSError:
                pass
        for slot in slots:
            self._unwatch(slot)
            slot.close(timeout)
        dog, self._watchdog = self._watchdog, None
        if dog is not None:
            try:
                self._lifeline.send(watchdog.BYE)
            except OSError:
                pass
            dog.join(timeout)
            if dog.exitcode is None:
                dog.kill()
                dog.join(1.0)
            dog.close()
        if self._lifeline is not None:
            self._lifeline.close()
            self._lifeline = None
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1


def remote_exception(reply: Failed, pid: int, rows: tuple[int, int]) -> BaseException:
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
    exc.add_note(f"raised by the kernel in worker {pid} on rows "
                 f"{rows[0]}:{rows[1]}")
    return exc
