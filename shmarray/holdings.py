"""What each worker holds, and sending it what it lacks.

A worker keeps kernels (``Install``) and job definitions (``Define``) by
key, a job's plain arguments until they change (``Rebind``), and maps
blocks until told they are gone (``Release``); ``Forget`` drops kernels and
jobs.  The coordinator records all of it on each ``WorkerProcess``, so a
replacement, which starts empty, is sent everything again, and a map whose
job every worker already holds with the same arguments is only a ring (the
*lean path*, ``Holdings.ready``).

Used by the driver thread only.
"""

from __future__ import annotations

import numpy as np

from shmarray import boundary
from shmarray.descriptors import Define, Forget, Install, Rebind, Release, pack_args
from shmarray.jobs import JobCache, KernelTable, same_args
from shmarray.pool import Pool, WorkerProcess


class Placement:
    """Where one job runs, and what its workers held when it last ran: the
    driver's state about a job (the Job itself is checked, immutable data).

    Made by ``Holdings.prepare`` on a job's first round and kept by key
    until the job is forgotten.  ``groups``: (worker, chunk indices,
    chunks) for each worker it uses; ``done_at``: their DONE words, for the
    spin; ``workers``: their indices, for the lean path's compiled call;
    ``busy``: their processes when it was last placed; and the holdings'
    ``forgets``, the pool's ``generation`` and the arguments at that time:
    while all three still hold, a repeat is only a ring.
    """

    __slots__ = ("groups", "done_at", "workers", "busy", "forgets", "generation", "args")

    def __init__(self, groups: tuple, done_at: np.ndarray, workers: np.ndarray):
        self.groups = groups
        self.done_at = done_at
        self.workers = workers
        self.busy: list[WorkerProcess] = []
        self.forgets = self.generation = -1
        self.args: tuple = ()


