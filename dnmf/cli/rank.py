"""``dnmf rank INPUT --ranks 2:12 --runs 10 --out DIR``: the rank survey from the command line.

A thin layer over :func:`dnmf.rank.rank_survey`; registered on the ``dnmf`` group as
``main.add_command(rank_command, "rank")``.
"""

from __future__ import annotations

import logging
import os
import sys

import click
import numpy as np

from ..errors import DnmfError, StoreError, no_such_path
from .common import same_or_float

OUTPUT_FILES = ("survey.json", "survey.png")


def _open_input(path: str):
    """A Zarr array path as is (read lazily); a .npy file memory-mapped read-only."""
    if path.endswith(".npy"):
        if not os.path.exists(path):
            raise StoreError(no_such_path("file", path))
        return np.load(path, mmap_mode="r")
    return path


def _prepare_out(out: str, input_path: str, overwrite: bool) -> None:
    """Check the --out folder against INPUT and make it; survey files in it only with ``overwrite``."""
    from ..data.outputs import check_output

    check_output(out, protected={"input": input_path}, kind="folder", label="--out")
    existing = [name for name in OUTPUT_FILES if os.path.exists(os.path.join(out, name))]
    if existing and not overwrite:
        raise DnmfError(f"{os.path.join(out, existing[0])!r} already exists; choose another --out or pass --overwrite.")
    os.makedirs(out, exist_ok=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("input_path", metavar="INPUT")
@click.option("--ranks", default="2:12", help="Ranks to survey: 'A:B' (inclusive), 'A:B:STEP' or 'A,B,C'. Rank 1 is added as the reference.")
@click.option("--runs", "n_runs", default=10, type=click.IntRange(min=1), help="Runs per rank (each with its own hold-out mask and random start).")
@click.option("--holdout", "holdout_fraction", default=0.1, type=float, help="Fraction of entries hidden and scored in each run.")
@click.option("--beta-loss", default="frobenius", type=click.Choice(["frobenius", "kullback-leibler", "itakura-saito"]), help="Divergence to minimize.")
@click.option("--solver", default=None, type=click.Choice(["hals", "bpp", "mu"]), help="Default: hals for Frobenius, mu otherwise (bpp: Frobenius).")
@click.option("--max-iter", default=500, type=click.IntRange(min=1), help="Iterations per fit at most.")
@click.option("--tol", default=1e-5, type=float, help="Relative objective decrease at which a fit stops.")
@click.option("--seed", default=0, type=int, help="Seed of every mask and start.")
@click.option("--missing", "missing_values", default=None, type=click.Choice(["nan"]), help="'nan': NaN entries are missing values.")
@click.option("--chunks", default=None, type=click.IntRange(min=1), help="Rows per block (default: about 64 MiB per block).")
@click.option("--margin", default=0.02, type=float, help="Held-out improvement over rank 1 needed to claim structure.")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Directory for survey.json and survey.png.")
@click.option("--overwrite", is_flag=True, help="Replace survey.json / survey.png in --out.")
@click.option("--alpha-w", "alpha_W", default=0.0, type=float, help="Penalty of W in every fit (as dnmf fit --alpha-w).")
@click.option("--alpha-h", "alpha_H", default="same", type=same_or_float, metavar="same|X", help="Penalty of H in every fit; 'same': alpha-w.")
@click.option("--l1-ratio", default=0.0, type=float, help="Mix of the penalties: 0 is L2 only, 1 is L1 only.")
@click.option("-v", "--verbose", is_flag=True, help="Log every fit.")
def rank_command(input_path, ranks, n_runs, holdout_fraction, beta_loss, solver, max_iter, tol, seed, missing_values, chunks, margin, out, overwrite, alpha_W, alpha_H, l1_ratio, verbose):
    """Survey the ranks of the matrix INPUT (a Zarr array path or a .npy file).

    For each rank, fit --runs masked NMFs that each hide a random --holdout fraction of the
    entries, and report the relative error, the held-out error, the cophenetic correlation and
    the silhouette of the factors; suggest a rank, or say that no structure was found.
    """
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ..rank import rank_survey

    try:
        if out is not None:
            _prepare_out(out, input_path, overwrite)
        survey = rank_survey(
            _open_input(input_path), ranks, n_runs=n_runs, holdout_fraction=holdout_fraction, beta_loss=beta_loss,
            solver=solver, max_iter=max_iter, tol=tol, random_state=seed, missing_values=missing_values,
            chunks=chunks, margin=margin, alpha_W=alpha_W, alpha_H=alpha_H, l1_ratio=l1_ratio,
        )
        click.echo(survey.to_table())
        if out is not None:
            survey.save(os.path.join(out, "survey.json"))
            survey.plot(os.path.join(out, "survey.png"))
            click.echo(f"Wrote {os.path.join(out, 'survey.json')} and {os.path.join(out, 'survey.png')}.")
    except DnmfError as e:
        click.echo(click.style(f"Error: {e}", fg="red"), err=True)
        sys.exit(1)
