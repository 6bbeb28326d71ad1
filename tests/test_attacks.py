"""Reliability under attack: each victim runs in a child interpreter, and the
test observes from outside (its output, its stderr, /dev/shm, the process
table).  One test per case an adversarial trial broke."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import psutil
import pytest
from numba import njit

import shmarray
from conftest import run_python
from shmarray import control
from shmarray.descriptors import ArrayDescriptor
from test_dispatch import HOLD
from test_lifecycle import _gone

pytestmark = pytest.mark.breaks_things


# A terminal job has SIGHUP at its default: so does the victim, even when
# these tests run under nohup (which makes every child ignore it).
DEFAULT_SIGHUP = "import signal; signal.signal(signal.SIGHUP, signal.SIG_DFL)\n"


def start(code: str) -> subprocess.Popen:
    """The victim, in a session of its own (as a terminal job)."""
    return subprocess.Popen(
        [sys.executable, "-c", DEFAULT_SIGHUP + code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def read_report(proc: subprocess.Popen) -> tuple[list[int], list[str], list[str]]:
    """Lines up to 'ready': the victim's pids and blocks, and what else."""
    pids, names, other = [], [], []
    while True:
        line = proc.stdout.readline()
        assert line, proc.communicate()
        if line.startswith("pids:"):
            pids += [int(p) for p in line.split()[1:]]
        elif line.startswith("blocks:"):
            names += [n.lstrip("/") for n in line.split()[1:]]
        elif line.startswith("ready"):
            return pids, names, other
        else:
            other.append(line)


RUNNING = HOLD + textwrap.dedent("""
    eng = shmarray.Engine(workers=2)
    flag = eng.zeros(2)
    print("pids:", *eng.worker_pids, eng._dispatcher.pool.watchdog.child.pid, flush=True)
    print("blocks:", *[b.name for b in eng.blocks],
          eng._dispatcher.pool._control_name, flush=True)
    SETUP
    threading.Thread(target=lambda: (wait_running(flag), print("ready", flush=True))).start()
    eng.map(hold, flag, chunks=1)
""")


# 1 -----------------------------------------------------------------------------


def test_a_forked_childs_exit_leaves_the_parents_engine_alone():
    # The child's map and prepared step are refused in the same words; its
    # exit touches nothing of the parent's.
    code = HOLD + textwrap.dedent("""
        with shmarray.Engine(workers=2) as eng:
            x = eng.zeros(100)
            names = [b.name for b in eng.blocks]
            step = eng.prepare(scale, x, args=(2.0,), in_caller=True)
            pid = os.fork()
            if pid == 0:
                for call in (lambda: eng.map(scale, x, args=(2.0,)), step):
                    try:
                        call()
                    except RuntimeError as exc:  # the same words for both
                        print("child:", exc, flush=True)
                del x, step
                sys.exit(0)                      # atexit hooks run in the child
            os.waitpid(pid, 0)
            x[:] = 1.0
            eng.map(scale, x, args=(3.0,))
            print("after:", x.sum(), all(os.path.exists("/dev/shm" + n) for n in names))
    """)
    proc = run_python(code, timeout=120)
    assert "after: 300.0 True" in proc.stdout
    said = [line for line in proc.stdout.splitlines() if line.startswith("child:")]
    assert len(said) == 2 and said[0] == said[1], proc.stdout
    assert "a forked child cannot use it" in said[0]
    assert proc.stderr == ""


# 2 -----------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_signals_to_the_process_group_leave_nothing(sig):
    proc = start(RUNNING.replace("SETUP", ""))
    pids, names, _ = read_report(proc)  # workers and watchdog, blocks
    os.killpg(proc.pid, sig)  # timeout(1), scancel, a closed terminal
    proc.communicate(timeout=60)
    assert proc.returncode == -sig
    assert _gone(pids, names, within=10)


# 3 -----------------------------------------------------------------------------


