"""Small maps at the speed of the hardware: prepared maps and the lean paths
(the same results and the same errors as ``map``), no cliff for lists and
NumPy scalars, the wait policy, and the worker count in a container."""

from __future__ import annotations

import os
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
from conftest import WORKER_COUNTS, engine_id, run_python, storage_for
from shmarray import control, options
from shmarray.kernels.stencils import heat_step
from shmarray.worker import HOT_RUNS


@pytest.fixture(scope="module", params=WORKER_COUNTS, ids=engine_id)
def eng(request):
    with shmarray.Engine(workers=request.param, storage=storage_for(request.param)) as engine:
        yield engine


@njit(cache=True)
def add(x, v):
    for i in range(x.shape[0]):
        x[i] += v


@njit(cache=True)
def fail_at(x, row, bad):
    for i in range(x.shape[0]):
        if row + i == bad:
            raise ZeroDivisionError("bad row")
        x[i] = row + i


def sent(eng) -> int:
    """Messages sent to the workers so far (Define, Rebind, Install...)."""
    return int(eng._dispatcher.pool.sent.sum())


def test_a_prepared_heat_loop_equals_the_sequential_one(eng):
    rng = np.random.default_rng(1)
    u0 = rng.random((130, 70))
    a, b = u0.copy(), u0.copy()
    for _ in range(25):
        heat_step(b, a, 0.2)
        a, b = b, a
    new, old = eng.from_numpy(u0), eng.from_numpy(u0)
    step = eng.prepare(heat_step, new, old, args=(0.2,), halo=1)
    for _ in range(25):
        step()
        step.swap()
    last = step.arrays[1]  # after the swap: the last output is "inp"
    assert np.array_equal(last, a)


def test_a_double_buffered_loop_of_maps_stays_exact(eng):
    # The two halves of the loop (a -> b, b -> a) are two jobs the workers
    # serve from one compiled loop (that a hot job is served there at all is
    # test_a_hot_map_runs_in_the_compiled_serve_loop's); a third job
    # joining, and a kernel that raises on such a pair, must change nothing
    # about the results.
    rng = np.random.default_rng(2)
    u0 = rng.random((90, 40))
    a, b = u0.copy(), u0.copy()
    rounds = HOT_RUNS + 10  # hot from round HOT_RUNS on
    for _ in range(2 * rounds):
        heat_step(b, a, 0.2)
        a, b = b, a
    x, y, z = eng.from_numpy(u0), eng.from_numpy(u0), eng.from_numpy(u0)
    for _ in range(rounds):  # two steps a round, alternating
        eng.map(heat_step, y, x, args=(0.2,), halo=1)
        eng.map(heat_step, x, y, args=(0.2,), halo=1)
    assert np.array_equal(x, a)
    for _ in range(5):  # a third job joins the loop
        eng.map(heat_step, z, x, args=(0.2,), halo=1)
        eng.map(heat_step, y, z, args=(0.2,), halo=1)
    heat_step(b, a, 0.2)
    assert np.array_equal(z, b)
    r, s = eng.zeros(60), eng.zeros(60)
    for _ in range(HOT_RUNS + 1):  # hot, as a pair, then one raises
        eng.map(fail_at, r, args=(shmarray.row_offset, -1))
        eng.map(fail_at, s, args=(shmarray.row_offset, -1))
    with pytest.raises(ZeroDivisionError, match="bad row"):
        eng.map(fail_at, s, args=(shmarray.row_offset, 7))
    eng.map(fail_at, r, args=(shmarray.row_offset, -1))
    assert np.array_equal(r, np.arange(60.0))


def test_a_prepared_map_sends_nothing_once_it_runs(eng):
    x = eng.zeros(40)
    step = eng.prepare(add, x, args=(1.0,))
    step()
    before = sent(eng)
    for _ in range(200):
        step()
    assert sent(eng) == before
    assert np.all(x == 201.0)


