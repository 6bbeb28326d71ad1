"""Cases found by a newcomer's and an adversarial trial, each reproduced in a
child interpreter and observed from outside."""

from __future__ import annotations

import textwrap

import pytest

from conftest import run_python

COMMON = textwrap.dedent("""
    import os, random, signal, sys, threading, time
    import numpy as np
    import shmarray
    from shmarray import launch
    from numba import njit

    # The kernels here loop in Python on purpose (to spin, spew or hold).
    import warnings
    warnings.filterwarnings("ignore", category=shmarray.PythonKernelWarning)
""")


@pytest.mark.breaks_things
def test_a_dead_fork_server_corrupts_nothing():
    # Workers' exits used to be read from the fork server's status pipe: with
    # the server gone, live workers read as crashed (255), were not killed,
    # and went on writing under the next map.
    proc = run_python(
        COMMON
        + textwrap.dedent("""
        import select
        from shmarray import control

        @njit(nogil=True)
        def held_set(x, value, gate):
            # gate[0]: chunks running; gate[1]: let go (by the test).
            control.fetch_add(gate, 0, 1)
            while control.load(gate, 1) == 0:
                pass
            for i in range(x.shape[0]):
                x[i] = value

        def wait_for(seen, what):
            deadline = time.monotonic() + 60               # a hang detector
            while not seen():
                assert time.monotonic() < deadline, what
                time.sleep(0.001)

        with shmarray.Engine(workers=3) as eng:
            x = eng.zeros(3000)
            gate = eng.zeros(2, np.int64)
            gate[1] = 1
            eng.map(held_set, x, args=(1.0, gate), chunks=3)   # compiled everywhere
            gate[:] = 0
            before = eng.worker_pids
            f = eng.submit(held_set, x, args=(2.0, gate), chunks=3)
            wait_for(lambda: control.load(gate, 0) == 3, "every worker in the map")
            server = launch.server_pid()
            pidfd = os.pidfd_open(server)
            os.kill(server, signal.SIGKILL)
            # Let the map go only once the server has exited and the driver
            # then sleeps on its pipes with the map still held: a driver
            # that took its workers' fate from the server would find them
            # "crashed" there.
            exited = select.select([pidfd], [], [], 60)[0]   # readable: it exited
            os.close(pidfd)
            assert exited, "the fork server outlived SIGKILL for 60 s"
            words = eng._dispatcher.pool.ctl.words
            wait_for(lambda: control.load(words, control.COORD_ASLEEP) == 1, "the driver asleep")
            control.store(gate, 1, 1)
            f.result(timeout=120)                  # no false crash
            assert np.all(x == 2.0)
            assert eng.worker_pids == before       # none replaced
            eng.map(held_set, x, args=(5.0, gate), chunks=3)
            # No stray writer: every process that ran the held map is still
            # a worker of the engine (idle now), so nothing writes after this.
            assert eng.worker_pids == before
            assert np.all(x == 5.0), np.unique(x)
            eng.map(held_set, x, args=(6.0, gate), chunks=3)
            assert np.all(x == 6.0)
        print("ok")
    """),
        timeout=180,
    )
    assert proc.stdout.strip() == "ok" and proc.stderr == ""


