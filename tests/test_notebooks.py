"""The notebooks run top to bottom in a fresh Jupyter kernel, race-checked
(``SHMARRAY_CHECK=1``: the first map of every kernel), and leave no block
behind (the kernel is a child of this process, so the leak fixture also
checks that its workers are gone).  What they leave is thrown away: the
site shows ``make gallery``'s recorded run, never a test run's."""

from __future__ import annotations

import os

import nbformat
import pytest
import yaml

from conftest import shm_entries
from test_gallery import gallery

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "notebooks")
NOTEBOOKS = sorted(f for f in os.listdir(HERE) if f.endswith(".ipynb"))


def gallery_notebooks() -> list[str]:
    """The notebooks the site's navigation shows: ``gallery/<name>.ipynb``
    entries under "Gallery" in mkdocs.yml (the docs hook stages each from
    notebooks/<name>.ipynb)."""
    with open(os.path.join(ROOT, "mkdocs.yml")) as f:
        nav = yaml.safe_load(f)["nav"]
    section = next(
        entry["Gallery"] for entry in nav if isinstance(entry, dict) and "Gallery" in entry
    )
    pages = [p if isinstance(p, str) else next(iter(p.values())) for p in section]
    return sorted(p.removeprefix("gallery/") for p in pages if p.endswith(".ipynb"))


def test_every_notebook_is_executed_and_in_the_gallery():
    (mark,) = [
        m for m in test_notebook_runs_in_a_fresh_kernel.pytestmark if m.name == "parametrize"
    ]
    executed = sorted(mark.args[1])
    on_disk = sorted(f for f in os.listdir(HERE) if f.endswith(".ipynb"))
    assert executed == on_disk, "a notebook the fresh-kernel test does not execute"
    assert gallery_notebooks() == on_disk, "the gallery's notebooks (mkdocs.yml nav) differ"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_a_fresh_kernel(name, monkeypatch):
    # SHMARRAY_CHECK=1 in the kernel's environment: a false alarm of the
    # race check is a RaceError in a cell.
    monkeypatch.setenv("SHMARRAY_CHECK", "1")
    nb = nbformat.read(os.path.join(HERE, name), as_version=4)
    before = shm_entries()
    # raises CellExecutionError on any failing cell
    gallery.client(nb, timeout=600, resources={"metadata": {"path": HERE}}).execute()
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors
    assert shm_entries() == before
    if name == "batch.ipynb":
        check_batch(nb)


def check_batch(nb) -> None:
    """Worker prints show in the cell that ran the map, tagged; the killed
    worker's chunk was retried; imap drew every chunk."""

    def text(cell):
        return "".join(
            o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream"
        )

    fragile = next(c for c in nb.cells if "def fragile" in c.source)
    out = text(fragile)
    assert (
        "[worker 0 rows 300:400] chunk 3 try 1" in out
        or "[worker 1 rows 300:400] chunk 3 try 1" in out
    )  # printed, then killed
    assert "rows 300:400] chunk 3 try 2" in out
    assert "1 after a retry" in out and "correct: True" in out
    for cell in nb.cells:
        if cell is not fragile and cell.cell_type == "code":
            assert "chunk 3 try" not in text(cell)  # no output strays
    live = next(c for c in nb.cells if "eng.imap(" in c.source)
    assert "64 chunks, pi ~ 3.1" in text(live)


def test_the_seed_a_generator_example_works_in_a_notebook():
    """The documentation's initializer example, as notebook cells: the kernel and
    the initializer are defined in cells, sent by value, and must share one
    namespace per worker."""
    from test_first_run import doc_example

    code = doc_example("seed-generator")
    head, body = code.split("with shmarray.Engine", 1)
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell(head),
            nbformat.v4.new_code_cell("with shmarray.Engine" + body),
        ]
    )
    before = shm_entries()
    gallery.client(nb, timeout=300).execute()
    out = "".join(o.get("text", "") for o in nb.cells[1].outputs)
    assert out.startswith("mean "), nb.cells[1].outputs
    assert shm_entries() == before
