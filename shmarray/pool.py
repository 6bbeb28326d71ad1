"""The worker processes: starting them, replacing them, stopping them.

How a map flows, and who owns what::

    caller thread                 driver (one thread at a time)          worker i
    -------------                 -----------------------------          --------
    Engine.map: check args  ----> the caller itself when the engine
    Engine.submit: check,         is idle, else the manager thread
      enqueue, return a           (dispatch.Dispatcher)
      Future at once                |
                                    | tasks pipe, rare or large:
                                    |  Install(kernel) Define(job)       -> kept by key
                                    |  Rebind(args) Release(blocks)      -> unmap
                                    |
                                    | control block, every map:
                                    |  JOB, PIPED, then RING = seq   ~~> spinning: sees it
                                    |  (+ a wake frame if ASLEEP)        asleep: woken
                                    |                                    drains the pipe,
                                    |                                    runs its chunks
                                    |                                    in place
                                    |  spins on DONE, then sleeps  <~~  REPLY, DONE = seq
                                    |  on pipes + sentinels            (+ Values / Failed
                                    |                                     on the results pipe)
    result or exception   <-------  values in chunk order

* The Pool owns the processes, the coordinator's ends of their pipes, the
  control block and the watchdog; whichever thread is the driver is the only
  one that talks to them, so nothing here takes a lock.
* What a worker holds (kernels, job definitions, pipe messages received)
  is recorded on its WorkerProcess: a replacement starts empty and gets
  everything sent again.
* A worker that dies, times out or is interrupted mid-map is killed if
  needed and replaced; one left busy by an interrupted driver is replaced
  before the next map (``Pool.recover``).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from multiprocessing.connection import Connection, wait

import numpy as np
import psutil

from shmarray import blocks, control, launch, output
from shmarray import watchdog
from shmarray.control import ASLEEP, DONE, RING
from shmarray.descriptors import WAKE, Ready, StartFailed, Stop, decode, encode
from shmarray.errors import EngineClosedError, WorkerStartError

DEFAULT_START_METHOD = launch.DEFAULT_METHOD


def usable_cpus() -> int:
    """CPUs this process may run on (affinity and cgroup-aware where the
    Python version can tell)."""
    if hasattr(os, "process_cpu_count"):        # 3.13+
        return os.process_cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def coerce_start_method(method: object) -> str:
    """
    >>> coerce_start_method(None)
    'forkserver'
    >>> coerce_start_method("teleport")
    Traceback (most recent call last):
    ...
    ValueError: start_method must be one of ['forkserver', 'spawn', 'fork']; got 'teleport' instead.
    """
    if method is None:
        return DEFAULT_START_METHOD
    if method not in launch.METHODS:
        raise ValueError(f"start_method must be one of {list(launch.METHODS)}; "
                         f"got {method!r} instead.")
    return method


def start_failed(pid: int, msg: StartFailed) -> WorkerStartError:
    """One exception that says why a worker could not start, and where: the
    worker's traceback is kept as ``remote_traceback``, not chained, so an
    uncaught error prints one traceback, not two."""
    where = ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', msg.traceback)
    if frames:
        path, line, func = frames[-1]
        where = f" (in {func}, {os.path.basename(path)} line {line})"
    what = {"initializer": "its initializer raised",
            "import": "importing the worker code failed with"}.get(msg.stage, "it failed with")
    exc = WorkerStartError(
        f"worker {pid} could not start: {what} {msg.type_name}: {msg.message}"
        f"{where}. The engine was not started.")
    exc.remote_traceback = msg.traceback
    return exc


# How often, at most, a worker whose RSS is over max_worker_memory has its
# unique memory measured (see WorkerProcess.over_memory).
USS_EVERY = 0.25


class WorkerProcess:
    """One worker process, the coordinator's ends of its two pipes, and what
    the process holds.

    Created by the Pool (starting the process) and stopped by it, once.
    ``kernels`` and ``jobs`` are the keys this process has received (a job
    maps to the args it was last given); ``sent`` counts messages on its
    task pipe; ``rung`` is the last ring it was given.
    """

    def __init__(self, method: str, index: int, owner_pid: int, control_block: str,
                 initializer: tuple[bytes, bytes] | None = None,
                 log_level: int = logging.WARNING):
        self.index = index
        self.at = control.slot(index)        # its words in the control block
        self.kernels: set[int] = set()
        self.jobs: dict[int, tuple] = {}
        self.sent = 0
        self.rung = 0
        self.tasks_run = 0
        self.chunks_seen = 0
        self.ready = False
        self.closed = False
        self._ps: psutil.Process | None = None   # for over_memory
        self._uss_at = -USS_EVERY
        self._over = False
        task_r, task_w = os.pipe()
        result_r, result_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            self.child = launch.start(
                method, "shmarray.worker:main",
                (launch.Fd(0), launch.Fd(1), owner_pid, index, control_block,
                 initializer, launch.Fd(2), launch.Fd(3), log_level),
                [task_r, result_w, out_w, err_w], report=1)
        except BaseException:
            for fd in (task_w, result_r, out_r, err_r):
                os.close(fd)
            raise
        finally:
            for fd in (task_r, result_w, out_w, err_w):
                os.close(fd)
        self.output = (out_r, err_r)     # the Pool's forwarder reads them
        self.tasks = Connection(task_w, readable=False)
        self.results = Connection(result_r, writable=False)
        self.pid = self.child.pid
        self.sentinel = self.child.sentinel

    def send(self, msg) -> None:
        """A counted message on the task pipe (OSError if the worker died)."""
        self.tasks.send_bytes(encode(msg))
        self.sent += 1

    def wake(self) -> None:
        try:
            self.tasks.send_bytes(WAKE)
        except OSError:
            pass         # dead: the sentinel reports it

    def recv_bytes(self) -> bytes:
        """The next message from the results pipe, undecoded, skipping wake
        frames (blocks; EOFError/OSError if the worker died)."""
        while True:
            data = self.results.recv_bytes()
            if data != WAKE:
                return data

    def recv(self):
        return decode(self.recv_bytes())

    def alive(self) -> bool:
        return not self.closed and self.child.exitcode is None

    def memory(self) -> tuple[int, int]:
        """(RSS, unique memory) in bytes; (0, 0) if it is gone.  Unique
        memory (USS) is what the process alone holds: the shared blocks it
        maps count in RSS, not here."""
        try:
            info = psutil.Process(self.pid).memory_full_info()
        except (psutil.Error, OSError):
            return 0, 0
        return info.rss, info.uss

    def over_memory(self, limit: int) -> bool:
        """Whether its unique memory is above ``limit`` bytes.  RSS (15 us to
        read) bounds USS from above, so USS (350 us: it walks the page
        tables) is read only when RSS is over, and then at most every
        ``USS_EVERY`` seconds (RSS counts the shared blocks it maps)."""
        try:
            if self._ps is None:
                self._ps = psutil.Process(self.pid)
            if self._ps.memory_info().rss <= limit:
                return False
            now = time.monotonic()
            if now - self._uss_at >= USS_EVERY:
                self._uss_at = now
                self._over = self._ps.memory_full_info().uss > limit
        except (psutil.Error, OSError):
            return False          # gone: replaced when next given work
        return self._over

    @property
    def exitcode(self) -> int | None:
        return self.child.exitcode

    def describe_death(self) -> str:
        code = self.child.join(1.0)
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
        if not self.closed:
            self.child.kill()
            self.child.join(5.0)

    def close(self, timeout: float) -> None:
        """Stop the process (politely if ``timeout``), close the pipes.
        Idempotent."""
        if self.closed:
            return
        if timeout:
            self.child.join(timeout)
        if self.child.exitcode is None:
            self.child.terminate()
            self.child.join(1.0)
        self.kill()
        self.tasks.close()
        self.results.close()
        self.child.close()
        self.closed = True


class Pool:
    """A fixed number of persistent worker processes, their control block
    and their watchdog.

    The Engine creates one pool and closes it once.  Only the driver thread
    of the moment calls it (see ``shmarray.dispatch``), except ``close``,
    which the Dispatcher calls once the driver has let go.  The pool starts
    every worker, replaces one that dies, times out or is interrupted, and
    stops all of them in ``close()``.  The control block is created here and
    unlinked in ``close()`` (or by the watchdog if the coordinator dies).
    """

    workers: list[WorkerProcess] = []   # so close() works after a failed __init__
    watchdog: watchdog.Watchdog | None = None
    _control_name: str | None = None
    _closing = False
    ctl = np.zeros(0, np.int64)
    forwarder = output.Forwarder()

    def __init__(self, n_workers: int, start_method: str = DEFAULT_START_METHOD,
                 startup_timeout: float = 120.0, max_tasks: int | None = None,
                 max_memory: int | None = None,
                 initializer: tuple[bytes, bytes] | None = None):
        self.start_method = start_method
        self.max_tasks = max_tasks
        self.max_memory = max_memory
        self.seq = 0                    # the last ring given
        self.generation = 0             # replacements so far
        self._owner = os.getpid()
        self._startup_timeout = startup_timeout
        self._initializer = initializer
        # Workers log what the caller's root logger would show now.
        self._log_level = logging.getLogger().getEffectiveLevel()
        self.workers = []
        self.replaced = [0] * n_workers   # times each worker was replaced
        self.forwarder = output.Forwarder()
        try:
            # The watchdog first: from now on it knows every block to clean.
            self.watchdog = watchdog.Watchdog(self.start_method)
            self._control_name, mapping = blocks.create(
                control.words(n_workers) * 8)
            self.watchdog.blocks(created=(self._control_name,))
            self.ctl = control.new_words(mapping)
            for i in range(n_workers):
                self.workers.append(self._start(i))
            self.await_ready(self.workers)
            self._tell_watchdog()
        except BaseException:
            self.close()
            raise

    def _start(self, index: int) -> WorkerProcess:
        # A new process finds its words as if it had answered every ring its
        # predecessor answered, and no other: it is idle, and a ring its
        # predecessor never took can be given again.
        at = control.slot(index)
        ring = self.ctl[at + DONE]
        self.ctl[at + RING] = ring
        self.ctl[at + ASLEEP] = 0
        proc = WorkerProcess(self.start_method, index, self._owner,
                             self._control_name, self._initializer, self._log_level)
        self.forwarder.add(*proc.output)
        proc.rung = int(ring)
        proc.chunks_seen = proc.chunks_at_start = int(self.ctl[at + control.CHUNKS])
        proc.busy_at_start = int(self.ctl[at + control.BUSY_NS])
        return proc

    def _tell_watchdog(self) -> None:
        self.watchdog.tell([(w.pid, blocks.process_start_time(w.pid))
                             for w in self.workers])

    @property
    def size(self) -> int:
        return len(self.workers)

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self.workers]

    def await_ready(self, procs: list[WorkerProcess], wake=None,
                    closing=lambda: False) -> None:
        """Wait for every process in ``procs`` to say Ready.  ``wake``: an
        extra object to wait on, which interrupts the wait when
        ``closing()``."""
        deadline = time.monotonic() + self._startup_timeout
        waiting = {}
        for p in procs:
            if not p.ready:
                waiting[p.results] = waiting[p.sentinel] = p
        output = self.forwarder.fds     # an initializer may print a lot
        while any(not p.ready for p in procs):
            left = deadline - time.monotonic()
            objects = list(waiting) + output + ([wake] if wake is not None else [])
            ready = wait(objects, max(left, 0))
            shown = [obj for obj in ready if type(obj) is int]
            if shown:
                for fd in self.forwarder.forward(shown):
                    output.remove(fd)
                ready = [obj for obj in ready if type(obj) is not int]
                if not ready:
                    continue
            if not ready:
                raise WorkerStartError(
                    f"workers did not start within {self._startup_timeout:.0f} "
                    f"s; the machine may be overloaded. Pass a larger "
                    f"startup_timeout= to Engine.")
            for obj in ready:
                if obj is wake:
                    if closing():
                        raise EngineClosedError("the engine was closed while "
                                                "a worker was starting")
                    continue
                proc = waiting[obj]
                if proc.ready:
                    continue
                try:
                    msg = proc.recv()
                except (EOFError, OSError):
                    msg = None
                if isinstance(msg, StartFailed):
                    raise start_failed(proc.pid, msg)
                if not isinstance(msg, Ready):
                    raise WorkerStartError(
                        f"{proc.describe_death()} while starting, before it "
                        f"could say why. Check that `python -c \"import "
                        f"shmarray.worker\"` works in this environment.")
                proc.ready = True

    def replace(self, index: int, graceful: bool = False, wake=None,
                closing=lambda: False) -> WorkerProcess:
        """A new worker in place of worker ``index``.  Kills the old one
        unless ``graceful`` (recycling an idle worker, which is asked to
        stop first)."""
        old = self.workers[index]
        if graceful:
            try:
                old.send(Stop())
                old.wake()
            except OSError:
                pass
            old.close(5.0)
        else:
            old.kill()
            old.close(0.0)
        # Installed before it is ready: an interruption now leaves a worker
        # that recover() waits for, never an orphan process.
        self.generation += 1
        self.replaced[index] += 1
        new = self.workers[index] = self._start(index)
        self._tell_watchdog()
        self.await_ready([new], wake, closing)
        return new

    def recover(self, wake=None, closing=lambda: False) -> None:
        """Make every worker idle and alive again after an interrupted map:
        replace the dead and those still busy with a job nobody waits for;
        wait for those still starting."""
        for w in list(self.workers):
            idle = self.ctl[control.slot(w.index) + DONE] >= w.rung
            if not w.alive() or not idle:
                self.replace(w.index, wake=wake, closing=closing)
        self.await_ready(self.workers, wake, closing)

    def close(self, timeout: float = 5.0) -> None:
        """Stop every worker, politely then by force, then the watchdog;
        unlink the control block.  Idempotent, and resumable: interrupted
        (Ctrl-C), a second call finishes the job, since each worker leaves
        the list only once it is stopped, and without waiting politely
        again."""
        if self._closing:
            timeout = 0.0
        self._closing = True
        self.seq += 1
        seq = self.seq
        for w in list(self.workers):
            try:
                w.send(Stop())
            except OSError:
                continue
            at = control.slot(w.index)
            self.ctl[at + control.JOB] = 0
            self.ctl[at + control.PIPED] = w.sent
            control.store(self.ctl, at + RING, seq)
            w.wake()
        while self.workers:
            self.workers[-1].close(timeout)
            self.workers.pop()
        self.forwarder.close()
        if self.watchdog is not None:
            self.watchdog.close(timeout)
        name, self._control_name = self._control_name, None
        if name is not None:
            blocks.unlink(name)

    def forget_in_child(self) -> None:
        """In a child forked from the coordinator: close its copies of the
        pipes (so a worker still sees end-of-file when the coordinator dies,
        and the watchdog sees the coordinator die), and touch nothing the
        parent owns."""
        for w in self.workers:
            w.tasks.close()
            w.results.close()
        if self.watchdog is not None:
            self.watchdog.forget_in_child()
        self.forwarder.forget_in_child()
        self.workers = []
        self._control_name = None
