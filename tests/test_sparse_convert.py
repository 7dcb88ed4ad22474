"""dnmf convert keeps sparse inputs sparse: Matrix Market streamed and gathered by rows out of
core (exactly scipy.io.mmread), .npz, .h5ad CSR and CSC, 10x .h5; --dense / --sparse."""

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp
import zarr
from click.testing import CliRunner

import dnmf
from dnmf.cli import main
from dnmf.data import convert as conv
from dnmf.data.store import open_matrix
from dnmf.errors import FormatError

h5py = pytest.importorskip("h5py")


def digest(path) -> str:
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for p in files:
        h.update(p.read_bytes())
    return h.hexdigest()


def stored_csr(path) -> sp.csr_matrix:
    group = zarr.open_group(str(path), mode="r")
    assert group.attrs["encoding-type"] == "csr_matrix" and "dnmf" in group.attrs
    return sp.csr_matrix((group["data"][...], group["indices"][...], group["indptr"][...]), shape=tuple(group.attrs["shape"]))


def assert_same_csr(a: sp.csr_matrix, b: sp.csr_matrix) -> None:
    b = b.tocsr()
    b.sum_duplicates()
    assert a.shape == b.shape and a.dtype == b.dtype
    assert np.array_equal(a.indptr, b.indptr) and np.array_equal(a.indices, b.indices)
    assert np.array_equal(a.data, b.data)  # bit for bit


@pytest.fixture
def small_bands(monkeypatch):
    """Row bands of a few rows, so the out-of-core gathering really runs band by band."""
    monkeypatch.setattr(conv, "BAND_ENTRIES", 64)
    monkeypatch.setattr(conv, "MTX_LINES", 50)


def column_ordered_mtx(path, X: sp.spmatrix, field="real", symmetry="general"):
    """A Matrix Market file written column by column (as 10x writes them), not by rows."""
    C = sp.coo_matrix(X)
    order = np.lexsort((C.row, C.col))
    rows, cols, vals = C.row[order], C.col[order], C.data[order]
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt") as f:
        f.write(f"%%MatrixMarket matrix coordinate {field} {symmetry}\n% a comment\n")
        f.write(f"{X.shape[0]} {X.shape[1]} {len(rows)}\n")
        for r, c, v in zip(rows, cols, vals):
            value = "" if field == "pattern" else (f" {int(v)}" if field == "integer" else f" {float(v)!r}")
            f.write(f"{r + 1} {c + 1}{value}\n")


@pytest.mark.parametrize("name,field", [("V.mtx", "real"), ("V.mtx.gz", "real"), ("I.mtx", "integer"),
                                        ("P.mtx", "pattern")])
def test_mtx_streamed_by_rows_out_of_core_equals_mmread(tmp_path, small_bands, name, field):
    rng = np.random.default_rng(2)
    X = sp.random(157, 41, density=0.08, random_state=rng, format="csr")
    X.data = np.round(X.data * 1000) if field == "integer" else rng.random(X.nnz) * 10 ** rng.uniform(-8, 8, X.nnz)
    column_ordered_mtx(tmp_path / name, X, field)
    before = digest(tmp_path / name)
    info = conv.convert(tmp_path / name, tmp_path / "V.zarr", chunks=10)
    assert info["sparse"] and info["nnz"] == X.nnz and "out of core" in info["note"]
    assert_same_csr(stored_csr(tmp_path / "V.zarr"), scipy.io.mmread(str(tmp_path / name)))
    assert digest(tmp_path / name) == before
    # scipy's own writer (by rows), read back the same way.
    scipy.io.mmwrite(tmp_path / "S.mtx", X, precision=17)
    conv.convert(tmp_path / "S.mtx", tmp_path / "S.zarr")
    assert_same_csr(stored_csr(tmp_path / "S.zarr"), scipy.io.mmread(str(tmp_path / "S.mtx")))


def test_mtx_symmetric_is_mirrored(tmp_path, small_bands):
    A = sp.random(30, 30, density=0.2, random_state=4, format="csr")
    S = sp.tril(A + A.T).tocsr()
    column_ordered_mtx(tmp_path / "S.mtx", S, symmetry="symmetric")
    conv.convert(tmp_path / "S.mtx", tmp_path / "S.zarr")
    assert_same_csr(stored_csr(tmp_path / "S.zarr"), scipy.io.mmread(str(tmp_path / "S.mtx")))


