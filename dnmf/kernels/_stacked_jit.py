"""The compiled loop behind :mod:`dnmf.kernels.stacked` (numba; imported on first use).

It walks a CSR block's non-zeros in tiles of rows, each slab by slab of V's columns, keeping a
cursor per row: in a slab, row i's non-zeros from its cursor up to the slab's end. Within a
row (and, for the transposed product, within a column: by rows, then as stored) the
non-zeros are thus taken in the order scipy's own loops take them, and each output value is
accumulated in that order: a multiply, then an add (``fastmath`` off, so never fused), as
scipy's compiled loops do.
"""

from __future__ import annotations

import numba

_JIT = dict(nopython=True, nogil=True, cache=True, fastmath=False, boundscheck=False)


@numba.jit(**_JIT)
def csr_products(indptr, indices, data, F, Y, width, rows, transposed):  # pragma: no cover - compiled
    """Y += V F (F (p, m), Y (n, m)), or with ``transposed`` Y += Vᵀ F (F (n, m), Y (p, m)), for
    V (n, p) in CSR: tiles of ``rows`` rows of V, each slab by slab of ``width`` columns."""
    n, m = indptr.size - 1, F.shape[1]
    p = Y.shape[0] if transposed else F.shape[0]
    cursor = indptr[:-1].copy()
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        for c0 in range(0, p, width):
            c1 = c0 + width
            for i in range(r0, r1):
                jj, end = cursor[i], indptr[i + 1]
                while jj < end and indices[jj] < c1:
                    a, j = data[jj], indices[jj]
                    if transposed:
                        for k in range(m):
                            Y[j, k] += a * F[i, k]
                    else:
                        for k in range(m):
                            Y[i, k] += a * F[j, k]
                    jj += 1
                cursor[i] = jj
