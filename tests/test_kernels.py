"""The kernel library: every kernel against its NumPy reference, and through
the engine against its own sequential result, over chunkings and both
schedules.  Driven by kernels.TABLE, like the benchmarks."""

from __future__ import annotations

import operator

import numpy as np
import pytest

import shmarray
from shmarray import kernels
from shmarray.kernels import TABLE
from shmarray.kernels.montecarlo import pi_hits
from shmarray.kernels.reductions import histogram, moments
from shmarray.kernels.stencils import GAUSS3, convolve, jacobi
from shmarray.partition import DYNAMIC_CHUNKS_PER_WORKER, split_rows

IDS = [f"{s.name}{'-' + s.notes.split()[0] if s.notes else ''}" for s in TABLE]
ROWS = 61


def _close(got, ref, spec):
    if isinstance(ref, tuple):
        assert len(got) == len(ref)
        for g, r in zip(got, ref):
            _close(g, r, spec)
    elif spec.rtol or spec.atol:
        np.testing.assert_allclose(got, ref, rtol=spec.rtol, atol=spec.atol)
    else:
        np.testing.assert_array_equal(got, ref)


def _identical(a, b):
    if isinstance(a, tuple):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _identical(x, y)
    else:
        assert np.array_equal(a, b) and np.asarray(a).dtype == np.asarray(b).dtype


@pytest.fixture(scope="module")
def eng():
    with shmarray.Engine(workers=2) as engine:
        yield engine


def _copies(values):
    return tuple(v.copy() if isinstance(v, np.ndarray) else v for v in values)


def _output(spec, arrays, args):
    """What a map writes: one of its arrays, or an array in its args."""
    return args[spec.out_arg] if spec.out_arg is not None else arrays[spec.out]


def _sequential(spec, arrays, args):
    arrays, args = _copies(arrays), _copies(args)
    value = kernels.run(spec.kernel, *arrays, args=args, notes=spec.notes or None)
    return _output(spec, arrays, args) if spec.kind == "map" else value


def _chunk_args(args, lo, halo):
    """The arguments a chunk's call gets: row_offset filled in."""
    return tuple(lo - halo if a is shmarray.row_offset else a for a in args)


@pytest.mark.parametrize("spec", TABLE, ids=IDS)
def test_kernel_matches_numpy_reference(spec):
    arrays, args = spec.inputs(np.random.default_rng(0), ROWS)
    expected = spec.reference(_copies(arrays), args)
    _close(_sequential(spec, arrays, args), expected, spec)


@pytest.mark.parametrize("schedule", ["static", "dynamic"])
@pytest.mark.parametrize("chunks", [None, 1, 3, 7])
@pytest.mark.parametrize("spec", TABLE, ids=IDS)
def test_engine_equals_sequential(eng, spec, chunks, schedule):
    arrays, args = spec.inputs(np.random.default_rng(1), ROWS)
    halo = spec.halo_for(args)
    shared = tuple(eng.from_numpy(a) for a in arrays)
    shared_args = tuple(eng.from_numpy(a) if isinstance(a, np.ndarray) else a for a in args)
    value = kernels.run(
        spec.kernel,
        *shared,
        args=shared_args,
        engine=eng,
        chunks=chunks,
        schedule=schedule,
        notes=spec.notes or None,
    )
    if spec.kind == "map":
        expected = _sequential(spec, arrays, args)
        got = _output(spec, shared, shared_args)
        assert np.array_equal(got, expected)
        assert got.dtype == expected.dtype
    else:
        # the sequential kernel on the same chunks, combined in the same order
        per_worker = DYNAMIC_CHUNKS_PER_WORKER if schedule == "dynamic" else 1
        parts = [
            spec.kernel(
                *[a[lo - halo : hi + halo] for a in _copies(arrays)], *_chunk_args(args, lo, halo)
            )
            for lo, hi in split_rows(ROWS, chunks, halo, default=per_worker * eng.workers)
        ]
        combined = parts[0]
        for p in parts[1:]:
            combined = spec.combine(combined, p)
        _identical(value, spec.finish(combined))
        _close(value, spec.finish(spec.kernel(*_copies(arrays), *_chunk_args(args, 0, 0))), spec)
    del shared, shared_args


