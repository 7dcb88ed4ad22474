"""Several fits' products with one CSR block at once: V_b [H_1; …; H_R]ᵀ and
[W_1 … W_R]ᵀ V_b, each fit's part bitwise its own product (fused replicates on sparse V).

Alone, a fit's sparse products go through scipy's loops: per non-zero, an update of an r-wide
row of the output by a multiple of an r-wide row of Hᵀ (or of W), about 6 GFLOP/s on one core
here whatever r. Stacked, the rows are R·r wide, so each non-zero does R times the work for
one read of its index and value; but the stacked Hᵀ (p × R·r: 29 MB at p = 20000, R·r = 360,
float32) no longer stays in cache, and one scipy product over it was no faster than the R
products (1057 ms against 930 ms on a block of 4M non-zeros at R = 36). So the loops here
(:mod:`._stacked_jit`, numba) walk V_b in tiles of rows, each slab by slab of ``SLAB_BYTES`` of
the stacked matrix's rows: measured on that block, 0.18 s for each of the two stacked
products against 0.45 s for the 36 products alone (2.5×), and 0.06 s against 0.10 s at
R = 8; on a block of 20000 rows, 0.36–0.38 s against 0.9 s.

Bits: each output value is the sum of the same terms in the same order as scipy's loops add
them (a row's non-zeros in stored order; a column's by rows, then stored order), each a
multiply then an add. That order needs sorted column indices (for the transposed product),
V's dtype equal to the factors' and index arrays of one dtype; :func:`stacks` says whether a
block qualifies, and, once per dtype, checks the agreement on a small problem
(:func:`_agrees`); otherwise the caller computes one product per fit.
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.sparse as sp

from .products import _dot_ht, dot_t

# Each slab of V's columns reads (or, for Wᵀ V, updates) this many bytes of rows of the
# column-indexed matrix, within a tile of V's rows whose rows of the row-indexed matrix take
# ``TILE_BYTES``: both stay in cache while the slab's non-zeros use them. Measured on a block
# of 20000 × 20000 at 2%, R·r = 360, float32: slabs of 0.5, 1 and 2 MiB took 0.58 / 0.47 /
# 0.48 s for V Hᵀ without row tiles and 0.42–0.45 s in tiles of 2000–5000 rows; 0.51 / 0.40 /
# 0.44 s for Wᵀ V, 0.36–0.37 s in tiles.
SLAB_BYTES = 2**20
TILE_BYTES = 2**23
# The fits whose products are stacked together hold at most about this much in temporaries
# (the stacked factor, the stacked product and each fit's copy of its part: about
# 2·(n_b + p)·R·r values); more fits are taken in groups (:func:`stack_groups`). At
# 20000 × 20000 float32, 838 columns: 83 fits of rank 10.
STACK_BYTES = 2**28


@functools.cache
def _jit():
    """The compiled loop (numba and it: 108 MiB of a process, imported on first use only)."""
    from . import _stacked_jit

    return _stacked_jit


def stacks(V_b, dtype) -> bool:
    """Whether V_b's products with several fits' factors of ``dtype`` can be taken stacked,
    each fit's bitwise its own product (:func:`stacked_dot_ht`, :func:`stacked_dot_t`)."""
    if not (sp.issparse(V_b) and V_b.format == "csr" and V_b.dtype == dtype):
        return False
    if V_b.indices.dtype != V_b.indptr.dtype or not V_b.has_sorted_indices:
        return False
    return _agrees(np.dtype(dtype).str, V_b.indices.dtype.str)


