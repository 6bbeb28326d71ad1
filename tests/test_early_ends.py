"""A map that ends early leaves no writer behind: when a call that runs a
map leaves by an exception, none of its workers still runs.

Each case runs a victim in a child interpreter (``tests/burst.py``): every
chunk of its call spins until released and only then writes its rows; a
burst of three Ctrl-C, 50 ms apart, lands while they all run; the victim
releases them the moment the call raised and watches its arrays for two
seconds.  Before the round had one place that ends it early (``settle``:
every busy worker killed first, then reaped, signals held meanwhile), the
second Ctrl-C cut the one-at-a-time kill loop short and the workers not
yet killed wrote their rows after ``KeyboardInterrupt`` was raised.
"""

from __future__ import annotations

import signal
import textwrap

import pytest

import burst
from conftest import run_python, storage_for

CASES = [("map", 2), ("map", 3), ("map", 5)] + [
    (how, 5) for how in burst.HOWS if how not in ("map", "imap_body")
]


@pytest.mark.breaks_things
@pytest.mark.parametrize("how, workers", CASES, ids=[f"{h}-{w}w" for h, w in CASES])
def test_a_burst_of_ctrl_c_leaves_no_worker_writing(how, workers):
    report = burst.trial(how, workers, storage_for(workers))
    assert report["returncode"] == 0 and report["stderr"] == "", report
    assert report["raised"], f"the call ended before the burst: {report}"
    assert report["changed"] == [], (
        f"rows {report['changed']} changed after the {how} raised KeyboardInterrupt: "
        f"a worker of the map was still running"
    )
    assert report["after"], "the next map did not work"


# The three ways a main thread waits for a map: it drives it, it waits for
# a map queued behind another thread's, it waits for an imap stream.
DENSE = ["map", "queued", "imap"]


@pytest.mark.breaks_things
@pytest.mark.parametrize("how", DENSE)
def test_ctrl_c_every_50_us_leaves_no_worker_writing_and_the_engine_working(how):
    # After the first Ctrl-C, 2000 more, 50 us apart (an interval timer's
    # handler sends each): one lands within every few bytecodes of the
    # code the first one's exception runs through, wherever that is.
    # Before, a main thread waiting for a queued map or an imap stream
    # raised KeyboardInterrupt and stopped the map after it, unless the
    # next Ctrl-C landed first: then the map ran on (4 of 4 trials, rows
    # written after the call raised; found by the chaos test, seed
    # 58362380); SimpleQueue.get(timeout=) hung the stream for ever (3.11
    # and 3.12); and a driven map's span, released before the role of the
    # driver was given back, let a Ctrl-C leave the role taken (the next
    # map hung) or leave its exception to be raised by the next map.
    report = burst.trial(how, 2, storage_for(2), dense=True)
    assert report["returncode"] == 0 and report["stderr"] == "", report
    assert report["raised"], f"the call ended before the burst: {report}"
    assert report["signals"] > 1000, f"the burst was not dense: {report}"
    assert report["changed"] == [], (
        f"rows {report['changed']} changed after the {how} raised KeyboardInterrupt"
    )
    assert report["after"], "the next map did not work"


@pytest.mark.breaks_things
def test_a_burst_of_sigterm_whose_handler_exits_leaves_no_worker_writing():
    report = burst.trial("map", 3, storage_for(3), sig=signal.SIGTERM)
    assert report["returncode"] == 0 and report["stderr"] == "", report
    assert report["raised"] and report["changed"] == [] and report["after"], report


def test_a_handler_that_does_not_raise_leaves_the_map_running():
    # The user's handler runs at once, as without shmarray; only what it
    # raises is held.  This one raises nothing: the map goes on.
    code = textwrap.dedent("""
        import os, signal, threading, time, warnings
        import numpy as np
        import shmarray

        warnings.filterwarnings("ignore", category=shmarray.PythonKernelWarning)
        hits = []
        signal.signal(signal.SIGINT, lambda s, f: hits.append(s))

        def held(out, flags):
            flags[0] = 1.0
            while flags[1] == 0.0:
                time.sleep(0.001)
            out[:] = 1.0

        with shmarray.Engine(workers=2) as eng:
            out, flags = eng.zeros(8), eng.zeros(2)

            def poke():
                while flags[0] == 0.0:
                    time.sleep(0.001)
                os.kill(os.getpid(), signal.SIGINT)
                while not hits:
                    time.sleep(0.001)
                flags[1] = 1.0

            threading.Thread(target=poke, daemon=True).start()
            eng.map(held, out, args=(flags,), chunks=1)
            print("hits:", len(hits), "out:", out.tolist())
    """)
    proc = run_python(code)
    assert "hits: 1 out: " + str([1.0] * 8) in proc.stdout, proc.stdout
    assert proc.stderr == ""


