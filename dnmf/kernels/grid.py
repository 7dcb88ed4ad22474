"""Kernels of the 2-D grid: V in chunks V_ij that meet only W's row block i and H's column block j.

An iteration makes two passes over the chunks. Pass B sums the W products of
:func:`~.products.w_products` over j and updates W_i; pass A sums the partials of
:func:`~.products.block_partials` over i at the new W, for the next H update of each column
block and the objective.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .beta import Rule, objective_term
from .products import Partials, as_float_block, block_partials, dot_t, gram, l1_norm, w_products
from .updates import apply_w_update, update_h


class WProducts(NamedTuple):
    """:func:`~.products.w_products` of a chunk, (n_i, r) each; summed over the column blocks."""

    numer: np.ndarray
    denom: np.ndarray | None


def add_w_products(a: WProducts, b: WProducts) -> WProducts:
    """Sum of two chunks' W products (the tree reduction's binary op)."""
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
    if rule.frobenius:
        return Partials(dot_t(W_b, V_b), 0.0, 0.0, 0.0, 0.0)
    return block_partials(V_b, W_b, H_b, rule, with_loss)


class FactorSums(NamedTuple):
    """Sums over one factor's blocks after its update.

    gram : WᵀW (W's row blocks, β = 2 only, else 0) or HHᵀ (H's column blocks).
    rowsum : H's row sums (H only: the KL W update's denominator), else 0.
    sq, d_sq : ‖X_new‖² and ‖X_new − X_old‖², for the relative change.
    l1 : ‖X_new‖₁ = ΣX_new, for the L1 penalty of the objective.
    """

    gram: np.ndarray | float
    rowsum: np.ndarray | float
    sq: float
    d_sq: float
    l1: float = 0.0


def add_factor_sums(a: FactorSums, b: FactorSums) -> FactorSums:
    """Elementwise sum of two blocks' factor sums (the tree reduction's binary op)."""
    return FactorSums(*(x + y for x, y in zip(a, b)))


def _change(new: np.ndarray, old: np.ndarray) -> tuple[float, float]:
    """‖new‖² and ‖new − old‖²."""
    delta = new - old
    return float(np.vdot(new, new)), float(np.vdot(delta, delta))


def grid_update_w(W_b: np.ndarray, products: WProducts, h_sums: FactorSums, rule: Rule):
    """W_i's update from its products summed over the column blocks, and its :class:`FactorSums`."""
    W_new = apply_w_update(W_b, products.numer, products.denom, h_sums.gram, h_sums.rowsum, rule)
    gram_w = gram(W_new) if rule.frobenius else 0.0
    return W_new, FactorSums(gram_w, 0.0, *_change(W_new, W_b), l1_norm(W_new))


def grid_update_h(H_b: np.ndarray, partials: Partials, w_gram, rule: Rule, update: bool = True):
    """H_j's update from its partials summed over the row blocks (``w_gram`` is WᵀW for β = 2),
    and its :class:`FactorSums`; ``update=False`` keeps H_j (a fixed H)."""
    if update:
        if rule.frobenius:
            partials = partials._replace(denom=w_gram)
        H_new = update_h(H_b, partials, rule)
    else:
        H_new = H_b
    return H_new, FactorSums(gram(H_new.T), H_new.sum(axis=1), *_change(H_new, H_b), l1_norm(H_new))


def column_objective_term(partials: Partials, H_b: np.ndarray, beta: float) -> float:
    """Column block j's share of the objective: :func:`~.beta.objective_term` of its partials
    and H_j (⟨(WᵀV)_j, H_j⟩ for β = 2, else the divergence summed over the column block)."""
    return objective_term(partials.numer, partials.loss, H_b, beta)
