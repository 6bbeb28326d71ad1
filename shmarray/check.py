"""The race check: ``Engine.check``, ``map(..., check=True)`` and
``SHMARRAY_CHECK=1``.

A kernel written for a whole array runs on chunks of it.  The commonest
bug is one that raises nothing: an index off by one that writes the first
row of the next chunk, a global index used on a chunk's local view, an
in-place stencil that reads the halo its neighbour is rewriting, a write
into the ghost cells.  The result is slightly wrong, and differently wrong
at another worker count.

How the check sees it.  Every chunk runs, in a worker, on private copies
of its slices (``_Probe``): each copy has guard cells on both sides of the
split axis, so a write past the end of the chunk's view lands in them, not
in another chunk's memory.  Then, element by element and exactly (not at a
page's granularity: rows need not be page-aligned):

* **written outside its rows**: any cell the chunk does not own (its halo,
  the ghost cells, the guard cells past the end of its view) whose bytes
  changed.  A write of the value already there changes nothing, so each
  chunk runs twice: on the data, then on data whose cells outside its rows
  are perturbed in their lowest bit; a write in either run is seen.
* **read what another chunk writes**: a chunk's halo cells that another
  chunk writes (its edge rows' written cells, seen the same way) are
  nudged (a float by 2**-9 of itself, both ways: a flipped lowest bit is
  often rounded away) in further runs; if the chunk's own rows come out
  different, it read them, and the first such cell is found by bisection.
* **depends on the chunking**: the chunks' results, put together, against
  the kernel run once over the whole array (one chunk, on a private copy
  too): any difference inside the interior.

Nothing the check runs touches the caller's arrays: it reads them, and
writes only its own copies (the reference run's too).  ``map(...,
check=True)`` then runs the real map when the kernel is clean, and copies
the reference run's arrays in (what a sequential run leaves) when it is not.

What it cannot judge, it says (``CheckReport.judged``): arrays that share
memory (their copies would not), and a kernel that raised on the data.  A
worker that dies in a probe (a write far past the guard cells) is a finding.
A plain-Python kernel is judged like a compiled one, slowly.

Cost: about ``2 + 2/workers`` kernel runs per cell and as many copies;
measured in ``bench/check_figures.py``.  A map without ``check`` runs
nothing of this.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shmarray.descriptors import kernel_payload, load_kernel, row_offset, worker_id

# Guard cells on each side of a private copy, along the split axis: a
# kernel writing up to this far past the end of its view is caught
# exactly.  Past them lies a page no process may touch (``_guarded``): a
# kernel reading or writing further dies there, and the check says so,
# rather than writing the worker's heap.
GUARD = 8

# The kinds of problems, as the report names them.
OUTSIDE = "written outside its rows"
READ = "read what another chunk writes"
CHUNKING = "depends on the chunking"
SHARED_ARG = "wrote an argument every chunk shares"
CRASHED = "crashed"


@dataclass(frozen=True)
class Problem:
    """One problem the check found.

    Attributes
    ----------
    kind : str
        "written outside its rows", "read what another chunk writes",
        "depends on the chunking", "wrote an argument every chunk shares",
        or "crashed".
    array : str
        Which array: "array 0" (the first after the kernel), or "args[2]".
    index : tuple of int or None
        The first offending element's index in the caller's array (past its
        end for a write past the end of the last chunk's view).
    rows : (int, int)
        The rows (along the split axis) of the chunk that did it.
    other : (int, int) or None
        For a conflict, the rows of the other chunk.
    where : str
        For a write outside its rows: "a neighbour's rows", "ghost or halo
        cells", or "past the end of its view"; else "".
    count : int
        How many elements of that array the chunk got wrong this way.
    """

    kind: str
    array: str
    index: tuple[int, ...] | None
    rows: tuple[int, int]
    other: tuple[int, int] | None = None
    where: str = ""
    count: int = 1

    def __str__(self) -> str:
        lo, hi = self.rows
        at = "" if self.index is None else f" at {_fmt(self.index)}"
        if self.kind == OUTSIDE:
            return (
                f"rows {lo}:{hi} wrote {self.array}{at}, outside its rows "
                f"({self.where}; {self.count} element(s))"
            )
        if self.kind == READ:
            olo, ohi = self.other or (0, 0)
            return (
                f"rows {lo}:{hi} read {self.array}{at}, which rows {olo}:{ohi} "
                f"write in the same map: its result depends on timing"
            )
        if self.kind == CHUNKING:
            return (
                f"{self.array}{at} (in rows {lo}:{hi}) differs from the kernel run "
                f"once over the whole array ({self.count} element(s)): the result "
                f"depends on the chunking"
            )
        if self.kind == SHARED_ARG:
            olo, ohi = self.other or (0, 0)
            return (
                f"rows {lo}:{hi} wrote {self.array}{at}, which rows {olo}:{ohi} write "
                f"too (every chunk gets it whole): they race on it"
            )
        return f"rows {lo}:{hi}: {self.where}"


def _fmt(index: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(i) for i in index) + "]"


@dataclass
class CheckReport:
    """What ``Engine.check`` found: ``ok`` when the kernel is clean.

    Attributes
    ----------
    ok : bool
        The check judged the kernel and found no problem.
    problems : list of Problem
        Each problem, with the array, the first offending element's index,
        the chunk's rows, and for a conflict the other chunk.
    judged : bool
        False when the check could not judge the kernel (``reason`` says
        why); then ``ok`` is False too.
    reason : str
        Why it could not judge, or "".
    kernel : str
        The kernel's name.
    chunks : list of (int, int)
        The chunks it checked.
    """

    kernel: str
    chunks: list[tuple[int, int]]
    problems: list[Problem] = field(default_factory=list)
    judged: bool = True
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.judged and not self.problems

    def __str__(self) -> str:
        head = f"race check of {self.kernel} over {len(self.chunks)} chunk(s): "
        if not self.judged:
            return head + f"could not judge: {self.reason}"
        if not self.problems:
            return head + "no problem found"
        lines = [head + f"{len(self.problems)} problem(s)"]
        lines += [f"  {p.kind}: {p}" for p in self.problems]
        return "\n".join(lines)

    def __repr__(self) -> str:
        state = "ok" if self.ok else "not judged" if not self.judged else "problems"
        return f"<CheckReport {self.kernel}: {state}, {len(self.problems)} problem(s)>"


# -- in the workers ---------------------------------------------------------------


class _Spec:
    """What a probe needs besides the chunk's views (pickled to the workers
    with the check: small)."""

    def __init__(
        self,
        n_arrays,
        halo,
        axis,
        shapes,
        boundary,
        arg_arrays,
        phase,
        targets=None,
        guard=GUARD,
        only=None,
    ):
        self.n_arrays = n_arrays
        self.guard = guard  # guard cells on each side, along axis
        self.only = only  # the chunks (by first row) to probe; None: all
        self.halo = halo
        self.axis = axis
        self.shapes = shapes  # the caller's arrays' shapes (all alike along axis)
        self.boundary = boundary  # ghost cells on every axis (owned: interior only)
        self.arg_arrays = arg_arrays  # positions in kargs of arrays (copied privately)
        self.phase = phase  # "chunks", "whole", "reads" or "release"
        self.targets = targets or {}  # phase "reads": {lo: [(array, cells, other rows)]}


_PAGE = mmap.PAGESIZE
_mprotect: Any
try:  # mprotect, from the C library already in the process
    _libc = ctypes.CDLL(None, use_errno=True)
    _mprotect = _libc.mprotect
    _mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    _mprotect.restype = ctypes.c_int
except (OSError, AttributeError):  # pragma: no cover - no libc mprotect here
    _mprotect = None


def _guarded(shape: tuple, dtype: np.dtype) -> np.ndarray:
    """A zeroed C-order array that ends right before a page no access is
    allowed to (PROT_NONE), so a kernel running past its end dies at once;
    a plain zeroed array where mprotect is not to be had."""
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if _mprotect is None or nbytes == 0:
        return np.zeros(shape, dtype)
    data = -(-nbytes // _PAGE) * _PAGE
    mm = mmap.mmap(-1, data + _PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    if _mprotect(base + data, _PAGE, mmap.PROT_NONE if hasattr(mmap, "PROT_NONE") else 0) != 0:
        return np.zeros(shape, dtype)
    start = data - nbytes  # the array's last byte is the guard page's neighbour
    return np.frombuffer(mm, dtype=dtype, count=nbytes // dtype.itemsize, offset=start).reshape(
        shape
    )


# Bytes of private buffers a worker keeps between checks (``_Pool``): a
# loop that checks a kernel again and again (a test suite) reuses them; a
# script checked once (SHMARRAY_CHECK=1) holds no more than this.
POOL_LIMIT = 256 << 20


class _Pool:
    """A worker's private buffers, kept from one run of a check to the
    next and, up to ``POOL_LIMIT`` bytes, from one check to the next: the
    first touch of fresh pages costs 6 to 12 times a copy into warm ones
    on the reference VM (2048^2 float64: 19-21 ms against 1.6-3.4 ms),
    and a check runs the kernel several times on the same shapes."""

    def __init__(self) -> None:
        self.free: dict[tuple, list[np.ndarray]] = {}
        self.held = 0  # bytes of the buffers in ``free``

    def take(self, shape: tuple, dtype: np.dtype) -> np.ndarray:
        kept = self.free.get((shape, dtype.str))
        if kept:
            buf = kept.pop()
            self.held -= buf.nbytes
            return buf
        return _guarded(shape, dtype)

    def give(self, buffers: list) -> None:
        for b in buffers:
            self.free.setdefault((b.shape, b.dtype.str), []).append(b)
            self.held += b.nbytes

    def trim(self, keep: int = POOL_LIMIT) -> None:
        """Drop buffers, oldest shapes first, until at most ``keep`` bytes
        are held."""
        for key in list(self.free):
            if self.held <= keep:
                return
            for b in self.free.pop(key):
                self.held -= b.nbytes


_POOL = _Pool()


def _lsb_byte(dtype: np.dtype) -> int:
    """Which byte of an element holds its lowest bit."""
    little = dtype.byteorder == "<" or (dtype.byteorder in "=|" and sys.byteorder == "little")
    return 0 if little else dtype.itemsize - 1


def _perturb(buf: np.ndarray) -> None:
    """Flip the lowest bit of every element of ``buf`` (a view): one ulp
    for a float, one for an integer, the other for a bool.  A value a
    kernel reads stays plausible; a write of any value but that one is
    seen."""
    b = buf.view(np.uint8) if buf.flags.c_contiguous else None
    if b is not None and b.size:
        b.reshape(buf.shape + (buf.dtype.itemsize,))[..., _lsb_byte(buf.dtype)] ^= 1
        return
    flat = np.ascontiguousarray(buf)
    _perturb(flat)
    buf[...] = flat


def _nudge(buf: np.ndarray, sign: int) -> None:
    """Change every element of ``buf`` (a view) enough that a kernel reading
    it computes something else (a flipped lowest bit is often rounded
    away): a float by ``sign`` * 2**-9 of itself (2**-9 for zero), an
    integer by ``sign``, a bool to the other; anything else gets its
    lowest bit flipped."""
    kind = buf.dtype.kind
    if kind in "fc":
        size = np.abs(buf.real if kind == "c" else buf)
        buf += sign * np.where(size > 0, size, 1.0) * 2.0**-9
    elif kind in "iu":
        buf += buf.dtype.type(1) if sign > 0 else buf.dtype.type(-1 % (1 << 8 * buf.itemsize))
    elif kind == "b":
        np.logical_not(buf, out=buf)
    else:
        _perturb(buf)


_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Where two arrays of one shape and dtype differ bitwise (a NaN's
    payload counts; -0.0 is not 0.0)."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    n = a.dtype.itemsize
    if n in _UINT:
        return a.view(_UINT[n]) != b.view(_UINT[n])
    return np.any(
        a.view(np.uint8).reshape(a.shape + (n,)) != b.view(np.uint8).reshape(b.shape + (n,)),
        axis=-1,
    )


class _Layout:
    """Where one array's cells lie in a chunk's padded private copy: its
    view, the rows it owns, and, as lists of slices (so that nothing
    costs a pass over the whole array): the cells outside its rows (guard
    cells, halo, ghost cells) and its edge rows (the halo of a
    neighbour).  The arrays of a map share their length along the split
    axis only."""

    def __init__(self, shape: tuple, spec: _Spec, m: int):
        ax, h, g = spec.axis, spec.halo, spec.guard
        padded = list(shape)
        padded[ax] += 2 * g
        self.padded = tuple(padded)
        full = [slice(None)] * len(padded)

        def along(sl: slice, base=full) -> tuple:
            out = list(base)
            out[ax] = sl
            return tuple(out)

        self.inner = along(slice(g, g + m))
        # With ghost cells on every axis (boundary=), the chunk owns the
        # interior of the other axes only.
        interior = list(full)
        if spec.boundary:
            interior = [slice(h, n - h) for n in padded]
        self.owned = along(slice(g + h, g + m - h), interior)
        self.own_rows = along(slice(g + h, g + m - h))
        self.outside = [along(slice(0, g + h)), along(slice(g + m - h, padded[ax]))]
        if spec.boundary and h:
            for d, n in enumerate(padded):
                if d != ax:
                    for sl in (slice(0, h), slice(n - h, n)):
                        region = list(self.own_rows)
                        region[d] = sl
                        self.outside.append(tuple(region))
        self.edges = []
        if h:
            self.edges = [
                along(slice(g + h, g + 2 * h), interior),
                along(slice(g + m - 2 * h, g + m - h), interior),
            ]


def _first(diff: np.ndarray, region: tuple) -> tuple[tuple[int, ...], int] | None:
    """The first true cell of ``diff`` (over ``region`` of a padded copy),
    as a padded index, and how many are true; None if none."""
    count = int(np.count_nonzero(diff))
    if not count:
        return None
    at = np.argwhere(diff)[0]
    return tuple(int(i) + (sl.start or 0) for i, sl in zip(at, region)), count


class _Chunk:
    """One chunk's private copies, and where their cells lie."""

    def __init__(self, views: tuple, spec: _Spec, first: int):
        self.spec = spec
        self.first = first  # the global row (along axis) of the view's first
        self.m = views[0].shape[spec.axis]  # rows in the view
        self.lo, self.hi = first + spec.halo, first + self.m - spec.halo
        self.views = views
        self.layouts = [_Layout(v.shape, spec, self.m) for v in views]

    def copies(self) -> tuple[list, list]:
        """Padded copies of the views (``_POOL``'s buffers: their guard
        cells hold whatever they held; what is compared is read first):
        (the buffers, their views as the kernel gets them).  Give them
        back to ``_POOL`` when done."""
        bufs, inners = [], []
        for v, lay in zip(self.views, self.layouts):
            buf = _POOL.take(lay.padded, v.dtype)
            buf[lay.inner] = v
            bufs.append(buf)
            inners.append(buf[lay.inner])
        return bufs, inners

    def index(self, padded_index) -> tuple[int, ...]:
        """A padded copy's index as the caller's array's."""
        out = [int(i) for i in padded_index]
        out[self.spec.axis] += self.first - self.spec.guard
        return tuple(out)

    def where(self, k: int, padded_index) -> str:
        """What a cell of array ``k`` outside the chunk's rows is."""
        spec = self.spec
        row = padded_index[spec.axis]
        if not spec.guard <= row < spec.guard + self.m:
            return "past the end of its view"
        g = self.index(padded_index)
        ax, h = spec.axis, spec.halo
        inside = all(
            h <= i < n - h if (d == ax or spec.boundary) else True
            for d, (i, n) in enumerate(zip(g, spec.shapes[k]))
        )
        return "a neighbour's rows" if inside else "ghost or halo cells"


