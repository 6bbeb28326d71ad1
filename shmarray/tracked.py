"""Tracked calls: ``retries``, ``errors="collect"`` and ``imap``.

A tracked call keeps each chunk's state on the control block's board
(PENDING, RUNNING, FINISHED, FAILED), so when a worker dies or times out,
only the chunk it was running is lost.  It runs in rounds: the first as
planned, in which a crashed worker is replaced at once (``respawn``); then,
while chunks are left that never ran, whose value was lost, or whose worker
crashed or timed out (fewer than ``retries`` times), a dynamic round of
just those.  A kernel's own exception is final.

A chunk's outcome is decided once, in this order: a value received means
it finished (a worker streams a value before it marks the chunk, and may
die in between); a kernel's exception means it failed; otherwise the board
says what became of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shmarray import control, deaths
from shmarray.errors import MapReport, WorkerCrashedError
from shmarray.jobs import Call
from shmarray.policy import Policy, log

if TYPE_CHECKING:
    from shmarray.pool import WorkerProcess
    from shmarray.rounds import Round, Runner


def combined(combine, values: list) -> Any:
    result = values[0]
    for v in values[1:]:
        result = combine(result, v)
    return result


class Tally(Policy):
    """A tracked call's chunks, across the rounds that run them: values and
    failures by chunk index, attempts of the chunks whose worker died or
    timed out, and, for the round running, the workers lost in it.  Each
    of its rounds' policy: a lost worker costs the call only its chunk."""

    chunks: tuple  # the whole map's, which every round's messages index

    def __init__(self, call: Call):
        self.chunks = call.job.plan.chunks
        self.values: dict[int, Any] = {}
        self.failed: dict[int, BaseException] = {}
        self.attempts: dict[int, int] = {}
        self.retried: set[int] = set()
        self.lost: list[tuple[WorkerProcess, BaseException]] = []
        self.lost_on: dict[int, BaseException] = {}  # chunk -> why its worker was lost
        self.stream = call.stream

    # -- the round's policy ----------------------------------------------------

    def died(self, rnd: Round, w: WorkerProcess, respawn: bool = True) -> bool:
        exc = deaths.death_error(rnd.ctl, w, rnd.placed.groups, self.chunks)
        log.warning("%s", exc)
        self._lose(rnd, w, exc)
        return respawn and self.respawn(rnd, w) is not None

    def timed_out(self, rnd: Round, late: list[WorkerProcess]) -> None:
        timeout = rnd.call.timeout
        assert timeout is not None  # there was a deadline
        rnd.runner.pool.kill(late)  # all of them first
        for w in late:
            exc = deaths.chunk_timeout(rnd.ctl, w, timeout, self.chunks)
            log.warning("%s", exc)
            self._lose(rnd, w, exc)

    def took(self, indices: tuple, values: tuple) -> None:
        self.take(indices, values)

    def filed(self, problems: list, values: list | None) -> None:
        for index, exc in problems:
            if index < 0:
                raise exc
            self.fail(index, exc)
        return None

    def interrupted(self, ctl) -> None:
        if self.stream is not None and self.stream.halted:
            ctl.stop()  # imap closed: no new chunks

    def _lose(self, rnd: Round, w: WorkerProcess, exc: BaseException) -> None:
        """The round goes on without dead worker ``w``: what it sent
        counts, its chunk is noted lost (``exc``: why)."""
        chunk = rnd.ctl.chunk(w.index)
        for index, problem in rnd.lose(w):
            if index >= 0:
                self.fail(index, problem)
        self.lost.append((w, exc))
        self.lost_on[chunk] = exc

    def respawn(self, rnd: Round, dead: WorkerProcess) -> WorkerProcess | None:
        """The round lost ``dead`` (confirmed dead) to a crash: settle the
        chunk it was running (one attempt more: run again, or failed for
        good), and unless the call must stop now, start a fresh worker in
        its place and ring it in this same round, so the round goes on with
        every worker: with the same job under the dynamic schedule (it
        takes chunks from the shared counter), with the dead worker's
        unfinished chunks under the static one.  None if nobody was
        started."""
        ctl, call = rnd.ctl, rnd.call
        k = ctl.chunk(dead.index)
        if k < 0:
            return None  # died loading the kernel: a new one would too
        if k not in self.values and ctl.board_state(k) == control.RUNNING:
            if self.attempt(k, call.retries, self.lost[-1][1]):
                ctl.board_set(k, control.PENDING)
            else:
                ctl.board_set(k, control.FAILED)
        if (k in self.failed and not call.collect) or (
            self.stream is not None and self.stream.halted
        ):
            ctl.stop()  # raise now: start nothing new
            return None
        if rnd.job.dynamic:
            return rnd.restart(dead)
        indices = [
            i
            for i in rnd.assignment(dead.index)
            if i not in self.values and ctl.board_state(i) == control.PENDING
        ]
        if not indices:
            return None
        return rnd.restart(dead, indices)  # its own rows: others may rerun too

    # -- the call's chunks -----------------------------------------------------

    def take(self, indices, values) -> None:
        """Values arrived: those chunks finished, for good."""
        for i, v in zip(indices, values):
            if i not in self.values:
                self.values[i] = v
                self.failed.pop(i, None)
                if self.stream is not None:
                    self.stream.put(self.chunks[i], v)

    def fail(self, i: int, exc: BaseException) -> None:
        """Chunk ``i`` failed for good (unless a value came for it)."""
        if i not in self.values:
            self.failed.setdefault(i, exc)

    def final(self, i: int, retries: int, exc: BaseException) -> BaseException:
        """``exc``, noted as chunk ``i``'s last attempt when there were more."""
        if retries:
            lo, hi = self.chunks[i]
            exc.add_note(f"rows {lo}:{hi} failed {self.attempts[i]} times (retries={retries})")
        return exc

    def attempt(self, i: int, retries: int, why: BaseException | None) -> bool:
        """Chunk ``i``'s worker was lost on it: one attempt more.  True if it
        may run again; else it failed for good."""
        self.attempts[i] = self.attempts.get(i, 0) + 1
        if self.attempts[i] <= retries:
            return True
        if why is None:
            lo, hi = self.chunks[i]
            why = WorkerCrashedError(
                f"the worker running rows {lo}:{hi} was lost", pid=0, exitcode=None, rows=(lo, hi)
            )
        self.fail(i, self.final(i, retries, why))
        return False

    def finish(self, call: Call) -> Any:
        failed = [(self.chunks[i], self.failed[i]) for i in sorted(self.failed)]
        value = None
        if call.combine is not None and self.values:
            value = combined(call.combine, [self.values[i] for i in sorted(self.values)])
        if not call.collect:
            if failed:
                raise failed[0][1]
            return value
        return MapReport(
            failed, [self.chunks[i] for i in sorted(self.retried)], value, len(self.chunks)
        )


