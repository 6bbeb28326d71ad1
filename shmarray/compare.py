"""``Engine.compare``: your kernel, sequential against the engine.

Both sides run on copies of your arrays (private copies for the sequential
run, shared copies for the engine), so your data is never touched; before
each repetition both copies are reset from the originals, so a kernel that
updates in place (``y += a*x``) does the same work on both sides every time.

An array the kernel only writes (an output) is reset to a *poison* value
instead (NaN, or a sentinel for integers): had it held the answer already,
a kernel that misses rows through the engine would still have matched.
"""

from __future__ import annotations

import functools
import html
import operator
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from shmarray.timing import first_difference, identical, interleaved, same


@dataclass(repr=False)
class Comparison:
    """Timings and the equality check of one kernel, sequential vs engine.

    What ``Engine.compare`` returns.  It prints as a table, renders as one
    in a notebook, and draws itself with ``plot()``.

    Attributes
    ----------
    kernel : str
        The kernel's name.
    workers : int
        The engine's workers.
    schedule : str
        "static" or "dynamic".
    chunks : int
        Chunks per engine call.
    kind : str
        "map" or "reduce".
    sequential_s, engine_s : list of float
        Seconds of each timed round, sequentially on the whole arrays and
        through the engine.
    nbytes : int
        Bytes of every array, counted once.
    identical : bool
        The engine's results equal the sequential kernel's, bit for bit (a
        reduce: the kernel run chunk by chunk, combined in the same order).
    mismatch : str
        Where the results first differ ("" when identical).
    max_abs_diff : float or None
        A reduce: the largest absolute difference between the engine's
        value and the kernel's on the whole arrays (rounding differs with
        the order of the sums); None for a map, or for values that are not
        numbers.
    notes : list of str
        How the check was made (output arrays started from a poison value,
        say).
    """

    kernel: str
    workers: int
    schedule: str
    chunks: int
    kind: str  # "map" or "reduce"
    sequential_s: list[float]
    engine_s: list[float]
    nbytes: int  # bytes of every array, counted once
    identical: bool
    mismatch: str = ""  # where the results first differ
    max_abs_diff: float | None = None  # reduce: vs the whole-array result
    notes: list[str] = field(default_factory=list)

    @property
    def sequential_median(self) -> float:
        """Median seconds of the sequential runs."""
        return statistics.median(self.sequential_s)

    @property
    def engine_median(self) -> float:
        """Median seconds of the engine's runs."""
        return statistics.median(self.engine_s)

    @property
    def speedup(self) -> float:
        """Sequential median over engine median."""
        return self.sequential_median / self.engine_median

    @property
    def efficiency(self) -> float:
        """Speedup per worker (1.0 is ideal)."""
        return self.speedup / self.workers

    @property
    def sequential_gbps(self) -> float:
        """``nbytes`` per sequential median, in GB/s."""
        return self.nbytes / self.sequential_median / 1e9

    @property
    def engine_gbps(self) -> float:
        """``nbytes`` per engine median, in GB/s."""
        return self.nbytes / self.engine_median / 1e9

    def rows(self) -> list[tuple[str, str]]:
        """The table's rows, as (label, value) text pairs."""
        check = "identical" if self.identical else f"DIFFERENT: {self.mismatch}"
        out = [
            ("kernel", f"{self.kernel} ({self.kind}, {self.chunks} chunks, {self.schedule})"),
            ("sequential (median)", f"{self.sequential_median * 1e3:.3f} ms"),
            (f"engine, {self.workers} workers (median)", f"{self.engine_median * 1e3:.3f} ms"),
            ("speedup", f"{self.speedup:.2f}x"),
            ("parallel efficiency", f"{self.efficiency:.0%}"),
            ("GB/s (sequential / engine)", f"{self.sequential_gbps:.2f} / {self.engine_gbps:.2f}"),
            ("results", check),
        ]
        if self.max_abs_diff is not None:
            out.append(("vs whole-array reduce", f"max abs diff {self.max_abs_diff:.3g}"))
        out += [("note", n) for n in self.notes]
        return out

    def __str__(self) -> str:
        width = max(len(k) for k, _ in self.rows())
        return "\n".join(f"{k:<{width}}  {v}" for k, v in self.rows())

    __repr__ = __str__

    def _repr_html_(self) -> str:
        body = "".join(
            f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
            f"<td style='text-align:left'>{html.escape(v)}</td></tr>"
            for k, v in self.rows()
        )
        return f"<table>{body}</table>"

    def plot(self, ax=None):
        """Bar chart of the two median times.

        Parameters
        ----------
        ax : matplotlib.axes.Axes, optional
            Where to draw; None: a new figure.

        Returns
        -------
        matplotlib.axes.Axes

        Raises
        ------
        ImportError
            matplotlib is not installed (``pip install 'shmarray[plot]'``).
        """
        try:
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise ImportError("plot() needs matplotlib: pip install 'shmarray[plot]'") from exc
        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3))
        labels = ["sequential", f"engine ({self.workers} workers)"]
        times = [self.sequential_median * 1e3, self.engine_median * 1e3]
        bars = ax.bar(labels, times, color=["#999999", "#1f77b4"])
        ax.bar_label(bars, [f"{t:.2f} ms" for t in times])
        ax.set_ylabel("median time (ms)")
        ax.set_title(
            f"{self.kernel}: {self.speedup:.2f}x" + ("" if self.identical else " (RESULTS DIFFER)")
        )
        return ax


