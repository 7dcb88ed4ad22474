"""Read matrices from common file formats and write them as row-chunked Zarr arrays.

Sources and how they are read:

- ``.npy``: memory-mapped, copied by row blocks.
- ``.npz``: a scipy.sparse matrix (``scipy.sparse.save_npz``, read whole: the archive is
  compressed as one), or a numpy archive holding one array (or ``dataset=NAME``).
- Matrix Market ``.mtx`` / ``.mtx.gz``: a coordinate file is streamed line by line, its entries
  gathered into row bands out of core (:class:`~dnmf.data.ondisk.RowBuckets`: the file may be
  in any order, e.g. column by column); a dense (array) file is read whole by
  ``scipy.io.mmread``.
- ``.csv`` / ``.tsv`` (``.txt``: whitespace): parsed by ``numpy.loadtxt`` in row blocks; a
  first line that is not numeric is taken as a header and skipped. Values are parsed exactly
  (correctly rounded) as float64; an empty field or a short line is an error.
- HDF5 ``.h5`` / ``.hdf5`` (``FILE.h5:/path/to/dataset`` or ``dataset=``): a 2-D dataset, or a
  group holding a CSR/CSC matrix (data, indices, indptr, shape), by row blocks; a 10x Genomics
  ``.h5`` (group ``matrix``, genes x cells by columns) as its cells x genes CSR.
- AnnData ``.h5ad``: its ``X`` (or ``dataset="layers/NAME"``): dense, CSR by row blocks, CSC by
  column blocks gathered into row bands out of core.

A sparse source (scipy .npz, coordinate Matrix Market, CSR/CSC groups) is written as a sparse
store: a Zarr group in AnnData's CSR encoding (:mod:`dnmf.data.ondisk`), which dnmf reads by
row blocks; a dense one as a Zarr array in row chunks holding all columns. ``dense=True`` /
``False`` forces either. The output keeps the source's dtype (CSV: float64).
"""

from __future__ import annotations

import gzip
import itertools
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .. import kernels
from ..errors import DnmfError, FormatError, StoreError, expected, no_such_path
from .ondisk import read_csr_rows
from .outputs import atomic_directory, check_output, mark_written
from .store import MatrixStats, auto_row_block
from .zarrio import create_array

_SUFFIXES = {
    ".npy": "npy", ".npz": "npz", ".mtx": "mtx", ".mtx.gz": "mtx", ".mm": "mtx", ".csv": "csv",
    ".csv.gz": "csv", ".tsv": "tsv", ".tsv.gz": "tsv", ".txt": "txt", ".h5": "hdf5", ".hdf5": "hdf5",
    ".hdf": "hdf5", ".he5": "hdf5", ".h5ad": "h5ad", ".zarr": "zarr",
}


def split_dataset(source: str) -> tuple[str, str | None]:
    """``"file.h5:/group/X"`` -> ``("file.h5", "/group/X")``; other paths are returned whole."""
    text = os.fspath(source)
    head, sep, tail = text.rpartition(":")
    if sep and tail.startswith("/") and Path(head).suffix.lower() in (".h5", ".hdf5", ".hdf", ".he5", ".h5ad"):
        return head, tail
    return text, None


def detect_format(path) -> str:
    """The format of ``path`` from its name (or, for a directory, its Zarr metadata)."""
    text = os.fspath(path)
    if "://" in text:
        return "zarr"
    p = Path(text)
    if p.is_dir():
        if (p / "zarr.json").exists() or (p / ".zarray").exists() or (p / ".zgroup").exists():
            return "zarr"
        raise FormatError(f"{text!r} is a folder but not a Zarr store (no zarr.json or .zarray in it).")
    name = p.name.lower()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return _SUFFIXES[suffix]
    raise FormatError(
        f"Cannot tell the format of {text!r} from its name; expected one of "
        ".zarr, .npy, .npz, .mtx(.gz), .csv, .tsv, .txt, .h5/.hdf5, .h5ad."
    )


