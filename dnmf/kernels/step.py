"""One iteration's work on a row block: update W_b, then the partials at the new W_b.

V_b is read once per iteration: :func:`step_block` updates ``W_b`` from ``V_b`` and H, then
computes the :class:`~.products.Partials` that the next H update and the objective need.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .beta import Rule
from .products import Partials, as_float_block, block_partials, frobenius_residual, l1_norm
from .updates import update_w


def step_block(
    V_b, W_b: np.ndarray, H: np.ndarray, HHt: np.ndarray, rule: Rule, with_loss: bool = True, exact: bool = False
):
    """One iteration's work on a row block, reading V_b once.

    Parameters
    ----------
    V_b : array or sparse matrix of shape (n_b, p)
    W_b : array of shape (n_b, r)
        The row block of W; left as it is.
    H : array of shape (r, p)
    HHt : array of shape (r, r)
        HHᵀ.
    rule : Rule
    with_loss : bool
        False leaves the divergence out of the partials (β ≠ 2).
    exact : bool
        β = 2: the partials carry ½‖V_b − W_b_new H‖² formed directly
        (:func:`~.products.frobenius_residual`).

    Returns
    -------
    W_b_new : array of shape (n_b, r)
        W_b after the W half-step of ``rule`` (:func:`~.updates.update_w`).
    partials : Partials
        The partials at (W_b_new, H) (:func:`~.products.block_partials`), with
        ‖W_b_new‖², ‖W_b_new − W_b‖² and ‖W_b_new‖₁.
    """
    V_b = as_float_block(V_b, W_b.dtype)
    if _fuses_in_tiles(V_b, rule):
        W_new, partials = _frobenius_step_tiled(V_b, W_b, H, HHt, rule, exact)
    else:
        W_new = update_w(V_b, W_b, H, HHt, rule)
        partials = block_partials(V_b, W_new, H, rule, with_loss, exact)
    delta = W_new - W_b
    return W_new, partials._replace(
        w_sq=float(np.vdot(W_new, W_new)), dw_sq=float(np.vdot(delta, delta)), w_l1=l1_norm(W_new)
    )


# Dense Frobenius steps of MU (and one-sweep HALS) run in row tiles of about this many
# entries: each tile of V is read from memory once, for V_t Hᵀ and then W_tᵀ V_t, while it
# is still in cache. (Multi-sweep HALS and BPP would pay their per-call overhead per tile.)
FUSED_TILE_ENTRIES = 2**20


def _fuses_in_tiles(V_b, rule: Rule) -> bool:
    """Whether :func:`step_block` runs on V_b tile by tile (dense, β = 2, a cheap W update, large)."""
    if not rule.frobenius or sp.issparse(V_b):
        return False
    cheap_update = rule.solver == "mu" or (rule.solver == "hals" and rule.w_sweeps == 1)
    return cheap_update and V_b.shape[0] * V_b.shape[1] > 2 * FUSED_TILE_ENTRIES


def _frobenius_step_tiled(
    V_b: np.ndarray, W_b: np.ndarray, H: np.ndarray, HHt: np.ndarray, rule: Rule, exact: bool = False
):
    """The W update and the Frobenius partials of a dense block, tile by tile (W's rows
    update independently, so this is the block's update); ``exact`` adds ½‖V_t − W_t H‖²
    of each tile while it is in cache."""
    W_new = np.empty_like(W_b)
    numer = np.zeros(H.shape, dtype=W_b.dtype)
    residual = 0.0
    step = max(1, FUSED_TILE_ENTRIES // max(1, V_b.shape[1]))
    for start in range(0, V_b.shape[0], step):
        V_t = V_b[start : start + step]
        W_t = update_w(V_t, W_b[start : start + step], H, HHt, rule)
        W_new[start : start + step] = W_t
        numer += W_t.T @ V_t
        if exact:
            residual += frobenius_residual(V_t, W_t, H)
    return W_new, Partials(numer, W_new.T @ W_new, residual, 0.0, 0.0)


def initial_partials_block(V_b, W_b: np.ndarray, H: np.ndarray, rule: Rule, exact: bool = False) -> Partials:
    """Partials at a starting point (no W update), with ‖W_b‖²."""
    V_b = as_float_block(V_b, W_b.dtype)
    partials = block_partials(V_b, W_b, H, rule, exact=exact)
    return partials._replace(w_sq=float(np.vdot(W_b, W_b)), w_l1=l1_norm(W_b))
