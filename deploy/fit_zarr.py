"""Factor a Zarr matrix with dnmf on whatever cluster the job provides; write W and H to Zarr.

Used by every recipe in deploy/ (Slurm, PBS, Docker, Kubernetes):

    python deploy/fit_zarr.py INPUT OUTPUT --rank 20 --scheduler local|mpi|slurm|pbs|ADDRESS|FILE.json

INPUT is the path or fsspec URL of a 2-D Zarr array (``/scratch/me/V.zarr``,
``s3://bucket/V.zarr``, ``gs://...``): every worker reads it, so it must be on a shared file
system or an object store. OUTPUT is a directory (or URL) that receives a Zarr group with the
arrays ``W`` (written by the workers, row block by row block) and ``H``, and attributes with
the settings and the history.

With ``--checkpoint DIR`` (a shared path or an fsspec URL) the fit checkpoints there and starts
or resumes (``resume="auto"``): the same command serves the first run and every rerun of a
pre-empted or timed-out job. On SIGTERM or SIGUSR1 it finishes the iteration, checkpoints and
exits with status 75 (``dnmf.run.signals.EXIT_INTERRUPTED``): the batch scripts requeue the
job on that status.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys


def job_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every recipe's driver takes: input, output, rank, max iterations."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("input", help="path or URL of the Zarr array V (n_samples x n_features)")
    parser.add_argument("output", help="path or URL of the Zarr group to write W and H into")
    parser.add_argument("--rank", type=int, required=True, help="number of components r")
    parser.add_argument("--max-iter", type=int, default=200)
    return parser


def parse_args(argv=None):
    parser = job_parser(__doc__.splitlines()[0])
    parser.add_argument("--scheduler", default="local", help="local, mpi, slurm, pbs, a scheduler address or file")
    parser.add_argument("--n-workers", type=int, default=None, help="workers (local) or jobs (slurm/pbs)")
    parser.add_argument("--memory-limit", default=None, help="memory limit per local worker, e.g. 4GiB")
    parser.add_argument("--job-options", default="{}", help="JSON of SLURMCluster/PBSCluster (or dask_mpi) arguments")
    parser.add_argument("--interface", default=None, help="network interface of the scheduler and workers (mpi, slurm, pbs)")
    parser.add_argument("--solver", default="mu", choices=("mu", "hals"))
    parser.add_argument("--init", default="random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="auto", choices=("auto", "true", "false"))
    parser.add_argument("--spill-dir", default=None, help="shared directory for re-rooting W")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint folder or URL: start the fit there, or resume the one it holds")
    parser.add_argument("--checkpoint-every", type=int, default=10, help="iterations between checkpoints")
    parser.add_argument("--status-file", default=None,
                        help="write the fit's exit status here (under MPI only the client rank does): "
                             "0 done, 75 stopped by a signal with a checkpoint, 1 failed")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from dnmf.run.signals import STOP_SIGNALS, exit_on_signals_outside_fits

    args = parse_args(argv)
    if args.scheduler == "mpi" and args.checkpoint:
        # srun / mpirun pass a forwarded SIGUSR1 to every rank: only the client rank acts on it
        # (its fit installs its own handler); the scheduler and worker ranks must not die of it.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    status, client = 1, []
    requeueable = args.checkpoint and args.scheduler != "mpi"
    if requeueable:
        # Once the result is written there is nothing left to stop: a USR1 or TERM that arrives
        # while the process shuts down (closing its cluster) must not kill it (status 138 or
        # 143, a failed job after a complete fit). exit_on_signals_outside_fits restores these
        # on leaving; until then it, and the fit's own handlers, act on them.
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
    try:
        with exit_on_signals_outside_fits() if requeueable else contextlib.nullcontext():
            # (A signal before or after the fit: exit 75 as well, so the batch script requeues.)
            status = _fit(args, client)
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
        raise
    finally:
        # Under MPI only the client rank: the scheduler and worker ranks end inside connect().
        if args.status_file and (client or args.scheduler != "mpi"):
            with open(args.status_file, "w") as f:
                f.write(f"{status}\n")
    return status


def _fit(args, client_rank: list) -> int:
    """Connect, fit, write the result; ``client_rank`` gets an entry once connected (the MPI
    rank that runs the fit)."""
    import dask.array as da
    import zarr

    from dnmf import NMF
    from dnmf.cluster import connect
    from dnmf.errors import FitInterrupted
    from dnmf.run.signals import EXIT_INTERRUPTED

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cache = {"auto": "auto", "true": True, "false": False}[args.cache]
    job_options = json.loads(args.job_options)
    if args.interface is not None:
        job_options["interface"] = args.interface
    with connect(
        args.scheduler, n_workers=args.n_workers, memory_limit=args.memory_limit,
        job_options=job_options,
    ) as client:
        client_rank.append(True)
        if client is not None:
            client.wait_for_workers(1)
        model = NMF(
            args.rank, solver=args.solver, init=args.init, max_iter=args.max_iter, tol=0, tol_x=0,
            random_state=args.seed, cache=cache, spill_dir=args.spill_dir, checkpoint=args.checkpoint,
            resume="auto" if args.checkpoint else None, checkpoint_every=args.checkpoint_every,
        )
        try:
            W = model.fit_transform(args.input)
        except FitInterrupted as stopped:
            logging.getLogger("dnmf.deploy").warning("%s", stopped)
            return EXIT_INTERRUPTED
        group = zarr.open_group(args.output, mode="w")
        group.attrs.update(
            {
                "rank": args.rank, "input": args.input, "n_iter": model.n_iter_,
                "stop_reason": model.stop_reason_, "fit_info": model.fit_info_,
                "history": model.history_,
            }
        )
        group.create_array("H", data=model.components_)
        w_array = group.create_array("W", shape=W.shape, chunks=(W.chunks[0][0], W.shape[1]), dtype=W.dtype)
        da.store(W, w_array, lock=False)
        logging.getLogger("dnmf.deploy").info(
            "wrote W %s and H %s to %s after %d iterations", W.shape, model.components_.shape, args.output, model.n_iter_
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
