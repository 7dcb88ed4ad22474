"""The KL products of a CSR block in one pass over its non-zeros, compiled with numba.

KL needs WH only where V is non-zero (V ∘ log(V / WH) vanishes elsewhere, and Σ WH over all
entries is colsum(W) · rowsum(H)). Formed with numpy, that is a gather of a W row and an H
column per non-zero into (nnz, r) temporaries, a reduction over r, a ratio, then a sparse
product reading the same H columns again: about ten times the cost of the sparse product
V Hᵀ that Frobenius needs. Here each non-zero is visited once: its WH value is the dot product
of W's row and Hᵀ's row, held in a register, and the ratio V / (WH + ε) goes straight into the
product that needs it, so a KL half-step costs about two sparse products, not ten, and makes
no temporary of V's size.

Each kernel walks the rows in order and each row's non-zeros in order, and accumulates in
V's dtype as scipy's sparse products do (the loss in float64): the results depend on the
block alone, never on threads or scheduling. The functions release the GIL, so a threaded
scheduler runs blocks in parallel.

The same row operations make the plain products V Hᵀ and Wᵀ V of large CSR blocks
(:func:`times_ht`, :func:`t_times_w`, for every loss): scipy's sums, in scipy's order, eight
columns at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import scipy.sparse as sp


@functools.cache
def _jit() -> SimpleNamespace:
    """The compiled loops, imported on first use: numba and llvmlite cost ~60 MB of every
    process that imports them, which a dense or Frobenius fit on 256 MiB workers cannot spare."""
    from . import _sparse_kl_jit as k

    return SimpleNamespace(
        times_ht=functools.partial(k.call, k._times_ht),
        t_times_w=functools.partial(k.call, k._t_times_w),
        ratio_times_ht=functools.partial(k.call, k._ratio_times_ht),
        wt_ratio=functools.partial(k.call, k._wt_ratio),
        wh_values=functools.partial(k.call, k._wh_values),
    )


def _parts(V_b: sp.csr_matrix, W_b: np.ndarray, H: np.ndarray):
    """The CSR arrays, W_b and Hᵀ as the kernels take them: C-contiguous, V's dtype."""
    dtype = W_b.dtype
    data = V_b.data if V_b.data.dtype == dtype else V_b.data.astype(dtype)
    return V_b.indptr, V_b.indices, data, np.ascontiguousarray(W_b), np.ascontiguousarray(H.T, dtype=dtype)


def times_ht(V_b: sp.csr_matrix, H: np.ndarray) -> np.ndarray:
    """V_b Hᵀ, (n_b, r), bit for bit scipy's, with the KL kernels' vector row operations: each
    non-zero's Hᵀ row is added eight lanes at a time where scipy goes column by column (at
    rank 10 on a block of 8M non-zeros, float32: 14 ms against scipy's 23). V_b's dtype must
    be H's."""
    Ht = np.ascontiguousarray(H.T)
    out = _jit().times_ht(V_b.indptr, V_b.indices, V_b.data, Ht, Ht.shape[1])
    return out if out.shape[1] == Ht.shape[1] else np.ascontiguousarray(out[:, : Ht.shape[1]])


def t_times_w(V_b: sp.csr_matrix, W_b: np.ndarray) -> np.ndarray:
    """W_bᵀ V_b, (r, p) (the transpose of a C-ordered (p, r) array), bit for bit scipy's
    (V_bᵀ W_b)ᵀ, with the same vector row operations (float32, rank 10, 8M non-zeros: 17 ms
    against scipy's 22). V_b's dtype must be W_b's."""
    W = np.ascontiguousarray(W_b)
    out_t = _jit().t_times_w(V_b.indptr, V_b.indices, V_b.data, W, V_b.shape[1], W.shape[1])
    return np.ascontiguousarray(out_t[:, : W.shape[1]]).T


def ratio_times_ht(V_b: sp.csr_matrix, W_b: np.ndarray, H: np.ndarray, eps: float) -> np.ndarray:
    """(V_b / (W_b H + ε)) Hᵀ over V_b's non-zeros: the numerator of KL's W update, (n_b, r)."""
    indptr, indices, data, W, Ht = _parts(V_b, W_b, H)
    out = _jit().ratio_times_ht(indptr, indices, data, W, Ht, W.dtype.type(eps), W.shape[1])
    return out if out.shape[1] == W.shape[1] else np.ascontiguousarray(out[:, : W.shape[1]])


