"""Every argument check, in one place: small pure functions run in the
caller's thread before anything is sent, and the two records they fill,
:class:`EngineOptions` and :class:`CallOptions`.

One rule for the kind of mistake: a value of the wrong type raises
``TypeError``, a value of the right type out of range raises ``ValueError``;
the message names the argument, the value received, what was expected, and
the fix.
"""

from __future__ import annotations

import difflib
import dis
import functools
import inspect
import math
import numbers
import os
import types
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, NoReturn, TypedDict, TypeGuard, TypeVar, cast

import numpy as np
import numpy.typing as npt

from shmarray import blocks, cgroups, control, launch, waiting
from shmarray.boundary import MODES, Boundary
from shmarray.descriptors import (
    ArrayDescriptor,
    by_value,
    describe,
    pack_args,
    row_offset,
    worker_id,
)
from shmarray.errors import CopyWarning, PythonKernelWarning

Schedule = Literal["static", "dynamic"]
Errors = Literal["raise", "collect"]
StartMethod = Literal["forkserver", "spawn", "fork"]
# A kind by name, or a directory as a path object (os.PathLike: a directory
# given as a plain str works too, but then a misspelt kind cannot be told
# from a directory by a type checker).
StorageKind = Literal["shm", "memfd"]
Wait = Literal["auto", "spin", "passive"]
Order = Literal["C", "F"]
# None, a numpy.pad mode, or a number: the constant (numpy scalars too).
BoundaryMode = (
    None | Literal["wrap", "reflect", "symmetric", "edge"] | float | int | complex | np.number[Any]
)


def is_int(value: object) -> TypeGuard[int | np.integer[Any]]:
    """An integer that is not a bool (numpy integers count).

    >>> is_int(3), is_int(np.int64(3)), is_int(True), is_int(3.0)
    (True, True, False, False)
    """
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _got(value: object) -> str:
    return f"{value!r} of type {type(value).__name__}"


# -- the machine -----------------------------------------------------------------


def cgroup_cpus(proc: str = "/proc/self") -> float | None:
    """The CPU quota of this process's cgroups, in CPUs, if any
    (:func:`shmarray.cgroups.cpu_quota`: v1 and v2, from its own cgroup up
    to the root, the tightest wins).  A ``--cpus=2`` container on a 64-core
    host has 2."""
    return cgroups.cpu_quota(proc)


def usable_cpus() -> int:
    """CPUs this process may use: its CPU affinity, capped by its cgroup's
    CPU quota (rounded up; at least 1)."""
    if hasattr(os, "sched_getaffinity"):
        n = len(os.sched_getaffinity(0))
    else:
        n = os.cpu_count() or 1
    quota = cgroup_cpus()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


# -- Engine(...) ------------------------------------------------------------------


def coerce_workers(workers: object) -> int:
    """``workers=``; None means ``SHMARRAY_WORKERS`` if set, else one per
    usable CPU.

    >>> coerce_workers(3)
    3
    >>> coerce_workers(None) >= 1
    True
    >>> coerce_workers(0)
    Traceback (most recent call last):
    ...
    ValueError: workers must be at least 1; got 0. Pass None for one worker per usable CPU.
    """
    if workers is None:
        env = os.environ.get("SHMARRAY_WORKERS", "").strip()
        if not env:
            return usable_cpus()
        try:
            workers = int(env)
        except ValueError:
            raise ValueError(
                f"SHMARRAY_WORKERS must be a positive integer; got "
                f"{env!r} instead. Unset it for one worker per usable "
                f"CPU."
            ) from None
        if workers < 1:
            raise ValueError(f"SHMARRAY_WORKERS must be a positive integer; got {env!r} instead.")
        return workers
    if not is_int(workers):
        raise TypeError(
            f"workers must be an int or None (one per usable CPU); got {_got(workers)} instead."
        )
    if workers < 1:
        raise ValueError(
            f"workers must be at least 1; got {workers!r}. Pass None for "
            f"one worker per usable CPU."
        )
    return int(workers)


def coerce_start_method(method: object) -> str:
    """
    >>> coerce_start_method(None)
    'forkserver'
    >>> coerce_start_method("teleport")
    Traceback (most recent call last):
    ...
    ValueError: start_method must be one of ['forkserver', 'spawn', 'fork']; got 'teleport' instead.
    """
    if method is None:
        return launch.DEFAULT_METHOD
    if not isinstance(method, str):
        raise TypeError(
            f"start_method must be a str, one of {list(launch.METHODS)}; "
            f"got {_got(method)} instead."
        )
    if method not in launch.METHODS:
        raise ValueError(
            f"start_method must be one of {list(launch.METHODS)}; got {method!r} instead."
        )
    return method


def coerce_seconds(value: object, name: str) -> float:
    """A positive, finite number of seconds.

    >>> coerce_seconds(30, "startup_timeout")
    30.0
    >>> coerce_seconds(0, "startup_timeout")
    Traceback (most recent call last):
    ...
    ValueError: startup_timeout must be a positive, finite number of seconds; got 0 instead.
    """
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number of seconds; got {_got(value)} instead.")
    seconds = float(value)
    if not 0 < seconds < math.inf:
        raise ValueError(
            f"{name} must be a positive, finite number of seconds; got {value!r} instead."
        )
    return seconds


