"""The scan of V: validation and the sums that the objective and the inits need."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
from scipy.special import xlogy

from .beta import kl_constant
from .products import row_tiles


class BlockStats(NamedTuple):
    """What one pass over V learns: sums, counts and the first bad entries (global positions)."""

    v_sq: float
    v_sum: float
    nnz: int
    n_negative: int
    n_nonfinite: int
    first_negative: tuple[int, int] | None
    first_nonfinite: tuple[int, int] | None
    v_xlogx: float = 0.0


def _first_position(mask_rows: np.ndarray, mask_cols: np.ndarray, row_offset: int, col_offset: int = 0):
    """The first (row, column) in row-major order of a block's marked entries, in V's positions."""
    if mask_rows.size == 0:
        return None
    first = np.lexsort((mask_cols, mask_rows))[0]
    return (int(mask_rows[first]) + row_offset, int(mask_cols[first]) + col_offset)


def block_stats(V_b, row_offset: int, with_xlogx: bool = False, col_offset: int = 0) -> BlockStats:
    """Sums and the bad entries of one block whose first entry is V[row_offset, col_offset].

    ``with_xlogx`` also sums V log V (the KL objective's constant; finite V only).
    """
    # A block with no bad entries: its values tile by tile (a sparse block's stored values
    # alone: its zeros add nothing), with no block-sized temporary.
    clean = _clean_dense_stats(V_b.data if sp.issparse(V_b) else np.asarray(V_b), with_xlogx)
    if clean is not None:
        return clean
    if sp.issparse(V_b):
        coo = sp.coo_matrix(V_b)
        rows, cols, values = coo.row, coo.col, coo.data
    else:
        values = np.asarray(V_b)
        rows = cols = None
    nonfinite = ~np.isfinite(values)
    negative = values < 0
    n_nonfinite, n_negative = int(nonfinite.sum()), int(negative.sum())

    def first(mask):
        if rows is None:
            r, c = np.nonzero(mask)
        else:
            r, c = rows[mask], cols[mask]
        return _first_position(r, c, row_offset, col_offset)

    finite = np.where(nonfinite, 0, values) if n_nonfinite else values
    return BlockStats(
        v_sq=float(np.sum(np.square(finite, dtype=np.float64))),
        v_sum=float(np.sum(finite, dtype=np.float64)),
        nnz=int(np.count_nonzero(values)),
        n_negative=n_negative,
        n_nonfinite=n_nonfinite,
        first_negative=first(negative) if n_negative else None,
        first_nonfinite=first(nonfinite) if n_nonfinite else None,
        v_xlogx=kl_constant(V_b) if with_xlogx and not (n_nonfinite or n_negative) else 0.0,
    )


def _clean_dense_stats(values: np.ndarray, with_xlogx: bool) -> BlockStats | None:
    """The stats of a dense block with no bad entries, tile by tile in float64 (no
    block-sized temporary); None as soon as a tile has a negative or non-finite entry."""
    v_sq = v_sum = xlogx = 0.0
    nnz = 0
    if values.size == 0:
        return BlockStats(v_sq, v_sum, nnz, 0, 0, None, None, xlogx)
    flat = values.reshape(values.shape[0], -1)
    for start, stop in row_tiles(flat.shape[0], flat.shape[1]):
        tile = flat[start:stop].astype(np.float64).ravel()
        total = float(tile.sum())
        if not np.isfinite(total) or not tile.min(initial=0.0) >= 0:
            return None
        v_sum += total
        v_sq += float(np.dot(tile, tile))
        nnz += int(np.count_nonzero(tile))
        if with_xlogx:
            xlogx += float(np.sum(xlogy(tile, tile)))
    return BlockStats(v_sq, v_sum, nnz, 0, 0, None, None, xlogx)


def _earliest(a, b):
    """The earlier of two positions in row-major order, either possibly None."""
    return b if a is None else a if b is None else min(a, b)


def add_stats(a: BlockStats, b: BlockStats) -> BlockStats:
    """Combine the stats of two blocks (first positions: the earliest in row-major order)."""
    return BlockStats(
        a.v_sq + b.v_sq,
        a.v_sum + b.v_sum,
        a.nnz + b.nnz,
        a.n_negative + b.n_negative,
        a.n_nonfinite + b.n_nonfinite,
        _earliest(a.first_negative, b.first_negative),
        _earliest(a.first_nonfinite, b.first_nonfinite),
        a.v_xlogx + b.v_xlogx,
    )
