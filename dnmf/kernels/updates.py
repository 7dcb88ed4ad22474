"""The update rules: one half-step of W or of H, from the products of :mod:`.products`.

MU (Lee & Seung; Févotte & Idier for β ≠ 2), HALS (Cichocki & Phan; accelerated as in
Gillis & Glineur 2012) and ANLS by block principal pivoting (:mod:`.nnls`).
"""

from __future__ import annotations

import numpy as np

from .beta import Rule
from .nnls import nnls_bpp
from .products import Partials, w_products


def mu_update(X: np.ndarray, numer: np.ndarray, denom: np.ndarray, rule: Rule) -> np.ndarray:
    """The multiplicative update of a factor X (a new array of X's dtype)::

        X ← X ∘ [numer / (denom + ε)]^γ

    Parameters
    ----------
    X : array of shape (m, k)
        W_b (n_b, r) or H (r, p), left as it is.
    numer, denom : arrays that broadcast to (m, k)
        The numerator and denominator of the ratio, ε not yet added to ``denom``.
    rule : Rule
        Gives ε and the exponent γ (:attr:`Rule.gamma`; 1 for 1 ≤ β ≤ 2).
    """
    ratio = numer / (denom + rule.eps)
    if rule.gamma != 1.0:
        ratio **= rule.gamma
    ratio *= X
    return ratio.astype(X.dtype, copy=False)


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
    if rule.frobenius:
        denom = W_b @ HHt
    elif rule.kullback_leibler:
        denom = h_rowsum
    return mu_update(W_b, numer, denom, rule)


def mu_update_h(H: np.ndarray, partials: Partials, rule: Rule) -> np.ndarray:
    """Multiplicative update of H from the reduced partials (a new array).

    β = 2: H ← H ∘ (WᵀV) / (WᵀW H + ε); β = 1: H ← H ∘ (Wᵀ(V / (WH + ε))) / (Wᵀ1 + ε);
    otherwise H ← H ∘ [Wᵀ(V ∘ (WH+ε)^(β-2)) / (Wᵀ(WH+ε)^(β-1) + ε)]^γ.
    """
    denom = partials.denom
    if rule.frobenius:
        denom = denom @ H
    elif rule.kullback_leibler:
        # Whole (r, p), not a broadcast column: the new H then comes out C-ordered, as for
        # the other β, even where WᵀV is F-ordered (sparse V), and the products that use it
        # round the same.
        denom = np.repeat(denom[:, None], H.shape[1], axis=1)
    return mu_update(H, partials.numer, denom, rule)


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
    h_rowsum = H.sum(axis=1) if rule.kullback_leibler and rule.solver == "mu" else None
    return apply_w_update(W_b, numer, denom, HHt, h_rowsum, rule)