def test_a_users_fork_child_does_not_hold_off_the_watchdog():
    setup = textwrap.dedent("""
        import multiprocessing
        # It outlives the test's wait (only the test's SIGKILL ends it): a
        # watchdog held off until it exits could not clean up in time.
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(3600,))
        child.start()
        print("child", child.pid, flush=True)
    """)
    proc = start(RUNNING.replace("SETUP", setup))
    pids, names, other = read_report(proc)
    child = int(other[0].split()[1])
    try:
        proc.kill()  # kill -9 of the coordinator
        proc.wait(30)  # (the child holds its stdout open)
        proc.stdout.close()
        proc.stderr.close()
        assert _gone(pids, names, within=30)  # a hang detector
        assert psutil.pid_exists(child)  # the user's child lives on
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_foreign_file_named_like_a_block_neither_stops_nor_fools_the_watchdog():
    proc = start(RUNNING.replace("SETUP", ""))
    pids, names, _ = read_report(proc)
    trap = f"sha-{proc.pid}-0000000000000000"  # a name the victim never made
    path = f"/dev/shm/{trap}"
    with open(path, "w") as f:
        f.write("not yours")
    try:
        nobody = pwd.getpwnam("nobody")
        os.chown(path, nobody.pw_uid, nobody.pw_gid)  # another user's file
    except (KeyError, PermissionError):
        pass
    try:
        proc.kill()
        proc.communicate(timeout=30)
        assert _gone(pids, names)
        assert os.path.exists(path)  # only what it created goes
    finally:
        os.unlink(path)


# 4 -----------------------------------------------------------------------------


def test_a_killed_watchdog_is_replaced_and_still_cleans_up():
    code = HOLD + textwrap.dedent("""
        import signal
        import psutil
        eng = shmarray.Engine(workers=2)
        x = eng.from_numpy(np.ones(10))
        dog = eng._dispatcher.pool.watchdog.child.pid
        os.kill(dog, signal.SIGKILL)                   # the watchdog alone
        psutil.Process(dog).wait(10)
        victim = eng.worker_pids[0]
        os.kill(victim, signal.SIGKILL)                 # a replacement is due
        psutil.Process(victim).wait(10)
        eng.map(scale, x, args=(2.0,))
        print("after:", x.sum(), flush=True)
        flag = eng.zeros(2)
        print("pids:", *eng.worker_pids, flush=True)
        print("blocks:", *[b.name for b in eng.blocks],
              eng._dispatcher.pool._control_name, flush=True)
        threading.Thread(target=lambda: (wait_running(flag), print("ready", flush=True))).start()
        eng.map(hold, flag, chunks=1)
    """)
    proc = start(code)
    pids, names, other = read_report(proc)
    assert "after: 20.0" in "".join(other)
    proc.kill()  # the new watchdog must clean up
    _, err = proc.communicate(timeout=30)
    assert _gone(pids, names)
    assert err == ""


@pytest.mark.parametrize("where", ["shm", "dir"])
def test_a_watchdog_killed_during_a_loop_of_maps_is_restarted(where, storage_dir):
    # The maps bring no news (no worker replaced, no block made), so only
    # the driver's own check can find the watchdog dead.
    storage = storage_dir if where == "dir" else "shm"
    code = HOLD + textwrap.dedent(f"""
        import signal
        import psutil
        eng = shmarray.Engine(workers=2, storage={storage!r})
        x = eng.from_numpy(np.ones(10))
        pool = eng._dispatcher.pool
        dog = pool.watchdog.child.pid
        print("pids:", *eng.worker_pids, flush=True)
        print("blocks:", *[b.name for b in eng.blocks], pool._control_name, flush=True)
        os.kill(dog, signal.SIGKILL)
        psutil.Process(dog).wait(10)
        started = time.monotonic()
        while pool.watchdog.child is None or pool.watchdog.child.pid == dog:
            eng.map(scale, x, args=(1.0,))
            if time.monotonic() - started > 30:  # a hang detector
                break
        print("restarted:", pool.watchdog.child.pid != dog, flush=True)
        print("ready", flush=True)
        eng.map(hold, eng.zeros(2), chunks=1)  # runs until killed
    """)
    proc = start(code)
    pids, names, other = read_report(proc)
    assert "restarted: True" in "".join(other), other
    proc.kill()  # the coordinator: the new watchdog must clean up
    _, err = proc.communicate(timeout=30)
    assert _gone(pids, names)
    assert err == ""