def wt_ratio(
    V_b: sp.csr_matrix, W_b: np.ndarray, H: np.ndarray, eps: float, per_run: Callable | None = None, run_entries: int = 2**18
) -> tuple[np.ndarray, list]:
    """W_bᵀ (V_b / (W_b H + ε)) over V_b's non-zeros, (r, p), and with ``per_run`` the list of
    ``per_run(values, wh)`` over runs of whole rows of about ``run_entries`` non-zeros each:
    V_b's values there and W_b H at them (for the loss; empty list without ``per_run``). WH is
    thus never held for a whole block (4 bytes per non-zero: 32 MB for a block of 8M), and
    the sums are the same bits however the rows are split. ``wh`` is one buffer, refilled run
    after run: ``per_run`` copies what it keeps."""
    indptr, indices, data, W, Ht = _parts(V_b, W_b, H)
    eps, unused = W.dtype.type(eps), np.empty((0, 0), dtype=W.dtype)

    def run(lo, hi, start, stop, wh, out_t):
        _jit().wt_ratio(indptr[lo : hi + 1] - indptr[lo], indices[start:stop], data[start:stop], W[lo:hi], Ht, unused,
                        eps, False, W[lo:hi], wh, out_t, W.shape[1])

    return _by_runs(V_b, W, run, per_run, run_entries)


def mu_step(
    V_b: sp.csr_matrix, W_b: np.ndarray, H: np.ndarray, scale: np.ndarray, eps: float, per_run: Callable | None = None,
    run_entries: int = 2**18,
) -> tuple[np.ndarray, np.ndarray, list]:
    """A KL MU step on a CSR block in one pass over its rows: ``W_new`` (n_b, r), each row
    ``(ratio_times_ht's row / scale's row) · W_b's row`` (``scale``, broadcast to (n_b, r): the MU
    denominator plus ε), and then :func:`wt_ratio` at W_new, with ``per_run`` as there. The
    same bits as :func:`ratio_times_ht`, that update, then :func:`wt_ratio`; each row's Hᵀ rows
    are read from memory once instead of twice (``(W_new, numerator, runs)``)."""
    indptr, indices, data, W, Ht = _parts(V_b, W_b, H)
    eps = W.dtype.type(eps)
    scale = np.ascontiguousarray(np.broadcast_to(scale, W.shape), dtype=W.dtype)
    W_new = np.empty_like(W)

    def run(lo, hi, start, stop, wh, out_t):
        _jit().wt_ratio(indptr[lo : hi + 1] - indptr[lo], indices[start:stop], data[start:stop], W[lo:hi], Ht,
                        scale[lo:hi], eps, True, W_new[lo:hi], wh, out_t, W.shape[1])

    numer, out = _by_runs(V_b, W, run, per_run, run_entries)
    return W_new, numer, out


def _by_runs(V_b: sp.csr_matrix, W: np.ndarray, run: Callable, per_run: Callable | None, run_entries: int):
    """``run(lo, hi, start, stop, wh, out_t)`` over V_b's rows, as one run or (with ``per_run``)
    runs of about ``run_entries`` non-zeros, adding into one (p, whole eights) ``out_t``.
    Returns out_t's first r columns transposed, (r, p), and the list of ``per_run(values, wh)``
    of the runs (empty without ``per_run``)."""
    indptr, rank = V_b.indptr, W.shape[1]
    out_t = np.zeros((V_b.shape[1], -(-rank // 8) * 8), dtype=W.dtype)  # rows of whole eights, as vectors
    out = []
    # Without per_run, one call over every row and no WH kept.
    runs = _row_runs(indptr, run_entries) if per_run is not None else [(0, len(indptr) - 1)]
    # One buffer for every run's WH: allocated run by run, each (1 MB) came from a fresh mmap
    # under glibc's default settings, and its first writes faulted its pages in.
    longest = max((int(indptr[hi]) - int(indptr[lo]) for lo, hi in runs), default=0) if per_run is not None else 0
    buffer = np.empty(longest, dtype=W.dtype)
    for lo, hi in runs:
        start, stop = int(indptr[lo]), int(indptr[hi])
        wh = buffer[: stop - start] if per_run is not None else buffer
        run(lo, hi, start, stop, wh, out_t)
        if per_run is not None:
            out.append(per_run(V_b.data[start:stop], wh))
    return np.ascontiguousarray(out_t[:, :rank].T), out


def _row_runs(indptr: np.ndarray, entries: int) -> list[tuple[int, int]]:
    """``(lo, hi)``: runs of consecutive rows of a CSR matrix of about ``entries`` non-zeros each
    (a row with more is a run of its own), covering every row."""
    n, runs, lo = len(indptr) - 1, [], 0
    while lo < n:
        hi = int(np.searchsorted(indptr, indptr[lo] + entries, side="right")) - 1
        hi = min(n, max(hi, lo + 1))
        runs.append((lo, hi))
        lo = hi
    return runs


def wh_at_nonzeros(V_b: sp.csr_matrix, W_b: np.ndarray, H: np.ndarray) -> np.ndarray:
    """(W_b H) at the stored entries of a CSR block, in V_b.data's order."""
    indptr, indices, _, W, Ht = _parts(V_b, W_b, H)
    return _jit().wh_values(indptr, indices, W, Ht, W.shape[1])
