"""Rank selection: fit several ranks, several runs each, and measure what the literature uses.

For every rank r and every run k = 1..K, :func:`rank_survey` hides a random fraction of V's
entries (mask k, the same for every rank, so ranks are compared on the same folds), fits the
masked objective on the rest from a fresh random start, and records

- the training objective and relative error sqrt(2 D / Σ V²) over the training entries (the
  elbow curve);
- the held-out error: sqrt(2 D / Σ V²) over the hidden entries, i.e. ‖V − WH‖ / ‖V‖ there for
  Frobenius (entry-wise cross-validation; Kanagal & Sindhwani 2010, Owen & Perry 2009);
- the cophenetic correlation of the consensus matrix (Brunet et al. 2004): each sample (row) is
  assigned to its largest factor in W, the K assignments are averaged into a consensus matrix
  C̄, 1 − C̄ is clustered by average linkage, and the cophenetic distances are correlated with
  1 − C̄ (on a random subsample of at most ``max_samples`` rows);
- the silhouette of the factors across runs (as NMFk does): the K·r unit-norm rows of H are
  matched run by run to the best run's rows (Hungarian algorithm on cosine similarity) and the
  silhouette of that clustering is taken with the cosine distance.

Rank 1 is always fitted: it is the no-structure reference.

**The suggestion rule.** Let e(r) be the mean held-out error over the K runs and r* its
minimizer. Structure is claimed only when e(r*) is at least ``margin`` (relative) below e(1)
and r* > 1; otherwise the survey reports "no structure found" and suggests no rank. On pure
noise a rank-r model only fits the noise of the training entries, so e(r) does not drop below
e(1). When structure is found the suggested rank is the smallest rank whose e(r) is within one
standard error (over runs) of e(r*) (the one-standard-error rule); the cophenetic correlation
and silhouette at that rank are reported as a cross-check, with a note when the factors are
unstable across runs (silhouette < 0.75). The cophenetic correlation measures how sharply the
samples fall into clusters; it is low for data whose samples mix parts evenly even when the
parts themselves are found reliably, so it does not veto the suggestion.

References
----------
J.-P. Brunet, P. Tamayo, T. Golub, J. Mesirov (2004). Metagenes and molecular pattern discovery
using matrix factorization. PNAS 101(12).
A. B. Owen, P. O. Perry (2009). Bi-cross-validation of the SVD and the nonnegative matrix
factorization. Annals of Applied Statistics 3(2).
B. Kanagal, V. Sindhwani (2010). Rank selection in low-rank matrix approximations: a study of
cross-validation for NMFs. NeurIPS workshop.
B. S. Alexandrov, V. G. Stanev, et al. NMFk (pyDNMFk / T-ELF): silhouettes of factors
clustered across perturbed runs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.cluster.hierarchy import cophenet, linkage
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import squareform
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import silhouette_score

from ..data import missing
from ..errors import ParameterError, StoreError, expected
from ..estimator import beta_value, blas_threads_for_scheduler, fit_factors, resolve_seed
from ..run.restarts import concurrent_runs
from ..data.store import open_matrix

logger = logging.getLogger(__name__)

UNSTABLE_SILHOUETTE = 0.75


@dataclass(frozen=True)
class RankResult:
    """What the survey measured at one rank (NaN where a measure is undefined).

    rank : the rank r.
    objective : final training objective of the best run.
    relative_error : sqrt(2 D / Σ V²) over the training entries, best run.
    heldout_error : mean over runs of the held-out relative error.
    heldout_se : its standard error over runs.
    cophenetic : cophenetic correlation of the consensus matrix (NaN for r = 1 or 1 run).
    silhouette : silhouette of the factors clustered across runs (NaN for r = 1 or 1 run).
    run_losses, run_heldout_errors : per run.
    """

    rank: int
    objective: float
    relative_error: float
    heldout_error: float
    heldout_se: float
    cophenetic: float
    silhouette: float
    run_losses: tuple[float, ...]
    run_heldout_errors: tuple[float, ...]


@dataclass(frozen=True)
class RankSurvey:
    """The result of :func:`rank_survey`.

    results : one :class:`RankResult` per rank, ascending (rank 1, the reference, included).
    suggested_rank : the suggested rank, or None when no structure was found.
    reason : one sentence saying why.
    settings : the survey's settings (shape, ranks asked for, n_runs, holdout_fraction, ...).
    """

    results: tuple[RankResult, ...]
    suggested_rank: int | None
    reason: str
    settings: dict = field(default_factory=dict)

    @property
    def structure_found(self) -> bool:
        return self.suggested_rank is not None

    @property
    def ranks(self) -> list[int]:
        return [res.rank for res in self.results]

    def curve(self, name: str) -> np.ndarray:
        """One measure across ranks, e.g. ``curve("heldout_error")``."""
        return np.array([getattr(res, name) for res in self.results], dtype=float)

    def to_dict(self) -> dict:
        return {
            "results": [asdict(res) for res in self.results],
            "suggested_rank": self.suggested_rank,
            "reason": self.reason,
            "settings": self.settings,
        }

    @classmethod
    def from_dict(cls, data: dict) -> RankSurvey:
        results = tuple(
            RankResult(**{**res, "run_losses": tuple(res["run_losses"]), "run_heldout_errors": tuple(res["run_heldout_errors"])})
            for res in data["results"]
        )
        return cls(results, data["suggested_rank"], data["reason"], data.get("settings", {}))

    def to_table(self) -> str:
        """A fixed-width text table, the suggestion marked with '*', and the reason."""
        header = f"{'rank':>5} {'objective':>12} {'rel.error':>10} {'held-out':>10} {'± se':>9} {'cophenetic':>10} {'silhouette':>10}"
        lines = [header, "-" * len(header)]
        for res in self.results:
            mark = "*" if res.rank == self.suggested_rank else (" (ref)" if res.rank == 1 else "")
            lines.append(
                f"{res.rank:>5} {res.objective:>12.5g} {res.relative_error:>10.4f} {res.heldout_error:>10.4f} "
                f"{res.heldout_se:>9.2g} {_fmt(res.cophenetic):>10} {_fmt(res.silhouette):>10}{mark}"
            )
        lines.append("")
        lines.append(("Suggested rank: %d. " % self.suggested_rank if self.structure_found else "No structure found. ") + self.reason)
        return "\n".join(lines)

    def save(self, path) -> None:
        """Write the survey as JSON (a path ending in .json) or into a Zarr group's attributes."""
        path = os.fspath(path)
        data = _json_safe(self.to_dict())
        if path.endswith(".json"):
            with open(path, "w") as f:
                json.dump(data, f, indent=2)
            return
        import zarr

        group = zarr.open_group(store=path, mode="a")
        group.attrs["rank_survey"] = data

    @classmethod
    def load(cls, path) -> RankSurvey:
        """Read a survey written by :meth:`save`."""
        path = os.fspath(path)
        try:
            if path.endswith(".json"):
                with open(path) as f:
                    data = json.load(f)
            else:
                import zarr

                data = dict(zarr.open_group(store=path, mode="r").attrs)["rank_survey"]
        except (OSError, KeyError, ValueError) as e:
            raise StoreError(f"No rank survey at {path!r}: {e}") from e
        return cls.from_dict(_json_unsafe(data))

    def plot(self, path) -> None:
        """One PNG: relative and held-out errors, cophenetic correlation and silhouette by rank."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        ranks = self.ranks
        fig, (ax_err, ax_stab) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
        ax_err.plot(ranks, self.curve("relative_error"), "o-", label="relative error (training)")
        ax_err.errorbar(ranks, self.curve("heldout_error"), yerr=self.curve("heldout_se"), fmt="s-", capsize=3, label="held-out error")
        ax_err.set_xlabel("rank")
        ax_err.set_ylabel("relative error")
        ax_err.legend()
        ax_stab.plot(ranks, self.curve("cophenetic"), "o-", label="cophenetic correlation")
        ax_stab.plot(ranks, self.curve("silhouette"), "s-", label="silhouette of factors")
        ax_stab.set_xlabel("rank")
        ax_stab.set_ylim(min(-0.05, np.nanmin(np.r_[self.curve("silhouette"), 0.0])), 1.05)
        ax_stab.legend(loc="lower left")
        for ax in (ax_err, ax_stab):
            ax.set_xticks(ranks)
            if self.structure_found:
                ax.axvline(self.suggested_rank, color="grey", linestyle="--")
        title = f"suggested rank {self.suggested_rank}" if self.structure_found else "no structure found"
        fig.suptitle(f"dnmf rank survey: {title}")
        fig.savefig(os.fspath(path), dpi=100)
        plt.close(fig)


def _fmt(value: float) -> str:
    return "-" if not np.isfinite(value) else f"{value:.4f}"


def _json_safe(value):
    """NaN → None, recursively (JSON has no NaN)."""
    if isinstance(value, float):
        return None if not math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _json_unsafe(data: dict) -> dict:
    """None → NaN in the per-rank float fields."""
    for res in data["results"]:
        for key, value in res.items():
            if value is None:
                res[key] = float("nan")
    return data


# ---------------------------------------------------------------------------
# Measures


def consensus_matrix(assignments: list[np.ndarray]) -> np.ndarray:
    """The mean connectivity matrix: C̄_ij = fraction of runs that put samples i and j together.

    ``assignments``: one integer label vector (n_samples,) per run.
    """
    labels = np.asarray(assignments)
    return np.mean([labels_k[:, None] == labels_k[None, :] for labels_k in labels], axis=0)


def cophenetic_correlation(consensus: np.ndarray) -> float:
    """Pearson correlation of 1 − C̄ with the cophenetic distances of its average-linkage tree.

    NaN when 1 − C̄ is constant (e.g. every run puts every sample in one cluster).
    """
    distances = squareform(1.0 - consensus, checks=False)
    if distances.size < 2 or np.ptp(distances) == 0:
        return float("nan")
    tree = linkage(distances, method="average")
    corr, _ = cophenet(tree, distances)
    return float(corr)


def factor_silhouette(components: list[np.ndarray], reference: int = 0) -> float:
    """Silhouette (cosine) of the K·r factor rows, clustered by matching each run to ``reference``.

    ``components``: one H (r, p) per run. NaN with fewer than two runs or r < 2.
    """
    if len(components) < 2 or components[0].shape[0] < 2:
        return float("nan")
    unit = [H / np.maximum(np.linalg.norm(H, axis=1, keepdims=True), np.finfo(float).tiny) for H in components]
    labels = []
    for H in unit:
        similarity = H @ unit[reference].T
        rows, cols = linear_sum_assignment(-similarity)
        run_labels = np.empty(H.shape[0], dtype=int)
        run_labels[rows] = cols
        labels.append(run_labels)
    X = np.vstack(unit)
    if np.any(np.linalg.norm(X, axis=1) == 0):
        return float("nan")
    return float(silhouette_score(X, np.concatenate(labels), metric="cosine"))


def suggest_rank(results: list[RankResult], margin: float) -> tuple[int | None, str]:
    """The suggestion rule of the module docstring: (rank or None, reason)."""
    reference = next(res for res in results if res.rank == 1)
    errors = np.array([res.heldout_error for res in results])
    best = results[int(np.nanargmin(errors))]
    gain = (reference.heldout_error - best.heldout_error) / max(reference.heldout_error, np.finfo(float).tiny)
    if best.rank == 1 or gain < margin:
        return None, (
            f"The held-out error is lowest at rank {best.rank} ({best.heldout_error:.4g}), "
            f"{max(gain, 0):.1%} below rank 1 ({reference.heldout_error:.4g}): less than the {margin:.0%} "
            "margin, so the data show no structure beyond rank 1."
        )
    within = [res for res in results if res.rank > 1 and res.heldout_error <= best.heldout_error + best.heldout_se]
    chosen = min(within, key=lambda res: res.rank)
    reason = f"The held-out error is lowest at rank {best.rank} ({best.heldout_error:.4g}, {gain:.1%} below rank 1)"
    if chosen.rank != best.rank:
        reason += f"; rank {chosen.rank} is within one standard error of it and simpler"
    reason += f". Cophenetic correlation {_fmt(chosen.cophenetic)}, factor silhouette {_fmt(chosen.silhouette)}"
    unstable = chosen.silhouette < UNSTABLE_SILHOUETTE
    reason += " (the factors are not stable across runs at this rank)." if unstable else "."
    return chosen.rank, reason


# ---------------------------------------------------------------------------
# The survey


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


def _run_seeds(seed: int, rank: int, n_runs: int) -> list[int]:
    children = np.random.SeedSequence(seed, spawn_key=(rank,)).spawn(n_runs)
    return [int(child.generate_state(1)[0]) for child in children]


@dataclass(frozen=True)
class _RunOutcome:
    objective: float
    train_v_sq: float
    heldout_error: float
    labels: np.ndarray
    H: np.ndarray


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
    solver : "hals" or "mu"; default HALS for Frobenius (missing entries filled with the
        current WH at each step), MU otherwise.
    max_iter, tol, tol_x : stopping rules of each fit.
    random_state : int or None; every mask and start derives from it reproducibly.
    missing_values : None or "nan" (NaN entries of X are missing: neither fitted nor scored).
    mask : optional boolean mask of X's shape (True = observed).
    chunks : rows per block.
    max_samples : rows subsampled for the consensus matrix.
    margin : relative held-out improvement over rank 1 needed to claim structure.
    max_concurrent : fits in flight at once (default: as many as memory allows, see
        :func:`dnmf.restarts.concurrent_runs`).

    Returns
    -------
    RankSurvey
    """
    wanted = parse_ranks(ranks)
    if not isinstance(n_runs, (int, np.integer)) or isinstance(n_runs, bool) or n_runs < 1:
        raise ParameterError(expected("n_runs a positive integer", n_runs))
    if not isinstance(holdout_fraction, (int, float)) or not 0 < holdout_fraction < 1:
        raise ParameterError(expected("holdout_fraction strictly between 0 and 1", holdout_fraction))
    matrix = open_matrix(X, chunks)
    n, p = matrix.shape
    if wanted[-1] > min(n, p):
        raise ParameterError(f"Rank {wanted[-1]} is larger than min(n_samples, n_features) = {min(n, p)}; survey smaller ranks.")
    missing.check_missing(missing_values)
    user_mask = None if mask is None else missing.open_mask(mask, matrix)
    seed = resolve_seed(random_state)
    all_ranks = sorted({1, *wanted})
    fold_seeds = _run_seeds(seed, 0, n_runs)
    trains = [missing.holdout_mask(matrix, s, holdout_fraction) for s in fold_seeds]
    fit_masks = [train if user_mask is None else (user_mask & train) for train in trains]
    rows = np.sort(np.random.default_rng([seed, 5]).choice(n, size=min(n, max_samples), replace=False))
    base = dict(
        solver=solver or ("hals" if beta_value(beta_loss) == 2.0 else "mu"), beta_loss=beta_loss, init="random", max_iter=max_iter, tol=tol, tol_x=tol_x,
        max_time=None, eps=None, chunks=chunks, missing=missing_values,
    )

    def one(job: tuple[int, int, int]) -> _RunOutcome:
        rank, k, run_seed = job
        params = {**base, "n_components": rank, "random_state": run_seed}
        fact = fit_factors(matrix, params, mask=fit_masks[k])
        W = fact.result.state.W
        score = missing.score_holdout(matrix, user_mask, trains[k], W, fact.H, fact.config.beta)
        labels = np.argmax(W[rows].compute(), axis=1)
        logger.info("rank %d run %d: objective %.6g, held-out error %.4g", rank, k, fact.result.state.objective, score.relative_error)
        return _RunOutcome(float(fact.result.state.objective), score.train_v_sq, score.relative_error, labels, fact.H)

    jobs = [(rank, k, s) for rank in all_ranks for k, s in enumerate(_run_seeds(seed, rank, n_runs))]
    workers = max_concurrent or concurrent_runs(len(jobs), matrix.shape, max(all_ranks), matrix.dtype.itemsize)
    # Warning filters are process-wide: set them once here, not in the worker threads.
    with blas_threads_for_scheduler(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if workers <= 1:
            outcomes = [one(job) for job in jobs]
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dnmf-survey") as pool:
                outcomes = list(pool.map(one, jobs))

    results = []
    for i, rank in enumerate(all_ranks):
        runs = outcomes[i * n_runs : (i + 1) * n_runs]
        results.append(_summarize(rank, runs))
    suggested, reason = suggest_rank(results, margin)
    settings = {
        "shape": [n, p], "ranks": wanted, "n_runs": n_runs, "holdout_fraction": holdout_fraction,
        "beta_loss": beta_loss, "solver": base["solver"], "max_iter": max_iter, "tol": tol, "tol_x": tol_x, "seed": seed,
        "margin": margin, "max_samples": int(len(rows)), "missing": missing_values, "source": matrix.source,
    }
    return RankSurvey(tuple(results), suggested, reason, settings)


def _summarize(rank: int, runs: list[_RunOutcome]) -> RankResult:
    losses = [run.objective for run in runs]
    best = int(np.argmin(losses))
    heldout = np.array([run.heldout_error for run in runs])
    se = float(heldout.std(ddof=1) / np.sqrt(len(runs))) if len(runs) > 1 else float("nan")
    relative_error = float(np.sqrt(2.0 * losses[best] / max(runs[best].train_v_sq, np.finfo(float).tiny)))
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
