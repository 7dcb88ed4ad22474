"""The ``dnmf`` command line: fit, resume, transform, info, convert, plot, demo, rank, consensus.

Each command is a thin layer over the library, in a module by subject: :mod:`~dnmf.cli.fit`
(fit, resume, transform), :mod:`~dnmf.cli.files` (info, convert, plot), :mod:`~dnmf.cli.demo`,
:mod:`~dnmf.cli.rank` and :mod:`~dnmf.cli.consensus`; what they share is in :mod:`~dnmf.cli.common`. The commands import
dask, zarr, scikit-learn and matplotlib when they run, so ``dnmf --help`` starts fast.

Errors about the user's input (a :class:`~dnmf.errors.DnmfError`, a missing file, a format
problem) print one red line on stderr and exit with status 1; ``dnmf --debug ...`` shows the
traceback instead.

A ``dnmf fit --checkpoint DIR`` (or ``dnmf resume``) stopped by SIGTERM or SIGUSR1 finishes its
iteration, writes a checkpoint, prints one line and exits with status 75
(:data:`~dnmf.run.signals.EXIT_INTERRUPTED`): run the same command again (``--resume auto``)
to continue.
"""

from __future__ import annotations

import logging
import os

import click

from ..errors import DnmfError, FitInterrupted
from ..run.signals import EXIT_INTERRUPTED
from . import consensus, demo, files, fit, rank

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
        except FitInterrupted as e:
            click.secho(f"Stopped: {_one_line(e)}", fg="yellow", err=True)
            ctx.exit(EXIT_INTERRUPTED)
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


main.add_command(fit.fit)
main.add_command(fit.resume)
main.add_command(fit.transform)
main.add_command(files.info)
main.add_command(files.convert)
main.add_command(files.plot)
main.add_command(demo.demo)
main.add_command(rank.rank_command, "rank")
main.add_command(consensus.consensus_command, "consensus")