class Holdings:
    """The driver's record of what the workers hold, and the messages that
    keep it true."""

    def __init__(self, pool: Pool, table, cache: JobCache):
        self.pool = pool
        self.table = table
        self.cache = cache
        self.kernels = KernelTable()
        self.defined: dict[int, frozenset[str]] = {}  # job key -> its blocks
        self.placements: dict[int, Placement] = {}  # job key -> where it runs
        self.forgets = 0  # Forget and Release rounds sent

    def ready(self, job, args: tuple) -> Placement | None:
        """The lean path: ``job``'s placement if every worker it uses holds
        it, its kernel and these ``args``, and nothing is pending."""
        placed = self.placements.get(job.key)
        if (
            placed is not None
            and placed.forgets == self.forgets
            and placed.generation == self.pool.generation
            and not self.table.has_released()
            and not self.cache.forgotten
            and (args is placed.args or same_args(placed.args, args))
        ):
            return placed
        return None

    def prepare(self, job, args: tuple, stop) -> Placement:
        """Make every worker ``job`` uses hold it, its kernel and ``args``;
        its placement."""
        if self.table.has_released() or self.cache.forgotten:
            self.tidy()
        key, payload, evicted = self.kernels.entry(job.kernel)
        if evicted:
            self.forget(kernels=evicted)
        placed = self.placements.get(job.key)
        if placed is None:
            groups = self.groups(job)
            assert self.pool.ctl is not None  # a Pool is built whole or not at all
            placed = self.placements[job.key] = Placement(
                groups,
                self.pool.ctl.done_words([w for w, _, _ in groups]),
                np.array([w for w, _, _ in groups], np.int64),
            )
        placed.busy = [
            self.provide(w, job, args, indices, chunks, stop, placed.groups)
            for w, indices, chunks in placed.groups
        ]
        # Valid until a worker is replaced or something is forgotten.
        # (Bound, so the placement holds descriptors, never the caller's
        # arrays.)
        placed.forgets, placed.generation = self.forgets, self.pool.generation
        placed.args = job.bind(args)
        return placed

    def groups(self, job) -> tuple:
        """(worker, chunk indices, chunks) for each worker the job uses:
        static, each its own group; dynamic, every worker all chunks."""
        chunks = job.plan.chunks
        if not job.dynamic:
            return job.plan.groups
        indices = job.indices or tuple(range(len(chunks)))
        return tuple((w, indices, chunks) for w in range(min(self.pool.size, len(chunks))))

    @staticmethod
    def neighbours(job, groups: tuple, index: int) -> tuple[int, ...]:
        """The workers that worker ``index`` waits for between the stages of
        a staged job (iterated, or with ghost cells to fill): those whose
        rows it reads, and those that read its rows (``boundary.readers``)."""
        if job.dynamic or job.tracked or not (job.iterated or job.boundary is not None):
            return ()
        order = [w for w, _, _ in groups]  # groups run in row order
        rows = [(chunks[0][0], chunks[-1][1]) for _, _, chunks in groups]
        n = job.plan.chunks[-1][1] + job.halo
        waits = boundary.readers(rows, n, job.halo, job.boundary)[order.index(index)]
        return tuple(order[g] for g in sorted(waits))

    def provide(
        self, index: int, job, args: tuple, indices: tuple, chunks: tuple, stop, groups: tuple
    ) -> WorkerProcess:
        """Worker ``index`` with the kernel, the job and ``args`` (its
        ``indices`` and ``chunks``, of the job's ``groups``); a worker
        found dead while idle is replaced (nothing was lost)."""
        key, payload, _ = self.kernels.entry(job.kernel)
        w = self.pool.workers[index]
        try:
            if key not in w.kernels:
                w.send(Install(key, payload))
                w.kernels.add(key)
            held = w.jobs.get(job.key)
            if held is None:
                bound = job.bind(args)
                w.send(
                    Define(
                        job.key,
                        key,
                        job.descriptors,
                        pack_args(bound),
                        job.halo,
                        chunks,
                        indices,
                        job.want_values,
                        job.dynamic,
                        job.iterated,
                        self.neighbours(job, groups, index),
                        job.axis,
                        None
                        if job.dynamic or job.tracked or job.boundary is None
                        else tuple(job.boundary),
                        job.mode,
                    )
                )
                w.jobs[job.key] = bound
                self.defined[job.key] = job.blocks
            elif held is not args and not same_args(held, args):
                bound = job.bind(args)
                w.send(Rebind(job.key, pack_args(bound)))
                w.jobs[job.key] = bound
            return w
        except OSError:
            self.pool.replace(index, stop=stop)
            return self.provide(index, job, args, indices, chunks, stop, groups)

    def tidy(self) -> None:
        """Before a map: tell workers which blocks are gone and which jobs
        are forgotten."""
        released = self.table.take_released()
        if released:
            if self.table.storage.leaks:
                assert self.pool.watchdog is not None  # a Pool is built whole or not at all
                self.pool.watchdog.blocks(gone=released)
            gone = set(released)
            self.cache.drop_blocks(gone)
            dropped = [k for k, b in self.defined.items() if b & gone]
            for k in dropped:
                del self.defined[k]
                self.placements.pop(k, None)
            self.forgets += 1
            for w in self.pool.workers:
                for k in dropped:
                    w.jobs.pop(k, None)
                self.send(w, Release(released))
        forgotten = []
        while self.cache.forgotten:
            forgotten.append(self.cache.forgotten.popleft())
        if forgotten:
            self.forget(jobs=forgotten)

    def forget(self, kernels=(), jobs=()) -> None:
        self.forgets += 1
        for k in jobs:
            self.defined.pop(k, None)
            self.placements.pop(k, None)
        for w in self.pool.workers:
            ks = tuple(k for k in kernels if k in w.kernels)
            js = tuple(k for k in jobs if k in w.jobs)
            if ks or js:
                w.kernels.difference_update(ks)
                for k in js:
                    del w.jobs[k]
                self.send(w, Forget(ks, js))

    @staticmethod
    def send(w: WorkerProcess, msg) -> None:
        """A message that matters only to a live worker."""
        try:
            w.send(msg)
        except OSError:
            pass  # dead: replaced before it is given work
