"""Open, lay out and validate the input matrix V.

Whatever the input (numpy, scipy.sparse, dask array, ``zarr.Array``, AnnData, path or URL of
a Zarr array, of a sparse Zarr store or AnnData store, or of an ``.h5ad`` file),
:func:`open_matrix` returns a :class:`Matrix`: a dask array of V in row blocks that hold all
columns, without ever loading V whole. A sparse V on disk (:mod:`dnmf.data.ondisk`) is read by
tasks that each read only their rows' entries; sparse row blocks are sized from the non-zeros
per row. :func:`scan_matrix` makes one pass over V
to validate it and collect the sums the objective and the inits need.
"""

from __future__ import annotations

import functools
import math
import os
import uuid
from dataclasses import dataclass, replace

import dask
import dask.array as da
import numpy as np
import scipy.sparse as sp
from dask._task_spec import DataNode, GraphNode, Task
from dask.array.core import getter, normalize_chunks
from dask.base import tokenize

from .. import kernels
from ..errors import InvalidMatrixError, MatrixTypeError, ParameterError, StoreError, expected, no_such_path
from ..graph import from_blocks, map_reduce
from . import ondisk

# A row block of about this many bytes (dense) balances task overhead against memory.
TARGET_BLOCK_BYTES = 64 * 2**20
MIN_BLOCKS = 4


@dataclass(frozen=True)
class Matrix:
    """V as a dask array of row blocks, with what dnmf needs to know about it.

    data : dask array of shape (n, p): row blocks holding all columns, or (a wide V, see
        :func:`open_matrix`) a 2-D grid of chunks.
    dtype : the float dtype the factors use (V's own when it is float32/float64).
    in_memory : V was given in memory (numpy / scipy), so results are returned as numpy.
    sparse : the blocks are scipy.sparse CSR matrices.
    source : a short description of where V came from (a path, "numpy", ...).
    reads_inline : each block of ``data`` is read from its store by a task that needs nothing
        but the store's array (a Zarr V), and the tasks that use a block read it themselves
        (see :meth:`grid_inputs`).
    store_chunks : the chunk shape of the Zarr array V is read from, None for other inputs. A
        task reads every stored chunk its block touches whole, even when the block is smaller.
    nnz : the stored entries of a sparse V when known before any pass over it (in memory, on
        disk), None otherwise.
    """

    data: da.Array
    dtype: np.dtype
    in_memory: bool
    sparse: bool
    source: str
    reads_inline: bool = False
    store_chunks: tuple[int, int] | None = None
    nnz: int | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.data.shape)

    @property
    def row_chunks(self) -> tuple[int, ...]:
        return self.data.chunks[0]

    @property
    def col_chunks(self) -> tuple[int, ...]:
        return self.data.chunks[1]

    @property
    def is_grid(self) -> bool:
        """V is chunked along its columns too (the 2-D grid layout of :mod:`dnmf.solvers.grid`)."""
        return len(self.col_chunks) > 1

    @property
    def row_offsets(self) -> list[int]:
        return [0, *np.cumsum(self.row_chunks).tolist()]

    @property
    def col_offsets(self) -> list[int]:
        return [0, *np.cumsum(self.col_chunks).tolist()]

    def block_inputs(self) -> list:
        """What a task takes as each row block, top to bottom (the row layout only): see
        :meth:`grid_inputs`."""
        if self.is_grid:
            raise NotImplementedError("V is laid out as a 2-D grid; use grid_inputs()")
        return [row[0] for row in self.grid_inputs()]

    def grid_inputs(self) -> list[list]:
        """What a task takes as chunk (i, j) of V (``grid_inputs()[i][j]``): the chunk's dask
        key, or, with ``reads_inline``, the task that reads it, nested in the task that uses
        it. A streamed block then lives only inside that task: as tasks of their own, reads
        ran ahead and their blocks waited in the workers (~27 of 4 MiB in each 256 MiB worker
        streaming a 2 GiB V, which paused them).
        """
        return self._inputs

    @functools.cached_property
    def _inputs(self) -> list[list]:
        keys = [list(row) for row in self.data.__dask_keys__()]
        if not self.reads_inline:
            return keys
        graph = dict(self.data.__dask_graph__())
        return [[_inline_read(graph, key) for key in row] for row in keys]


