"""Fitting a V larger than memory on a cluster: row-block size, V caching, W re-rooting.

Three decisions the estimator takes before and while it iterates:

- **Row blocks that fit a worker.** :func:`block_bytes_for_workers` shrinks the default row
  block (64 MiB) so that a worker holds a few blocks at once well below its memory limit.
- **Cache or stream V** (``cache="auto" | True | False``). :func:`plan_cache` keeps V in
  cluster memory (``persist``) when it fits in ``CACHE_FRACTION`` of the workers' total
  memory limit (of the available RAM under the threaded scheduler); otherwise every pass
  reads V's row blocks from the store again, one block per task.
- **Bounded lineage.** A dask.distributed scheduler keeps the lineage of the persisted W so
  that it can recompute blocks lost with a worker: a few tasks per row block and iteration,
  growing without bound. :class:`Rerooting` wraps a solver and, every ``every`` iterations,
  writes W (by the workers, row block by row block) to a Zarr array in a spill directory and
  reloads it, so nothing depends on older iterations any more. The values are bitwise the
  same, so re-rooting never changes a result.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np

from ..cluster import worker_memory_limits, worker_threads
from ..errors import ParameterError, expected
from ..data.store import TARGET_BLOCK_BYTES, Matrix

logger = logging.getLogger(__name__)

# V is cached when it takes at most this fraction of the workers' total memory limit.
CACHE_FRACTION = 0.5
# A worker thread should hold a V block of at most this fraction of its worker's memory limit:
# the block, its read buffer and the next block queued on the worker stay well below the
# limit, next to the ~100 MiB a worker process needs for itself.
BLOCK_FRACTION_PER_THREAD = 1 / 32
MIN_BLOCK_BYTES = 2**20
# Re-root W this often (iterations) under dask.distributed unless told otherwise.
DEFAULT_REROOT_EVERY = 20
CACHE_CHOICES = ("auto", True, False)

V_IN_MEMORY = "in-memory"  # given as numpy / scipy and run by the threaded scheduler
V_CACHED = "cached"  # persisted in the workers' (or this process's) memory
V_STREAMED = "streamed"  # read from its store on every pass


# ---------------------------------------------------------------------------
# Row blocks


def block_bytes_for_workers(client) -> int | None:
    """Target bytes of a row block for ``client``'s workers; None (the default) without one.

    The smallest worker decides: its memory limit times ``BLOCK_FRACTION_PER_THREAD`` divided
    by its threads, at most the default ``TARGET_BLOCK_BYTES``.
    """
    if client is None:
        return None
    limits, threads = worker_memory_limits(client), worker_threads(client)
    budgets = [limit * BLOCK_FRACTION_PER_THREAD / n for limit, n in zip(limits, threads) if limit > 0]
    if not budgets:
        return None
    return int(max(MIN_BLOCK_BYTES, min(TARGET_BLOCK_BYTES, min(budgets))))


def warn_if_blocks_too_big(matrix: Matrix, block_bytes: int | None) -> None:
    """Log a warning when V's row blocks are far larger than the workers can hold comfortably.

    This happens when the store's chunks are larger than the budget (a task reads a whole chunk)
    or when ``chunks`` was given explicitly.
    """
    if block_bytes is None:
        return
    largest = max(matrix.row_chunks) * max(matrix.col_chunks) * matrix.data.dtype.itemsize
    if not matrix.sparse and largest > 4 * block_bytes:
        logger.warning(
            "blocks of V take up to %.0f MiB, more than 4 x the %.0f MiB the workers' memory "
            "limit suggests; rechunk the store to fewer rows per chunk or pass a smaller `chunks`",
            largest / 2**20, block_bytes / 2**20,
        )


# ---------------------------------------------------------------------------
# Caching V


@dataclass(frozen=True)
class CachePlan:
    """Where V lives during the fit and why.

    storage : "in-memory", "cached" or "streamed".
    v_bytes : V's size in memory (dense; CSR arrays for sparse V), None when unknown.
    budget_bytes : the memory V may take to be cached under ``cache="auto"``.
    """

    storage: str
    v_bytes: int | None
    budget_bytes: int | None

    @property
    def cached(self) -> bool:
        return self.storage != V_STREAMED


def check_cache(cache) -> None:
    if not any(cache is choice or (isinstance(cache, str) and cache == choice) for choice in CACHE_CHOICES):
        raise ParameterError(expected('cache "auto", True or False', cache))


def matrix_bytes(matrix: Matrix, nnz: int | None = None) -> int | None:
    """V's size in memory: n·p·itemsize dense; its CSR arrays sparse (None until nnz is known)."""
    n, p = matrix.shape
    itemsize = matrix.data.dtype.itemsize
    if not matrix.sparse:
        return n * p * itemsize
    if nnz is None:
        return None
    return nnz * (itemsize + 4) + (n + 1) * 8