@pytest.mark.breaks_things
def test_impatient_ctrl_c_leaves_correct_data_and_a_working_engine():
    # Ctrl-C pressed a few times in quick succession during a map reached a
    # dead fork server within 20-60 rounds: wrong data, a false crash, and
    # BrokenPipeError tracebacks from workers on the caller's stderr.
    proc = run_python(
        COMMON
        + textwrap.dedent("""
        @njit(nogil=True)
        def slow_set(x, value, rounds):
            acc = 0.0
            for k in range(rounds):
                acc += k * 1e-12
            for i in range(x.shape[0]):
                x[i] = value + 0.0 * acc

        import psutil

        rng = random.Random(3)
        me = os.getpid()
        go, sent = threading.Event(), threading.Event()
        handled = [0]
        unhandled = []

        def ctrl_c(sig, frame):          # Python's own behaviour, counted
            handled[0] += 1
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, ctrl_c)

        def impatient():                 # 2 to 4 Ctrl-C, a few ms apart, per round
            while True:
                go.wait()
                go.clear()
                if stop_all:
                    return
                time.sleep(rng.uniform(0.0, 0.05))   # lands anywhere in the map
                for _ in range(rng.randint(2, 4)):
                    before = handled[0]
                    os.kill(me, signal.SIGINT)
                    # Handled before the next is sent (two pending SIGINTs
                    # would make one), so that settle() knows none is left.
                    deadline = time.monotonic() + 60      # a hang detector
                    while handled[0] == before and time.monotonic() < deadline:
                        time.sleep(0.0005)
                    if handled[0] == before:
                        unhandled.append(1)
                    time.sleep(rng.uniform(0.0, 0.01))
                sent.set()

        def settle():
            # Until this round's signals were sent and each handled: then
            # none can land in the next map.  One may land anywhere before,
            # in this harness too.
            while True:
                try:
                    while not sent.wait(0.01):
                        pass
                    sent.clear()
                    return
                except KeyboardInterrupt:
                    continue

        def running(pid):
            try:
                return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return False

        stop_all = False
        t = threading.Thread(target=impatient, daemon=True)
        t.start()
        interrupted = 0
        ran_maps = set()                 # every worker that ran an interrupted map
        with shmarray.Engine(workers=3) as eng:
            x = eng.zeros(3000)
            for r in range(40):
                try:
                    ran_maps.update(eng.worker_pids)
                    go.set()
                    eng.map(slow_set, x, args=(-1.0, 20_000_000))
                except KeyboardInterrupt:
                    interrupted += 1
                settle()
                value = float(r)
                eng.map(slow_set, x, args=(value, 10))
                assert np.all(x == value), (r, np.unique(x))
            # No stray writer can change x later: every process that ran an
            # interrupted map is a worker now (idle), or has exited (its
            # own word: a pid's exit, not a second of quiet).
            deadline = time.monotonic() + 60              # a hang detector
            while any(running(p) for p in ran_maps - set(eng.worker_pids)):
                assert time.monotonic() < deadline, "a replaced worker lives on"
                time.sleep(0.01)
            assert np.all(x == value), np.unique(x)
        stop_all = True
        go.set()
        assert not unhandled, "a Ctrl-C was never handled"
        print("ok", interrupted)
    """),
        timeout=300,
    )
    assert proc.stdout.startswith("ok") and proc.stderr == "", proc.stderr


def test_fork_workers_recycled_every_task_leave_no_zombies():
    proc = run_python(
        COMMON
        + textwrap.dedent("""
        import psutil

        def one(x):
            x[:] = 1

        with shmarray.Engine(workers=2, start_method="fork",
                             max_tasks_per_worker=1) as eng:
            x = eng.zeros(10)
            for _ in range(30):
                eng.map(one, x)
            zombies = [c.pid for c in psutil.Process().children()
                       if c.status() == psutil.STATUS_ZOMBIE]
            assert not zombies, zombies
        print("ok")
    """),
        timeout=120,
    )
    assert proc.stdout.strip() == "ok" and proc.stderr == ""


@pytest.mark.breaks_things
def test_a_replacement_killed_while_starting_is_started_again(tmp_path):
    # It raised WorkerStartError from the running map, blaming the installation.
    marker = tmp_path / "slow"
    proc = run_python(
        COMMON
        + textwrap.dedent(f"""
        import ctypes

        def init():
            if not os.path.exists({str(marker)!r}):
                return
            try:  # the first replacement only; the next starts as usual
                os.close(os.open({str(marker)!r} + ".first", os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return
            with open({str(marker)!r} + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.rename({str(marker)!r} + ".tmp", {str(marker)!r} + ".pids")  # whole
            threading.Event().wait()      # starting until the killer's SIGKILL

        def crash(x):
            if x[0] == 0:
                ctypes.string_at(0)

        with shmarray.Engine(workers=2, initializer=init) as eng:
            x = eng.from_numpy(np.arange(10.0))
            open({str(marker)!r}, "w").close()
            pids = {str(marker)!r} + ".pids"

            def kill_first_replacement():
                while not os.path.exists(pids):
                    time.sleep(0.005)
                os.kill(int(open(pids).read()), signal.SIGKILL)

            t = threading.Thread(target=kill_first_replacement)
            t.start()
            try:
                eng.map(crash, x)
            except shmarray.WorkerCrashedError as exc:
                assert "SIGSEGV" in str(exc), exc
            t.join()
            os.unlink({str(marker)!r})
            eng.map(lambda x: None, x)               # usable, both workers alive
            assert eng.stats()[0].replaced == 2      # the crash, and the killed start
        print("ok")
    """),
        timeout=120,
    )
    assert proc.stdout.strip() == "ok" and proc.stderr == ""


def test_generator_and_async_kernels_are_refused(engine):
    def gen(x):
        yield x

    async def coro(x):
        x[:] = 1

    x = engine.zeros(4)
    with pytest.raises(TypeError, match="generator function"):
        engine.map(gen, x)
    with pytest.raises(TypeError, match="async def"):
        engine.map(coro, x)
    with pytest.raises(TypeError, match="generator"):
        engine.reduce(gen, x)


