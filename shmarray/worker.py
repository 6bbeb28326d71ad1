"""The loop that runs in each worker process.

A worker waits for its ring in the control block (``shmarray.control``):
spinning for a few milliseconds after its last job, so maps that follow
each other reach it at once, then asleep on its task pipe, costing nothing.
It keeps kernels and job definitions by key, attaches each block at most
once, and runs chunks in place.  It never creates or unlinks a block and
never registers one with the resource tracker; it unmaps a block when told
the name is gone.  It runs in a session of its own (under the fork server
and spawn) and ignores SIGINT anyway: only the coordinator decides what
Ctrl-C means.  It exits when told to, or when its task pipe reaches
end-of-file because the coordinator is gone.
"""

from __future__ import annotations

import gc
import os
import pickle
import select
import signal
import time
import traceback
import weakref
from multiprocessing.connection import Connection
from typing import Literal

import cloudpickle
import numba
import numpy as np
import threadpoolctl
from numba.core.errors import NumbaError
from numba.extending import is_jitted

from shmarray import blocks, boundary, compiling, control, launch, output
from shmarray.control import step_word
from shmarray.descriptors import (
    WAKE,
    ArrayDescriptor,
    Define,
    Failed,
    Forget,
    Install,
    MainNamespace,
    Ready,
    Rebind,
    Release,
    StartFailed,
    Stop,
    Values,
    chunk_calls,
    decode,
    encode,
    load,
    load_kernel,
    pack_values,
    worker_id,
)

_limits = None
_forked = False  # set in a child a kernel forked off this worker


def _after_fork_in_child() -> None:
    global _forked
    _forked = True


# After a job, a worker spins for the next ring for as long as the wait
# policy says (``shmarray.waiting``).  Maps issued back to back (an iterated
# stencil, a loop of small maps) then find the worker awake, about 1 us away
# instead of the 10-100 us it takes to wake a sleeping process in a VM; an
# idle engine sleeps within that long of its last map.  The spin yields its
# CPU every few rounds, so it does not hold up a process that has work.
SPIN_ROUNDS = 256  # rounds per call into the spin loop: about 25 us
# A job becomes hot, and is served by the compiled loop (control.serve),
# after this many runs: compiling the loop for a new kernel costs 0.3-0.5 s
# in each worker (2 vCPUs), a stall of the map that triggers it; the loop
# saves 5-15 us a map.  Worth it for a loop of hundreds of maps, not for a
# kernel mapped a few times (at 3 runs, every kernel's fourth map stalled).
# A prepared map is hot at once: preparing says a loop follows.
HOT_RUNS = 50


def limit_threads() -> None:
    """One thread per worker for every pool a kernel could start, so N
    workers never oversubscribe N cores.  Under the fork server and spawn the
    environment did it before numpy and numba were imported
    (``launch.THREAD_VARS``); BLAS libraries loaded already are capped in
    place with threadpoolctl.  Under fork, numba keeps the coordinator's
    setting: changing it would start its thread pool in a forked child."""
    global _limits
    for var in launch.THREAD_VARS:
        os.environ[var] = "1"
    _limits = threadpoolctl.threadpool_limits(1)


class _Unloadable:
    """Stands in for a kernel that failed to load; raises when run."""

    def __init__(self, exc: BaseException):
        self.exc = exc

    def __call__(self, *args):
        raise self.exc


