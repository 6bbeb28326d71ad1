"""One way to time things side by side, and one rule for "identical":
shared by ``Engine.compare``, ``shmarray bench`` and the scripts in
``bench/``, so every figure shmarray prints is measured and checked alike.

Methods run in rounds whose order alternates (A B, B A, A B, ...), so the
drift of a shared machine (another tenant, a CPU clock change) hits all of
them alike; every figure keeps each round's time, so medians and spread
come from the same data.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def interleaved(
    fns: dict[str, Any],
    repeat: int,
    *,
    pause: float = 0.0,
    prepare: dict[str, Callable[[], Any]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each function, one entry per round.

    ``fns`` maps a name to a function, or to ``(function, calls)`` when one
    call of the function makes ``calls`` calls of what is measured (a loop
    of maps).  ``prepare[name]``, if given, runs untimed before each timed
    call (resetting inputs, say).  ``pause`` seconds pass after each call,
    so the spinning threads or workers of the side that just ran go to
    sleep before the other side runs.  The garbage collector is off while
    a call is timed.

    >>> t = interleaved({"a": lambda: None, "b": (lambda: None, 10)}, 3)
    >>> sorted(t), len(t["a"])
    (['a', 'b'], 3)
    """
    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeat):
        for name in names if r % 2 == 0 else names[::-1]:
            fn = fns[name]
            fn, calls = fn if isinstance(fn, tuple) else (fn, 1)
            if prepare and name in prepare:
                prepare[name]()
            enabled = gc.isenabled()
            gc.disable()
            try:
                t0 = time.perf_counter()
                fn()
                out[name].append((time.perf_counter() - t0) / calls)
            finally:
                if enabled:
                    gc.enable()
            if pause:
                time.sleep(pause)
    return out


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(t) for name, t in times.items()}


def summary(times: list[float]) -> dict[str, float]:
    """Median, quartiles and extremes of one method's round times.

    >>> summary([1.0, 2.0, 3.0])["median"]
    2.0
    """
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {
        "median": statistics.median(times),
        "q1": q[0],
        "q3": q[2],
        "min": min(times),
        "max": max(times),
    }


def ratios(a: list[float], b: list[float]) -> dict[str, float]:
    """The per-round ratio a/b: its median, quartiles and extremes."""
    return summary([x / y for x, y in zip(a, b)])


def machine() -> dict:
    """The machine every figure names: CPU model, usable CPUs, OS, memory and
    the versions that matter."""
    import numba

    from shmarray import options

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    versions = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
    }
    for mod in ("joblib", "dask", "distributed", "matplotlib", "shmarray"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    return {
        "cpu": cpu,
        "usable_cpus": options.usable_cpus(),
        "os": platform.platform(),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "versions": versions,
    }


# -- identical -------------------------------------------------------------------


def same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise equality, NaN equal to NaN."""
    if a.dtype.kind in "fc":
        return (a == b) | (np.isnan(a) & np.isnan(b))
    return a == b


def identical(a: Any, b: Any) -> bool:
    """The one rule: equal values, element for element, NaN equal to NaN;
    tuples compared item by item; None only equals None.

    >>> identical((1.0, np.array([np.nan])), (1.0, np.array([np.nan])))
    True
    >>> identical(np.zeros(2), np.zeros(3)), identical(None, 0)
    (False, False)
    """
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
    a, b = np.asarray(a), np.asarray(b)
    try:
        return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc" and b.dtype.kind in "fc"))
    except TypeError:
        return bool(np.array_equal(a, b))


def first_difference(a: np.ndarray, b: np.ndarray, names=("sequential", "engine")) -> str:
    """Where ``a`` and ``b`` first differ, in words; "" if they do not."""
    if a.shape != b.shape:
        return f"shapes {a.shape} and {b.shape}"
    bad = np.argwhere(~same(a, b))
    if not len(bad):
        return ""
    rows = np.unique(bad[:, 0]) if bad.ndim == 2 and bad.shape[1] else bad
    first = tuple(int(i) for i in bad[0])
    return (
        f"{len(bad)} element(s) differ, first at index {first} "
        f"({names[0]} {a[first].item()!r}, {names[1]} {b[first].item()!r}); rows "
        f"{', '.join(str(int(r)) for r in rows[:8])}"
        f"{' ...' if len(rows) > 8 else ''}"
    )
