"""The notebooks run top to bottom in a fresh Jupyter kernel and leave no
block behind (the kernel is a child of this process, so the leak fixture
also checks that its workers are gone)."""

from __future__ import annotations

import os

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import shm_entries

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "notebooks")
NOTEBOOKS = sorted(f for f in os.listdir(HERE) if f.endswith(".ipynb"))


def test_every_notebook_is_tested():
    assert {"quickstart.ipynb", "heat_diffusion.ipynb", "benchmarks.ipynb"} <= set(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_a_fresh_kernel(name):
    nb = nbformat.read(os.path.join(HERE, name), as_version=4)
    before = shm_entries()
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": HERE}})
    client.execute()            # raises CellExecutionError on any failing cell
    errors = [o for c in nb.cells if c.cell_type == "code"
              for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert shm_entries() == before