def coerce_limit(value: object, name: str, what: str) -> int | None:
    """None, or a positive int.

    >>> coerce_limit(None, "max_tasks_per_worker", "tasks"), coerce_limit(100, "n", "x")
    (None, 100)
    """
    if value is None:
        return None
    if not is_int(value):
        raise TypeError(
            f"{name} must be a positive int ({what}) or None (never); got {_got(value)} instead."
        )
    if value < 1:
        raise ValueError(
            f"{name} must be a positive int ({what}) or None (never); got {value!r} instead."
        )
    return int(value)


def pack_initializer(initializer: object, initargs: object) -> tuple[bytes, bytes] | None:
    """The initializer and its arguments, pickled for every worker (by value
    when they live in ``__main__``)."""
    if initializer is None:
        if initargs:
            raise ValueError("initargs were given without an initializer.")
        return None
    if not callable(initializer):
        raise TypeError(
            f"initializer must be callable (run once in every "
            f"worker) or None; got {initializer!r} instead."
        )
    if not isinstance(initargs, (tuple, list)):
        raise TypeError(
            f"initargs must be a tuple; got {_got(initargs)}. Write "
            f"initargs=({initargs!r},) for one."
        )
    if any(a is row_offset for a in initargs):
        raise ValueError(
            "shmarray.row_offset has no meaning in initargs (an "
            "initializer runs once per worker, not per chunk); "
            "shmarray.worker_id does."
        )
    try:
        return by_value(initializer), pack_args(tuple(initargs))
    except Exception as exc:
        raise TypeError(
            f"the initializer and its initargs must be picklable to reach the workers: {exc}"
        ) from None


def coerce_storage(storage: object) -> str:
    """``storage=``, or ``SHMARRAY_STORAGE`` when it is None: "shm", "memfd",
    or an existing, writable directory (returned absolute, so workers
    started elsewhere find it).

    >>> coerce_storage(None) in ("shm", "memfd") or os.path.isabs(coerce_storage(None))
    True
    >>> coerce_storage("memfd" if blocks.HAVE_MEMFD else "shm") in ("shm", "memfd")
    True
    >>> coerce_storage("memfdd")
    Traceback (most recent call last):
    ...
    ValueError: storage must be "shm", "memfd" or an existing directory; got 'memfdd': did you mean 'memfd'?
    >>> coerce_storage("/no/such/dir")
    Traceback (most recent call last):
    ...
    ValueError: storage must be "shm", "memfd" or an existing directory; got '/no/such/dir', which does not exist. Create it first (os.makedirs), or pick another.
    """
    where = "storage"
    if storage is None:
        env = os.environ.get("SHMARRAY_STORAGE", "").strip()
        if not env:
            return "shm"
        storage, where = env, "SHMARRAY_STORAGE"
    if isinstance(storage, os.PathLike):
        storage = os.fspath(storage)
    if not isinstance(storage, str):
        raise TypeError(
            f'{where} must be "shm", "memfd" or a directory path (str or '
            f"os.PathLike); got {_got(storage)} instead."
        )
    if storage in blocks.STORAGE_KINDS:
        if storage == "memfd" and not blocks.HAVE_MEMFD:
            raise ValueError(
                f'{where}="memfd" needs Linux (memfd_create, and /proc to hand the '
                f'blocks to workers); this system has not both. Use "shm" or a '
                f"directory path instead."
            )
        return storage
    expect = f'{where} must be "shm", "memfd" or an existing directory; got {storage!r}'
    if not storage:
        raise ValueError(f'{expect}. Leave it unset for "shm".')
    path = os.path.abspath(os.path.expanduser(storage))
    if not os.path.exists(path):
        close = difflib.get_close_matches(storage, blocks.STORAGE_KINDS, n=1)
        if close and os.sep not in storage:
            raise ValueError(f"{expect}: did you mean {close[0]!r}?")
        raise ValueError(
            f"{expect}, which does not exist. Create it first (os.makedirs), or pick another."
        )
    if not os.path.isdir(path):
        raise ValueError(
            f"{expect}, which is not a directory. Blocks are files "
            f"made inside a directory: pass one."
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(
            f"{expect}, where this user may not create files. Pass a directory you can write."
        )
    return path


class EngineOptions(NamedTuple):
    """A checked ``Engine(...)``."""

    workers: int
    start_method: str
    startup_timeout: float
    max_tasks: int | None
    max_memory: int | None
    initializer: tuple[bytes, bytes] | None
    wait: waiting.WaitPolicy
    storage: str


def engine_options(
    workers,
    start_method,
    max_tasks_per_worker,
    startup_timeout,
    initializer,
    initargs,
    max_worker_memory,
    wait,
    storage=None,
) -> EngineOptions:
    n = coerce_workers(workers)
    return EngineOptions(
        n,
        coerce_start_method(start_method),
        coerce_seconds(startup_timeout, "startup_timeout"),
        coerce_limit(
            max_tasks_per_worker, "max_tasks_per_worker", "tasks before a worker is replaced"
        ),
        coerce_limit(
            max_worker_memory,
            "max_worker_memory",
            "bytes of unique memory above which a worker is replaced between maps",
        ),
        pack_initializer(initializer, initargs),
        waiting.resolve(waiting.coerce_wait(wait), n, usable_cpus()),
        coerce_storage(storage),
    )


# -- allocation -------------------------------------------------------------------


def coerce_shape(shape: object) -> tuple[int, ...]:
    """
    >>> coerce_shape(5), coerce_shape((2, 3)), coerce_shape(())
    ((5,), (2, 3), ())
    >>> coerce_shape((2, -1))
    Traceback (most recent call last):
    ...
    ValueError: shape must not have negative sizes; got (2, -1) instead.
    """
    dims = (shape,) if is_int(shape) else shape
    if (
        not isinstance(dims, Sequence)
        or isinstance(dims, (str, bytes))
        or not all(is_int(d) for d in dims)
    ):
        raise TypeError(f"shape must be an int or a tuple of ints; got {shape!r} instead.")
    dims = tuple(int(d) for d in dims)
    if any(d < 0 for d in dims):
        raise ValueError(f"shape must not have negative sizes; got {shape!r} instead.")
    return dims


def coerce_order(order: object) -> Order:
    if order == "C" or order == "F":
        return order
    raise ValueError(f"order must be 'C' or 'F'; got {order!r} instead.")


_PLAIN_DTYPES: set[np.dtype] = set()  # already checked: 2 us saved per array


def coerce_dtype(dtype: npt.DTypeLike, what: str) -> np.dtype:
    """A dtype whose items are plain bytes: no Python objects, no records.

    >>> coerce_dtype("f4", "dtype")
    dtype('float32')
    >>> coerce_dtype(object, "dtype")
    Traceback (most recent call last):
    ...
    TypeError: dtype has dtype object; shared arrays hold plain numbers (bool, int, float, complex, datetime). Object arrays hold pointers into one process's heap and cannot be shared.
    """
    if isinstance(dtype, np.dtype) and dtype in _PLAIN_DTYPES:
        return dtype
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"{what}: {dtype!r} is not a NumPy dtype ({exc})") from None
    if dt.hasobject:
        raise TypeError(
            f"{what} has dtype {dt}; shared arrays hold plain numbers (bool, "
            f"int, float, complex, datetime). Object arrays hold pointers into "
            f"one process's heap and cannot be shared."
        )
    if dt.fields is not None or dt.subdtype is not None or dt.kind == "V":
        raise TypeError(
            f"{what} has the structured dtype {dt}; shared arrays hold plain "
            f"numbers. Use one array per field instead."
        )
    if dt.itemsize == 0:
        raise TypeError(
            f"{what} has the zero-size dtype {dt}; give strings a length "
            f"(for example 'S8' or 'U8')."
        )
    if isinstance(dtype, np.dtype):
        _PLAIN_DTYPES.add(dtype)
    return dt


