"""dnmf.data.convert: every source format round-trips exactly into a row-chunked Zarr array."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp
import zarr

from dnmf.data.convert import FormatError, convert, detect_format, scan_source
from dnmf.errors import DnmfError, StoreError


@pytest.fixture
def dense():
    rng = np.random.default_rng(3)
    X = rng.random((53, 7))
    X[X < 0.4] = 0.0
    return X


def read(path) -> np.ndarray:
    """The matrix in a converted store: a dense Zarr array, or a sparse store (read densely)."""
    node = zarr.open(store=str(path), mode="r")
    if isinstance(node, zarr.Array):
        return node[...]
    assert node.attrs["encoding-type"] == "csr_matrix"  # a sparse source stays sparse
    shape = tuple(node.attrs["shape"])
    return sp.csr_matrix((node["data"][...], node["indices"][...], node["indptr"][...]), shape=shape).toarray()


def leftovers(folder) -> list[str]:
    return [name for name in os.listdir(folder) if name.startswith(".")]


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int32])
def test_npy_round_trip_keeps_dtype_and_chunks(tmp_path, dense, dtype):
    X = (dense * 100).astype(dtype)
    np.save(tmp_path / "V.npy", X)
    info = convert(tmp_path / "V.npy", tmp_path / "V.zarr", chunks=10)
    out = zarr.open_array(str(tmp_path / "V.zarr"), mode="r")
    assert out.dtype == X.dtype and out.chunks == (10, 7) and info["shape"] == X.shape
    np.testing.assert_array_equal(out[...], X)
    assert leftovers(tmp_path) == []


def test_npz_sparse_and_numpy_archive(tmp_path, dense):
    sp.save_npz(tmp_path / "S.npz", sp.csr_matrix(dense))
    convert(tmp_path / "S.npz", tmp_path / "S.zarr", chunks=8)
    np.testing.assert_array_equal(read(tmp_path / "S.zarr"), dense)
    np.savez(tmp_path / "A.npz", V=dense, other=dense[:2])
    with pytest.raises(FormatError, match="--dataset"):
        convert(tmp_path / "A.npz", tmp_path / "A.zarr")
    convert(tmp_path / "A.npz", tmp_path / "A.zarr", dataset="V")
    np.testing.assert_array_equal(read(tmp_path / "A.zarr"), dense)


@pytest.mark.parametrize("name", ["V.mtx", "V.mtx.gz"])
def test_matrix_market_sparse_and_dense(tmp_path, dense, name):
    path = tmp_path / name
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "wb") as f:
        scipy.io.mmwrite(f, sp.coo_matrix(dense), precision=17)
    info = convert(path, tmp_path / "V.zarr", chunks=16)
    assert "streamed" in info["note"] and info["sparse"]
    np.testing.assert_array_equal(read(tmp_path / "V.zarr"), dense)
    scipy.io.mmwrite(tmp_path / "D.mtx", dense, precision=17)
    convert(tmp_path / "D.mtx", tmp_path / "D.zarr")
    np.testing.assert_array_equal(read(tmp_path / "D.zarr"), dense)


@pytest.mark.parametrize("sep,suffix,header", [(",", "csv", True), ("\t", "tsv", False), (" ", "txt", False)])
def test_delimited_text_streams_in_row_chunks(tmp_path, dense, sep, suffix, header):
    path = tmp_path / f"V.{suffix}"
    lines = [sep.join(f"c{j}" for j in range(dense.shape[1]))] if header else []
    lines += [sep.join(repr(float(v)) for v in row) for row in dense]
    path.write_text("\n".join(lines) + "\n")
    info = convert(path, tmp_path / "V.zarr", chunks=5)  # 11 blocks, the array grows as it goes
    assert info["shape"] == dense.shape
    np.testing.assert_array_equal(read(tmp_path / "V.zarr"), dense)


def test_hdf5_dataset_by_suffix_or_option(tmp_path, dense):
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "V.h5", "w") as f:
        f["group/V"] = dense
        f["other"] = dense[:3]
    with pytest.raises(FormatError, match="2-D datasets"):
        convert(tmp_path / "V.h5", tmp_path / "A.zarr")
    convert(f"{tmp_path / 'V.h5'}:/group/V", tmp_path / "A.zarr", chunks=20)
    convert(tmp_path / "V.h5", tmp_path / "B.zarr", dataset="other")
    np.testing.assert_array_equal(read(tmp_path / "A.zarr"), dense)
    np.testing.assert_array_equal(read(tmp_path / "B.zarr"), dense[:3])


@pytest.mark.parametrize("layout", ["dense", "csr", "csc"])
def test_h5ad_x_dense_and_sparse(tmp_path, dense, layout):
    anndata = pytest.importorskip("anndata")
    X = dense.astype(np.float32)
    X_stored = {"dense": X, "csr": sp.csr_matrix(X), "csc": sp.csc_matrix(X)}[layout]
    anndata.AnnData(X=X_stored).write_h5ad(tmp_path / "V.h5ad")
    convert(tmp_path / "V.h5ad", tmp_path / "V.zarr", chunks=9)
    out = read(tmp_path / "V.zarr")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, X)


def test_existing_destination_is_refused_and_untouched(tmp_path, dense):
    np.save(tmp_path / "V.npy", dense)
    convert(tmp_path / "V.npy", tmp_path / "V.zarr")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "V.zarr").rglob("*")}
    with pytest.raises(StoreError, match="already exists.*--overwrite"):
        convert(tmp_path / "V.npy", tmp_path / "V.zarr")
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "V.zarr").rglob("*")} == before
    np.save(tmp_path / "V.npy", dense * 2)
    convert(tmp_path / "V.npy", tmp_path / "V.zarr", overwrite=True)
    np.testing.assert_array_equal(read(tmp_path / "V.zarr"), dense * 2)
    assert leftovers(tmp_path) == []


def test_failed_conversion_leaves_nothing_behind(tmp_path):
    (tmp_path / "bad.csv").write_text("1,2,3\n4,x,6\n")
    with pytest.raises(FormatError, match="not a number"):
        convert(tmp_path / "bad.csv", tmp_path / "bad.zarr")
    (tmp_path / "ragged.csv").write_text("1,2,3\n4,5\n")
    with pytest.raises(DnmfError):
        convert(tmp_path / "ragged.csv", tmp_path / "ragged.zarr")
    assert sorted(os.listdir(tmp_path)) == ["bad.csv", "ragged.csv"]


def test_unknown_format_and_missing_file(tmp_path):
    (tmp_path / "V.xyz").write_text("1")
    with pytest.raises(FormatError, match="Cannot tell the format"):
        detect_format(tmp_path / "V.xyz")
    with pytest.raises(StoreError, match="does not exist"):
        convert(tmp_path / "nope.npy", tmp_path / "V.zarr")
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(FormatError, match="not a readable .npy"):
        convert(tmp_path / "junk.npy", tmp_path / "V.zarr")


def test_scan_source_finds_bad_entries(tmp_path, dense):
    X = dense.copy()
    X[4, 2], X[9, 1] = -1.0, np.nan
    np.save(tmp_path / "V.npy", X)
    stats, shape, dtype, fmt = scan_source(tmp_path / "V.npy", rows=4)
    assert (shape, fmt) == (X.shape, "npy")
    assert (stats.n_negative, stats.first_negative) == (1, (4, 2))
    assert (stats.n_nonfinite, stats.first_nonfinite) == (1, (9, 1))


# Issue 14, cases 10 and 13: a data row is never taken for a header; bad files get one error.


@pytest.mark.parametrize("first_line,line", [("1,2,NA", 1), ("1,,3", 1), ("7,8,9\n1,,3", 2)])
def test_a_first_line_with_a_number_is_data_and_a_bad_entry_names_its_line(tmp_path, first_line, line):
    (tmp_path / "V.csv").write_text(first_line + "\n4,5,6\n")
    with pytest.raises(FormatError, match=rf"line {line} has an entry that is not a number"):
        convert(tmp_path / "V.csv", tmp_path / "V.zarr")
    assert sorted(os.listdir(tmp_path)) == ["V.csv"]


def test_a_header_of_names_is_skipped_and_line_numbers_count_the_whole_file(tmp_path):
    rows = "\n".join(f"{i},{i + 1}" for i in range(1, 5000))
    (tmp_path / "V.csv").write_text("a,b\n" + rows + "\n5,x\n")
    with pytest.raises(FormatError, match="line 5001 has an entry"):
        convert(tmp_path / "V.csv", tmp_path / "V.zarr", chunks=100)
    (tmp_path / "W.csv").write_text("a,b\n1,2\n3,4\n")
    convert(tmp_path / "W.csv", tmp_path / "W.zarr")
    assert zarr.open_array(str(tmp_path / "W.zarr"))[...].tolist() == [[1, 2], [3, 4]]


def test_text_that_is_not_utf8_and_a_pickled_npz_get_one_error(tmp_path):
    (tmp_path / "V.csv").write_bytes("1,2\n3,\xe9\n".encode("latin-1"))
    with pytest.raises(FormatError, match="not UTF-8"):
        convert(tmp_path / "V.csv", tmp_path / "V.zarr")
    np.savez(tmp_path / "P.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(FormatError, match="not a numeric array"):
        convert(tmp_path / "P.npz", tmp_path / "P.zarr")
