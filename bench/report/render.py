"""The report as text (``table``) and as plots (``plots``)."""

from __future__ import annotations

import os

from shmarray.report.workloads import MEMORY_BOUND, WORKLOADS

METHODS = ("numpy", "numba", "prange", "process_pool", "joblib", "dask_threads", "shmarray")
SEQUENTIAL = ("numpy", "numba")


def _time(r: dict) -> str:
    t = r["per_call_s"] or r["seconds"]
    if r["per_call_s"]:
        return f"{t * 1e6:,.1f} us/call"
    return f"{t * 1e3:,.2f} ms" if t < 10 else f"{t:,.2f} s"


def table(report: dict) -> str:
    """The report as aligned columns, every column wide enough for its
    widest cell (a 200 ms call no longer runs into the worker count)."""
    rows = report["results"]
    top = max(report["workers"])
    head = ("workload", "method", "workers", "time", "vs numba", "GB/s", "ceiling", "equal")
    cells = []
    for r in rows:
        if r["method"] not in SEQUENTIAL and r["workers"] != top:
            continue
        cells.append(
            (
                r["workload"],
                r["method"],
                str(r["workers"]),
                _time(r),
                f"{r['speedup_vs_numba']:.2f}x",
                f"{r['gbps']:.1f}" if r["gbps"] is not None else "-",
                f"{r['fraction_of_ceiling']:.0%}" if r["fraction_of_ceiling"] is not None else "-",
                "yes" if r["identical"] else "NO",
            )
        )
    widths = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head))]
    left = {0, 1, 7}

    def line(c) -> str:
        return "  ".join(
            v.ljust(w) if i in left else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths))
        ).rstrip()

    return "\n".join(
        [
            f"machine: {report['machine']['cpu']}, "
            f"{report['machine']['usable_cpus']} usable CPUs; triad ceiling "
            f"{report['ceiling_GBps']:.1f} GB/s (numba prange, {top} threads)",
            line(head),
            *map(line, cells),
        ]
    )


HIGHLIGHT = "shmarray"
# One colour per method, fixed; shmarray alone is red, drawn thick, edged.
COLORS = {
    "numpy": "#7f7f7f",
    "numba": "#4d4d4d",
    "prange": "#2ca02c",
    "process_pool": "#9467bd",
    "joblib": "#8c564b",
    "dask_threads": "#1f77b4",
    "shmarray": "#d62728",
}


def _style(method: str) -> dict:
    if method == HIGHLIGHT:
        return dict(color=COLORS[method], linewidth=2.8, zorder=5)
    return dict(color=COLORS[method], linewidth=1.2, alpha=0.8)


def plots(report: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = report["results"]
    top = max(report["workers"])
    cpu = report["machine"]["cpu"]
    paths = []

    def bars(ax, pick, values):
        names = [r["method"] for r in pick]
        drawn = ax.bar(names, values, color=[COLORS[n] for n in names])
        for bar, n in zip(drawn, names):
            if n == HIGHLIGHT:
                bar.set_edgecolor("black")
                bar.set_linewidth(1.5)
        ax.tick_params(axis="x", rotation=60)
        for label in ax.get_xticklabels():
            if label.get_text() == HIGHLIGHT:
                label.set_fontweight("bold")

    # Times: lower is better.
    fig, axes = plt.subplots(1, len(WORKLOADS), figsize=(4 * len(WORKLOADS), 4.4))
    for ax, workload in zip(axes, WORKLOADS):
        pick = [
            r
            for r in rows
            if r["workload"] == workload and (r["method"] in SEQUENTIAL or r["workers"] == top)
        ]
        bars(ax, pick, [r["per_call_s"] or r["seconds"] for r in pick])
        numba_t = [r["per_call_s"] or r["seconds"] for r in pick if r["method"] == "numba"]
        if numba_t:
            ref = ax.axhline(numba_t[0], color="grey", linestyle=":", linewidth=1)
        ax.set_yscale("log")
        ax.set_title(workload + (" (per call)" if workload == "noop" else ""))
        ax.set_ylabel("seconds, lower is better")
    fig.legend([ref], ["sequential numba (1.0x)"], loc="lower center", fontsize=8, frameon=False)
    fig.suptitle(f"Time per method, parallel methods with {top} workers: {cpu}")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    paths.append(os.path.join(out_dir, "times.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # Speedup against workers: higher is better, 1.0x is sequential numba.
    fig, axes = plt.subplots(1, len(WORKLOADS), figsize=(4 * len(WORKLOADS), 4.6))
    handles = {}
    for ax, workload in zip(axes, WORKLOADS):
        for method in METHODS:
            pts = sorted(
                (r["workers"], r["speedup_vs_numba"])
                for r in rows
                if r["workload"] == workload and r["method"] == method and method not in SEQUENTIAL
            )
            if pts:
                (h,) = ax.plot(*zip(*pts), marker="o", label=method, **_style(method))
                handles[method] = h
        (h,) = ax.plot(
            report["workers"], report["workers"], "k--", linewidth=1, label="ideal (linear)"
        )
        handles["ideal (linear)"] = h
        h = ax.axhline(
            1.0, color="grey", linestyle=":", linewidth=1, label="1.0x: sequential numba"
        )
        handles["1.0x: sequential numba"] = h
        ax.set_title(workload)
        ax.set_xlabel("workers / threads")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_yscale("log")
        ax.set_ylabel("speedup over numba, higher is better")
    fig.legend(
        list(handles.values()),
        list(handles),
        loc="lower center",
        ncol=len(handles),
        fontsize=8,
        frameon=False,
    )
    fig.suptitle(f"Speedup against workers: {cpu}")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    paths.append(os.path.join(out_dir, "speedup.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # Bandwidth: higher is better, up to the triad ceiling.
    fig, axes = plt.subplots(1, len(MEMORY_BOUND), figsize=(4.5 * len(MEMORY_BOUND), 4.8))
    for ax, workload in zip(axes, MEMORY_BOUND):
        pick = [
            r
            for r in rows
            if r["workload"] == workload and (r["method"] in SEQUENTIAL or r["workers"] == top)
        ]
        bars(ax, pick, [r["gbps"] for r in pick])
        ceiling = ax.axhline(
            report["ceiling_GBps"],
            color="k",
            linestyle="--",
            linewidth=1,
            label="triad ceiling (prange)",
        )
        ax.set_title(workload)
        ax.set_ylabel("GB/s, higher is better")
    fig.legend(
        [ceiling], ["triad ceiling (numba prange)"], loc="lower center", fontsize=8, frameon=False
    )
    fig.suptitle(f"Memory bandwidth, parallel methods with {top} workers: {cpu}")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    paths.append(os.path.join(out_dir, "bandwidth.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
