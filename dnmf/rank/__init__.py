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

The rank suggested from these measures follows the rule of :mod:`dnmf.rank.measures`.

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

from .clustering import Clustering, cluster_components, local_density
from .cnmf import consensus, suggest_k
from .consensus_report import Consensus, ConsensusRank
from .measures import consensus_matrix, cophenetic_correlation, factor_silhouette, suggest_rank
from .report import RankResult, RankSurvey
from .survey import parse_ranks, rank_survey

__all__ = [
    "Clustering",
    "Consensus",
    "ConsensusRank",
    "cluster_components",
    "consensus",
    "local_density",
    "suggest_k",
    "RankResult",
    "RankSurvey",
    "consensus_matrix",
    "cophenetic_correlation",
    "factor_silhouette",
    "parse_ranks",
    "rank_survey",
    "suggest_rank",
]
