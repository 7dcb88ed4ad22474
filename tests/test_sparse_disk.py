"""Sparse V on disk (AnnData's encoding in .h5ad and .zarr, dnmf's own sparse stores), read by
row blocks: the same fit, bit for bit, as the same CSR in memory on the same blocks."""

import os
import subprocess
import sys
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.sparse as sp

import dnmf
from dnmf.data import ondisk
from dnmf.data.results import load_result
from dnmf.data.store import SPARSE_BUDGET_FRACTION, open_matrix
from dnmf.errors import FormatError, ParameterError, StoreError

from conftest import tree_digest

anndata = pytest.importorskip("anndata")
pytest.importorskip("h5py")

ROOT = Path(__file__).resolve().parents[1]


def counts(n=240, p=70, density=0.12, seed=1, dtype=np.float32):
    X = sp.random(n, p, density=density, format="csr", dtype=dtype, random_state=seed)
    X.data = np.ceil(10 * X.data).astype(dtype)
    return X


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """One count matrix as X and as the layer "counts", in .h5ad, .zarr (format 2) and .zarr
    (format 3), with a CSC copy as the layer "by_cols"."""
    where = tmp_path_factory.mktemp("sparse")
    X = counts()
    adata = anndata.AnnData(X=X, layers={"counts": X.copy(), "by_cols": sp.csc_matrix(X)})
    adata.write_h5ad(where / "cells.h5ad")
    adata.write_zarr(where / "cells2.zarr")
    fmt = anndata.settings.zarr_write_format
    try:
        anndata.settings.zarr_write_format = 3
        adata.write_zarr(where / "cells3.zarr")
    finally:
        anndata.settings.zarr_write_format = fmt
    return X, where


SOLVERS = [
    dict(solver="mu"),
    dict(solver="mu", beta_loss="kullback-leibler"),
    dict(solver="mu", beta_loss=0.5),
    dict(solver="hals"),
    dict(solver="bpp"),
]


def fit(X, layer=None, **params):
    common = dict(n_components=4, random_state=0, max_iter=8, tol=0, chunks=50)
    model = dnmf.NMF(**{**common, **params})
    with pytest.warns(Warning):  # max_iter reached
        W = model.fit_transform(X, layer=layer)
    return model, np.asarray(W)


@pytest.mark.parametrize("params", SOLVERS, ids=lambda p: "-".join(map(str, p.values())))
def test_sparse_on_disk_equals_sparse_in_memory_bitwise(stores, params):
    X, where = stores
    ref, W_ref = fit(X, local=False, **params)
    for path, layer in [("cells.h5ad", None), ("cells2.zarr", "counts"), ("cells3.zarr", None)]:
        model, W = fit(str(where / path), layer, cache=False, **params)
        assert model.fit_info_["v_storage"] == "streamed" and model.fit_info_["v_sparse"]
        assert model.fit_info_["v_bytes"] == X.nnz * 8 + (X.shape[0] + 1) * 8  # CSR bytes, not dense
        assert np.array_equal(model.components_, ref.components_), path
        assert np.array_equal(W, W_ref), path
        assert model.reconstruction_err_ == ref.reconstruction_err_


def test_itakura_saito_on_disk_equals_in_memory(tmp_path):
    X = counts(100, 30, density=1.0)  # every entry stored: IS is undefined at zeros
    anndata.AnnData(X=X).write_h5ad(tmp_path / "full.h5ad")
    ref, W_ref = fit(X, local=False, beta_loss="itakura-saito")
    model, W = fit(str(tmp_path / "full.h5ad"), cache=False, beta_loss="itakura-saito")
    assert np.array_equal(model.components_, ref.components_) and np.array_equal(W, W_ref)


@pytest.mark.parametrize("params", [SOLVERS[1], SOLVERS[3]], ids=["kl", "hals"])
def test_grid_of_csr_tiles_on_disk_equals_in_memory(stores, params):
    X, where = stores
    ref, W_ref = fit(X, local=False, column_chunks=30, **params)
    model, W = fit(str(where / "cells3.zarr"), layer="counts", cache=False, column_chunks=30, **params)
    assert model.fit_info_["layout"] == "grid" and model.fit_info_["column_blocks"] == 3
    assert np.array_equal(model.components_, ref.components_) and np.array_equal(W, W_ref)


