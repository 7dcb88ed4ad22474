"""The scikit-learn-style face of dnmf: :class:`NMF` and :func:`non_negative_factorization`.

Both map scikit-learn's API onto the one fit pipeline (:func:`dnmf.run.pipeline.fit`): the
parameters become validated :class:`~dnmf.settings.FitSettings` before any data is touched, the
pipeline fits, and the estimator keeps the fitted attributes.
"""

from __future__ import annotations

import weakref

import dask
import dask.array as da
import numpy as np
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils.validation import _check_feature_names, check_is_fitted

from .cluster import current_client
from .data.store import Matrix, factor_dtype, scan_matrix
from .errors import DtypeMismatchError, ParameterError
from .run import pipeline
from .run.pipeline import Factorization
from .run.plan import V_STREAMED, block_bytes_for_workers
from .run.restarts import fit_runs
from .settings import DEFAULTS, FitSettings


class NMF(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
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
    n_components : int, "auto" or None
        The rank r. None uses n_features; "auto" takes the rank of the custom W or H
        (``init="custom"``), else n_features. A rank above min(n_samples, n_features) is
        allowed, except with the NNDSVD inits.
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
        with W distributed by row blocks and H by column blocks (:mod:`dnmf.solvers.grid`; X is read
        twice per iteration). "auto": the grid only when X is too wide for row blocks of 256
        rows within the block size. Missing entries need row blocks.
    callbacks : sequence of callables or None
        Each gets every :class:`~dnmf.run.driver.IterationRecord`; returning True stops the fit.
    missing : {None, "nan"}, default=None
        "nan": NaN entries of X are missing; the objective and the (MU) updates then cover the
        observed entries only. ``fit(X, mask=M)`` hides more entries (M False). HALS and BPP fill
        the missing entries with the current WH before each step (an EM-style majorization).
    n_runs : int, default=1
        Random restarts: fit this many seeds spawned from ``random_state`` (concurrently where
        memory allows) and keep the run with the lowest final objective. Needs a random init.
    checkpoint : str or os.PathLike or None
        A directory to write crash-safe checkpoints into (new or empty; see
        :mod:`dnmf.run.checkpoint`): at the start, on the schedule below, and at the end. A
        local or shared path, or an fsspec URL (``s3://bucket/ckpt``; the pointer to the newest
        version is then switched by a single-object write).
        ``fit(X, resume=PATH)`` or :func:`dnmf.checkpoint.resume` continues from it, bitwise
        as if never interrupted. While a fit writes checkpoints, SIGTERM or SIGUSR1 (a batch
        system's pre-emption or wall-time warning) make it finish the current iteration,
        write a checkpoint and raise :class:`~dnmf.errors.FitInterrupted`.
    resume : None, "auto" or str, default=None
        "auto": continue the fit saved in ``checkpoint`` when it holds one of this fit (same
        matrix and iterate-altering settings), start it there when it holds none (or only the
        leftovers of a fit killed before its first checkpoint), and raise
        :class:`~dnmf.errors.CheckpointMismatchError` listing the differences when it holds
        another fit's: one call for a first run and every rerun of a pre-empted job. A
        directory: continue the checkpoint saved there (as ``fit(X, resume=PATH)``).
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
    alpha_W : float, default=0.0
        Constant of the penalty of W (scikit-learn's, >= 1.2); 0: no penalty on W.
    alpha_H : float or "same", default="same"
        Constant of the penalty of H; "same" takes ``alpha_W``.
    l1_ratio : float, default=0.0
        Mix of L1 and L2 in the penalties, from 0 (L2 only) to 1 (L1 only). With them the
        objective is, as in scikit-learn,

        .. math::
            D_\beta(X \| WH) + \alpha_W \rho\, p \|W\|_1 + \alpha_H \rho\, n \|H\|_1
            + \tfrac12 \alpha_W (1-\rho)\, p \|W\|_F^2 + \tfrac12 \alpha_H (1-\rho)\, n \|H\|_F^2

        with ρ = ``l1_ratio``, n = n_samples and p = n_features. Every solver, layout and
        input takes them; the objective (history, stop rule) includes them,
        ``reconstruction_err_`` does not.
    verbose : int or bool, default=0
        Write a line on stderr every 10th iteration (every iteration for 2 and above).

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
        H.
    n_components_ : int
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (n_features_in_,)
        The column names of X, when X was a DataFrame with string column names.
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
        Where the fit ran: ``v_storage`` ("in-memory", "cached" or "streamed"), ``v_bytes``, ``v_sparse``, ``v_nnz``,
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
        resume=None,
        checkpoint_every=10,
        checkpoint_interval=None,
        cache="auto",
        reroot_every=None,
        spill_dir=None,
        inner_sweeps="auto",
        local="auto",
        column_chunks="auto",
        objective_every=1,
        alpha_W=0.0,
        alpha_H="same",
        l1_ratio=0.0,
        verbose=0,
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
        self.resume = resume
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval = checkpoint_interval
        self.cache = cache
        self.reroot_every = reroot_every
        self.spill_dir = spill_dir
        self.inner_sweeps = inner_sweeps
        self.local = local
        self.column_chunks = column_chunks
        self.objective_every = objective_every
        self.alpha_W = alpha_W
        self.alpha_H = alpha_H
        self.l1_ratio = l1_ratio
        self.verbose = verbose

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.positive_only = True
        tags.input_tags.sparse = True
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    def fit(self, X, y=None, W=None, H=None, mask=None, resume=None, layer=None):
        """Learn W and H from X; W and H are a custom start (with init="custom").

        X is a matrix (numpy, scipy.sparse, dask, Zarr), an AnnData object (in memory or
        backed), or the path of a Zarr store or an AnnData ``.h5ad`` file; a sparse matrix on
        disk is read by row blocks. ``layer`` factors that AnnData layer instead of X.
        ``mask`` (boolean, X's shape, True = observed; numpy, dask, Zarr) fits the observed
        entries only. ``resume`` is a checkpoint directory of an earlier fit of X to continue
        from, or "auto" (see the ``resume`` parameter, which it replaces for this call).
        """
        self.fit_transform(X, W=W, H=H, mask=mask, resume=resume, layer=layer)
        return self

    def fit_transform(self, X, y=None, W=None, H=None, mask=None, resume=None, layer=None):
        """Learn W and H from X and return W (numpy if X was in memory, else a dask array)."""
        settings = FitSettings.from_params(self.get_params(), **({} if resume is None else {"resume": resume}))
        _check_feature_names(self, X, reset=True)
        if settings.init == "custom" and resume is None:
            _check_start_dtypes(X, W=W, H=H)
        if settings.n_runs == 1:
            fact = pipeline.fit(X, settings, W=W, H=H, mask=mask, layer=layer)
            losses, best, seeds = [float(fact.result.state.objective)], 0, [fact.settings.seed]
        else:
            if W is not None or H is not None or settings.resume is not None:
                raise ParameterError("n_runs > 1 restarts from random starts; do not pass W, H or resume.")
            if settings.checkpoint is not None:
                raise ParameterError(
                    "n_runs > 1 would write every run into one checkpoint directory; checkpoint a single "
                    "run (n_runs=1, random_state=model.run_seeds_[k]) instead."
                )
            runs = fit_runs(X, settings, mask=mask, layer=layer)
            fact, losses, best, seeds = runs.results[runs.best], runs.losses, runs.best, runs.seeds
        self._store_result(fact)
        self.run_losses_, self.best_run_, self.run_seeds_ = losses, best, seeds
        return self._output(fact)

    def _output(self, fact: Factorization):
        """W for the caller (numpy for V in memory, else a dask array), the spill it may read
        from deleted once W no longer needs it (with this estimator for a dask W)."""
        if fact.matrix.in_memory:
            W = fact.W.compute()
            fact.release()
            return W
        if fact.spill is not None:  # not fact.release: that would keep the whole fit alive
            weakref.finalize(self, fact.spill.close)
        return fact.W

    def _store_result(self, fact: Factorization) -> None:
        result = fact.result
        self.components_ = fact.H
        self.n_components_ = fact.settings.n_components
        self.n_features_in_ = fact.matrix.shape[1]
        self.n_iter_ = result.n_iter
        divergence = result.state.objective - getattr(result.state, "penalty", 0.0)
        self.reconstruction_err_ = float(np.sqrt(2.0 * max(divergence, 0.0)))
        self.history_ = [{**record.as_dict(), "v_storage": fact.info.get("v_storage")} for record in result.history]
        self.cache_used_ = fact.info.get("v_storage") != V_STREAMED
        self.fit_info_ = dict(fact.info)
        self.stop_reason_ = result.stop_reason
        self.seed_ = fact.settings.seed
        self.init_ = fact.settings.init
        self.data_norm_ = float(np.sqrt(fact.stats.v_sq))  # ‖X‖_F, for relative errors

    def transform(self, X, layer=None):
        """W for new rows X with H fixed at ``components_`` (same solver, loss and stopping);
        ``layer``: that layer of an AnnData X."""
        check_is_fitted(self, "components_")
        _check_feature_names(self, X, reset=False)
        return self._solve_w(X, self.components_, layer=layer)[0]

    def _solve_w(self, X, H, W=None, fixed_h: bool = False, layer=None):
        """(W, n_iter) for X with H fixed; W starts from ``W`` if given, else flat (scikit-learn's
        transform start: every entry sqrt(mean(X) / r)). ``fixed_h``: H is the user's (from
        ``non_negative_factorization(update_H=False)``), not the fit's."""
        settings = FitSettings.from_params(
            self.get_params(), n_components=H.shape[0], init="custom", checkpoint=None, resume=None, n_runs=1
        )
        block_bytes = block_bytes_for_workers(current_client())
        matrix = pipeline.open_v(X, settings, block_bytes=block_bytes, layer=layer)
        if matrix.shape[1] != H.shape[1]:
            if fixed_h:
                raise ParameterError(
                    f"Array with wrong shape passed to non_negative_factorization (input H, fixed by "
                    f"update_H=False). Expected ({H.shape[0]}, {matrix.shape[1]}): one column per column of X, "
                    f"but got {H.shape}."
                )
            raise ParameterError(
                f"X has {matrix.shape[1]} features, but NMF is expecting {H.shape[1]} features as input "
                f"(H has {H.shape[1]} columns)."
            )
        if W is None:
            W = _flat_w(matrix, H.shape[0], settings.nan_is_missing)
        fact = pipeline.fit(matrix, settings, W=W, H=H, update_h=False)
        return self._output(fact), fact.result.n_iter

    @classmethod
    def from_result(cls, result) -> NMF:
        """An estimator with a saved result's H (:func:`dnmf.data.results.load_result`), ready
        for ``transform``, with the fit's settings except those that would make it write."""
        run_only = ("checkpoint", "resume", "checkpoint_every", "callbacks")
        model = cls(**{k: v for k, v in result.config.items() if k in DEFAULTS and k not in run_only})
        model.components_ = result.H
        model.n_components_ = result.H.shape[0]
        model.n_features_in_ = result.H.shape[1]
        return model

    @property
    def _n_features_out(self):
        """The number of transformed output features (``get_feature_names_out``: nmf0, nmf1, ...)."""
        return self.components_.shape[0]

    def inverse_transform(self, W):
        """W @ H: the reconstruction (numpy for numpy W, dask for dask W)."""
        check_is_fitted(self, "components_")
        return W @ self.components_


def _check_start_dtypes(X, W=None, H=None) -> None:
    """scikit-learn's rule: a custom W and H have the dtype X is factored in (TypeError otherwise)."""
    dtype = getattr(X, "dtype", None)
    if dtype is None or (np.dtype(dtype).kind not in "biuf"):
        return  # a path (its dtype is read with V), or a dtype open_matrix reports on its own
    want = factor_dtype(dtype)
    got = {name: np.dtype(getattr(F, "dtype", np.asarray(F).dtype)) for name, F in (("H", H), ("W", W)) if F is not None}
    if any(d != want for d in got.values()):
        listed = " and ".join(f"{name}.dtype = {d}" for name, d in got.items())
        raise DtypeMismatchError(
            f"H and W should have the same dtype as X. Got {listed}; X is factored in {want}: pass W and "
            f"H as {want}."
        )


def _flat_w(matrix: Matrix, r: int, nan_is_missing: bool) -> da.Array:
    """A flat start for W: every entry sqrt(mean(X) / r), like scikit-learn's transform."""
    if matrix.sparse:
        mean = scan_matrix(matrix).mean
    else:
        mean = float(dask.compute((da.nanmean if nan_is_missing else da.mean)(matrix.data))[0])
    value = np.sqrt(max(mean, np.finfo(float).tiny) / r)
    return da.full((matrix.shape[0], r), value, dtype=matrix.dtype, chunks=(matrix.row_chunks, (r,)))


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
    alpha_W=0.0,
    alpha_H="same",
    l1_ratio=0.0,
    random_state=None,
    verbose=0,
    eps=None,
    chunks=None,
    callbacks=None,
    missing=None,
    n_runs=1,
    checkpoint=None,
    resume=None,
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
    """Functional form of :class:`NMF`: returns ``(W, H, n_iter)`` like scikit-learn's.

    It takes every parameter of :class:`NMF` (same names, defaults and meaning) and runs the
    same code path: ``NMF(...).fit_transform(X, W=W, H=H)``. With ``update_H=False``, H is
    fixed and only W is fitted, as :meth:`NMF.transform` does: W starts from ``W`` with
    init="custom", else flat.
    """
    given = locals()
    est = NMF(**{name: given[name] for name in DEFAULTS})
    if update_H:
        W_out = est.fit_transform(X, W=W, H=H)
        return W_out, est.components_, est.n_iter_
    if H is None:
        raise ParameterError("update_H=False needs H.")
    _check_start_dtypes(X, H=H)
    H = np.asarray(H)
    if H.ndim != 2 or (n_components not in (None, "auto") and H.shape[0] != n_components):
        rows = n_components if isinstance(n_components, int) else "n_components"
        raise ParameterError(
            "Array with wrong shape passed to non_negative_factorization (input H, fixed by update_H=False). "
            f"Expected ({rows}, n_features of X), but got {H.shape}."
        )
    W_out, n_iter = est._solve_w(X, H, W if init == "custom" else None, fixed_h=True)
    return W_out, H, n_iter