# 6 -----------------------------------------------------------------------------


def _private_shm(size: str, inodes: int):
    """A command prefix that runs its command with a small tmpfs of its own
    on /dev/shm (a private mount namespace), or None where not allowed."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    probe = subprocess.run(
        [
            unshare,
            "-m",
            "sh",
            "-c",
            f"mount -t tmpfs -o size={size},nr_inodes={inodes} tmpfs /dev/shm && echo ok",
        ],
        capture_output=True,
        text=True,
    )
    if probe.stdout.strip() != "ok":
        return None
    return [
        unshare,
        "-m",
        "sh",
        "-c",
        f'mount -t tmpfs -o size={size},nr_inodes={inodes} tmpfs /dev/shm && exec "$0" "$@"',
    ]


def test_out_of_inodes_is_a_shared_memory_full_error():
    prefix = _private_shm("256m", 12)
    if prefix is None:
        pytest.skip("no private mount namespace here (unshare -m and mount)")
    code = textwrap.dedent("""
        import shmarray
        with shmarray.Engine(workers=1) as eng:
            kept = []
            try:
                for _ in range(100):
                    kept.append(eng.zeros(10))
            except shmarray.SharedMemoryFullError as exc:
                print("full after", len(kept), "|", exc)
            del kept
    """)
    proc = subprocess.run(
        prefix + [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "no free inode left" in proc.stdout and "nr_inodes" in proc.stdout
    assert proc.stderr == ""


# 7, 8, 9 -------------------------------------------------------------------------


@njit
def add_one(x):
    for i in range(x.shape[0]):
        x[i] += 1.0


def held_add_one(x, gate):
    """Runs until the test lets it go (gate[0]); 60 s: a hang detector."""
    deadline = time.monotonic() + 60
    while gate[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    x += 1.0


def map_once_the_caller_sleeps(engine, x, timeout):
    """``engine.map(held_add_one, x)`` with ``timeout``, held until the
    caller has spun and napped and sleeps in poll() (its COORD_ASLEEP word
    is 1), where the timeout becomes poll()'s.  Whether it got there."""
    words = engine._dispatcher.pool.ctl.words
    gate = engine.zeros(1, np.int64)
    asleep = []

    def release():
        deadline = time.monotonic() + 60  # a hang detector
        while control.load(words, control.COORD_ASLEEP) != 1:
            if time.monotonic() > deadline:
                break
            time.sleep(0.001)
        else:
            asleep.append(True)
        gate[0] = 1

    releaser = threading.Thread(target=release)
    releaser.start()
    try:
        engine.map(held_add_one, x, args=(gate,), timeout=timeout)
    finally:
        gate[0] = 1
        releaser.join(60)
    return bool(asleep)


def test_infinite_and_huge_timeouts(engine):
    x = engine.zeros(4)
    assert map_once_the_caller_sleeps(engine, x, float("inf"))
    assert map_once_the_caller_sleeps(engine, x, 1e9)  # past poll()'s 2**31 ms: clamped
    assert np.all(x == 2.0)
    with pytest.raises(ValueError, match="timeout must be positive"):
        engine.map(add_one, x, timeout=float("nan"))
    del x


def test_workers_refuse_a_hand_made_descriptor_of_objects(engine):
    x = engine.zeros(4)
    block = engine.blocks[-1].name
    evil = ArrayDescriptor(block, 0, (4,), (8,), "|O")

    def read(x, objs):
        return objs[0]

    with pytest.raises(ValueError, match="refusing to map it"):
        engine.reduce(read, x, args=(evil,))
    engine.map(add_one, x)  # the worker lived
    assert np.all(x == 1.0)
    del x


@njit
def copy(out, inp):
    for i in range(inp.shape[0]):
        out[i] = inp[i]


