"""Products of a block of V with the factors: what one pass over V reduces to.

A row block ``V_b`` (all columns) meets the matching row block ``W_b`` of W and all of H
(r x p, small). The H update and the objective need only sums over the blocks of small
products, the :class:`Partials`; the W update of a block needs the (n_b, r) products of
:func:`w_products`. For β = 1 the dense products are formed tile by tile, so WH never exists
as a block-sized array; for sparse V it is formed at V's nonzeros only.
"""

from __future__ import annotations

import functools
import math
import threading
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
from scipy.special import xlogy

from .sparse_kl import mu_step, ratio_times_ht, t_times_w, times_ht, wh_at_nonzeros, wt_ratio
from .beta import Rule, beta_divergence_dense, objective_from_sums, objective_term


class Partials(NamedTuple):
    """Sums over the row blocks of V that the H update and the objective need.

    Attributes
    ----------
    numer : array of shape (r, p)
        WᵀV (β = 2), Wᵀ(V / (WH + ε)) (β = 1), or Wᵀ(V ∘ (WH + ε)^(β−2)).
    denom : array
        WᵀW, (r, r), for β = 2; W's column sums, (r,), for β = 1; or Wᵀ(WH + ε)^(β−1),
        (r, p). Under a mask (:mod:`.masked`) numer and denom are both (r, p) whatever β.
    loss : float
        The divergence summed over the blocks (β ≠ 2, less the constant for β = 1); 0 for
        β = 2, whose objective comes from the Gram identity.
    w_sq, dw_sq : float
        ‖W‖² and ‖W_new − W_old‖² (0 when not part of a step).
    w_l1 : float
        ‖W‖₁ = ΣW (for the L1 penalty of the objective).
    """

    numer: np.ndarray
    denom: np.ndarray
    loss: float
    w_sq: float
    dw_sq: float
    w_l1: float = 0.0


def l1_norm(X: np.ndarray) -> float:
    """‖X‖₁ of a non-negative factor block, ΣX, accumulated in float64."""
    return float(np.sum(X, dtype=np.float64))


def add_partials(a: Partials, b: Partials) -> Partials:
    """Elementwise sum of two block partials (the tree reduction's binary op)."""
    return Partials(*(x + y for x, y in zip(a, b)))


def objective(
    partials: Partials, H: np.ndarray, HHt: np.ndarray, v_sq: float, beta: float, kl_offset: float = 0.0,
    exact: bool = False,
) -> float:
    """D_β(V | WH) from the partials at (W, H) reduced over all row blocks.

    ``HHt`` is HHᵀ and ``v_sq`` ‖V‖² (used for β = 2 only); ``kl_offset`` is the constant the
    KL partials leave out, Σ V log V − Σ V (used for β = 1 only). ``exact`` (β = 1, 2): the
    partials' ``loss`` is the divergence itself, formed entry by entry
    (:func:`frobenius_residual`, :func:`kl_divergence`), used instead of the Gram identity or
    the constant.
    """
    if exact and beta in (1, 2):
        return max(float(partials.loss), 0.0)
    term = objective_term(partials.numer, partials.loss, H, beta)
    return objective_from_sums(term, partials.denom, HHt, v_sq, beta, kl_offset)


def as_float_block(block, dtype: np.dtype):
    """Return a block as a float array (or CSR matrix) of ``dtype``, copying only if needed."""
    if sp.issparse(block):
        # Not sp.csr_matrix(block): on a CSR block viewing a larger V's arrays it copies them.
        block = block if block.format == "csr" else block.tocsr()
        return block if block.dtype == dtype else block.astype(dtype)
    return np.asarray(block, dtype=dtype)


# A CSR block with this many non-zeros or more has its V_b Hᵀ (and in float32 its W_bᵀ V_b)
# made by the compiled row operations of the KL kernels (:func:`~.sparse_kl.times_ht`,
# :func:`~.sparse_kl.t_times_w`): scipy's bits, V_b Hᵀ 13-40% faster at ranks 5 to 32
# (float32; 10-35% in float64). Smaller blocks keep scipy's products, so that numba (~110 MiB
# of a process, and a second or two to import) is loaded only where it is small beside the
# rest: dnmf sizes blocks at 1/32 of a worker's memory per thread, so a block of 4M non-zeros
# (32 MiB of CSR at 4-byte values and indices) comes with 1 GiB workers.
COMPILED_MIN_NNZ = 2**22


