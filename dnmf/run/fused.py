"""Fits of one V run together, sharing every pass over V (:mod:`dnmf.solvers.fused`).

:func:`fit_fused` runs each settings' fit through the one pipeline (:func:`dnmf.run.pipeline.fit`)
in a thread of its own, all members of one :class:`~dnmf.solvers.fused.FusedPasses`: the fits
in flight read each row block of V (or each chunk of a grid) once per pass between them, and V
is scanned once.
Each fit's result is bitwise the one it has run alone. The fits in flight are capped so that
their W's (and W's update) fit :data:`FUSED_MEMORY_BYTES`; the others start as fits end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..cluster import current_client
from ..settings import FitSettings
from ..solvers.fused import FusedPasses
from .pipeline import Factorization, fit, open_v
from .plan import blas_threads_for_scheduler

FUSED_MEMORY_BYTES = 2**30
MAX_FUSED_FITS = 256


def fused_width(n_fits: int, shape: tuple[int, int], n_components: int, itemsize: int) -> int:
    """How many fits to run together: their W's (twice: W and its update) within the budget."""
    per_fit = 2 * shape[0] * n_components * itemsize
    return int(max(1, min(n_fits, MAX_FUSED_FITS, FUSED_MEMORY_BYTES // max(1, per_fit))))


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
    max_concurrent : fits run together at most (default: :func:`fused_width`).
    """
    settings = list(settings)
    if not settings:
        return FusedRuns([], 0, 0)
    matrix = open_v(X, settings[0])
    r = max(s.n_components if isinstance(s.n_components, int) else matrix.shape[1] for s in settings)
    workers = max_concurrent or fused_width(len(settings), matrix.shape, r, matrix.dtype.itemsize)
    passes = FusedPasses()
    passes.expect(min(workers, len(settings)))  # the first fits start together

    def one(fit_settings: FitSettings):
        with passes.member() as member:
            fact = fit(matrix, fit_settings, fused=member)
        return summarize(fact)

    # BLAS limits are process-wide: set here for all the fits' threads (with the client, as
    # each fit sets them), so no fit's end restores them while the others run.
    with blas_threads_for_scheduler(current_client()):
        if workers <= 1 or len(settings) <= 1:
            results = [one(s) for s in settings]
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dnmf-fused") as pool:
                results = list(pool.map(one, settings))
    return FusedRuns(results, passes.n_passes, passes.n_fit_passes)