# -- a call -----------------------------------------------------------------------


def check_kernel(kernel: object) -> None:
    """A callable that computes when called: not a generator function or a
    coroutine function, which would return an object and do nothing."""
    if not callable(kernel):
        raise TypeError(
            f"kernel must be callable: a numba @njit function or any "
            f"picklable callable; got {_got(kernel)} instead."
        )
    func = getattr(kernel, "py_func", kernel)
    what = (
        "a generator function"
        if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func)
        else "an async def function"
        if inspect.iscoroutinefunction(func)
        else None
    )
    if what is not None:
        name = getattr(func, "__qualname__", repr(kernel))
        raise TypeError(
            f"kernel {name} is {what}: calling it only makes a "
            f"{'generator' if 'generator' in what else 'coroutine'} and runs none "
            f"of its body, so the map would silently do nothing. Write the kernel "
            f"as a plain function that writes into its arrays (and returns a "
            f"value, for reduce)."
        )


# Opcodes of a Python loop: a for loop, or a jump back (while).
_LOOPS = frozenset(
    op
    for name, op in dis.opmap.items()
    if name in ("FOR_ITER", "JUMP_ABSOLUTE")
    or name.startswith(("JUMP_BACKWARD", "POP_JUMP_BACKWARD"))
)
# Functions already warned about (PythonKernelWarning is shown once per kernel).
_warned_kernels: weakref.WeakSet = weakref.WeakSet()


def _loops(code: types.CodeType) -> bool:
    """Whether ``code`` or a function nested in it runs a Python loop."""
    return any(i.opcode in _LOOPS for i in dis.get_instructions(code)) or any(
        _loops(c) for c in code.co_consts if isinstance(c, types.CodeType)
    )


def user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside
    shmarray: the user's call, however deep the engine's own calls are."""
    package = os.path.dirname(__file__) + os.sep
    here = inspect.currentframe()  # None where Python keeps no frames: level 2
    frame, level = here and here.f_back, 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level if here is not None else 2


def warn_python_kernel(kernel: object) -> None:
    """One PythonKernelWarning per plain Python kernel that loops: each chunk
    runs that loop in the interpreter, typically 10 to 100 times slower than
    numba's ``@njit``.  A kernel that only calls NumPy is fine as it is."""
    if type(kernel) is not types.FunctionType or kernel in _warned_kernels:
        return
    if not _loops(kernel.__code__):
        return
    _warned_kernels.add(kernel)
    warnings.warn(
        f"kernel {kernel.__qualname__} is a plain Python function with a loop: "
        f"every chunk runs it in the interpreter, typically 10 to 100 times "
        f"slower than the same loop compiled. Decorate it with numba's @njit "
        f"(from numba import njit), or silence this with warnings.filterwarnings("
        f"'ignore', category=shmarray.PythonKernelWarning) (shown once per kernel).",
        PythonKernelWarning,
        stacklevel=user_stacklevel(),
    )


