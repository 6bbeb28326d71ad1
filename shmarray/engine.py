"""The public facade: allocate shared arrays, map and reduce kernels over them.

The Engine holds no logic of its own: it checks its arguments into records
(``shmarray.options``), turns calls into jobs (``shmarray.jobs``) and hands
them to the dispatcher (``shmarray.dispatch``), which runs them on the pool.
"""

from __future__ import annotations

import asyncio
import math
import operator
import os
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Unpack, overload

import numpy as np
import numpy.typing as npt
from numpy.typing import NDArray

from shmarray import blocks, check as races, compiling, display, loading, options as checks
from shmarray.batch import ChunkStream, Sink, WorkerStats
from shmarray.blocks import Block, BlockTable, format_bytes
from shmarray.check import CheckReport
from shmarray.dispatch import Dispatcher, MapFuture
from shmarray.errors import EngineClosedError, MapReport, RaceError
from shmarray.jobs import Call, Calls, JobCache
from shmarray.options import (
    CallOptions,
    CheckOptions,
    Errors,
    IterateOptions,
    MapOptions,
    Order,
    ReduceOptions,
    Schedule,
    StartMethod,
    StorageKind,
    Wait,
    call_options,
)
from shmarray.pool import Pool
from shmarray.prepared import PreparedMap

if TYPE_CHECKING:
    from shmarray.compare import Comparison  # imported when first used

Kernel = Callable[..., Any]
_T = TypeVar("_T")  # what a reduce's kernel returns

# This process's pid, kept current across fork() without a system call per
# map (os.getpid() costs 0.2 us).
_pid = os.getpid()


def _after_fork() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork)


