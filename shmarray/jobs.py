"""What a map is, once checked: kernels by key, jobs by signature.

A *job* is everything about a map that a time-stepping loop repeats: the
kernel, the arrays (as descriptors), which arguments are shared arrays, the
halo and the chunks.  It is checked once, given a key, and defined once in
each worker; a repeat of the same call finds it by a cheap signature and
sends only a ring.  Plain arguments (a time step, a coefficient) are not
part of the job: when they change, the workers get them in a small Rebind.

Measured on the reference VM, per map with two arrays: checking and
describing everything again costs about 25 us; the signature lookup 2 us.
"""

from __future__ import annotations

import collections
import itertools
import threading
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from shmarray import control, options
from shmarray.descriptors import ArrayDescriptor, Placeholder, chunk_calls, kernel_payload
from shmarray.partition import Plan, plan_for


class KernelTable:
    """Kernels by key, with their pickled payload.

    Holds each kernel strongly so its ``id()`` cannot be reused while the key
    lives; the least recently used kernel is dropped past ``capacity``.
    Used by the driver thread only.
    """

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self._entries: collections.OrderedDict[int, tuple[int, Any, bytes]] = (
            collections.OrderedDict()
        )
        self._next_key = 0

    def entry(self, kernel) -> tuple[int, bytes, list[int]]:
        """(key, payload, keys evicted to make room)."""
        found = self._entries.get(id(kernel))
        if found is not None:
            self._entries.move_to_end(id(kernel))
            return found[0], found[2], []
        payload = kernel_payload(kernel)
        self._next_key += 1
        self._entries[id(kernel)] = (self._next_key, kernel, payload)
        evicted = []
        while len(self._entries) > self.capacity:
            evicted.append(self._entries.popitem(last=False)[1][0])
        return self._next_key, payload, evicted


# What a retry takes over from its job as it is (Job.retry).
_GIVEN = (
    "kernel",
    "_refs",
    "descriptors",
    "args",
    "halo",
    "want_values",
    "iterated",
    "axis",
    "boundary",
    "mode",
    "share",
)


