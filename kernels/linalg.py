"""Dense linear algebra by rows."""

from shmarray.kernels._jit import jit

_BLOCK = 64  # columns of A (rows of B) per pass, so a block of B stays in cache
_TILE = 32  # a transpose moves 32 x 32 tiles


@jit
def matmul_rows(c, a, b):
    """``c = a @ b`` for the rows given: rows of ``c`` come from the same
    rows of ``a`` and all of ``b`` (pass ``b`` in ``args``, where a shared
    array travels whole).  Blocked over the inner dimension.

    Sequential: ``matmul_rows(c, a, b)``.
    Engine:     ``eng.map(matmul_rows, c, a, args=(b,))``.
    """
    n, k = a.shape
    m = b.shape[1]
    for i in range(n):
        for j in range(m):
            c[i, j] = 0.0
    for kk in range(0, k, _BLOCK):
        kend = min(kk + _BLOCK, k)
        for i in range(n):
            for p in range(kk, kend):
                aip = a[i, p]
                for j in range(m):
                    c[i, j] += aip * b[p, j]


@jit
def transpose_rows(inp, out, row_offset):
    """``out = inp.T`` by blocks of rows: the rows of ``inp`` given become
    the same columns of ``out`` (pass ``out`` whole in ``args``; chunks
    write disjoint columns).  Tiled so both sides stay in cache.

    Sequential: ``transpose_rows(a, at, 0)``.
    Engine:     ``eng.map(transpose_rows, a, args=(at, shmarray.row_offset))``.
    """
    n, m = inp.shape
    for jj in range(0, m, _TILE):
        jend = min(jj + _TILE, m)
        for ii in range(0, n, _TILE):
            iend = min(ii + _TILE, n)
            for i in range(ii, iend):
                for j in range(jj, jend):
                    out[j, row_offset + i] = inp[i, j]
