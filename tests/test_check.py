"""The race check (``Engine.check``, ``check=True``, ``SHMARRAY_CHECK=1``):
the four bugs a parallel kernel commonly has are caught and named, at every
worker count and along another axis; clean kernels pass; nothing of the
caller's is touched by a check."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from numba import njit

import shmarray
from conftest import WORKER_COUNTS, engine_id, storage_for
from shmarray import check as races
from shmarray.kernels import TABLE
from shmarray.kernels.stencils import heat_step

N = 61  # rows: interior 59 with a halo of 1

# -- the four bugs, along axis 0 (1-D) and along axis 1 (2-D) ---------------------


@njit(cache=True)
def off_by_one(out, inp):
    """The loop runs one row too far: writes the first row of the next chunk."""
    for i in range(1, inp.shape[0]):
        out[i] = inp[i - 1] + inp[i]


@njit(cache=True)
def global_index(out, row0):
    """A global index (row_offset + i) used on the chunk's local view."""
    for i in range(out.shape[0]):
        out[row0 + i] = row0 + i


@njit(cache=True)
def in_place(a):
    """An in-place stencil: reads the halo its neighbour is rewriting."""
    for i in range(1, a.shape[0] - 1):
        a[i] = 0.5 * (a[i - 1] + a[i + 1])


@njit(cache=True)
def into_ghosts(out, inp):
    """Writes the ghost rows (the engine fills them for boundary=)."""
    for i in range(inp.shape[0]):
        out[i] = inp[i]


@njit(cache=True)
def off_by_one_cols(out, inp):
    for j in range(1, inp.shape[1]):
        for i in range(inp.shape[0]):
            out[i, j] = inp[i, j - 1] + inp[i, j]


@njit(cache=True)
def global_index_cols(out, col0):
    for j in range(out.shape[1]):
        for i in range(out.shape[0]):
            out[i, col0 + j] = col0 + j


@njit(cache=True)
def in_place_cols(a):
    for j in range(1, a.shape[1] - 1):
        for i in range(a.shape[0]):
            a[i, j] = 0.5 * (a[i, j - 1] + a[i, j + 1])


@njit(cache=True)
def into_ghosts_cols(out, inp):
    for j in range(inp.shape[1]):
        for i in range(inp.shape[0]):
            out[i, j] = inp[i, j]


@pytest.fixture(scope="module", params=WORKER_COUNTS, ids=engine_id)
def eng(request):
    with shmarray.Engine(workers=request.param, storage=storage_for(request.param)) as engine:
        yield engine


def _arrays(eng, axis):
    rng = np.random.default_rng(3)
    shape = (N,) if axis == 0 else (5, N)
    return eng.zeros(shape), eng.from_numpy(rng.random(shape))


def _kinds(report):
    return {p.kind for p in report.problems}


@pytest.mark.parametrize("axis", [0, 1])
def test_a_write_into_the_next_chunks_rows_is_caught(eng, axis):
    out, inp = _arrays(eng, axis)
    kernel = off_by_one if axis == 0 else off_by_one_cols
    before = (out.copy(), inp.copy())
    report = eng.check(kernel, out, inp, halo=1, axis=axis)
    assert not report.ok and report.judged
    first, second = report.chunks[0], report.chunks[1]
    hits = [p for p in report.problems if p.kind == races.OUTSIDE and p.rows == first]
    assert hits, str(report)
    p = hits[0]
    assert p.array == "array 0" and p.where == "a neighbour's rows"
    assert p.index[axis] == second[0]  # the first row of the next chunk
    assert "wrote array 0" in str(p) and "a neighbour's rows" in str(report)
    # nothing of the caller's was touched
    assert np.array_equal(out, before[0]) and np.array_equal(inp, before[1])


@pytest.mark.breaks_things
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("workers", WORKER_COUNTS)
def test_a_global_index_on_a_local_view_is_caught(workers, axis):
    # Its writes land far past the guard cells: a worker dies there, and the
    # check runs that chunk again with a guard as long as the array, to say
    # exactly where.  An engine of its own: the replacement is a new process.
    with shmarray.Engine(workers=workers, storage=storage_for(workers)) as eng:
        out, _ = _arrays(eng, axis)
        kernel = global_index if axis == 0 else global_index_cols
        report = eng.check(kernel, out, args=(shmarray.row_offset,), axis=axis)
        lo, hi = report.chunks[1]
        past = [p for p in report.problems if p.kind == races.OUTSIDE and p.rows == (lo, hi)]
        assert past and past[0].where == "past the end of its view", str(report)
        # The chunk at lo writes its local cells lo, lo + 1, ...: 2 lo on, globally.
        assert past[0].index[axis] == 2 * lo and past[0].count >= 1
        assert races.CHUNKING in _kinds(report) and races.CRASHED not in _kinds(report)
        eng.map(global_index, eng.zeros(8), args=(0,), chunks=1)  # the engine goes on
        del out