def poison(dtype: np.dtype) -> object:
    """A value no kernel computes by accident, for ``dtype``.

    >>> poison(np.dtype("f8")), poison(np.dtype("i2")), poison(np.dtype("u1"))
    (nan, -32768, 255)
    """
    kind = dtype.kind
    if kind in "fc":
        return np.nan
    if kind == "i":
        return int(np.iinfo(dtype).min)
    if kind == "u":
        return int(np.iinfo(dtype).max)
    if kind in "mM":
        return np.array("NaT", dtype)
    return True  # bool: the best there is


def write_only(kernel: Callable, originals: list[np.ndarray], args: tuple) -> list[int]:
    """The arrays ``kernel`` writes without reading: run it from the
    originals and again with one array poisoned; if nothing else changes and
    that array differs only where it was left alone, the kernel never read
    it.  One extra sequential run per array."""
    base = [a.copy() for a in originals]
    kernel(*base, *args)
    found = []
    for i, o in enumerate(originals):
        if o.size == 0 or o.dtype.kind == "b":
            continue
        trial = [a.copy() for a in originals]
        trial[i][...] = poison(o.dtype)
        try:
            kernel(*trial, *args)
        except Exception:
            continue
        others = all(np.all(same(b, t)) for j, (b, t) in enumerate(zip(base, trial)) if j != i)
        untouched = same(base[i], o) & same(trial[i], np.full_like(o, poison(o.dtype)))
        if others and np.all(same(base[i], trial[i]) | untouched):
            found.append(i)
    return found


def compare(
    eng,
    kernel: Callable,
    *arrays: np.ndarray,
    args=(),
    halo: int = 0,
    chunks=None,
    schedule: str = "static",
    repeat: int = 5,
    reduce: bool = False,
    combine: Callable = operator.add,
) -> Comparison:
    originals = [np.asarray(a) for a in arrays]
    private = [a.copy() for a in originals]
    shared = [eng.from_numpy(a) for a in originals]
    run_args = tuple(args)
    opts = dict(args=run_args, halo=halo, chunks=chunks, schedule=schedule)
    seq_value = eng_value = None
    outputs = [] if reduce else write_only(kernel, originals, run_args)

    def reset(arrays):
        # Before every run, from the originals: outputs to the poison value.
        def run():
            for i, (a, o) in enumerate(zip(arrays, originals)):
                if i in outputs:
                    a[...] = poison(o.dtype)
                else:
                    np.copyto(a, o)

        return run

    def sequential():
        nonlocal seq_value
        seq_value = kernel(*private, *run_args)

    def engine():
        nonlocal eng_value
        # Never race-checked (SHMARRAY_CHECK): a mismatch is this report's.
        if reduce:
            eng_value = eng._unchecked(kernel, shared, True, dict(opts, combine=combine))
        else:
            eng._unchecked(kernel, shared, False, dict(opts))

    try:
        prepare = {"sequential": reset(private), "engine": reset(shared)}
        # One untimed round warms both sides up (compiling, attaching).
        interleaved({"sequential": sequential, "engine": engine}, 1, prepare=prepare)
        times = interleaved(
            {"sequential": sequential, "engine": engine}, max(int(repeat), 1), prepare=prepare
        )
        seq_t, eng_t = times["sequential"], times["engine"]
        # The results checked are those of the last round of each side.
        from shmarray.partition import plan_for

        parts = plan_for(
            originals[0].shape[0], chunks, halo, eng.workers, schedule == "dynamic"
        ).chunks
        result = Comparison(
            kernel=getattr(kernel, "__name__", repr(kernel)),
            workers=eng.workers,
            schedule=schedule,
            chunks=len(parts),
            kind="reduce" if reduce else "map",
            sequential_s=seq_t,
            engine_s=eng_t,
            nbytes=sum(a.nbytes for a in originals),
            identical=True,
        )
        if outputs:
            result.notes.append(
                f"array{'s' if len(outputs) > 1 else ''} "
                f"{', '.join(map(str, outputs))} (only written by the kernel) "
                f"started from a poison value on both sides"
            )
        if reduce:
            # The engine combines per-chunk values in chunk order: the same
            # computed sequentially, chunk by chunk, must match bit for bit.
            expected = functools.reduce(
                combine,
                [
                    kernel(*[a[lo - halo : hi + halo] for a in originals], *run_args)
                    for lo, hi in parts
                ],
            )
            result.identical = identical(expected, eng_value)
            if not result.identical:
                result.mismatch = f"sequential by chunks {expected!r}, engine {eng_value!r}"
            try:
                result.max_abs_diff = float(
                    np.max(
                        np.abs(
                            np.asarray(seq_value, dtype=float) - np.asarray(eng_value, dtype=float)
                        )
                    )
                )
            except (TypeError, ValueError):
                result.max_abs_diff = None
        else:
            for i, (p, s) in enumerate(zip(private, shared)):
                diff = first_difference(p, np.asarray(s))
                if diff:
                    result.identical = False
                    result.mismatch = f"array {i}: {diff}"
                    result.notes.append(
                        "rows that differ at chunk edges usually mean a "
                        "chunk-boundary bug: a stencil needs halo=, a kernel "
                        "using its local index as a global one needs "
                        "shmarray.row_offset in args"
                    )
                    break
        return result
    finally:
        shared.clear()  # the engine's copies go now, not when the closures do
