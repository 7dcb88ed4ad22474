"""The plan phase of a fit: where V lives and how it is cut, decided before iterating.

The decisions the fit pipeline (:mod:`dnmf.run.pipeline`) takes once V is open:

- **Row blocks that fit a worker.** :func:`block_bytes_for_workers` shrinks the default row
  block (64 MiB) so that a worker holds a few blocks at once well below its memory limit.
- **Cache or stream V** (``cache="auto" | True | False``). :func:`plan_cache` keeps V in
  cluster memory (``persist``) when it fits in ``CACHE_FRACTION`` of the workers' total
  memory limit (of the available RAM under the threaded scheduler); otherwise every pass
  reads V's row blocks from the store again, one block per task. A V given in memory (numpy,
  scipy.sparse) has no store the workers could read: under a distributed client its blocks
  are sent to the workers once and stay there (:mod:`dnmf.data.resident`), whatever ``cache``
  says.
- **Re-rooting** (:mod:`dnmf.run.reroot`) under dask.distributed, every
  :func:`reroot_interval` iterations.
- **In this thread or as graphs.** :func:`runs_locally`: a small in-memory V under dask's
  default scheduler runs the same kernels block by block in this thread.
- **BLAS threads.** :func:`blas_threads_for_scheduler`: single-threaded BLAS in this process
  while its cores run the tasks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass

import dask
import dask.array as da
from threadpoolctl import threadpool_limits

from ..cluster import current_client, worker_memory_limits, worker_threads, workers_share_this_machine
from ..data.resident import placed_for_the_fit, to_workers
from ..data.store import TARGET_BLOCK_BYTES, Matrix
from ..errors import ParameterError, StoreError

logger = logging.getLogger(__name__)

# V is cached when it takes at most this fraction of the workers' total memory limit.
CACHE_FRACTION = 0.5
# A worker thread should hold a V block of at most this fraction of its worker's memory limit:
# the block, its read buffer and the next block queued on the worker stay well below the
# limit, next to the ~100 MiB a worker process needs for itself.
BLOCK_FRACTION_PER_THREAD = 1 / 32
# A task reading more than this fraction of its worker's memory limit per thread at once (the
# stored chunk, compressed and decoded, the block cut from it, its neighbours' on the other
# threads) drives the worker past its limit: the nanny kills it, again on every retry, and the
# fit ends in KilledWorker. Such a V is refused before any task runs.
READ_FRACTION_PER_THREAD = 1 / 4
MIN_BLOCK_BYTES = 2**20
# Re-root W this often (iterations) under dask.distributed unless told otherwise.
DEFAULT_REROOT_EVERY = 20
# In-memory V up to this size runs the same kernels without building Dask graphs.
LOCAL_MAX_BYTES = 16 * 2**20

V_IN_MEMORY = "in-memory"  # given as numpy / scipy and run by the threaded scheduler
V_CACHED = "cached"  # persisted in the workers' (or this process's) memory; sent there once if in memory
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


def entry_bytes(matrix: Matrix) -> float:
    """Bytes per entry of V in a block: the dtype's; for sparse V (nnz known) its CSR values
    and column indices times the density."""
    itemsize = matrix.data.dtype.itemsize
    if matrix.sparse and matrix.nnz is not None:
        n, p = matrix.shape
        return (itemsize + 4) * matrix.nnz / (n * p)
    return itemsize


def read_bytes(matrix: Matrix) -> tuple[int, str]:
    """The most bytes one task reads whole to get a block of V, and what it reads: the block,
    or the stored chunk the block is cut from when that is larger (Zarr decodes whole chunks).
    A sparse block counts its CSR arrays at V's mean density."""
    itemsize = matrix.data.dtype.itemsize
    block = int(max(matrix.row_chunks) * max(matrix.col_chunks) * entry_bytes(matrix))
    if matrix.store_chunks is None:
        return block, "block"
    rows, cols = (min(c, s) for c, s in zip(matrix.store_chunks, matrix.shape))
    chunk = rows * cols * itemsize
    return (chunk, "chunk") if chunk >= block else (block, "block")


