"""The masked objective: per-block math of NMF with missing entries.

A mask M (True = observed) weights the β-divergence, so that only observed entries count:

    D_β^M(V | WH) = Σ_ij M_ij d_β(V_ij | (WH)_ij),      ½‖M ∘ (V − WH)‖² for β = 2.

Its multiplicative updates (Lee & Seung 2001 with weights; Févotte & Idier 2011 for β) are

    W ← W ∘ [(M ∘ V ∘ (WH)^(β−2)) Hᵀ / ((M ∘ (WH)^(β−1)) Hᵀ + ε)]^γ
    H ← H ∘ [Wᵀ(M ∘ V ∘ (WH)^(β−2)) / (Wᵀ(M ∘ (WH)^(β−1)) + ε)]^γ

so for β = 2: W ← W ∘ ((M∘V)Hᵀ) / ((M∘WH)Hᵀ + ε), and for β = 1 (KL):
W ← W ∘ ((M∘V/WH)Hᵀ) / (M Hᵀ + ε). Entries of V that are NaN are always missing; an
explicit mask block can hide more. As in :mod:`.step`, one task per row block updates
W_b and returns the :class:`~.products.Partials` at the new (W_b, H) for the next H update:
here ``numer`` and ``denom`` are both (r, p) (no Gram shortcut exists under a mask) and
``loss`` is the masked divergence of the block. The ratios are those of
:func:`~.updates.mu_update`, the H half-step is :func:`~.updates.update_h`'s.

With ``solver="hals"`` or ``"bpp"`` (Frobenius only) the missing entries are filled with the
current WH and an ordinary HALS (or BPP) step is taken (a majorization of the masked
objective; see :func:`filled_hals_partials`).

Sparse blocks are made dense one block at a time (a mask is dense anyway).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import scipy.sparse as sp

from .beta import FROBENIUS, Rule, beta_divergence_dense
from .products import Partials, l1_norm
from .scans import BlockStats, add_stats, block_stats
from .updates import mu_penalized, mu_update, update_h, update_w


def observed_block(V_b, M_b, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(V_b with missing entries set to 0, as ``dtype``; the boolean mask of observed entries).

    ``M_b`` is a boolean block (True = observed) or None; NaN entries of V_b are missing either way.
    """
    V_d = V_b.toarray() if sp.issparse(V_b) else np.asarray(V_b)
    V_d = np.array(V_d, dtype=dtype, copy=True)
    observed = ~np.isnan(V_d)
    if M_b is not None:
        observed &= np.asarray(M_b, dtype=bool)
    V_d[~observed] = 0
    return V_d, observed


def _weighted_terms(V_d: np.ndarray, observed: np.ndarray, WH: np.ndarray, rule: Rule):
    """The masked numerator and denominator matrices: M∘V∘(WH+ε)^(β−2) and M∘(WH+ε)^(β−1).

    For β = 2 the denominator is M∘WH (no ε), for β = 1 it is M itself (as a float array).
    """
    beta, eps = rule.beta, rule.eps_wh
    if rule.frobenius:
        return V_d, np.where(observed, WH, 0)
    shifted = WH + eps
    if rule.kullback_leibler:
        return np.divide(V_d, shifted), observed.astype(WH.dtype)
    numer = V_d * shifted ** (beta - 2.0)
    denom = np.where(observed, shifted ** (beta - 1.0), 0)
    return numer, denom


def masked_loss(V_d: np.ndarray, observed: np.ndarray, WH: np.ndarray, beta: float) -> float:
    """D_β over the observed entries of a block, accumulated in float64."""
    return beta_divergence_dense(V_d[observed], WH[observed], beta)


def masked_update_w(V_d: np.ndarray, observed: np.ndarray, W_b: np.ndarray, H: np.ndarray, rule: Rule) -> np.ndarray:
    """Masked multiplicative update of one row block of W (a new array), see the module docstring."""
    numer, denom = _weighted_terms(V_d, observed, W_b @ H, rule)
    return mu_update(W_b, numer @ H.T, mu_penalized(denom @ H.T, W_b, rule.l1_w, rule.l2_w), rule)