class _Job:
    """A defined job: the kernel and, for each chunk, its ready-made
    arguments (slicing views again on every call cost 1 us an array), with
    its placeholders filled in; for an iterated job, also with its first two
    arrays swapped; with a boundary, the ghost-cell copies of this worker's
    part, in two stages."""

    __slots__ = (
        "kernel",
        "spec",
        "calls",
        "swapped",
        "blocks",
        "neighbours",
        "staged",
        "fills",
        "runs",
        "lean",
        "rows_of",
        "compiled",
    )

    blocks: set[str]  # the blocks it reads, set by Worker.define

    def __init__(self, kernel, spec: Define, views: list, args: tuple, index: int):
        self.kernel = kernel
        self.spec = spec
        # The control lines of the workers it waits for between stages.
        self.neighbours = np.array([control.slot(i) for i in spec.neighbours], np.int64)
        self.staged = spec.iterated or spec.boundary is not None
        self.rows_of = dict(zip(spec.indices, spec.chunks))
        self.runs = 0
        # For the lean path (control.serve): (calls as one tuple, chunk
        # indices), once the job is hot; False when it cannot have one.
        self.lean: tuple | Literal[False] | None = None
        # Whether its first chunk has run here (compiling.compile_first).
        self.compiled = False
        self.bind(views, args, index)

    def lean_path(self) -> tuple | None:
        """The compiled loop's arguments, once this job has run often enough
        to be worth compiling it (a prepared job: at once), if it can: a
        static map with no values, tracking or stages, whose kernel is a
        numba function and whose chunks' arguments all have one type."""
        self.runs += 1
        if self.lean is None and self.runs >= (
            1 if self.spec.mode & control.PREPARED else HOT_RUNS
        ):
            self.lean = False
            spec = self.spec
            if (
                not self.staged
                and not spec.dynamic
                and not spec.want_values
                and not spec.mode & ~(control.PREPARED | control.IN_CALLER)
                and is_jitted(self.kernel)
                and self.calls
            ):
                calls = tuple(self.calls)
                try:
                    same = len({numba.typeof(c) for c in calls}) == 1
                except Exception:
                    same = False
                if same:
                    self.lean = (calls, np.array(spec.indices, np.int64))
        return self.lean or None

    def bind(self, views: list, args: tuple, index: int) -> None:
        spec = self.spec
        h, axis = spec.halo, spec.axis
        self.lean = None  # built again from the new calls
        self.calls = chunk_calls(views, args, spec.chunks, h, axis, index)
        self.swapped = (
            [(c[1], c[0]) + c[2:] for c in self.calls]
            if spec.iterated and len(views) >= 2
            else self.calls
        )
        self.fills = []
        if spec.boundary is not None and spec.chunks:
            b = boundary.Boundary(*spec.boundary)
            rows = (spec.chunks[0][0], spec.chunks[-1][1])
            for v in views:
                n = v.shape[axis]
                before, after = boundary.ghost_copies(
                    v.shape, h, b, axis, rows, rows[0] == h, rows[1] == n - h
                )
                self.fills.append((v, before, after))

    def fill(self, stage: int) -> None:
        for v, *stages in self.fills:
            boundary.apply(v, stages[stage])


class Mappings:
    """The blocks this worker has attached, and views over them.

    Attaches each block at most once, only one of its own coordinator, and
    unmaps it when told the name is gone.
    """

    def __init__(self, owner_pid: int):
        self.owner_pid = owner_pid
        self.buffers: dict[str, np.ndarray] = {}  # block name -> its bytes
        # Jobs repeat the same arrays; rebuilding and checking a view costs
        # 2 us, a lookup 0.2 us.  Keyed by ArrayDescriptor.wire tuples.
        self.views: dict[tuple, np.ndarray] = {}

    def buffer(self, name: str) -> np.ndarray:
        buf = self.buffers.get(name)
        if buf is None:
            if blocks.owner_of(name) != self.owner_pid:
                raise PermissionError(
                    f"block {name!r} was not created by this worker's "
                    f"coordinator (pid {self.owner_pid}); refusing to map it"
                )
            buf = np.frombuffer(blocks.attach(name), dtype=np.uint8)
            self.buffers[name] = buf
        return buf

    def view(self, wire: tuple) -> np.ndarray:
        """The array for an ``ArrayDescriptor.wire`` tuple."""
        v = self.views.get(wire)
        if v is None:
            d = ArrayDescriptor(*wire)
            if len(self.views) >= 256:
                self.views.clear()
            v = self.views[wire] = d.view(self.buffer(d.block))
        return v

    def bind(self, args: tuple) -> tuple:
        """``args`` with descriptors replaced by their arrays."""
        return tuple(self.view(a.wire) if isinstance(a, ArrayDescriptor) else a for a in args)

    def release(self, gone: set[str]) -> None:
        """Unmap blocks the coordinator has unlinked.

        Dropping our arrays drops a mapping, unless something still refers
        to it.  A reference cycle can: numba's first compile for a new
        signature leaves its argument frames in a cycle, which kept that
        call's block mapped (its memory unreturned) until the next full
        collection, rare in a worker.  So when a mapping outlives our
        references, collect once.  A view a kernel stored on purpose lives
        on, harmlessly.  The caller drops its own references first.
        """
        mappings: list[weakref.ref] = []
        for name in gone:
            buf = self.buffers.pop(name, None)
            if buf is not None:
                assert isinstance(buf.base, memoryview)  # np.frombuffer's
                mappings.append(weakref.ref(buf.base.obj))
        self.views = {w: v for w, v in self.views.items() if w[0] not in gone}
        buf = None  # no local may keep a mapping alive past this line
        if any(m() is not None for m in mappings):
            gc.collect()


