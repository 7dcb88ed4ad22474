"""The β-divergence: β, the update :class:`Rule`, the divergence of a block and the objective.

The objective is the β-divergence D_β(V | WH) = Σ_ij d_β(V_ij | (WH)_ij), as in scikit-learn:

    d_β(x | y) = ½ (x − y)²                                      β = 2 (Frobenius)
                 x log(x / y) − x + y                            β = 1 (Kullback-Leibler)
                 x / y − log(x / y) − 1                          β = 0 (Itakura-Saito)
                 (x^β + (β − 1) y^β − β x y^(β−1)) / (β (β − 1))  otherwise.

For β = 2 it comes from the Gram identity

    ‖V − WH‖² = ‖V‖² − 2⟨WᵀV, H⟩ + ⟨WᵀW, HHᵀ⟩

and never forms WH; for other β, WH is formed one block at a time (at V's nonzeros only
for sparse V and KL) and the divergence summed over the blocks.

This module is the one place that tells values of β apart: the other kernels ask a
:class:`Rule` (:attr:`Rule.frobenius`, :attr:`Rule.kullback_leibler`, :attr:`Rule.gamma`),
and the functions below that take β alone dispatch on it here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp
from scipy.special import xlogy

FROBENIUS = 2.0
KULLBACK_LEIBLER = 1.0
ITAKURA_SAITO = 0.0


@dataclass(frozen=True)
class Rule:
    """Which update to apply, and what its β means for the kernels.

    Parameters
    ----------
    solver : {"mu", "hals", "bpp"}
        Multiplicative updates, HALS, or ANLS by block principal pivoting.
    beta : float
        β of the divergence the updates decrease.
    eps : float
        ε of the MU denominators (and of WH where it is raised to a power), relative to V's
        units: the kernels add :attr:`eps_wh` and :attr:`eps_denominator`.
    w_sweeps, h_sweeps : int
        The most HALS sweeps per half-step from the same products (accelerated HALS,
        Gillis & Glineur 2012; 1 is plain HALS). Ignored by "mu" and "bpp".
    unit_exponent : int
        An even k with V's typical entry near 2^k (see
        :func:`dnmf.data.store.unit_exponent`). ε is taken in units of 2^k: added to WH
        (which scales like V) it is ε 2^k, added to an MU denominator (which scales like
        V^(β − 1/2) when W and H scale like √V, as every start does) it is ε 2^(k(β − 1/2)).
        So a fit of 4^j V is exactly 2^j times the fit of V, and a fit's result does not
        depend on V's units (k = 0 for entries near 1: ε as given).
    l1_w, l2_w, l1_h, l2_h : float
        The L1 and L2 penalties of W and H, already scaled as scikit-learn (>= 1.2) scales
        them (:func:`penalties`): the objective gains

            l1_W ‖W‖₁ + ½ l2_W ‖W‖²_F + l1_H ‖H‖₁ + ½ l2_H ‖H‖²_F.

        MU adds ``l1 + l2 X`` to the denominator of X's update; HALS and BPP add ``l2`` to the
        Gram matrix's diagonal and subtract ``l1`` from the cross term. All 0: no penalty, and
        the kernels take exactly the unpenalized path.

    Notes
    -----
    Two values of β have shortcuts, which the kernels ask the rule for:

    - :attr:`frobenius` (β = 2): the updates and the objective need only WᵀV, VHᵀ and the
      Gram matrices WᵀW, HHᵀ; WH is never formed;
    - :attr:`kullback_leibler` (β = 1): the MU denominators are W's column sums and H's row
      sums; WH is formed only inside V / (WH + ε), at V's nonzeros for sparse V.

    Any other β forms (WH + ε)^(β−2) and (WH + ε)^(β−1) block by block. MU raises its ratio
    to the power :attr:`gamma` (1 for 1 ≤ β ≤ 2). Under a mask (:mod:`.masked`) no shortcut
    holds for the MU denominators, whatever β.
    """

    solver: str
    beta: float
    eps: float
    w_sweeps: int = 1
    h_sweeps: int = 1
    unit_exponent: int = 0
    l1_w: float = 0.0
    l2_w: float = 0.0
    l1_h: float = 0.0
    l2_h: float = 0.0

    @property
    def eps_wh(self) -> float:
        """ε added to WH: ε 2^k."""
        return _ldexp(self.eps, self.unit_exponent)

    @property
    def eps_denominator(self) -> float:
        """ε added to an MU denominator: ε 2^(k(β − 1/2))."""
        return _ldexp(self.eps, self.unit_exponent * (self.beta - 0.5))

    @property
    def regularized(self) -> bool:
        """Whether any penalty is set."""
        return bool(self.l1_w or self.l2_w or self.l1_h or self.l2_h)

    def without_h_penalty(self) -> Rule:
        """The rule with H's penalty dropped (H fixed: its penalty is a constant)."""
        return replace(self, l1_h=0.0, l2_h=0.0)

    def penalty(self, w_l1: float, w_sq: float, h_l1: float, h_sq: float) -> float:
        """The penalty terms of the objective from ‖W‖₁, ‖W‖², ‖H‖₁ and ‖H‖² (0 when unregularized)."""
        if not self.regularized:
            return 0.0
        return float(
            self.l1_w * w_l1 + 0.5 * self.l2_w * w_sq + self.l1_h * h_l1 + 0.5 * self.l2_h * h_sq
        )

    @property
    def frobenius(self) -> bool:
        """β = 2: everything comes from WᵀV, VHᵀ, WᵀW and HHᵀ (the Gram identity)."""
        return self.beta == FROBENIUS

    @property
    def kullback_leibler(self) -> bool:
        """β = 1: the MU denominators are W's column sums and H's row sums."""
        return self.beta == KULLBACK_LEIBLER

    @property
    def gamma(self) -> float:
        """Févotte-Idier exponent that makes β-MU monotone outside 1 ≤ β ≤ 2."""
        if self.beta < 1:
            return 1.0 / (2.0 - self.beta)
        if self.beta > 2:
            return 1.0 / (self.beta - 1.0)
        return 1.0


