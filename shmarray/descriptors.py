"""What crosses the process boundary: array descriptors, kernels and messages.

Array data never crosses.  An array travels as an :class:`ArrayDescriptor`
(block name, byte offset, shape, strides, dtype): about 200 pickled bytes
whatever the array's size.  A kernel travels once per worker
(:func:`kernel_payload`) and is named by an integer key afterwards.
"""

from __future__ import annotations

import builtins
import importlib
import pickle
import sys
import types
from dataclasses import dataclass
from typing import Any, NamedTuple

import cloudpickle
import numpy as np

from shmarray.blocks import BlockTable


def byte_extent(
    shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int
) -> tuple[int, int]:
    """Bytes [lo, hi) an array touches, relative to its first element.

    >>> byte_extent((3, 4), (32, 8), 8)
    (0, 96)
    >>> byte_extent((5,), (-8,), 8)         # x[::-1]
    (-32, 8)
    >>> byte_extent((0, 4), (32, 8), 8)     # empty: touches nothing
    (0, 0)
    """
    if 0 in shape:
        return 0, 0
    lo = hi = 0
    for n, s in zip(shape, strides):
        if s < 0:
            lo += s * (n - 1)
        else:
            hi += s * (n - 1)
    return lo, hi + itemsize


@dataclass(frozen=True, slots=True)
class ArrayDescriptor:
    """Where an array lives inside a block: all a worker needs to rebuild it."""

    block: str
    offset: int  # of the first element, from the block start
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: str  # ``np.dtype.str``, e.g. '<f8'
    writeable: bool = True

    @property
    def wire(self) -> tuple:
        """The fields as a plain tuple, the form in which Run carries it."""
        return (self.block, self.offset, self.shape, self.strides, self.dtype, self.writeable)

    def __reduce__(self):
        # Pickling through dataclass __getstate__ cost 7 us a message.
        return (ArrayDescriptor, self.wire)

    def view(self, buffer: np.ndarray) -> np.ndarray:
        """The array over ``buffer`` (uint8, the whole block).

        Checks that the descriptor lies inside the block first, so a bad one
        is rejected instead of mapped.
        """
        dtype = np.dtype(self.dtype)
        # A worker trusts no descriptor: object items would be read as
        # pointers into another process's heap.
        if dtype.hasobject or dtype.fields is not None or dtype.itemsize == 0:
            raise ValueError(
                f"descriptor of block {self.block!r} has dtype {dtype}; shared "
                f"arrays hold plain numbers, so refusing to map it"
            )
        lo, hi = byte_extent(self.shape, self.strides, dtype.itemsize)
        if self.offset + lo < 0 or self.offset + hi > buffer.size:
            raise ValueError(
                f"descriptor reaches bytes [{self.offset + lo}, "
                f"{self.offset + hi}) of block {self.block!r}, which has "
                f"{buffer.size} bytes; refusing to map it"
            )
        out = np.ndarray(
            self.shape, dtype, buffer=buffer, offset=self.offset, strides=self.strides
        )
        if not self.writeable:
            out.flags.writeable = False
        return out


def describe(array: np.ndarray, table: BlockTable) -> ArrayDescriptor | None:
    """The descriptor of a shared array (or any view of one), else None."""
    data = array.__array_interface__["data"][0]
    key = (data, array.shape, array.strides, array.dtype, array.flags.writeable)
    cache = table.descriptors
    found = cache.get(key)
    if found is not None:
        return found
    lo, hi = byte_extent(array.shape, array.strides, array.itemsize)
    block = table.locate(data + lo, data + hi)
    if block is None:
        return None
    found = cache[key] = ArrayDescriptor(
        block.name,
        data - block.address,
        array.shape,
        array.strides,
        array.dtype.str,
        array.flags.writeable,
    )
    return found


# -- Placeholders --------------------------------------------------------------


class Placeholder:
    """Stands in ``args`` for a value only the worker knows, filled in for
    each call of the kernel: ``shmarray.row_offset`` (the global index,
    along the split axis, of the first row the kernel gets: ``lo - halo``)
    and ``shmarray.worker_id`` (the worker's index, 0 to workers - 1, kept
    by a replacement).  Called sequentially, a kernel gets 0 for both."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"shmarray.{self.name}"

    def __reduce__(self):
        return self.name  # pickled as this module's global of that name


row_offset = Placeholder("row_offset")
"""Stands in ``args`` for the global index of the first row a kernel call gets.

