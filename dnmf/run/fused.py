"""Fits of one V run together, sharing every pass over V (:mod:`dnmf.solvers.fused`).

:func:`fit_fused` runs each settings' fit through the one pipeline (:func:`dnmf.run.pipeline.fit`)
in a thread of its own, all members of one :class:`~dnmf.solvers.fused.FusedPasses`: the fits
in flight read each row block of V (or each chunk of a grid) once per pass between them, and V
is scanned once.
Each fit's result is bitwise the one it has run alone. The fits in flight are capped
(:func:`fused_width`) so that their W's (and W's update) fit :data:`FUSED_MEMORY_BYTES`, and,
under a distributed client, so that what they hold in the workers fits beside V there; the
others start as fits end.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import dask
from dask.system import CPU_COUNT

from ..cluster import current_client, worker_memory_limits, worker_threads
from ..graph import SPLIT_EVERY
from ..settings import FitSettings
from ..solvers.fused import FusedPasses
from .pipeline import Factorization, fit, open_v
from .plan import blas_threads_for_scheduler, matrix_bytes, plan_cache, reroot_interval

logger = logging.getLogger(__name__)

FUSED_MEMORY_BYTES = 2**30
MAX_FUSED_FITS = 256
# Under a distributed client, the fits in flight take at most this fraction of the tightest
# worker's memory limit, with its process and its share of V: dask spills from 60% and pauses
# a worker at 80%. 50 replicates of rank 10 on a 200000×20000 CSR (2%) in 2 workers × 2 GiB,
# all in flight under the W-only rule, held both workers paused for 14 minutes.
WORKER_FRACTION = 0.6
# A worker's own memory once dnmf's kernels are loaded (numpy, scipy, dask; 127-180 MiB here).
# What the workers report holding is not asked: right after a fit their heartbeats still
# count its V and W's (1.2 GB of 4 GiB after 50 replicates), and the next rank got 6 fits in
# flight instead of 37.
WORKER_BASE_BYTES = 160 * 2**20
# What numba and the stacked products' compiled loops add to a worker's process (108 MiB
# measured), when a CSR V's fused products are stacked (:mod:`dnmf.kernels.stacked`).
STACKED_BASE_BYTES = 110 * 2**20
# A worker's process grows by more than the arrays a fit holds there: 22 MiB per fit against
# the 14.4 MiB its arrays add up to (the case above, 20 fits in flight).
WORKER_OVERHEAD = 1.5


def fused_width(
    n_fits: int,
    shape: tuple[int, int],
    n_components: int,
    itemsize: int,
    *,
    limits: list[int] | tuple = (),
    v_held: int = 0,
    stacked_rows: int = 0,
    threads: int = 1,
    lineage_passes: int = 0,
) -> int:
    """How many fits to run together.

    In this process: their W's, twice (W and its update), within :data:`FUSED_MEMORY_BYTES`.
    On workers with memory ``limits`` (bytes each; ``v_held``: the bytes of V they will hold
    during the fits, spread evenly): per worker, each fit's share of W twice and the r×p
    partials of the blocks its summation tree waits for (up to :data:`~dnmf.graph.SPLIT_EVERY`),
    times ``WORKER_OVERHEAD``, within ``WORKER_FRACTION`` of the tightest worker's limit less
    its process (``WORKER_BASE_BYTES``) and its share of V. With ``stacked_rows`` (a CSR V's
    largest row block: the fits' products with it are stacked, :mod:`dnmf.kernels.stacked`),
    each fit also adds 2·(rows + p)·r values of temporaries to each of a worker's ``threads``
    running tasks, and the compiled loop takes ``STACKED_BASE_BYTES`` of each worker. With
    ``lineage_passes`` (the passes between two re-rootings of W, :mod:`dnmf.run.reroot`), each
    worker also keeps each fit's H and HHᵀ of that many passes: the passes' graphs hold them,
    and the scheduler keeps those graphs while W depends on them (to recompute a lost block).
    What else the workers hold is not counted (``max_concurrent=`` sets fewer fits). Workers
    without a limit are not counted; at least 1, at most ``n_fits`` and :data:`MAX_FUSED_FITS`.
    """
    n, p = shape
    w_bytes = 2 * n * n_components * itemsize
    width = min(n_fits, MAX_FUSED_FITS, FUSED_MEMORY_BYTES // max(1, w_bytes))
    limited = [limit for limit in limits if limit > 0]
    if limited:
        n_workers = len(limits)
        per_worker = WORKER_OVERHEAD * (w_bytes / n_workers + SPLIT_EVERY * n_components * p * itemsize)
        if stacked_rows:
            per_worker += threads * 2 * (stacked_rows + p) * n_components * itemsize
        per_worker += lineage_passes * (p + n_components) * n_components * itemsize
        base = WORKER_BASE_BYTES + (STACKED_BASE_BYTES if stacked_rows else 0)
        room = WORKER_FRACTION * min(limited) - base - v_held / n_workers
        width = min(width, room // per_worker)
    return int(max(1, width))


def _width_for(n_fits: int, matrix, settings: FitSettings, n_components: int) -> int:
    """:func:`fused_width` for ``matrix`` under the current client (if any)."""
    client = current_client()
    shape, itemsize = matrix.shape, matrix.dtype.itemsize
    in_process = fused_width(n_fits, shape, n_components, itemsize)
    if client is None:
        return in_process
    # V's bytes the workers will hold: all of V when it is in memory here (sent to them) or
    # cached there (a cache plan not known yet, before a sparse V's scan, counts as cached).
    v_bytes = matrix_bytes(matrix, matrix.nnz)
    if matrix.in_memory:
        cached = True
    else:
        plan = plan_cache(settings.cache, matrix, client, matrix.nnz)
        cached = plan is None or plan.cached
    v_held = v_bytes if cached and v_bytes is not None else 0
    stacked_rows = max(matrix.row_chunks) if matrix.sparse else 0
    # Without re-rooting, the passes' H's are kept for the whole fit.
    lineage_passes = reroot_interval(settings.reroot_every, client) or settings.max_iter
    width = fused_width(n_fits, shape, n_components, itemsize, limits=worker_memory_limits(client), v_held=v_held,
                        stacked_rows=stacked_rows, threads=max(worker_threads(client), default=1),
                        lineage_passes=lineage_passes)
    if width < in_process:
        logger.info("fusing %d fits at a time, not %d: what more would hold does not fit the workers' memory "
                    "beside V (max_concurrent= sets it)", width, n_fits)
    return width


@dataclass(frozen=True)
class FusedRuns:
    """What :func:`fit_fused` returns: each fit's summary, in order, and the passes over V made
    (``n_passes``; ``n_fit_passes`` the passes the fits would have made alone, scans aside)."""

    results: list
    n_passes: int
    n_fit_passes: int


def _keep_all(fact: Factorization) -> Factorization:
    return fact


def fit_fused(
    X,
    settings: Sequence[FitSettings],
    *,
    summarize: Callable[[Factorization], object] = _keep_all,
    max_concurrent: int | None = None,
) -> FusedRuns:
    """Fit V once per item of ``settings``, the fits sharing their passes over V.

    Parameters
    ----------
    X : any input :func:`dnmf.open_matrix` accepts, opened once for all the fits (with the
        first settings' chunks).
    settings : the fits' settings (typically one rank, several seeds); no checkpoints.
    summarize : what to keep of each fit (called in its thread as soon as it ends).
    max_concurrent : fits run together at most (default: :func:`fused_width`, for the current
        client's workers when there is one).
    """
    settings = list(settings)
    if not settings:
        return FusedRuns([], 0, 0)
    matrix = open_v(X, settings[0])
    r = max(s.n_components if isinstance(s.n_components, int) else matrix.shape[1] for s in settings)
    workers = max_concurrent or _width_for(len(settings), matrix, settings[0], r)
    passes = FusedPasses()
    passes.expect(min(workers, len(settings)))  # the first fits start together

    def one(fit_settings: FitSettings):
        with passes.member() as member:
            fact = fit(matrix, fit_settings, fused=member)
        return summarize(fact)

    # BLAS limits are process-wide: set here for all the fits' threads (with the client, as
    # each fit sets them), so no fit's end restores them while the others run. Likewise the
    # threaded scheduler's width: a pass runs in one of the fits' threads, and dask gives a
    # thread other than the main one a pool of its own of Python's default size (CPUs + 4:
    # 6 threads on 2 cores, each with a block of V and its products in flight).
    client = current_client()
    threads = dask.config.get("num_workers", None) or (None if client is not None else CPU_COUNT)
    with blas_threads_for_scheduler(client), dask.config.set(num_workers=threads):
        if workers <= 1 or len(settings) <= 1:
            results = [one(s) for s in settings]
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dnmf-fused") as pool:
                results = list(pool.map(one, settings))
    return FusedRuns(results, passes.n_passes, passes.n_fit_passes)
