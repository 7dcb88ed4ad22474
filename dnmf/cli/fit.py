"""The ``dnmf`` command line: fit, resume, transform, info, convert, plot, demo.

Each command is a thin layer over the library. Errors about the user's input (a
:class:`~dnmf.errors.DnmfError`, a missing file, a format problem) print one red line on
stderr and exit with status 1; ``dnmf --debug ...`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import click

from ..errors import DnmfError, ParameterError, expected

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100}
USER_ERRORS = (DnmfError, OSError)


class DnmfGroup(click.Group):
    """A command group that turns user errors into one red line and exit status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            if ctx.params.get("debug") or os.environ.get("DNMF_DEBUG"):
                raise
            click.secho(f"Error: {_one_line(e)}", fg="red", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.secho("Interrupted.", fg="red", err=True)
            ctx.exit(130)


def _one_line(error: BaseException) -> str:
    if isinstance(error, FileNotFoundError) and error.filename:
        return f"No such file or folder: {error.filename!r}."
    text = str(error) or type(error).__name__
    return " ".join(text.split())


@click.group(cls=DnmfGroup, context_settings=CONTEXT)
@click.option("--debug", is_flag=True, help="Show the full traceback of an error, and Dask's log messages.")
@click.version_option(package_name="dnmf", prog_name="dnmf")
def main(debug: bool) -> None:
    """Distributed, out-of-core non-negative matrix factorization V ≈ WH on Dask and Zarr.

    Start with `dnmf demo`; `dnmf COMMAND -h` explains each command.
    """
    if not debug:
        # Dask's INFO/WARNING chatter would bury the progress bar (workers inherit the variable).
        import dask

        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
        dask.config.set({"logging.distributed": "error"})
        logging.getLogger("distributed").setLevel(logging.ERROR)


# --- shared pieces -------------------------------------------------------------------------


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        click.echo(message, err=True)


def scheduler_options(func):
    """--scheduler, --workers, --threads-per-worker, --memory-limit."""
    options = [
        click.option(
            "--scheduler", default="local", metavar="ADDRESS|FILE|local|threads",
            help="Where to run: a new local cluster ('local'), a scheduler address (tcp://host:8786), "
            "a scheduler file (JSON) on a shared file system, or 'threads' (no cluster: dask's "
            "threaded scheduler in this process, good for small inputs).",
        ),
        click.option("--workers", type=int, default=None, help="Workers of a local cluster (default: from the cores)."),
        click.option("--threads-per-worker", type=int, default=1, help="Threads per worker of a local cluster."),
        click.option("--memory-limit", default=None, metavar="SIZE", help="Memory per worker of a local cluster, e.g. 4GiB (default: shared equally)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def report_options(func):
    """--quiet, --log-json."""
    func = click.option("--log-json", type=click.Path(dir_okay=False), default=None,
                        help="Append one JSON line per iteration to this file.")(func)
    func = click.option("--quiet", "-q", is_flag=True, help="No progress bar or status lines; only the summary.")(func)
    return func


@contextlib.contextmanager
def dask_client(scheduler: str, workers, threads_per_worker, memory_limit, quiet: bool):
    """A distributed client for the command's duration (none for 'threads'); prints the dashboard."""
    from ..cluster import connect, dashboard_link

    if scheduler != "threads":
        _say(quiet, "Starting Dask…" if scheduler == "local" else f"Connecting to {scheduler}…")
    with connect(scheduler, n_workers=workers, threads_per_worker=threads_per_worker, memory_limit=memory_limit) as client:
        if client is not None:
            link = dashboard_link(client)
            n = len(client.scheduler_info().get("workers", {}))
            _say(quiet, f"Dask: {n} workers; dashboard: {link or 'unavailable (pip install bokeh)'}")
        yield client


@contextlib.contextmanager
def zarr_input(path: str, dataset: str | None, quiet: bool):
    """The path of a Zarr array holding the input: itself, or a temporary conversion."""
    from ..data import convert

    src, _ = convert.split_dataset(path)
    if not os.path.exists(src) and "://" not in src:
        raise DnmfError(f"No input at {src!r}: the path does not exist.")
    if convert.detect_format(src) == "zarr":
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="dnmf-input-") as tmp:
        target = os.path.join(tmp, "V.zarr")
        _say(quiet, f"Converting {path} to a temporary Zarr array…")
        convert.convert(path, target, dataset=dataset)
        yield target


def make_callbacks(max_iter, quiet: bool, log_json) -> list:
    from ..run.progress import JsonLog, ProgressBar

    callbacks = [ProgressBar(max_iter, disable=quiet)]
    if log_json:
        callbacks.append(JsonLog(log_json))
    return callbacks


def close_callbacks(callbacks) -> None:
    for callback in callbacks:
        callback.close()


def parse_beta_loss(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def summary(model, seconds: float, out) -> str:
    rel = ""
    norm = getattr(model, "data_norm_", None)
    if norm and model.beta_loss in ("frobenius", 2, 2.0):
        rel = f", relative error {model.reconstruction_err_ / norm:.4g}"
    return (
        f"rank {model.n_components_}: {model.n_iter_} iterations ({model.stop_reason_}), "
        f"loss {model.reconstruction_err_:.6g}{rel}, {seconds:.1f} s -> {out}"
    )


# --- fit / resume / transform ---------------------------------------------------------------


@main.command()
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
    if extra and "checkpoint" not in NMF().get_params():
        raise DnmfError("This dnmf has no checkpoint support yet; run without --checkpoint / --checkpoint-every.")
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


@main.command()
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

    from ..run.checkpoint import load as load_checkpoint
    from ..run.checkpoint import resume as resume_fit

    refuse_existing(out, overwrite)
    if not os.path.exists(checkpoint_dir):
        raise DnmfError(f"No checkpoint at {checkpoint_dir!r}: the path does not exist.")
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


@main.command()
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

    refuse_existing(out, overwrite)
    model = load_result(result).to_model()
    if chunks is not None:
        model.chunks = chunks
    started = time.perf_counter()
    with zarr_input(input_path, dataset, quiet) as path, \
            dask_client(scheduler, workers, threads_per_worker, memory_limit, quiet):
        W = model.transform(path)
        save_array(out, W, overwrite=overwrite)
    click.echo(f"W {W.shape[0]} x {W.shape[1]}, {time.perf_counter() - started:.1f} s -> {out}")


# --- info / convert / plot --------------------------------------------------------------------


@main.command()
@click.argument("path", type=click.Path())
@click.option("--dataset", default=None, help="Dataset inside an HDF5 file.")
@click.option("--no-scan", is_flag=True, help="Skip the pass over a matrix's values (nnz, negative, NaN).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def info(path, dataset, no_scan, as_json):
    """Describe a matrix (shape, dtype, chunks, size, nnz, bad entries) or a dnmf result."""
    from ..data.inspect import describe

    facts = describe(path, dataset=dataset, scan=not no_scan)
    if as_json:
        click.echo(json.dumps(facts, indent=2, default=str))
        return
    width = max(len(key) for key in facts)
    for key, value in facts.items():
        click.echo(f"{key:<{width}}  {value}")


@main.command()
@click.argument("src", metavar="SRC")
@click.argument("dst", metavar="DST.zarr", type=click.Path())
@click.option("--chunks", type=int, default=None, help="Rows per Zarr chunk (default: ~64 MiB, at least 4 chunks).")
@click.option("--dataset", default=None, help="Dataset inside an HDF5 file (or SRC.h5:/dataset), or member of an .npz.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
def convert(src, dst, chunks, dataset, quiet, overwrite):
    """Write SRC (.npy, .npz, .mtx(.gz), .csv/.tsv, HDF5, .h5ad) as a row-chunked Zarr array DST.

    Streamed by row blocks where the format allows (Matrix Market is read whole).
    """
    from tqdm.auto import tqdm

    from ..data import convert as conv

    bars = []

    def progress(rows: int) -> None:
        if not bars:  # drawn at the first block, so an early error shows no bar
            bars.append(tqdm(desc="convert", unit="rows", disable=quiet, file=sys.stderr))
        bars[0].update(rows)

    started = time.perf_counter()
    try:
        facts = conv.convert(src, dst, chunks=chunks, dataset=dataset, overwrite=overwrite, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    n, p = facts["shape"]
    note = f" ({facts['note']})" if facts["note"] else ""
    click.echo(f"{n} x {p} {facts['dtype']}, chunks {facts['chunks'][0]} rows, {time.perf_counter() - started:.1f} s -> {dst}{note}")


@main.command()
@click.argument("result", type=click.Path())
@click.option("--out-dir", type=click.Path(file_okay=False), default=None,
              help="Folder for the PNGs (default: RESULT's name with -plots).")
@click.option("--image-shape", default=None, metavar="HxW", help="Show the parts as HxW images, e.g. 8x8.")
@click.option("--max-rows", type=int, default=400, help="Rows of W sampled for the heatmap.")
@click.option("--overwrite", is_flag=True, help="Replace PNGs that exist.")
def plot(result, out_dir, image_shape, max_rows, overwrite):
    """Write PNGs of a result: convergence, the parts (rows of H), a sample of W."""
    from ..plots import parse_image_shape
    from ..data.results import load_result

    shape = parse_image_shape(image_shape) if image_shape else None
    res = load_result(result)
    out_dir = Path(out_dir) if out_dir else Path(str(result).rstrip("/").removesuffix(".zarr") + "-plots")
    paths = write_plots(res.history, res.H, res.W, out_dir, shape, max_rows, overwrite)
    for p in paths:
        click.echo(str(p))


def write_plots(history, H, W, out_dir: Path, image_shape, max_rows: int, overwrite: bool) -> list[Path]:
    """convergence.png, parts.png and w_heatmap.png in ``out_dir``; existing ones only with overwrite."""
    from ..plots import plot_convergence, plot_parts, plot_w_heatmap

    names = ("convergence.png", "parts.png", "w_heatmap.png")
    existing = [n for n in names if (out_dir / n).exists()]
    if existing and not overwrite:
        raise DnmfError(f"{existing[0]!r} already exists in {str(out_dir)!r}; choose another --out-dir or pass --overwrite.")
    out_dir.mkdir(parents=True, exist_ok=True)
    drawers = (
        lambda p: plot_convergence(history, p),
        lambda p: plot_parts(H, p, image_shape=image_shape),
        lambda p: plot_w_heatmap(W, p, max_rows=max_rows),
    )
    written = []
    for name, draw in zip(names, drawers):
        tmp = out_dir / f".{name}.tmp.png"
        try:
            draw(tmp)
            os.replace(tmp, out_dir / name)
        finally:
            tmp.unlink(missing_ok=True)
        written.append(out_dir / name)
    return written


# --- demo -------------------------------------------------------------------------------------


@main.command()
@click.option("--n-samples", type=int, default=20000, help="Rows of the planted-parts matrix.")
@click.option("--n-features", type=int, default=2000, help="Columns of the planted-parts matrix.")
@click.option("--parts", type=int, default=6, help="Planted parts (and the rank fitted).")
@click.option("--solver", type=click.Choice(["mu", "hals"]), default="hals", help="Solver.")
@click.option("--max-iter", type=int, default=200, help="Most iterations.")
@click.option("--seed", type=int, default=1301, help="Seed of the data and of the fit.")
@click.option("--workers", type=int, default=2, help="Workers of the local cluster.")
@click.option("--threads-per-worker", type=int, default=1, help="Threads per worker.")
@click.option("--out-dir", type=click.Path(file_okay=False), default="dnmf-demo", help="Folder for the result and the plots.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or status lines.")
@click.option("--overwrite", is_flag=True, help="Replace --out-dir if it exists.")
def demo(n_samples, n_features, parts, solver, max_iter, seed, workers, threads_per_worker, out_dir, quiet, overwrite):
    """Factor a planted-parts matrix on a local Dask cluster and show what was recovered.

    V = W_true H_true + noise, each row of H_true a localized block of features. The matrix goes
    to a temporary Zarr store; the result and PNGs go to --out-dir.
    """
    from sklearn.exceptions import ConvergenceWarning

    from ..demo import best_matches, write_planted_matrix
    from ..estimator import NMF
    from ..data.results import atomic_directory, refuse_existing, save_result

    if parts < 1 or n_features < parts or n_samples < parts:
        raise ParameterError(expected("--parts between 1 and min(--n-samples, --n-features)", parts))
    refuse_existing(out_dir, overwrite)
    with tempfile.TemporaryDirectory(prefix="dnmf-demo-") as tmp:
        _say(quiet, f"Writing a {n_samples} x {n_features} planted-parts matrix ({parts} parts) to {tmp}/V.zarr…")
        planted = write_planted_matrix(
            os.path.join(tmp, "V.zarr"), n_samples, n_features, parts, seed=seed,
            rows_per_chunk=max(1, -(-n_samples // 8)),
        )
        with dask_client("local", workers, threads_per_worker, None, quiet) as client, warnings.catch_warnings():
            from ..cluster import dashboard_link

            link = dashboard_link(client)
            warnings.simplefilter("ignore", ConvergenceWarning)
            callbacks = make_callbacks(max_iter, quiet, None)
            started = time.perf_counter()
            model = NMF(parts, solver=solver, init="nndsvda", max_iter=max_iter, random_state=seed, callbacks=callbacks)
            try:
                W = model.fit_transform(planted.path)
            finally:
                close_callbacks(callbacks)
            seconds = time.perf_counter() - started
            with atomic_directory(out_dir, overwrite) as target:
                target.mkdir()
                save_result(target / "result.zarr", model, W, input_path="(temporary planted-parts matrix)")
                write_plots(model.history_, model.components_, W, target, None, 400, False)
    index, cosine = best_matches(model.components_, planted.H_true)
    click.echo(
        f"Fitted rank {parts} with {solver.upper()} in {seconds:.1f} s: {model.n_iter_} iterations "
        f"({model.stop_reason_}), {seconds / max(1, model.n_iter_):.3f} s/iteration."
    )
    click.echo(f"Relative error ‖V − WH‖/‖V‖ = {model.reconstruction_err_ / planted.norm:.4f}")
    click.echo("Planted part -> best learned part (cosine):")
    for k, (j, c) in enumerate(zip(index, cosine)):
        click.echo(f"  part {k + 1} -> H row {j + 1}  ({c:.3f})")
    if link:
        click.echo(f"The Dask dashboard was at {link} (the cluster is closed now).")
    click.echo(f"Result and plots (convergence.png, parts.png, w_heatmap.png) in {out_dir}/")
    click.echo(f"Next: dnmf info {out_dir}/result.zarr   |   dnmf plot {out_dir}/result.zarr")


def _register_subcommands() -> None:
    from .rank import rank_command

    main.add_command(rank_command, "rank")


_register_subcommands()