def _width(columns: int, itemsize: int) -> int:
    """Slab width: V's columns whose rows of an (·, ``columns``) matrix make ``SLAB_BYTES``."""
    return max(16, SLAB_BYTES // max(1, columns * itemsize))


def stack_groups(ranks, shape: tuple[int, int], itemsize: int) -> list[slice]:
    """Consecutive groups of fits (slices of ``ranks``) whose stacked products with a block of
    ``shape`` keep their temporaries within ``STACK_BYTES``; a fit alone if it exceeds that."""
    columns = max(1, STACK_BYTES // max(1, 2 * (shape[0] + shape[1]) * itemsize))
    groups, start, width = [], 0, 0
    for k, r in enumerate(ranks):
        if width and width + r > columns:
            groups.append(slice(start, k))
            start, width = k, 0
        width += r
    return [*groups, slice(start, len(ranks))] if len(ranks) else []


def _parts(Xs: list, axis: int) -> list[slice]:
    bounds = np.cumsum([0] + [X.shape[axis] for X in Xs])
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def stacked_dot_ht(V_b: sp.csr_matrix, Hs: list, width: int | None = None, rows: int | None = None) -> list:
    """``[V_b H_kᵀ for each H_k]`` (each (n_b, r_k), C-ordered) from one pass over V_b,
    bitwise :func:`~.products._dot_ht` each; V_b must qualify (:func:`stacks`). ``width`` and
    ``rows``: the slabs and tiles (default: from ``SLAB_BYTES`` and ``TILE_BYTES``)."""
    Ht = np.concatenate([H.T for H in Hs], axis=1)  # (p, Σr), C-ordered: one copy
    Y = _stacked(V_b, Ht, (V_b.shape[0], Ht.shape[1]), width, rows, False)
    return [np.ascontiguousarray(Y[:, part]) for part in _parts(Hs, 0)]


def stacked_dot_t(W_bs: list, V_b: sp.csr_matrix, width: int | None = None, rows: int | None = None) -> list:
    """``[W_kᵀ V_b for each W_k]`` (each (r_k, p), F-ordered as :func:`~.products.dot_t` gives
    it) from one pass over V_b, bitwise :func:`~.products.dot_t` each; V_b must qualify."""
    W = np.concatenate(W_bs, axis=1)
    Y = _stacked(V_b, W, (V_b.shape[1], W.shape[1]), width, rows, True)
    return [np.ascontiguousarray(Y[:, part]).T for part in _parts(W_bs, 1)]


def _stacked(V_b, F: np.ndarray, shape: tuple[int, int], width, rows, transposed: bool) -> np.ndarray:
    """V_b F (or V_bᵀ F), a new (``shape``) array, from the compiled loop."""
    F = np.ascontiguousarray(F)
    Y = np.zeros(shape, dtype=F.dtype)
    rows = rows or max(1, TILE_BYTES // max(1, F.shape[1] * F.itemsize))
    width = width or _width(F.shape[1], F.itemsize)
    _jit().csr_products(V_b.indptr, V_b.indices, V_b.data, F, Y, width, rows, transposed)
    return Y


@functools.lru_cache(maxsize=None)
def _agrees(dtype: str, index_dtype: str) -> bool:
    """Whether the stacked products give scipy's bits here, on a small CSR of these dtypes
    over several slabs, with an empty row."""
    rng = np.random.default_rng(0)
    n, p = 40, 200
    V = sp.random(n, p, density=0.15, format="csr", dtype=dtype, random_state=rng)
    V.data[:] = rng.random(V.nnz) * 3
    V.data[V.indptr[3] : V.indptr[4]] = 0
    V.eliminate_zeros()
    V = sp.csr_matrix((V.data, V.indices.astype(index_dtype), V.indptr.astype(index_dtype)), shape=V.shape)
    V.sort_indices()
    Hs = [rng.random((r, p)).astype(dtype) for r in (3, 5)]
    Ws = [rng.random((n, r)).astype(dtype) for r in (3, 5)]
    vh = stacked_dot_ht(V, Hs, width=23, rows=7)
    wv = stacked_dot_t(Ws, V, width=23, rows=7)
    return all(np.array_equal(a, _dot_ht(V, H)) for a, H in zip(vh, Hs)) and all(
        np.array_equal(a, dot_t(W, V)) for a, W in zip(wv, Ws)
    )


__all__ = ["SLAB_BYTES", "STACK_BYTES", "TILE_BYTES", "stack_groups", "stacked_dot_ht", "stacked_dot_t", "stacks"]