def test_a_prepared_map_raises_like_map_and_the_engine_goes_on(eng):
    x = eng.zeros(60)
    step = eng.prepare(fail_at, x, args=(shmarray.row_offset, 33))
    for _ in range(3):  # compiled in the workers after the first
        with pytest.raises(ZeroDivisionError, match="bad row") as info:
            step()
        assert isinstance(info.value.__cause__, shmarray.RemoteTraceback)
        assert any("rows" in note for note in info.value.__notes__)
    ok = eng.prepare(fail_at, x, args=(shmarray.row_offset, -1))
    for _ in range(3):
        ok()
    assert np.array_equal(x, np.arange(60.0))


# -- where a hot map runs ---------------------------------------------------------


def test_a_hot_map_runs_in_the_compiled_serve_loop(eng):
    # A map is served by the workers' compiled loop (control.serve, which
    # counts the rings it serves) once it is hot: from its run HOT_RUNS + 1
    # on, a prepared map from its second; until then the Python path runs it.
    def served() -> int:
        return sum(r.compiled for r in eng.stats())

    x = eng.zeros(4 * eng.workers)
    before = served()
    for _ in range(HOT_RUNS):  # cold: the Python path
        eng.map(add, x, args=(1.0,))
    assert served() == before
    for _ in range(10):  # hot: every worker, every ring
        eng.map(add, x, args=(1.0,))
    assert served() == before + 10 * eng.workers
    assert np.all(x == HOT_RUNS + 10)
    y = eng.zeros(4 * eng.workers)
    step = eng.prepare(add, y, args=(1.0,))
    step()  # the first run defines the job
    assert served() == before + 10 * eng.workers
    step()
    assert served() == before + 11 * eng.workers
    assert np.all(y == 2.0)
    del step


# -- a map held as long as the test wants ----------------------------------------

# The words of a gate (an int64 array in shared memory, passed in args):
# the test arms and releases it, the held chunk says it runs, and where.
ARMED, RUNNING, RELEASED, WHO = 0, 1, 2, 3


@njit(cache=True)
def held(x, gate, row, worker):
    """Adds 1 to its rows.  While the gate is armed, the chunk of row 0
    first says it runs (RUNNING, and its worker in WHO), then waits until
    the test releases it: a map as long as the test wants, by no clock.
    Atomic loads, so the compiler cannot hoist the wait's read."""
    if row == 0 and control.load(gate, ARMED) != 0:
        control.store(gate, WHO, worker)
        control.store(gate, RUNNING, 1)
        while control.load(gate, RELEASED) == 0:
            pass
    for i in range(x.shape[0]):
        x[i] += 1.0


def wait_for(seen, what: str, within: float = 60.0) -> None:
    """Poll for an event (a word in shared memory); ``within`` only detects
    a hang."""
    deadline = time.monotonic() + within
    while not seen():
        assert time.monotonic() < deadline, f"{what}: not within {within:.0f} s"
        time.sleep(0.001)


def in_thread(call) -> tuple[threading.Thread, list]:
    """Run ``call`` in a thread; the list gets what it raised."""
    errors: list = []

    def run():
        try:
            call()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


def gate_args(eng) -> tuple:
    gate = eng.zeros(4, np.int64)
    return gate, (gate, shmarray.row_offset, shmarray.worker_id)


@pytest.mark.breaks_things
@pytest.mark.parametrize("workers", WORKER_COUNTS)
def test_a_worker_killed_under_a_prepared_map_is_a_clear_error(workers):
    # An engine of its own: the replacement is a new process, which the leak
    # check would count against the next test of a shared engine.
    with shmarray.Engine(workers=workers, storage=storage_for(workers)) as eng:
        killed_under_a_prepared_map(eng)


def killed_under_a_prepared_map(eng):
    x = eng.zeros(4 * eng.workers)
    gate, args = gate_args(eng)
    step = eng.prepare(held, x, args=args)
    for _ in range(3):
        step()  # hot from its first run: the workers serve it in compiled code
    control.store(gate, ARMED, 1)
    thread, errors = in_thread(step)
    try:
        wait_for(lambda: control.load(gate, RUNNING), "the held chunk running")
        os.kill(eng.worker_pids[int(gate[WHO])], signal.SIGKILL)  # inside the kernel
    finally:
        control.store(gate, RELEASED, 1)  # the others, had the kill not come
    thread.join(60)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], shmarray.WorkerCrashedError), errors
    gate[:] = 0
    x[:] = 0
    step()  # the engine goes on, with a replacement
    assert np.all(x == 1.0)
    x2 = eng.zeros(10)
    eng.map(add, x2, args=(1.0,))
    assert np.all(x2 == 1.0)
    del step


