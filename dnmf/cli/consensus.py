"""``dnmf consensus INPUT --ranks 5:15 --replicates 100 --out DIR``: consensus NMF from the command line.

A thin layer over :func:`dnmf.rank.consensus`; DIR is its ``workdir``: replicates and results
are written there as they are made, so the same command run again after a kill continues
where it stopped. Registered on the ``dnmf`` group as ``main.add_command(consensus_command,
"consensus")``.
"""

from __future__ import annotations

import logging
import os
import time

import click

from .common import dask_client, say, scheduler_options, zarr_input


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("input_path", metavar="INPUT")
@click.option("--ranks", default="5:15", help="Ranks K: 'A:B' (inclusive), 'A:B:STEP' or 'A,B,C'.")
@click.option("--replicates", "n_replicates", default=100, type=click.IntRange(min=2), help="Replicate fits per rank, each from its own random start.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the results, plots and the replicates (a run continues what it holds).")
@click.option("--beta-loss", default="frobenius", type=click.Choice(["frobenius", "kullback-leibler", "itakura-saito"]), help="Divergence to minimize.")
@click.option("--solver", default=None, type=click.Choice(["hals", "mu", "bpp"]), help="Default: hals for Frobenius, mu otherwise.")
@click.option("--max-iter", default=500, type=click.IntRange(min=1), help="Iterations per replicate at most.")
@click.option("--tol", default=1e-5, type=float, help="Relative objective decrease at which a replicate stops.")
@click.option("--seed", default=0, type=int, help="Seed of every replicate's start.")
@click.option("--chunks", default=None, type=click.IntRange(min=1), help="Rows per block (default: about 64 MiB per block).")
@click.option("--density-threshold", default=0.5, type=float, help="Drop components whose mean distance to their neighbours exceeds this (see density.png).")
@click.option("--neighbor-fraction", default=0.3, type=float, help="Neighbours of the density filter, as a fraction of --replicates.")
@click.option("--error-margin", default=0.02, type=float, help="Drop in error (fraction of the error at the smallest K) a K must bring to be suggested.")
@click.option("--dataset", default=None, help="Dataset inside an HDF5 input (or FILE.h5:/dataset).")
@scheduler_options
@click.option("--quiet", "-q", is_flag=True, help="Only the summary.")
@click.option("-v", "--verbose", is_flag=True, help="Log every rank and replicate batch.")
def consensus_command(input_path, ranks, n_replicates, out, beta_loss, solver, max_iter, tol, seed, chunks,
                      density_threshold, neighbor_fraction, error_margin, dataset, scheduler, workers,
                      threads_per_worker, memory_limit, quiet, verbose):
    """Consensus NMF of the matrix INPUT for each rank K.

    Fit --replicates NMFs per K from random starts, cluster their components after dropping
    outliers by local density, take the cluster medians as consensus programs, refit W with
    them fixed, and report per K the stability (silhouette), the error of the consensus fit and
    the outliers; suggest a K. Writes into --out: K{K}.zarr, programs_K{K}.tsv,
    consensus.json, k_plot.png and density.png.
    """
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ..data.outputs import check_output
    from ..rank import consensus

    check_output(out, protected={"input": input_path}, kind="folder", label="--out")
    started = time.perf_counter()
    with zarr_input(input_path, dataset, quiet) as (path, _), \
            dask_client(scheduler, workers, threads_per_worker, memory_limit, quiet):
        result = consensus(
            path, ranks, n_replicates=n_replicates, beta_loss=beta_loss, solver=solver, max_iter=max_iter, tol=tol,
            random_state=seed, chunks=chunks, density_threshold=density_threshold,
            neighbor_fraction=neighbor_fraction, error_margin=error_margin, workdir=out,
            input_path=os.path.abspath(input_path),
        )
    click.echo(result.to_table())
    say(quiet, f"{time.perf_counter() - started:.1f} s; wrote {out}/consensus.json, k_plot.png, density.png, "
               f"K*.zarr and programs_K*.tsv.")
