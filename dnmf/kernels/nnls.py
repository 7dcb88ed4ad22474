"""Non-negative least squares with many right-hand sides, by block principal pivoting.

Solves, for every column j of ``cross`` (r, m),

    minimize ½ xᵀ G x − cross_jᵀ x  subject to x ≥ 0,

where G (r, r) is a Gram matrix CᵀC and cross = CᵀB: the NNLS problem min ‖C x − b_j‖
given only the small products. This is the ANLS half-step of NMF (G = HHᵀ and
cross = (V Hᵀ)ᵀ for the rows of W; G = WᵀW and cross = WᵀV for the columns of H).

The method is the block principal pivoting algorithm of Kim & Park (2011) with their
column grouping: variables flip between the passive set (solved for) and the active set
(held at 0) all at once while the number of infeasible variables shrinks, with a
one-variable backup rule that guarantees termination. Pure numpy (no dask).

References
----------
J. Kim, H. Park (2011). Fast nonnegative matrix factorization: an active-set-like method and
comparisons. SIAM J. Sci. Comput. 33(6).
"""

from __future__ import annotations

import numpy as np

# Full exchanges allowed without progress before the backup rule (Kim & Park use 3).
FULL_EXCHANGE_TRIES = 3
# Passive sets shared by at least MIN_GROUP columns are solved together (at most MAX_GROUPS
# such sets); the other columns go through one batched solve.
MIN_GROUP = 8
MAX_GROUPS = 32
# Columns per batched solve, to bound the (columns, r, r) temporary.
BATCH_COLUMNS = 2048


def nnls_bpp(gram: np.ndarray, cross: np.ndarray, passive: np.ndarray | None = None) -> np.ndarray:
    """Solve the NNLS problems of the module docstring for all columns at once.

    Parameters
    ----------
    gram : array of shape (r, r)
        Symmetric positive semi-definite G.
    cross : array of shape (r, m)
        The right-hand sides CᵀB, one column per problem.
    passive : bool array of shape (r, m), optional
        A guess of the positive entries (e.g. the previous iterate > 0): a warm start.

    Returns
    -------
    X : float64 array of shape (r, m), X ≥ 0.
    """
    G = np.asarray(gram, dtype=np.float64)
    F = np.asarray(cross, dtype=np.float64)
    r, m = F.shape
    usable = np.diag(G) > 0  # a zero column of C: its variable stays 0
    P = np.zeros((r, m), dtype=bool) if passive is None else np.array(passive, dtype=bool)
    P &= usable[:, None]
    X = np.zeros((r, m))
    Y = -F.copy()
    # Gradient noise below this is treated as 0, so round-off cannot flip variables forever.
    tol = 1e-12 * max(float(np.abs(F).max(initial=0.0)), np.finfo(np.float64).tiny) * max(1, r)
    _solve_passive(G, F, P, X, Y, np.arange(m))
    tries = np.full(m, FULL_EXCHANGE_TRIES)
    best = np.full(m, r + 1)
    for _ in range(10 * r + 50):
        infeasible = (P & (X < 0)) | (~P & (Y < -tol) & usable[:, None])
        n_infeasible = infeasible.sum(axis=0)
        cols = np.flatnonzero(n_infeasible)
        if cols.size == 0:
            break
        counts = n_infeasible[cols]
        improved = counts < best[cols]
        best[cols[improved]] = counts[improved]
        tries[cols[improved]] = FULL_EXCHANGE_TRIES
        patience = ~improved & (tries[cols] >= 1)
        tries[cols[patience]] -= 1
        full = cols[improved | patience]
        P[:, full] ^= infeasible[:, full]
        backup = cols[~(improved | patience)]
        if backup.size:
            last = r - 1 - np.argmax(infeasible[::-1][:, backup], axis=0)
            P[last, backup] = ~P[last, backup]
        _solve_passive(G, F, P, X, Y, cols)
    np.maximum(X, 0, out=X)
    return X


def _solve_passive(G: np.ndarray, F: np.ndarray, P: np.ndarray, X: np.ndarray, Y: np.ndarray, cols: np.ndarray) -> None:
    """For the columns ``cols``: X_P = G_PP⁻¹ F_P, X elsewhere 0, Y = G X − F (0 on P).

    Columns sharing a passive set are solved together; the columns of rare passive sets
    go through one batched solve.
    """
    keys = _pattern_keys(P[:, cols])
    uniq, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    inverse = np.ravel(inverse)
    common = np.flatnonzero(counts >= MIN_GROUP)
    if len(common) > MAX_GROUPS:
        common = common[np.argsort(counts[common])[::-1][:MAX_GROUPS]]
    grouped = np.zeros(len(uniq), dtype=bool)
    grouped[common] = True
    for group in common:
        idx = cols[inverse == group]
        p = np.flatnonzero(P[:, idx[0]])
        X[:, idx] = 0
        if p.size:
            X[np.ix_(p, idx)] = _solve(G[np.ix_(p, p)], F[np.ix_(p, idx)])
    rest = cols[~grouped[inverse]]
    for start in range(0, rest.size, BATCH_COLUMNS):
        _solve_batched(G, F, P, X, rest[start : start + BATCH_COLUMNS])
    Y[:, cols] = G @ X[:, cols] - F[:, cols]
    Y[:, cols] *= ~P[:, cols]


def _pattern_keys(P: np.ndarray) -> np.ndarray:
    """One hashable key per column of the bool matrix P (r, m)."""
    r = P.shape[0]
    if r <= 63:
        return (np.left_shift(np.uint64(1), np.arange(r, dtype=np.uint64)) @ P.astype(np.uint64)) if r else np.zeros(P.shape[1], np.uint64)
    packed = np.ascontiguousarray(np.packbits(P, axis=0).T)
    return packed.view(np.dtype((np.void, packed.shape[1]))).ravel()


def _solve_batched(G: np.ndarray, F: np.ndarray, P: np.ndarray, X: np.ndarray, cols: np.ndarray) -> None:
    """One batched solve of the masked systems (G restricted to each column's passive set)."""
    mask = P[:, cols].T  # (k, r)
    systems = G[None, :, :] * (mask[:, :, None] & mask[:, None, :])
    diag = np.arange(G.shape[0])
    systems[:, diag, diag] += ~mask  # identity on the active set: its variables solve to 0
    rhs = (F[:, cols].T * mask)[:, :, None]
    try:
        X[:, cols] = np.linalg.solve(systems, rhs)[:, :, 0].T
    except np.linalg.LinAlgError:  # a singular passive block: least squares column by column
        for j, col in enumerate(cols):
            X[:, col] = np.linalg.lstsq(systems[j], rhs[j, :, 0], rcond=None)[0]


def _solve(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(A, B)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(A, B, rcond=None)[0]
