"""Workloads and peers shared by the pytest-benchmark suites and the figures
script, so both measure exactly the same thing."""

from __future__ import annotations

import json
import mmap

import numba
import numpy as np
from numba import njit

from shmarray import timing
from shmarray.kernels.elementwise import triad
from shmarray.report.peers import triad_prange
from shmarray.timing import machine, ratios, summary

__all__ = [
    "TriadPair",
    "interleaved",
    "machine_info",
    "noop",
    "nothing",
    "ratios",
    "rounds",
    "small_pages_copy",
    "summary",
    "triad_prange",
]


@njit(cache=True)
def noop(x):
    pass


def nothing():
    return None


def small_pages_copy(a: np.ndarray) -> np.ndarray:
    """A private copy of ``a`` on 4 KiB pages, like shared memory on a
    kernel whose tmpfs has no transparent huge pages."""
    m = mmap.mmap(-1, max(a.nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_NOHUGEPAGE)
    out = np.frombuffer(m, a.dtype, count=a.size).reshape(a.shape)
    out[...] = a
    return out


def huge_pages() -> dict:
    """The kernel's transparent-huge-page settings (Linux)."""
    out = {}
    for name in ("enabled", "shmem_enabled"):
        try:
            with open(f"/sys/kernel/mm/transparent_hugepage/{name}") as f:
                out[name] = f.read().split("[")[1].split("]")[0]
        except (OSError, IndexError):
            out[name] = None
    return out


class TriadPair:
    """STREAM triad over ``n`` float64: engine map vs numba prange, each on
    its own arrays with the same values.  prange runs on ordinary NumPy
    arrays (which the kernel may back with transparent huge pages) and on a
    4 KiB-page copy, the page size shared memory gets here."""

    def __init__(self, eng, n: int, threads: int):
        numba.set_num_threads(threads)
        rng = np.random.default_rng(0)
        self.eng = eng
        self.b = eng.from_numpy(rng.random(n))
        self.c = eng.from_numpy(rng.random(n))
        self.a = eng.empty(n)
        self.pb, self.pc = np.array(self.b), np.array(self.c)
        self.pa = np.empty(n)
        self.sb, self.sc = small_pages_copy(self.b), small_pages_copy(self.c)
        self.sa = small_pages_copy(self.pa)
        self.engine()
        self.prange()
        self.prange_small_pages()

    def prange_small_pages(self):
        triad_prange(self.sa, self.sb, self.sc, 3.0)

    def engine(self):
        self.eng.map(triad, self.a, self.b, self.c, args=(3.0,))

    def prange(self):
        triad_prange(self.pa, self.pb, self.pc, 3.0)

    def prange_on_shared(self):
        triad_prange(self.a, self.b, self.c, 3.0)

    def identical(self) -> bool:
        return bool(np.array_equal(self.a, self.pa) and np.array_equal(self.a, self.sa))


def machine_info() -> dict:
    """The report's machine description, plus the page settings."""
    return {**machine(), "transparent_hugepage": huge_pages()}


def rounds(
    fns: dict, repeat: int, pause: float = 0.02, prepare: dict | None = None
) -> dict[str, list[float]]:
    """Seconds per call of each function, one entry per round
    (``shmarray.timing.interleaved``; ``fns`` maps a name to ``(function,
    calls)``).  ``pause`` lets spinning threads and workers of the side that
    just ran go to sleep before the other side runs."""
    return timing.interleaved(fns, repeat, pause=pause, prepare=prepare)


def repeated(fn, calls: int) -> tuple:
    """``(run, calls)`` for ``rounds``: ``run()`` calls ``fn`` ``calls``
    times (a loop of short calls timed as one)."""

    def run():
        for _ in range(calls):
            fn()

    return run, calls


def interleaved(fns: dict, repeat: int, pause: float = 0.0, inner: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, timed ``inner`` calls at a
    time (``shmarray.timing.interleaved``)."""
    loops = {name: repeated(f, inner) for name, f in fns.items()}
    return timing.medians(timing.interleaved(loops, repeat, pause=pause))


def save(figures: dict, path: str | None) -> None:
    """Write a figure script's results as JSON (``--json PATH``), if asked."""
    if path:
        with open(path, "w") as f:
            json.dump(figures, f, indent=2)
            f.write("\n")