def _inline_read(graph: dict, key):
    """The task of ``key`` when it only reads from plain objects that are keys of their own
    (such as the Zarr array), else ``key``: no data is ever copied into the tasks."""
    node = graph[key]
    reads = isinstance(node, Task) and all(dep in graph and _is_plain(graph[dep]) for dep in node.dependencies)
    return node if reads else key


def _is_plain(value) -> bool:
    """A graph value that is an object, not a task."""
    return isinstance(value, DataNode) or not isinstance(value, GraphNode)


@dataclass(frozen=True)
class MatrixStats:
    """Sums over V from one scan: ‖V‖², ΣV, nnz, and the bad entries found."""

    v_sq: float
    v_sum: float
    nnz: int
    n_negative: int
    n_nonfinite: int
    first_negative: tuple[int, int] | None
    first_nonfinite: tuple[int, int] | None
    shape: tuple[int, int]
    v_xlogx: float = 0.0  # Σ V log V, only when the scan was asked for it (KL)

    @classmethod
    def from_blocks(cls, stats: kernels.BlockStats, shape: tuple[int, int]) -> MatrixStats:
        """The stats of V from the reduced :class:`~dnmf.kernels.BlockStats` of its blocks."""
        return cls(*stats[:7], shape=tuple(shape), v_xlogx=stats.v_xlogx)

    @property
    def mean(self) -> float:
        return self.v_sum / (self.shape[0] * self.shape[1])


def unit_exponent(stats: MatrixStats) -> int:
    """An even k with V's typical non-zero entry near 2^k: V's units, as a power of 4.

    The typical entry is the root-mean-square non-zero from the scan, or the mean non-zero
    where ‖V‖² overflowed or underflowed, or a bound where even ΣV overflowed (float64 near
    its maximum). k is 0 for entries near 1 (log2 of the typical entry in [-1, 1)) and for an
    all-zero V. Being even, 2^(k/2) is a power of two too, so scaling by it is exact.
    """
    if stats.nnz <= 0:
        return 0
    if np.isfinite(stats.v_sq) and stats.v_sq > 0:
        typical = float(np.sqrt(stats.v_sq / stats.nnz))
    elif np.isfinite(stats.v_sum) and stats.v_sum > 0:
        typical = stats.v_sum / stats.nnz
    elif stats.v_sum > 0:  # ΣV overflowed: the mean non-zero is within a factor nnz of this
        typical = np.finfo(np.float64).max / stats.nnz
    else:
        return 0
    exponent = float(np.log2(typical))
    if not np.isfinite(exponent):
        return 0
    return 2 * int(np.floor(exponent / 2 + 0.5))


def factor_dtype(dtype) -> np.dtype:
    """float32 stays float32; everything else is factored in float64."""
    dtype = np.dtype(dtype)
    if dtype == np.float32 or dtype == np.float64:
        return dtype
    if dtype.kind in "biuf":
        return np.dtype(np.float64)
    if dtype.kind == "c":
        raise InvalidMatrixError(
            "Complex data not supported: " + expected("a numeric matrix (bool, integer or float)", str(dtype))
        )
    raise InvalidMatrixError(expected("a numeric matrix (bool, integer or float)", str(dtype)))


def numeric_array(X) -> np.ndarray:
    """X as a numpy array; an object array of numbers becomes float64 (as scikit-learn reads it),
    and one holding anything else is a :class:`~dnmf.errors.MatrixTypeError`."""
    X = np.asarray(X)
    if X.dtype != object:
        return X
    try:
        return X.astype(np.float64)
    except (TypeError, ValueError) as e:
        raise MatrixTypeError(
            f"Expected a matrix of numbers; an entry of the object array cannot be read as one ({e})."
        ) from e