def test_anndata_objects_in_memory_and_backed(stores):
    X, where = stores
    ref, _ = fit(X, local=False)
    adata = anndata.read_h5ad(where / "cells.h5ad")
    backed = anndata.read_h5ad(where / "cells.h5ad", backed="r")
    for source, layer in [(adata, None), (adata, "counts"), (backed, "counts"), (backed, None)]:
        model, W = fit(source, layer, local=False)
        assert np.array_equal(model.components_, ref.components_)
    backed.file.close()


def test_blocks_sized_from_nonzeros_per_row(stores):
    X, where = stores
    budget = 16384  # a block budget: sparse blocks take SPARSE_BUDGET_FRACTION of it in CSR bytes
    on_disk = open_matrix(str(where / "cells.h5ad"), block_bytes=budget)
    in_memory = open_matrix(X, block_bytes=budget)
    dense_rows = int(budget * SPARSE_BUDGET_FRACTION) // (X.shape[1] * 4)
    assert on_disk.sparse and on_disk.row_chunks == in_memory.row_chunks
    assert max(on_disk.row_chunks) > 3 * dense_rows  # 12% non-zeros: far more rows than dense
    # A dask array of small CSR blocks is re-blocked the same way (its density sampled).
    lazy = da.from_array(X, chunks=(10, X.shape[1]), asarray=False, meta=X[:0])
    assert open_matrix(lazy, block_bytes=budget).row_chunks == in_memory.row_chunks


def test_each_task_reads_only_its_rows(stores, monkeypatch):
    X, where = stores
    matrix = ondisk.open_h5ad(str(where / "cells.h5ad"))
    reads = []
    original = ondisk.read_csr_rows

    def spy(data, indices, indptr, start, stop, n_cols):
        block = original(data, indices, indptr, start, stop, n_cols)
        reads.append((start, stop, block.nnz))
        return block

    monkeypatch.setattr(ondisk, "read_csr_rows", spy)
    opened = open_matrix(matrix, chunks=60)
    with dask.config.set(scheduler="sync"):
        blocks = [b.compute() for b in opened.data.blocks]
    assert sorted(reads) == [(a, a + 60, X[a : a + 60].nnz) for a in range(0, 240, 60)]
    assert all((b != X[i * 60 : (i + 1) * 60]).nnz == 0 for i, b in enumerate(blocks))


def test_csc_layer_is_refused_with_what_to_do(stores):
    _, where = stores
    with pytest.raises(StoreError, match="by columns.*dnmf convert"):
        dnmf.NMF(3).fit(str(where / "cells.h5ad"), layer="by_cols")


def test_bad_inputs_give_one_clear_error(stores, tmp_path):
    X, where = stores
    with pytest.raises(FormatError, match="no layer 'nope'; its layers are"):
        dnmf.NMF(3).fit(str(where / "cells2.zarr"), layer="nope")
    with pytest.raises(ParameterError, match="layer='counts' picks a matrix of an AnnData input"):
        dnmf.NMF(3).fit(X, layer="counts")
    (tmp_path / "empty.zarr").mkdir()
    import zarr

    zarr.open_group(tmp_path / "plain.zarr", mode="w").create_group("something")
    with pytest.raises(FormatError, match="neither a sparse matrix"):
        dnmf.NMF(3).fit(str(tmp_path / "plain.zarr"))
    (tmp_path / "bad.h5ad").write_text("not hdf5")
    with pytest.raises(StoreError, match="not a readable HDF5"):
        dnmf.NMF(3).fit(str(tmp_path / "bad.h5ad"))


def test_cli_fit_h5ad_layer_and_info(stores, tmp_path):
    X, where = stores
    before = tree_digest(where / "cells.h5ad")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "dnmf", *map(str, args)], capture_output=True, text=True,
                              env=env, timeout=120)

    out = run("fit", where / "cells.h5ad", "--layer", "counts", "--out", tmp_path / "result.zarr", "--rank", "4",
              "--max-iter", "8", "--tol", "0", "--seed", "0", "--chunks", "50", "--scheduler", "threads", "-q")
    assert out.returncode == 0, out.stderr
    assert "Converting" not in out.stderr  # read directly, no temporary dense copy
    ref, _ = fit(X, local=False)
    assert np.array_equal(load_result(tmp_path / "result.zarr").H, ref.components_)
    info = run("info", where / "cells3.zarr", "--layer", "counts")
    assert info.returncode == 0, info.stderr
    assert "sparse_on_disk  yes (CSR)" in info.stdout and "density" in info.stdout
    assert tree_digest(where / "cells.h5ad") == before


# ---------------------------------------------------------------------------
# The result as a new AnnData beside the input


