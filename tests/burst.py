"""A burst of Ctrl-C against a running map, observed from outside.

The victim, a child interpreter in a session of its own (as a terminal
job), runs one call whose every chunk marks itself running in a shared
flag array, then waits until the victim releases it, and only then writes
its rows.  The parent waits until every chunk runs, then sends the
victim's process group ``signals`` SIGINTs ``gap`` seconds apart: an
impatient user.  The victim catches the ``KeyboardInterrupt`` the call
raises, takes a copy of the arrays at once, releases the chunks (any
worker still alive then writes within milliseconds), and watches the
arrays for ``WATCH`` seconds.  Every row that changed after the call
raised was written by a worker the engine left running: there must be
none.  Then one more map checks that the engine works.

The victim's handler raises ``KeyboardInterrupt`` for every signal that
lands inside the call (as Python's default handler would) and only counts
those that land after it, so the victim's own observation is never cut
short.  With SIGTERM, its handler raises ``SystemExit`` (a service's
graceful shutdown) the same way.

Run::

    python tests/burst.py --trials 50 --how map --workers 5 --storage memfd

``tests/test_early_ends.py`` runs one trial of each kind.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
# What a trial may call: every path a map takes.
HOWS = (
    "map",
    "prepared",
    "in_caller",
    "reduce",
    "retries",
    "imap",
    "iterate",
    "queued",
    "imap_body",
)
# A victim with ``dense`` answers the first signal with DENSE more of the
# same, one every DENSE_GAP seconds (an interval timer's SIGALRM handler
# sends each): a burst so dense that one lands within every few bytecodes
# of the code the first one's exception runs through.
DENSE = 2000
DENSE_GAP = 50e-6
# Seconds the victim watches its arrays after the call raised: an
# observation window (a surviving writer is released at once and writes
# within milliseconds), not a synchronisation.
WATCH = 2.0
ROWS = 64


def held(out, flags, row_offset, rows):
    """Mark this chunk running, spin until the release, then write its
    rows (so a worker that outlives the call shows as changed rows)."""
    flags[1 + row_offset // rows] = 1.0
    while flags[0] == 0.0:  # busy, as a numba loop is: 5 workers load 2 CPUs
        pass
    out[:] = 1.0
    return 0.0


def held_but_the_callers(out, flags, row_offset, rows):
    """``held`` for ``prepare(in_caller=True)``: the last chunk, the
    caller's own share, writes its rows at once (the caller answers Ctrl-C
    only when its share ends); the workers' chunks are held.  (For
    ``imap_body``: the stream's first value.)"""
    k = row_offset // rows
    if k == flags.shape[0] - 2:
        flags[1 + k] = 1.0
        out[:] = 1.0
        return 0.0
    return held(out, flags, row_offset, rows)


def held_step(out, inp, flags, row_offset, rows):
    """``held`` for ``Engine.iterate`` (two arrays, swapped each step)."""
    return held(out, flags, row_offset, rows)


