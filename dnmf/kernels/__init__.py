"""Per-block math of NMF: numpy/scipy in, numpy out. Never imports dask.

V is split into row blocks ``V_b`` (all columns); W into the matching row blocks ``W_b``.
H (r x p) is small and whole. One iteration, for each block, is :func:`step_block`: update
``W_b`` from ``V_b`` and H, then compute the :class:`Partials` that the next H update and
the objective need, so that V is read once per iteration.

The objective is the β-divergence D_β(V | WH) (½‖V − WH‖² for β = 2), as in
scikit-learn. For β = 2 it comes from the Gram identity

    ‖V − WH‖² = ‖V‖² − 2⟨WᵀV, H⟩ + ⟨WᵀW, HHᵀ⟩

and never forms WH; for other β, WH is formed one block at a time (at V's nonzeros only
for sparse V and KL).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
from scipy.special import xlogy

from .nnls import nnls_bpp

FROBENIUS = 2.0
KULLBACK_LEIBLER = 1.0
ITAKURA_SAITO = 0.0

# Random inits are generated in fixed tiles of rows, so a seed gives the same W
# whatever the chunking.
RANDOM_TILE_ROWS = 4096


@dataclass(frozen=True)
class Rule:
    """Which update to apply: ``solver`` "mu", "hals" or "bpp", β of the divergence, ε.

    ``w_sweeps`` / ``h_sweeps``: the most HALS sweeps per half-step from the same products
    (accelerated HALS, Gillis & Glineur 2012; 1 is plain HALS). Ignored by "mu" and "bpp".
    """

    solver: str
    beta: float
    eps: float
    w_sweeps: int = 1
    h_sweeps: int = 1

    @property
    def gamma(self) -> float:
        """Févotte-Idier exponent that makes β-MU monotone outside 1 ≤ β ≤ 2."""
        if self.beta < 1:
            return 1.0 / (2.0 - self.beta)
        if self.beta > 2:
            return 1.0 / (self.beta - 1.0)
        return 1.0


class Partials(NamedTuple):
    """Sums over row blocks that the H update and the objective need.

    numer : (r, p) array. WᵀV (β = 2), or Wᵀ(V ∘ (WH)^(β-2)) otherwise.
    denom : WᵀW of shape (r, r) for β = 2; column sums of W, shape (r,), for β = 1;
        Wᵀ(WH)^(β-1) of shape (r, p) otherwise.
    loss : the divergence summed over the blocks (β ≠ 2); 0 for β = 2.
    w_sq, dw_sq : ‖W‖² and ‖W_new − W_old‖² (0 when not part of a step).
    """

    numer: np.ndarray
    denom: np.ndarray
    loss: float
    w_sq: float
    dw_sq: float


def add_partials(a: Partials, b: Partials) -> Partials:
    """Elementwise sum of two block partials (the tree reduction's binary op)."""
    return Partials(*(x + y for x, y in zip(a, b)))


# ---------------------------------------------------------------------------
# Input blocks


def as_float_block(block, dtype: np.dtype):
    """Return a block as a float array (or CSR matrix) of ``dtype``, copying only if needed."""
    if sp.issparse(block):
        block = sp.csr_matrix(block)
        return block if block.dtype == dtype else block.astype(dtype)
    return np.asarray(block, dtype=dtype)


def _dot_t(W_b: np.ndarray, V_b) -> np.ndarray:
    """W_bᵀ V_b for dense or sparse V_b, as a dense (r, p) array."""
    if sp.issparse(V_b):
        return np.asarray((V_b.T @ W_b).T)
    return W_b.T @ V_b


def _dot_ht(V_b, H: np.ndarray) -> np.ndarray:
    """V_b Hᵀ for dense or sparse V_b, as a dense (n_b, r) array."""
    return np.asarray(V_b @ H.T)


def gram(A: np.ndarray) -> np.ndarray:
    """AᵀA (columns' Gram matrix) by a general matrix product.

    ``A.T @ A`` makes numpy call BLAS syrk, whose rounding was seen to vary from run to run in
    dask workers (OpenBLAS 0.3.31), breaking bitwise reproducibility; gemm on a copy does not.
    """
    return A.T @ A.copy()


def _wh_at_nonzeros(V_b: sp.csr_matrix, W_b: np.ndarray, H: np.ndarray) -> np.ndarray:
    """(W_b H) at the stored entries of a CSR block, in V_b.data's order."""
    rows = np.repeat(np.arange(V_b.shape[0]), np.diff(V_b.indptr))
    out = np.empty(V_b.nnz, dtype=W_b.dtype)
    # Chunked so the (nnz, r) gather stays small.
    step = max(1, 2**22 // max(1, W_b.shape[1]))
    for start in range(0, V_b.nnz, step):
        stop = start + step
        out[start:stop] = np.einsum(
            "ij,ji->i", W_b[rows[start:stop]], H[:, V_b.indices[start:stop]]
        )
    return out


# ---------------------------------------------------------------------------
# Partials and objective


def block_partials(V_b, W_b: np.ndarray, H: np.ndarray, rule: Rule, with_loss: bool = True) -> Partials:
    """Partials of one row block at (W_b, H); ``w_sq`` and ``dw_sq`` are left at 0.

    ``with_loss=False`` skips the divergence (β ≠ 2: a log or a power per entry), leaving
    ``loss`` at 0, for iterations that do not evaluate the objective.
    """
    beta, eps = rule.beta, rule.eps
    if beta == FROBENIUS:
        return Partials(_dot_t(W_b, V_b), gram(W_b), 0.0, 0.0, 0.0)
    if beta == KULLBACK_LEIBLER and sp.issparse(V_b):
        wh = _wh_at_nonzeros(V_b, W_b, H)
        ratio = V_b.copy()
        ratio.data = V_b.data / (wh + eps)
        numer = _dot_t(W_b, ratio)
        col_w = W_b.sum(axis=0)
        loss = 0.0
        if with_loss:
            np.log(wh, out=wh)
            loss = (
                -float(np.dot(V_b.data.astype(np.float64), wh))
                + float(np.dot(col_w.astype(np.float64), H.sum(axis=1, dtype=np.float64)))
            )
        return Partials(numer, col_w, loss, 0.0, 0.0)
    V_d = V_b.toarray() if sp.issparse(V_b) else V_b
    if beta == KULLBACK_LEIBLER:
        return _kl_partials_dense(V_d, W_b, H, eps, with_loss)
    wh = W_b @ H
    loss = beta_divergence_dense(V_d, wh, beta) if with_loss else 0.0
    wh += eps
    denom = W_b.T @ (wh ** (beta - 1.0))
    numer = W_b.T @ (V_d * wh ** (beta - 2.0))
    return Partials(numer, denom, loss, 0.0, 0.0)


# The dense KL kernels work on row tiles of about this many entries, so the elementwise
# work on WH stays in cache and no block-sized temporary is made.
KL_TILE_ENTRIES = 2**18


def _row_tiles(n_rows: int, p: int):
    step = max(1, KL_TILE_ENTRIES // max(1, p))
    return [(start, min(n_rows, start + step)) for start in range(0, n_rows, step)]


def _kl_ratio_times_ht(V: np.ndarray, W_b: np.ndarray, H: np.ndarray, eps: float) -> np.ndarray:
    """(V / (W_b H + ε)) Hᵀ of a dense block, tile by tile: shape (n_b, r)."""
    out = np.empty((V.shape[0], H.shape[0]), dtype=np.result_type(W_b, H))
    Ht = H.T
    for start, stop in _row_tiles(V.shape[0], V.shape[1]):
        wh = W_b[start:stop] @ H
        wh += eps
        np.divide(V[start:stop], wh, out=wh)
        np.matmul(wh, Ht, out=out[start:stop])
    return out


def _kl_partials_dense(V: np.ndarray, W_b: np.ndarray, H: np.ndarray, eps: float, with_loss: bool = True) -> Partials:
    """KL partials of a dense block, tile by tile: Wᵀ(V / (WH + ε)), colsum(W) and the loss.

    The loss leaves out the constant Σ V log V − Σ V (added by :func:`objective`):
    −Σ V log(WH) + Σ WH, with Σ WH = colsum(W) · rowsum(H).
    """
    numer = np.zeros(H.shape, dtype=np.result_type(W_b, H))
    cross = 0.0
    for start, stop in _row_tiles(V.shape[0], V.shape[1]):
        V_t, W_t = V[start:stop], W_b[start:stop]
        wh = W_t @ H
        if with_loss:
            cross += _v_log_wh(V_t, wh)
        wh += eps
        np.divide(V_t, wh, out=wh)
        numer += W_t.T @ wh
    col_w = W_b.sum(axis=0)
    total_wh = float(np.dot(col_w.astype(np.float64), H.sum(axis=1, dtype=np.float64)))
    return Partials(numer, col_w, total_wh - cross, 0.0, 0.0)


def _v_log_wh(V_t: np.ndarray, wh: np.ndarray) -> float:
    """Σ V log(WH) over a tile (0 log 0 = 0)."""
    with np.errstate(divide="ignore"):
        total = float(np.einsum("ij,ij->i", V_t, np.log(wh)).sum(dtype=np.float64))
    if np.isnan(total):  # 0 · log 0 where WH has exact zeros (e.g. an NNDSVD start)
        total = float(np.sum(xlogy(V_t, wh), dtype=np.float64))
    return total


def kl_constant(V_b) -> float:
    """Σ V log V over a block (0 log 0 = 0); the KL divergence's constant is this minus ΣV."""
    values = V_b.data if sp.issparse(V_b) else np.asarray(V_b)
    if values.size == 0:
        return 0.0
    if values.dtype.kind != "f":
        values = values.astype(np.float64)
    return float(np.sum(xlogy(values, values), dtype=np.float64))


def beta_divergence_dense(V: np.ndarray, WH: np.ndarray, beta: float) -> float:
    """D_β(V | WH) summed over a dense block, accumulated in float64."""
    V = V.astype(np.float64, copy=False)
    WH = WH.astype(np.float64, copy=False)
    if beta == FROBENIUS:
        return 0.5 * float(np.sum((V - WH) ** 2))
    if beta == KULLBACK_LEIBLER:
        return float(np.sum(xlogy(V, V) - xlogy(V, WH) - V + WH))
    if beta == ITAKURA_SAITO:
        ratio = V / WH
        return float(np.sum(ratio - np.log(ratio) - 1.0))
    return float(
        np.sum(V**beta + (beta - 1.0) * WH**beta - beta * V * WH ** (beta - 1.0))
        / (beta * (beta - 1.0))
    )


def objective(
    partials: Partials, H: np.ndarray, HHt: np.ndarray, v_sq: float, beta: float, kl_offset: float = 0.0
) -> float:
    """D_β(V | WH) from reduced partials.

    ``v_sq`` is ‖V‖² (used for β = 2 only); ``kl_offset`` is the constant the KL partials
    leave out, Σ V log V − Σ V (used for β = 1 only).
    """
    if beta != FROBENIUS:
        return objective_from_sums(float(partials.loss), 0.0, 0.0, v_sq, beta, kl_offset)
    cross = float(np.vdot(partials.numer.astype(np.float64), H.astype(np.float64)))
    return objective_from_sums(cross, partials.denom, HHt, v_sq, beta, kl_offset)


def objective_from_sums(term: float, w_gram, h_gram, v_sq: float, beta: float, kl_offset: float = 0.0) -> float:
    """D_β(V | WH) from ``term``: ⟨WᵀV, H⟩ for β = 2 (with WᵀW, HHᵀ and ‖V‖² in the Gram
    identity), else the divergence summed over V less the KL constant ``kl_offset`` (β = 1)."""
    if beta == KULLBACK_LEIBLER:
        return max(term + kl_offset, 0.0)
    if beta != FROBENIUS:
        return max(term, 0.0)
    gram_term = float(np.vdot(np.asarray(w_gram, dtype=np.float64), np.asarray(h_gram, dtype=np.float64)))
    return max(0.5 * (v_sq - 2.0 * term + gram_term), 0.0)


# ---------------------------------------------------------------------------
# Update rules


def w_products(V_b, W_b: np.ndarray, H: np.ndarray, rule: Rule):
    """The products of V_b that a W half-step needs: ``(numer, denom)``, each (n_b, r).

    β = 2 (and HALS, BPP): numer = V Hᵀ, denom None (it is W HHᵀ, from HHᵀ alone);
    β = 1: numer = (V / (WH + ε)) Hᵀ, denom None (it is 1 Hᵀ, H's row sums);
    otherwise numer = (V ∘ (WH+ε)^(β-2)) Hᵀ and denom = (WH+ε)^(β-1) Hᵀ.
    Both are sums over V's columns, so on a grid of V the column blocks' products add up.
    """
    beta, eps = rule.beta, rule.eps
    if beta == FROBENIUS or rule.solver != "mu":
        return _dot_ht(V_b, H), None
    if beta == KULLBACK_LEIBLER:
        if sp.issparse(V_b):
            ratio = V_b.copy()
            ratio.data = V_b.data / (_wh_at_nonzeros(V_b, W_b, H) + eps)
            return _dot_ht(ratio, H), None
        return _kl_ratio_times_ht(V_b, W_b, H, eps), None
    V_d = V_b.toarray() if sp.issparse(V_b) else V_b
    wh = W_b @ H
    wh += eps
    return (V_d * wh ** (beta - 2.0)) @ H.T, (wh ** (beta - 1.0)) @ H.T


def apply_w_update(
    W_b: np.ndarray, numer: np.ndarray, denom, HHt: np.ndarray, h_rowsum, rule: Rule
) -> np.ndarray:
    """The W half-step of ``rule`` for one row block from :func:`w_products` (a new array;
    the inputs are left as they are).

    ``HHt`` is HHᵀ (β = 2), ``h_rowsum`` H's row sums (β = 1). MU: W ← W ∘ [numer / denom]^γ
    with denom = W HHᵀ + ε (β = 2), 1 Hᵀ + ε (β = 1), or the given one + ε; HALS sweeps the
    columns of W; BPP solves each row's NNLS exactly.
    """
    if rule.solver == "hals":
        Wt = W_b.T.copy()  # a copy even when W_b.T is contiguous (r = 1): W_b is not ours
        hals_sweeps(Wt, HHt, np.ascontiguousarray(numer.T), rule.w_sweeps)
        return np.ascontiguousarray(Wt.T)
    if rule.solver == "bpp":
        solution = nnls_bpp(HHt, numer.T, W_b.T > 0)
        return np.ascontiguousarray(solution.T.astype(W_b.dtype, copy=False))
    eps = rule.eps
    if rule.beta == FROBENIUS:
        denom = W_b @ HHt
        denom += eps
    elif rule.beta == KULLBACK_LEIBLER:
        denom = h_rowsum + eps
    else:
        denom = denom + eps
    ratio = numer / denom
    if rule.gamma != 1.0:
        ratio **= rule.gamma
    ratio *= W_b
    return ratio.astype(W_b.dtype, copy=False)


def mu_update_h(H: np.ndarray, partials: Partials, rule: Rule) -> np.ndarray:
    """Multiplicative update of H from the reduced partials (a new array).

    β = 2: H ← H ∘ (WᵀV) / (WᵀW H + ε); β = 1: H ← H ∘ (Wᵀ(V / (WH + ε))) / (Wᵀ1 + ε);
    otherwise H ← H ∘ [Wᵀ(V ∘ (WH+ε)^(β-2)) / (Wᵀ(WH+ε)^(β-1) + ε)]^γ.
    """
    eps = rule.eps
    if rule.beta == FROBENIUS:
        denom = partials.denom @ H
    elif rule.beta == KULLBACK_LEIBLER:
        denom = np.repeat(partials.denom[:, None], H.shape[1], axis=1)
    else:
        denom = partials.denom.copy()
    denom += eps
    ratio = partials.numer / denom
    if rule.gamma != 1.0:
        ratio **= rule.gamma
    ratio *= H
    return ratio.astype(H.dtype, copy=False)


def hals_sweep(X: np.ndarray, gram: np.ndarray, cross: np.ndarray) -> float:
    """One HALS sweep over the rows of X (r, m), in place, Gauss-Seidel in component order.

    Minimizes ½⟨X, gram X⟩ − ⟨cross, X⟩ over X ≥ 0 one row at a time:
    X_k ← max(0, X_k + (cross_k − gram_k X) / gram_kk). Rows with gram_kk = 0 are left as is.
    Returns ‖X_new − X_old‖², which accelerated HALS uses to stop its inner sweeps.
    """
    change = 0.0
    for k in range(X.shape[0]):
        if gram[k, k] == 0:
            continue
        step = cross[k] - gram[k] @ X
        step /= gram[k, k]
        step += X[k]
        np.maximum(step, 0, out=step)
        delta = step - X[k]
        change += float(np.dot(delta, delta))
        X[k] = step
    return change


# Accelerated HALS stops its inner sweeps once a sweep changes X by less than
# δ times the first sweep's change (δ = 0.1, Gillis & Glineur 2012): squared, 0.01.
HALS_INNER_STOP = 0.01


def hals_sweeps(X: np.ndarray, gram: np.ndarray, cross: np.ndarray, max_sweeps: int = 1) -> np.ndarray:
    """Up to ``max_sweeps`` HALS sweeps over X (r, m) in place from the same gram and cross.

    One sweep is plain HALS. More sweeps stop early once a sweep's change ‖ΔX‖² falls
    below ``HALS_INNER_STOP`` times the first one's.
    """
    first = hals_sweep(X, gram, cross)
    for _ in range(max_sweeps - 1):
        if hals_sweep(X, gram, cross) <= HALS_INNER_STOP * first:
            break
    return X


def hals_update_h(H: np.ndarray, partials: Partials, sweeps: int = 1) -> np.ndarray:
    """HALS update of H from WᵀV and WᵀW (a new array): the rows of H in turn."""
    return hals_sweeps(H.copy(), partials.denom, partials.numer, sweeps)


def bpp_update_h(H: np.ndarray, partials: Partials) -> np.ndarray:
    """ANLS update of H: each column the exact NNLS solution given W (from WᵀW and WᵀV)."""
    return nnls_bpp(partials.denom, partials.numer, H > 0).astype(H.dtype, copy=False)


def update_h(H: np.ndarray, partials: Partials, rule: Rule) -> np.ndarray:
    """The H half-step of ``rule``."""
    if rule.solver == "hals":
        return hals_update_h(H, partials, rule.h_sweeps)
    if rule.solver == "bpp":
        return bpp_update_h(H, partials)
    return mu_update_h(H, partials, rule)


def update_w(V_b, W_b: np.ndarray, H: np.ndarray, HHt: np.ndarray, rule: Rule) -> np.ndarray:
    """The W half-step of ``rule`` for one row block (a new array)."""
    numer, denom = w_products(V_b, W_b, H, rule)
    h_rowsum = H.sum(axis=1) if rule.beta == KULLBACK_LEIBLER and rule.solver == "mu" else None
    return apply_w_update(W_b, numer, denom, HHt, h_rowsum, rule)


def step_block(V_b, W_b: np.ndarray, H: np.ndarray, HHt: np.ndarray, rule: Rule, with_loss: bool = True):
    """One iteration's work on a row block, reading V_b once.

    Returns ``(W_b_new, partials)`` where the partials are taken at (W_b_new, H) and carry
    ‖W_b_new‖² and ‖W_b_new − W_b‖² (and the divergence unless ``with_loss`` is False).
    """
    V_b = as_float_block(V_b, W_b.dtype)
    if _fuses_in_tiles(V_b, rule):
        W_new, partials = _frobenius_step_tiled(V_b, W_b, H, HHt, rule)
    else:
        W_new = update_w(V_b, W_b, H, HHt, rule)
        partials = block_partials(V_b, W_new, H, rule, with_loss)
    delta = W_new - W_b
    return W_new, partials._replace(
        w_sq=float(np.vdot(W_new, W_new)), dw_sq=float(np.vdot(delta, delta))
    )


# Dense Frobenius steps of MU (and one-sweep HALS) run in row tiles of about this many
# entries: each tile of V is read from memory once, for V_t Hᵀ and then W_tᵀ V_t, while it
# is still in cache. (Multi-sweep HALS and BPP would pay their per-call overhead per tile.)
FUSED_TILE_ENTRIES = 2**20


def _fuses_in_tiles(V_b, rule: Rule) -> bool:
    if rule.beta != FROBENIUS or sp.issparse(V_b):
        return False
    cheap_update = rule.solver == "mu" or (rule.solver == "hals" and rule.w_sweeps == 1)
    return cheap_update and V_b.shape[0] * V_b.shape[1] > 2 * FUSED_TILE_ENTRIES


def _frobenius_step_tiled(V_b: np.ndarray, W_b: np.ndarray, H: np.ndarray, HHt: np.ndarray, rule: Rule):
    """The W update and the Frobenius partials of a dense block, tile by tile (W's rows
    update independently, so this is the block's update)."""
    W_new = np.empty_like(W_b)
    numer = np.zeros(H.shape, dtype=W_b.dtype)
    step = max(1, FUSED_TILE_ENTRIES // max(1, V_b.shape[1]))
    for start in range(0, V_b.shape[0], step):
        V_t = V_b[start : start + step]
        W_t = update_w(V_t, W_b[start : start + step], H, HHt, rule)
        W_new[start : start + step] = W_t
        numer += W_t.T @ V_t
    return W_new, Partials(numer, W_new.T @ W_new, 0.0, 0.0, 0.0)


def initial_partials_block(V_b, W_b: np.ndarray, H: np.ndarray, rule: Rule) -> Partials:
    """Partials at a starting point (no W update), with ‖W_b‖²."""
    V_b = as_float_block(V_b, W_b.dtype)
    partials = block_partials(V_b, W_b, H, rule)
    return partials._replace(w_sq=float(np.vdot(W_b, W_b)))


# ---------------------------------------------------------------------------
# 2-D grid: V in chunks V_ij that meet only W's row block i and H's column block j.
#
# An iteration makes two passes over the chunks. Pass B sums the W products of
# :func:`w_products` over j and updates W_i; pass A sums the partials of :func:`block_partials`
# over i at the new W, for the next H update of each column block and the objective.


class WProducts(NamedTuple):
    """:func:`w_products` of a chunk, (n_i, r) each; summed over the column blocks."""

    numer: np.ndarray
    denom: np.ndarray | None


def add_w_products(a: WProducts, b: WProducts) -> WProducts:
    return WProducts(a.numer + b.numer, None if a.denom is None else a.denom + b.denom)


def chunk_w_products(V_b, W_b: np.ndarray, H_b: np.ndarray, rule: Rule) -> WProducts:
    """Pass B on chunk (i, j): the products of V_ij with H_j that W_i's update needs."""
    return WProducts(*w_products(as_float_block(V_b, W_b.dtype), W_b, H_b, rule))


def chunk_h_partials(V_b, W_b: np.ndarray, H_b: np.ndarray, rule: Rule, with_loss: bool = True) -> Partials:
    """Pass A on chunk (i, j): the partials of column block j from row block i.

    For β = 2 the denominator WᵀW depends on W alone, so it is left at 0 here and summed once
    over the row blocks by :func:`grid_update_w` instead of once per chunk.
    """
    V_b = as_float_block(V_b, W_b.dtype)
    if rule.beta == FROBENIUS:
        return Partials(_dot_t(W_b, V_b), 0.0, 0.0, 0.0, 0.0)
    return block_partials(V_b, W_b, H_b, rule, with_loss)


class FactorSums(NamedTuple):
    """Sums over one factor's blocks after its update.

    gram : WᵀW (W's row blocks, β = 2 only, else 0) or HHᵀ (H's column blocks).
    rowsum : H's row sums (H only: the KL W update's denominator), else 0.
    sq, d_sq : ‖X_new‖² and ‖X_new − X_old‖², for the relative change.
    """

    gram: np.ndarray | float
    rowsum: np.ndarray | float
    sq: float
    d_sq: float


def add_factor_sums(a: FactorSums, b: FactorSums) -> FactorSums:
    return FactorSums(*(x + y for x, y in zip(a, b)))


def _change(new: np.ndarray, old: np.ndarray) -> tuple[float, float]:
    delta = new - old
    return float(np.vdot(new, new)), float(np.vdot(delta, delta))


def grid_update_w(W_b: np.ndarray, products: WProducts, h_sums: FactorSums, rule: Rule):
    """W_i's update from its products summed over the column blocks, and its :class:`FactorSums`."""
    W_new = apply_w_update(W_b, products.numer, products.denom, h_sums.gram, h_sums.rowsum, rule)
    gram_w = gram(W_new) if rule.beta == FROBENIUS else 0.0
    return W_new, FactorSums(gram_w, 0.0, *_change(W_new, W_b))


def grid_update_h(H_b: np.ndarray, partials: Partials, w_gram, rule: Rule, update: bool = True):
    """H_j's update from its partials summed over the row blocks (``w_gram`` is WᵀW for β = 2),
    and its :class:`FactorSums`; ``update=False`` keeps H_j (a fixed H)."""
    if update:
        if rule.beta == FROBENIUS:
            partials = partials._replace(denom=w_gram)
        H_new = update_h(H_b, partials, rule)
    else:
        H_new = H_b
    return H_new, FactorSums(gram(H_new.T), H_new.sum(axis=1), *_change(H_new, H_b))


def column_objective_term(partials: Partials, H_b: np.ndarray, beta: float) -> float:
    """Column block j's share of the objective: ⟨(WᵀV)_j, H_j⟩ for β = 2 (the cross term of
    the Gram identity), else the divergence summed over the column block."""
    if beta == FROBENIUS:
        return float(np.vdot(partials.numer.astype(np.float64), H_b.astype(np.float64)))
    return float(partials.loss)


# ---------------------------------------------------------------------------
# Scan: validation and the sums the objective and the inits need


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
    if mask_rows.size == 0:
        return None
    first = np.lexsort((mask_cols, mask_rows))[0]
    return (int(mask_rows[first]) + row_offset, int(mask_cols[first]) + col_offset)


def block_stats(V_b, row_offset: int, with_xlogx: bool = False, col_offset: int = 0) -> BlockStats:
    """Sums and the bad entries of one block whose first entry is V[row_offset, col_offset].

    ``with_xlogx`` also sums V log V (the KL objective's constant; finite V only).
    """
    if not sp.issparse(V_b):
        clean = _clean_dense_stats(np.asarray(V_b), with_xlogx)
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
    flat = values.reshape(values.shape[0], -1)
    for start, stop in _row_tiles(flat.shape[0], flat.shape[1]):
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


# ---------------------------------------------------------------------------
# Initialization helpers


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


def block_times(V_b, M: np.ndarray) -> np.ndarray:
    """V_b @ M for a dense or sparse block (the range finder's product)."""
    return np.asarray(as_float_block(V_b, M.dtype) @ M)


def block_transpose_times(Q_b: np.ndarray, V_b) -> np.ndarray:
    """Q_bᵀ V_b for a dense or sparse block."""
    return _dot_t(Q_b, as_float_block(V_b, Q_b.dtype))


def nndsvd_w_block(
    U_b: np.ndarray, signs: np.ndarray, scales: np.ndarray, fill, start: int, threshold: float
) -> np.ndarray:
    """NNDSVD's W for one row block: the chosen sign part of each singular vector, scaled.

    ``signs[k]`` is +1 to keep the positive part of U[:, k], -1 for the negative part;
    ``scales[k]`` = sqrt(s_k σ_k) / ‖chosen part of U[:, k]‖. Entries below ``threshold``
    become 0, then ``fill`` replaces zeros: None (NNDSVD), a number (NNDSVDa), or
    ``(seed, scale)`` for small random values (NNDSVDar).
    """
    W_b = np.maximum(U_b * signs, 0) * scales
    return fill_zeros(W_b, fill, start, threshold)


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