def test_result_as_a_new_anndata_beside_the_input(stores, tmp_path):
    X, where = stores
    inputs = {name: tree_digest(where / name) for name in ("cells.h5ad", "cells3.zarr")}
    model, W = fit(str(where / "cells.h5ad"), layer="counts")
    for like in ("cells.h5ad", "cells3.zarr"):
        out = tmp_path / f"nmf-{like.split('.')[0]}.{'h5ad' if like.endswith('h5ad') else 'zarr'}"
        dnmf.save_anndata(out, model, W, like=str(where / like))
        back = anndata.read_h5ad(out) if str(out).endswith(".h5ad") else anndata.read_zarr(out)
        assert back.shape == X.shape and back.X is None
        assert np.array_equal(back.obsm["X_nmf"], W)
        assert np.array_equal(back.varm["NMF_components"], model.components_.T)
        source = anndata.read_h5ad(where / "cells.h5ad", backed="r")
        assert list(back.obs_names) == list(source.obs_names) and list(back.var_names) == list(source.var_names)
        source.file.close()
    # An in-memory AnnData gives its obs / var; a dask W is written block by block.
    adata = anndata.read_h5ad(where / "cells.h5ad")
    adata.obs["group"] = "a"
    dnmf.save_anndata(tmp_path / "mem.h5ad", model, da.from_array(W, chunks=(50, 4)), like=adata)
    back = anndata.read_h5ad(tmp_path / "mem.h5ad")
    assert list(back.obs["group"]) == ["a"] * X.shape[0] and np.array_equal(back.obsm["X_nmf"], W)
    assert {name: tree_digest(where / name) for name in inputs} == inputs


def test_anndata_output_never_replaces_the_input_or_a_foreign_file(stores, tmp_path):
    X, where = stores
    model, W = fit(X, local=False)
    before = tree_digest(where / "cells.h5ad")
    with pytest.raises(StoreError, match="is the input"):
        dnmf.save_anndata(where / "cells.h5ad", model, W, like=str(where / "cells.h5ad"), overwrite=True)
    foreign = tmp_path / "mine.h5ad"
    anndata.AnnData(X=X).write_h5ad(foreign)
    mine = tree_digest(foreign)
    with pytest.raises(StoreError, match="already exists"):
        dnmf.save_anndata(foreign, model, W)
    with pytest.raises(StoreError, match="not something dnmf wrote"):
        dnmf.save_anndata(foreign, model, W, overwrite=True)
    assert tree_digest(foreign) == mine and tree_digest(where / "cells.h5ad") == before
    dnmf.save_anndata(tmp_path / "ours.h5ad", model, W)
    dnmf.save_anndata(tmp_path / "ours.h5ad", model, 2 * W, overwrite=True)  # dnmf's own: replaced
    assert np.array_equal(anndata.read_h5ad(tmp_path / "ours.h5ad").obsm["X_nmf"], 2 * W)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_fit_csc_layer_converted_once_and_anndata_out(stores, tmp_path):
    X, where = stores
    from click.testing import CliRunner

    from dnmf.cli import main

    before = tree_digest(where / "cells.h5ad")
    args = ["fit", str(where / "cells.h5ad"), "--layer", "by_cols", "--out", str(tmp_path / "r.zarr"),
            "--anndata-out", str(tmp_path / "cells.nmf.h5ad"), "--rank", "4", "--max-iter", "8", "--tol", "0",
            "--seed", "0", "--chunks", "50", "--scheduler", "threads", "-q"]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    ref, W_ref = fit(X, local=False)
    back = anndata.read_h5ad(tmp_path / "cells.nmf.h5ad")
    assert np.array_equal(back.varm["NMF_components"], ref.components_.T)
    assert np.array_equal(back.obsm["X_nmf"], W_ref)
    assert tree_digest(where / "cells.h5ad") == before


# ---------------------------------------------------------------------------
# Checkpoints, transform, dense AnnData


def test_checkpoint_and_resume_of_a_layer_read_from_disk(stores, tmp_path):
    X, where = stores
    path = str(where / "cells3.zarr")
    full, W_full = fit(path, "counts", max_iter=8, cache=False)
    with pytest.warns(Warning):
        dnmf.NMF(4, random_state=0, max_iter=4, tol=0, chunks=50, cache=False,
                 checkpoint=str(tmp_path / "ckpt")).fit(path, layer="counts")
    with pytest.warns(Warning):
        resumed = dnmf.checkpoint.resume(str(tmp_path / "ckpt"), max_iter=8)  # the recorded path and layer
    assert resumed.n_iter_ == 8 and np.array_equal(resumed.components_, full.components_)


