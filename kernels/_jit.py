"""Compilation options for every kernel, kept in one place.

* ``cache=True``: workers import kernels by name and load the machine code
  from numba's on-disk cache instead of compiling again.
* ``nogil=True``: the same kernels run under Dask's threaded scheduler.
* No ``fastmath``: results must match NumPy and be bit-identical between a
  sequential run and any chunking.
"""

import numba

jit = numba.njit(cache=True, nogil=True)
