"""Fused replicates: fits sharing their passes over V equal, bit for bit, the fits run alone."""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest
import scipy.sparse as sp

from dnmf.errors import ParameterError
from dnmf.kernels.products import stacked_products_agree
from dnmf.run.fused import fit_fused
from dnmf.run.pipeline import fit
from dnmf.run.restarts import spawn_seeds
from dnmf.settings import FitSettings

CASES = [("mu", "frobenius"), ("mu", "kullback-leibler"), ("hals", "frobenius"), ("bpp", "frobenius")]


def data(sparse: bool):
    rng = np.random.default_rng(0)
    V = rng.random((160, 40)) @ np.diag(rng.uniform(0.5, 2, 40))
    V[V < 0.6] = 0
    return sp.csr_matrix(V) if sparse else V


def outcome(fact):
    hist = fact.result.history
    return (fact.W.compute(), fact.H, [(h.iteration, h.objective, h.w_change, h.h_change) for h in hist],
            fact.result.stop_reason)


def same(a, b) -> bool:
    return (a[0].dtype == b[0].dtype and a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
            and repr(a[2]) == repr(b[2]) and a[3] == b[3])  # repr: exact, and NaN (a skipped objective) matches


def assert_fused_equal_alone(V, base: FitSettings, summarize) -> None:
    """Three seeds of ``base`` fused: each bitwise the fit run alone, and one pass over V
    serving every fit in flight (far fewer passes than the fits made)."""
    runs = [replace(base, seed=s) for s in spawn_seeds(3, 4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = fit_fused(V, runs, summarize=summarize)
        alone = [summarize(fit(V, s)) for s in runs]
    for a, b in zip(fused.results, alone):
        assert same(a, b)
    longest = max(len(a[2]) for a in alone)
    assert fused.n_fit_passes >= sum(len(a[2]) for a in alone)
    assert fused.n_passes <= longest + 4 < fused.n_fit_passes


@pytest.mark.parametrize("local", [True, False], ids=["in-process", "graph"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("solver,beta_loss", CASES)
def test_fused_fits_equal_the_fits_run_alone_bitwise(solver, beta_loss, sparse, local):
    V = data(sparse)
    base = FitSettings.from_params(
        n_components=3, solver=solver, beta_loss=beta_loss, init="random", max_iter=40, tol=1e-3, tol_x=1e-2,
        chunks=50, local=local,
    )
    assert_fused_equal_alone(V, base, outcome)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("solver,beta_loss", [CASES[1], CASES[2]])
def test_fused_fits_summed_in_one_tree_of_two_levels_equal_the_fits_alone(solver, beta_loss, sparse):
    # 9 row blocks: the partials' tree has a node of 8 blocks, a node of the last block alone,
    # and a root; the fused graph sums every fit in one such tree.
    V = data(sparse)
    base = FitSettings.from_params(n_components=3, solver=solver, beta_loss=beta_loss, init="random", max_iter=6,
                                   tol=0, tol_x=0, chunks=18, local=False)
    assert_fused_equal_alone(V, base, outcome)


def test_stops_differ_and_a_single_block_is_fused_too():
    V = data(False)
    base = FitSettings.from_params(n_components=4, solver="mu", init="random", max_iter=200, tol=1e-4, tol_x=1e-3,
                                   chunks=160, local=False)
    runs = [replace(base, seed=s) for s in (1, 2, 3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = fit_fused(V, runs, summarize=outcome)
        alone = [outcome(fit(V, s)) for s in runs]
    assert len({len(a[2]) for a in alone}) > 1  # the fits stop at different iterations
    assert all(same(a, b) for a, b in zip(fused.results, alone))


def test_fused_fits_refuse_masks():
    V = data(False)
    base = FitSettings.from_params(n_components=2, init="random", max_iter=5, chunks=50)
    from dnmf.solvers.fused import FusedPasses

    passes = FusedPasses()
    with passes.member() as member, pytest.raises(ParameterError, match="one fit at a time"):
        fit(V, base, mask=np.ones(V.shape, bool), fused=member)
    with passes.member() as member, pytest.raises(ParameterError, match="one fit at a time"):
        fit(V, replace(base, column_chunks=20), mask=np.ones(V.shape, bool), fused=member)


def grid_outcome(fact):
    assert fact.info["layout"] == "grid" and fact.info["column_blocks"] == 3
    return outcome(fact)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("solver,beta_loss", CASES)
def test_fused_grid_fits_equal_the_fits_run_alone_bitwise(solver, beta_loss, sparse):
    V = data(sparse)  # 4 row blocks x 3 column blocks
    base = FitSettings.from_params(
        n_components=3, solver=solver, beta_loss=beta_loss, init="random", max_iter=25, tol=1e-3, tol_x=1e-2,
        chunks=50, column_chunks=15,
    )
    # A pass here is a start, or a step's two reads of V.
    assert_fused_equal_alone(V, base, grid_outcome)


def test_fused_grid_fits_starting_beside_others_steps_and_skipping_objectives_equal_the_fits_alone():
    # Two fits in flight of four: a fit's start runs with the other's step; KL skips the
    # divergence between evaluations, and a stop on such an iteration makes one more start.
    V = data(True)
    base = FitSettings.from_params(n_components=3, beta_loss="kullback-leibler", init="random", max_iter=30,
                                   tol=1e-3, tol_x=1e-2, chunks=40, column_chunks=15, objective_every=3)
    runs = [replace(base, seed=s) for s in (1, 2, 3, 4)]
    runs[1] = replace(runs[1], callbacks=[lambda record: record.iteration == 5])  # 5: not evaluated
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = fit_fused(V, runs, summarize=grid_outcome, max_concurrent=2)
        alone = [grid_outcome(fit(V, s)) for s in runs]
    assert len({len(a[2]) for a in alone}) > 1 and alone[1][3] == "callback"
    assert not np.isnan(alone[1][2][-1][1])  # the objective of the stop, by one more start
    assert all(same(a, b) for a, b in zip(fused.results, alone))
    assert fused.n_passes < fused.n_fit_passes


def test_run_grid_shares_each_chunk_read_between_the_graphs(monkeypatch):
    # The fused graph reads each chunk of V once per pass for all the fits: count the kernel's calls.
    from dnmf.kernels import fused as fused_kernels
    from dnmf.solvers import grid

    calls = []

    def counting(V_b, *args):
        calls.append(len(args[0]))
        return fused_kernels.fused_chunk(V_b, *args)

    monkeypatch.setattr(grid, "fused_chunk", counting)
    V = data(False)
    base = FitSettings.from_params(n_components=2, init="random", max_iter=4, tol=0, tol_x=0, chunks=40,
                                   column_chunks=15)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = fit_fused(V, [replace(base, seed=s) for s in (1, 2, 3)], summarize=grid_outcome)
    # A start (pass A) and 4 steps (passes B and A) over 4 x 3 chunks, each chunk task for 3 fits.
    assert fused.n_passes == 5 and fused.n_fit_passes == 15
    assert len(calls) == (1 + 2 * 4) * 12 and set(calls) == {3}


@pytest.mark.parametrize("column_chunks", [None, 15], ids=["rows", "grid"])
def test_fused_fits_on_a_local_cluster_with_rerooting_equal_the_fits_alone(column_chunks):
    from dnmf.cluster import connect

    V = data(False)
    base = FitSettings.from_params(n_components=3, init="random", max_iter=12, tol=0, tol_x=0, chunks=40, reroot_every=4,
                                   column_chunks=column_chunks)
    runs = [replace(base, seed=s) for s in (5, 6, 7)]
    with connect("local", n_workers=2, threads_per_worker=1, memory_limit="1GiB"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = outcome if column_chunks is None else grid_outcome
        fused = fit_fused(V, runs, summarize=summary)
        alone = [summary(fit(V, s)) for s in runs]
    # On a LocalCluster here, two runs of one single fit already differ in the last bits now and
    # then (as tests/test_pinned.py's distributed case does), so this checks closeness only; the
    # bitwise equality is checked under the threaded scheduler and in process above.
    for a, b in zip(fused.results, alone):
        np.testing.assert_allclose(a[0], b[0], rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(a[1], b[1], rtol=1e-8, atol=1e-12)
        assert [x[0] for x in a[2]] == [x[0] for x in b[2]]
    # The grid's re-rooting is a start (a pass over V) of its own.
    assert fused.n_passes <= (14 if column_chunks is None else 17) < fused.n_fit_passes


def test_a_fit_that_fails_leaves_the_others_running():
    V = data(False)
    base = FitSettings.from_params(n_components=3, init="random", max_iter=15, tol=0, tol_x=0, chunks=40, local=False)

    def stop_at_5(record):
        if record.iteration == 5:
            raise KeyError("boom")

    runs = [replace(base, seed=1), replace(base, seed=2, callbacks=[stop_at_5]), replace(base, seed=3)]
    finished = []
    with warnings.catch_warnings(), pytest.raises(KeyError, match="boom"):
        warnings.simplefilter("ignore")
        fit_fused(V, runs, summarize=lambda fact: finished.append(fact.result.n_iter))
    assert finished == [15, 15]  # the other fits ran to their end, without deadlock


def stacked_use(monkeypatch) -> list:
    """Record what :func:`stacked_products_agree` answers in the tiled steps."""
    from dnmf.kernels import step

    answers = []

    def recording(*args):
        answer = stacked_products_agree(*args)
        answers.append(answer)
        return answer

    monkeypatch.setattr(step, "stacked_products_agree", recording)
    return answers


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,ranks", [((97, 30), (4, 4, 4)), ((60, 41), (3, 3, 3, 3)), ((300, 400), (10,) * 6),
                                         ((53, 1000), (2, 5, 3)), ((40, 20), (1, 1))])
def test_tiled_steps_together_equal_each_step_alone_bitwise(monkeypatch, shape, ranks, dtype):
    from dnmf.kernels import step
    from dnmf.kernels.beta import Rule

    rng = np.random.default_rng(sum(shape))
    V = rng.random(shape).astype(dtype)
    Ws = [rng.random((shape[0], r)).astype(dtype) for r in ranks]
    Hs = [rng.random((r, shape[1])).astype(dtype) for r in ranks]
    rules = [Rule("mu", 2.0, 1e-10), Rule("hals", 2.0, 1e-10)] * len(ranks)
    exact = [k % 2 == 0 for k in range(len(ranks))]
    monkeypatch.setattr(step, "FUSED_TILE_ENTRIES", 7 * shape[1])  # tiles of 7 rows, and a shorter last one
    answers = stacked_use(monkeypatch)
    together = step.frobenius_steps(V, Ws, Hs, [H @ H.T for H in Hs], rules[: len(ranks)], exact)
    for W, H, rule, ex, (W_new, partials) in zip(Ws, Hs, rules, exact, together):
        alone_W, alone = step._frobenius_step_tiled(V, W, H, H @ H.T, rule, ex)
        assert W_new.tobytes() == alone_W.tobytes()
        assert partials.numer.tobytes() == alone.numer.tobytes() and partials.denom.tobytes() == alone.denom.tobytes()
        assert partials.loss == alone.loss
    assert len(answers) == -(-shape[0] // 7)


def test_stacked_products_agree_is_measured_and_true_where_it_says_so():
    rng = np.random.default_rng(3)
    for n, p, ranks in [(209, 500, (10,) * 5), (7, 40, (3, 3, 3, 3)), (50, 40, (2, 5, 3))]:
        vh, wv = stacked_products_agree(n, p, ranks, np.float32)
        assert (vh, wv) == stacked_products_agree(n, p, ranks, np.dtype("float32"))  # cached
        V = rng.random((n, p)).astype(np.float32)
        Hs = [rng.random((r, p)).astype(np.float32) for r in ranks]
        Ws = [rng.random((n, r)).astype(np.float32) for r in ranks]
        VHt, WtV, start = V @ np.concatenate(Hs).T, np.concatenate(Ws, axis=1).T @ V, 0
        for H, W in zip(Hs, Ws):
            stop = start + H.shape[0]
            if vh:
                assert np.array_equal(VHt[:, start:stop], V @ H.T)
            if wv:
                assert np.array_equal(WtV[start:stop], W.T @ V)
            start = stop


@pytest.mark.parametrize("local", [True, False], ids=["in-process", "graph"])
@pytest.mark.parametrize("solver", ["mu", "hals"])
def test_fused_tiled_steps_share_their_products_and_equal_the_fits_alone(monkeypatch, solver, local):
    from dnmf.kernels import step

    V = data(False)
    base = FitSettings.from_params(n_components=4, solver=solver, init="random", max_iter=25, tol=1e-4, tol_x=1e-3,
                                   chunks=50, local=local, inner_sweeps=1)
    runs = [replace(base, seed=s) for s in spawn_seeds(11, 3)]
    monkeypatch.setattr(step, "FUSED_TILE_ENTRIES", 7 * V.shape[1])  # blocks of 50 rows in tiles of 7
    answers = stacked_use(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = fit_fused(V, runs, summarize=outcome)
        alone = [outcome(fit(V, s)) for s in runs]
    assert all(same(a, b) for a, b in zip(fused.results, alone))
    if stacked_products_agree(7, V.shape[1], (4, 4, 4), V.dtype) == (True, True):  # OpenBLAS here: yes
        assert (True, True) in answers  # the tiles' products were stacked (else each fit's own were checked)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,ranks", [((50, 40), (3, 3, 3, 3)), ((300, 400), (10,) * 5), ((120, 64), (2, 5, 3))])
def test_whole_block_steps_together_equal_each_step_alone_bitwise(shape, ranks, dtype):
    from dnmf.kernels.beta import Rule
    from dnmf.kernels.step import frobenius_steps, step_block

    rng = np.random.default_rng(len(ranks))
    V = rng.random(shape).astype(dtype)
    Ws = [rng.random((shape[0], r)).astype(dtype) for r in ranks]
    Hs = [rng.random((r, shape[1])).astype(dtype) for r in ranks]
    rules = [Rule("mu", 2.0, 1e-10), Rule("hals", 2.0, 1e-10, w_sweeps=3), Rule("bpp", 2.0, 1e-10)]
    rules = [rules[k % 3] for k in range(len(ranks))]
    exact = [k % 2 == 0 for k in range(len(ranks))]
    together = frobenius_steps(V, Ws, Hs, [H @ H.T for H in Hs], rules, exact, tiled=False)
    for W, H, rule, ex, (W_new, partials) in zip(Ws, Hs, rules, exact, together):
        alone_W, alone = step_block(V, W, H, H @ H.T, rule, exact=ex)
        assert W_new.tobytes() == alone_W.tobytes()
        assert all(np.asarray(a).tobytes() == np.asarray(b).tobytes() for a, b in zip(partials[:3], alone[:3]))


GIB = 2**30
ATLAS = dict(n_fits=50, shape=(200000, 20000), n_components=10, itemsize=4)  # the case of issue 18


def worker_hold(width: int, limit: int, v_held: int, n_workers: int = 2, stacked_rows: int = 0, threads: int = 1,
                lineage_passes: int = 0, **case) -> float:
    """What :func:`fused_width` expects a worker to hold with ``width`` fits in flight."""
    from dnmf.graph import SPLIT_EVERY
    from dnmf.run import fused

    (n, p), r, itemsize = case["shape"], case["n_components"], case["itemsize"]
    per_fit = fused.WORKER_OVERHEAD * (2 * n * r * itemsize / n_workers + SPLIT_EVERY * r * p * itemsize)
    if stacked_rows:  # one running task's stacked temporaries per thread
        per_fit += threads * 2 * (stacked_rows + p) * r * itemsize
    per_fit += lineage_passes * (r * p + r * r) * itemsize  # the H's and HHᵀ's kept since W's last re-rooting
    base = fused.WORKER_BASE_BYTES + (fused.STACKED_BASE_BYTES if stacked_rows else 0)
    return base + v_held / n_workers + width * per_fit


def test_fused_width_fits_the_workers_memory_beside_v():
    from dnmf.run.fused import FUSED_MEMORY_BYTES, WORKER_FRACTION, fused_width

    # In this process: W twice per fit within the budget, whatever the workers.
    alone = fused_width(**ATLAS)
    assert alone == min(50, FUSED_MEMORY_BYTES // (2 * 200000 * 10 * 4)) == 50
    assert fused_width(**ATLAS, limits=[0, 0]) == alone  # no limits: nothing to fit
    # 2 workers x 2 GiB holding a 624 MiB CSR between them: fewer fits, the most that fit.
    v = 624 * 2**20
    width = fused_width(**ATLAS, limits=[2 * GIB] * 2, v_held=v)
    assert 1 < width < 50
    assert worker_hold(width, 2 * GIB, v, **ATLAS) <= WORKER_FRACTION * 2 * GIB < worker_hold(width + 1, 2 * GIB, v, **ATLAS)
    # The tightest worker decides; V held there and a higher rank leave fewer.
    assert fused_width(**ATLAS, limits=[2 * GIB, GIB], v_held=v) < width
    assert fused_width(**ATLAS, limits=[2 * GIB] * 2) > width
    assert fused_width(**{**ATLAS, "n_components": 15}, limits=[2 * GIB] * 2, v_held=v) < width
    # Workers too small for even one more: still one fit at a time (each fit plans its own blocks).
    assert fused_width(**ATLAS, limits=[256 * 2**20] * 2, v_held=v) == 1
    # A CSR V's products stacked: each fit's share of a running task's temporaries counts too,
    # per thread of a worker.
    stacked = fused_width(**ATLAS, limits=[2 * GIB] * 2, v_held=v, stacked_rows=20000)
    assert 1 < stacked < width
    assert (worker_hold(stacked, 2 * GIB, v, stacked_rows=20000, **ATLAS) <= WORKER_FRACTION * 2 * GIB
            < worker_hold(stacked + 1, 2 * GIB, v, stacked_rows=20000, **ATLAS))
    assert fused_width(**ATLAS, limits=[2 * GIB] * 2, v_held=v, stacked_rows=20000, threads=2) < stacked
    # The passes' H's the workers keep until W is re-rooted count too: 20 passes of 0.8 MB per
    # fit, at 27 fits in flight, took the workers of issue 18's case to 1.6 GiB of 2.
    kept = fused_width(**ATLAS, limits=[2 * GIB] * 2, v_held=v, stacked_rows=20000, lineage_passes=20)
    assert 1 < kept < fused_width(**ATLAS, limits=[2 * GIB] * 2, v_held=v, stacked_rows=20000, lineage_passes=4) < stacked
    assert (worker_hold(kept, 2 * GIB, v, stacked_rows=20000, lineage_passes=20, **ATLAS) <= WORKER_FRACTION * 2 * GIB
            < worker_hold(kept + 1, 2 * GIB, v, stacked_rows=20000, lineage_passes=20, **ATLAS))


def test_fused_passes_on_a_cluster_send_each_h_once_without_a_large_graph_warning():
    import dask

    from dnmf.cluster import connect

    rng = np.random.default_rng(4)
    V = rng.random((60, 2000))
    base = FitSettings.from_params(n_components=3, init="random", max_iter=3, tol=0, tol_x=0, chunks=30)
    runs = [replace(base, seed=s) for s in range(4)]  # 4 H's of 48 kB: 192 kB of a pass's graph
    small = {"distributed.admin.large-graph-warning-threshold": "100kB"}
    with connect("local", n_workers=2, threads_per_worker=1, memory_limit="1GiB"), dask.config.set(small), \
            warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fused = fit_fused(V, runs, summarize=outcome)
    assert fused.n_passes < fused.n_fit_passes
    assert not [w for w in seen if "large graph" in str(w.message)]


def test_fused_fits_on_a_cluster_are_planned_by_its_workers_memory(monkeypatch):
    from dnmf.cluster import connect
    from dnmf.run import fused

    V = data(False)
    base = FitSettings.from_params(n_components=3, init="random", max_iter=6, tol=0, tol_x=0, chunks=40)
    runs = [replace(base, seed=s) for s in (5, 6, 7)]
    asked = []
    width = fused.fused_width

    def spy(*args, **kw):
        asked.append(kw)
        return width(*args, **kw)

    monkeypatch.setattr(fused, "fused_width", spy)
    with connect("local", n_workers=2, threads_per_worker=1, memory_limit="1GiB"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        together = fit_fused(V, runs, summarize=outcome)
        # Planned again alike: not from what the workers reported holding during the last one.
        again = fit_fused(V, runs, summarize=outcome)
        # Fits that do not fit the workers together run two at a time: the third starts as one ends.
        monkeypatch.setattr(fused, "WORKER_OVERHEAD", 0.2 * GIB / (2 * 160 * 3 * 8 / 2 + 8 * 3 * 40 * 8))
        waves = fit_fused(V, runs, summarize=outcome)
    told = [kw for kw in asked if kw.get("limits")]
    assert len(told) == 3 and told[0] == told[1] and told[0]["limits"] == [GIB, GIB] and told[0]["v_held"] == V.nbytes
    assert again.n_passes == together.n_passes
    assert together.n_passes <= 6 + 2 and waves.n_passes >= 2 * 6
    for a, b in zip(together.results, waves.results):  # the same fits, however many in flight
        np.testing.assert_allclose(a[1], b[1], rtol=1e-8, atol=1e-12)


def test_fused_fits_on_a_cluster_let_go_of_their_starts_once_they_have_stepped():
    # A fused fit's start is persisted (its first pass is shared); its W stays on the workers
    # only until the first step has replaced it. Held to the end, it was a second W per fit:
    # 50 replicates held 400 MB of random starts on 2 workers (issue 18's case).
    import time

    from dask.utils import key_split

    from dnmf.cluster import connect

    seen = []

    def keys_on_workers(record):
        time.sleep(0.2)  # the scheduler frees released keys on the workers asynchronously
        held = client.run(lambda dask_worker: [key_split(k) for k in dask_worker.data.keys()])
        seen.append((record.iteration, {name for names in held.values() for name in names}))

    base = FitSettings.from_params(n_components=3, init="random", max_iter=4, tol=0, tol_x=0, chunks=30,
                                   callbacks=[keys_on_workers])
    with connect("local", n_workers=2, threads_per_worker=1, memory_limit="1GiB") as client, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit_fused(data(False), [replace(base, seed=s) for s in (1, 2)], summarize=outcome)
    assert sorted(it for it, _ in seen) == [1, 1, 2, 2, 3, 3, 4, 4]
    assert all("dnmf-fused" in names for _, names in seen)  # the iterates' W's are seen there
    assert not any("dnmf-init-random" in names for _, names in seen)  # the starts' (random_start's) are not


def csr_case(rng, n: int, p: int, density: float, dtype, index_dtype, duplicates: bool = False) -> sp.csr_matrix:
    """A CSR block with sorted indices, an empty row and (with ``duplicates``) repeated entries."""
    V = sp.random(n, p, density=density, format="coo", dtype=np.float64, random_state=rng)
    rows, cols, vals = V.row, V.col, rng.random(V.nnz) * 5
    rows, cols, vals = rows[rows != 1], cols[rows != 1], vals[rows != 1]  # row 1 empty
    if duplicates:
        rows, cols, vals = np.r_[rows, rows[::3]], np.r_[cols, cols[::3]], np.r_[vals, vals[::3] / 2]
    order = np.lexsort((cols, rows))  # by row, then column; a duplicate keeps its place after the first
    indptr = np.searchsorted(rows[order], np.arange(n + 1)).astype(index_dtype)
    return sp.csr_matrix((vals[order].astype(dtype), cols[order].astype(index_dtype), indptr), shape=(n, p))


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,ranks,density,width,rows", [
    ((60, 300), (3, 5, 2), 0.1, 7, 8), ((200, 40), (10,) * 6, 0.3, 1, 1),
    ((33, 1000), (4, 4), 0.02, None, None), ((5, 8), (1, 2), 0.5, 3, 2),
])
def test_stacked_sparse_products_give_each_fit_scipys_bits(shape, ranks, density, width, rows, dtype, index_dtype):
    from dnmf.kernels.products import _dot_ht, dot_t
    from dnmf.kernels.stacked import stacked_dot_ht, stacked_dot_t, stacks

    rng = np.random.default_rng(sum(shape) + len(ranks))
    for duplicates in (False, True):
        V = csr_case(rng, *shape, density, dtype, index_dtype, duplicates)
        assert V.has_sorted_indices and stacks(V, dtype)
        Hs = [rng.random((r, shape[1])).astype(dtype) for r in ranks]
        Ws = [rng.random((shape[0], r)).astype(dtype) for r in ranks]
        for got, H in zip(stacked_dot_ht(V, Hs, width, rows), Hs):
            alone = _dot_ht(V, H)
            assert got.tobytes() == alone.tobytes() and got.flags.c_contiguous == alone.flags.c_contiguous
        for got, W in zip(stacked_dot_t(Ws, V, width, rows), Ws):
            alone = dot_t(W, V)
            assert got.shape == alone.shape and got.tobytes(order="A") == alone.tobytes(order="A")
            assert got.flags.f_contiguous == alone.flags.f_contiguous


def test_stacked_sparse_products_refuse_blocks_they_would_sum_otherwise():
    from dnmf.kernels.stacked import stacks

    rng = np.random.default_rng(5)
    V = csr_case(rng, 30, 50, 0.2, np.float32, np.int32)
    assert stacks(V, np.float32)
    assert not stacks(V, np.float64)  # the factors' dtype differs from V's
    assert not stacks(V.tocsc(), np.float32) and not stacks(V.toarray(), np.float32)
    unsorted = V.copy()
    start, stop = unsorted.indptr[2], unsorted.indptr[3]
    unsorted.indices[start:stop] = unsorted.indices[start:stop][::-1].copy()
    unsorted.data[start:stop] = unsorted.data[start:stop][::-1].copy()
    unsorted.has_sorted_indices = False
    assert stop - start > 1 and not stacks(unsorted, np.float32)
    mixed = sp.csr_matrix((V.data, V.indices.astype(np.int64), V.indptr.astype(np.int32)), shape=V.shape)
    mixed.indices = V.indices.astype(np.int64)  # scipy unifies them at construction; force them apart
    assert not stacks(mixed, np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ranks,columns,groups", [((3, 3, 3, 3), 20, 1), ((10,) * 5, 20, 3), ((2, 5, 3), 8, 2)])
def test_sparse_steps_together_equal_each_step_alone_bitwise(monkeypatch, ranks, columns, groups, dtype):
    from dnmf.kernels import stacked
    from dnmf.kernels.beta import Rule
    from dnmf.kernels.step import sparse_frobenius_steps, step_block

    monkeypatch.setattr(stacked, "SLAB_BYTES", 64)  # slabs of 16 columns: many per block
    monkeypatch.setattr(stacked, "TILE_BYTES", 1000)  # tiles of a few rows
    # Groups of at most ``columns`` ranks: 3 + 3 + 3 + 3; 10 + 10, 10 + 10, 10; 2 + 5, 3.
    monkeypatch.setattr(stacked, "STACK_BYTES", columns * 2 * (120 + 300) * np.dtype(dtype).itemsize)
    stacked_calls = []
    product = stacked.stacked_dot_ht
    monkeypatch.setattr("dnmf.kernels.step.stacked_dot_ht",
                        lambda V, Hs: stacked_calls.append(len(Hs)) or product(V, Hs))
    rng = np.random.default_rng(len(ranks))
    V = csr_case(rng, 120, 300, 0.05, dtype, np.int32, duplicates=True)
    Ws = [rng.random((V.shape[0], r)).astype(dtype) for r in ranks]
    Hs = [rng.random((r, V.shape[1])).astype(dtype) for r in ranks]
    rules = [Rule("mu", 2.0, 1e-10), Rule("hals", 2.0, 1e-10, w_sweeps=3), Rule("bpp", 2.0, 1e-10)]
    rules = [rules[k % 3] for k in range(len(ranks))]
    exact = [k % 2 == 0 for k in range(len(ranks))]
    together = sparse_frobenius_steps(V, Ws, Hs, [H @ H.T for H in Hs], rules, exact)
    for W, H, rule, ex, (W_new, partials) in zip(Ws, Hs, rules, exact, together):
        alone_W, alone = step_block(V, W, H, H @ H.T, rule, exact=ex)
        assert W_new.tobytes() == alone_W.tobytes()
        assert partials.numer.tobytes(order="A") == alone.numer.tobytes(order="A")
        assert partials.numer.flags.f_contiguous == alone.numer.flags.f_contiguous
        assert partials.denom.tobytes() == alone.denom.tobytes() and partials.loss == alone.loss
    assert len(stacked_calls) == groups and sum(stacked_calls) == len(ranks)


@pytest.mark.parametrize("local", [True, False], ids=["in-process", "graph"])
@pytest.mark.parametrize("solver", ["mu", "hals", "bpp"])
def test_fused_sparse_float32_fits_take_stacked_products_and_equal_the_fits_alone(monkeypatch, solver, local):
    from dnmf.kernels import fused as fused_kernel
    from dnmf.kernels import stacked

    monkeypatch.setattr(stacked, "SLAB_BYTES", 256)  # several slabs over V's 40 columns
    monkeypatch.setattr(stacked, "TILE_BYTES", 512)  # and tiles of a few rows
    groups = []
    steps = fused_kernel.sparse_frobenius_steps
    monkeypatch.setattr(fused_kernel, "sparse_frobenius_steps",
                        lambda V, Ws, *a: groups.append(len(Ws)) or steps(V, Ws, *a))
    V = data(True).astype(np.float32)
    base = FitSettings.from_params(n_components=3, solver=solver, init="random", max_iter=30, tol=1e-4, tol_x=1e-3,
                                   chunks=50, local=local)
    assert_fused_equal_alone(V, base, outcome)
    assert groups and max(groups) == 4  # the four fits' steps shared each block's products


def test_fused_passes_in_process_run_as_many_blocks_at_once_as_cpus(monkeypatch):
    # A pass runs in one of the fits' threads, where dask's threaded scheduler would make a
    # pool of Python's default size (CPUs + 4): each thread holding a block and its products.
    import threading
    import time

    from dask.system import CPU_COUNT

    from dnmf.solvers import fused as fused_solver

    running, most, lock = [0], [0], threading.Lock()
    block = fused_solver.fused_block

    def counted(*args):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            time.sleep(0.02)  # long enough for every pool thread to pick up a block
            return block(*args)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(fused_solver, "fused_block", counted)
    V = data(True)
    base = FitSettings.from_params(n_components=3, solver="hals", init="random", max_iter=3, tol=0, tol_x=0,
                                   chunks=10, local=False)  # 16 blocks a pass on the threaded scheduler
    fit_fused(V, [replace(base, seed=s) for s in spawn_seeds(2, 3)], summarize=outcome)
    assert most[0] == min(CPU_COUNT, 16)
