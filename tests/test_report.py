"""The comparison tools: `shmarray bench`, Engine.compare, progress bars,
`shmarray info`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from numba import njit

import shmarray
from kernels.reductions import total
from kernels.stencils import heat_step
from shmarray import benchmark


@njit
def edge_bug(out, inp):
    """A 3-point smoother that forgot its halo: through the engine, the rows
    at chunk edges are never written."""
    for i in range(1, inp.shape[0] - 1):
        out[i] = 0.5 * (inp[i - 1] + inp[i + 1])


@njit
def slow_rows(out, inp):
    for i in range(inp.shape[0]):
        acc = 0.0
        for _ in range(2000):
            acc += inp[i] * 1.0000001
        out[i] = acc


def test_bench_report_has_every_method_and_workload_checked(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "shmarray", "bench", "--tiny",
                           "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    seen = {(r["workload"], r["method"]) for r in report["results"]}
    for workload in benchmark.WORKLOADS:
        methods = {m for w, m in seen if w == workload}
        expected = set(benchmark.METHODS) - ({"numpy"} if workload == "noop" else set())
        assert methods == expected, (workload, methods)
    assert all(r["identical"] for r in report["results"])
    assert report["workers"] == list(range(1, report["machine"]["usable_cpus"] + 1))
    assert report["ceiling_GBps"] > 0
    assert {"cpu", "usable_cpus", "versions"} <= set(report["machine"])
    for png in ("times.png", "speedup.png", "bandwidth.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert "triad ceiling" in proc.stdout


def test_compare_reports_speedup_and_identity(engine):
    u = np.random.default_rng(0).random((300, 200))
    original = u.copy()
    c = engine.compare(heat_step, u.copy(), u, args=(0.2,), halo=1, repeat=3)
    assert c.identical and c.kind == "map" and c.workers == engine.workers
    assert len(c.sequential_s) == len(c.engine_s) == 3
    assert c.speedup == pytest.approx(c.sequential_median / c.engine_median)
    assert c.efficiency == pytest.approx(c.speedup / engine.workers)
    assert c.engine_gbps > 0 and c.sequential_gbps > 0
    assert np.array_equal(u, original)                 # the user's data untouched
    assert "<table>" in c._repr_html_() and "speedup" in str(c)


def test_compare_flags_a_chunk_boundary_bug(engine):
    x = np.random.default_rng(1).random(1000)
    c = engine.compare(edge_bug, np.zeros(1000), x, chunks=4, repeat=1)
    assert not c.identical
    assert "rows 249, 250, 499, 500, 749, 750" in c.mismatch
    assert "halo" in " ".join(c.notes)
    assert engine.compare(edge_bug, np.zeros(1000), x, halo=1, chunks=4, repeat=1).identical


def test_compare_reduce(engine):
    x = np.random.default_rng(2).standard_normal(100_000)
    c = engine.compare(total, x, reduce=True, chunks=3, repeat=2)
    assert c.identical and c.kind == "reduce"
    assert c.max_abs_diff < 1e-9


def test_compare_plot(engine, tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    c = engine.compare(heat_step, np.zeros((50, 50)), np.ones((50, 50)), args=(0.1,),
                       halo=1, repeat=1)
    ax = c.plot()
    ax.figure.savefig(tmp_path / "compare.png")
    assert (tmp_path / "compare.png").stat().st_size > 5_000


def test_progress_bar_reaches_its_total(engine, capsys):
    x = engine.from_numpy(np.arange(64.0))
    out = engine.zeros(64)
    engine.map(slow_rows, out, x, chunks=8, schedule="dynamic", progress=True)
    err = capsys.readouterr().err
    assert "8/8" in err and "slow_rows" in err
    engine.reduce(total, x, chunks=4, progress=True)
    assert "4/4" in capsys.readouterr().err
    engine.map(slow_rows, out, x, chunks=8)             # quick: no bar by default
    assert capsys.readouterr().err == ""
    del x, out


def test_progress_appears_by_itself_for_long_maps(engine, capsys, monkeypatch):
    monkeypatch.setattr(shmarray.progress, "DELAY", 0.2)
    x = engine.from_numpy(np.ones(200))
    out = engine.zeros(200)

    @njit
    def slower(out, inp):
        for i in range(inp.shape[0]):
            acc = 0.0
            for _ in range(2_000_000):
                acc += inp[i] * 1.0000001
            out[i] = acc

    slower(np.zeros(2), np.ones(2))
    engine.map(slower, out, x, chunks=16, schedule="dynamic")
    assert "16/16" in capsys.readouterr().err
    del x, out


def test_steps_helper_counts_iterations(capsys):
    assert list(shmarray.steps(5, delay=0)) == [0, 1, 2, 3, 4]
    assert "5/5" in capsys.readouterr().err


def test_info_json():
    proc = subprocess.run([sys.executable, "-m", "shmarray", "info", "--json"],
                          capture_output=True, text=True, check=True)
    data = json.loads(proc.stdout)
    assert data["usable_cpus"] >= 1 and data["start_method"] == "forkserver"
    assert data["numba_threading_layer"] in ("omp", "tbb", "workqueue")
    assert data["shm_free_bytes"] > 0 and isinstance(data["blocks"], list)
    text = subprocess.run([sys.executable, "-m", "shmarray", "info"],
                          capture_output=True, text=True, check=True).stdout
    assert "usable CPUs" in text and "shared memory" in text
