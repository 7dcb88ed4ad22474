"""What the commands share: the scheduler and report options, the Dask client, the input as
a Zarr array, the progress callbacks and the status lines."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile

import click

from ..errors import DnmfError, no_such_path
from ..settings import DEFAULTS, INIT_METHODS, SOLVERS, TABLE


def say(quiet: bool, message: str) -> None:
    """Print a status line on stderr unless ``quiet``."""
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
        say(quiet, "Starting Dask…" if scheduler == "local" else f"Connecting to {scheduler}…")
    with connect(scheduler, n_workers=workers, threads_per_worker=threads_per_worker, memory_limit=memory_limit) as client:
        if client is not None:
            link = dashboard_link(client)
            n = len(client.scheduler_info().get("workers", {}))
            say(quiet, f"Dask: {n} workers; dashboard: {link or 'unavailable (pip install bokeh)'}")
        yield client


@contextlib.contextmanager
def zarr_input(path: str, dataset: str | None, quiet: bool, layer: str | None = None):
    """(the path dnmf reads the input from, the AnnData layer to read there): the input itself
    (a Zarr store, an AnnData .h5ad file), or a temporary conversion to Zarr (other formats,
    and a sparse matrix stored by columns, converted once out of core)."""
    from ..data import convert, ondisk

    src, inline = convert.split_dataset(path)
    if not os.path.exists(src) and "://" not in src:
        raise DnmfError(no_such_path("input", src))
    fmt = convert.detect_format(src)
    direct = fmt == "zarr" or (fmt == "h5ad" and dataset is None and inline is None)
    if direct and not ondisk.stored_by_columns(src, layer):
        yield path, layer
        return
    if direct:
        dataset = ondisk.matrix_name(layer)
    elif layer is not None:
        raise DnmfError(f"--layer picks a layer of an AnnData input (.h5ad or AnnData .zarr), not of {path!r}.")
    with tempfile.TemporaryDirectory(prefix="dnmf-input-") as tmp:
        target = os.path.join(tmp, "V.zarr")
        say(quiet, f"Converting {path} to a temporary Zarr store…")
        convert.convert(path, target, dataset=dataset)
        yield target, None


def check_fit_outputs(out, overwrite: bool, log_json, reads: dict) -> None:
    """Refuse, before any work, an --out or --log-json of a fit that could harm what the user owns.

    Parameters
    ----------
    out : str
        The result to write (see :func:`dnmf.data.outputs.check_output`, ``kind="store"``).
    overwrite : bool
        --overwrite: replace an existing ``out`` that dnmf wrote.
    log_json : str or None
        The JSON-lines log to append to; it may not be, lie inside or hold ``out`` or a read path.
    reads : dict
        What the command reads, by role (``{"input": ..., "checkpoint": ...}``).
    """
    from ..data.outputs import check_output

    check_output(out, protected=reads, overwrite=overwrite, label="--out")
    if log_json is not None:
        check_output(log_json, protected={**reads, "result": out}, kind="log", label="--log-json")


def make_callbacks(max_iter, quiet: bool, log_json) -> list:
    """A progress bar (hidden when ``quiet``) and, with ``log_json``, a JSON-lines log."""
    from ..run.progress import JsonLog, ProgressBar

    callbacks = [ProgressBar(max_iter, disable=quiet)]
    if log_json:
        callbacks.append(JsonLog(log_json))
    return callbacks


def close_callbacks(callbacks) -> None:
    """Close what :func:`make_callbacks` made (closing twice is harmless)."""
    for callback in callbacks:
        callback.close()


# ---------------------------------------------------------------------------
# The fit parameters as options, from the settings table


def _beta_loss(text: str):
    """--beta-loss: a number as a float, a name as it is."""
    try:
        return float(text)
    except ValueError:
        return text


def _column_chunks(text: str):
    """--column-chunks: "auto", "none" or a positive number of columns."""
    if text.lower() in ("auto", "none"):
        return None if text.lower() == "none" else "auto"
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise click.BadParameter(f"expected 'auto', 'none' or a positive number of columns; got {text!r}")


def _auto_or_int(text: str):
    return text if text == "auto" else int(text)


def same_or_float(text):
    """"same" or a number (the library checks the value)."""
    if isinstance(text, str) and text.strip().lower() == "same":
        return "same"
    try:
        return float(text)
    except (TypeError, ValueError):
        raise click.BadParameter(f'expected "same" or a number, got {text!r}') from None


_BOOLEAN_OR_AUTO = {"auto": "auto", "true": True, "false": False}

# How each fit parameter is written on the command line: its click type, and where it differs
# from the library, its flag and default. The names, the other defaults and the help come from
# dnmf.settings.TABLE, which also validates the values (in the library, once, with its messages).
CLI_OPTIONS = {
    "n_components": dict(flags=("--rank", "-r"), type=int, required=True),
    "solver": dict(type=click.Choice(SOLVERS)),
    "beta_loss": dict(type=_beta_loss, metavar="NAME|β"),
    "init": dict(type=click.Choice(["auto", *[m for m in INIT_METHODS if m != "custom"]]), default="auto"),
    "max_iter": dict(type=int),
    "tol": dict(type=float),
    "tol_x": dict(type=float),
    "max_time": dict(type=float),
    "objective_every": dict(type=int),
    "random_state": dict(flags=("--seed",), type=int, default=0),
    "eps": dict(type=float),
    "chunks": dict(type=int),
    "column_chunks": dict(type=str, metavar="auto|none|N", callback=lambda ctx, param, value: _column_chunks(value)),
    "missing": dict(type=click.Choice(["nan"])),
    "n_runs": dict(type=int),
    "checkpoint": dict(type=click.Path()),
    "resume": dict(type=click.Choice(["auto"])),
    "checkpoint_every": dict(type=int),
    "checkpoint_interval": dict(type=float),
    "cache": dict(type=click.Choice(list(_BOOLEAN_OR_AUTO)), callback=lambda ctx, param, value: _BOOLEAN_OR_AUTO[value]),
    "reroot_every": dict(type=int),
    "spill_dir": dict(type=click.Path()),
    "inner_sweeps": dict(type=_auto_or_int, metavar="auto|N"),
    "local": dict(type=click.Choice(list(_BOOLEAN_OR_AUTO)), callback=lambda ctx, param, value: _BOOLEAN_OR_AUTO[value]),
    "alpha_W": dict(flags=("--alpha-w",), type=float),
    "alpha_H": dict(flags=("--alpha-h",), type=same_or_float, metavar="same|X"),
    "l1_ratio": dict(type=float),
}


def option_flag(name: str) -> str:
    """How the fit parameter ``name`` is written on the command line (``--rank/-r``)."""
    flags = CLI_OPTIONS.get(name, {}).get("flags", ("--" + name.replace("_", "-"),))
    return "/".join(flags)


def check_fit_params(params: dict) -> None:
    """Validate the fit options with the settings table before any work (conversion, Dask),
    naming each parameter as the command line writes it (--rank for n_components)."""
    from ..errors import ParameterError
    from ..settings import FitSettings

    try:
        FitSettings.from_params(params)
    except ParameterError as error:
        message = str(error)
        for name in sorted(CLI_OPTIONS, key=len, reverse=True):
            message = re.sub(rf"(?<![\w-]){name}(?![\w])", option_flag(name), message)
        raise ParameterError(message) from None


def fit_options(func):
    """One option per fit parameter of :data:`dnmf.settings.TABLE` that has command-line help.

    The command gets them under the parameters' names (``n_components``, ``random_state``, ...),
    ready for ``NMF(**params)`` (``init="auto"`` means None).
    """
    for setting in reversed([s for s in TABLE if s.help]):
        spec = dict(CLI_OPTIONS[setting.name])
        flags = spec.pop("flags", ("--" + setting.name.replace("_", "-"),))
        default = spec.pop("default", DEFAULTS[setting.name])
        if not spec.get("required") and default is not None:
            spec["default"] = default if not isinstance(default, bool) else str(default).lower()
        func = click.option(*flags, setting.name, help=setting.help, **spec)(func)
    return func
