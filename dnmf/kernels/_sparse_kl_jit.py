"""The compiled loops behind :mod:`dnmf.kernels.sparse_kl` (numba).

Kept apart so that importing the kernels does not import numba and llvmlite (~60 MB in
every worker process): only a fit with KL on sparse blocks loads this module.
"""

from __future__ import annotations

import numba
import numpy as np

_JIT = dict(nopython=True, nogil=True, cache=True, fastmath=False, boundscheck=False)


# Each kernel walks a row's non-zeros four at a time: the four dot products W_i · Hᵀ_c are
# summed side by side (each over k in order, as one at a time would), so their additions
# overlap instead of waiting on each other.


@numba.jit(**_JIT)
def _dot(W, Ht, i, c):  # pragma: no cover - compiled
    s = W.dtype.type(0)
    for k in range(W.shape[1]):
        s += W[i, k] * Ht[c, k]
    return s


@numba.jit(**_JIT)
def _dot4(W, Ht, i, c0, c1, c2, c3):  # pragma: no cover - compiled
    """W_i · Hᵀ_c for four columns c, each summed over k in order, the four side by side."""
    s0 = s1 = s2 = s3 = W.dtype.type(0)
    for k in range(W.shape[1]):
        w = W[i, k]
        s0 += w * Ht[c0, k]
        s1 += w * Ht[c1, k]
        s2 += w * Ht[c2, k]
        s3 += w * Ht[c3, k]
    return s0, s1, s2, s3


@numba.jit(**_JIT)
def _wh_values(indptr, indices, W, Ht):  # pragma: no cover - compiled
    n, r = W.shape
    out = np.empty(indices.shape[0], dtype=W.dtype)
    for i in range(n):
        j, stop = indptr[i], indptr[i + 1]
        while j + 4 <= stop:
            c0, c1, c2, c3 = indices[j], indices[j + 1], indices[j + 2], indices[j + 3]
            s0, s1, s2, s3 = _dot4(W, Ht, i, c0, c1, c2, c3)
            out[j], out[j + 1], out[j + 2], out[j + 3] = s0, s1, s2, s3
            j += 4
        while j < stop:
            out[j] = _dot(W, Ht, i, indices[j])
            j += 1
    return out


@numba.jit(**_JIT)
def _ratio_times_ht(indptr, indices, data, W, Ht, eps):  # pragma: no cover - compiled
    n, r = W.shape
    out = np.zeros((n, r), dtype=W.dtype)
    acc = np.zeros(r, dtype=W.dtype)
    for i in range(n):
        acc[:] = 0
        j, stop = indptr[i], indptr[i + 1]
        while j + 4 <= stop:
            c0, c1, c2, c3 = indices[j], indices[j + 1], indices[j + 2], indices[j + 3]
            s0, s1, s2, s3 = _dot4(W, Ht, i, c0, c1, c2, c3)
            q0, q1 = data[j] / (s0 + eps), data[j + 1] / (s1 + eps)
            q2, q3 = data[j + 2] / (s2 + eps), data[j + 3] / (s3 + eps)
            for k in range(r):
                a = acc[k]
                a += q0 * Ht[c0, k]
                a += q1 * Ht[c1, k]
                a += q2 * Ht[c2, k]
                a += q3 * Ht[c3, k]
                acc[k] = a
            j += 4
        while j < stop:
            c = indices[j]
            q = data[j] / (_dot(W, Ht, i, c) + eps)
            for k in range(r):
                acc[k] += q * Ht[c, k]
            j += 1
        out[i, :] = acc
    return out


@numba.jit(**_JIT)
def _add_ratio(out_t, W, i, c, ratio):  # pragma: no cover - compiled
    for k in range(W.shape[1]):
        out_t[c, k] += ratio * W[i, k]


@numba.jit(**_JIT)
def _wt_ratio(indptr, indices, data, W, Ht, eps, wh_out):  # pragma: no cover - compiled
    """Wᵀ (V / (WH + ε)) transposed, (p, r): each ratio added into its column's sums at once,
    in the order scipy's product Vᵀ W adds a CSR block's values. With ``wh_out`` of length nnz
    (else 0), WH is written there too, for the loss."""
    n, r = W.shape
    out_t = np.zeros(Ht.shape, dtype=W.dtype)
    keep = wh_out.shape[0] > 0
    for i in range(n):
        j, stop = indptr[i], indptr[i + 1]
        while j + 4 <= stop:
            c0, c1, c2, c3 = indices[j], indices[j + 1], indices[j + 2], indices[j + 3]
            s0, s1, s2, s3 = _dot4(W, Ht, i, c0, c1, c2, c3)
            if keep:
                wh_out[j], wh_out[j + 1], wh_out[j + 2], wh_out[j + 3] = s0, s1, s2, s3
            _add_ratio(out_t, W, i, c0, data[j] / (s0 + eps))
            _add_ratio(out_t, W, i, c1, data[j + 1] / (s1 + eps))
            _add_ratio(out_t, W, i, c2, data[j + 2] / (s2 + eps))
            _add_ratio(out_t, W, i, c3, data[j + 3] / (s3 + eps))
            j += 4
        while j < stop:
            c = indices[j]
            s = _dot(W, Ht, i, c)
            if keep:
                wh_out[j] = s
            _add_ratio(out_t, W, i, c, data[j] / (s + eps))
            j += 1
    return out_t
