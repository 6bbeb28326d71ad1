"""Futures and asyncio: non-blocking maps, queued safely, cancellable
mid-kernel, nothing leaked."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
import warnings

import numpy as np
import pytest
from numba import njit

import shmarray
from shmarray import control


@njit(cache=True)
def put(x, value):
    x[0] = value


@njit(cache=True)
def bump(x):
    for i in range(x.shape[0]):
        x[i] += 1.0


@njit(cache=True)
def copy_release(x, flag):
    """Copies the release flag: 1 if it runs after the first map was let go."""
    for i in range(x.shape[0]):
        x[i] = control.load(flag, 1)


@njit(cache=True)
def wait_for_release(flag, limit):
    """Sets flag[0] when it starts, then runs until flag[1] is set (or for
    ``limit`` rounds): a kernel the test can see running and let go.  Run
    it as one chunk (``chunks=1``): it reads both rows.  ``flag`` holds
    int64, read with an atomic load so the compiler cannot hoist it."""
    flag[0] = 1
    for _ in range(limit):
        if control.load(flag, 1) != 0:
            break
    return 0.0


def wait_until_set(flag, timeout: float = 30.0) -> bool:
    """Poll the flag the kernel sets in shared memory."""
    deadline = time.monotonic() + timeout
    while flag[0] == 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


FOREVER = 10**15


def test_submit_returns_a_future_and_runs_in_place(engine):
    x = engine.from_numpy(np.arange(6.0))
    future = engine.submit(bump, x)
    assert isinstance(future, concurrent.futures.Future)
    assert future.result(timeout=60) is None
    assert np.array_equal(x, np.arange(6.0) + 1)
    total = engine.submit_reduce(lambda a: float(a.sum()), x).result(timeout=60)
    assert total == float(np.sum(np.arange(6.0) + 1))


def test_bad_arguments_raise_in_the_caller(engine):
    with pytest.raises(ValueError, match="private array"):
        engine.submit(bump, np.zeros(3))
    with pytest.raises(TypeError, match="combine"):
        engine.submit_reduce(bump, engine.zeros(3), combine=3)


def test_submitted_maps_run_in_submission_order(engine):
    x = engine.zeros(4)
    futures = [engine.submit(put, x, args=(float(i),)) for i in range(50)]
    done, pending = concurrent.futures.wait(futures, timeout=120)
    assert not pending, f"{len(pending)} of 50 maps still pending"
    failed = {i: f.exception() for i, f in enumerate(futures) if f.exception() is not None}
    assert not failed, f"maps that raised: {failed!r}"
    assert x[0] == 49.0


def test_maps_from_many_threads_are_queued_safely(engine):
    x = engine.zeros(64)

    def client(k):
        for j in range(25):
            if (k + j) % 2:
                engine.map(bump, x)
            else:
                engine.submit(bump, x).result(timeout=60)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert np.all(x == 100.0)  # no increment lost, none doubled


def test_cancel_a_queued_map(engine):
    x = engine.zeros(2)
    flag = engine.zeros(2, np.int64)
    # Held until released, so the second is still queued when cancelled
    # (a kernel that merely ran long could end first on a busy machine).
    running = engine.submit(wait_for_release, flag, args=(FOREVER,), chunks=1)
    try:
        queued = engine.submit(put, x, args=(7.0,))
        assert queued.cancel() and queued.cancelled()
    finally:
        flag[1] = 1
    running.result(timeout=60)
    assert x[0] == 0.0


@pytest.fixture
def own_engine():
    """An engine of the test's own: these tests replace its workers."""
    with shmarray.Engine(workers=2) as eng:
        yield eng


def test_cancel_follows_the_future_contract_and_stop_ends_a_running_map(own_engine):
    engine = own_engine
    flag = engine.zeros(2, np.int64)
    before = engine.worker_pids
    future = engine.submit(wait_for_release, flag, args=(FOREVER,), chunks=1)
    assert wait_until_set(flag)  # the kernel is running
    assert future.running()
    assert future.cancel() is False and not future.cancelled()
    assert future.stop() is True
    with pytest.raises(concurrent.futures.CancelledError) as info:
        future.result(timeout=30)
    assert isinstance(info.value, shmarray.MapCancelledError)
    assert not future.cancelled()  # it ran: stopped, not cancelled
    assert before[0] not in engine.worker_pids  # its worker was replaced
    assert before[1] in engine.worker_pids  # the idle one was not
    assert future.stop() is False  # already finished
    x = engine.zeros(4)
    engine.map(bump, x)  # usable afterwards
    assert np.all(x == 1.0)


