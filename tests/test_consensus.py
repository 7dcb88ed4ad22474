"""Consensus NMF: planted programs recovered where single runs disagree, the density filter,
resume after a kill mid-rank, the command line."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

import dnmf
from dnmf.cli import main
from dnmf.errors import CheckpointMismatchError, DnmfError, ParameterError
from dnmf.rank import cluster_components, local_density, suggest_k
from dnmf.rank.clustering import unit_rows

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from consensus_child import RANKS, SETTINGS  # noqa: E402


def planted(k=6, n=200, p=96, noise=0.1, seed=2, rare=0.08):
    """k programs (column blocks, each overlapping half the next one), mixed by gamma weights;
    the last two programs are used by a ``rare`` fraction of rows only, so random starts often
    miss one (a local minimum that splits a common program instead)."""
    rng = np.random.default_rng(seed)
    H = np.zeros((k, p))
    width = p // k
    for i in range(k):
        H[i, i * width : (i + 1) * width] = rng.uniform(0.5, 1.5, width)
        nxt = ((i + 1) % k) * width
        H[i, nxt : nxt + width // 2] = rng.uniform(0, 0.8, width // 2)
    W = rng.gamma(0.5, 1, (n, k))
    W[:, -2:] *= rng.random((n, 2)) < rare
    return W @ H + rng.uniform(0, noise, (n, p)), H


def best_cosines(truth: np.ndarray, found: np.ndarray) -> np.ndarray:
    """For each true program, the cosine of the closest found one."""
    return (unit_rows(truth) @ unit_rows(found).T).max(axis=1)


def same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    V, H = planted()
    work = tmp_path_factory.mktemp("cons") / "work"
    result = dnmf.consensus(V, [6], n_replicates=12, max_iter=200, tol=1e-4, random_state=0, chunks=200, workdir=work)
    return V, H, work, result


# ---------------------------------------------------------------------------
# Recovery and the filter


def test_consensus_recovers_every_program_where_single_runs_disagree(planted_run):
    V, H, work, result = planted_run
    replicates = [np.load(work / "replicates" / "K6" / f"{i:05d}.npz")["H"] for i in range(12)]
    per_run = np.array([best_cosines(H, Hr).min() for Hr in replicates])
    assert (per_run < 0.95).sum() >= 2, per_run  # several runs miss a program
    assert (per_run >= 0.95).sum() >= 2, per_run
    rank = result[6]
    assert best_cosines(H, rank.H).min() >= 0.95
    assert rank.H.shape == (6, 96) and rank.W.shape == (200, 6) and isinstance(rank.W, np.ndarray)
    np.testing.assert_allclose(np.linalg.norm(rank.H, axis=1), 1, rtol=1e-5)
    # W refitted against the consensus: the fit is as good as the best replicates'.
    assert rank.error == pytest.approx(np.linalg.norm(V - rank.W @ rank.H) / np.linalg.norm(V), rel=1e-3)
    assert rank.error < 0.05
    assert rank.labels.shape == (72,) and set(np.unique(rank.labels[rank.labels >= 0])) == set(range(6))
    assert 0.75 <= rank.stability <= 1
    passes = result.settings["passes_over_v"]  # the replicates were fused: they shared their passes
    assert 0 < passes["made"] * 4 < passes["asked_by_replicates"]


def test_the_filter_removes_injected_bad_replicates(planted_run):
    _, H, work, _ = planted_run
    good = np.vstack([np.load(work / "replicates" / "K6" / f"{i:05d}.npz")["H"] for i in range(12)])
    rng = np.random.default_rng(7)
    bad = rng.random((2 * 6, H.shape[1]))  # two replicates that never left their random start
    components = np.vstack([good[:30], bad, good[30:]])
    injected = np.zeros(len(components), bool)
    injected[30 : 30 + len(bad)] = True
    clustering = cluster_components(components, 6, n_replicates=14, density_threshold=0.3, seed=0)
    assert np.all(clustering.labels[injected] == -1)
    assert (clustering.labels[~injected] >= 0).mean() >= 0.9  # the replicates' components are mostly kept
    assert best_cosines(H, clustering.programs).min() >= 0.95
    # Without the filter the bad components are clustered with the good ones.
    unfiltered = cluster_components(components, 6, n_replicates=14, density_threshold=2.0, seed=0)
    assert unfiltered.n_outliers == 0 and unfiltered.stability < clustering.stability


def test_local_density_by_blocks_equals_the_full_distance_matrix():
    X = unit_rows(np.random.default_rng(0).random((50, 8)))
    full = np.sqrt(np.maximum(((X[:, None, :] - X[None, :, :]) ** 2).sum(-1), 0))
    np.fill_diagonal(full, np.inf)
    expected = np.sort(full, axis=1)[:, :5].mean(axis=1)
    for block in (1, 7, 50, None):
        np.testing.assert_allclose(local_density(X, 5, block_rows=block), expected, atol=1e-7)


def test_suggest_k_takes_the_largest_stable_rank_that_still_gains():
    from types import SimpleNamespace as R

    results = [R(rank=k, stability=s, error=e) for k, s, e in
               [(4, 0.94, 0.354), (5, 0.97, 0.241), (6, 0.99, 0.0425), (7, 0.93, 0.0405), (8, 0.70, 0.0404)]]
    k, reason = suggest_k(results, 0.02)
    assert k == 6 and "stable" in reason and "less than 2%" in reason
    k, reason = suggest_k([R(rank=3, stability=0.4, error=0.5), R(rank=4, stability=0.6, error=0.4)], 0.02)
    assert k == 4 and "No rank is" in reason


def test_bad_parameters_raise_one_dnmf_error():
    V, _ = planted()
    with pytest.raises(ParameterError, match="n_replicates"):
        dnmf.consensus(V, [3], n_replicates=1)
    with pytest.raises(ParameterError, match="neighbor_fraction"):
        dnmf.consensus(V, [3], n_replicates=4, neighbor_fraction=0)
    with pytest.raises(DnmfError, match="ranks"):
        dnmf.consensus(V, "a:b", n_replicates=4)
    with pytest.raises(ParameterError, match="density filter"):
        cluster_components(np.random.default_rng(0).random((12, 5)), 3, 4, density_threshold=1e-9)


# ---------------------------------------------------------------------------
# Resume


def test_resume_after_a_kill_mid_rank_gives_the_same_consensus_bitwise(tmp_path):
    V, _ = planted()
    np.save(tmp_path / "V.npy", V)
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "consensus_child.py"), str(tmp_path / "V.npy"), str(killed)],
                            env=env, stderr=subprocess.PIPE)
    last = killed / "replicates" / f"K{RANKS[-1]}"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if last.exists() and len([p for p in last.iterdir() if p.suffix == ".npz"]) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert proc.returncode == -9, proc.stderr.read().decode()
    assert (killed / f"K{RANKS[0]}.zarr").exists() and not (killed / f"K{RANKS[-1]}.zarr").exists()
    before = {p: p.stat().st_mtime_ns for p in last.glob("*.npz")}
    first_rank = (killed / f"K{RANKS[0]}.zarr" / "zarr.json").stat().st_mtime_ns
    assert 3 <= len(before) < SETTINGS["n_replicates"]

    resumed = dnmf.consensus(V, RANKS, workdir=killed, **SETTINGS)
    # Completed ranks and replicates were read, not recomputed.
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    assert (killed / f"K{RANKS[0]}.zarr" / "zarr.json").stat().st_mtime_ns == first_rank
    reference = dnmf.consensus(V, RANKS, workdir=whole, **SETTINGS)
    for k in RANKS:
        a, b = resumed[k], reference[k]
        assert same_bits(a.H, b.H) and same_bits(np.asarray(a.W), np.asarray(b.W))
        assert same_bits(a.labels, b.labels) and same_bits(a.density, b.density)
        assert a.stability == b.stability and a.error == b.error
    assert resumed.suggested_rank == reference.suggested_rank
    # A different replicate setting is refused; a different filter redoes only the consensus step.
    with pytest.raises(CheckpointMismatchError, match="max_iter"):
        dnmf.consensus(V, RANKS, workdir=killed, **{**SETTINGS, "max_iter": 50})
    refiltered = dnmf.consensus(V, RANKS, workdir=killed, **SETTINGS, density_threshold=0.05)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    assert refiltered[RANKS[-1]].n_outliers >= resumed[RANKS[-1]].n_outliers


# ---------------------------------------------------------------------------
# The command line


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted([path] if path.is_file() else path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path.parent)).encode() + p.read_bytes())
    return h.hexdigest()


def test_cli_consensus_end_to_end(tmp_path):
    V, _ = planted()
    np.save(tmp_path / "V.npy", V.astype(np.float32))
    before = digest(tmp_path / "V.npy")
    out = tmp_path / "cons"
    args = ["consensus", str(tmp_path / "V.npy"), "--ranks", "5:6", "--replicates", "8", "--max-iter", "200",
            "--tol", "1e-4", "--chunks", "200", "--out", str(out), "--scheduler", "threads", "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert digest(tmp_path / "V.npy") == before
    summary = json.loads((out / "consensus.json").read_text())
    assert [r["rank"] for r in summary["results"]] == [5, 6]
    assert summary["suggested_rank"] in (5, 6) and summary["reason"]
    for name in ("k_plot.png", "density.png", "K5.zarr", "K6.zarr", "programs_K6.tsv"):
        assert (out / name).exists(), name
    table = np.loadtxt(out / "programs_K6.tsv", delimiter="\t", skiprows=1)
    assert table.shape == (96, 7)
    assert "Suggested K" in result.output
    # Run again: everything is read back, nothing is refitted, the same table comes out.
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and again.output == result.output
    # --out may not hold the input, and a folder of someone else's files is refused.
    bad = CliRunner().invoke(main, [*args[:-5], "--out", str(tmp_path), "--scheduler", "threads", "-q"])
    assert bad.exit_code == 1 and "input" in bad.output
    other = tmp_path / "other"
    other.mkdir()
    (other / "consensus.json").write_text("{}")
    refused = CliRunner().invoke(main, [*args[:-5], "--out", str(other), "--scheduler", "threads", "-q"])
    assert refused.exit_code == 1 and "not a dnmf consensus folder" in refused.output
    assert (other / "consensus.json").read_text() == "{}"
    assert digest(tmp_path / "V.npy") == before


def test_consensus_of_a_sparse_matrix_with_kl():
    V, H = planted(k=4, seed=3, rare=0.5)
    V[V < 0.3] = 0
    result = dnmf.consensus(sp.csr_matrix(V), [4], n_replicates=6, beta_loss="kullback-leibler", max_iter=150,
                            tol=1e-4, random_state=1, chunks=50)
    rank = result[4]
    assert best_cosines(H, rank.H).min() >= 0.95
    assert rank.W.shape == (200, 4) and np.isfinite(rank.error) and result.settings["solver"] == "mu"


# ---------------------------------------------------------------------------
# AnnData in and out: a layer read, a new K{K}.h5ad written beside the other results

ANNDATA_SETTINGS = dict(n_replicates=4, max_iter=100, tol=1e-4, random_state=0, chunks=100)


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    """300 cells x 60 genes of 3 planted programs: "counts" (and an identical "raw") as layers,
    X a different matrix; written as .h5ad and AnnData .zarr; and the in-memory run."""
    anndata = pytest.importorskip("anndata")
    rng = np.random.default_rng(4)
    H = np.zeros((3, 60))
    for i in range(3):
        H[i, i * 20 : (i + 1) * 20] = rng.uniform(0.5, 1.5, 20)
    counts = sp.csr_matrix(rng.poisson(3 * rng.gamma(1, 1, (300, 3)) @ H).astype(np.float32))
    adata = anndata.AnnData(X=sp.csr_matrix(np.ones((300, 60), np.float32)), layers={"counts": counts, "raw": counts.copy()})
    adata.obs_names = [f"cell{i}" for i in range(300)]
    adata.var_names = [f"gene{j}" for j in range(60)]
    adata.obs["batch"] = ["a", "b"] * 150
    where = tmp_path_factory.mktemp("cells")
    adata.write_h5ad(where / "cells.h5ad")
    adata.write_zarr(where / "cells.zarr")
    inputs = {name: digest(where / name) for name in ("cells.h5ad", "cells.zarr")}
    memory = anndata.read_h5ad(where / "cells.h5ad")
    result = dnmf.consensus(memory, [3], layer="counts", workdir=where / "mem", **ANNDATA_SETTINGS)
    return where, inputs, memory, result


def test_consensus_of_an_anndata_layer_writes_a_new_anndata_per_rank(cells):
    import anndata

    where, inputs, memory, result = cells
    rank = result[3]
    back = anndata.read_h5ad(where / "mem" / "K3.h5ad")
    assert back.X is None and back.shape == (300, 60)
    assert same_bits(back.obsm["X_nmf"], np.asarray(rank.W)) and same_bits(back.varm["NMF_components"], rank.H.T)
    assert list(back.obs_names) == list(memory.obs_names) and list(back.var_names) == list(memory.var_names)
    assert list(back.obs["batch"]) == ["a", "b"] * 150
    uns = back.uns["dnmf"]
    assert uns["rank"] == 3 and uns["stability"] == rank.stability and uns["error"] == rank.error
    assert uns["n_outliers"] == rank.n_outliers and list(uns["seeds"]) == list(rank.seeds)
    assert json.loads(uns["settings"])["layer"] == "counts" and uns["written_by"] == "dnmf"
    assert rank.stability > 0.9  # the 3 planted programs
    # The TSV rows are the gene names; the input files are untouched.
    table = (where / "mem" / "programs_K3.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in table[1:]] == list(memory.var_names)
    assert {name: digest(where / name) for name in inputs} == inputs
    assert [p.name for p in (where / "mem").iterdir() if p.name.startswith(".")] == []


def test_consensus_of_h5ad_and_zarr_paths_equals_the_anndata_in_memory_bitwise(cells):
    import anndata

    where, inputs, memory, result = cells
    for name in inputs:
        work = where / f"from-{name.replace('.', '-')}"
        from_path = dnmf.consensus(str(where / name), [3], layer="counts", workdir=work, **ANNDATA_SETTINGS)
        assert same_bits(from_path[3].H, result[3].H), name
        back = anndata.read_h5ad(work / "K3.h5ad")
        assert same_bits(back.varm["NMF_components"], result[3].H.T), name
        assert same_bits(back.obsm["X_nmf"], np.asarray(from_path[3].W)), name  # W streamed from K3.zarr
        assert list(back.obs_names) == list(memory.obs_names) and list(back.var_names) == list(memory.var_names)
        assert (work / "programs_K3.tsv").read_text() == (where / "mem" / "programs_K3.tsv").read_text()
    assert {name: digest(where / name) for name in inputs} == inputs


def test_consensus_resume_writes_a_missing_anndata_and_refuses_another_layer(cells, tmp_path):
    where, inputs, memory, result = cells
    work = tmp_path / "work"
    dnmf.consensus(memory, [3], layer="counts", workdir=work, **ANNDATA_SETTINGS)
    h5ad, tsv, group = work / "K3.h5ad", work / "programs_K3.tsv", work / "K3.zarr" / "zarr.json"
    first, stamp = digest(h5ad), group.stat().st_mtime_ns
    # Killed between the rank's Zarr group and its TSV / AnnData: a resume writes them, the rank is not redone.
    h5ad.unlink()
    tsv.unlink()
    dnmf.consensus(memory, [3], layer="counts", workdir=work, **ANNDATA_SETTINGS)
    assert digest(h5ad) == first and group.stat().st_mtime_ns == stamp
    assert tsv.read_text() == (where / "mem" / "programs_K3.tsv").read_text()
    # A complete rank is not written again.
    before = h5ad.stat().st_mtime_ns
    dnmf.consensus(memory, [3], layer="counts", workdir=work, **ANNDATA_SETTINGS)
    assert h5ad.stat().st_mtime_ns == before
    # Another layer (here the same numbers) is refused, saying which.
    with pytest.raises(CheckpointMismatchError, match="layer 'counts' there, 'raw' now"):
        dnmf.consensus(memory, [3], layer="raw", workdir=work, **ANNDATA_SETTINGS)
    with pytest.raises(CheckpointMismatchError, match="layer"):
        dnmf.consensus(str(where / "cells.h5ad"), [3], workdir=work, **ANNDATA_SETTINGS)
    assert digest(h5ad) == first
    # A changed filter redoes the consensus step, and its AnnData with it.
    refiltered = dnmf.consensus(memory, [3], layer="counts", workdir=work, **ANNDATA_SETTINGS, density_threshold=0.2)
    import anndata

    back = anndata.read_h5ad(h5ad)
    assert back.uns["dnmf"]["density_threshold"] == 0.2 and same_bits(back.varm["NMF_components"], refiltered[3].H.T)


def test_cli_consensus_of_an_h5ad_layer(cells, tmp_path):
    import anndata

    where, inputs, memory, result = cells
    out = tmp_path / "cons"
    args = ["consensus", str(where / "cells.h5ad"), "--layer", "counts", "--ranks", "3", "--replicates", "4",
            "--max-iter", "100", "--tol", "1e-4", "--seed", "0", "--chunks", "100", "--out", str(out),
            "--scheduler", "threads"]
    ran = CliRunner().invoke(main, args)
    assert ran.exit_code == 0, ran.output
    assert "K*.h5ad" in ran.output
    back = anndata.read_h5ad(out / "K3.h5ad")
    assert same_bits(back.varm["NMF_components"], result[3].H.T)
    assert list(back.obs_names) == list(memory.obs_names) and list(back.var_names) == list(memory.var_names)
    assert (out / "programs_K3.tsv").read_text() == (where / "mem" / "programs_K3.tsv").read_text()
    refused = CliRunner().invoke(main, [*args[:2], "--layer", "raw", *args[4:]])
    assert refused.exit_code == 1 and "layer 'counts' there, 'raw' now" in refused.output
    assert {name: digest(where / name) for name in inputs} == inputs
