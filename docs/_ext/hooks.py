"""MkDocs hooks for the shmarray site (``hooks:`` in mkdocs.yml).

Four steps, writing only under ``build/docs/`` (git-ignored), never into
``docs/`` or the source tree:

* API sources.  The repository keeps ``kernels/`` and ``bench/report/`` at
  the top level and installs them as ``shmarray.kernels`` and
  ``shmarray.report``.  griffe reads source files, not the installed
  package, so the package is copied as it installs (the mapping in
  ``pyproject.toml``, ``[tool.setuptools.package-dir]``) into
  ``build/docs/api-src/shmarray/`` and mkdocstrings reads it from there
  (``paths: [build/docs/api-src]``).  Copies, not symlinks: griffe resolves
  symlinks and would then name ``kernels/`` as a package of its own.
* Gallery.  Every ``notebooks/<name>.ipynb`` becomes ``gallery/<name>.ipynb``
  on the site, rendered by mkdocs-jupyter without executing it.  The copy
  comes from ``docs/showcase/<name>.ipynb``, executed by ``make gallery`` on a
  quiet machine (``docs/_ext/gallery.py``), with a note under the
  notebook's title saying when, on what machine and under what load (its
  ``record.json``), and whether the notebook changed since; else from
  ``notebooks/<name>.ipynb`` as committed, saying so.  The gallery index
  lists them all, with the record.  The test suite executes the notebooks
  too, into a temporary place: it never changes what the site shows.
* Benchmark plots.  ``bench/results/*.png`` appear on the site as
  ``assets/bench/<name>.png``, so the benchmarks page shows the plots of the
  last ``shmarray bench --out bench/results`` run.
* Coverage.  After the build, every name in the ``__all__`` of ``shmarray``,
  ``shmarray.kernels`` and ``shmarray.dask`` must have an entry on an API
  page.

Anything missing (no notebook, no plot, an exported name absent from the
API reference) is logged as a warning, which ``mkdocs build --strict``
turns into an error.
"""

from __future__ import annotations

import ast
import json
import shutil
import tomllib
from pathlib import Path

from mkdocs.plugins import event_priority, get_plugin_logger
from mkdocs.structure.files import File, Files

log = get_plugin_logger("shmarray")

SHOWCASE = "docs/showcase"  # what `make gallery` executed, with its record.json
STAGE = "build/docs"  # everything this hook writes
GALLERY_MARK = "<!-- gallery-table -->"
# The public modules, and the file whose __all__ lists each one's names.
EXPORTS = {
    "shmarray": "shmarray/__init__.py",
    "shmarray.kernels": "kernels/__init__.py",
    "shmarray.dask": "shmarray/dask.py",
}

_gallery: list[dict] = []  # one record per notebook, for the index page


def _root(config) -> Path:
    return Path(config.config_file_path).resolve().parent


