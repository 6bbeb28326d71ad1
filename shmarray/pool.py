"""The worker processes: starting them, replacing them, recycling them,
stopping them.

* The Pool owns the processes, the coordinator's ends of their pipes, the
  control block (``shmarray.control.ControlBlock``) and the watchdog;
  whichever thread is the driver (``shmarray.dispatch``) is the only one
  that talks to them, so nothing here takes a lock.  How a map flows
  through them is drawn in ``shmarray.rounds``.
* What a worker holds (kernels, job definitions, pipe messages received)
  is recorded on its WorkerProcess: a replacement starts empty and gets
  everything sent again (``shmarray.holdings``).
* A worker that dies, times out or is interrupted mid-map is killed if
  needed, its death confirmed by the process itself, and only then
  replaced; one left busy by an interrupted driver is replaced before the
  next map (``Pool.recover``).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import time
from multiprocessing.connection import Connection

import numpy as np
import psutil

from shmarray import blocks, compiling, launch, output, watchdog
from shmarray.control import ControlBlock
from shmarray.descriptors import WAKE, Ready, StartFailed, Stop, decode, encode
from shmarray.errors import WorkerStartError
from shmarray.interrupts import Interrupts
from shmarray.waiting import WaitPolicy

DEFAULT_START_METHOD = launch.DEFAULT_METHOD

# What happens to workers, for the application's logs: replacements and
# recycling at INFO, trouble (a replacement that dies, a kill that hangs)
# at WARNING.  A NullHandler on "shmarray" keeps it quiet by default.
log = logging.getLogger(__name__)


def start_failed(pid: int, msg: StartFailed, replacing: int | None = None) -> WorkerStartError:
    """One exception that says why a worker could not start, and where: the
    worker's traceback is kept as ``remote_traceback``, not chained, so an
    uncaught error prints one traceback, not two.  ``replacing``: the index
    of the worker it was to replace in a running engine (None: the engine
    was starting)."""
    where = ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', msg.traceback)
    if frames:
        path, line, func = frames[-1]
        where = f" (in {func}, {os.path.basename(path)} line {line})"
    what = {
        "initializer": "its initializer raised",
        "import": "importing the worker code failed with",
    }.get(msg.stage, "it failed with")
    then = (
        "The engine was not started."
        if replacing is None
        else f"It was to replace worker {replacing}: the engine stays open, but a "
        f"map needs every worker. Remove the cause, or close the engine and "
        f"create a new one."
    )
    exc = WorkerStartError(
        f"worker {pid} could not start: {what} {msg.type_name}: {msg.message}{where}. {then}"
    )
    exc.remote_traceback = msg.traceback
    return exc


def pipes(count: int) -> list[tuple[int, int]]:
    """``count`` new pipes; a clear error when the process is out of file
    descriptors (``ulimit -n``)."""
    made: list[tuple[int, int]] = []
    try:
        for _ in range(count):
            made.append(os.pipe())
    except OSError as exc:
        for r, w in made:
            os.close(r)
            os.close(w)
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            raise blocks.out_of_descriptors(exc, "start a worker") from None
        raise
    return made


# How long kill_all waits for the processes it sent SIGKILL: the kernel
# ends a killed process within microseconds, unless it is stuck inside a
# system call no signal can cut short (a hung network filesystem).
KILL_WAIT = 10.0


def kill_all(procs: list[WorkerProcess], timeout: float = KILL_WAIT) -> list[WorkerProcess]:
    """End every process in ``procs``: SIGKILL to all of them first, then
    wait until each has exited by its own word (pidfd or pipe), all within
    ``timeout`` seconds.  From then on none of them writes anything.  The
    signals all go before the first wait, so even a caller that could be
    interrupted never leaves one unsignalled behind a slow one.  Returns
    those still running at the deadline (logged)."""
    for w in procs:
        w.signal_kill()
    deadline = time.monotonic() + timeout
    left = [w for w in procs if not w.closed]
    while left:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        launch.wait_readable([w.sentinel for w in left], remaining)
        left = [w for w in left if not w.child.exited()]
    for w in left:
        log.warning("worker %d did not exit within %.0f s of SIGKILL", w.pid, timeout)
    return left


# How often, at most, a worker whose RSS is over max_worker_memory has its
# unique memory measured (see WorkerProcess.over_memory).
USS_EVERY = 0.25


class _StartDied(Exception):
    """A worker died while starting, before it could say why."""

    def __init__(self, proc: WorkerProcess):
        super().__init__(proc.pid)
        self.proc = proc


class WorkerProcess:
    """One worker process, the coordinator's ends of its two pipes, and what
    the process holds.

    Created by the Pool (starting the process) and stopped by it, once.
    ``kernels`` and ``jobs`` are the keys this process has received (a job
    maps to the args it was last given); ``sent`` counts messages on its
    task pipe; ``rung`` is the last ring it was given.
    """

    def __init__(
        self,
        method: str,
        index: int,
        owner_pid: int,
        control_block: str,
        initializer: tuple[bytes, bytes] | None,
        log_level: dict[str, int],
        spins: tuple[float, int],
        sent: np.ndarray,
        compile_lock: int,
    ):
        self.index = index
        self.kernels: set[int] = set()
        self.jobs: dict[int, tuple] = {}
        # Messages sent on its task pipe: the pool's array, by worker index,
        # which the lean path hands to control.ring_and_wait whole.
        self._sent = sent
        sent[index] = 0
        self.rung = 0
        self.tasks_run = 0
        self.chunks_seen = 0
        self.chunks_at_start = 0
        self.busy_at_start = 0
        self.served_at_start = 0
        self.ready = False
        self.killed = False  # sent SIGKILL: a writer no more once it has exited
        self.closed = False
        self._ps: psutil.Process | None = None  # for over_memory
        self._uss_at = -USS_EVERY
        self._over = False
        (task_r, task_w), (result_r, result_w), (out_r, out_w), (err_r, err_w) = pipes(4)
        # The child's own copy of the compile lock: a child forked from the
        # coordinator closes the Pool's (forget_in_child) before it runs.
        lock = os.dup(compile_lock) if compile_lock >= 0 else -1
        theirs = [task_r, result_w, out_w, err_w] + ([lock] if lock >= 0 else [])
        try:
            self.child = launch.start(
                method,
                "shmarray.worker:main",
                (
                    launch.Fd(0),
                    launch.Fd(1),
                    owner_pid,
                    index,
                    control_block,
                    initializer,
                    launch.Fd(2),
                    launch.Fd(3),
                    log_level,
                    spins,
                    launch.Fd(4) if lock >= 0 else -1,
                ),
                theirs,
                report=1,
            )
        except BaseException:
            for fd in (task_w, result_r, out_r, err_r):
                os.close(fd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        self.output = (out_r, err_r)  # the Pool's forwarder reads them
        self.tasks = Connection(task_w, readable=False)
        self.results = Connection(result_r, writable=False)
        self.pid = self.child.pid
        self.sentinel = self.child.sentinel

    @property
    def sent(self) -> int:
        """Messages sent on its task pipe."""
        return int(self._sent[self.index])

    def send(self, msg) -> None:
        """A counted message on the task pipe (OSError if the worker died)."""
        self.tasks.send_bytes(encode(msg))
        self._sent[self.index] += 1

    def wake(self) -> None:
        try:
            self.tasks.send_bytes(WAKE)
        except OSError:
            pass  # dead: the sentinel reports it

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
        return not self.closed and not self.child.exited()

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
            return False  # gone: replaced when next given work
        return self._over

    @property
    def exitcode(self) -> int | None:
        return self.child.exitcode

    def describe_death(self) -> str:
        code = self.child.join(1.0)
        if code is None:
            return f"worker {self.pid} stopped answering"
        if not self.child.status_known:
            return (
                f"worker {self.pid} exited (how is unknown: shmarray's fork "
                f"server, which reports it, is gone)"
            )
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"worker {self.pid} was killed by {name}"
        return f"worker {self.pid} exited with code {code}"

    def kill(self) -> None:
        """End the process now (it may be deep in a numba loop, or stopped)
        and wait until it has exited: from then on it writes nothing."""
        kill_all([self])

    def signal_kill(self) -> None:
        """SIGKILL, without waiting (``kill_all`` waits for many at once)."""
        self.killed = True
        if not self.closed:
            self.child.kill()

    def close(self, timeout: float) -> None:
        """Stop the process (politely if ``timeout``), close the pipes.
        Idempotent."""
        if self.closed:
            return
        if timeout:
            self.child.join(timeout)
        if not self.child.exited():
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
    stops all of them in ``close()``.  The control block is created here, on
    the engine's storage, and unlinked in ``close()`` (or by the watchdog if
    the coordinator dies; a memfd one goes with the last process mapping it).
    """

    workers: list[WorkerProcess] = []  # so close() works after a failed __init__
    watchdog: watchdog.Watchdog | None = None
    ctl: ControlBlock | None = None
    _control_name: str | None = None
    _compile_lock = -1  # compiling.open_lock's: a copy to every worker started
    _closing = False
    forwarder = output.Forwarder()
    # Every worker is alive as far as the driver knows, ready, and idle:
    # False from the moment one is killed or started until recover() has
    # seen them all ready (the lean path's first condition).
    intact = False
    intact_once = False  # every worker said Ready once: the engine runs

    # A replacement that dies while starting (killed with its predecessor,
    # say) is started again this many times before the map fails.
    START_ATTEMPTS = 3

    def __init__(
        self,
        n_workers: int,
        start_method: str,
        startup_timeout: float,
        max_tasks: int | None,
        max_memory: int | None,
        initializer: tuple[bytes, bytes] | None,
        policy: WaitPolicy,
        storage: blocks.Storage | None = None,
    ):
        self.start_method = start_method
        # The control block lives where the engine's blocks do: with memfd,
        # nothing of the engine needs /dev/shm.
        self.storage = storage if storage is not None else blocks.ShmStorage()
        self.max_tasks = max_tasks
        self.max_memory = max_memory
        self.policy = policy
        self.seq = 0  # the last ring given
        self.generation = 0  # replacements so far
        self._owner = os.getpid()
        self._startup_timeout = startup_timeout
        self._initializer = initializer
        # Workers start with the caller's logger levels as they are now.
        self._log_level = output.caller_levels()
        self.workers = []
        self.replaced = [0] * n_workers  # times each worker was replaced
        self.sent = np.zeros(n_workers, np.int64)  # task-pipe messages, by worker
        self.forwarder = output.Forwarder()
        try:
            # The watchdog first: from now on it knows every block to clean.
            self.watchdog = watchdog.Watchdog(self.start_method)
            self._control_name, mapping = self.storage.create(ControlBlock.nbytes(n_workers))
            if self.storage.leaks:
                self.watchdog.blocks(created=(self._control_name,))
            self.ctl = ControlBlock(mapping, n_workers)
            self._compile_lock = compiling.open_lock()
            for i in range(n_workers):
                self.workers.append(self._start(i))
            self.await_ready(self.workers)
            self.intact = self.intact_once = True
            self._tell_watchdog()
        except BaseException:
            self.close()
            raise

    @property
    def compile_lock(self) -> int:
        """The lock of the workers' first compiles (``shmarray.compiling``)."""
        return self._compile_lock

    def next_seq(self) -> int:
        """A new ring number."""
        self.seq += 1
        return self.seq

    def _start(self, index: int) -> WorkerProcess:
        ctl = self.ctl
        assert ctl is not None and self._control_name is not None  # made first
        ring = ctl.fresh(index)
        proc = WorkerProcess(
            self.start_method,
            index,
            self._owner,
            self._control_name,
            self._initializer,
            self._log_level,
            self.policy.for_workers(),
            self.sent,
            self._compile_lock,
        )
        self.forwarder.add(*proc.output)
        proc.rung = ring
        proc.chunks_seen = proc.chunks_at_start = ctl.totals(index)[0]
        proc.busy_at_start = ctl.totals(index)[1]
        proc.served_at_start = ctl.served(index)
        return proc

    def _tell_watchdog(self) -> None:
        assert self.watchdog is not None  # made first
        self.watchdog.tell([(w.pid, blocks.process_start_time(w.pid)) for w in self.workers])

    @property
    def size(self) -> int:
        return len(self.workers)

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self.workers]

    def await_ready(self, procs: list[WorkerProcess], stop: Interrupts | None = None) -> None:
        """Wait for every process in ``procs`` to say Ready.  ``stop``: the
        driver's interruptions, which end the wait with their reason
        (EngineClosedError, MapCancelledError, a held Ctrl-C).  Raises
        ``_StartDied`` for a process that died before it could say why."""
        deadline = time.monotonic() + self._startup_timeout
        waiting: dict = {}
        for p in procs:
            if not p.ready:
                waiting[p.results.fileno()] = waiting[p.sentinel] = p
        forwarded = set(self.forwarder.fds)  # an initializer may print a lot
        while any(not p.ready for p in procs):
            left = deadline - time.monotonic()
            fds = list(waiting) + list(forwarded)
            if stop is not None:
                fds.append(stop.fileno())
            ready = launch.wait_readable(fds, max(left, 0))
            if not ready:
                raise WorkerStartError(
                    f"workers did not start within {self._startup_timeout:.0f} "
                    f"s; the machine may be overloaded. Pass a larger "
                    f"startup_timeout= to Engine."
                )
            shown = [fd for fd in ready if fd in forwarded]
            if shown:
                for fd in self.forwarder.forward(shown):
                    forwarded.discard(fd)
            if stop is not None and stop.fileno() in ready:
                # The worker is left starting (not ready): the next
                # recover() waits for it.
                stop.check()
            for fd in ready:
                proc = waiting.get(fd)
                if proc is None or proc.ready:
                    continue
                try:
                    msg = proc.recv()
                except (EOFError, OSError):
                    msg = None
                if isinstance(msg, StartFailed):
                    raise start_failed(proc.pid, msg, proc.index if self.intact_once else None)
                if not isinstance(msg, Ready):
                    raise _StartDied(proc)
                proc.ready = True

    def replace(
        self, index: int, graceful: bool = False, stop: Interrupts | None = None
    ) -> WorkerProcess:
        """A new worker in place of worker ``index``.  Kills the old one
        unless ``graceful`` (recycling an idle worker, which is asked to
        stop first), and waits until it has exited.  A replacement that
        dies while starting is started again, up to ``START_ATTEMPTS``
        times.  Interrupted (``stop``), it leaves the new worker starting
        and the pool not ``intact``."""
        self.intact = False
        old = self.workers[index]
        why = "recycled"
        if graceful:
            try:
                old.send(Stop())
                old.wake()
            except OSError:
                pass
            old.close(5.0)
        else:
            old.kill()
            try:
                why = old.describe_death()  # for the log only
            except Exception:
                why = f"worker {old.pid} is gone"
            old.close(0.0)
        for attempt in range(1, self.START_ATTEMPTS + 1):
            # Installed before it is ready: an interruption now leaves a
            # worker that recover() waits for, never an orphan process.
            self.generation += 1
            self.replaced[index] += 1
            new = self.workers[index] = self._start(index)
            self._tell_watchdog()
            try:
                self.await_ready([new], stop)
                if not graceful:
                    log.info("replaced worker %d: %s; pid %d took its place", index, why, new.pid)
                self.intact = all(w.ready and not w.killed for w in self.workers)
                return new
            except _StartDied as died:
                why = died.proc.describe_death()
                new.close(0.0)
                if attempt == self.START_ATTEMPTS:
                    raise WorkerStartError(
                        f"a replacement worker died while starting, "
                        f"{self.START_ATTEMPTS} times in a row (the last: {why}). "
                        f"Something kills new workers: the out-of-memory killer, "
                        f"a resource limit, or another program."
                    ) from None
                log.warning(
                    "replacement worker %d died while starting (%s); starting another",
                    new.pid,
                    why,
                )
        raise AssertionError("unreachable")

    def kill(self, procs: list[WorkerProcess]) -> None:
        """Kill ``procs`` (``kill_all``); they are replaced by the next
        ``recover``."""
        self.intact = False
        kill_all([w for w in procs if self.workers[w.index] is w])

    def recover(self, stop: Interrupts | None = None) -> None:
        """Make every worker idle, alive and ready again after a round that
        ended early: replace the killed, the dead, and any still busy with
        a ring nobody waits for; wait for those still starting.  Then the
        pool is ``intact``."""
        ctl = self.ctl
        assert ctl is not None  # a Pool is built whole or not at all
        for w in list(self.workers):
            idle = ctl.done(w.index) >= w.rung
            if w.killed or not w.alive() or not idle:
                if w.alive() and not w.killed:
                    log.info(
                        "worker %d (pid %d) is still busy with an interrupted map: replacing it",
                        w.index,
                        w.pid,
                    )
                self.replace(w.index, stop=stop)
        starting = [w for w in self.workers if not w.ready]
        try:
            self.await_ready(starting, stop)
        except _StartDied as died:
            self.replace(died.proc.index, stop=stop)
            self.recover(stop)
            return
        self.intact = True

    def recycle(
        self, busy: list[WorkerProcess], dynamic: bool, stop: Interrupts | None = None
    ) -> None:
        """Replace, gracefully, the workers past ``max_tasks_per_worker``
        tasks or ``max_worker_memory`` bytes of unique memory."""
        limit, memory = self.max_tasks, self.max_memory
        if limit is None and memory is None:
            return
        for w in busy:
            if self.workers[w.index] is not w:
                continue  # replaced already
            if limit is not None:
                if dynamic:
                    assert self.ctl is not None  # a Pool is built whole or not at all
                    now = self.ctl.totals(w.index)[0]
                    w.tasks_run += now - w.chunks_seen
                    w.chunks_seen = now
                else:
                    w.tasks_run += 1
                if w.tasks_run >= limit:
                    log.info(
                        "recycling worker %d (pid %d) after %d tasks", w.index, w.pid, w.tasks_run
                    )
                    self.replace(w.index, graceful=True, stop=stop)
                    continue
            if memory is not None and w.over_memory(memory):
                log.info(
                    "recycling worker %d (pid %d): its unique memory is over "
                    "max_worker_memory=%d bytes",
                    w.index,
                    w.pid,
                    memory,
                )
                self.replace(w.index, graceful=True, stop=stop)

    def close(self, timeout: float = 5.0) -> None:
        """Stop every worker, politely then by force, then the watchdog;
        unlink the control block.  Idempotent, and resumable: interrupted
        (Ctrl-C), a second call finishes the job, since each worker leaves
        the list only once it is stopped, and without waiting politely
        again."""
        if self._closing:
            timeout = 0.0
        self._closing = True
        lock, self._compile_lock = self._compile_lock, -1
        if lock >= 0:  # first: nothing below may leave it open
            os.close(lock)
        if self.workers and self.ctl is not None:  # (no workers without it)
            seq = self.next_seq()
            for w in list(self.workers):
                try:
                    w.send(Stop())
                except OSError:
                    continue
                self.ctl.stop_worker(w.index, w.sent, seq)
                w.wake()
        while self.workers:
            w = self.workers[-1]
            # One still starting (in its initializer, say) reads no Stop.
            w.close(timeout if w.ready else 0.0)
            self.workers.pop()
        self.forwarder.close()
        if self.watchdog is not None:
            self.watchdog.close(timeout)
        name, self._control_name = self._control_name, None
        if name is not None:
            self.storage.unlink(name)
        if self.ctl is not None:
            self.ctl.release()

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
        lock, self._compile_lock = self._compile_lock, -1
        if lock >= 0:
            os.close(lock)
