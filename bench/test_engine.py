"""pytest-benchmark suites for the engine: each shmarray benchmark has a peer
in the same group.  ``make bench`` runs them and saves the results, so runs
can be compared between commits (``--benchmark-compare``)."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

import shmarray
from workloads import TriadPair, noop, nothing

TRIAD_N = 50_000_000


@pytest.fixture(scope="module")
def eng():
    with shmarray.Engine(workers=2) as engine:
        yield engine


@pytest.fixture(scope="module")
def triad(eng):
    pair = TriadPair(eng, TRIAD_N, threads=2)
    yield pair
    assert pair.identical()


@pytest.fixture(scope="module")
def ppe():
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("forkserver")) as ex:
        for _ in range(100):
            ex.submit(nothing).result()
        yield ex


@pytest.mark.benchmark(group="triad-50M")
def test_triad_shmarray(benchmark, record, triad):
    benchmark.pedantic(triad.engine, rounds=20, warmup_rounds=2)
    record("shmarray")


@pytest.mark.benchmark(group="triad-50M")
def test_triad_prange(benchmark, record, triad):
    benchmark.pedantic(triad.prange, rounds=20, warmup_rounds=2)
    record("numba prange")


@pytest.mark.benchmark(group="triad-50M")
def test_triad_prange_small_pages(benchmark, record, triad):
    benchmark.pedantic(triad.prange_small_pages, rounds=20, warmup_rounds=2)
    record("prange, 4 KiB pages")


@pytest.mark.benchmark(group="no-op round trip")
def test_roundtrip_shmarray(benchmark, record, eng):
    x = eng.zeros(16)
    benchmark(eng.map, noop, x, chunks=1)
    record("shmarray")


@pytest.mark.benchmark(group="no-op round trip")
def test_roundtrip_process_pool(benchmark, record, ppe):
    benchmark(lambda: ppe.submit(nothing).result())
    record("ProcessPoolExecutor")


def test_results_identical(triad):
    triad.engine()
    triad.prange()
    assert np.array_equal(triad.a, triad.pa)
