"""Read matrices from common file formats and write them as row-chunked Zarr arrays.

Sources and how they are read:

- ``.npy``: memory-mapped, copied by row blocks.
- ``.npz``: a scipy.sparse matrix (``scipy.sparse.save_npz``) densified one row block at a
  time, or a numpy archive holding one array (or ``dataset=NAME``).
- Matrix Market ``.mtx`` / ``.mtx.gz``: read whole by ``scipy.io.mmread`` (the format has no
  row index), then written by row blocks.
- ``.csv`` / ``.tsv`` (``.txt``: whitespace): parsed by ``numpy.loadtxt`` in row blocks; a
  first line that is not numeric is taken as a header and skipped. Values are parsed exactly
  (correctly rounded) as float64; an empty field or a short line is an error.
- HDF5 ``.h5`` / ``.hdf5`` (``FILE.h5:/path/to/dataset`` or ``dataset=``): a 2-D dataset, or a
  group holding a CSR/CSC matrix (data, indices, indptr, shape), by row blocks.
- AnnData ``.h5ad``: its ``X`` (dense, or CSR by row blocks; CSC is read whole).

The written array keeps the source's dtype (CSV: float64) and has row chunks holding all
columns, the layout :func:`dnmf.open_matrix` reads fastest.
"""

from __future__ import annotations

import gzip
import itertools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .. import kernels
from ..errors import DnmfError, FormatError, StoreError, expected, no_such_path
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

    ``block(start, stop)`` returns rows start:stop as a dense ndarray.
    """

    path: str
    format: str
    shape: tuple[int, int]
    dtype: np.dtype
    block: object
    note: str = ""
    close: object = None

    def blocks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
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
    return Source(path, fmt, shape, X.dtype, lambda a, b: X[a:b].toarray(), note)


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
            return _sparse_source(path, "npz", sp.load_npz(path))
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


def _open_mtx(path: str) -> Source:
    import scipy.io

    opener = gzip.open if path.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            X = scipy.io.mmread(f)
    except (ValueError, OSError, EOFError) as e:
        raise FormatError(f"{path!r} is not a readable Matrix Market file: {e}") from e
    note = "Matrix Market files are read whole (the format has no row index)"
    if sp.issparse(X):
        return _sparse_source(path, "mtx", X, note)
    return _dense_source(path, "mtx", np.asarray(X), note)


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
            X = sp.csc_matrix((data[...], indices[...], indptr[...]), shape=shape).tocsr()
            f.close()
            return _sparse_source(path, fmt, X, note="a CSC matrix is read whole")

        def block(a: int, b: int) -> np.ndarray:
            ptr = indptr[a : b + 1]
            lo, hi = int(ptr[0]), int(ptr[-1])
            rows = sp.csr_matrix((data[lo:hi], indices[lo:hi], ptr - lo), shape=(b - a, shape[1]))
            return rows.toarray()

        return Source(path, fmt, shape, np.dtype(data.dtype), block, close=f.close)
    except BaseException:
        f.close()
        raise


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
    raise FormatError(f"{path!r} is a Zarr store; open it with dnmf.open_matrix.")


def default_row_chunk(n_rows: int, n_cols: int, itemsize: int) -> int:
    """Rows per Zarr chunk: about 64 MiB, at least four chunks (as dnmf reads them)."""
    return auto_row_block(n_rows, n_cols, itemsize)


def convert(src, dst, chunks: int | None = None, dataset: str | None = None, overwrite: bool = False, progress=None) -> dict:
    """Write the matrix in ``src`` to a new Zarr array ``dst``, row block by row block.

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

    Returns
    -------
    dict with shape, dtype, chunks, format and note (how the source was read).
    """
    import zarr

    if chunks is not None and chunks < 1:
        raise DnmfError(expected("--chunks a positive number of rows", chunks))
    src_path, _ = split_dataset(os.fspath(src))
    check_output(dst, protected={"source": src_path}, overwrite=overwrite, label="DST")
    if not os.path.exists(src_path):
        raise StoreError(no_such_path("file", src_path))
    fmt = detect_format(src_path)
    if fmt == "zarr":
        raise FormatError(f"{src_path!r} is already Zarr; dnmf reads it directly (rechunking it is not supported here).")
    with atomic_directory(dst, overwrite, protected={"source": src_path}) as tmp:
        if fmt in ("csv", "tsv", "txt"):
            info = _convert_text(src_path, fmt, tmp, chunks, progress)
        else:
            source = open_source(src, dataset)
            try:
                rows = chunks or default_row_chunk(*source.shape, source.dtype.itemsize)
                rows = min(rows, source.shape[0])
                arr = create_array(str(tmp), None, source.shape, (rows, source.shape[1]), source.dtype)
                for start, block in source.blocks(rows):
                    arr[start : start + block.shape[0]] = block
                    if progress is not None:
                        progress(block.shape[0])
            finally:
                if source.close is not None:
                    source.close()
            info = {"shape": source.shape, "dtype": str(source.dtype), "chunks": (rows, source.shape[1]),
                    "format": fmt, "note": source.note}
        mark_written(zarr.open_array(str(tmp), mode="r+"), "convert")
    return info


def _convert_text(path: str, fmt: str, tmp: Path, chunks: int | None, progress) -> dict:
    _, _, n_cols, line_bytes = _text_layout(path, fmt)
    estimated_rows = max(1, os.path.getsize(path) // max(1, line_bytes))
    rows = chunks or default_row_chunk(estimated_rows, n_cols, 8)
    arr = create_array(str(tmp), None, (0, n_cols), (rows, n_cols), np.float64)
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
