"""Futures and asyncio: non-blocking maps, queued safely, cancellable
mid-kernel, nothing leaked."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import numpy as np
import pytest
from numba import njit

import shmarray


@njit
def spin(x, iterations):
    """About 3 ns an iteration; the floating-point recurrence keeps LLVM
    from replacing the loop by its closed form."""
    acc = 0.0
    for _ in range(iterations):
        acc = acc * 0.999999 + x[0]
    return acc


@njit
def put(x, value):
    x[0] = value


@njit
def bump(x):
    for i in range(x.shape[0]):
        x[i] += 1.0


FOREVER = 10**15


def test_submit_returns_a_future_and_runs_in_place(engine):
    x = engine.from_numpy(np.arange(6.0))
    future = engine.submit(bump, x)
    assert isinstance(future, concurrent.futures.Future)
    assert future.result(timeout=60) is None
    assert np.array_equal(x, np.arange(6.0) + 1)
    total = engine.submit_reduce(lambda a: float(a.sum()), x).result(timeout=60)
    assert total == float(np.sum(np.arange(6.0) + 1))
    del x


def test_bad_arguments_raise_in_the_caller(engine):
    with pytest.raises(ValueError, match="private array"):
        engine.submit(bump, np.zeros(3))
    with pytest.raises(TypeError, match="combine"):
        engine.submit_reduce(bump, engine.zeros(3), combine=3)


def test_submitted_maps_run_in_submission_order(engine):
    x = engine.zeros(4)
    futures = [engine.submit(put, x, args=(float(i),)) for i in range(50)]
    concurrent.futures.wait(futures, timeout=120)
    assert all(f.done() and f.exception() is None for f in futures)
    assert x[0] == 49.0
    del x


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
    assert np.all(x == 100.0)       # no increment lost, none doubled
    del x


def test_cancel_a_queued_map(engine):
    x = engine.zeros(2)
    running = engine.submit(spin, x, args=(10**8,))
    queued = engine.submit(put, x, args=(7.0,))
    assert queued.cancel() and queued.cancelled()
    running.result(timeout=60)
    assert x[0] == 0.0
    del x


@pytest.fixture
def own_engine():
    """An engine of the test's own: these tests replace its workers."""
    with shmarray.Engine(workers=2) as eng:
        yield eng


@pytest.mark.breaks_things
def test_cancel_a_running_map_replaces_its_workers(own_engine):
    engine = own_engine
    x = engine.zeros(4)
    before = engine.worker_pids
    future = engine.submit(spin, x, args=(FOREVER,))
    time.sleep(0.3)
    assert future.running()
    assert future.cancel()
    with pytest.raises(concurrent.futures.CancelledError) as info:
        future.result(timeout=30)
    assert isinstance(info.value, shmarray.MapCancelledError)
    assert set(engine.worker_pids).isdisjoint(before)
    engine.map(bump, x)                                 # usable afterwards
    assert np.all(x == 1.0)
    del x


def test_map_async_keeps_the_event_loop_responsive(engine):
    x = engine.zeros(4)

    async def main():
        beats = 0

        async def heartbeat():
            nonlocal beats
            while True:
                await asyncio.sleep(0.01)
                beats += 1

        hb = asyncio.create_task(heartbeat())
        started = time.perf_counter()
        await engine.map_async(spin, x, args=(2 * 10**8,))
        took = time.perf_counter() - started
        hb.cancel()
        value = await engine.reduce_async(lambda a: float(a[0]), x)
        return beats, took, value

    beats, took, value = asyncio.run(main())
    # the loop kept turning while the workers ran: about one beat per 10 ms
    assert beats >= 0.5 * took / 0.01, (beats, took)
    assert value == 0.0
    del x


@pytest.mark.breaks_things
def test_cancelling_the_task_stops_the_map(own_engine):
    engine = own_engine
    x = engine.zeros(4)
    before = engine.worker_pids

    async def main():
        task = asyncio.create_task(engine.map_async(spin, x, args=(FOREVER,)))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await engine.map_async(bump, x)

    asyncio.run(main())
    deadline = time.monotonic() + 10
    while set(engine.worker_pids) & set(before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(engine.worker_pids).isdisjoint(before)
    assert np.all(x == 1.0)
    del x


def test_close_cancels_queued_and_running_maps():
    eng = shmarray.Engine(workers=2)
    x = eng.zeros(4)
    running = eng.submit(spin, x, args=(FOREVER,))
    queued = [eng.submit(bump, x) for _ in range(3)]
    time.sleep(0.2)
    eng.close()
    assert all(f.cancelled() for f in queued)
    with pytest.raises(concurrent.futures.CancelledError):
        running.result(timeout=30)
    with pytest.raises(shmarray.EngineClosedError):
        eng.submit(bump, x)
    del x
