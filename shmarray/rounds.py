"""Running one call on the pool: a round's steps, and the one place it
ends early.

How a map flows, and who owns what::

    caller thread                 driver (one thread at a time)          worker i
    -------------                 -----------------------------          --------
    Engine.map: check args  ----> the caller itself when the engine
    Engine.submit: check,         is idle, else the manager thread
      enqueue, return a           (dispatch.Dispatcher)
      Future at once                |
                                    | place: tasks pipe, rare or large
                                    | (holdings.Holdings):
                                    |  Install(kernel) Define(job)       -> kept by key
                                    |  Rebind(args) Release(blocks)      -> unmap
                                    |
                                    | ring: control block, every map
                                    | (control.ControlBlock):
                                    |  JOB, PIPED, then RING = seq   ~~> spinning: sees it
                                    |  (+ a wake frame if ASLEEP)        asleep: woken
                                    |                                    drains the pipe,
                                    |                                    runs its chunks
                                    |                                    in place
                                    | wait: spins on DONE, then    <~~  REPLY, DONE = seq
                                    |  naps on BELL (up to 20 ms),     (+ Values / Failed
                                    |  then sleeps on pipes +           of ring seq on the
                                    |  sentinels (Round.wait)           results pipe);
                                    |                                   rings BELL if the
                                    |                                   driver naps
                                    | collect: values in chunk order
                                    | settle (an early end): SIGKILL   x  killed mid-chunk
                                    |  every busy worker, then reap
    result or exception   <-------

A round's steps are ``Runner.round``'s: *place* (``Holdings.prepare``:
every worker the job uses holds it, its kernel and its arguments), *ring*,
*wait*, *collect* (``Round``), and *settle* (``Runner.settle``), the only
code that ends a round early, whatever ended it: a crash, the timeout,
Ctrl-C, ``stop()``, ``close()``, or an exception of the driver's own.  It
kills every worker of the round that has not finished, all of them first,
then waits until each has exited, so nothing of the round writes the
arrays once the caller has control; in the main thread, signals'
exceptions are held meanwhile (``shmarray.interrupts``).  The workers it
killed are replaced after it (``Runner.repair``) or by the next round's
place step.

The static schedule gives each worker its contiguous group of chunks, the
same rows every call; the dynamic schedule gives every worker the whole
list, and they take chunks one at a time from the shared counter.  What a
death, a timeout, a value or a failure means for the call is the round's
*policy*: ``FAIL_FAST`` (the first failure ends the call) or a tracked
call's ``tracked.Tally`` (``retries``, ``errors="collect"``, ``imap``),
which goes on without a lost worker and runs more rounds of its own.

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
from shmarray.errors import EngineClosedError, MapCancelledError
from shmarray.holdings import Holdings, Placement
from shmarray.interrupts import Interrupts
from shmarray.jobs import Call, JobCache
from shmarray.policy import FAIL_FAST, Policy
from shmarray.pool import Pool, WorkerProcess
from shmarray.progress import ChunkProgress, resolve as resolve_progress

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
# driver next sleeps or the engine closes).  The watchdog's liveness is
# checked as often, so one killed on its own is back within this long of
# the next map.
OUTPUT_POLL = 0.05


class Runner:
    """Runs calls on the pool, one at a time.  Called by the driver only,
    except ``interrupt``.

    A round's steps: *place* (every worker it uses holds the job and its
    arguments: ``Holdings``), *ring*, *wait*, *collect*; and, when it ends
    early (a crash, the timeout, Ctrl-C, ``stop()``, ``close()``, an
    exception of the driver's own), *settle*: the one place that ends a
    round early, which kills every worker still writing its arrays, and
    waits until they have exited, before anything is raised.
    """

    def __init__(self, pool: Pool, table, cache: JobCache, should_stop):
        self.pool = pool
        assert pool.ctl is not None  # a Pool is built whole or not at all
        self.ctl: control.ControlBlock = pool.ctl
        self.holdings = Holdings(pool, table, cache)
        self.interrupts = Interrupts(self.ctl, should_stop)
        # What the dispatcher's span of held signals gives what a handler
        # raised (bound once: every map of the main thread holds signals).
        self.catch = self.interrupts.catch
        # The workers' OUTPUT words added up when their pipes were last
        # drained (the lean path's cue to forward), and when a pipe was last
        # polled for output the words do not count (C code writing to the
        # descriptors itself).
        self.output_seen = 0
        self._polled = 0.0
        self._quiet = False  # the last round ended QUIET: no output came
        self._spin_ns = int(pool.policy.driver_spin * 1e9)
        self._share_spin_ns = int(pool.policy.share_spin * 1e9)

    # -- from any thread ---------------------------------------------------------

    def interrupt(self) -> None:
        """Wake the driver wherever it waits (``Interrupts.interrupt``)."""
        self.interrupts.interrupt()

    def close(self) -> None:
        self.interrupts.close()

    forget_in_child = close  # the wake-up is this process's own

    # -- the driver ----------------------------------------------------------------

    def begin(self) -> None:
        """The calling thread takes the driver's role (``Dispatcher``,
        under its lock).  Nothing a held signal raised is left by then:
        the call that caught it took it as it gave the role back
        (``Dispatcher._let_go``), under the same lock.  (Before, a call
        left it here for the next one to forget: a burst of 2000 Ctrl-C
        50 us apart made the program's next map raise the one before's
        KeyboardInterrupt, and another thread's map, taking the role in
        between, forgot one that was the main thread's.)"""
        self.interrupts.caught = None

    def run(self, call: Call, quiet: Callable[[], None] | None = None) -> Any:
        """Run ``call``: its values in chunk order (reduce) or None; for a
        tracked call, its Tally.

        Raises the earliest failing chunk's exception, WorkerCrashedError,
        TaskTimeoutError, or the interruption's reason.  Whatever it
        raises, no worker of the call is running any more: ``quiet`` (if
        given) is called at that point, before a worker is replaced.  In
        the main thread, the dispatcher holds the SIGINT and SIGTERM
        handlers' exceptions around it (``Dispatcher.run``): what they
        raise ends the round (``catch``) and is raised here once it is
        settled.  What the workers printed is forwarded before it returns.
        """
        try:
            job = call.job
            values = tracked.run(self, call) if job.tracked else self.round(call, job)
            failure = None
        except BaseException as exc:
            failure = exc
        # Here every worker of the call has finished, or is dead.
        if quiet is not None:
            quiet()
        if failure is None and self.interrupts.caught is None:
            # (The lean path's round came back QUIET: nothing printed, unless
            # C code wrote to a pipe itself, polled every OUTPUT_POLL.)
            if (
                not self._quiet
                or self.pool.forwarder._begun
                or time.monotonic() - self._polled > OUTPUT_POLL
            ):
                self._forward()
            return values
        caught = self.interrupts.take_caught()
        if caught is not None:
            if failure is not None and failure is not caught:
                caught.__context__ = failure
            failure = caught
        self._forward()
        if caught is None:
            self.repair()
        assert failure is not None  # else it returned above
        raise failure

    def repair(self) -> None:
        """After a round ended early: replace the workers it killed now,
        unless the engine is closing (or a Ctrl-C came: then the next
        round's place step does it)."""
        if self.pool.intact or self.interrupts.closing():
            return
        try:
            self.pool.recover(self.interrupts)
        except (EngineClosedError, MapCancelledError):
            pass  # closed or stopped meanwhile: the next round repairs
        except Exception as exc:  # the call's own error matters more
            log.warning("could not replace the workers of a map that ended early: %r", exc)

    def _forward(self) -> None:
        """Forward what the workers printed, before the call returns: when
        the control block says there is some (every Python-level write is
        counted there), a line is begun, or, at most every OUTPUT_POLL
        seconds, when a pipe holds some (written by C code).  As often,
        the watchdog's liveness is checked (a poll of its pidfd costs
        0.36 us: too much for every map of a loop)."""
        forwarder = self.pool.forwarder
        now = time.monotonic()
        due = now - self._polled > OUTPUT_POLL
        if self._quiet and not due and not forwarder._begun:
            return
        if due:
            self._polled = now
            watchdog = self.pool.watchdog
            if watchdog is not None:
                watchdog.check()
        if (
            forwarder.begun
            or (not self._quiet and self.ctl.output() != self.output_seen)
            or (due and forwarder.pending())
        ):
            forwarder.drain()
            self.output_seen = self.ctl.output()

    def tidy(self) -> None:
        self.holdings.tidy()

    def round(self, call: Call, job, policy: Policy | None = None) -> list | None:
        """One ring of ``job`` on its workers: place, ring, wait, collect;
        settle if it ends early.  ``policy``: what a failure means
        (``FAIL_FAST`` when None, a tracked call's ``tracked.Tally``).

        A repeat of a job every worker holds, with nothing pending, is
        rung by the lean path (``ring_lean``): one compiled call that
        rings, spins and naps, and no Python after it unless it found
        something to read.  The driver of a loop of large maps runs on a
        cache the kernel has just flushed, where every line of Python it
        runs costs a miss or two.
        """
        pool, holdings = self.pool, self.holdings
        if policy is None:
            policy = FAIL_FAST
            lean = (
                call.progress is not True
                and not (job.dynamic and job.boundary is not None)  # the caller fills ghosts
            )
        else:
            lean = False
        placed = holdings.ready(job, call.args) if pool.intact else None
        if (
            lean
            and placed is not None
            and job.cached
            and time.monotonic() - self._polled <= OUTPUT_POLL
        ):
            # Nothing to place, nothing to fill, nothing to reset.
            busy = placed.busy
            seq = pool.next_seq()
            try:
                state, asleep = self.ring_lean(placed, call, seq)
                if state == control.QUIET and not asleep:
                    self._quiet = True
                    values = None
                else:
                    self._quiet = False
                    values = self._finish(call, job, placed, list(busy), seq, state, asleep)
            except BaseException:
                self.settle(busy, seq)
                raise
            if pool.max_tasks is not None or pool.max_memory is not None:
                pool.recycle(busy, job.dynamic, self.interrupts)
            return values
        self._quiet = False
        # place
        if placed is None:
            if not pool.intact:
                pool.recover(self.interrupts)
            placed = holdings.prepare(job, call.args, self.interrupts)
        busy = list(placed.busy)
        seq = pool.next_seq()
        if (job.dynamic or job.tracked) and job.boundary is not None and job.indices is None:
            # Chunks with no fixed owners to fill ghosts next to (or that
            # may run again elsewhere): the caller fills them (copies of the
            # surface only).
            for a in call.arrays:
                boundary.fill(a, job.halo, job.boundary, job.axis)
        if job.round_words and not lean:
            # Every worker of the last round is done or dead: see the
            # invariants in shmarray.control.
            self.ctl.new_round(halted=call.stream is not None and call.stream.halted)
        # ring, wait, collect
        try:
            if lean:
                state, asleep = self.ring_lean(placed, call, seq)
                values = self._finish(call, job, placed, busy, seq, state, asleep)
            else:
                for w in busy:
                    self.ring(w, job, seq, call.steps)
                if job.share is not None:
                    run_share(call)
                values = Round(self, placed, busy, seq, call, job, policy).wait()
        except BaseException:
            self.settle(busy, seq)
            raise
        finally:
            if not job.cached:
                holdings.cache.forgotten.append(job.key)
        if pool.max_tasks is not None or pool.max_memory is not None:
            pool.recycle(busy, job.dynamic, self.interrupts)
        return values

    def _finish(
        self, call: Call, job, placed: Placement, busy: list, seq: int, state: int, asleep: int
    ) -> list | None:
        """What the lean path's compiled call left to do: wake the workers
        that slept when rung, wait for them, collect."""
        if asleep:
            for w in busy:
                if self.ctl.asleep(w.index):
                    w.wake()
        elif state == control.QUIET:
            self._quiet = True
            return None
        return Round(self, placed, busy, seq, call, job, FAIL_FAST).wait(state)

    def ring_lean(self, placed: Placement, call: Call, seq: int) -> tuple[int, int]:
        """Ring the job's workers, spin and nap for their answer in one
        compiled call (``control.ring_and_wait``): (what it says, how many
        workers slept)."""
        for w in placed.busy:
            w.rung = seq
        job = call.job
        if job.share is not None:
            # prepare(in_caller=True): ring, run the caller's share, wait.
            ctl = self.ctl
            if ctl.ring_all(
                placed.workers, job.key, self.pool.sent, call.steps, seq, job.round_words
            ):
                for w in placed.busy:
                    if ctl.asleep(w.index):
                        w.wake()
            run_share(call)
            state = ctl.await_all(
                placed.workers,
                seq,
                self._share_spin_ns,
                self.output_seen,
                nap_budget(call.timeout),
            )
            return state, 0
        return self.ctl.ring_and_wait(
            placed.workers,
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

    def unfinished(self, busy, seq: int) -> list[WorkerProcess]:
        return [w for w in busy if self.ctl.done(w.index) < seq]

    def replace_all(self, procs: list[WorkerProcess]) -> None:
        """Kill ``procs`` (all first, then wait for each to exit) and start
        their replacements, unless closing."""
        self.pool.kill(procs)
        if not self.interrupts.closing():
            self.pool.recover(self.interrupts)

    def settle(self, busy: list[WorkerProcess], seq: int) -> None:
        """The round of ring ``seq`` ends early (interrupted, timed out,
        crashed, stopped, or the driver raised): kill every worker of it
        that has not finished, all of them first, then wait until each has
        exited, so nothing of it writes the arrays once the caller has
        control.  Replacements wait for ``repair`` or the next round's
        place step.  Messages the round left unread are dropped later by
        their ring number.

        Never raises, and is never cut short: in the main thread, signals'
        exceptions are held until the call returns (``Runner.run``), and no
        other thread can raise here."""
        try:
            writers = [
                w
                for w in busy
                if self.pool.workers[w.index] is w
                and not w.killed
                and self.ctl.done(w.index) < seq
            ]
            if writers:
                self.pool.kill(writers)
            elif not all(w.ready for w in self.pool.workers):
                # A replacement started within the round and interrupted
                # before it said Ready (Ctrl-C while it started): the next
                # place step waits for it; its Ready is no reply to a ring.
                self.pool.intact = False
        except BaseException as exc:  # a bug: never hide the round's own error
            self.pool.intact = False
            log.error("settling an interrupted map failed: %r", exc)


def run_share(call: Call) -> None:
    """The chunks the caller runs itself (``prepare(in_caller=True)``),
    between the ring and the wait: in this process, so with no timeout and
    no isolation.  A kernel's exception keeps its type, with a note naming
    its rows; the round then settles as any early end does."""
    kernel, share = call.job.kernel, call.job.share
    assert share is not None  # (worker, chunk indices, chunks)
    chunks = share[2]
    for k, c in enumerate(call.share):
        try:
            kernel(*c)
        except Exception as exc:
            lo, hi = chunks[k]
            exc.add_note(
                f"raised by the kernel in the calling process (in_caller=True) on rows {lo}:{hi}"
            )
            raise


def nap_budget(timeout: float | None) -> int:
    """How long the driver naps on BELL (ns) before it sleeps on the pipes:
    ``control.NAP_BUDGET_NS``, or less for a shorter timeout."""
    if timeout is None:
        return control.NAP_BUDGET_NS
    return min(control.NAP_BUDGET_NS, int(timeout * 1e9))


class Round:
    """One ring of one job, from the ring to the values: waiting (a spin,
    then asleep on the pipes), reading messages of this ring, seeing
    deaths and the timeout (which the policy judges), and collecting."""

    def __init__(
        self,
        runner: Runner,
        placed: Placement,
        busy: list[WorkerProcess],
        seq: int,
        call: Call,
        job,
        policy: Policy,
    ):
        self.runner = runner
        self.ctl = runner.ctl
        self.placed = placed
        self.busy = busy  # settle reads it: replacements are put in here
        self.seq = seq
        self.call = call
        self.job = job
        self.policy = policy
        self.chunks = job.plan.chunks if policy.chunks is None else policy.chunks
        # This ring's messages, by worker: how many were read, and those
        # not yet used (streamed values are used as they come).
        self.count: dict[int, int] = {}
        self.inbox: dict[int, list] = {}
        self.lost: list[WorkerProcess] = []  # set aside, in a tracked round
        # What each worker index runs in this round: (job, indices, chunks)
        # (a replacement in a tracked round may run a job of its own).
        self.assigned = {g[0]: (job, g[1], g[2]) for g in placed.groups}

    def check_interrupt(self) -> None:
        """Something interrupted the wait: raise its reason, if any
        (``Interrupts.check``); else the policy's say (a closed imap
        stream takes no new chunks)."""
        self.runner.interrupts.check()
        self.policy.interrupted(self.ctl)

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
            budget = nap_budget(call.timeout)
            state = self.ctl.nap_all(self.placed.workers, self.seq, runner.output_seen, budget)
            if state == control.SPUN:
                state = control.NAPPED
        if state == control.QUIET:
            runner._quiet = True
            return self.collect()
        if state == control.ATTEND:
            return self.collect()
        if state == control.ABORTED:
            self.check_interrupt()
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
                left = self.ctl.wait_done(self.placed.done_at, self.seq, SPIN_ROUNDS)
                if left == 0:
                    return self.collect()
                if left < 0:
                    self.check_interrupt()
                elif time.monotonic() > spin_until:
                    break
        return self.sleep(started)

    def sleep(self, started: float) -> list | None:
        """Wait asleep: on the busy workers' pipes and sentinels and the
        wake-up.  The last worker to finish wakes us.  A worker that dies
        or times out is the policy's to judge (``Policy.died``,
        ``Policy.timed_out``)."""
        runner, ctl, call, seq = self.runner, self.ctl, self.call, self.seq
        deadline = None if call.timeout is None else started + call.timeout
        forwarder = runner.pool.forwarder
        progress = None
        mode = resolve_progress(call.progress)
        if mode is not False:
            name = getattr(self.job.kernel, "__name__", "map")
            n = len(self.job.plan.chunks)
            progress = (
                ChunkProgress(call.steps, mode, name, unit="step", per=n)
                if self.job.iterated
                else ChunkProgress(n * call.steps, mode, name)
            )
        try:
            while True:
                poller, by_fd, output = self._poller(forwarder)
                ctl.sleeping(True)
                left = ctl.wait_done(self.placed.done_at, seq, 1)
                if left == 0:
                    break
                if left < 0:
                    self.check_interrupt()
                    continue
                waits = []
                if deadline is not None:
                    now = time.monotonic()
                    if now >= deadline:
                        self.policy.timed_out(self, runner.unfinished(self.busy, seq))
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
                        self.check_interrupt()
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
        wake = self.runner.interrupts.fileno()
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
        ctl, seq = self.ctl, self.seq
        if ctl.done(w.index) >= seq:
            return False  # finished, then died: collect reads it
        if ctl.started(w.index) < seq:
            # Dead before it took the ring (killed while idle): nothing ran,
            # so a fresh worker takes the same chunks.
            self.start(w)
            return True
        return self.policy.died(self, w)

    def restart(self, dead: WorkerProcess, indices: list[int] | None = None) -> WorkerProcess:
        """A fresh worker in place of ``dead`` (confirmed dead), rung in
        this round: with what ``dead`` was assigned, or, given
        ``indices``, with those chunks of it alone (a job of its own, for
        this call only)."""
        if indices is not None:
            holdings = self.runner.holdings
            rerun = self.job.retry(holdings.cache.new_key(), indices, dynamic=False)
            holdings.cache.forgotten.append(rerun.key)
            self.assigned[dead.index] = (rerun, rerun.indices, rerun.plan.chunks)
        return self.start(dead)

    def assignment(self, index: int) -> tuple[int, ...]:
        """The chunk indices (in the whole map) worker ``index`` runs in
        this round."""
        return self.assigned[index][1]

    def start(self, dead: WorkerProcess) -> WorkerProcess:
        """A fresh worker in place of ``dead`` (confirmed dead), given what
        ``dead`` was assigned in this round and rung with it."""
        runner = self.runner
        # It must answer this ring: it starts as if it had answered the one
        # before.
        self.ctl.take_over(dead.index, self.seq - 1)
        runner.pool.replace(dead.index, stop=runner.interrupts)
        job, indices, chunks = self.assigned[dead.index]
        new = runner.holdings.provide(
            dead.index,
            job,
            self.call.args,
            indices,
            chunks,
            runner.interrupts,
            ((dead.index, indices, chunks),),
        )
        self.busy[self.busy.index(dead)] = new
        runner.ring(new, job, self.seq, self.call.steps)
        return new

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
        if type(msg) is Values and self.call.stream is not None:
            self.policy.took(msg.indices, self._values(w, msg))
            return
        self.inbox.setdefault(w.index, []).append((w, msg))

    def lose(self, w: WorkerProcess) -> list:
        """Set aside dead worker ``w`` (for a policy that goes on without
        it): read what it left in its pipe now (its descriptors are closed,
        and their numbers reused, when it is replaced), and wait for it no
        more.  The problems in what it sent, as ``_file`` gives them."""
        try:
            while w.results.poll(0):
                self._take(w, w.results.recv_bytes())
        except (EOFError, OSError):
            pass
        problems = []
        for w_, msg in self.inbox.pop(w.index, []):
            problems += self._file(w_, msg, None)
        self.lost.append(w)
        self.ctl.take_over(w.index, self.seq)
        return problems

    def _values(self, w: WorkerProcess, msg: Values) -> tuple:
        """The values a Values message carries, unpickled here."""
        try:
            return pickle.loads(msg.payload)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit too: it is the value's
            raise deaths.unpicklable_value(w.pid, exc) from None

    def collect(self) -> list | None:
        """Every worker is done: read the rest of their replies, and give
        the problems and the values in chunk order to the policy."""
        ctl, job, policy = self.ctl, self.job, self.policy
        if not job.want_values and policy is FAIL_FAST and not self.inbox:
            if all(ctl.replies(w.index) == 0 for w in self.busy):
                return None
        problems = []
        for w in list(self.busy):
            if w in self.lost:
                continue
            need = ctl.replies(w.index)
            try:
                while self.count.get(w.index, 0) < need:
                    self._take(w, w.recv_bytes())
            except (EOFError, OSError):
                policy.died(self, w, respawn=False)  # raises, or goes on without it
                continue
        values = [None] * len(job.plan.chunks) if job.want_values and policy is FAIL_FAST else None
        for index in list(self.inbox):
            for w, msg in self.inbox.pop(index):
                problems += self._file(w, msg, values)
        return policy.filed(problems, values)

    def _file(self, w: WorkerProcess, msg, values: list | None) -> list:
        """Put one message's content where it belongs; the problems in it,
        as (chunk index, exception)."""
        if type(msg) is Failed:
            rows = self.chunks[msg.chunk] if 0 <= msg.chunk < len(self.chunks) else None
            return [(msg.chunk, deaths.remote_exception(msg, w.pid, rows))]
        try:
            got = self._values(w, msg)
        except Exception as exc:
            return [(-1 if self.policy is FAIL_FAST else msg.indices[0], exc)]
        if values is not None:
            for i, v in zip(msg.indices, got):
                values[i] = v
        else:
            self.policy.took(msg.indices, got)
        return []