def check_in_caller(dynamic: bool, boundary: object, tracked: int) -> None:
    """``prepare(in_caller=True)``: the caller runs one worker's share of a
    static map, between the ring and the wait; what needs the workers to
    coordinate between chunks or stages cannot include it."""
    why = (
        'schedule="dynamic" (workers take chunks from a shared counter)'
        if dynamic
        else "boundary= (workers fill ghost cells in stages, waiting for each other)"
        if boundary is not None
        else "retries= or errors='collect' (chunks are tracked and run again)"
        if tracked
        else None
    )
    if why is not None:
        raise ValueError(
            f"prepare(in_caller=True) runs one static share in the caller; it "
            f"cannot with {why}. Prepare without in_caller, or drop that option."
        )


def check_arity(kernel: object, n_arrays: int, n_args: int, method: str = "map") -> None:
    """Refuse a kernel whose parameters cannot take the arrays and args the
    call passes (numba would say so from a worker, at the first chunk).

    >>> def k(out, x, a): pass
    >>> check_arity(k, 2, 0)
    Traceback (most recent call last):
    ...
    TypeError: kernel k takes 3 parameters, but map passes it 2: 2 array(s) and 0 in args=(...). Pass what it takes after the arrays in args=(...), or add parameters.
    """
    func = getattr(kernel, "py_func", kernel)
    try:
        params = list(inspect.signature(func).parameters.values())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return  # a builtin, or a callable Python cannot describe
    kinds = inspect.Parameter
    positional = [
        p for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)
    ]
    required = sum(p.default is p.empty for p in positional)
    required_keywords = [
        p.name for p in params if p.kind == kinds.KEYWORD_ONLY and p.default is p.empty
    ]
    most = len(positional) if not any(p.kind == kinds.VAR_POSITIONAL for p in params) else None
    n = n_arrays + n_args
    name = getattr(func, "__qualname__", type(kernel).__name__)
    if required_keywords:
        raise TypeError(
            f"kernel {name} has keyword-only parameters without defaults "
            f"({', '.join(required_keywords)}); {method} passes arrays and args by "
            f"position only. Give them defaults, or make them positional."
        )
    if n < required or (most is not None and n > most):
        takes = (
            f"{required}"
            if most == required
            else f"{required} to {most}"
            if most
            else f"{required} or more"
        )
        raise TypeError(
            f"kernel {name} takes {takes} parameters, but {method} passes it {n}: "
            f"{n_arrays} array(s) and {n_args} in args=(...). Pass what it takes after "
            f"the arrays in args=(...), or add parameters."
        )


def check_combine(combine: object) -> Callable:
    if not callable(combine):
        raise TypeError(
            f"combine must be a callable taking two partial results "
            f"(default operator.add); got {_got(combine)} instead."
        )
    return combine


def coerce_halo(halo: object) -> int:
    """
    >>> coerce_halo(2)
    2
    >>> coerce_halo(-1)
    Traceback (most recent call last):
    ...
    ValueError: halo must be a non-negative int (rows on each side of a chunk); got -1 instead.
    """
    if not is_int(halo):
        raise TypeError(
            f"halo must be a non-negative int (rows on each side of a "
            f"chunk); got {_got(halo)} instead."
        )
    if halo < 0:
        raise ValueError(
            f"halo must be a non-negative int (rows on each side of a "
            f"chunk); got {halo!r} instead."
        )
    return int(halo)


def coerce_chunks(chunks: object) -> int | tuple[int, ...] | None:
    """None, a number of chunks, or a tuple of chunk sizes (any sequence of
    ints; whether they add up is checked against the rows later).

    >>> coerce_chunks(None), coerce_chunks(4), coerce_chunks([8, 8])
    (None, 4, (8, 8))
    >>> coerce_chunks(0)
    Traceback (most recent call last):
    ...
    ValueError: chunks must be at least 1; got 0. Pass a number of chunks, a sequence of chunk sizes, or None for one chunk per worker.
    """
    if chunks is None:
        return None
    if is_int(chunks):
        if chunks < 1:
            raise ValueError(
                f"chunks must be at least 1; got {chunks!r}. Pass a number "
                f"of chunks, a sequence of chunk sizes, or None for one "
                f"chunk per worker."
            )
        return int(chunks)
    if isinstance(chunks, (Sequence, np.ndarray)) and not isinstance(chunks, (str, bytes)):
        sizes = tuple(chunks)
        bad = [s for s in sizes if not is_int(s)]
        if bad:
            raise TypeError(f"chunk sizes must be ints; got {bad[0]!r} in chunks={chunks!r}.")
        bad = [s for s in sizes if s < 1]
        if bad:
            raise ValueError(
                f"chunk sizes must be positive ints; got {bad[0]!r} in chunks={chunks!r}."
            )
        return tuple(int(s) for s in sizes)
    raise TypeError(
        f"chunks must be None, an int or a sequence of ints; got {_got(chunks)} instead."
    )


def check_rows(n_rows: int, halo: int) -> tuple[int, int]:
    """The interior rows ``[halo, n_rows - halo)`` a map with this halo writes.

    >>> check_rows(10, 1)
    (1, 9)
    >>> check_rows(3, 2)
    Traceback (most recent call last):
    ...
    ValueError: halo=2 needs arrays of at least 4 rows (2 on each side); they have 3. Use a smaller halo or larger arrays.
    """
    if n_rows < 2 * halo:
        raise ValueError(
            f"halo={halo} needs arrays of at least {2 * halo} rows ({halo} on each "
            f"side); they have {n_rows}. Use a smaller halo or larger arrays."
        )
    return halo, n_rows - halo


