"""The control block: a few cache lines of shared memory through which the
coordinator rings its workers and they answer, without a pipe or a pickle.

Why: a map that went through pipes cost 110-180 us with 2 workers, most of
it waking a sleeping process (about 100 us in a VM) and pickling.  A worker
that has just finished a map spins on its *ring* word for a few
milliseconds, so the next map reaches it in about a microsecond; the
coordinator spins on the *done* words briefly, then sleeps until the last
worker wakes it.  Pipes stay for what is rare or large: kernels, job
definitions, reduce values, errors, and the wake-ups of sleepers.

Layout, in int64 words; each writer has its own 128-byte line, so a worker
spinning on its ring never shares a line with another worker's writes::

    line 0          COORD_ASLEEP                 coordinator writes
    line 1          NEXT, STOP                   dynamic chunks: workers take
    line 2          ABORT                        coordinator only
    worker i, then:
      line a        RING, JOB, PIPED, STEPS      coordinator writes
      line b        DONE, REPLY, ASLEEP, CHUNK,  worker writes
                    CHUNKS, BUSY_NS, STARTED, RAN,
                    STEP
    board           one byte per chunk of a       workers write
                    tracked map (``board``)

A worker and the coordinator never sleep on each other by mistake: the
sleeper stores its ASLEEP flag and then re-reads the word it waits for; the
other side stores that word and then reads the flag (Dekker's pattern).
Both use sequentially consistent atomics, generated through numba's public
``numba.extending.intrinsic`` API as LLVM atomic instructions, so the
pattern holds on weakly ordered CPUs (ARM) too.  The functions are compiled
once, at import, with ``cache=True``.
"""

from __future__ import annotations

import platform

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

LINE = 16                       # int64 words per 128-byte line

COORD_ASLEEP = 0
NEXT = LINE                     # the next dynamic chunk to take
STOP = LINE + 1                 # dynamic chunks: stop taking more
ABORT = 2 * LINE                # close() or stop(): the waiting driver returns

_WORKERS_AT = 3 * LINE
_PER_WORKER = 2 * LINE
# offsets in a worker's coordinator line
RING, JOB, PIPED, STEPS = 0, 1, 2, 3
# offsets in a worker's own line
# DONE: the last ring answered; REPLY: messages sent on the results pipe for
# it; CHUNK: the chunk running (or last run); CHUNKS, BUSY_NS: totals for the
# process's life; STARTED: the last ring taken; RAN: chunks done of it;
# STEP: steps of an iterated job done, as ``step_word(ring, step)``.
DONE, REPLY, ASLEEP, CHUNK, CHUNKS, BUSY_NS, STARTED, RAN, STEP = (
    LINE + k for k in range(9))

STEP_BITS = 24
STEP_LIMIT = (1 << STEP_BITS) - 1   # stages (3 a step) per call: fewer than this


def step_word(seq: int, step: int) -> int:
    """What a worker's STEP word holds once it has done ``step`` steps of
    ring ``seq``: ordered across rings, so an older ring's count is less.

    >>> step_word(3, 0) < step_word(3, 1) < step_word(4, 0)
    True
    """
    return (seq << STEP_BITS) | step


# A tracked map (``errors="collect"``, ``retries``, ``imap``) has each chunk's
# state on the board, one byte a chunk, indexed by its place in the map: what
# the coordinator reads after a worker died or timed out to know which
# chunks finished, which one it was running, and which it never took.
BOARD_CHUNKS = 1 << 16
PENDING, RUNNING, FINISHED, FAILED = 0, 1, 2, 3

# A job's mode bits (``Define.mode``).  COLLECT: a chunk's exception does not
# stop the others; TRACK: keep the board, and stop between chunks when told
# to; STREAM: send each chunk's value as soon as it is computed.
COLLECT, TRACK, STREAM = 1, 2, 4


def words(n_workers: int) -> int:
    """Words in a control block for ``n_workers``, the board included."""
    return _WORKERS_AT + n_workers * _PER_WORKER + BOARD_CHUNKS // 8


