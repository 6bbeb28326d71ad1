"""Workloads and peers shared by the pytest-benchmark suites and the figures
script, so both measure exactly the same thing."""

from __future__ import annotations

import gc
import mmap
import statistics
import time

import numba
import numpy as np
from numba import njit, prange

from kernels.elementwise import triad


@njit(parallel=True, cache=True)
def triad_prange(a, b, c, s):
    for i in prange(a.shape[0]):
        a[i] = b[i] + s * c[i]


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


def interleaved(fns: dict, repeat: int, inner: int = 1, pause: float = 0.0) -> dict:
    """Median seconds per call of each function, measured in alternating
    order round after round so drift on a shared machine hits all alike."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeat):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            fn = fns[name]
            gc.disable()
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            elapsed = (time.perf_counter() - t0) / inner
            gc.enable()
            times[name].append(elapsed)
            if pause:
                time.sleep(pause)
    return {name: statistics.median(ts) for name, ts in times.items()}


def machine_info() -> dict:
    """CPU model, usable CPUs, versions and page settings, for reports."""
    import platform

    import shmarray
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "usable_cpus": shmarray.pool.usable_cpus(),
            "python": platform.python_version(), "numpy": np.__version__,
            "numba": numba.__version__, "transparent_hugepage": huge_pages()}
