"""The 2-D grid layout (dnmf.solvers.grid): V in chunks (i, j), W by row blocks, H by column blocks."""

from __future__ import annotations

import os
import warnings

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.sparse as sp
import zarr
from sklearn.exceptions import ConvergenceWarning

from conftest import worker_killer
from dnmf import NMF
from dnmf import checkpoint
from dnmf.run import checkpoint as checkpoint_writer
from dnmf.cluster import close_client
from dnmf.errors import InvalidMatrixError, ParameterError
from dnmf.solvers.grid import GridSolver
from dnmf.solvers.init import random_start
from dnmf.kernels import Rule
from dnmf.solvers.rows import Solver
from dnmf.data.store import MIN_BLOCK_ROWS, auto_column_chunk, open_matrix, scan_matrix

R = 6


def planted(n=240, p=900, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, R)) @ rng.random((R, p)) + 0.01 * rng.random((n, p))


def fit(X, rank=R, **params):
    settings = dict(init="random", random_state=0, max_iter=25, tol=0, tol_x=0, chunks=60)
    settings.update(params)
    model = NMF(rank, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        W = model.fit_transform(X)
    return model, (W.compute() if hasattr(W, "compute") else W)


def rel_diff(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


# ---------------------------------------------------------------------------
# The same iterates as the row layout


@pytest.mark.parametrize(
    "settings",
    [
        dict(solver="mu"),
        dict(solver="mu", beta_loss="kullback-leibler"),
        dict(solver="mu", beta_loss=0.5, init="nndsvda"),
        dict(solver="hals", inner_sweeps=1),
        dict(solver="hals", init="nndsvd", inner_sweeps=1),
        dict(solver="bpp"),
    ],
)
def test_grid_iterates_equal_the_row_layouts(settings):
    V = planted()
    rows, W_rows = fit(V, column_chunks=None, **settings)
    grid, W_grid = fit(V, column_chunks=200, **settings)
    assert rows.fit_info_["layout"] == "rows" and grid.fit_info_["layout"] == "grid"
    assert grid.fit_info_["column_blocks"] == 5 and grid.fit_info_["row_blocks"] == 4
    # Only the order of the sums differs.
    assert rel_diff(W_grid, W_rows) < 1e-10
    assert rel_diff(grid.components_, rows.components_) < 1e-10
    objectives = lambda m: np.array([r["objective"] for r in m.history_])  # noqa: E731
    # (The Gram identity's cancellation leaves ~1e-16 ‖V‖² of rounding in the Frobenius loss.)
    np.testing.assert_allclose(objectives(grid), objectives(rows), rtol=1e-10, atol=1e-10 * objectives(rows)[0])
    np.testing.assert_allclose(
        [r["h_change"] for r in grid.history_], [r["h_change"] for r in rows.history_], rtol=1e-8
    )


def test_accelerated_hals_on_a_grid_stops_sweeps_per_column_block_and_descends_as_well():
    V = planted()
    rows, _ = fit(V, solver="hals", column_chunks=None)
    grid, _ = fit(V, solver="hals", column_chunks=200)
    plain, _ = fit(V, solver="hals", column_chunks=200, inner_sweeps=1)
    # Another path (each column block stops its sweeps on its own), as fast as the row layout's.
    assert grid.reconstruction_err_ <= 1.1 * rows.reconstruction_err_
    assert grid.reconstruction_err_ < 0.2 * plain.reconstruction_err_
    objectives = [r["objective"] for r in grid.history_]
    assert np.all(np.diff(objectives) <= 0)


def test_sparse_kl_on_a_grid_equals_the_row_layout():
    S = sp.random(300, 2000, density=0.02, random_state=3, format="csr")
    rows, W_rows = fit(S, beta_loss="kullback-leibler", column_chunks=None)
    grid, W_grid = fit(S, beta_loss="kullback-leibler", column_chunks=450)
    assert grid.fit_info_["column_blocks"] == 5
    assert rel_diff(W_grid, W_rows) < 1e-10 and rel_diff(grid.components_, rows.components_) < 1e-10


@pytest.mark.parametrize("solver,beta", [("mu", 2.0), ("mu", 1.0), ("hals", 2.0), ("bpp", 2.0)])
def test_grid_descends_monotonically(solver, beta):
    V = planted(seed=4)
    matrix = open_matrix(V, 50, column_chunks=300)
    stats = scan_matrix(matrix, with_xlogx=True)
    start = random_start(matrix, stats, R, seed=1)
    solver_ = GridSolver(matrix, Rule(solver, beta, 1e-10), stats.v_sq, kl_offset=stats.v_xlogx - stats.v_sum)
    state = solver_.start(start.W, start.H)
    objectives = [state.objective]
    for _ in range(20):
        state = solver_.step(state).state
        objectives.append(state.objective)
    assert np.all(np.diff(objectives) <= 1e-12 * objectives[0]), objectives
    assert objectives[-1] < 0.5 * objectives[0]
    # W and H stay distributed: W in V's row blocks, H in V's column blocks.
    assert isinstance(state.H, da.Array) and state.H.chunks == ((R,), matrix.col_chunks)
    assert state.W.chunks == (matrix.row_chunks, (R,))


def test_grid_and_row_solvers_agree_step_by_step():
    V = planted(seed=5)
    rows, grid = open_matrix(V, 80), open_matrix(V, 80, column_chunks=(100, 300, 500))
    stats = scan_matrix(rows)
    start = random_start(rows, stats, R, seed=2)
    rule = Rule("mu", 2.0, 1e-10)
    a, b = Solver(rows, rule, stats.v_sq), GridSolver(grid, rule, stats.v_sq)
    sa, sb = a.start(start.W, start.H), b.start(start.W, start.H)
    for _ in range(5):
        step_a, step_b = a.step(sa), b.step(sb)
        sa, sb = step_a.state, step_b.state
        assert sb.objective == pytest.approx(sa.objective, rel=1e-12)
        assert step_b.w_change == pytest.approx(step_a.w_change, rel=1e-9)
        assert step_b.h_change == pytest.approx(step_a.h_change, rel=1e-9)


def test_planted_parts_of_a_wide_matrix_are_recovered_on_an_automatic_grid():
    # 64 x 300000 float32: 256 rows would take 293 MiB, so "auto" lays V out as a grid.
    n, p, parts = 64, 300_000, 4
    rng = np.random.default_rng(11)
    H_true = np.zeros((parts, p), dtype=np.float32)
    width = p // parts
    for k in range(parts):  # disjoint supports: identifiable parts
        H_true[k, k * width : (k + 1) * width] = rng.random(width) + 0.5
    W_true = rng.random((n, parts)).astype(np.float32)
    W_true[:parts] = np.eye(parts)  # a pure row per part: the parts are identifiable
    V = W_true @ H_true
    model, _ = fit(V, parts, solver="hals", init="nndsvda", max_iter=30, chunks=None)
    assert model.fit_info_["layout"] == "grid" and model.fit_info_["column_blocks"] > 1
    H = model.components_ / np.linalg.norm(model.components_, axis=1, keepdims=True)
    T = H_true / np.linalg.norm(H_true, axis=1, keepdims=True)
    cosines = (H @ T.T).max(axis=0)
    assert cosines.min() > 0.99, cosines
    assert model.reconstruction_err_ / model.data_norm_ < 0.01


# ---------------------------------------------------------------------------
# Layout choices and errors


def test_auto_column_chunk_keeps_row_blocks_unless_the_matrix_is_too_wide():
    assert auto_column_chunk(10**6, 5000, 4) == 5000  # 256 rows x 5000 = 5 MiB: row blocks
    cols = auto_column_chunk(10**6, 10**6, 4)  # 256 rows of 4 MB each is 1 GB: a grid
    assert cols < 10**6 and 32 * 2**20 <= cols * 4096 * 4 <= 64 * 2**20
    assert auto_column_chunk(100, 10**7, 4) * 100 * 4 <= 64 * 2**20  # few rows: narrow chunks
    assert MIN_BLOCK_ROWS == 256


def test_a_zarr_grid_is_aligned_with_the_store_chunks(tmp_path):
    V = planted()
    path = str(tmp_path / "V.zarr")
    zarr.create_array(store=path, data=V, chunks=(40, 150))
    matrix = open_matrix(path, column_chunks="auto", block_bytes=40 * 8 * 400)
    assert matrix.is_grid
    assert all(c % 150 == 0 for c in matrix.col_chunks[:-1])
    assert all(c % 40 == 0 for c in matrix.row_chunks[:-1])
    model, W = fit(path, column_chunks=300)
    ref, W_ref = fit(V, column_chunks=300)
    assert np.array_equal(W, W_ref) and np.array_equal(model.components_, ref.components_)


def test_bad_entries_are_reported_at_their_place_in_the_grid():
    V = planted()
    V[130, 777] = -1.0
    V[200, 5] = -2.0
    with pytest.raises(InvalidMatrixError, match=r"2 negative entries \(first at row, column \(130, 777\)\)"):
        fit(V, column_chunks=200)


def test_missing_entries_need_row_blocks():
    V = planted()
    mask = np.ones(V.shape, dtype=bool)
    mask[0, 0] = False
    # "auto" falls back to row blocks with a mask ...
    model, _ = fit(V, max_iter=2, column_chunks="auto")
    assert model.fit_info_["layout"] == "rows"
    # ... an explicit grid is refused.
    with pytest.raises(ParameterError, match="row blocks"):
        NMF(R, column_chunks=200, max_iter=2).fit(V, mask=mask)
    with pytest.raises(ParameterError, match="column_chunks"):
        NMF(R, column_chunks=2.5, max_iter=2).fit(V)


def test_transform_on_a_grid():
    V = planted()
    grid, _ = fit(V, column_chunks=200)
    rows, _ = fit(V, column_chunks=None)
    W_grid, W_rows = grid.transform(V[:90]), rows.transform(V[:90])
    assert rel_diff(W_grid, W_rows) < 1e-9


# ---------------------------------------------------------------------------
# Checkpoints, clusters, lost workers


def test_grid_resume_is_bitwise_equal(tmp_path):
    V = planted()
    ref, W_ref = fit(V, column_chunks=200, max_iter=20)
    ck = str(tmp_path / "ck")
    fit(V, column_chunks=200, max_iter=8, checkpoint=ck, checkpoint_every=4)
    snapshot = checkpoint.load(ck)
    assert snapshot.record["fingerprint"]["col_chunks"] == [200] * 4 + [100]
    # H was written by column blocks (by the workers), each with its checksum.
    assert isinstance(snapshot.H, da.Array) and len(snapshot.record["checksums"]["H"]) == 5
    resumed = checkpoint.resume(ck, V, max_iter=20)
    assert resumed.fit_info_["layout"] == "grid"
    assert np.array_equal(checkpoint.load(ck).W.compute(), W_ref)
    assert np.array_equal(resumed.components_, ref.components_)
    assert [r["objective"] for r in resumed.history_] == [r["objective"] for r in ref.history_]
    # A resume with a different column layout is refused with the reason.
    with pytest.raises(Exception, match="column chunks"):
        NMF(R, init="random", random_state=0, max_iter=20, tol=0, tol_x=0, chunks=60, column_chunks=300).fit(
            V, resume=ck
        )


def test_a_damaged_h_block_of_a_grid_checkpoint_falls_back_to_the_previous_version(tmp_path):
    V = planted()
    ck = tmp_path / "ck"
    fit(V, column_chunks=200, max_iter=8, checkpoint=str(ck), checkpoint_every=4)
    newest = checkpoint_writer.read_pointer(str(ck))["version"]
    h = zarr.open_array(str(ck / newest / "H"), mode="r+")
    h[0, 450] = h[0, 450] + 1.0  # one entry of column block 2
    with pytest.warns(UserWarning, match=r"H block\(s\) \[2\] fail"):
        snapshot = checkpoint.load(str(ck))
    assert snapshot.version != newest and snapshot.record["stop_reason"] is None  # the version before the end


def local_cluster(n_workers: int):
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=n_workers, threads_per_worker=1, memory_limit="1GiB", host="127.0.0.1",
        dashboard_address=None, processes=True,
    )
    return Client(cluster)


@pytest.mark.slow
def test_grid_on_a_cluster_is_bitwise_threaded_with_bounded_lineage_and_survives_a_lost_worker(tmp_path):
    V = planted(600, 1200)
    path = str(tmp_path / "V.zarr")
    zarr.create_array(store=path, data=V, chunks=(100, 300))
    params = dict(column_chunks=300, chunks=100, max_iter=12, cache=False)
    with dask.config.set(scheduler="threads"):
        ref, W_ref = fit(path, **params)
    client = local_cluster(3)
    try:
        with client.as_current():
            tasks = []
            count = lambda record: tasks.append(  # noqa: E731
                client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))
            )
            model, W = fit(path, reroot_every=3, spill_dir=str(tmp_path / "spill"), callbacks=[count], **params)
            assert np.array_equal(W, W_ref) and np.array_equal(model.components_, ref.components_)
            assert [r["objective"] for r in model.history_] == [r["objective"] for r in ref.history_]
            assert model.fit_info_["n_reroots"] == 4
            assert sorted(os.listdir(tmp_path / "spill")) == ["H-000002.zarr", "H-000003.zarr", "W-000002.zarr", "W-000003.zarr"]
            # Lineage bounded by re-rooting: the count cycles with it (e.g. 186, 269, 392) instead of
            # growing by ~100 tasks per iteration; transient tasks move a sample by ~20.
            assert max(tasks[6:]) <= 1.1 * max(tasks[:6]), tasks

            killed = []

            kill_one = worker_killer(client, 5, killed)

            survived, W_survived = fit(path, reroot_every=4, callbacks=[kill_one], **params)
        assert killed and survived.n_iter_ == 12
        assert np.array_equal(W_survived, W_ref) and np.array_equal(survived.components_, ref.components_)
    finally:
        close_client(client, True)


@pytest.mark.parametrize("column_chunks", [None, 500])
@pytest.mark.parametrize("init", ["nndsvd", "nndsvda", "nndsvdar"])
def test_nndsvd_of_a_matrix_whose_rank_is_below_the_factorization_rank(init, column_chunks):
    # Rank 4 data factored with r = 6: the randomized SVD finds only 4 directions.
    rng = np.random.default_rng(2)
    V = rng.random((64, 4)) @ rng.random((4, 3000))
    model, W = fit(V, init=init, column_chunks=column_chunks, chunks=None, solver="hals", max_iter=20)
    assert W.shape == (64, R) and model.components_.shape == (R, 3000)
    assert model.reconstruction_err_ / model.data_norm_ < 0.05


def test_restarts_run_on_the_grid_when_asked():
    V = planted()
    model = NMF(R, init="random", random_state=0, max_iter=10, tol=0, tol_x=0, chunks=60, column_chunks=200, n_runs=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(V)
    assert model.fit_info_["layout"] == "grid" and len(model.run_losses_) == 3
    assert model.run_losses_[model.best_run_] == min(model.run_losses_)