def auto_row_block(
    n: int, p: int, itemsize: int, density: float = 1.0, min_blocks: int = MIN_BLOCKS,
    parallelism: int | None = None, target_bytes: int | None = None,
) -> int:
    """Rows per block: about ``target_bytes`` (default TARGET_BLOCK_BYTES) each, and at least
    ``min_blocks`` blocks.

    The number of blocks is rounded up to a multiple of ``parallelism`` (default: the
    threads that will run the tasks, :func:`default_parallelism`) so no thread idles
    through the last round of an iteration.
    """
    bytes_per_row = max(1.0, p * itemsize * (density if density < 1 else 1.0))
    rows = int((target_bytes or TARGET_BLOCK_BYTES) // bytes_per_row)
    rows = max(1, min(n, rows, math.ceil(n / min_blocks)))
    workers = default_parallelism() if parallelism is None else max(1, int(parallelism))
    blocks = math.ceil(n / rows)
    blocks = min(n, math.ceil(blocks / workers) * workers)
    return max(1, math.ceil(n / blocks))


def default_parallelism() -> int:
    """How many tasks run at once: the threads of the current distributed client's workers,
    else dask's ``num_workers`` setting, else the number of CPUs."""
    try:
        from distributed import get_client

        client = get_client()
        threads = sum(client.nthreads().values())
        if threads:
            return threads
    except (ImportError, ValueError):
        pass
    return int(dask.config.get("num_workers", None) or os.cpu_count() or 1)


def _row_chunks(n: int, rows: int | tuple[int, ...] | None, default: int) -> tuple[int, ...]:
    if isinstance(rows, tuple):
        if sum(rows) != n:
            raise InvalidMatrixError(expected(f"row chunks summing to {n}", rows))
        return rows
    size = default if rows is None else int(rows)
    if size < 1:
        raise InvalidMatrixError(expected("a positive number of rows per chunk", rows))
    full, rest = divmod(n, size)
    return (size,) * full + ((rest,) if rest else ())


def _from_sparse(X, layout: _Layout) -> da.Array:
    X = sp.csr_matrix(X)
    density = X.nnz / max(1, X.shape[0] * X.shape[1])
    chunks = _sparse_chunks(X.shape, X.dtype.itemsize, density, layout)
    if len(chunks[1]) == 1:
        return from_blocks("dnmf-V", [[_csr_rows(X, r0, r1)] for r0, r1 in _bounds(chunks[0])], chunks, X.dtype, meta=X[:0])
    # Column blocks of CSR cannot be views: each task slices its tile from X.
    name = f"dnmf-V-{uuid.uuid4().hex}"
    return da.from_array(X, chunks=chunks, asarray=False, name=name, meta=X[:0])


def _bounds(chunks: tuple[int, ...]) -> list[tuple[int, int]]:
    edges = np.cumsum((0, *chunks)).tolist()
    return list(zip(edges, edges[1:]))


def _csr_rows(X: sp.csr_matrix, start: int, stop: int) -> sp.csr_matrix:
    """Rows ``start:stop`` of X as a CSR matrix sharing X's values and column indices.

    Slicing (``X[start:stop]``) copies them, and a fit sliced its row blocks once per pass:
    V's size in short-lived copies each iteration, which glibc's default allocator kept as
    much as 1 GB of for a 0.6 GB V.
    """
    lo, hi = X.indptr[start], X.indptr[stop]
    block = sp.csr_matrix((stop - start, X.shape[1]), dtype=X.dtype)
    block.data, block.indices = X.data[lo:hi], X.indices[lo:hi]
    block.indptr = (X.indptr[start : stop + 1] - lo).astype(X.indptr.dtype, copy=False)
    block.has_sorted_indices = X.has_sorted_indices
    return block


# A sparse block's kernels hold temporaries the size of its non-zeros, where the dense kernels
# work in row tiles: reading a block from its store (21 MiB traced for an 8 MiB CSR block),
# scipy's transposed product (a copy of the block's values and indices), WH at the non-zeros for
# the KL objective. MU-KL's step peaked at 51 MiB on that block before the compiled KL kernels
# (dnmf.kernels.sparse_kl), which hold only WH. So when the block budget is sized for the
# workers' memory, sparse blocks take this fraction of it.
SPARSE_BUDGET_FRACTION = 1 / 4


def _sparse_chunks(shape, itemsize: int, density: float, layout: _Layout, native=None) -> tuple:
    """The chunks of a sparse V of ``shape`` and ``density`` (stored entries / n·p): row blocks
    of about the block budget in CSR bytes (values and column indices; a fraction of a budget
    sized for the workers, see ``SPARSE_BUDGET_FRACTION``), or a grid. ``native`` (a dask
    array's chunks) are kept when they already are row blocks of about that size."""
    entry_bytes = itemsize * 2 * min(1.0, density)
    if layout.block_bytes is not None:
        layout = replace(layout, block_bytes=max(1, int(layout.block_bytes * SPARSE_BUDGET_FRACTION)))
    cols = layout.columns(shape, entry_bytes)
    if cols is None:
        default = auto_row_block(*shape, itemsize * 2, density=density, target_bytes=layout.block_bytes)
        if native is not None:
            return _row_block_chunks(shape, native, layout.chunks, default, keep_small=False)
        return (_row_chunks(shape[0], layout.chunks, default), (shape[1],))
    return (layout.rows(shape, entry_bytes, cols), cols)


# The density of a dask array of sparse blocks is estimated from its first chunks of rows
# covering at least this many rows.
DENSITY_SAMPLE_ROWS = 4096


def sampled_density(X: da.Array) -> float:
    """The density of a dask array of sparse blocks, estimated from its first row chunks (at
    least ``DENSITY_SAMPLE_ROWS`` rows, read once): the rest of V is not read to lay it out."""
    ends = np.cumsum(X.chunks[0])
    rows = int(ends[min(len(ends) - 1, int(np.searchsorted(ends, DENSITY_SAMPLE_ROWS)))])
    first = X[:rows].compute()
    cells = first.shape[0] * first.shape[1]
    return (first.nnz if sp.issparse(first) else int(np.count_nonzero(first))) / max(1, cells)


def open_zarr_node(path_or_url: str):
    """The Zarr array or group at ``path_or_url``, read-only.

    Raises :class:`StoreError` when nothing is there, or when what is there cannot be read as
    Zarr (metadata missing a required field, unparsable, unsupported), naming the metadata
    file and the problem.
    """
    import zarr

    path = str(path_or_url)
    local = "://" not in path
    if local and not os.path.exists(path):
        raise StoreError(no_such_path("Zarr array", path))
    try:
        return zarr.open(store=path, mode="r")
    except Exception as e:  # zarr raises several types for a bad store
        raise StoreError(f"Cannot open {path!r} as a Zarr array: {_zarr_problem(path, e)}") from e


def _zarr_problem(path: str, error: Exception) -> str:
    """What is wrong with the store at ``path``, from the error Zarr raised opening it."""
    metadata = [name for name in ("zarr.json", ".zarray", ".zgroup") if os.path.isfile(os.path.join(path, name))]
    where = repr(os.path.join(path, metadata[0])) if metadata else "its metadata"
    if isinstance(error, KeyError):
        return (
            f"{where} lacks the required field {error.args[0]!r} (a damaged or hand-written store). "
            "Write the store again (dnmf convert) or restore its metadata."
        )
    return f"{type(error).__name__}: {error}. Check {where}, or write the store again (dnmf convert)."


def _open_zarr(path_or_url: str, allow_group: bool = False):
    import zarr

    node = open_zarr_node(path_or_url)
    if not allow_group and not isinstance(node, zarr.Array):
        raise StoreError(
            f"{path_or_url!r} is a Zarr group, not an array; give the path of the array inside it."
        )
    return node


def _rechunk_rows(arr: da.Array, rows_per_block, default: int, align: int = 1) -> da.Array:
    """Row blocks holding all columns, aligned to ``align`` rows (the store's chunk)."""
    chunks = _row_block_chunks(arr.shape, arr.chunks, rows_per_block, default, align)
    return arr if chunks == arr.chunks else arr.rechunk(chunks)


def _row_block_chunks(shape, chunks, rows_per_block, default: int, align: int = 1, keep_small: bool = True) -> tuple:
    """The chunks of row blocks holding all columns for an array of ``shape`` and ``chunks``:
    these chunks when they already are such blocks of a fitting size (at most 2 x ``default``
    rows, and, unless ``keep_small``, at least half of it), else blocks of ``rows_per_block``
    rows (by default ``default`` rounded down to ``align``)."""
    n, p = shape
    if rows_per_block is None:
        same = len(chunks[1]) == 1
        big_enough = keep_small or 2 * max(chunks[0]) >= min(default, n)
        if same and big_enough and max(chunks[0]) <= 2 * default and len(chunks[0]) >= min(MIN_BLOCKS, n):
            return tuple(chunks)
        rows = max(align, (default // align) * align)
    else:
        rows = rows_per_block
    return (_row_chunks(n, rows, default), (p,))


def open_matrix(
    X, chunks: int | tuple | None = None, block_bytes: int | None = None, column_chunks=None, layer: str | None = None
) -> Matrix:
    """Lay out any supported input as row blocks of V (or a 2-D grid), lazily.

    Parameters
    ----------
    X : ndarray, scipy.sparse matrix, dask array, zarr.Array, AnnData, or str / os.PathLike
        The matrix V of shape (n_samples, n_features). A string is the path or URL of a Zarr
        array, of a Zarr group holding a sparse matrix (AnnData's encoding: dnmf's own sparse
        stores, an AnnData ``.zarr`` store) or of an AnnData ``.h5ad`` file, opened read-only;
        a sparse matrix on disk is read by row blocks, never whole.
    chunks : int or tuple of int, optional
        Rows per block (or the row chunk sizes). By default about 64 MiB per block (of CSR
        values and indices for sparse V), at least four blocks, aligned with the Zarr chunks.
    block_bytes : int, optional
        The size the default blocks aim at instead of 64 MiB (smaller for workers with
        little memory: see :func:`dnmf.run.plan.block_bytes_for_workers`).
    column_chunks : None, "auto", int or tuple of int
        None: row blocks holding all columns. An int below p (columns per chunk) or a tuple
        (the column chunk sizes): a 2-D grid of chunks. "auto": the grid only when
        ``MIN_BLOCK_ROWS`` rows of V would not fit in a block (:func:`auto_column_chunk`).
    layer : str, optional
        For an AnnData input (in memory, backed, ``.h5ad`` or ``.zarr``): the layer to factor
        instead of X.
    """
    if isinstance(X, Matrix):
        return X
    X_open, source = resolve_input(X, layer)
    layout = _Layout(chunks, block_bytes, column_chunks)
    if isinstance(X_open, ondisk.DiskMatrix):
        return _matrix_from_disk(X_open, layout)
    try:
        import zarr

        if isinstance(X_open, zarr.Array):
            return _matrix_from_zarr(X_open, layout, source=source or str(X_open.store_path))
    except ImportError:  # pragma: no cover - zarr is a dependency
        pass
    X = X_open
    if isinstance(X, da.Array):
        _check_2d(X.shape)
        dtype = factor_dtype(X.dtype)
        if sp.issparse(X._meta):
            chunks = _sparse_chunks(X.shape, X.dtype.itemsize, sampled_density(X), layout, native=X.chunks)
            return Matrix(X if chunks == X.chunks else X.rechunk(chunks), dtype, False, True, "dask")
        cols = layout.columns(X.shape, dtype.itemsize)
        if cols is None:
            default = auto_row_block(X.shape[0], X.shape[1], dtype.itemsize, target_bytes=block_bytes)
            return Matrix(_rechunk_rows(X, chunks, default), dtype, False, False, "dask")
        return Matrix(X.rechunk((layout.rows(X.shape, dtype.itemsize, cols), cols)), dtype, False, False, "dask")
    if sp.issparse(X):
        _check_2d(X.shape)
        data = _from_sparse(X, layout)
        return Matrix(data, factor_dtype(X.dtype), True, True, source or "scipy.sparse", nnz=int(X.nnz))
    if isinstance(X, (np.ndarray, list, tuple)) or hasattr(X, "__array__"):
        X = numeric_array(X)
        _check_2d(X.shape)
        dtype = factor_dtype(X.dtype)
        cols = layout.columns(X.shape, X.dtype.itemsize)
        if cols is None:
            default = auto_row_block(X.shape[0], X.shape[1], X.dtype.itemsize, target_bytes=block_bytes)
            cols = (X.shape[1],)
            rows = _row_chunks(X.shape[0], chunks, default)
        else:
            rows = layout.rows(X.shape, X.dtype.itemsize, cols)
        return Matrix(_block_views(X, rows, cols), dtype, True, False, source or "numpy")
    raise InvalidMatrixError(
        expected(
            "a numpy array (or nested lists of numbers), scipy.sparse matrix, dask array, zarr.Array, AnnData, "
            "or the path of a Zarr store or .h5ad file", type(X).__name__,
        )
    )


def is_anndata(X) -> bool:
    """An AnnData object (in memory or backed), recognised without importing anndata."""
    return all(hasattr(X, name) for name in ("X", "layers", "obsm", "varm", "isbacked"))


def resolve_input(X, layer: str | None = None) -> tuple[object, str | None]:
    """(what to lay out, where it came from) for an input: a path becomes its Zarr array or its
    :class:`~dnmf.data.ondisk.DiskMatrix` (X or ``layer`` of an AnnData store); an AnnData
    object its X or ``layer`` (a backed one the matrix in its file); anything else itself."""
    if isinstance(X, (str, os.PathLike)):
        path = os.fspath(X)
        if ondisk.is_anndata_path(path):
            return ondisk.open_h5ad(path, layer), path
        node = _open_zarr(path, allow_group=True)
        import zarr

        if isinstance(node, zarr.Array):
            if layer is not None:
                raise ParameterError(f"{path!r} is a Zarr array, not an AnnData store: do not pass layer={layer!r}.")
            return node, path
        return ondisk.open_zarr_group(path, node, layer), path
    if is_anndata(X):
        return _anndata_matrix(X, layer)
    if layer is not None:
        raise ParameterError(
            f"layer={layer!r} picks a matrix of an AnnData input (an AnnData object, a .h5ad file or an "
            f"AnnData .zarr store), not of a {type(X).__name__}."
        )
    return X, None


def _anndata_matrix(adata, layer: str | None) -> tuple[object, str]:
    """X or ``layer`` of an AnnData object; for a backed one, the matrix in its file."""
    filename = getattr(adata, "filename", None)
    if adata.isbacked and filename is not None:
        path = os.fspath(filename)
        return ondisk.open_h5ad(path, layer), path
    if layer is None:
        X = adata.X
        if X is None:
            raise InvalidMatrixError("The AnnData object has no X; pass layer=NAME to factor one of its layers.")
        return X, "AnnData.X"
    if layer not in adata.layers:
        raise ParameterError(f"The AnnData object has no layer {layer!r}; its layers are {sorted(adata.layers.keys())}.")
    return adata.layers[layer], f"AnnData.layers[{layer!r}]"


# The row layout wants row blocks of at least this many rows holding all columns; a V too
# wide for that within the block budget is laid out as a 2-D grid by column_chunks="auto".
MIN_BLOCK_ROWS = 256


def auto_column_chunk(n: int, p: int, itemsize: float, target_bytes: int | None = None) -> int:
    """Columns per chunk for ``column_chunks="auto"``: p (row blocks) when ``MIN_BLOCK_ROWS``
    rows of V fit in ``target_bytes``; else about square chunks of that size.

    ``itemsize`` is the bytes per entry (times the density for sparse V).
    """
    target = target_bytes or TARGET_BLOCK_BYTES
    if min(n, MIN_BLOCK_ROWS) * p * itemsize <= target:
        return p
    side = max(MIN_BLOCK_ROWS, int(math.sqrt(target / itemsize)))
    return int(max(1, min(p, target // (min(n, side) * itemsize))))


@dataclass(frozen=True)
class _Layout:
    """The chunking asked for: rows (``chunks``), columns (``column_chunks``), block budget."""

    chunks: int | tuple | None
    block_bytes: int | None
    column_chunks: object

    def columns(self, shape, itemsize: float, align: int = 1) -> tuple[int, ...] | None:
        """The column chunks of a grid, or None for row blocks holding all columns."""
        n, p = shape
        cols = self.column_chunks
        if cols is None:
            return None
        if isinstance(cols, str):
            if cols != "auto":
                raise InvalidMatrixError(expected('column_chunks None, "auto", an int or a tuple', cols))
            cols = auto_column_chunk(n, p, itemsize, self.block_bytes)
            if cols < p:
                cols = max(align, (cols // align) * align)
        if isinstance(cols, tuple):
            if sum(cols) != p or min(cols) < 1:
                raise InvalidMatrixError(expected(f"column chunks summing to {p}", cols))
            return cols if len(cols) > 1 else None
        chunks = _row_chunks(p, int(cols), p)
        return chunks if len(chunks) > 1 else None

    def rows(self, shape, itemsize: float, cols: tuple[int, ...], align: int = 1) -> tuple[int, ...]:
        """Row chunks of a grid: ``chunks``, else blocks of about the budget with ``cols`` columns."""
        n = shape[0]
        if self.chunks is not None:
            return _row_chunks(n, self.chunks, n)
        target = self.block_bytes or TARGET_BLOCK_BYTES
        rows = max(1, int(target // (max(cols) * itemsize)))
        rows = min(n, max(align, (rows // align) * align))
        return _row_chunks(n, rows, n)


def _block_views(X: np.ndarray, row_chunks: tuple[int, ...], col_chunks: tuple[int, ...]) -> da.Array:
    """A dask array whose blocks are views of X (``da.from_array`` copies them: +V)."""
    rows, cols = np.cumsum((0, *row_chunks)).tolist(), np.cumsum((0, *col_chunks)).tolist()
    views = [[X[r0:r1, c0:c1] for c0, c1 in zip(cols, cols[1:])] for r0, r1 in zip(rows, rows[1:])]
    return from_blocks("dnmf-V", views, chunks=(row_chunks, col_chunks), dtype=X.dtype)


def _matrix_from_zarr(arr, layout: _Layout, source: str) -> Matrix:
    _check_2d(arr.shape)
    dtype = factor_dtype(arr.dtype)
    itemsize = arr.dtype.itemsize
    cols = layout.columns(arr.shape, itemsize, align=arr.chunks[1])
    if cols is None:
        default = auto_row_block(arr.shape[0], arr.shape[1], itemsize, target_bytes=layout.block_bytes)
        store_chunks = normalize_chunks(arr.chunks, arr.shape)
        chunks = _row_block_chunks(arr.shape, store_chunks, layout.chunks, default, align=arr.chunks[0])
    else:
        chunks = (layout.rows(arr.shape, itemsize, cols, align=arr.chunks[0]), cols)
    # One task reads each block (the store's chunks it spans) from the Zarr array, a key of its
    # own, so that the tasks using a block can read it themselves (Matrix.reads_inline). With
    # the array copied into every task instead, each worker kept ~20 KiB of it per task ran.
    blocks = da.from_array(arr, chunks, name=f"from-zarr-{tokenize(arr, chunks)}", getitem=_read_chunk)
    return Matrix(blocks, dtype, False, False, source, reads_inline=True, store_chunks=tuple(arr.chunks))


def _matrix_from_disk(matrix: ondisk.DiskMatrix, layout: _Layout) -> Matrix:
    """V read from a matrix on disk (:mod:`dnmf.data.ondisk`) by row blocks: one task reads
    each block's rows (indptr, then their entries), nested in the tasks that use it."""
    if matrix.encoding == ondisk.CSC:
        raise StoreError(
            f"{matrix.where!r} is stored by columns (CSC): every row block would read all of it. "
            "Convert it once to CSR, out of core: dnmf convert SRC DST.zarr (then fit DST.zarr)."
        )
    n, p = matrix.shape
    itemsize = matrix.dtype.itemsize
    if matrix.sparse:
        chunks = _sparse_chunks(matrix.shape, itemsize, matrix.density, layout)
        meta = sp.csr_matrix((0, 0), dtype=matrix.dtype)
    else:
        cols = layout.columns(matrix.shape, itemsize)
        if cols is None:
            default = auto_row_block(n, p, itemsize, target_bytes=layout.block_bytes)
            chunks = (_row_chunks(n, layout.chunks, default), (p,))
        else:
            chunks = (layout.rows(matrix.shape, itemsize, cols), cols)
        meta = np.empty((0, 0), dtype=matrix.dtype)
    name = f"from-disk-{tokenize(matrix, chunks)}"
    blocks = da.from_array(matrix, chunks, name=name, asarray=False, meta=meta, getitem=_read_disk_block)
    nnz = matrix.nnz if matrix.sparse else None
    return Matrix(blocks, factor_dtype(matrix.dtype), False, matrix.sparse, matrix.where, reads_inline=True, nnz=nnz)


def _read_disk_block(matrix: ondisk.DiskMatrix, index: tuple[slice, ...], asarray: bool = False, lock=None):
    """Block ``index`` of a matrix on disk, or a :class:`StoreError` naming it, the block and
    what to do when the file cannot give it."""
    try:
        return matrix[index]
    except Exception as e:
        rows, cols = index
        raise StoreError(
            f"Cannot read rows {rows.start}-{rows.stop}, columns {cols.start}-{cols.stop} of {matrix.where!r}: "
            f"{type(e).__name__}: {e}. The file is damaged or unreachable there; restore it from a copy."
        ) from e


def _read_chunk(arr, index: tuple[slice, ...], asarray: bool = True, lock=None):
    """Block ``index`` of the Zarr array ``arr`` (dask's getter), or a :class:`StoreError` naming
    the array, the block and what to do when the store cannot give it (a damaged chunk file,
    a codec error, a store gone away)."""
    try:
        return getter(arr, index, asarray=asarray, lock=lock)
    except Exception as e:
        rows, cols = index
        raise StoreError(
            f"Cannot read rows {rows.start}-{rows.stop}, columns {cols.start}-{cols.stop} of the Zarr "
            f"array at {str(arr.store_path)!r} (stored in chunks of {arr.chunks}): {type(e).__name__}: {e}. "
            "The store is damaged or unreachable there; restore it from a copy or write it again "
            "(dnmf convert)."
        ) from e


def _check_2d(shape) -> None:
    """One error for a V that is not 2-D or is empty, in scikit-learn's words first."""
    if len(shape) != 2:
        raise InvalidMatrixError(
            expected("a 2-D matrix (n_samples, n_features)", f"shape {tuple(shape)}")
            + " Reshape your data either using array.reshape(-1, 1) if it has a single feature "
            "or array.reshape(1, -1) if it is a single sample."
        )
    for size, what in ((shape[0], "sample(s)"), (shape[1], "feature(s)")):
        if size < 1:
            raise InvalidMatrixError(
                f"Found array with 0 {what} (shape={tuple(shape)}) while a minimum of 1 is required. "
                + expected("a non-empty matrix", f"shape {tuple(shape)}")
            )


# ---------------------------------------------------------------------------
# One pass of statistics


def scan_matrix(matrix: Matrix, with_xlogx: bool = False) -> MatrixStats:
    """One pass over V: ‖V‖², ΣV, nnz and the negative / non-finite entries.

    ``with_xlogx`` also sums V log V, the constant of the KL objective.
    """
    rows, cols = matrix.row_offsets, matrix.col_offsets
    grid = matrix.grid_inputs()
    chunks = [chunk for row in grid for chunk in row]
    row_starts = [rows[i] for i, row in enumerate(grid) for _ in row]
    col_starts = cols[:-1] * len(grid)
    total = map_reduce(
        "dnmf-scan", kernels.block_stats, chunks, row_starts, with_xlogx, col_starts,
        combine=kernels.add_stats, dependencies=[matrix.data],
    )
    (stats,) = dask.compute(total)
    return MatrixStats.from_blocks(stats, matrix.shape)


def kl_offset(matrix: Matrix, known: float | None, cache: dict) -> float:
    """Σ V log V − Σ V, the KL objective's constant: ``known`` when given, else one scan of V,
    kept in ``cache``."""
    if known is not None:
        return known
    if "kl_offset" not in cache:
        stats = scan_matrix(matrix, with_xlogx=True)
        cache["kl_offset"] = stats.v_xlogx - stats.v_sum
    return cache["kl_offset"]


def validate_stats(stats: MatrixStats, beta: float) -> None:
    """Raise one clear error for negative, non-finite, or (for β ≤ 0) zero entries."""
    if stats.n_nonfinite:
        raise InvalidMatrixError(
            f"The matrix has {stats.n_nonfinite} NaN or infinite entries (first at row, column "
            f"{stats.first_nonfinite}); NMF needs finite values. Remove or impute them."
        )
    if stats.n_negative:
        raise InvalidMatrixError(
            f"Negative values in data passed to NMF (input X): the matrix has {stats.n_negative} negative "
            f"entries (first at row, column {stats.first_negative}); NMF needs non-negative values."
        )
    n_cells = stats.shape[0] * stats.shape[1]
    if beta <= 0 and stats.nnz < n_cells:
        raise InvalidMatrixError(
            f"The matrix has {n_cells - stats.nnz} zero entries, and the β-divergence with "
            f"β = {beta} (e.g. Itakura-Saito) is undefined at zero. Add a small offset or use "
            "beta_loss='kullback-leibler' or 'frobenius'."
        )
    if stats.v_sum == 0:
        raise InvalidMatrixError("The matrix is all zeros: there is nothing to factor.")
