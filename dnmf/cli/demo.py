"""``dnmf demo``: factor a planted-parts matrix on a local Dask cluster and show what was
recovered."""

from __future__ import annotations

import os
import tempfile
import time
import warnings

import click

from ..demo import best_matches, write_planted_matrix
from ..errors import ParameterError, expected
from .common import close_callbacks, dask_client, make_callbacks, say
from .files import PLOT_NAMES, write_plots


def is_demo_folder(path) -> bool:
    """Whether ``path`` is what an earlier ``dnmf demo`` wrote (its result and plots) or an empty folder,
    so that ``--overwrite`` may replace it."""
    from ..data.results import is_result

    if not os.path.isdir(path):
        return False
    names = set(os.listdir(path))
    return names <= {"result.zarr", *PLOT_NAMES} and (not names or is_result(os.path.join(path, "result.zarr")))


@click.command()
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
@click.option("--overwrite", is_flag=True, help="Replace --out-dir if an earlier demo wrote it.")
def demo(n_samples, n_features, parts, solver, max_iter, seed, workers, threads_per_worker, out_dir, quiet, overwrite):
    """Factor a planted-parts matrix on a local Dask cluster and show what was recovered.

    V = W_true H_true + noise, each row of H_true a localized block of features. The matrix goes
    to a temporary Zarr store; the result and PNGs go to --out-dir.
    """
    from sklearn.exceptions import ConvergenceWarning

    from ..cluster import dashboard_link
    from ..data.outputs import atomic_directory, check_output
    from ..data.results import save_result
    from ..estimator import NMF

    if parts < 1 or n_features < parts or n_samples < parts:
        raise ParameterError(expected("--parts between 1 and min(--n-samples, --n-features)", parts))
    check_output(out_dir, overwrite=overwrite, label="--out-dir", owned=is_demo_folder)
    with tempfile.TemporaryDirectory(prefix="dnmf-demo-") as tmp:
        say(quiet, f"Writing a {n_samples} x {n_features} planted-parts matrix ({parts} parts) to {tmp}/V.zarr…")
        planted = write_planted_matrix(
            os.path.join(tmp, "V.zarr"), n_samples, n_features, parts, seed=seed,
            rows_per_chunk=max(1, -(-n_samples // 8)),
        )
        with dask_client("local", workers, threads_per_worker, None, quiet) as client, warnings.catch_warnings():
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
            with atomic_directory(out_dir, overwrite, owned=is_demo_folder) as target:
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
