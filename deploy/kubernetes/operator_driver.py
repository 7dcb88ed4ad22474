"""dnmf on Kubernetes through the dask-kubernetes operator, from a pod or a laptop with kubectl access.

    pip install dask-kubernetes   # and install the operator: helm install --repo https://helm.dask.org dask-kubernetes-operator ...
    python deploy/kubernetes/operator_driver.py s3://bucket/V.zarr s3://bucket/out.zarr --rank 20 --workers 8

Creates a ``KubeCluster`` of ``--workers`` pods from the dnmf image, fits, writes W and H with
deploy/fit_zarr.py's logic, and deletes the cluster. V, the output and ``--spill-dir`` must be
object-store URLs (or a ReadWriteMany volume added to the worker spec).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fit_zarr  # noqa: E402


def main(argv=None) -> int:
    parser = fit_zarr.job_parser(__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--image", default="registry.example.org/dnmf:0.1.0")
    parser.add_argument("--memory-gib", type=int, default=4, help="memory per worker pod, GiB")
    parser.add_argument("--spill-dir", default=None)
    args = parser.parse_args(argv)
    from dask_kubernetes.operator import KubeCluster

    from dnmf.cluster import WORKER_JOB_ENV

    cluster = KubeCluster(
        name="dnmf", image=args.image, n_workers=args.workers,
        resources={"requests": {"memory": f"{args.memory_gib}Gi", "cpu": "1"},
                   "limits": {"memory": f"{args.memory_gib}Gi", "cpu": "1"}},
        worker_command=["dask", "worker", "--nthreads", "1", "--memory-limit", f"{args.memory_gib * 0.9:.1f}GiB"],
        env=dict(WORKER_JOB_ENV),  # no spilling, glibc thresholds: as dnmf's LocalCluster workers
    )
    try:
        return fit_zarr.main(
            [args.input, args.output, "--rank", str(args.rank), "--max-iter", str(args.max_iter),
             "--scheduler", cluster.scheduler_address,
             "--spill-dir", args.spill_dir or args.output.rstrip("/") + ".spill"]
        )
    finally:
        cluster.close()


if __name__ == "__main__":
    sys.exit(main())