def test_map_async_keeps_the_event_loop_responsive(engine):
    flag = engine.zeros(2, np.int64)
    x = engine.zeros(4)
    released_by: list[str] = []
    finished = threading.Event()

    def hang_detector():
        # Were the loop blocked, nothing on it could release the map: let it
        # go from here after 60 s, so that the test fails instead of hanging.
        if not finished.wait(60):
            released_by.append("hang detector")
            flag[1] = 1

    async def main():
        async def release():
            # Another task on the same loop lets the map go: it can run only
            # while map_async waits without blocking the loop.
            while flag[0] == 0:  # until the kernel runs
                await asyncio.sleep(0.001)
            released_by.append("the loop")
            flag[1] = 1

        releaser = asyncio.create_task(release())
        await engine.map_async(wait_for_release, flag, args=(FOREVER,), chunks=1)
        await releaser
        return await engine.reduce_async(lambda a: float(a[0]), x)

    detector = threading.Thread(target=hang_detector, daemon=True)
    detector.start()
    try:
        value = asyncio.run(main())
    finally:
        finished.set()
        detector.join(60)
    assert released_by == ["the loop"], released_by
    assert value == 0.0


@pytest.mark.breaks_things
def test_cancelling_the_task_stops_the_map(own_engine):
    engine = own_engine
    x = engine.zeros(4)
    flag = engine.zeros(2, np.int64)
    before = engine.worker_pids

    async def main():
        task = asyncio.create_task(
            engine.map_async(wait_for_release, flag, args=(FOREVER,), chunks=1)
        )
        while flag[0] == 0:  # until the kernel runs
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await engine.map_async(bump, x)  # runs after the stopped map

    asyncio.run(main())
    assert before[0] not in engine.worker_pids
    assert np.all(x == 1.0)


def test_close_cancels_queued_maps_and_ends_the_running_one():
    eng = shmarray.Engine(workers=2)
    flag = eng.zeros(2, np.int64)
    running = eng.submit(wait_for_release, flag, args=(FOREVER,), chunks=1)
    queued = [eng.submit(bump, flag) for _ in range(3)]
    assert wait_until_set(flag)
    # The running map never ends by itself: close() must end it.  Were it
    # left running, close() would give up on it after its own 5 s and warn
    # ("did not stop"): no such warning means the map was ended, not waited
    # out (a bound on close()'s wall time would only measure the machine).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eng.close()
    assert not [w for w in caught if "did not stop" in str(w.message)], caught
    assert all(f.cancelled() for f in queued)
    with pytest.raises(shmarray.EngineClosedError):
        running.result(timeout=30)
    with pytest.raises(shmarray.EngineClosedError):
        eng.submit(bump, flag)


def test_submit_returns_at_once_while_a_map_runs(engine):
    flag = engine.zeros(2, np.int64)
    x = engine.zeros(4)
    # The first map runs until released, and only this test releases it,
    # after submit() has returned: a submit() that waited for the running
    # map would never return (the join's 60 s only detects that hang).
    first = engine.submit(wait_for_release, flag, args=(FOREVER,), chunks=1)
    submitted: list = []
    try:
        assert wait_until_set(flag)  # the first map is running
        submitter = threading.Thread(target=lambda: submitted.append(engine.submit(bump, x)))
        submitter.start()
        submitter.join(60)
        assert submitted, "submit() waited for the running map"
        second = submitted[0]
        assert not first.done() and not second.done()
    finally:
        flag[1] = 1  # let the first map finish
    first.result(timeout=60)
    second.result(timeout=60)
    assert np.all(x == 1.0)


def test_a_blocking_map_from_another_thread_waits_its_turn(engine):
    flag = engine.zeros(2, np.int64)
    x = engine.zeros(4)
    first = engine.submit(wait_for_release, flag, args=(10**10,), chunks=1)
    assert wait_until_set(flag)
    waiter = threading.Thread(target=engine.map, args=(copy_release, x), kwargs={"args": (flag,)})
    waiter.start()
    # The blocking map is queued (the dispatcher's queue is where it waits)
    # while the first still runs.
    deadline = time.monotonic() + 30
    while not engine._dispatcher._queue:
        assert time.monotonic() < deadline and waiter.is_alive()
        time.sleep(0.001)
    assert not first.done() and x[0] == 0.0
    flag[1] = 1
    waiter.join(60)
    assert not waiter.is_alive() and first.done()
    # It ran after the first was released, never beside it.
    assert np.all(x == 1.0)


def test_a_submitted_map_keeps_its_arrays_alive(engine):
    x = engine.from_numpy(np.arange(8.0))
    futures = [
        engine.submit(bump, engine.from_numpy(np.arange(8.0))) for _ in range(20)
    ]  # temporaries, dropped at once
    futures.append(engine.submit_reduce(lambda a: float(a.sum()), x))
    for f in futures[:-1]:
        assert f.result(timeout=60) is None
    assert futures[-1].result(timeout=60) == 28.0