def check_sizes(sizes: tuple[int, ...], start: int, stop: int, halo: int) -> list[int]:
    """Chunk sizes must add up to the interior rows ``[start, stop)``."""
    rows = stop - start
    if sum(sizes) != rows:
        raise ValueError(
            f"chunks={sizes!r} adds up to {sum(sizes)} rows, but there are {rows} "
            f"rows to split (rows {start} to {stop} with halo={halo}). Pass sizes "
            f"that add up to {rows}, or a number of chunks."
        )
    return list(sizes)


def coerce_schedule(schedule: object) -> bool:
    """True for dynamic scheduling.

    >>> coerce_schedule("static"), coerce_schedule("dynamic")
    (False, True)
    """
    if schedule not in ("static", "dynamic") or not isinstance(schedule, str):
        raise ValueError(
            f"schedule must be 'static' (the same rows to the same worker every "
            f"call) or 'dynamic' (chunks to whichever worker is free); got "
            f"{schedule!r} instead."
        )
    return schedule == "dynamic"


def coerce_timeout(timeout: object) -> float | None:
    """
    >>> coerce_timeout(None), coerce_timeout(2), coerce_timeout(float("inf"))
    (None, 2.0, None)
    """
    if timeout is None:
        return None
    if not isinstance(timeout, numbers.Real) or isinstance(timeout, bool):
        raise TypeError(
            f"timeout must be a number of seconds or None; got {_got(timeout)} instead."
        )
    seconds = float(timeout)
    if not seconds > 0:  # NaN too
        raise ValueError(f"timeout must be positive (seconds); got {timeout!r} instead.")
    return None if seconds == math.inf else seconds


def coerce_progress(progress: object) -> bool | None:
    if progress is not None and progress is not True and progress is not False:
        raise TypeError(
            f"progress must be True, False or None (show after about a "
            f"second); got {_got(progress)} instead."
        )
    return progress


def coerce_axis(axis: object, arrays: tuple) -> int:
    """The split axis, counted from the end when negative (by the first
    array's dimensions).

    >>> coerce_axis(-1, (np.zeros((2, 3)),))
    1
    """
    if not is_int(axis):
        raise TypeError(f"axis must be an int; got {_got(axis)} instead.")
    ndim = arrays[0].ndim if arrays and hasattr(arrays[0], "ndim") else 1
    if not -ndim <= axis < max(ndim, 1):
        raise ValueError(
            f"axis {axis} is out of range for an array of {ndim} "
            f"dimension(s); use 0 to {ndim - 1} (or -{ndim} to -1)."
        )
    return int(axis) % max(ndim, 1)


def coerce_steps(steps: object) -> int:
    """
    >>> coerce_steps(10)
    10
    >>> coerce_steps(-1)
    Traceback (most recent call last):
    ...
    ValueError: steps must be a non-negative int below 5592405; got -1 instead.
    """
    if not is_int(steps):
        raise TypeError(
            f"steps must be an int (how many steps to run); got {_got(steps)} instead."
        )
    if not 0 <= steps < control.STEP_LIMIT // 3:
        raise ValueError(
            f"steps must be a non-negative int below "
            f"{control.STEP_LIMIT // 3}; got {steps!r} instead."
        )
    return int(steps)


def coerce_retries(value: object) -> int:
    """
    >>> coerce_retries(0), coerce_retries(3)
    (0, 3)
    """
    if not is_int(value):
        raise TypeError(
            f"retries must be an int >= 0 (runs again of a chunk whose "
            f"worker crashed or timed out); got {_got(value)} instead."
        )
    if value < 0:
        raise ValueError(
            f"retries must be an int >= 0 (runs again of a chunk whose "
            f"worker crashed or timed out); got {value!r} instead."
        )
    return int(value)


def coerce_errors(value: object) -> bool:
    """True for "collect".

    >>> coerce_errors("raise"), coerce_errors("collect")
    (False, True)
    """
    if type(value) is str and value in ("raise", "collect"):
        return value == "collect"
    raise ValueError(
        f'errors must be "raise" (the first failure raises) or '
        f'"collect" (every chunk that can run does, and the call '
        f"returns a MapReport); got {value!r} instead."
    )


def check_trackable(n_chunks: int) -> None:
    if n_chunks > control.BOARD_CHUNKS:
        raise ValueError(
            f'a map with retries, errors="collect" or imap keeps one byte per '
            f"chunk in the control block, room for {control.BOARD_CHUNKS} chunks; "
            f"this one has {n_chunks}. Pass fewer chunks (chunks=...)."
        )


def check_placeholders(args: tuple) -> None:
    """``shmarray.row_offset`` and ``worker_id`` are filled in only where
    they stand directly in ``args``."""
    for i, a in enumerate(args):
        if isinstance(a, (tuple, list, dict, set)) and any(
            v is row_offset or v is worker_id for v in (a.values() if isinstance(a, dict) else a)
        ):
            raise ValueError(
                f"args[{i}] holds shmarray.row_offset or shmarray.worker_id "
                f"inside a container, where it cannot be filled in; pass it "
                f"directly in args."
            )


