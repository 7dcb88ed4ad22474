"""The compiled loops behind :mod:`dnmf.kernels.stacked` (numba; imported on first use).

Both walk a CSR block's non-zeros slab by slab of V's columns, keeping a cursor per row: in
a slab, row i's non-zeros from its cursor up to the slab's end. Within a row (and, for the
transposed product, within a column) the non-zeros are thus taken in the order they are
stored, as scipy's own loops take them, and each output value is accumulated in that order:
a multiply, then an add (``fastmath`` off, so never fused), as scipy's compiled loops do.
"""

from __future__ import annotations

import numba

_JIT = dict(nopython=True, nogil=True, cache=True, fastmath=False, boundscheck=False)


@numba.jit(**_JIT)
def csr_times_dense(indptr, indices, data, X, Y, width, rows):  # pragma: no cover - compiled
    """Y += V X for V (n, p) in CSR and X (p, m): tiles of ``rows`` rows of V (of Y), each
    slab by slab of ``width`` columns of V (rows of X)."""
    n, m, p = indptr.size - 1, X.shape[1], X.shape[0]
    cursor = indptr[:-1].copy()
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        for c0 in range(0, p, width):
            c1 = c0 + width
            for i in range(r0, r1):
                jj, end = cursor[i], indptr[i + 1]
                while jj < end and indices[jj] < c1:
                    a, j = data[jj], indices[jj]
                    for k in range(m):
                        Y[i, k] += a * X[j, k]
                    jj += 1
                cursor[i] = jj


@numba.jit(**_JIT)
def csr_t_times_dense(indptr, indices, data, W, Y, width):  # pragma: no cover - compiled
    """Y += Vᵀ W for V (n, p) in CSR and W (n, m), Y (p, m), slabs of ``width`` columns of V
    (rows of Y)."""
    n, m, p = indptr.size - 1, W.shape[1], Y.shape[0]
    cursor = indptr[:-1].copy()
    for c0 in range(0, p, width):
        c1 = c0 + width
        for i in range(n):
            jj, end = cursor[i], indptr[i + 1]
            while jj < end and indices[jj] < c1:
                a, j = data[jj], indices[jj]
                for k in range(m):
                    Y[j, k] += a * W[i, k]
                jj += 1
            cursor[i] = jj