Along the split axis: ``lo - halo`` for the chunk of rows ``(lo, hi)``, so
a kernel can tell where its slice lies in the whole array.  Run
sequentially on whole arrays, the kernel gets 0 in its place.

Examples
--------
::

    @njit
    def fill_index(out, first):
        for i in range(out.shape[0]):
            out[i] = first + i

    eng.map(fill_index, y, args=(shmarray.row_offset,))
    fill_index(z, 0)                       # sequentially: the same values
"""

worker_id = Placeholder("worker_id")
"""Stands in ``args`` and ``initargs`` for the index of the worker that runs.

From 0 to ``workers - 1``; a replacement worker keeps the index of the one
it replaces.  Run sequentially, the kernel gets 0 in its place.

Examples
--------
::

    eng.map(kernel, y, x, args=(shmarray.worker_id,))
    shmarray.Engine(initializer=setup, initargs=(shmarray.worker_id,))
"""


def chunk_calls(
    views: list, args: tuple, chunks: tuple, halo: int, axis: int, index: int
) -> list[tuple]:
    """The kernel's arguments for each of ``chunks``: the rows ``lo - halo``
    to ``hi + halo`` of each array along ``axis``, then ``args`` with
    ``row_offset`` filled in per chunk and ``worker_id`` as ``index``.  A
    worker's calls of its share, and the caller's of its own
    (``prepare(in_caller=True)``), are made here alike.

    >>> a = np.arange(6.0)
    >>> [(c[0].tolist(), c[1:]) for c in chunk_calls([a], (row_offset, worker_id, 2.0), ((1, 3), (3, 5)), 1, 0, 7)]
    [([0.0, 1.0, 2.0, 3.0], (0, 7, 2.0)), ([2.0, 3.0, 4.0, 5.0], (2, 7, 2.0))]
    """
    lead = (slice(None),) * axis
    offsets = [i for i, a in enumerate(args) if a is row_offset]
    args = tuple(index if a is worker_id else a for a in args)
    calls = []
    for lo, hi in chunks:
        these = list(args)
        for i in offsets:
            these[i] = lo - halo
        calls.append(tuple(v[lead + (slice(lo - halo, hi + halo),)] for v in views) + tuple(these))
    return calls


# -- Kernels ---------------------------------------------------------------


class KernelRef(NamedTuple):
    """A kernel importable by name: the worker imports it (and with it any
    on-disk numba cache) instead of receiving its code."""

    module: str
    qualname: str

    def resolve(self) -> Any:
        obj: Any = importlib.import_module(self.module)
        for part in self.qualname.split("."):
            obj = getattr(obj, part)
        return obj


def kernel_payload(kernel: Any) -> bytes:
    """Pickle a kernel for the workers: by name when importable, else by value.

    Kernels from ``__main__``, a notebook cell or a closure go by value
    (numba's dispatchers carry their Python source; cloudpickle handles
    plain functions), so they need no importable module.
    """
    module = getattr(kernel, "__module__", None)
    qualname = getattr(kernel, "__qualname__", None)
    if module and qualname and module != "__main__" and "<" not in qualname:
        ref = KernelRef(module, qualname)
        try:
            same = ref.resolve() is kernel
        except Exception:
            same = False
        if same:
            return pickle.dumps(ref, pickle.HIGHEST_PROTOCOL)
    return by_value(kernel)


class _Sourced(NamedTuple):
    """A function sent by value, and the file it came from: cloudpickle
    renames every file ``<dynamic-code>``, and a worker's traceback should
    name the caller's file and line."""

    function: Any
    filename: str


def by_value(obj: Any) -> bytes:
    """Pickle ``obj`` by value (functions, classes and instances of the
    caller's ``__main__`` included), keeping a function's file name."""
    code = getattr(obj, "__code__", None)
    if isinstance(code, types.CodeType):
        obj = _Sourced(obj, code.co_filename)
    return cloudpickle.dumps(obj, pickle.HIGHEST_PROTOCOL)


def _renamed(code: types.CodeType, filename: str) -> types.CodeType:
    consts = tuple(
        _renamed(c, filename) if isinstance(c, types.CodeType) else c for c in code.co_consts
    )
    return code.replace(co_filename=filename, co_consts=consts)


