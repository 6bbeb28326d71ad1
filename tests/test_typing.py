"""Types that tools see: mypy, run as a user would on a user's script,
rejects a misspelt mode and accepts correct code, with ``errors="collect"``
typed as returning a MapReport.  The scripts are only type-checked, never
run."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

import shmarray

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mypy") is None,
    reason="mypy is not installed (pip install 'shmarray[test]')",
)

BAD = """
    import numpy as np
    import shmarray


    def k(out, x):
        out[:] = x


    with shmarray.Engine(workers=2) as eng:
        x = eng.from_numpy(np.arange(10.0))
        y = eng.empty(x.shape)
        eng.map(k, y, x, schedule="fastest")
"""

TYPO = """
    import numpy as np
    import shmarray


    def k(out, x):
        out[:] = x


    with shmarray.Engine(workers=2) as eng:
        x = eng.from_numpy(np.arange(10.0))
        y = eng.empty(x.shape)
        eng.reduce(k, y, x, chunk=4)
        eng.iterate(k, y, x, steps=2, schedule="dynamic")
"""

GOOD = """
    import asyncio
    import operator
    from typing import Any, assert_type

    import numpy as np
    from numpy.typing import NDArray

    import shmarray
    from shmarray import MapReport


    def scale(out, x, a):
        out[:] = a * x


    def total(x) -> float:
        return float(x.sum())


    def step(out, inp):
        out[1:-1] = 0.5 * (inp[:-2] + inp[2:])


    with shmarray.Engine(workers=2, start_method="forkserver", wait="auto") as eng:
        x = eng.from_numpy(np.arange(10.0))
        y = eng.zeros(x.shape, np.float64)
        assert_type(x, NDArray[Any])
        assert_type(eng.map(scale, y, x, args=(2.5,), schedule="dynamic"), None)
        s = eng.reduce(total, x, combine=operator.add, boundary=np.float32(0))
        assert_type(s, float)  # what the kernel returns
        report = eng.reduce(total, x, errors="collect", retries=1)
        assert_type(report, MapReport)
        if not report.ok:
            for (lo, hi), exc in report.failed:
                print(lo, hi, exc)
        print(report.value, report.retried)
        r2 = eng.map(scale, y, x, args=(shmarray.row_offset,), errors="collect",
                     boundary="wrap", halo=1)
        assert_type(r2, MapReport)
        prepared = eng.prepare(step, y, x, halo=1)
        prepared()
        prepared.swap()
        last = eng.iterate(step, y, x, steps=10, halo=1, boundary=0.0)
        assert_type(last, NDArray[Any])
        for rows, value in eng.imap(total, x, schedule="static"):
            print(rows, value)

        async def main() -> None:
            assert_type(await eng.map_async(scale, y, x, args=(2.0,)), None)
            rep = await eng.reduce_async(total, x, errors="collect", timeout=5.0)
            assert_type(rep, MapReport)

        asyncio.run(main())
"""


@pytest.fixture(scope="module")
def mypy(tmp_path_factory):
    """Run mypy on a script as a user would: on the installed shmarray
    (through its ``py.typed``), or, in a source checkout installed
    editable, on the package's directory.  One cache for the module's
    runs: the first one reads numpy's stubs (seconds)."""
    root = tmp_path_factory.mktemp("mypy")
    config = root / "mypy.ini"
    config.write_text("[mypy]\n")  # no user or project config
    env = dict(os.environ)
    parent = pathlib.Path(shmarray.__file__).resolve().parent.parent
    if parent.name != "site-packages":  # editable: mypy sees no finder hook
        env["MYPYPATH"] = str(parent)

    def run(name: str, source: str) -> subprocess.CompletedProcess:
        script = root / name
        script.write_text(textwrap.dedent(source))
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "mypy",
                "--config-file",
                str(config),
                "--cache-dir",
                str(root / "cache"),
                "--follow-imports=silent",
                "--no-error-summary",
                "--show-error-codes",
                str(script),
            ],
            capture_output=True,
            text=True,
            cwd=root,
            env=env,
            timeout=300,
        )

    return run


def test_package_ships_py_typed():
    assert (pathlib.Path(shmarray.__file__).parent / "py.typed").is_file()


def test_mypy_rejects_an_unknown_schedule(mypy):
    done = mypy("bad.py", BAD)
    assert done.returncode == 1, done.stdout + done.stderr
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    lineno = (
        textwrap.dedent(BAD).splitlines().index('    eng.map(k, y, x, schedule="fastest")') + 1
    )
    assert len(errors) == 1 and errors[0].startswith(f"bad.py:{lineno}:"), done.stdout
    assert "schedule: Literal['static', 'dynamic']" in done.stdout, done.stdout


def test_mypy_accepts_a_correct_script(mypy):
    done = mypy("good.py", GOOD)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_names_a_misspelt_or_misplaced_keyword(mypy):
    done = mypy("typo.py", TYPO)
    assert done.returncode == 1, done.stdout + done.stderr
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    # The first error of each call names the keyword (an overloaded one
    # then lists its two variants).
    first = {}
    for line in errors:
        first.setdefault(line.split(":")[1], line)
    assert len(first) == 2, done.stdout
    reduce_line, iterate_line = (first[k] for k in sorted(first, key=int))
    assert 'Unexpected keyword argument "chunk"' in reduce_line, done.stdout
    assert 'did you mean "chunks"?' in reduce_line, done.stdout
    assert 'Unexpected keyword argument "schedule" for "iterate"' in iterate_line, done.stdout


STORAGE_TYPO = """
    import pathlib
    import shmarray

    shmarray.Engine(workers=2, storage="memfd")
    shmarray.Engine(workers=2, storage=pathlib.Path("/tmp"))
    shmarray.Engine(workers=2, storage="memfdd")
"""


def test_mypy_flags_a_misspelt_storage_kind(mypy):
    done = mypy("storage.py", STORAGE_TYPO)
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1 and errors[0].startswith("storage.py:7:"), done.stdout
    assert 'Argument "storage"' in errors[0], done.stdout
