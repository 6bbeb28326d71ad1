"""The seeded chaos run: random calls from several threads while workers are
killed, stopped and continued, maps are stopped, the caller gets Ctrl-C,
and the engine is closed at a random moment.  It checks invariants, not
outputs:

* every call ends with its result or a documented exception;
* every result is correct;
* nothing waits past its timeout (and nothing waits forever);
* nothing is left in /dev/shm, and no process or file descriptor is left;
* an idle engine afterwards uses no CPU.

An *episode* is one engine's life, derived entirely from its seed: the
worker count, the calls each thread makes with their options, and when and
what the chaos thread does.  Timing differs from run to run; the sequence
does not, so a failing seed replays exactly.  Each episode runs in a child
interpreter, observed from outside (its /dev/shm blocks and processes are
checked after it exits).

Run::

    python tests/chaos.py --seconds 1800          # episodes until time is up
    python tests/chaos.py --seed 1234             # replay one episode
    python tests/chaos.py --seeds 1 2 3 --workers 5

``make stress`` runs the first form; ``tests/test_chaos.py`` a few fixed
seeds in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import traceback

import numpy as np
from numba import njit

HERE = os.path.dirname(os.path.abspath(__file__))
N = 240  # rows of every array
EPISODE_LIMIT = 240.0  # seconds: an episode still running then has hung
CALL_LIMIT = 60.0  # seconds any call may take (stopped workers included)


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
    so kills, stops and Ctrl-C land while it runs)."""
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