@pytest.mark.parametrize("axis", [0, 1])
def test_reading_the_halo_a_neighbour_rewrites_is_caught(eng, axis):
    _, a = _arrays(eng, axis)
    kernel = in_place if axis == 0 else in_place_cols
    report = eng.check(kernel, a, halo=1, axis=axis)
    first, second = report.chunks[0], report.chunks[1]
    reads = [p for p in report.problems if p.kind == races.READ and p.rows == first]
    assert reads, str(report)
    assert reads[0].other == second and reads[0].index[axis] == second[0]
    assert "which rows" in str(reads[0]) and "depends on timing" in str(reads[0])


@pytest.mark.parametrize("axis", [0, 1])
def test_a_write_into_the_ghost_cells_is_caught(eng, axis):
    out, inp = _arrays(eng, axis)
    kernel = into_ghosts if axis == 0 else into_ghosts_cols
    report = eng.check(kernel, out, inp, halo=1, boundary="wrap", axis=axis)
    first = report.chunks[0]
    ghosts = [p for p in report.problems if p.kind == races.OUTSIDE and p.rows == first]
    assert ghosts and ghosts[0].where == "ghost or halo cells", str(report)
    assert ghosts[0].index[axis] == 0  # the first ghost row


# -- no false alarms ---------------------------------------------------------------


@pytest.mark.parametrize("spec", TABLE, ids=[s.name + (s.notes[:8] or "") for s in TABLE])
def test_every_library_kernel_passes(engine, spec):
    arrays, args = spec.inputs(np.random.default_rng(1), N)
    shared = tuple(engine.from_numpy(a) for a in arrays)
    shared_args = tuple(engine.from_numpy(a) if isinstance(a, np.ndarray) else a for a in args)
    report = engine.check(
        spec.kernel,
        *shared,
        args=shared_args,
        halo=spec.halo_for(args),
        boundary=spec.boundary,
    )
    assert report.ok, str(report)
    del shared, shared_args


@njit(cache=True)
def heat3d(out, inp):
    for i in range(1, inp.shape[0] - 1):
        for j in range(1, inp.shape[1] - 1):
            for k in range(1, inp.shape[2] - 1):
                out[i, j, k] = inp[i, j, k] + 0.1 * (
                    inp[i - 1, j, k] + inp[i + 1, j, k] + inp[i, j - 1, k] - 3 * inp[i, j, k]
                )


@pytest.mark.parametrize("boundary", [None, "wrap", "reflect", "symmetric", "edge", 0.0])
@pytest.mark.parametrize("axis", [0, 1])
def test_double_buffered_stencils_pass_on_every_boundary_and_axis(eng, boundary, axis):
    rng = np.random.default_rng(4)
    new, old = eng.zeros((34, 30)), eng.from_numpy(rng.random((34, 30)))
    report = eng.check(heat_step, new, old, args=(0.2,), halo=1, boundary=boundary, axis=axis)
    assert report.ok, str(report)
    # ... and a 3-D one split along its last axis
    a, b = eng.zeros((6, 7, 26)), eng.from_numpy(rng.random((6, 7, 26)))
    assert eng.check(heat3d, a, b, halo=1, axis=2, boundary=boundary).ok
    del new, old, a, b


def test_check_true_runs_the_map_when_clean_and_raises_when_not(eng):
    rng = np.random.default_rng(5)
    u0 = rng.random((34, 30))
    new, old = eng.zeros((34, 30)), eng.from_numpy(u0)
    plain, plain_old = eng.zeros((34, 30)), eng.from_numpy(u0)
    eng.map(heat_step, new, old, args=(0.2,), halo=1, check=True, schedule="dynamic")
    eng.map(heat_step, plain, plain_old, args=(0.2,), halo=1)
    assert np.array_equal(new, plain)  # what map leaves
    a = eng.from_numpy(rng.random(N))
    expected = a.copy()
    in_place.py_func(expected)  # what a sequential run leaves
    with pytest.raises(shmarray.RaceError) as info:
        eng.map(in_place, a, halo=1, check=True)
    assert isinstance(info.value, ValueError) and not info.value.report.ok
    assert "read what another chunk writes" in str(info.value)
    assert np.array_equal(a, expected)
    total = eng.reduce(_total, old, check=True)
    assert total == eng.reduce(_total, old)
    del new, old, plain, plain_old, a


