"""The seeded chaos run: random calls from several threads while workers are
killed, stopped and continued, maps are stopped, the caller gets Ctrl-C
(one, or a burst of 2-4 an impatient user sends 10-80 ms apart, also while
it waits behind another thread's map), the engine's watchdog is killed, and
the engine is closed at a random moment.  It checks invariants, not
outputs:

* every call ends with its result or with an exception the episode caused
  (by the monotonic clock, at or before the call's end):
  ``WorkerCrashedError`` only once a worker was killed; ``TaskTimeoutError``
  only from a call given a ``timeout``; ``KeyboardInterrupt`` only in the
  main thread, once a SIGINT was sent; ``MapCancelledError`` and
  ``CancelledError`` only from a future that was stopped, or after
  ``close()``; ``EngineClosedError`` only after ``close()``; ``ValueError``
  (and ``KernelError``) only from the kernel that fails on purpose;
* every result is correct, and the input that calls only read never
  changes;
* **no array changes after the call that wrote it has left**, by an
  exception (Ctrl-C, a timeout, a crash, a stop, a close, the kernel's own
  error) or by returning: nothing of its map may still run.  Every call
  writes only arrays of its own, fresh from ``eng.zeros`` (``reduce`` and
  ``imap`` only read), and nothing else writes them afterwards, so a
  change is a worker the call left behind.  They are copied when the call
  ends (for a submitted map, when its future ends), watched for a window
  drawn from the seed (0.2-2 s; the episode waits for the last window to
  pass) and compared once more at the episode's end.  ``slow_fill`` writes
  its rows only after its busy loop, so a worker left spinning shows;
* nothing waits past its timeout (and nothing waits forever);
* after the watchdog was killed, a map with the engine still open leaves a
  live watchdog again (a new process); an episode whose engine was closed
  first says so in its ``notes`` instead;
* nothing is left in /dev/shm, and no process (workers and watchdogs of
  every generation seen, and the episode's session) or file descriptor is
  left;
* an idle engine afterwards uses no CPU.

An *episode* is one engine's life, derived entirely from its seed: the
worker count, the calls each thread makes with their options, and when and
what the chaos thread does (it draws the same values at every step,
whatever it finds, so its n-th step always picks the same action with the
same parameters; whether that action finds something to act on, the main
thread in a call or a worker to kill, and how many steps an episode
lasts, depend on timing).  Timing differs from run to run; the sequence
does not, so a failing seed replays.  Each episode runs in a child
interpreter, observed from outside (its /dev/shm blocks and processes are
checked after it exits).  Seeds replay differently from runs before issue
25: the chaos thread has new actions and draws more per step, and calls
draw more (after their old draws, so a seed's calls keep their kinds and
``opts``).

Run::

    python tests/chaos.py --seconds 1800          # episodes until time is up
    python tests/chaos.py --seed 1234             # replay one episode
    python tests/chaos.py --seeds 1 2 3 --workers 5

``make stress`` runs the first form; ``tests/test_chaos.py`` a few fixed
seeds in CI.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import traceback
from typing import Any

import numpy as np
from numba import njit

HERE = os.path.dirname(os.path.abspath(__file__))
N = 240  # rows of every array
EPISODE_LIMIT = 240.0  # seconds: an episode still running then has hung
CALL_LIMIT = 60.0  # seconds any call may take (stopped workers included)
WATCH_POLL = 0.02  # seconds between looks at the arrays being watched
LONGEST_WATCH = 2.0  # seconds: the longest window a call's arrays are watched

# The chaos thread's actions and their weights.
ACTIONS = (
    "kill",  # SIGKILL a worker
    "stop",  # SIGSTOP a worker, SIGCONT it 10-500 ms later
    "sigint",  # one SIGINT while the main thread is in a call
    "burst",  # 2-4 SIGINTs 10-80 ms apart (half the time 3, 50 ms apart)
    "sigint_waiting",  # 1-3 SIGINTs while the main thread waits behind a map
    "stop_future",  # MapFuture.stop() of a submitted map
    "kill_watchdog",  # SIGKILL the engine's watchdog
    "none",
)
WEIGHTS = (3, 3, 2, 3, 2, 3, 1, 3)


# -- kernels (importable by the workers: cached by numba) ---------------------


@njit(cache=True, nogil=True)
def fill(out, row_offset, scale):
    for i in range(out.shape[0]):
        out[i] = (row_offset + i) * scale


@njit(cache=True, nogil=True)
def total(x):
    s = 0.0
    for i in range(x.shape[0]):
        s += x[i]
    return s


@njit(cache=True, nogil=True)
def slow_fill(out, row_offset, scale, rounds):
    """fill, after a busy loop of ``rounds`` (a kernel that takes a while,
    so kills, stops and Ctrl-C land while it runs).  The rows are written
    only after the loop: a worker the engine left running shows up as rows
    that change after the call has left."""
    acc = 0.0
    for k in range(rounds):
        acc += k * 1e-9
    for i in range(out.shape[0]):
        out[i] = (row_offset + i) * scale + 0.0 * acc


@njit(cache=True, nogil=True)
def fail_on(out, row_offset, bad):
    for i in range(out.shape[0]):
        if row_offset + i == bad:
            raise ValueError("bad row")
        out[i] = row_offset + i


@njit(cache=True, nogil=True)
def plus_one(out, inp):
    """A stencil whose result is exact: interior cells get inp + 1 (the
    neighbours are read, times zero, so halo dependencies are real)."""
    for i in range(1, inp.shape[0] - 1):
        out[i] = inp[i] + 1.0 + 0.0 * (inp[i - 1] + inp[i + 1])


# -- one episode, in a child interpreter ----------------------------------------


class Failure(Exception):
    """An invariant broke."""


STORAGES = ("shm", "memfd", "dir")


def storage_of(seed: int, storage: str | None = None) -> str:
    """Where episode ``seed``'s blocks live: ``storage`` if given, else a
    choice of its seed's own (a generator of its own, so the rest of an
    episode is as it was before storages were drawn)."""
    return storage or random.Random(seed * 13 + 5).choice(STORAGES)


def episode(seed: int, workers: int | None = None, storage: str = "shm") -> dict:
    """Run episode ``seed`` (blocks in ``storage``: "shm", "memfd" or a
    directory); returns its report (``failures`` empty if every invariant
    held)."""
    return Episode(seed, workers, storage).run()


class _Call:
    """One planned call as it runs: what it wrote, when it ran."""

    def __init__(self, plan: dict, in_main: bool, key: int):
        self.plan = plan
        self.kind: str = plan["kind"]
        self.opts: dict = plan["opts"]
        self.in_main = in_main
        self.key = key
        self.started: float | None = None
        self.ended: float | None = None
        self.outcome = "ok"
        self.written: list = []  # the arrays it allocated and wrote
        self.future = None  # a submitted call's future
        self.steps_done: set[str] = set()  # what settle() has done already


class _Watch:
    """A call's arrays as they were when it ended, and the arrays."""

    def __init__(self, label: str, arrays: list, window: float):
        self.label = label
        self.arrays = arrays
        self.snaps = [a.copy() for a in arrays]
        self.t0 = time.monotonic()
        self.window = window
        self.reported = False


