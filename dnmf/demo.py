"""The demonstration of ``dnmf demo``: a planted-parts matrix written to Zarr, and scoring.

Like the seed chapter's section 29.6, V = W_true H_true + noise, where each row of H_true is
a localized block of features (neighbouring blocks overlap a little) and each row of V is a
non-negative blend of a few parts. A good NMF finds the blocks again as the rows of H.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def planted_parts_h(n_parts: int, n_features: int, overlap: float = 0.1) -> np.ndarray:
    """H_true of shape (n_parts, n_features): contiguous blocks of ones that overlap a little."""
    width = n_features / n_parts
    H = np.zeros((n_parts, n_features))
    for k in range(n_parts):
        start = max(0, int(round(k * width - overlap * width)))
        stop = min(n_features, int(round((k + 1) * width + overlap * width)))
        H[k, start:stop] = 1.0
    return H


def planted_block(rows: int, H_true: np.ndarray, rng: np.random.Generator, noise: float, dtype) -> np.ndarray:
    """``rows`` rows of V: each a random non-negative blend of about half of the parts, plus noise."""
    r, p = H_true.shape
    W = rng.uniform(0, 1, size=(rows, r)) * (rng.random((rows, r)) < 0.5)
    return (W @ H_true + rng.uniform(0, noise, size=(rows, p))).astype(dtype)


@dataclass(frozen=True)
class PlantedMatrix:
    """A planted-parts matrix on disk and what is known about it."""

    path: str
    H_true: np.ndarray
    norm: float


def write_planted_matrix(
    path,
    n_samples: int = 20000,
    n_features: int = 2000,
    n_parts: int = 6,
    noise: float = 0.05,
    rows_per_chunk: int = 2500,
    seed: int = 1301,
    dtype=np.float32,
) -> PlantedMatrix:
    """Write V (n_samples, n_features) to a new Zarr array at ``path``, one row chunk at a time."""
    from .data.zarrio import create_array

    H_true = planted_parts_h(n_parts, n_features)
    arr = create_array(str(path), None, (n_samples, n_features), (rows_per_chunk, n_features), dtype)
    sq = 0.0
    for i, start in enumerate(range(0, n_samples, rows_per_chunk)):
        rows = min(rows_per_chunk, n_samples - start)
        block = planted_block(rows, H_true, np.random.default_rng([seed, i]), noise, dtype)
        arr[start : start + rows] = block
        sq += float(np.sum(np.square(block, dtype=np.float64)))
    return PlantedMatrix(str(path), H_true, float(np.sqrt(sq)))


def best_matches(H: np.ndarray, H_true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each planted part, the learned row of H most similar to it and their cosine.

    Returns ``(index, cosine)``, each of shape (n_parts,).
    """
    H = np.asarray(H, dtype=float)
    Hn = H / np.maximum(np.linalg.norm(H, axis=1, keepdims=True), np.finfo(float).tiny)
    Tn = H_true / np.linalg.norm(H_true, axis=1, keepdims=True)
    cos = Tn @ Hn.T
    return cos.argmax(axis=1), cos.max(axis=1)