def victim(
    how: str, workers: int, storage: str, sig: int = signal.SIGINT, dense: bool = False
) -> None:
    import threading

    import numpy as np

    import shmarray

    # held() loops in Python on purpose: it holds its worker on a flag.
    warnings.filterwarnings("ignore", category=shmarray.PythonKernelWarning)
    hits: list[float] = []

    def call() -> None:
        args = (flags, shmarray.row_offset, ROWS // workers)
        if how == "map":
            eng.map(held, out, args=args, chunks=workers)
        elif how == "prepared":
            eng.prepare(held, out, args=args, chunks=workers)()
        elif how == "in_caller":
            eng.prepare(held_but_the_callers, out, args=args, chunks=workers, in_caller=True)()
        elif how == "reduce":
            eng.reduce(held, out, args=args, chunks=workers)
        elif how == "retries":
            eng.map(held, out, args=args, chunks=workers, retries=1)
        elif how == "imap":
            for _ in eng.imap(held, out, args=args, chunks=workers):
                pass
        elif how == "iterate":
            eng.iterate(held_step, out, other, steps=2, args=args, chunks=workers)
        elif how == "queued":
            # Queued behind another thread's map: the manager thread drives
            # it, and this thread waits.
            eng.map(held, out, args=args, chunks=workers)
        elif how == "imap_body":
            # Ctrl-C in the loop's body, on the first value (the last
            # chunk's, at once): the stream's close stops the map.
            with eng.imap(held_but_the_callers, out, args=args, chunks=workers) as stream:
                for _ in stream:
                    while True:
                        time.sleep(0.001)  # the user's work on it

    def in_call(frame) -> bool:
        while frame is not None:
            if frame.f_code is call.__code__:
                return True
            frame = frame.f_back
        return False

    # Ctrl-C as Python raises it; SIGTERM as a service's handler might.
    interrupted = KeyboardInterrupt if sig == signal.SIGINT else SystemExit

    alarms: list[float] = []

    def alarm(signum, frame):
        alarms.append(time.monotonic())
        if len(alarms) >= DENSE:
            signal.setitimer(signal.ITIMER_REAL, 0)
        os.kill(os.getpid(), sig)

    def handler(signum, frame):
        hits.append(time.monotonic())
        if dense and len(hits) == 1:
            signal.signal(signal.SIGALRM, alarm)
            signal.setitimer(signal.ITIMER_REAL, DENSE_GAP, DENSE_GAP)
        if in_call(frame):
            raise interrupted

    signal.signal(sig, handler)
    with shmarray.Engine(workers=workers, storage=storage) as eng:
        out, other = eng.zeros(ROWS), eng.zeros(ROWS)
        flags = eng.zeros(1 + workers)

        def announce() -> None:
            if how == "queued":
                # The map ahead runs until this thread's map is queued.
                while not np.all(ahead_flags[1:] == 1.0) or not eng._dispatcher._queue:
                    time.sleep(0.001)
                ahead_flags[0] = 1.0
            while not np.all(flags[1:] == 1.0):
                time.sleep(0.001)
            print("running", flush=True)

        if how == "queued":
            ahead_flags = eng.zeros(1 + workers)
            ahead = threading.Thread(
                target=eng.map,
                args=(held, eng.zeros(ROWS)),
                kwargs={
                    "args": (ahead_flags, shmarray.row_offset, ROWS // workers),
                    "chunks": workers,
                },
            )
            ahead.start()
            while not np.all(ahead_flags[1:] == 1.0):
                time.sleep(0.001)
        threading.Thread(target=announce, daemon=True).start()
        result = {"raised": None}
        try:
            call()
        except interrupted:
            raised = time.monotonic()
            seen = (out.copy(), other.copy())
            flags[0] = 1.0  # a surviving worker writes now
            changed: set[int] = set()
            while time.monotonic() - raised < WATCH:
                for a, before in zip((out, other), seen):
                    changed.update(np.flatnonzero(a != before).tolist())
                time.sleep(0.01)
            result = {"raised": True, "changed": sorted(changed)}
        else:
            result = {"raised": False, "changed": []}
        if how == "queued":
            ahead.join()
        result["signals"] = len(hits)
        check = eng.zeros(ROWS)
        eng.map(_fill, check)
        result["after"] = bool(np.all(check == 2.0))
        print("result:", json.dumps(result), flush=True)


def _fill(x):
    x[:] = 2.0


def trial(
    how: str,
    workers: int,
    storage: str,
    signals: int = 3,
    gap: float = 0.05,
    sig: int = signal.SIGINT,
    dense: bool = False,
) -> dict:
    """One victim, one burst of ``sig`` (with ``dense``: the victim sends
    itself DENSE more, DENSE_GAP apart, from the first on): the victim's
    result, with its exit code and stderr."""
    victim_args = ["--victim", how, str(workers), storage, str(int(sig)), str(int(dense))]
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *victim_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        cwd=HERE,
    )
    try:
        while True:
            line = proc.stdout.readline()
            if not line:
                out, err = proc.communicate(timeout=60)
                raise AssertionError(f"the victim ended before running: {out}\n{err}")
            if line.startswith("running"):
                break
        for k in range(signals):
            if k:
                time.sleep(gap)  # the user's rhythm, not a synchronisation
            os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    results = [ln for ln in out.splitlines() if ln.startswith("result:")]
    report = json.loads(results[-1].split(":", 1)[1]) if results else {}
    report.update(returncode=proc.returncode, stderr=err)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--victim", nargs=5, metavar=("HOW", "WORKERS", "STORAGE", "SIGNAL", "ECHO"))
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--how", choices=HOWS, default="map")
    p.add_argument("--workers", type=int, default=5)
    p.add_argument("--storage", default="memfd", help='"shm", "memfd", or a directory')
    p.add_argument("--signals", type=int, default=3)
    p.add_argument("--gap", type=float, default=0.05)
    p.add_argument(
        "--dense",
        action="store_true",
        help=f"{DENSE} more signals, {DENSE_GAP * 1e6:.0f} us apart",
    )
    a = p.parse_args(argv)
    if a.victim:
        victim(a.victim[0], int(a.victim[1]), a.victim[2], int(a.victim[3]), a.victim[4] == "1")
        return 0
    bad = 0
    for k in range(a.trials):
        try:
            r = trial(a.how, a.workers, a.storage, a.signals, a.gap, dense=a.dense)
        except subprocess.TimeoutExpired:
            bad += 1
            print(f"trial {k + 1}: the victim hung (killed after 120 s)", flush=True)
            continue
        late = len(r.get("changed", []))
        ok = r.get("raised") and not late and r.get("after") and r["returncode"] == 0
        bad += not ok
        print(
            f"trial {k + 1}: raised={r.get('raised')} rows changed after={late} "
            f"engine after={r.get('after')} rc={r['returncode']}",
            flush=True,
        )
    print(f"{a.how}, {a.workers} workers, {a.storage}: {bad} of {a.trials} trials failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
