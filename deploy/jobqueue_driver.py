"""Run dnmf from a login node (or a small job) that submits its dask workers as batch jobs.

    python deploy/jobqueue_driver.py /shared/V.zarr /shared/result.zarr --rank 20 \
        --system slurm --jobs 4 --cores 8 --memory 32GiB --walltime 02:00:00 --queue normal

``--system pbs`` does the same on PBS Pro / OpenPBS / Torque. dask-jobqueue's ``SLURMCluster``
(``PBSCluster``) writes one batch script per worker job (``--cores`` single-threaded worker
processes per job) and the scheduler runs here; the jobs connect back to it, so
this machine must be reachable from the compute nodes (pick the interface with
``--interface``, e.g. ``ib0``). V and the result are paths on a shared file system or fsspec
URLs (``s3://...``); ``--spill-dir`` (default: OUTPUT + ".spill") must be shared too.
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import fit_zarr  # noqa: E402  (deploy/fit_zarr.py)


def build_parser():
    parser = fit_zarr.job_parser(__doc__.splitlines()[0])
    parser.add_argument("--system", choices=("slurm", "pbs"), default="slurm", help="the batch system")
    parser.add_argument("--jobs", type=int, default=1, help="worker jobs to submit")
    parser.add_argument("--cores", type=int, default=1, help="cores (= single-threaded workers) per job")
    parser.add_argument("--memory", default="4GiB", help="memory per job")
    parser.add_argument("--walltime", default="01:00:00")
    parser.add_argument("--queue", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--interface", default=None, help="network interface the workers reach (e.g. ib0, lo)")
    parser.add_argument("--python", default=sys.executable, help="python on the compute nodes")
    parser.add_argument(
        "--dashboard-address", default="127.0.0.1:8787",
        help="where the scheduler serves its dashboard (default: this machine only, reach it through "
        "`ssh -L 8787:127.0.0.1:8787 LOGIN-NODE`; ':8787' serves every interface, to anyone who can connect)",
    )
    parser.add_argument("--spill-dir", default=None)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    job_options = {
        "cores": args.cores, "processes": args.cores, "memory": args.memory, "walltime": args.walltime,
        "queue": args.queue, "account": args.account, "interface": args.interface, "python": args.python,
        "scheduler_options": {"dashboard_address": args.dashboard_address},
        # The workers unpickle dnmf's kernels: dnmf must import on the nodes (installed, or here).
        "job_script_prologue": [f"export PYTHONPATH={os.path.dirname(HERE)}:$PYTHONPATH"],
    }
    job_options = {key: value for key, value in job_options.items() if value is not None}
    return fit_zarr.main(
        [args.input, args.output, "--rank", str(args.rank), "--max-iter", str(args.max_iter),
         "--scheduler", args.system, "--n-workers", str(args.jobs), "--job-options", json.dumps(job_options),
         "--spill-dir", args.spill_dir or args.output.rstrip("/") + ".spill"]
    )


if __name__ == "__main__":
    sys.exit(main())
