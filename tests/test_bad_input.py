"""Hypothesis-generated bad arguments: every one must raise TypeError or
ValueError in the caller, send nothing to the workers, leave no block
behind and keep the engine usable."""

from __future__ import annotations

import numbers
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from numba import njit

import shmarray
from conftest import shm_entries


@njit
def copy(out, inp):
    for i in range(inp.shape[0]):
        out[i] = inp[i]


def _positive(v) -> bool:
    return (
        isinstance(v, numbers.Real)
        and not isinstance(v, bool)
        and not isinstance(v, np.ndarray)
        and v > 0
    )


junk = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True),
    st.text(max_size=5),
    st.binary(max_size=5),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.integers(-(10**12), -1),
    st.just(object()),
    st.just(np.float32(1.5)),
    st.just(np.zeros((2, 2))),
    st.just(np.array("text")),
)

# parameter -> values that are always wrong for a 20-row map
BAD = {
    "kernel": junk.filter(lambda v: not callable(v)),
    "array": junk.filter(lambda v: v is not None),
    "args": junk.filter(lambda v: not isinstance(v, (tuple, list))),
    "halo": st.one_of(
        junk.filter(
            lambda v: not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 10)
        ),
        st.integers(11, 10**6),
    ),
    "chunks": st.one_of(
        junk.filter(lambda v: v is not None and not isinstance(v, (list, np.ndarray))),
        st.integers(-(10**6), 0),
        st.lists(st.integers(1, 30), min_size=1, max_size=5).filter(lambda s: sum(s) != 20),
        st.lists(st.integers(-5, 0), min_size=1, max_size=3),
    ),
    "timeout": st.one_of(
        junk.filter(lambda v: v is not None and not _positive(v)),
        st.floats(max_value=0.0, allow_nan=False),
        st.just(float("nan")),
    ),
    "schedule": junk.filter(lambda v: not isinstance(v, np.ndarray)),
    "combine": junk.filter(lambda v: not callable(v)),
}


@pytest.fixture(scope="module")
def eng():
    with shmarray.Engine(workers=2) as engine:
        yield engine


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.sampled_from(sorted(BAD)).flatmap(lambda p: st.tuples(st.just(p), BAD[p])))
def test_bad_argument_fails_before_anything_is_sent(eng, bad):
    param, value = bad
    out, inp = eng.zeros(20), eng.from_numpy(np.arange(20.0))
    call = {
        "kernel": copy,
        "arrays": (out, inp),
        "args": (),
        "halo": 0,
        "chunks": None,
        "timeout": None,
        "schedule": "static",
    }
    if param == "array":
        call["arrays"] = (out, value)
    elif param != "combine":
        call[param] = value
    pool = eng._dispatcher.pool
    sent, blocks = pool.seq, shm_entries()
    with pytest.raises((TypeError, ValueError)):
        if param == "combine":
            eng.reduce(copy, out, inp, combine=value)
        else:
            eng.map(
                call["kernel"],
                *call["arrays"],
                args=call["args"],
                halo=call["halo"],
                chunks=call["chunks"],
                timeout=call["timeout"],
                schedule=call["schedule"],
            )
    assert pool.seq == sent
    assert shm_entries() == blocks
    eng.map(copy, out, inp)
    assert np.array_equal(out, inp)


@pytest.mark.parametrize(
    "call, said",
    [
        (
            lambda eng, x: eng.map(_noop, x, chunk=4),
            "map() got an unexpected keyword argument 'chunk'; did you mean 'chunks'?",
        ),
        (
            lambda eng, x: eng.reduce(_noop, x, combin=max),
            "reduce() got an unexpected keyword argument 'combin'; did you mean 'combine'?",
        ),
        (
            lambda eng, x: eng.iterate(_noop2, x, x.copy(), steps=0, schedule="dynamic"),
            "iterate() got an unexpected keyword argument 'schedule'",
        ),
        (
            lambda eng, x: eng.prepare(_noop, x, timeuot=1.0),
            "prepare() got an unexpected keyword argument 'timeuot'; did you mean 'timeout'?",
        ),
    ],
    ids=["map", "reduce", "iterate", "prepare"],
)
def test_an_unknown_keyword_is_named_with_the_closest_one(engine, call, said):
    x = engine.zeros(8)
    with pytest.raises(TypeError) as info:
        call(engine, x)
    assert str(info.value).startswith(said)


