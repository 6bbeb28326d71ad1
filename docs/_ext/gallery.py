"""``make gallery``: the showcase, from one quiet, recorded run.

What the site and the README show of a run (the demo's printout, the
notebooks with their outputs and plots) comes from here, never from a test
run on a busy machine nor from figures copied by hand:

* it refuses to run on a busy machine (its one-minute load average over a
  quarter of its usable CPUs; ``FORCE=1`` runs anyway and says so in the
  record);
* it runs ``shmarray demo`` and executes every ``notebooks/*.ipynb`` in a
  fresh Jupyter kernel, into ``docs/showcase/`` (committed);
* it writes ``docs/showcase/record.json``: when, at which commit, on which
  machine (CPU, usable CPUs, versions), the load before and after, and
  whether it was forced;
* it puts the demo's printout into ``README.md``,
  ``docs/getting-started.md`` and ``docs/benchmarks.md``, between
  ``<!-- demo-output -->`` markers.

The site's gallery renders ``docs/showcase/<name>.ipynb`` with that record
(``docs/_ext/hooks.py``); ``tests/test_gallery.py`` checks that each of those
pages shows the recorded printout, and that its layout
is what ``shmarray demo`` prints now.

Run: ``make gallery`` (or ``.venv/bin/python docs/_ext/gallery.py [--force]``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHOWCASE = ROOT / "docs" / "showcase"
PAGES = ("README.md", "docs/getting-started.md", "docs/benchmarks.md")
BEGIN, END = "<!-- demo-output -->", "<!-- /demo-output -->"
BUSY = 0.25  # of the usable CPUs: a one-minute load average above is busy


def load() -> dict:
    one, five, fifteen = os.getloadavg()
    return {"1min": round(one, 2), "5min": round(five, 2), "15min": round(fifteen, 2)}


def commit() -> str:
    """The commit run, "+changes" when the working tree differs from it
    (besides what this run writes)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout

    try:
        head = git("rev-parse", "--short", "HEAD").strip()
        mine = ("docs/showcase/", *PAGES)
        changed = [
            line[3:]
            for line in git("status", "--porcelain").splitlines()
            if not line[3:].startswith(mine)
        ]
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if changed else "")


def with_output(text: str, output: str) -> str:
    """``text`` with the block between the demo markers replaced."""
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"no {BEGIN} ... {END} block to fill")
    block = f"{BEGIN}\n```\n{output.rstrip()}\n```\n{END}"
    return pattern.sub(lambda _: block, text, count=1)


def shown(text: str) -> str:
    """The demo printout a page shows (between the markers)."""
    start = text.index(BEGIN) + len(BEGIN)
    inner = text[start : text.index(END, start)]
    return inner.strip().removeprefix("```").removesuffix("```").strip("\n")


def client(nb, **options):
    """An nbclient ``NotebookClient`` on a python3 kernel that logs only its
    errors: ipykernel otherwise warns on stderr that its local TCP traffic
    is unencrypted, which nobody here asked to hear (a cell's own output
    and errors reach the notebook as before)."""
    from nbclient import NotebookClient

    return NotebookClient(
        nb,
        kernel_name="python3",
        extra_arguments=["--IPKernelApp.log_level=ERROR"],
        **options,
    )


def execute(name: str) -> None:
    import nbformat

    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    client(nb, timeout=1200, resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    nbformat.write(nb, SHOWCASE / name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--force", action="store_true", help="run on a busy machine, and say so")
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from shmarray import options, timing

    cpus = options.usable_cpus()
    before = load()
    busy = before["1min"] > BUSY * cpus
    if busy and not a.force:
        print(
            f"make gallery: this machine is busy (load average {before['1min']} over "
            f"{cpus} usable CPUs); its figures would not be the engine's. Run it on a "
            f"quiet machine, or with FORCE=1 to record them anyway, marked as busy.",
            file=sys.stderr,
        )
        return 2
    SHOWCASE.mkdir(parents=True, exist_ok=True)
    print("make gallery: shmarray demo", flush=True)
    demo = subprocess.run(
        [sys.executable, "-m", "shmarray", "demo"], cwd=ROOT, capture_output=True, text=True
    )
    if demo.returncode != 0:
        print(demo.stdout, demo.stderr, file=sys.stderr)
        return 1
    output = demo.stdout.rstrip()
    (SHOWCASE / "demo.txt").write_text(output + "\n")
    for name in sorted(os.listdir(ROOT / "notebooks")):
        if name.endswith(".ipynb"):
            print(f"make gallery: {name}", flush=True)
            execute(name)
    after = load()
    record = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="minutes"),
        "commit": commit(),
        "machine": timing.machine(),
        "load_before": before,
        "load_after": after,
        "busy": busy,
        "forced": bool(a.force),
    }
    (SHOWCASE / "record.json").write_text(json.dumps(record, indent=2) + "\n")
    for page in PAGES:
        path = ROOT / page
        path.write_text(with_output(path.read_text(), output))
    print(f"make gallery: done; the record is {SHOWCASE.relative_to(ROOT)}/record.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
