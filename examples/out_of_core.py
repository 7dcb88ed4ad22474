"""An out-of-core fit: V lives in a chunked Zarr store bigger than the workers' memory.

Writes a planted-parts matrix to Zarr one row chunk at a time, then factors it on a local
Dask cluster whose workers together have less memory than V: every iteration streams V's
row blocks from disk once, and W is written back chunk by chunk. Run::

    python examples/out_of_core.py --n-samples 400000 --n-features 1000 --memory-limit 1GiB
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

from sklearn.exceptions import ConvergenceWarning

import dnmf
from dnmf.cluster import connect, dashboard_link
from dnmf.data.convert import human_bytes, size_on_disk
from dnmf.demo import best_matches, planted_parts_h, write_planted_matrix
from dnmf.run.progress import ProgressBar
from dnmf.data.results import save_result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-samples", type=int, default=400_000)
    parser.add_argument("--n-features", type=int, default=1000)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rows-per-chunk", type=int, default=20_000)
    parser.add_argument("--max-iter", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-limit", default="1GiB", help="per worker")
    parser.add_argument("--scheduler", default="local", help="'local', an address, or 'threads' (no cluster)")
    parser.add_argument("--dir", type=Path, default=Path("ooc-data"), help="where V.zarr and result.zarr go")
    args = parser.parse_args(argv)
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")  # quiet workers near their memory limit
    warnings.simplefilter("ignore", ConvergenceWarning)  # the stop reason is printed below

    args.dir.mkdir(parents=True, exist_ok=True)
    V_path = args.dir / "V.zarr"
    if not V_path.exists():
        started = time.perf_counter()
        write_planted_matrix(V_path, args.n_samples, args.n_features, args.rank,
                             rows_per_chunk=min(args.rows_per_chunk, args.n_samples))
        print(f"wrote V {args.n_samples} x {args.n_features} float32 to {V_path} "
              f"({human_bytes(size_on_disk(V_path))} on disk) in {time.perf_counter() - started:.1f} s")
    V_bytes = args.n_samples * args.n_features * 4
    with connect(args.scheduler, n_workers=args.workers, threads_per_worker=1,
                 memory_limit=args.memory_limit) as client:
        if client is not None:
            print(f"{args.workers} workers x {args.memory_limit} for V of {human_bytes(V_bytes)} in memory; "
                  f"dashboard {dashboard_link(client)}")
        bar = ProgressBar(args.max_iter)
        model = dnmf.NMF(args.rank, solver="hals", init="nndsvda", max_iter=args.max_iter, random_state=0,
                         callbacks=[bar])
        started = time.perf_counter()
        W = model.fit_transform(str(V_path))  # a dask array: W stays on the workers
        bar.close()
        seconds = time.perf_counter() - started
        out = save_result(args.dir / "result.zarr", model, W, input_path=str(V_path), overwrite=True)
    _, cosine = best_matches(model.components_, planted_parts_h(args.rank, args.n_features))
    print(f"{model.n_iter_} iterations ({model.stop_reason_}) in {seconds:.1f} s, "
          f"relative error {model.reconstruction_err_ / model.data_norm_:.4f}, "
          f"worst part match (cosine) {cosine.min():.3f}; result in {out}")


if __name__ == "__main__":
    main()
