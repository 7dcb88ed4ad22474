"""The update rules: one half-step of W or of H, from the products of :mod:`.products`.

Three solvers, each a rule for the factor X being updated given the other factor's products:

- MU, multiplicative updates (Lee & Seung 2001; Févotte & Idier 2011 for β ≠ 2):
  X ← X ∘ [numer / (denom + ε)]^γ, written once in :func:`mu_update`;
- HALS, hierarchical alternating least squares (Cichocki & Phan 2009), one row of X at a
  time, with the inner sweeps of accelerated HALS (Gillis & Glineur 2012): :func:`hals_sweeps`;
- BPP, alternating NNLS solved exactly by block principal pivoting (:mod:`.nnls`).

HALS and BPP minimize the Frobenius loss only. The H half-step is :func:`update_h`, the W
half-step of a row block :func:`update_w` (or :func:`apply_w_update` from products summed
elsewhere, as on a grid).

The L1 / L2 penalties of the :class:`~.beta.Rule` (scikit-learn's ``alpha_W``, ``alpha_H``,
``l1_ratio``) enter each rule where scikit-learn puts them: MU adds ``l1 + l2 X`` to the
denominator (:func:`mu_penalized`); HALS and BPP solve the penalized least squares
½⟨X, (G + l2 I) X⟩ − ⟨C − l1, X⟩ (:func:`ls_penalized`). Without a penalty both return their
inputs untouched.
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
        Gives ε (:attr:`Rule.eps_denominator`) and the exponent γ (:attr:`Rule.gamma`; 1 for 1 ≤ β ≤ 2).
    """
    ratio = numer / (denom + rule.eps_denominator)
    if rule.gamma != 1.0:
        ratio **= rule.gamma
    ratio *= X
    return ratio.astype(X.dtype, copy=False)


def mu_penalized(denom, X: np.ndarray, l1: float, l2: float):
    """The MU denominator of X with its penalties, ``denom + l1 + l2 X`` (``denom`` itself,
    untouched, when both are 0)."""
    if l1:
        denom = denom + l1
    if l2:
        denom = denom + l2 * X
    return denom


def ls_penalized(gram: np.ndarray, cross: np.ndarray, l1: float, l2: float) -> tuple[np.ndarray, np.ndarray]:
    """The Gram matrix and cross term of a penalized least-squares half-step (HALS, BPP):
    ``gram + l2 I`` and ``cross − l1`` (new arrays; the inputs themselves when both are 0)."""
    if l2:
        gram = np.array(gram, copy=True)
        gram.flat[:: gram.shape[0] + 1] += l2
    if l1:
        cross = cross - l1
    return gram, cross


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


def update_h(H: np.ndarray, partials: Partials, rule: Rule, *, whole_denominator: bool = False) -> np.ndarray:
    """The H half-step of ``rule`` from the partials summed over the row blocks (a new array).

    Parameters
    ----------
    H : array of shape (r, p)
        H, or a column block of it; left as it is.
    partials : Partials
        ``numer`` (r, p) and ``denom`` as :class:`~.products.Partials` describes them:
        WᵀW (r, r) for β = 2, W's column sums (r,) for β = 1, (r, p) otherwise.
    rule : Rule
    whole_denominator : bool
        ``denom`` is the whole (r, p) MU denominator whatever β (the masked partials, for
        which no Gram or sum shortcut exists).

    Returns
    -------
    array of shape (r, p), H's dtype.

    Notes
    -----
    MU: H ← H ∘ [numer / (D + l1_H + l2_H H + ε)]^γ with D = WᵀW H (β = 2), colsum(W) 1ᵀ
    (β = 1), or ``denom`` itself. HALS: up to ``rule.h_sweeps`` sweeps over the rows of H
    minimizing ½⟨H, (WᵀW + l2_H I) H⟩ − ⟨WᵀV − l1_H, H⟩. BPP: each column of H the exact
    solution of that problem given W.
    """
    if rule.solver in ("hals", "bpp"):
        gram, cross = ls_penalized(partials.denom, partials.numer, rule.l1_h, rule.l2_h)
        if rule.solver == "hals":
            return hals_sweeps(H.copy(), gram, cross, rule.h_sweeps)
        return nnls_bpp(gram, cross, H > 0).astype(H.dtype, copy=False)
    denom = partials.denom
    if not whole_denominator:
        if rule.frobenius:
            denom = denom @ H
        elif rule.kullback_leibler:
            # Whole (r, p), not a broadcast column: the new H then comes out C-ordered, as for
            # the other β, even where WᵀV is F-ordered (sparse V), and the products that use
            # it round the same.
            denom = np.repeat(denom[:, None], H.shape[1], axis=1)
    return mu_update(H, partials.numer, mu_penalized(denom, H, rule.l1_h, rule.l2_h), rule)


def apply_w_update(
    W_b: np.ndarray, numer: np.ndarray, denom: np.ndarray | None, HHt: np.ndarray, h_rowsum, rule: Rule
) -> np.ndarray:
    """The W half-step of ``rule`` for one row block from :func:`~.products.w_products`.

    Parameters
    ----------
    W_b : array of shape (n_b, r)
        The row block of W; left as it is.
    numer, denom : arrays of shape (n_b, r), or None for ``denom``
        The products of :func:`~.products.w_products` (summed over the column blocks on a grid).
    HHt : array of shape (r, r)
        HHᵀ (β = 2, HALS and BPP).
    h_rowsum : array of shape (r,), or None
        H's row sums (MU at β = 1).
    rule : Rule

    Returns
    -------
    array of shape (n_b, r), W_b's dtype (a new array).

    Notes
    -----
    MU: W ← W ∘ [numer / (D + l1_W + l2_W W + ε)]^γ with D = W HHᵀ (β = 2), 1 rowsum(H)ᵀ
    (β = 1), or ``denom``. HALS: up to ``rule.w_sweeps`` sweeps over the columns of W. BPP:
    each row of W the exact solution given H. Both with HHᵀ + l2_W I and V Hᵀ − l1_W.
    """
    if rule.solver in ("hals", "bpp"):
        gram, cross = ls_penalized(HHt, numer.T, rule.l1_w, rule.l2_w)
        if rule.solver == "hals":
            Wt = W_b.T.copy()  # a copy even when W_b.T is contiguous (r = 1): W_b is not ours
            hals_sweeps(Wt, gram, np.ascontiguousarray(cross), rule.w_sweeps)
            return np.ascontiguousarray(Wt.T)
        solution = nnls_bpp(gram, cross, W_b.T > 0)
        return np.ascontiguousarray(solution.T.astype(W_b.dtype, copy=False))
    if rule.frobenius:
        denom = W_b @ HHt
    elif rule.kullback_leibler:
        denom = h_rowsum
    return mu_update(W_b, numer, mu_penalized(denom, W_b, rule.l1_w, rule.l2_w), rule)


def update_w(V_b, W_b: np.ndarray, H: np.ndarray, HHt: np.ndarray, rule: Rule) -> np.ndarray:
    """The W half-step of ``rule`` for one row block (a new array).

    Parameters
    ----------
    V_b : array or CSR matrix of shape (n_b, p), W_b's dtype
    W_b : array of shape (n_b, r)
    H : array of shape (r, p)
    HHt : array of shape (r, r)
        HHᵀ.
    rule : Rule
    """
    numer, denom = w_products(V_b, W_b, H, rule)
    h_rowsum = H.sum(axis=1) if rule.kullback_leibler and rule.solver == "mu" else None
    return apply_w_update(W_b, numer, denom, HHt, h_rowsum, rule)