@pytest.mark.parametrize("workers", WORKER_COUNTS, ids=engine_id)
def test_a_map_that_outlasts_the_drivers_nap_and_a_timeout_within_it(workers):
    """The lean path spins, then naps on BELL for NAP_BUDGET_NS, then hands
    the wait to the pipes: a map longer than the nap still ends right, and
    a timeout shorter than the nap still fires.  An engine of its own: the
    timeout replaces workers."""
    with shmarray.Engine(workers=workers, storage=storage_for(workers)) as eng:
        outlast_the_nap(eng)


def outlast_the_nap(eng):
    x = eng.zeros(4 * eng.workers)
    gate, args = gate_args(eng)
    words = eng._dispatcher.pool.ctl.words  # the control block: COORD_ASLEEP
    step = eng.prepare(held, x, args=args)
    for k in range(1, 4):
        step()  # hot: the lean path on both sides
        assert np.all(x == k)
    # A map longer than the nap: held until the driver has napped its whole
    # budget and sleeps on the pipes (COORD_ASLEEP 1; 2 while it naps),
    # then let go.  It must end, and end right.
    control.store(gate, ARMED, 1)
    thread, errors = in_thread(step)
    try:
        wait_for(lambda: control.load(gate, RUNNING), "the held chunk running")
        wait_for(lambda: control.load(words, control.COORD_ASLEEP) == 1, "the driver past its nap")
    finally:
        control.store(gate, RELEASED, 1)
    thread.join(60)
    assert not thread.is_alive() and not errors, errors
    assert np.all(x == 4)
    # A timeout shorter than the nap, on the same job (a timeout belongs to
    # the call, not the job): the map is held, and never let go before the
    # timeout fires.
    gate[:] = 0
    quick = eng.prepare(held, x, args=args, timeout=control.NAP_BUDGET_NS / 4e9)
    control.store(gate, ARMED, 1)
    thread, errors = in_thread(quick)
    thread.join(60)
    fired = not thread.is_alive()
    control.store(gate, RELEASED, 1)  # only now, so that a stuck map ends too
    thread.join(60)
    assert fired, "the timeout did not fire within 60 s"
    assert len(errors) == 1 and isinstance(errors[0], shmarray.TaskTimeoutError), errors
    gate[:] = 0
    x[:] = 0
    step()  # the engine goes on (new workers: no timeout for their first load)
    assert np.all(x == 1)
    del step, quick, x


@njit(cache=True)
def smooth(out, inp):
    for i in range(1, inp.shape[0] - 1):
        out[i] = (inp[i - 1] + inp[i] + inp[i + 1]) / 3


@pytest.mark.parametrize("schedule", ["static", "dynamic"])
def test_a_prepared_map_fills_ghost_cells_as_map_does(eng, schedule):
    # A dynamic map's ghost cells are filled by the caller before the ring
    # (no chunk has fixed neighbours): the prepared path must not skip it.
    u0 = np.random.default_rng(7).random(64)
    a, b, c, d = (eng.from_numpy(u0) for _ in range(4))
    step = eng.prepare(smooth, b, a, halo=1, boundary="wrap", schedule=schedule)
    ref_in, ref_out = u0.copy(), u0.copy()
    for _ in range(3 * HOT_RUNS):
        step()
        step.swap()
        eng.map(smooth, d, c, halo=1, boundary="wrap", schedule=schedule)
        c, d = d, c
        padded = np.pad(ref_in[1:-1], 1, mode="wrap")
        smooth(ref_out, padded)
        ref_in, ref_out = ref_out, ref_in
    assert np.array_equal(a, c)
    assert np.allclose(a[1:-1], ref_in[1:-1])
    del step, a, b, c, d


def test_swap_needs_two_interchangeable_arrays(eng):
    x = eng.zeros(10)
    with pytest.raises(ValueError, match="first two arrays"):
        eng.prepare(add, x, args=(1.0,)).swap()
    with pytest.raises(ValueError, match="same shape and dtype"):
        eng.prepare(lambda a, b: None, x, eng.zeros(10, np.int32)).swap()