def board(ctl: np.ndarray) -> np.ndarray:
    """The board: the control block's last ``BOARD_CHUNKS`` bytes."""
    return ctl[ctl.size - BOARD_CHUNKS // 8:].view(np.uint8)


def slot(index: int) -> int:
    """The first word of worker ``index``'s two lines.

    >>> slot(0), slot(1)
    (48, 80)
    """
    return _WORKERS_AT + index * _PER_WORKER


# -- atomics as LLVM instructions --------------------------------------------

def _element(context, builder, array_type, array, index):
    ary = context.make_array(array_type)(context, builder, array)
    return builder.gep(ary.data, [index])


@intrinsic
def _load(typingctx, array, index):
    def codegen(context, builder, sig, args):
        ptr = _element(context, builder, sig.args[0], *args)
        return builder.load_atomic(ptr, "seq_cst", 8)
    return types.int64(array, index), codegen


@intrinsic
def _store(typingctx, array, index, value):
    def codegen(context, builder, sig, args):
        ptr = _element(context, builder, sig.args[0], args[0], args[1])
        builder.store_atomic(args[2], ptr, "seq_cst", 8)
        return context.get_dummy_value()
    return types.void(array, index, value), codegen


@intrinsic
def _fetch_add(typingctx, array, index, value):
    def codegen(context, builder, sig, args):
        ptr = _element(context, builder, sig.args[0], args[0], args[1])
        return builder.atomic_rmw("add", ptr, args[2], "seq_cst")
    return types.int64(array, index, value), codegen


# x86's PAUSE tells the core it is spinning (less power, no memory-order
# flush when the word changes).  Other CPUs spin without a hint.
_PAUSE = ("llvm.x86.sse2.pause"
          if platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
          else None)


@intrinsic
def _relax(typingctx):
    def codegen(context, builder, sig, args):
        if _PAUSE is not None:
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), []), _PAUSE)
            builder.call(fn, [])
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def _sched_yield(typingctx):
    # POSIX sched_yield, resolved from the C library already in the process
    # (a ctypes pointer would stop numba from caching the machine code).
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield")
        builder.call(fn, [])
        return context.get_dummy_value()
    return types.void(), codegen


# -- what Python calls ---------------------------------------------------------

_words = types.Array(types.int64, 1, "C")
_OPTS = dict(nogil=True, cache=True)

# Each spin round is a check and a PAUSE; every YIELD_EVERY rounds the
# spinner also yields its CPU, so with as many processes as cores a waiting
# one lets a working one run.  Measured on the 2-vCPU reference VM with a
# 512-square heat step: yielding every round cost 8% more per step, every
# 64 rounds 5% more, every 8 rounds least.  A round is about 0.1 us.
YIELD_EVERY = 8


@njit(types.int64(_words, types.int64), **_OPTS)
def load(ctl, i):
    return _load(ctl, i)


@njit(types.void(_words, types.int64, types.int64), **_OPTS)
def store(ctl, i, value):
    _store(ctl, i, value)


@njit(types.int64(_words, types.int64, types.int64), **_OPTS)
def fetch_add(ctl, i, value):
    return _fetch_add(ctl, i, value)


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


@njit(types.int64(_words, types.Array(types.int64, 1, "C"), types.int64,
                  types.int64), **_OPTS)
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


@njit(types.int64(_words, types.int64, types.int64, types.int64, types.int64,
                  types.int64), **_OPTS)
def finish(ctl, at, seq, replies, chunks, busy_ns):
    """A worker's end of a ring: its counts, then DONE; returns 1 if the
    coordinator sleeps (wake it through the results pipe), else 0."""
    ctl[at + REPLY] = replies
    ctl[at + CHUNKS] += chunks
    ctl[at + BUSY_NS] += busy_ns
    _store(ctl, at + DONE, seq)
    return _load(ctl, COORD_ASLEEP)


def new_words(buffer) -> np.ndarray:
    """The control words over ``buffer`` (a shared mapping)."""
    return np.frombuffer(buffer, dtype=np.int64)


@njit(types.int64(_words, types.int64, types.int64, types.int64, types.int64,
                  types.int64), **_OPTS)
def ring(ctl, at, job, piped, steps, seq):
    """Give the worker whose lines start at ``at`` job ``job`` (``steps``
    times, for an iterated job), after ``piped`` pipe messages, as ring
    ``seq``; returns 1 if it is asleep (wake it through its pipe), else 0."""
    _store(ctl, at + JOB, job)
    _store(ctl, at + PIPED, piped)
    _store(ctl, at + STEPS, steps)
    _store(ctl, at + RING, seq)
    return _load(ctl, at + ASLEEP)


@njit(types.void(_words, types.Array(types.int64, 1, "C"), types.int64), **_OPTS)
def wait_steps(ctl, at, target):
    """Spin until the STEP word of every worker in ``at`` is at least
    ``target``: an iterated job's neighbours have finished the step whose
    rows this worker reads next.  A neighbour that dies makes the
    coordinator stop this worker too, so the wait needs no way out."""
    for i in range(at.shape[0]):
        k = 0
        while _load(ctl, at[i] + STEP) < target:
            _relax()
            k += 1
            if k % YIELD_EVERY == 0:
                _sched_yield()
