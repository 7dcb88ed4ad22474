"""L1 / L2 regularization (alpha_W, alpha_H, l1_ratio) exactly as scikit-learn defines it."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.special import xlogy
import zarr
from sklearn.decomposition import NMF as SkNMF
from sklearn.exceptions import ConvergenceWarning

import dnmf
from conftest import custom_start
from dnmf.errors import CheckpointMismatchError, ParameterError
from dnmf.kernels import Rule, penalties
from dnmf.kernels.updates import apply_w_update, update_h
from dnmf.kernels.products import Partials

R = 5


def data(n=120, p=50, seed=0, scale=20.0):
    # Scaled so that alpha = 1 with l1_ratio = 1 shrinks the factors without zeroing them.
    rng = np.random.default_rng(seed)
    return scale * (rng.random((n, 4)) @ rng.random((4, p)) + 0.01 * rng.random((n, p)))


def quiet(model, X, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        W = model.fit_transform(X, **kw)
    return W.compute() if hasattr(W, "compute") else W


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def penalized_objective(V, W, H, beta, alpha_W, alpha_H, l1_ratio):
    """A dense reference: D_β(V | WH) + scikit-learn's penalty terms."""
    n, p = V.shape
    WH = W @ H
    if beta == 2:
        loss = 0.5 * np.sum((V - WH) ** 2)
    elif beta == 1:
        loss = np.sum(xlogy(V, V) - xlogy(V, WH) - V + WH)
    else:
        loss = np.sum(V**beta + (beta - 1) * WH**beta - beta * V * WH ** (beta - 1)) / (beta * (beta - 1))
    return (
        loss
        + alpha_W * l1_ratio * p * W.sum() + alpha_H * l1_ratio * n * H.sum()
        + 0.5 * alpha_W * (1 - l1_ratio) * p * np.sum(W**2) + 0.5 * alpha_H * (1 - l1_ratio) * n * np.sum(H**2)
    )


# ---------------------------------------------------------------------------
# Parity with scikit-learn from the same start


