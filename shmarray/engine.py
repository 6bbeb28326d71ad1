"""The public facade: allocate shared arrays, map and reduce kernels over them."""

from __future__ import annotations

import asyncio
import math
import numbers
import operator
import os
import warnings
import weakref
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np

from shmarray import control
from shmarray.batch import (ChunkStream, Sink, WorkerStats, check_trackable,
                            coerce_errors, coerce_retries, mode_for)
from shmarray.blocks import Block, BlockTable, blocks_of_other_engines, format_bytes
from shmarray.control import STEP_LIMIT
from shmarray.descriptors import ArrayDescriptor, by_value, describe, pack_args
from shmarray.dispatch import Dispatcher, MapFuture
from shmarray.errors import CopyWarning, EngineClosedError, MapReport
from shmarray.boundary import check_ghosts, coerce_boundary
from shmarray.descriptors import row_offset, worker_id
from shmarray.jobs import Call, Job, JobCache, Layout, signature
from shmarray.partition import Plan, coerce_halo, plan
from shmarray.pool import Pool, coerce_start_method, usable_cpus


# This process's pid, kept current across fork() without a system call per
# map (os.getpid() costs 0.2 us).
_pid = os.getpid()


def _after_fork() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork)


class Engine:
    """Shared-memory arrays and a persistent pool of worker processes.

    Use it as a context manager::

        with shmarray.Engine(workers=2) as eng:
            x = eng.from_numpy(data)
            y = eng.empty(x.shape, x.dtype)
            eng.map(kernel, y, x, args=(2.5,))

    Lifecycle: the engine creates every block (``empty``, ``zeros``,
    ``from_numpy``) and unlinks each name once, when the last array over it
    dies or at ``close()``.  ``close()`` also stops every worker.  It is
    idempotent and runs by itself when the engine is garbage collected and
    at interpreter exit.  Arrays still held after ``close()`` stay readable;
    their memory is freed with the last reference.

    Thread safety: every method may be called from any thread.  Maps and
    reductions run one at a time per engine, in the order they were asked
    for; ``submit``/``map_async`` return at once whatever is running, and a
    blocking ``map`` waits its turn.  ``close()`` from another thread ends a
    running map with EngineClosedError and returns within about a second.
    """

    _dispatcher: Dispatcher | None = None   # close() is safe after a failed __init__
    _finalizer: weakref.finalize | None = None

    def __init__(self, workers: int | None = None, *,
                 start_method: str | None = None,
                 max_tasks_per_worker: int | None = None,
                 startup_timeout: float = 120.0,
                 initializer: Callable | None = None, initargs: Sequence = (),
                 max_worker_memory: int | None = None):
        """``initializer(*initargs)`` runs once in every worker, replacements
        included, before its first task; if it raises, the engine does not
        start and the error says why (WorkerStartError).
        ``max_worker_memory``: bytes of unique memory (USS, not counting the
        shared blocks); a worker above it is replaced between maps, as
        ``max_tasks_per_worker`` replaces one after so many tasks."""
        n_workers = coerce_workers(workers)
        max_tasks = coerce_max_tasks(max_tasks_per_worker)
        max_memory = coerce_max_memory(max_worker_memory)
        start_method = coerce_start_method(start_method)
        startup_timeout = coerce_startup_timeout(startup_timeout)
        init = pack_initializer(initializer, initargs)
        self._owner = _pid
        self._cache = JobCache()
        pool = Pool(n_workers, start_method, startup_timeout, max_tasks, max_memory, init)
        table = BlockTable()
        watchdog = pool.watchdog
        table.on_create = lambda name: watchdog.blocks(created=(name,))
        self._dispatcher = Dispatcher(pool, table, self._cache)
        self._finalizer = weakref.finalize(self, self._dispatcher.close)

    # -- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        """Unlink every block and stop every worker.  Idempotent; from any
        thread; a running map ends with EngineClosedError, queued ones are
        cancelled.  Interrupted (Ctrl-C), calling it again finishes the job.
        In a forked child it does nothing: the parent owns the engine."""
        if os.getpid() != self._owner:
            return
        if self._finalizer is not None and self._finalizer.alive:
            self._finalizer()
        elif self._dispatcher is not None:
            self._dispatcher.close()           # finish an interrupted close

    @property
    def closed(self) -> bool:
        return self._finalizer is None or not self._finalizer.alive

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return "<shmarray.Engine closed>"
        d = self._dispatcher
        try:
            stats = self.stats()
        except Exception:        # closing meanwhile, or a forked child's copy
            return f"<shmarray.Engine workers={d.pool.size} (not this process's)>"
        uss = max((s.uss for s in stats), default=0)
        return (f"<shmarray.Engine workers={d.pool.size} "
                f"start_method={d.pool.start_method!r} "
                f"blocks={len(d.table.live())} "
                f"tasks={sum(s.tasks for s in stats)} "
                f"busy={sum(s.busy for s in stats):.1f}s "
                f"max_worker_uss={format_bytes(uss)} "
                f"replaced={sum(s.replaced for s in stats)}>")

    def _live(self) -> Dispatcher:
        d = self._dispatcher
        if _pid != self._owner:
            raise RuntimeError(
                "this Engine belongs to process "
                f"{self._owner}; a forked child cannot use it. Create an "
                "Engine in the child instead.")
        if d is None or d.closing:
            raise EngineClosedError(
                "this Engine is closed: its blocks are unlinked and its "
                "workers stopped. Create a new Engine (preferably in a "
                "`with` block).")
        return d

    @property
    def workers(self) -> int:
        """The number of worker processes."""
        return self._live().pool.size

    @property
    def worker_pids(self) -> list[int]:
        return self._live().pool.pids

    @property
    def start_method(self) -> str:
        return self._live().pool.start_method

    @property
    def blocks(self) -> list[Block]:
        """The engine's live blocks (name, size in bytes, address)."""
        return self._live().table.live()

    # -- allocation --------------------------------------------------------

    def empty(self, shape, dtype=np.float64, order: str = "C") -> np.ndarray:
        """A new array in shared memory.  Its contents are zero (the block is
        freshly reserved), but do not rely on that: use ``zeros``."""
        d = self._live()
        shape = coerce_shape(shape)
        dtype = coerce_dtype(dtype, "dtype")
        if order not in ("C", "F"):
            raise ValueError(f"order must be 'C' or 'F'; got {order!r} instead.")
        if d.table.has_released():
            d.tidy()      # let workers unmap dead blocks before asking for more
        buf = d.table.allocate(math.prod(shape) * dtype.itemsize)
        return np.ndarray(shape, dtype, buffer=buf, order=order)

    def zeros(self, shape, dtype=np.float64, order: str = "C") -> np.ndarray:
        """A new zero-filled array in shared memory."""
        # A new block is reserved with posix_fallocate/ftruncate: all zeros.
        return self.empty(shape, dtype, order)

    def from_numpy(self, array) -> np.ndarray:
        """A shared copy of ``array`` (same shape and dtype; Fortran order
        kept for Fortran-contiguous input, C order otherwise)."""
        a = np.asarray(array)
        coerce_dtype(a.dtype, "array")
        order = "F" if a.flags.f_contiguous and not a.flags.c_contiguous else "C"
        out = self.empty(a.shape, a.dtype, order)
        np.copyto(out, a, casting="no")
        return out

    # -- compute -----------------------------------------------------------

    def map(self, kernel: Callable, *arrays: np.ndarray, args: Sequence = (),
            halo: int = 0, chunks=None, timeout: float | None = None,
            schedule: str = "static", progress: bool | None = None,
            boundary=None, axis: int = 0, retries: int = 0,
            errors: str = "raise") -> MapReport | None:
        """Run ``kernel(*[a[lo-halo:hi+halo] for a in arrays], *args)`` in the
        workers for every chunk (lo, hi) of rows; return when all finished.

        ``chunks``: None (one per worker; eight per worker when dynamic), a
        count, or a sequence of sizes that add up to the rows (``n - 2*halo``
        with a halo).  ``timeout``: seconds; on expiry TimeoutError, and the
        stuck workers are replaced.  ``schedule``: "static" sends each worker
        the same rows every call (regular work; pages stay warm); "dynamic"
        hands chunks to whichever worker is free (irregular work, such as
        Mandelbrot rows).  ``progress``: a bar of chunks completed, on a
        terminal or in a notebook; None (the default) follows the global
        setting (``SHMARRAY_PROGRESS``), automatic unless it says otherwise:
        a bar only for a map that runs longer than a second.
        ``axis``: the axis split into chunks (rows are counted along it).
        ``boundary``: None, "wrap", "reflect", "symmetric", "edge" or a
        number: every array carries ``halo`` ghost cells on each side of
        every axis, and the engine fills them first, as ``numpy.pad`` would
        from the cells inside.  ``shmarray.row_offset`` and
        ``shmarray.worker_id`` in ``args`` become, in each call, the index
        of the first row passed and the worker's index.
        ``retries``: a chunk whose worker crashed or timed out runs again on
        a fresh worker, up to this many times (``timeout`` is per attempt);
        a kernel's own exception is not retried.  ``errors``: "raise" (the
        first failure raises) or "collect": every chunk that can run does,
        and the map returns a :class:`shmarray.MapReport` of what failed.
        """
        d, call = self._call(kernel, arrays, args, Layout(halo, chunks, schedule, axis,
                                                          boundary), timeout, progress,
                             None, retries=retries, errors=errors)
        return d.run(call)

    def reduce(self, kernel: Callable, *arrays: np.ndarray, args: Sequence = (),
               combine: Callable[[Any, Any], Any] = operator.add, halo: int = 0,
               chunks=None, timeout: float | None = None,
               schedule: str = "static", progress: bool | None = None,
               boundary=None, axis: int = 0, retries: int = 0,
               errors: str = "raise") -> Any:
        """Like ``map``, but the kernel returns a value per chunk; the values
        are combined in chunk order, so the result is deterministic for a
        given ``chunks`` (with either schedule).  With ``errors="collect"``
        it returns a MapReport whose ``value`` combines the chunks that
        succeeded, in chunk order."""
        d, call = self._call(kernel, arrays, args, Layout(halo, chunks, schedule, axis,
                                                          boundary),
                             timeout, progress, check_combine(combine),
                             retries=retries, errors=errors)
        return d.run(call)

    def imap(self, kernel: Callable, *arrays: np.ndarray, args: Sequence = (),
             combine: Callable[[Any, Any], Any] = operator.add, halo: int = 0,
             chunks=None, timeout: float | None = None, schedule: str = "static",
             progress: bool | None = False, boundary=None, axis: int = 0,
             retries: int = 0, errors: str = "raise") -> ChunkStream:
        """``reduce``, as a stream: yields ``(rows, value)`` for each chunk as
        soon as it finishes, in the order they finish, while the rest run.
        Returns at once; the map runs on the engine's manager thread.

        Closing the stream (``close()``, a ``with`` block, or dropping it,
        as leaving a ``for`` loop by ``break`` does) stops the map cleanly:
        no new chunk starts, the running ones finish.  When it is exhausted,
        ``stream.result`` is what ``reduce`` would have returned.  With
        ``errors="raise"`` the first failure raises from the loop.
        """
        sink = Sink()
        d, call = self._call(kernel, arrays, args, Layout(halo, chunks, schedule, axis,
                                                          boundary),
                             timeout, progress, check_combine(combine),
                             retries=retries, errors=errors, stream=sink)
        return ChunkStream(sink, d.submit(call), d.interrupt)

    def stats(self) -> list[WorkerStats]:
        """One record per worker: pid, memory (RSS and unique, in bytes),
        chunks run, kernels held, seconds busy, and times its place was
        taken by a replacement (crash, timeout, recycling)."""
        pool = self._live().pool
        out = []
        for w in list(pool.workers):
            at = control.slot(w.index)
            rss, uss = w.memory()
            out.append(WorkerStats(
                w.index, w.pid, rss, uss,
                int(pool.ctl[at + control.CHUNKS]) - w.chunks_at_start, len(w.kernels),
                (int(pool.ctl[at + control.BUSY_NS]) - w.busy_at_start) / 1e9,
                pool.replaced[w.index]))
        return out

    def iterate(self, kernel: Callable, out: np.ndarray, inp: np.ndarray,
                *arrays: np.ndarray, steps: int, args: Sequence = (), halo: int = 0,
                chunks=None, timeout: float | None = None,
                progress: bool | None = None, boundary=None, axis: int = 0) -> np.ndarray:
        """``steps`` steps of a double-buffered map, run inside the workers:
        the same as, and bit-identical to, ::

            for _ in range(steps):
                eng.map(kernel, out, inp, *arrays, args=args, halo=halo, chunks=chunks)
                out, inp = inp, out

        but with no round trip to this process between steps: before each
        step a worker waits only for the workers holding the rows next to
        its own (``halo`` of them) to finish the previous one.  Returns the
        array holding the last step's output (``out`` after an odd number of
        steps, ``inp`` after an even one).  The kernel must read no more of
        ``inp`` than its chunk and halo, as a stencil does; ``timeout``
        covers all the steps.  With a ``boundary``, the ghost cells of every
        array are filled again before each step, by the workers.
        """
        steps = coerce_steps(steps)
        if steps == 0:
            self._live()
            return inp
        d, call = self._call(kernel, (out, inp) + arrays, args,
                             Layout(halo, chunks, "iterate", axis, boundary),
                             timeout, progress, None, steps)
        d.run(call)
        return out if steps % 2 else inp

    def compare(self, kernel: Callable, *arrays: np.ndarray, args: Sequence = (),
                halo: int = 0, chunks=None, schedule: str = "static",
                repeat: int = 5, reduce: bool = False,
                combine: Callable[[Any, Any], Any] = operator.add):
        """Time ``kernel`` sequentially on whole arrays and through this
        engine, on copies of ``arrays`` (yours are not touched), and check
        the results are identical.

        Returns a :class:`shmarray.compare.Comparison`: medians, speedup,
        parallel efficiency, GB/s and the check; it prints as a table,
        renders as one in a notebook, and has ``.plot()``.  ``reduce=True``
        for a kernel that returns a per-chunk value (then identical means:
        equal to the sequential kernel run chunk by chunk and combined in
        the same order).
        """
        from shmarray.compare import compare
        self._live()
        check_kernel(kernel)
        return compare(self, kernel, *arrays, args=args, halo=halo, chunks=chunks,
                       schedule=schedule, repeat=repeat, reduce=reduce,
                       combine=combine)

    def _call(self, kernel, arrays, args, layout: Layout, timeout, progress,
              combine, steps: int = 1, retries: int = 0, errors: str = "raise",
              stream: Sink | None = None) -> tuple[Dispatcher, Call]:
        """Check everything in the caller's thread, before anything is sent.
        A repeat of an earlier call is recognised by its signature and
        skips the checks that cannot have changed."""
        d = self._dispatcher
        if d is None or d.closing or _pid != self._owner:
            d = self._live()                 # raises the right error
        want_values = combine is not None
        if not (type(retries) is int and retries == 0) or errors != "raise" or stream is not None:
            retries = coerce_retries(retries)
            collect = coerce_errors(errors)
            layout = layout._replace(mode=mode_for(retries, collect, stream is not None))
        else:
            collect = False
        sig = signature(kernel, arrays, args, layout, want_values)
        job = self._cache.get(sig, kernel, arrays, args)
        if job is None:
            job = self._cache.add(sig, self._new_job(d, kernel, arrays, args, layout,
                                                     want_values))
        if timeout is not None:
            timeout = coerce_timeout(timeout)
        if progress is not None and progress is not True and progress is not False:
            raise TypeError(f"progress must be True, False or None (show after "
                            f"about a second); got {progress!r} instead.")
        return d, Call(job, args if type(args) is tuple else tuple(args), timeout,
                       progress, combine, steps, arrays, retries, collect, stream)

    def _new_job(self, d: Dispatcher, kernel, arrays, args, layout: Layout,
                 want_values) -> Job:
        check_kernel(kernel)
        halo = coerce_halo(layout.halo)
        axis = coerce_axis(layout.axis, arrays)
        descriptors = describe_arrays(arrays, d.table, axis)
        described = describe_args(args, d.table)
        check_placeholders(args)
        iterated = layout.schedule == "iterate"
        dynamic = not iterated and coerce_schedule(layout.schedule)
        bound = coerce_boundary(layout.boundary)
        if bound is not None:
            for i, a in enumerate(arrays):
                check_ghosts(a.shape, halo, bound, _where(i))
        where = plan_for(arrays[0].shape[axis], layout.chunks, halo, d.pool.size, dynamic)
        # The arrays the job describes, including shared ones among the args
        # (those, and only those, become descriptors in its template).
        refs = tuple(arrays) + tuple(a for a in args if type(a) is np.ndarray)
        template = tuple(d if isinstance(a, np.ndarray) and type(d) is ArrayDescriptor
                         else None for a, d in zip(args, described))
        if iterated:
            check_swappable(arrays[0], arrays[1])
        if layout.mode:
            check_trackable(len(where.chunks))
        return Job(self._cache.new_key(), kernel, refs, descriptors, template,
                   halo, where, dynamic, want_values, iterated, axis, bound, layout.mode)

    # -- non-blocking ------------------------------------------------------

    def submit(self, kernel: Callable, *arrays: np.ndarray, args: Sequence = (),
               halo: int = 0, chunks=None, timeout: float | None = None,
               schedule: str = "static", progress: bool | None = None,
               boundary=None, axis: int = 0, retries: int = 0,
               errors: str = "raise") -> MapFuture:
        """Start ``map(kernel, *arrays, ...)`` and return at once with a
        ``concurrent.futures.Future`` (result None), whatever is running.

        Arguments are checked here, in the caller.  Submitted maps run one at
        a time, in submission order, on the engine's manager thread;
        ``future.cancel()`` cancels a queued one, ``future.stop()`` also
        stops a running one (its workers are killed and replaced).  The
        arrays stay alive until the map ends.
        """
        d, call = self._call(kernel, arrays, args, Layout(halo, chunks, schedule, axis,
                                                          boundary), timeout, progress,
                             None, retries=retries, errors=errors)
        return d.submit(call)

    def submit_reduce(self, kernel: Callable, *arrays: np.ndarray, args: Sequence = (),
                      combine: Callable[[Any, Any], Any] = operator.add,
                      halo: int = 0, chunks=None, timeout: float | None = None,
                      schedule: str = "static", progress: bool | None = None,
                      boundary=None, axis: int = 0, retries: int = 0,
                      errors: str = "raise") -> MapFuture:
        """``submit`` for ``reduce``: the future's result is the combined value."""
        d, call = self._call(kernel, arrays, args, Layout(halo, chunks, schedule, axis,
                                                          boundary),
                             timeout, progress, check_combine(combine),
                             retries=retries, errors=errors)
        return d.submit(call)

    async def map_async(self, kernel: Callable, *arrays: np.ndarray, **options) -> None:
        """``await eng.map_async(kernel, *arrays, ...)``: ``map`` for asyncio
        code (same arguments).  The event loop stays free while the workers
        run; cancelling the task stops the map."""
        await _awaited(self.submit(kernel, *arrays, **options))

    async def reduce_async(self, kernel: Callable, *arrays: np.ndarray, **options) -> Any:
        """``reduce`` for asyncio code (same arguments)."""
        return await _awaited(self.submit_reduce(kernel, *arrays, **options))