@dataclass
class Source:
    """A matrix being read: its shape, dtype and a way to get row blocks.

    ``block(start, stop)`` returns rows start:stop as a dense ndarray, or as CSR when
    ``sparse``; a source without a row index has ``stream(rows)`` instead, which yields
    (start, block) top to bottom, blocks of ``rows`` rows.
    """

    path: str
    format: str
    shape: tuple[int, int]
    dtype: np.dtype
    block: object
    note: str = ""
    close: object = None
    sparse: bool = False
    stream: object = None

    def blocks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        if self.stream is not None:
            yield from self.stream(rows)
            return
        for start in range(0, self.shape[0], rows):
            yield start, self.block(start, min(start + rows, self.shape[0]))


def _check_matrix_shape(path: str, shape) -> tuple[int, int]:
    if len(shape) != 2:
        raise FormatError(expected(f"a 2-D matrix in {path!r}", f"shape {tuple(shape)}"))
    if shape[0] < 1 or shape[1] < 1:
        raise FormatError(expected(f"a non-empty matrix in {path!r}", f"shape {tuple(shape)}"))
    return int(shape[0]), int(shape[1])


def _sparse_source(path: str, fmt: str, X, note: str = "") -> Source:
    X = sp.csr_matrix(X)
    shape = _check_matrix_shape(path, X.shape)
    return Source(path, fmt, shape, X.dtype, lambda a, b: X[a:b], note, sparse=True)


# Entries gathered per row band when a sparse source has no row index (about 100 MiB).
BAND_ENTRIES = 2**22


