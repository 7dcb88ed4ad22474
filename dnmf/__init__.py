"""dnmf: distributed, out-of-core non-negative matrix factorization on Dask and Zarr."""

from .driver import IterationRecord, StoppingRules
from .errors import DnmfError
from .estimator import NMF, non_negative_factorization
from .rank import RankSurvey, rank_survey
from .store import open_matrix

__version__ = "0.1.0"

__all__ = [
    "NMF",
    "DnmfError",
    "RankSurvey",
    "IterationRecord",
    "StoppingRules",
    "non_negative_factorization",
    "open_matrix",
    "rank_survey",
    "__version__",
]
