"""What users see outside the arrays: an Engine in a notebook
(``_repr_html_``) and progress bars in a notebook without ipywidgets."""

from __future__ import annotations

import html
import subprocess
import sys
import textwrap
from html.parser import HTMLParser

import numpy as np
import pytest

import shmarray
from shmarray import display


class Cells(HTMLParser):
    """The text of every table cell, and whether the tags balance."""

    def __init__(self):
        super().__init__()
        self.cells: list[str] = []
        self.open: list[str] = []
        self._in = False

    def handle_starttag(self, tag, attrs):
        self.open.append(tag)
        if tag in ("td", "th"):
            self._in = True
            self.cells.append("")

    def handle_endtag(self, tag):
        assert self.open.pop() == tag
        self._in = False

    def handle_data(self, data):
        if self._in:
            self.cells[-1] += data


def parse(text: str) -> Cells:
    p = Cells()
    p.feed(text)
    p.close()
    assert p.open == []
    return p


def test_an_engine_shows_its_workers_and_blocks():
    with shmarray.Engine(workers=2) as eng:
        x, y = eng.zeros(1000), eng.from_numpy(np.ones(1000))
        eng.map(np.copyto, x, y)
        page = eng._repr_html_()
        cells = parse(page).cells
        stats = eng.stats()
        for s in stats:
            assert str(s.pid) in cells
        assert "USS" in cells and "replaced" in cells
        assert "2 workers" in page and "forkserver" in page
        assert f"{len(eng.blocks)} shared blocks" in page
        for b in eng.blocks:
            assert b.name in cells
        del x, y
    assert "closed" in eng._repr_html_()


def test_the_html_is_escaped_and_never_raises():
    class Hostile:
        closed = False
        workers = "<script>alert(1)</script>"
        start_method = "fork&serve"
        wait = "auto"
        blocks = []

        def stats(self):
            return []

    page = display.engine_html(Hostile())
    assert "<script>" not in page and html.escape(Hostile.workers) in page
    assert "fork&amp;serve" in page

    class Broken:
        closed = False

        def stats(self):
            raise RuntimeError("gone")

        def __repr__(self):
            return "<Broken & <gone>>"

    assert display.engine_html(Broken()) == "<pre>&lt;Broken &amp; &lt;gone&gt;&gt;</pre>"


def test_many_blocks_are_summed_and_cut():
    with shmarray.Engine(workers=2) as eng:
        arrays = [eng.zeros(10) for _ in range(display.BLOCKS_SHOWN + 3)]
        page = eng._repr_html_()
        assert f"{len(arrays)} shared blocks" in page and "... and 3 more" in page
        del arrays


# A Jupyter kernel as tqdm and shmarray detect one (IPython's shell with an
# IPKernelApp config, ipykernel.zmqshell imported), with or without
# ipywidgets: no kernel process needed.
FAKE_KERNEL = """
import sys, warnings
warnings.simplefilter("always")
{widgets}
import IPython, ipykernel.zmqshell

class Shell:
    config = {{"IPKernelApp": {{}}}}

IPython.get_ipython = lambda: Shell()
"""


def in_fake_kernel(code: str, widgets: bool) -> subprocess.CompletedProcess:
    setup = FAKE_KERNEL.format(widgets="" if widgets else "sys.modules['ipywidgets'] = None")
    return subprocess.run(
        [sys.executable, "-c", setup + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_fake_kernel_is_one_where_tqdm_auto_warns():
    proc = in_fake_kernel("import tqdm.auto", widgets=False)
    assert "IProgress not found" in proc.stderr


def test_progress_in_a_notebook_without_ipywidgets_is_a_text_bar_without_warning():
    proc = in_fake_kernel(
        """
        from shmarray import progress
        assert progress.in_notebook() and progress.can_show()
        print(progress.bar_class().__module__)
        bar = progress.ChunkProgress(4, True, "map")
        bar.update(4)
        bar.close()
        for _ in progress.steps(3, delay=0):
            pass
        """,
        widgets=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "tqdm.std\n"
    assert "map: 100%" in proc.stderr and "steps: 100%" in proc.stderr
    assert "Warning" not in proc.stderr and "IProgress" not in proc.stderr


def test_progress_in_a_notebook_with_ipywidgets_is_a_widget():
    pytest.importorskip("ipywidgets")
    proc = in_fake_kernel(
        """
        from shmarray import progress
        print(progress.bar_class().__module__)
        """,
        widgets=True,
    )
    assert proc.stdout == "tqdm.notebook\n" and proc.stderr == ""


def test_progress_in_a_real_kernel_without_ipywidgets():
    """The same in a Jupyter kernel, ipywidgets hidden before anything
    imports it: the bar is text on the cell's stderr, with no warning."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    cells = [
        "import sys; sys.modules['ipywidgets'] = None",
        "import numpy as np, shmarray\n"
        "with shmarray.Engine(workers=2) as eng:\n"
        "    x = eng.zeros(64)\n"
        "    eng.map(np.copyto, x, x, chunks=4, progress=True)",
        "with shmarray.Engine(workers=2) as eng:\n    eng.zeros(8)\n    display(eng)",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    streams = [o for c in nb.cells for o in c.outputs if o.output_type == "stream"]
    err = "".join(o.text for o in streams if o.name == "stderr")
    assert "100%" in err and "4/4" in err
    assert "IProgress" not in err and "Warning" not in err
    shown = [o for o in nb.cells[2].outputs if o.output_type == "display_data"]
    assert "<table" in shown[0].data["text/html"]


def test_iterate_counts_steps_and_a_notebook_keeps_the_final_state_as_text():
    proc = in_fake_kernel(
        """
        import numpy as np, shmarray
        from shmarray.kernels.stencils import heat_step
        from shmarray import progress
        with shmarray.Engine(workers=2) as eng:
            a, b = eng.zeros((40, 8)), eng.zeros((40, 8))
            eng.iterate(heat_step, a, b, steps=7, args=(0.2,), halo=1, progress=True)
        bar = progress.ChunkProgress(4, None, "auto")  # one that goes away when done
        bar._open()
        bar.update(4)
        bar.close()
        """,
        widgets=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "7/7" in proc.stderr and "step" in proc.stderr, proc.stderr
    assert "14/14" not in proc.stderr  # chunks (2 a step) are not what it counts
    # The bar that went away (tqdm erases its line) leaves its final state
    # as a plain line after it: what a saved notebook shows last.
    last = proc.stderr.split("\n")[-2]  # the last whole line
    assert last.startswith("auto: 100%") and "\r" not in last, repr(proc.stderr[-300:])
