"""The consensus step of consensus NMF: cluster the replicates' components, drop outliers by
local density, take each cluster's median.

Given R replicate fits of rank K, the R·K rows of their H's are normalized to unit L2 norm and

1. **local density** (Kotliar et al. 2019): the mean Euclidean distance from each component to
   its ``n_neighbors`` nearest other components, ``n_neighbors = ⌈neighbor_fraction · R⌉``.
   A component that most replicates reproduce has close neighbours from the other
   replicates and a small density value; a component found by few replicates (a bad start, a split or a merge) has a large
   one. Components whose value exceeds ``density_threshold`` are outliers. The distances are
   computed ``block_rows`` components at a time against all R·K, so the largest matrix formed
   is block_rows × R·K (never (R·K)²).
2. **clustering**: k-means (scikit-learn, seeded) of the kept components into K clusters;
   the **stability** is the silhouette (Euclidean) of that clustering.
3. **consensus programs**: each cluster's element-wise median, normalized to unit L2 norm.

Distances between unit non-negative vectors lie in [0, √2]; cNMF's default threshold is 0.5,
and its users set it from the histogram of the local densities (``plot_density``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score

from ..errors import ParameterError

# Bytes of one block of distances (block_rows × R·K float64) of the local-density scan.
DENSITY_BLOCK_BYTES = 32 * 2**20
# Components above this are subsampled (seeded) for the silhouette.
SILHOUETTE_MAX_SAMPLES = 20000


@dataclass(frozen=True)
class Clustering:
    """The consensus step's outcome for one rank K.

    programs : (K, p) unit-norm consensus programs (cluster medians), ordered by cluster size
        (largest first), ties by the first component in the cluster.
    labels : (R·K,) program of each component, -1 for the outliers.
    density : (R·K,) local density of each component (mean distance to its neighbours).
    stability : silhouette of the clustering of the kept components (NaN for K = 1).
    """

    programs: np.ndarray
    labels: np.ndarray
    density: np.ndarray
    stability: float

    @property
    def n_outliers(self) -> int:
        return int(np.sum(self.labels < 0))


def unit_rows(X: np.ndarray) -> np.ndarray:
    """X's rows scaled to unit L2 norm (float64); zero rows stay zero."""
    X = np.asarray(X, dtype=np.float64)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norms > 0, norms, 1.0)


def local_density(X: np.ndarray, n_neighbors: int, block_rows: int | None = None) -> np.ndarray:
    """Mean Euclidean distance from each row of X to its ``n_neighbors`` nearest other rows.

    Parameters
    ----------
    X : array of shape (m, p)
        Unit-norm rows (the distances use ‖a − b‖² = ‖a‖² + ‖b‖² − 2 a·b).
    n_neighbors : int
        Neighbours averaged, 1 ≤ n_neighbors < m.
    block_rows : int, optional
        Rows whose distances to all m rows are formed at once (default: a block of at most
        :data:`DENSITY_BLOCK_BYTES`); the largest temporary is block_rows × m.

    Returns
    -------
    ndarray of shape (m,)
    """
    m = X.shape[0]
    if not 1 <= n_neighbors < m:
        raise ParameterError(f"Expected 1 <= n_neighbors < {m} components. Got {n_neighbors} instead.")
    if block_rows is None:
        block_rows = max(1, DENSITY_BLOCK_BYTES // (8 * m))
    sq = np.einsum("ij,ij->i", X, X)
    density = np.empty(m)
    for start in range(0, m, block_rows):
        stop = min(m, start + block_rows)
        d2 = sq[start:stop, None] + sq[None, :] - 2.0 * (X[start:stop] @ X.T)
        np.maximum(d2, 0.0, out=d2)
        d2[np.arange(stop - start), np.arange(start, stop)] = np.inf  # not its own neighbour
        nearest = np.partition(d2, n_neighbors - 1, axis=1)[:, :n_neighbors]
        density[start:stop] = np.sort(np.sqrt(nearest), axis=1).mean(axis=1)
    return density


def cluster_components(
    components: np.ndarray,
    k: int,
    n_replicates: int,
    *,
    density_threshold: float = 0.5,
    neighbor_fraction: float = 0.3,
    seed: int = 0,
    block_rows: int | None = None,
) -> Clustering:
    """Cluster R·K replicate components into K consensus programs (see the module docstring).

    Parameters
    ----------
    components : array of shape (R·K, p)
        The replicates' H's stacked (any scale: rows are normalized here).
    k : int
        The rank K (the number of clusters).
    n_replicates : int
        R (sets the number of neighbours of the density filter).
    density_threshold : float
        Components whose local density exceeds it are outliers (≥ √2 keeps every component).
    neighbor_fraction : float in (0, 1]
        Neighbours of the density filter as a fraction of R.
    seed : int
        The k-means seed.
    block_rows : int, optional
        See :func:`local_density`.
    """
    X = unit_rows(components)
    m = X.shape[0]
    n_neighbors = min(m - 1, max(1, int(np.ceil(neighbor_fraction * n_replicates))))
    density = local_density(X, n_neighbors, block_rows) if m > 1 else np.zeros(m)
    kept = density <= density_threshold
    if kept.sum() < k:
        raise ParameterError(
            f"The density filter (density_threshold={density_threshold}) kept {int(kept.sum())} of {m} components, "
            f"fewer than the rank {k}; raise density_threshold (see the local-density histogram)."
        )
    Xk = X[kept]
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(Xk)
    raw = km.labels_
    # Order the programs by cluster size (largest first), ties by first member: the order
    # does not depend on k-means' arbitrary numbering.
    sizes = np.bincount(raw, minlength=k)
    first = np.array([np.flatnonzero(raw == c)[0] if sizes[c] else m for c in range(k)])
    order = np.lexsort((first, -sizes))
    rename = np.empty(k, dtype=int)
    rename[order] = np.arange(k)
    kept_labels = rename[raw]
    labels = np.full(m, -1, dtype=np.int64)
    labels[kept] = kept_labels
    programs = np.zeros((k, X.shape[1]))
    for c in range(k):
        members = Xk[kept_labels == c]
        if len(members):
            programs[c] = np.median(members, axis=0)
    programs = unit_rows(programs)
    stability = float("nan")
    if k > 1 and len(np.unique(kept_labels)) > 1 and len(Xk) > k:
        sample = SILHOUETTE_MAX_SAMPLES if len(Xk) > SILHOUETTE_MAX_SAMPLES else None
        stability = float(silhouette_score(Xk, kept_labels, metric="euclidean", sample_size=sample, random_state=seed))
    return Clustering(programs, labels, density, stability)
