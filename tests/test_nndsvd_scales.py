"""NNDSVD at extreme scales (issue 14, case 9): the start is scale-invariant.

The randomized SVD runs on 2^-k V and W, H are scaled back by 2^(k/2) (exact), so V x 1e19
(float32) or x 1e300 (float64) no longer overflow the range finder's Gram matrices
(LinAlgError) and x 1e-30 / 1e-300 no longer underflow them (ValueError: zero-size array).
"""

import dask
import numpy as np
import pytest
import scipy.sparse as sp

from dnmf import NMF
from dnmf.data.store import open_matrix, scan_matrix
from dnmf.errors import DnmfError
from dnmf.solvers.init import make_start, svd_exponent

SCALES = [(np.float32, 1e-30), (np.float32, 1e19), (np.float64, 1e-300), (np.float64, 1e300)]
INITS = ["nndsvd", "nndsvda", "nndsvdar"]


def _V(dtype, sparse=False):
    rng = np.random.default_rng(5)
    V = rng.random((30, 3)) @ rng.random((3, 20))
    if sparse:
        V[rng.random(V.shape) < 0.3] = 0
        return sp.csr_matrix(V.astype(dtype))
    return V.astype(dtype)


def _start(V, init, r=3):
    matrix = open_matrix(V, chunks=8)
    stats = scan_matrix(matrix)
    start = make_start(matrix, stats, r, init, 0)
    W = dask.compute(start.W)[0]
    return W, np.asarray(start.H), stats


def _rel(A, B):
    return float(np.linalg.norm(A - B) / np.linalg.norm(B))


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("dtype,scale", SCALES)
def test_nndsvd_start_at_extreme_scales(dtype, scale, init, sparse):
    V = _V(dtype, sparse)
    W1, H1, _ = _start(V, init)
    W, H, stats = _start(V * dtype(scale), init)
    assert svd_exponent(stats) != 0
    assert W.dtype == H.dtype == np.dtype(dtype)
    assert np.all(np.isfinite(W)) and np.all(np.isfinite(H)) and W.min() >= 0 and H.min() >= 0
    assert W.any() and H.any()
    if init == "nndsvd":  # no fill: the start itself is covariant with the scale
        WH = W.astype(np.float64) @ H.astype(np.float64) / scale
        assert _rel(WH, W1.astype(np.float64) @ H1.astype(np.float64)) < 0.01


def test_moderate_scale_is_unscaled():
    """At ordinary scales k = 0: the start is bitwise what it was (tests/test_pinned.py)."""
    for s in (1e-6, 1.0, 1e6):
        assert svd_exponent(scan_matrix(open_matrix(_V(np.float64) * s))) == 0


def test_exponent_is_even_and_tracks_the_scale():
    k = svd_exponent(scan_matrix(open_matrix(_V(np.float64) * 1e300)))
    assert k % 2 == 0 and abs(k - np.log2(1e300)) < 4


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("dtype,exponent", [(np.float32, 80), (np.float32, -80), (np.float64, 900), (np.float64, -900)])
def test_start_of_power_of_two_scaled_V_is_exact(dtype, exponent, init):
    """V's typical entry near 1: the start of 2^e V is bitwise 2^(e/2) x the start of V, fills included."""
    V = _V(dtype)
    W1, H1, stats1 = _start(V, init)
    assert svd_exponent(stats1) == 0
    W, H, stats = _start(V * dtype(np.ldexp(1.0, exponent)), init)
    assert svd_exponent(stats) == exponent
    unscale = dtype(np.ldexp(1.0, exponent // 2))
    np.testing.assert_array_equal(W, W1 * unscale)
    np.testing.assert_array_equal(H, H1 * unscale)


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("dtype,scale", SCALES)
def test_nndsvd_fit_at_extreme_scales(dtype, scale, init):
    """hals (no eps): the fit works or raises one dnmf error, never a LinAlgError / ValueError.

    At x1e19 (float32) W·H is within 1% of scale x the unit fit's. At x1e300 ‖V‖² overflows in
    the objective (DivergenceError, a solver matter); at x1e-30 / x1e-300 HALS's products
    (HHᵀ ~ scale²) underflow, the solver's own tiny-scale problem (issue 14, case 5's family),
    so only finiteness is checked there; the start itself is checked above.
    """
    V = _V(dtype)
    unit = NMF(3, init=init, solver="hals", max_iter=200, random_state=0)
    WH1 = unit.fit_transform(V).astype(np.float64) @ unit.components_.astype(np.float64)
    try:
        model = NMF(3, init=init, solver="hals", max_iter=200, random_state=0)
        W = model.fit_transform(V * dtype(scale))
    except DnmfError:
        return
    H = model.components_
    assert W.dtype == H.dtype == np.dtype(dtype)
    assert np.all(np.isfinite(W)) and np.all(np.isfinite(H)) and W.min() >= 0 and H.min() >= 0
    if scale > 1:
        WH = W.astype(np.float64) @ H.astype(np.float64) / scale
        assert _rel(WH, WH1) < 0.01
