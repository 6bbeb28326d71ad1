"""Soak: many maps and many allocate/free cycles must not grow file
descriptors, memory, or entries in /dev/shm, in the coordinator or the
workers."""

from __future__ import annotations

import gc

import psutil
from numba import njit

import shmarray
from conftest import shm_entries


@njit
def bump(x):
    for i in range(x.shape[0]):
        x[i] += 1.0


def _state(eng):
    gc.collect()
    me = psutil.Process()
    workers = [psutil.Process(p) for p in eng.worker_pids]
    return {
        "fds": me.num_fds(),
        "rss": me.memory_info().rss,
        "shm": len(shm_entries()),
        "worker_fds": [w.num_fds() for w in workers],
        "worker_maps": [len(w.memory_maps(grouped=False)) for w in workers],
        "worker_uss": [w.memory_full_info().uss for w in workers],
    }


def test_ten_thousand_maps_and_a_thousand_allocations_leak_nothing():
    with shmarray.Engine(workers=2) as eng:
        x = eng.zeros(1000)
        for _ in range(200):  # warm: compile, caches, first attach
            eng.map(bump, x)
            y = eng.zeros((256, 1024))
            eng.map(bump, y)
            del y
        eng.map(bump, x)
        before = _state(eng)

        for _ in range(10_000):
            eng.map(bump, x)
        for _ in range(1_000):
            y = eng.zeros((256, 1024))  # 2 MiB, touched by both workers
            eng.map(bump, y)
            del y
        eng.map(bump, x)  # delivers the last releases
        after = _state(eng)

        assert x[0] == 200 + 1 + 10_000 + 1
        assert after["fds"] == before["fds"], (before, after)
        assert after["shm"] == before["shm"], (before, after)
        assert after["rss"] - before["rss"] < 16 * 2**20, (before, after)
        assert after["worker_fds"] == before["worker_fds"], (before, after)
        for b, a in zip(before["worker_maps"], after["worker_maps"]):
            assert a <= b + 2, (before, after)
        for b, a in zip(before["worker_uss"], after["worker_uss"]):
            assert a - b < 16 * 2**20, (before, after)
        del x
    print(f"soak: before {before}\nsoak: after  {after}")