def test_the_users_signal_handlers_are_back_once_the_last_engine_closes():
    code = textwrap.dedent("""
        import signal
        import numpy as np
        import shmarray

        mine = lambda s, f: None
        signal.signal(signal.SIGINT, mine)
        a, b = shmarray.Engine(workers=2), shmarray.Engine(workers=2)
        x = a.zeros(4)
        a.map(lambda v: v.fill(1.0), x)
        print("while open:", signal.getsignal(signal.SIGINT) is mine)
        del x
        a.close()
        print("one open:", signal.getsignal(signal.SIGINT) is mine)
        b.close()
        print("all closed:", signal.getsignal(signal.SIGINT) is mine)
    """)
    proc = run_python(code)
    assert "while open: False" in proc.stdout  # wrapped (see interrupts.py)
    assert "one open: False" in proc.stdout
    assert "all closed: True" in proc.stdout
    assert proc.stderr == ""


def test_ctrl_c_while_blocks_are_made_leaves_no_block_unnamed(tmp_path):
    # SIGINT every 0.2 ms while the main thread makes small arrays in a
    # directory (thousands of interrupts, some inside the making of a
    # block): every block made is one close() unlinks, and once the kept
    # exceptions are dropped no descriptor into the directory is open.
    where = tmp_path / "blocks"
    where.mkdir()
    code = textwrap.dedent(f"""
        import gc, os, signal, threading, time
        import shmarray

        where = {str(where)!r}
        armed = False

        def handler(signum, frame):
            if armed:                      # only around eng.zeros
                raise KeyboardInterrupt

        signal.signal(signal.SIGINT, handler)
        done = threading.Event()

        def pester():
            while not done.wait(0.0002):
                os.kill(os.getpid(), signal.SIGINT)

        kept, made = [], []
        with shmarray.Engine(workers=2, storage=where) as eng:
            threading.Thread(target=pester, daemon=True).start()
            end = time.monotonic() + 3.0
            while time.monotonic() < end:
                try:
                    armed = True
                    made.append(eng.zeros(1000))
                    armed = False
                except KeyboardInterrupt as exc:
                    armed = False
                    kept.append(exc)       # as a notebook keeps what it showed
                del made[:-20]
            done.set()
            del made
        print("interrupted:", len(kept) > 100)
        print("files left:", os.listdir(where))
        del kept
        gc.collect()
        fds = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                fds.append(os.readlink("/proc/self/fd/" + fd))
            except OSError:                # the listing's own descriptor
                pass
        print("descriptors left:", [f for f in fds if f.startswith(where)])
    """)
    proc = run_python(code, timeout=120)
    assert proc.stdout.splitlines() == [
        "interrupted: True",
        "files left: []",
        "descriptors left: []",
    ], proc.stdout + proc.stderr


# A child's code that sends its process a SIGINT as the function ``name``
# is called the first time after ``arm(name)``: the next Ctrl-C of a burst,
# landing at a chosen place (the user's handler raises KeyboardInterrupt).
AT_A_CALL = """
import os, signal, sys

def _raise(signum, frame):
    raise KeyboardInterrupt

signal.signal(signal.SIGINT, _raise)

def arm(name, where="", sig=signal.SIGINT):
    def hook(frame, event, arg):
        code = frame.f_code
        if event == "call" and code.co_name == name and code.co_filename.endswith(where):
            sys.setprofile(None)
            os.kill(os.getpid(), sig)
    sys.setprofile(hook)
"""

# A child's start for the tests of a map held until released (burst.held).
HELD = textwrap.dedent(f"""
    import sys, threading, time, warnings
    sys.path.insert(0, {burst.HERE!r})
    import numpy as np
    import shmarray
    from burst import ROWS, held

    warnings.filterwarnings("ignore", category=shmarray.PythonKernelWarning)
""")


