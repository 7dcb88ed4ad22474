"""Scale-out benchmark: worker memory as V grows, out-of-core speed, cached against streamed.

    python benchmarks/bench_scaleout.py [--p 2048] [--base-rows 16384] [--workers 2] [--dir /tmp]
    python benchmarks/bench_scaleout.py --density 0.02 --p 20000 --base-rows 25000   # sparse stores

Prints, in one run:

1. the peak memory (RSS: the kernel's high-water mark over the fit) of the workers of a
   LocalCluster (``--workers`` single-threaded workers of ``--memory-limit``) factoring a
   streamed Zarr V of n = 1x, 2x, 4x, 8x ``--base-rows`` rows (goal: flat within 20%);
2. for each size, the time of one iteration out of core against the time to read V once from
   the same Zarr store on the same cluster (goal: <= 1.3x: an iteration reads V once);
3. the time per iteration with V cached in the workers' memory against streamed from Zarr.

With ``--density``, V is a sparse store (AnnData's CSR encoding, as ``dnmf convert`` writes a
sparse input) of that density instead of a dense Zarr array.

Timings on a shared machine are noisy: run it on an idle one for numbers you compare.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import dask
import dask.array as da
import numpy as np
import zarr

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MiB = 2**20


def write_zarr(path: str, n: int, p: int, rows_per_chunk: int) -> None:
    """A non-negative float32 Zarr of rank ~8 plus noise, written chunk by chunk, uncompressed."""
    arr = zarr.create_array(store=path, shape=(n, p), chunks=(rows_per_chunk, p), dtype="float32", compressors=None)
    rng = np.random.default_rng(0)
    basis = rng.random((8, p), dtype=np.float32)
    for start in range(0, n, rows_per_chunk):
        stop = min(n, start + rows_per_chunk)
        block = rng.random((stop - start, 8), dtype=np.float32) @ basis
        block += rng.random(block.shape, dtype=np.float32) * np.float32(0.1)
        arr[start:stop] = block


def write_sparse(path: str, n: int, p: int, density: float, rows_per_chunk: int) -> None:
    """A sparse store of counts at random positions (``density``), written block by block."""
    import scipy.sparse as sp

    from dnmf.data.ondisk import CSRWriter, create_csr_store

    writer = CSRWriter(create_csr_store(path, (n, p), np.float32))
    rng = np.random.default_rng(0)
    per_row = max(1, int(round(density * p)))
    for start in range(0, n, rows_per_chunk):
        rows = min(n, start + rows_per_chunk) - start
        cols = np.sort(rng.integers(0, p, (rows, per_row)), axis=1).ravel()
        values = np.ceil(rng.random(rows * per_row, dtype=np.float32) * 5)
        block = sp.csr_matrix((values, cols, np.arange(0, rows * per_row + 1, per_row)), shape=(rows, p))
        writer.append(block)
    writer.close()


def start_cluster(n_workers: int, memory_limit: str):
    from dnmf.cluster import get_client

    client, _ = get_client("local", n_workers=n_workers, threads_per_worker=1, memory_limit=memory_limit)
    client.run(lambda: __import__("dnmf.kernels") and __import__("dnmf.data.store") and None)
    return client


def reset_peak_memory(dask_worker=None) -> None:
    """Restart the kernel's record of this process's peak RSS (Linux: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_memory(dask_worker=None) -> int:
    """This process's peak RSS (VmHWM) since the last :func:`reset_peak_memory`, in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def read_once_seconds(V: da.Array) -> float:
    """Seconds to read every block of V once (summing it, so nothing is kept)."""
    sums = V.map_blocks(lambda b: np.array([[float(b.sum(dtype=np.float64))]]), chunks=(1, 1), dtype=float)
    tick = time.perf_counter()
    dask.compute(sums.sum())
    return time.perf_counter() - tick


def fit_seconds_per_iteration(V, rank: int, max_iter: int, cache) -> tuple[float, object]:
    from dnmf import NMF

    model = NMF(rank, init="random", random_state=0, max_iter=max_iter, tol=0, tol_x=0, cache=cache)
    model.fit(V)
    seconds = [record["seconds"] for record in model.history_[1:]]
    return statistics.median(seconds), model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--p", type=int, default=2048, help="columns of V")
    parser.add_argument("--base-rows", type=int, default=16384, help="rows of the 1x V")
    parser.add_argument("--rows-per-chunk", type=int, default=256)
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--max-iter", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-limit", default="512MiB", help="per worker, for the streamed runs")
    parser.add_argument("--dir", default=None, help="where to write the Zarr (default: a temp dir)")
    parser.add_argument("--density", type=float, default=None, help="write sparse stores of this density instead")
    args = parser.parse_args(argv)
    import logging

    logging.getLogger("distributed").setLevel(logging.ERROR)
    import warnings

    warnings.simplefilter("ignore")

    workdir = tempfile.mkdtemp(prefix="dnmf-bench-", dir=args.dir)
    try:
        scales = (1, 2, 4, 8)
        n_max = args.base_rows * scales[-1]
        # One Zarr per size: dnmf is given the store itself, as users do.
        paths = {n: os.path.join(workdir, f"V-{n}.zarr") for n in (args.base_rows * scale for scale in scales)}
        tick = time.perf_counter()
        for n, path in paths.items():
            if args.density is None:
                write_zarr(path, n, args.p, args.rows_per_chunk)
            else:
                write_sparse(path, n, args.p, args.density, max(args.rows_per_chunk, 4096))
        kind = "dense, uncompressed" if args.density is None else f"sparse store, {args.density:.1%} non-zeros"
        print(f"wrote V of up to {n_max} x {args.p} float32 ({n_max * args.p * 4 / MiB:.0f} MiB dense; {kind}) "
              f"in {time.perf_counter() - tick:.1f} s")
        print(f"cluster: {args.workers} workers x 1 thread, memory limit {args.memory_limit} each; "
              f"rank {args.rank}, MU, {args.max_iter} iterations (median of iterations 2..)")
        print()
        print(f"{'n':>8} {'V MiB':>7} {'peak worker MiB':>16} {'s/iter':>8} {'read V s':>9} {'iter/read':>10}")
        peaks = []
        for scale in scales:
            n = args.base_rows * scale
            client = start_cluster(args.workers, args.memory_limit)
            try:
                with client.as_current():
                    from dnmf import open_matrix

                    V = da.from_zarr(paths[n]) if args.density is None else open_matrix(paths[n]).data
                    read_once_seconds(V)  # warm the page cache, as every later pass finds it
                    read = min(read_once_seconds(V) for _ in range(2))
                    client.run(reset_peak_memory)  # the peak of the fit alone, exactly
                    per_iter, model = fit_seconds_per_iteration(paths[n], args.rank, args.max_iter, cache=False)
                    assert model.fit_info_["v_storage"] == "streamed"
                    peak = max(client.run(peak_memory).values())
            finally:
                client.close()
                client.cluster.close()
            peaks.append(peak)
            print(f"{n:>8} {n * args.p * 4 / MiB:>7.0f} {peak / MiB:>16.0f} {per_iter:>8.3f} {read:>9.3f} {per_iter / read:>10.2f}")
        spread = (max(peaks) - min(peaks)) / min(peaks)
        print(f"peak worker memory from 1x to 8x: spread {spread:.0%} (goal <= 20%)")
        print()

        n = args.base_rows * 4
        client = start_cluster(args.workers, "2GiB")
        try:
            with client.as_current():
                streamed, _ = fit_seconds_per_iteration(paths[n], args.rank, args.max_iter, cache=False)
                cached, model = fit_seconds_per_iteration(paths[n], args.rank, args.max_iter, cache=True)
                assert model.fit_info_["v_storage"] == "cached"
        finally:
            client.close()
            client.cluster.close()
        print(f"V {n} x {args.p} ({n * args.p * 4 / MiB:.0f} MiB) on {args.workers} x 2 GiB workers: "
              f"cached {cached:.3f} s/iter, streamed {streamed:.3f} s/iter ({streamed / cached:.2f}x)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