def check_swappable(out: np.ndarray, inp: np.ndarray) -> None:
    """``iterate`` swaps its first two arrays: they must be interchangeable."""
    if out.shape != inp.shape or out.dtype != inp.dtype:
        raise ValueError(
            f"iterate swaps out and inp after every step, so they need the same "
            f"shape and dtype; got {out.shape} {out.dtype} and {inp.shape} "
            f"{inp.dtype}."
        )
    if np.shares_memory(out, inp):
        raise ValueError(
            "iterate needs out and inp to be separate arrays (double "
            "buffering); they overlap in memory."
        )


# -- boundary= --------------------------------------------------------------------


def coerce_boundary(boundary: object) -> Boundary | None:
    """
    >>> coerce_boundary("wrap"), coerce_boundary(None)
    (Boundary(mode='wrap', value=0.0), None)
    >>> coerce_boundary(0.5)
    Boundary(mode='constant', value=0.5)
    >>> coerce_boundary("periodic")
    Traceback (most recent call last):
    ...
    ValueError: boundary must be None, 'wrap', 'reflect', 'symmetric', 'edge' or a number (a constant), as in numpy.pad; got 'periodic' instead.
    """
    if boundary is None:
        return None
    if isinstance(boundary, str) and boundary in MODES:
        return Boundary(str(boundary))
    if isinstance(boundary, numbers.Number) and not isinstance(boundary, (bool, np.bool_)):
        # numpy scalars become Python numbers; any other number is kept as given
        value: Any = boundary.item() if isinstance(boundary, np.generic) else boundary
        return Boundary("constant", value)
    raise ValueError(
        f"boundary must be None, 'wrap', 'reflect', 'symmetric', 'edge' or a "
        f"number (a constant), as in numpy.pad; got {boundary!r} instead."
    )


def check_constant(value: complex, dtype: np.dtype, what: str) -> None:
    """A constant ``boundary=`` must fit ``dtype`` exactly, as numpy.pad
    demands: no NaN or fraction in integers, nothing out of range, no
    imaginary part in a real array.

    >>> check_constant(-1, np.dtype("u1"), "array 0")
    Traceback (most recent call last):
    ...
    ValueError: boundary=-1 does not fit array 0's dtype uint8 (it holds 0 to 255); numpy.pad refuses it too. Pass a constant the dtype can hold, or use an array of a wider dtype.
    """

    def refuse(holds: str) -> NoReturn:
        raise ValueError(
            f"boundary={value!r} does not fit {what}'s dtype {dtype} ({holds}); "
            f"numpy.pad refuses it too. Pass a constant the dtype can hold, or "
            f"use an array of a wider dtype."
        )

    kind = dtype.kind
    if kind == "c":
        return
    if isinstance(value, complex) and value.imag != 0:
        refuse("it holds real numbers")
    real = value.real if isinstance(value, complex) else value
    if kind in "iu":
        info = np.iinfo(dtype)
        if not (
            isinstance(real, numbers.Integral)
            or (
                isinstance(real, numbers.Real) and math.isfinite(real) and float(real).is_integer()
            )
        ):
            refuse(f"it holds whole numbers from {info.min} to {info.max}")
        if not info.min <= int(real) <= info.max:
            refuse(f"it holds {info.min} to {info.max}")
    elif kind == "b":
        if real not in (0, 1):
            refuse("it holds True and False: 0 or 1")
    elif kind == "f":
        if math.isfinite(real) and abs(real) > float(np.finfo(dtype).max):
            refuse(f"it holds at most {float(np.finfo(dtype).max):g}")
    else:
        refuse("a constant boundary needs a numeric array")


def check_ghosts(shape: tuple[int, ...], halo: int, b: Boundary, what: str) -> None:
    """Every axis needs room for ``halo`` ghost cells on each side and an
    interior the mode can draw from.

    >>> check_ghosts((10, 3), 1, Boundary("reflect"), "array 0")
    Traceback (most recent call last):
    ...
    ValueError: array 0 has 3 cells along axis 1: with halo=1 ghost cells on each side its interior has 1, and boundary='reflect' needs at least 2. Allocate each axis as interior + 2*halo, with an interior of at least 2.
    """
    said = b.mode if b.mode != "constant" else b.value
    if halo < 1:
        raise ValueError(
            f"boundary={said!r} needs halo >= 1: the ghost cells it fills are the "
            f"halo on each side of every axis; got halo={halo}."
        )
    need = {"reflect": halo + 1, "constant": 0}.get(b.mode, halo)
    need = max(need, 1)
    for k, n in enumerate(shape):
        if n - 2 * halo < need:
            raise ValueError(
                f"{what} has {n} cells along axis {k}: with halo={halo} ghost "
                f"cells on each side its interior has {max(n - 2 * halo, 0)}, "
                f"and boundary={said!r} needs at least {need}. Allocate each "
                f"axis as interior + 2*halo, with an interior of at least {need}."
            )


def check_boundary(b: Boundary, arrays: tuple, halo: int) -> None:
    for i, a in enumerate(arrays):
        check_ghosts(a.shape, halo, b, where(i))
        if b.mode == "constant":
            check_constant(b.value, a.dtype, where(i))


# -- arrays and args --------------------------------------------------------------


_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")


