"""Small maps at the speed of the hardware: prepared maps and the lean paths
(the same results and the same errors as ``map``), no cliff for lists and
NumPy scalars, the wait policy, and the worker count in a container."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest
from numba import njit

import shmarray
from conftest import WORKER_COUNTS, engine_id, run_python, storage_for
from shmarray import control, options
from shmarray.control import _now_ns
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
    # serve from one compiled loop (that they do is measured in
    # bench/loop_figures.py, not asserted here); a third job joining, and a
    # kernel that raises on such a pair, must change nothing about the results.
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


@pytest.mark.breaks_things
@pytest.mark.parametrize("workers", WORKER_COUNTS)
def test_a_worker_killed_under_a_prepared_map_is_a_clear_error(workers):
    # An engine of its own: the replacement is a new process, which the leak
    # check would count against the next test of a shared engine.
    with shmarray.Engine(workers=workers, storage=storage_for(workers)) as eng:
        killed_under_a_prepared_map(eng)


def killed_under_a_prepared_map(eng):
    x = eng.zeros(1000)

    def spin(x, flag):
        flag[0] = 1  # running: the test may kill it
        while flag[1] == 0:
            time.sleep(0.001)

    flag = eng.zeros(2, np.int64)
    step = eng.prepare(spin, x, args=(flag,), chunks=1)
    import threading

    errors = []

    def run():
        try:
            step()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 30
    while flag[0] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    os.kill(eng.worker_pids[0], signal.SIGKILL)
    t.join(30)
    assert not t.is_alive()
    assert isinstance(errors[0], shmarray.WorkerCrashedError)
    x2 = eng.zeros(10)
    eng.map(add, x2, args=(1.0,))
    assert np.all(x2 == 1.0)


@njit(cache=True)
def dwell(x, ms):
    """Busy for ``ms[0]`` milliseconds (by the clock), then count the call."""
    t0 = _now_ns()
    while _now_ns() - t0 < ms[0] * 1_000_000:
        pass
    for i in range(x.shape[0]):
        x[i] += 1.0


@pytest.mark.parametrize("workers", WORKER_COUNTS, ids=engine_id)
def test_a_map_that_outlasts_the_drivers_nap_and_a_timeout_within_it(workers):
    """The lean path spins, then naps on BELL for NAP_BUDGET_NS, then hands
    the wait to the pipes: a map longer than the nap still ends right, and
    a timeout shorter than the nap still fires on time.  An engine of its
    own: the timeout replaces workers."""
    with shmarray.Engine(workers=workers, storage=storage_for(workers)) as eng:
        outlast_the_nap(eng)


def outlast_the_nap(eng):
    rows = 4 * eng.workers
    x, ms = eng.zeros(rows), eng.zeros(rows)
    nap_ms = control.NAP_BUDGET_NS // 1_000_000
    ms[:] = nap_ms + 30
    step = eng.prepare(dwell, x, ms)
    for k in range(1, 4):
        step()
        assert np.all(x == k)
    ms[:] = 0
    quick = eng.prepare(dwell, x, ms, timeout=nap_ms / 4000)
    for _ in range(3):
        quick()  # hot: the lean path, with a nap as long as the timeout
    ms[:] = 3000
    t0 = time.monotonic()
    with pytest.raises(shmarray.TaskTimeoutError):
        quick()
    assert time.monotonic() - t0 < 1.5  # the timeout, and a replacement worker
    ms[:] = 0
    step()  # the engine goes on (new workers: no timeout for their first load)
    assert np.all(x == 7)
    del step, quick, x, ms


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
        time.sleep(0.3)  # past every policy's spin (spin: 0.1 s)
        cpu0 = sum(sum(p.cpu_times()[:2]) for p in procs)
        time.sleep(1.0)
        used = sum(sum(p.cpu_times()[:2]) for p in procs) - cpu0
        assert used < 0.05, (wait, used)


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
    import threading

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
