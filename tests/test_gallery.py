"""The showcase (``make gallery``, ``docs/_ext/gallery.py``): what the README
and Getting started show of ``shmarray demo`` is the recorded run's
printout, in the layout the demo prints now, and the record says on what
machine and under what load it was made."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHOWCASE = os.path.join(ROOT, "docs", "showcase")


def _gallery():
    spec = importlib.util.spec_from_file_location(
        "gallery", os.path.join(ROOT, "docs", "_ext", "gallery.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gallery = _gallery()


def skeleton(text: str) -> list[str]:
    """A printout's lines with what varies from run to run masked: numbers,
    block names, and the machine's load lines (a busy one adds a hint)."""
    out = []
    for line in text.splitlines():
        if line.strip().startswith(("machine:", "hint:")):
            continue
        line = re.sub(r"(/sha-[0-9a-f-]+|memfd:[0-9:]+|\S*/sha-[0-9a-f-]+)", "<block>", line)
        line = re.sub(r"\d[\d,]*(\.\d+)?", "#", line)  # 441,757 too
        out.append(re.sub(r"# [KMGT]?i?B\b", "# <bytes>", line).rstrip())
    # one line per block used: how many depends on the storage, not the layout
    return [
        line
        for k, line in enumerate(out)
        if not (line.strip().startswith("<block>") and k and out[k - 1].strip() == line.strip())
    ]


def recorded() -> str:
    with open(os.path.join(SHOWCASE, "demo.txt")) as f:
        return f.read().rstrip("\n")


def test_the_pages_show_the_recorded_demo():
    for page in gallery.PAGES:
        with open(os.path.join(ROOT, page)) as f:
            assert gallery.shown(f.read()) == recorded(), page


def test_the_recorded_demo_has_the_layout_the_demo_prints_now():
    now = subprocess.run(
        [
            sys.executable,
            "-m",
            "shmarray",
            "demo",
            "--size",
            "64",
            "--steps",
            "4",
            "--rounds",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert now.returncode == 0, now.stderr
    mask = skeleton(now.stdout)
    # (the size and steps are numbers: masked too)
    assert skeleton(recorded()) == mask


def test_the_record_names_the_machine_and_its_load():
    with open(os.path.join(SHOWCASE, "record.json")) as f:
        record = json.load(f)
    assert record["machine"]["cpu"] and record["machine"]["usable_cpus"] >= 1
    assert {"1min", "5min", "15min"} <= set(record["load_before"])
    assert record["commit"] and record["date"]
    names = sorted(f for f in os.listdir(os.path.join(ROOT, "notebooks")) if f.endswith(".ipynb"))
    assert sorted(f for f in os.listdir(SHOWCASE) if f.endswith(".ipynb")) == names
