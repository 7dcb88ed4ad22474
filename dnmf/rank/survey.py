"""The rank survey: for every rank and run, hide a fold of V's entries, fit the rest, score
the fold, and gather the measures into a :class:`~dnmf.rank.report.RankSurvey`."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, replace

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from ..data import missing
from ..data.store import open_matrix
from ..errors import ParameterError, expected
from ..run.pipeline import fit
from ..run.plan import blas_threads_for_scheduler
from ..run.restarts import concurrent_runs, run_concurrently, spawn_seeds
from ..settings import FitSettings, beta_value, resolve_seed
from .measures import consensus_matrix, cophenetic_correlation, factor_silhouette, suggest_rank
from .report import RankResult, RankSurvey

logger = logging.getLogger(__name__)


def parse_ranks(ranks) -> list[int]:
    """Ranks from an iterable of ints or a string "2:12" (inclusive), "2:12:2" or "2,3,5"."""
    if isinstance(ranks, str):
        try:
            if ":" in ranks:
                parts = [int(x) for x in ranks.split(":")]
                if len(parts) not in (2, 3):
                    raise ValueError(ranks)
                step = parts[2] if len(parts) == 3 else 1
                values = list(range(parts[0], parts[1] + 1, step))
            else:
                values = [int(x) for x in ranks.split(",")]
        except ValueError as e:
            raise ParameterError(expected("ranks like '2:12', '2:12:2' or '2,3,5'", ranks)) from e
    else:
        values = list(ranks)
    if not values or any(not isinstance(r, (int, np.integer)) or isinstance(r, bool) or r < 1 for r in values):
        raise ParameterError(expected("a non-empty list of positive integer ranks", ranks))
    return sorted({int(r) for r in values})


@dataclass(frozen=True)
class _RunOutcome:
    objective: float
    train_v_sq: float
    heldout_error: float
    labels: np.ndarray
    H: np.ndarray
    divergence: float  # the objective less its penalty terms (the objective itself unregularized)


def rank_survey(
    X,
    ranks,
    *,
    n_runs: int = 10,
    holdout_fraction: float = 0.1,
    beta_loss="frobenius",
    solver: str | None = None,
    max_iter: int = 500,
    tol: float = 1e-5,
    tol_x: float = 1e-4,
    random_state=None,
    missing_values=None,
    mask=None,
    chunks=None,
    max_samples: int = 1000,
    margin: float = 0.02,
    max_concurrent: int | None = None,
    alpha_W: float = 0.0,
    alpha_H="same",
    l1_ratio: float = 0.0,
) -> RankSurvey:
    """Fit ``n_runs`` masked NMFs per rank and measure which rank the data support.

    Parameters
    ----------
    X : ndarray, scipy.sparse, dask array, zarr.Array or Zarr path, shape (n_samples, n_features)
    ranks : iterable of int, or a string "2:12" (inclusive), "2:12:2", "2,3,5". Rank 1 is
        added as the reference.
    n_runs : int, default=10
        Runs per rank; run k hides the entries of hold-out mask k (the same for every rank)
        and starts from its own random W, H.
    holdout_fraction : float in (0, 1), default=0.1
        Fraction of entries hidden in each run and scored after the fit.
    beta_loss : as in :class:`dnmf.NMF`.
    solver : "hals", "bpp" or "mu"; default HALS for Frobenius, MU otherwise. HALS and BPP
        fill the hidden entries with the current WH at each step (an EM-style majorization);
        MU weights them out.
    max_iter, tol, tol_x : stopping rules of each fit.
    random_state : int or None; every mask and start derives from it reproducibly.
    missing_values : None or "nan" (NaN entries of X are missing: neither fitted nor scored).
    mask : optional boolean mask of X's shape (True = observed).
    chunks : rows per block.
    max_samples : rows subsampled for the consensus matrix.
    margin : relative held-out improvement over rank 1 needed to claim structure.
    alpha_W, alpha_H, l1_ratio : the penalties of every fit, as in :class:`dnmf.NMF`; the
        relative error leaves them out.
    max_concurrent : fits in flight at once (default: as many as memory allows, see
        :func:`dnmf.run.restarts.concurrent_runs`).

    Returns
    -------
    RankSurvey
    """
    wanted = parse_ranks(ranks)
    if not isinstance(n_runs, (int, np.integer)) or isinstance(n_runs, bool) or n_runs < 1:
        raise ParameterError(expected("n_runs a positive integer", n_runs))
    if not isinstance(holdout_fraction, (int, float)) or not 0 < holdout_fraction < 1:
        raise ParameterError(expected("holdout_fraction strictly between 0 and 1", holdout_fraction))
    base = FitSettings.from_params(
        solver=solver or ("hals" if beta_value(beta_loss) == 2.0 else "mu"), beta_loss=beta_loss, init="random",
        max_iter=max_iter, tol=tol, tol_x=tol_x, chunks=chunks, missing=missing_values,
        alpha_W=alpha_W, alpha_H=alpha_H, l1_ratio=l1_ratio,
    )
    matrix = open_matrix(X, chunks)
    n, p = matrix.shape
    if wanted[-1] > min(n, p):
        raise ParameterError(f"Rank {wanted[-1]} is larger than min(n_samples, n_features) = {min(n, p)}; survey smaller ranks.")
    user_mask = None if mask is None else missing.open_mask(mask, matrix)
    seed = resolve_seed(random_state)
    all_ranks = sorted({1, *wanted})
    fold_seeds = spawn_seeds(seed, n_runs, key=(0,))
    trains = [missing.holdout_mask(matrix, s, holdout_fraction) for s in fold_seeds]
    fit_masks = [train if user_mask is None else (user_mask & train) for train in trains]
    rows = np.sort(np.random.default_rng([seed, 5]).choice(n, size=min(n, max_samples), replace=False))

    def one(job: tuple[int, int, int]) -> _RunOutcome:
        rank, k, run_seed = job
        fact = fit(matrix, replace(base, n_components=rank, seed=run_seed), mask=fit_masks[k])
        W = fact.result.state.W
        score = missing.score_holdout(matrix, user_mask, trains[k], W, fact.H, fact.settings.beta)
        labels = np.argmax(W[rows].compute(), axis=1)
        logger.info("rank %d run %d: objective %.6g, held-out error %.4g", rank, k, fact.result.state.objective, score.relative_error)
        state = fact.result.state
        divergence = float(state.objective - state.penalty)
        return _RunOutcome(float(state.objective), score.train_v_sq, score.relative_error, labels, fact.H, divergence)

    jobs = [(rank, k, s) for rank in all_ranks for k, s in enumerate(spawn_seeds(seed, n_runs, key=(rank,)))]
    workers = max_concurrent or concurrent_runs(len(jobs), matrix.shape, max(all_ranks), matrix.dtype.itemsize)
    # Warning filters are process-wide: set them once here, not in the worker threads.
    with blas_threads_for_scheduler(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        outcomes = run_concurrently(one, jobs, workers, "dnmf-survey")

    results = []
    for i, rank in enumerate(all_ranks):
        runs = outcomes[i * n_runs : (i + 1) * n_runs]
        results.append(_summarize(rank, runs))
    suggested, reason = suggest_rank(results, margin)
    settings = {
        "shape": [n, p], "ranks": wanted, "n_runs": n_runs, "holdout_fraction": holdout_fraction,
        "beta_loss": beta_loss, "solver": base.solver, "max_iter": max_iter, "tol": tol, "tol_x": tol_x, "seed": seed,
        "margin": margin, "max_samples": int(len(rows)), "missing": missing_values, "source": matrix.source,
        "alpha_W": base.alpha_W, "alpha_H": base.alpha_H_value, "l1_ratio": base.l1_ratio,
    }
    return RankSurvey(tuple(results), suggested, reason, settings)


def _summarize(rank: int, runs: list[_RunOutcome]) -> RankResult:
    losses = [run.objective for run in runs]
    best = int(np.argmin(losses))
    heldout = np.array([run.heldout_error for run in runs])
    se = float(heldout.std(ddof=1) / np.sqrt(len(runs))) if len(runs) > 1 else float("nan")
    relative_error = float(np.sqrt(2.0 * max(runs[best].divergence, 0.0) / max(runs[best].train_v_sq, np.finfo(float).tiny)))
    if rank > 1 and len(runs) > 1:
        coph = cophenetic_correlation(consensus_matrix([run.labels for run in runs]))
        sil = factor_silhouette([run.H for run in runs], reference=best)
    else:
        coph = sil = float("nan")
    return RankResult(
        rank=rank, objective=losses[best], relative_error=relative_error, heldout_error=float(heldout.mean()),
        heldout_se=se, cophenetic=coph, silhouette=sil, run_losses=tuple(losses),
        run_heldout_errors=tuple(float(e) for e in heldout),
    )
