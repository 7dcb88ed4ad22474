"""Accelerated HALS, ANLS-BPP, the KL objective's constant, the local fast path."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import nnls
from sklearn.exceptions import ConvergenceWarning

import dnmf
from conftest import custom_start
from dnmf.kernels.nnls import nnls_bpp
from dnmf.data.store import auto_row_block
from dnmf.data.zarrio import default_compressors
from dnmf.graph import tree_fold


def lowrank_noisy(n=150, p=80, r=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, r)) @ rng.random((r, p)) + 0.05 * rng.random((n, p))


def fit(V, r, max_iter, W0=None, H0=None, **kw):
    if W0 is None:
        W0, H0 = custom_start(V.shape, r, dtype=V.dtype)  # a custom start has X's dtype (TypeError otherwise)
    model = dnmf.NMF(r, init="custom", max_iter=max_iter, tol=0, tol_x=0, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        W = model.fit_transform(V, W=W0, H=H0)
    return W, model


def objectives(model):
    return np.array([record["objective"] for record in model.history_])


@pytest.mark.parametrize("m", [1, 40, 400])
def test_bpp_equals_scipy_nnls(m):
    rng = np.random.default_rng(m)
    C = rng.random((60, 7))
    B = rng.random((60, m)) - 0.4
    ref = np.stack([nnls(C, B[:, j])[0] for j in range(m)], axis=1)
    cold = nnls_bpp(C.T @ C, C.T @ B)
    warm = nnls_bpp(C.T @ C, C.T @ B, passive=rng.random((7, m)) < 0.5)
    np.testing.assert_allclose(cold, ref, atol=1e-10)
    np.testing.assert_allclose(warm, ref, atol=1e-10)


def test_bpp_zero_column_stays_zero():
    rng = np.random.default_rng(1)
    C = rng.random((30, 4))
    C[:, 2] = 0
    B = rng.random((30, 5))
    X = nnls_bpp(C.T @ C, C.T @ B, passive=np.ones((4, 5), bool))
    ref = np.stack([nnls(C, B[:, j])[0] for j in range(5)], axis=1)
    assert np.all(X[2] == 0)
    np.testing.assert_allclose(C @ X, C @ ref, atol=1e-10)


@pytest.mark.parametrize("solver,kw", [("bpp", {}), ("hals", {"inner_sweeps": 5}), ("hals", {"inner_sweeps": "auto"})])
@pytest.mark.parametrize("sparse", [False, True])
def test_descent_is_monotone(solver, kw, sparse):
    V = lowrank_noisy()
    V[V < 0.6] = 0
    X = sp.csr_matrix(V) if sparse else V
    _, model = fit(X, 5, 40, solver=solver, chunks=40, **kw)
    obj = objectives(model)
    assert np.all(np.diff(obj) <= 1e-10 * obj[:-1])
    assert model.components_.min() >= 0


def test_more_progress_per_pass_than_plain_hals():
    V = lowrank_noisy()
    _, plain = fit(V, 6, 15, solver="hals", inner_sweeps=1)
    _, accel = fit(V, 6, 15, solver="hals", inner_sweeps=10)
    _, bpp = fit(V, 6, 15, solver="bpp")
    assert objectives(accel)[-1] < 0.9 * objectives(plain)[-1]
    assert objectives(bpp)[-1] < 0.9 * objectives(plain)[-1]


def test_bpp_iterate_solves_its_subproblems():
    # After an ANLS step, W is the exact NNLS solution given H: its projected gradient is 0.
    V = lowrank_noisy()
    W, model = fit(V, 4, 3, solver="bpp")
    H = model.components_
    grad = W @ (H @ H.T) - V @ H.T
    projected = np.where(W > 0, grad, np.minimum(grad, 0))
    assert np.abs(projected).max() <= 1e-8 * np.abs(V @ H.T).max()


def test_plain_hals_unchanged_by_sweep_machinery():
    # inner_sweeps=1 is plain HALS: the same as scikit-learn's cd on the transpose.
    from sklearn.decomposition import NMF as SkNMF

    V = lowrank_noisy()
    W0, H0 = custom_start(V.shape, 4)
    W, model = fit(V, 4, 30, W0, H0, solver="hals", inner_sweeps=1)
    sk = SkNMF(4, solver="cd", init="custom", max_iter=30, tol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        Ht = sk.fit_transform(V.T, W=H0.T.copy(), H=W0.T.copy())
    np.testing.assert_allclose(W, sk.components_.T, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(model.components_, Ht.T, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_kl_objective_with_constant_matches_reference(dtype):
    V = (lowrank_noisy() * (np.random.default_rng(2).random((150, 80)) < 0.7)).astype(dtype)
    for X in (V, sp.csr_matrix(V)):
        W, model = fit(X, 4, 5, beta_loss="kullback-leibler", chunks=37)
        WH = (W @ model.components_).astype(np.float64)
        V64 = V.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            ref = np.sum(np.where(V64 > 0, V64 * np.log(V64 / WH), 0) - V64 + WH)
        rel = 1e-9 if dtype == np.float64 else 1e-4
        assert model.history_[-1]["objective"] == pytest.approx(ref, rel=rel)


@pytest.mark.parametrize("solver,beta_loss", [("mu", "frobenius"), ("mu", "kullback-leibler"), ("hals", "frobenius"), ("bpp", "frobenius")])
@pytest.mark.parametrize("sparse", [False, True])
def test_local_path_equals_graph_path(solver, beta_loss, sparse):
    V = lowrank_noisy(n=203)
    X = sp.csr_matrix(np.where(V > 0.8, V, 0)) if sparse else V
    kw = dict(solver=solver, beta_loss=beta_loss, chunks=19, init="nndsvda", random_state=0, max_iter=12, tol=0, tol_x=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        graph = dnmf.NMF(5, local=False, **kw)
        W_graph = graph.fit_transform(X)
        local = dnmf.NMF(5, local=True, **kw)
        W_local = local.fit_transform(X)
    np.testing.assert_array_equal(W_local, W_graph)
    np.testing.assert_array_equal(local.components_, graph.components_)
    assert objectives(local).tolist() == objectives(graph).tolist()


def test_tree_fold_matches_tree_order():
    values = [np.float64(1e16), 1.0, -1e16, 1.0] * 5
    # the tree groups by 8: ((v0..v7), (v8..v15), (v16..v19))
    expected = sum([sum(values[0:8]), sum(values[8:16]), sum(values[16:20])])
    assert tree_fold(values, lambda a, b: a + b) == expected


def test_blocks_a_multiple_of_parallelism():
    rows = auto_row_block(20000, 5000, 4, parallelism=2)
    assert (-(-20000 // rows)) % 2 == 0
    rows = auto_row_block(20000, 5000, 4, parallelism=3)
    assert (-(-20000 // rows)) % 3 == 0


def test_default_compressors_roundtrip(tmp_path):
    import zarr

    data = np.random.default_rng(0).random((40, 30)).astype(np.float32)
    z = zarr.create_array(str(tmp_path / "a.zarr"), shape=data.shape, chunks=(10, 30), dtype="f4", compressors=default_compressors())
    z[:] = data
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "a.zarr"), mode="r")[:], data)
    codec = z.compressors[0]
    assert (codec.cname.value, codec.clevel) == ("lz4hc", 1)


def test_bad_inner_sweeps_is_one_clear_error():
    with pytest.raises(dnmf.DnmfError, match="inner_sweeps"):
        dnmf.NMF(3, solver="hals", inner_sweeps=0).fit(lowrank_noisy())
    with pytest.raises(dnmf.DnmfError, match="Frobenius"):
        dnmf.NMF(3, solver="bpp", beta_loss="kullback-leibler").fit(lowrank_noisy())


def test_solver_computes_kl_constant_when_not_given():
    from dnmf.kernels import Rule
    from dnmf.solvers.rows import Solver
    from dnmf.data.store import open_matrix, scan_matrix

    V = lowrank_noisy()
    matrix = open_matrix(V, chunks=50)
    stats = scan_matrix(matrix, with_xlogx=True)
    W0, H0 = custom_start(V.shape, 3)
    W0 = dnmf.data.store.da.from_array(W0, chunks=(50, 3))
    rule = Rule("mu", 1.0, 1e-10)
    given = Solver(matrix, rule, stats.v_sq, kl_offset=stats.v_xlogx - stats.v_sum).start(W0, H0)
    computed = Solver(matrix, rule, stats.v_sq).start(W0, H0)
    assert computed.objective == pytest.approx(given.objective, rel=1e-12)
    WH = W0.compute() @ H0
    assert given.objective == pytest.approx(np.sum(V * np.log(V / WH) - V + WH), rel=1e-9)


def test_blas_single_threaded_under_default_scheduler():
    # dask's default for arrays is the threaded scheduler, though get_scheduler() is None.
    from threadpoolctl import threadpool_info

    from dnmf.run.plan import blas_threads_for_scheduler

    with blas_threads_for_scheduler():
        blas = [info for info in threadpool_info() if info["user_api"] == "blas"]
        assert blas and all(info["num_threads"] == 1 for info in blas)


@pytest.mark.parametrize("solver", ["mu", "hals"])
def test_tiled_frobenius_step_equals_whole_block(monkeypatch, solver):
    from dnmf.kernels import step as kernels
    from dnmf.kernels import Rule

    rng = np.random.default_rng(5)
    V, W, H = rng.random((97, 30)), rng.random((97, 4)), rng.random((4, 30))
    rule = Rule(solver, 2.0, 1e-10)
    whole_W, whole = kernels.step_block(V, W, H, H @ H.T, rule)
    monkeypatch.setattr(kernels, "FUSED_TILE_ENTRIES", 300)  # tiles of 10 rows
    assert kernels._fuses_in_tiles(V, rule)
    tiled_W, tiled = kernels.step_block(V, W, H, H @ H.T, rule)
    np.testing.assert_allclose(tiled_W, whole_W, rtol=1e-13)
    np.testing.assert_allclose(tiled.numer, whole.numer, rtol=1e-12)
    np.testing.assert_allclose(tiled.denom, whole.denom, rtol=1e-12)
