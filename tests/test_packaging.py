"""Packaging: what a user installs, and what the kernel library promises in
its docstrings."""

from __future__ import annotations

import doctest
import importlib
import importlib.metadata
import pkgutil
import subprocess
import sys

import pytest

import shmarray
import shmarray.kernels


def test_one_version_string():
    assert importlib.metadata.version("shmarray") == shmarray.__version__


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