class _Probe:
    """The kernel of a check's reduce (see the module docstring): runs the
    user's kernel on private copies of one chunk, in a worker, and returns
    what it did as a one-item list.  ``(*views, row, worker, *outputs,
    *kargs)``: the chunk's views, its first row and worker (placeholders),
    the check's own shared arrays (the chunks write their rows' results
    there; the whole run compares its own with them), and the kernel's own
    arguments."""

    def __init__(self, kernel, spec: _Spec, payload: bytes | None = None):
        self.kernel = kernel
        self.spec = spec
        self.__name__ = f"check of {getattr(kernel, '__name__', 'kernel')}"
        # The kernel travels as the engine ships kernels (by name when
        # importable, else by value), and is loaded once per process.
        self._payload = payload if payload is not None else kernel_payload(kernel)

    def __reduce__(self):
        return _probe, (self._payload, self.spec, self.__name__)

    def run(self, inners: list, kargs: tuple) -> list:
        """The kernel on private copies, its args' arrays copied too (a
        write to one must not reach the caller's); those copies."""
        args = list(kargs)
        copies = []
        for i in self.spec.arg_arrays:
            args[i] = np.array(args[i], copy=True)
            copies.append(args[i])
        self.kernel(*inners, *args)
        return copies

    def __call__(self, *everything) -> list:
        spec = self.spec
        n = spec.n_arrays
        views = everything[:n]
        first, wid = everything[n], everything[n + 1]
        outputs = everything[n + 2 : 2 * n + 2]
        kargs = tuple(
            first if a is row_offset else wid if a is worker_id else a
            for a in everything[2 * n + 2 :]
        )
        if spec.phase == "release":  # the check is over: what it keeps
            _POOL.trim()
            return []
        if spec.only is not None and first + spec.halo not in spec.only:
            return []
        c = _Chunk(views, spec, first)
        out: dict[str, Any] = {
            "rows": (c.lo, c.hi),
            "outside": [],
            "edges": [],
            "reads": [],
            "arg_writes": [],
            "chunking": [],
        }
        if spec.phase == "reads":
            out["reads"] = self.reads(c, kargs, outputs, spec.targets.get(c.lo, ()))
            return [out]
        if spec.phase == "whole":
            # The kernel once over the whole array, against the chunks'
            # results put together (in ``outputs``), inside the interior.
            bufs, inners = c.copies()
            self.run(inners, kargs)
            for k, (buf, lay, pieces) in enumerate(zip(bufs, c.layouts, outputs)):
                mine = buf[lay.owned]
                theirs = pieces[_global(c, lay.owned)]
                found = _first(_changed(mine, theirs), lay.owned)
                if found is not None:
                    out["chunking"].append((k, c.index(found[0]), found[1]))
            _POOL.give(bufs)
            return [out]
        # Run 1, on the data: its result, and its writes outside its rows.
        bufs, inners = c.copies()
        watched = [lay.outside + lay.edges for lay in c.layouts]
        before = [[buf[r].copy() for r in regions] for buf, regions in zip(bufs, watched)]
        args_before = [np.array(kargs[i], copy=True) for i in spec.arg_arrays]
        args_after = self.run(inners, kargs)
        written = [
            [_changed(buf[r], b) for r, b in zip(regions, was)]
            for buf, regions, was in zip(bufs, watched, before)
        ]
        sel = (slice(None),) * spec.axis + (slice(c.lo, c.hi),)
        for dest, buf, lay in zip(outputs, bufs, c.layouts):
            dest[sel] = buf[lay.own_rows]
        _POOL.give(bufs)
        for j, a, b in zip(spec.arg_arrays, args_after, args_before):
            # An array in args reaches every chunk whole: chunks may write
            # parts of it (their rows of an output), never the same cell.
            diff = _changed(a, b)
            if diff.any():
                out["arg_writes"].append((j, np.packbits(diff.ravel()), diff.shape))
        # Run 2, on data flipped outside its rows and in its edge rows: a
        # write there of any value shows, even of the value already there.
        bufs, inners = c.copies()
        for buf, regions in zip(bufs, watched):
            for r in regions:
                _perturb(buf[r])
        before = [[buf[r].copy() for r in regions] for buf, regions in zip(bufs, watched)]
        self.run(inners, kargs)
        for k, (buf, lay, regions, was, w1) in enumerate(
            zip(bufs, c.layouts, watched, before, written)
        ):
            wrote = [x | _changed(buf[r], b) for r, b, x in zip(regions, was, w1)]
            hits = [_first(d, r) for d, r in zip(wrote, regions)]
            outside = [h for h in hits[: len(lay.outside)] if h is not None]
            if outside:
                at = min(h[0] for h in outside)
                count = sum(h[1] for h in outside)
                out["outside"].append((OUTSIDE, f"array {k}", c.index(at), c.where(k, at), count))
            for d, r in zip(wrote[len(lay.outside) :], regions[len(lay.outside) :]):
                cells = np.argwhere(d)
                if len(cells):
                    cells += [sl.start or 0 for sl in r]
                    cells[:, spec.axis] += c.first - spec.guard
                    out["edges"].append((k, cells))
        _POOL.give(bufs)
        return [out]

    def reads(self, c: _Chunk, kargs: tuple, outputs: tuple, targets) -> list:
        """Runs 3 and 4: nudge the chunk's halo cells that other chunks write
        (every such cell, of every array, at once; up, then down); if its own
        cells come out other than in run 1 (``outputs``: the chunks'
        results), it read one of them, and the first is found by bisection.
        [(array, global index, the other chunk's rows)]."""
        spec = self.spec
        # Every target cell, as (array, padded index, the other chunk).
        cells = []
        for k, found, other in targets:
            local = found.copy()
            local[:, spec.axis] += spec.guard - c.first
            cells += [(k, tuple(int(i) for i in at), other) for at in local]
        cells.sort()
        reference = [out[_global(c, lay.owned)] for out, lay in zip(outputs, c.layouts)]

        def differs(subset: list) -> bool:
            for sign in (1, -1):  # one way may be masked (a max, a clip)
                bufs, inners = c.copies()
                for k in {k for k, _, _ in subset}:
                    where = tuple(np.array([at for kk, at, _ in subset if kk == k]).T)
                    moved = bufs[k][where]
                    _nudge(moved, sign)
                    bufs[k][where] = moved
                self.run(inners, kargs)
                seen = any(
                    bool(_changed(b[lay.owned], r).any())
                    for b, lay, r in zip(bufs, c.layouts, reference)
                )
                _POOL.give(bufs)
                if seen:
                    return True
            return False

        if not cells or not differs(cells):
            return []
        lo, hi = 0, len(cells)  # the first cell whose nudge shows
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if differs(cells[lo:mid]):
                hi = mid
            else:
                lo = mid
        k, at, other = cells[lo]
        return [(k, c.index(at), other)]


