"""Rank selection: see :mod:`dnmf.rank.survey`."""

from __future__ import annotations

from .survey import (
    RankResult,
    RankSurvey,
    consensus_matrix,
    cophenetic_correlation,
    factor_silhouette,
    parse_ranks,
    rank_survey,
    suggest_rank,
)

__all__ = [
    "RankResult",
    "RankSurvey",
    "consensus_matrix",
    "cophenetic_correlation",
    "factor_silhouette",
    "parse_ranks",
    "rank_survey",
    "suggest_rank",
]