async def _awaited(future: MapFuture) -> Any:
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        future.stop()            # the task was cancelled: so is the map
        raise


# Enough chunks that the last one to finish is short, few enough that the
# ~70 us per chunk stays small against real work.
DYNAMIC_CHUNKS_PER_WORKER = 8


def plan_for(n_rows: int, chunks: object, halo: int, n_workers: int,
             dynamic: bool) -> Plan:
    """The chunks a map will use: ``chunks`` as given, else one per worker
    (static) or DYNAMIC_CHUNKS_PER_WORKER per worker (dynamic)."""
    if chunks is None and dynamic:
        chunks = DYNAMIC_CHUNKS_PER_WORKER * n_workers
    return plan(n_rows, chunks, halo, n_workers)


# -- argument checks: small, pure, run before anything is sent -------------

def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def coerce_workers(workers: object) -> int:
    """
    >>> coerce_workers(3)
    3
    >>> coerce_workers(None) >= 1
    True
    >>> coerce_workers(0)
    Traceback (most recent call last):
    ...
    ValueError: workers must be at least 1; got 0. Pass None for one worker per usable CPU.
    """
    if workers is None:
        return usable_cpus()
    if not _is_int(workers):
        raise TypeError(
            f"workers must be an int or None (one per usable CPU); got "
            f"{workers!r} of type {type(workers).__name__} instead.")
    if workers < 1:
        raise ValueError(
            f"workers must be at least 1; got {workers!r}. Pass None for one "
            f"worker per usable CPU.")
    return int(workers)


