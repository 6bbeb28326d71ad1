"""How data gets in: ``eng.load`` of .npy files, and ``eng.from_numpy`` of
array-likes read in slabs (np.memmap, h5py, zarr, dask, any sliceable
object), on every storage; peak memory measured in child interpreters."""

from __future__ import annotations

import io
import json
import os
import textwrap

import numpy as np
import pytest
from numba import njit

import shmarray
from conftest import block_entries, engine_id, run_python, storage_for
from shmarray import blocks, loading

WORKERS = (2, 3, 5)  # each with its storage (conftest.STORAGES)


@pytest.fixture(scope="module", params=WORKERS, ids=engine_id)
def eng(request):
    with shmarray.Engine(workers=request.param, storage=storage_for(request.param)) as engine:
        yield engine


@njit
def double(x):
    for i in range(x.shape[0]):
        x[i] *= 2


ARRAYS = {
    "c 2-d float64": np.random.default_rng(0).random((300, 7)),
    "fortran 2-d": np.asfortranarray(np.random.default_rng(1).random((50, 9))),
    "3-d int32": np.arange(2 * 3 * 4, dtype=np.int32).reshape(2, 3, 4),
    "big-endian": np.arange(20, dtype=">f8"),
    "bool": np.array([True, False, True]),
    "complex64": (np.arange(6) + 1j).astype(np.complex64),
    "datetime": np.arange("2026-01-01", "2026-01-05", dtype="datetime64[D]"),
    "scalar": np.array(3.5),
    "empty": np.zeros((0, 4)),
}


@pytest.mark.parametrize("name", list(ARRAYS))
def test_load_reads_what_np_save_wrote(eng, tmp_path, name):
    a = ARRAYS[name]
    path = tmp_path / "a.npy"
    np.save(path, a)
    x = eng.load(path)
    assert type(x) is np.ndarray and x.dtype == a.dtype and x.shape == a.shape
    assert np.array_equal(x, a)
    if a.flags.f_contiguous and not a.flags.c_contiguous:
        assert x.flags.f_contiguous and not x.flags.c_contiguous  # as saved
    else:
        assert x.flags.c_contiguous
    if a.ndim and a.size and a.dtype == np.float64:
        eng.map(double, x)  # and workers can use it
        assert np.array_equal(x, a * 2)
    del x


def test_load_takes_str_paths_file_objects_and_format_2(eng, tmp_path):
    a = np.arange(100.0).reshape(10, 10)
    path = tmp_path / "v2.npy"
    with open(path, "wb") as f:
        np.lib.format.write_array(f, a, version=(2, 0))
    assert np.array_equal(eng.load(str(path)), a)
    with open(path, "rb") as f:
        assert np.array_equal(eng.load(f), a)
    buf = io.BytesIO()
    np.save(buf, a)
    buf.seek(0)
    assert np.array_equal(eng.load(buf), a)


def test_load_reads_format_3_of_any_dtype(eng, tmp_path):
    # Format 3.0 only writes its header in UTF-8: NumPy picks it for field
    # names latin-1 cannot hold, and anyone may ask for it.  A plain float64
    # file was refused as "holds a structured dtype".
    a = np.arange(12.0).reshape(3, 4)
    path = tmp_path / "v3.npy"
    with open(path, "wb") as f:
        np.lib.format.write_array(f, a, version=(3, 0))
    assert path.read_bytes()[6:8] == b"\x03\x00"
    x = eng.load(path)
    assert x.dtype == np.float64 and np.array_equal(x, a)
    eng.map(double, x)
    assert np.array_equal(x, a * 2)
    del x
    # A structured dtype is refused as such, whatever its names.
    with pytest.warns(UserWarning, match="format 3.0"):
        np.save(tmp_path / "rec3.npy", np.zeros(3, dtype=[("温度", "f8")]))
    assert (tmp_path / "rec3.npy").read_bytes()[6:8] == b"\x03\x00"
    with pytest.raises(TypeError, match="structured dtype"):
        eng.load(tmp_path / "rec3.npy")


def test_writing_results_back_is_np_save(eng, tmp_path):
    """The recipe: np.save writes straight from the shared array, and
    eng.load reads the file back into another one."""
    x = eng.from_numpy(np.arange(12.0).reshape(3, 4))
    eng.map(double, x)
    np.save(tmp_path / "out.npy", x)
    assert np.array_equal(np.load(tmp_path / "out.npy"), np.arange(12.0).reshape(3, 4) * 2)
    assert np.array_equal(eng.load(tmp_path / "out.npy"), x)
    del x


def test_wrapping_a_shared_array_in_xarray_copies_nothing(eng):
    """The recipe: an xarray.DataArray over a shared array is a view of it;
    kernels see what xarray sees."""
    xr = pytest.importorskip("xarray")
    x = eng.from_numpy(np.arange(12.0).reshape(3, 4))
    labelled = xr.DataArray(x, dims=("time", "station"), coords={"time": [0, 1, 2]})
    assert np.shares_memory(labelled.values, x)
    eng.map(double, x)
    assert float(labelled.sel(time=2).sum()) == 2 * (8 + 9 + 10 + 11)
    back = eng.from_numpy(labelled)  # a DataArray is an array-like
    assert np.array_equal(back, x) and not np.shares_memory(back, x)
    del x, labelled, back


