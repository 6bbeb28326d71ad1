"""Compilation options for every kernel, kept in one place.

* ``cache=True``: workers import kernels by name and load the machine code
  from numba's on-disk cache instead of compiling again.  Decided on
  purpose: several workers may compile the same kernel at once on a cold
  cache, and numba writes each cache file to a unique temporary file first,
  then renames it into place, so the last write only repeats the first.
  (Concurrent compiles have corrupted caches of ``@guvectorize`` functions,
  which keep two files, numba#4807 and #10128; the library has none.)
* ``nogil=True``: the same kernels run under Dask's threaded scheduler.
* No ``fastmath``: results must match NumPy and be bit-identical between a
  sequential run and any chunking.
* ``jit_inline``: a row loop that a kernel and its ``prange`` peer share,
  inlined into both at numba's level, so the two give the same bits.
* ``jit_parallel``: the ``prange`` peers, threads over rows.  Their cache
  is safe because the row loops they call live in the same file (numba's
  cache notices a change there, not in another file).
"""

import numba

jit = numba.njit(cache=True, nogil=True)
jit_inline = numba.njit(cache=True, nogil=True, inline="always")
jit_parallel = numba.njit(cache=True, nogil=True, parallel=True)
