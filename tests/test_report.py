"""The comparison tools: `shmarray bench`, Engine.compare, progress bars,
`shmarray info`."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import textwrap

import numpy as np
import pytest
from numba import njit

import shmarray
from shmarray import report
from shmarray.kernels.reductions import total
from shmarray.kernels.stencils import heat_step


@njit(cache=True)
def edge_bug(out, inp):
    """A 3-point smoother that forgot its halo: through the engine, the rows
    at chunk edges are never written."""
    for i in range(1, inp.shape[0] - 1):
        out[i] = 0.5 * (inp[i - 1] + inp[i + 1])


@njit(cache=True)
def slow_rows(out, inp):
    for i in range(inp.shape[0]):
        acc = 0.0
        for _ in range(2000):
            acc += inp[i] * 1.0000001
        out[i] = acc


def test_bench_report_has_every_method_and_workload_checked(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "shmarray", "bench", "--tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads((tmp_path / "bench.json").read_text())
    seen = {(r["workload"], r["method"]) for r in found["results"]}
    for workload in report.WORKLOADS:
        methods = {m for w, m in seen if w == workload}
        expected = set(report.METHODS) - ({"numpy"} if workload == "noop" else set())
        assert methods == expected, (workload, methods)
    assert all(r["identical"] for r in found["results"])
    assert found["workers"] == list(range(1, found["machine"]["usable_cpus"] + 1))
    assert found["ceiling_GBps"] > 0
    assert {"cpu", "usable_cpus", "versions"} <= set(found["machine"])
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
    assert np.array_equal(u, original)  # the user's data untouched
    assert "<table>" in c._repr_html_() and "speedup" in str(c)


@njit(cache=True)
def skips_the_last_chunk(out, inp, n_total):
    """A kernel bug: through the engine, the chunk that reaches the end is
    skipped entirely (it believes the last rows are someone else's)."""
    if inp.shape[0] < n_total and inp[-1] == 1.0:
        return
    for i in range(inp.shape[0]):
        out[i] = inp[i] * 2.0


def test_compare_poisons_outputs_so_missed_rows_show():
    # The output already holds the right answer: without poison, a kernel
    # that skips rows through the engine would look identical.
    x = np.arange(100.0) / 99.0
    answer = x * 2.0
    with shmarray.Engine(workers=2) as eng:
        c = eng.compare(skips_the_last_chunk, answer.copy(), x, args=(100,), repeat=1)
    assert not c.identical, c
    assert "poison" in " ".join(c.notes)
    assert "rows 50" in c.mismatch


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
    c = engine.compare(
        heat_step, np.zeros((50, 50)), np.ones((50, 50)), args=(0.1,), halo=1, repeat=1
    )
    ax = c.plot()
    ax.figure.savefig(tmp_path / "compare.png")
    assert (tmp_path / "compare.png").stat().st_size > 5_000


PROGRESS = textwrap.dedent("""
    import numpy as np
    import shmarray
    from numba import njit

    shmarray.progress.DELAY = 0.2

    @njit
    def slow_rows(out, inp):                    # about 20 ms a row
        for i in range(inp.shape[0]):
            acc = 0.0
            for _ in range(10_000_000):
                acc += inp[i] * 1.0000001
            out[i] = acc

    def nap(out):                               # 50 ms a chunk, whatever the CPU
        import time
        time.sleep(0.05)

    slow_rows(np.zeros(2), np.ones(2))
    with shmarray.Engine(workers=2) as eng:
        x = eng.from_numpy(np.ones(64))
        out = eng.zeros(64)
        eng.map(slow_rows, out[:2], x[:2])      # warm: compiles in the workers
        CASE
""")


def run_progress(case: str, tty: bool, env: dict | None = None) -> str:
    """Run PROGRESS with CASE in a child whose stderr is a terminal (a pty)
    or a pipe; what it wrote to stderr."""
    code = PROGRESS.replace("CASE", case)
    environ = {**os.environ, **(env or {})}
    if not tty:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=environ
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stderr
    master, slave = pty.openpty()
    # A terminal 80 columns wide: a fresh pty has none, and tqdm draws
    # nothing in no columns.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=slave, env=environ
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed it
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(120) == 0, b"".join(chunks)
    return b"".join(chunks).decode(errors="replace")


def test_asked_for_bars_reach_their_total_on_a_terminal():
    err = run_progress(
        'eng.map(slow_rows, out, x, chunks=8, schedule="dynamic", progress=True)', tty=True
    )
    assert "8/8" in err and "slow_rows" in err


def test_automatic_bars_show_for_long_maps_only():
    err = run_progress('eng.map(nap, out, chunks=32, schedule="dynamic")', tty=True)
    assert "32/32" in err
    quick = run_progress("eng.map(slow_rows, out[:4], x[:4], chunks=2)", tty=True)
    assert "slow_rows" not in quick


def test_no_bar_for_a_first_map_slow_only_from_compiling():
    case = (
        textwrap.dedent("""
        @njit
        def fresh(out, inp):                 # compiled in the workers now
            for i in range(inp.shape[0]):
                out[i] = inp[i] * 2.0
        eng.map(fresh, out, x)
    """)
        .strip()
        .replace("\n", "\n    ")
    )
    err = run_progress(case, tty=True, env={"SHMARRAY_PROGRESS": "auto"})
    assert "fresh" not in err


def test_no_bar_is_written_to_a_pipe_or_a_log():
    case = 'eng.map(slow_rows, out, x, chunks=32, schedule="dynamic", progress=True)'
    assert run_progress(case, tty=False) == ""


def test_the_global_switch():
    long_map = 'eng.map(slow_rows, out, x, chunks=32, schedule="dynamic")'
    assert "slow_rows" not in run_progress(long_map, tty=True, env={"SHMARRAY_PROGRESS": "0"})
    quick = "eng.map(slow_rows, out[:4], x[:4], chunks=2)"
    assert "2/2" in run_progress(quick, tty=True, env={"SHMARRAY_PROGRESS": "1"})


def test_steps_helper_counts_iterations():
    err = run_progress("print(list(shmarray.steps(5, delay=0)))", tty=True)
    assert "5/5" in err


def test_info_json():
    proc = subprocess.run(
        [sys.executable, "-m", "shmarray", "info", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    data = json.loads(proc.stdout)
    assert data["usable_cpus"] >= 1 and data["start_method"] == "forkserver"
    assert data["numba_threading_layer"] in ("omp", "tbb", "workqueue")
    assert data["shm_free_bytes"] > 0 and isinstance(data["blocks"], list)
    text = subprocess.run(
        [sys.executable, "-m", "shmarray", "info"], capture_output=True, text=True, check=True
    ).stdout
    assert "usable CPUs" in text and "shared memory" in text


def test_info_lists_ten_blocks_and_counts_the_rest(engine):
    # Twelve blocks of this process's engine (others may be live too): the
    # count covers them all, the listing stops at ten and says how to see
    # the rest.
    arrays = [engine.zeros(8) for _ in range(12)]
    text = subprocess.run(
        [sys.executable, "-m", "shmarray", "info"], capture_output=True, text=True, check=True
    ).stdout
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("live blocks"))
    count = int(lines[at].split(":")[1])
    listed = [line for line in lines[at + 1 :] if line.startswith("  /") or "memfd:" in line]
    assert count >= 12 and len(listed) == 10
    assert lines[-1] == f"  ... and {count - 10} more: `shmarray ls` lists them all"
    del arrays
