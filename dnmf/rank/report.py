"""What a rank survey found: one :class:`RankResult` per rank, gathered in a
:class:`RankSurvey` that prints as a table, saves as JSON (or into a Zarr group's attributes)
and plots its curves.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from ..data.zarrio import json_safe
from ..errors import StoreError


@dataclass(frozen=True)
class RankResult:
    """What the survey measured at one rank (NaN where a measure is undefined).

    rank : the rank r.
    objective : final training objective of the best run.
    relative_error : sqrt(2 D / Σ V²) over the training entries, best run.
    heldout_error : mean over runs of the held-out relative error.
    heldout_se : its standard error over runs.
    cophenetic : cophenetic correlation of the consensus matrix (NaN for r = 1 or 1 run).
    silhouette : silhouette of the factors clustered across runs (NaN for r = 1 or 1 run).
    run_losses, run_heldout_errors : per run.
    """

    rank: int
    objective: float
    relative_error: float
    heldout_error: float
    heldout_se: float
    cophenetic: float
    silhouette: float
    run_losses: tuple[float, ...]
    run_heldout_errors: tuple[float, ...]


@dataclass(frozen=True)
class RankSurvey:
    """The result of :func:`rank_survey`.

    results : one :class:`RankResult` per rank, ascending (rank 1, the reference, included).
    suggested_rank : the suggested rank, or None when no structure was found.
    reason : one sentence saying why.
    settings : the survey's settings (shape, ranks asked for, n_runs, holdout_fraction, ...).
    """

    results: tuple[RankResult, ...]
    suggested_rank: int | None
    reason: str
    settings: dict = field(default_factory=dict)

    @property
    def structure_found(self) -> bool:
        return self.suggested_rank is not None

    @property
    def ranks(self) -> list[int]:
        return [res.rank for res in self.results]

    def curve(self, name: str) -> np.ndarray:
        """One measure across ranks, e.g. ``curve("heldout_error")``."""
        return np.array([getattr(res, name) for res in self.results], dtype=float)

    def to_dict(self) -> dict:
        return {
            "results": [asdict(res) for res in self.results],
            "suggested_rank": self.suggested_rank,
            "reason": self.reason,
            "settings": self.settings,
        }

    @classmethod
    def from_dict(cls, data: dict) -> RankSurvey:
        results = tuple(
            RankResult(**{**res, "run_losses": tuple(res["run_losses"]), "run_heldout_errors": tuple(res["run_heldout_errors"])})
            for res in data["results"]
        )
        return cls(results, data["suggested_rank"], data["reason"], data.get("settings", {}))

    def to_table(self) -> str:
        """A fixed-width text table, the suggestion marked with '*', and the reason."""
        header = f"{'rank':>5} {'objective':>12} {'rel.error':>10} {'held-out':>10} {'± se':>9} {'cophenetic':>10} {'silhouette':>10}"
        lines = [header, "-" * len(header)]
        for res in self.results:
            mark = "*" if res.rank == self.suggested_rank else (" (ref)" if res.rank == 1 else "")
            lines.append(
                f"{res.rank:>5} {res.objective:>12.5g} {res.relative_error:>10.4f} {res.heldout_error:>10.4f} "
                f"{res.heldout_se:>9.2g} {format_measure(res.cophenetic):>10} {format_measure(res.silhouette):>10}{mark}"
            )
        lines.append("")
        lines.append(("Suggested rank: %d. " % self.suggested_rank if self.structure_found else "No structure found. ") + self.reason)
        return "\n".join(lines)

    def save(self, path) -> None:
        """Write the survey as JSON (a path ending in .json) or into a Zarr group's attributes."""
        path = os.fspath(path)
        data = json_safe(self.to_dict())
        if path.endswith(".json"):
            with open(path, "w") as f:
                json.dump(data, f, indent=2)
            return
        import zarr

        group = zarr.open_group(store=path, mode="a")
        group.attrs["rank_survey"] = data

    @classmethod
    def load(cls, path) -> RankSurvey:
        """Read a survey written by :meth:`save`."""
        path = os.fspath(path)
        try:
            if path.endswith(".json"):
                with open(path) as f:
                    data = json.load(f)
            else:
                import zarr

                data = dict(zarr.open_group(store=path, mode="r").attrs)["rank_survey"]
        except (OSError, KeyError, ValueError) as e:
            raise StoreError(f"No rank survey at {path!r}: {e}") from e
        return cls.from_dict(_json_unsafe(data))

    def plot(self, path) -> None:
        """One PNG: relative and held-out errors, cophenetic correlation and silhouette by rank."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        ranks = self.ranks
        fig, (ax_err, ax_stab) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
        ax_err.plot(ranks, self.curve("relative_error"), "o-", label="relative error (training)")
        ax_err.errorbar(ranks, self.curve("heldout_error"), yerr=self.curve("heldout_se"), fmt="s-", capsize=3, label="held-out error")
        ax_err.set_xlabel("rank")
        ax_err.set_ylabel("relative error")
        ax_err.legend()
        ax_stab.plot(ranks, self.curve("cophenetic"), "o-", label="cophenetic correlation")
        ax_stab.plot(ranks, self.curve("silhouette"), "s-", label="silhouette of factors")
        ax_stab.set_xlabel("rank")
        ax_stab.set_ylim(min(-0.05, np.nanmin(np.r_[self.curve("silhouette"), 0.0])), 1.05)
        ax_stab.legend(loc="lower left")
        for ax in (ax_err, ax_stab):
            ax.set_xticks(ranks)
            if self.structure_found:
                ax.axvline(self.suggested_rank, color="grey", linestyle="--")
        title = f"suggested rank {self.suggested_rank}" if self.structure_found else "no structure found"
        fig.suptitle(f"dnmf rank survey: {title}")
        fig.savefig(os.fspath(path), dpi=100)
        plt.close(fig)


def format_measure(value: float) -> str:
    """A cophenetic correlation or silhouette for a table: four decimals, "-" when undefined."""
    return "-" if not np.isfinite(value) else f"{value:.4f}"


def _json_unsafe(data: dict) -> dict:
    """None → NaN in the per-rank float fields."""
    for res in data["results"]:
        for key, value in res.items():
            if value is None:
                res[key] = float("nan")
    return data
