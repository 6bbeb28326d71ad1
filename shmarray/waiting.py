"""How long shmarray's processes spin before they sleep: the wait policy.

Three waits decide how fast a map is handed over and how much CPU waiting
costs (OpenMP names the same trade ``OMP_WAIT_POLICY``):

* a worker that finished a job spins for its next ring, then sleeps on its
  task pipe (a ring to a sleeper costs a pipe write and a wake-up, 10-100 us
  in a VM; to a spinner, about a microsecond);
* the driver spins on the workers' done words, then naps on a futex that
  the last worker to finish rings (a microsecond or two on each side), and
  after 20 ms sleeps on their pipes, where deaths and output are seen;
* a worker of an iterated or ghost-filling job spins on its neighbours'
  step words, then sleeps on a futex.

``Engine(wait=...)`` or ``SHMARRAY_WAIT`` picks one of:

``"spin"``
    spin long: the lowest latency, at the price of a core per waiting
    process (a worker spins 100 ms after each job).
``"passive"``
    never spin: every wait sleeps at once.  The least CPU; each hand-over
    costs a wake-up.
``"auto"`` (the default)
    spin briefly (2 ms after a job) while every worker can have a CPU of
    its own.  The driver spins as long when it has a CPU of its own too
    (fewer workers than CPUs): its CPU would otherwise idle, and waking an
    idle CPU is the dearest wake-up there is (1 worker on 2 vCPUs, maps of
    100 us: 21 us of overhead a map with a 50 us spin, 10 us with 2 ms).
    With as many workers as CPUs it spins only 5 us, then naps: a spinning
    driver takes CPU time from the worker it shares a CPU with, however
    often it yields (maps of 20-100 us on 2 workers and 2 vCPUs: 18-23 us
    of overhead a map with the 5 us spin, 42-103 us with 150 us).
    A caller that computes a share (``prepare(in_caller=True)``) holds
    the CPU of the worker it stands in for, so it spins as long as a
    worker does (``share_spin``) rather than nap on a futex each step.

    With more workers than usable CPUs, the driver and the neighbour waits
    spin next to nothing, since a spinner then holds a CPU a worker with
    work needs; a worker after a job still
    spins 1 ms, but gives its CPU away (``sched_yield``) every few turns,
    so it costs a worker with work almost nothing and the next map finds
    it awake (sleeping at once instead cost each map a wake-up per worker:
    a 1024^2 heat loop of maps at 5 workers on 2 CPUs took 1.26-1.34 times
    as long as at 2 workers, against 1.00-1.08 with the yielding spin).
"""

from __future__ import annotations

import os
from typing import NamedTuple

CHOICES = ("auto", "spin", "passive")


class WaitPolicy(NamedTuple):
    """A resolved wait policy (see the module docstring)."""

    name: str  # what was asked for: "auto", "spin" or "passive"
    worker_spin: float  # seconds a worker spins for its next ring after a job
    driver_spin: float  # seconds the driver spins on the done words
    step_spin: int  # rounds a worker spins on a neighbour's step word
    oversubscribed: bool  # more workers than usable CPUs
    share_spin: float = 0.0  # seconds the driver spins after computing a share

    def for_workers(self) -> tuple[float, int]:
        """What a worker needs to know: (worker_spin, step_spin)."""
        return self.worker_spin, self.step_spin


def coerce_wait(value: object) -> str:
    """``wait=``, or ``SHMARRAY_WAIT`` when it is None.

    >>> coerce_wait("passive")
    'passive'
    >>> coerce_wait("fast")
    Traceback (most recent call last):
    ...
    ValueError: wait must be 'auto', 'spin' or 'passive' (as OpenMP's OMP_WAIT_POLICY); got 'fast' instead.
    """
    where = "wait"
    if value is None:
        value = os.environ.get("SHMARRAY_WAIT", "").strip().lower() or "auto"
        where = "SHMARRAY_WAIT"
    if not isinstance(value, str) or value not in CHOICES:
        raise ValueError(
            f"{where} must be 'auto', 'spin' or 'passive' (as "
            f"OpenMP's OMP_WAIT_POLICY); got {value!r} instead."
        )
    return value


def resolve(name: str, workers: int, cpus: int) -> WaitPolicy:
    """The spins for policy ``name`` with ``workers`` on ``cpus`` usable CPUs.

    >>> resolve("auto", 2, 2).worker_spin, resolve("auto", 5, 2).worker_spin
    (0.002, 0.001)
    """
    over = workers > cpus
    if name == "spin":
        return WaitPolicy(name, 0.1, 1e-3, 1 << 40, over, 1e-3)
    if name == "passive":
        return WaitPolicy(name, 0.0, 0.0, 0, over, 0.0)
    if over:  # auto, oversubscribed: see the module docstring
        return WaitPolicy(name, 1e-3, 5e-6, 64, over, 5e-6)
    # A round of the step spin is about 0.2 us: 10000 rounds, about 2 ms.
    driver = 2e-3 if workers < cpus else 5e-6  # a CPU of its own, or not
    return WaitPolicy(name, 2e-3, driver, 10_000, over, 2e-3)