def masked_partials(V_d: np.ndarray, observed: np.ndarray, W_b: np.ndarray, H: np.ndarray, rule: Rule) -> Partials:
    """Partials at (W_b, H): numer = Wᵀ(M∘V∘(WH)^(β−2)), denom = Wᵀ(M∘(WH)^(β−1)), both (r, p)."""
    WH = W_b @ H
    loss = masked_loss(V_d, observed, WH, rule.beta)
    numer, denom = _weighted_terms(V_d, observed, WH, rule)
    return Partials(W_b.T @ numer, W_b.T @ denom, loss, 0.0, 0.0)


def masked_update_h(H: np.ndarray, partials: Partials, rule: Rule) -> np.ndarray:
    """The masked H half-step from the reduced partials (a new array): :func:`~.updates.update_h`.

    MU: H ← H ∘ [numer / (denom + ε)]^γ with (r, p) numer and denom, whatever β. HALS: one
    ordinary HALS sweep on the filled-in data (see :func:`filled_hals_partials`), whose
    surrogate changes with every step.
    """
    return update_h(H, partials, replace(rule, h_sweeps=1), whole_denominator=True)


# Masked HALS (Frobenius) by majorization: fill the missing entries with the current WH,
#
#     V̂ = M ∘ V + (1 − M) ∘ WH,    ½‖V̂ − W'H'‖² ≥ ½‖M ∘ (V − W'H')‖²  with equality at (W, H),
#
# then take an ordinary HALS step on V̂ (the EM algorithm for missing data with a Gaussian
# model). Every step decreases the surrogate, hence the masked objective, and HALS keeps its
# speed; the cost per block is two W_b H products, as for KL.


# The least-squares solvers, which step on the filled-in block: every step decreases the
# surrogate, HALS by its sweep, BPP by solving it exactly for one factor.
FILLED_SOLVERS = ("hals", "bpp")


def filled_block(V_d: np.ndarray, observed: np.ndarray, WH: np.ndarray) -> np.ndarray:
    """M ∘ V + (1 − M) ∘ WH (a new array)."""
    return np.where(observed, V_d, WH)


def filled_hals_partials(V_d: np.ndarray, observed: np.ndarray, W_b: np.ndarray, H: np.ndarray) -> Partials:
    """Partials at (W_b, H) for the next HALS H step: W_bᵀV̂ (r, p), W_bᵀW_b (r, r), masked loss."""
    # W_bᵀW_b here and HHᵀ in masked_step_block are ``X.T @ X`` (BLAS syrk), not gram() (gemm):
    # the two round differently, so switching would change masked HALS fits in the last bits.
    WH = W_b @ H
    loss = masked_loss(V_d, observed, WH, FROBENIUS)
    return Partials(W_b.T @ filled_block(V_d, observed, WH), W_b.T @ W_b, loss, 0.0, 0.0)


def _partials(V_d, observed, W_b, H, rule: Rule) -> Partials:
    """The masked partials of ``rule`` at (W_b, H): filled-in for HALS, weighted for MU."""
    if rule.solver in FILLED_SOLVERS:
        return filled_hals_partials(V_d, observed, W_b, H)
    return masked_partials(V_d, observed, W_b, H, rule)


def masked_step_block(V_b, M_b, W_b: np.ndarray, H: np.ndarray, rule: Rule):
    """One iteration's work on a row block with missing entries, reading V_b (and M_b) once.

    MU: the masked multiplicative update; HALS: a HALS step on the filled-in block. Returns
    ``(W_b_new, partials)``, the partials at (W_b_new, H) with ‖W_b_new‖² and ‖W_b_new − W_b‖²,
    like :func:`dnmf.kernels.step_block`.
    """
    V_d, observed = observed_block(V_b, M_b, W_b.dtype)
    if rule.solver in FILLED_SOLVERS:
        V_hat = filled_block(V_d, observed, W_b @ H)
        W_new = update_w(V_hat, W_b, H, H @ H.T, replace(rule, w_sweeps=1))
    else:
        W_new = masked_update_w(V_d, observed, W_b, H, rule)
    partials = _partials(V_d, observed, W_new, H, rule)
    delta = W_new - W_b
    return W_new, partials._replace(
        w_sq=float(np.vdot(W_new, W_new)), dw_sq=float(np.vdot(delta, delta)), w_l1=l1_norm(W_new)
    )


