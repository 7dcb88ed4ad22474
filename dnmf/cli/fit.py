"""``dnmf fit``, ``dnmf resume`` and ``dnmf transform``: factor a matrix, continue a
checkpointed fit, and compute W for new rows with a result's H."""

from __future__ import annotations

import contextlib
import os
import time
import warnings

import click

from ..data import folders
from ..errors import DnmfError, no_such_path
from ..run.signals import exit_on_signals_outside_fits
from .common import (
    check_fit_outputs,
    check_fit_params,
    close_callbacks,
    dask_client,
    fit_options,
    make_callbacks,
    report_options,
    scheduler_options,
    zarr_input,
)


@click.command()
@click.argument("input_path", metavar="INPUT")
@click.option("--out", "-o", type=click.Path(), required=True, help="Result to write (a Zarr group, e.g. result.zarr).")
@fit_options
@click.option("--dataset", default=None, help="Dataset inside an HDF5 input (or FILE.h5:/dataset).")
@click.option("--layer", default=None, help="Layer of an AnnData input (.h5ad or .zarr) to factor instead of X.")
@click.option("--anndata-out", type=click.Path(), default=None,
              help="Also write a new AnnData (.h5ad or .zarr) with obsm['X_nmf'] = W and varm['NMF_components'] "
              "= H transposed, and the obs/var of an AnnData INPUT (which is never modified).")
@scheduler_options
@report_options
@click.option("--overwrite", is_flag=True,
              help="Replace --out if it is an earlier dnmf result (only once the new result is complete).")
def fit(input_path, out, dataset, layer, anndata_out, scheduler, workers, threads_per_worker, memory_limit, quiet, log_json, overwrite,
        **params):
    """Factor the matrix INPUT: a Zarr store (an array, a sparse matrix, an AnnData store) or an
    AnnData .h5ad file, read by row blocks (sparse stays sparse); or any file `dnmf convert`
    reads, converted to a temporary Zarr store under $TMPDIR first.

    Writes W, H and the fit's record (configuration, history, stop reason, versions) to --out.
    """
    from sklearn.exceptions import ConvergenceWarning

    from ..data.convert import split_dataset
    from ..data.outputs import check_output
    from ..data.ondisk import is_anndata_store
    from ..data.results import anndata_written_by_dnmf, save_anndata, save_result
    from ..estimator import NMF

    reads = {"input": split_dataset(input_path)[0], "checkpoint": params["checkpoint"]}
    check_fit_outputs(out, overwrite, log_json, reads)
    if anndata_out is not None:
        check_output(anndata_out, protected={**reads, "result": out}, overwrite=overwrite, label="--anndata-out",
                     owned=anndata_written_by_dnmf)
    if params["checkpoint"] is not None:
        check_output(params["checkpoint"], protected={"input": reads["input"], "result": out}, kind="folder",
                     label="--checkpoint")
    params["init"] = None if params["init"] == "auto" else params["init"]
    check_fit_params(params)
    callbacks = make_callbacks(params["max_iter"], quiet, log_json)
    started = time.perf_counter()
    try:
        with exit_on_signals_outside_fits() if params["checkpoint"] else contextlib.nullcontext(), \
                zarr_input(input_path, dataset, quiet, layer) as (path, layer), \
                dask_client(scheduler, workers, threads_per_worker, memory_limit, quiet), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = NMF(**params, callbacks=callbacks)
            W = model.fit_transform(path, layer=layer)
            close_callbacks(callbacks)
            save_result(out, model, W, input_path=_absolute(input_path), overwrite=overwrite)
            if anndata_out is not None:
                like = reads["input"] if is_anndata_store(reads["input"]) else None
                save_anndata(anndata_out, model, W, like=like, overwrite=overwrite)
    finally:
        close_callbacks(callbacks)
    click.echo(summary(model, time.perf_counter() - started, out))


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