class Job:
    """The checked, repeatable part of a map or reduce: immutable.

    ``args`` is the template: the descriptors of shared arrays, None for
    plain values (which come with each call).  The job keeps weak references
    to every array it describes, so a cached job never outlives them and a
    recycled ``id()`` never matches it.  ``cached``: False for a job made
    for one call only, which the driver forgets after running it.  Where a
    job runs, and what its workers hold, is the driver's business
    (``holdings.Placement``), not the job's.
    """

    __slots__ = (
        "key",
        "kernel",
        "descriptors",
        "args",
        "halo",
        "plan",
        "dynamic",
        "iterated",
        "want_values",
        "axis",
        "boundary",
        "blocks",
        "cached",
        "_refs",
        "mode",
        "indices",
        "share",
        "args_are_plain",
        "tracked",
        "round_words",
    )
    # (set once, in _init)
    key: int
    kernel: Callable
    descriptors: tuple
    args: tuple
    halo: int
    plan: Plan
    dynamic: bool
    iterated: bool
    want_values: bool
    axis: int
    boundary: Any
    blocks: frozenset[str]
    cached: bool
    _refs: tuple
    mode: int
    indices: tuple[int, ...] | None
    # prepare(in_caller=True): (worker, chunk indices, chunks) of the share
    # the caller runs itself, in place of that worker (not in plan.groups).
    share: tuple | None
    args_are_plain: bool
    tracked: bool
    round_words: bool

    def __init__(
        self,
        key: int,
        kernel: Callable,
        arrays: tuple,
        descriptors: tuple,
        args: tuple,
        halo: int,
        plan: Plan,
        dynamic: bool,
        want_values: bool,
        iterated: bool = False,
        axis: int = 0,
        boundary=None,
        mode: int = 0,
        cached: bool = False,
        share: tuple | None = None,
    ):
        """``args``: the template (see above); ``iterated``: swap the first
        two arrays after each of several steps (``Engine.iterate``);
        ``axis``: the split axis; ``boundary``: a ``boundary.Boundary``;
        ``mode``: ``control.COLLECT | TRACK | STREAM`` bits; ``cached``: kept
        by the JobCache (repeats find it)."""
        self._init(
            key=key,
            kernel=kernel,
            _refs=tuple(weakref.ref(a) for a in arrays),
            descriptors=descriptors,
            args=args,
            halo=halo,
            plan=plan,
            dynamic=dynamic,
            want_values=want_values,
            iterated=iterated,
            axis=axis,
            boundary=boundary,
            mode=mode,
            cached=cached,
            indices=None,  # a retry's: the chunks' places in the whole map
            share=share,
        )

    def _init(self, **given) -> None:
        """Set the fields ``given`` and those that follow from them, once."""
        mode, args = given["mode"], given["args"]
        derived = {
            "tracked": bool(mode & control.TRACK),
            # Its rounds use NEXT and STOP (reset before each).
            "round_words": given["dynamic"]
            or given["iterated"]
            or given["boundary"] is not None
            or bool(mode & control.TRACK),
            "blocks": frozenset(
                [d.block for d in given["descriptors"]] + [a.block for a in args if a is not None]
            ),
            "args_are_plain": all(t is None for t in args),
        }
        for name, value in (given | derived).items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"a Job is immutable (tried to set {name!r})")

    def retry(self, key: int, indices: list[int], dynamic: bool = True) -> Job:
        """A job for one call that runs chunks ``indices`` of this one
        again, ghost cells already filled: dynamically (whichever worker is
        free), or, with ``dynamic=False``, on the one worker it is given
        (a replacement taking over a dead worker's rows)."""
        job = object.__new__(Job)
        job._init(
            **{name: getattr(self, name) for name in _GIVEN},
            key=key,
            plan=Plan(tuple(self.plan.chunks[i] for i in indices), ()),
            dynamic=dynamic,
            cached=False,
            indices=tuple(indices),
        )
        return job

    def holds(self, arrays: tuple) -> bool:
        """Whether ``arrays`` are the very objects this job describes."""
        return all(r() is a for r, a in zip(self._refs, arrays))

    def bind(self, args: tuple) -> tuple:
        """This call's arguments: the template's descriptors, the caller's
        plain values (``args`` itself when there are no shared arrays, so
        nothing here keeps an array alive)."""
        if self.args_are_plain:
            return args
        return tuple(a if t is None else t for t, a in zip(self.args, args))


class Layout(NamedTuple):
    """How a call lays its arrays out, and how it treats failures: part of
    what defines a job."""

    halo: int
    chunks: object
    schedule: str
    axis: int
    boundary: object
    mode: int = 0  # control.COLLECT | TRACK | STREAM | PREPARED | IN_CALLER


class Call(NamedTuple):
    """One map or reduce to run: a job and what varies per call."""

    job: Job
    args: tuple
    timeout: float | None
    progress: bool | None
    combine: Callable | None
    steps: int = 1  # an iterated job's steps
    arrays: tuple = ()  # the caller's arrays: alive until the call ends
    retries: int = 0  # runs again of a chunk whose worker died or timed out
    collect: bool = False  # errors="collect": return a MapReport
    stream: Any = None  # imap's Stream: values go there as they come
    share: tuple = ()  # in_caller: the kernel's arguments for each chunk the caller runs


# Plain values that compare cheaply and exactly; anything else (a list, a
# private array, an object) may have changed in place and is sent again.
_PLAIN = (int, float, complex, bool, str, bytes, type(None), np.generic, Placeholder)


def same_args(held: tuple, args: tuple) -> bool:
    """Whether a worker holding ``held`` needs no Rebind for ``args``.

    >>> same_args((1.5, "x"), (1.5, "x")), same_args((1.5,), (2.5,))
    (True, False)
    >>> same_args((1,), (1.0,)), same_args(([1],), ([1],))
    (False, False)
    >>> nan = float("nan"); same_args((nan,), (nan,))
    True

    ``held`` is what a job's ``bind`` gave: descriptors where the job has
    shared arrays, which the job's signature already fixes.
    """
    if held is args:
        return True
    if len(held) != len(args):
        return False
    for h, a in zip(held, args):
        if type(h) is ArrayDescriptor:
            continue  # a shared array: fixed by the job
        if h is a and isinstance(a, _PLAIN):
            continue
        if type(h) is not type(a) or not isinstance(a, _PLAIN):
            return False
        try:
            if not bool(h == a):
                return False
        except Exception:
            return False
    return True


