"""The engine core: parity with the update equations and scikit-learn, descent, recovery."""

import warnings

import dask
import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.decomposition import NMF as SkNMF
from sklearn.exceptions import ConvergenceWarning

import dnmf
from conftest import best_cosines, custom_start

EPS = 1e-10


def numpy_mu(V, W, H, n_iter, beta, eps=EPS):
    """A plain transcription of the update lines, H first then W."""
    W, H = W.copy(), H.copy()
    for _ in range(n_iter):
        if beta == 2:
            H = H * (W.T @ V) / (W.T @ W @ H + eps)
            W = W * (V @ H.T) / (W @ (H @ H.T) + eps)
        else:
            H = H * (W.T @ (V / (W @ H + eps))) / (W.sum(axis=0)[:, None] + eps)
            W = W * ((V / (W @ H + eps)) @ H.T) / (H.sum(axis=1)[None, :] + eps)
    return W, H


def fit(V, W0, H0, max_iter=50, **kw):
    model = dnmf.NMF(W0.shape[1], init="custom", max_iter=max_iter, tol=0, tol_x=0, eps=EPS, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        W = model.fit_transform(V, W=W0, H=H0)
    return W, model.components_, model


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("beta_loss,beta", [("frobenius", 2), ("kullback-leibler", 1)])
def test_mu_equals_numpy_transcription(lowrank, beta_loss, beta):
    W0, H0 = custom_start(lowrank.shape, 5)
    W, H, _ = fit(lowrank, W0, H0, beta_loss=beta_loss, chunks=25)
    W_ref, H_ref = numpy_mu(lowrank, W0, H0, 50, beta)
    assert rel(W, W_ref) < 1e-10
    assert rel(H, H_ref) < 1e-10


@pytest.mark.parametrize("beta_loss", ["frobenius", "kullback-leibler"])
def test_mu_equals_sklearn_on_transpose(lowrank, beta_loss):
    W0, H0 = custom_start(lowrank.shape, 5)
    W, H, _ = fit(lowrank, W0, H0, beta_loss=beta_loss)
    # scikit-learn updates W first; on Vᵀ with roles swapped its order is ours (H first).
    sk = SkNMF(5, solver="mu", beta_loss=beta_loss, init="custom", max_iter=50, tol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        Ht_sk = sk.fit_transform(lowrank.T, W=H0.T.copy(), H=W0.T.copy())
    assert rel(H, Ht_sk.T) < 1e-6
    assert rel(W, sk.components_.T) < 1e-6


def test_hals_no_worse_than_sklearn_cd(lowrank):
    W0, H0 = custom_start(lowrank.shape, 5)
    W, H, model = fit(lowrank, W0, H0, solver="hals", max_iter=100)
    sk = SkNMF(5, solver="cd", init="custom", max_iter=100, tol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        Ht = sk.fit_transform(lowrank.T, W=H0.T.copy(), H=W0.T.copy())
    ours = np.linalg.norm(lowrank - W @ H)
    theirs = np.linalg.norm(lowrank.T - Ht @ sk.components_)
    assert ours <= 1.01 * theirs
    assert model.reconstruction_err_ == pytest.approx(ours, rel=1e-8)


@pytest.mark.parametrize("solver,beta_loss", [("mu", "frobenius"), ("mu", "kullback-leibler"), ("mu", 0.5), ("mu", 3.0), ("hals", "frobenius")])
@pytest.mark.parametrize("sparse", [False, True])
def test_objective_never_increases(solver, beta_loss, sparse):
    rng = np.random.default_rng(3)
    V = rng.random((90, 60)) * (rng.random((90, 60)) < 0.3)
    X = sp.csr_matrix(V) if sparse else V
    model = dnmf.NMF(4, solver=solver, beta_loss=beta_loss, init="random", random_state=0, max_iter=60, tol=0, tol_x=0, chunks=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        W = model.fit_transform(X)
    objective = np.array([r["objective"] for r in model.history_])
    assert len(objective) == 60
    assert np.all(np.diff(objective) <= 1e-12 * objective[:-1])
    assert W.min() >= 0 and model.components_.min() >= 0


def test_objective_matches_dense_reference(lowrank):
    for beta_loss, beta in [("frobenius", 2), ("kullback-leibler", 1), (0.5, 0.5)]:
        model = dnmf.NMF(3, beta_loss=beta_loss, init="random", random_state=1, max_iter=5, tol=0, tol_x=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            W = model.fit_transform(lowrank)
        WH = W @ model.components_
        if beta == 2:
            ref = 0.5 * np.sum((lowrank - WH) ** 2)
        elif beta == 1:
            ref = np.sum(lowrank * np.log(lowrank / WH) - lowrank + WH)
        else:
            ref = np.sum(lowrank**beta + (beta - 1) * WH**beta - beta * lowrank * WH ** (beta - 1)) / (beta * (beta - 1))
        assert model.history_[-1]["objective"] == pytest.approx(ref, rel=1e-9)


def test_seed_demonstration_recovers_parts(parts):
    V, _, H_true = parts
    model = dnmf.NMF(3, solver="mu", init="random", random_state=42, max_iter=200, tol=0, tol_x=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        W = model.fit_transform(V)
    rel_err = np.linalg.norm(V - W @ model.components_) / np.linalg.norm(V)
    assert rel_err <= 0.03
    assert best_cosines(model.components_, H_true).min() >= 0.95


@pytest.mark.parametrize("init", ["random", "nndsvd", "nndsvda", "nndsvdar"])
def test_inits_nonnegative_and_reproducible(lowrank, init):
    kw = dict(init=init, random_state=7, max_iter=3, tol=0, tol_x=0, solver="hals")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        a = dnmf.NMF(4, **kw).fit(lowrank).components_
        b = dnmf.NMF(4, **kw).fit(lowrank).components_
    assert np.array_equal(a, b) and a.min() >= 0


def test_random_init_independent_of_chunks(lowrank):
    kw = dict(init="random", random_state=3, max_iter=1, tol=0, tol_x=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        a = dnmf.NMF(4, chunks=7, **kw).fit_transform(lowrank)
        b = dnmf.NMF(4, chunks=50, **kw).fit_transform(lowrank)
    np.testing.assert_allclose(a, b, rtol=1e-12)


@pytest.mark.parametrize("init", ["nndsvd", "nndsvdar"])
def test_nndsvd_as_good_as_sklearn(lowrank, init):
    # NNDSVD from dnmf's streamed randomized SVD starts as well as scikit-learn's.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ours = dnmf.NMF(4, init=init, random_state=0, max_iter=1, solver="hals").fit(lowrank)
        theirs = SkNMF(4, init=init, random_state=0, max_iter=1, solver="cd").fit(lowrank)
    assert ours.reconstruction_err_ <= 1.05 * theirs.reconstruction_err_


def test_float32_stays_float32(lowrank):
    V = lowrank.astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        m = dnmf.NMF(3, init="random", random_state=0, max_iter=5)
        W = m.fit_transform(V)
    assert W.dtype == np.float32 and m.components_.dtype == np.float32


def test_zarr_equals_numpy(tmp_path, lowrank):
    import zarr

    path = str(tmp_path / "v.zarr")
    z = zarr.create_array(path, shape=lowrank.shape, chunks=(30, 50), dtype="f8")
    z[:] = lowrank
    kw = dict(init="nndsvda", random_state=0, max_iter=20, tol=0, tol_x=0, chunks=30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        W_np = dnmf.NMF(4, **kw).fit_transform(lowrank)
        m = dnmf.NMF(4, **kw)
        W_z = m.fit_transform(path)
    assert hasattr(W_z, "dask")  # out-of-core input gives a lazy W
    np.testing.assert_array_equal(W_z.compute(), W_np)


def test_transform_and_inverse(parts):
    V, _, _ = parts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        m = dnmf.NMF(3, init="nndsvda", random_state=0, max_iter=300, solver="hals")
        W = m.fit_transform(V)
        W2 = m.transform(V)
    assert W2.shape == W.shape
    assert np.linalg.norm(V - m.inverse_transform(W2)) <= 1.05 * np.linalg.norm(V - W @ m.components_)


def test_sklearn_api():
    from sklearn.base import clone

    m = dnmf.NMF(3, solver="hals", tol=1e-5)
    c = clone(m)
    assert c.get_params() == m.get_params()
    c.set_params(max_iter=7)
    assert c.max_iter == 7


def test_threaded_equals_synchronous(lowrank):
    kw = dict(init="random", random_state=0, max_iter=10, tol=0, tol_x=0, chunks=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        with dask.config.set(scheduler="threads"):
            a = dnmf.NMF(3, **kw).fit_transform(lowrank)
        with dask.config.set(scheduler="synchronous"):
            b = dnmf.NMF(3, **kw).fit_transform(lowrank)
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_distributed_equals_threaded(lowrank):
    from distributed import Client, LocalCluster

    kw = dict(init="nndsvda", random_state=0, max_iter=15, tol=0, tol_x=0, chunks=30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref = dnmf.NMF(3, **kw).fit_transform(lowrank)
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=":0") as cluster, Client(cluster):
            got = dnmf.NMF(3, **kw).fit_transform(lowrank)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("solver", ["mu", "hals"])
def test_one_pass_over_v_per_iteration(lowrank, monkeypatch, solver):
    # Each row block's step (the one read of V_b) runs once per iteration, not once per
    # collection that needs it.
    from dnmf import kernels

    calls = []
    original = kernels.step_block
    monkeypatch.setattr(kernels, "step_block", lambda *args: calls.append(1) or original(*args))
    model = dnmf.NMF(3, solver=solver, init="random", random_state=0, max_iter=7, tol=0, tol_x=0, chunks=30, local=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(lowrank)
    assert len(calls) == 7 * 4


# ---------------------------------------------------------------------------
# objective_every: the objective (β ≠ 2) only every k-th iteration


@pytest.mark.parametrize("column_chunks", [None, 150])
@pytest.mark.parametrize("beta_loss", ["kullback-leibler", 0.5])
def test_objective_every_skips_the_divergence_but_not_the_iterates(beta_loss, column_chunks):
    import math
    import warnings as _warnings

    from sklearn.exceptions import ConvergenceWarning as _CW

    rng = np.random.default_rng(5)
    V = rng.random((300, 5)) @ rng.random((5, 600)) + 0.01
    common = dict(beta_loss=beta_loss, init="random", random_state=0, max_iter=25, tol=0, tol_x=0,
                  chunks=75, column_chunks=column_chunks)
    with _warnings.catch_warnings():
        _warnings.simplefilter("ignore", _CW)
        every, sparse_eval = dnmf.NMF(5, **common), dnmf.NMF(5, objective_every=10, **common)
        W_every, W_sparse = every.fit_transform(V), sparse_eval.fit_transform(V)
    assert np.array_equal(W_every, W_sparse) and np.array_equal(every.components_, sparse_eval.components_)
    objectives = [r["objective"] for r in sparse_eval.history_]
    evaluated = [i + 1 for i, f in enumerate(objectives) if not math.isnan(f)]
    assert evaluated == [10, 20, 25]  # every 10th and the last
    for it in evaluated:
        assert objectives[it - 1] == every.history_[it - 1]["objective"]
    assert sparse_eval.reconstruction_err_ == every.reconstruction_err_
    # The relative decrease is per iteration since the last evaluation.
    f10, f20 = objectives[9], objectives[19]
    assert sparse_eval.history_[19]["rel_decrease"] == pytest.approx((f10 - f20) / f10 / 10)


def test_objective_every_converges_on_evaluated_iterations_and_fills_in_a_stop_between():
    rng = np.random.default_rng(6)
    V = rng.random((200, 4)) @ rng.random((4, 300)) + 0.01
    common = dict(beta_loss="kullback-leibler", init="random", random_state=0, max_iter=500)
    model = dnmf.NMF(4, tol=1e-3, tol_x=1.0, objective_every=7, **common).fit(V)
    assert model.stop_reason_ == "converged" and model.n_iter_ % 7 == 0
    stopped = dnmf.NMF(4, tol=0, tol_x=0, objective_every=10, callbacks=[lambda r: r.iteration == 13], **common).fit(V)
    assert stopped.n_iter_ == 13 and stopped.stop_reason_ == "callback"
    assert np.isfinite(stopped.history_[-1]["objective"])  # evaluated by one more pass
    assert np.sqrt(2 * stopped.history_[-1]["objective"]) == pytest.approx(stopped.reconstruction_err_)
    with pytest.raises(dnmf.errors.ParameterError, match="objective_every"):
        dnmf.NMF(4, objective_every=0).fit(V)
