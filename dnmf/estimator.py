"""The scikit-learn-style estimator :class:`NMF` and :func:`non_negative_factorization`.

Both share one code path, :func:`fit_factors`: open and scan V, make a start, build the
solver, run the driver.
"""

from __future__ import annotations

import contextlib
import numbers
import warnings
import weakref
from dataclasses import dataclass, field, replace

import dask
import dask.array as da
import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import threadpool_limits

from .run import checkpoint, driver, plan as outofcore
from . import kernels
from .data import missing
from .cluster import current_client, trim_freed_memory_on, workers_share_this_machine
from .errors import ParameterError, expected
from .solvers.grid import GridSolver
from .solvers.init import make_start, resolve_init
from .kernels import Rule
from .solvers.rows import SOLVERS, Solver
from .data.store import Matrix, MatrixStats, open_matrix, scan_matrix, validate_stats

BETA_LOSSES = {"frobenius": 2.0, "kullback-leibler": 1.0, "itakura-saito": 0.0}
DEFAULT_EPS = 1e-10


def beta_value(beta_loss) -> float:
    """β for a loss name or number."""
    if isinstance(beta_loss, str):
        if beta_loss not in BETA_LOSSES:
            raise ParameterError(expected(f"beta_loss in {tuple(BETA_LOSSES)} or a number", beta_loss))
        return BETA_LOSSES[beta_loss]
    if isinstance(beta_loss, numbers.Real) and np.isfinite(beta_loss):
        return float(beta_loss)
    raise ParameterError(expected(f"beta_loss in {tuple(BETA_LOSSES)} or a number", beta_loss))


def resolve_seed(random_state) -> int:
    """An integer seed from None, an int, or a numpy RandomState / Generator."""
    if random_state is None:
        return int(np.random.SeedSequence().generate_state(1)[0])
    if isinstance(random_state, numbers.Integral):
        return int(random_state)
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(np.iinfo(np.int32).max))
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(np.iinfo(np.int32).max))
    raise ParameterError(expected("random_state None, an int, or a numpy RandomState/Generator", random_state))


@dataclass(frozen=True)
class FitConfig:
    """The validated settings of one fit."""

    n_components: int
    solver: str
    beta: float
    init: str
    eps: float
    seed: int
    rules: driver.StoppingRules
    inner_sweeps: int | str = 1

    @property
    def rule(self) -> Rule:
        return Rule(self.solver, self.beta, self.eps)

    def rule_for(self, shape: tuple[int, int], nnz: int) -> Rule:
        """The update rule, with the accelerated-HALS sweep counts resolved for V's size."""
        w_sweeps, h_sweeps = inner_sweep_counts(self.inner_sweeps, shape, nnz, self.n_components)
        return Rule(self.solver, self.beta, self.eps, w_sweeps, h_sweeps)


def _check_positive_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ParameterError(expected(f"{name} a positive integer", value))


