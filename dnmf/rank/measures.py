"""The measures of a rank survey, and the rule that suggests a rank from them.

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
"""

from __future__ import annotations

import numpy as np
from scipy.cluster.hierarchy import cophenet, linkage
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import squareform
from sklearn.metrics import silhouette_score

from .report import RankResult, format_measure

UNSTABLE_SILHOUETTE = 0.75


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
    reason += f". Cophenetic correlation {format_measure(chosen.cophenetic)}, factor silhouette {format_measure(chosen.silhouette)}"
    unstable = chosen.silhouette < UNSTABLE_SILHOUETTE
    reason += " (the factors are not stable across runs at this rank)." if unstable else "."
    return chosen.rank, reason