def _plain_chunks(chunks) -> object:
    """``chunks`` in a hashable, exact form for a signature, or a marker
    that makes the call check in full."""
    if chunks is None or type(chunks) is int:
        return chunks
    if type(chunks) in (list, tuple) and all(type(c) is int for c in chunks):
        return tuple(chunks)
    return _UNUSUAL


_UNUSUAL = object()


def signature(
    kernel,
    arrays: tuple,
    args,
    halo,
    chunks,
    schedule,
    axis,
    boundary,
    mode: int,
    want_values: bool,
) -> tuple | None:
    """A cheap key for a call, or None when the call must be checked in full
    (anything unusual: the full check then explains what is wrong).

    Lists and tuples of args, chunk sizes as a list or a tuple, and NumPy
    scalars as a boundary constant all have one: a loop that passes them
    pays only the lookup.  Arrays count by identity, shape, strides and
    dtype: an ndarray's data pointer cannot be reassigned (NumPy 2), its
    shape, strides and dtype can.  (Written for speed: it runs on every
    map, about 1 us with two arrays.)
    """
    if type(halo) is not int or type(axis) is not int:
        return None
    ta = type(args)
    if ta is not tuple and ta is not list:
        return None
    if chunks is not None and type(chunks) is not int:
        chunks = _plain_chunks(chunks)
        if chunks is _UNUSUAL:
            return None
    if boundary is not None:
        tb = type(boundary)
        if tb is not str and tb is not float and tb is not int and tb is not complex:
            if isinstance(boundary, np.generic) and not isinstance(boundary, np.bool_):
                boundary = boundary.item()
                tb = type(boundary)
            else:
                return None
        boundary = (tb, boundary)
    key: tuple = (id(kernel), halo, chunks, schedule, want_values, len(args), axis, boundary, mode)
    for a in arrays:
        if type(a) is not np.ndarray:
            return None
        key += (id(a), a.shape, a.strides, a.dtype)
    for i, a in enumerate(args):
        if isinstance(a, np.ndarray):
            if type(a) is not np.ndarray:
                return None
            key += (i, id(a), a.shape, a.strides, a.dtype)
    return key


class JobCache:
    """Jobs by signature, for every thread that calls the engine.

    Lookups take no lock (a dict read is atomic); adding takes one.  Past
    ``capacity`` the oldest job is dropped, and its key queued in
    ``forgotten`` so the driver tells the workers to drop it too.
    """

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self._jobs: dict[tuple, Job] = {}
        self._lock = threading.Lock()
        self._keys = itertools.count(1)
        self.forgotten: collections.deque[int] = collections.deque()

    def get(self, sig: tuple | None, kernel, arrays: tuple, args: tuple) -> Job | None:
        if sig is None:
            return None
        job = self._jobs.get(sig)
        if job is None or job.kernel is not kernel:
            return None
        refs = job._refs
        if job.args_are_plain and len(refs) == len(arrays):
            for r, a in zip(refs, arrays):
                if r() is not a:
                    return None
            return job
        if not job.holds(arrays + tuple(a for a in args if type(a) is np.ndarray)):
            return None
        return job

    def new_key(self) -> int:
        return next(self._keys)

    def add(self, sig: tuple | None, job: Job) -> Job:
        """Keep ``job`` (made ``cached`` for a ``sig``) for repeats."""
        if sig is None:  # not cacheable: forgotten after its call
            return job
        with self._lock:
            old = self._jobs.pop(sig, None)
            if old is not None:
                self.forgotten.append(old.key)
            self._jobs[sig] = job
            while len(self._jobs) > self.capacity:
                self.forgotten.append(self._jobs.pop(next(iter(self._jobs))).key)
        return job

    def drop_blocks(self, names: set[str]) -> None:
        """Forget jobs over blocks that are gone (the workers drop them by
        themselves when they unmap the blocks)."""
        with self._lock:
            for sig in [s for s, j in self._jobs.items() if j.blocks & names]:
                del self._jobs[sig]


