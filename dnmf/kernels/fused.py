"""Several fits' work on one row block, reading V_b once: the per-block kernel of fused
replicates (:mod:`dnmf.solvers.fused`); and its grid counterpart, :func:`fused_chunk`, on one
chunk V_ij of a 2-D grid.

Each replicate gets exactly the computation it would get alone, so each result is bitwise
the single fit's. In general each replicate gets the very call it would get alone
(:func:`~.step.step_block` or :func:`~.step.initial_partials_block`, with its own W_b, H,
HHᵀ and flags), and the replicates share only the read (and the conversion) of V_b. Their
steps on a dense V at β = 2 (MU, HALS, BPP: V's products are all the work with V) run
together, tile by tile as the single fit tiles them (:func:`~.step.frobenius_steps`): each
tile is read once for all of them, and its products are one GEMM for all, V_t [H_1; …; H_R]ᵀ and
[W_1 … W_R]ᵀ V_t (R times the arithmetic intensity), where the BLAS gives each replicate's
product bit for bit inside the stacked one (:func:`~.products.stacked_products_agree`,
measured once per shapes; otherwise one product per replicate). On a CSR block their two
products are likewise taken once for all (:func:`~.step.sparse_frobenius_steps`, by the
slab-tiled loops of :mod:`.stacked`, which give each replicate scipy's bits).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .beta import Rule
from .products import as_float_block
from .stacked import stacks
from .step import (
    _fuses_in_tiles,
    frobenius_steps,
    initial_partials_block,
    sparse_frobenius_steps,
    step_block,
    with_w_norms,
)

START, STEP = "start", "step"
SPARSE = "sparse"  # the group of replicates whose β = 2 steps on a CSR block run stacked


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
    stacked = {dtype: stacks(V, dtype) for dtype, V in converted.items()}
    out: list = [None] * len(kinds)
    steps: dict = {}  # (dtype, tiled) -> the replicates whose β = 2 steps run together
    for k, (kind, W, rule) in enumerate(zip(kinds, W_bs, rules)):
        dtype = np.dtype(_w(W).dtype)
        if kind != STEP or not rule.frobenius:
            continue
        if not sp.issparse(converted[dtype]):
            steps.setdefault((dtype, _fuses_in_tiles(converted[dtype], rule)), []).append(k)
        elif stacked[dtype]:
            steps.setdefault((dtype, SPARSE), []).append(k)
    for (dtype, tiled), members in steps.items():
        if tiled == SPARSE and len(members) == 1:
            continue  # one fit alone: its own call (scipy's loops are faster at one rank)
        W_olds = [_w(W_bs[k]) for k in members]
        arguments = (
            converted[dtype], W_olds, [Hs[k] for k in members], [HHts[k] for k in members],
            [rules[k] for k in members], [exact[k] for k in members],
        )
        if tiled == SPARSE:
            results = sparse_frobenius_steps(*arguments)
        else:
            results = frobenius_steps(*arguments, tiled)
        for k, W_old, (W_new, partials) in zip(members, W_olds, results):
            out[k] = with_w_norms(W_new, W_old, partials)
    for k, (kind, W, H, HHt, rule, loss, ex) in enumerate(zip(kinds, W_bs, Hs, HHts, rules, with_loss, exact)):
        if out[k] is not None:
            continue
        W = _w(W)
        V = converted[np.dtype(W.dtype)]
        if kind == START:
            out[k] = initial_partials_block(V, W, H, rule, ex)
        else:
            out[k] = step_block(V, W, H, HHt, rule, loss, ex)
    return out


def fused_chunk(V_b, kernels: list, W_bs: list, H_bs: list, args: list) -> list:
    """Several fits' kernels on one chunk V_ij of the grid (:mod:`dnmf.solvers.grid`), V_ij read
    (and converted) once: ``kernels[k](V_ij, W_bs[k], H_bs[k], *args[k])`` for each fit k.

    Each kernel (:func:`~.grid.chunk_w_products`, :func:`~.grid.chunk_h_partials`) gets the
    call it gets alone: V_ij converted to its W's dtype (which its own conversion then keeps
    as it is), its W_i, H_j and arguments; so each result is bitwise the single fit's.
    """
    converted: dict = {}
    out = []
    for kernel, W_b, H_b, extra in zip(kernels, W_bs, H_bs, args):
        dtype = np.dtype(W_b.dtype)
        if dtype not in converted:
            converted[dtype] = as_float_block(V_b, dtype)
        out.append(kernel(converted[dtype], W_b, H_b, *extra))
    return out


def _w(value) -> np.ndarray:
    """W_b of a block or of a step's (W_b, partials) result."""
    return value[0] if isinstance(value, tuple) else value


__all__ = ["START", "STEP", "Rule", "fused_block", "fused_chunk"]
