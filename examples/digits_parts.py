"""Parts of handwritten digits: NMF of scikit-learn's bundled 8x8 digits.

Each row of H is a non-negative 8x8 image; every digit is an additive blend of them, so they
come out as strokes and blobs (parts), not whole digits. Run::

    python examples/digits_parts.py --rank 16 --out-dir digits-out
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning

import dnmf
from dnmf.plots import plot_convergence, plot_parts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16, help="number of parts (default 16)")
    parser.add_argument("--solver", choices=["mu", "hals"], default="hals")
    parser.add_argument("--max-iter", type=int, default=300)
    parser.add_argument("--out-dir", type=Path, default=Path("digits-out"))
    args = parser.parse_args(argv)

    warnings.simplefilter("ignore", ConvergenceWarning)  # the stop reason is printed below
    X = load_digits().data  # (1797, 64), grey levels 0..16
    model = dnmf.NMF(args.rank, solver=args.solver, init="nndsvda", max_iter=args.max_iter, random_state=0)
    W = model.fit_transform(X)
    H = model.components_

    args.out_dir.mkdir(parents=True, exist_ok=True)
    parts = plot_parts(H, args.out_dir / "digit_parts.png", image_shape=(8, 8))
    curve = plot_convergence(model.history_, args.out_dir / "convergence.png")
    rel = np.linalg.norm(X - W @ H) / np.linalg.norm(X)
    sparsity = float(np.mean(H < 1e-3 * H.max()))
    print(f"{args.rank} parts, {model.n_iter_} iterations ({model.stop_reason_}), relative error {rel:.3f}")
    print(f"{100 * sparsity:.0f}% of the parts' pixels are (near) zero: the parts are localized")
    print(f"wrote {parts} and {curve}")


if __name__ == "__main__":
    main()
