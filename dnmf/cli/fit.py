"""``dnmf fit``, ``dnmf resume`` and ``dnmf transform``: factor a matrix, continue a
checkpointed fit, and compute W for new rows with a result's H."""

from __future__ import annotations

import os
import time
import warnings

import click

from ..errors import DnmfError, no_such_path
from .common import close_callbacks, dask_client, make_callbacks, report_options, scheduler_options, zarr_input


@click.command()
@click.argument("input_path", metavar="INPUT")
@click.option("--rank", "-r", type=int, required=True, help="Number of components (rank of the factorization).")
@click.option("--out", "-o", type=click.Path(), required=True, help="Result to write (a Zarr group, e.g. result.zarr).")
@click.option("--solver", type=click.Choice(["mu", "hals"]), default="mu", help="Multiplicative updates (any β) or HALS (Frobenius).")
@click.option("--beta-loss", default="frobenius", help="frobenius, kullback-leibler, itakura-saito, or a number β.")
@click.option("--init", type=click.Choice(["auto", "random", "nndsvd", "nndsvda", "nndsvdar"]), default="auto",
              help="Start; auto: nndsvda when rank <= min(n, p), else random.")
@click.option("--max-iter", type=int, default=200, help="Most iterations.")
@click.option("--tol", type=float, default=1e-4, help="Stop when the objective's relative decrease is below this ...")
@click.option("--tol-x", type=float, default=1e-3, help="... and the relative change of W and H is below this.")
@click.option("--max-time", type=float, default=None, help="Stop after this many seconds.")
@click.option("--objective-every", type=click.IntRange(min=1), default=1,
              help="Evaluate the objective (and check --tol) every this many iterations; for KL and other β it costs a log per entry.")
@click.option("--seed", type=int, default=0, help="Random seed (same seed and chunks: same result, bit for bit).")
@click.option("--chunks", type=int, default=None, help="Rows per block of V (default: ~64 MiB blocks, aligned with the Zarr chunks).")
@click.option("--column-chunks", default="auto", callback=lambda ctx, param, value: _column_chunks(value),
              help="Columns per chunk: a number for a 2-D grid of chunks (W by row blocks, H by column "
                   "blocks), 'none' for row blocks holding all columns, 'auto' (default): the grid only for a very wide V.")
@click.option("--dataset", default=None, help="Dataset inside an HDF5 input (or FILE.h5:/dataset).")
@click.option("--checkpoint", type=click.Path(), default=None, help="Checkpoint folder, so `dnmf resume` can continue a killed fit.")
@click.option("--checkpoint-every", type=int, default=None, help="Iterations between checkpoints.")
@scheduler_options
@report_options
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (only once the new result is complete).")
def fit(input_path, rank, out, solver, beta_loss, init, max_iter, tol, tol_x, max_time, objective_every, seed, chunks,
        column_chunks, dataset,
        checkpoint, checkpoint_every, scheduler, workers, threads_per_worker, memory_limit, quiet, log_json, overwrite):
    """Factor the matrix INPUT (a Zarr array path or URL, or any file `dnmf convert` reads;
    those are converted to a temporary Zarr array under $TMPDIR first).

    Writes W, H and the fit's record (configuration, history, stop reason, versions) to --out.
    """
    from sklearn.exceptions import ConvergenceWarning

    from ..estimator import NMF
    from ..data.results import refuse_existing, save_result

    refuse_existing(out, overwrite)
    extra = {}
    if checkpoint is not None:
        extra["checkpoint"] = checkpoint
    if checkpoint_every is not None:
        extra["checkpoint_every"] = checkpoint_every
    callbacks = make_callbacks(max_iter, quiet, log_json)
    started = time.perf_counter()
    try:
        with zarr_input(input_path, dataset, quiet) as path, \
                dask_client(scheduler, workers, threads_per_worker, memory_limit, quiet), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = NMF(
                rank, solver=solver, beta_loss=parse_beta_loss(beta_loss), init=None if init == "auto" else init,
                max_iter=max_iter, tol=tol, tol_x=tol_x, max_time=max_time, random_state=seed, chunks=chunks,
                column_chunks=column_chunks, objective_every=objective_every, callbacks=callbacks, **extra,
            )
            W = model.fit_transform(path)
            close_callbacks(callbacks)
            save_result(out, model, W, input_path=_absolute(input_path), overwrite=overwrite)
    finally:
        close_callbacks(callbacks)
    click.echo(summary(model, time.perf_counter() - started, out))


def _column_chunks(value: str):
    """--column-chunks: "auto", "none" or a positive number of columns."""
    if value.lower() in ("auto", "none"):
        return None if value.lower() == "none" else "auto"
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise click.BadParameter(f"expected 'auto', 'none' or a positive number of columns; got {value!r}")


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
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def resume(checkpoint_dir, out, input_path, max_iter, max_time, scheduler, workers, threads_per_worker,
           memory_limit, quiet, log_json, overwrite):
    """Continue a checkpointed fit from DIR (written by `dnmf fit --checkpoint DIR`)."""
    from sklearn.exceptions import ConvergenceWarning

    from ..data.results import refuse_existing, save_result
    from ..checkpoint import load as load_checkpoint
    from ..checkpoint import resume as resume_fit

    refuse_existing(out, overwrite)
    if not os.path.exists(checkpoint_dir):
        raise DnmfError(no_such_path("checkpoint", checkpoint_dir))
    callbacks = make_callbacks(max_iter, quiet, log_json)
    started = time.perf_counter()
    try:
        with dask_client(scheduler, workers, threads_per_worker, memory_limit, quiet), warnings.catch_warnings():
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
@scheduler_options
@click.option("--quiet", "-q", is_flag=True, help="No status lines.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def transform(result, input_path, out, chunks, dataset, scheduler, workers, threads_per_worker, memory_limit, quiet, overwrite):
    """W for the rows of INPUT with H fixed at RESULT's (same solver and loss)."""
    from ..data.results import load_result, refuse_existing, save_array
    from ..estimator import NMF

    refuse_existing(out, overwrite)
    model = NMF.from_result(load_result(result))
    if chunks is not None:
        model.chunks = chunks
    started = time.perf_counter()
    with zarr_input(input_path, dataset, quiet) as path, \
            dask_client(scheduler, workers, threads_per_worker, memory_limit, quiet):
        W = model.transform(path)
        save_array(out, W, overwrite=overwrite)
    click.echo(f"W {W.shape[0]} x {W.shape[1]}, {time.perf_counter() - started:.1f} s -> {out}")


def parse_beta_loss(text: str):
    """--beta-loss: a number as a float, a name as it is."""
    try:
        return float(text)
    except ValueError:
        return text


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
