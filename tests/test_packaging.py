"""Packaging: what a user installs, and what the kernel library promises in
its docstrings."""

from __future__ import annotations

import ast
import doctest
import importlib
import os
import pkgutil
import re
import subprocess
import sys

import pytest

import shmarray
import shmarray.kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def source_version() -> str:
    """``__version__`` as shmarray/__init__.py writes it, read as text."""
    with open(os.path.join(ROOT, "shmarray", "__init__.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [
            "__version__"
        ]:
            return ast.literal_eval(node.value)
    raise AssertionError("shmarray/__init__.py assigns no __version__")


def last_release() -> str:
    """The newest version CHANGELOG.md records as released (its first
    ``## [X.Y.Z] - date`` heading; ``[Unreleased]`` is not one), which must
    also have its link at the bottom."""
    with open(os.path.join(ROOT, "CHANGELOG.md")) as f:
        text = f.read()
    found = re.search(r"^## \[(\d[^\]]*)\] - \d{4}-\d{2}-\d{2}$", text, re.M)
    assert found, "CHANGELOG.md has no released version (## [X.Y.Z] - YYYY-MM-DD)"
    version = found.group(1)
    assert re.search(rf"^\[{re.escape(version)}\]: https://", text, re.M), version
    return version


def test_one_version_string():
    # One version, written once, in shmarray/__init__.py: what a wheel built
    # from this tree declares, what `shmarray --version` prints, and the
    # newest release in the CHANGELOG (or, for a development version, one
    # after it) must all agree with it.  Nothing here imports the source's
    # number to compare it with itself.
    from build.util import project_wheel_metadata  # the dev extra
    from packaging.version import Version

    version = source_version()
    built = project_wheel_metadata(ROOT, isolated=False)["Version"]
    assert built == version, f"a wheel built from this tree says {built}, the source {version}"
    script = os.path.join(os.path.dirname(sys.executable), "shmarray")
    printed = subprocess.run(
        [script, "--version"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert printed == ["shmarray", version]
    released = last_release()
    if Version(version).is_devrelease or Version(version).is_prerelease:
        assert Version(version) > Version(released), (version, released)
    else:
        assert version == released, f"CHANGELOG.md's newest release is {released}"


def test_kernels_install_inside_the_package_only():
    # From a directory that is not the repository, as a user's would be.
    code = (
        "import importlib.util, shmarray.kernels.stencils as s; "
        "print(importlib.util.find_spec('kernels'), s.__name__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/"
    ).stdout.split()
    assert out == ["None", "shmarray.kernels.stencils"]


@pytest.mark.parametrize(
    "name",
    sorted(m.name for m in pkgutil.iter_modules(shmarray.kernels.__path__, "shmarray.kernels.")),
)
def test_kernel_library_doctests(name):
    failed, _ = doctest.testmod(importlib.import_module(name))
    assert failed == 0


def test_bench_names_the_extra_it_needs():
    # A Python that finds none of the peers, as one without the extra.
    code = (
        "import sys, importlib.util\n"
        "importlib.util.find_spec = lambda m, *a: None if m in "
        "('joblib', 'dask', 'distributed', 'matplotlib') else 1\n"
        "from shmarray.cli import main\n"
        "sys.exit(main(['bench', '--quick']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "pip install 'shmarray[bench]'" in proc.stderr
    assert "Traceback" not in proc.stderr
