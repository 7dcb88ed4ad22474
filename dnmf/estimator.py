"""The scikit-learn-style estimator :class:`NMF` and :func:`non_negative_factorization`.

Both share one code path, :func:`fit_factors`: open and scan V, make a start, build the
solver, run the driver.
"""

from __future__ import annotations

import contextlib
import numbers
import warnings
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import threadpool_limits

from . import driver, kernels
from .errors import ParameterError, expected
from .init import make_start, resolve_init
from .kernels import Rule
from .solvers import SOLVERS, Solver
from .store import Matrix, MatrixStats, open_matrix, scan_matrix, validate_stats

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
    rules = driver.StoppingRules(params["max_iter"], params["tol"], params["tol_x"], params["max_time"])
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


def runs_locally(matrix: Matrix, local) -> bool:
    """Whether to run the kernels block by block in this thread (``local`` True / False /
    "auto": small in-memory V under dask's default threaded or synchronous scheduler)."""
    if local != "auto":
        return bool(local)
    scheduler = dask.base.get_scheduler()
    default = scheduler is None or scheduler in (dask.threaded.get, dask.local.get_sync)
    n, p = matrix.shape
    return matrix.in_memory and default and n * p * matrix.dtype.itemsize <= LOCAL_MAX_BYTES


@contextlib.contextmanager
def blas_threads_for_scheduler():
    """Single-threaded BLAS while dask's threaded scheduler runs tasks in this process.

    Dask's threads already use every core; BLAS threads on top oversubscribe them and make
    the results depend on the thread count.
    """
    scheduler = dask.base.get_scheduler()
    # None: no scheduler configured and no distributed client, so arrays use the threaded one.
    if scheduler is None or scheduler is dask.threaded.get:
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


def fit_factors(
    X,
    params: dict,
    W=None,
    H=None,
    update_h: bool = True,
    callbacks: tuple = (),
) -> Factorization:
    """The shared code path of :class:`NMF` and :func:`non_negative_factorization`."""
    matrix = open_matrix(X, params.get("chunks"))
    config = make_config(params, matrix.shape)
    if not update_h:
        config = FitConfig(config.n_components, config.solver, config.beta, "custom", config.eps, config.seed, config.rules, config.inner_sweeps)
    with blas_threads_for_scheduler():
        stats = scan_matrix(matrix, with_xlogx=config.beta == kernels.KULLBACK_LEIBLER)
        validate_stats(stats, config.beta)
        start = make_start(matrix, stats, config.n_components, config.init, config.seed, W, H)
        solver = Solver(
            matrix, config.rule_for(matrix.shape, stats.nnz), stats.v_sq, update_h=update_h,
            kl_offset=stats.v_xlogx - stats.v_sum, local=runs_locally(matrix, params.get("local", "auto")),
        )
        state = solver.start(start.W, start.H)
        result = driver.run(solver, state, config.rules, callbacks=tuple(callbacks))
    if result.stop_reason == "max_iter" and config.rules.max_iter > 1 and update_h:
        warnings.warn(
            f"Maximum number of iterations {config.rules.max_iter} reached before convergence "
            "(tol, tol_x). Increase max_iter or loosen tol / tol_x.",
            ConvergenceWarning,
            stacklevel=3,
        )
    return Factorization(result.state.W, result.state.H, result, config, matrix, stats)


class NMF(TransformerMixin, BaseEstimator):
    r"""Non-negative matrix factorization of a possibly out-of-core matrix on Dask.

    Finds non-negative W (n_samples, n_components) and H (n_components, n_features) whose
    product approximates X by minimizing the β-divergence

    .. math::
        D_\beta(X \| WH), \qquad D_2 = \tfrac12 \|X - WH\|_F^2,\quad
        D_1 = \sum X \log\frac{X}{WH} - X + WH .

    Each iteration updates H, then W, reading X once as a Dask graph over its row blocks.

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
        Stop when the relative objective decrease of an iteration is below ``tol`` and ...
    tol_x : float, default=1e-3
        ... the relative change of W and of H (Frobenius norm) is below ``tol_x``.
    max_time : float or None
        Stop after this many seconds.
    random_state : int, RandomState, Generator or None
    eps : float or None
        Added to every denominator of the updates (default 1e-10).
    chunks : int or None
        Rows per block of X (default: about 64 MiB per block).
    callbacks : sequence of callables or None
        Each gets every :class:`~dnmf.driver.IterationRecord`; returning True stops the fit.
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
        inner_sweeps="auto",
        local="auto",
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
        self.inner_sweeps = inner_sweeps
        self.local = local

    def fit(self, X, y=None, W=None, H=None):
        """Learn W and H from X; W and H are a custom start (with init="custom")."""
        self.fit_transform(X, W=W, H=H)
        return self

    def fit_transform(self, X, y=None, W=None, H=None):
        """Learn W and H from X and return W (numpy if X was in memory, else a dask array)."""
        fact = fit_factors(X, self.get_params(), W=W, H=H, callbacks=tuple(self.callbacks or ()))
        self._store_result(fact)
        return self._output(fact.W, fact.matrix)

    def _store_result(self, fact: Factorization) -> None:
        result = fact.result
        self.components_ = fact.H
        self.n_components_ = fact.config.n_components
        self.n_features_in_ = fact.matrix.shape[1]
        self.n_iter_ = result.n_iter
        self.reconstruction_err_ = float(np.sqrt(2.0 * result.state.objective))
        self.history_ = [record.as_dict() for record in result.history]
        self.stop_reason_ = result.stop_reason
        self.seed_ = fact.config.seed
        self.init_ = fact.config.init

    @staticmethod
    def _output(W: da.Array, matrix: Matrix):
        return W.compute() if matrix.in_memory else W

    def transform(self, X):
        """W for new rows X with H fixed at ``components_`` (same solver, loss and stopping)."""
        check_is_fitted(self, "components_")
        matrix = open_matrix(X, self.chunks)
        if matrix.shape[1] != self.components_.shape[1]:
            raise ParameterError(
                expected(f"X with {self.components_.shape[1]} features, as in fit", f"{matrix.shape[1]} features")
            )
        W0 = self._constant_w(matrix)
        params = {**self.get_params(), "n_components": self.n_components_, "init": "custom"}
        fact = fit_factors(matrix, params, W=W0, H=self.components_, update_h=False)
        return self._output(fact.W, matrix)

    def _constant_w(self, matrix: Matrix) -> da.Array:
        """A flat start for W: every entry sqrt(mean(X) / r), like scikit-learn's transform."""
        mean = float(dask.compute(matrix.data.mean())[0]) if not matrix.sparse else _sparse_mean(matrix)
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
    return NMF._output(fact.W, fact.matrix), fact.H, fact.result.n_iter
