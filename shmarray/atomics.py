"""The machine's primitives under the control block: atomic loads, stores
and adds, spin hints, and sleeping on a word.  ``shmarray.control`` builds
the protocol from these; nothing else should call them.

Each is a numba intrinsic (numba's public ``numba.extending.intrinsic``
API): LLVM instructions inlined into the compiled function that calls it,
so a spin costs no call.  None checks its index: the caller passes one in
range.  What each guarantees:

=================================  =========================================
primitive                          guarantee
=================================  =========================================
``_load(a, i)``                    a sequentially consistent atomic load of
                                   ``a[i]`` (an int64 word or a uint8 byte)
``_store(a, i, v)``                a sequentially consistent atomic store of
                                   ``v``, cast to ``a``'s element type
``_fetch_add(a, i, v)``            a sequentially consistent atomic
                                   ``a[i] += v`` (int64 words only); returns
                                   the value before: no add is lost, however
                                   many threads or processes add at once
``_relax()``                       a spin hint (x86 PAUSE: less power, no
                                   pipeline flush when the word changes);
                                   nothing elsewhere.  Orders nothing
``_sched_yield()``                 gives the CPU to another runnable thread,
                                   if any.  Orders nothing
``_futex(a, i, op, v, timeout)``   Linux ``futex`` on the low 32 bits of
                                   word ``a[i]``: FUTEX_WAIT sleeps while
                                   they equal ``v`` (the kernel compares
                                   before sleeping, so a write that lands
                                   first is never slept through), until
                                   woken or ``timeout`` ns pass (<= 0: none);
                                   FUTEX_WAKE wakes up to ``v`` sleepers.
                                   Only where ``SYS_FUTEX >= 0``
``_usleep(us)``                    sleeps ``us`` microseconds (POSIX)
``_now_ns()``                      ``CLOCK_MONOTONIC`` in nanoseconds (a
                                   vDSO call on Linux: no system call)
=================================  =========================================

Sequentially consistent: all such operations, of every thread of every
process that maps the block, fall in one total order that keeps each
thread's program order.  That is what Dekker's pattern needs (publish "I
sleep", then re-read the word; the waker writes the word, then reads the
flag: at least one of the two sees the other), which acquire and release
alone do not give.  It holds across processes because these are the CPU's
own lock-free instructions on the shared mapping (8-byte and 1-byte atomics
are lock-free on x86-64 and AArch64), and on weakly ordered CPUs (ARM) too,
where LLVM adds the barriers.

Sleeping on a word falls back where futexes are not known: ``SYS_FUTEX`` is
-1 off Linux, on a big-endian machine (the futex word would be the int64's
high half), and on a CPU whose futex call number is not in the table below.
There a sleeper naps a fixed time with ``_usleep`` and looks again, and a
waker has nobody to wake: no wake-up is lost either way, a sleeper only
sees it up to a nap later.  Callers test ``SYS_FUTEX >= 0``, a constant
when they are compiled, so the branch not taken costs nothing.  A futex
wait may also return early (a signal, the word already changed): every
caller re-reads its word after it.

The platform is decided here, once, at import (``_PAUSE``, ``SYS_FUTEX``,
``_CLOCK``), as ``shmarray.blocks`` decides the storage's.

Caching: ``control``'s functions are compiled with ``cache=True`` and
inline these.  numba checks a cached function against its own source file
only, so ``control.py`` carries this file's hash (``_ATOMICS_SHA256``): an
edit here must update it (``tests/test_protocol_text.py`` fails until it
does), and that change to ``control.py`` is what makes numba compile
again rather than serve the old machine code.
"""

from __future__ import annotations

import platform
import sys
import time

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# -- atomic words and bytes ----------------------------------------------------


def _element(context, builder, array_type, array, index):
    ary = context.make_array(array_type)(context, builder, array)
    return builder.gep(ary.data, [index])


def _width(array_type) -> int:
    return array_type.dtype.bitwidth // 8


@intrinsic
def _load(typingctx, array, index):
    def codegen(context, builder, sig, args):
        ptr = _element(context, builder, sig.args[0], *args)
        return builder.load_atomic(ptr, "seq_cst", _width(sig.args[0]))

    return array.dtype(array, index), codegen


@intrinsic
def _store(typingctx, array, index, value):
    def codegen(context, builder, sig, args):
        ptr = _element(context, builder, sig.args[0], args[0], args[1])
        val = context.cast(builder, args[2], sig.args[2], sig.args[0].dtype)
        builder.store_atomic(val, ptr, "seq_cst", _width(sig.args[0]))
        return context.get_dummy_value()

    return types.void(array, index, value), codegen