def episode(seed: int, workers: int | None = None) -> dict:
    """Run episode ``seed``; returns its report (``failures`` empty if every
    invariant held)."""
    from concurrent.futures import CancelledError

    import psutil

    import shmarray
    from shmarray import launch
    from shmarray.errors import (
        EngineClosedError,
        KernelError,
        MapCancelledError,
        TaskTimeoutError,
        WorkerCrashedError,
    )

    rng = random.Random(seed)
    n_workers = workers or rng.choice((2, 3, 5))
    wait = rng.choice(("auto", "auto", "passive", "spin"))
    n_threads = rng.randint(1, 3)
    calls_each = rng.randint(4, 10)
    plans = [
        [_plan_call(random.Random(seed * 1000 + t * 100 + k)) for k in range(calls_each)]
        for t in range(n_threads + 1)
    ]
    chaos_rng = random.Random(seed * 7 + 1)
    close_at = chaos_rng.choice((None, None, chaos_rng.uniform(0.5, 6.0)))
    report = {
        "seed": seed,
        "workers": n_workers,
        "wait": wait,
        "threads": n_threads,
        "calls": 0,
        "outcomes": {},
        "failures": [],
        "chaos": [],
    }
    documented = (
        WorkerCrashedError,
        TaskTimeoutError,
        MapCancelledError,
        CancelledError,
        EngineClosedError,
        KeyboardInterrupt,
        ValueError,
        KernelError,
    )
    lock = threading.Lock()
    futures: list = []
    main_busy = threading.Event()

    def fail(what: str) -> None:
        with lock:
            report["failures"].append(what)

    def note(outcome: str) -> None:
        with lock:
            report["calls"] += 1
            report["outcomes"][outcome] = report["outcomes"].get(outcome, 0) + 1

    launch.stop_server()
    me = psutil.Process()
    fds_before = _fds()
    eng = shmarray.Engine(workers=n_workers, wait=wait)
    base = eng.from_numpy(np.arange(N, dtype=np.float64))

    def run_one(plan: dict, in_main: bool) -> None:
        kind, opts = plan["kind"], plan["opts"]
        started = time.monotonic()
        limit = CALL_LIMIT if opts.get("timeout") is None else opts["timeout"] + 30.0
        outcome = "ok"
        try:
            if in_main:
                main_busy.set()
            try:
                outcome = _call(eng, kind, plan, opts, base, futures, lock)
            finally:
                main_busy.clear()
        except documented as exc:
            outcome = type(exc).__name__
            if (
                isinstance(exc, ValueError)
                and not (kind == "fail" and "bad row" in str(exc))
                and not isinstance(exc, EngineClosedError)
            ):
                fail(f"{kind} {opts}: undocumented ValueError {exc!r}")
        except Failure as exc:
            fail(f"{kind} {opts}: {exc}")
        except BaseException as exc:
            fail(
                f"{kind} {opts}: undocumented {type(exc).__name__}: {exc}\n"
                + "".join(traceback.format_exception(exc))
            )
        took = time.monotonic() - started
        if took > limit:
            fail(f"{kind} {opts} took {took:.1f} s (limit {limit:.1f} s)")
        note(outcome)

    def thread_body(t: int) -> None:
        for plan in plans[t]:
            run_one(plan, False)

    def chaos() -> None:
        start = time.monotonic()
        closed = False
        while not done.is_set():
            time.sleep(chaos_rng.uniform(0.005, 0.15))
            action = chaos_rng.choice(("kill", "stop", "sigint", "stop_future", "none"))
            if close_at is not None and not closed and time.monotonic() - start > close_at:
                report["chaos"].append("close")
                eng.close()
                closed = True
                continue
            try:
                pids = eng.worker_pids
            except Exception:
                pids = []
            if action == "kill" and pids:
                pid = chaos_rng.choice(pids)
                report["chaos"].append(f"kill {pid}")
                _signal(pid, signal.SIGKILL)
            elif action == "stop" and pids:
                pid = chaos_rng.choice(pids)
                pause = chaos_rng.uniform(0.01, 0.5)
                report["chaos"].append(f"stop {pid} {pause:.2f}")
                _signal(pid, signal.SIGSTOP)
                time.sleep(pause)
                _signal(pid, signal.SIGCONT)
            elif action == "sigint" and main_busy.is_set():
                report["chaos"].append("sigint")
                os.kill(os.getpid(), signal.SIGINT)
            elif action == "stop_future":
                with lock:
                    live = [f for f in futures if not f.done()]
                if live:
                    report["chaos"].append("future.stop")
                    chaos_rng.choice(live).stop()

    done = threading.Event()
    chaos_thread = threading.Thread(target=chaos, name="chaos")
    threads = [
        threading.Thread(target=thread_body, args=(t,), name=f"caller-{t}")
        for t in range(1, n_threads + 1)
    ]
    chaos_thread.start()
    for t in threads:
        t.start()
    for plan in plans[0]:  # the main thread calls too (it gets Ctrl-C)
        try:
            run_one(plan, True)
        except KeyboardInterrupt:  # landed between calls, in this loop
            note("KeyboardInterrupt")
    for t in threads:
        while t.is_alive():
            try:
                t.join(CALL_LIMIT * len(plans[0]))
                break
            except KeyboardInterrupt:
                continue
        if t.is_alive():
            fail(f"thread {t.name} still running")
    done.set()
    while chaos_thread.is_alive():
        try:
            chaos_thread.join()
        except KeyboardInterrupt:
            continue
    # Every future ends.
    for future in list(futures):
        try:
            future.exception(timeout=CALL_LIMIT)
        except Exception as exc:
            if not future.done():
                fail(f"a future never ended ({exc!r})")
    # The loop's variable would keep the last future, its exception, the
    # exception's traceback and the arrays of the frames in it alive.
    future = None
    if not eng.closed:
        # Nothing left running: the last calls and stray messages are over.
        try:
            eng.map(fill, eng.zeros(N), args=(shmarray.row_offset, 1.0))
        except EngineClosedError:
            pass
        # An idle engine uses no CPU (past the wait policy's spin).
        if not eng.closed:
            procs = [me] + [psutil.Process(p) for p in eng.worker_pids]
            time.sleep(0.3)
            cpu0 = sum(_cpu(p) for p in procs)
            time.sleep(1.0)
            used = sum(_cpu(p) for p in procs) - cpu0
            report["idle_cpu_s"] = round(used, 3)
            if used > 0.1:
                fail(f"an idle engine used {used:.2f} CPU seconds in 1 s")
    pids = []
    try:
        pids = eng.worker_pids
    except Exception:
        pass
    # The futures hold their exceptions, whose tracebacks hold the calls'
    # arrays (their mappings, and on Python < 3.13 a descriptor each).
    futures.clear()
    base = None  # every thread is done; let the block go before close
    eng.close()
    launch.stop_server()
    import gc

    gc.collect()
    left = [
        p
        for p in pids
        if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
    ]
    if left:
        fail(f"workers still alive after close: {left}")
    extra = {fd: what for fd, what in _fds().items() if fds_before.get(fd) != what}
    if extra:
        fail(f"file descriptors left open after close: {extra}")
    return report


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
    return plan


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


