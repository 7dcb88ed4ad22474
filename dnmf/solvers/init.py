"""Starting points: seeded random, NNDSVD / NNDSVDa / NNDSVDar, and custom (W, H).

W is always a dask array chunked like V's row blocks and built on the workers (never on the
client); H (r x p) is a numpy array, or for V on a 2-D grid (:mod:`dnmf.grid`) a random H is
a dask array in V's column blocks.

References
----------
C. Boutsidis, E. Gallopoulos (2008). SVD based initialization: A head start for nonnegative
matrix factorization. Pattern Recognition 41(4).
N. Halko, P.-G. Martinsson, J. Tropp (2011). Finding structure with randomness. SIAM Review 53(2).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import dask.array as da
import numpy as np

from .. import kernels
from ..errors import InvalidMatrixError, ParameterError, expected
from ..data.resident import to_workers
from ..data.store import Matrix, MatrixStats, unit_exponent
from ..graph import TaskGraph, compute, map_blocks, row_block_keys

INIT_METHODS = ("random", "nndsvd", "nndsvda", "nndsvdar", "custom")
NNDSVD_THRESHOLD = 1e-6


@dataclass(frozen=True)
class Start:
    """A starting point: W (dask, row blocks of V), H (numpy), and how it was made."""

    W: da.Array
    H: np.ndarray
    method: str


def resolve_init(init: str | None, n_components: int, shape: tuple[int, int]) -> str:
    """scikit-learn's default: NNDSVDa when the rank allows it, else random."""
    if init is None:
        return "nndsvda" if n_components <= min(shape) else "random"
    if init not in INIT_METHODS:
        raise ParameterError(expected(f"init in {INIT_METHODS}", init))
    return init


def random_start(matrix: Matrix, stats: MatrixStats, r: int, seed: int) -> Start:
    """Strictly positive random W and H with entries ≈ sqrt(mean(V) / r), from ``seed``."""
    scale = float(np.sqrt(stats.mean / r))
    rows, cols, p = matrix.row_offsets, matrix.col_offsets, matrix.shape[1]
    W = map_blocks(
        "dnmf-init-random", kernels.random_rows, seed, rows[:-1], rows[1:], r, scale, matrix.dtype,
        chunks=(matrix.row_chunks, (r,)), dtype=matrix.dtype,
    )
    if not matrix.is_grid:
        return Start(W, kernels.random_cols(seed, 0, p, r, p, scale, matrix.dtype), "random")
    H = map_blocks(
        "dnmf-init-random-H", kernels.random_cols, seed, cols[:-1], cols[1:], r, p, scale, matrix.dtype,
        chunks=((r,), matrix.col_chunks), dtype=matrix.dtype,
    )
    return Start(W, H, "random")


def custom_start(matrix: Matrix, r: int, W, H) -> Start:
    """Validate a user's (W, H) and lay W out like V's row blocks."""
    n, p = matrix.shape
    if W is None or H is None:
        raise ParameterError("init='custom' needs both W and H; pass fit(X, W=..., H=...).")
    H = np.asarray(H)
    W = W if isinstance(W, da.Array) else np.asarray(W)
    _check_factor("H", H.shape, (r, p))
    _check_factor("W", W.shape, (n, r))
    H = _nonzero("H", _nonnegative("H", H).astype(matrix.dtype))
    if isinstance(W, da.Array):
        W_dask = W.astype(matrix.dtype).rechunk((matrix.row_chunks, (r,)))
        bad, nonzero = compute(((W_dask < 0) | ~da.isfinite(W_dask)).any(), (W_dask != 0).any())
        if bad:
            raise InvalidMatrixError("W has negative or non-finite entries; a starting W must be non-negative.")
        _nonzero("W", None, nonzero)
    else:
        W_np = _nonzero("W", _nonnegative("W", W).astype(matrix.dtype))
        # Under a distributed client W goes to the workers once, outside any graph.
        W_dask = to_workers(da.from_array(W_np, chunks=(matrix.row_chunks, (r,)), name=f"dnmf-W0-{uuid.uuid4().hex}"), "dnmf-W0")
    return Start(W_dask, H, "custom")


def _check_factor(label: str, got: tuple, want: tuple) -> None:
    if tuple(got) != tuple(want):
        raise InvalidMatrixError(expected(f"{label} of shape {want}", f"shape {tuple(got)}"))


def _nonzero(label: str, X: np.ndarray | None, nonzero: bool | None = None) -> np.ndarray | None:
    """X, unless it is all zeros: every update keeps a zero factor at zero (0 · anything)."""
    if not (X.any() if nonzero is None else nonzero):
        raise InvalidMatrixError(
            f"The starting {label} is all zeros, and every update would keep it so; pass a {label} with "
            "positive entries, or another init."
        )
    return X


def _nonnegative(label: str, X: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(X)) or np.any(X < 0):
        raise InvalidMatrixError(f"{label} has negative or non-finite entries; a starting {label} must be non-negative.")
    return X


# ---------------------------------------------------------------------------
# NNDSVD from a randomized SVD that streams V


def _times(matrix: Matrix, M: np.ndarray, scale: float = 1.0) -> da.Array:
    """(scale V) M (n x k) in V's row blocks: each a fixed-order sum over the column blocks."""
    graph = TaskGraph("dnmf-vm", [matrix.data])
    cols = matrix.col_offsets
    M_blocks = [graph.constant(("M", j), M[a:b]) for j, (a, b) in enumerate(zip(cols, cols[1:]))]
    row_sums = [
        graph.reduce(graph.map(kernels.block_times, row, M_blocks, scale, label=("part", i)), _add, label=f"row{i}")
        for i, row in enumerate(matrix.grid_inputs())
    ]
    # Row i's sum under the array's key (i, 0): with one column block, the sum is the product itself.
    blocks = graph.map_blocks(_identity, row_sums)
    return graph.array(blocks, (matrix.row_chunks, (M.shape[1],)), matrix.dtype)


def _transpose_times(Q: da.Array, matrix: Matrix, scale: float = 1.0) -> np.ndarray:
    """Qᵀ (scale V) (k x p) as fixed-order sums of per-chunk products, on the client (k x p is small)."""
    graph = TaskGraph("dnmf-qtv", [Q, matrix.data])
    products = [
        graph.map(kernels.block_transpose_times, qk, row, scale, label=i)
        for i, (qk, row) in enumerate(zip(row_block_keys(Q), matrix.grid_inputs()))
    ]
    columns = [
        graph.reduce([row[j] for row in products], _add, label=f"col{j}") for j in range(len(matrix.col_chunks))
    ]
    return compute(graph.delayed(graph.task("all", np.hstack, columns)))[0]


def _identity(x):
    return x


def _add(a, b):
    return a + b


def _orthonormalize(Y: da.Array) -> da.Array:
    """An orthonormal basis of the columns of a tall Y, by two rounds of Gram-matrix QR.

    The products are tasks of their own graphs (a Gram per row block in the fixed-order tree,
    then each block times the transform), whose arguments are realigned like every dnmf task,
    so the basis does not depend on which worker holds which block.
    """
    for _ in range(2):
        graph = TaskGraph("dnmf-gram", [Y])
        total = graph.reduce(graph.map(kernels.gram, row_block_keys(Y)), _add)
        gram = compute(graph.delayed(total))[0].astype(np.float64)
        values, vectors = np.linalg.eigh(gram)
        keep = values > values.max() * 1e-12
        transform = (vectors[:, keep] / np.sqrt(values[keep])).astype(Y.dtype)
        Y = map_blocks(
            "dnmf-rotate", np.matmul, row_block_keys(Y), transform,
            chunks=(Y.chunks[0], (transform.shape[1],)), dtype=Y.dtype, dependencies=[Y],
        ).persist()
    return Y


def randomized_svd(
    matrix: Matrix, r: int, seed: int, n_oversamples: int = 10, n_power_iter: int = 2, scale: float = 1.0
):
    """Top-r SVD of ``scale`` V streaming it by row blocks: U (dask, row blocks), s, Vt (numpy).

    ``scale`` (a power of two, so exact) brings V's entries near 1 when they are extreme, where
    Gram matrices of V's products would overflow or underflow. Costs 2 + 2 * n_power_iter passes over V.
    """
    n, p = matrix.shape
    k = min(r + n_oversamples, n, p)
    omega = np.random.default_rng([seed, 2]).standard_normal((p, k)).astype(matrix.dtype)
    Q = _orthonormalize(_times(matrix, omega, scale).persist())
    for _ in range(n_power_iter):
        Z = _transpose_times(Q, matrix, scale)  # (k, p)
        Zq, _ = np.linalg.qr(Z.T.astype(np.float64))
        Q = _orthonormalize(_times(matrix, Zq.astype(matrix.dtype), scale).persist())
    B = _transpose_times(Q, matrix, scale).astype(np.float64)
    Ub, s, Vt = np.linalg.svd(B, full_matrices=False)
    missing = r - len(s)
    if missing > 0:  # V has rank below r: the basis dropped null directions; pad with zeros
        Ub = np.hstack([Ub, np.zeros((Ub.shape[0], missing))])
        s = np.concatenate([s, np.zeros(missing)])
        Vt = np.vstack([Vt, np.zeros((missing, Vt.shape[1]))])
    U = (Q @ Ub[:, :r].astype(matrix.dtype)).persist()
    return U, s[:r], Vt[:r]