def dot_t(W_b: np.ndarray, V_b) -> np.ndarray:
    """W_bᵀ V_b for dense or sparse V_b, as a dense (r, p) array."""
    if sp.issparse(V_b):
        if _compiled_dot_t(V_b, W_b):
            return t_times_w(V_b, W_b)
        return _sparse_dot_t(W_b, V_b)
    return W_b.T @ V_b


def _sparse_dot_t(W_b: np.ndarray, V_b) -> np.ndarray:
    """W_bᵀ V_b for a sparse V_b, as (V_bᵀ W_b)ᵀ: for CSR, scipy's own kernel for that product
    (its CSC one, on V_b's arrays: the same sums in the same order) called without the CSC
    matrix that ``V_b.T`` builds. That matrix copies V_b's arrays when they are views into a
    larger matrix (scipy's ``prune``), as dnmf's in-memory row blocks are: 64 MB and ~15 ms per
    block of 8M non-zeros, on every pass."""
    matvecs = _csc_matvecs()
    if (matvecs is None or V_b.format != "csr" or V_b.dtype != W_b.dtype
            or V_b.indices.dtype != V_b.indptr.dtype):
        return np.asarray((V_b.T @ W_b).T)
    W = np.ascontiguousarray(W_b)
    n, p = V_b.shape
    out = np.zeros((p, W.shape[1]), dtype=W.dtype)
    matvecs(p, n, W.shape[1], V_b.indptr, V_b.indices, V_b.data, W.ravel(), out.ravel())
    return out.T


@functools.cache
def _csc_matvecs():
    """scipy's compiled CSC x dense product (private: None where a scipy lacks it, and the
    public operator is used)."""
    try:
        from scipy.sparse import _sparsetools

        return _sparsetools.csc_matvecs
    except (ImportError, AttributeError):
        return None


def _dot_ht(V_b, H: np.ndarray) -> np.ndarray:
    """V_b Hᵀ for dense or sparse V_b, as a dense (n_b, r) array."""
    if sp.issparse(V_b) and _compiled_dot_ht(V_b, H):
        return times_ht(V_b, H)
    return np.asarray(V_b @ H.T)


def _compiled_dot_ht(V_b, H: np.ndarray) -> bool:
    """Whether :func:`_dot_ht` takes the compiled product for this sparse block."""
    return (V_b.format == "csr" and V_b.nnz >= COMPILED_MIN_NNZ and V_b.dtype == H.dtype
            and V_b.dtype in (np.float32, np.float64))


def _compiled_dot_t(V_b, W_b: np.ndarray) -> bool:
    """Whether :func:`dot_t` takes the compiled product for this sparse block: float32 only
    (16-27% faster than scipy's at ranks 5 to 32; in float64 as often slower as faster)."""
    return V_b.format == "csr" and V_b.nnz >= COMPILED_MIN_NNZ and V_b.dtype == W_b.dtype == np.float32


def stacked_products_agree(n_rows: int, p: int, ranks: tuple[int, ...], dtype) -> tuple[bool, bool]:
    """Whether one product for several factors gives each factor's product bit for bit here.

    For an (n_rows, p) block V_t and factors H_k (r_k, p), W_k (n_rows, r_k) of ``dtype``:
    whether the columns of V_t [H_1; …; H_R]ᵀ are V_t H_kᵀ, and the rows of
    [W_1 … W_R]ᵀ V_t are W_kᵀ V_t, bit for bit, for every k (the first and the second answer).

    A BLAS sums each entry over the shared dimension in an order that depends on the shapes
    of the call, not on the values: OpenBLAS 0.3 (SkylakeX kernels) splits the sum at
    different places when the call runs threaded or not (a thread count it picks from m·n·k),
    has a separate kernel for m·n·k ≤ 10⁶, and numpy calls GEMV for a single column; so a
    width-R·r product may round differently from a width-r one, and often does at small sizes.
    The answer is therefore measured, once per shapes, dtype and BLAS thread count: both ways
    on random values of these shapes (what the BLAS does is the same for any values). That
    costs about one pass of the fits over a tile, so it pays where the shapes recur (every
    iteration's tiles), not for a fit's one pass at its start.
    """
    key = (int(n_rows), int(p), tuple(int(r) for r in ranks), np.dtype(dtype).str, _blas_threads())
    with _MEASURING:  # one measurement per key, however many tasks ask at once
        return _stacked_products_agree(*key)


_MEASURING = threading.Lock()


