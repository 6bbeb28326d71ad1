"""The control block: a few cache lines of shared memory through which the
coordinator rings its workers and they answer, without a pipe or a pickle.

Why: a map that went through pipes cost 110-180 us with 2 workers, most of
it waking a sleeping process (about 100 us in a VM) and pickling.  A worker
that has just finished a map spins on its *ring* word for a while (the wait
policy, ``shmarray.waiting``), so the next map reaches it in about a
microsecond; the coordinator spins on the *done* words briefly, then sleeps
until the last worker wakes it.  Pipes stay for what is rare or large:
kernels, job definitions, reduce values, errors, and the wake-ups of
sleepers.

This module is the only one that touches the block's memory, through the
primitives of ``shmarray.atomics`` (what each guarantees is written
there).  The coordinator's side is :class:`ControlBlock`, a worker's is
:class:`WorkerWords`; both are thin names over the compiled functions
below, which compiled hot paths may call directly.

Protocol
========

Layout, in int64 words, a 128-byte line (``LINE`` words) at a time, and
who writes each line.  The words a process spins on sit on lines that one
party writes: a worker's RING on its line a, written by the coordinator
alone, and its DONE and STEP on its line b, written by worker i alone; so
a spinner's line changes only when the write it waits for lands::

    line 0      COORD_ASLEEP, WORKERS             the coordinator (WORKERS
                                                  once, at creation)
    line 1      NEXT, STOP                        the workers of a round, and
                                                  the coordinator (see STOP)
    line 2      ABORT, BELL                       whoever wakes the driver:
                                                  any coordinator thread, and
                                                  workers (BELL only)
    line 3      SLEEPERS                          workers asleep on a STEP word
    worker i:
      line a    RING, JOB, PIPED, STEPS           the coordinator
      line b    DONE, REPLY, ASLEEP, CHUNK,       worker i (the coordinator
                CHUNKS, BUSY_NS, STARTED, RAN,    once worker i is dead)
                STEP, OUTPUT, SERVED
    board       one byte per chunk of a tracked   workers of a round
                map                               (coordinator between rounds,
                                                  and for a dead worker's chunk)

Lines 1 and 2 have several writers, on purpose:

* Line 1: NEXT is the dynamic schedule's shared counter, so every worker of
  a dynamic round writes it; STOP sits beside it because a worker reads
  both to take a chunk.  A worker that waits for a neighbour's STEP word
  polls STOP too, but only a static round waits for neighbours, and NEXT
  moves only in dynamic ones.
* Line 2: ABORT and BELL have one reader, the driver, and every write to
  either but the driver's own (clearing ABORT) is meant to wake it.  Sharing
  a line is safe: atomicity and order are per word, whatever line it is on;
  a line is only a matter of speed.  And it costs next to nothing: the
  driver spins on ABORT (``wait_all``, ``wait_done``) only while it does not
  nap, and a worker rings BELL only after it saw the driver napping
  (COORD_ASLEEP = COORD_NAPS: ``_answer``), so under a spinning driver the
  line changes for an abort, which is what it spins for (or once, for a ring
  decided just before a nap ended).  While the driver naps, the bump on BELL
  is its wake-up.  Each bump moves the line to the ringer and back, which
  the driver's next look at BELL costs anyway; ``abort`` bumps BELL as well
  as setting ABORT, so one call reaches a driver that spins or naps.  BELL
  on a line of its own would save nothing (the driver reads both words in
  every nap slice) and would move every worker's lines.

Who writes what, and who reads it:

=============  ==========================================  =====================
word           meaning                                     read by
=============  ==========================================  =====================
RING           the last ring given: a sequence number,     worker i; every
               strictly increasing (``Pool.seq``)          worker (``_answer``:
                                                           who was rung)
JOB, PIPED,    the job key (0: just read the pipe), pipe   worker i, once RING
STEPS          messages sent before this ring, steps       has changed
DONE           the last ring finished                      coordinator; every
                                                           worker (``_answer``)
REPLY          messages on the results pipe for ring DONE  coordinator
ASLEEP         worker i sleeps on its task pipe            coordinator (ring)
CHUNK          the chunk it runs (-1: loading the job)     coordinator (deaths)
STARTED, RAN   the last ring taken; chunks of it done      coordinator
CHUNKS,        totals for the process's life, bumped by    coordinator (plain
BUSY_NS,       worker i's main thread alone: chunks run,   loads: ``stats``,
SERVED         ns busy, rings its compiled loop served     recycling)
               (``serve``)
STEP           ``step_word(ring, stage)``: stages of an    its neighbours
               iterated or ghost-filling job done
OUTPUT         writes to its stdout/stderr pipes so far:   coordinator (forward)
               a fetch-and-add, as any thread of worker i
               may write
NEXT           the next dynamic chunk (fetch-and-add); 0   workers of the round
               from each round's reset
STOP           stop taking chunks.  Cleared only between   workers of the round
               rounds; within one only ever set to 1, at
               any time, by anyone of the round: a worker
               whose chunk failed, the coordinator when
               an ``imap`` stream is closed or a tracked
               round must start nothing new
COORD_ASLEEP   the coordinator sleeps: 1 on the pipes (a   workers (finish,
               worker wakes it there), 2 on BELL (the      serve)
               last worker of the ring to finish rings
               BELL: ``_answer``)
WORKERS        the pool's size, written at creation        workers (``_answer``)
ABORT          interrupt the driver's spin (close, stop):  the driver
               set by any coordinator thread, cleared by
               the driver once it has looked
BELL           the driver's doorbell: bumped, then woken   the driver (futex)
               (futex), by the last worker of a ring to
               finish while the driver naps on it, or by
               ``abort``
SLEEPERS       workers asleep on some STEP word            workers (publish)
board[k]       PENDING, RUNNING, FINISHED or FAILED        coordinator
=============  ==========================================  =====================

The one publishing rule: **every access to a word, or to a board byte, is a
sequentially consistent atomic load, store or fetch-and-add**, so the order
in which one process writes is the order in which every other sees, on
weakly ordered CPUs (ARM) too.  A counter that several threads or
processes bump (NEXT, BELL, SLEEPERS, OUTPUT) moves only by fetch-and-add;
a flag that several set (STOP, ABORT) needs only stores; a counter with
one writing thread (CHUNKS, BUSY_NS, SERVED) may move by a load and a
store.  The one exception: the coordinator reads those with plain loads,
for statistics; they order nothing.  The protocol's functions are compiled
once, at import, with ``cache=True``; ``serve``, which calls a user's
kernel, is compiled in each worker for that kernel.

Invariants:

* No ABA.  RING, DONE and STARTED only grow, and a STEP word orders rings
  before stages, so an old value is never mistaken for a new one.  A new
  worker starts with RING = DONE = its predecessor's DONE: idle, and a ring
  its predecessor never took may be given again.
* NEXT, STOP and the board are reset only between rounds: when every worker
  of the previous round has finished it (DONE >= its ring) or is dead (its
  process is gone: see ``launch.Child``).  A killed worker may still be
  running until then, so a dead worker's line, and its chunk on the board,
  are written by the coordinator only after its death is confirmed.
* STOP, once set, stays set until the next round's reset (which sets it
  again for a round of an ``imap`` stream already closed): nobody clears it
  within a round, so a worker that looks after it was set sees it.  A
  worker sets it before its DONE store, so that reset always comes after.
* A dead worker leaves its line as it was: CHUNK says which chunk it held,
  STARTED whether it had taken its ring.  The coordinator reads them, then
  takes the line over for the replacement (``ControlBlock.take_over``).
* Sleeping never loses a wake-up (Dekker's pattern): the sleeper publishes
  that it sleeps (ASLEEP, COORD_ASLEEP, SLEEPERS), then re-reads the word it
  waits for; the other side writes that word, then reads the flag, and
  wakes the sleeper if it is set.
* Every wait has a way out: a worker waiting for its neighbours gives up
  when STOP is set, and sleeps on a futex with a timeout, so it looks again.
  The driver naps on BELL (``nap_all``) in slices, for a bounded time,
  then sleeps on the pipes, where deaths, output and timeouts are seen.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from numba import njit, types

from shmarray.atomics import (
    FUTEX_WAIT,
    FUTEX_WAKE,
    SYS_FUTEX,
    _fetch_add,
    _futex,
    _load,
    _now_ns,
    _relax,
    _sched_yield,
    _store,
    _usleep,
)

LINE = 16  # int64 words per 128-byte line

COORD_ASLEEP = 0
WORKERS = 1  # the pool's size: written once, before any worker starts
NEXT = LINE  # the next dynamic chunk to take
STOP = LINE + 1  # stop taking chunks: set at any time, cleared between rounds
ABORT = 2 * LINE  # close() or stop(): the waiting driver returns
BELL = 2 * LINE + 1  # the napping driver's doorbell
COORD_NAPS = 2  # COORD_ASLEEP's value while the driver naps on BELL
SLEEPERS = 3 * LINE  # workers asleep on a STEP word

_WORKERS_AT = 4 * LINE
_PER_WORKER = 2 * LINE
# offsets in a worker's coordinator line
RING, JOB, PIPED, STEPS = 0, 1, 2, 3
# offsets in a worker's own line
DONE, REPLY, ASLEEP, CHUNK, CHUNKS, BUSY_NS, STARTED, RAN, STEP, OUTPUT, SERVED = (
    LINE + k for k in range(11)
)

# Every word of the layout by name: the shared ones, a worker's (offsets
# from its ``slot``), and the board.  The docstring's tables and
# docs/internals.md name exactly these, and the functions below index the
# block with no other (tests/test_protocol_text.py).
SHARED_WORDS = ("COORD_ASLEEP", "WORKERS", "NEXT", "STOP", "ABORT", "BELL", "SLEEPERS")
WORKER_WORDS = (
    *("RING", "JOB", "PIPED", "STEPS"),
    *("DONE", "REPLY", "ASLEEP", "CHUNK", "CHUNKS", "BUSY_NS", "STARTED", "RAN", "STEP"),
    *("OUTPUT", "SERVED"),
)
WORDS = (*SHARED_WORDS, *WORKER_WORDS, "board")

STEP_BITS = 24
STEP_LIMIT = (1 << STEP_BITS) - 1  # stages (3 a step) per call: fewer than this


def step_word(seq: int, step: int) -> int:
    """What a worker's STEP word holds once it has done ``step`` stages of
    ring ``seq``: ordered across rings, so an older ring's count is less.

    >>> step_word(3, 0) < step_word(3, 1) < step_word(4, 0)
    True
    """
    return (seq << STEP_BITS) | step


# A tracked map (``errors="collect"``, ``retries``, ``imap``) has each chunk's
# state on the board, one byte a chunk, indexed by its place in the map.
BOARD_CHUNKS = 1 << 16
PENDING, RUNNING, FINISHED, FAILED = 0, 1, 2, 3

# A job's mode bits (``Define.mode``).  COLLECT: a chunk's exception does not
# stop the others; TRACK: keep the board, and stop between chunks when told
# to; STREAM: send each chunk's value as soon as it is computed; PREPARED:
# ``Engine.prepare`` made it: serve it by the lean path from its first run;
# IN_CALLER: the caller runs one worker's share (``prepare(in_caller=True)``;
# the workers never see that share).
COLLECT, TRACK, STREAM, PREPARED, IN_CALLER = 1, 2, 4, 8, 16


def words(n_workers: int) -> int:
    """Words in a control block for ``n_workers``, the board included."""
    return _WORKERS_AT + n_workers * _PER_WORKER + BOARD_CHUNKS // 8


def slot(index: int) -> int:
    """The first word of worker ``index``'s two lines.

    >>> slot(0), slot(1)
    (64, 96)
    """
    return _WORKERS_AT + index * _PER_WORKER


# -- compiled functions -----------------------------------------------------------

_words = types.Array(types.int64, 1, "C")
_bytes = types.Array(types.uint8, 1, "C")
_indices = types.Array(types.int64, 1, "C")
_OPTS: dict[str, Any] = dict(nogil=True, cache=True)
# numba checks a cached function against its own source file only, and
# these inline shmarray/atomics.py: its hash here (sha256, 16 digits) makes
# an edit there change this file too, so nothing stale is served from the
# cache.  tests/test_protocol_text.py fails until it is updated.
_ATOMICS_SHA256 = "a8a3259fe6fd5bf5"

# Each spin round is a check and a PAUSE; every YIELD_EVERY rounds the
# spinner also yields its CPU, so with as many processes as cores a waiting
# one lets a working one run.  Measured on the 2-vCPU reference VM with a
# 512-square heat step: yielding every round cost 8% more per step, every
# 64 rounds 5% more, every 8 rounds least.  A round is about 0.1 us.
YIELD_EVERY = 8
# How long a sleeper on a STEP word sleeps before it looks at STOP again.
NAP_NS = 20_000_000


@njit(types.int64(_words, types.int64), **_OPTS)
def load(ctl, i):
    """Word ``i``, atomically (also for flags a kernel polls in a test)."""
    return _load(ctl, i)


@njit(types.void(_words, types.int64, types.int64), **_OPTS)
def store(ctl, i, value):
    _store(ctl, i, value)


@njit(types.int64(_words, types.int64, types.int64), **_OPTS)
def fetch_add(ctl, i, value):
    return _fetch_add(ctl, i, value)


@njit(types.int64(_bytes, types.int64), **_OPTS)
def load_byte(board, i):
    return _load(board, i)


@njit(types.void(_bytes, types.int64, types.int64), **_OPTS)
def store_byte(board, i, value):
    _store(board, i, value)


@njit(types.void(_bytes, _indices, types.int64), **_OPTS)
def store_bytes(board, at, value):
    for k in range(at.shape[0]):
        _store(board, at[k], value)


@njit(types.int64(_bytes, types.int64, types.int64), **_OPTS)
def count_bytes(board, n, value):
    """How many of the first ``n`` bytes hold ``value``."""
    c = 0
    for k in range(n):
        if _load(board, k) == value:
            c += 1
    return c


@njit(types.int64(_words, types.int64, types.int64, types.int64), **_OPTS)
def wait_change(ctl, i, old, rounds):
    """Spin up to ``rounds`` until word ``i`` differs from ``old``; returns
    its value (``old`` if it never changed)."""
    for k in range(rounds):
        value = _load(ctl, i)
        if value != old:
            return value
        _relax()
        if k % YIELD_EVERY == YIELD_EVERY - 1:
            _sched_yield()
    return old


@njit(types.int64(_words, _indices, types.int64, types.int64), **_OPTS)
def wait_done(ctl, done_at, seq, rounds):
    """Spin up to ``rounds`` until every word in ``done_at`` is at least
    ``seq``; returns how many are not, or -1 once ABORT is set."""
    first = 0
    n = done_at.shape[0]
    for k in range(rounds):
        while first < n and _load(ctl, done_at[first]) >= seq:
            first += 1
        if first == n:
            return 0
        if _load(ctl, ABORT) != 0:
            return -1
        _relax()
        if k % YIELD_EVERY == YIELD_EVERY - 1:
            _sched_yield()
    return n - first


@njit(types.int64(_words, types.int64, types.int64, types.int64), **_OPTS)
def announce_sleep(ctl, flag, watched, expected):
    """Set word ``flag`` to 1, then re-read word ``watched``: returns 1 if it
    still holds ``expected`` (go to sleep: the other side will wake us),
    else clears the flag and returns 0 (it changed meanwhile: do not)."""
    _store(ctl, flag, 1)
    if _load(ctl, watched) == expected:
        return 1
    _store(ctl, flag, 0)
    return 0


@njit(
    types.int64(_words, types.int64, types.int64, types.int64, types.int64, types.int64), **_OPTS
)
def ring(ctl, at, job, piped, steps, seq):
    """Give the worker whose lines start at ``at`` job ``job`` (``steps``
    times, for an iterated job), after ``piped`` pipe messages, as ring
    ``seq``; returns 1 if it is asleep (wake it through its pipe), else 0."""
    _store(ctl, at + JOB, job)
    _store(ctl, at + PIPED, piped)
    _store(ctl, at + STEPS, steps)
    _store(ctl, at + RING, seq)
    return _load(ctl, at + ASLEEP)


@njit(types.void(_words), **_OPTS)
def ring_bell(ctl):
    """Wake the driver napping on BELL (``nap_all``)."""
    _fetch_add(ctl, BELL, 1)
    if SYS_FUTEX >= 0:
        _futex(ctl, BELL, FUTEX_WAKE, 0x7FFFFFFF, 0)


@njit(types.int64(_words, types.int64), **_OPTS)
def _answer(ctl, seq):
    """After a worker's DONE store for ring ``seq``: ring BELL if the
    driver naps on it and every worker rung ``seq`` is done (the others'
    rings would only wake it to find work still running, and take a CPU
    from a worker that runs it); 1 if the driver sleeps on the pipes
    instead, else 0.  Two workers that finish at once both see each
    other's DONE, or one does (the stores and loads are sequentially
    consistent), so the last one to finish always rings."""
    asleep = _load(ctl, COORD_ASLEEP)
    if asleep == COORD_NAPS:
        for i in range(_load(ctl, WORKERS)):
            at = _WORKERS_AT + i * _PER_WORKER
            if _load(ctl, at + RING) == seq and _load(ctl, at + DONE) < seq:
                return 0  # not the last: that one rings
        ring_bell(ctl)
        return 0
    return asleep


@njit(
    types.int64(_words, types.int64, types.int64, types.int64, types.int64, types.int64), **_OPTS
)
def finish(ctl, at, seq, replies, chunks, busy_ns):
    """A worker's end of a ring: its counts, then DONE; returns 1 if the
    coordinator sleeps on the pipes (wake it through the results pipe),
    else 0 (rung here if it naps on BELL)."""
    _store(ctl, at + REPLY, replies)
    _store(ctl, at + CHUNKS, _load(ctl, at + CHUNKS) + chunks)
    _store(ctl, at + BUSY_NS, _load(ctl, at + BUSY_NS) + busy_ns)
    _store(ctl, at + DONE, seq)
    return _answer(ctl, seq)


@njit(types.void(_words, types.int64, types.int64), **_OPTS)
def publish_step(ctl, at, word):
    """Worker ``at`` has done the stage ``word`` names: store it, and wake
    whoever sleeps on it."""
    _store(ctl, at + STEP, word)
    if _load(ctl, SLEEPERS) > 0:
        if SYS_FUTEX >= 0:
            _futex(ctl, at + STEP, FUTEX_WAKE, 0x7FFFFFFF, 0)


@njit(types.int64(_words, _indices, types.int64, types.int64), **_OPTS)
def wait_steps(ctl, at, target, spin):
    """Wait until the STEP word of every worker in ``at`` is at least
    ``target`` (an iterated job's neighbours have finished the stage whose
    rows this worker reads next): spin ``spin`` rounds, then sleep on the
    word, a nap at a time.  Returns 1, or 0 as soon as STOP is set (a chunk
    failed somewhere: the round ends, and a neighbour may never publish)."""
    for i in range(at.shape[0]):
        word = at[i] + STEP
        k = 0
        while True:
            value = _load(ctl, word)
            if value >= target:
                break
            if _load(ctl, STOP) != 0:
                return 0
            if k < spin:
                _relax()
                k += 1
                if k % YIELD_EVERY == 0:
                    _sched_yield()
                continue
            _fetch_add(ctl, SLEEPERS, 1)
            if _load(ctl, word) == value and _load(ctl, STOP) == 0:
                if SYS_FUTEX >= 0:
                    _futex(ctl, word, FUTEX_WAIT, value & 0xFFFFFFFF, NAP_NS)
                else:
                    _usleep(200)
            _fetch_add(ctl, SLEEPERS, -1)
    return 1


@njit(types.int64(_words, types.int64), **_OPTS)
def take_chunk(ctl, n):
    """The next chunk of a dynamic job of ``n`` chunks, or -1: none left, or
    STOP."""
    if _load(ctl, STOP) != 0:
        return -1
    k = _fetch_add(ctl, NEXT, 1)
    if k >= n or _load(ctl, STOP) != 0:
        return -1
    return k


# -- the lean paths: a map as one call on each side ---------------------------------
#
# A map that repeats a job every worker already holds (the usual case in a
# loop) needs no Python between the ring and the answer: the driver rings
# and spins in one call (``ring_and_wait``), and a worker serves the rings
# of a hot job in one compiled loop (``serve``), calling the kernel itself.
# Measured on the 2-vCPU reference VM, a no-op map through the Python
# paths cost 30 us; see bench/dispatch_figures.py for these.

# What ``wait_all`` (and ``ring_and_wait``) say.  NAPPED: not done after
# the spin and the nap (``ring_and_wait`` only): sleep on the pipes.
QUIET, ATTEND, SPUN, ABORTED, NAPPED = 0, 1, 2, 3, 4


@njit(types.int64(_words, _indices, types.int64, types.int64, types.int64, types.int64), **_OPTS)
def wait_all(ctl, workers, seq, spin_ns, n_all, output_seen):
    """Spin up to ``spin_ns`` until each worker in ``workers`` (indices) has
    finished ring ``seq``.  QUIET: done, and nothing to read (no reply, and
    the OUTPUT words of workers 0 to ``n_all - 1`` still add up to
    ``output_seen``); ATTEND: done, with replies or output to read; SPUN:
    not done yet; ABORTED: ABORT is set."""
    n = workers.shape[0]
    first = 0
    k = 0
    deadline = _now_ns() + spin_ns
    while True:
        while first < n and _load(ctl, _WORKERS_AT + workers[first] * _PER_WORKER + DONE) >= seq:
            first += 1
        if first == n:
            break
        if _load(ctl, ABORT) != 0:
            return ABORTED
        if spin_ns <= 0:
            return SPUN  # one look, no spin
        _relax()
        k += 1
        if k % YIELD_EVERY == 0:
            _sched_yield()
        if k % 64 == 0 and _now_ns() > deadline:
            return SPUN
    for i in range(n):
        if _load(ctl, _WORKERS_AT + workers[i] * _PER_WORKER + REPLY) != 0:
            return ATTEND
    out = 0
    for i in range(n_all):
        out += _load(ctl, _WORKERS_AT + i * _PER_WORKER + OUTPUT)
    return QUIET if out == output_seen else ATTEND


# How long the driver naps on BELL at most, a slice at a time, before it
# sleeps on the pipes (where a death, output or a timeout is seen).
NAP_BUDGET_NS = 20_000_000
NAP_SLICE_NS = 2_000_000


@njit(types.int64(_words, _indices, types.int64, types.int64, types.int64, types.int64), **_OPTS)
def nap_all(ctl, workers, seq, n_all, output_seen, budget_ns):
    """``wait_all`` for a map the driver has stopped spinning for: sleep on
    BELL (a futex; a worker that finishes rings it: ``_answer``) up to
    ``budget_ns``, looking at the done words after each wake-up.  Returns
    what ``wait_all`` does (SPUN: the budget ran out).  A wake-up through
    the pipes costs a round of Python on both sides; this costs a futex
    call on each."""
    deadline = _now_ns() + budget_ns
    while True:
        bell = _load(ctl, BELL)
        _store(ctl, COORD_ASLEEP, COORD_NAPS)
        # Dekker's pattern: published before the done words are read.
        state = wait_all(ctl, workers, seq, 0, n_all, output_seen)
        if state != SPUN or _now_ns() > deadline:
            break
        if SYS_FUTEX >= 0:
            _futex(ctl, BELL, FUTEX_WAIT, bell & 0xFFFFFFFF, NAP_SLICE_NS)
        else:
            _usleep(100)
    _store(ctl, COORD_ASLEEP, 0)
    return state


@njit(
    types.int64(_words, _indices, types.int64, _indices, types.int64, types.int64, types.int64),
    **_OPTS,
)
def ring_all(ctl, workers, job, sent, steps, seq, new_round):
    """Ring each worker in ``workers`` (indices), ``sent[i]`` messages
    before it for worker ``i``; first, if ``new_round``, reset NEXT and STOP
    (between rounds: see the invariants).  Returns how many of them sleep
    (wake them: ``ControlBlock.asleep``)."""
    if new_round:
        _store(ctl, NEXT, 0)
        _store(ctl, STOP, 0)
    asleep = 0
    for i in range(workers.shape[0]):
        w = workers[i]
        at = _WORKERS_AT + w * _PER_WORKER
        _store(ctl, at + JOB, job)
        _store(ctl, at + PIPED, sent[w])
        _store(ctl, at + STEPS, steps)
        _store(ctl, at + RING, seq)
        if _load(ctl, at + ASLEEP) != 0:
            asleep += 1
    return asleep


@njit(
    types.int64(_words, types.int64, _indices, types.int64, types.int64, types.int64, types.int64),
    **_OPTS,
)
def await_all(ctl, n_all, workers, seq, spin_ns, output_seen, nap_ns):
    """``wait_all`` (a spin of ``spin_ns``), then, if the workers are not
    done, ``nap_all`` (a nap of ``nap_ns`` at most): NAPPED if they were
    not done by the end of the nap."""
    state = wait_all(ctl, workers, seq, spin_ns, n_all, output_seen)
    if state != SPUN or nap_ns <= 0:
        return state
    state = nap_all(ctl, workers, seq, n_all, output_seen, nap_ns)
    return NAPPED if state == SPUN else state


@njit(
    types.UniTuple(types.int64, 2)(
        _words,
        types.int64,
        _indices,
        types.int64,
        _indices,
        types.int64,
        types.int64,
        types.int64,
        types.int64,
        types.int64,
        types.int64,
    ),
    **_OPTS,
)
def ring_and_wait(
    ctl, n_all, workers, job, sent, steps, seq, spin_ns, output_seen, new_round, nap_ns
):
    """``ring_all``, then ``await_all``, in one call (the lean path's).
    Returns (state, asleep): when ``asleep`` workers sleep, nothing was
    waited for (state SPUN): wake them, then wait."""
    asleep = ring_all(ctl, workers, job, sent, steps, seq, new_round)
    if asleep:
        return SPUN, asleep
    return await_all(ctl, n_all, workers, seq, spin_ns, output_seen, nap_ns), 0


@njit(types.void(_words), **_OPTS)
def abort_driver(ctl):
    """Set ABORT, and wake the driver if it naps on BELL."""
    _store(ctl, ABORT, 1)
    ring_bell(ctl)


@njit(types.int64(_words, types.int64), **_OPTS)
def output_lines(ctl, n_all):
    """The OUTPUT words of workers 0 to ``n_all - 1``, added up."""
    out = 0
    for i in range(n_all):
        out += _load(ctl, _WORKERS_AT + i * _PER_WORKER + OUTPUT)
    return out


# What ``serve`` says when it returns.
SPUN_OUT, OTHER_RING, WAKE_DRIVER = 0, 1, 2


@njit(nogil=True)
def serve(ctl, at, last, keys, received, kernel, calls_by, indices_by, spin_ns):
    """A worker's lean path: serve rings of the jobs ``keys`` (two: the two
    halves of a double-buffered loop, or one job twice), whose chunks'
    arguments are ``calls_by[j]``, at ``indices_by[j]`` in the map, for as
    long as they come, each with no new pipe message (``received``
    handled), spinning up to ``spin_ns`` for the next.  Returns (SPUN_OUT, the last ring served)
    when none came, (OTHER_RING, seq) for a ring it does not serve,
    (WAKE_DRIVER, seq) after finishing ring ``seq`` for a driver that
    sleeps.  The kernel's
    exception propagates; STARTED and CHUNK then say where it was.
    Compiled in the worker for each kernel and type of ``calls``."""
    while True:
        deadline = _now_ns() + spin_ns
        k = 0
        while True:
            seq = _load(ctl, at + RING)
            if seq != last:
                break
            _relax()
            k += 1
            if k % YIELD_EVERY == 0:
                _sched_yield()
            if k % 64 == 0 and _now_ns() > deadline:
                return SPUN_OUT, last
        job = _load(ctl, at + JOB)
        j = 0 if job == keys[0] else 1 if job == keys[1] else -1
        if j < 0 or _load(ctl, at + PIPED) != received:
            return OTHER_RING, seq
        _store(ctl, at + RAN, 0)
        _store(ctl, at + CHUNK, -1)
        _store(ctl, at + STARTED, seq)
        t0 = _now_ns()
        calls = calls_by[j]
        for c in range(len(calls)):
            _store(ctl, at + CHUNK, indices_by[j, c])
            kernel(*calls[c])
            _store(ctl, at + RAN, c + 1)
        _store(ctl, at + REPLY, 0)
        _store(ctl, at + CHUNKS, _load(ctl, at + CHUNKS) + len(calls))
        _store(ctl, at + BUSY_NS, _load(ctl, at + BUSY_NS) + _now_ns() - t0)
        _store(ctl, at + SERVED, _load(ctl, at + SERVED) + 1)
        _store(ctl, at + DONE, seq)
        if _answer(ctl, seq) != 0:
            return WAKE_DRIVER, seq
        last = seq


# -- the two sides ----------------------------------------------------------------


class ControlBlock:
    """The coordinator's side of the control block.

    Created by the Pool over a block it creates (and unlinks at close), for
    ``n_workers``; used by the driver thread of the moment, except
    ``abort``, which any thread may call.  See the module docstring for the
    protocol.
    """

    def __init__(self, buffer, n_workers: int):
        self.words = np.frombuffer(buffer, dtype=np.int64)
        self.board = self.words[self.words.size - BOARD_CHUNKS // 8 :].view(np.uint8)
        self.n_workers = n_workers
        store(self.words, WORKERS, n_workers)
        self._bind()

    def _bind(self) -> None:
        # The lean path's call, with the block's words and size bound: no
        # Python frame between the driver and the compiled call (a frame
        # costs little warm, but the driver of a loop of large maps runs on
        # a cache the kernel has just flushed).
        self.ring_and_wait = functools.partial(ring_and_wait, self.words, self.n_workers)
        # A prepared map with in_caller=True rings, runs the caller's share,
        # then waits: the two halves of ring_and_wait.
        self.ring_all = functools.partial(ring_all, self.words)
        self.await_all = functools.partial(await_all, self.words, self.n_workers)

    @staticmethod
    def nbytes(n_workers: int) -> int:
        return words(n_workers) * 8

    def release(self) -> None:
        """Let go of the shared mapping (the pool is closed, its workers
        gone): what still calls in, such as a late ``abort`` from another
        thread, writes to private words."""
        self.words = np.zeros(self.words.size, np.int64)
        self.board = self.words[self.words.size - BOARD_CHUNKS // 8 :].view(np.uint8)
        self._bind()

    def _word(self, index: int, offset: int) -> int:
        return int(load(self.words, slot(index) + offset))

    # -- a worker's line, as the coordinator reads it
    def done(self, index: int) -> int:
        """The last ring worker ``index`` finished."""
        return self._word(index, DONE)

    def started(self, index: int) -> int:
        """The last ring worker ``index`` took."""
        return self._word(index, STARTED)

    def chunk(self, index: int) -> int:
        """The chunk worker ``index`` runs or ran last (-1: loading the job)."""
        return self._word(index, CHUNK)

    def ran(self, index: int) -> int:
        """Chunks of its last ring that worker ``index`` finished."""
        return self._word(index, RAN)

    def replies(self, index: int) -> int:
        """Messages worker ``index`` sent on its results pipe for ring DONE."""
        return self._word(index, REPLY)

    def served(self, index: int) -> int:
        """Rings worker ``index``'s compiled loop (``serve``) has served in
        all, for statistics."""
        return int(self.words[slot(index) + SERVED])

    def totals(self, index: int) -> tuple[int, int]:
        """(chunks, nanoseconds busy) in all, for statistics."""
        at = slot(index)
        return int(self.words[at + CHUNKS]), int(self.words[at + BUSY_NS])

    # -- ringing and waiting
    def ring(self, index: int, job: int, piped: int, steps: int, seq: int) -> bool:
        """Ring worker ``index`` (see ``ring``); True if it must be woken."""
        return bool(ring(self.words, slot(index), job, piped, steps, seq))

    def wait_done(self, done_at: np.ndarray, seq: int, rounds: int) -> int:
        return int(wait_done(self.words, done_at, seq, rounds))

    @staticmethod
    def done_words(indices) -> np.ndarray:
        """The DONE words of these workers, for ``wait_done``."""
        return np.array([slot(i) + DONE for i in indices], np.int64)

    def wait_all(self, workers: np.ndarray, seq: int, spin_ns: int, output_seen: int) -> int:
        return int(wait_all(self.words, workers, seq, spin_ns, self.n_workers, output_seen))

    def nap_all(self, workers: np.ndarray, seq: int, output_seen: int, budget_ns: int) -> int:
        """Wait for ``workers`` asleep on BELL (see ``nap_all``)."""
        return int(nap_all(self.words, workers, seq, self.n_workers, output_seen, budget_ns))

    def asleep(self, index: int) -> bool:
        """Whether worker ``index`` sleeps on its task pipe."""
        return bool(self._word(index, ASLEEP))

    def output(self) -> int:
        """Writes the workers have made to their stdout/stderr so far, in all."""
        return int(output_lines(self.words, self.n_workers))

    def sleeping(self, asleep: bool) -> None:
        """The driver sleeps on the pipes (True) or is awake (False)."""
        store(self.words, COORD_ASLEEP, int(asleep))

    def abort(self) -> None:
        """Make the driver's spin return (any thread)."""
        if self.words.size:
            abort_driver(self.words)

    def clear_abort(self) -> None:
        store(self.words, ABORT, 0)

    # -- rounds
    def new_round(self, halted: bool = False) -> None:
        """Reset NEXT and STOP for a round (STOP set if ``halted``).  Only
        between rounds: the one place STOP is cleared (see the invariants)."""
        store(self.words, NEXT, 0)
        store(self.words, STOP, int(halted))

    def stop(self) -> None:
        """Workers of the running round take no more chunks: at any time in
        a round (STOP stays set until ``new_round``)."""
        store(self.words, STOP, 1)

    def stopped(self) -> bool:
        return bool(load(self.words, STOP))

    # -- the board
    def board_set(self, indices, state: int) -> None:
        """Chunks ``indices`` (an int, a range or a list) get ``state``:
        between rounds, or for a dead worker's chunk."""
        if isinstance(indices, int):
            store_byte(self.board, indices, state)
        else:
            store_bytes(self.board, np.asarray(indices, np.int64).reshape(-1), state)

    def board_state(self, k: int) -> int:
        return int(load_byte(self.board, k))

    def board_all(self, n: int, state: int) -> bool:
        """Whether the first ``n`` chunks all hold ``state``."""
        return int(count_bytes(self.board, n, state)) == n

    # -- a worker's line, written by the coordinator
    def fresh(self, index: int) -> int:
        """Prepare worker ``index``'s lines for a new process: idle, having
        answered every ring its predecessor answered and no other.  Only
        while no process of that index lives.  Returns its ring."""
        at = slot(index)
        done = int(load(self.words, at + DONE))
        store(self.words, at + RING, done)
        store(self.words, at + ASLEEP, 0)
        return done

    def take_over(self, index: int, done: int) -> None:
        """Worker ``index`` is dead (confirmed): mark ring ``done`` as
        finished for it, so nobody waits for it any more."""
        store(self.words, slot(index) + DONE, done)

    def stop_worker(self, index: int, piped: int, seq: int) -> None:
        """Ring worker ``index`` with no job, after ``piped`` messages (the
        last a Stop): it reads the pipe and exits."""
        ring(self.words, slot(index), 0, piped, 1, seq)