def _global(c: _Chunk, region: tuple) -> tuple:
    """A region of chunk ``c``'s padded copy as the same cells of the
    caller's array."""
    axis, by = c.spec.axis, c.first - c.spec.guard
    return tuple(
        slice((sl.start or 0) + by, None if sl.stop is None else sl.stop + by) if d == axis else sl
        for d, sl in enumerate(region)
    )


_LOADED: dict[bytes, Any] = {}  # a worker's kernels, by payload (``_probe``)


def _probe(payload: bytes, spec: _Spec, name: str) -> _Probe:
    """A probe as a worker unpickles it: its kernel loaded once a process
    (a kernel sent by value would otherwise be compiled again each time)."""
    kernel = _LOADED.get(payload)
    if kernel is None:
        if len(_LOADED) > 64:
            _LOADED.clear()
        kernel = _LOADED[payload] = load_kernel(payload)
    probe = _Probe(kernel, spec, payload)
    probe.__name__ = name
    return probe


# -- in the caller ----------------------------------------------------------------

# SHMARRAY_CHECK=1: the first map of every kernel and signature in this
# process is checked; these are the ones checked (kept, with their kernels,
# up to FIRST_LIMIT: past it, nothing more is checked by the environment).
ENVIRONMENT = "SHMARRAY_CHECK"
FIRST_LIMIT = 4096
_seen: set = set()