class _Worker:
    def __init__(
        self,
        owner_pid: int,
        index: int,
        words: control.WorkerWords,
        tasks,
        results,
        spins: tuple[float, int],
        compile_lock: int = -1,
    ):
        self.index = index
        self.ctl = words
        self.compile_lock = compile_lock  # its own copy of the engine's (compiling)
        self.tasks = tasks
        self.results = results
        self.idle_spin, self.step_spin = spins
        self.received = 0  # messages, not wake frames
        self.kernels: dict[int, object] = {}
        self.jobs: dict[int, _Job] = {}
        self.maps = Mappings(owner_pid)
        self.main = MainNamespace()
        self.rows: tuple[int, int] | None = None  # the chunk running, for output
        # The hot jobs control.serve runs: one, or the two halves of a
        # double-buffered loop (same kernel, same argument types).
        self.serving: list[_Job] = []
        self.idle_spin_ns = int(self.idle_spin * 1e9)

    def current_rows(self) -> tuple[int, int] | None:
        """The rows of the chunk running, for the tag on what it prints."""
        if self.rows is not None:
            return self.rows
        key = self.ctl.ring_job()
        for job in self.serving:
            if job.spec.job == key:
                return job.rows_of.get(self.ctl.where()[1])
        return None

    # -- messages ------------------------------------------------------------

    def handle(self, msg) -> bool:
        """Act on one pipe message; False when told to stop."""
        kind = type(msg)
        if kind is Define:
            self.define(msg)
        elif kind is Rebind:
            job = self.jobs[msg.job]
            job.bind(
                [self.maps.view(d) for d in job.spec.arrays],
                self.maps.bind(pickle.loads(msg.args)),
                self.index,
            )
        elif kind is Install:
            try:
                self.kernels[msg.key] = load_kernel(msg.payload, self.main)
            except Exception as exc:
                self.kernels[msg.key] = _Unloadable(exc)
        elif kind is Forget:
            for key in msg.kernels:
                self.kernels.pop(key, None)
            for key in msg.jobs:
                self.jobs.pop(key, None)
        elif kind is Release:
            gone = set(msg.names)
            self.jobs = {k: j for k, j in self.jobs.items() if not (j.blocks & gone)}
            # their views must go, to unmap the blocks
            self.serving = [j for j in self.serving if not (j.blocks & gone)]
            self.maps.release(gone)
        elif kind is Stop:
            return False
        return True

    def define(self, msg: Define) -> None:
        raw: tuple = ()
        try:
            raw = pickle.loads(msg.args)
            views = [self.maps.view(d) for d in msg.arrays]
            args = self.maps.bind(raw)
            kernel = self.kernels[msg.kernel]
        except Exception as exc:  # a bad descriptor: the job fails when run
            kernel, views, args = _Unloadable(exc), [], ()
        job = self.jobs[msg.job] = _Job(kernel, msg, views, args, self.index)
        job.blocks = {d[0] for d in msg.arrays} | {
            a.block for a in raw if isinstance(a, ArrayDescriptor)
        }

    def receive(self, until: int) -> bool:
        """Handle pipe messages until ``until`` have arrived in all; False
        when told to stop or the coordinator is gone."""
        while self.received < until:
            try:
                data = self.tasks.recv_bytes()
            except (EOFError, OSError):
                return False
            if data == WAKE:
                continue
            self.received += 1
            if not self.handle(decode(data)):
                return False
        return True

    def drain(self) -> bool:
        """Handle whatever the pipe holds now (woken from sleep)."""
        try:
            while self.tasks.poll(0):
                data = self.tasks.recv_bytes()
                if data != WAKE:
                    self.received += 1
                    if not self.handle(decode(data)):
                        return False
        except (EOFError, OSError):
            return False
        return True

    # -- jobs ----------------------------------------------------------------

    def run(self, key: int, seq: int, steps: int) -> None:
        started = time.perf_counter_ns()
        job = self.jobs.get(key)
        if job is None:  # cannot happen unless the protocol is broken
            self.send(failure(seq, -1, RuntimeError(f"worker {os.getpid()} has no job {key}")))
            sent, ran = 1, 0
        elif job.staged:
            sent, ran = self.staged(job, seq, steps)
        else:
            _, sent, ran = self.chunks(job, seq, job.calls)
        if self.ctl.finish(seq, sent, ran, time.perf_counter_ns() - started):
            self.results.send_bytes(WAKE)

    def chunks(self, job: _Job, seq: int, calls: list, ran: int = 0) -> tuple[bool, int, int]:
        """Run this worker's chunks of ``job`` once; (a chunk failed,
        messages sent, chunks run in all).  The first failing chunk ends the
        job and sets STOP, unless the job collects failures
        (``control.COLLECT``).  A tracked job marks each chunk on the board
        as it starts, finishes or fails, and stops between chunks when STOP
        is set; a streamed one sends each value at once."""
        ctl = self.ctl
        spec, kernel = job.spec, job.kernel
        mode = spec.mode
        track = mode & control.TRACK
        stream = mode & control.STREAM
        values: list | None = [] if spec.want_values and not stream else None
        done = []
        n = len(calls)
        k = -1
        sent = 0
        failed = False
        while True:
            if spec.dynamic:
                k = ctl.take_chunk(n)
                if k < 0:
                    break
            else:
                k += 1
                if k >= n or (track and ctl.stopped()):
                    break
            index = spec.indices[k]
            ctl.running(index)
            if track:
                ctl.mark(index, control.RUNNING)
            self.rows = spec.chunks[k]
            try:
                if not job.compiled:
                    job.compiled = True
                    if is_jitted(kernel):
                        compiling.compile_first(self.compile_lock, kernel, calls[k])
                value = kernel(*calls[k])
            except SystemExit:
                raise  # sys.exit() in a kernel ends the worker, as it says
            except BaseException as exc:  # KeyboardInterrupt too: the kernel's own
                if _forked:
                    os._exit(1)
                self.rows = None
                output.end_lines()
                self.send(failure(seq, index, exc))
                sent += 1
                failed = True
                if track:
                    ctl.mark(index, control.FAILED)
                if mode & control.COLLECT:
                    continue
                ctl.stop()  # the others take no more
                break
            if _forked:  # the kernel forked, and this is the child
                os._exit(0)
            self.rows = None
            output.end_lines()
            if stream:
                # Sent before the chunk is marked: the caller decides a
                # chunk's outcome by its value first (see dispatch.Tally).
                sent += self.send_values(seq, [index], [value])
            elif values is not None:
                values.append(value)
                done.append(index)
            if track:
                ctl.mark(index, control.FINISHED)
            ran += 1
            ctl.ran(ran)
        if values:
            sent += self.send_values(seq, done, values)
        return failed, sent, ran

    def staged(self, job: _Job, seq: int, steps: int) -> tuple[int, int]:
        """``steps`` steps of a job that needs its neighbours between stages:
        iterated (the first two arrays swap after each step), or with ghost
        cells to fill.  Each step: wait for the neighbours' previous step;
        fill the ghosts before the split axis; wait (if there were any);
        fill the rest; wait; run the chunks.  Every stage done is published
        as this worker's STEP word, ``step_word(seq, 3 * step + stage)``.

        However the job ends early (a chunk of this worker failed, or STOP:
        one of another worker did), this worker publishes its last stage,
        so no neighbour waits for it; the neighbours' own waits end on STOP.
        """
        ctl = self.ctl
        neighbours = job.neighbours
        wait = neighbours.size > 0
        spin = self.step_spin
        ran = sent = 0
        try:
            for step in range(steps):
                base = 3 * step
                if step and wait and not ctl.wait_steps(neighbours, step_word(seq, base), spin):
                    break
                if ctl.stopped():
                    break  # another worker's chunk failed
                if job.fills:
                    job.fill(0)
                    ctl.publish_step(step_word(seq, base + 1))
                    if (
                        wait
                        and job.spec.axis > 0
                        and not ctl.wait_steps(neighbours, step_word(seq, base + 1), spin)
                    ):
                        break
                    job.fill(1)
                    ctl.publish_step(step_word(seq, base + 2))
                    if wait and not ctl.wait_steps(neighbours, step_word(seq, base + 2), spin):
                        break
                failed, now, ran = self.chunks(
                    job, seq, job.swapped if step % 2 else job.calls, ran
                )
                sent += now
                if failed:
                    break
                ctl.publish_step(step_word(seq, base + 3))
        finally:
            # Never keep a neighbour waiting (also when a fill raised).
            ctl.publish_step(step_word(seq, control.STEP_LIMIT))
        return sent, ran

    def send(self, msg) -> None:
        self.results.send_bytes(encode(msg))

    def send_values(self, seq: int, indices: list, values: list) -> int:
        try:
            data = encode(Values(seq, tuple(indices), pack_values(tuple(values))))
        except Exception as exc:  # a kernel returned something unpicklable
            tb = "".join(traceback.format_exception(exc))
            data = encode(
                Failed(
                    seq,
                    indices[0],
                    b"",
                    type(exc).__name__,
                    f"the kernel's return value cannot be pickled back to the "
                    f"caller ({exc}). Return numbers, tuples or NumPy arrays.",
                    tb,
                )
            )
        self.results.send_bytes(data)
        return 1

    def loop(self) -> None:
        ctl = self.ctl
        # The last ring answered: a ring given before this loop started
        # (a fresh worker is rung as soon as it is ready) is not missed.
        last = ctl.done()
        while True:
            # Every job reference lives in self.jobs and self.serving only,
            # never in this frame: a Release handled below must leave no
            # view of its blocks alive (one would keep the mapping, and cost
            # a full collection per Release).
            code, seq = self.serve_hot(last)
            if code == control.OTHER_RING:
                pass  # a ring for Python: below
            elif code is not None:
                last = seq  # the last ring served
                if code != control.SPUN_OUT:
                    continue  # a driver to wake, or an error told
            else:
                seq = ctl.wait_ring(last, SPIN_ROUNDS)
                if seq == last and self.idle_spin > 0:
                    spin_until = time.monotonic() + self.idle_spin
                    while seq == last and time.monotonic() < spin_until:
                        seq = ctl.wait_ring(last, SPIN_ROUNDS)
            if seq == last:
                if ctl.announce_sleep(last):
                    try:
                        select.select([self.tasks], [], [])
                    finally:
                        ctl.awake()
                    if not self.drain():
                        return
                continue
            last = seq
            key, piped, steps = ctl.take(seq)
            if not self.receive(piped):
                return
            if key:
                self.run(key, seq, steps)
                self.make_hot(key)
            else:
                ctl.finish(seq, 0, 0, 0)

    def serve_hot(self, last: int) -> tuple[int | None, int]:
        """Serve the hot jobs' rings in compiled code until a ring needs the
        Python path; (None, last) when no job is hot, else what ``lean``
        returned.  A ring for the other half of a double-buffered loop is
        served here too, beside the last one."""
        while True:
            # Forgotten, its blocks gone, or rebound (new arguments: the
            # Python path runs it once, then lean_path builds it again).
            jobs = self.serving = [
                j for j in self.serving if self.jobs.get(j.spec.job) is j and j.lean
            ]
            if not jobs:
                return None, last
            code, seq = self.lean(jobs, last)
            if code != control.OTHER_RING:
                return code, seq
            other = self.jobs.get(self.ctl.ring_job())
            if other is None or not other.lean or other in jobs or not _pairs(jobs[-1], other):
                self.serving = []
                return code, seq
            self.serving = [jobs[-1], other]

    def make_hot(self, key: int) -> None:
        """After the Python path ran job ``key``: serve it in compiled code
        from now on, if it can be, beside the last hot job if they pair."""
        job = self.jobs.get(key)
        if job is not None and job.lean_path():
            serving = [j for j in self.serving if j is not job]
            self.serving = [serving[-1], job] if serving and _pairs(serving[-1], job) else [job]

    def lean(self, jobs: list[_Job], last: int) -> tuple[int, int]:
        """Serve ``jobs``' rings in compiled code (``control.serve``).
        Returns (``control.SPUN_OUT``, the last ring served) when no ring
        came in the spin; (OTHER_RING, ring) for a ring the Python path must
        take; (WAKE_DRIVER, ring) once ring ``ring`` was served and its
        driver woken, or its kernel's exception reported."""
        first, second = jobs[0], jobs[-1]  # one job: served as both halves
        assert first.lean and second.lean  # serving: lean_path() gave them
        keys = np.array([first.spec.job, second.spec.job], np.int64)
        calls_by = (first.lean[0], second.lean[0])
        indices_by = np.stack([first.lean[1], second.lean[1]])
        try:
            code, seq = self.ctl.serve(
                last, keys, self.received, first.kernel, calls_by, indices_by, self.idle_spin_ns
            )
        except NumbaError:
            for job in jobs:
                job.lean = False  # cannot be compiled: the Python path
            self.serving = []
            return control.SPUN_OUT, last
        except SystemExit:
            raise
        except BaseException as exc:  # the kernel raised, as in chunks()
            seq, index = self.ctl.where()
            output.end_lines()
            self.send(failure(seq, index, exc))
            self.ctl.stop()
            if self.ctl.finish(seq, 1, self.ctl.ran_so_far(), 0):
                self.results.send_bytes(WAKE)
            return control.WAKE_DRIVER, seq
        if code == control.WAKE_DRIVER:
            self.results.send_bytes(WAKE)
        return code, seq


