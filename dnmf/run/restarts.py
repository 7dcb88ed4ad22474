"""Random restarts: K fits from K seeds derived reproducibly from one, run concurrently.

NMF's objective is non-convex, so different starts reach different local minima. Run ``K``
fits whose seeds are spawned from the user's seed (:class:`numpy.random.SeedSequence`), keep
the one with the lowest final objective, and record every final objective.

Without a mask or missing values (on row blocks or a grid), the K fits are fused
(:func:`dnmf.run.fused.fit_fused`): they share every pass over V, each bitwise the fit run
alone. Otherwise they are submitted as separate Dask graphs from a small thread pool, so on a cluster
their tasks interleave and fill the workers while each fit waits on its client-side H update.
Each fit keeps its own W (n x r) in memory, so the number of fits in flight is capped to keep
their factors within :data:`RESTART_MEMORY_BYTES` (and at :data:`MAX_CONCURRENT_RUNS`); the
rest wait their turn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from ..data.missing import open_mask
from ..errors import ParameterError
from ..settings import FitSettings
from .fused import fit_fused
from .pipeline import Factorization, fit, open_v
from .plan import blas_threads_for_scheduler

# Budget for the factors of concurrent fits (W and its update, per fit), and a cap on the
# fits in flight (each is a client thread with its own graphs).
RESTART_MEMORY_BYTES = 2**30
MAX_CONCURRENT_RUNS = 8
RESTART_INITS = ("random", "nndsvdar")


def spawn_seeds(seed: int, n: int, key: tuple[int, ...] = ()) -> list[int]:
    """``n`` independent integer seeds spawned from ``seed``, reproducibly.

    Parameters
    ----------
    seed : int
        The entropy of the :class:`numpy.random.SeedSequence` the seeds are spawned from.
    n : int
        How many seeds.
    key : tuple of int, default=()
        The sequence's ``spawn_key``: different keys give independent families of seeds
        from one ``seed`` (the rank survey keys its folds and each rank's runs).

    Returns
    -------
    list of int
        One 32-bit seed per child sequence, in spawn order.
    """
    children = np.random.SeedSequence(seed, spawn_key=key).spawn(n)
    return [int(child.generate_state(1)[0]) for child in children]


def run_concurrently(func: Callable, jobs: Sequence, max_workers: int, name: str) -> list:
    """``[func(job) for job in jobs]``, with up to ``max_workers`` jobs in flight at once.

    Parameters
    ----------
    func : callable
        Called once per job, from a thread of a pool named ``name`` (or, with one worker or
        one job, from this thread).
    jobs : sequence
        The arguments of ``func``.
    max_workers : int
        The most jobs in flight; each fit in flight is a client thread with its own graphs.
    name : str
        The prefix of the pool's thread names.

    Returns
    -------
    list
        What ``func`` returned for each job, in the order of ``jobs``.
    """
    if max_workers <= 1 or len(jobs) <= 1:
        return [func(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=name) as pool:
        return list(pool.map(func, jobs))


def concurrent_runs(n_runs: int, shape: tuple[int, int], n_components: int, itemsize: int) -> int:
    """How many fits to run at once: their W's within the memory budget, at most 8."""
    per_fit = 2 * shape[0] * n_components * itemsize
    return int(max(1, min(n_runs, MAX_CONCURRENT_RUNS, RESTART_MEMORY_BYTES // max(1, per_fit))))


@dataclass(frozen=True)
class Runs:
    """The outcome of K restarts: what each run's ``summarize`` returned, and their losses.

    results : one entry per run, in seed order.
    losses : final objective of each run.
    seeds : the seed of each run.
    """

    results: list
    losses: list[float]
    seeds: list[int]

    @property
    def best(self) -> int:
        """Index of the run with the lowest final objective (the first one on ties)."""
        return int(np.argmin(self.losses))


def _keep_all(fact: Factorization) -> Factorization:
    return fact


def fit_runs(
    X,
    settings: FitSettings,
    *,
    mask=None,
    summarize: Callable[[Factorization], object] = _keep_all,
    max_concurrent: int | None = None,
    layer: str | None = None,
) -> Runs:
    """Fit ``settings.n_runs`` seeds derived from ``settings.seed``; keep what ``summarize`` returns.

    Parameters
    ----------
    X : any input :func:`dnmf.open_matrix` accepts (opened once, shared by the runs).
    settings : the fit's settings (each run replaces the seed by its own). With one run, the
        fit uses ``settings.seed`` itself.
    mask : optional mask of V's shape (True = observed), shared by all runs.
    summarize : what to keep of each fit (by default the whole :class:`Factorization`);
        keeping a summary frees each fit's W as soon as it ends.
    max_concurrent : cap on fits in flight (default: :func:`concurrent_runs`).
    layer : for an AnnData input, the layer to factor instead of X.
    """
    n_runs = settings.n_runs
    matrix = open_v(X, settings, mask, layer=layer)
    if mask is not None:
        mask = open_mask(mask, matrix)
    if n_runs == 1:
        seeds = [settings.seed]
    else:
        seeds = spawn_seeds(settings.seed, n_runs)
        init = settings.init or "random"
        if init not in RESTART_INITS:
            raise ParameterError(
                f"n_runs={n_runs} restarts need a random start, but init={init!r} gives the same start "
                f"every time; use init in {RESTART_INITS}."
            )
        settings = replace(settings, init=init)
    r = settings.n_components if isinstance(settings.n_components, int) else matrix.shape[1]  # None, "auto": p
    if n_runs > 1 and mask is None and not settings.nan_is_missing:
        # The runs share their passes over V (each bitwise the run alone).
        runs = fit_fused(matrix, [replace(settings, seed=s) for s in seeds], max_concurrent=max_concurrent,
                         summarize=lambda fact: (summarize(fact), float(fact.result.state.objective)))
        return Runs([o[0] for o in runs.results], [o[1] for o in runs.results], seeds)
    workers = max_concurrent or concurrent_runs(n_runs, matrix.shape, r, matrix.dtype.itemsize)

    def one(run_seed: int):
        fact = fit(matrix, replace(settings, seed=run_seed), mask=mask)
        return summarize(fact), float(fact.result.state.objective)

    with blas_threads_for_scheduler():
        outcomes = run_concurrently(one, seeds, workers, "dnmf-run")
    return Runs([o[0] for o in outcomes], [o[1] for o in outcomes], seeds)
