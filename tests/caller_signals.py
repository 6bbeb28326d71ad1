"""A kernel that signals its own process from compiled code, for
``test_in_caller``: libc's ``kill`` and ``getpid`` through ctypes, which
numba calls in nopython mode.  It lives in a module (workers import it by
name) because ctypes functions cannot be pickled with a kernel."""

from __future__ import annotations

import ctypes
import signal

from numba import njit

_libc = ctypes.CDLL(None, use_errno=True)
kill = _libc.kill
kill.argtypes, kill.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
getpid = _libc.getpid
getpid.argtypes, getpid.restype = [], ctypes.c_int
SIGINT = int(signal.SIGINT)


@njit
def interrupt_the_caller(out, first, caller):
    """Rows from ``first``: in the process ``caller`` (the caller's share),
    send it SIGINT first; then write 1.0.  Python answers the signal only
    when the compiled kernel returns, so the rows are written either way."""
    if getpid() == caller:
        kill(caller, SIGINT)
    out[:] = 1.0
