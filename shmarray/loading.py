"""How data gets into shared arrays without a second copy.

``eng.from_numpy(np.load(path))`` holds a private copy and a shared copy at
once; ``np.asarray`` of an h5py dataset, a zarr array or a dask array does
the same.  Here:

* ``Engine.load`` parses an ``.npy`` header and reads the data straight
  into the new block (``readinto`` on an unbuffered file): no private copy.
* ``Engine.from_numpy`` of an array-like that is not in memory yet (h5py,
  zarr, dask, anything with ``shape``, ``dtype`` and slicing) copies it in
  slabs of about :data:`SLAB` bytes, so the peak is one copy plus a slab;
  of a ``np.memmap``, it also drops the pages of each slab it has read
  from its resident set, so the file's pages do not count twice.

Every function here takes ``allocate(shape, dtype, order)``, the engine's
``empty``, so it knows nothing about blocks.
"""

from __future__ import annotations

import concurrent.futures
import errno
import io
import math
import mmap
import os
import stat
from collections.abc import Callable
from typing import Any

import numpy as np

from shmarray import blocks, options

SLAB = 64 * 2**20  # bytes copied at a time: the peak beyond one copy

Allocate = Callable[..., np.ndarray]  # Engine.empty(shape, dtype, order)

_NPY_MAGIC = b"\x93NUMPY"
_ZARR_MARKS = (".zarray", ".zgroup", "zarr.json")
_OTHER_FORMATS = {
    b"PK\x03\x04": "an .npz archive (a zip of several arrays). eng.load reads one "
    "array from an .npy file; open the archive with np.load(path) "
    "and pass each array to eng.from_numpy(archive[name]), or save "
    "the arrays you need as .npy files (np.save) to load them "
    "without a private copy",
    b"\x89HDF": "an HDF5 file. Open the dataset with h5py (pip install "
    "'shmarray[hdf5]') and pass it to eng.from_numpy(h5py.File(path)"
    "[name]), which reads it in slabs",
}


def _raw_bytes(out: np.ndarray) -> np.ndarray:
    """A flat uint8 view of a contiguous array's memory, in memory order."""
    raw = out.reshape(-1, order="A").view(np.uint8)
    assert raw.size == out.nbytes and (out.nbytes == 0 or np.may_share_memory(raw, out))
    return raw