@event_priority(100)
def on_config(config):
    root = _root(config)
    dest = root / STAGE / "api-src"
    shutil.rmtree(dest, ignore_errors=True)
    with open(root / "pyproject.toml", "rb") as f:
        package_dirs = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    for package, source in package_dirs.items():  # "shmarray.kernels" = "kernels"
        shutil.copytree(
            root / source,
            dest / package.replace(".", "/"),
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
    return config


def _title(nb: dict, fallback: str) -> str:
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "markdown":
            for line in "".join(cell.get("source", "")).splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return fallback


def record(root: Path) -> dict | None:
    """``make gallery``'s record (``docs/showcase/record.json``), if any."""
    path = root / SHOWCASE / "record.json"
    return json.loads(path.read_text()) if path.is_file() else None


def describe(rec: dict) -> str:
    """The record as a sentence: when, where, how busy."""
    m = rec["machine"]
    load = rec["load_before"]
    busy = " **(the machine was busy: forced)**" if rec.get("busy") else ""
    return (
        f"{rec['date'][:10]}, commit `{rec['commit']}`, on {m['cpu']} with "
        f"{m['usable_cpus']} usable CPUs; load average {load['1min']} before"
        f"{busy}"
    )


def _same_cells(a: dict, b: dict) -> bool:
    """Whether two notebooks have the same code and text (outputs aside)."""

    def cells(nb):
        return [(c.get("cell_type"), "".join(c.get("source", ""))) for c in nb.get("cells", [])]

    return cells(a) == cells(b)


def _stage_notebook(root: Path, name: str) -> dict:
    executed = root / SHOWCASE / name
    original = root / "notebooks" / name
    rec = record(root)
    if executed.is_file() and rec is not None:
        source, was_executed = executed, True
        note = (
            f"**Executed by `make gallery`** ({describe(rec)}); the outputs "
            f"below come from that run. Source: `notebooks/{name}`."
        )
        if not _same_cells(
            json.loads(original.read_text(encoding="utf-8")),
            json.loads(executed.read_text(encoding="utf-8")),
        ):
            note += (
                f" `notebooks/{name}` has changed since: this page may not "
                f"match it until `make gallery` runs again."
            )
            log.info("gallery: %s changed after its showcase copy was made", name)
    else:
        source, was_executed = original, False
        note = (
            f"**Not executed:** no `{SHOWCASE}/{name}` was found, so this page "
            f"shows `notebooks/{name}` as committed. Run `make gallery` on a "
            f"quiet machine to render an executed copy."
        )
        log.info("gallery: %s has no executed copy in %s; rendering the original", name, SHOWCASE)
    note += f" [Download this notebook]({name})."  # include_source copies it beside the page
    nb = json.loads(source.read_text(encoding="utf-8"))
    cells = nb.setdefault("cells", [])
    at = 1 if cells and cells[0].get("cell_type") == "markdown" else 0
    cell = {"cell_type": "markdown", "metadata": {}, "source": ["> " + note]}
    if (nb.get("nbformat"), nb.get("nbformat_minor", 0)) >= (4, 5):
        cell["id"] = "shmarray-docs-source-note"  # cell ids exist from 4.5 on
    cells.insert(at, cell)
    staged = root / STAGE / "gallery" / name
    staged.parent.mkdir(parents=True, exist_ok=True)
    staged.write_text(json.dumps(nb, indent=1), encoding="utf-8")
    return {"name": name, "title": _title(nb, name), "executed": was_executed}


@event_priority(100)  # before mkdocs-jupyter's on_files wraps the notebooks
def on_files(files: Files, config):
    root = _root(config)
    shutil.rmtree(root / STAGE / "gallery", ignore_errors=True)
    _gallery.clear()
    for nb in sorted((root / "notebooks").glob("*.ipynb")):
        record = _stage_notebook(root, nb.name)
        _gallery.append(record)
        files.append(_staged_file(config, f"gallery/{nb.name}", root / STAGE))
    if not _gallery:
        log.warning("gallery: no notebooks found in notebooks/")
    plots = sorted((root / "bench" / "results").glob("*.png"))
    if not plots:
        log.warning("benchmarks: no plots found in bench/results/")
    shutil.rmtree(root / STAGE / "assets", ignore_errors=True)
    for png in plots:
        staged = root / STAGE / "assets" / "bench" / png.name
        staged.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(png, staged)
        files.append(_staged_file(config, f"assets/bench/{png.name}", root / STAGE))
    return files


def _staged_file(config, uri: str, stage: Path) -> File:
    """The file ``stage / uri``, shown on the site as if it were ``docs/uri``.

    A plain File with its own ``src_dir``, not ``File.generated``:
    mkdocs-jupyter wraps notebook files in a class that loses a generated
    file's source path.
    """
    return File(
        uri,
        src_dir=str(stage),
        dest_dir=config.site_dir,
        use_directory_urls=config.use_directory_urls,
    )


def _gallery_table(rec: dict | None) -> str:
    rows = ["| notebook | rendered from |", "| --- | --- |"]
    for r in _gallery:
        origin = (
            "executed by `make gallery` (`docs/showcase/`)"
            if r["executed"]
            else "**not executed**: `notebooks/` as committed"
        )
        rows.append(f"| [{r['title']}]({r['name']}) | {origin} |")
    if rec is not None:
        rows += ["", f"The run: {describe(rec)}."]
    return "\n".join(rows)


def _exported_names(source: Path) -> list[str]:
    """The names in a module's ``__all__``, read without importing it."""
    tree = ast.parse(source.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return list(ast.literal_eval(node.value))
    log.warning("%s has no __all__", source)
    return []


def on_page_markdown(markdown: str, page, config, files):
    if page.file.src_uri == "gallery/index.md":
        if GALLERY_MARK not in markdown:
            log.warning("gallery/index.md lost its %s marker", GALLERY_MARK)
        return markdown.replace(GALLERY_MARK, _gallery_table(record(_root(config))))
    return markdown


def on_post_build(config):
    # The stable surface is __all__: every name of it must be on an API page.
    root = _root(config)
    html = "".join(
        p.read_text(encoding="utf-8") for p in (Path(config.site_dir) / "api").glob("*.html")
    )
    for module, source in EXPORTS.items():
        for name in _exported_names(root / source):
            if f'id="{module}.{name}"' not in html:
                log.warning(
                    "API reference: %s.%s is in %s.__all__ but has no entry under docs/api/",
                    module,
                    name,
                    module,
                )