def from_environment() -> bool:
    """Whether ``SHMARRAY_CHECK`` asks for checks (``1``, ``true``, ``yes``,
    ``on``); read when an engine is made."""
    return os.environ.get(ENVIRONMENT, "").strip().lower() in ("1", "true", "yes", "on")


def first(call) -> bool:
    """Whether ``call`` is the first of its kernel and signature (the
    kernel, the arrays' shapes, dtypes and strides, the halo, chunks, axis
    and boundary, and the types of its arguments) in this process."""
    job = call.job
    if type(job.kernel) is _Probe:
        return False  # a check's own maps are not checked in turn
    key = (
        job.kernel,
        tuple((a.shape, a.dtype.str, a.strides) for a in call.arrays),
        tuple(type(a) for a in call.args),
        job.halo,
        job.plan.chunks,
        job.axis,
        job.boundary,
    )
    try:
        if key in _seen or len(_seen) >= FIRST_LIMIT:
            return False
        _seen.add(key)
    except TypeError:  # a kernel that cannot be hashed: checked every time
        pass
    return True


def overlapping(arrays: tuple) -> tuple[int, int] | None:
    """The first pair of ``arrays`` that share memory, if any: their
    private copies would not, so the check cannot judge them."""
    for i in range(len(arrays)):
        for j in range(i + 1, len(arrays)):
            if np.shares_memory(arrays[i], arrays[j]):
                return i, j
    return None