class Engine:
    """Shared-memory arrays and a persistent pool of worker processes.

    The engine allocates NumPy arrays in shared memory (``empty``,
    ``zeros``, ``from_numpy``) and runs kernels on slices of them in its
    worker processes, in place (``map``, ``reduce``, ``imap``,
    ``iterate``, ``prepare``; ``submit`` and ``map_async`` without
    blocking).  Only descriptors of the arrays travel to the workers.

    Parameters
    ----------
    workers : int or None
        Worker processes.  None: ``SHMARRAY_WORKERS`` if set, else one per
        usable CPU (CPU affinity and cgroup quotas counted).
    start_method : {"forkserver", "spawn", "fork"}, optional
        How workers start (default "forkserver": shmarray's own fork server;
        no worker ever imports your ``__main__``).
    max_tasks_per_worker : int, optional
        Replace a worker after this many tasks (between maps).  None: never.
    startup_timeout : float
        Seconds to wait for the workers to start (default 120).
    initializer : callable, optional
        ``initializer(*initargs)`` runs once in every worker, replacements
        included, before its first task.  ``shmarray.worker_id`` in
        ``initargs`` becomes the worker's index.  Globals it sets in your
        script are seen by kernels defined in the same script.
    initargs : tuple
        Arguments of ``initializer``.
    max_worker_memory : int, optional
        Bytes of unique memory (USS: not counting the shared blocks) above
        which a worker is replaced, between maps.
    wait : {"auto", "spin", "passive"}, optional
        The wait policy (see ``shmarray.waiting``); None: ``SHMARRAY_WAIT``,
        else "auto".
    storage : {"shm", "memfd"} or path, optional
        Where blocks live (see ``shmarray.blocks``).  "shm": named blocks in
        ``/dev/shm``, bounded by its size (64 MB in a default Docker
        container).  "memfd": anonymous shared memory, bounded only by the
        machine's memory, which cannot outlive its processes, whatever
        kills them (Linux).  A directory: blocks are files there, mapped
        shared, for data bigger than ``/dev/shm`` or than RAM: give it as
        a ``pathlib.Path`` (a plain str works too, but a type checker then
        cannot tell a misspelt "memfd" from a directory).  None:
        ``SHMARRAY_STORAGE`` if set, else "shm".  A near miss of a kind
        ("memfdd") is refused with the kind it meant.

    Raises
    ------
    TypeError, ValueError
        An argument of the wrong type or out of range (also a bad
        ``SHMARRAY_WORKERS`` or ``SHMARRAY_WAIT``); nothing was started.
    WorkerStartError
        A worker could not start (its initializer raised, the environment is
        broken, or ``startup_timeout`` passed).  Nothing is left running.

    Notes
    -----
    Lifecycle: the engine creates every block (``empty``, ``zeros``,
    ``from_numpy``) and unlinks each name once, when the last array over it
    dies or at ``close()``.  ``close()`` also stops every worker.  It is
    idempotent and runs by itself when the engine is garbage collected and
    at interpreter exit.  Arrays still held after ``close()`` stay
    readable; their memory is freed with the last reference.

    Thread safety: every method may be called from any thread.  Maps and
    reductions run one at a time per engine, in the order they were asked
    for; ``submit``/``map_async`` return at once whatever is running, and a
    blocking ``map`` waits its turn.  ``close()`` from another thread ends
    a running map with EngineClosedError and returns promptly.

    Examples
    --------
    Use it as a context manager: leaving the block unlinks every block and
    stops every worker, whatever happened inside::

        import numpy as np
        from numba import njit
        import shmarray

        @njit
        def scale(out, x, a):
            for i in range(x.shape[0]):
                out[i] = a * x[i]

        with shmarray.Engine(workers=2) as eng:
            x = eng.from_numpy(np.random.rand(10**7))
            y = eng.empty(x.shape, x.dtype)
            eng.map(scale, y, x, args=(2.5,))
    """

    _dispatcher: Dispatcher | None = None  # close() is safe after a failed __init__
    _check_first = False
    _finalizer: weakref.finalize | None = None

    @checks.suggest_keywords
    def __init__(
        self,
        workers: int | None = None,
        *,
        start_method: StartMethod | None = None,
        max_tasks_per_worker: int | None = None,
        startup_timeout: float = 120.0,
        initializer: Callable[..., Any] | None = None,
        initargs: Sequence[Any] = (),
        max_worker_memory: int | None = None,
        wait: Wait | None = None,
        storage: StorageKind | os.PathLike[str] | None = None,
    ):
        opts = checks.engine_options(
            workers,
            start_method,
            max_tasks_per_worker,
            startup_timeout,
            initializer,
            initargs,
            max_worker_memory,
            wait,
            storage,
        )
        self._owner = _pid
        cache = JobCache()
        store = blocks.storage_for(opts.storage)
        pool = Pool(
            opts.workers,
            opts.start_method,
            opts.startup_timeout,
            opts.max_tasks,
            opts.max_memory,
            opts.initializer,
            opts.wait,
            store,
        )
        table = BlockTable(store)
        watchdog = pool.watchdog
        assert watchdog is not None  # a Pool is built whole or not at all
        table.on_create = lambda name: watchdog.blocks(created=(name,))
        self._calls = Calls(cache, table, pool.size)
        self._dispatcher = Dispatcher(pool, table, cache)
        self._finalizer = weakref.finalize(self, self._dispatcher.close)
        # SHMARRAY_CHECK=1: the first map of every kernel and signature in
        # this process is race-checked (shmarray.check).
        self._check_first = races.from_environment()

    # -- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        """Unlink every block and stop every worker.

        Idempotent, and callable from any thread: a running map ends with
        EngineClosedError, queued ones are cancelled.  Interrupted (Ctrl-C),
        calling it again finishes the job.  From a signal handler too (a
        service's SIGTERM): if the signal came while the engine held a lock
        of its own, it returns at once and another thread finishes.  In a
        forked child it does nothing: the parent owns the engine.  Leaving
        a ``with`` block, the engine's garbage collection and interpreter
        exit call it too.

        Arrays still held stay readable; their memory is freed with the
        last reference.  Every other method raises EngineClosedError
        afterwards.
        """
        if os.getpid() != self._owner:
            return
        if self._finalizer is not None and self._finalizer.alive:
            self._finalizer()
        elif self._dispatcher is not None:
            self._dispatcher.close()  # finish an interrupted close

    @property
    def closed(self) -> bool:
        """Whether ``close()`` has run."""
        return self._finalizer is None or not self._finalizer.alive

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        d = self._dispatcher
        if self.closed or d is None:
            return "<shmarray.Engine closed>"
        try:
            stats = self.stats()
        except Exception:  # closing meanwhile, or a forked child's copy
            return f"<shmarray.Engine workers={d.pool.size} (not this process's)>"
        uss = max((s.uss for s in stats), default=0)
        return (
            f"<shmarray.Engine workers={d.pool.size} "
            f"start_method={d.pool.start_method!r} "
            f"storage={d.table.storage.spec!r} "
            f"blocks={len(d.table.live())} "
            f"tasks={sum(s.tasks for s in stats)} "
            f"busy={sum(s.busy for s in stats):.1f}s "
            f"max_worker_uss={format_bytes(uss)} "
            f"replaced={sum(s.replaced for s in stats)}>"
        )

    _repr_html_ = display.engine_html  # a notebook's view: workers and blocks

    def _live(self) -> Dispatcher:
        d = self._dispatcher
        if _pid != self._owner:
            raise RuntimeError(
                "this Engine belongs to process "
                f"{self._owner}; a forked child cannot use it. Create an "
                "Engine in the child instead."
            )
        if d is None or d.closing:
            raise EngineClosedError(
                "this Engine is closed: its blocks are unlinked and its "
                "workers stopped. Create a new Engine (preferably in a "
                "`with` block)."
            )
        return d

    @property
    def workers(self) -> int:
        """The number of worker processes."""
        return self._live().pool.size

    @property
    def worker_pids(self) -> list[int]:
        """The workers' process ids, by worker index."""
        return self._live().pool.pids

    @property
    def start_method(self) -> str:
        """How the workers were started."""
        return self._live().pool.start_method

    @property
    def wait(self) -> str:
        """The wait policy: "auto", "spin" or "passive"."""
        return self._live().pool.policy.name

    @property
    def storage(self) -> str:
        """Where the blocks live: "shm", "memfd", or a directory's absolute path."""
        return self._live().table.storage.spec

    @property
    def blocks(self) -> list[Block]:
        """The engine's live blocks (name, size in bytes, address)."""
        return self._live().table.live()

    def stats(self) -> list[WorkerStats]:
        """One record per worker.

        Returns
        -------
        list of WorkerStats
            By worker index: pid, memory (RSS and unique, in bytes), chunks
            run, kernels held, seconds busy, times its place was taken by a
            replacement (crash, timeout, recycling), and maps it ran in its
            compiled serving loop.  Counts are the current process's, since
            it started.

        Raises
        ------
        EngineClosedError
            The engine is closed.
        """
        pool = self._live().pool
        ctl = pool.ctl
        assert ctl is not None  # a Pool is built whole or not at all
        out = []
        for w in list(pool.workers):
            rss, uss = w.memory()
            chunks, busy_ns = ctl.totals(w.index)
            out.append(
                WorkerStats(
                    w.index,
                    w.pid,
                    rss,
                    uss,
                    chunks - w.chunks_at_start,
                    len(w.kernels),
                    (busy_ns - w.busy_at_start) / 1e9,
                    pool.replaced[w.index],
                    ctl.served(w.index) - w.served_at_start,
                )
            )
        return out

    # -- allocation --------------------------------------------------------

    def empty(
        self, shape: int | Sequence[int], dtype: npt.DTypeLike = np.float64, order: Order = "C"
    ) -> NDArray[Any]:
        """A new array in shared memory.

        Parameters
        ----------
        shape : int or tuple of int
            The array's shape, as for ``numpy.empty``.
        dtype : dtype-like
            Items of a fixed size (numbers, datetimes, fixed-length
            strings): no Python objects, no records.  Default float64.
        order : {"C", "F"}
            Row-major (C, the default) or column-major (Fortran) layout.

        Returns
        -------
        numpy.ndarray
            A plain ndarray whose memory lives in a shared block.  Its
            contents are zero (the block is freshly reserved), but do not
            rely on that: use ``zeros``.  Views and slices of it are
            recognised as shared when passed back to the engine.

        Raises
        ------
        TypeError, ValueError
            A bad shape, dtype or order.
        SharedMemoryFullError
            The shared-memory filesystem cannot hold it.
        EngineClosedError
            The engine is closed.

        Examples
        --------
        ::

            y = eng.empty((1000, 1000), np.float32)
        """
        d = self._live()
        shape = checks.coerce_shape(shape)
        dtype = checks.coerce_dtype(dtype, "dtype")
        order = checks.coerce_order(order)
        if d.table.has_released():
            d.tidy()  # let workers unmap dead blocks before asking for more
        buf = d.table.allocate(math.prod(shape) * dtype.itemsize)
        return np.ndarray(shape, dtype, buffer=buf, order=order)

    def zeros(
        self, shape: int | Sequence[int], dtype: npt.DTypeLike = np.float64, order: Order = "C"
    ) -> NDArray[Any]:
        """A new zero-filled array in shared memory.

        Parameters
        ----------
        shape, dtype, order
            As for ``empty``.

        Returns
        -------
        numpy.ndarray
            All zeros; a plain ndarray whose memory lives in a shared block.

        Raises
        ------
        TypeError, ValueError, SharedMemoryFullError, EngineClosedError
            As for ``empty``.
        """
        # A new block is reserved with posix_fallocate/ftruncate: all zeros.
        return self.empty(shape, dtype, order)

    def from_numpy(self, array: npt.ArrayLike) -> NDArray[Any]:
        """A shared copy of ``array``.

        Parameters
        ----------
        array : array_like
            A NumPy array, or an array-like read in slabs of about 64 MB so
            that memory peaks near one copy: a ``np.memmap`` (whose pages
            are let go as they are copied), an h5py dataset, a zarr array,
            a dask array (computed into place), or anything with ``shape``,
            ``dtype`` and NumPy slicing.  Anything else goes through
            ``np.asarray``.

        Returns
        -------
        numpy.ndarray
            Same shape and dtype; Fortran order kept for Fortran-contiguous
            NumPy input, C order otherwise.

        Raises
        ------
        TypeError
            The array holds Python objects or records.
        SharedMemoryFullError
            The engine's storage cannot hold it.
        EngineClosedError
            The engine is closed.

        Examples
        --------
        ::

            x = eng.from_numpy(np.random.rand(10**7))
            y = eng.from_numpy(np.load("big.npy", mmap_mode="r"))   # in slabs
        """
        self._live()
        return loading.from_array_like(array, self.empty)

    def load(self, path: str | os.PathLike | Any) -> NDArray[Any]:
        """The array of an ``.npy`` file, read straight into a new shared
        array: no private copy, so memory peaks at one copy (``np.load``
        then ``from_numpy`` holds two).

        Parameters
        ----------
        path : str, os.PathLike or binary file object
            A file written by ``np.save``.  Write results back the same way:
            ``np.save(path, x)`` of a shared array writes straight from it.

        Returns
        -------
        numpy.ndarray
            The dtype, shape and order (C or Fortran) saved in the file.
            A path is read by as many threads of this process as the
            engine has workers, a 64 MB slab each.

        Raises
        ------
        ValueError
            Not an ``.npy`` file (an ``.npz`` archive or HDF5 file is named,
            with what to do instead), or a truncated one.
        TypeError
            Object or structured dtypes: shared arrays hold plain numbers.
        SharedMemoryFullError
            The storage cannot hold it.
        """
        d = self._live()
        return loading.load(path, self.empty, threads=d.pool.size)

    # -- compute -----------------------------------------------------------

    def _call(
        self,
        kernel: Kernel,
        arrays: tuple,
        args: Any,
        opts: CallOptions,
        combine: Callable | None,
        steps: int = 1,
        stream: Sink | None = None,
        iterated: bool = False,
        prepared: bool = False,
        in_caller: bool = False,
    ) -> tuple[Dispatcher, Call]:
        """Check everything in the caller's thread, before anything is sent."""
        d = self._dispatcher
        if d is None or d.closing or _pid != self._owner:
            d = self._live()  # raises the right error
        return d, self._calls.make(
            kernel, arrays, args, opts, combine, steps, stream, iterated, prepared, in_caller
        )

    def check(
        self, kernel: Kernel, *arrays: NDArray[Any], **options: Unpack[CheckOptions]
    ) -> CheckReport:
        """Run the map in check mode: find the races a parallel run of
        ``kernel`` would have, without touching ``arrays``.

        Every chunk runs in a worker on private copies of its rows (with
        guard cells past both ends), several times, and the check looks,
        element by element, for a chunk that writes outside its rows (a
        neighbour's rows, halo or ghost cells, or past the end of its
        view), one that reads what another chunk writes in the same map,
        and results that change with the chunking (the chunks' results put
        together, against the kernel run once over the whole array).  A
        map of one chunk (one worker) is checked as two chunks.  See
        ``shmarray.check``.

        Parameters
        ----------
        kernel, *arrays, args, halo, chunks, boundary, axis
            As for ``map``.

        Returns
        -------
        CheckReport
            ``ok`` when no problem was found; else each problem with the
            array, the first offending element's index, the chunk's rows
            and, for a conflict, the other chunk.  ``str()`` reads as a
            list.  When it cannot judge (arrays that share memory, a
            kernel that raises), ``judged`` is False and ``reason`` says
            why.

        Raises
        ------
        TypeError, ValueError, EngineClosedError
            Bad arguments, as for ``map``.

        Examples
        --------
        ::

            report = eng.check(heat_step, new, old, args=(0.2,), halo=1)
            if not report.ok:
                print(report)
        """
        args, opts = call_options("check", "check", options)
        _, call = self._call(kernel, arrays, args, opts, None)  # checked as a map's
        return self._race_check(call, raising=False)

    def _unchecked(self, kernel: Kernel, arrays: tuple, reduce: bool, options: dict) -> Any:
        """``map`` (or ``reduce``), never race-checked, whatever
        ``SHMARRAY_CHECK`` says: for ``compare``, which reports a kernel's
        mismatches itself."""
        kind = "reduce" if reduce else "map"
        combine = checks.check_combine(options.get("combine", operator.add)) if reduce else None
        args, opts = call_options(kind, kind, options)
        d, call = self._call(kernel, arrays, args, opts, combine)
        return d.run(call)

    def _race_check(self, call: Call, raising: bool = True) -> CheckReport:
        """Check ``call``'s kernel (``Engine.check``).  ``raising``: for
        ``check=True``: a kernel with problems raises RaceError, its arrays
        left as one run over the whole array leaves them (when that is safe
        to run); one the check cannot judge runs unchecked, with a warning
        (or raises its own error, as the map will)."""
        job = call.job
        sizes = [hi - lo for lo, hi in job.plan.chunks]
        report = races.run(
            self, job.kernel, call.arrays, call.args, job.halo, sizes, job.boundary, job.axis
        )
        if raising and not report.ok:
            if not report.judged:
                if "raised" not in report.reason:  # the map raises it itself
                    warnings.warn(
                        f"shmarray could not race-check {report.kernel}: {report.reason}",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                return report
            sequential = races.sequential_is_safe(report)
            if sequential:  # one chunk: what a sequential run leaves (not checked again)
                opts = CallOptions(job.halo, 1, "static", job.axis, _as_given(job.boundary))
                d, once = self._call(job.kernel, call.arrays, call.args, opts, None)
                d.run(once)
            raise RaceError(report, sequential)
        return report

    def prepare(
        self,
        kernel: Kernel,
        *arrays: NDArray[Any],
        errors: Errors = "raise",
        in_caller: bool = False,
        **options: Unpack[MapOptions],
    ) -> PreparedMap:
        """A map made ready to run again and again at the least cost.

        Everything is checked once, here; then each ``step()`` rings the
        workers and spins for their answer in one compiled call, and the
        workers run the kernel from compiled code.

        Parameters
        ----------
        kernel, *arrays, args, halo, chunks, timeout, schedule, progress, boundary, axis, retries, errors
            As for ``map``.
        in_caller : bool
            The calling process runs the last worker's share of the chunks
            itself, between ringing the other workers and waiting for them,
            and that worker is not rung: a loop uses as many CPUs as there
            are workers, the caller included (on 2 CPUs with 2 workers, the
            caller is otherwise a third process).  Results are bit-identical
            to ``map``'s.  The trade: the caller's share has no timeout
            (``timeout=`` counts, for the workers, from when it ends), no
            crash isolation (a segfault in the kernel ends the caller), and
            Ctrl-C is answered when it ends (then the round settles as any
            early end does).  A kernel's exception from it keeps its type,
            with a note naming its rows.  Static schedule only, without
            ``boundary=``, ``retries`` or ``errors="collect"``, and no
            progress bar.

        Returns
        -------
        PreparedMap
            ``step()`` runs the map and returns what ``map`` would;
            ``step.swap()`` exchanges the first two arrays for the calls
            that follow (double buffering).  It keeps its arrays alive, and
            its arguments as given (prepare another map to change them).
            The first call compiles the workers' serving loop for this
            kernel (a fraction of a second).

        Raises
        ------
        TypeError, ValueError, EngineClosedError
            As for ``map``, here rather than at each step.  Each step raises
            what ``map`` raises while running.

        Examples
        --------
        ::

            step = eng.prepare(heat_step, new, old, args=(0.2,), halo=1)
            for _ in range(1000):
                step()
                step.swap()
        """
        args, opts = call_options("prepare", "map", options, errors)
        if in_caller is not True and in_caller is not False:
            raise TypeError(f"in_caller must be True or False; got {in_caller!r}.")
        d, call = self._call(kernel, arrays, args, opts, None, prepared=True, in_caller=in_caller)
        if call.share:
            # The caller's share runs beside the workers' first chunks:
            # compile it now, under the workers' lock (shmarray.compiling).
            compiling.compile_first(d.pool.compile_lock, kernel, call.share[0])
        calls = self._calls

        def swapped() -> Call:
            if len(arrays) < 2:
                raise ValueError(
                    f"swap() exchanges the first two arrays; this map has {len(arrays)}."
                )
            checks.check_swappable(arrays[0], arrays[1])
            return calls.make(
                kernel,
                (arrays[1], arrays[0]) + arrays[2:],
                args,
                opts,
                None,
                prepared=True,
                in_caller=in_caller,
            )

        return PreparedMap(d.run, call, swapped)

    @overload
    def map(
        self,
        kernel: Kernel,
        *arrays: NDArray[Any],
        errors: Literal["collect"],
        check: bool = ...,
        **options: Unpack[MapOptions],
    ) -> MapReport: ...

    @overload
    def map(
        self,
        kernel: Kernel,
        *arrays: NDArray[Any],
        errors: Literal["raise"] = ...,
        check: bool = ...,
        **options: Unpack[MapOptions],
    ) -> None: ...

    def map(
        self,
        kernel: Kernel,
        *arrays: NDArray[Any],
        errors: Errors = "raise",
        check: bool = False,
        **options: Unpack[MapOptions],
    ) -> MapReport | None:
        """Run ``kernel`` on every chunk of rows, in the workers, in place.

        For every chunk ``(lo, hi)`` of rows along ``axis``, a worker calls
        ``kernel(*[a[lo-halo:hi+halo] for a in arrays], *args)``; ``map``
        returns when all chunks finished.  The kernel writes into its
        arrays in place: its return value is ignored.

        Parameters
        ----------
        kernel : callable
            A numba ``@njit`` function (from a module, a script or a
            notebook cell) or any picklable callable.
        *arrays : numpy.ndarray
            Arrays of this engine (``empty``, ``zeros``, ``from_numpy``, or
            views of them), all of one length along ``axis``.
        args : tuple
            Extra arguments after the arrays.  Shared arrays travel as
            descriptors and reach the kernel whole; anything else is pickled
            with every call.  ``shmarray.row_offset`` becomes the index of
            the first row passed (``lo - halo``) and ``shmarray.worker_id``
            the worker's index.
        halo : int
            Rows of context on each side: the chunks split the interior rows
            ``[halo, n - halo)``, and each array is passed as rows
            ``[lo - halo, hi + halo)``.
        chunks : int or sequence of int, optional
            None (one per worker; eight per worker when dynamic), a count,
            or sizes adding up to the interior rows.
        timeout : float, optional
            Seconds; on expiry the stuck workers are killed and replaced.
        schedule : {"static", "dynamic"}
            "static": each worker the same rows every call (regular work;
            pages stay warm); "dynamic": chunks to whichever worker is free
            (irregular work).
        progress : bool, optional
            A bar of chunks completed; None follows ``SHMARRAY_PROGRESS``
            (a bar only for a map that runs longer than a second).
        boundary : {None, "wrap", "reflect", "symmetric", "edge"} or number
            Every array carries ``halo`` ghost cells on each side of every
            axis, filled first as ``numpy.pad`` would from the cells inside.
        axis : int
            The axis split into chunks.
        retries : int
            Runs again of a chunk whose worker crashed or timed out
            (``timeout`` is per attempt); a kernel's own exception is final.
        errors : {"raise", "collect"}
            "raise": the first failure raises; "collect": every chunk that
            can run does, and the map returns a MapReport.

        Returns
        -------
        None or MapReport
            None; a MapReport with ``errors="collect"``.

        Raises
        ------
        TypeError, ValueError
            Bad arguments (a private array, arrays of different lengths, an
            unknown mode...), before anything is sent.
        Exception
            The kernel's own exception, as itself, with the worker's
            traceback as its ``__cause__``.
        WorkerCrashedError
            A worker died running a chunk.
        TaskTimeoutError
            ``timeout`` passed.
        EngineClosedError
            The engine was closed, before or during the map.

        Warns
        -----
        CopyWarning
            A private array of more than 1 MiB in ``args``: it is pickled
            with every call, and the kernel's writes to it are lost.

        Examples
        --------
        A three-point stencil, written for the whole array, runs unchanged
        on chunks with ``halo=1``::

            @njit
            def smooth(out, inp):
                for i in range(1, inp.shape[0] - 1):
                    out[i] = (inp[i - 1] + inp[i] + inp[i + 1]) / 3

            eng.map(smooth, y, x, halo=1)
            eng.map(smooth, y, x, halo=1, boundary="wrap")   # ghost cells filled first
            report = eng.map(smooth, y, x, halo=1, errors="collect")
        """
        args, opts = call_options("map", "map", options, errors)
        d, call = self._call(kernel, arrays, args, opts, None)
        if check or (self._check_first and races.first(call)):
            self._race_check(call)
        return d.run(call)

    @overload
    def reduce(
        self,
        kernel: Kernel,
        *arrays: NDArray[Any],
        errors: Literal["collect"],
        check: bool = ...,
        **options: Unpack[ReduceOptions],
    ) -> MapReport: ...

    @overload
    def reduce(
        self,
        kernel: Callable[..., _T],
        *arrays: NDArray[Any],
        errors: Literal["raise"] = ...,
        check: bool = ...,
        **options: Unpack[ReduceOptions],
    ) -> _T: ...

    def reduce(
        self,
        kernel: Kernel,
        *arrays: NDArray[Any],
        errors: Errors = "raise",
        check: bool = False,
        **options: Unpack[ReduceOptions],
    ) -> Any:
        """Run ``kernel`` on every chunk and combine the values it returns.

        As ``map``, but the kernel returns a value for its chunk, and the
        values are combined with ``combine`` in chunk order.

        Parameters
        ----------
        kernel, *arrays, args, halo, chunks, timeout, schedule, progress, boundary, axis, retries, errors
            As for ``map``.
        combine : callable
            Combines two partial values (default ``operator.add``), in
            chunk order: the result is deterministic for a given ``chunks``,
            with either schedule.

        Returns
        -------
        object or MapReport
            The combined value; with ``errors="collect"`` a MapReport whose
            ``value`` combines the chunks that succeeded, in chunk order.

        Raises
        ------
        TypeError, ValueError, WorkerCrashedError, TaskTimeoutError, EngineClosedError
            As for ``map``; and the kernel's own exception, or what
            ``combine`` raised.

        Examples
        --------
        ::

            @njit
            def total(x):
                s = 0.0
                for v in x:
                    s += v
                return s

            s = eng.reduce(total, x)                # x.sum(), up to rounding
            report = eng.reduce(total, x, errors="collect", retries=2)
        """
        combine = checks.check_combine(options.get("combine", operator.add))
        args, opts = call_options("reduce", "reduce", options, errors)
        d, call = self._call(kernel, arrays, args, opts, combine)
        if check or (self._check_first and races.first(call)):
            self._race_check(call)
        return d.run(call)

    def imap(
        self,
        kernel: Kernel,
        *arrays: NDArray[Any],
        errors: Errors = "raise",
        **options: Unpack[ReduceOptions],
    ) -> ChunkStream:
        """Stream ``(rows, value)`` for each chunk as soon as it finishes.

        ``reduce`` as a stream: the values come in the order the chunks
        finish, while the rest run.

        Parameters
        ----------
        kernel, *arrays, args, combine, halo, chunks, timeout, schedule, progress, boundary, axis, retries, errors
            As for ``reduce``.

        Returns
        -------
        ChunkStream
            At once; the map runs on the engine's manager thread.  Closing
            the stream (``close()``, a ``with`` block, or dropping it, as
            leaving a ``for`` loop by ``break`` does) stops the map cleanly:
            no new chunk starts, the running ones finish.  When it is
            exhausted, ``stream.result`` is what ``reduce`` would have
            returned.  With ``errors="raise"`` the first failure raises from
            the loop.

        Raises
        ------
        TypeError, ValueError, EngineClosedError
            As for ``map``, here.  What fails while the map runs raises from
            the iteration instead (with ``errors="raise"``).

        Examples
        --------
        ::

            with eng.imap(score, params, schedule="dynamic", errors="collect") as stream:
                for (lo, hi), value in stream:
                    print(lo, hi, value)
            report = stream.result
        """
        sink = Sink()
        combine = checks.check_combine(options.get("combine", operator.add))
        options.setdefault("progress", False)  # a stream shows its own progress
        args, opts = call_options("imap", "reduce", options, errors)
        d, call = self._call(kernel, arrays, args, opts, combine, stream=sink)
        return ChunkStream(sink, d.submit(call), d.interrupt)

    def iterate(
        self,
        kernel: Kernel,
        out: NDArray[Any],
        inp: NDArray[Any],
        *arrays: NDArray[Any],
        steps: int,
        **options: Unpack[IterateOptions],
    ) -> NDArray[Any]:
        """Run ``steps`` steps of a double-buffered map inside the workers.

        The same as, and bit-identical to, ::

            for _ in range(steps):
                eng.map(kernel, out, inp, *arrays, args=args, halo=halo, chunks=chunks)
                out, inp = inp, out

        but with no round trip to this process between steps: before each
        step a worker waits only for the workers holding the rows next to
        its own to finish the previous one.

        Parameters
        ----------
        kernel, args, halo, chunks, progress, axis
            As for ``map``.  The kernel must read no more of ``inp`` than
            its chunk and halo, as a stencil does.
        out, inp : numpy.ndarray
            The double buffer: same shape and dtype, not overlapping.
        *arrays : numpy.ndarray
            Further arrays, passed to every step unswapped.
        steps : int
            Steps to run (0 runs none).
        timeout : float, optional
            Seconds for all the steps together.
        boundary : as for ``map``
            The ghost cells of every array are filled again before each
            step, by the workers.

        Returns
        -------
        numpy.ndarray
            The array holding the last step's output (``out`` after an odd
            number of steps, ``inp`` after an even one).

        Raises
        ------
        TypeError, ValueError, WorkerCrashedError, TaskTimeoutError, EngineClosedError
            As for ``map``; and the kernel's own exception.

        Examples
        --------
        ::

            last = eng.iterate(heat_step, new, old, steps=1000, args=(0.2,), halo=1)
        """
        steps = checks.coerce_steps(steps)
        args, opts = call_options("iterate", "iterate", options)
        if steps == 0:
            self._live()
            return inp
        d, call = self._call(kernel, (out, inp) + arrays, args, opts, None, steps, iterated=True)
        d.run(call)
        return out if steps % 2 else inp

    def compare(
        self,
        kernel: Kernel,
        *arrays: NDArray[Any],
        args: Sequence[Any] = (),
        halo: int = 0,
        chunks: int | Sequence[int] | None = None,
        schedule: Schedule = "static",
        repeat: int = 5,
        reduce: bool = False,
        combine: Callable[[Any, Any], Any] = operator.add,
    ) -> Comparison:
        """Time ``kernel`` sequentially and through this engine; check the results.

        Both run on copies of ``arrays`` (yours are not touched): the
        kernel on the whole arrays, then through ``map`` (or ``reduce``),
        and the results must be identical.

        Parameters
        ----------
        kernel, *arrays, args, halo, chunks, schedule, combine
            As for ``map`` and ``reduce``; the arrays may be private.
        repeat : int
            Timed rounds (after one to warm up).
        reduce : bool
            The kernel returns a value per chunk: then identical means equal
            to the sequential kernel run chunk by chunk and combined in the
            same order.

        Returns
        -------
        shmarray.Comparison
            Medians, speedup, parallel efficiency, GB/s and the check; it
            prints as a table, renders as one in a notebook, and has
            ``.plot()``.

        Raises
        ------
        TypeError, ValueError, EngineClosedError
            As for ``map``; and the kernel's own exception.

        Examples
        --------
        ::

            print(eng.compare(heat_step, new, old, args=(0.2,), halo=1))
        """
        from shmarray.compare import compare

        self._live()
        checks.check_kernel(kernel)
        return compare(
            self,
            kernel,
            *arrays,
            args=args,
            halo=halo,
            chunks=chunks,
            schedule=schedule,
            repeat=repeat,
            reduce=reduce,
            combine=combine,
        )

    # -- non-blocking ------------------------------------------------------

    def submit(
        self,
        kernel: Kernel,
        *arrays: NDArray[Any],
        errors: Errors = "raise",
        **options: Unpack[MapOptions],
    ) -> MapFuture:
        """Start ``map(kernel, *arrays, ...)`` and return at once.

        It returns whatever is running: submitted maps wait their turn on
        the engine's manager thread.

        Parameters
        ----------
        kernel, *arrays, args, halo, chunks, timeout, schedule, progress, boundary, axis, retries, errors
            As for ``map``; checked here, in the caller.

        Returns
        -------
        MapFuture
            A ``concurrent.futures.Future`` whose result is what ``map``
            returns.  Submitted maps run one at a time, in submission order,
            on the engine's manager thread; ``cancel()`` cancels a queued
            one, ``stop()`` also stops a running one (its workers are
            killed and replaced).  The arrays stay alive until the map ends.

        Raises
        ------
        TypeError, ValueError, EngineClosedError
            As for ``map``, here.  What fails while the map runs is the
            future's exception.

        Examples
        --------
        ::

            future = eng.submit(scale, y, x, args=(2.5,))
            ...                                  # other work meanwhile
            future.result()
        """
        args, opts = call_options("submit", "map", options, errors)
        d, call = self._call(kernel, arrays, args, opts, None)
        return d.submit(call)

    def submit_reduce(
        self,
        kernel: Kernel,
        *arrays: NDArray[Any],
        errors: Errors = "raise",
        **options: Unpack[ReduceOptions],
    ) -> MapFuture:
        """Start ``reduce(kernel, *arrays, ...)`` and return at once.

        ``submit`` for ``reduce``: the future's result is what ``reduce``
        returns.

        Parameters
        ----------
        kernel, *arrays, args, combine, halo, chunks, timeout, schedule, progress, boundary, axis, retries, errors
            As for ``reduce``.

        Returns
        -------
        MapFuture
            As for ``submit``; its result is the combined value (a
            MapReport with ``errors="collect"``).

        Raises
        ------
        TypeError, ValueError, EngineClosedError
            As for ``submit``.
        """
        combine = checks.check_combine(options.get("combine", operator.add))
        args, opts = call_options("submit_reduce", "reduce", options, errors)
        d, call = self._call(kernel, arrays, args, opts, combine)
        return d.submit(call)

    @overload
    async def map_async(
        self,
        kernel: Kernel,
        *arrays: NDArray[Any],
        errors: Literal["collect"],
        **options: Unpack[MapOptions],
    ) -> MapReport: ...

    @overload
    async def map_async(
        self,
        kernel: Kernel,
        *arrays: NDArray[Any],
        errors: Literal["raise"] = ...,
        **options: Unpack[MapOptions],
    ) -> None: ...

    async def map_async(
        self,
        kernel: Kernel,
        *arrays: NDArray[Any],
        errors: Errors = "raise",
        **options: Unpack[MapOptions],
    ) -> MapReport | None:
        """``map`` for asyncio code: ``await eng.map_async(kernel, *arrays, ...)``.

        The event loop stays free while the workers run; cancelling the
        task stops the map (its busy workers are killed and replaced).

        Parameters
        ----------
        kernel, *arrays, args, halo, chunks, timeout, schedule, progress, boundary, axis, retries, errors
            As for ``map``.

        Returns
        -------
        None or MapReport
            As ``map``: None; a MapReport with ``errors="collect"``.

        Raises
        ------
        TypeError, ValueError, WorkerCrashedError, TaskTimeoutError, EngineClosedError
            As for ``map``, when awaited; and the kernel's own exception.

        Examples
        --------
        ::

            async def handle(request):
                await eng.map_async(scale, y, x, args=(request.factor,))
        """
        return await _awaited(self.submit(kernel, *arrays, errors=errors, **options))

    @overload
    async def reduce_async(
        self,
        kernel: Kernel,
        *arrays: NDArray[Any],
        errors: Literal["collect"],
        **options: Unpack[ReduceOptions],
    ) -> MapReport: ...

    @overload
    async def reduce_async(
        self,
        kernel: Callable[..., _T],
        *arrays: NDArray[Any],
        errors: Literal["raise"] = ...,
        **options: Unpack[ReduceOptions],
    ) -> _T: ...

    async def reduce_async(
        self,
        kernel: Kernel,
        *arrays: NDArray[Any],
        errors: Errors = "raise",
        **options: Unpack[ReduceOptions],
    ) -> Any:
        """``reduce`` for asyncio code: ``await eng.reduce_async(kernel, *arrays, ...)``.

        The event loop stays free while the workers run; cancelling the
        task stops the reduction (see ``map_async``).

        Parameters
        ----------
        kernel, *arrays, args, combine, halo, chunks, timeout, schedule, progress, boundary, axis, retries, errors
            As for ``reduce``.

        Returns
        -------
        object or MapReport
            As ``reduce``: the combined value; a MapReport with
            ``errors="collect"``.

        Raises
        ------
        TypeError, ValueError, WorkerCrashedError, TaskTimeoutError, EngineClosedError
            As for ``reduce``, when awaited; and the kernel's own exception.
        """
        return await _awaited(self.submit_reduce(kernel, *arrays, errors=errors, **options))


def _as_given(b) -> Any:
    """A checked boundary as ``boundary=`` takes it."""
    if b is None:
        return None
    return b.value if b.mode == "constant" else b.mode


async def _awaited(future: MapFuture) -> Any:
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        future.stop()  # the task was cancelled: so is the map
        # ... and ends once none of its workers runs (a second cancel
        # ends the wait for that).
        await asyncio.wrap_future(future._quiet)
        raise