@functools.lru_cache(maxsize=512)
def _stacked_products_agree(n_rows: int, p: int, ranks: tuple[int, ...], dtype: str, threads) -> tuple[bool, bool]:
    rng = np.random.default_rng(n_rows * 7919 + p)
    V = rng.random((n_rows, p)).astype(dtype)
    Hs = [rng.random((r, p)).astype(dtype) for r in ranks]
    Ws = [rng.random((n_rows, r)).astype(dtype) for r in ranks]
    bounds = np.cumsum((0, *ranks))
    VHt = V @ np.concatenate(Hs).T
    WtV = np.concatenate(Ws, axis=1).T @ V
    parts = list(zip(bounds[:-1], bounds[1:], Hs, Ws))
    vh = all(np.array_equal(VHt[:, a:b], V @ H.T) for a, b, H, _ in parts)
    wv = all(np.array_equal(WtV[a:b], W.T @ V) for a, b, _, W in parts)
    return bool(vh), bool(wv)


@functools.cache
def _blas_controllers() -> list:
    """threadpoolctl's handles on the BLAS libraries loaded (found once: a scan of the process)."""
    from threadpoolctl import ThreadpoolController

    return [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]


def _blas_threads() -> tuple[int, ...]:
    """The BLAS libraries' current thread counts (a few microseconds)."""
    return tuple(lib.get_num_threads() for lib in _blas_controllers())


def gram(A: np.ndarray) -> np.ndarray:
    """AᵀA (columns' Gram matrix) by a general matrix product.

    ``A.T @ A`` makes numpy call BLAS syrk, whose rounding was seen to vary from run to run in
    dask workers (OpenBLAS 0.3.31), breaking bitwise reproducibility; gemm on a copy does not.
    """
    return A.T @ A.copy()


def frobenius_residual(V_b, W_b: np.ndarray, H: np.ndarray) -> float:
    """½‖V_b − W_b H‖², formed tile by tile and summed in float64.

    The Gram identity ½(‖V‖² − 2⟨WᵀV, H⟩ + ⟨WᵀW, HHᵀ⟩) subtracts numbers near ½‖V‖², each
    rounded in V's dtype: near a good float32 fit what is left is rounding noise. The residual
    formed entry by entry keeps its digits (one more product of the block's size).
    """
    if sp.issparse(V_b):
        # ‖V − WH‖² = Σ_nz (V² − 2 V WH) + ‖WH‖²: WH at the non-zeros only, and
        # ‖WH‖² = ⟨WᵀW, HHᵀ⟩ from the factors, every sum in float64.
        wh = wh_at_nonzeros(V_b, W_b, H).astype(np.float64)
        values = V_b.data.astype(np.float64)
        W64, H64 = W_b.astype(np.float64), H.astype(np.float64)
        wh_sq = float(np.vdot(W64.T @ W64, H64 @ H64.T))
        return 0.5 * max(float(np.dot(values, values - 2.0 * wh)) + wh_sq, 0.0)
    total = 0.0
    for start, stop in row_tiles(V_b.shape[0], V_b.shape[1]):
        residual = V_b[start:stop] - W_b[start:stop] @ H
        total += float(np.sum(np.square(residual), dtype=np.float64))
    return 0.5 * total


def block_partials(
    V_b, W_b: np.ndarray, H: np.ndarray, rule: Rule, with_loss: bool = True, exact: bool = False
) -> Partials:
    """The partials of one row block at (W_b, H), ``w_sq`` and ``dw_sq`` left at 0.

    Parameters
    ----------
    V_b : array or CSR matrix of shape (n_b, p), W_b's dtype
    W_b : array of shape (n_b, r)
    H : array of shape (r, p)
    rule : Rule
    with_loss : bool
        False skips the divergence (β ≠ 2: a log or a power per entry), leaving ``loss`` at
        0, for iterations that do not evaluate the objective.
    exact : bool
        β = 2: ``loss`` is ½‖V_b − W_b H‖² (:func:`frobenius_residual`); β = 1: the whole
        divergence entry by entry in float64 (no constant left out); for objectives too small
        for the sums' rounding in V's dtype.

    Returns
    -------
    Partials
        numer = W_bᵀV_b and denom = W_bᵀW_b (β = 2); numer = W_bᵀ(V_b / (W_b H + ε)) and
        denom = colsum(W_b) (β = 1); numer = W_bᵀ(V_b ∘ (W_b H + ε)^(β−2)) and
        denom = W_bᵀ(W_b H + ε)^(β−1) otherwise.
    """
    beta, eps = rule.beta, rule.eps_wh
    if rule.frobenius:
        loss = frobenius_residual(V_b, W_b, H) if exact else 0.0
        return Partials(dot_t(W_b, V_b), gram(W_b), loss, 0.0, 0.0)
    if rule.kullback_leibler and sp.issparse(V_b):
        return _kl_partials_sparse(V_b, W_b, H, eps, with_loss, exact)
    V_d = V_b.toarray() if sp.issparse(V_b) else V_b
    if rule.kullback_leibler:
        return _kl_partials_dense(V_d, W_b, H, eps, with_loss, exact)
    wh = W_b @ H
    loss = beta_divergence_dense(V_d, wh, beta) if with_loss else 0.0
    wh += eps
    denom = W_b.T @ (wh ** (beta - 1.0))
    numer = W_b.T @ (V_d * wh ** (beta - 2.0))
    return Partials(numer, denom, loss, 0.0, 0.0)