def test_transform_reads_new_rows_from_disk(stores):
    X, where = stores
    model, _ = fit(X, local=False)
    W_mem = model.transform(X)
    W_disk = model.transform(str(where / "cells.h5ad"), layer="counts")
    assert np.array_equal(np.asarray(W_disk), W_mem)


def test_dense_anndata_x_on_disk(tmp_path):
    V = counts(90, 20, density=0.5).toarray()
    anndata.AnnData(X=V).write_h5ad(tmp_path / "dense.h5ad")
    anndata.AnnData(X=V).write_zarr(tmp_path / "dense.zarr")
    ref, W_ref = fit(V, local=False, chunks=30)
    for name in ("dense.h5ad", "dense.zarr"):
        model, W = fit(str(tmp_path / name), chunks=30, cache=False)
        assert not open_matrix(str(tmp_path / name)).sparse and model.fit_info_["v_sparse"] is False
        assert np.array_equal(model.components_, ref.components_) and np.array_equal(W, W_ref)
    from dnmf.data.inspect import describe

    assert describe(tmp_path / "dense.h5ad")["sparse_on_disk"] == "no (dense array)"
    assert describe(tmp_path / "dense.zarr", scan=False)["sparse_on_disk"] == "no (dense array)"


def test_sparse_blocks_too_big_for_the_workers_are_refused_before_any_task(stores, monkeypatch):
    """Blocks are weighed by their CSR bytes (nnz known from the store), not skipped as before."""
    import dnmf.run.plan as plan

    _, where = stores
    monkeypatch.setattr(plan, "_tightest_worker", lambda client: (32 * 1024, 1))  # one 32 KiB worker
    monkeypatch.setattr(plan, "block_bytes_for_workers", lambda client: 4096)
    client = object()
    with pytest.raises(ParameterError, match="Row blocks of 240 rows take.*Pass chunks="):
        plan.check_blocks_fit_workers(open_matrix(str(where / "cells.h5ad"), chunks=240), client)
    plan.check_blocks_fit_workers(open_matrix(str(where / "cells.h5ad"), chunks=20), client)  # these fit


def test_restarts_masks_and_the_rank_survey_read_sparse_v_from_disk(stores):
    X, where = stores
    path = str(where / "cells.h5ad")
    common = dict(n_components=3, random_state=4, max_iter=5, tol=0, chunks=60, init="random")
    with pytest.warns(Warning):
        ref = dnmf.NMF(local=False, n_runs=2, **common).fit(X)
        runs = dnmf.NMF(n_runs=2, cache=False, **common).fit(path, layer="counts")
    assert runs.run_losses_ == ref.run_losses_ and np.array_equal(runs.components_, ref.components_)
    mask = np.random.default_rng(0).random(X.shape) > 0.1
    with pytest.warns(Warning):
        masked_ref = dnmf.NMF(local=False, **common).fit(X, mask=mask)
        masked = dnmf.NMF(cache=False, **common).fit(path, mask=mask)
    assert np.array_equal(masked.components_, masked_ref.components_)
    survey_args = dict(ranks="2,3", n_runs=2, max_iter=5, random_state=1, chunks=60)
    a, b = dnmf.rank_survey(X, **survey_args), dnmf.rank_survey(path, **survey_args)
    assert a.ranks == b.ranks == [1, 2, 3] and a.suggested_rank == b.suggested_rank
    assert np.array_equal(a.curve("heldout_error"), b.curve("heldout_error"))


def test_no_hdf5_handle_outlives_a_fit(tmp_path):
    """The user may rewrite the .h5ad right after a fit in the same process."""
    X = counts(60, 20)
    path = tmp_path / "c.h5ad"
    anndata.AnnData(X=X).write_h5ad(path)
    fit(str(path), cache=False, chunks=20)
    anndata.AnnData(X=2 * X).write_h5ad(path)  # HDF5 refuses this while the file is open here
    model, _ = fit(str(path), cache=False, chunks=20)
    ref, _ = fit(2 * X, local=False, chunks=20)
    assert np.array_equal(model.components_, ref.components_)


