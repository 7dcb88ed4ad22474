"""``dnmf consensus INPUT --ranks 5:15 --replicates 100 --out DIR``: consensus NMF from the command line.

INPUT is anything ``dnmf fit`` reads: a Zarr store, an AnnData ``.h5ad`` file or ``.zarr``
store (``--layer NAME`` for one of its layers instead of X), or a file ``dnmf convert``
reads. For an AnnData INPUT each rank also gets ``K{K}.h5ad`` in DIR, a new AnnData with the
input's obs and var and the consensus W and H (the input is never modified).

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
@click.option("--layer", default=None, help="Layer of an AnnData input (.h5ad or .zarr) to factor instead of X.")
@scheduler_options
@click.option("--quiet", "-q", is_flag=True, help="Only the summary.")
@click.option("-v", "--verbose", is_flag=True, help="Log every rank and replicate batch.")
def consensus_command(input_path, ranks, n_replicates, out, beta_loss, solver, max_iter, tol, seed, chunks,
                      density_threshold, neighbor_fraction, error_margin, dataset, layer, scheduler, workers,
                      threads_per_worker, memory_limit, quiet, verbose):
    """Consensus NMF of the matrix INPUT (a Zarr store, an AnnData .h5ad or .zarr, or any file
    `dnmf convert` reads) for each rank K.

    Fit --replicates NMFs per K from random starts, cluster their components after dropping
    outliers by local density, take the cluster medians as consensus programs, refit W with
    them fixed, and report per K the stability (silhouette), the error of the consensus fit and
    the outliers; suggest a K. Writes into --out: K{K}.zarr, programs_K{K}.tsv,
    consensus.json, k_plot.png and density.png; for an AnnData INPUT also K{K}.h5ad, a new
    AnnData with the input's obs and var, obsm['X_nmf'] = W and varm['NMF_components'] = H
    transposed (the input is never modified), and TSV rows named by its var_names.
    """
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ..data.convert import split_dataset
    from ..data.ondisk import is_anndata_store
    from ..data.outputs import check_output
    from ..rank import consensus

    check_output(out, protected={"input": input_path}, kind="folder", label="--out")
    started = time.perf_counter()
    source = split_dataset(input_path)[0]
    like = source if is_anndata_store(source) else None  # obs / var of the K{K}.h5ad, even if converted
    with zarr_input(input_path, dataset, quiet, layer) as (path, read_layer), \
            dask_client(scheduler, workers, threads_per_worker, memory_limit, quiet):
        result = consensus(
            path, ranks, n_replicates=n_replicates, beta_loss=beta_loss, solver=solver, max_iter=max_iter, tol=tol,
            random_state=seed, chunks=chunks, density_threshold=density_threshold,
            neighbor_fraction=neighbor_fraction, error_margin=error_margin, workdir=out,
            input_path=os.path.abspath(input_path), layer=read_layer, like=like,
        )
    click.echo(result.to_table())
    say(quiet, f"{time.perf_counter() - started:.1f} s; wrote {out}/consensus.json, k_plot.png, density.png, "
               f"K*.zarr{', K*.h5ad (AnnData)' if like is not None else ''} and programs_K*.tsv.")