def w_products(V_b, W_b: np.ndarray, H: np.ndarray, rule: Rule) -> tuple[np.ndarray, np.ndarray | None]:
    """The products of V_b that a W half-step needs.

    Parameters
    ----------
    V_b : array or CSR matrix of shape (n_b, p), W_b's dtype
    W_b : array of shape (n_b, r)
    H : array of shape (r, p)
    rule : Rule

    Returns
    -------
    numer, denom : arrays of shape (n_b, r); denom None where the update forms it from H alone
        β = 2 (and HALS, BPP): numer = V Hᵀ, denom None (it is W HHᵀ);
        β = 1: numer = (V / (WH + ε)) Hᵀ, denom None (it is 1 rowsum(H)ᵀ);
        otherwise numer = (V ∘ (WH + ε)^(β−2)) Hᵀ and denom = (WH + ε)^(β−1) Hᵀ.
        Both are sums over V's columns, so on a grid of V the column blocks' products add up.
    """
    beta, eps = rule.beta, rule.eps_wh
    if rule.frobenius or rule.solver != "mu":
        return _dot_ht(V_b, H), None
    if rule.kullback_leibler:
        if sp.issparse(V_b):
            return ratio_times_ht(V_b, W_b, H, eps), None
        return _kl_ratio_times_ht(V_b, W_b, H, eps), None
    V_d = V_b.toarray() if sp.issparse(V_b) else V_b
    wh = W_b @ H
    wh += eps
    return (V_d * wh ** (beta - 2.0)) @ H.T, (wh ** (beta - 1.0)) @ H.T


def kl_terms(V: np.ndarray, wh: np.ndarray) -> float:
    """Σ V log(V / WH) − V + WH over entries, each term in float64 (0 log 0 = 0)."""
    V = V.astype(np.float64)
    wh = wh.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = xlogy(V, V / wh)
    terms += wh - V
    return float(np.sum(terms))


def _kl_partials_sparse(
    V_b: sp.csr_matrix, W_b: np.ndarray, H: np.ndarray, eps: float, with_loss: bool, exact: bool = False
) -> Partials:
    """KL partials of a CSR block, WH formed at V's nonzeros only: Wᵀ(V / (WH + ε)), colsum(W)
    and the loss (less the constant, as in :func:`_kl_partials_dense`; ``exact``: the whole
    divergence, the non-zeros' terms plus Σ WH over the zeros)."""
    numer, terms = wt_ratio(V_b, W_b, H, eps, per_run=_kl_per_run(with_loss, exact), run_entries=KL_TILE_ENTRIES)
    return _kl_sparse_partials(numer, terms, W_b, H, with_loss, exact)


def kl_mu_step_sparse(
    V_b: sp.csr_matrix, W_b: np.ndarray, H: np.ndarray, scale: np.ndarray, eps: float, with_loss: bool, exact: bool = False
) -> tuple[np.ndarray, Partials]:
    """A KL MU step of a CSR block in one pass over its rows (:func:`~.sparse_kl.mu_step`):
    ``W_new`` (W_b's update, ``scale`` its denominator plus ε) and the partials at
    (W_new, H), the same bits as the update from :func:`w_products`, then
    :func:`block_partials`."""
    W_new, numer, terms = mu_step(V_b, W_b, H, scale, eps, per_run=_kl_per_run(with_loss, exact),
                                  run_entries=KL_TILE_ENTRIES)
    return W_new, _kl_sparse_partials(numer, terms, W_new, H, with_loss, exact)


def _kl_per_run(with_loss: bool, exact: bool):
    """What a sparse KL pass adds up run by run for the loss (None: no loss). By runs of rows
    (see :func:`~.sparse_kl.wt_ratio`): WH and the float64 terms of a whole block would be 3
    times its size in temporaries."""
    return _exact_kl_terms if exact else _v_log_wh_sum if with_loss else None