def coerce_startup_timeout(value: object) -> float:
    """
    >>> coerce_startup_timeout(30)
    30.0
    >>> coerce_startup_timeout(0)
    Traceback (most recent call last):
    ...
    ValueError: startup_timeout must be a positive, finite number of seconds; got 0 instead.
    """
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"startup_timeout must be a number of seconds; got "
                        f"{value!r} of type {type(value).__name__} instead.")
    if not 0 < value < math.inf:
        raise ValueError(f"startup_timeout must be a positive, finite number "
                         f"of seconds; got {value!r} instead.")
    return float(value)


def pack_initializer(initializer: object, initargs: object) -> tuple[bytes, bytes] | None:
    """The initializer and its arguments, pickled for every worker (by value
    when they live in ``__main__``)."""
    if initializer is None:
        if initargs:
            raise ValueError("initargs were given without an initializer.")
        return None
    if not callable(initializer):
        raise TypeError(f"initializer must be callable (run once in every "
                        f"worker) or None; got {initializer!r} instead.")
    if not isinstance(initargs, (tuple, list)):
        raise TypeError(f"initargs must be a tuple; got {initargs!r} of type "
                        f"{type(initargs).__name__}. Write initargs=({initargs!r},) "
                        f"for one.")
    if any(a is row_offset for a in initargs):
        raise ValueError("shmarray.row_offset has no meaning in initargs (an "
                         "initializer runs once per worker, not per chunk); "
                         "shmarray.worker_id does.")
    try:
        return by_value(initializer), pack_args(tuple(initargs))
    except Exception as exc:
        raise TypeError(f"the initializer and its initargs must be picklable "
                        f"to reach the workers: {exc}") from None


