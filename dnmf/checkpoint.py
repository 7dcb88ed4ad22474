"""Checkpoints, the public face: :func:`resume` a killed fit, :func:`load` a checkpoint.

How checkpoints are written and verified is :mod:`dnmf.run.checkpoint`; a fit writes them when
given ``NMF(checkpoint=PATH)``.
"""

from __future__ import annotations

import os

from .errors import CheckpointWarning, ParameterError
from .estimator import NMF

from .run.checkpoint import load, locked
from .settings import DEFAULTS

__all__ = ["CheckpointWarning", "load", "resume"]


def resume(path, X=None, *, max_iter=None, max_time=None, callbacks=None) -> NMF:
    """Continue the fit saved at ``path`` and return the fitted :class:`~dnmf.NMF`.

    Parameters
    ----------
    path : str or os.PathLike
        A checkpoint directory written by ``NMF(checkpoint=...)``.
    X : matrix or path, optional
        The matrix of the original fit. By default the input path the checkpoint recorded
        (only when the original input was a Zarr path).
    max_iter, max_time : optional
        New limits (``max_iter`` counts all iterations, from the start of the original fit;
        ``max_time`` counts this run's seconds). By default the saved ones.
    callbacks : sequence of callables, optional
        As for :class:`~dnmf.NMF`.

    The continued fit writes further checkpoints into ``path`` with the saved frequency,
    the last one at its end: ``load(path).W`` is the final W (a dask array read from it).
    """
    with locked(path):  # not while another run prunes the versions it reads
        snapshot = load(path)
    params = dict(snapshot.record["params"])
    for key in ("chunks", "column_chunks"):  # tuples come back from JSON as lists
        if isinstance(params.get(key), list):
            params[key] = tuple(params[key])
    if max_iter is not None:
        params["max_iter"] = max_iter
    if max_time is not None:
        params["max_time"] = max_time
    params["checkpoint"] = os.fspath(path)
    params["callbacks"] = callbacks
    if X is None:
        X = snapshot.record.get("input_path")
        if X is None:
            raise ParameterError(
                f"The checkpoint at {os.fspath(path)!r} was made from an in-memory matrix; pass it "
                "again: resume(path, X)."
            )
    model = NMF(**{k: v for k, v in params.items() if k in DEFAULTS})
    return model.fit(X, resume=path, layer=snapshot.record.get("input_layer"))