def _kl_sparse_partials(numer, terms: list, W_b: np.ndarray, H: np.ndarray, with_loss: bool, exact: bool) -> Partials:
    col_w = W_b.sum(axis=0)
    h_sums = H.sum(axis=1, dtype=np.float64)
    if exact:
        loss = math.fsum(terms) + float(np.dot(W_b.sum(axis=0, dtype=np.float64), h_sums))
    elif with_loss:
        loss = -math.fsum(terms) + float(np.dot(col_w.astype(np.float64), h_sums))
    else:
        loss = 0.0
    return Partials(numer, col_w, loss, 0.0, 0.0)


def _exact_kl_terms(values: np.ndarray, wh: np.ndarray) -> float:
    """The KL divergence's terms at some non-zeros of V, less Σ WH there (which the whole
    Σ WH, added once, holds)."""
    return kl_terms(values, wh) - float(np.sum(wh, dtype=np.float64))


def _v_log_wh_sum(values: np.ndarray, wh: np.ndarray) -> float:
    """Σ V log(WH) at some non-zeros of V, in float64 (``wh`` overwritten with its log)."""
    np.log(wh, out=wh)
    # einsum casts to float64 in small buffers; two astype copies of a run (2 MB each) cost 2.1
    # ms a run under glibc's default settings (fresh mmaps, faulted in), against 0.16 ms.
    return float(np.einsum("i,i->", values, wh, dtype=np.float64))


# The dense KL kernels work on row tiles of about this many entries, so the elementwise
# work on WH stays in cache and no block-sized temporary is made.
KL_TILE_ENTRIES = 2**18


def row_tiles(n_rows: int, p: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the row tiles of an (n_rows, p) block, about ``KL_TILE_ENTRIES`` entries each."""
    step = max(1, KL_TILE_ENTRIES // max(1, p))
    return [(start, min(n_rows, start + step)) for start in range(0, n_rows, step)]


def _kl_ratio_times_ht(V: np.ndarray, W_b: np.ndarray, H: np.ndarray, eps: float) -> np.ndarray:
    """(V / (W_b H + ε)) Hᵀ of a dense block, tile by tile: shape (n_b, r)."""
    out = np.empty((V.shape[0], H.shape[0]), dtype=np.result_type(W_b, H))
    Ht = H.T
    for start, stop in row_tiles(V.shape[0], V.shape[1]):
        wh = W_b[start:stop] @ H
        wh += eps
        np.divide(V[start:stop], wh, out=wh)
        np.matmul(wh, Ht, out=out[start:stop])
    return out


def _kl_partials_dense(
    V: np.ndarray, W_b: np.ndarray, H: np.ndarray, eps: float, with_loss: bool = True, exact: bool = False
) -> Partials:
    """KL partials of a dense block, tile by tile: Wᵀ(V / (WH + ε)), colsum(W) and the loss.

    The loss leaves out the constant Σ V log V − Σ V (added by :func:`~.beta.objective`):
    −Σ V log(WH) + Σ WH, with Σ WH = colsum(W) · rowsum(H). ``exact``: the whole divergence,
    entry by entry in float64 (:func:`kl_terms`).
    """
    numer = np.zeros(H.shape, dtype=np.result_type(W_b, H))
    cross = 0.0
    divergence = 0.0
    for start, stop in row_tiles(V.shape[0], V.shape[1]):
        V_t, W_t = V[start:stop], W_b[start:stop]
        wh = W_t @ H
        if exact:
            divergence += kl_terms(V_t, wh)
        elif with_loss:
            cross += _v_log_wh(V_t, wh)
        wh += eps
        np.divide(V_t, wh, out=wh)
        numer += W_t.T @ wh
    col_w = W_b.sum(axis=0)
    if exact:
        return Partials(numer, col_w, divergence, 0.0, 0.0)
    total_wh = float(np.dot(col_w.astype(np.float64), H.sum(axis=1, dtype=np.float64)))
    return Partials(numer, col_w, total_wh - cross, 0.0, 0.0)


def _v_log_wh(V_t: np.ndarray, wh: np.ndarray) -> float:
    """Σ V log(WH) over a tile (0 log 0 = 0)."""
    with np.errstate(divide="ignore"):
        total = float(np.einsum("ij,ij->i", V_t, np.log(wh)).sum(dtype=np.float64))
    if np.isnan(total):  # 0 · log 0 where WH has exact zeros (e.g. an NNDSVD start)
        total = float(np.sum(xlogy(V_t, wh), dtype=np.float64))
    return total
