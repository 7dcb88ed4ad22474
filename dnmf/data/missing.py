"""Missing entries on the Dask side: open a mask, scan V over observed entries, fill V for the
SVD-based inits, draw hold-out masks and score a fit on the held-out entries.

The per-block math is in :mod:`dnmf.kernels.masked`; this module only lays out graphs over V's row
blocks (one task per block, fixed-order tree sums) with :mod:`dnmf.graph`.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, replace

import dask
import dask.array as da
import numpy as np

from ..errors import InvalidMatrixError, ParameterError, expected
from ..graph import TaskGraph, map_blocks, map_reduce, row_block_keys
from ..kernels import masked
from .resident import to_workers
from .store import Matrix, MatrixStats

MISSING_VALUES = (None, "nan")


def check_missing(missing) -> bool:
    """True when NaN entries mean "missing" (``missing="nan"``); validate the option."""
    if missing not in MISSING_VALUES:
        raise ParameterError(expected(f"missing in {MISSING_VALUES}", missing))
    return missing == "nan"


def open_mask(mask, matrix: Matrix) -> da.Array:
    """A boolean mask (True = observed) as a dask array row-chunked like V.

    ``mask`` is a numpy / dask boolean array, a ``zarr.Array``, or the path of a Zarr array,
    of V's shape.
    """
    if isinstance(mask, (str, os.PathLike)):
        from .store import _open_zarr

        mask = _open_zarr(os.fspath(mask))
    if isinstance(mask, da.Array):
        arr = mask
    elif hasattr(mask, "shape") and hasattr(mask, "dtype") and not isinstance(mask, np.ndarray):
        arr = da.from_array(mask, chunks=(matrix.row_chunks, (matrix.shape[1],)))  # zarr.Array
    else:
        mask = np.asarray(mask)
        arr = None
    if arr is None:
        if mask.shape != matrix.shape:
            raise InvalidMatrixError(expected(f"a mask of V's shape {matrix.shape}", f"shape {mask.shape}"))
        if mask.dtype != bool:
            raise InvalidMatrixError(expected("a boolean mask (True = observed)", f"dtype {mask.dtype}"))
        name = f"dnmf-mask-{uuid.uuid4().hex}"
        # Under a distributed client the mask goes to the workers once, outside any graph.
        return to_workers(da.from_array(mask, chunks=(matrix.row_chunks, (matrix.shape[1],)), name=name), "dnmf-mask")
    if tuple(arr.shape) != matrix.shape:
        raise InvalidMatrixError(expected(f"a mask of V's shape {matrix.shape}", f"shape {tuple(arr.shape)}"))
    if arr.dtype != bool:
        raise InvalidMatrixError(expected("a boolean mask (True = observed)", f"dtype {arr.dtype}"))
    return arr.rechunk((matrix.row_chunks, (matrix.shape[1],)))


def mask_block_keys(mask: da.Array | None, matrix: Matrix) -> list:
    """The mask's row-block keys, or None per block when NaN alone marks the missing entries."""
    return [None] * len(matrix.row_chunks) if mask is None else row_block_keys(mask)


@dataclass(frozen=True)
class MaskedStats:
    """The scan of V over its observed entries: the usual stats and the count of observed ones."""

    stats: MatrixStats
    n_observed: int

    @property
    def observed_mean(self) -> float:
        return self.stats.v_sum / max(1, self.n_observed)

    def imputed_stats(self) -> MatrixStats:
        """The stats of V with its missing entries set to the observed mean (for validation and inits).

        ΣV and nnz count the imputed entries; ‖V‖² stays over observed entries (the masked
        objective does not use it).
        """
        n_missing = self.stats.shape[0] * self.stats.shape[1] - self.n_observed
        return replace(
            self.stats,
            v_sum=self.observed_mean * self.stats.shape[0] * self.stats.shape[1],
            nnz=self.stats.nnz + (n_missing if self.observed_mean > 0 else 0),
        )


def scan_masked(matrix: Matrix, mask: da.Array | None, nan_is_missing: bool) -> MaskedStats:
    """One pass over V: ‖V‖², ΣV, nnz and the bad entries, over the observed entries only."""
    total = map_reduce(
        "dnmf-mscan", masked.masked_block_stats,
        matrix.block_inputs(), mask_block_keys(mask, matrix), matrix.row_offsets[:-1], nan_is_missing,
        combine=masked.add_masked_stats, dependencies=[matrix.data, mask],
    )
    (result,) = dask.compute(total)
    stats, n_observed = result
    if n_observed == 0:
        raise InvalidMatrixError("Every entry of the matrix is missing: there is nothing to factor.")
    return MaskedStats(MatrixStats.from_blocks(stats, matrix.shape), n_observed)


def filled_matrix(matrix: Matrix, mask: da.Array | None, value: float) -> Matrix:
    """V with its missing entries replaced by ``value``, lazily (what the SVD inits stream)."""
    data = map_blocks(
        "dnmf-filled", masked.fill_missing, matrix.block_inputs(), mask_block_keys(mask, matrix), value, matrix.dtype,
        chunks=(matrix.row_chunks, (matrix.shape[1],)), dtype=matrix.dtype, dependencies=[matrix.data, mask],
    )
    return Matrix(data, matrix.dtype, matrix.in_memory, False, matrix.source)


def holdout_mask(matrix: Matrix, seed: int, fraction: float) -> da.Array:
    """A random training mask row-chunked like V: each entry held out (False) with probability ``fraction``.

    Independent of the chunking for a given seed (see :func:`dnmf.kernels.masked.holdout_rows`).
    """
    if not 0 < fraction < 1:
        raise ParameterError(expected("holdout_fraction strictly between 0 and 1", fraction))
    offsets, p = matrix.row_offsets, matrix.shape[1]
    return map_blocks(
        "dnmf-holdout", masked.holdout_rows, seed, offsets[:-1], offsets[1:], p, fraction,
        chunks=(matrix.row_chunks, (p,)), dtype=bool,
    )


@dataclass(frozen=True)
class HoldoutScore:
    """How well a fit on the training entries predicts the held-out ones.

    divergence : D_β(V | WH) summed over the held-out entries.
    heldout_v_sq, train_v_sq : Σ V² over the held-out / training entries.
    n_heldout : how many entries were held out (and observed).
    """

    divergence: float
    heldout_v_sq: float
    n_heldout: int
    train_v_sq: float

    @property
    def relative_error(self) -> float:
        """sqrt(2 D_β / Σ V²) over the held-out entries: ‖V − WH‖ / ‖V‖ there for Frobenius."""
        return float(np.sqrt(2.0 * self.divergence / max(self.heldout_v_sq, np.finfo(float).tiny)))


def score_holdout(matrix: Matrix, mask: da.Array | None, train: da.Array, W: da.Array, H: np.ndarray, beta: float) -> HoldoutScore:
    """One pass over V scoring (W, H) on the entries observed in ``mask`` but not in ``train``."""
    graph = TaskGraph("dnmf-score", [matrix.data, mask, train, W])
    h = graph.constant("H", H)  # one copy, shared by the block tasks
    scores = graph.map(
        masked.holdout_score_block,
        matrix.block_inputs(), mask_block_keys(mask, matrix), row_block_keys(train), row_block_keys(W), h, beta,
    )
    (sums,) = dask.compute(graph.delayed(graph.reduce(scores, _add)))
    return HoldoutScore(float(sums[0]), float(sums[1]), int(sums[2]), float(sums[3]))


def _add(a, b):
    return a + b