def load(payload: bytes) -> Any:
    """What ``by_value`` or plain pickle made, with file names restored."""
    obj = pickle.loads(payload)
    if type(obj) is _Sourced:
        obj.function.__code__ = _renamed(obj.function.__code__, obj.filename)
        obj = obj.function
    return obj


# Arguments that plain pickle carries faithfully; anything else (an instance
# of a class defined in the caller's __main__, a function, a closure) goes
# by value with cloudpickle, since workers never import __main__.
_PLAIN = (
    int,
    float,
    complex,
    bool,
    str,
    bytes,
    type(None),
    np.generic,
    ArrayDescriptor,
    Placeholder,
)


def pack_args(args: tuple) -> bytes:
    """A kernel's extra arguments for the pipe.

    >>> import pickle; pickle.loads(pack_args((1.5, "x")))
    (1.5, 'x')
    """
    if all(isinstance(a, _PLAIN) for a in args):
        return pickle.dumps(args, pickle.HIGHEST_PROTOCOL)
    return cloudpickle.dumps(args, pickle.HIGHEST_PROTOCOL)


def load_kernel(payload: bytes, main: MainNamespace | None = None) -> Any:
    obj = load(payload)
    if isinstance(obj, KernelRef):
        return obj.resolve()
    return main.adopt(obj) if main is not None else obj


_MISSING = object()


class MainNamespace:
    """One ``__main__`` namespace per worker for what comes by value.

    cloudpickle gives every function it sends by value a globals dict of
    its own, so an initializer that sets a global of the caller's script
    (``rng = np.random.default_rng(seed)``) would set it where no kernel
    looks.  In one process, a script's functions share one module
    namespace; here, every function of the caller's ``__main__`` that
    reaches the worker (the initializer, kernels, the functions they call,
    numba dispatchers included) is rebound to this one namespace.

    The globals each function brings are what the caller had when it was
    sent.  They go into the namespace unless the worker has assigned that
    name since (an initializer's ``global``): the worker's own writes win.
    """

    def __init__(self) -> None:
        self.namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
        self._sent: dict[str, Any] = {}  # name -> what the caller sent last
        self._done: dict[int, Any] = {}  # id(object) -> adopted, per call

    def adopt(self, obj: Any) -> Any:
        """``obj``, rebound to this namespace if it comes from ``__main__``."""
        try:
            return self._adopt(obj)
        finally:
            self._done = {}

    def _adopt(self, obj: Any) -> Any:
        done = self._done.get(id(obj))
        if done is not None:
            return done
        if isinstance(obj, types.FunctionType) and self._foreign(obj.__globals__):
            new = types.FunctionType(
                obj.__code__, self.namespace, obj.__name__, obj.__defaults__, obj.__closure__
            )
            new.__kwdefaults__ = obj.__kwdefaults__
            new.__qualname__ = obj.__qualname__
            new.__module__ = obj.__module__
            new.__dict__.update(obj.__dict__)
            self._done[id(obj)] = new
            self._merge(obj.__globals__)
            return new
        py_func = getattr(obj, "py_func", None)
        if (
            isinstance(py_func, types.FunctionType)
            and self._foreign(py_func.__globals__)
            and hasattr(obj, "targetoptions")
        ):
            try:
                import numba

                new = numba.jit(locals=dict(getattr(obj, "locals", {})), **obj.targetoptions)(
                    self._adopt(py_func)
                )
            except Exception:
                return obj  # keep the dispatcher as it came
            self._done[id(obj)] = new
            return new
        return obj

    def _foreign(self, globals_: dict) -> bool:
        """A globals dict cloudpickle made for a function of the caller's
        ``__main__`` (not ours, not this process's own ``__main__``)."""
        if globals_ is self.namespace or globals_.get("__name__") != "__main__":
            return False
        main = sys.modules.get("__main__")
        return main is None or globals_ is not vars(main)

    def _merge(self, globals_: dict) -> None:
        ns, sent = self.namespace, self._sent
        for name, value in list(globals_.items()):
            if name == "__builtins__":
                continue
            current = ns.get(name, _MISSING)
            if current is _MISSING or current is sent.get(name, _MISSING):
                value = self._adopt(value)
                ns[name] = sent[name] = value


# -- Messages ---------------------------------------------------------------
# Pipes carry what is rare or large; a map itself is rung through the
# control block (``shmarray.control``).  Every message to a worker is
# counted, and a ring names how many came before it, so a worker never runs
# a job before its definition has arrived.  An empty frame wakes a sleeper
# and counts for nothing.
#
# Coordinator -> worker