def _pairs(a: _Job, b: _Job) -> bool:
    """Whether hot jobs ``a`` and ``b`` can be served by one compiled loop:
    one kernel, as many chunks, arguments of the same types (the two halves
    of a double-buffered loop, whose arrays swap places)."""
    if a.kernel is not b.kernel or not a.lean or not b.lean:
        return False
    if len(a.lean[0]) != len(b.lean[0]):
        return False
    try:
        return bool(numba.typeof(a.lean[0]) == numba.typeof(b.lean[0]))
    except Exception:
        return False


def failure(seq: int, index: int, exc: BaseException) -> Failed:
    """A kernel's exception for the caller.  By value (cloudpickle) when its
    class came by value from the caller's __main__: cloudpickle gives the
    caller back its own class object, so ``except Boom:`` still works there."""
    tb = "".join(traceback.format_exception(exc))
    try:
        error = cloudpickle.dumps(exc, pickle.HIGHEST_PROTOCOL)
        pickle.loads(error)
    except Exception:
        error = b""
    return Failed(seq, index, error, type(exc).__qualname__, str(exc), tb)


def main(
    tasks_fd: int,
    results_fd: int,
    owner_pid: int,
    index: int,
    control_block: str,
    initializer: tuple[bytes, bytes] | None = None,
    out_fd: int = -1,
    err_fd: int = -1,
    log_level: int | dict[str, int] = 30,
    spins: tuple[float, int] = (2e-3, 10_000),
    compile_lock: int = -1,
) -> None:
    """Worker entry point (started by ``shmarray.launch``): ``tasks_fd`` and
    ``results_fd`` are its ends of two pipes, ``control_block`` the name of
    the engine's control block, ``initializer`` the pickled (function,
    args) to run once before the first task (``shmarray.worker_id`` among
    the args becomes this worker's index).  ``out_fd`` and ``err_fd``, pipes
    to the coordinator, become its stdout and stderr (``shmarray.output``);
    ``log_level``, the caller's logger levels (``output.caller_levels``),
    its loggers' levels, and its logging records go to the coordinator.
    ``spins``: the wait policy's (idle spin in seconds, step-wait rounds).
    ``compile_lock``: the engine's lock for first compiles
    (``shmarray.compiling``).
    A failure to start, the initializer's included, is reported to the
    coordinator as a StartFailed message, never printed here."""
    tasks = Connection(tasks_fd, writable=False)
    results = Connection(results_fd, readable=False)
    stage = "start"
    worker = None
    try:
        if out_fd >= 0:
            for fd, std in ((out_fd, 1), (err_fd, 2)):
                os.dup2(fd, std)
                os.close(fd)
            output.install_in_worker(
                index,
                lambda: worker.current_rows() if worker is not None else None,
                log_level,
                lambda: worker.ctl.wrote() if worker is not None else None,
            )
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # A kernel that calls os.fork() returns twice; the child must not go
        # on as this worker (it shares its pipes and control words).
        os.register_at_fork(after_in_child=_after_fork_in_child)
        limit_threads()
        words = control.WorkerWords(blocks.attach(control_block), index)
        worker = _Worker(owner_pid, index, words, tasks, results, spins, compile_lock)
        if initializer is not None:
            stage = "initializer"
            function = worker.main.adopt(load(initializer[0]))
            function(*[index if a is worker_id else a for a in pickle.loads(initializer[1])])
        ready = encode(Ready(os.getpid()))
    except BaseException as exc:
        try:
            results.send_bytes(
                encode(
                    StartFailed(
                        stage,
                        type(exc).__qualname__,
                        str(exc),
                        "".join(traceback.format_exception(exc)),
                    )
                )
            )
        except OSError:
            pass
        return
    try:
        results.send_bytes(ready)
        worker.loop()
    except OSError:
        # A pipe broke: the coordinator is gone, or has replaced this worker
        # (it killed it, or gave up on it while it started).  Nobody is left
        # to tell.
        return