def run(runner: Runner, call: Call) -> Tally:
    """Run a tracked call in rounds (see the module docstring).  Stops early
    when failures are not collected and one is final, or when the imap
    stream is closed."""
    job = call.job
    ctl = runner.ctl
    tally = Tally(call)
    n = len(job.plan.chunks)
    todo = list(range(n))
    round_job = job
    while todo:
        # Between rounds: every worker of the last one is done or dead.
        ctl.board_set(range(n) if round_job is job else todo, control.PENDING)
        tally.lost = []
        tally.lost_on = {}
        runner.round(call, round_job, tally)
        if (
            round_job is job
            and not tally.lost
            and not tally.failed
            and (not job.want_values or len(tally.values) == n)
            and ctl.board_all(n, control.FINISHED)
        ):
            break  # the usual case: every chunk finished
        lost_on = tally.lost_on
        runner.replace_all([w for w, _ in tally.lost])
        # A worker lost on a chunk made progress too: an attempt counted.
        again, progress = [], any(k >= 0 for k in lost_on)
        for i in todo:
            if i in tally.values:
                progress = True
                if i in tally.attempts:
                    tally.retried.add(i)
                continue
            if i in tally.failed:
                progress = True
                continue
            state = ctl.board_state(i)
            if state == control.FINISHED and not job.want_values:
                progress = True
                if i in tally.attempts:
                    tally.retried.add(i)
            elif state == control.RUNNING:
                progress = True
                if tally.attempt(i, call.retries, lost_on.get(i)):
                    again.append(i)
            else:
                again.append(i)  # never taken, or its value lost
        if call.stream is not None and call.stream.halted:
            break
        if tally.failed and not call.collect:
            break
        if again and not progress:
            # Nothing ran: every worker died before its first chunk (loading
            # the kernel or the arguments).  Trying again would do the same.
            exc = (
                tally.lost[0][1]
                if tally.lost
                else WorkerCrashedError("no chunk could run", pid=0, exitcode=None, rows=None)
            )
            for i in again:
                tally.fail(i, exc)
            break
        todo = again
        if todo:
            round_job = job.retry(runner.holdings.cache.new_key(), todo)
    return tally