def where(i: int) -> str:
    """How messages name the ``i``-th array, as the caller wrote the call.

    >>> where(0), where(1), where(9)
    ('array 0 (the first argument after the kernel)', 'array 1 (the second argument after the kernel)', 'array 9 (argument 10 after the kernel)')
    """
    if i < len(_ORDINALS):
        return f"array {i} (the {_ORDINALS[i]} argument after the kernel)"
    return f"array {i} (argument {i + 1} after the kernel)"


def describe_arrays(
    arrays: tuple, table, axis: int = 0, method: str = "map"
) -> tuple[ArrayDescriptor, ...]:
    """The arrays' descriptors: each a shared array of this engine, with the
    split axis, all of one length along it."""
    from shmarray.blocks import blocks_of_other_engines

    if not arrays:
        raise TypeError(f"{method} needs at least one array after the kernel.")
    out = []
    for i, a in enumerate(arrays):
        if not isinstance(a, np.ndarray):
            raise TypeError(
                f"{where(i)} is a {type(a).__name__}; pass NumPy arrays made "
                f"by this engine (eng.empty, eng.zeros, eng.from_numpy). Extra "
                f"scalar arguments go in args=(...)."
            )
        if a.ndim <= axis:
            raise ValueError(
                f"{where(i)} has {a.ndim} dimension(s); {method} splits axis "
                f"{axis}, so every array needs at least {axis + 1}. Pass "
                f"scalars in args=(...)."
            )
        if a.dtype not in _PLAIN_DTYPES:
            coerce_dtype(a.dtype, where(i))
        d = describe(a, table)
        if d is None:
            check_not_elsewhere(a, where(i), table, blocks_of_other_engines)
            raise ValueError(
                f"{where(i)} is a private array: its memory is not in this "
                f"engine's shared blocks, so workers cannot see it. Copy it "
                f"in with eng.from_numpy(a), or allocate with eng.empty / "
                f"eng.zeros."
            )
        out.append(d)
    n = arrays[0].shape[axis]
    if any(a.shape[axis] != n for a in arrays):
        raise ValueError(
            f"all arrays must have the same length along axis {axis} ({method} "
            f"splits it); got lengths {[a.shape[axis] for a in arrays]}."
        )
    return tuple(out)


# A private array in args travels by pickle with every call: past this size
# that costs more than the map (a 128 MB array: 1070 ms a map, against 91 ms
# for the same array shared).
COPY_WARNING_BYTES = 1 << 20


def coerce_args(args: object) -> tuple:
    if not isinstance(args, (tuple, list)):
        raise TypeError(
            f"args must be a tuple of extra kernel arguments; got "
            f"{_got(args)}. Write args=({args!r},) for one."
        )
    return args if type(args) is tuple else tuple(args)


def describe_args(args: tuple, table) -> tuple:
    """Extra kernel arguments.  Shared arrays travel as descriptors and reach
    the kernel whole; anything else is pickled with every call, so keep it
    small: a private array over ``COPY_WARNING_BYTES`` gets a CopyWarning,
    once per engine."""
    from shmarray.blocks import blocks_of_other_engines, format_bytes

    out = []
    for i, a in enumerate(args):
        if isinstance(a, np.ndarray) and a.ndim > 0:
            d = describe(a, table)
            if d is not None:
                a = d
            else:
                check_not_elsewhere(a, f"args[{i}]", table, blocks_of_other_engines)
                if a.nbytes > COPY_WARNING_BYTES and not table.warned_copy:
                    table.warned_copy = True
                    warnings.warn(
                        f"args[{i}] is a private array of "
                        f"{format_bytes(a.nbytes)}: it is pickled and sent to the "
                        f"workers with every call, and writes to it are lost. "
                        f"Copy it into shared memory once with "
                        f"shared = eng.from_numpy(a) and pass that instead "
                        f"(shown once per engine).",
                        CopyWarning,
                        stacklevel=user_stacklevel(),
                    )
        out.append(a)
    check_placeholders(args)
    return tuple(out)


def check_not_elsewhere(a: np.ndarray, what: str, table, others) -> None:
    """Refuse an array that lives in *another* engine's shared memory: this
    engine's workers would get a copy, and the kernel's writes would be
    lost."""
    other = others(a, table)
    if other is not None:
        raise ValueError(
            f"{what} lives in another Engine's shared memory (block "
            f"{other.name}); this engine's workers cannot map it, and a copy "
            f"would lose what the kernel writes. Use arrays of the engine "
            f"that runs the map: copy it over with eng.from_numpy(a)."
        )


class MapOptions(TypedDict, total=False):
    """The keywords of every call that runs a map, in one place: ``map``,
    ``reduce``, ``imap``, ``prepare``, ``submit`` and the async forms take
    them as ``**options: Unpack[MapOptions]`` (so a type checker names a
    misspelt keyword), and ``call_options`` checks them at run time.  A
    new option is added here, and to ``CallOptions`` if it defines a job.
    (``errors`` is a parameter of its own: what ``map`` returns depends on
    it.)"""

    args: Sequence[Any]
    halo: int
    chunks: int | Sequence[int] | None
    timeout: float | None
    schedule: Schedule
    progress: bool | None
    boundary: BoundaryMode
    axis: int
    retries: int


class ReduceOptions(MapOptions, total=False):
    """``MapOptions`` and how the chunks' values combine (``reduce``,
    ``imap``)."""

    combine: Callable[[Any, Any], Any]


