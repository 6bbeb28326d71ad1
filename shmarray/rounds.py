"""Running one call on the pool: ring the busy workers, wait, collect.

How a map flows, and who owns what::

    caller thread                 driver (one thread at a time)          worker i
    -------------                 -----------------------------          --------
    Engine.map: check args  ----> the caller itself when the engine
    Engine.submit: check,         is idle, else the manager thread
      enqueue, return a           (dispatch.Dispatcher)
      Future at once                |
                                    | tasks pipe, rare or large
                                    | (holdings.Holdings):
                                    |  Install(kernel) Define(job)       -> kept by key
                                    |  Rebind(args) Release(blocks)      -> unmap
                                    |
                                    | control block, every map
                                    | (control.ControlBlock):
                                    |  JOB, PIPED, then RING = seq   ~~> spinning: sees it
                                    |  (+ a wake frame if ASLEEP)        asleep: woken
                                    |                                    drains the pipe,
                                    |                                    runs its chunks
                                    |                                    in place
                                    |  spins on DONE, then naps    <~~  REPLY, DONE = seq
                                    |  on BELL (up to 20 ms),          (+ Values / Failed
                                    |  then sleeps on pipes +           of ring seq on the
                                    |  sentinels (Round.wait)           results pipe);
                                    |                                   rings BELL if the
                                    |                                   driver naps
    result or exception   <-------  values in chunk order

The static schedule gives each worker its contiguous group of chunks, the
same rows every call; the dynamic schedule gives every worker the whole
list, and they take chunks one at a time from the shared counter.  A
tracked call (``retries``, ``errors="collect"``, ``imap``) runs in rounds
of its own (``shmarray.tracked``).

Every message a worker sends names its ring; the driver drops one of an
earlier ring (left unread when that ring was abandoned), so it can never be
taken for this one's.  A worker that dies is known dead by its own process
(``launch.Child``), and a worker that might still run is killed, and its
exit confirmed, before anything it held is given to another.
"""

from __future__ import annotations

import logging
import pickle
import select
import time
from collections.abc import Callable
from typing import Any

from shmarray import boundary, control, deaths, tracked
from shmarray.descriptors import WAKE, Failed, Values, decode
from shmarray.errors import EngineClosedError
from shmarray.holdings import Holdings
from shmarray.jobs import Call, JobCache
from shmarray.pool import Pool, WorkerProcess
from shmarray.progress import ChunkProgress, resolve as resolve_progress
from shmarray.wakeup import Wakeup

# Crashes and timeouts of workers, at WARNING (shmarray.pool logs the
# replacements, at INFO).
log = logging.getLogger(__name__)

# Rounds per call into the driver's spin loop: about 6 us.  How long the
# driver spins in all is the wait policy's (``shmarray.waiting``): a map
# shorter than that returns about 10 us sooner (no wake-up); a longer one
# loses that much CPU to the spin, which yields to the workers meanwhile.
# Measured on the 2-vCPU reference VM with a worker per CPU: spinning for
# a whole 1024-square heat step cost 2.5 times, a short spin 1.08.
SPIN_ROUNDS = 64

# Seconds between polls of the workers' output pipes when the lean path
# sees no output in the control block: C code that writes to a descriptor
# itself is forwarded within this long of a map (at the latest, when the
# driver next sleeps or the engine closes).
OUTPUT_POLL = 0.05