class Install(NamedTuple):
    """Keep this kernel under ``key`` for later jobs."""

    key: int
    payload: bytes


class Define(NamedTuple):
    """Job ``job``: kernel ``kernel`` over ``arrays`` with ``args``, on
    ``chunks`` (this worker's, or every chunk for a dynamic job).

    Every array in ``arrays`` is passed as rows [lo - halo, hi + halo);
    descriptors inside ``args`` are passed whole.  ``indices`` are the
    chunks' positions in the whole map, for values and errors.  Arrays
    travel as ``ArrayDescriptor.wire`` tuples.  Rows are counted along
    ``axis``.  An iterated job swaps its first two arrays after every step
    and, before each step, waits for the workers whose control lines start
    at ``neighbours`` (those holding the rows next to its own) to finish the
    previous one; with a ``boundary``, the workers also fill the ghost cells
    next to their rows, in stages with the same waits.
    """

    job: int
    kernel: int
    arrays: tuple
    args: bytes  # ``pack_args``
    halo: int
    chunks: tuple[tuple[int, int], ...]
    indices: tuple[int, ...]
    want_values: bool
    dynamic: bool
    iterated: bool = False
    neighbours: tuple[int, ...] = ()
    axis: int = 0
    boundary: tuple | None = None  # boundary.Boundary: the workers fill ghosts
    mode: int = 0  # control.COLLECT | TRACK | STREAM


class Rebind(NamedTuple):
    """Job ``job`` keeps everything but takes these ``args`` from now on."""

    job: int
    args: bytes  # ``pack_args``


class Forget(NamedTuple):
    """Drop these kernels and jobs."""

    kernels: tuple[int, ...]
    jobs: tuple[int, ...]


class Release(NamedTuple):
    """These blocks were unlinked: unmap them, and drop jobs that use them."""

    names: tuple[str, ...]


class Stop(NamedTuple):
    """Leave the loop and exit."""


# Worker -> coordinator


class Ready(NamedTuple):
    """Started and waiting for work."""

    pid: int


class StartFailed(NamedTuple):
    """The worker could not start: what went wrong, for the coordinator to
    raise (nothing is printed in the worker).  ``stage``: "import",
    "start" or "initializer"."""

    stage: str
    type_name: str
    message: str
    traceback: str


class Values(NamedTuple):
    """The kernel's return values for chunks ``indices`` of ring ``seq``,
    pickled apart (``pack_values``): the caller reads the ring number
    first, and unpickles only values of the ring it waits for."""

    seq: int
    indices: tuple[int, ...]
    payload: bytes


class Failed(NamedTuple):
    """Chunk ``chunk`` (its index in the whole map) of ring ``seq`` raised.
    (Not named ``index``: that would hide ``tuple.index``.)"""

    seq: int
    chunk: int
    error: bytes  # the pickled exception
    type_name: str
    message: str
    traceback: str


# -- Wire format -------------------------------------------------------------
# A message travels as the plain tuple (tag, *fields).  Pickling the named
# tuple itself writes a class reference that costs about 3 us to pickle and
# 2 us to unpickle, per message.

MESSAGES = (Install, Define, Rebind, Forget, Release, Stop, Ready, StartFailed, Values, Failed)
_TAGS = {cls: tag for tag, cls in enumerate(MESSAGES)}
WAKE = b""


def encode(msg: tuple) -> bytes:
    if type(msg) is Define:
        msg = msg._replace(arrays=tuple(d.wire for d in msg.arrays))
    return pickle.dumps((_TAGS[type(msg)], *msg), pickle.HIGHEST_PROTOCOL)


def pack_values(values: tuple) -> bytes:
    """A kernel's return values for the caller: plain pickle, or by value
    (cloudpickle) when they hold functions or classes of the caller's
    ``__main__`` (plain pickle loads either back).  Raises what pickling
    raises."""
    try:
        return pickle.dumps(values, pickle.HIGHEST_PROTOCOL)
    except Exception:
        return cloudpickle.dumps(values, pickle.HIGHEST_PROTOCOL)


def decode(data: bytes) -> Any:
    """One of ``MESSAGES``: the receiver knows which kinds it can get."""
    fields = pickle.loads(data)
    return MESSAGES[fields[0]]._make(fields[1:])
