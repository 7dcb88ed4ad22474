"""The one fit pipeline, in named phases: place → open V → plan → start or restore → run → result.

Every face calls :func:`fit`: the estimator (``NMF.fit``, ``transform``,
:func:`~dnmf.non_negative_factorization`), restarts (:mod:`dnmf.run.restarts`), the rank survey,
the CLI and a checkpoint resume. Its settings come validated (:class:`dnmf.settings.FitSettings`).

1. **place**: the Dask client (None under dask's local schedulers), the worker plugin that
   trims freed memory, the row-block budget and the re-rooting interval;
2. **open V** (:func:`open_v`): V in row blocks (or a 2-D grid), with a resume's blocks;
3. **plan** (:func:`plan`): scan and validate V, decide where it lives (in memory, cached,
   streamed), build the solver: rows or grid, plain or masked, in this thread or as graphs;
4. **start or restore**: the start (random, NNDSVD, custom) or a checkpoint's state;
5. **run**: :func:`dnmf.run.driver.run` with its hooks (re-rooting, the checkpoint writer) and
   the user's callbacks;
6. **result**: a :class:`Factorization`, with where the fit ran (``info``).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field, replace

import dask.array as da
from sklearn.exceptions import ConvergenceWarning
import numpy as np

from .. import kernels
from ..cluster import current_client, trim_freed_memory_on
from ..data import missing
from ..data.store import Matrix, MatrixStats, open_matrix, scan_matrix, unit_exponent, validate_stats
from ..errors import FitInterrupted, ParameterError
from ..settings import FitSettings, iterate_settings
from ..solvers.grid import GridSolver
from ..solvers.init import make_start
from ..solvers.rows import MaskedSolver, Solver, exact_below
from . import checkpoint, driver
from .plan import (
    CachePlan,
    apply_cache,
    blas_threads_for_scheduler,
    block_bytes_for_workers,
    check_blocks_fit_workers,
    column_layout,
    plan_cache,
    reroot_interval,
    runs_locally,
)
from .progress import VerboseLog
from .reroot import Rerooting
from .signals import stop_on_signals


@dataclass(frozen=True)
class Factorization:
    """What :func:`fit` returns.

    W : dask array (n, r) in V's row blocks; H : ndarray (r, p).
    result : the driver's :class:`~dnmf.run.driver.RunResult` (final state, history, stop reason).
    settings : the settings, resolved for V's shape.
    matrix, stats : V as it was read, and its scan.
    info : where the fit ran (see ``NMF.fit_info_``).
    spill : the re-rooting hook whose spill W may still read from; close it once W is not needed.
    """

    W: da.Array
    H: np.ndarray
    result: driver.RunResult
    settings: FitSettings
    matrix: Matrix
    stats: MatrixStats
    info: dict = field(default_factory=dict)
    spill: Rerooting | None = None

    def release(self) -> None:
        """Delete the re-rooting spill (W must not be read after this unless it is in memory)."""
        if self.spill is not None:
            self.spill.close()


@dataclass(frozen=True)
class Placement:
    """Where a fit runs: the distributed client (None: dask's local schedulers), the bytes of
    a row block, and the re-rooting interval (0: never)."""

    client: object
    block_bytes: int | None
    reroot_every: int


@dataclass(frozen=True)
class Plan:
    """V ready to factor: where it lives, its stats (validated), the matrix the inits read
    (V with missing entries filled, when entries are missing), and the solver."""

    cache: CachePlan
    stats: MatrixStats
    init_matrix: Matrix
    solver: Solver | MaskedSolver | GridSolver

    @property
    def matrix(self) -> Matrix:
        return self.solver.matrix


def place(settings: FitSettings) -> Placement:
    """Phase 1: find the client, install the worker plugin, size row blocks and re-rooting."""
    client = current_client()
    if client is not None:
        trim_freed_memory_on(client)  # workers near their limit hand freed memory back to the OS
    return Placement(client, block_bytes_for_workers(client), reroot_interval(settings.reroot_every, client))


def open_v(
    X, settings: FitSettings, mask=None, block_bytes: int | None = None, saved: dict | None = None,
    layer: str | None = None,
) -> Matrix:
    """Phase 2: V in row blocks (a grid when asked or very wide), unless already a Matrix.

    ``saved`` is a checkpoint's fingerprint: a resume keeps the checkpoint's blocks where the
    settings leave them to the default (which depends on the workers). ``layer`` picks a layer
    of an AnnData input instead of its X.
    """
    chunks = settings.chunks
    column_chunks = column_layout(settings.column_chunks, mask, settings.nan_is_missing)
    if saved is not None:
        if chunks is None:
            chunks = tuple(saved["row_chunks"])
        if column_chunks == "auto" and "col_chunks" in saved:
            column_chunks = tuple(saved["col_chunks"])
    matrix = open_matrix(X, chunks, block_bytes=block_bytes, column_chunks=column_chunks, layer=layer)
    check_blocks_fit_workers(matrix, current_client())
    return matrix


def plan(matrix: Matrix, settings: FitSettings, client, mask=None, update_h: bool = True, fused=None) -> Plan:
    """Phase 3: where V lives (cached when it fits the workers), its scan, and the solver.

    ``fused``: a :class:`~dnmf.solvers.fused.FusedMember`; the scan is then shared with the
    other fits of its group, and the solver runs its passes over V with theirs.
    """

    def place_v(cache, matrix):  # fused fits keep one copy of V between them
        return apply_cache(cache, matrix) if fused is None else fused.cached(cache, matrix, apply_cache)

    cache = plan_cache(settings.cache, matrix, client, nnz=matrix.nnz)
    if cache is not None:
        matrix = place_v(cache, matrix)
    stats, init_matrix, solver = _solver(matrix, settings, mask, update_h, fused)
    if cache is None:  # a sparse V of unknown nnz (dask): its size was known only after the scan
        cache = plan_cache(settings.cache, matrix, client, nnz=stats.nnz)
        cached = place_v(cache, matrix)
        init_matrix = cached if init_matrix is matrix else init_matrix
        solver = replace(solver, matrix=cached)
    return Plan(cache, stats, init_matrix, solver)


def _start_rank(settings: FitSettings, W, H, update_h: bool) -> int | None:
    """The rank of a custom start (H's rows, else W's columns), for n_components="auto"."""
    if settings.init != "custom" and update_h:
        return None
    if H is not None and len(np.shape(H)) == 2:
        return int(np.shape(H)[0])
    if W is not None and len(np.shape(W)) == 2:
        return int(np.shape(W)[1])
    return None


def _rule(settings: FitSettings, shape: tuple[int, int], update_h: bool) -> kernels.Rule:
    """The update rule of ``settings`` for V of ``shape``, with its penalties scaled as
    scikit-learn scales them; with H fixed (``update_h=False``) H's penalty, a constant, is
    left out of the objective."""
    penalties = kernels.penalties(settings.alpha_W, settings.alpha_H_value, settings.l1_ratio, shape)
    rule = kernels.Rule(settings.solver, settings.beta, settings.eps, **penalties)
    return rule if update_h else rule.without_h_penalty()


def _solver(matrix: Matrix, settings: FitSettings, mask, update_h: bool, fused=None):
    """Scan and validate V, and build the solver: masked when entries are missing.

    Returns (stats, the matrix the inits read, the solver).
    """
    if not settings.nan_is_missing and mask is None:
        rule = _rule(settings, matrix.shape, update_h)
        scan = scan_matrix if fused is None else fused.scan
        stats = scan(matrix, with_xlogx=rule.kullback_leibler)
        validate_stats(stats, settings.beta)
        w_sweeps, h_sweeps = settings.sweeps(matrix.shape, stats.nnz)
        rule = replace(rule, w_sweeps=w_sweeps, h_sweeps=h_sweeps, unit_exponent=unit_exponent(stats))
        offset = stats.v_xlogx - stats.v_sum
        if matrix.is_grid:
            grid = GridSolver(matrix, rule, stats.v_sq, update_h=update_h, kl_offset=offset)
            return stats, matrix, grid if fused is None else fused.solver(grid)
        local = runs_locally(matrix, settings.local)
        # The objective's digits matter only where the stop rule can fire on it (tol_x > 0).
        size = 0.5 * stats.v_sq if rule.frobenius else abs(stats.v_xlogx) + stats.v_sum
        below = exact_below(size, matrix.dtype, settings.tol) if settings.tol_x > 0 else 0.0
        solver = Solver(matrix, rule, stats.v_sq, update_h=update_h, kl_offset=offset, local=local, exact_below=below)
        return stats, matrix, solver if fused is None else fused.solver(solver)
    if fused is not None:
        raise ParameterError(
            "Fused fits run the plain row-block or grid solver only; fit V with missing entries (a mask or NaN values) "
            "one fit at a time."
        )
    if matrix.is_grid:
        raise ParameterError(
            "Missing entries (a mask or missing='nan') need V in row blocks holding all columns; "
            "use column_chunks=None."
        )
    mask_da = None if mask is None else missing.open_mask(mask, matrix)
    scanned = missing.scan_masked(matrix, mask_da, settings.nan_is_missing)
    stats = scanned.imputed_stats()
    validate_stats(stats, settings.beta)
    rule = replace(_rule(settings, matrix.shape, update_h), unit_exponent=unit_exponent(stats))
    solver = MaskedSolver(matrix, rule, scanned.stats.v_sq, update_h=update_h, mask=mask_da)
    return stats, missing.filled_matrix(matrix, mask_da, scanned.observed_mean), solver


def start_or_restore(prepared: Plan, settings: FitSettings, W=None, H=None, snapshot=None, fingerprint=None, resume=None):
    """Phase 4: the state at the start (random, NNDSVD, custom) or at a checkpoint's iterate.

    Returns (settings, the start state, the history to continue or None). A resume is checked
    against the checkpoint (matrix and iterate-altering settings); an unseeded one adopts the
    checkpoint's seed.
    """
    history = None
    if snapshot is not None:
        if settings.params["random_state"] is None:
            settings = replace(settings, seed=int(snapshot.record["settings"]["seed"]))
        checkpoint.check_compatible(snapshot, iterate_settings(settings), fingerprint, resume)
        start_W, start_H, history = snapshot.W, snapshot.H, snapshot.history
    else:
        if (W is not None or H is not None) and settings.init != "custom":
            warnings.warn(
                "When init!='custom', provided W or H are ignored. Set init='custom' to use them as "
                f"initialization (init={settings.init!r} ignores the W and H passed to fit).",
                RuntimeWarning,
                stacklevel=4,
            )
        start = make_start(prepared.init_matrix, prepared.stats, settings.n_components, settings.init, settings.seed, W, H)
        start_W, start_H = start.W, start.H
    state = prepared.solver.start(start_W, start_H)
    if history and math.isfinite(history[-1].objective):
        # The objective as the interrupted run had it (recomputed, its last bits may differ,
        # and the next step chooses how to evaluate the objective from it).
        state = replace(state, objective=history[-1].objective)
    return settings, state, history


def fit(
    X, settings: FitSettings, *, W=None, H=None, update_h: bool = True, mask=None, resume=None,
    layer: str | None = None, fused=None,
) -> Factorization:
    """Factor X with ``settings``: the one code path of every fit.

    Parameters
    ----------
    X : ndarray, scipy.sparse matrix, dask array, zarr.Array, AnnData, the path/URL of a Zarr
        store or a .h5ad file, or an open Matrix: V, of shape (n_samples, n_features).
    settings : validated settings (:meth:`FitSettings.from_params`).
    W, H : a custom start, of shapes (n_samples, n_components) and (n_components, n_features).
    update_h : False keeps H fixed at ``H`` and solves for W only (``transform``).
    mask : boolean, X's shape, True = observed (numpy, dask, Zarr); with ``settings.missing ==
        "nan"`` NaN entries are missing too. The fit then covers the observed entries only.
    resume : a checkpoint directory to continue from, bitwise as if never interrupted, or
        "auto": continue from ``settings.checkpoint`` when it holds a checkpoint, else start
        there (a custom W, H is then the start). Default: ``settings.resume``.
    layer : for an AnnData input, the layer to factor instead of X.
    fused : a :class:`~dnmf.solvers.fused.FusedMember`: the fit shares its passes over V (and
        V's scan) with the other fits of its :class:`~dnmf.solvers.fused.FusedPasses`, run in
        other threads; its result is bitwise the same.

    The fit holds the locks of the checkpoint directories it reads and writes (``resume`` and
    ``settings.checkpoint``) from before it reads them to its end, and the re-rooting spill
    holds its folder's (see :class:`~dnmf.run.reroot.Rerooting`): another run on them raises
    :class:`~dnmf.errors.LockedError` and touches nothing.

    While it writes checkpoints, and when called in the main thread, SIGTERM and SIGUSR1 make
    the fit finish its iteration, write a checkpoint and raise
    :class:`~dnmf.errors.FitInterrupted` (see :mod:`dnmf.run.signals`).
    """
    resume = settings.resume if resume is None else resume
    if resume == "auto" and settings.checkpoint is None:
        raise ParameterError('resume="auto" needs the checkpoint folder (checkpoint=PATH) to continue from or start in.')
    if resume not in (None, "auto") and (W is not None or H is not None):
        raise ParameterError("fit(X, resume=PATH) continues from the checkpoint's W and H; do not pass W or H too.")
    with checkpoint.locked(settings.checkpoint, None if resume == "auto" else resume):
        if resume == "auto":  # decided holding the lock: no other run writes the folder meanwhile
            resume = settings.checkpoint if checkpoint.has_checkpoint(settings.checkpoint) else None
            W, H = (None, None) if resume is not None else (W, H)
        return _fit(X, settings, W, H, update_h, mask, resume, layer, fused)


def _fit(X, settings: FitSettings, W, H, update_h: bool, mask, resume, layer, fused=None) -> Factorization:
    """:func:`fit`, holding the locks of the checkpoint directories it reads and writes."""
    where = place(settings)
    snapshot = checkpoint.load(resume) if resume is not None else None
    saved = snapshot.record["fingerprint"] if snapshot else None
    matrix = open_v(X, settings, mask, where.block_bytes, saved, layer)
    settings = settings.for_shape(matrix.shape, _start_rank(settings, W, H, update_h))
    if not update_h:
        settings = replace(settings, init="custom")
    target = settings.checkpoint or resume
    if target is not None:
        target = checkpoint.check_target(target, resume)
    # A checkpointed fit stops cleanly on a batch system's signal: one arriving during the
    # set-up stops it before its first iteration (a fresh fit's start saved first).
    with stop_on_signals() if target is not None else contextlib.nullcontext() as stop, \
            blas_threads_for_scheduler(where.client):
        prepared = plan(matrix, settings, where.client, mask, update_h, fused)
        fingerprint = checkpoint.fingerprint(prepared.matrix, prepared.stats) if target is not None else None
        settings, state, history = start_or_restore(prepared, settings, W, H, snapshot, fingerprint, resume)
        spill = Rerooting(prepared.solver, where.reroot_every, settings.spill_dir) if where.reroot_every else None
        hooks = [] if spill is None else [spill]
        callbacks = tuple(settings.callbacks) + ((VerboseLog(settings.verbose),) if settings.verbose else ())
        if target is not None:
            schedule = checkpoint.Schedule(settings.checkpoint_every, settings.checkpoint_interval)
            meta = checkpoint.version_record(settings.params, iterate_settings(settings), fingerprint, X, layer)
            hooks += [checkpoint.start_writer(target, schedule, meta, state, snapshot), stop]
        # The driver gets the only reference to the start: this frame would otherwise hold the
        # start's W (persisted on the workers) until the fit ends, a second W beside the
        # iterate's (50 fused replicates held 400 MB of random starts on 2 workers).
        start, state = [state], None
        try:
            result = driver.run(prepared.solver, start.pop(), settings.rules, callbacks, history, tuple(hooks))
        except BaseException:
            if spill is not None:
                spill.close()
            raise
    if result.stop_reason == "signal":
        if spill is not None:
            spill.close()
        raise FitInterrupted(stop.signal_name, result.n_iter, target)
    if result.stop_reason == "max_iter" and update_h:
        warnings.warn(
            f"Maximum number of iterations {settings.max_iter} reached. Increase it to improve convergence "
            "(max_iter; or loosen tol / tol_x: the fit stops when both are met).",
            ConvergenceWarning,
            stacklevel=3,
        )
    H_out = result.state.H
    if isinstance(H_out, da.Array):  # the grid's H, gathered once at the end
        H_out = H_out.compute()
    info = where_it_ran(where, prepared, spill)
    return Factorization(result.state.W, H_out, result, settings, prepared.matrix, prepared.stats, info, spill)


def where_it_ran(where: Placement, prepared: Plan, spill: Rerooting | None) -> dict:
    """Phase 6: the facts of where the fit ran (``NMF.fit_info_``)."""
    matrix = prepared.matrix
    return {
        "v_storage": prepared.cache.storage,
        "v_bytes": prepared.cache.v_bytes,
        "v_sparse": bool(matrix.sparse),
        "v_nnz": int(prepared.stats.nnz),
        "cache_budget_bytes": prepared.cache.budget_bytes,
        "scheduler": "threads" if where.client is None else "distributed",
        "n_workers": None if where.client is None else len(where.client.nthreads()),
        "layout": "grid" if matrix.is_grid else "rows",
        "row_blocks": len(matrix.row_chunks),
        "max_block_rows": max(matrix.row_chunks),
        "column_blocks": len(matrix.col_chunks),
        "reroot_every": where.reroot_every,
        "n_reroots": 0 if spill is None else spill.n_reroots,
    }
