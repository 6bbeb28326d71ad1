"""Kernels whose cost varies from row to row: give them
``schedule="dynamic"``."""

from shmarray.kernels._jit import jit

# A building block of the kernels below (one row), not a kernel.
HELPERS = ("escape_row",)


@jit
def escape_row(row, x0, dx, ci, max_iter):
    """One row of :func:`mandelbrot`, at imaginary part ``ci``: the shared
    inner loops of every Mandelbrot variant (the benchmarks' peers too)."""
    for j in range(row.shape[0]):
        cr = x0 + j * dx
        zr, zi = 0.0, 0.0
        k = 0
        while k < max_iter and zr * zr + zi * zi <= 4.0:
            zr, zi = zr * zr - zi * zi + cr, 2.0 * zr * zi + ci
            k += 1
        row[j] = k


@jit
def mandelbrot(out, row_offset, x0, dx, y0, dy, max_iter):
    """Escape-time Mandelbrot: ``out[i, j]`` is the number of iterations
    (up to ``max_iter``) before ``z -> z*z + c`` leaves the radius-2 disk,
    with ``c = (x0 + j*dx) + 1j*(y0 + (row_offset + i)*dy)``.

    ``row_offset`` is the global index of ``out``'s first row, so the
    kernel knows where its chunk lies: 0 sequentially,
    ``shmarray.row_offset`` through the engine.

    Sequential: ``mandelbrot(img, 0, -2.0, 3/w, -1.5, 3/h, 300)``.
    Engine:     ``eng.map(mandelbrot, img, args=(shmarray.row_offset, -2.0, 3/w,
                -1.5, 3/h, 300), schedule="dynamic")``.
    """
    for i in range(out.shape[0]):
        escape_row(out[i], x0, dx, y0 + (row_offset + i) * dy, max_iter)