@pytest.mark.parametrize(
    "call, exc, text",
    [
        (lambda e, a, b: e.map(copy, a, b, chunks=(32.0, 32.0)), TypeError, "must be ints"),
        (lambda e, a, b: e.map(copy, a, b, chunks=(32, 0)), ValueError, "positive ints"),
        (lambda e, a, b: e.map(copy, a, b, progress=0), TypeError, "progress must be"),
        (lambda e, a, b: e.map(copy, a, b, progress=1), TypeError, "progress must be"),
        (lambda e, a, b: e.empty(""), TypeError, "shape must be"),
        (lambda e, a, b: e.empty(3, "S0"), TypeError, "zero-size dtype"),
        (lambda e, a, b: e.zeros(3, "U0"), TypeError, "zero-size dtype"),
    ],
)
def test_validation_gaps_are_closed(engine, call, exc, text):
    a, b = engine.zeros(64), engine.zeros(64)
    engine.map(copy, a, b, chunks=(32, 32))  # the valid call, cached
    with pytest.raises(exc, match=text):
        call(engine, a, b)
    del a, b


@pytest.mark.parametrize(
    "value, exc", [(0, ValueError), (-1, ValueError), (float("inf"), ValueError), ("5", TypeError)]
)
def test_startup_timeout_is_checked(value, exc):
    with pytest.raises(exc, match="startup_timeout"):
        shmarray.Engine(workers=1, startup_timeout=value)


# 10 ----------------------------------------------------------------------------


def test_a_kernel_that_forks_leaves_the_engine_correct():
    code = textwrap.dedent("""
        import os
        import numpy as np
        import shmarray

        def forks(x):
            os.fork()                 # both processes return from here
            x[:] += 1.0

        with shmarray.Engine(workers=2) as eng:
            x = eng.zeros(4)
            eng.map(forks, x, chunks=1)
            for _ in range(20):
                eng.map(lambda a: a.__iadd__(1.0), x)
            print("after:", x.tolist())
    """)
    proc = run_python(code, timeout=120)
    # Both processes ran the rest of the forking kernel (its own doing: 2),
    # then only the worker went on, and every later map counted once.
    assert "after: [22.0, 22.0, 22.0, 22.0]" in proc.stdout
    assert proc.stderr == ""


def test_a_kernel_raising_keyboard_interrupt_is_one_clean_error():
    code = textwrap.dedent("""
        import shmarray

        def impatient(x):
            raise KeyboardInterrupt("the kernel gave up")

        with shmarray.Engine(workers=2) as eng:
            x = eng.zeros(4)
            try:
                eng.map(impatient, x)
            except KeyboardInterrupt as exc:
                print("caught:", exc, "|", exc.__notes__[0].split(" on rows")[0][:40])
            eng.map(lambda a: a.fill(2.0), x)
            print("after:", x.tolist())
    """)
    proc = run_python(code, timeout=120)
    assert "caught: the kernel gave up | raised by the kernel in worker" in proc.stdout
    assert "after: [2.0, 2.0, 2.0, 2.0]" in proc.stdout
    assert proc.stderr == ""


def test_ctrl_c_during_a_slow_close_then_close_again_finishes():
    code = textwrap.dedent("""
        import os, signal
        import shmarray
        signal.signal(signal.SIGINT, signal.default_int_handler)
        eng = shmarray.Engine(workers=2)
        os.kill(eng.worker_pids[1], signal.SIGSTOP)     # will not answer Stop
        print("pids:", *eng.worker_pids, eng._dispatcher.pool.watchdog.child.pid)
        print("blocks:", *[b.name for b in eng.blocks], eng._dispatcher.pool._control_name)
        try:
            # close() waits seconds for the stopped worker: Ctrl-C lands there
            print("ready", flush=True)
            eng.close()
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        eng.close()
        print("closed again", eng.closed, flush=True)
    """)
    proc = start(code)
    pids, names, _ = read_report(proc)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert "interrupted" in out and "closed again True" in out, (out, err)
    assert _gone(pids, names)
    assert err == ""