def coerce_max_tasks(value: object) -> int | None:
    """
    >>> coerce_max_tasks(None), coerce_max_tasks(100)
    (None, 100)
    """
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise ValueError(
            f"max_tasks_per_worker must be a positive int (tasks before a "
            f"worker is replaced) or None (never); got {value!r} instead.")
    return int(value)


def coerce_max_memory(value: object) -> int | None:
    """
    >>> coerce_max_memory(None), coerce_max_memory(2**30)
    (None, 1073741824)
    """
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise ValueError(
            f"max_worker_memory must be a positive int (bytes of unique memory "
            f"above which a worker is replaced between maps) or None (never); "
            f"got {value!r} instead.")
    return int(value)


def coerce_shape(shape: object) -> tuple[int, ...]:
    """
    >>> coerce_shape(5), coerce_shape((2, 3)), coerce_shape(())
    ((5,), (2, 3), ())
    >>> coerce_shape((2, -1))
    Traceback (most recent call last):
    ...
    ValueError: shape must not have negative sizes; got (2, -1) instead.
    """
    dims = (shape,) if _is_int(shape) else shape
    if (not isinstance(dims, Sequence) or isinstance(dims, (str, bytes))
            or not all(_is_int(d) for d in dims)):
        raise TypeError(
            f"shape must be an int or a tuple of ints; got {shape!r} instead.")
    dims = tuple(int(d) for d in dims)
    if any(d < 0 for d in dims):
        raise ValueError(f"shape must not have negative sizes; got {shape!r} instead.")
    return dims