def _tightest_worker(client) -> tuple[int, int] | None:
    """(memory limit, threads) of the worker with the least memory per thread; None when no
    worker has a limit."""
    workers = [(limit, n) for limit, n in zip(worker_memory_limits(client), worker_threads(client)) if limit > 0]
    return min(workers, key=lambda w: w[0] / w[1]) if workers else None


def check_blocks_fit_workers(matrix: Matrix, client) -> None:
    """Refuse, before any task runs, a V whose blocks would kill ``client``'s workers: one task
    reads more than ``READ_FRACTION_PER_THREAD`` of the smallest worker's memory limit per
    thread; log a warning when the blocks are merely far larger than the workers hold
    comfortably (more than 4 x :func:`block_bytes_for_workers`).

    Raises
    ------
    StoreError
        When the store's chunks are too big (rechunk the store, or use bigger workers).
    ParameterError
        When the row blocks asked for (``chunks``) are too big.
    """
    if client is None or (matrix.sparse and matrix.nnz is None):
        return
    worker = _tightest_worker(client)
    if worker is None:
        return
    limit, threads = worker
    largest, what = read_bytes(matrix)
    mib = 2**20
    budget = limit * READ_FRACTION_PER_THREAD / threads
    comfortable = block_bytes_for_workers(client)
    if largest <= budget:
        if comfortable is not None and largest > 4 * comfortable:
            logger.warning(
                "blocks of V take up to %.0f MiB, more than 4 x the %.0f MiB the workers' memory "
                "limit suggests; rechunk the store to fewer rows per chunk or pass a smaller `chunks`",
                largest / mib, comfortable / mib,
            )
        return
    worker_text = (
        f"the {limit / mib:.0f} MiB memory limit of the smallest worker"
        f" ({threads} thread{'s' if threads != 1 else ''})"
    )
    need = largest / READ_FRACTION_PER_THREAD
    itemsize = matrix.data.dtype.itemsize
    if what == "chunk":
        rows, cols = (min(c, s) for c, s in zip(matrix.store_chunks, matrix.shape))
        fit_rows = max(1, int((comfortable or budget) // (cols * itemsize)))
        raise StoreError(
            f"The Zarr array at {matrix.source!r} is stored in chunks of {rows} x {cols} "
            f"({largest / mib:.0f} MiB decoded, read whole by each task), more than "
            f"{READ_FRACTION_PER_THREAD:.0%} of {worker_text}: the workers would be killed "
            f"reading it. Rechunk the store to at most {fit_rows} rows per chunk "
            f"(dnmf convert SRC DST --chunks {fit_rows}, or dask's rechunk), or use workers "
            f"with at least {need / mib:.0f} MiB of memory per thread."
        )
    fit_rows = max(1, int((comfortable or budget) // (max(matrix.col_chunks) * entry_bytes(matrix))))
    raise ParameterError(
        f"Row blocks of {max(matrix.row_chunks)} rows take {largest / mib:.0f} MiB each, more than "
        f"{READ_FRACTION_PER_THREAD:.0%} of {worker_text}: the workers would be killed reading them. "
        f"Pass chunks={fit_rows} or fewer rows (or leave chunks to dnmf), or use workers with at "
        f"least {need / mib:.0f} MiB of memory per thread."
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
    v_bytes = matrix_bytes(matrix, nnz)
    if matrix.in_memory:  # nothing to stream it from: in this process, or sent to the workers once
        if client is not None and v_bytes > cache_budget(client):
            logger.warning(
                "V (%.0f MiB, given in memory) takes more than half of the workers' memory; its blocks "
                "are sent to them all the same", v_bytes / 2**20,
            )
        return CachePlan(V_IN_MEMORY if client is None else V_CACHED, v_bytes, None)
    if cache is True:
        return CachePlan(V_CACHED, v_bytes, None)
    if cache is False:
        return CachePlan(V_STREAMED, v_bytes, None)
    if v_bytes is None:
        return None
    budget = cache_budget(client)
    return CachePlan(V_CACHED if v_bytes <= budget else V_STREAMED, v_bytes, budget)


def apply_cache(plan: CachePlan, matrix: Matrix) -> Matrix:
    """V persisted in memory when the plan says "cached", else unchanged. A V given in memory
    goes to the current distributed client's workers once, block by block, without a graph
    (:func:`~dnmf.data.resident.make_resident`)."""
    if plan.storage != V_CACHED:
        return matrix
    logger.info("caching V (%s bytes) in memory", plan.v_bytes)
    if matrix.in_memory and current_client() is not None:
        return dataclasses.replace(matrix, data=to_workers(matrix.data, "dnmf-V"), reads_inline=False)
    (data,) = dask.persist(matrix.data)
    wait_until_persisted(data)
    client = current_client()
    if client is not None and plan.v_bytes is not None:
        # A V the user persisted from an in-memory array can sit unaligned in the workers, or
        # more of it on one: copied aligned and evenly once here when there is room beside it.
        data = placed_for_the_fit(client, data, plan.v_bytes, cache_budget(client) - plan.v_bytes)
        wait_until_persisted(data)
    return dataclasses.replace(matrix, data=data, reads_inline=False)


def wait_until_persisted(arr: da.Array) -> None:
    """Block until a persisted array is in (cluster) memory."""
    try:
        from distributed import futures_of, wait
    except ImportError:  # pragma: no cover - distributed is a dependency
        return
    futures = futures_of(arr)
    if futures:
        wait(futures)


# ---------------------------------------------------------------------------
# Re-rooting, the layout, the executor, BLAS threads


def reroot_interval(reroot_every: int | None, client) -> int:
    """0 (off) without a distributed client or when asked; DEFAULT_REROOT_EVERY by default."""
    if client is None:
        return 0
    return DEFAULT_REROOT_EVERY if reroot_every is None else int(reroot_every)


def column_layout(column_chunks, mask, nan_is_missing: bool):
    """``column_chunks`` for :func:`~dnmf.data.store.open_matrix`: None (row blocks) instead of
    "auto" when entries are missing, which the grid does not handle; an explicit grid then is
    an error later."""
    if (column_chunks is None or isinstance(column_chunks, str)) and (mask is not None or nan_is_missing):
        return None
    return column_chunks


def runs_locally(matrix: Matrix, local) -> bool:
    """Whether to run the kernels block by block in this thread (``local`` True / False /
    "auto": small in-memory V under dask's default threaded or synchronous scheduler)."""
    if matrix.is_grid:
        return False
    if local != "auto":
        return bool(local)
    scheduler = dask.base.get_scheduler()
    default = scheduler is None or scheduler in (dask.threaded.get, dask.local.get_sync)
    n, p = matrix.shape
    return matrix.in_memory and default and n * p * matrix.dtype.itemsize <= LOCAL_MAX_BYTES


@contextlib.contextmanager
def blas_threads_for_scheduler(client=None):
    """Single-threaded BLAS in this process while its cores run the tasks: under dask's
    threaded scheduler, or with a distributed ``client`` whose workers share this machine.

    Dask's threads already use every core; BLAS threads on top oversubscribe them and make
    the results depend on the thread count. Beside local workers, this process only does
    r x p work (the H update), and idle OpenBLAS threads spin: they took ~100 ms of CPU per
    iteration from the workers of a 2-worker LocalCluster here.
    """
    scheduler = dask.base.get_scheduler()
    # None: no scheduler configured and no distributed client, so arrays use the threaded one.
    threaded = scheduler is None or scheduler is dask.threaded.get
    if threaded or (client is not None and workers_share_this_machine(client)):
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    else:
        yield