def cache_budget(client) -> int:
    """``CACHE_FRACTION`` of the workers' total memory limit (of available RAM without a client)."""
    import psutil

    if client is None:
        return int(CACHE_FRACTION * psutil.virtual_memory().available)
    limits = worker_memory_limits(client)
    if not limits:
        return 0
    # A worker without a limit may use its share of this machine's memory (a guess).
    unlimited_share = psutil.virtual_memory().available // len(limits)
    return int(CACHE_FRACTION * sum(limit or unlimited_share for limit in limits))


def plan_cache(cache, matrix: Matrix, client, nnz: int | None = None) -> CachePlan | None:
    """Decide where V lives; None when it depends on V's nnz, not known yet (sparse V)."""
    check_cache(cache)
    v_bytes = matrix_bytes(matrix, nnz)
    if matrix.in_memory and client is None:
        return CachePlan(V_IN_MEMORY, v_bytes, None)
    if cache is True:
        return CachePlan(V_CACHED, v_bytes, None)
    if cache is False:
        return CachePlan(V_STREAMED, v_bytes, None)
    if v_bytes is None:
        return None
    budget = cache_budget(client)
    return CachePlan(V_CACHED if v_bytes <= budget else V_STREAMED, v_bytes, budget)


def apply_cache(plan: CachePlan, matrix: Matrix) -> Matrix:
    """V persisted in memory when the plan says "cached", else unchanged."""
    if plan.storage != V_CACHED:
        return matrix
    logger.info("caching V (%s bytes) in memory", plan.v_bytes)
    (data,) = dask.persist(matrix.data)
    _wait(data)
    return dataclasses.replace(matrix, data=data, reads_inline=False)


def _wait(arr: da.Array) -> None:
    """Block until a persisted array is in (cluster) memory."""
    try:
        from distributed import futures_of, wait
    except ImportError:  # pragma: no cover - distributed is a dependency
        return
    futures = futures_of(arr)
    if futures:
        wait(futures)


# ---------------------------------------------------------------------------
# Re-rooting W


def resolve_reroot_every(reroot_every, client) -> int:
    """0 (off) without a distributed client or when asked; DEFAULT_REROOT_EVERY by default."""
    if reroot_every is not None and (
        isinstance(reroot_every, bool) or not isinstance(reroot_every, (int, np.integer)) or reroot_every < 0
    ):
        raise ParameterError(expected("reroot_every None, 0 (never) or a positive integer", reroot_every))
    if client is None:
        return 0
    return DEFAULT_REROOT_EVERY if reroot_every is None else int(reroot_every)