def test_in_caller_given_to_map_points_at_prepare(engine):
    x = engine.zeros(8)
    with pytest.raises(TypeError) as info:
        engine.map(_noop, x, in_caller=True)
    assert "eng.prepare(kernel, *arrays, ..., in_caller=True)" in str(info.value)
    with pytest.raises(TypeError, match=r"\(it takes \['args', .*'check', .*'errors'"):
        engine.map(_noop, x, zzz=1)


def test_the_keywords_named_in_messages_are_the_methods_own():
    # What "it takes [...]" lists besides the options is each method's
    # signature, not a copy that could drift from it.
    import inspect

    from shmarray import options

    for method, own in options._OWN_KEYWORDS.items():
        params = inspect.signature(getattr(shmarray.Engine, method)).parameters
        keywords = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
        keywords |= {n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD}
        assert own == keywords - {"self", "kernel"}, method


def test_an_unknown_engine_keyword_is_named_with_the_closest_one():
    # Refused before a worker starts or a block is made.
    with pytest.raises(TypeError) as info:
        shmarray.Engine(wokers=2)
    assert str(info.value) == (
        "Engine() got an unexpected keyword argument 'wokers'; did you mean 'workers'?"
    )
    with pytest.raises(TypeError, match=r"'zzz' \(it takes \['initargs', "):
        shmarray.Engine(zzz=1)


def _noop(x):
    pass


def _noop2(out, inp):
    pass


@njit(cache=True)
def _three(out, x, a):
    out[:] = a * x


def test_a_kernel_whose_parameters_cannot_take_the_call_is_refused_in_one_line(engine):
    x, y = engine.zeros(8), engine.zeros(8)
    with pytest.raises(TypeError) as info:
        engine.map(_three, y, x)  # a missing args=(a,)
    said = str(info.value)
    assert "\n" not in said
    assert "takes 3 parameters, but map passes it 2: 2 array(s) and 0 in args" in said
    with pytest.raises(TypeError, match="takes 3 parameters, but reduce passes it 4"):
        engine.reduce(_three, y, x, args=(1.0, 2.0))
    del x, y


def test_messages_number_the_arrays_as_written_and_name_the_call(engine):
    x = engine.zeros(8)
    with pytest.raises(TypeError) as info:
        engine.map(_three, x, [1.0, 2.0], args=(1.0,))
    assert str(info.value).startswith("array 1 (the second argument after the kernel) is a list")
    with pytest.raises(ValueError, match=r"\(reduce splits it\)"):
        engine.reduce(_three, x, engine.zeros(9), args=(1.0,))
    del x


def _python_loop(out):
    for i in range(out.shape[0]):
        out[i] = i


def _python_while(out, lo):
    i = 0
    while i < out.shape[0]:
        out[i] = 2 * (lo + i)
        i += 1


def _numpy_only(out):
    out[:] = 3.0


def test_a_plain_python_kernel_with_a_loop_is_warned_about_once(engine):
    x = engine.zeros(8)
    with pytest.warns(shmarray.PythonKernelWarning) as caught:
        engine.map(_python_loop, x)
        engine.map(_python_loop, x)  # the same kernel: no second warning
        engine.submit(_python_while, x, args=(shmarray.row_offset,)).result()
    said = [str(w.message) for w in caught]
    assert len(said) == 2, said
    assert said[0].startswith("kernel _python_loop is a plain Python function with a loop")
    assert "10 to 100 times slower" in said[0] and "@njit" in said[0]
    assert "category=shmarray.PythonKernelWarning" in said[0]
    assert said[1].startswith("kernel _python_while")
    # It points at the user's line, not into the engine.
    assert all(w.filename == __file__ for w in caught)
    np.testing.assert_array_equal(x, 2 * np.arange(8.0))
    del x


def test_compiled_and_numpy_only_kernels_are_not_warned_about(engine):
    x, y = engine.zeros(8), engine.zeros(8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", shmarray.PythonKernelWarning)
        engine.map(_numpy_only, x)
        engine.map(_noop, x)
        engine.map(_three, y, x, args=(2.0,))  # @njit
    assert (x == 3.0).all() and (y == 6.0).all()
    del x, y