class IterateOptions(TypedDict, total=False):
    """The keywords of ``Engine.iterate``: ``MapOptions`` without those a
    loop of steps cannot take (``schedule``, ``retries``)."""

    args: Sequence[Any]
    halo: int
    chunks: int | Sequence[int] | None
    timeout: float | None
    progress: bool | None
    boundary: BoundaryMode
    axis: int


class CheckOptions(TypedDict, total=False):
    """The keywords of ``Engine.check``: what defines a map's chunks."""

    args: Sequence[Any]
    halo: int
    chunks: int | Sequence[int] | None
    boundary: BoundaryMode
    axis: int


class CallOptions(NamedTuple):
    """The keywords of a map, reduce, imap or iterate, as given (checked
    once per job: see ``shmarray.jobs``)."""

    halo: Any = 0
    chunks: Any = None
    schedule: Any = "static"
    axis: Any = 0
    boundary: Any = None
    timeout: Any = None
    progress: Any = None
    retries: Any = 0
    errors: Any = "raise"


_KEYWORDS = {
    "map": frozenset(MapOptions.__annotations__),
    "reduce": frozenset(ReduceOptions.__annotations__),
    "iterate": frozenset(IterateOptions.__annotations__),
    "check": frozenset(CheckOptions.__annotations__),
}
# The keywords each Engine method takes besides its **options (a test
# holds this to the signatures).
_OWN_KEYWORDS = {
    "map": frozenset({"errors", "check"}),
    "reduce": frozenset({"errors", "check"}),
    "prepare": frozenset({"errors", "in_caller"}),
    "imap": frozenset({"errors"}),
    "submit": frozenset({"errors"}),
    "submit_reduce": frozenset({"errors"}),
}
_PLAIN_OPTIONS = {"raise": CallOptions(), "collect": CallOptions(errors="collect")}


F = TypeVar("F", bound=Callable[..., Any])


def suggest_keywords(func: F) -> F:
    """``func`` with Python's "unexpected keyword argument" TypeError
    completed by the closest keyword it takes, as ``map()`` says it; any
    other TypeError passes unchanged.  Costs nothing until it fails.

    >>> @suggest_keywords
    ... def engine(workers=None, *, storage=None): pass
    >>> engine(wokers=2)
    Traceback (most recent call last):
    ...
    TypeError: engine() got an unexpected keyword argument 'wokers'; did you mean 'workers'?
    """
    signature = inspect.signature(func)
    known = {
        name
        for name, p in signature.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    title = func.__qualname__.replace(".__init__", "")

    @functools.wraps(func)
    def checked(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except TypeError:
            unknown = [name for name in kwargs if name not in known]
            if not unknown:
                raise
            name = unknown[0]
            close = difflib.get_close_matches(name, known - {"self"}, n=1)
            hint = (
                f"; did you mean {close[0]!r}?"
                if close
                else f" (it takes {sorted(known - {'self'})})"
            )
            raise TypeError(
                f"{title}() got an unexpected keyword argument {name!r}{hint}"
            ) from None

    return cast(F, checked)


def call_options(
    method: str, kind: str, given: Mapping[str, Any], errors: object = "raise"
) -> tuple:
    """``(args, options)`` from the keywords ``method`` was given
    (``kind``: "map", "reduce" or "iterate": which ``*Options`` it takes).
    Takes ``args`` (and ``combine``) out of ``given``.  An unknown keyword
    is a TypeError, as Python's own, with the closest known one.

    >>> call_options("map", "map", {"halo": 1, "args": (2.0,)})
    ((2.0,), CallOptions(halo=1, chunks=None, schedule='static', axis=0, boundary=None, timeout=None, progress=None, retries=0, errors='raise'))
    >>> call_options("map", "map", {"chunk": 4})
    Traceback (most recent call last):
    ...
    TypeError: map() got an unexpected keyword argument 'chunk'; did you mean 'chunks'?
    """
    if not given:
        plain = _PLAIN_OPTIONS.get(errors)  # type: ignore[call-overload]
        if plain is not None:
            return (), plain
    given = cast(dict[str, Any], given)  # a call's own **kwargs: ours to change
    args = given.pop("args", ())
    if not given:  # args alone: the commonest call of a loop
        plain = _PLAIN_OPTIONS.get(errors)  # type: ignore[call-overload]
        if plain is not None:
            return args, plain
    given.pop("combine", None)
    if kind in ("map", "reduce"):  # their keywords are CallOptions's fields
        try:
            return args, CallOptions(errors=errors, **given)
        except TypeError:
            pass
    known = _KEYWORDS[kind]
    if given.keys() <= known:
        return args, CallOptions(errors=errors, **given)
    takes = known | _OWN_KEYWORDS.get(method, frozenset())
    for name in given:
        if name not in known:
            close = difflib.get_close_matches(name, takes, n=1)
            if name == "in_caller":
                hint = (
                    ": the caller computes a share of a prepared map only, "
                    "eng.prepare(kernel, *arrays, ..., in_caller=True)"
                )
            elif close:
                hint = f"; did you mean {close[0]!r}?"
            else:
                hint = f" (it takes {sorted(takes)})"
            raise TypeError(f"{method}() got an unexpected keyword argument {name!r}{hint}")
    raise AssertionError(f"CallOptions refused {sorted(given)}")  # fields = keywords
