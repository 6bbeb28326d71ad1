"""The loop that runs in each worker process.

A worker attaches each block at most once, keeps kernels by key, and runs
chunks in place.  It never creates or unlinks a block and never registers
one with the resource tracker; it unmaps a block when told the name is gone.
It ignores SIGINT: Ctrl-C reaches the whole process group, and only the
coordinator decides what it means.  It exits when told to, or when its task
pipe reaches end-of-file because the coordinator is gone.
"""

from __future__ import annotations

import gc
import os
import pickle
import select
import signal
import threading
import time
import traceback
import weakref

import numpy as np
import threadpoolctl

from shmarray import blocks
from shmarray.descriptors import (ArrayDescriptor, Done, Failed, Forget,
                                  Install, Ready, Release, Run, Stop, decode,
                                  encode, load_kernel)

# Thread pools a kernel could start.  N workers on N cores must not each
# start N threads.
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS",
               "NUMBA_NUM_THREADS")
_limits = None

# After a reply, poll for the next task this long before sleeping.  Maps
# issued back to back (an iterated stencil, a loop of small maps) then find
# the worker awake: about 5 us instead of the ~100 us it takes to wake a
# sleeping process on the reference VM.  sched_yield keeps the spin polite
# to the coordinator on a machine with as many workers as cores.  1 ms
# rather than 0.3 ms: a 2-chunk step of an iterated stencil went from 140 us
# to 105 us of overhead, as the faster worker now waits out the slower one
# awake.
SPIN = 1e-3


def limit_threads() -> None:
    """One thread per worker, for numba's parallel layer and for BLAS."""
    global _limits
    for var in THREAD_VARS:
        os.environ[var] = "1"
    import numba
    from numba.np.ufunc import parallel
    # numba read NUMBA_NUM_THREADS when the fork server imported it; its
    # thread pool starts lazily, so the new value holds if set before then.
    if not parallel._is_initialized:
        numba.config.reload_config()
        parallel.NUM_THREADS = 1
    # Under a fork-based start method numba guards its thread-pool start with
    # a multiprocessing RLock: a named semaphore in /dev/shm, registered with
    # the resource tracker, that a killed worker would leak (with a tracker
    # warning).  This process is single-threaded; a thread lock is enough.
    if parallel._backend_init_process_lock is None:
        parallel._backend_init_process_lock = threading.RLock()
    # numpy's BLAS is already loaded (by the fork server): cap it in place.
    _limits = threadpoolctl.threadpool_limits(1)


class _Unloadable:
    """Stands in for a kernel that failed to load; raises when run."""

    def __init__(self, exc: BaseException):
        self.exc = exc

    def __call__(self, *args):
        raise self.exc


class _Worker:
    def __init__(self, owner_pid: int):
        self.owner_pid = owner_pid
        self.kernels: dict[int, object] = {}
        self.buffers: dict[str, np.ndarray] = {}   # block name -> its bytes
        # Maps repeat the same arrays; rebuilding and checking a view costs
        # 2 us, a lookup 0.2 us.  Keyed by ArrayDescriptor.wire tuples.
        self.views: dict[tuple, np.ndarray] = {}

    def buffer(self, name: str) -> np.ndarray:
        buf = self.buffers.get(name)
        if buf is None:
            if blocks.owner_of(name) != self.owner_pid:
                raise PermissionError(
                    f"block {name!r} was not created by this worker's "
                    f"coordinator (pid {self.owner_pid}); refusing to map it")
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

    def release(self, names: tuple[str, ...]) -> None:
        """Unmap blocks the coordinator has unlinked.

        Dropping our arrays drops a mapping, unless something still refers
        to it.  A reference cycle can: numba's first compile for a new
        signature leaves its argument frames in a cycle, which kept that
        call's block mapped (its memory unreturned) until the next full
        collection, rare in a worker.  So when a mapping outlives our
        references, collect once.  A view a kernel stored on purpose lives
        on, harmlessly.
        """
        gone = set(names)
        mappings = []
        for name in gone:
            buf = self.buffers.pop(name, None)
            if buf is not None:
                mappings.append(weakref.ref(buf.base.obj))
        self.views = {w: v for w, v in self.views.items() if w[0] not in gone}
        buf = None
        if any(m() is not None for m in mappings):
            gc.collect()

    def run(self, msg: Run) -> Done | Failed:
        index = 0
        try:
            kernel = self.kernels[msg.key]
            views = [self.view(d) for d in msg.arrays]
            args = tuple(self.view(a.wire) if isinstance(a, ArrayDescriptor)
                         else a for a in msg.args)
            h = msg.halo
            values = [] if msg.want_values else None
            for index, (lo, hi) in enumerate(msg.chunks):
                value = kernel(*[v[lo - h:hi + h] for v in views], *args)
                if values is not None:
                    values.append(value)
            return Done(msg.seq, None if values is None else tuple(values))
        except Exception as exc:
            return failure(msg.seq, index, exc)

    def handle(self, msg) -> bytes | None:
        """Act on one message; the reply to send, if any."""
        kind = type(msg)
        if kind is Run:
            reply = self.run(msg)
            try:
                return encode(reply)
            except Exception as exc:  # a kernel returned something unpicklable
                tb = "".join(traceback.format_exception(exc))
                return encode(Failed(
                    msg.seq, len(msg.chunks) - 1, b"", type(exc).__name__,
                    f"the kernel's return value cannot be pickled back to the "
                    f"caller ({exc}). Return numbers, tuples or NumPy arrays.", tb))
        if kind is Install:
            try:
                self.kernels[msg.key] = load_kernel(msg.payload)
            except Exception as exc:
                self.kernels[msg.key] = _Unloadable(exc)
        elif kind is Forget:
            self.kernels.pop(msg.key, None)
        elif kind is Release:
            self.release(msg.names)
        return None


def failure(seq: int, index: int, exc: BaseException) -> Failed:
    tb = "".join(traceback.format_exception(exc))
    try:
        error = pickle.dumps(exc, pickle.HIGHEST_PROTOCOL)
        pickle.loads(error)
    except Exception:
        error = b""
    return Failed(seq, index, error, type(exc).__qualname__, str(exc), tb)


def main(tasks, results, owner_pid: int, close_fds: tuple[int, ...] = ()) -> None:
    """Worker entry point; ``tasks`` and ``results`` are one-way Connections.
    ``close_fds``: descriptors inherited through fork that must not stay open
    here (the watchdog's lifeline)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for fd in close_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    limit_threads()
    worker = _Worker(owner_pid)
    poller = select.poll()
    poller.register(tasks.fileno(), select.POLLIN)
    results.send_bytes(encode(Ready(os.getpid())))
    while True:
        if not poller.poll(0):
            spin_until = time.monotonic() + SPIN
            while not poller.poll(0):
                if time.monotonic() > spin_until:
                    poller.poll()
                    break
                os.sched_yield()
        try:
            msg = decode(tasks.recv_bytes())
        except (EOFError, OSError):
            return  # the coordinator is gone
        if type(msg) is Stop:
            return
        reply = worker.handle(msg)
        if reply is not None:
            results.send_bytes(reply)