_PLAIN_DTYPES: set[np.dtype] = set()   # already checked: 2 us saved per array


def coerce_dtype(dtype: object, what: str) -> np.dtype:
    """A dtype whose items are plain bytes: no Python objects, no records.

    >>> coerce_dtype("f4", "dtype")
    dtype('float32')
    >>> coerce_dtype(object, "dtype")
    Traceback (most recent call last):
    ...
    TypeError: dtype has dtype object; shared arrays hold plain numbers (bool, int, float, complex, datetime). Object arrays hold pointers into one process's heap and cannot be shared.
    """
    if isinstance(dtype, np.dtype) and dtype in _PLAIN_DTYPES:
        return dtype
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"{what}: {dtype!r} is not a NumPy dtype ({exc})") from None
    if dt.hasobject:
        raise TypeError(
            f"{what} has dtype {dt}; shared arrays hold plain numbers (bool, "
            f"int, float, complex, datetime). Object arrays hold pointers into "
            f"one process's heap and cannot be shared.")
    if dt.fields is not None or dt.subdtype is not None or dt.kind == "V":
        raise TypeError(
            f"{what} has the structured dtype {dt}; shared arrays hold plain "
            f"numbers. Use one array per field instead.")
    if dt.itemsize == 0:
        raise TypeError(
            f"{what} has the zero-size dtype {dt}; give strings a length "
            f"(for example 'S8' or 'U8').")
    if isinstance(dtype, np.dtype):
        _PLAIN_DTYPES.add(dtype)
    return dt


def coerce_timeout(timeout: object) -> float | None:
    """
    >>> coerce_timeout(None), coerce_timeout(2), coerce_timeout(float("inf"))
    (None, 2.0, None)
    """
    if timeout is None:
        return None
    if not isinstance(timeout, numbers.Real) or isinstance(timeout, bool):
        raise TypeError(f"timeout must be a number of seconds or None; got {timeout!r} instead.")
    if not timeout > 0:                  # NaN too
        raise ValueError(f"timeout must be positive (seconds); got {timeout!r} instead.")
    return None if timeout == math.inf else float(timeout)


def coerce_axis(axis: object, arrays: tuple) -> int:
    """The split axis, counted from the end when negative (by the first
    array's dimensions).

    >>> import numpy as np
    >>> coerce_axis(-1, (np.zeros((2, 3)),))
    1
    """
    if not _is_int(axis):
        raise TypeError(f"axis must be an int; got {axis!r} of type "
                        f"{type(axis).__name__} instead.")
    ndim = arrays[0].ndim if arrays and isinstance(arrays[0], np.ndarray) else 1
    if not -ndim <= axis < max(ndim, 1):
        raise ValueError(f"axis {axis} is out of range for an array of {ndim} "
                         f"dimension(s); use 0 to {ndim - 1} (or -{ndim} to -1).")
    return int(axis) % max(ndim, 1)


def check_placeholders(args: tuple) -> None:
    """``shmarray.row_offset`` and ``worker_id`` are filled in only where
    they stand directly in ``args``."""
    for i, a in enumerate(args):
        if isinstance(a, (tuple, list, dict, set)) and any(
                v is row_offset or v is worker_id
                for v in (a.values() if isinstance(a, dict) else a)):
            raise ValueError(
                f"args[{i}] holds shmarray.row_offset or shmarray.worker_id "
                f"inside a container, where it cannot be filled in; pass it "
                f"directly in args.")


def coerce_steps(steps: object) -> int:
    """
    >>> coerce_steps(10)
    10
    >>> coerce_steps(-1)
    Traceback (most recent call last):
    ...
    ValueError: steps must be a non-negative int below 5592405; got -1 instead.
    """
    if not _is_int(steps):
        raise TypeError(f"steps must be an int (how many steps to run); got "
                        f"{steps!r} of type {type(steps).__name__} instead.")
    if not 0 <= steps < STEP_LIMIT // 3:
        raise ValueError(f"steps must be a non-negative int below {STEP_LIMIT // 3}; "
                         f"got {steps!r} instead.")
    return int(steps)


def check_swappable(out: np.ndarray, inp: np.ndarray) -> None:
    """``iterate`` swaps its first two arrays: they must be interchangeable."""
    if out.shape != inp.shape or out.dtype != inp.dtype:
        raise ValueError(
            f"iterate swaps out and inp after every step, so they need the same "
            f"shape and dtype; got {out.shape} {out.dtype} and {inp.shape} "
            f"{inp.dtype}.")
    if np.shares_memory(out, inp):
        raise ValueError(
            "iterate needs out and inp to be separate arrays (double "
            "buffering); they overlap in memory.")


def coerce_schedule(schedule: object) -> bool:
    """True for dynamic scheduling.

    >>> coerce_schedule("static"), coerce_schedule("dynamic")
    (False, True)
    """
    if schedule not in ("static", "dynamic"):
        raise ValueError(
            f"schedule must be 'static' (the same rows to the same worker "
            f"every call) or 'dynamic' (chunks to whichever worker is free); "
            f"got {schedule!r} instead.")
    return schedule == "dynamic"


def check_combine(combine: object) -> Callable:
    if not callable(combine):
        raise TypeError(
            f"combine must be a callable taking two partial results "
            f"(default operator.add); got {combine!r} instead.")
    return combine


def check_kernel(kernel: object) -> None:
    if not callable(kernel):
        raise TypeError(
            f"kernel must be callable: a numba @njit function or any "
            f"picklable callable; got {kernel!r} of type "
            f"{type(kernel).__name__} instead.")


def _where(i: int) -> str:
    return (f"array {i} (argument {i + 2} after the kernel)" if i
            else "array 0 (the first after the kernel)")


def describe_arrays(arrays: tuple, table: BlockTable, axis: int = 0) -> tuple[ArrayDescriptor, ...]:
    if not arrays:
        raise TypeError("map/reduce needs at least one array after the kernel.")
    out = []
    for i, a in enumerate(arrays):
        if not isinstance(a, np.ndarray):
            raise TypeError(
                f"{_where(i)} is a {type(a).__name__}; pass NumPy arrays made "
                f"by this engine (eng.empty, eng.zeros, eng.from_numpy). Extra "
                f"scalar arguments go in args=(...).")
        if a.ndim <= axis:
            raise ValueError(
                f"{_where(i)} has {a.ndim} dimension(s); map splits axis "
                f"{axis}, so every array needs at least {axis + 1}. Pass "
                f"scalars in args=(...).")
        if a.dtype not in _PLAIN_DTYPES:
            coerce_dtype(a.dtype, _where(i))
        d = describe(a, table)
        if d is None:
            check_not_elsewhere(a, _where(i), table)
            raise ValueError(
                f"{_where(i)} is a private array: its memory is not in this "
                f"engine's shared blocks, so workers cannot see it. Copy it "
                f"in with eng.from_numpy(a), or allocate with eng.empty / "
                f"eng.zeros.")
        out.append(d)
    n = arrays[0].shape[axis]
    if any(a.shape[axis] != n for a in arrays):
        raise ValueError(
            f"all arrays must have the same length along axis {axis} (map "
            f"splits it); got lengths {[a.shape[axis] for a in arrays]}.")
    return tuple(out)


# A private array in args travels by pickle with every call: past this size
# that costs more than the map (a 128 MB array: 1070 ms a map, against 91 ms
# for the same array shared).
COPY_WARNING_BYTES = 1 << 20


def describe_args(args: object, table: BlockTable) -> tuple:
    """Extra kernel arguments.  Shared arrays travel as descriptors and reach
    the kernel whole; anything else is pickled with every call, so keep it
    small: a private array over ``COPY_WARNING_BYTES`` gets a CopyWarning,
    once per engine."""
    if not isinstance(args, (tuple, list)):
        raise TypeError(
            f"args must be a tuple of extra kernel arguments; got {args!r} of "
            f"type {type(args).__name__}. Write args=({args!r},) for one.")
    out = []
    for i, a in enumerate(args):
        if isinstance(a, np.ndarray) and a.ndim > 0:
            d = describe(a, table)
            if d is not None:
                a = d
            else:
                check_not_elsewhere(a, f"args[{i}]", table)
                if a.nbytes > COPY_WARNING_BYTES and not table.warned_copy:
                    table.warned_copy = True
                    warnings.warn(
                        f"args[{i}] is a private array of "
                        f"{format_bytes(a.nbytes)}: it is pickled and sent to the "
                        f"workers with every call, and writes to it are lost. "
                        f"Copy it into shared memory once with "
                        f"shared = eng.from_numpy(a) and pass that instead "
                        f"(shown once per engine).", CopyWarning, stacklevel=4)
        out.append(a)
    return tuple(out)


def check_not_elsewhere(a: np.ndarray, where: str, table: BlockTable) -> None:
    """Refuse an array that lives in *another* engine's shared memory: this
    engine's workers would get a copy, and the kernel's writes would be
    lost."""
    other = blocks_of_other_engines(a, table)
    if other is not None:
        raise ValueError(
            f"{where} lives in another Engine's shared memory (block "
            f"{other.name}); this engine's workers cannot map it, and a copy "
            f"would lose what the kernel writes. Use arrays of the engine "
            f"that runs the map: copy it over with eng.from_numpy(a).")