def reroot(X: da.Array, url: str) -> da.Array:
    """X (W in row blocks, or the grid's H in column blocks) written to a new Zarr array at
    ``url`` by the workers and read back, persisted.

    The result has X's values bit for bit and X's chunks, and depends on nothing but the
    Zarr array.
    """
    import zarr

    regular = all(_regular(sizes) for sizes in X.chunks)
    source = X if regular else X.rechunk(tuple(max(sizes) for sizes in X.chunks))
    target = zarr.create_array(
        store=url, shape=X.shape, chunks=tuple(sizes[0] for sizes in source.chunks), dtype=X.dtype,
        compressors=None, overwrite=False,
    )
    da.store(source, target, lock=False, compute=True)
    loaded = da.from_zarr(url, name=f"dnmf-rerooted-{uuid.uuid4().hex}")
    if not regular:
        loaded = loaded.rechunk(X.chunks)
    (loaded,) = dask.persist(loaded)
    _wait(loaded)
    return loaded


def _regular(sizes: tuple[int, ...]) -> bool:
    return all(size == sizes[0] for size in sizes[:-1]) and sizes[-1] <= sizes[0]


class Rerooting:
    """A solver that re-roots W every ``every`` iterations (see the module docstring).

    Wraps a :class:`~dnmf.solvers.Solver` or a :class:`~dnmf.grid.GridSolver`: ``start`` and
    ``step`` behave the same, except that after every ``every``-th step W (and the grid's H,
    whose partials are then recomputed from the reloaded W and H) comes from a fresh Zarr
    array in ``directory``. The two latest are kept (a lost worker's blocks are re-read from
    the latest); older ones are deleted; :meth:`close` deletes the directory if this object
    created it.

    solver : the solver to wrap.
    every : iterations between re-rootings (positive).
    directory : the spill directory, on a file system every worker can read and write (a
        shared one on a multi-node cluster), or an fsspec URL (``s3://bucket/spill``). None: a
        new temporary directory, deleted by :meth:`close`.
    """

    def __init__(self, solver, every: int, directory: str | os.PathLike | None = None):
        if every < 1:
            raise ParameterError(expected("a positive re-rooting interval", every))
        self.solver = solver
        self.every = int(every)
        self._owns_directory = directory is None
        base = dask.config.get("temporary-directory", None) or None
        if directory is None:
            directory = tempfile.mkdtemp(prefix="dnmf-reroot-", dir=base)
        elif not _is_url(directory):
            os.makedirs(directory, exist_ok=True)
        self.directory = os.fspath(directory)
        self.n_steps = 0
        self.n_reroots = 0
        self._spills: list[str] = []

    def __getattr__(self, name):
        # Everything but step (matrix, rule, start, ...) is the wrapped solver's.
        if name == "solver":
            raise AttributeError(name)
        return getattr(self.solver, name)

    def start(self, W, H):
        return self.solver.start(W, H)

    def step(self, state, evaluate: bool = True):
        step = self.solver.step(state, evaluate)
        self.n_steps += 1
        if self.n_steps % self.every:
            return step
        generation = self.n_reroots
        self._spills.append(generation)

        def spill(X: da.Array, label: str) -> da.Array:
            return reroot(X, self._spill_url(label, generation))

        if hasattr(self.solver, "rerooted"):  # the grid: H and the partials are on the workers too
            new_state = self.solver.rerooted(step.state, spill)
        else:
            new_state = dataclasses.replace(step.state, W=spill(step.state.W, "W"), steps=None)
        self.n_reroots += 1
        while len(self._spills) > 2:
            self._remove(self._spills.pop(0))
        return dataclasses.replace(step, state=new_state)

    def _spill_url(self, label: str, generation: int) -> str:
        return f"{self.directory.rstrip('/')}/{label}-{generation:06d}.zarr"

    def _remove(self, generation: int) -> None:
        for label in ("W", "H"):
            _remove_tree(self._spill_url(label, generation))

    def close(self) -> None:
        """Delete the spills (and the directory if this object created it); W must not need them."""
        for generation in self._spills:
            self._remove(generation)
        self._spills = []
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)


def _is_url(path) -> bool:
    return "://" in os.fspath(path)


def _remove_tree(path: str) -> None:
    """Delete a directory or an fsspec URL prefix, ignoring what is already gone."""
    if not _is_url(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    try:
        fs.rm(root, recursive=True)
    except FileNotFoundError:
        pass