def masked_initial_partials(V_b, M_b, W_b: np.ndarray, H: np.ndarray, rule: Rule) -> Partials:
    """Partials at a starting point (no W update), with ‖W_b‖²."""
    V_d, observed = observed_block(V_b, M_b, W_b.dtype)
    partials = _partials(V_d, observed, W_b, H, rule)
    return partials._replace(w_sq=float(np.vdot(W_b, W_b)), w_l1=l1_norm(W_b))


# ---------------------------------------------------------------------------
# Scan, fill and hold-out


def masked_block_stats(V_b, M_b, row_offset: int, nan_is_missing: bool) -> tuple[BlockStats, int]:
    """:func:`dnmf.kernels.block_stats` over the observed entries only, and their number.

    Observed: ``M_b`` True (all when None) and, if ``nan_is_missing``, not NaN. Non-finite
    observed entries (infinities; NaN where NaN is not missing) still count as errors; the
    sums and counts (v_sq, v_sum, nnz) cover observed entries.
    """
    V_d = V_b.toarray() if sp.issparse(V_b) else np.asarray(V_b)
    observed = ~np.isnan(V_d) if nan_is_missing else np.ones(V_d.shape, dtype=bool)
    if M_b is not None:
        observed &= np.asarray(M_b, dtype=bool)
    cleaned = np.where(observed, V_d, 0)
    return block_stats(cleaned, row_offset), int(observed.sum())


def add_masked_stats(a: tuple[BlockStats, int], b: tuple[BlockStats, int]) -> tuple[BlockStats, int]:
    """Combine two (BlockStats, n_observed) pairs, ``a`` first in row order."""
    return add_stats(a[0], b[0]), a[1] + b[1]


def fill_missing(V_b, M_b, value: float, dtype) -> np.ndarray:
    """A dense copy of V_b with missing entries replaced by ``value`` (for SVD-based inits)."""
    V_d, observed = observed_block(V_b, M_b, dtype)
    V_d[~observed] = value
    return V_d


HOLDOUT_TILE_ROWS = 64


def holdout_rows(seed: int, start: int, stop: int, p: int, fraction: float) -> np.ndarray:
    """Rows ``start:stop`` of a random training mask (True = kept for training, False = held out).

    Each entry is held out with probability ``fraction``, drawn in fixed tiles of rows from
    ``default_rng([seed, 4, tile])``, so the mask does not depend on the chunking.
    """
    out = np.empty((stop - start, p), dtype=bool)
    first_tile, last_tile = start // HOLDOUT_TILE_ROWS, (stop - 1) // HOLDOUT_TILE_ROWS
    for tile in range(first_tile, last_tile + 1):
        tile_start = tile * HOLDOUT_TILE_ROWS
        kept = np.random.default_rng([seed, 4, tile]).random((HOLDOUT_TILE_ROWS, p)) >= fraction
        lo, hi = max(start, tile_start), min(stop, tile_start + HOLDOUT_TILE_ROWS)
        out[lo - start : hi - start] = kept[lo - tile_start : hi - tile_start]
    return out


def holdout_score_block(V_b, M_b, train_b: np.ndarray, W_b: np.ndarray, H: np.ndarray, beta: float) -> np.ndarray:
    """Scores of a fit on one block: [D_β on held-out, Σ V² held-out, #held-out, Σ V² train].

    Held-out entries are observed (not NaN, ``M_b`` True) but not in ``train_b``.
    """
    V_d, observed = observed_block(V_b, M_b, W_b.dtype)
    hidden = observed & ~np.asarray(train_b, dtype=bool)
    train = observed & np.asarray(train_b, dtype=bool)
    WH = W_b @ H
    return np.array(
        [
            beta_divergence_dense(V_d[hidden], WH[hidden], beta),
            float(np.sum(np.square(V_d[hidden], dtype=np.float64))),
            float(hidden.sum()),
            float(np.sum(np.square(V_d[train], dtype=np.float64))),
        ]
    )