def _header(f, what: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy file ``f``, left at its data."""
    start = f.read(6)
    if start != _NPY_MAGIC:
        kind = next((v for k, v in _OTHER_FORMATS.items() if start.startswith(k)), None)
        if kind is not None:
            raise ValueError(f"{what} is {kind}.")
        raise ValueError(
            f"{what} is not an .npy file (it starts with {start!r}, not "
            f"{_NPY_MAGIC!r}). eng.load reads files written by np.save; for other "
            f"formats open the data with its library and pass the array-like to "
            f"eng.from_numpy (np.memmap, h5py, zarr and dask arrays are read in "
            f"slabs)."
        )
    version = tuple(f.read(2))
    fmt = np.lib.format
    try:
        if version == (1, 0):
            return fmt.read_array_header_1_0(f)
        if version in ((2, 0), (3, 0)):
            # 3.0 is 2.0 with its header in UTF-8 rather than latin-1, which
            # matters only for non-ASCII field names: a structured dtype,
            # refused by the caller whatever its names read as.  Any dtype
            # may be written as 3.0 (np.lib.format.write_array(version=(3, 0))).
            return fmt.read_array_header_2_0(f)
    except ValueError as exc:
        raise ValueError(f"{what} has a damaged .npy header: {exc}") from None
    got = ".".join(map(str, version)) if len(version) == 2 else "cut off"
    raise ValueError(
        f"{what} has a damaged .npy header: its format version is "
        f"{got}; NumPy writes 1.0, 2.0 or 3.0."
    )


def load(path: Any, allocate: Allocate, threads: int = 1) -> np.ndarray:
    """The array of the ``.npy`` file ``path`` (a path, or a binary file
    object at the start of one) in a new shared array, read straight into
    it: C or Fortran order as saved, dtype as saved.  A path is read by up
    to ``threads`` threads at once, a slab each (two threads read a 2 GiB
    file from the page cache in 0.86 s instead of 1.26 s on a 2-core VM).

    Raises ValueError for a file that is not an ``.npy`` (``.npz`` and
    HDF5 named, with what to do), is truncated, or holds a structured
    dtype; TypeError for object arrays.
    """
    if hasattr(path, "readinto"):
        return _load_from(path, getattr(path, "name", "the file"), allocate, 1)
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(
            f"path must be a path (str or os.PathLike) or a binary file "
            f"object; got {path!r} of type {type(path).__name__} instead."
        )
    what = os.fsdecode(path)
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(what, m)) for m in _ZARR_MARKS):
            raise ValueError(
                f"{what} is a zarr store. Open it with zarr (pip install "
                f"'shmarray[zarr]') and pass the array to "
                f"eng.from_numpy(zarr.open_array(path)), which reads it in slabs."
            )
        raise IsADirectoryError(
            errno.EISDIR, f"{what} is a directory; eng.load reads one .npy file (np.save)"
        )
    # Unbuffered: readinto fills the shared block directly, with no buffer
    # in between.
    with open(path, "rb", buffering=0) as f:
        return _load_from(f, what, allocate, threads)


def _truncated(what: str, n: int, held: int) -> ValueError:
    return ValueError(
        f"{what} is truncated: its header promises {n} bytes of data, and it holds only {held}."
    )


def _load_from(f, what: str, allocate: Allocate, threads: int) -> np.ndarray:
    shape, fortran, dtype = _header(f, what)
    options.coerce_dtype(dtype, f"{what} (an .npy file)")
    n = math.prod(shape) * dtype.itemsize
    start, size = _where_data(f)
    if size is not None and size - start < n:  # before allocating anything
        raise _truncated(what, n, size - start)
    out = allocate(shape, dtype, "F" if fortran else "C")
    try:
        if size is not None and threads > 1 and n > 2 * SLAB and blocks.HAVE_PREADV:
            _read_parallel(f.fileno(), start, _raw_bytes(out), threads, what)
        else:
            _read_into(f, _raw_bytes(out), what)
    except BaseException:
        del out  # its block goes now, not with the traceback
        raise
    return out


def _where_data(f) -> tuple[int, int | None]:
    """(offset of the data, size of the file) for a regular file; (0, None)
    for a stream."""
    try:
        st = os.fstat(f.fileno())
        return f.tell(), (st.st_size if stat.S_ISREG(st.st_mode) else None)
    except (OSError, AttributeError, ValueError, io.UnsupportedOperation):
        return 0, None


def _read_into(f, raw: np.ndarray, what: str) -> None:
    view = memoryview(raw)  # type: ignore[arg-type]  # numpy's stubs lack the buffer protocol here
    done, n = 0, raw.size
    while done < n:
        got = f.readinto(view[done : done + SLAB])
        if not got:
            raise _truncated(what, n, done)
        done += got


def _read_parallel(fd: int, start: int, raw: np.ndarray, threads: int, what: str) -> None:
    """Bytes [start, start + raw.size) of file ``fd`` into ``raw``, a slab
    per task, ``threads`` at a time (preadv releases the GIL)."""
    view, n = memoryview(raw), raw.size  # type: ignore[arg-type]  # as above

    def slab(lo: int) -> None:
        hi, done = min(lo + SLAB, n), lo
        while done < hi:
            got = os.preadv(fd, [view[done:hi]], start + done)
            if not got:
                raise _truncated(what, n, done)
            done += got

    with concurrent.futures.ThreadPoolExecutor(
        threads, thread_name_prefix="shmarray-load"
    ) as pool:
        for future in [pool.submit(slab, lo) for lo in range(0, n, SLAB)]:
            future.result()


# -- from_numpy of array-likes --------------------------------------------------


def _is_dask(obj: Any) -> bool:
    return (
        type(obj).__module__.split(".")[0] == "dask"
        and hasattr(obj, "__dask_graph__")
        and hasattr(obj, "chunks")
    )


def _lazy_dtype(obj: Any) -> np.dtype | None:
    """The NumPy dtype of an array-like read by slicing, or None if ``obj``
    is not one (no shape, dtype or slicing; a dtype NumPy does not know;
    a scalar)."""
    if isinstance(obj, np.ndarray) or not hasattr(obj, "__getitem__"):
        return None
    shape = getattr(obj, "shape", None)
    if not isinstance(shape, tuple) or not shape or not all(options.is_int(n) for n in shape):
        return None
    try:
        return np.dtype(obj.dtype)
    except (TypeError, AttributeError):
        return None


def from_array_like(array: Any, allocate: Allocate) -> np.ndarray:
    """A shared copy of ``array``, made with at most a slab of memory
    beyond the copy when ``array`` is not in memory (see the module)."""
    if isinstance(array, np.ndarray):
        return _from_ndarray(array, allocate)
    if _is_dask(array):
        return _from_dask(array, allocate)
    dtype = _lazy_dtype(array)
    if dtype is None:
        return _from_ndarray(np.asarray(array), allocate)
    options.coerce_dtype(dtype, f"array ({type(array).__name__})")
    shape = tuple(int(n) for n in array.shape)
    out = allocate(shape, dtype, "C")
    _copy_slabs(out, array, getattr(array, "chunks", None))
    return out


def _from_ndarray(a: np.ndarray, allocate: Allocate) -> np.ndarray:
    options.coerce_dtype(a.dtype, "array")
    order = "F" if a.flags.f_contiguous and not a.flags.c_contiguous else "C"
    out = allocate(a.shape, a.dtype, order)
    mapping = _file_mapping(a)
    if mapping is None or a.ndim == 0:
        np.copyto(out, a, casting="no")
        return out
    # A memory-mapped file: slab by slab along its slowest axis, each slab's
    # pages dropped from our resident set once copied.
    axis = int(np.argmax(np.abs(a.strides)))
    base = np.frombuffer(mapping, np.uint8).ctypes.data
    step = _rows_per_slab(a, axis)
    lead = (slice(None),) * axis
    for lo in range(0, a.shape[axis], step):
        part = a[lead + (slice(lo, lo + step),)]
        out[lead + (slice(lo, lo + step),)] = part
        first, last = _extent(part)
        blocks.drop_pages(mapping, first - base, last - base)
    return out


def _file_mapping(a: np.ndarray) -> mmap.mmap | None:
    """The mmap under ``a`` when it is a np.memmap (or a view of one) whose
    pages may be dropped once read: a shared or read-only mapping, never a
    copy-on-write one (mode "c"), whose changes live only in its pages."""
    obj: Any = a
    mode = None
    while isinstance(obj, np.ndarray):
        if isinstance(obj, np.memmap) and mode is None:
            mode = obj.mode
        obj = obj.base
    if isinstance(obj, mmap.mmap) and mode in ("r", "r+", "w+", "readonly", "readwrite", "write"):
        return obj
    return None


# NumPy 2 moved byte_bounds; 1.26 has it at the top level.
_byte_bounds = getattr(getattr(np.lib, "array_utils", None), "byte_bounds", None) or np.byte_bounds  # type: ignore[attr-defined]  # NumPy 1.26 only


def _extent(a: np.ndarray) -> tuple[int, int]:
    """The addresses [first, last) of the bytes ``a`` spans."""
    return _byte_bounds(a)


def _rows_per_slab(a, axis: int) -> int:
    row = a.dtype.itemsize * math.prod(n for i, n in enumerate(a.shape) if i != axis)
    return max(1, SLAB // max(row, 1))


def _copy_slabs(out: np.ndarray, src: Any, chunks: Any) -> None:
    """``out[...] = src`` slab by slab of rows (axis 0), each slab a whole
    number of the source's own chunks along that axis where it has them."""
    n = out.shape[0]
    step = _rows_per_slab(out, 0)
    if isinstance(chunks, tuple) and chunks and options.is_int(chunks[0]) and chunks[0] > 0:
        step = int(max(chunks[0], step // chunks[0] * chunks[0]))
    direct = getattr(src, "read_direct", None)  # h5py: no slab in between
    if direct is not None and not out.flags.c_contiguous:
        direct = None
    for lo in range(0, n, step):
        rows = np.s_[lo : min(lo + step, n)]
        if direct is not None:
            direct(out, source_sel=rows, dest_sel=rows)
            continue
        part = np.asarray(src[rows])
        if part.shape != out[rows].shape:
            raise ValueError(
                f"reading rows {lo}:{min(lo + step, n)} of a {type(src).__name__} "
                f"of shape {out.shape} gave an array of shape {part.shape}: its "
                f"slicing does not follow NumPy's. Pass np.asarray(array) instead."
            )
        out[rows] = part


def _from_dask(x: Any, allocate: Allocate) -> np.ndarray:
    import dask
    import dask.array as da

    if any(math.isnan(n) for n in x.shape):
        raise ValueError(
            f"the dask array has unknown chunk sizes (shape {x.shape}); call "
            f"x.compute_chunk_sizes() first, or pass x.compute()."
        )
    options.coerce_dtype(x.dtype, "array (a dask array)")
    out = allocate(tuple(int(n) for n in x.shape), np.dtype(x.dtype), "C")
    if out.ndim == 0:
        out[()] = x.compute()
        return out
    scheduler = dask.base.get_scheduler(collections=[x])
    local = getattr(scheduler, "__module__", "") in ("dask.threaded", "dask.local")
    if local:
        # Threads of this process write each computed block into place.
        da.store(x, out, lock=False, scheduler=scheduler)
    else:
        # A cluster (or processes) would write into copies of ``out``:
        # bring the data here a slab at a time instead.
        _copy_slabs(out, x, tuple(int(c) for c in x.chunks[0][:1]))
    return out