class WorkerWords:
    """A worker's side of the control block: its own line, the round's
    words and the board.  Created by the worker over the block it attaches;
    see the module docstring for the protocol."""

    def __init__(self, buffer, index: int):
        self.words = np.frombuffer(buffer, dtype=np.int64)
        self.board = self.words[self.words.size - BOARD_CHUNKS // 8 :].view(np.uint8)
        self.at = slot(index)

    def done(self) -> int:
        return int(load(self.words, self.at + DONE))

    def wait_ring(self, last: int, rounds: int) -> int:
        """Spin up to ``rounds`` for a ring after ``last``; the ring seen."""
        return int(wait_change(self.words, self.at + RING, last, rounds))

    def announce_sleep(self, last: int) -> bool:
        """About to sleep on the task pipe: True unless a ring came."""
        return bool(announce_sleep(self.words, self.at + ASLEEP, self.at + RING, last))

    def awake(self) -> None:
        store(self.words, self.at + ASLEEP, 0)

    def take(self, seq: int) -> tuple[int, int, int]:
        """Ring ``seq`` is taken: from here a death is a crash of this map
        (CHUNK -1: before the first chunk).  Returns (job, piped, steps)."""
        w, at = self.words, self.at
        store(w, at + RAN, 0)
        store(w, at + CHUNK, -1)
        store(w, at + STARTED, seq)
        return int(load(w, at + JOB)), int(load(w, at + PIPED)), int(load(w, at + STEPS))

    def running(self, chunk: int) -> None:
        store(self.words, self.at + CHUNK, chunk)

    def ran(self, count: int) -> None:
        store(self.words, self.at + RAN, count)

    def take_chunk(self, n: int) -> int:
        return int(take_chunk(self.words, n))

    def stopped(self) -> bool:
        return bool(load(self.words, STOP))

    def stop(self) -> None:
        """A chunk of this worker failed: the round's workers take no more."""
        store(self.words, STOP, 1)

    def mark(self, chunk: int, state: int) -> None:
        store_byte(self.board, chunk, state)

    def publish_step(self, word: int) -> None:
        publish_step(self.words, self.at, word)

    def wait_steps(self, neighbours: np.ndarray, target: int, spin: int) -> bool:
        """False if the round stopped while waiting."""
        return bool(wait_steps(self.words, neighbours, target, spin))

    def finish(self, seq: int, replies: int, chunks: int, busy_ns: int) -> bool:
        """Ring ``seq`` done; True if the coordinator must be woken."""
        return bool(finish(self.words, self.at, seq, replies, chunks, busy_ns))

    def wrote(self) -> None:
        """A write went to this worker's stdout or stderr pipe.  Any thread
        of the worker may call it (a kernel's own threads print too), so
        OUTPUT moves by fetch-and-add: a load and a store could lose a
        count, and the driver would not see that write until the next."""
        fetch_add(self.words, self.at + OUTPUT, 1)

    def where(self) -> tuple[int, int]:
        """(the last ring taken, the chunk running): where a kernel that
        raised in ``serve`` was."""
        return (int(load(self.words, self.at + STARTED)), int(load(self.words, self.at + CHUNK)))

    def ran_so_far(self) -> int:
        return int(load(self.words, self.at + RAN))

    def serve(
        self,
        last: int,
        keys: np.ndarray,
        received: int,
        kernel,
        calls_by: tuple,
        indices_by: np.ndarray,
        spin_ns: int,
    ) -> tuple[int, int]:
        return serve(
            self.words, self.at, last, keys, received, kernel, calls_by, indices_by, spin_ns
        )

    def ring_job(self) -> int:
        """The job of the last ring (read before ``take``, to choose a path)."""
        return int(load(self.words, self.at + JOB))