@click.command()
@click.argument("checkpoint_dir", metavar="DIR", type=click.Path())
@click.option("--out", "-o", type=click.Path(), required=True, help="Result to write when the fit ends.")
@click.option("--input", "input_path", default=None, help="The matrix, if it moved since the checkpoint was written.")
@click.option("--max-iter", type=int, default=None, help="Most iterations in all (default: as recorded).")
@click.option("--max-time", type=float, default=None, help="Stop after this many more seconds.")
@scheduler_options
@report_options
@click.option("--overwrite", is_flag=True, help="Replace --out if it is an earlier dnmf result.")
def resume(checkpoint_dir, out, input_path, max_iter, max_time, scheduler, workers, threads_per_worker,
           memory_limit, quiet, log_json, overwrite):
    """Continue a checkpointed fit from DIR (written by `dnmf fit --checkpoint DIR`)."""
    from sklearn.exceptions import ConvergenceWarning

    from ..data.results import save_result
    from ..checkpoint import load as load_checkpoint
    from ..checkpoint import resume as resume_fit
    from ..run.checkpoint import has_checkpoint

    recorded = load_checkpoint(checkpoint_dir).record.get("input_path") if has_checkpoint(checkpoint_dir) else None
    check_fit_outputs(out, overwrite, log_json, {"checkpoint": checkpoint_dir, "input": input_path or recorded})
    if not folders.exists(checkpoint_dir):
        raise DnmfError(no_such_path("checkpoint", checkpoint_dir))
    callbacks = make_callbacks(max_iter, quiet, log_json)
    started = time.perf_counter()
    try:
        with exit_on_signals_outside_fits(), \
                dask_client(scheduler, workers, threads_per_worker, memory_limit, quiet), warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = resume_fit(checkpoint_dir, input_path, max_iter=max_iter, max_time=max_time, callbacks=callbacks)
            close_callbacks(callbacks)
            W = load_checkpoint(checkpoint_dir).W  # the final checkpoint holds the final W
            save_result(out, model, W, input_path=input_path, overwrite=overwrite)
    finally:
        close_callbacks(callbacks)
    click.echo(summary(model, time.perf_counter() - started, out))


@click.command()
@click.argument("result", type=click.Path())
@click.argument("input_path", metavar="INPUT")
@click.option("--out", "-o", type=click.Path(), required=True, help="Zarr array to write W to.")
@click.option("--chunks", type=int, default=None, help="Rows per block of INPUT.")
@click.option("--dataset", default=None, help="Dataset inside an HDF5 input.")
@click.option("--layer", default=None, help="Layer of an AnnData input (.h5ad or .zarr) instead of X.")
@scheduler_options
@click.option("--quiet", "-q", is_flag=True, help="No status lines.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it is an array or result dnmf wrote.")
def transform(result, input_path, out, chunks, dataset, layer, scheduler, workers, threads_per_worker, memory_limit, quiet, overwrite):
    """W for the rows of INPUT with H fixed at RESULT's (same solver and loss)."""
    from ..data.convert import split_dataset
    from ..data.outputs import check_output
    from ..data.results import load_result, save_array
    from ..estimator import NMF

    check_output(out, protected={"result": result, "input": split_dataset(input_path)[0]}, overwrite=overwrite,
                 label="--out")
    model = NMF.from_result(load_result(result))
    if chunks is not None:
        model.chunks = chunks
    started = time.perf_counter()
    with zarr_input(input_path, dataset, quiet, layer) as (path, layer), \
            dask_client(scheduler, workers, threads_per_worker, memory_limit, quiet):
        W = model.transform(path, layer=layer)
        save_array(out, W, overwrite=overwrite)
    click.echo(f"W {W.shape[0]} x {W.shape[1]}, {time.perf_counter() - started:.1f} s -> {out}")


def summary(model, seconds: float, out) -> str:
    """The line a fit or a resume ends with: rank, iterations, stop reason, loss, time, output."""
    rel = ""
    norm = getattr(model, "data_norm_", None)
    if norm and model.beta_loss in ("frobenius", 2, 2.0):
        rel = f", relative error {model.reconstruction_err_ / norm:.4g}"
    return (
        f"rank {model.n_components_}: {model.n_iter_} iterations ({model.stop_reason_}), "
        f"loss {model.reconstruction_err_:.6g}{rel}, {seconds:.1f} s -> {out}"
    )