@pytest.mark.parametrize("l1_ratio", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("alpha", [0.1, 1.0])
@pytest.mark.parametrize(
    "solver,beta_loss,sk_solver",
    [("mu", "frobenius", "mu"), ("mu", "kullback-leibler", "mu"), ("hals", "frobenius", "cd")],
)
def test_regularized_fit_equals_sklearn_on_the_transpose(solver, beta_loss, sk_solver, alpha, l1_ratio):
    V = data()
    W0, H0 = custom_start(V.shape, R)
    # Different alphas for W and H, so that swapping their roles is tested too.
    alpha_W, alpha_H = alpha, alpha / 2
    model = dnmf.NMF(
        R, solver=solver, beta_loss=beta_loss, init="custom", max_iter=50, tol=0, tol_x=0, eps=1e-10,
        inner_sweeps=1, alpha_W=alpha_W, alpha_H=alpha_H, l1_ratio=l1_ratio,
    )
    W = quiet(model, V, W=W0, H=H0)
    # scikit-learn updates W first; on Vᵀ with W and H swapped its order is ours. Its W is our
    # Hᵀ, penalized by alpha_W · n_features(Vᵀ) = our alpha_H · n_samples(V).
    sk = SkNMF(R, solver=sk_solver, beta_loss=beta_loss, init="custom", max_iter=50, tol=0,
               alpha_W=alpha_H, alpha_H=alpha_W, l1_ratio=l1_ratio)
    Ht = quiet(sk, V.T, W=H0.T.copy(), H=W0.T.copy())
    assert W.sum() > 0 and model.components_.sum() > 0  # not a trivial all-zero solution
    assert rel(model.components_, Ht.T) < 1e-6
    assert rel(W, sk.components_.T) < 1e-6
    # The penalty made a difference: the unregularized fit is elsewhere.
    plain = dnmf.NMF(R, solver=solver, beta_loss=beta_loss, init="custom", max_iter=50, tol=0, tol_x=0, inner_sweeps=1)
    assert rel(quiet(plain, V, W=W0, H=H0), W) > 1e-2


def test_l1_makes_factors_sparser():
    V = data()
    W0, H0 = custom_start(V.shape, R)
    kw = dict(solver="hals", init="custom", max_iter=100, tol=0, tol_x=0)
    plain = dnmf.NMF(R, **kw)
    lasso = dnmf.NMF(R, alpha_W=0.5, l1_ratio=1.0, **kw)
    W_plain, W_lasso = quiet(plain, V, W=W0, H=H0), quiet(lasso, V, W=W0, H=H0)
    zeros = lambda W, H: np.count_nonzero(W == 0) + np.count_nonzero(H == 0)  # noqa: E731
    assert zeros(W_lasso, lasso.components_) > zeros(W_plain, plain.components_) + 20


# ---------------------------------------------------------------------------
# The objective includes the penalty; MU never increases it; BPP solves the penalized problem


@pytest.mark.parametrize("beta_loss,beta", [("frobenius", 2), ("kullback-leibler", 1), (0.5, 0.5), (3.0, 3.0)])
@pytest.mark.parametrize("sparse", [False, True])
def test_regularized_objective_never_increases_under_mu_and_is_the_penalized_loss(beta_loss, beta, sparse):
    rng = np.random.default_rng(3)
    V = 5 * rng.random((90, 60)) * (rng.random((90, 60)) < 0.4) + (0 if sparse or beta == 2 else 0.01)
    X = sp.csr_matrix(V) if sparse else V
    params = dict(alpha_W=0.05, alpha_H=0.02, l1_ratio=0.3)
    model = dnmf.NMF(4, beta_loss=beta_loss, init="random", random_state=0, max_iter=60, tol=0, tol_x=0,
                     chunks=20, **params)
    W = quiet(model, X)
    objective = np.array([r["objective"] for r in model.history_])
    assert len(objective) == 60
    assert np.all(np.diff(objective) <= 1e-12 * objective[:-1])
    if not (sparse and beta != 2 and beta != 1):  # the reference needs V > 0 where β < 1 logs it
        ref = penalized_objective(V, W, model.components_, beta, 0.05, 0.02, 0.3)
        assert objective[-1] == pytest.approx(ref, rel=1e-9)
    # reconstruction_err_ is the divergence alone, as in scikit-learn.
    if beta == 2:
        assert model.reconstruction_err_ == pytest.approx(np.linalg.norm(V - W @ model.components_), rel=1e-8)


@pytest.mark.parametrize("l1_ratio", [0.0, 0.5, 1.0])
def test_bpp_solves_the_penalized_least_squares_exactly(l1_ratio):
    # BPP's last half-step is W given H: W must satisfy the KKT conditions of
    # min ½‖V − WH‖² + l1 ‖W‖₁ + ½ l2 ‖W‖² over W ≥ 0.
    V = data()
    model = dnmf.NMF(R, solver="bpp", init="random", random_state=0, max_iter=15, tol=0, tol_x=0,
                     alpha_W=0.2, l1_ratio=l1_ratio)
    W = quiet(model, V)
    H = model.components_
    p = V.shape[1]
    l1, l2 = 0.2 * l1_ratio * p, 0.2 * (1 - l1_ratio) * p
    grad = W @ (H @ H.T) + l2 * W - V @ H.T + l1
    scale = np.abs(V @ H.T).max()
    assert grad.min() >= -1e-9 * scale  # no descent direction into W ≥ 0
    assert np.abs(grad[W > 0]).max() <= 1e-9 * scale  # stationary where W is free
    objective = np.array([r["objective"] for r in model.history_])
    assert np.all(np.diff(objective) <= 1e-12 * objective[:-1])


def test_kernels_add_the_penalties_where_sklearn_does():
    rng = np.random.default_rng(0)
    W, H = rng.random((7, 3)), rng.random((3, 9))
    V = rng.random((7, 9))
    rule = Rule("mu", 2.0, 0.0, l1_w=0.3, l2_w=0.7, l1_h=0.2, l2_h=0.4)
    partials = Partials(W.T @ V, W.T @ W, 0.0, 0.0, 0.0)
    np.testing.assert_allclose(update_h(H, partials, rule), H * (W.T @ V) / (W.T @ W @ H + 0.2 + 0.4 * H))
    np.testing.assert_allclose(
        apply_w_update(W, V @ H.T, None, H @ H.T, None, rule), W * (V @ H.T) / (W @ H @ H.T + 0.3 + 0.7 * W)
    )
    # HALS: one sweep with the Gram diagonal raised by l2 and the cross term lowered by l1.
    hals = Rule("hals", 2.0, 0.0, l1_h=0.2, l2_h=0.4)
    G, C = W.T @ W + 0.4 * np.eye(3), W.T @ V - 0.2
    expected = H.copy()
    for k in range(3):
        expected[k] = np.maximum(0, expected[k] + (C[k] - G[k] @ expected) / G[k, k])
    np.testing.assert_allclose(update_h(H, partials, hals), expected, rtol=1e-14)
    assert penalties(0.5, 0.25, 0.4, (10, 20)) == pytest.approx(
        {"l1_w": 0.5 * 0.4 * 20, "l2_w": 0.5 * 0.6 * 20, "l1_h": 0.25 * 0.4 * 10, "l2_h": 0.25 * 0.6 * 10}
    )


def test_zero_penalty_is_bitwise_the_unregularized_fit():
    V = data()
    kw = dict(init="random", random_state=0, max_iter=20, tol=0, tol_x=0)
    for solver in ("mu", "hals", "bpp"):
        a, b = dnmf.NMF(R, solver=solver, **kw), dnmf.NMF(R, solver=solver, alpha_W=0.0, alpha_H=0.0, l1_ratio=0.7, **kw)
        assert same_bits(quiet(a, V), quiet(b, V)) and same_bits(a.components_, b.components_)
        assert [r["objective"] for r in a.history_] == [r["objective"] for r in b.history_]


# ---------------------------------------------------------------------------
# Every layout: grid, out of core, sparse, masked, resumed


REG = dict(alpha_W=0.3, alpha_H=0.1, l1_ratio=0.5)


def _fit(X, mask=None, resume=None, **params):
    kw = dict(init="random", random_state=0, max_iter=20, tol=0, tol_x=0, chunks=30, **REG)
    kw.update(params)
    model = dnmf.NMF(R, **kw)
    return quiet(model, X, mask=mask, resume=resume), model


@pytest.mark.parametrize(
    "settings",
    [dict(solver="mu"), dict(solver="mu", beta_loss="kullback-leibler"), dict(solver="hals", inner_sweeps=1),
     dict(solver="hals", inner_sweeps=3), dict(solver="bpp")],
)
def test_regularized_grid_equals_rows(settings):
    rng = np.random.default_rng(1)
    V = 20 * (rng.random((120, R)) @ rng.random((R, 300)) + 0.01 * rng.random((120, 300)))
    W_rows, rows = _fit(V, column_chunks=None, **settings)
    W_grid, grid = _fit(V, column_chunks=100, **settings)
    assert grid.fit_info_["layout"] == "grid"
    assert np.abs(W_grid - W_rows).max() <= 1e-10 * np.abs(W_rows).max()
    assert np.abs(grid.components_ - rows.components_).max() <= 1e-10 * np.abs(rows.components_).max()
    np.testing.assert_allclose([r["objective"] for r in grid.history_], [r["objective"] for r in rows.history_], rtol=1e-10)


@pytest.mark.parametrize("solver,beta_loss", [("mu", "frobenius"), ("mu", "kullback-leibler"), ("hals", "frobenius"), ("bpp", "frobenius")])
def test_regularized_out_of_core_and_graph_equal_in_memory(tmp_path, solver, beta_loss):
    V = data()
    z = zarr.create_array(str(tmp_path / "V.zarr"), shape=V.shape, chunks=(30, V.shape[1]), dtype=V.dtype)
    z[:] = V
    W_mem, mem = _fit(V, solver=solver, beta_loss=beta_loss)
    W_zarr, streamed = _fit(str(tmp_path / "V.zarr"), solver=solver, beta_loss=beta_loss, cache=False)
    W_graph, graph = _fit(V, solver=solver, beta_loss=beta_loss, local=False)
    assert streamed.fit_info_["v_storage"] == "streamed"
    for W, model in ((W_zarr, streamed), (W_graph, graph)):
        assert same_bits(W, W_mem) and same_bits(model.components_, mem.components_)
        assert [r["objective"] for r in model.history_] == [r["objective"] for r in mem.history_]


@pytest.mark.parametrize("solver,beta_loss", [("mu", "frobenius"), ("mu", "kullback-leibler"), ("hals", "frobenius")])
def test_regularized_sparse_equals_dense(solver, beta_loss):
    rng = np.random.default_rng(2)
    V = 10 * rng.random((120, 50)) * (rng.random((120, 50)) < 0.3)
    W_dense, dense = _fit(V, solver=solver, beta_loss=beta_loss)
    W_sparse, sparse = _fit(sp.csr_matrix(V), solver=solver, beta_loss=beta_loss)
    np.testing.assert_allclose(W_sparse, W_dense, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(sparse.components_, dense.components_, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("solver,beta_loss", [("mu", "frobenius"), ("mu", "kullback-leibler"), ("hals", "frobenius")])
def test_regularized_masked_fit_descends_and_a_full_mask_equals_no_mask(solver, beta_loss):
    V = data()
    W_plain, plain = _fit(V, solver=solver, beta_loss=beta_loss, inner_sweeps=1)
    W_full, full = _fit(V, solver=solver, beta_loss=beta_loss, inner_sweeps=1, mask=np.ones(V.shape, bool))
    np.testing.assert_allclose(W_full, W_plain, rtol=1e-8)
    np.testing.assert_allclose(full.components_, plain.components_, rtol=1e-8)
    hidden = V.copy()
    hidden[np.random.default_rng(0).random(V.shape) < 0.2] = np.nan
    _, masked = _fit(hidden, solver=solver, beta_loss=beta_loss, missing="nan")
    objective = np.array([r["objective"] for r in masked.history_])
    assert np.all(np.diff(objective) <= 1e-12 * objective[:-1])


@pytest.mark.parametrize("reg", [{}, REG])
def test_masked_bpp_fills_the_missing_entries_and_descends(reg):
    # BPP on V with its missing entries filled by the current WH (as HALS does): each half-step
    # solves the surrogate exactly, so the masked objective never increases.
    V = data()
    hidden = V.copy()
    hidden[np.random.default_rng(0).random(V.shape) < 0.2] = np.nan
    params = dict(solver="bpp", missing="nan", init="random", random_state=0, max_iter=30, tol=0, tol_x=0, chunks=30,
                  alpha_W=0.0, alpha_H="same", l1_ratio=0.0)
    params.update(reg)
    model = dnmf.NMF(R, **params)
    W = quiet(model, hidden)
    objective = np.array([r["objective"] for r in model.history_])
    assert np.all(np.diff(objective) <= 1e-12 * objective[:-1])
    observed = ~np.isnan(hidden)
    assert np.linalg.norm((V - W @ model.components_)[observed]) < 0.05 * np.linalg.norm(V[observed])


def test_regularized_resume_is_bitwise_and_the_penalty_is_in_the_fingerprint(tmp_path):
    V = data()
    ckpt = str(tmp_path / "ck")
    W_ref, ref = _fit(V, max_iter=12)
    _fit(V, max_iter=5, checkpoint=ckpt, checkpoint_every=2)
    W, resumed = _fit(V, max_iter=12, resume=ckpt)
    assert same_bits(W, W_ref) and same_bits(resumed.components_, ref.components_)
    assert [r["objective"] for r in resumed.history_] == [r["objective"] for r in ref.history_]
    for change in ({"alpha_W": 0.31}, {"alpha_H": "same"}, {"l1_ratio": 0.4}):
        with pytest.raises(CheckpointMismatchError, match=next(iter(change))):
            _fit(V, max_iter=14, resume=ckpt, **change)


def test_alpha_h_same_takes_alpha_w():
    V = data()
    W_a, a = _fit(V, alpha_W=0.2, alpha_H="same", l1_ratio=0.5)
    W_b, b = _fit(V, alpha_W=0.2, alpha_H=0.2, l1_ratio=0.5)
    assert same_bits(W_a, W_b) and same_bits(a.components_, b.components_)


def test_transform_penalizes_w_only():
    V = data()
    model = dnmf.NMF(R, init="random", random_state=0, max_iter=30, tol=0, tol_x=0, alpha_W=0.2, l1_ratio=1.0)
    quiet(model, V)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        W_reg = model.transform(V)
        W_plain = model.set_params(alpha_W=0.0).transform(V)
    assert W_reg.sum() < W_plain.sum()  # the L1 penalty shrinks W


@pytest.mark.parametrize(
    "params,match",
    [
        ({"alpha_W": -1}, "alpha_W"),
        ({"alpha_W": float("inf")}, "alpha_W"),
        ({"alpha_H": "other"}, "alpha_H"),
        ({"alpha_H": -0.5}, "alpha_H"),
        ({"l1_ratio": 1.5}, "l1_ratio"),
        ({"l1_ratio": "half"}, "l1_ratio"),
    ],
)
def test_bad_regularization_is_a_parameter_error(params, match):
    with pytest.raises(ParameterError, match=match):
        dnmf.NMF(2, **params).fit(data())
