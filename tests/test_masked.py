"""Missing values: masked MU against a numpy transcription, descent, recovery, validation."""

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.exceptions import ConvergenceWarning

import dnmf
from conftest import best_cosines, custom_start, planted_parts
from dnmf.kernels import masked
from dnmf.errors import DnmfError
from dnmf.kernels import Rule

EPS = 1e-10


def numpy_masked_mu(V, M, W, H, n_iter, beta, eps=EPS):
    """The masked update lines transcribed literally, H first then W."""
    V = np.where(M, V, 0)
    W, H = W.copy(), H.copy()
    for _ in range(n_iter):
        if beta == 2:
            H = H * (W.T @ (M * V)) / (W.T @ (M * (W @ H)) + eps)
            W = W * ((M * V) @ H.T) / ((M * (W @ H)) @ H.T + eps)
        else:
            H = H * (W.T @ (M * V / (W @ H + eps))) / (W.T @ M + eps)
            W = W * ((M * V / (W @ H + eps)) @ H.T) / (M @ H.T + eps)
    return W, H


def masked_objective(V, M, WH, beta):
    if beta == 2:
        return 0.5 * np.sum(((V - WH) ** 2)[M])
    V, WH = V[M], WH[M]
    return np.sum(V * np.log(V / WH) - V + WH)


def quiet_fit(model, X, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit_transform(X, **kw)


def hidden_fraction(shape, fraction, seed=0):
    return np.random.default_rng(seed).random(shape) >= fraction


@pytest.mark.parametrize("beta_loss,beta", [("frobenius", 2), ("kullback-leibler", 1)])
def test_masked_mu_equals_numpy_transcription(lowrank, beta_loss, beta):
    M = hidden_fraction(lowrank.shape, 0.3)
    V = np.where(M, lowrank, np.nan)
    W0, H0 = custom_start(lowrank.shape, 4)
    model = dnmf.NMF(4, beta_loss=beta_loss, init="custom", missing="nan", max_iter=40, tol=0, tol_x=0, eps=EPS, chunks=25)
    W = quiet_fit(model, V, W=W0, H=H0)
    W_ref, H_ref = numpy_masked_mu(lowrank, M, W0, H0, 40, beta)
    np.testing.assert_allclose(W, W_ref, rtol=1e-9)
    np.testing.assert_allclose(model.components_, H_ref, rtol=1e-9)
    WH = W @ model.components_
    assert model.history_[-1]["objective"] == pytest.approx(masked_objective(lowrank, M, WH, beta), rel=1e-9)


@pytest.mark.parametrize("solver,beta_loss", [("mu", "frobenius"), ("mu", "kullback-leibler"), ("mu", 0.5), ("hals", "frobenius")])
@pytest.mark.parametrize("how", ["nan", "mask", "sparse+mask"])
def test_masked_objective_never_increases(solver, beta_loss, how):
    rng = np.random.default_rng(5)
    V = rng.random((90, 60)) * (rng.random((90, 60)) < 0.5) + 0.01
    M = hidden_fraction(V.shape, 0.25, seed=2)
    kw = dict(init="random", random_state=0, max_iter=60, tol=0, tol_x=0, chunks=20, beta_loss=beta_loss, solver=solver)
    if how == "nan":
        model = dnmf.NMF(4, missing="nan", **kw)
        W = quiet_fit(model, np.where(M, V, np.nan))
    else:
        model = dnmf.NMF(4, **kw)
        W = quiet_fit(model, sp.csr_matrix(V) if how.startswith("sparse") else V, mask=M)
    objective = np.array([r["objective"] for r in model.history_])
    assert len(objective) == 60
    assert np.all(np.diff(objective) <= 1e-12 * objective[:-1])
    assert W.min() >= 0 and model.components_.min() >= 0


def numpy_filled_hals(V, M, W, H, n_iter):
    """Masked HALS as documented: fill missing entries with the current WH, one HALS step, H first."""
    W, H = W.copy(), H.copy()
    for _ in range(n_iter):
        V_hat = np.where(M, V, W @ H)
        A, B = W.T @ V_hat, W.T @ W
        for k in range(H.shape[0]):
            H[k] = np.maximum(0, H[k] + (A[k] - B[k] @ H) / B[k, k])
        V_hat = np.where(M, V, W @ H)
        C, D = V_hat @ H.T, H @ H.T
        for k in range(W.shape[1]):
            W[:, k] = np.maximum(0, W[:, k] + (C[:, k] - W @ D[:, k]) / D[k, k])
    return W, H


def test_masked_hals_equals_numpy_transcription(lowrank):
    M = hidden_fraction(lowrank.shape, 0.3)
    W0, H0 = custom_start(lowrank.shape, 4)
    model = dnmf.NMF(4, solver="hals", init="custom", max_iter=30, tol=0, tol_x=0, chunks=25)
    W = quiet_fit(model, lowrank, W=W0, H=H0, mask=M)
    W_ref, H_ref = numpy_filled_hals(lowrank, M, W0, H0, 30)
    np.testing.assert_allclose(W, W_ref, rtol=1e-9)
    np.testing.assert_allclose(model.components_, H_ref, rtol=1e-9)


def test_full_mask_equals_unmasked(lowrank):
    W0, H0 = custom_start(lowrank.shape, 3)
    kw = dict(init="custom", max_iter=20, tol=0, tol_x=0, chunks=30)
    W_a = quiet_fit(dnmf.NMF(3, **kw), lowrank, W=W0, H=H0)
    W_b = quiet_fit(dnmf.NMF(3, **kw), lowrank, W=W0, H=H0, mask=np.ones(lowrank.shape, bool))
    np.testing.assert_allclose(W_b, W_a, rtol=1e-10)


@pytest.mark.parametrize("solver,beta_loss", [("mu", "frobenius"), ("mu", "kullback-leibler"), ("hals", "frobenius")])
def test_recovers_parts_with_20_percent_hidden(solver, beta_loss):
    V, _, H_true = planted_parts()
    M = hidden_fraction(V.shape, 0.2, seed=11)
    model = dnmf.NMF(3, solver=solver, beta_loss=beta_loss, missing="nan", init="random", random_state=42, max_iter=400, tol=0, tol_x=0)
    W = quiet_fit(model, np.where(M, V, np.nan))
    assert best_cosines(model.components_, H_true).min() >= 0.95
    hidden = ~M
    predicted = (W @ model.components_)[hidden]
    column_means = np.broadcast_to(np.nanmean(np.where(M, V, np.nan), axis=0), V.shape)[hidden]
    rmse_model = np.sqrt(np.mean((V[hidden] - predicted) ** 2))
    rmse_means = np.sqrt(np.mean((V[hidden] - column_means) ** 2))
    assert rmse_model < 0.25 * rmse_means


def test_zarr_mask_and_nndsvda_start(tmp_path, lowrank):
    import zarr

    M = hidden_fraction(lowrank.shape, 0.1, seed=3)
    path = str(tmp_path / "mask.zarr")
    z = zarr.create_array(path, shape=M.shape, chunks=(40, 50), dtype=bool)
    z[:] = M
    kw = dict(init="nndsvda", random_state=0, max_iter=15, tol=0, tol_x=0, chunks=30)
    W_np = quiet_fit(dnmf.NMF(4, **kw), lowrank, mask=M)
    W_z = quiet_fit(dnmf.NMF(4, **kw), lowrank, mask=path)
    np.testing.assert_array_equal(W_z, W_np)
    assert np.isfinite(W_np).all()


def test_transform_with_missing(parts):
    V, _, _ = parts
    M = hidden_fraction(V.shape, 0.2, seed=4)
    Vn = np.where(M, V, np.nan)
    model = dnmf.NMF(3, missing="nan", init="random", random_state=0, max_iter=200)
    W = quiet_fit(model, Vn)
    W2 = model.transform(Vn)
    err = lambda A: np.sqrt(np.sum(((V - A @ model.components_) ** 2)[M]))  # noqa: E731
    assert np.isfinite(W2).all() and err(W2) <= 1.05 * err(W)


def test_holdout_rows_independent_of_chunking():
    whole = masked.holdout_rows(7, 0, 300, 13, 0.2)
    pieces = np.vstack([masked.holdout_rows(7, a, b, 13, 0.2) for a, b in [(0, 50), (50, 130), (130, 300)]])
    np.testing.assert_array_equal(whole, pieces)
    assert 0.15 < 1 - whole.mean() < 0.25


def test_masked_step_block_reads_nan_as_missing():
    rng = np.random.default_rng(0)
    V = rng.random((6, 5))
    V_nan = V.copy()
    V_nan[1, 2] = np.nan
    M = np.ones(V.shape, bool)
    M[1, 2] = False
    W, H = rng.random((6, 2)), rng.random((2, 5))
    rule = Rule("mu", 2.0, EPS)
    a = masked.masked_step_block(V_nan, None, W, H, rule)
    b = masked.masked_step_block(V, M, W, H, rule)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1].numer, b[1].numer)