class Calls:
    """Turns what a caller passed into a Call, in the caller's thread,
    before anything is sent: a new job is checked in full
    (``shmarray.options``); a repeat is found by its signature and skips
    the checks that cannot have changed."""

    def __init__(self, cache: JobCache, table, workers: int):
        self.cache = cache
        self.table = table
        self.workers = workers

    def make(
        self,
        kernel,
        arrays: tuple,
        args,
        opts,
        combine: Callable | None,
        steps: int = 1,
        stream: Any = None,
        iterated: bool = False,
        prepared: bool = False,
        in_caller: bool = False,
    ) -> Call:
        want_values = combine is not None
        halo, chunks, schedule, axis, boundary, timeout, progress, retries, errors = opts
        if (
            type(retries) is not int
            or retries != 0
            or errors != "raise"
            or stream is not None
            or prepared
        ):
            retries = options.coerce_retries(retries)
            collect = options.coerce_errors(errors)
            mode = (
                control.TRACK
                | (control.COLLECT if collect else 0)
                | (control.STREAM if stream is not None else 0)
                if retries or collect or stream is not None
                else 0
            )
            if prepared:
                mode |= control.PREPARED | (control.IN_CALLER if in_caller else 0)
        else:
            collect, mode = False, 0
        if iterated:
            schedule = "iterate"
        sig = signature(
            kernel, arrays, args, halo, chunks, schedule, axis, boundary, mode, want_values
        )
        job = self.cache.get(sig, kernel, arrays, args)
        if job is None:
            layout = Layout(halo, chunks, schedule, axis, boundary, mode)
            job = self.cache.add(
                sig, self._new_job(kernel, arrays, args, layout, want_values, sig is not None)
            )
        if timeout is not None:
            timeout = options.coerce_timeout(timeout)
        if progress is not None and progress is not True and progress is not False:
            options.coerce_progress(progress)
        args = args if type(args) is tuple else tuple(args)
        share: tuple = ()
        if job.share is not None:
            if progress:
                raise ValueError(
                    "prepare(in_caller=True) shows no progress bar: the caller "
                    "runs a share itself. Leave progress= out, or prepare "
                    "without in_caller."
                )
            worker, _, chunks = job.share
            share = tuple(chunk_calls(list(arrays), args, chunks, job.halo, job.axis, worker))
        return Call(
            job,
            args,
            timeout,
            progress,
            combine,
            steps,
            arrays,
            retries,
            collect,
            stream,
            share,
        )

    def _new_job(
        self, kernel, arrays: tuple, args, layout: Layout, want_values: bool, cached: bool
    ) -> Job:
        iterated = layout.schedule == "iterate"
        method = "iterate" if iterated else "reduce" if want_values else "map"
        options.check_kernel(kernel)
        args = options.coerce_args(args)
        halo = options.coerce_halo(layout.halo)
        axis = options.coerce_axis(layout.axis, arrays)
        descriptors = options.describe_arrays(arrays, self.table, axis, method)
        options.check_arity(kernel, len(arrays), len(args), method)
        options.warn_python_kernel(kernel)
        described = options.describe_args(args, self.table)
        dynamic = not iterated and options.coerce_schedule(layout.schedule)
        bound = options.coerce_boundary(layout.boundary)
        if bound is not None:
            options.check_boundary(bound, arrays, halo)
        where = plan_for(arrays[0].shape[axis], layout.chunks, halo, self.workers, dynamic)
        # The arrays the job describes, including shared ones among the args
        # (those, and only those, become descriptors in its template).
        refs = tuple(arrays) + tuple(a for a in args if type(a) is np.ndarray)
        template = tuple(
            d if isinstance(a, np.ndarray) and type(d) is ArrayDescriptor else None
            for a, d in zip(args, described)
        )
        if iterated:
            options.check_swappable(arrays[0], arrays[1])
        if layout.mode & control.TRACK:
            options.check_trackable(len(where.chunks))
        share = None
        if layout.mode & control.IN_CALLER:
            options.check_in_caller(dynamic, bound, layout.mode & control.TRACK)
            # The caller takes the last worker's share; that worker is
            # never rung for this job.
            share = where.groups[-1]
            where = Plan(where.chunks, where.groups[:-1])
        return Job(
            self.cache.new_key(),
            kernel,
            refs,
            descriptors,
            template,
            halo,
            where,
            dynamic,
            want_values,
            iterated,
            axis,
            bound,
            layout.mode,
            cached,
            share,
        )
