"""What consensus NMF found: one :class:`ConsensusRank` per rank, gathered in a
:class:`Consensus` that prints as a table, saves as JSON, and draws the K plot (stability and
error against K) and the local-density histograms.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from ..data.zarrio import json_safe
from .report import format_measure


@dataclass(frozen=True)
class ConsensusRank:
    """Consensus NMF at one rank K.

    rank : K.
    H : (K, n_features) consensus programs, unit L2 rows (cluster medians).
    W : (n_samples, K) usages refitted with H fixed (numpy for V in memory, else a dask array).
    stability : silhouette of the clustering of the kept components (NaN for K = 1).
    error : relative error sqrt(2 D(V | WH) / ‖V‖²) of the consensus fit (‖V − WH‖ / ‖V‖ for
        Frobenius).
    n_outliers : components dropped by the local-density filter, of R·K.
    labels : (R·K,) program of each replicate component, -1 for an outlier.
    density : (R·K,) local density of each replicate component.
    replicate_losses : (R,) final objective of each replicate.
    seeds : (R,) the replicates' seeds.
    """

    rank: int
    H: np.ndarray
    W: object
    stability: float
    error: float
    n_outliers: int
    labels: np.ndarray
    density: np.ndarray
    replicate_losses: np.ndarray
    seeds: tuple[int, ...]

    def summary(self) -> dict:
        """The measures of this rank, JSON-safe."""
        return {
            "rank": self.rank,
            "stability": self.stability,
            "error": self.error,
            "n_outliers": self.n_outliers,
            "n_components": int(self.labels.size),
            "best_replicate_loss": float(np.min(self.replicate_losses)),
            "median_replicate_loss": float(np.median(self.replicate_losses)),
        }


@dataclass(frozen=True)
class Consensus:
    """The result of :func:`dnmf.rank.consensus`.

    results : one :class:`ConsensusRank` per rank, ascending.
    suggested_rank : the rank suggested by the rule of :func:`dnmf.rank.cnmf.suggest_k`.
    reason : one sentence saying why.
    settings : the settings of the run (shape, ranks, replicates, filter, seed, ...).
    """

    results: tuple[ConsensusRank, ...]
    suggested_rank: int | None
    reason: str
    settings: dict = field(default_factory=dict)

    @property
    def ranks(self) -> list[int]:
        return [res.rank for res in self.results]

    def __getitem__(self, rank: int) -> ConsensusRank:
        for res in self.results:
            if res.rank == rank:
                return res
        raise KeyError(rank)

    def curve(self, name: str) -> np.ndarray:
        """One measure across ranks: "stability", "error" or "n_outliers"."""
        return np.array([getattr(res, name) for res in self.results], dtype=float)

    def to_dict(self) -> dict:
        return json_safe(
            {
                "results": [res.summary() for res in self.results],
                "suggested_rank": self.suggested_rank,
                "reason": self.reason,
                "settings": self.settings,
            }
        )

    def to_table(self) -> str:
        """A fixed-width text table, the suggestion marked with '*', and the reason."""
        header = f"{'K':>4} {'stability':>10} {'error':>10} {'outliers':>12}"
        lines = [header, "-" * len(header)]
        for res in self.results:
            mark = " *" if res.rank == self.suggested_rank else ""
            lines.append(
                f"{res.rank:>4} {format_measure(res.stability):>10} {res.error:>10.4f} "
                f"{f'{res.n_outliers}/{res.labels.size}':>12}{mark}"
            )
        lines.append("")
        lines.append(f"Suggested K: {self.suggested_rank}. {self.reason}")
        return "\n".join(lines)

    def save(self, path) -> None:
        """Write the summary (measures per rank, suggestion, settings) as JSON."""
        with open(os.fspath(path), "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    def plot(self, path) -> None:
        """The K plot: stability (silhouette) and error of the consensus fit against K."""
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
        ax.plot(self.ranks, self.curve("stability"), "o-", color="tab:blue")
        ax.set_xlabel("K")
        ax.set_ylabel("stability (silhouette)", color="tab:blue")
        ax.set_xticks(self.ranks)
        twin = ax.twinx()
        twin.plot(self.ranks, self.curve("error"), "s-", color="tab:red")
        twin.set_ylabel("error of the consensus fit", color="tab:red")
        if self.suggested_rank is not None:
            ax.axvline(self.suggested_rank, color="grey", linestyle="--")
        fig.suptitle(f"dnmf consensus: suggested K = {self.suggested_rank}")
        fig.savefig(os.fspath(path), dpi=100)
        plt.close(fig)

    def plot_density(self, path) -> None:
        """Histograms of the components' local densities, one panel per rank, with the threshold."""
        plt = _pyplot()
        n = len(self.results)
        cols = min(4, n)
        rows = -(-n // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.4 * rows), squeeze=False, constrained_layout=True)
        threshold = self.settings.get("density_threshold")
        for ax, res in zip(axes.flat, self.results):
            ax.hist(res.density, bins=50, color="tab:gray")
            if threshold is not None and threshold < np.sqrt(2):
                ax.axvline(threshold, color="tab:red", linestyle="--")
            ax.set_title(f"K = {res.rank}: {res.n_outliers} outliers", fontsize=9)
            ax.set_xlabel("local density")
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.suptitle("mean distance to the nearest neighbours (the filter drops those right of the line)")
        fig.savefig(os.fspath(path), dpi=100)
        plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt
