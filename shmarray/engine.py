"""The public facade: allocate shared arrays, map and reduce kernels over them."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import math
import numbers
import operator
import os
import queue
import threading
import warnings
import weakref
from collections.abc import Sequence
from typing import Any, Callable, NamedTuple

import numpy as np

from shmarray.blocks import Block, BlockTable
from shmarray.descriptors import ArrayDescriptor, describe
from shmarray.errors import EngineClosedError, MapCancelledError
from shmarray.partition import Plan, coerce_halo, plan
from shmarray.pool import MapAborted, Pool, usable_cpus
from shmarray.progress import ChunkProgress


class _Job(NamedTuple):
    """One checked map or reduce, ready to run."""
    kernel: Callable
    arrays: tuple            # the caller's arrays: kept alive until the job ends
    descriptors: tuple
    args: tuple
    halo: int
    plan: Plan               # chunks and the worker of each
    timeout: float | None
    dynamic: bool
    progress: bool | None
    want_values: bool
    combine: Callable | None


class MapFuture(concurrent.futures.Future):
    """The future of a submitted map or reduce.

    ``cancel()`` works while the job is queued, as for any Future, and also
    while it runs: the workers busy with it (maybe deep in a numba loop) are
    killed and replaced, and the future ends with ``MapCancelledError`` (a
    ``concurrent.futures.CancelledError``).
    """

    def __init__(self, interrupt: Callable[[], None]):
        super().__init__()
        self.abort = threading.Event()
        self._interrupt = interrupt

    def cancel(self) -> bool:
        if super().cancel():
            return True
        if self.running():
            self.abort.set()
            self._interrupt()
            return True
        return False


class _State:
    """Everything an engine owns, with no reference to the Engine itself,
    so a finalizer or atexit hook never keeps the engine alive.

    Maps run one at a time under ``lock``.  Submitted jobs run in submission
    order on one dispatcher thread, started on first use.
    """

    def __init__(self, pool: Pool, table: BlockTable):
        self.pool = pool
        self.table = table
        self.lock = threading.Lock()
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.dispatcher: threading.Thread | None = None
        self.current: MapFuture | None = None
        self.stopping = False

    def execute(self, job: _Job, abort: threading.Event | None = None) -> Any:
        with self.lock:
            bar = (None if job.progress is False else
                   ChunkProgress(len(job.plan.chunks), job.progress,
                                 getattr(job.kernel, "__name__", "map")))
            try:
                values = self.pool.run(
                    job.kernel, job.descriptors, job.args, job.halo, job.plan,
                    job.want_values, self.table.take_released(), job.timeout,
                    job.dynamic, bar, abort)
            finally:
                if bar is not None:
                    bar.close()
        return None if job.combine is None else functools.reduce(job.combine, values)

    def submit(self, job: _Job) -> MapFuture:
        future = MapFuture(self.pool.interrupt)
        with self.lock:
            if self.stopping:
                raise EngineClosedError("this Engine is closing; create a new one.")
            if self.dispatcher is None:
                self.dispatcher = threading.Thread(
                    target=self._dispatch, name="shmarray-dispatcher", daemon=True)
                self.dispatcher.start()
        self.jobs.put((future, job))
        return future

    def _dispatch(self) -> None:
        while True:
            item = self.jobs.get()
            if item is None:
                return
            future, job = item
            del item
            if not future.set_running_or_notify_cancel():
                del future, job              # release the caller's arrays now
                continue
            self.current = future
            try:
                future.set_result(self.execute(job, future.abort))
            except MapAborted:
                future.set_exception(MapCancelledError(
                    "the map was cancelled while running; its workers were "
                    "replaced"))
            except BaseException as exc:
                future.set_exception(exc)
            finally:
                self.current = None
                del future, job              # release the caller's arrays now

    def stop_dispatcher(self) -> None:
        """Cancel queued jobs, abort the running one, end the thread."""
        self.stopping = True
        dispatcher, self.dispatcher = self.dispatcher, None
        if dispatcher is None:
            return
        while True:
            try:
                item = self.jobs.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        current = self.current
        if current is not None:
            current.cancel()
        self.jobs.put(None)
        if dispatcher is not threading.current_thread():
            dispatcher.join(30.0)

    def shutdown(self) -> None:
        try:
            self.stop_dispatcher()
        except Exception as exc:
            warnings.warn(f"shmarray: stopping the dispatcher failed: {exc!r}",
                          RuntimeWarning, stacklevel=2)
        # Names first: even if stopping a worker goes wrong, /dev/shm is clean.
        try:
            self.table.close()
        except Exception as exc:
            warnings.warn(f"shmarray: unlinking blocks failed: {exc!r}",
                          RuntimeWarning, stacklevel=2)
        try:
            self.pool.close()
        except Exception as exc:
            warnings.warn(f"shmarray: stopping workers failed: {exc!r}",
                          RuntimeWarning, stacklevel=2)


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
    reductions run one at a time per engine; ``submit``/``map_async`` jobs
    run in submission order, and a blocking ``map`` from another thread
    waits for the map in progress, so it may run between two submitted ones.
    """

    _state: _State | None = None          # close() is safe after a failed __init__
    _finalizer: weakref.finalize | None = None

    def __init__(self, workers: int | None = None, *,
                 start_method: str | None = None,
                 max_tasks_per_worker: int | None = None,
                 startup_timeout: float = 120.0):
        n_workers = coerce_workers(workers)
        max_tasks = coerce_max_tasks(max_tasks_per_worker)
        self._owner = os.getpid()
        pool = Pool(n_workers, start_method, startup_timeout, max_tasks)
        self._state = _State(pool, BlockTable())
        self._finalizer = weakref.finalize(self, _State.shutdown, self._state)

    # -- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        """Unlink every block and stop every worker.  Idempotent."""
        if self._finalizer is not None:
            self._finalizer()

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
        state = self._state
        return (f"<shmarray.Engine workers={len(state.pool.slots)} "
                f"start_method={state.pool.start_method!r} "
                f"blocks={len(state.table.live())}>")

    def _live(self) -> _State:
        if self.closed:
            raise EngineClosedError(
                "this Engine is closed: its blocks are unlinked and its "
                "workers stopped. Create a new Engine (preferably in a "
                "`with` block).")
        if os.getpid() != self._owner:
            raise RuntimeError(
                "this Engine belongs to process "
                f"{self._owner}; a forked child cannot use it. Create an "
                "Engine in the child instead.")
        return self._state

    @property
    def workers(self) -> int:
        """The number of worker processes."""
        return len(self._live().pool.slots)

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
        state = self._live()
        shape = coerce_shape(shape)
        dtype = coerce_dtype(dtype, "dtype")
        if order not in ("C", "F"):
            raise ValueError(f"order must be 'C' or 'F'; got {order!r} instead.")
        released = state.table.take_released()
        if released:  # let workers unmap dead blocks before asking for more
            with state.lock:
                state.pool.release(released)
        buf = state.table.allocate(math.prod(shape) * dtype.itemsize)
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
            schedule: str = "static", progress: bool | None = None) -> None:
        """Run ``kernel(*[a[lo-halo:hi+halo] for a in arrays], *args)`` in the
        workers for every chunk (lo, hi) of rows; return when all finished.

        ``chunks``: None (one per worker; eight per worker when dynamic), a
        count, or a sequence of sizes that add up to the rows (``n - 2*halo``
        with a halo).  ``timeout``: seconds; on expiry TimeoutError, and the
        stuck workers are replaced.  ``schedule``: "static" sends each worker
        the same rows every call (regular work; pages stay warm); "dynamic"
        hands chunks to whichever worker is free (irregular work, such as
        Mandelbrot rows).  ``progress``: a bar of chunks completed; None
        (the default) shows it only if the map runs longer than a second.
        """
        state, job = self._prepare(kernel, arrays, args, halo, chunks, timeout,
                                   schedule, progress, None)
        state.execute(job)

    def reduce(self, kernel: Callable, *arrays: np.ndarray, args: Sequence = (),
               combine: Callable[[Any, Any], Any] = operator.add, halo: int = 0,
               chunks=None, timeout: float | None = None,
               schedule: str = "static", progress: bool | None = None) -> Any:
        """Like ``map``, but the kernel returns a value per chunk; the values
        are combined in chunk order, so the result is deterministic for a
        given ``chunks`` (with either schedule)."""
        state, job = self._prepare(kernel, arrays, args, halo, chunks, timeout,
                                   schedule, progress, check_combine(combine))
        return state.execute(job)

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

    def _prepare(self, kernel, arrays, args, halo, chunks, timeout, schedule,
                 progress, combine) -> tuple[_State, _Job]:
        """Check everything in the caller's thread, before anything is sent."""
        state = self._live()
        check_kernel(kernel)
        descriptors = describe_arrays(arrays, state.table)
        extra = describe_args(args, state.table)
        halo = coerce_halo(halo)
        timeout = coerce_timeout(timeout)
        dynamic = coerce_schedule(schedule)
        if progress not in (None, True, False):
            raise TypeError(f"progress must be True, False or None (show after "
                            f"about a second); got {progress!r} instead.")
        where = plan_for(arrays[0].shape[0], chunks, halo, len(state.pool.slots),
                         dynamic)                  # also checks chunks and halo
        return state, _Job(kernel, arrays, descriptors, extra, halo, where,
                           timeout, dynamic, progress, combine is not None, combine)

    # -- non-blocking ------------------------------------------------------

    def submit(self, kernel: Callable, *arrays: np.ndarray, args: Sequence = (),
               halo: int = 0, chunks=None, timeout: float | None = None,
               schedule: str = "static", progress: bool | None = False) -> MapFuture:
        """Start ``map(kernel, *arrays, ...)`` and return at once with a
        ``concurrent.futures.Future`` (result None).

        Arguments are checked here, in the caller.  Submitted maps run one at
        a time, in submission order, on the engine's dispatcher thread;
        ``future.cancel()`` also stops a running one (its workers are killed
        and replaced).  The arrays stay alive until the map ends.
        """
        state, job = self._prepare(kernel, arrays, args, halo, chunks, timeout,
                                   schedule, progress, None)
        return state.submit(job)

    def submit_reduce(self, kernel: Callable, *arrays: np.ndarray, args: Sequence = (),
                      combine: Callable[[Any, Any], Any] = operator.add,
                      halo: int = 0, chunks=None, timeout: float | None = None,
                      schedule: str = "static",
                      progress: bool | None = False) -> MapFuture:
        """``submit`` for ``reduce``: the future's result is the combined value."""
        state, job = self._prepare(kernel, arrays, args, halo, chunks, timeout,
                                   schedule, progress, check_combine(combine))
        return state.submit(job)

    async def map_async(self, kernel: Callable, *arrays: np.ndarray, **options) -> None:
        """``await eng.map_async(kernel, *arrays, ...)``: ``map`` for asyncio
        code (same arguments).  The event loop stays free while the workers
        run; cancelling the task stops the map."""
        await asyncio.wrap_future(self.submit(kernel, *arrays, **options))

    async def reduce_async(self, kernel: Callable, *arrays: np.ndarray, **options) -> Any:
        """``reduce`` for asyncio code (same arguments)."""
        return await asyncio.wrap_future(self.submit_reduce(kernel, *arrays, **options))


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
    if not isinstance(dims, Sequence) or not all(_is_int(d) for d in dims):
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
    if isinstance(dtype, np.dtype):
        _PLAIN_DTYPES.add(dtype)
    return dt


def coerce_timeout(timeout: object) -> float | None:
    """
    >>> coerce_timeout(None), coerce_timeout(2)
    (None, 2.0)
    """
    if timeout is None:
        return None
    if not isinstance(timeout, numbers.Real) or isinstance(timeout, bool):
        raise TypeError(f"timeout must be a number of seconds or None; got {timeout!r} instead.")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive (seconds); got {timeout!r} instead.")
    return float(timeout)


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


def describe_arrays(arrays: tuple, table: BlockTable) -> tuple[ArrayDescriptor, ...]:
    if not arrays:
        raise TypeError("map/reduce needs at least one array after the kernel.")
    out = []
    for i, a in enumerate(arrays):
        if not isinstance(a, np.ndarray):
            raise TypeError(
                f"{_where(i)} is a {type(a).__name__}; pass NumPy arrays made "
                f"by this engine (eng.empty, eng.zeros, eng.from_numpy). Extra "
                f"scalar arguments go in args=(...).")
        if a.ndim == 0:
            raise ValueError(
                f"{_where(i)} is 0-dimensional; map splits axis 0, so arrays "
                f"need at least one dimension. Pass scalars in args=(...).")
        if a.dtype not in _PLAIN_DTYPES:
            coerce_dtype(a.dtype, _where(i))
        d = describe(a, table)
        if d is None:
            raise ValueError(
                f"{_where(i)} is a private array: its memory is not in this "
                f"engine's shared blocks, so workers cannot see it. Copy it "
                f"in with eng.from_numpy(a), or allocate with eng.empty / "
                f"eng.zeros.")
        out.append(d)
    n = arrays[0].shape[0]
    if any(a.shape[0] != n for a in arrays):
        raise ValueError(
            f"all arrays must have the same length along axis 0 (map splits "
            f"rows); got lengths {[a.shape[0] for a in arrays]}.")
    return tuple(out)


def describe_args(args: object, table: BlockTable) -> tuple:
    """Extra kernel arguments.  Shared arrays travel as descriptors and reach
    the kernel whole; anything else is pickled with every call, so keep it
    small."""
    if not isinstance(args, (tuple, list)):
        raise TypeError(
            f"args must be a tuple of extra kernel arguments; got {args!r} of "
            f"type {type(args).__name__}. Write args=({args!r},) for one.")
    out = []
    for a in args:
        if isinstance(a, np.ndarray) and a.ndim > 0:
            d = describe(a, table)
            if d is not None:
                a = d
        out.append(a)
    return tuple(out)