def _call(eng, kind: str, plan: dict, opts: dict, base, futures: list, lock) -> str:
    import shmarray
    from shmarray import row_offset

    scale = plan["scale"]
    collect = opts.get("errors") == "collect"
    if kind in ("map", "slow", "submit"):
        out = eng.zeros(N)
        if kind == "slow":
            got = eng.map(slow_fill, out, args=(row_offset, scale, plan["rounds"]), **opts)
        elif kind == "submit":
            f = eng.submit(fill, out, args=(row_offset, scale), **opts)
            with lock:
                futures.append(f)
            got = f.result(timeout=CALL_LIMIT)
        else:
            got = eng.map(fill, out, args=(row_offset, scale), **opts)
        if isinstance(got, shmarray.MapReport):
            _check_finished(out, scale, got)
            return "report" if got.failed else "ok"
        _check_rows(out, scale)
        return "ok"
    if kind == "fail":
        out = eng.zeros(N)
        got = eng.map(fail_on, out, args=(row_offset, plan["bad"]), **opts)
        if not collect:
            raise Failure("a map with a failing row returned normally")
        if not any(lo <= plan["bad"] < hi for (lo, hi), _ in got.failed):
            raise Failure(f"the failing row {plan['bad']} is not among {got.failed}")
        return "report"
    if kind == "reduce":
        got = eng.reduce(total, base, **opts)
        if isinstance(got, shmarray.MapReport):
            if not got.failed and got.value != N * (N - 1) / 2:
                raise Failure(f"reduce gave {got.value}, not {N * (N - 1) / 2}")
            return "report" if got.failed else "ok"
        if got != N * (N - 1) / 2:
            raise Failure(f"reduce gave {got}, not {N * (N - 1) / 2}")
        return "ok"
    if kind == "imap":
        seen = {}
        with eng.imap(total, base, **opts) as stream:
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
        u, v = eng.zeros(N), eng.zeros(N)
        u[:] = 5.0
        v[:] = 5.0
        last = eng.iterate(plus_one, v, u, steps=plan["steps"], halo=1, boundary=b, **opts)
        _check_stepped("iterate", last, plan["steps"])
        return "ok"
    if kind == "loop":
        # A Python loop of repeated maps, the lean path: a prepared map and
        # eng.map on the same double-buffered arrays, interleaved.
        b = plan["boundary"]
        u, v = eng.zeros(N), eng.zeros(N)
        u[:] = 5.0
        v[:] = 5.0
        step = eng.prepare(plus_one, v, u, halo=1, boundary=b, **opts)
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


def run_episode(seed: int, workers: int | None = None, limit: float = EPISODE_LIMIT) -> dict:
    """Run episode ``seed`` in a child interpreter; returns its report with
    what was checked from outside added."""
    code = (
        f"import sys, json; sys.path.insert(0, {HERE!r}); import chaos; "
        f"r = chaos.episode({seed}, {workers!r}); "
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
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        hung = True
    report: dict = {"seed": seed, "failures": []}
    for line in out.splitlines():
        if line.startswith("CHAOS-REPORT "):
            report = json.loads(line[len("CHAOS-REPORT ") :])
    report["seconds"] = round(time.monotonic() - started, 1)
    if hung:
        report["failures"].append(f"the episode hung for {limit:.0f} s")
    elif proc.returncode != 0:
        report["failures"].append(f"the episode exited with {proc.returncode}: {err[-2000:]}")
    noise = [line for line in err.splitlines() if line.strip()]
    if noise and not hung:
        report["failures"].append("stderr not empty:\n" + "\n".join(noise[-30:]))
    # From outside: nothing of the child's left in /dev/shm, no process of
    # its session left.
    left = _blocks_of(proc.pid)
    deadline = time.monotonic() + 5.0
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = _blocks_of(proc.pid)
    if left:
        report["failures"].append(f"blocks left in /dev/shm: {left}")
        for name in left:
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except OSError:
                pass
    procs = _session_processes(proc.pid)
    if procs:
        report["failures"].append(f"processes left: {procs}")
        for pid in procs:
            _signal(pid, signal.SIGKILL)
    return report


def _blocks_of(pid: int) -> list[str]:
    from shmarray import blocks

    if not blocks.SHM_DIR:
        return []
    return [n for n in os.listdir(blocks.SHM_DIR) if blocks.owner_of(n) == pid]


def _session_processes(sid: int) -> list[int]:
    """Live processes of the child's session, or parented by its processes
    (the workers and the watchdog run in sessions of their own, but their
    parent was the child or its fork server)."""
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
        report = run_episode(seed, args.workers)
        count += 1
        status = "ok" if not report["failures"] else "FAILED"
        print(
            f"seed {seed}: {status} ({report.get('workers')} workers, "
            f"wait={report.get('wait')}, {report.get('calls', 0)} calls, "
            f"{report['seconds']} s, outcomes {report.get('outcomes', {})})",
            flush=True,
        )
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