def test_bad_mtx_is_one_clear_error(tmp_path):
    (tmp_path / "bad.mtx").write_text("%%MatrixMarket matrix coordinate real general\n3 3 2\n1 1 1.0\n4 1 2.0\n")
    with pytest.raises(FormatError, match="outside its 3 x 3 size"):
        conv.convert(tmp_path / "bad.mtx", tmp_path / "bad.zarr")
    (tmp_path / "c.mtx").write_text("%%MatrixMarket matrix coordinate complex general\n1 1 1\n1 1 1 0\n")
    with pytest.raises(FormatError, match="complex general matrix"):
        conv.convert(tmp_path / "c.mtx", tmp_path / "c.zarr")
    assert not (tmp_path / "bad.zarr").exists() and not (tmp_path / "c.zarr").exists()


@pytest.mark.parametrize("encoding", ["csr", "csc"])
def test_h5ad_csr_and_csc_stay_sparse_and_fit_the_same(tmp_path, small_bands, encoding):
    anndata = pytest.importorskip("anndata")
    X = sp.random(120, 35, density=0.1, random_state=5, format="csr", dtype=np.float32)
    stored = X if encoding == "csr" else sp.csc_matrix(X)
    anndata.AnnData(X=X, layers={"counts": stored}).write_h5ad(tmp_path / "cells.h5ad")
    before = digest(tmp_path / "cells.h5ad")
    conv.convert(tmp_path / "cells.h5ad", tmp_path / "C.zarr", dataset="layers/counts")
    assert_same_csr(stored_csr(tmp_path / "C.zarr"), X)
    # An AnnData .zarr's CSC layer converts the same way (out of core, by column blocks).
    anndata.AnnData(X=X, layers={"counts": stored}).write_zarr(tmp_path / "cells.zarr")
    conv.convert(tmp_path / "cells.zarr", tmp_path / "Z.zarr", dataset="layers/counts")
    assert_same_csr(stored_csr(tmp_path / "Z.zarr"), X)
    common = dict(n_components=3, random_state=0, max_iter=5, tol=0, chunks=30, beta_loss="kullback-leibler")
    ref = dnmf.NMF(local=False, **common).fit(X)
    for path in ("C.zarr", "Z.zarr"):
        assert np.array_equal(dnmf.NMF(**common).fit(str(tmp_path / path)).components_, ref.components_)
    assert digest(tmp_path / "cells.h5ad") == before