def test_reductions_are_deterministic_for_fixed_chunks(eng):
    x = eng.from_numpy(np.random.default_rng(2).standard_normal(200_001) * 1e3)
    for chunks in (2, 5, 16):
        for schedule in ("static", "dynamic"):
            runs = {
                kernels.run(moments, x, engine=eng, chunks=chunks, schedule=schedule)
                for _ in range(4)
            }
            assert len(runs) == 1
    del x


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_monte_carlo_is_the_same_for_any_worker_count(workers):
    counts = np.zeros(300, np.int64)
    expected = pi_hits(counts, 0, 500, 2024)
    args = (shmarray.row_offset, 500, 2024)
    with shmarray.Engine(workers=workers) as e:
        shared = e.zeros(300, np.int64)
        for chunks in (None, 1, 7, 300):
            assert e.reduce(pi_hits, shared, args=args, chunks=chunks) == expected
            assert np.array_equal(shared, counts)  # every row, the same draw
        assert e.reduce(pi_hits, shared, args=args, schedule="dynamic") == expected
        del shared
    assert abs(4 * expected / (300 * 500) - np.pi) < 0.05


def test_standardize_two_passes(eng):
    data = np.random.default_rng(3).standard_normal(10_000) * 4 + 2
    x, out = eng.from_numpy(data), eng.zeros(10_000)
    mean, std = kernels.standardize(out, x, engine=eng)
    np.testing.assert_allclose([mean, std], [data.mean(), data.std()], rtol=1e-12)
    np.testing.assert_allclose(out, (data - data.mean()) / data.std(), rtol=1e-10, atol=1e-12)
    seq = np.zeros(10_000)
    np.testing.assert_allclose(kernels.standardize(seq, data), (mean, std), rtol=1e-12)
    np.testing.assert_allclose(seq, out, rtol=1e-10, atol=1e-12)
    del x, out


BAD = [
    (
        "wrong dtype",
        TypeError,
        r"inp has dtype int64; expected a floating dtype",
        lambda: kernels.run(jacobi, np.zeros((5, 5)), np.zeros((5, 5), np.int64)),
    ),
    (
        "mismatched shapes",
        ValueError,
        "mismatched shapes",
        lambda: kernels.run(jacobi, np.zeros((5, 5)), np.zeros((5, 6))),
    ),
    (
        "different row counts",
        ValueError,
        "same number of rows",
        lambda: kernels.run(jacobi, np.zeros((5, 5)), np.zeros((6, 5))),
    ),
    (
        "halo too large",
        ValueError,
        "needs at least 5 rows; the arrays have 4",
        lambda: kernels.run(
            convolve, np.zeros((4, 9)), np.zeros((4, 9)), args=(np.ones((5, 5)) / 25,)
        ),
    ),
    (
        "even weights",
        ValueError,
        "square array of odd size",
        lambda: kernels.run(convolve, np.zeros((9, 9)), np.zeros((9, 9)), args=(np.ones((4, 4)),)),
    ),
    (
        "wrong ndim",
        ValueError,
        "must be 2-D",
        lambda: kernels.run(jacobi, np.zeros(5), np.zeros(5)),
    ),
    (
        "missing argument",
        TypeError,
        r"1 argument\(s\) in args \(alpha\)",
        lambda: kernels.run(kernels.stencils.heat_step, np.zeros((5, 5)), np.zeros((5, 5))),
    ),
    (
        "bad histogram range",
        ValueError,
        "need lo < hi",
        lambda: kernels.run(histogram, np.zeros(5), args=(1.0, 0.0, 10)),
    ),
    (
        "not a table kernel",
        KeyError,
        "not in shmarray.kernels.TABLE",
        lambda: kernels.run(operator.add, np.zeros(3)),
    ),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_to_a_kernel_wrapper(case):
    _, exc, pattern, call = case
    with pytest.raises(exc, match=pattern):
        call()


def test_the_table_covers_every_kernel():
    from shmarray.kernels import elementwise, irregular, linalg, montecarlo, reductions, stencils

    listed = {s.kernel for s in TABLE}
    for module in (elementwise, reductions, stencils, irregular, montecarlo, linalg):
        for name, obj in vars(module).items():
            if (
                hasattr(obj, "py_func")
                and obj.__module__ == module.__name__
                and name not in getattr(module, "HELPERS", ())
            ):
                assert obj in listed, f"{module.__name__}.{name} is missing from TABLE"
    assert GAUSS3.sum() == 1.0
    assert all(
        "Sequential:" in s.kernel.__doc__ and "Engine:" in s.kernel.__doc__ for s in TABLE
    ), "every kernel documents both calls"
