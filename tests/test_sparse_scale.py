"""A sparse V whose dense form is 50x the workers' memory, factored out of core (issue 15)."""

from __future__ import annotations

import os
import warnings

import dask
import numpy as np
import pytest
import scipy.sparse as sp

from dnmf import NMF
from dnmf.cluster import close_client, get_client
from dnmf.run.plan import V_STREAMED

anndata = pytest.importorskip("anndata")
pytest.importorskip("h5py")

MiB = 2**20


def sparse_counts(n: int, p: int, nnz: int, seed: int = 0, dtype=np.float64) -> sp.csr_matrix:
    """Counts 1..5 at about ``nnz`` random positions, cheap to make at any size (~20 s at 1.8·10⁸)."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.integers(0, n, nnz))
    indptr = np.searchsorted(rows, np.arange(n + 1)).astype(np.int64)
    del rows
    cols = rng.integers(0, p, nnz, dtype=np.int32)
    X = sp.csr_matrix((np.ceil(rng.random(nnz, dtype=dtype) * 5), cols, indptr), shape=(n, p))
    X.sum_duplicates()
    return X


def fit_on_small_workers(path, limit: int, solvers: dict, settings: dict) -> dict:
    """Rank-5 streamed fits of the store at ``path``, one per ``solvers`` entry, on 2 workers
    of ``limit`` bytes: none restarted or paused, each worker's peak under 80% of its limit."""
    fits = {}
    client, owned = get_client("local", n_workers=2, memory_limit=f"{limit // MiB}MiB")
    try:
        pids = client.run(os.getpid)
        with client.as_current(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, params in solvers.items():
                fits[name] = NMF(5, cache=False, **settings, **params).fit(str(path))
        peaks = client.run(lambda dask_worker: max(dask_worker.monitor.quantities["memory"]))
        logs = client.get_worker_logs()
        assert client.run(os.getpid) == pids  # no worker restarted
    finally:
        close_client(client, True)
    messages = " ".join(message for worker_logs in logs.values() for _, message in worker_logs)
    assert "Restarting worker" not in messages and "Pausing worker" not in messages
    assert max(peaks.values()) < 0.8 * limit, peaks
    print("peak worker memory (MiB):", {k: round(v / MiB) for k, v in peaks.items()})
    return fits


@pytest.mark.slow
def test_a_sparse_v_fifty_times_the_workers_memory_streams_on_two_small_workers(tmp_path):
    n, p, nnz = 1_000_000, 7_000, 6_000_000  # dense: 56 GB of float64; CSR: ~80 MB
    # 2 workers: 1 GiB in all, as the issue asks. Each worker spends ~125 MiB on numba (its
    # import and LLVM) for the compiled KL kernels; 400 MiB workers paused on that.
    limit = 512 * MiB
    assert n * p * 8 >= 50 * 2 * limit
    X = sparse_counts(n, p, nnz)
    path = tmp_path / "cells.h5ad"
    anndata.AnnData(X=X).write_h5ad(path)
    rows = 125_000  # 8 blocks of ~6 MiB of CSR
    settings = dict(init="random", random_state=0, max_iter=4, tol=0, tol_x=0, chunks=rows)
    fits = fit_on_small_workers(path, limit, {"mu-kl": dict(beta_loss="kullback-leibler"), "hals": dict(solver="hals")}, settings)
    # The same fits from the CSR in memory on the same blocks, on dask's threaded scheduler.
    with dask.config.set(scheduler="threads"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, params in {"mu-kl": dict(beta_loss="kullback-leibler"), "hals": dict(solver="hals")}.items():
            model = fits[name]
            assert model.fit_info_["v_storage"] == V_STREAMED and model.n_iter_ == 4
            assert model.fit_info_["row_blocks"] == n // rows
            ref = NMF(5, local=False, **settings, **params).fit(X)
            assert np.array_equal(model.components_, ref.components_), name


@pytest.mark.slow
def test_a_csr_larger_than_all_the_workers_memory_streams_at_the_issues_size(tmp_path):
    """The issue's size, 2·10⁶ cells × 3·10⁴ genes at 0.3% non-zeros: 240 GB dense, and 1.44 GB
    as CSR, more than the 2 × 512 MiB workers hold together, so V can only be streamed. MU-KL,
    HALS and MU on blocks dnmf sizes for the workers; the same H as the in-memory CSR on those
    blocks. (MU-KL's workers carry ~125 MiB of numba and LLVM for the compiled KL kernels; they
    peaked at ~380 MiB here, HALS's and MU's at ~330.)"""
    n, p, nnz = 2_000_000, 30_000, 180_000_000
    limit = 512 * MiB
    X = sparse_counts(n, p, nnz, dtype=np.float32)
    assert n * p * 4 >= 200 * 2 * limit and X.data.nbytes + X.indices.nbytes > 2 * limit
    path = tmp_path / "cells.h5ad"
    anndata.AnnData(X=X).write_h5ad(path)
    settings = dict(init="random", random_state=0, max_iter=3, tol=0, tol_x=0)
    solvers = {"mu-kl": dict(beta_loss="kullback-leibler"), "hals": dict(solver="hals"), "mu": dict(solver="mu")}
    fits = fit_on_small_workers(path, limit, solvers, settings)
    with dask.config.set(scheduler="threads"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, params in solvers.items():
            model = fits[name]
            info = model.fit_info_
            assert info["v_storage"] == V_STREAMED and model.n_iter_ == 3
            # Blocks sized from the non-zeros per row: a few MiB of CSR, where a dense block of
            # as many rows would be hundreds of MiB.
            csr_bytes = info["max_block_rows"] * (nnz / n) * 8
            assert csr_bytes < 32 * MiB and info["max_block_rows"] * p * 4 > 256 * MiB, info
            ref = NMF(5, local=False, chunks=info["max_block_rows"], **settings, **params).fit(X)
            assert np.array_equal(model.components_, ref.components_), name