@intrinsic
def _fetch_add(typingctx, array, index, value):
    def codegen(context, builder, sig, args):
        ptr = _element(context, builder, sig.args[0], args[0], args[1])
        return builder.atomic_rmw("add", ptr, args[2], "seq_cst")

    return types.int64(array, index, value), codegen


# -- spinning ------------------------------------------------------------------

# x86's PAUSE tells the core it is spinning (less power, no memory-order
# flush when the word changes).  Other CPUs spin without a hint.
_PAUSE = (
    "llvm.x86.sse2.pause"
    if platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
    else None
)


@intrinsic
def _relax(typingctx):
    def codegen(context, builder, sig, args):
        if _PAUSE is not None:
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), []), _PAUSE
            )
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def _sched_yield(typingctx):
    # POSIX sched_yield, resolved from the C library already in the process
    # (a ctypes pointer would stop numba from caching the machine code).
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield"
        )
        builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


# -- sleeping on a word ----------------------------------------------------------

# Linux's futex call number, by CPU.  Little-endian only: the futex word is
# the int64's first four bytes, its low half there.
_FUTEX_CALLS = {"x86_64": 202, "amd64": 202, "aarch64": 98, "arm64": 98}
SYS_FUTEX = (
    _FUTEX_CALLS.get(platform.machine().lower(), -1)
    if sys.platform.startswith("linux") and sys.byteorder == "little"
    else -1
)
FUTEX_WAIT, FUTEX_WAKE = 0, 1  # shared (not FUTEX_PRIVATE): across processes


@intrinsic
def _futex(typingctx, array, index, op, value, timeout_ns):
    """``syscall(SYS_futex, &array[index], op, value, timeout, NULL, 0)`` on
    the word's low 32 bits (little-endian: its first four bytes); a
    timeout of 0 or less means none (FUTEX_WAKE ignores it)."""

    def codegen(context, builder, sig, args):
        ary, idx, op_, val, tmo = args
        i64, i32 = ir.IntType(64), ir.IntType(32)
        ptr = builder.bitcast(_element(context, builder, sig.args[0], ary, idx), i32.as_pointer())
        spec = ir.LiteralStructType([i64, i64])
        ts = cgutils.alloca_once(builder, spec)
        billion = ir.Constant(i64, 1_000_000_000)
        builder.store(
            builder.sdiv(tmo, billion), builder.gep(ts, [ir.Constant(i32, 0), ir.Constant(i32, 0)])
        )
        builder.store(
            builder.srem(tmo, billion), builder.gep(ts, [ir.Constant(i32, 0), ir.Constant(i32, 1)])
        )
        voidp = ir.IntType(8).as_pointer()
        tsp = builder.select(
            builder.icmp_signed(">", tmo, ir.Constant(i64, 0)),
            builder.bitcast(ts, voidp),
            ir.Constant(voidp, None),
        )
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(i64, [i64], var_arg=True), "syscall"
        )
        return builder.call(
            fn,
            [
                ir.Constant(i64, SYS_FUTEX),
                builder.bitcast(ptr, voidp),
                builder.trunc(op_, i32),
                builder.trunc(val, i32),
                tsp,
                ir.Constant(voidp, None),
                ir.Constant(i32, 0),
            ],
        )

    return types.int64(array, index, op, value, timeout_ns), codegen


@intrinsic
def _usleep(typingctx, microseconds):
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.IntType(32), [ir.IntType(32)]), "usleep"
        )
        builder.call(fn, [builder.trunc(args[0], ir.IntType(32))])
        return context.get_dummy_value()

    return types.void(microseconds), codegen


# -- time ------------------------------------------------------------------------

_CLOCK = getattr(time, "CLOCK_MONOTONIC", 1)


@intrinsic
def _now_ns(typingctx):
    """``clock_gettime(CLOCK_MONOTONIC)`` in nanoseconds (a vDSO call on
    Linux: no system call)."""

    def codegen(context, builder, sig, args):
        i64, i32 = ir.IntType(64), ir.IntType(32)
        spec = ir.LiteralStructType([i64, i64])
        ts = cgutils.alloca_once(builder, spec)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(i32, [i32, spec.as_pointer()]), "clock_gettime"
        )
        builder.call(fn, [ir.Constant(i32, _CLOCK), ts])
        sec = builder.load(builder.gep(ts, [ir.Constant(i32, 0), ir.Constant(i32, 0)]))
        nsec = builder.load(builder.gep(ts, [ir.Constant(i32, 0), ir.Constant(i32, 1)]))
        return builder.add(builder.mul(sec, ir.Constant(i64, 1_000_000_000)), nsec)

    return types.int64(), codegen