def test_a_prepared_map_of_a_closed_engine_says_so():
    eng = shmarray.Engine(workers=2)
    x = eng.zeros(4)
    step = eng.prepare(add, x, args=(1.0,))
    step()
    eng.close()
    with pytest.raises(shmarray.EngineClosedError):
        step()


@pytest.mark.parametrize(
    "form", ["list args", "chunk list", "numpy scalar boundary", "numpy scalar args"]
)
def test_no_cliff_lists_and_numpy_scalars_are_found_again(eng, form):
    # Such a call was defined and forgotten in every worker on every call.
    a = eng.zeros((18, 6))
    b = eng.zeros((18, 6))
    calls = {
        "list args": lambda: eng.map(heat_step, b, a, args=[0.1], halo=1),
        "chunk list": lambda: eng.map(heat_step, b, a, args=(0.1,), halo=1, chunks=[8, 8]),
        "numpy scalar boundary": lambda: eng.map(
            heat_step, b, a, args=(0.1,), halo=1, boundary=np.float64(1.5)
        ),
        "numpy scalar args": lambda: eng.map(heat_step, b, a, args=(np.float64(0.1),), halo=1),
    }
    call = calls[form]
    call()
    before = sent(eng)
    for _ in range(20):
        call()
    assert sent(eng) == before


@pytest.mark.parametrize("wait", ["auto", "spin", "passive"])
def test_every_wait_policy_gives_the_same_results_and_an_idle_engine_rests(wait):
    with shmarray.Engine(workers=3, wait=wait) as eng:
        assert eng.wait == wait
        x = eng.zeros(3000)
        for _ in range(300):
            eng.map(add, x, args=(1.0,))
        assert np.all(x == 300.0)
        procs = [psutil.Process(p) for p in eng.worker_pids]
        # Past every policy's spin (spin: 0.1 s), each worker says it sleeps
        # on its pipe (its ASLEEP word); then, over a second, none uses CPU.
        ctl = eng._dispatcher.pool.ctl
        wait_for(lambda: all(ctl.asleep(i) for i in range(eng.workers)), "every worker asleep")
        cpu0 = sum(sum(p.cpu_times()[:2]) for p in procs)
        time.sleep(1.0)  # the window measured, not a wait for an event
        used = sum(sum(p.cpu_times()[:2]) for p in procs) - cpu0
        assert used < 0.05, (wait, used)
        assert all(ctl.asleep(i) for i in range(eng.workers))


def test_the_wait_policy_is_checked_and_read_from_the_environment(monkeypatch):
    with pytest.raises(ValueError, match="wait must be 'auto', 'spin' or 'passive'"):
        shmarray.Engine(workers=1, wait="fast")
    monkeypatch.setenv("SHMARRAY_WAIT", "passive")
    with shmarray.Engine(workers=1) as eng:
        assert eng.wait == "passive"
    monkeypatch.setenv("SHMARRAY_WAIT", "sometimes")
    with pytest.raises(ValueError, match="SHMARRAY_WAIT"):
        shmarray.Engine(workers=1)


def test_auto_spins_less_with_more_workers_than_cpus():
    cpus = options.usable_cpus()
    from shmarray.waiting import resolve

    fits, over = resolve("auto", cpus, cpus), resolve("auto", cpus + 3, cpus)
    assert not fits.oversubscribed and over.oversubscribed
    assert over.worker_spin < fits.worker_spin and over.step_spin < fits.step_spin
    # The driver spins as long as a worker only with a CPU of its own.
    spare = resolve("auto", 1, 2)
    assert spare.driver_spin == spare.worker_spin > fits.driver_spin >= over.driver_spin


def test_shmarray_workers_overrides_the_default_count():
    proc = run_python(
        textwrap.dedent("""
        import os
        os.environ["SHMARRAY_WORKERS"] = "3"
        import shmarray
        with shmarray.Engine() as eng:
            print(eng.workers)
    """)
    )
    assert proc.stdout.strip() == "3"
    bad = run_python(
        "import os; os.environ['SHMARRAY_WORKERS'] = 'many'; import shmarray; shmarray.Engine()",
        check=False,
    )
    assert "SHMARRAY_WORKERS must be a positive integer" in bad.stderr