def test_running_out_of_file_descriptors_says_which_limit_and_the_fix():
    proc = run_python(
        COMMON
        + textwrap.dedent("""
        import resource
        with shmarray.Engine(workers=2) as eng:
            used = len(os.listdir("/proc/self/fd"))
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (used + 8, hard))
            keep = []
            try:
                for _ in range(100):
                    keep.append(eng.zeros(10))
            except OSError as exc:
                assert "ulimit -n" in str(exc) and "file descriptors" in str(exc), exc
                print("ok")
            finally:
                del keep
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    """),
        timeout=120,
    )
    # Python 3.13 maps without keeping a descriptor: then nothing runs out.
    assert proc.stdout.strip() in ("ok", "") and proc.stderr == ""


def test_a_failed_reduce_leaves_no_stale_value_for_the_next():
    # A survivor's value from a reduce that failed (a worker exited) stayed
    # in its pipe and was combined into the next reduce: a wrong sum with no
    # error, about once in 150 crashes.
    proc = run_python(
        COMMON
        + textwrap.dedent("""
        def part(x, die):
            if die and x[0] == 0:
                os._exit(1)
            # The failing reduce's values differ from the next one's, so a
            # stale one would show.
            return float(x.sum()) * (3.0 if die else 1.0)

        with shmarray.Engine(workers=3) as eng:
            x = eng.from_numpy(np.arange(1000.0))
            want = float(np.arange(1000.0).sum())
            crashes = 0
            for k in range(150):
                try:
                    eng.reduce(part, x, args=(True,))
                except shmarray.WorkerCrashedError:
                    crashes += 1
                got = eng.reduce(part, x, args=(False,))
                assert got == want, (k, got, want)
        print("ok", crashes)
    """),
        timeout=300,
    )
    assert proc.stdout.startswith("ok 150") and proc.stderr == ""


@pytest.mark.breaks_things
def test_imap_collect_never_reports_a_yielded_chunk_as_failed():
    proc = run_python(
        COMMON
        + textwrap.dedent("""
        @njit(nogil=True)
        def part(x, rounds):
            acc = 0.0
            for k in range(rounds):
                acc += k * 1e-12
            return x.sum() + 0.0 * acc

        rng = random.Random(5)
        with shmarray.Engine(workers=3) as eng:
            x = eng.from_numpy(np.arange(6000.0))
            for trial in range(12):
                def killer():
                    for _ in range(3):
                        time.sleep(rng.uniform(0.0, 0.05))
                        try:
                            os.kill(rng.choice(eng.worker_pids), signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                t = threading.Thread(target=killer)
                t.start()
                seen = set()
                stream = eng.imap(part, x, args=(2_000_000,), chunks=60, errors="collect")
                for rows, v in stream:
                    seen.add(rows)
                t.join()
                report = stream.result
                failed = {rows for rows, _ in report.failed}
                assert not failed & seen, (trial, failed & seen)
                assert len(failed) + len(seen) == 60
        print("ok")
    """),
        timeout=300,
    )
    assert proc.stdout.strip() == "ok" and proc.stderr == ""


@pytest.mark.parametrize(
    "dtype, value",
    [
        ("int64", float("nan")),
        ("int64", 1 + 2j),
        ("uint8", -1),
        ("uint8", 1000),
        ("int32", 0.5),
        ("float32", 1e300),
        ("bool", 2),
    ],
)
def test_a_boundary_constant_the_dtype_cannot_hold_is_refused(engine, dtype, value):
    a = engine.zeros((6, 6), dtype)
    pids = engine.worker_pids
    with pytest.raises(ValueError, match="does not fit"):
        engine.map(lambda a: None, a, halo=1, boundary=value)
    assert engine.worker_pids == pids
    engine.map(lambda a: None, a, halo=1, boundary=1)  # fits every dtype here


def test_unterminated_worker_output_keeps_the_callers_memory_bounded():
    proc = run_python(
        COMMON
        + textwrap.dedent("""
        import resource
        sys.stdout = open(os.devnull, "w")      # where the worker's output goes

        def spew(x):
            block = b"." * (1 << 20)
            for _ in range(200):                # 200 MB, no newline
                os.write(1, block)

        with shmarray.Engine(workers=1) as eng:
            x = eng.zeros(1)
            eng.map(lambda x: None, x)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            eng.map(spew, x)
            grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        sys.stderr.write(f"grew {grew} KiB\\n") if grew > 32 * 1024 else None
        print("ok", grew, file=sys.__stdout__)
    """),
        timeout=120,
    )
    assert proc.stdout.startswith("ok") and proc.stderr == ""