class Episode:
    """One engine's life (see the module's docstring).  Built from the seed
    alone; ``run()`` plays it and returns the report."""

    def __init__(self, seed: int, workers: int | None = None, storage: str = "shm"):
        rng = random.Random(seed)
        self.seed = seed
        self.storage = storage
        self.n_workers = workers or rng.choice((2, 3, 5))
        self.wait: Any = rng.choice(("auto", "auto", "passive", "spin"))
        self.n_threads = rng.randint(1, 3)
        calls_each = rng.randint(4, 10)
        self.plans = [
            [_plan_call(random.Random(seed * 1000 + t * 100 + k)) for k in range(calls_each)]
            for t in range(self.n_threads + 1)
        ]
        self.chaos_rng = random.Random(seed * 7 + 1)
        rng = self.chaos_rng
        self.close_at = rng.choice((None, None, rng.uniform(0.5, 6.0)))
        self.report: dict = {
            "seed": seed,
            "workers": self.n_workers,
            "wait": self.wait,
            "threads": self.n_threads,
            "calls": 0,
            "outcomes": {},
            "failures": [],
            "notes": [],
            "chaos": [],
            "sigints": 0,
            "stray_sigints": 0,
            "watched": 0,
            "early_ends": 0,
        }
        self.lock = threading.Lock()
        self.keys = itertools.count()
        self.futures: list = []
        self.events: list[tuple[float, str, Any]] = []  # (monotonic time, what, detail)
        self.stopped: dict[int, float] = {}  # id(future) -> when it was stopped
        self.watches: dict[int, _Watch] = {}
        self.pids_seen: dict[int, tuple[float, str]] = {}  # pid -> (start time, what)
        # Plain attributes, not Events: setting one runs no Python call, so
        # a KeyboardInterrupt cannot land between the call and the flag.
        self.busy = False  # the main thread is in a call
        self.waiting = False  # the main thread's map is queued behind another
        self.done = threading.Event()
        self.stop_watching = threading.Event()
        self.main_ident = threading.get_ident()
        self.eng: Any = None
        self.base: Any = None
        self.todo: list = []

    # -- bookkeeping ---------------------------------------------------------

    def fail(self, what: str) -> None:
        with self.lock:
            self.report["failures"].append(what)

    def note(self, what: str) -> None:
        with self.lock:
            self.report["notes"].append(what)

    def count(self, outcome: str) -> None:
        with self.lock:
            self.report["calls"] += 1
            self.report["outcomes"][outcome] = self.report["outcomes"].get(outcome, 0) + 1

    def event(self, what: str, detail: object = None) -> float:
        """Record a chaos action, before taking it: its time is then at or
        before anything it causes."""
        t = time.monotonic()
        with self.lock:
            self.events.append((t, what, detail))
        return t

    def happened(self, what: str, before: float) -> bool:
        with self.lock:
            return any(w == what and t <= before for t, w, _ in self.events)

    def stray_sigint(self, *_args) -> None:
        """A SIGINT, or its KeyboardInterrupt, that landed in the harness
        rather than in a call (the rest of a burst)."""
        self.report["stray_sigints"] += 1

    def see(self, pid: int, what: str) -> None:
        """Remember a worker or watchdog process, to find it left over."""
        if pid in self.pids_seen:
            return
        try:
            import psutil

            self.pids_seen[pid] = (psutil.Process(pid).create_time(), what)
        except Exception:
            pass  # gone already

    # -- what an episode may raise -------------------------------------------

    def unexpected(self, kind, opts, exc, in_main, ended, future=None) -> str | None:
        """Why ``exc``, raised by a ``kind`` call (or its future) that ended
        at ``ended``, is not one this episode caused; None if it is."""
        from concurrent.futures import CancelledError

        from shmarray.errors import (
            EngineClosedError,
            KernelError,
            TaskTimeoutError,
            WorkerCrashedError,
        )

        if isinstance(exc, KeyboardInterrupt):
            if not in_main:
                return "KeyboardInterrupt outside the main thread (only it gets SIGINT)"
            if not self.happened("sigint", ended):
                return "KeyboardInterrupt, though no SIGINT was sent"
            return None
        if isinstance(exc, EngineClosedError):  # a ValueError too: first
            if not self.happened("close", ended):
                return f"EngineClosedError, though the engine was not closed: {exc}"
            return None
        if isinstance(exc, WorkerCrashedError):
            if not self.happened("kill", ended):
                return f"WorkerCrashedError, though no worker was killed: {exc}"
            return None
        if isinstance(exc, TaskTimeoutError):
            if opts.get("timeout") is None:
                return f"TaskTimeoutError from a call without a timeout: {exc}"
            return None
        if isinstance(exc, CancelledError):  # MapCancelledError too
            stopped = future is not None and self.stopped.get(id(future), ended + 1) <= ended
            if not (stopped or self.happened("close", ended)):
                return (
                    f"{type(exc).__name__}, though no one stopped "
                    f"{'its future' if future is not None else 'it'} or closed the engine"
                )
            return None
        if kind == "fail" and (
            (isinstance(exc, ValueError) and "bad row" in str(exc)) or isinstance(exc, KernelError)
        ):
            return None
        return f"undocumented {type(exc).__name__}: {exc}\n" + "".join(
            traceback.format_exception(exc)
        )

    # -- watching arrays after their call left --------------------------------

    def watch(self, key: int, label: str, arrays: list, window: float) -> None:
        """Copy ``arrays`` now and watch them from now on (once per key)."""
        if not arrays:
            return
        w = _Watch(label, arrays, window)
        with self.lock:
            if key not in self.watches:
                # What makes a change a late writer's: no other call's
                # arrays share this memory (the engine handed out fresh ones).
                others = [b for v in self.watches.values() for b in v.arrays]
                for i, a in enumerate(arrays):
                    if any(np.may_share_memory(a, b) for b in others + arrays[:i]):
                        self.report["failures"].append(
                            f"{label}: eng.zeros gave it an array that overlaps another's"
                        )
                        break
                self.watches[key] = w
                self.report["watched"] += 1
                if " raised " in label or " ended with " in label:
                    self.report["early_ends"] += 1

    def compare(self, w: _Watch, when: str) -> None:
        if w.reported:
            return
        for i, (a, snap) in enumerate(zip(w.arrays, w.snaps)):
            now = a.copy()
            changed = np.flatnonzero(~((now == snap) | (np.isnan(now) & np.isnan(snap))))
            if changed.size:
                w.reported = True
                first = changed[:4]
                self.fail(
                    f"rows changed after {w.label}: rows {_ranges(changed)} of array {i} "
                    f"(rows {first.tolist()}: {snap[first].tolist()} -> {now[first].tolist()}), "
                    f"{when}, {time.monotonic() - w.t0:.2f} s after it ended"
                )
                return

    def compare_all(self) -> None:
        with self.lock:
            watches = list(self.watches.values())
        for w in watches:
            self.compare(w, "seen at the episode's end")

    def watcher(self) -> None:
        """Look at every array within its window, often: a late write is
        then seen soon after it happens (the end of the episode looks once
        more at all of them)."""
        while not self.stop_watching.wait(WATCH_POLL):
            now = time.monotonic()
            with self.lock:
                live = [
                    w for w in self.watches.values() if not w.reported and now - w.t0 <= w.window
                ]
            for w in live:
                self.compare(w, "seen within its watch window")

    # -- calls -----------------------------------------------------------------

    def run_one(self, plan: dict, in_main: bool) -> None:
        call = _Call(plan, in_main, next(self.keys))
        exc = None
        try:
            call.started = time.monotonic()
            if in_main:
                self.busy = True
            try:
                call.outcome = self.call(call)
            finally:
                if in_main:
                    self.busy = False
        except BaseException as raised:  # judged in settle()
            exc = raised
        # In the main thread the rest of a burst may land here too: the
        # bookkeeping is taken up again until it is done (every step once).
        while True:
            try:
                self.settle(call, exc)
                return
            except KeyboardInterrupt:
                self.stray_sigint()

    def settle(self, call: _Call, exc: BaseException | None) -> None:
        done = call.steps_done
        if call.ended is None:
            call.ended = time.monotonic()
        if "watch" not in done:
            # First: the sooner the copy, the more a late writer shows.
            # A submitted map's future watches its array when it ends (the
            # caller may stop waiting while the map runs on, as it may).
            if call.kind != "submit":
                how = "returned" if exc is None or isinstance(exc, Failure) else "raised"
                behind = " (queued behind a submitted map)" if call.plan["behind"] else ""
                label = f"{call.kind} {call.opts}{behind} {how}"
                if how == "raised":
                    label += f" {type(exc).__name__}"
                self.watch(call.key, label, call.written, call.plan["watch"])
            done.add("watch")
        if "judge" not in done:
            done.add("judge")
            if isinstance(exc, Failure):
                self.fail(f"{call.kind} {call.opts}: {exc}")
            elif exc is not None and not _own_exception(call.future, exc):
                problem = self.unexpected(
                    call.kind, call.opts, exc, call.in_main, call.ended, call.future
                )
                if problem:
                    self.fail(f"{call.kind} {call.opts}: {problem}")
        if "time" not in done:
            done.add("time")
            opts = call.opts
            limit = CALL_LIMIT if opts.get("timeout") is None else opts["timeout"] + 30.0
            took = call.ended - call.started if call.started is not None else 0.0
            if took > limit:
                self.fail(f"{call.kind} {opts} took {took:.1f} s (limit {limit:.1f} s)")
        if "count" not in done:
            done.add("count")
            self.count(call.outcome if exc is None else type(exc).__name__)

    def fresh(self, call: _Call):
        """A new output array for ``call``: no other call writes it."""
        a = self.eng.zeros(N)
        call.written.append(a)
        return a

    def track(self, future, kind: str, opts: dict, arrays: list, window: float, check) -> None:
        """Watch a submitted map's future: when it ends, its arrays are
        copied and watched, its result checked, its exception judged."""
        key = next(self.keys)
        with self.lock:
            self.futures.append(future)

        def ended(f) -> None:  # in the thread that ends it (any, main too)
            while True:
                try:
                    self.future_ended(f, key, kind, opts, arrays, window, check)
                    return
                except KeyboardInterrupt:
                    self.stray_sigint()
                except BaseException as exc:  # the harness's own bug
                    self.fail(
                        f"the harness failed on a future's end: {exc!r}\n"
                        + "".join(traceback.format_exception(exc))
                    )
                    return

        future.add_done_callback(ended)

    def future_ended(self, f, key, kind, opts, arrays, window, check) -> None:
        from concurrent.futures import CancelledError

        ended = time.monotonic()
        exc = CancelledError() if f.cancelled() else f.exception()
        how = "finished" if exc is None else f"ended with {type(exc).__name__}"
        self.watch(key, f"{kind} {opts}: its future {how}", arrays, window)
        if exc is None:
            try:
                check(f.result())
            except Failure as failure:
                self.fail(f"{kind} {opts}: {failure}")
            return
        problem = self.unexpected(kind, opts, exc, False, ended, f)
        if problem:
            self.fail(f"{kind} {opts}: its future: {problem}")

    def call(self, c: _Call) -> str:
        from shmarray import row_offset

        eng, kind, plan, opts = self.eng, c.kind, c.plan, c.opts
        scale = plan["scale"]
        collect = opts.get("errors") == "collect"
        if kind in ("map", "slow", "submit"):
            out = self.fresh(c)
            if kind == "submit":
                f = eng.submit(fill, out, args=(row_offset, scale), **opts)
                c.future = f
                self.track(
                    f, kind, opts, [out], plan["watch"], lambda got: _check_result(out, scale, got)
                )
                f.result(timeout=CALL_LIMIT)  # checked when it ends (track)
                return "ok"
            args: tuple
            if kind == "slow":
                kernel, args = slow_fill, (row_offset, scale, plan["rounds"])
            else:
                kernel, args = fill, (row_offset, scale)
            if plan["behind"]:
                got = self.behind(c, kernel, out, args)
            else:
                got = eng.map(kernel, out, args=args, **opts)
            return _check_result(out, scale, got)
        if kind == "fail":
            out = self.fresh(c)
            got = eng.map(fail_on, out, args=(row_offset, plan["bad"]), **opts)
            if not collect:
                raise Failure("a map with a failing row returned normally")
            if not any(lo <= plan["bad"] < hi for (lo, hi), _ in got.failed):
                raise Failure(f"the failing row {plan['bad']} is not among {got.failed}")
            _check_finished(out, 1.0, got)
            return "report"
        if kind == "reduce":
            import shmarray

            got = eng.reduce(total, self.base, **opts)
            if isinstance(got, shmarray.MapReport):
                if not got.failed and got.value != N * (N - 1) / 2:
                    raise Failure(f"reduce gave {got.value}, not {N * (N - 1) / 2}")
                return "report" if got.failed else "ok"
            if got != N * (N - 1) / 2:
                raise Failure(f"reduce gave {got}, not {N * (N - 1) / 2}")
            return "ok"
        if kind == "imap":
            import shmarray

            seen = {}
            with eng.imap(total, self.base, **opts) as stream:
                for (lo, hi), v in stream:
                    if (lo, hi) in seen:
                        raise Failure(f"imap yielded rows {lo}:{hi} twice")
                    seen[(lo, hi)] = v
                    if v != sum(range(lo, hi)):
                        raise Failure(f"imap rows {lo}:{hi} gave {v}")
            result = stream.result
            if isinstance(result, shmarray.MapReport):
                failed = {rows for rows, _ in result.failed}
                if failed & set(seen):
                    raise Failure(
                        f"imap reported as failed chunks it yielded: {sorted(failed & set(seen))}"
                    )
                return "report" if result.failed else "ok"
            if result != N * (N - 1) / 2:
                raise Failure(f"imap's result is {result}")
            return "ok"
        if kind == "iterate":
            b = plan["boundary"]
            u, v = self.fresh(c), self.fresh(c)
            u[:] = 5.0
            v[:] = 5.0
            last = eng.iterate(plus_one, v, u, steps=plan["steps"], halo=1, boundary=b, **opts)
            _check_stepped("iterate", last, plan["steps"])
            return "ok"
        if kind == "loop":
            # A Python loop of repeated maps, the lean path: a prepared map and
            # eng.map on the same double-buffered arrays, interleaved.
            b = plan["boundary"]
            u, v = self.fresh(c), self.fresh(c)
            u[:] = 5.0
            v[:] = 5.0
            step = eng.prepare(
                plus_one, v, u, halo=1, boundary=b, in_caller=plan["in_caller"], **opts
            )
            x, y = u, v
            for k in range(plan["steps"]):
                if k % 3 == 1:
                    eng.map(plus_one, y, x, halo=1, boundary=b, **opts)
                else:
                    if step.arrays[0] is not y:
                        step.swap()
                    step()
                x, y = y, x
            _check_stepped("loop", x, plan["steps"])
            return "ok"
        raise AssertionError(kind)

    def behind(self, c: _Call, kernel, out, args):
        """``map(kernel, out)`` queued behind a map submitted just before, so
        the caller waits on a future while the manager thread drives (a map
        or a slow one: then the wait is mostly queued, or mostly running)."""
        from shmarray import row_offset

        eng, plan = self.eng, c.plan
        first = eng.zeros(N)  # the submitted map's own array
        if c.kind == "slow":
            pre = eng.submit(fill, first, args=(row_offset, 1.0))
        else:
            pre = eng.submit(slow_fill, first, args=(row_offset, 1.0, plan["pre_rounds"]))
        self.track(
            pre,
            f"the map before a queued {c.kind}",
            {},
            [first],
            plan["watch"],
            lambda got: _check_result(first, 1.0, got),
        )
        if c.in_main:
            self.waiting = True
        try:
            return eng.map(kernel, out, args=args, **c.opts)
        finally:
            if c.in_main:
                self.waiting = False

    def main_calls(self) -> None:
        """The main thread's calls (it gets the SIGINTs).  Taken up again
        where it stopped if a KeyboardInterrupt lands between two calls."""
        while self.todo:
            plan = self.todo.pop(0)
            try:
                self.run_one(plan, True)
            except KeyboardInterrupt:
                self.stray_sigint()

    def thread_body(self, t: int) -> None:
        for plan in self.plans[t]:
            self.run_one(plan, False)

    # -- chaos -------------------------------------------------------------------

    def workers_now(self) -> list[int]:
        try:
            pids = list(self.eng.worker_pids)
        except Exception:
            return []
        for pid in pids:
            self.see(pid, "worker")
        return pids

    def sigints(self, what: str, gaps: list[float]) -> None:
        """SIGINT to this process, once and then after each gap."""
        if gaps:
            apart = ", ".join(f"{g * 1000:.0f}" for g in gaps)
            what = f"{what} x{len(gaps) + 1} ({apart} ms apart)"
        self.report["chaos"].append(what)
        for k, gap in enumerate([0.0, *gaps]):
            if gap:
                time.sleep(gap)
            self.event("sigint", k)
            self.report["sigints"] += 1
            os.kill(os.getpid(), signal.SIGINT)

    def main_waits_behind(self) -> bool:
        """The main thread's map waits on a future while another thread
        drives (the harness's own queued call, or any call queued behind
        another thread's: the dispatcher's driver is then not the main
        thread)."""
        if not self.busy:
            return False
        if self.waiting:
            return True
        dispatcher = getattr(self.eng, "_dispatcher", None)
        driver = getattr(dispatcher, "_driver", None)
        return driver is not None and driver != self.main_ident

    def chaos(self) -> None:
        rng = self.chaos_rng
        eng = self.eng
        start = time.monotonic()
        closed = False
        while not self.done.is_set():
            # The same draws every step, whatever the step finds.
            time.sleep(rng.uniform(0.005, 0.15))
            action = rng.choices(ACTIONS, WEIGHTS)[0]
            pick = rng.random()
            pause = rng.uniform(0.01, 0.5)
            like_a_user = rng.random() < 0.5
            n_burst = rng.randint(2, 4)
            gaps = [rng.uniform(0.01, 0.08) for _ in range(3)]
            n_waiting = rng.randint(1, 3)
            if (
                self.close_at is not None
                and not closed
                and time.monotonic() - start > self.close_at
            ):
                self.report["chaos"].append("close")
                self.event("close")
                eng.close()
                closed = True
                continue
            pids = self.workers_now()
            self.see_watchdog()
            if action == "kill" and pids:
                pid = pids[int(pick * len(pids))]
                self.report["chaos"].append(f"kill {pid}")
                self.event("kill", pid)
                _signal(pid, signal.SIGKILL)
            elif action == "stop" and pids:
                pid = pids[int(pick * len(pids))]
                self.report["chaos"].append(f"stop {pid} {pause:.2f}")
                self.event("stop", pid)
                _signal(pid, signal.SIGSTOP)
                time.sleep(pause)
                _signal(pid, signal.SIGCONT)
            elif action == "sigint" and self.busy:
                self.sigints("sigint", [])
            elif action == "burst" and self.busy:
                # The rest of a burst is sent whatever the main thread does
                # by then, as an impatient user would.
                self.sigints("burst", [0.05, 0.05] if like_a_user else gaps[: n_burst - 1])
            elif action == "sigint_waiting" and self.main_waits_behind():
                self.sigints("sigint while waiting", gaps[: n_waiting - 1])
            elif action == "stop_future":
                with self.lock:
                    live = [f for f in self.futures if not f.done()]
                if live:
                    f = live[int(pick * len(live))]
                    self.report["chaos"].append("future.stop")
                    t = self.event("stop_future")
                    with self.lock:
                        self.stopped.setdefault(id(f), t)
                    f.stop()
            elif action == "kill_watchdog":
                found, dog = _watchdog_pid(eng)
                if dog is not None:
                    self.report["chaos"].append(f"kill watchdog {dog}")
                    self.event("kill_watchdog", dog)
                    _signal(dog, signal.SIGKILL)

    def see_watchdog(self) -> None:
        found, pid = _watchdog_pid(self.eng)
        if pid is not None:
            self.see(pid, "watchdog")

    def check_watchdog(self, mapped_after: bool) -> None:
        """After a killed watchdog and a map with the engine open, a live
        watchdog (a new process) again."""
        with self.lock:
            killed = sorted({p for _, what, p in self.events if what == "kill_watchdog"})
        if not killed:
            return
        if self.eng.closed or not mapped_after:
            self.note(
                f"the watchdog was killed (pids {killed}), but no map ran after it with "
                "the engine open: its restart was not checked"
            )
            return
        deadline = time.monotonic() + 5.0  # a hang detector: it restarts at the map
        while True:
            found, pid = _watchdog_pid(self.eng)
            if pid is not None and pid not in killed and _alive(pid):
                self.see(pid, "watchdog")
                self.report["watchdog_restarted"] = pid
                return
            if not found or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if not found:
            self.note(
                "the watchdog was killed, but eng._dispatcher.pool.watchdog is not "
                "there to look at: its restart was not checked"
            )
            return
        self.fail(
            f"the watchdog was killed (pids {killed}) and is not running again after a "
            f"map: the engine's watchdog process is now {pid!r}"
            + (" (dead)" if pid is not None and not _alive(pid) else "")
        )

    # -- the episode ---------------------------------------------------------

    def run(self) -> dict:
        import gc

        import psutil

        import shmarray
        from shmarray import launch
        from shmarray.errors import EngineClosedError

        launch.stop_server()
        me = psutil.Process()
        fds_before = _fds()
        self.eng = eng = shmarray.Engine(
            workers=self.n_workers, wait=self.wait, storage=self.storage
        )
        self.base = eng.from_numpy(np.arange(N, dtype=np.float64))
        # The last map's array, made now, so that map brings the watchdog
        # no news (a new block) that would restart it anyway.
        last_out = eng.zeros(N)
        self.workers_now()
        self.see_watchdog()

        chaos_thread = threading.Thread(target=self.chaos, name="chaos")
        watcher = threading.Thread(target=self.watcher, name="watcher")
        threads = [
            threading.Thread(target=self.thread_body, args=(t,), name=f"caller-{t}")
            for t in range(1, self.n_threads + 1)
        ]
        watcher.start()
        chaos_thread.start()
        for t in threads:
            t.start()
        self.todo = list(self.plans[0])
        while True:  # the main thread calls too (it gets Ctrl-C)
            try:
                self.main_calls()
                break
            except KeyboardInterrupt:
                self.stray_sigint()
        # From here on the main thread runs no call: what is left of a burst
        # is counted, not raised.
        while True:
            try:
                signal.signal(signal.SIGINT, self.stray_sigint)
                break
            except KeyboardInterrupt:
                self.stray_sigint()
        for t in threads:
            t.join(CALL_LIMIT * len(self.plans[0]) + 30.0)
            if t.is_alive():
                self.fail(f"thread {t.name} still running")
        self.done.set()
        chaos_thread.join()
        # Every future ends.
        for future in list(self.futures):
            try:
                future.exception(timeout=CALL_LIMIT)
            except Exception as exc:
                if not future.done():
                    self.fail(f"a future never ended ({exc!r})")
        # The loop's variable would keep the last future, its exception, the
        # exception's traceback and the arrays of the frames in it alive.
        future = None
        # Every call's arrays watched for at least their window.
        with self.lock:
            until = max((w.t0 + w.window for w in self.watches.values()), default=0.0)
        time.sleep(min(max(0.0, until - time.monotonic()), LONGEST_WATCH))
        self.stop_watching.set()
        watcher.join()
        mapped_after = False
        if not eng.closed:
            # Nothing left running: the last calls and stray messages are over.
            try:
                eng.map(fill, last_out, args=(shmarray.row_offset, 1.0))
                mapped_after = True
                _check_rows(last_out, 1.0)
            except EngineClosedError:
                pass
            except Failure as exc:
                self.fail(f"the last map: {exc}")
            self.check_watchdog(mapped_after)
            # An idle engine uses no CPU (past the wait policy's spin).
            if not eng.closed:
                procs = [me] + [psutil.Process(p) for p in eng.worker_pids]
                time.sleep(0.3)
                cpu0 = sum(_cpu(p) for p in procs)
                time.sleep(1.0)
                used = sum(_cpu(p) for p in procs) - cpu0
                self.report["idle_cpu_s"] = round(used, 3)
                if used > 0.1:
                    self.fail(f"an idle engine used {used:.2f} CPU seconds in 1 s")
        else:
            self.check_watchdog(False)
        self.compare_all()  # no array changed after its call left, all episode long
        if not np.array_equal(self.base, np.arange(N, dtype=np.float64)):
            self.fail("the array that reduce and imap only read has changed")
        pids = self.workers_now()
        self.see_watchdog()
        # The futures hold their exceptions, whose tracebacks hold the calls'
        # arrays (their mappings, and on Python < 3.13 a descriptor each);
        # the watches hold the arrays themselves.
        self.watches.clear()
        self.futures.clear()
        self.base = None  # every thread is done; let the blocks go before close
        del last_out
        eng.close()
        launch.stop_server()
        gc.collect()
        left = [p for p in pids if _alive(p)]
        if left:
            self.fail(f"workers still alive after close: {left}")
        extra = {fd: what for fd, what in _fds().items() if fds_before.get(fd) != what}
        if extra:
            self.fail(f"file descriptors left open after close: {extra}")
        self.report["pids_seen"] = [[p, t, what] for p, (t, what) in self.pids_seen.items()]
        return self.report


