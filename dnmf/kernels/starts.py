"""Per-block math of the starting points: random factors, the range finder, NNDSVD."""

from __future__ import annotations

import numpy as np

from .products import as_float_block, dot_t

# Random inits are generated in fixed tiles of rows, so a seed gives the same W
# whatever the chunking.
RANDOM_TILE_ROWS = 4096


def random_rows(seed: int, start: int, stop: int, r: int, scale: float, dtype) -> np.ndarray:
    """Rows ``start:stop`` of a strictly positive random W, independent of the chunking.

    Entries are ``scale * U[0.5, 1.5)``, drawn tile by tile from ``default_rng([seed, 0, tile])``.
    """
    out = np.empty((stop - start, r), dtype=dtype)
    first_tile, last_tile = start // RANDOM_TILE_ROWS, (stop - 1) // RANDOM_TILE_ROWS
    for tile in range(first_tile, last_tile + 1):
        tile_start = tile * RANDOM_TILE_ROWS
        values = np.random.default_rng([seed, 0, tile]).random((RANDOM_TILE_ROWS, r))
        lo, hi = max(start, tile_start), min(stop, tile_start + RANDOM_TILE_ROWS)
        out[lo - start : hi - start] = values[lo - tile_start : hi - tile_start]
    out += 0.5
    out *= scale
    return out


def random_cols(seed: int, start: int, stop: int, r: int, p: int, scale: float, dtype) -> np.ndarray:
    """Columns ``start:stop`` of the strictly positive random H (r, p) of ``seed``:
    ``scale * U[0.5, 1.5)``, the same values whatever the column chunking.

    H is ``default_rng([seed, 1]).random((r, p))`` shifted and scaled; each row's slice is
    drawn by advancing the generator to it (one 64-bit draw per entry).
    """
    out = np.empty((r, stop - start))
    for k in range(r):
        bits = np.random.PCG64(np.random.SeedSequence([seed, 1]))
        bits.advance(k * p + start)
        out[k] = np.random.Generator(bits).random(stop - start)
    out += 0.5
    out *= scale
    return out.astype(dtype)


def _scaled(V_b, dtype, scale: float):
    """V_b as a float block of ``dtype``, times ``scale`` (a power of two: exact) unless it is 1.
    Never in place: the input block may be the caller's array."""
    V_b = as_float_block(V_b, dtype)
    return V_b if scale == 1 else V_b * dtype.type(scale)


def block_times(V_b, M: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """(scale V_b) @ M for a dense or sparse block (the range finder's product)."""
    return np.asarray(_scaled(V_b, M.dtype, scale) @ M)


def block_transpose_times(Q_b: np.ndarray, V_b, scale: float = 1.0) -> np.ndarray:
    """Q_bᵀ (scale V_b) for a dense or sparse block."""
    return dot_t(Q_b, _scaled(V_b, Q_b.dtype, scale))


def nndsvd_w_block(
    U_b: np.ndarray, signs: np.ndarray, scales: np.ndarray, fill, start: int, threshold: float,
    unscale: float = 1.0,
) -> np.ndarray:
    """NNDSVD's W for one row block: the chosen sign part of each singular vector, scaled.

    ``signs[k]`` is +1 to keep the positive part of U[:, k], -1 for the negative part;
    ``scales[k]`` = sqrt(s_k σ_k) / ‖chosen part of U[:, k]‖. Entries below ``threshold``
    become 0, then ``fill`` replaces zeros: None (NNDSVD), a number (NNDSVDa), or
    ``(seed, scale)`` for small random values (NNDSVDar). Last, unless it is 1, the block is
    multiplied by ``unscale`` (a power of two), undoing the scaling of V the SVD ran on.
    """
    W_b = np.maximum(U_b * signs, 0) * scales
    W_b = fill_zeros(W_b, fill, start, threshold)
    if unscale != 1:
        W_b *= W_b.dtype.type(unscale)
    return W_b


def fill_zeros(X: np.ndarray, fill, start: int, threshold: float) -> np.ndarray:
    """Zero the entries of X below ``threshold``, then fill the zeros as NNDSVD's variants do."""
    X[X < threshold] = 0
    if fill is None:
        return X
    zeros = X == 0
    if isinstance(fill, tuple):
        seed, scale = fill
        values = random_rows(seed, start, start + X.shape[0], X.shape[1], scale, X.dtype)
        X[zeros] = values[zeros]
    else:
        X[zeros] = fill
    return X