def _ldexp(value: float, exponent: float) -> float:
    """value 2^exponent (exact for an integer exponent), kept finite where it would overflow."""
    if value == 0:
        return 0.0
    if float(exponent).is_integer():
        scaled = float(np.ldexp(value, int(np.clip(exponent, -2000, 2000))))
    else:
        with np.errstate(over="ignore", under="ignore"):
            scaled = float(value * np.exp2(exponent))
    return min(scaled, float(np.finfo(np.float64).max))


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


def objective_term(numer: np.ndarray, loss: float, H: np.ndarray, beta: float) -> float:
    """The part of D_β(V | WH) that the partials at (W, H) carry, for H or a column block of it.

    β = 2: the cross term ⟨WᵀV, H⟩ of the Gram identity, from ``numer`` = WᵀV (r, p) and H
    (r, p); otherwise ``loss``, the divergence summed over the blocks (less the KL constant
    for β = 1, see :func:`objective_from_sums`).
    """
    if beta == FROBENIUS:
        return float(np.vdot(numer.astype(np.float64), H.astype(np.float64)))
    return float(loss)


def objective_from_sums(term: float, w_gram, h_gram, v_sq: float, beta: float, kl_offset: float = 0.0) -> float:
    """D_β(V | WH) from ``term``: ⟨WᵀV, H⟩ for β = 2 (with WᵀW, HHᵀ and ‖V‖² in the Gram
    identity), else the divergence summed over V less the KL constant ``kl_offset`` (β = 1)."""
    if beta == KULLBACK_LEIBLER:
        return max(term + kl_offset, 0.0)
    if beta != FROBENIUS:
        return max(term, 0.0)
    gram_term = float(np.vdot(np.asarray(w_gram, dtype=np.float64), np.asarray(h_gram, dtype=np.float64)))
    return max(0.5 * (v_sq - 2.0 * term + gram_term), 0.0)


def penalties(alpha_W: float, alpha_H: float, l1_ratio: float, shape: tuple[int, int]) -> dict:
    """The scaled penalties of :class:`Rule` for V of ``shape`` (n_samples, n_features), as
    scikit-learn (>= 1.2) defines them: W's scaled by n_features, H's by n_samples::

        l1_W = alpha_W · l1_ratio · p          l2_W = alpha_W · (1 − l1_ratio) · p
        l1_H = alpha_H · l1_ratio · n          l2_H = alpha_H · (1 − l1_ratio) · n
    """
    n, p = shape
    return {
        "l1_w": float(p * alpha_W * l1_ratio),
        "l2_w": float(p * alpha_W * (1.0 - l1_ratio)),
        "l1_h": float(n * alpha_H * l1_ratio),
        "l2_h": float(n * alpha_H * (1.0 - l1_ratio)),
    }
