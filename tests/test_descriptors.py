"""Descriptors: what crosses to a worker, and what a worker accepts."""

from __future__ import annotations

import os

import numpy as np
import pytest

from shmarray.blocks import attach
from shmarray.descriptors import ArrayDescriptor, Define, Values, decode, describe, encode
from shmarray.worker import Mappings


def _define_bytes(eng, *arrays) -> int:
    table = eng._dispatcher.table
    msg = Define(
        1,
        1,
        tuple(describe(a, table) for a in arrays),
        (2.5,),
        1,
        ((1, 5), (5, 9)),
        (0, 1),
        False,
        False,
    )
    return len(encode(msg))


def test_task_bytes_do_not_grow_with_array_size(engine):
    small = [engine.zeros(10) for _ in range(3)]
    big = [engine.zeros(10_000_000) for _ in range(3)]
    n_small, n_big = _define_bytes(engine, *small), _define_bytes(engine, *big)
    # only the integers for shape and stride widen: a few bytes per array
    assert n_big - n_small <= 3 * 8
    assert n_big < 400, n_big
    del small, big


def test_descriptor_of_views_points_into_the_block(engine):
    base = engine.from_numpy(np.arange(60.0).reshape(6, 10))
    table = engine._dispatcher.table
    for view in (base, base[2:4], base.T, base[::-1, 3], base[1:5, ::-3]):
        d = describe(view, table)
        assert d is not None and d.shape == view.shape and d.strides == view.strides
        buf = np.frombuffer(attach(d.block), np.uint8)
        rebuilt = d.view(buf)
        assert np.array_equal(rebuilt, view)
        del rebuilt, buf
    assert describe(np.arange(60.0), table) is None
    assert describe(base.copy(), table) is None


def test_messages_round_trip(engine):
    d = describe(engine.zeros(4), engine._dispatcher.table)
    define = Define(3, 7, (d,), (1.5, d), 0, ((0, 4),), (0,), True, False)
    assert decode(encode(define)) == define._replace(arrays=(d.wire,))
    assert decode(encode(Values(3, (0, 1), (1.0, 2.0)))) == Values(3, (0, 1), (1.0, 2.0))


def test_worker_rejects_descriptors_past_the_block_end(engine):
    x = engine.zeros(100)
    good = describe(x, engine._dispatcher.table)
    worker = Mappings(os.getpid())
    assert worker.view(good.wire).shape == (100,)
    size = worker.buffer(good.block).size
    for bad in (
        ArrayDescriptor(good.block, size - 8, (2,), (8,), "<f8"),  # past the end
        ArrayDescriptor(good.block, 0, (10,), (-8,), "<f8"),  # before the start
        ArrayDescriptor(good.block, 0, (size,), (8,), "<f8"),  # far too long
    ):
        with pytest.raises(ValueError, match="refusing to map it"):
            worker.view(bad.wire)
    del x, worker


def test_worker_rejects_blocks_of_another_coordinator(engine):
    x = engine.zeros(10)
    d = describe(x, engine._dispatcher.table)
    stranger = Mappings(owner_pid=1)  # a worker serving another process
    with pytest.raises(PermissionError, match="not created by this worker's coordinator"):
        stranger.view(d.wire)
    del x


def test_read_only_views_stay_read_only_in_the_worker(engine):
    from numba import njit

    @njit
    def write(a):
        a[0] = 1.0

    x = engine.zeros(4)
    ro = x.view()
    ro.flags.writeable = False
    with pytest.raises(Exception, match="readonly|read-only|Cannot modify"):
        engine.map(write, ro)
    assert x[0] == 0.0
    engine.map(write, x)
    assert x[0] == 1.0
    del x, ro


def test_release_unmaps_at_once_without_a_full_collection(engine):
    import gc
    import weakref

    x = engine.zeros(1000)
    d = describe(x, engine._dispatcher.table)
    worker = Mappings(os.getpid())
    assert worker.view(d.wire)[0] == 0.0
    mapping = weakref.ref(worker.buffer(d.block).base.obj)
    collections = []

    def note(phase, info):
        if phase == "start" and info["generation"] == 2:
            collections.append(info)

    gc.callbacks.append(note)
    try:
        worker.release({d.block})
    finally:
        gc.callbacks.remove(note)
    # Nothing of the worker's own kept the mapping (a local in release()
    # once did, and made every Release a full collection: 50 ms at 2 MiB).
    assert mapping() is None
    assert collections == []
    del x, worker