def _write(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def test_load_refuses_what_it_cannot_read_and_leaves_no_block(eng, tmp_path):
    a = np.arange(10.0)
    np.savez(tmp_path / "a.npz", a=a)
    np.save(tmp_path / "obj.npy", np.array([1, "x"], dtype=object), allow_pickle=True)
    np.save(tmp_path / "rec.npy", np.zeros(3, dtype=[("a", "f8"), ("b", "i4")]))
    np.save(tmp_path / "ok.npy", a)
    whole = (tmp_path / "ok.npy").read_bytes()
    _write(tmp_path / "short.npy", whole[:-8])
    _write(tmp_path / "text.npy", b"1, 2, 3\n")
    _write(tmp_path / "v7.npy", b"\x93NUMPY\x07\x00")
    _write(tmp_path / "data.h5", b"\x89HDF\r\n\x1a\n" + bytes(100))
    (tmp_path / "store.zarr").mkdir()
    _write(tmp_path / "store.zarr" / "zarr.json", b"{}")
    cases = [
        ("a.npz", ValueError, r"an \.npz archive.*np\.load\(path\)"),
        ("obj.npy", TypeError, "Object arrays"),
        ("rec.npy", TypeError, "structured dtype"),
        (
            "short.npy",
            ValueError,
            "truncated: its header promises 80 bytes of data, and it holds only 72",
        ),
        ("text.npy", ValueError, "is not an .npy file"),
        ("v7.npy", ValueError, "damaged .npy header: its format version is 7.0"),
        ("data.h5", ValueError, r"an HDF5 file.*shmarray\[hdf5\].*h5py\.File"),
        ("store.zarr", ValueError, r"a zarr store.*shmarray\[zarr\].*zarr\.open_array"),
        ("missing.npy", FileNotFoundError, "missing.npy"),
    ]
    blocks.settle()  # earlier tests' dropped blocks are unlinked by now
    before, live = block_entries(), len(eng.blocks)
    for name, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            eng.load(tmp_path / name)
    assert block_entries() == before and len(eng.blocks) == live
    with pytest.raises(TypeError, match="path must be a path"):
        eng.load(42)


# -- from_numpy of array-likes -------------------------------------------------------


def test_from_numpy_of_a_memmap_keeps_copy_on_write_changes(eng, tmp_path):
    a = np.arange(1000.0).reshape(100, 10)
    np.save(tmp_path / "m.npy", a)
    for mode in ("r", "r+", "c"):
        m = np.load(tmp_path / "m.npy", mmap_mode=mode)
        if mode == "c":
            m[0, 0] = -1.0  # lives only in this mapping's pages
        x = eng.from_numpy(m)
        assert type(x) is np.ndarray
        assert x[0, 0] == (-1.0 if mode == "c" else 0.0)
        assert np.array_equal(x[1:], a[1:]) and np.array_equal(m[1:], a[1:])
        assert m[0, 0] == (-1.0 if mode == "c" else 0.0)  # its pages are intact
        del m, x
    f = np.load(tmp_path / "m.npy", mmap_mode="r")
    view = f[10:60:2, ::3]  # a strided view of a memmap
    assert np.array_equal(eng.from_numpy(view), a[10:60:2, ::3])


class Sliceable:
    """A minimal array-like: shape, dtype and slicing, recording each read."""

    def __init__(self, data, chunks=None):
        self._data = data
        self.shape, self.dtype = data.shape, data.dtype
        if chunks is not None:
            self.chunks = chunks
        self.reads = []

    def __getitem__(self, key):
        self.reads.append(key)
        return self._data[key]


def test_from_numpy_reads_an_array_like_in_slabs(eng, monkeypatch):
    monkeypatch.setattr(loading, "SLAB", 10 * 8 * 64)  # 10 rows of 64 float64
    data = np.random.default_rng(3).random((95, 64))
    src = Sliceable(data)
    x = eng.from_numpy(src)
    assert np.array_equal(x, data) and x.flags.c_contiguous
    assert [(k.start, k.stop) for k in src.reads] == [
        (lo, min(lo + 10, 95)) for lo in range(0, 95, 10)
    ]
    chunked = Sliceable(data, chunks=(4, 64))  # slabs of whole chunks
    assert np.array_equal(eng.from_numpy(chunked), data)
    assert {k.stop - k.start for k in chunked.reads[:-1]} == {8}

    class Wrong(Sliceable):
        def __getitem__(self, key):
            return self._data[key][:1]

    with pytest.raises(ValueError, match="slicing does not follow NumPy's"):
        eng.from_numpy(Wrong(data))
    assert np.array_equal(eng.from_numpy([[1, 2], [3, 4]]), [[1, 2], [3, 4]])
    del x


def test_from_numpy_of_an_h5py_dataset(eng, tmp_path):
    h5py = pytest.importorskip("h5py")
    a = np.random.default_rng(4).random((500, 30)).astype(np.float32)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f.create_dataset("plain", data=a)
        f.create_dataset("chunked", data=a, chunks=(64, 30), compression="gzip")
        f.create_dataset("text", data=["a", "bc"], dtype=h5py.string_dtype())
    with h5py.File(tmp_path / "d.h5", "r") as f:
        for name in ("plain", "chunked"):
            x = eng.from_numpy(f[name])
            assert x.dtype == np.float32 and np.array_equal(x, a)
            eng.map(double, x)
            assert np.array_equal(x, a * 2)
        with pytest.raises(TypeError, match="Object arrays"):
            eng.from_numpy(f["text"])
    del x


def test_from_numpy_of_a_zarr_array(eng, tmp_path):
    zarr = pytest.importorskip("zarr")
    a = np.arange(3000, dtype=np.int64).reshape(300, 10)
    z = zarr.open_array(
        str(tmp_path / "z.zarr"), mode="w", shape=a.shape, chunks=(32, 10), dtype=a.dtype
    )
    z[:] = a
    x = eng.from_numpy(zarr.open_array(str(tmp_path / "z.zarr"), mode="r"))
    assert x.dtype == np.int64 and np.array_equal(x, a)
    del x


def test_from_numpy_of_a_dask_array(eng):
    dask = pytest.importorskip("dask")
    da = pytest.importorskip("dask.array")
    a = np.random.default_rng(5).random((400, 20))
    d = da.from_array(a, chunks=(37, 20)) * 2 + 1
    assert np.array_equal(eng.from_numpy(d), a * 2 + 1)  # threads: da.store
    with dask.config.set(scheduler="synchronous"):
        assert np.array_equal(eng.from_numpy(d), a * 2 + 1)
    calls = []

    def elsewhere(dsk, keys, **kwargs):  # a scheduler that is not this process's
        calls.append(1)
        return dask.get(dsk, keys, **kwargs)

    with dask.config.set(scheduler=elsewhere):
        assert np.array_equal(eng.from_numpy(d), a * 2 + 1)  # slabs, brought here
    assert calls
    assert eng.from_numpy(da.from_array(np.array(2.5))) == 2.5
    unknown = da.from_array(a, chunks=(37, 20))[da.from_array(a[:, 0] > 0.5, chunks=37)]
    with pytest.raises(ValueError, match="unknown chunk sizes.*compute_chunk_sizes"):
        eng.from_numpy(unknown)


# -- peak memory -----------------------------------------------------------------

PEAK = textwrap.dedent("""
    import json, sys, numpy as np, shmarray

    def peak():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))

    how, storage, path = sys.argv[1:4]
    with shmarray.Engine(workers=2, storage=storage) as eng:
        eng.zeros(10)
        before = peak()
        if how == "load":
            x = eng.load(path)
        elif how == "memmap":
            x = eng.from_numpy(np.load(path, mmap_mode="r"))
        else:
            x = eng.from_numpy(np.load(path))
        grown = peak() - before
        step = x.size // 8
        ok = all(x[i] == float(i // 2**20) for i in range(0, x.size, step))
        print(json.dumps({"grown": grown, "nbytes": x.nbytes, "ok": ok}))
        del x
""")


@pytest.fixture(scope="module")
def npy_512mib(tmp_path_factory):
    """A 512 MiB .npy of float64, element i holding i // 2**20, written a
    slab at a time (this process never holds it)."""
    path = tmp_path_factory.mktemp("big") / "big.npy"
    n, slab = 64 * 2**20, 2**20
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f8", "fortran_order": False, "shape": (n,)}
        )
        for k in range(n // slab):
            f.write(np.full(slab, float(k)).tobytes())
    yield str(path)
    os.unlink(path)


@pytest.mark.parametrize("how", ["load", "memmap"])
@pytest.mark.parametrize("storage", ["shm", "memfd", "dir"])
def test_peak_memory_of_a_512_mib_load_is_one_copy(npy_512mib, how, storage, storage_dir):
    where = storage_dir if storage == "dir" else storage
    proc = run_python(
        f"import sys; sys.argv[1:] = {[how, where, npy_512mib]!r}\n" + PEAK, timeout=180
    )
    got = json.loads(proc.stdout)
    assert got["ok"] and got["nbytes"] == 512 * 2**20
    assert got["grown"] <= 1.25 * got["nbytes"], got
    assert proc.stderr == ""


def test_np_load_then_from_numpy_holds_two_copies(npy_512mib):
    # The comparison the two above are measured against.
    proc = run_python(
        f"import sys; sys.argv[1:] = ['np', 'shm', {npy_512mib!r}]\n" + PEAK, timeout=180
    )
    got = json.loads(proc.stdout)
    assert got["ok"] and got["grown"] >= 1.9 * got["nbytes"], got
