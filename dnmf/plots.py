"""PNG pictures of a fit: convergence, the parts (rows of H), a sample of W.

Figures are drawn with matplotlib's object API on the Agg canvas, so importing this module
never changes the caller's pyplot backend or state.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .errors import ParameterError, expected


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def _series(history, name: str) -> np.ndarray:
    rows = [row if isinstance(row, dict) else row.as_dict() for row in history]
    values = np.array([np.nan if row.get(name) is None else row[name] for row in rows], dtype=float)
    values[~(values > 0)] = np.nan  # a log axis shows positive values only
    return values


def plot_convergence(history, path) -> Path:
    """Objective and relative changes per iteration, on log axes.

    Parameters
    ----------
    history : list of dict or IterationRecord
        ``NMF.history_`` or a result's history.
    path : str or Path
        The PNG to write.
    """
    if not history:
        raise ParameterError("The history is empty: there is no convergence to plot.")
    rows = [row if isinstance(row, dict) else row.as_dict() for row in history]
    it = np.array([row["iteration"] for row in rows])
    fig = _figure(9, 3.6)
    left, right = fig.subplots(1, 2)
    left.semilogy(it, _series(rows, "objective"), color="tab:blue", lw=2)
    left.set(xlabel="iteration", ylabel="objective D_β(V | WH)", title="Objective")
    for name, label, color in (
        ("rel_decrease", "relative decrease of the objective", "tab:blue"),
        ("w_change", "‖ΔW‖ / ‖W‖", "tab:orange"),
        ("h_change", "‖ΔH‖ / ‖H‖", "tab:green"),
    ):
        right.semilogy(it, _series(rows, name), label=label, color=color, lw=1.5)
    right.set(xlabel="iteration", title="Change per iteration")
    right.legend(fontsize="small")
    for ax in (left, right):
        ax.grid(True, which="major", alpha=0.3)
    return _save(fig, path)


def _order_by_center(H: np.ndarray) -> np.ndarray:
    """Row order of H by where each row's mass sits (its center along the features)."""
    total = H.sum(axis=1)
    centers = (H * np.arange(H.shape[1])).sum(axis=1) / np.where(total > 0, total, 1)
    return np.argsort(centers, kind="stable")


def parse_image_shape(text: str) -> tuple[int, int]:
    """ "8x8" -> (8, 8)."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError as e:
        raise ParameterError(expected('an image shape such as "8x8"', text)) from e
    if height < 1 or width < 1:
        raise ParameterError(expected('an image shape such as "8x8"', text))
    return height, width


def plot_parts(H, path, image_shape: tuple[int, int] | None = None) -> Path:
    """The rows of H (normalized to unit sum) as line plots, or as images.

    Parameters
    ----------
    H : array of shape (n_components, n_features)
    path : str or Path
        The PNG to write.
    image_shape : (height, width), optional
        Show each row as a height x width image (height * width must be n_features).
        Without it, rows are drawn as lines, ordered by where their mass sits.
    """
    H = np.asarray(H, dtype=float)
    r, p = H.shape
    sums = H.sum(axis=1, keepdims=True)
    H = H / np.where(sums > 0, sums, 1)
    if image_shape is not None:
        height, width = image_shape
        if height * width != p:
            raise ParameterError(expected(f"an image shape with {p} pixels (the features of H)", f"{height}x{width}"))
        cols = math.ceil(math.sqrt(r))
        rows = math.ceil(r / cols)
        fig = _figure(1.6 * cols + 0.4, 1.6 * rows + 0.5)
        axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
        for k, ax in enumerate(axes):
            ax.set_axis_off()
            if k < r:
                ax.imshow(H[k].reshape(height, width), cmap="magma", interpolation="nearest")
                ax.set_title(f"part {k + 1}", fontsize="small")
        fig.suptitle("Parts: rows of H")
        return _save(fig, path)
    order = _order_by_center(H)
    fig = _figure(9, min(1.0 + 0.9 * r, 24))
    axes = np.atleast_1d(fig.subplots(r, 1, sharex=True))
    colors = [f"C{k % 10}" for k in range(r)]
    for ax, k, color in zip(axes, order, colors):
        ax.fill_between(np.arange(p), H[k], color=color, alpha=0.35, lw=0)
        ax.plot(np.arange(p), H[k], color=color, lw=1)
        ax.set_ylabel(f"row {k + 1}", rotation=0, ha="right", va="center", fontsize="small")
        ax.set_yticks([])
        ax.set_ylim(bottom=0)
    axes[-1].set_xlabel("feature")
    axes[0].set_title("Parts: rows of H (normalized to unit sum, ordered by position)")
    return _save(fig, path)


def sample_rows(n: int, max_rows: int, seed: int = 0) -> np.ndarray:
    """At most ``max_rows`` sorted row indices out of n, drawn without replacement."""
    if n <= max_rows:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))


def plot_w_heatmap(W, path, max_rows: int = 400, seed: int = 0) -> Path:
    """A heatmap of a row sample of W, rows grouped by their largest component.

    Parameters
    ----------
    W : ndarray, dask array or zarr.Array of shape (n_samples, n_components)
        Only the sampled rows are read.
    path : str or Path
        The PNG to write.
    max_rows : int
        The most rows to show.
    """
    n, r = W.shape
    index = sample_rows(n, max_rows, seed)
    sample = W[index] if not hasattr(W, "oindex") else W.oindex[index, :]
    sample = np.asarray(sample.compute() if hasattr(sample, "compute") else sample, dtype=float)
    scale = sample.max(axis=0, keepdims=True)
    sample = sample / np.where(scale > 0, scale, 1)
    order = np.lexsort((-sample.max(axis=1), sample.argmax(axis=1)))
    fig = _figure(min(3 + 0.4 * r, 12), 6)
    ax = fig.subplots()
    image = ax.imshow(sample[order], aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set(xlabel="component", ylabel=f"{len(index)} of {n} rows (grouped by top component)")
    ax.set_xticks(range(r), [str(k + 1) for k in range(r)] if r <= 30 else None)
    ax.set_yticks([])
    ax.set_title("W (each column scaled to its sample max)")
    fig.colorbar(image, ax=ax, shrink=0.8)
    return _save(fig, path)