def test_npz_and_10x_h5_stay_sparse_dense_on_request(tmp_path):
    X = sp.random(60, 25, density=0.1, random_state=6, format="csr")
    sp.save_npz(tmp_path / "X.npz", X)
    conv.convert(tmp_path / "X.npz", tmp_path / "S.zarr", chunks=7)
    assert_same_csr(stored_csr(tmp_path / "S.zarr"), X)
    info = conv.convert(tmp_path / "X.npz", tmp_path / "D.zarr", dense=True)
    assert not info["sparse"] and np.array_equal(zarr.open_array(str(tmp_path / "D.zarr"))[...], X.toarray())
    np.save(tmp_path / "X.npy", X.toarray())
    conv.convert(tmp_path / "X.npy", tmp_path / "N.zarr", dense=False)
    assert_same_csr(stored_csr(tmp_path / "N.zarr"), X)
    # 10x Genomics: genes x cells by columns = cells x genes by rows.
    with h5py.File(tmp_path / "tenx.h5", "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = X.data.astype(np.int32), X.indices, X.indptr
        g["shape"] = np.array([X.shape[1], X.shape[0]])
        g["barcodes"] = np.array([b"c%d" % i for i in range(X.shape[0])])
    conv.convert(tmp_path / "tenx.h5", tmp_path / "T.zarr")
    assert_same_csr(stored_csr(tmp_path / "T.zarr"), sp.csr_matrix(X.astype(np.int32)))


def test_cli_convert_dense_and_sparse_flags_and_info(tmp_path):
    X = sp.random(40, 12, density=0.2, random_state=7, format="csr")
    sp.save_npz(tmp_path / "X.npz", X)
    runner = CliRunner()
    out = runner.invoke(main, ["convert", str(tmp_path / "X.npz"), str(tmp_path / "S.zarr"), "-q"])
    assert out.exit_code == 0, out.output
    assert f"sparse, {X.nnz} entries" in out.output
    out = runner.invoke(main, ["convert", str(tmp_path / "X.npz"), str(tmp_path / "D.zarr"), "--dense", "-q"])
    assert out.exit_code == 0 and "chunks" in out.output
    assert isinstance(zarr.open(store=str(tmp_path / "D.zarr"), mode="r"), zarr.Array)
    out = runner.invoke(main, ["info", str(tmp_path / "S.zarr")])
    assert out.exit_code == 0 and "sparse Zarr store" in out.output and "yes (CSR)" in out.output
    m = open_matrix(str(tmp_path / "S.zarr"))
    assert m.sparse and (m.data.compute() != X).nnz == 0
    # A converted sparse store is dnmf's own: --overwrite may replace it.
    out = runner.invoke(main, ["convert", str(tmp_path / "X.npz"), str(tmp_path / "S.zarr"), "-q", "--overwrite"])
    assert out.exit_code == 0, out.output


def test_cli_fit_of_an_mtx_goes_through_a_sparse_store(tmp_path, monkeypatch):
    X = sp.random(80, 30, density=0.15, random_state=8, format="csr")
    X.data = np.ceil(X.data * 9)
    column_ordered_mtx(tmp_path / "X.mtx", X)
    written = []
    real_convert = conv.convert

    def spy(*args, **kwargs):
        info = real_convert(*args, **kwargs)
        written.append(info)
        return info

    monkeypatch.setattr(conv, "convert", spy)
    out = CliRunner().invoke(main, ["fit", str(tmp_path / "X.mtx"), "--out", str(tmp_path / "r.zarr"), "--rank", "3",
                                    "--max-iter", "5", "--tol", "0", "--seed", "0", "--chunks", "20",
                                    "--beta-loss", "kullback-leibler", "--scheduler", "threads", "-q"])
    assert out.exit_code == 0, out.output
    assert written and written[0]["sparse"]  # the temporary copy is sparse, not 80 x 30 dense
    ref = dnmf.NMF(3, beta_loss="kullback-leibler", random_state=0, max_iter=5, tol=0, chunks=20, local=False).fit(X)
    from dnmf.data.results import load_result

    assert np.array_equal(load_result(tmp_path / "r.zarr").H, ref.components_)


def test_convert_no_compress_writes_raw_chunks_that_fit_as_the_compressed_store(tmp_path):
    """``--no-compress``: every array of the store raw (the direct reader's raw path), the same
    values as the compressed store, and the same fit bit for bit; a dense array raw too."""
    from dnmf.data import ondisk

    X = sp.random(300, 40, density=0.2, random_state=9, format="csr", dtype=np.float32)
    X.data = np.ceil(X.data * 7)
    sp.save_npz(tmp_path / "X.npz", X)
    runner = CliRunner()
    for name, flags in (("C.zarr", []), ("R.zarr", ["--no-compress"]), ("D.zarr", ["--no-compress", "--dense"])):
        out = runner.invoke(main, ["convert", str(tmp_path / "X.npz"), str(tmp_path / name), "-q", *flags])
        assert out.exit_code == 0, out.output
    compressed, raw = (zarr.open_group(str(tmp_path / n), mode="r") for n in ("C.zarr", "R.zarr"))
    for part in ("data", "indices", "indptr"):
        assert raw[part].compressors == () and compressed[part].compressors != ()
    assert ondisk.direct_chunks(raw["data"]).blosc is False
    assert zarr.open_array(str(tmp_path / "D.zarr"), mode="r").compressors == ()
    assert_same_csr(stored_csr(tmp_path / "R.zarr"), stored_csr(tmp_path / "C.zarr"))
    fits = [dnmf.NMF(3, solver=s, max_iter=4, tol=0, tol_x=0, cache=False, chunks=70, random_state=0).fit(str(tmp_path / n))
            for n in ("C.zarr", "R.zarr") for s in ("hals", "mu")]
    assert fits[0].components_.tobytes() == fits[2].components_.tobytes()
    assert fits[1].components_.tobytes() == fits[3].components_.tobytes()