@pytest.mark.breaks_things
def test_a_ctrl_c_as_an_imap_stream_closes_still_stops_its_map():
    # The first Ctrl-C lands in the loop's body; the `with` block closes
    # the stream; the next one lands as the close begins to stop the map.
    # Before, that one cut the close short: the map ran on, and its held
    # chunk wrote its rows after the stream raised.
    code = AT_A_CALL + textwrap.dedent(f"""
        import sys, time, warnings
        sys.path.insert(0, {burst.HERE!r})
        import numpy as np
        import shmarray
        from burst import ROWS, held_but_the_callers

        warnings.filterwarnings("ignore", category=shmarray.PythonKernelWarning)
        with shmarray.Engine(workers=2) as eng:
            out, flags = eng.zeros(ROWS), eng.zeros(3)
            args = (flags, shmarray.row_offset, ROWS // 2)
            try:
                with eng.imap(held_but_the_callers, out, args=args, chunks=2) as stream:
                    for _ in stream:  # the last chunk's value; the other is held
                        while not np.all(flags[1:] == 1.0):
                            time.sleep(0.001)
                        arm("_halt")
                        raise KeyboardInterrupt  # the first Ctrl-C
            except KeyboardInterrupt:
                seen = out.copy()
                flags[0] = 1.0  # a worker still running writes now
                raised = time.monotonic()
                changed = set()
                while time.monotonic() - raised < 1.0:  # an observation window
                    changed.update(np.flatnonzero(out != seen).tolist())
                    time.sleep(0.01)
                print("changed after:", sorted(changed))
            check = eng.zeros(ROWS)
            eng.map(lambda x: x.fill(2.0), check)
            print("next map:", bool(np.all(check == 2.0)))
    """)
    proc = run_python(code)
    assert proc.stdout.splitlines() == ["changed after: []", "next map: True"], (
        proc.stdout + proc.stderr
    )


@pytest.mark.breaks_things
def test_a_ctrl_c_within_close_cancels_every_queued_map_first():
    # A map runs in one thread, another thread's map waits in the queue,
    # and the main thread closes the engine; a Ctrl-C lands as close()
    # cancels the queued map.  Before, it cut close() short there: the
    # queued map's future stayed pending, and its thread waited for ever.
    code = (
        AT_A_CALL
        + HELD
        + textwrap.dedent("""
        eng = shmarray.Engine(workers=2)
        flags, other = eng.zeros(3), eng.zeros(3)
        ended = {}

        def call(name, f):
            try:
                eng.map(held, eng.zeros(ROWS), args=(f, shmarray.row_offset, ROWS // 2), chunks=2)
                ended[name] = "returned"
            except BaseException as exc:
                ended[name] = type(exc).__name__

        first = threading.Thread(target=call, args=("running", flags))
        first.start()
        while not np.all(flags[1:] == 1.0):
            time.sleep(0.001)
        queued = threading.Thread(target=call, args=("queued", other))
        queued.start()
        while not eng._dispatcher._queue:
            time.sleep(0.001)
        arm("cancel")
        try:
            eng.close()
            print("close: returned")
        except KeyboardInterrupt:
            print("close: KeyboardInterrupt")
        for t in (first, queued):
            t.join(30)
        print("running:", ended.get("running"), "queued:", ended.get("queued"))
        eng.close()
    """)
    )
    proc = run_python(code, timeout=60)  # before: a hang
    assert proc.stdout.splitlines() == [
        "close: KeyboardInterrupt",
        "running: EngineClosedError queued: EngineClosedError",
    ], proc.stdout + proc.stderr