@njit(cache=True)
def _total(x):
    s = 0.0
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            s += x[i, j]
    return s


def test_what_the_check_cannot_judge_it_says(engine):
    x = engine.zeros(40)
    report = engine.check(off_by_one, x[1:], x[:-1], halo=1)  # one buffer, twice
    assert not report.judged and not report.ok and "share memory" in report.reason
    assert "could not judge" in str(report)

    def raises(out):
        raise ZeroDivisionError("bad row")

    report = engine.check(raises, x)
    assert not report.judged and "ZeroDivisionError" in report.reason
    with pytest.raises(ZeroDivisionError):
        engine.map(raises, x, check=True)  # as map raises it
    del x


def test_the_environment_checks_the_first_map_of_each_kernel_and_signature():
    code = textwrap.dedent("""
        import numpy as np
        import shmarray
        from test_check import in_place, off_by_one

        with shmarray.Engine(workers=2) as eng:
            a, b = eng.from_numpy(np.random.rand(61)), eng.zeros(61)
            try:
                eng.map(in_place, a, halo=1)
            except shmarray.RaceError:
                print("first: RaceError")
            eng.map(in_place, a, halo=1)  # the same signature: not checked again
            print("second: ran")
            c = eng.from_numpy(np.random.rand(61))
            eng.map(in_place, c, halo=1)  # new arrays, same signature
            print("new arrays: ran")
            try:
                eng.map(off_by_one, b, a, halo=1)
            except shmarray.RaceError:
                print("another kernel: RaceError")
    """)
    env = dict(os.environ, SHMARRAY_CHECK="1", PYTHONPATH=os.path.dirname(__file__))
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.stdout.splitlines() == [
        "first: RaceError",
        "second: ran",
        "new arrays: ran",
        "another kernel: RaceError",
    ], proc.stdout + proc.stderr
    assert proc.stderr == ""


def test_the_guide_shows_what_the_check_prints(tmp_path):
    # docs/guide/races.md: its example, run as a script, prints exactly the
    # reports the page shows.
    page = os.path.join(os.path.dirname(__file__), "..", "docs", "guide", "races.md")
    with open(page) as f:
        text = f.read()
    blocks = text.split("```")
    code = next(b[len("python") :] for b in blocks if b.startswith("python") and "def relax" in b)
    shown = [b[len("text") :].strip() for b in blocks if b.startswith("text\nrace check")]
    assert len(shown) == 4
    script = tmp_path / "races.py"
    script.write_text(code)
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    printed = proc.stdout.strip()
    assert printed == "\n".join(shown), printed


def _doc_examples() -> list:
    """Every complete example of the README and the docs (a block that
    imports shmarray and makes an Engine, with nothing left out)."""
    import glob
    import re

    root = os.path.join(os.path.dirname(__file__), "..")
    pages = ["README.md"] + sorted(
        os.path.relpath(p, root)
        for p in glob.glob(os.path.join(root, "docs", "**", "*.md"), recursive=True)
    )
    found = []
    for page in pages:
        with open(os.path.join(root, page)) as f:
            text = f.read()
        for k, code in enumerate(re.findall(r"```python\n(.*?)```", text, re.S)):
            if "import shmarray" in code and "Engine(" in code and "..." not in code:
                found.append(pytest.param(code, id=f"{page}-{k}"))
    return found


@pytest.mark.parametrize("code", _doc_examples())
def test_every_doc_example_passes_the_check(code, tmp_path):
    # SHMARRAY_CHECK=1: the first map of each kernel is race-checked; a
    # false alarm raises RaceError.
    script = tmp_path / "example.py"
    script.write_text(code)
    env = dict(os.environ, SHMARRAY_CHECK="1")
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0 and "RaceError" not in proc.stderr, proc.stderr[-3000:]


def ends_its_worker(out, row0):
    if row0 == 0:
        os.kill(os.getpid(), 9)  # as a test of retries does
    out[:] = 1.0


@pytest.mark.breaks_things
def test_a_kernel_that_ends_its_worker_is_not_judged_and_runs_as_asked():
    with shmarray.Engine(workers=2) as eng:
        x = eng.zeros(40)
        report = eng.check(ends_its_worker, x, args=(shmarray.row_offset,))
        assert not report.judged and "cannot be checked" in report.reason, str(report)
        with pytest.warns(RuntimeWarning, match="could not race-check"):
            got = eng.map(
                ends_its_worker, x, args=(shmarray.row_offset,), check=True, errors="collect"
            )
        assert len(got.failed) == 1  # the map itself ran, as without check
        del x