def test_the_default_worker_count_honours_a_cgroup_cpu_quota(tmp_path):
    # A real cgroup with a quota of 1.5 CPUs, as `docker run --cpus=1.5`
    # makes: the default is 2 workers, whatever the host has.
    base = "/sys/fs/cgroup/cpu"
    if not os.path.isdir(base) or not os.access(base, os.W_OK):
        v2 = "/sys/fs/cgroup"
        if not (os.path.exists(f"{v2}/cgroup.controllers") and os.access(v2, os.W_OK)):
            pytest.skip("no writable cgroup cpu controller here (not root, or none mounted)")
        base = v2
    group = os.path.join(base, f"shmarray-test-{os.getpid()}")
    os.mkdir(group)
    try:
        if os.path.exists(f"{group}/cpu.max"):
            with open(f"{group}/cpu.max", "w") as f:
                f.write("150000 100000")
        else:
            with open(f"{group}/cpu.cfs_period_us", "w") as f:
                f.write("100000")
            with open(f"{group}/cpu.cfs_quota_us", "w") as f:
                f.write("150000")
        code = (
            "import shmarray\nfrom shmarray import options\n"
            "print(options.cgroup_cpus(), options.coerce_workers(None))"
        )
        proc = subprocess.run(
            [
                "sh",
                "-c",
                f'echo $$ > {group}/cgroup.procs && exec "$0" -c "$1"',
                sys.executable,
                code,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        quota, workers = proc.stdout.split()
        assert float(quota) == 1.5 and int(workers) == min(2, len(os.sched_getaffinity(0)))
    finally:
        for _ in range(50):
            try:
                os.rmdir(group)
                break
            except OSError:
                time.sleep(0.1)


def test_a_napping_driver_is_rung_by_the_last_worker_to_finish_and_by_abort():
    # The protocol of BELL on a real shared mapping, driver and workers in
    # two threads (both sides are nogil compiled calls).
    import mmap

    from shmarray import control

    buf = mmap.mmap(-1, control.ControlBlock.nbytes(2))
    ctl = control.ControlBlock(buf, 2)
    first, second = control.WorkerWords(buf, 0), control.WorkerWords(buf, 1)
    workers = np.array([0, 1], np.int64)

    def bell() -> int:
        return int(control.load(ctl.words, control.BELL))

    def ring(seq: int) -> None:
        for w in workers:
            ctl.ring(int(w), 1, 0, 1, seq)

    def when_napping(action):
        def run():
            while control.load(ctl.words, control.COORD_ASLEEP) != control.COORD_NAPS:
                time.sleep(0.0005)
            action()

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    # Nobody naps: finishing rings nothing, and asks for no pipe wake-up.
    ring(1)
    assert not first.finish(1, 0, 1, 0) and not second.finish(1, 0, 1, 0) and bell() == 0
    # Nothing to wait for: the nap runs out its budget.
    ring(2)
    assert ctl.nap_all(workers, 2, 0, 5_000_000) == control.SPUN
    # A worker that finishes while another of its ring still runs rings
    # nothing; the last one to finish rings BELL.
    rang = []

    def both_finish():
        first.finish(2, 0, 1, 0)
        rang.append(bell())
        second.finish(2, 0, 1, 0)

    thread = when_napping(both_finish)
    assert ctl.nap_all(workers, 2, 0, 10_000_000_000) == control.QUIET
    thread.join()
    assert rang == [0] and bell() == 1
    # A worker not rung for the ring does not count.
    ctl.ring(0, 1, 0, 1, 3)
    thread = when_napping(lambda: first.finish(3, 0, 1, 0))
    assert ctl.nap_all(workers[:1], 3, 0, 10_000_000_000) == control.QUIET
    thread.join()
    assert bell() == 2
    # abort() from another thread rings it too.
    thread = when_napping(ctl.abort)
    assert ctl.nap_all(workers, 4, 0, 10_000_000_000) == control.ABORTED
    thread.join()
    assert bell() == 3
    assert control.load(ctl.words, control.COORD_ASLEEP) == 0