# ---------------------------------------------------------------------------
# Errors


def good_with_nan():
    V = np.random.default_rng(0).random((20, 10))
    V[2, 3] = np.nan
    return V


def test_infinity_is_an_error_even_with_missing():
    V = good_with_nan()
    V[4, 5] = np.inf
    with pytest.raises(DnmfError, match=r"1 NaN or infinite entries \(first at row, column \(4, 5\)\)"):
        dnmf.NMF(2, missing="nan").fit(V)


def test_nan_without_opt_in_is_an_error_even_with_a_mask():
    V = good_with_nan()
    with pytest.raises(DnmfError, match=r"1 NaN or infinite entries \(first at row, column \(2, 3\)\)"):
        dnmf.NMF(2).fit(V, mask=np.ones(V.shape, bool))
    mask = np.ones(V.shape, bool)
    mask[2, 3] = False  # hidden by the mask: fine
    quiet_fit(dnmf.NMF(2, max_iter=2), V, mask=mask)


@pytest.mark.parametrize(
    "mask,match",
    [(np.ones((3, 3), bool), r"Expected a mask of V's shape \(20, 10\)"), (np.ones((20, 10)), "Expected a boolean mask")],
)
def test_bad_mask(mask, match):
    with pytest.raises(DnmfError, match=match):
        dnmf.NMF(2).fit(np.ones((20, 10)), mask=mask)


def test_bad_missing_option():
    with pytest.raises(DnmfError, match=r"Expected missing in \(None, 'nan'\)"):
        dnmf.NMF(2, missing="NA").fit(np.ones((20, 10)))


def test_all_missing():
    with pytest.raises(DnmfError, match="Every entry of the matrix is missing"):
        dnmf.NMF(2, missing="nan").fit(np.full((20, 10), np.nan))