class Runner:
    """Runs calls on the pool, one at a time.  Called by the driver only,
    except ``interrupt``."""

    def __init__(self, pool: Pool, table, cache: JobCache):
        self.pool = pool
        assert pool.ctl is not None  # a Pool is built whole or not at all
        self.ctl: control.ControlBlock = pool.ctl
        self.holdings = Holdings(pool, table, cache)
        self.wakeup = Wakeup()
        self.dirty = False  # a round was abandoned half-way
        self._should_stop: Callable[[], BaseException | None] = lambda: None
        # The workers' OUTPUT words added up when their pipes were last
        # drained (the lean path's cue to forward), and when a pipe was last
        # polled for output the words do not count (C code writing to the
        # descriptors itself).
        self.output_seen = 0
        self._polled = 0.0
        self._quiet = False  # the last round ended QUIET: no output came
        self._spin_ns = int(pool.policy.driver_spin * 1e9)

    # -- from any thread ---------------------------------------------------------

    def interrupt(self) -> None:
        """Wake the driver wherever it waits: its spin watches ABORT, its
        sleep the wake-up."""
        self.ctl.abort()
        self.wakeup.wakeup()

    def close(self) -> None:
        self.wakeup.close()

    forget_in_child = close  # the wake-up is this process's own

    # -- the driver ----------------------------------------------------------------

    def run(self, call: Call, should_stop: Callable[[], BaseException | None]) -> Any:
        """Run ``call``: its values in chunk order (reduce) or None; for a
        tracked call, its Tally.

        Raises the earliest failing chunk's exception, WorkerCrashedError,
        TaskTimeoutError, or what ``should_stop`` returns when interrupted;
        every worker is idle or replaced when it returns, except after an
        interruption of the cleanup itself, which the next run repairs.
        What the workers printed is forwarded before it returns.

        A repeat of a job every worker holds, with nothing pending, takes
        the lean path first: one compiled call (``ring_lean``), and no
        Python after it unless it found something to read.  The driver of
        a loop of large maps runs on a cache the kernel has just flushed,
        where every line of Python it runs costs a miss or two.
        """
        self._should_stop = should_stop
        job = call.job
        pool = self.pool
        if (
            self.dirty
            or job.tracked
            or not job.cached
            or (job.dynamic and job.boundary is not None)  # the caller fills ghosts
            or call.progress is True
            or time.monotonic() - self._polled > OUTPUT_POLL
            or not self.holdings.ready(job, call.args)
        ):
            self._quiet = False
            try:
                if job.tracked:
                    return tracked.run(self, call)
                return self.round(call, job)
            finally:
                self._forward()
        seq = pool.next_seq()
        self.dirty = True
        state, asleep = self.ring_lean(job, job.busy, call, seq)
        if state == control.QUIET and not asleep:
            self.dirty = False
            if pool.max_tasks is not None or pool.max_memory is not None:
                self.recycle(job.busy, job)
            return None
        # Something for the Python path: finish this round there.
        self._quiet = False
        try:
            busy = list(job.busy)
            try:
                if asleep:
                    for w in busy:
                        if self.ctl.asleep(w.index):
                            w.wake()
                values = Round(self, busy, seq, call, job, None).wait(state)
            except BaseException:
                self.abandon(busy, seq)
                raise
            self.dirty = False
            if pool.max_tasks is not None or pool.max_memory is not None:
                self.recycle(busy, job)
            return values
        finally:
            self._forward()

    def _forward(self) -> None:
        """Forward what the workers printed, before the call returns: when
        the control block says there is some (every Python-level write is
        counted there), a line is begun, or, at most every OUTPUT_POLL
        seconds, when a pipe holds some (written by C code)."""
        forwarder = self.pool.forwarder
        now = time.monotonic()
        due = now - self._polled > OUTPUT_POLL
        if self._quiet and not due and not forwarder._begun:
            return
        if due:
            self._polled = now
        if (
            forwarder.begun
            or (not self._quiet and self.ctl.output() != self.output_seen)
            or (due and forwarder.pending())
        ):
            forwarder.drain()
            self.output_seen = self.ctl.output()

    def recycle(self, busy: list, job) -> None:
        """Replace the workers of ``busy`` past their task or memory limit
        (``Pool.recycle``).  Dirty meanwhile: a Ctrl-C while a replacement
        starts leaves one the next run's recover() waits for."""
        self.dirty = True
        self.pool.recycle(busy, job.dynamic, self.wakeup, self.closing)
        self.dirty = False

    def closing(self) -> bool:
        return isinstance(self._should_stop(), EngineClosedError)

    def tidy(self) -> None:
        self.holdings.tidy()

    def round(self, call: Call, job, tally: tracked.Tally | None = None) -> list | None:
        """One ring of ``job`` on its workers; see ``run``."""
        holdings = self.holdings
        if self.dirty or not holdings.ready(job, call.args):
            if self.dirty:
                self.pool.recover(self.wakeup, self.closing)
                self.dirty = False
            holdings.prepare(job, call.args, self.wakeup, self.closing)
        busy = list(job.busy)
        seq = self.pool.next_seq()
        if (job.dynamic or job.tracked) and job.boundary is not None and job.indices is None:
            # Chunks with no fixed owners to fill ghosts next to (or that
            # may run again elsewhere): the caller fills them (copies of the
            # surface only).
            for a in call.arrays:
                boundary.fill(a, job.halo, job.boundary, job.axis)
        lean = tally is None and call.stream is None and call.progress is not True
        if job.round_words and not lean:
            # Every worker of the last round is done or dead: see the
            # invariants in shmarray.control.
            self.ctl.new_round(halted=call.stream is not None and call.stream.halted)
        self.dirty = True
        try:
            if lean:
                # The lean path: ring and spin in one call.
                state, asleep = self.ring_lean(job, busy, call, seq)
                if asleep:
                    for w in busy:
                        if self.ctl.asleep(w.index):
                            w.wake()
                if state == control.QUIET:
                    values = None
                    self._quiet = True
                else:
                    values = Round(self, busy, seq, call, job, tally).wait(state)
            else:
                for w in busy:
                    self.ring(w, job, seq, call.steps)
                values = Round(self, busy, seq, call, job, tally).wait()
        except BaseException:
            self.abandon(busy, seq)
            raise
        finally:
            if not job.cached:
                holdings.cache.forgotten.append(job.key)
        self.dirty = False
        if self.pool.max_tasks is not None or self.pool.max_memory is not None:
            self.recycle(busy, job)
        return values

    def ring_lean(self, job, busy: list, call: Call, seq: int) -> tuple[int, int]:
        """Ring ``job``'s workers, spin and nap for their answer in one
        compiled call (``control.ring_and_wait``): (what it says, how many
        workers slept)."""
        for w in busy:
            w.rung = seq
        assert job.workers is not None  # placed: its workers are known
        return self.ctl.ring_and_wait(
            job.workers,
            job.key,
            self.pool.sent,
            call.steps,
            seq,
            self._spin_ns,
            self.output_seen,
            job.round_words,
            nap_budget(call.timeout),
        )

    def ring(self, w: WorkerProcess, job, seq: int, steps: int) -> None:
        w.rung = seq
        if self.ctl.ring(w.index, job.key, w.sent, steps, seq):
            w.wake()

    def check_interrupt(self, tally: tracked.Tally | None = None) -> None:
        """Something interrupted the wait: raise what ``should_stop`` says,
        if anything.  Cleared first, so an interruption after the check is
        seen next time."""
        self.ctl.clear_abort()
        self.wakeup.clear()
        exc = self._should_stop()
        if exc is not None:
            raise exc
        if tally is not None and tally.stream is not None and tally.stream.halted:
            self.ctl.stop()  # imap closed: no new chunks

    def unfinished(self, busy, seq: int) -> list[WorkerProcess]:
        return [w for w in busy if self.ctl.done(w.index) < seq]

    def replace_all(self, procs: list[WorkerProcess]) -> None:
        """Kill ``procs`` (waiting until each has exited) and start their
        replacements, unless closing."""
        seen = []
        for w in procs:
            if w.index in seen or self.pool.workers[w.index] is not w:
                continue
            seen.append(w.index)
            w.kill()
        if self.closing():
            return
        for index in seen:
            self.replace(index)

    def replace(self, index: int) -> WorkerProcess:
        """A new worker in place of ``index``; interruptible by close()."""
        return self.pool.replace(index, wake=self.wakeup, closing=self.closing)

    def crashed(self, dead: WorkerProcess, busy, seq: int, call: Call) -> BaseException:
        """A worker died mid-map: the map fails at once, and the workers
        still busy with its other chunks (maybe for hours) are replaced too."""
        exc = deaths.death_error(self.ctl, dead, call.job, call.job.plan.chunks)
        log.warning("%s", exc)
        self.replace_all(self.unfinished(busy, seq) + [dead])
        return exc

    def abandon(self, busy, seq: int) -> None:
        """The round ends early (interrupted, timed out, crashed, stopped):
        nothing of it may survive into the next round.  Messages it left
        unread are dropped later by their ring number."""
        self.dirty = True
        stuck = [w for w in self.unfinished(busy, seq) if self.pool.workers[w.index] is w]
        if stuck:
            self.replace_all(stuck)
        # A replacement started within the round and interrupted before it
        # said Ready (a Ctrl-C while it started) is waited for by the next
        # run's recover(); its Ready is no reply to a ring.
        self.dirty = not all(w.ready for w in self.pool.workers)