def test_indptr_slices_through_cached_chunks_equal_the_stores(tmp_path):
    """A row block's slice of indptr comes from the last decoded chunks (Zarr decodes whole
    chunks): the same values as the store's, across chunk ends, after evictions, and never a
    view a caller could write into the cache through."""
    import zarr

    values = np.cumsum(np.random.default_rng(0).integers(0, 9, 10_001)).astype(np.int64)
    array = zarr.create_array(store=str(tmp_path / "ptr.zarr"), data=values, chunks=(1000,))
    cached = ondisk.ChunkCached(array, keep=2)
    rng = np.random.default_rng(1)
    for _ in range(200):
        a = int(rng.integers(0, len(values)))
        b = int(rng.integers(a, min(len(values), a + 2500) + 1))
        got = cached[a:b]
        assert np.array_equal(got, values[a:b]) and got.dtype == values.dtype
        assert len(cached._chunks) <= 2
    got = cached[5:10]
    got[:] = -1
    assert np.array_equal(cached[5:10], values[5:10])
    assert np.array_equal(cached[:], values) and len(cached) == len(values)


def _direct_cases():
    """(label, zarr.create_array keywords) of the 1-D arrays read from their chunk files."""
    from numcodecs import Blosc
    from zarr.codecs import BloscCodec

    return [
        ("v3 blosc-lz4", dict(zarr_format=3, compressors=(BloscCodec(cname="lz4", clevel=5),))),
        ("v3 blosc-zstd, bit shuffle", dict(zarr_format=3, compressors=(BloscCodec(cname="zstd", shuffle="bitshuffle"),))),
        ("v3 raw", dict(zarr_format=3, compressors=None)),
        ("v2 blosc", dict(zarr_format=2, compressors=Blosc(cname="lz4"))),
        ("v2 raw", dict(zarr_format=2, compressors=None)),
    ]


@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.int64, np.float64])
@pytest.mark.parametrize("case", range(5))
def test_chunks_read_from_their_files_equal_zarrs_read(tmp_path, case, dtype):
    """Slices of a local array read straight from its chunk files are Zarr's bytes: across
    chunk ends, whole chunks, the short last chunk, empty slices, chunks never written (the
    fill value)."""
    import zarr

    label, kw = _direct_cases()[case]
    values = (np.random.default_rng(case).random(10_007) * 1000).astype(dtype)
    array = zarr.create_array(store=str(tmp_path / "a.zarr"), shape=values.shape, dtype=dtype, chunks=(1000,),
                              fill_value=7, **kw)
    array[:6000] = values[:6000]
    array[8000:] = values[8000:]  # chunks 6 and 7 never written
    want = array[:]
    direct = ondisk.direct_chunks(array)
    assert isinstance(direct, ondisk.DirectChunks), label
    assert len(direct) == len(values) and direct.dtype == want.dtype
    rng = np.random.default_rng(1)
    bounds = [(0, 10_007), (0, 1000), (1000, 3000), (999, 1001), (5, 5), (10_000, 10_007), (5500, 8500)]
    bounds += [tuple(sorted(rng.integers(0, 10_008, 2))) for _ in range(100)]
    for a, b in bounds:
        got = direct[a:b]
        assert got.dtype == want.dtype and got.tobytes() == want[a:b].tobytes(), (label, a, b)
    assert np.all(direct[6000:8000] == 7)
    assert direct[1234] == want[1234] and direct[-1] == want[-1] and direct[6500] == 7
    with pytest.raises(IndexError):
        direct[10_007]


def test_arrays_zarr_must_decode_are_read_through_zarr(tmp_path):
    """Codecs other than Blosc, sharding, big-endian values or a store that is not the local
    disk: no direct reader (Zarr reads them)."""
    import zarr
    from zarr.codecs import ZstdCodec

    values = np.arange(5000, dtype=np.float32)
    zstd = zarr.create_array(store=str(tmp_path / "z.zarr"), data=values, chunks=(1000,), compressors=(ZstdCodec(),))
    sharded = zarr.create_array(store=str(tmp_path / "s.zarr"), data=values, chunks=(1000,), shards=(2000,))
    big = zarr.create_array(store=str(tmp_path / "b.zarr"), data=values.astype(">f4"), chunks=(1000,), zarr_format=2,
                            compressors=None)
    memory = zarr.create_array(store=zarr.storage.MemoryStore(), data=values, chunks=(1000,))
    for array in (zstd, sharded, big, memory):
        assert ondisk.direct_chunks(array) is None


def test_a_damaged_raw_chunk_is_a_clear_error(tmp_path):
    import zarr

    array = zarr.create_array(store=str(tmp_path / "r.zarr"), data=np.arange(3000, dtype=np.int32), chunks=(1000,),
                              compressors=None)
    direct = ondisk.direct_chunks(array)
    chunk = tmp_path / "r.zarr" / "c" / "1"
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(StoreError, match="damaged"):
        direct[1500:2500]