def _check_nonnegative_real(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value >= 0:
        raise ParameterError(expected(f"{name} a non-negative number", value))


def make_config(params: dict, shape: tuple[int, int]) -> FitConfig:
    """Validate the estimator's parameters against V's shape."""
    n, p = shape
    r = params["n_components"]
    if r is None:
        r = p
    _check_positive_int("n_components", r)
    if r > min(n, p):
        raise ParameterError(
            f"n_components={r} is larger than min(n_samples, n_features) = {min(n, p)} for a "
            f"{n} x {p} matrix; choose a rank between 1 and {min(n, p)}."
        )
    solver = params["solver"]
    if solver not in SOLVERS:
        raise ParameterError(expected(f"solver in {SOLVERS}", solver))
    beta = beta_value(params["beta_loss"])
    if solver in ("hals", "bpp") and beta != 2.0:
        raise ParameterError(
            f"solver={solver!r} minimizes the Frobenius loss only; got beta_loss={params['beta_loss']!r}. "
            "Use solver='mu' for other β-divergences."
        )
    inner_sweeps = params.get("inner_sweeps", "auto")
    if inner_sweeps != "auto":
        _check_positive_int("inner_sweeps", inner_sweeps)
    _check_positive_int("max_iter", params["max_iter"])
    _check_nonnegative_real("tol", params["tol"])
    _check_nonnegative_real("tol_x", params["tol_x"])
    _check_nonnegative_real("max_time", params["max_time"], allow_none=True)
    eps = DEFAULT_EPS if params["eps"] is None else params["eps"]
    _check_nonnegative_real("eps", eps)
    objective_every = params.get("objective_every", 1)
    _check_positive_int("objective_every", objective_every)
    rules = driver.StoppingRules(
        params["max_iter"], params["tol"], params["tol_x"], params["max_time"], int(objective_every)
    )
    init = resolve_init(params["init"], r, shape)
    return FitConfig(int(r), solver, beta, init, float(eps), resolve_seed(params["random_state"]), rules, inner_sweeps)


# Accelerated HALS (Gillis & Glineur 2012): inner sweeps ⌊1 + α ρ⌋, where ρ is the cost of
# the products a half-step needs relative to one sweep; α = 0.5 as they recommend. A sweep
# is a Python loop over the r components, so a cap keeps its overhead below the products'.
INNER_SWEEPS_ALPHA = 0.5
MAX_AUTO_SWEEPS = 10


def inner_sweep_counts(inner_sweeps, shape: tuple[int, int], nnz: int, r: int) -> tuple[int, int]:
    """(W sweeps, H sweeps) per half-step: ``inner_sweeps`` itself, or "auto" from V's size.

    ρ_W = 1 + (nnz + p r) / (n (r + 1)) and ρ_H = 1 + (nnz + n r) / (p (r + 1)).
    """
    if inner_sweeps != "auto":
        return int(inner_sweeps), int(inner_sweeps)
    n, p = shape

    def count(rho: float) -> int:
        return int(min(MAX_AUTO_SWEEPS, max(1, np.floor(1 + INNER_SWEEPS_ALPHA * rho))))

    return count(1 + (nnz + p * r) / (n * (r + 1))), count(1 + (nnz + n * r) / (p * (r + 1)))


# In-memory V up to this size runs the same kernels without building Dask graphs.
LOCAL_MAX_BYTES = 16 * 2**20


def resolve_column_chunks(column_chunks, mask, missing_values):
    """``column_chunks`` for :func:`~dnmf.store.open_matrix`: None (row blocks) when entries
    are missing, which the grid does not handle; an explicit grid then is an error later."""
    if column_chunks is None or isinstance(column_chunks, str):
        if mask is not None or missing_values is not None:
            return None
        return column_chunks
    if isinstance(column_chunks, bool) or not isinstance(column_chunks, (int, np.integer, tuple)):
        raise ParameterError(expected('column_chunks "auto", None, an int or a tuple of ints', column_chunks))
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


@dataclass(frozen=True)
class Factorization:
    """What :func:`fit_factors` returns."""

    W: da.Array
    H: np.ndarray
    result: driver.RunResult
    config: FitConfig
    matrix: Matrix
    stats: MatrixStats
    info: dict = field(default_factory=dict)
    spill: outofcore.Rerooting | None = None


@dataclass(frozen=True)
class Problem:
    """V ready to factor: its stats (validated), the matrix the inits read, the solver."""

    stats: MatrixStats
    init_matrix: Matrix
    solver: Solver

    def on(self, matrix: Matrix) -> Problem:
        """The same problem reading V from ``matrix`` (e.g. V now cached in memory)."""
        init_matrix = matrix if self.init_matrix is self.solver.matrix else self.init_matrix
        return replace(self, init_matrix=init_matrix, solver=replace(self.solver, matrix=matrix))


def _prepare(matrix: Matrix, config: FitConfig, params: dict, mask, update_h: bool) -> Problem:
    """Scan and validate V, and build the solver: masked when entries are missing."""
    nan_is_missing = missing.check_missing(params.get("missing"))
    if not nan_is_missing and mask is None:
        stats = scan_matrix(matrix, with_xlogx=config.beta == kernels.KULLBACK_LEIBLER)
        validate_stats(stats, config.beta)
        if matrix.is_grid:
            rule = config.rule_for(matrix.shape, stats.nnz)
            solver = GridSolver(matrix, rule, stats.v_sq, update_h=update_h, kl_offset=stats.v_xlogx - stats.v_sum)
            return Problem(stats, matrix, solver)
        solver = Solver(
            matrix, config.rule_for(matrix.shape, stats.nnz), stats.v_sq, update_h=update_h,
            kl_offset=stats.v_xlogx - stats.v_sum, local=runs_locally(matrix, params.get("local", "auto")),
        )
        return Problem(stats, matrix, solver)
    if config.solver == "bpp":
        raise ParameterError(
            "solver='bpp' does not handle missing entries (a mask or NaN values); use solver='mu' or 'hals'."
        )
    if matrix.is_grid:
        raise ParameterError(
            "Missing entries (a mask or missing='nan') need V in row blocks holding all columns; "
            "use column_chunks=None."
        )
    mask_da = None if mask is None else missing.open_mask(mask, matrix)
    scanned = missing.scan_masked(matrix, mask_da, nan_is_missing)
    stats = scanned.imputed_stats()
    validate_stats(stats, config.beta)
    solver = Solver(matrix, config.rule, scanned.stats.v_sq, update_h=update_h, masked=True, mask=mask_da)
    return Problem(stats, missing.filled_matrix(matrix, mask_da, scanned.observed_mean), solver)


def fit_factors(
    X,
    params: dict,
    W=None,
    H=None,
    update_h: bool = True,
    callbacks: tuple = (),
    mask=None,
    resume=None,
) -> Factorization:
    """The shared code path of :class:`NMF` and :func:`non_negative_factorization`.

    ``mask`` (V's shape, True = observed) or ``params["missing"] == "nan"`` fit the masked
    objective over the observed entries only (:mod:`dnmf.masked`). ``resume`` is a checkpoint
    directory to continue from (see :mod:`dnmf.checkpoint`).
    """
    client = current_client()
    if client is not None:
        trim_freed_memory_on(client)  # workers near their limit hand freed memory back to the OS
    cache = params.get("cache", "auto")
    outofcore.check_cache(cache)
    reroot_every = outofcore.resolve_reroot_every(params.get("reroot_every"), client)
    block_bytes = outofcore.block_bytes_for_workers(client)
    if resume is not None and (W is not None or H is not None):
        raise ParameterError("fit(X, resume=PATH) continues from the checkpoint's W and H; do not pass W or H too.")
    snapshot = checkpoint.load(resume) if resume is not None else None
    chunks = params.get("chunks")
    column_chunks = resolve_column_chunks(params.get("column_chunks", "auto"), mask, params.get("missing"))
    if snapshot is not None:
        # Default blocks depend on the workers; a resume keeps the checkpoint's blocks.
        saved = snapshot.record["fingerprint"]
        if chunks is None:
            chunks = tuple(saved["row_chunks"])
        if column_chunks == "auto" and "col_chunks" in saved:
            column_chunks = tuple(saved["col_chunks"])
    matrix = open_matrix(X, chunks, block_bytes=block_bytes, column_chunks=column_chunks)
    outofcore.warn_if_blocks_too_big(matrix, block_bytes)
    config = make_config(params, matrix.shape)
    if not update_h:
        config = replace(config, init="custom")
    target = params.get("checkpoint") or resume
    schedule = checkpoint.schedule_from_params(params) if target is not None else None
    if target is not None:
        target = checkpoint.check_target(target, resume)
    spill = None
    with blas_threads_for_scheduler(client):
        plan = outofcore.plan_cache(cache, matrix, client)
        if plan is not None:
            matrix = outofcore.apply_cache(plan, matrix)
        problem = _prepare(matrix, config, params, mask, update_h)
        if plan is None:  # sparse V: its size was known only after the scan
            plan = outofcore.plan_cache(cache, matrix, client, nnz=problem.stats.nnz)
            matrix = outofcore.apply_cache(plan, matrix)
            problem = problem.on(matrix)
        stats, solver = problem.stats, problem.solver
        fingerprint = checkpoint.fingerprint(matrix, stats) if target is not None else None
        history = None
        if snapshot is not None:
            if params.get("random_state") is None:  # an unseeded fit adopts the saved seed
                config = replace(config, seed=int(snapshot.record["settings"]["seed"]))
            checkpoint.check_compatible(snapshot, checkpoint.resolved_settings(config), fingerprint, resume)
            start_W, start_H, history = snapshot.W, snapshot.H, snapshot.history
        else:
            start = make_start(problem.init_matrix, stats, config.n_components, config.init, config.seed, W, H)
            start_W, start_H = start.W, start.H
        state = solver.start(start_W, start_H)
        writer = None
        if target is not None:
            writer = checkpoint.start_writer(target, schedule, X, params, config, fingerprint, state, snapshot)
        if reroot_every:
            solver = spill = outofcore.Rerooting(solver, reroot_every, params.get("spill_dir"))
        try:
            result = driver.run(
                solver, state, config.rules, callbacks=tuple(callbacks), history=history, checkpointer=writer
            )
        except BaseException:
            if spill is not None:
                spill.close()
            raise
    info = {
        "v_storage": plan.storage,
        "v_bytes": plan.v_bytes,
        "cache_budget_bytes": plan.budget_bytes,
        "scheduler": "threads" if client is None else "distributed",
        "n_workers": None if client is None else len(client.nthreads()),
        "layout": "grid" if matrix.is_grid else "rows",
        "row_blocks": len(matrix.row_chunks),
        "max_block_rows": max(matrix.row_chunks),
        "column_blocks": len(matrix.col_chunks),
        "reroot_every": reroot_every,
        "n_reroots": 0 if spill is None else spill.n_reroots,
    }
    if result.stop_reason == "max_iter" and config.rules.max_iter > 1 and update_h:
        warnings.warn(
            f"Maximum number of iterations {config.rules.max_iter} reached before convergence "
            "(tol, tol_x). Increase max_iter or loosen tol / tol_x.",
            ConvergenceWarning,
            stacklevel=3,
        )
    H_out = result.state.H
    if isinstance(H_out, da.Array):  # the grid's H, gathered once at the end
        H_out = H_out.compute()
    return Factorization(result.state.W, H_out, result, config, matrix, stats, info, spill)


class NMF(TransformerMixin, BaseEstimator):
    r"""Non-negative matrix factorization of a possibly out-of-core matrix on Dask.

    Finds non-negative W (n_samples, n_components) and H (n_components, n_features) whose
    product approximates X by minimizing the β-divergence

    .. math::
        D_\beta(X \| WH), \qquad D_2 = \tfrac12 \|X - WH\|_F^2,\quad
        D_1 = \sum X \log\frac{X}{WH} - X + WH .

    Each iteration updates H, then W, reading X once as a Dask graph over its row blocks (twice
    on the 2-D grid of a very wide X, see ``column_chunks``).

    Parameters
    ----------
    n_components : int or None
        The rank r. None uses n_features.
    solver : {"mu", "hals", "bpp"}, default="mu"
        Lee-Seung multiplicative updates (any β), hierarchical ALS (Frobenius only), or
        alternating NNLS solved exactly by block principal pivoting (Frobenius only; the
        most progress per pass over X).
    beta_loss : {"frobenius", "kullback-leibler", "itakura-saito"} or float, default="frobenius"
    init : {"random", "nndsvd", "nndsvda", "nndsvdar", "custom"} or None
        None: "nndsvda" when n_components <= min(n_samples, n_features), else "random".
        NNDSVD variants use a randomized SVD that streams X.
    max_iter : int, default=200
    tol : float, default=1e-4
        Tolerance of the stopping condition on the objective: the fit stops ("converged")
        when an iteration's relative objective decrease (f_{t-1} - f_t) / f_{t-1} is below
        ``tol`` **and** the iterates moved less than ``tol_x``.
    tol_x : float, default=1e-3
        Tolerance on the iterates: max(‖ΔW‖_F / ‖W‖_F, ‖ΔH‖_F / ‖H‖_F) of the iteration must
        be below ``tol_x`` (together with ``tol``) to stop. ``tol_x=0`` never stops early.
    max_time : float or None
        Stop ("max_time") after this many seconds of iterating in this run.
    objective_every : int, default=1
        Evaluate the objective (and check ``tol``) every this many iterations and at the last.
        The Frobenius objective is free; for other β it costs a log or a power per entry of X,
        so e.g. 10 (scikit-learn's interval) saves that work on 9 iterations out of 10. Records
        in between have a NaN objective.
    random_state : int, RandomState, Generator or None
    eps : float or None
        Added to every denominator of the updates (default 1e-10).
    chunks : int or None
        Rows per block of X (default: about 64 MiB per block).
    column_chunks : "auto", None, int or tuple of int, default="auto"
        Columns per chunk. None: row blocks holding all columns (X is read once per
        iteration, H is kept on the client). An int below n_features: a 2-D grid of chunks,
        with W distributed by row blocks and H by column blocks (:mod:`dnmf.grid`; X is read
        twice per iteration). "auto": the grid only when X is too wide for row blocks of 256
        rows within the block size. Missing entries need row blocks.
    callbacks : sequence of callables or None
        Each gets every :class:`~dnmf.driver.IterationRecord`; returning True stops the fit.
    missing : {None, "nan"}, default=None
        "nan": NaN entries of X are missing; the objective and the (MU) updates then cover the
        observed entries only. ``fit(X, mask=M)`` hides more entries (M False). HALS fills
        the missing entries with the current WH before each step (an EM-style majorization).
    n_runs : int, default=1
        Random restarts: fit this many seeds spawned from ``random_state`` (concurrently where
        memory allows) and keep the run with the lowest final objective. Needs a random init.
    checkpoint : str or os.PathLike or None
        A directory to write crash-safe checkpoints into (new or empty; see
        :mod:`dnmf.checkpoint`): at the start, on the schedule below, and at the end.
        ``fit(X, resume=PATH)`` or :func:`dnmf.checkpoint.resume` continues from it, bitwise
        as if never interrupted.
    checkpoint_every : int or None, default=10
        Write a checkpoint after every ``checkpoint_every``-th iteration.
    checkpoint_interval : float or None
        Also write one when this many seconds have passed since the last.
    cache : {"auto", True, False}, default="auto"
        Keep V in memory for the whole fit (the workers' memory under dask.distributed):
        True always, False never (read V's row blocks from their store on every pass), "auto"
        when V takes at most half of the workers' total memory limit (of the available RAM
        under the threaded scheduler). V given as numpy / scipy is in memory already.
    reroot_every : int or None
        Under dask.distributed, write W to a Zarr array in ``spill_dir`` and reload it every
        this many iterations, so that the scheduler's record of how to recompute W (its
        lineage) stays bounded; the values are unchanged. None: every 20 iterations; 0: never.
        Unused by the threaded scheduler.
    spill_dir : str or None
        Where re-rooted W is written: a directory every worker can read and write (on a
        multi-node cluster, a shared file system) or an fsspec URL (``s3://bucket/spill``).
        None: a temporary directory of this machine
        (dask's ``temporary-directory`` setting, else the system's), deleted after the fit.
    inner_sweeps : "auto" or int, default="auto"
        solver="hals" only: the most HALS sweeps per half-step from the same products
        (accelerated HALS); 1 is plain HALS (scikit-learn's "cd"). "auto" picks up to 10 from
        X's shape, stopping a half-step's sweeps early once they change little.
    local : "auto" or bool, default="auto"
        Run the per-block kernels directly instead of as Dask graphs; "auto" does so for an
        in-memory X of at most 16 MiB under dask's default scheduler. Same results either way.

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
        H.
    n_components_ : int
    reconstruction_err_ : float
        sqrt(2 D_β(X | WH)), the Frobenius norm of X - WH for β = 2.
    n_iter_ : int
    history_ : list of dict
        Per iteration: iteration, objective, rel_decrease, w_change, h_change, seconds.
    stop_reason_ : str
        "converged", "max_iter", "max_time" or "callback".
    run_losses_ : list of float
        The final objective of every run (one entry unless ``n_runs`` > 1).
    best_run_ : int
        Index of the kept run in ``run_losses_``.
    run_seeds_ : list of int
        The seed of every run.
    cache_used_ : bool
        Whether V was held in memory during the fit (given in memory, or cached).
    fit_info_ : dict
        Where the fit ran: ``v_storage`` ("in-memory", "cached" or "streamed"), ``v_bytes``,
        ``cache_budget_bytes``, ``scheduler``, ``n_workers``, ``layout`` ("rows" or "grid"),
        ``row_blocks``, ``max_block_rows``, ``column_blocks``, ``reroot_every``, ``n_reroots``. ``v_storage`` is also in every
        ``history_`` record.
    data_norm_ : float
        ‖X‖_F, so reconstruction_err_ / data_norm_ is the relative error (Frobenius).

    References
    ----------
    D. D. Lee, H. S. Seung (2001). Algorithms for non-negative matrix factorization. NeurIPS 13.
    C. Févotte, J. Idier (2011). Algorithms for nonnegative matrix factorization with the
    β-divergence. Neural Computation 23(9).
    A. Cichocki, A.-H. Phan (2009). Fast local algorithms for large scale nonnegative matrix and
    tensor factorizations. IEICE Trans. Fundamentals E92-A(3).
    """

    def __init__(
        self,
        n_components=None,
        *,
        solver="mu",
        beta_loss="frobenius",
        init=None,
        max_iter=200,
        tol=1e-4,
        tol_x=1e-3,
        max_time=None,
        random_state=None,
        eps=None,
        chunks=None,
        callbacks=None,
        missing=None,
        n_runs=1,
        checkpoint=None,
        checkpoint_every=10,
        checkpoint_interval=None,
        cache="auto",
        reroot_every=None,
        spill_dir=None,
        inner_sweeps="auto",
        local="auto",
        column_chunks="auto",
        objective_every=1,
    ):
        self.n_components = n_components
        self.solver = solver
        self.beta_loss = beta_loss
        self.init = init
        self.max_iter = max_iter
        self.tol = tol
        self.tol_x = tol_x
        self.max_time = max_time
        self.random_state = random_state
        self.eps = eps
        self.chunks = chunks
        self.callbacks = callbacks
        self.missing = missing
        self.n_runs = n_runs
        self.checkpoint = checkpoint
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval = checkpoint_interval
        self.cache = cache
        self.reroot_every = reroot_every
        self.spill_dir = spill_dir
        self.inner_sweeps = inner_sweeps
        self.local = local
        self.column_chunks = column_chunks
        self.objective_every = objective_every

    def fit(self, X, y=None, W=None, H=None, mask=None, resume=None):
        """Learn W and H from X; W and H are a custom start (with init="custom").

        ``mask`` (boolean, X's shape, True = observed; numpy, dask, Zarr) fits the observed
        entries only. ``resume`` is a checkpoint directory of an earlier fit of X to continue
        from.
        """
        self.fit_transform(X, W=W, H=H, mask=mask, resume=resume)
        return self

    def fit_transform(self, X, y=None, W=None, H=None, mask=None, resume=None):
        """Learn W and H from X and return W (numpy if X was in memory, else a dask array)."""
        callbacks = tuple(self.callbacks or ())
        if self.n_runs == 1:
            fact = fit_factors(X, self.get_params(), W=W, H=H, callbacks=callbacks, mask=mask, resume=resume)
            losses, best, seeds = [float(fact.result.state.objective)], 0, [fact.config.seed]
        else:
            from .run.restarts import fit_runs

            if W is not None or H is not None or resume is not None:
                raise ParameterError("n_runs > 1 restarts from random starts; do not pass W, H or resume.")
            if self.checkpoint is not None:
                raise ParameterError(
                    "n_runs > 1 would write every run into one checkpoint directory; checkpoint a single "
                    "run (n_runs=1, random_state=model.run_seeds_[k]) instead."
                )
            runs = fit_runs(X, self.get_params(), self.n_runs, mask=mask, callbacks=callbacks)
            fact, losses, best, seeds = runs.results[runs.best], runs.losses, runs.best, runs.seeds
        self._store_result(fact)
        self.run_losses_, self.best_run_, self.run_seeds_ = losses, best, seeds
        return self._release_spill(fact, self._output(fact.W, fact.matrix))

    def _release_spill(self, fact: Factorization, W_out):
        """Delete re-rooting's spill once W no longer needs it (with this estimator for dask W)."""
        if fact.spill is not None:
            if fact.matrix.in_memory:
                fact.spill.close()
            else:
                weakref.finalize(self, fact.spill.close)
        return W_out

    def _store_result(self, fact: Factorization) -> None:
        result = fact.result
        self.components_ = fact.H
        self.n_components_ = fact.config.n_components
        self.n_features_in_ = fact.matrix.shape[1]
        self.n_iter_ = result.n_iter
        self.reconstruction_err_ = float(np.sqrt(2.0 * result.state.objective))
        self.history_ = [{**record.as_dict(), "v_storage": fact.info.get("v_storage")} for record in result.history]
        self.cache_used_ = fact.info.get("v_storage") != outofcore.V_STREAMED
        self.fit_info_ = dict(fact.info)
        self.stop_reason_ = result.stop_reason
        self.seed_ = fact.config.seed
        self.init_ = fact.config.init
        self.data_norm_ = float(np.sqrt(fact.stats.v_sq))  # ‖X‖_F, for relative errors

    @staticmethod
    def _output(W: da.Array, matrix: Matrix):
        return W.compute() if matrix.in_memory else W

    def transform(self, X):
        """W for new rows X with H fixed at ``components_`` (same solver, loss and stopping)."""
        check_is_fitted(self, "components_")
        column_chunks = resolve_column_chunks(self.column_chunks, None, self.missing)
        block_bytes = outofcore.block_bytes_for_workers(current_client())
        matrix = open_matrix(X, self.chunks, block_bytes=block_bytes, column_chunks=column_chunks)
        if matrix.shape[1] != self.components_.shape[1]:
            raise ParameterError(
                expected(f"X with {self.components_.shape[1]} features, as in fit", f"{matrix.shape[1]} features")
            )
        W0 = self._constant_w(matrix)
        params = {**self.get_params(), "n_components": self.n_components_, "init": "custom", "checkpoint": None}
        fact = fit_factors(matrix, params, W=W0, H=self.components_, update_h=False)
        return self._release_spill(fact, self._output(fact.W, matrix))

    def _constant_w(self, matrix: Matrix) -> da.Array:
        """A flat start for W: every entry sqrt(mean(X) / r), like scikit-learn's transform."""
        mean_of = da.nanmean if self.missing == "nan" else da.mean
        mean = float(dask.compute(mean_of(matrix.data))[0]) if not matrix.sparse else _sparse_mean(matrix)
        value = np.sqrt(max(mean, np.finfo(float).tiny) / self.n_components_)
        return da.full(
            (matrix.shape[0], self.n_components_), value, dtype=matrix.dtype,
            chunks=(matrix.row_chunks, (self.n_components_,)),
        )

    def inverse_transform(self, W):
        """W @ H: the reconstruction (numpy for numpy W, dask for dask W)."""
        check_is_fitted(self, "components_")
        return W @ self.components_


def _sparse_mean(matrix: Matrix) -> float:
    return scan_matrix(matrix).mean


def non_negative_factorization(
    X,
    W=None,
    H=None,
    n_components=None,
    *,
    init=None,
    update_H=True,
    solver="mu",
    beta_loss="frobenius",
    tol=1e-4,
    tol_x=1e-3,
    max_iter=200,
    max_time=None,
    random_state=None,
    eps=None,
    chunks=None,
):
    """Functional form of :class:`NMF`: returns ``(W, H, n_iter)`` like scikit-learn's.

    With ``update_H=False``, H is fixed and only W is fitted (W starts from ``W`` if given
    with init="custom", else flat).
    """
    est = NMF(
        n_components, solver=solver, beta_loss=beta_loss, init=init, max_iter=max_iter, tol=tol,
        tol_x=tol_x, max_time=max_time, random_state=random_state, eps=eps, chunks=chunks,
    )
    if update_H:
        W_out = est.fit_transform(X, W=W, H=H)
        return W_out, est.components_, est.n_iter_
    if H is None:
        raise ParameterError("update_H=False needs H.")
    est.components_ = np.asarray(H)
    est.n_components_ = est.components_.shape[0]
    if W is None or init != "custom":
        return est.transform(X), est.components_, None
    params = {**est.get_params(), "n_components": est.n_components_, "init": "custom"}
    fact = fit_factors(X, params, W=W, H=H, update_h=False)
    W_out = NMF._output(fact.W, fact.matrix)
    if fact.spill is not None and fact.matrix.in_memory:
        fact.spill.close()
    return W_out, fact.H, fact.result.n_iter
