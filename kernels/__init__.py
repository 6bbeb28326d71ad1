"""A library of numba kernels for shmarray.

Every kernel is a plain ``@njit`` loop body that writes into its output in
place and allocates nothing, so the same function runs sequentially on whole
arrays and, through ``Engine.map`` / ``Engine.reduce``, on chunks of rows.
"""