# V's typical entry within [2^-MODERATE_EXPONENT, 2^MODERATE_EXPONENT]: NNDSVD runs on V as is.
MODERATE_EXPONENT = 32


def svd_exponent(stats: MatrixStats) -> int:
    """V's :func:`~dnmf.data.store.unit_exponent` k when V's typical entry is beyond
    2^±MODERATE_EXPONENT, else 0: NNDSVD's SVD runs on 2^-k V, where V's own products
    would overflow or underflow (and on V as it is otherwise, saving a copy of each block)."""
    k = unit_exponent(stats)
    return k if abs(k) > MODERATE_EXPONENT else 0


def nndsvd_start(matrix: Matrix, stats: MatrixStats, r: int, seed: int, variant: str) -> Start:
    """NNDSVD (zeros kept), NNDSVDa (zeros filled) or NNDSVDar (zeros filled with small random
    values).

    NNDSVDa fills with sqrt(mean(V) / r), the scale of the random start (W and H entries whose
    products sum to about mean(V)); NNDSVDar with that / 100 times U[0.5, 1.5). scikit-learn
    fills with mean(V) itself, which does not scale like W and H (as √V), so its start, and
    the fit, change with V's units; dnmf's start of c V is √c times the start of V.

    The threshold and the fills act in V's units 2^u (u = :func:`~dnmf.data.store.unit_exponent`):
    W and H of 2^-u V are thresholded and filled, then scaled back by 2^(u/2); so the start of
    4^j V is exactly 2^j times the start of V. The SVD itself runs on 2^-k V only at extreme
    scales (k = :func:`svd_exponent`, else 0), where V's products would overflow or underflow.
    """
    k, u = svd_exponent(stats), unit_exponent(stats)
    U, s, Vt = randomized_svd(matrix, r, seed, scale=float(np.ldexp(1.0, -k)))
    pos_sq, neg_sq = compute((da.maximum(U, 0) ** 2).sum(axis=0), (da.minimum(U, 0) ** 2).sum(axis=0))
    u_pos, u_neg = np.sqrt(pos_sq.astype(np.float64)), np.sqrt(neg_sq.astype(np.float64))
    v_pos = np.linalg.norm(np.maximum(Vt, 0), axis=1)
    v_neg = np.linalg.norm(np.maximum(-Vt, 0), axis=1)
    positive = u_pos * v_pos >= u_neg * v_neg
    signs = np.where(positive, 1.0, -1.0)
    u_norm = np.where(positive, u_pos, u_neg)
    v_norm = np.where(positive, v_pos, v_neg)
    weight = np.sqrt(s * u_norm * v_norm)
    with np.errstate(divide="ignore", invalid="ignore"):
        w_scale = np.where(u_norm > 0, weight / u_norm, 0.0)
        h_scale = np.where(v_norm > 0, weight / v_norm, 0.0)
    # From the SVD's units 2^k to V's units 2^u (powers of two: exact).
    to_units = float(np.ldexp(1.0, (k - u) // 2))
    w_scale, h_scale = w_scale * to_units, h_scale * to_units
    H = np.maximum(Vt * signs[:, None], 0) * h_scale[:, None]

    mean = float(np.ldexp(stats.mean, -u))
    H = kernels.fill_zeros(H.astype(matrix.dtype), None, 0, NNDSVD_THRESHOLD)
    zeros = H == 0
    fill = float(np.sqrt(mean / r))
    w_fill = {"nndsvd": None, "nndsvda": fill, "nndsvdar": (seed, fill / 100)}[variant]
    if variant == "nndsvda":
        H[zeros] = fill
    elif variant == "nndsvdar":
        H[zeros] = fill / 100 * (0.5 + np.random.default_rng([seed, 3]).random(int(zeros.sum())))
    unscale = float(np.ldexp(1.0, u // 2))
    if u:
        H *= H.dtype.type(unscale)

    signs_t, scales_t = signs.astype(matrix.dtype), w_scale.astype(matrix.dtype)
    W = map_blocks(
        "dnmf-init-nndsvd", kernels.nndsvd_w_block,
        row_block_keys(U), signs_t, scales_t, w_fill, matrix.row_offsets[:-1], NNDSVD_THRESHOLD, unscale,
        chunks=(matrix.row_chunks, (r,)), dtype=matrix.dtype, dependencies=[U],
    )
    return Start(W, H, variant)


def make_start(matrix: Matrix, stats: MatrixStats, r: int, init: str, seed: int, W=None, H=None) -> Start:
    """Dispatch on ``init`` (already resolved)."""
    if init == "custom":
        return custom_start(matrix, r, W, H)
    if init == "random":
        return random_start(matrix, stats, r, seed)
    return nndsvd_start(matrix, stats, r, seed, init)