def nap_budget(timeout: float | None) -> int:
    """How long the driver naps on BELL (ns) before it sleeps on the pipes:
    ``control.NAP_BUDGET_NS``, or less for a shorter timeout."""
    if timeout is None:
        return control.NAP_BUDGET_NS
    return min(control.NAP_BUDGET_NS, int(timeout * 1e9))


class Round:
    """One ring of one job, from the ring to the values: waiting (a spin,
    then asleep on the pipes), reading messages of this ring, handling
    deaths and the timeout, and collecting."""

    def __init__(
        self,
        runner: Runner,
        busy: list[WorkerProcess],
        seq: int,
        call: Call,
        job,
        tally: tracked.Tally | None,
    ):
        self.runner = runner
        self.ctl = runner.ctl
        self.busy = busy
        self.seq = seq
        self.call = call
        self.job = job
        self.tally = tally
        self.chunks = job.plan.chunks if tally is None else tally.chunks
        # This ring's messages, by worker: how many were read, and those
        # not yet used (streamed values are used as they come).
        self.count: dict[int, int] = {}
        self.inbox: dict[int, list] = {}
        self.lost: list[WorkerProcess] = []  # set aside, in a tracked round
        # What each worker index runs in this round: (job, indices, chunks)
        # (a replacement in a tracked round may run a job of its own).
        self.assigned = {g[0]: (job, g[1], g[2]) for g in job.groups}

    # -- waiting ---------------------------------------------------------------

    def wait(self, state: int | None = None) -> list | None:
        """The values of this ring, once every busy worker is done.
        ``state``: what the lean path's spin and nap found
        (``control.ATTEND``: done, something to read; SPUN: not done, not
        napped; NAPPED: not done after the nap either; ABORTED), if it
        ran."""
        runner, call = self.runner, self.call
        policy = runner.pool.policy
        started = time.monotonic()
        if state == control.NAPPED:
            # The lean path napped its whole budget: that counts as waiting.
            started -= nap_budget(call.timeout) / 1e9
        if state == control.SPUN:
            # The workers slept when rung (or the lean path did not nap):
            # nap on the driver's doorbell, which the last worker to finish
            # rings (a futex call on each side), for a bounded time, before
            # sleeping on the pipes.
            assert self.job.workers is not None
            budget = nap_budget(call.timeout)
            state = self.ctl.nap_all(self.job.workers, self.seq, runner.output_seen, budget)
            if state == control.SPUN:
                state = control.NAPPED
        if state == control.QUIET:
            runner._quiet = True
            return self.collect()
        if state == control.ATTEND:
            return self.collect()
        if state == control.ABORTED:
            runner.check_interrupt(self.tally)
        # Asked-for progress shows even for a quick map, and streamed values
        # as they come: no spin then.  Nor after the lean path's spin.
        if (
            state is None
            and call.progress is not True
            and call.stream is None
            and policy.driver_spin > 0
        ):
            spin_until = time.monotonic() + policy.driver_spin
            while True:
                left = self.ctl.wait_done(self.job.done_at, self.seq, SPIN_ROUNDS)
                if left == 0:
                    return self.collect()
                if left < 0:
                    runner.check_interrupt(self.tally)
                elif time.monotonic() > spin_until:
                    break
        return self.sleep(started)

    def sleep(self, started: float) -> list | None:
        """Wait asleep: on the busy workers' pipes and sentinels and the
        wake-up.  The last worker to finish wakes us.  In a tracked round,
        a worker that dies or times out is set aside (``lose``), and
        replaced within the round if it should be (``tracked.respawn``)."""
        runner, ctl, call, seq = self.runner, self.ctl, self.call, self.seq
        deadline = None if call.timeout is None else started + call.timeout
        forwarder = runner.pool.forwarder
        progress = None
        mode = resolve_progress(call.progress)
        if mode is not False:
            progress = ChunkProgress(
                len(self.job.plan.chunks) * call.steps,
                mode,
                getattr(self.job.kernel, "__name__", "map"),
            )
        try:
            while True:
                poller, by_fd, output = self._poller(forwarder)
                ctl.sleeping(True)
                left = ctl.wait_done(self.job.done_at, seq, 1)
                if left == 0:
                    break
                if left < 0:
                    runner.check_interrupt(self.tally)
                    continue
                waits = []
                if deadline is not None:
                    now = time.monotonic()
                    if now >= deadline:
                        deadline = self._timed_out(deadline)
                        continue
                    waits.append(deadline - now)
                if progress is not None:
                    ahead = progress.wait()
                    waits.append(0.2 if ahead is None else ahead)
                # poll() takes at most 2**31-1 ms: a longer timeout is waited
                # for in slices.
                ms = -1 if not waits else min(max(1, int(min(waits) * 1000) + 1), 2**31 - 1)
                events = poller.poll(ms)
                ctl.sleeping(False)
                shown = [fd for fd, _ in events if fd in output]
                if shown:
                    forwarder.forward(shown)
                for fd, _ in events:
                    what = by_fd.get(fd)
                    if what is None:
                        continue  # output
                    w, is_sentinel = what
                    if w is None:
                        runner.check_interrupt(self.tally)
                    elif is_sentinel:
                        started = time.monotonic()
                        if self._died(w) and deadline is not None:
                            # Starting a worker is not the kernels' time.
                            deadline += time.monotonic() - started
                        break  # descriptors may have changed hands: poll anew
                    else:
                        self.read(w)
                if progress is not None:
                    progress.update_to(self._ran())
        finally:
            ctl.sleeping(False)
            if progress is not None:
                progress.update_to(self._ran())
                progress.close()
        return self.collect()

    def _poller(self, forwarder):
        poller = select.poll()
        wake = self.runner.wakeup.fileno()
        by_fd: dict[int, tuple[WorkerProcess | None, bool]] = {wake: (None, False)}
        poller.register(wake, select.POLLIN)
        for w in self.busy:
            if self.ctl.done(w.index) >= self.seq:
                continue
            for fd, is_sentinel in ((w.results.fileno(), False), (w.sentinel, True)):
                poller.register(fd, select.POLLIN)
                by_fd[fd] = (w, is_sentinel)
        output = set(forwarder.fds)  # what kernels print, shown as it comes
        for fd in output:
            poller.register(fd, select.POLLIN)
        return poller, by_fd, output

    def _ran(self) -> int:
        """Chunks of this ring done so far."""
        ctl = self.ctl
        return sum(ctl.ran(w.index) for w in self.busy if ctl.started(w.index) == self.seq)

    def _died(self, w: WorkerProcess) -> bool:
        """Worker ``w`` has exited (by its own process's word).  True if a
        replacement was started."""
        runner, ctl, seq = self.runner, self.ctl, self.seq
        if ctl.done(w.index) >= seq:
            return False  # finished, then died: collect reads it
        if ctl.started(w.index) < seq:
            # Dead before it took the ring (killed while idle): nothing ran,
            # so a fresh worker takes the same chunks.
            self.start(w)
            return True
        if self.tally is None:
            raise runner.crashed(w, self.busy, seq, self.call)
        exc = deaths.death_error(ctl, w, self.job, self.tally.chunks)
        log.warning("%s", exc)
        self.lose(w, exc)
        return tracked.respawn(self, w) is not None

    def start(self, dead: WorkerProcess) -> WorkerProcess:
        """A fresh worker in place of ``dead`` (confirmed dead), given what
        ``dead`` was assigned in this round and rung with it."""
        runner = self.runner
        # It must answer this ring: it starts as if it had answered the one
        # before.
        self.ctl.take_over(dead.index, self.seq - 1)
        runner.replace(dead.index)
        job, indices, chunks = self.assigned[dead.index]
        new = runner.holdings.provide(
            dead.index, job, self.call.args, indices, chunks, runner.wakeup, runner.closing
        )
        self.busy[self.busy.index(dead)] = new
        runner.ring(new, job, self.seq, self.call.steps)
        return new

    def _timed_out(self, deadline: float) -> float:
        """The timeout passed: an untracked round fails; a tracked one sets
        the late workers aside and goes on.  Returns the new deadline."""
        runner, tally, timeout = self.runner, self.tally, self.call.timeout
        assert timeout is not None  # there was a deadline
        late = runner.unfinished(self.busy, self.seq)
        if tally is None:
            exc = deaths.map_timeout(sorted(w.pid for w in late), timeout)
            log.warning("%s", exc)
            runner.replace_all(late)
            raise exc
        for w in late:
            w.kill()
            exc = deaths.chunk_timeout(self.ctl, w, timeout, tally.chunks)
            log.warning("%s", exc)
            self.lose(w, exc)
        return deadline

    # -- messages ----------------------------------------------------------------

    def read(self, w: WorkerProcess) -> None:
        """Read one frame that woke us from ``w``'s results pipe."""
        try:
            data = w.results.recv_bytes()
        except (EOFError, OSError):
            return  # dying: its sentinel will tell
        self._take(w, data)

    def _take(self, w: WorkerProcess, data: bytes) -> None:
        """File one frame: wake frames and other rings' messages go;
        streamed values are used at once."""
        if data == WAKE:
            return
        msg = decode(data)
        if msg.seq != self.seq:
            return  # left from an abandoned ring
        self.count[w.index] = self.count.get(w.index, 0) + 1
        tally = self.tally
        if tally is not None and tally.stream is not None and type(msg) is Values:
            tally.take(msg.indices, self._values(w, msg))
            return
        self.inbox.setdefault(w.index, []).append((w, msg))

    def lose(self, w: WorkerProcess, exc: BaseException) -> None:
        """Set aside dead worker ``w`` of a tracked round: use what it left
        in its pipe now (its descriptors are closed, and their numbers
        reused, when it is replaced), and wait for it no more."""
        try:
            while w.results.poll(0):
                self._take(w, w.results.recv_bytes())
        except (EOFError, OSError):
            pass
        self._use(w)
        self.lost.append(w)
        tally = self.tally
        assert tally is not None  # only tracked rounds go on without one
        tally.lost.append((w, exc))
        tally.lost_on[self.ctl.chunk(w.index)] = exc
        self.ctl.take_over(w.index, self.seq)

    def _values(self, w: WorkerProcess, msg: Values) -> tuple:
        """The values a Values message carries, unpickled here."""
        try:
            return pickle.loads(msg.payload)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit too: it is the value's
            raise deaths.unpicklable_value(w.pid, exc) from None

    def collect(self) -> list | None:
        """Every worker is done: read the rest of their replies, raise the
        earliest failing chunk's error, or return the values in chunk order.
        In a tracked round, the values and errors go to the tally."""
        ctl, job, tally = self.ctl, self.job, self.tally
        if not job.want_values and tally is None and not self.inbox:
            if all(ctl.replies(w.index) == 0 for w in self.busy):
                return None
        for w in self.busy:
            if w in self.lost:
                continue
            need = ctl.replies(w.index)
            try:
                while self.count.get(w.index, 0) < need:
                    self._take(w, w.recv_bytes())
            except (EOFError, OSError):
                if tally is None:
                    raise self.runner.crashed(w, self.busy, self.seq, self.call) from None
                self.lose(w, deaths.death_error(ctl, w, job, tally.chunks))
                continue
        problems = []
        values = [None] * len(job.plan.chunks) if job.want_values and tally is None else None
        for index in list(self.inbox):
            for w, msg in self.inbox.pop(index):
                problems += self._file(w, msg, values)
        if tally is not None:
            for index, exc in problems:
                if index < 0:
                    raise exc
                tally.fail(index, exc)
            return None
        if problems:
            raise min(problems, key=lambda p: p[0])[1]
        return values

    def _use(self, w: WorkerProcess) -> None:
        """File what ``w`` sent (a lost worker's, at once)."""
        problems = []
        for w_, msg in self.inbox.pop(w.index, []):
            problems += self._file(w_, msg, None)
        for index, exc in problems:
            if index >= 0:
                assert self.tally is not None  # lose(): tracked rounds only
                self.tally.fail(index, exc)

    def _file(self, w: WorkerProcess, msg, values: list | None) -> list:
        """Put one message's content where it belongs; the problems in it,
        as (chunk index, exception)."""
        if type(msg) is Failed:
            rows = self.chunks[msg.chunk] if 0 <= msg.chunk < len(self.chunks) else None
            return [(msg.chunk, deaths.remote_exception(msg, w.pid, rows))]
        try:
            got = self._values(w, msg)
        except Exception as exc:
            return [(-1 if self.tally is None else msg.indices[0], exc)]
        if self.tally is not None:
            self.tally.take(msg.indices, got)
        elif values is not None:
            for i, v in zip(msg.indices, got):
                values[i] = v
        return []
