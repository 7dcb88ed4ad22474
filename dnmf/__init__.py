"""dnmf: distributed, out-of-core non-negative matrix factorization on Dask and Zarr."""

from __future__ import annotations

import importlib

from .errors import DnmfError

__version__ = "0.1.0"

# The public names are imported on first use: a dask worker unpickling a kernel imports this
# package, and the estimator's scikit-learn import alone costs ~100 MiB of worker memory.
_LAZY = {
    "NMF": "estimator",
    "non_negative_factorization": "estimator",
    "IterationRecord": "run.driver",
    "StoppingRules": "run.driver",
    "open_matrix": "data.store",
    "save_anndata": "data.results",
    "rank_survey": "rank",
    "RankSurvey": "rank",
    "consensus": "rank",
    "Consensus": "rank",
}

__all__ = [
    "NMF",
    "DnmfError",
    "IterationRecord",
    "StoppingRules",
    "non_negative_factorization",
    "open_matrix",
    "save_anndata",
    "rank_survey",
    "RankSurvey",
    "consensus",
    "Consensus",
    "__version__",
]


# Submodules reachable as attributes (``dnmf.checkpoint.resume(...)``) without an import, by
# their public name.
_SUBMODULES = {
    "checkpoint": "checkpoint",
    "cluster": "cluster",
    "convert": "data.convert",
    "plots": "plots",
    "rank": "rank",
    "results": "data.results",
}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{_SUBMODULES[name]}", __name__)
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