def _own_exception(future, exc: BaseException) -> bool:
    """Whether ``exc`` is what ``future`` ended with (then the future's own
    end judges it, once)."""
    from concurrent.futures import CancelledError

    if future is None or not future.done():
        return False
    if future.cancelled():
        return isinstance(exc, CancelledError)
    return future.exception() is exc


def _watchdog_pid(eng) -> tuple[bool, int | None]:
    """(whether the engine's watchdog object was found, its process's pid
    or None).  ``eng._dispatcher.pool.watchdog.child``: see
    ``shmarray/pool.py`` and ``shmarray/watchdog.py``."""
    try:
        dog = eng._dispatcher.pool.watchdog
    except AttributeError:
        return False, None
    if dog is None:
        return False, None
    child = getattr(dog, "child", None)
    return True, getattr(child, "pid", None)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _ranges(rows) -> str:
    """``[3, 4, 5, 9]`` -> ``"3:6, 9:10"``."""
    out = []
    start = prev = int(rows[0])
    for r in rows[1:]:
        r = int(r)
        if r != prev + 1:
            out.append(f"{start}:{prev + 1}")
            start = r
        prev = r
    out.append(f"{start}:{prev + 1}")
    return ", ".join(out)


def _fds() -> dict[int, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return out


def _cpu(p) -> float:
    try:
        t = p.cpu_times()
        return t.user + t.system
    except Exception:
        return 0.0


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _plan_call(rng: random.Random) -> dict:
    kind = rng.choice(
        (
            "map",
            "reduce",
            "imap",
            "iterate",
            "iterate",
            "loop",
            "submit",
            "slow",
            "slow",
            "slow",
            "fail",
        )
    )
    opts: dict = {}
    if kind != "iterate":
        opts["schedule"] = rng.choice(("static", "dynamic"))
        opts["chunks"] = rng.choice((None, 1, 4, 7, 12))
    if rng.random() < 0.3:
        opts["timeout"] = rng.choice((0.5, 2.0, 5.0))
    if kind in ("map", "reduce", "imap", "slow", "fail") and rng.random() < 0.4:
        opts["retries"] = rng.choice((0, 1, 3))
    if kind in ("map", "reduce", "imap", "fail") and rng.random() < 0.3:
        opts["errors"] = "collect"
    plan = {"kind": kind, "opts": opts, "scale": float(rng.randint(1, 9))}
    if kind in ("iterate", "loop"):
        plan["steps"] = rng.randint(1, 400)
        plan["boundary"] = rng.choice((None, "wrap", "edge"))
    if kind == "slow":
        plan["rounds"] = rng.choice((10**5, 10**6, 10**7, 5 * 10**7))
    if kind == "fail":
        plan["bad"] = rng.randrange(N)
    # Added with issue 25, drawn after the above so a seed's calls keep
    # their kinds and options: how long the call's arrays are watched after
    # it ends; chunks of a few tenths of a second (a worker still spinning
    # when the call leaves shows best then); and a map queued behind a map
    # submitted just before it (``Episode.behind``).
    plan["watch"] = rng.uniform(0.2, LONGEST_WATCH)
    if kind == "slow" and rng.random() < 0.15:
        plan["rounds"] = 2 * 10**8
    plan["behind"] = kind in ("map", "slow") and rng.random() < 0.3
    plan["pre_rounds"] = rng.choice((10**6, 10**7, 5 * 10**7))
    # Added with issue 28, from what is drawn already (no draw of its own,
    # so every seed's later calls stay as they were): half the loops whose
    # options allow it prepare their map with in_caller=True.
    plan["in_caller"] = (
        kind == "loop"
        and plan["boundary"] is None
        and opts.get("schedule") == "static"
        and plan["steps"] % 2 == 0
    )
    return plan


def _check_result(out, scale: float, got) -> str:
    """A map of ``fill`` (or ``slow_fill``) returned ``got``: its rows are
    right (those of failed chunks aside, for a MapReport)."""
    import shmarray

    if isinstance(got, shmarray.MapReport):
        _check_finished(out, scale, got)
        return "report" if got.failed else "ok"
    _check_rows(out, scale)
    return "ok"


def _check_rows(out, scale: float, rows=None) -> None:
    expect = np.arange(N, dtype=np.float64) * scale
    if rows is None:
        if not np.array_equal(out, expect):
            bad = np.flatnonzero(out != expect)
            raise Failure(
                f"wrong result at rows {bad[:5]} ({out[bad[:5]]} instead of {expect[bad[:5]]})"
            )
        return
    for lo, hi in rows:
        if not np.array_equal(out[lo:hi], expect[lo:hi]):
            raise Failure(f"wrong result in finished rows {lo}:{hi}")


def _check_stepped(kind: str, last, steps: int) -> None:
    """``plus_one`` ran ``steps`` times from 5.0: every interior cell is
    5.0 + steps."""
    inner = last[1:-1]
    if not np.all(inner == 5.0 + steps):
        raise Failure(
            f"{kind}: interior {np.unique(inner)[:5]} after {steps} steps, not {5.0 + steps}"
        )


def _check_finished(out, scale: float, report) -> None:
    """Every row outside the chunks a MapReport lists as failed is right."""
    ok = np.ones(N, bool)
    for (lo, hi), _ in report.failed:
        ok[lo:hi] = False
    expect = np.arange(N, dtype=np.float64) * scale
    bad = np.flatnonzero(ok & (out != expect))
    if bad.size:
        raise Failure(f"wrong result at finished rows {bad[:5]}")


# -- the driver: episodes in child interpreters, checked from outside -----------


def _stacks_of(proc: subprocess.Popen, path: str) -> str:
    """Every thread's stack of a hung child (its faulthandler writes them to
    ``path`` on SIGUSR1): the dump, once its size stops growing, for up to
    5 s."""
    os.kill(proc.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 5.0
    size = -1
    while time.monotonic() < deadline:
        now = os.path.getsize(path)
        if now and now == size:
            break
        size = now
        time.sleep(0.2)  # polled: the child writes with no signal to us
    with open(path) as f:
        return f.read()[-6000:] or "(no dump)"


def run_episode(
    seed: int,
    workers: int | None = None,
    limit: float = EPISODE_LIMIT,
    storage: str | None = None,
) -> dict:
    """Run episode ``seed`` in a child interpreter; returns its report with
    what was checked from outside added.  ``storage``: "shm", "memfd" or
    "dir" (a directory made for the episode); None: the seed's choice."""
    import shutil
    import tempfile

    kind = storage_of(seed, storage)
    where = tempfile.mkdtemp(prefix="shmarray-chaos-") if kind == "dir" else None
    try:
        return _run_episode(seed, workers, limit, kind, where)
    finally:
        if where is not None:
            shutil.rmtree(where, ignore_errors=True)


def _run_episode(seed, workers, limit, kind, where) -> dict:
    import tempfile

    # Where a hung episode's threads were: SIGUSR1 makes the child write
    # every thread's stack here (faulthandler) before it is killed.
    stacks = tempfile.NamedTemporaryFile("w+", prefix="shmarray-chaos-stacks-", delete=False)
    stacks.close()
    code = (
        f"import sys, json, faulthandler, signal; sys.path.insert(0, {HERE!r}); "
        f"dump = open({stacks.name!r}, 'w'); "
        f"faulthandler.register(signal.SIGUSR1, file=dump, all_threads=True); import chaos; "
        f"r = chaos.episode({seed}, {workers!r}, {(where or kind)!r}); "
        f"print('CHAOS-REPORT ' + json.dumps(r))"
    )
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=limit)
        hung = False
    except subprocess.TimeoutExpired:
        hung_stacks = _stacks_of(proc, stacks.name)
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        hung = True
    finally:
        os.unlink(stacks.name)
    report: dict = {"seed": seed, "failures": []}
    for line in out.splitlines():
        if line.startswith("CHAOS-REPORT "):
            report = json.loads(line[len("CHAOS-REPORT ") :])
    report["seconds"] = round(time.monotonic() - started, 1)
    report["storage"] = kind
    if hung:
        report["failures"].append(
            f"the episode hung for {limit:.0f} s; its threads were:\n{hung_stacks}"
        )
    elif proc.returncode != 0:
        report["failures"].append(f"the episode exited with {proc.returncode}: {err[-2000:]}")
    noise = [line for line in err.splitlines() if line.strip()]
    if noise and not hung:
        report["failures"].append("stderr not empty:\n" + "\n".join(noise[-30:]))
    # From outside: nothing of the child's left in /dev/shm, no process of
    # its session left, and none of the workers and watchdogs it saw.
    home = where or "/dev/shm"
    left = _blocks_of(proc.pid, where)
    deadline = time.monotonic() + 5.0
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = _blocks_of(proc.pid, where)
    if left:
        sizes: dict[str, int | None] = {}
        for name in left:
            try:
                sizes[name] = os.stat(os.path.join(home, name)).st_size
            except OSError:
                sizes[name] = None
        report["failures"].append(f"blocks left in {home} (name: bytes): {sizes}")
        for name in left:
            try:
                os.unlink(os.path.join(home, name))
            except OSError:
                pass
    seen = report.get("pids_seen", [])
    procs = _session_processes(proc.pid) + _still_running(seen)
    deadline = time.monotonic() + 5.0
    while procs and time.monotonic() < deadline:
        time.sleep(0.05)
        procs = _session_processes(proc.pid) + _still_running(seen)
    if procs:
        report["failures"].append(f"processes left: {procs}")
        for pid in procs:
            if isinstance(pid, int):
                _signal(pid, signal.SIGKILL)
            else:
                _signal(pid[0], signal.SIGKILL)
    return report


def _blocks_of(pid: int, directory: str | None = None) -> list[str]:
    from shmarray import blocks

    if directory is not None:
        return [n for n in os.listdir(directory) if blocks.owner_of(n) == pid]
    if not blocks.SHM_DIR:
        return []
    return [n for n in os.listdir(blocks.SHM_DIR) if blocks.owner_of(n) == pid]


def _session_processes(sid: int) -> list[int]:
    """Live processes of the child's session (the workers and the watchdog
    run in sessions of their own: ``_still_running`` finds those)."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "ppid", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if os.getsid(p.pid) == sid:
                found.append(p.pid)
        except (OSError, psutil.Error):
            continue
    return found


def _still_running(seen: list) -> list:
    """The workers and watchdogs the episode saw, ``[pid, start time,
    what]``, that still run (the same process: its start time matches)."""
    import psutil

    found = []
    for pid, started, what in seen:
        try:
            p = psutil.Process(pid)
            if p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE:
                found.append((pid, what))
        except psutil.Error:
            continue
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="run episodes with fresh seeds until this much time has passed",
    )
    parser.add_argument(
        "--seed",
        type=int,
        action="append",
        dest="seeds",
        help="run (replay) this episode; may repeat",
    )
    parser.add_argument("--seeds", type=int, nargs="+", dest="seed_list")
    parser.add_argument(
        "--storage",
        choices=STORAGES,
        default=None,
        help="storage for every episode (default: each seed picks one)",
    )
    parser.add_argument(
        "--first-seed",
        type=int,
        default=None,
        help="with --seconds: the first seed (default: from the clock)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="workers for every episode (default: each seed picks 2, 3 or 5)",
    )
    args = parser.parse_args(argv)
    seeds = (args.seeds or []) + (args.seed_list or [])
    failures = 0
    count = 0
    if args.seconds is None and not seeds:
        parser.error("give --seconds or --seed")
    start = time.monotonic()
    first = args.first_seed if args.first_seed is not None else int(time.time()) % 100_000 * 1000
    pending = list(seeds)
    k = 0
    while True:
        if pending:
            seed = pending.pop(0)
        elif args.seconds is not None and time.monotonic() - start < args.seconds:
            seed = first + k
            k += 1
        else:
            break
        report = run_episode(seed, args.workers, storage=args.storage)
        count += 1
        status = "ok" if not report["failures"] else "FAILED"
        print(
            f"seed {seed}: {status} ({report.get('workers')} workers, "
            f"wait={report.get('wait')}, storage={report.get('storage')}, "
            f"{report.get('calls', 0)} calls, "
            f"{report.get('sigints', 0)} SIGINTs ({report.get('stray_sigints', 0)} outside calls), "
            f"{report.get('early_ends', 0)} early ends "
            f"watched, {report['seconds']} s, outcomes {report.get('outcomes', {})})",
            flush=True,
        )
        for note in report.get("notes", []):
            print("    note:", note, flush=True)
        if report["failures"]:
            failures += 1
            for f in report["failures"]:
                print("   ", f.replace("\n", "\n    "), flush=True)
            print(
                f"    replay: python tests/chaos.py --seed {seed}"
                + (f" --workers {args.workers}" if args.workers else ""),
                flush=True,
            )
    print(f"{count} episodes, {failures} failed, {time.monotonic() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