def _concat(a: list, b: list) -> list:
    return a + b


def _shared_args(chunked: list, report: CheckReport) -> None:
    """Arrays in args: a cell two chunks write is a race between them."""
    written: dict[int, np.ndarray] = {}  # arg -> which chunk (index + 1) wrote each cell
    for k, r in enumerate(chunked):
        for j, packed, shape in r["arg_writes"]:
            mine = np.unpackbits(packed, count=int(np.prod(shape))).astype(bool).reshape(shape)
            by = written.setdefault(j, np.zeros(shape, np.int64))
            both = mine & (by > 0)
            if both.any():
                at = np.argwhere(both)[0]
                report.problems.append(
                    Problem(
                        SHARED_ARG,
                        f"args[{j}]",
                        tuple(int(i) for i in at),
                        r["rows"],
                        chunked[by[tuple(at)] - 1]["rows"],
                        count=int(both.sum()),
                    )
                )
            by[mine & (by == 0)] = k + 1


def run(eng, kernel, arrays: tuple, kargs: tuple, halo: int, chunks, boundary, axis: int):
    """Check ``kernel`` over ``arrays`` (already checked by the engine as a
    map's; ``boundary`` a ``boundary.Boundary`` or None): its CheckReport.
    Touches nothing of the caller's: the chunks run on private copies."""
    from shmarray import boundary as ghosts
    from shmarray.errors import KernelError, WorkerCrashedError
    from shmarray.partition import plan_for

    name = getattr(kernel, "__name__", type(kernel).__name__)
    n = arrays[0].shape[axis]
    parts = plan_for(n, chunks, halo, eng.workers, False).chunks
    if len(parts) == 1 and n - 2 * halo >= 2:
        parts = plan_for(n, 2, halo, eng.workers, False).chunks  # one boundary at least
    report = CheckReport(name, [(int(lo), int(hi)) for lo, hi in parts])
    pair = overlapping(arrays)
    if pair is not None:
        report.judged = False
        report.reason = (
            f"arrays {pair[0]} and {pair[1]} share memory; the check runs each chunk on "
            f"private copies, which would not"
        )
        return report
    base = list(arrays)  # read, never written: the chunks copy what they get
    if boundary is not None:  # ghost cells filled first, on copies
        base = []
        for a in arrays:
            b = eng.empty(a.shape, a.dtype)
            b[...] = a
            ghosts.fill(b, halo, boundary, axis)
            base.append(b)
    pieces = [eng.empty(a.shape, a.dtype) for a in arrays]  # the chunks' results
    arg_arrays = tuple(i for i, a in enumerate(kargs) if isinstance(a, np.ndarray) and a.ndim)
    shapes = tuple(a.shape for a in arrays)
    sizes = [hi - lo for lo, hi in parts]
    crashed: dict[int, tuple[int, int]] = {}  # first row -> rows, of chunks whose worker died

    def probe(phase: str, chunking, targets=None, guard=GUARD, only=None) -> list:
        spec = _Spec(
            len(arrays),
            halo,
            axis,
            shapes,
            boundary is not None,
            arg_arrays,
            phase,
            targets,
            guard,
            only,
        )
        got = eng.reduce(
            _Probe(kernel, spec),
            *base,
            args=(row_offset, worker_id, *pieces, *kargs),
            halo=halo,
            chunks=chunking,
            axis=axis,
            combine=_concat,
            errors="collect",
        )
        for (lo, hi), exc in got.failed:
            if isinstance(exc, WorkerCrashedError) and exc.exitcode not in _WILD:
                # Killed, or exited: the kernel's own doing (a test of
                # retries, say), not a wild access the check can judge.
                if not report.reason:
                    report.judged = False
                    report.reason = (
                        f"the worker died running the kernel on rows {lo}:{hi} ({exc}); "
                        f"a kernel that ends its worker cannot be checked"
                    )
            elif isinstance(exc, WorkerCrashedError):
                if phase == "chunks" and only is None:
                    crashed[lo] = (lo, hi)  # looked at again below, with more guard
                    continue
                report.problems.append(
                    Problem(
                        CRASHED,
                        "",
                        None,
                        (lo, hi),
                        where=f"the worker died running the kernel on these rows, even "
                        f"with a guard as long as the whole array past each end of its "
                        f"view: {exc}",
                    )
                )
            elif not report.reason:
                report.judged = False
                kind = type(exc).__name__ if not isinstance(exc, KernelError) else "an error"
                report.reason = f"the kernel raised {kind} on rows {lo}:{hi}: {exc}"
        return got.value or []

    try:
        _judge(report, probe, sizes, n, halo, axis, parts, crashed)
    finally:
        probe("release", max(1, min(eng.workers, n - 2 * halo)))  # one chunk a worker
    return report