def _banded_source(path: str, fmt: str, shape, dtype, nnz: int, entries, note: str, close=None) -> Source:
    """A sparse source whose entries come in any order: ``entries()`` yields (rows, cols,
    values) arrays; they are gathered into row bands out of core (two passes), each band
    then cut into blocks of the rows asked for."""
    from .ondisk import RowBuckets

    n = shape[0]

    def stream(rows: int):
        band = max(rows, (n * BAND_ENTRIES // max(1, nnz)) // rows * rows)
        with tempfile.TemporaryDirectory(prefix="dnmf-rows-") as folder:
            buckets = RowBuckets(folder, shape, band, dtype)
            for r, c, v in entries():
                buckets.add(r, c, v)
            for start, block in buckets.bands():
                for lo in range(0, block.shape[0], rows):
                    yield start + lo, block[lo : lo + rows]

    return Source(path, fmt, shape, np.dtype(dtype), None, note, close, sparse=True, stream=stream)


def _dense_source(path: str, fmt: str, X, note: str = "", close=None) -> Source:
    shape = _check_matrix_shape(path, X.shape)
    return Source(path, fmt, shape, np.dtype(X.dtype), lambda a, b: np.asarray(X[a:b]), note, close)


def _open_npy(path: str) -> Source:
    try:
        X = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise FormatError(f"{path!r} is not a readable .npy array: {e}") from e
    return _dense_source(path, "npy", X)


def _open_npz(path: str, dataset: str | None) -> Source:
    if dataset is None:
        try:
            return _sparse_source(path, "npz", sp.load_npz(path), note="a sparse .npz is read whole")
        except (ValueError, KeyError, OSError):
            pass  # not a scipy.sparse archive: try a numpy one
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise FormatError(f"{path!r} is not a readable .npz archive: {e}") from e
    names = list(archive.files)
    if dataset is None:
        if len(names) != 1:
            raise FormatError(
                f"{path!r} holds {len(names)} arrays {names}; pick one with --dataset NAME."
            )
        dataset = names[0]
    if dataset not in names:
        raise FormatError(expected(f"an array name in {names}", dataset))
    try:
        X = archive[dataset]
    except ValueError as e:  # an object (pickled) array: never unpickled, it could run code
        raise FormatError(f"{path!r} member {dataset!r} is not a numeric array ({e}); save it with numpy.savez.") from e
    return _dense_source(path, "npz", X, note="an .npz member is read whole")


MTX_LINES = 2**20  # lines parsed at a time


def _mtx_open(path: str):
    opener = gzip.open if path.lower().endswith(".gz") else open
    return opener(path, "rt", encoding="ascii", errors="replace")


def _mtx_header(path: str) -> tuple[dict, int]:
    """The banner's fields, the size line's numbers, and the number of lines before the entries."""
    try:
        with _mtx_open(path) as f:
            banner = f.readline()
            skipped = 1
            line = f.readline()
            while line and (line.startswith("%") or not line.strip()):
                skipped += 1
                line = f.readline()
    except (OSError, EOFError) as e:
        raise FormatError(f"{path!r} is not a readable Matrix Market file: {e}") from e
    words = banner.lower().split()
    if len(words) != 5 or words[0] != "%%matrixmarket" or words[1] != "matrix":
        raise FormatError(f"{path!r} is not a Matrix Market file: its first line is {banner.strip()[:80]!r}.")
    _, _, layout, field, symmetry = words
    if field not in ("real", "integer", "pattern", "double") or symmetry not in ("general", "symmetric", "skew-symmetric"):
        raise FormatError(
            f"{path!r} holds a {field} {symmetry} matrix; dnmf reads real, integer or pattern matrices, "
            "general, symmetric or skew-symmetric."
        )
    try:
        size = [int(t) for t in line.split()]
    except ValueError:
        size = []
    if len(size) != (3 if layout == "coordinate" else 2):
        raise FormatError(f"{path!r} has no valid size line after its banner (got {line.strip()[:80]!r}).")
    return {"layout": layout, "field": field, "symmetry": symmetry, "size": size}, skipped + 1


def _open_mtx(path: str) -> Source:
    import scipy.io

    header, skip = _mtx_header(path)
    if header["layout"] != "coordinate":  # a dense file: column by column, read whole
        try:
            with _mtx_open(path) as f:
                X = scipy.io.mmread(f)
        except (ValueError, OSError, EOFError) as e:
            raise FormatError(f"{path!r} is not a readable Matrix Market file: {e}") from e
        return _dense_source(path, "mtx", np.asarray(X), "a dense Matrix Market file is read whole")
    n, p, nnz = header["size"]
    shape = _check_matrix_shape(path, (n, p))
    field, symmetry = header["field"], header["symmetry"]
    dtype = np.dtype(np.int64 if field == "integer" else np.float64)
    width = 2 if field == "pattern" else 3

    def entries():
        with _mtx_open(path) as f:
            for _ in range(skip):
                f.readline()
            number = skip
            while lines := list(itertools.islice(f, MTX_LINES)):
                try:
                    table = np.loadtxt(lines, dtype=dtype, ndmin=2, comments="%")
                except ValueError as e:
                    raise FormatError(f"{path!r} has an entry that is not a number after line {number}: {e}") from None
                if table.size and table.shape[1] != width:
                    raise FormatError(expected(f"{width} numbers per entry line in {path!r}", f"{table.shape[1]}"))
                number += len(lines)
                if not table.size:
                    continue
                rows, cols = table[:, 0].astype(np.int64) - 1, table[:, 1].astype(np.int64) - 1
                values = np.ones(len(rows), dtype) if field == "pattern" else table[:, 2]
                if rows.min() < 0 or cols.min() < 0 or rows.max() >= n or cols.max() >= p:
                    raise FormatError(f"{path!r} has an entry outside its {n} x {p} size before line {number}.")
                yield rows, cols, values
                if symmetry != "general":
                    off = rows != cols
                    sign = -1 if symmetry == "skew-symmetric" else 1
                    yield cols[off], rows[off], sign * values[off]

    note = "Matrix Market entries streamed, gathered by rows out of core"
    return _banded_source(path, "mtx", shape, dtype, nnz * (1 if symmetry == "general" else 2), entries, note)


# --- CSV / TSV ---------------------------------------------------------------------------


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _text_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number from 1, line) of the non-blank lines of a UTF-8 text file (gzip too)."""
    opener = gzip.open if path.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            yield from ((number, line) for number, line in enumerate(f, 1) if line.strip())
    except UnicodeDecodeError as e:
        raise FormatError(f"{path!r} is not UTF-8 text ({e}); save it as UTF-8 or convert it with iconv.") from e


def _text_layout(path: str, fmt: str) -> tuple[str | None, bool, int, int]:
    """(separator, has_header, number of columns, bytes of the first data line).

    The first line is a header only when none of its fields is a number: a line such as
    ``1,2,NA`` or ``1,,3`` is data (and an error, naming its line), never silently dropped.
    """
    sep = {"csv": ",", "tsv": "\t", "txt": None}[fmt]
    lines = [line for _, (_, line) in zip(range(2), _text_lines(path))]
    if not lines:
        raise FormatError(f"{path!r} is empty: there is no matrix in it.")
    tokens = [t.strip() for t in (lines[0].split(sep) if sep else lines[0].split())]
    header = not any(_is_number(t) for t in tokens)
    data_line = lines[1] if header and len(lines) > 1 else lines[0]
    return sep, header, len(tokens), len(data_line.encode())


def _text_chunks(path: str, fmt: str, rows: int) -> Iterator[np.ndarray]:
    """Row blocks of a delimited text file as float64 arrays (``rows`` lines at a time)."""
    sep, header, _, _ = _text_layout(path, fmt)
    lines = _text_lines(path)
    if header:
        next(lines)
    while block := list(itertools.islice(lines, rows)):
        try:
            yield np.loadtxt([line for _, line in block], delimiter=sep, dtype=np.float64, ndmin=2, comments=None)
        except ValueError:
            number, line, problem = _first_bad_line(block, sep)
            raise FormatError(
                f"{path!r} line {number} has an entry that is not a number, or a missing one ({problem}): "
                f"{line.strip()[:80]!r}."
            ) from None


def _first_bad_line(block: list[tuple[int, str]], sep: str | None) -> tuple[int, str, str]:
    """(line number, line, what is wrong) of the first line of ``block`` that is not a row of
    numbers as long as the first."""
    width = None
    for number, line in block:
        try:
            values = np.loadtxt([line], delimiter=sep, dtype=np.float64, ndmin=2, comments=None)
        except ValueError as e:
            return number, line, str(e).split(" at row")[0]
        if width is not None and values.shape[1] != width:
            return number, line, f"{values.shape[1]} fields where the lines before have {width}"
        width = values.shape[1]
    return block[0][0], block[0][1], "the lines differ in length"


# --- HDF5 / AnnData ----------------------------------------------------------------------


def _h5_sparse_group(group) -> str | None:
    """"csr" or "csc" when an HDF5 group holds a sparse matrix (AnnData / scanpy layout)."""
    if not all(name in group for name in ("data", "indices", "indptr")):
        return None
    kind = group.attrs.get("encoding-type", group.attrs.get("h5sparse_format", "csr"))
    kind = kind.decode() if isinstance(kind, bytes) else str(kind)
    return "csc" if "csc" in kind else "csr"


def _h5_shape(group) -> tuple[int, int]:
    shape = group.attrs.get("shape", group.attrs.get("h5sparse_shape"))
    if shape is None and "shape" in group:  # 10x Genomics: a dataset
        shape = group["shape"][...]
    if shape is None:
        raise FormatError(f"The sparse group {group.name!r} has no 'shape' attribute.")
    return tuple(int(s) for s in shape)


def _open_h5(path: str, fmt: str, dataset: str | None) -> Source:
    try:
        import h5py
    except ImportError as e:
        raise FormatError(f"Reading {path!r} needs h5py: pip install 'dnmf[formats]' (or h5py).") from e

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise FormatError(f"{path!r} is not a readable HDF5 file: {e}") from e
    try:
        if dataset is None and fmt != "h5ad" and _is_10x(f):
            return _tenx_source(path, f)
        if dataset is None:
            dataset = "X" if fmt == "h5ad" else _only_2d_dataset(f, path)
        if dataset not in f:
            raise FormatError(f"{path!r} has no dataset {dataset!r}; give one with FILE.h5:/path or --dataset.")
        node = f[dataset]
        if isinstance(node, h5py.Dataset):
            return _dense_source(path, fmt, node, close=f.close)
        kind = _h5_sparse_group(node)
        if kind is None:
            raise FormatError(f"{dataset!r} in {path!r} is a group, not a matrix; name a dataset inside it.")
        shape = _check_matrix_shape(path, _h5_shape(node))
        data, indices, indptr = node["data"], node["indices"], node["indptr"]
        if kind == "csc":
            return _csc_source(path, fmt, shape, data, indices, indptr, f.close)

        def block(a: int, b: int) -> sp.csr_matrix:
            return read_csr_rows(data, indices, indptr, a, b, shape[1])

        return Source(path, fmt, shape, np.dtype(data.dtype), block, close=f.close, sparse=True)
    except BaseException:
        f.close()
        raise


def _csc_source(path: str, fmt: str, shape, data, indices, indptr, close) -> Source:
    """A CSC matrix read by column blocks, its entries gathered into row bands out of core."""
    n, p = shape
    nnz = int(indptr[p])

    def entries():
        step = max(1, p * BAND_ENTRIES // max(1, nnz))
        for c0 in range(0, p, step):
            c1 = min(p, c0 + step)
            ptr = np.asarray(indptr[c0 : c1 + 1], dtype=np.int64)
            lo, hi = int(ptr[0]), int(ptr[-1])
            cols = np.repeat(np.arange(c0, c1, dtype=np.int64), np.diff(ptr))
            yield np.asarray(indices[lo:hi]), cols, np.asarray(data[lo:hi])

    note = "a CSC matrix read by columns, gathered by rows out of core"
    return _banded_source(path, fmt, shape, data.dtype, nnz, entries, note, close)


def _is_10x(f) -> bool:
    group = f.get("matrix")
    return group is not None and all(name in group for name in ("data", "indices", "indptr", "shape"))


def _tenx_source(path: str, f) -> Source:
    """A 10x Genomics .h5 (``matrix``: genes x cells stored by columns) as cells x genes CSR."""
    group = f["matrix"]
    genes, cells = (int(s) for s in group["shape"][...])
    data, indices, indptr = group["data"], group["indices"], group["indptr"]
    shape = _check_matrix_shape(path, (cells, genes))

    def block(a: int, b: int) -> sp.csr_matrix:
        return read_csr_rows(data, indices, indptr, a, b, genes)

    note = "a 10x Genomics matrix, as cells x genes"
    return Source(path, "hdf5", shape, np.dtype(data.dtype), block, note, f.close, sparse=True)


def _only_2d_dataset(f, path: str) -> str:
    import h5py

    found = []
    f.visititems(lambda name, node: found.append(name) if isinstance(node, h5py.Dataset) and node.ndim == 2 else None)
    if len(found) != 1:
        raise FormatError(
            f"{path!r} holds {len(found)} 2-D datasets {found[:10]}; pick one with FILE.h5:/path or --dataset."
        )
    return found[0]


# --- Public API --------------------------------------------------------------------------


def open_source(path, dataset: str | None = None) -> Source:
    """Open a matrix file for reading by row blocks (not Zarr: :func:`dnmf.open_matrix` reads that)."""
    path, inline = split_dataset(os.fspath(path))
    dataset = dataset or inline
    if not os.path.exists(path):
        raise StoreError(no_such_path("file", path))
    fmt = detect_format(path)
    if fmt == "npy":
        return _open_npy(path)
    if fmt == "npz":
        return _open_npz(path, dataset)
    if fmt == "mtx":
        return _open_mtx(path)
    if fmt in ("hdf5", "h5ad"):
        return _open_h5(path, fmt, dataset)
    if fmt in ("csv", "tsv", "txt"):
        raise FormatError("Delimited text has no row index; use convert for it.")
    source = _zarr_sparse_source(path, dataset)
    if source is None:
        raise FormatError(f"{path!r} is a Zarr store; open it with dnmf.open_matrix.")
    return source


def _zarr_sparse_source(path: str, dataset: str | None) -> Source | None:
    """A sparse matrix in a Zarr store (an AnnData store's X or ``dataset="layers/NAME"``, a
    sparse store) as a source; None for a Zarr array."""
    import zarr

    from .ondisk import CSC, _open_arrays, open_zarr_group
    from .store import open_zarr_node

    node = open_zarr_node(path)
    if isinstance(node, zarr.Array):
        return None
    layer = None
    if dataset not in (None, "X", "/X"):
        name = dataset.strip("/")
        if not name.startswith("layers/"):
            raise FormatError(expected("--dataset X or layers/NAME for an AnnData store", dataset))
        layer = name.removeprefix("layers/")
    matrix = open_zarr_group(path, node, layer)
    if isinstance(matrix, zarr.Array):
        return None
    data, indices, indptr = _open_arrays(matrix)
    if matrix.encoding == CSC:
        return _csc_source(path, "zarr", matrix.shape, data, indices, indptr, None)

    def block(a: int, b: int) -> sp.csr_matrix:
        return read_csr_rows(data, indices, indptr, a, b, matrix.shape[1])

    return Source(path, "zarr", matrix.shape, matrix.dtype, block, sparse=True)


def default_row_chunk(n_rows: int, n_cols: int, itemsize: int) -> int:
    """Rows per Zarr chunk: about 64 MiB, at least four chunks (as dnmf reads them)."""
    return auto_row_block(n_rows, n_cols, itemsize)


def convert(
    src, dst, chunks: int | None = None, dataset: str | None = None, overwrite: bool = False, progress=None,
    dense: bool | None = None, compressed: bool = True,
) -> dict:
    """Write the matrix in ``src`` to a new Zarr store ``dst``, row block by row block: a dense
    Zarr array, or (a sparse source) a sparse store in AnnData's CSR encoding.

    Parameters
    ----------
    src : str or Path
        A .npy, .npz, .mtx(.gz), .csv/.tsv/.txt, HDF5 (``FILE.h5:/dataset``) or .h5ad file.
    dst : str or Path
        The Zarr array to create. It is written to a hidden sibling and renamed into place, and
        carries the :data:`~dnmf.data.outputs.MARKER` attribute. It may not be, lie inside or
        hold ``src``.
    chunks : int, optional
        Rows per chunk (default: about 64 MiB, at least four chunks).
    dataset : str, optional
        The dataset inside an HDF5 file, or the member of a numpy .npz archive.
    overwrite : bool
        Replace an existing ``dst`` that dnmf wrote (an earlier array or result, or an empty
        folder); see :func:`dnmf.data.outputs.check_output`.
    progress : callable, optional
        Called with the number of rows written after each block.
    dense : bool, optional
        True: a dense Zarr array whatever the source; False: a sparse store whatever the
        source (a dense source's zeros left out); None (default): sparse for sparse sources.
    compressed : bool, default=True
        Blosc (LZ4HC) chunks (:func:`~dnmf.data.zarrio.default_compressors`), or raw ones (False):
        larger on disk (1.6 times for random float32 values, more for counts), but read with no
        decoding: a pass over a 79M-non-zero sparse store took 64-102 ms instead of 152 here,
        which is most of what streaming adds to an in-memory iteration.

    Returns
    -------
    dict with shape, dtype, chunks, format, sparse (whether dst is a sparse store), nnz (its
    entries, sparse) and note (how the source was read).
    """
    import zarr

    if chunks is not None and chunks < 1:
        raise DnmfError(expected("--chunks a positive number of rows", chunks))
    src_path, _ = split_dataset(os.fspath(src))
    check_output(dst, protected={"source": src_path}, overwrite=overwrite, label="DST")
    if not os.path.exists(src_path):
        raise StoreError(no_such_path("file", src_path))
    fmt = detect_format(src_path)
    if fmt == "zarr" and _zarr_sparse_source(src_path, dataset) is None:
        raise FormatError(f"{src_path!r} is already Zarr; dnmf reads it directly (rechunking it is not supported here).")
    with atomic_directory(dst, overwrite, protected={"source": src_path}) as tmp:
        if fmt in ("csv", "tsv", "txt") and not dense and dense is not None:
            raise FormatError("Delimited text is converted dense; convert it, then write it sparse from Python.")
        if fmt in ("csv", "tsv", "txt"):
            info = _convert_text(src_path, fmt, tmp, chunks, progress, compressed)
        else:
            source = open_source(src, dataset)
            try:
                sparse = source.sparse if dense is None else not dense
                info = (_write_sparse if sparse else _write_dense)(source, tmp, chunks, progress, compressed)
            finally:
                if source.close is not None:
                    source.close()
            info.update({"shape": source.shape, "dtype": str(source.dtype), "format": fmt, "note": source.note})
        mark_written(zarr.open(store=str(tmp), mode="r+"), "convert")
    return info


def _write_dense(source: Source, tmp: Path, chunks: int | None, progress, compressed: bool = True) -> dict:
    rows = chunks or default_row_chunk(*source.shape, source.dtype.itemsize)
    rows = min(rows, source.shape[0])
    arr = create_array(str(tmp), None, source.shape, (rows, source.shape[1]), source.dtype, compressed=compressed)
    for start, block in source.blocks(rows):
        arr[start : start + block.shape[0]] = block.toarray() if sp.issparse(block) else block
        if progress is not None:
            progress(block.shape[0])
    return {"chunks": (rows, source.shape[1]), "sparse": False}


def _write_sparse(source: Source, tmp: Path, chunks: int | None, progress, compressed: bool = True) -> dict:
    """``source`` as a sparse store (AnnData's CSR encoding), row block by row block."""
    from .ondisk import CSRWriter, create_csr_store

    n, p = source.shape
    rows = min(n, chunks or 65536)
    index_dtype = np.int32 if p < 2**31 else np.int64
    writer = CSRWriter(create_csr_store(tmp, source.shape, source.dtype, index_dtype, compressed=compressed))
    for _, block in source.blocks(rows):
        writer.append(block)
        if progress is not None:
            progress(block.shape[0])
    nnz = writer.close()
    return {"chunks": (rows, p), "sparse": True, "nnz": nnz}


def _convert_text(path: str, fmt: str, tmp: Path, chunks: int | None, progress, compressed: bool = True) -> dict:
    _, _, n_cols, line_bytes = _text_layout(path, fmt)
    estimated_rows = max(1, os.path.getsize(path) // max(1, line_bytes))
    rows = chunks or default_row_chunk(estimated_rows, n_cols, 8)
    arr = create_array(str(tmp), None, (0, n_cols), (rows, n_cols), np.float64, compressed=compressed)
    n = 0
    for block in _text_chunks(path, fmt, rows):
        if block.shape[1] != n_cols:
            raise FormatError(expected(f"{n_cols} columns on every line of {path!r}", f"{block.shape[1]} columns"))
        arr.resize((n + block.shape[0], n_cols))
        arr[n : n + block.shape[0]] = block
        n += block.shape[0]
        if progress is not None:
            progress(block.shape[0])
    if n == 0:
        raise FormatError(f"{path!r} has a header but no rows: there is no matrix in it.")
    return {"shape": (n, n_cols), "dtype": "float64", "chunks": (rows, n_cols), "format": fmt, "note": ""}


def scan_source(path, dataset: str | None = None, rows: int | None = None):
    """One streaming pass over a matrix file: a :class:`~dnmf.data.store.MatrixStats`, shape and dtype."""
    src_path, _ = split_dataset(os.fspath(path))
    fmt = detect_format(src_path)
    total = None
    if fmt in ("csv", "tsv", "txt"):
        n = 0
        for block in _text_chunks(src_path, fmt, rows or 65536):
            stats = kernels.block_stats(block, n)
            total = stats if total is None else kernels.add_stats(total, stats)
            n += block.shape[0]
        shape, dtype = (n, block.shape[1]), np.dtype(np.float64)
    else:
        source = open_source(path, dataset)
        try:
            shape, dtype = source.shape, source.dtype
            step = rows or default_row_chunk(*shape, max(8, dtype.itemsize))
            for start, block in source.blocks(step):
                stats = kernels.block_stats(block, start)
                total = stats if total is None else kernels.add_stats(total, stats)
        finally:
            if source.close is not None:
                source.close()
    return MatrixStats.from_blocks(total, shape), shape, dtype, fmt


def size_on_disk(path) -> int:
    """Bytes used by a file or, recursively, a directory."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    k = 0 if n < 1 else min(len(units) - 1, int(math.log(n, 1024)))
    return f"{n / 1024**k:.1f} {units[k]}" if k else f"{int(n)} B"
