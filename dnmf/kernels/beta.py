"""The β-divergence: the β of the losses, the update :class:`Rule`, the divergence and the objective.

The objective is the β-divergence D_β(V | WH) (½‖V − WH‖² for β = 2), as in scikit-learn.
For β = 2 it comes from the Gram identity

    ‖V − WH‖² = ‖V‖² − 2⟨WᵀV, H⟩ + ⟨WᵀW, HHᵀ⟩

and never forms WH; for other β, WH is formed one block at a time (at V's nonzeros only
for sparse V and KL) and the divergence summed over the blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
from scipy.special import xlogy

if TYPE_CHECKING:
    from .products import Partials


FROBENIUS = 2.0
KULLBACK_LEIBLER = 1.0
ITAKURA_SAITO = 0.0


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