def test_a_blocking_map_in_a_done_callback_runs_while_others_are_queued():
    # A future's done-callback runs in the manager thread, the one thread
    # that drives the queue: a blocking map there, with another call
    # queued, waited for itself (a hang, until close).
    code = HELD + textwrap.dedent("""
        def fill(x, v):
            x[:] = v

        with shmarray.Engine(workers=2) as eng:
            a, b, c, flags = eng.zeros(ROWS), eng.zeros(ROWS), eng.zeros(ROWS), eng.zeros(3)
            done = threading.Event()

            def then(future):
                eng.map(fill, c, args=(3.0,))
                done.set()

            first = eng.submit(held, a, args=(flags, shmarray.row_offset, ROWS // 2), chunks=2)
            while not np.all(flags[1:] == 1.0):  # it runs, held
                time.sleep(0.001)
            first.add_done_callback(then)
            second = eng.submit(fill, b, args=(2.0,))
            flags[0] = 1.0  # first ends; its callback runs with second queued
            second.result(timeout=20)
            print("callback's map done:", done.wait(20))
            print("values:", a[0], b[0], c[0])
    """)
    proc = run_python(code, timeout=60)
    assert proc.stdout.splitlines() == [
        "callback's map done: True",
        "values: 1.0 2.0 3.0",
    ], proc.stdout + proc.stderr


def test_our_saved_wrapper_installed_again_after_the_last_close_acts_as_the_users_handler():
    # signal.getsignal(SIGINT) while an engine is open gives our wrapper; a
    # program that saved it and puts it back after the last engine closed
    # got KeyError: 2 on every Ctrl-C.
    code = textwrap.dedent("""
        import os, signal
        import shmarray

        def mine(signum, frame):
            raise KeyboardInterrupt("mine")

        signal.signal(signal.SIGINT, mine)
        with shmarray.Engine(workers=1) as eng:
            x = eng.zeros(4)
            eng.map(lambda v: v.fill(1.0), x)
            saved = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, saved)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):
                pass
        except KeyboardInterrupt as exc:
            print("raised:", repr(exc))
    """)
    proc = run_python(code)
    assert proc.stdout.splitlines() == ["raised: KeyboardInterrupt('mine')"], (
        proc.stdout + proc.stderr
    )


def test_a_ctrl_c_as_the_exit_hook_lets_go_of_the_signals_prints_nothing():
    # The exit hook closes the last engine with the signals held; the
    # user's handlers were put back inside that span, so a Ctrl-C as it
    # ended raised in it ("Exception ignored in atexit callback") and left
    # it open.  They are now put back as the span closes.
    code = AT_A_CALL + textwrap.dedent("""
        import shmarray

        eng = shmarray.Engine(workers=1)
        x = eng.zeros(4)
        eng.map(lambda v: v.fill(1.0), x)
        print("mapped:", x.tolist())
        arm("release", "interrupts.py")  # SIGNALS.release, at exit
    """)
    proc = run_python(code)
    assert proc.stdout == "mapped: [1.0, 1.0, 1.0, 1.0]\n" and proc.stderr == "", (
        proc.stdout + proc.stderr
    )


def test_closing_a_stream_whose_map_is_still_queued_returns_at_once():
    # The stream's close cancels its map, queued behind a map that runs;
    # it then waited for the manager thread to see the cancel, that is for
    # the other map to end (concurrent.futures.wait counts a cancelled
    # future done only then; with the engine closed meanwhile, never: the
    # chaos test's hang).
    code = HELD + textwrap.dedent("""
        with shmarray.Engine(workers=2) as eng:
            flags, x = eng.zeros(3), eng.zeros(ROWS)
            args = (flags, shmarray.row_offset, ROWS // 2)
            first = eng.submit(held, eng.zeros(ROWS), args=args, chunks=2)
            while not np.all(flags[1:] == 1.0):  # it runs, held until released
                time.sleep(0.001)
            stream = eng.imap(lambda v: float(v.sum()), x)  # queued behind it
            closing = threading.Thread(target=stream.close, daemon=True)
            closing.start()
            closing.join(30)  # a hang detector: the held map runs until released
            print("stream closed:", not closing.is_alive())
            flags[0] = 1.0
            first.result(timeout=30)
    """)
    proc = run_python(code, timeout=90)
    assert proc.stdout.splitlines() == ["stream closed: True"], proc.stdout + proc.stderr


