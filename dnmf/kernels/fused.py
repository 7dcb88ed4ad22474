"""Several fits' work on one row block, reading V_b once: the per-block kernel of fused
replicates (:mod:`dnmf.solvers.fused`).

Each replicate gets exactly the call it would get alone (:func:`~.step.step_block` or
:func:`~.step.initial_partials_block`, with its own W_b, H, HHᵀ and flags), so each result is
bitwise the single fit's; what the replicates share is the read (and the conversion) of V_b.
A single GEMM V_b [H_1; …; H_R]ᵀ (and [W_1 … W_R]ᵀ V_b) would raise the arithmetic intensity
R-fold, but its columns are V_b H_rᵀ bit for bit only where the BLAS sums over p alike for
every width, and they are not: with OpenBLAS 0.3 (SkylakeX kernels), float32 and float64, one
or two threads, a 333 × 517 block with R = 7, r = 3, a 1000 × 1000 block with r = 1 (GEMV) and
a 50 × 5000 block with r = 7 (two threads) round differently in some columns, while 1500 × 2000
with r = 10 does not. So the replicates keep their own products, inside one task per block:
each fit's bits are the single fit's, and V_b is still read once for all of them.
"""

from __future__ import annotations

import numpy as np

from .beta import Rule
from .products import as_float_block
from .step import initial_partials_block, step_block

START, STEP = "start", "step"


def fused_block(V_b, kinds: list, W_bs: list, Hs: list, HHts: list, rules: list, with_loss: list, exact: list) -> list:
    """Each replicate's pass over one row block, V_b read (and converted) once.

    Parameters
    ----------
    V_b : array or sparse matrix of shape (n_b, p)
    kinds : list of {"start", "step"}
        Per replicate: the partials at a start (:func:`initial_partials_block`) or a step
        (:func:`step_block`).
    W_bs : list of arrays of shape (n_b, r_k)
        Each replicate's row block of W (or a step's ``(W_b, partials)`` result: W_b is taken).
    Hs, HHts : lists of arrays (r_k, p) and (r_k, r_k) (HHᵀ unused by a start)
    rules : list of Rule
    with_loss, exact : lists of bool

    Returns
    -------
    list
        Per replicate, what its kernel returns: ``(W_b_new, partials)`` for a step, the
        partials for a start.
    """
    dtypes = {np.dtype(_w(W).dtype) for W in W_bs}
    converted = {dtype: as_float_block(V_b, dtype) for dtype in dtypes}
    out = []
    for kind, W, H, HHt, rule, loss, ex in zip(kinds, W_bs, Hs, HHts, rules, with_loss, exact):
        W = _w(W)
        V = converted[np.dtype(W.dtype)]
        if kind == START:
            out.append(initial_partials_block(V, W, H, rule, ex))
        else:
            out.append(step_block(V, W, H, HHt, rule, loss, ex))
    return out


def _w(value) -> np.ndarray:
    """W_b of a block or of a step's (W_b, partials) result."""
    return value[0] if isinstance(value, tuple) else value


__all__ = ["START", "STEP", "Rule", "fused_block"]
