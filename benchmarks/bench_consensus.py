"""Consensus benchmark (issue 18): ``dnmf consensus`` on a sparse count matrix on a cluster.

    python benchmarks/bench_consensus.py --dir /scratch/cons                       # the issue's case
    python benchmarks/bench_consensus.py --dir /tmp/c --rows 20000 --cols 2000 --ranks 3:5 --replicates 8

The issue's case: K = 5..15 × 50 replicates on a 200000×20000 count matrix with 2% non-zeros,
on a LocalCluster of 2 single-threaded workers × 2 GiB. With ``--max-iter 25`` it took 4575 s
on 2 cores (0.33 s per replicate-iteration over all ranks, consensus steps included; 34 fits in
flight at K = 5, 11 at K = 15; worker peaks 1374 and 1260 MiB). The default 500 iterations
(tol 1e-5) take up to 20 times that: run it as a batch job. The matrix is written
once to ``DIR/counts.zarr`` (a sparse store, as ``dnmf convert`` writes one) and the consensus
works in ``DIR/consensus``, checkpointed per rank and per replicate, so the same command run
again after a kill continues where it stopped; its time is then that run's.

Counts at random positions (``--density`` of each row) whose values follow ``--programs``
planted programs: each row's counts are 1 + Poisson(c · w_i · h_j) at its non-zeros, w_i
mostly one program, h_j non-negative and sparse-ish. Prints the time of the whole run, the
peak memory of each worker, and each rank's stability, error and outliers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_counts(path: str, n: int, p: int, density: float, programs: int, rows_per_block: int = 20000) -> None:
    """The planted count matrix as a sparse store, written block by block (never whole)."""
    import scipy.sparse as sp

    from dnmf.data.ondisk import CSRWriter, create_csr_store

    rng = np.random.default_rng(0)
    H = rng.gamma(0.3, 1.0, size=(programs, p)).astype(np.float32)
    per_row = max(1, int(round(density * p)))
    writer = CSRWriter(create_csr_store(path, (n, p), np.float32))
    for start in range(0, n, rows_per_block):
        rows = min(n, start + rows_per_block) - start
        W = rng.dirichlet(np.full(programs, 0.1), size=rows).astype(np.float32)
        cols = np.sort(rng.choice(p, size=(rows, per_row)), axis=1)
        keep = np.ones(cols.shape, dtype=bool)
        keep[:, 1:] = cols[:, 1:] != cols[:, :-1]  # each column once per row
        counts, cols = keep.sum(axis=1), cols[keep].astype(np.int32)
        row_of = np.repeat(np.arange(rows), counts)
        rates = 4.0 * np.einsum("ij,ji->i", W[row_of], H[:, cols])
        values = (1 + rng.poisson(rates)).astype(np.float32)
        indptr = np.concatenate(([0], np.cumsum(counts)))
        writer.append(sp.csr_matrix((values, cols, indptr), shape=(rows, p)))
    writer.close()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", required=True, help="where the matrix and the consensus's workdir go (kept)")
    parser.add_argument("--rows", type=int, default=200000)
    parser.add_argument("--cols", type=int, default=20000)
    parser.add_argument("--density", type=float, default=0.02)
    parser.add_argument("--programs", type=int, default=10)
    parser.add_argument("--ranks", default="5:15")
    parser.add_argument("--replicates", type=int, default=50)
    parser.add_argument("--max-iter", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-limit", default="2GiB")
    args = parser.parse_args(argv)

    import dnmf
    from dnmf.cluster import connect

    os.makedirs(args.dir, exist_ok=True)
    store = os.path.join(args.dir, "counts.zarr")
    if not os.path.exists(store):
        tick = time.perf_counter()
        write_counts(store, args.rows, args.cols, args.density, args.programs)
        print(f"wrote {store} in {time.perf_counter() - tick:.0f} s", flush=True)
    with connect("local", n_workers=args.workers, threads_per_worker=1, memory_limit=args.memory_limit) as client:
        tick = time.perf_counter()
        result = dnmf.consensus(store, args.ranks, n_replicates=args.replicates, max_iter=args.max_iter, random_state=0,
                                workdir=os.path.join(args.dir, "consensus"))
        seconds = time.perf_counter() - tick
        peaks = client.run(lambda dask_worker: max(dask_worker.monitor.quantities["memory"]))
    print(f"consensus K = {args.ranks} × {args.replicates} replicates of {args.rows}×{args.cols} "
          f"({100 * args.density:g}% non-zeros) on {args.workers} workers × {args.memory_limit}: {seconds:.0f} s")
    print("worker peaks (MiB):", ", ".join(f"{peak / 2**20:.0f}" for peak in peaks.values()))
    for rank in result.results:
        print(f"  K={rank.rank}: stability {rank.stability:.3f}, error {rank.error:.4f}, outliers {rank.n_outliers}")
    print(f"suggested K: {result.suggested_rank} ({result.reason})")


if __name__ == "__main__":
    main()