# How a worker dies reaching memory it may not: a kernel that reads or
# writes far past its view (the check's guard page included).
_WILD = (-signal.SIGSEGV, -signal.SIGBUS)


def _judge(report: CheckReport, probe, sizes, n: int, halo: int, axis: int, parts, crashed):
    """The check's phases (see ``run``)."""
    chunked = probe("chunks", sizes)
    if crashed:
        # A worker died: the kernel ran past the guard cells (into a page no
        # one may touch).  Those chunks again, with the whole array's length
        # of guard cells each side: where it wrote, exactly.
        chunked += probe("chunks", sizes, guard=n, only=set(crashed))
        chunked.sort(key=lambda r: r["rows"])
    if not report.judged:
        return
    for r in chunked:
        for kind, array, index, where, count in r["outside"]:
            report.problems.append(
                Problem(kind, array, index, r["rows"], where=where, count=count)
            )
    _shared_args(chunked, report)
    # Who writes what, near the chunks' edges: other chunks' halos may read it.
    targets: dict[int, list] = {}
    for r in chunked:
        lo, hi = r["rows"]
        for other in chunked:
            if other is r:
                continue
            for k, cells in other["edges"]:
                rows = cells[:, axis]
                near = cells[
                    ((rows >= lo - halo) & (rows < lo)) | ((rows >= hi) & (rows < hi + halo))
                ]
                if len(near):
                    targets.setdefault(lo, []).append((k, near, other["rows"]))
    if targets:
        for r in probe("reads", sizes, targets):
            for k, index, other in r["reads"]:
                report.problems.append(Problem(READ, f"array {k}", index, r["rows"], other))
    # The chunks' results, together, against one run over the whole array.
    for r in probe("whole", 1):
        for k, index, count in r["chunking"]:
            row = index[axis]
            rows = next(((lo, hi) for lo, hi in parts if lo <= row < hi), r["rows"])
            report.problems.append(Problem(CHUNKING, f"array {k}", index, rows, count=count))


def sequential_is_safe(report: CheckReport) -> bool:
    """Whether the kernel may run once over the caller's arrays (what
    ``check=True`` leaves them as): not if it wrote past the end of a
    view, or crashed, which past the end of the whole array would reach
    memory that is not the array's."""
    return not any(
        p.kind == CRASHED or p.where == "past the end of its view" for p in report.problems
    )
