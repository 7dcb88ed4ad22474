"""One iteration's work on a row block: update W_b, then the partials at the new W_b.

V_b is read once per iteration: :func:`step_block` updates ``W_b`` from ``V_b`` and H, then
computes the :class:`~.products.Partials` that the next H update and the objective need.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .beta import Rule
from .products import (
    Partials,
    as_float_block,
    block_partials,
    frobenius_residual,
    gram,
    kl_mu_step_sparse,
    l1_norm,
    stacked_products_agree,
)
from .stacked import stack_groups, stacked_dot_ht, stacked_dot_t
from .updates import apply_w_update, mu_penalized, update_w


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
    elif (scale := _kl_mu_scale(V_b, W_b, H, rule)) is not None:
        W_new, partials = kl_mu_step_sparse(V_b, W_b, H, scale, rule.eps_wh, with_loss, exact)
    else:
        W_new = update_w(V_b, W_b, H, HHt, rule)
        partials = block_partials(V_b, W_new, H, rule, with_loss, exact)
    return with_w_norms(W_new, W_b, partials)


def with_w_norms(W_new: np.ndarray, W_b: np.ndarray, partials: Partials):
    """``(W_new, partials)`` with the norms of a step: ‖W_new‖², ‖W_new − W_b‖², ‖W_new‖₁."""
    delta = W_new - W_b
    return W_new, partials._replace(
        w_sq=float(np.vdot(W_new, W_new)), dw_sq=float(np.vdot(delta, delta)), w_l1=l1_norm(W_new)
    )


def _kl_mu_scale(V_b, W_b: np.ndarray, H: np.ndarray, rule: Rule) -> np.ndarray | None:
    """For a KL MU step of a CSR block (done in one pass, :func:`~.products.kl_mu_step_sparse`):
    the update's denominator plus ε, as :func:`~.updates.apply_w_update` forms it; None for
    other steps (or a denominator in another dtype than W's, which that update would not
    round to W's dtype before dividing)."""
    if not (rule.kullback_leibler and rule.solver == "mu" and rule.gamma == 1.0 and sp.issparse(V_b)):
        return None
    scale = mu_penalized(H.sum(axis=1), W_b, rule.l1_w, rule.l2_w) + rule.eps_denominator
    return scale if scale.dtype == W_b.dtype == H.dtype else None


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
    return frobenius_steps(V_b, [W_b], [H], [HHt], [rule], [exact])[0]


def frobenius_steps(
    V_b: np.ndarray, W_bs: list, Hs: list, HHts: list, rules: list, exact: list, tiled: bool = True
) -> list:
    """The β = 2 steps of several fits on one dense block (fused replicates), each tile of V_b
    read once for all of them: each fit's :func:`_frobenius_step_tiled`, or with ``tiled``
    False its :func:`step_block` on the whole block.

    Each fit gets exactly its own computation, tile by tile, so each result is bitwise the
    fit's alone; where :func:`~.products.stacked_products_agree` says the BLAS gives each
    fit's product bit for bit inside a stacked one, a tile's products are one GEMM for all
    the fits, V_t [H_1; …; H_R]ᵀ and [W_1 … W_R]ᵀ V_t (R times the arithmetic intensity),
    and otherwise one per fit.

    Parameters
    ----------
    V_b : array of shape (n_b, p), the W_bs' dtype
    W_bs, Hs, HHts : lists of arrays (n_b, r_k), (r_k, p) and (r_k, r_k)
    rules : list of Rule (β = 2; tiled: MU or one-sweep HALS, :func:`_fuses_in_tiles`)
    exact : list of bool
    tiled : bool
        Tiles of ``FUSED_TILE_ENTRIES`` (as :func:`_frobenius_step_tiled`), or the whole
        block as one tile (as :func:`step_block` otherwise).

    Returns
    -------
    list of ``(W_b_new, Partials)`` (numer, denom and the exact residual; the norms of W left at 0)
    """
    dtype = W_bs[0].dtype
    ranks = tuple(H.shape[0] for H in Hs)
    bounds = np.cumsum((0, *ranks))
    parts = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    H_all = np.concatenate(Hs) if len(Hs) > 1 else None
    W_news = [np.empty_like(W_b) for W_b in W_bs]
    numers = [np.zeros(H.shape, dtype=W_b.dtype) for W_b, H in zip(W_bs, Hs)]
    residuals = [0.0] * len(Hs)
    step = max(1, FUSED_TILE_ENTRIES // max(1, V_b.shape[1]) if tiled else V_b.shape[0])
    for start in range(0, V_b.shape[0], step):
        V_t = V_b[start : start + step]
        stop = start + V_t.shape[0]
        stack_vh, stack_wv = (False, False)
        if H_all is not None and _c_ordered(V_t, *Hs):
            stack_vh, stack_wv = stacked_products_agree(*V_t.shape, ranks, dtype)
        if stack_vh:
            VHt = V_t @ H_all.T
            crosses = [np.ascontiguousarray(VHt[:, part]) for part in parts]
        else:
            crosses = [V_t @ H.T for H in Hs]
        W_ts = [
            apply_w_update(W_b[start:stop], cross, None, HHt, None, rule)
            for W_b, cross, HHt, rule in zip(W_bs, crosses, HHts, rules)
        ]
        if stack_wv and _c_ordered(*W_ts):
            WtV = np.concatenate(W_ts, axis=1).T @ V_t
            products = [WtV[part] for part in parts]
        else:
            products = [W_t.T @ V_t for W_t in W_ts]
        for k, (W_t, H, product) in enumerate(zip(W_ts, Hs, products)):
            W_news[k][start:stop] = W_t
            if tiled:
                numers[k] += product
            else:  # the one tile's product as it is (0 + x would turn a −0 into +0)
                numers[k] = product
            if exact[k]:
                residuals[k] += frobenius_residual(V_t, W_t, H)
    return [
        (W_new, Partials(numer, W_new.T @ W_new if tiled else gram(W_new), residual, 0.0, 0.0))
        for W_new, numer, residual in zip(W_news, numers, residuals)
    ]


def sparse_frobenius_steps(V_b, W_bs: list, Hs: list, HHts: list, rules: list, exact: list) -> list:
    """The β = 2 steps of several fits on one CSR block (fused replicates), V_b's two products
    taken once for all of them (:mod:`.stacked`): V_b [H_1; …; H_R]ᵀ, each fit's W update, then
    [W_1 … W_R]ᵀ V_b at the new W's. Each fit's products are bitwise the ones it takes alone
    (V_b must qualify: :func:`~.stacked.stacks`), and the rest is its own call, so each result
    is bitwise :func:`step_block`'s.

    Many fits are taken in groups (:func:`~.stacked.stack_groups`), bounding the temporaries.

    Returns
    -------
    list of ``(W_b_new, Partials)`` (the norms of W left at 0, as :func:`frobenius_steps`)
    """
    out = []
    for group in stack_groups([H.shape[0] for H in Hs], V_b.shape, V_b.dtype.itemsize):
        crosses = stacked_dot_ht(V_b, Hs[group])
        W_news = [
            apply_w_update(W_b, cross, None, HHt, None, rule)
            for W_b, cross, HHt, rule in zip(W_bs[group], crosses, HHts[group], rules[group])
        ]
        del crosses
        numers = stacked_dot_t(W_news, V_b)
        out += [
            (W_new, Partials(numer, gram(W_new), frobenius_residual(V_b, W_new, H) if ex else 0.0, 0.0, 0.0))
            for W_new, numer, H, ex in zip(W_news, numers, Hs[group], exact[group])
        ]
    return out


def initial_partials_block(V_b, W_b: np.ndarray, H: np.ndarray, rule: Rule, exact: bool = False) -> Partials:
    """Partials at a starting point (no W update), with ‖W_b‖²."""
    V_b = as_float_block(V_b, W_b.dtype)
    partials = block_partials(V_b, W_b, H, rule, exact=exact)
    return partials._replace(w_sq=float(np.vdot(W_b, W_b)), w_l1=l1_norm(W_b))


def _c_ordered(*arrays: np.ndarray) -> bool:
    """Whether the arrays are C-contiguous and aligned, as in
    :func:`~.products.stacked_products_agree`'s measurement (another layout makes numpy call
    the BLAS with other transposes, or not at all)."""
    return all(a.flags.c_contiguous and a.flags.aligned for a in arrays)