@pytest.mark.breaks_things
def test_a_signal_handler_that_closes_the_engine_inside_its_locks_does_not_hang():
    # A service's SIGTERM handler calls eng.close().  The signal lands while
    # the main thread holds one of the locks close() takes: the
    # dispatcher's (a map taking the driver's role, a submit queueing its
    # call) or the block table's (a block made).  Before, close() waited
    # for that lock in the thread that held it: a hang.
    code = AT_A_CALL + textwrap.dedent("""
        import time
        import shmarray

        def on_term(signum, frame):
            eng.close()

        signal.signal(signal.SIGTERM, on_term)

        def alive(pid):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            return True

        def gone(pids):  # closed by another thread: wait for it
            deadline = time.monotonic() + 30
            while pids and time.monotonic() < deadline:
                time.sleep(0.01)
                pids = [p for p in pids if alive(p)]
            return not pids

        for name, where, call in [
            ("_check_open", "dispatch.py", lambda x: eng.map(lambda v: v.fill(1.0), x)),
            ("_enqueue", "dispatch.py", lambda x: eng.submit(lambda v: v.fill(1.0), x).result(30)),
            ("_reap_locked", "blocktable.py", lambda x: eng.zeros(8)),
        ]:
            eng = shmarray.Engine(workers=2)
            x, pids = eng.zeros(8), eng.worker_pids
            arm(name, where, signal.SIGTERM)
            try:
                call(x)
                outcome = "returned"
            except BaseException as exc:
                outcome = type(exc).__name__
            print(name, outcome in ("returned", "EngineClosedError", "CancelledError"),
                  "closed:", eng.closed, "workers gone:", gone(pids))
    """)
    proc = run_python(code, timeout=60)  # before: a hang in the first
    assert proc.stdout.splitlines() == [
        f"{name} True closed: True workers gone: True"
        for name in ("_check_open", "_enqueue", "_reap_locked")
    ], proc.stdout + proc.stderr
    assert proc.stderr == ""


@pytest.mark.breaks_things
def test_a_ctrl_c_as_a_map_gives_the_role_back_is_raised_by_that_map_only():
    # A Ctrl-C lands as the main thread's map ends, while another thread's
    # map waits in the queue; the main thread is switched out right after
    # it gives the driver's role back (forced here: it waits for the other
    # map to be driven).  Before, the other map's driver forgot the
    # caught KeyboardInterrupt as it took the role: the main thread's map
    # returned as if no Ctrl-C had come.
    code = (
        AT_A_CALL
        + HELD
        + textwrap.dedent("""
        eng = shmarray.Engine(workers=2)
        flags, y = eng.zeros(3), eng.zeros(4)
        main = threading.get_ident()
        ended = {}

        submitted = []

        def other():
            while not np.all(flags[1:] == 1.0):  # the main thread's map runs
                time.sleep(0.001)
            future = eng.submit(lambda v: v.fill(2.0), y)  # queued behind it
            submitted.append(future)
            flags[0] = 1.0  # the main thread's map may end now
            try:
                future.result(30)
                ended["other"] = "returned"
            except BaseException as exc:
                ended["other"] = type(exc).__name__

        let_go = []

        def hook(frame, event, arg):
            code = frame.f_code
            if event != "call":
                return
            if code.co_name == "_let_go" and code.co_filename.endswith("dispatch.py"):
                let_go.append(True)
                os.kill(os.getpid(), signal.SIGINT)
            elif (
                let_go
                and code.co_name == "release"
                and code.co_filename.endswith("interrupts.py")
            ):
                sys.setprofile(None)
                # Switched out until the other map is driven (or done).
                future, deadline = submitted[0], time.monotonic() + 10
                while not (future.running() or future.done()):
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.0005)
                print("the other map driven:", future.running() or future.done())

        thread = threading.Thread(target=other)
        thread.start()
        sys.setprofile(hook)
        try:
            eng.map(held, eng.zeros(ROWS), args=(flags, shmarray.row_offset, ROWS // 2), chunks=2)
            print("main: returned")
        except KeyboardInterrupt:
            print("main: KeyboardInterrupt")
        sys.setprofile(None)
        thread.join(30)
        print("other:", ended.get("other"), y.tolist())
        eng.close()
    """)
    )
    proc = run_python(code, timeout=60)
    assert proc.stdout.splitlines() == [
        "the other map driven: True",
        "main: KeyboardInterrupt",
        "other: returned [2.0, 2.0, 2.0, 2.0]",
    ], proc.stdout + proc.stderr
