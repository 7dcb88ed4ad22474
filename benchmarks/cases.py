"""One benchmark case per child process: ``python benchmarks/cases.py CASE JSON_PARAMS``.

Each case builds its matrix, times its competitors side by side (interleaved repeats in the
same process, so they see the same machine state) and prints one line ``RESULT {json}``.
Steady-state seconds per iteration come from differencing fits of ``hi`` and ``lo``
iterations from the same start: (t_hi - t_lo) / (hi - lo), which removes the fixed costs
(validation, scan, start, final error). Run through ``benchmarks/run.py``, which sets the
malloc environment variables these machines need for stable timings.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path
from statistics import median

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dask  # noqa: E402
import dask.array as da  # noqa: E402
from sklearn.decomposition import NMF as SkNMF  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

import dnmf  # noqa: E402
from dnmf.data.store import auto_row_block  # noqa: E402
from dnmf.data.zarrio import default_compressors  # noqa: E402

warnings.simplefilter("ignore", ConvergenceWarning)
warnings.simplefilter("ignore", UserWarning)


# ---------------------------------------------------------------------------
# Matrices and starts


def dense_uniform(n: int, p: int, dtype, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, p), dtype=np.dtype(dtype).type)


def dense_planted(n: int, p: int, r: int, dtype, seed: int = 0, noise: float = 0.1) -> np.ndarray:
    """A rank-r non-negative matrix plus uniform noise (relative size ``noise``)."""
    rng = np.random.default_rng(seed)
    t = np.dtype(dtype).type
    V = rng.random((n, r), dtype=t) @ rng.random((r, p), dtype=t)
    V *= 1.0 / r
    V += noise * rng.random((n, p), dtype=t)
    return V


def sparse_uniform(n: int, p: int, density: float, dtype, seed: int = 0) -> sp.csr_matrix:
    """CSR with about ``density`` · p random entries per row, values in (0, 1)."""
    rng = np.random.default_rng(seed)
    per_row = max(1, int(round(p * density)))
    cols = np.sort(rng.integers(0, p, size=(n, per_row)), axis=1)
    data = rng.random(n * per_row, dtype=np.dtype(dtype).type) + np.dtype(dtype).type(1e-3)
    indptr = np.arange(0, n * per_row + 1, per_row)
    X = sp.csr_matrix((data, cols.ravel(), indptr), shape=(n, p))
    X.sum_duplicates()
    return X


def start(shape, r: int, mean: float, dtype, seed: int = 1):
    rng = np.random.default_rng(seed)
    scale = np.sqrt(mean / r)
    n, p = shape
    W0 = (scale * (0.5 + rng.random((n, r)))).astype(dtype)
    H0 = (scale * (0.5 + rng.random((r, p)))).astype(dtype)
    return W0, H0


def mean_of(V) -> float:
    return float(V.sum(dtype=np.float64) / (V.shape[0] * V.shape[1]))


# ---------------------------------------------------------------------------
# Timers


def timed(fn) -> float:
    tick = time.perf_counter()
    fn()
    return time.perf_counter() - tick


def sk_fit(V, W0, H0, solver: str, iters: int, beta_loss="frobenius"):
    model = SkNMF(W0.shape[1], solver=solver, beta_loss=beta_loss, init="custom", max_iter=iters, tol=0)
    model.fit_transform(V, W=W0.copy(), H=H0.copy())
    return model


def dnmf_fit(V, W0, H0, solver: str, iters: int, beta_loss="frobenius", **kw):
    model = dnmf.NMF(W0.shape[1], solver=solver, beta_loss=beta_loss, init="custom", max_iter=iters, tol=0, tol_x=0, **kw)
    model.fit(V, W=W0, H=H0)
    return model


def floor_seconds(V, W, H, repeats: int = 5) -> float:
    """One V @ Hᵀ plus one Wᵀ @ V with numpy's default BLAS threads (median)."""
    times = []
    for _ in range(repeats):
        if sp.issparse(V):
            times.append(timed(lambda: (V @ H.T, (V.T @ W).T)))
        else:
            times.append(timed(lambda: (V @ H.T, W.T @ V)))
    return median(times)


def steady_state(methods: dict, lo: int, hi: int, repeats: int) -> dict:
    """Median over interleaved repeats of (t(hi) - t(lo)) / (hi - lo) for each method, after one
    warm-up run of each (the first touches of fresh memory are slow on these machines)."""
    per = {name: [] for name in methods}
    for run in methods.values():
        run(lo)
    for _ in range(repeats):
        for name, run in methods.items():
            t_lo = timed(lambda: run(lo))
            t_hi = timed(lambda: run(hi))
            per[name].append((t_hi - t_lo) / (hi - lo))
    return {name: median(values) for name, values in per.items()} | {
        f"{name}_all": values for name, values in per.items()
    }


# ---------------------------------------------------------------------------
# Cases


def case_dense(n, p, r, dtype, lo, hi, repeats, solvers=("mu", "hals", "bpp")):
    V = dense_uniform(n, p, dtype)
    W0, H0 = start(V.shape, r, mean_of(V), dtype)
    methods = {
        "sklearn_mu": lambda k: sk_fit(V, W0, H0, "mu", k),
        "sklearn_cd": lambda k: sk_fit(V, W0, H0, "cd", k),
    }
    for solver in solvers:
        methods[f"dnmf_{solver}"] = lambda k, s=solver: dnmf_fit(V, W0, H0, s, k)
    methods["dnmf_hals_plain"] = lambda k: dnmf_fit(V, W0, H0, "hals", k, inner_sweeps=1)
    out = steady_state(methods, lo, hi, repeats)
    out["floor"] = floor_seconds(V, W0, H0)
    return out


def case_kl(n, p, r, dtype, lo, hi, repeats):
    V = dense_uniform(n, p, dtype)
    W0, H0 = start(V.shape, r, mean_of(V), dtype)
    methods = {
        "sklearn_kl": lambda k: sk_fit(V, W0, H0, "mu", k, "kullback-leibler"),
        "dnmf_kl": lambda k: dnmf_fit(V, W0, H0, "mu", k, "kullback-leibler"),
        # The objective every 10th iteration, scikit-learn's interval for its tol check (it
        # evaluates none with tol=0 before the end).
        "dnmf_kl_every10": lambda k: dnmf_fit(V, W0, H0, "mu", k, "kullback-leibler", objective_every=10),
    }
    out = steady_state(methods, lo, hi, repeats)
    out["floor"] = floor_seconds(V, W0, H0)
    return out


def case_sparse(n, p, density, r, dtype, lo, hi, repeats):
    V = sparse_uniform(n, p, density, dtype)
    W0, H0 = start(V.shape, r, float(V.sum(dtype=np.float64)) / (n * p), dtype)
    methods = {
        "sklearn_mu": lambda k: sk_fit(V, W0, H0, "mu", k),
        "dnmf_mu": lambda k: dnmf_fit(V, W0, H0, "mu", k),
        "dnmf_hals": lambda k: dnmf_fit(V, W0, H0, "hals", k),
    }
    out = steady_state(methods, lo, hi, repeats)
    out["floor"] = floor_seconds(V, W0, H0, repeats=3)
    out["nnz"] = int(V.nnz)
    return out


def case_convergence(n, p, r, dtype, sk_iters, max_iter, solvers=("hals", "bpp")):
    """Time and passes over V for dnmf to reach scikit-learn cd's loss after ``sk_iters``."""
    V = dense_planted(n, p, r, dtype)
    W0, H0 = start(V.shape, r, mean_of(V), dtype)
    tick = time.perf_counter()
    sk = sk_fit(V, W0, H0, "cd", sk_iters)
    out = {"sklearn_cd_seconds": time.perf_counter() - tick, "sklearn_cd_passes": 2 * sk_iters + 1}
    target = float(sk.reconstruction_err_)
    out["target_error"] = target
    out["relative_target"] = target / float(np.linalg.norm(V))
    for solver in solvers:
        reached = []

        def stop(record, reached=reached):
            if np.sqrt(2.0 * max(record.objective, 0.0)) <= target:
                reached.append(record.iteration)
                return True
            return False

        tick = time.perf_counter()
        model = dnmf.NMF(r, solver=solver, init="custom", max_iter=max_iter, tol=0, tol_x=0, callbacks=[stop])
        model.fit(V, W=W0, H=H0)
        seconds = time.perf_counter() - tick
        # passes: the validation scan, the start's pass, then one per iteration
        out[f"dnmf_{solver}_seconds"] = seconds if reached else float("inf")
        out[f"dnmf_{solver}_passes"] = (2 + reached[0]) if reached else float("inf")
        out[f"dnmf_{solver}_iterations"] = reached[0] if reached else None
    return out


def case_cluster(n, p, r, dtype, lo, hi, repeats):
    """Threaded scheduler (V in this process) vs a 2-worker LocalCluster (V in the workers)."""
    from dnmf.cluster import connect

    V = dense_uniform(n, p, dtype)
    W0, H0 = start(V.shape, r, mean_of(V), dtype)
    out = {"floor": floor_seconds(V, W0, H0)}
    out.update(steady_state({"threaded_mu": lambda k: dnmf_fit(V, W0, H0, "mu", k),
                             "threaded_hals": lambda k: dnmf_fit(V, W0, H0, "hals", k)}, lo, hi, repeats))
    with connect("local", n_workers=2, threads_per_worker=1) as client:  # dnmf's own LocalCluster
        rows = auto_row_block(n, p, np.dtype(dtype).itemsize, parallelism=2)
        X = da.random.default_rng(0).random((n, p), chunks=(rows, p), dtype=dtype)
        X = client.persist(X)
        from distributed import wait

        wait(X)
        out.update(steady_state({"cluster_mu": lambda k: dnmf_fit(X, W0, H0, "mu", k),
                                 "cluster_hals": lambda k: dnmf_fit(X, W0, H0, "hals", k)}, lo, hi, repeats))
    return out


def case_wide(n, p, r, dtype, lo, hi, repeats, column_chunks):
    """A wide V: the 2-D grid (W by row blocks, H by column blocks) vs row blocks holding all
    columns, MU, threaded scheduler."""
    V = dense_uniform(n, p, dtype)
    W0, H0 = start(V.shape, r, mean_of(V), dtype)
    out = {"floor": floor_seconds(V, W0, H0)}
    out.update(steady_state({
        "rows_mu": lambda k: dnmf_fit(V, W0, H0, "mu", k, column_chunks=None),
        "grid_mu": lambda k: dnmf_fit(V, W0, H0, "mu", k, column_chunks=column_chunks),
    }, lo, hi, repeats))
    return out


def _first_corner(block):
    return block[:1, :1]


def read_once_seconds(path: str) -> float:
    arr = da.from_zarr(path)
    corners = arr.map_blocks(_first_corner, chunks=(tuple(1 for _ in arr.chunks[0]), (1,)), dtype=arr.dtype)
    return timed(lambda: corners.compute())


def case_out_of_core(n, p, r, dtype, lo, hi, repeats):
    import zarr

    V = dense_uniform(n, p, dtype)
    W0, H0 = start(V.shape, r, mean_of(V), dtype)
    rows = auto_row_block(n, p, np.dtype(dtype).itemsize)
    out = {}
    with tempfile.TemporaryDirectory(dir=str(Path(__file__).resolve().parent)) as tmp:
        path = str(Path(tmp) / "v.zarr")
        z = zarr.create_array(path, shape=V.shape, chunks=(rows, p), dtype=V.dtype, compressors=default_compressors())
        z[:] = V
        del V, z
        read_once_seconds(path)  # warm the page cache: both sides then read from memory
        out["read_once"] = median(read_once_seconds(path) for _ in range(max(3, repeats)))
        out.update(steady_state({"zarr_mu": lambda k: dnmf_fit(path, W0, H0, "mu", k),
                                 "zarr_hals": lambda k: dnmf_fit(path, W0, H0, "hals", k)}, lo, hi, repeats))
    return out


def write_sparse_store(path: str, V: sp.csr_matrix, rows: int = 65536) -> None:
    """V as a dnmf sparse store (AnnData's CSR encoding), as dnmf convert writes it."""
    from dnmf.data.ondisk import CSRWriter, create_csr_store

    writer = CSRWriter(create_csr_store(path, V.shape, V.dtype))
    for start in range(0, V.shape[0], rows):
        writer.append(V[start : start + rows])
    writer.close()


def _block_nnz(block):
    return np.array([[block.nnz]])


def read_sparse_once_seconds(path: str) -> float:
    """One pass reading every row block of a sparse store (as a fit's tasks read them)."""
    data = dnmf.open_matrix(path).data
    counts = data.map_blocks(_block_nnz, chunks=(tuple(1 for _ in data.chunks[0]), (1,)), dtype=np.int64,
                             meta=np.empty((0, 0), np.int64))
    return timed(lambda: counts.compute())


def case_sparse_out_of_core(n, p, density, r, dtype, lo, hi, repeats):
    """Sparse V streamed from a sparse store (cache=False) vs the same CSR in memory, vs
    reading the store once, vs scikit-learn on the CSR; dask's threaded scheduler."""
    V = sparse_uniform(n, p, density, dtype)
    W0, H0 = start(V.shape, r, float(V.sum(dtype=np.float64)) / (n * p), dtype)
    out = {"nnz": int(V.nnz)}
    with tempfile.TemporaryDirectory(dir=str(Path(__file__).resolve().parent)) as tmp:
        path = str(Path(tmp) / "v.zarr")
        write_sparse_store(path, V)
        read_sparse_once_seconds(path)  # warm the page cache
        out["read_once"] = median(read_sparse_once_seconds(path) for _ in range(max(3, repeats)))
        kl = "kullback-leibler"
        out.update(steady_state({
            "disk_kl": lambda k: dnmf_fit(path, W0, H0, "mu", k, kl, cache=False),
            "mem_kl": lambda k: dnmf_fit(V, W0, H0, "mu", k, kl),
            "disk_hals": lambda k: dnmf_fit(path, W0, H0, "hals", k, cache=False),
            "mem_hals": lambda k: dnmf_fit(V, W0, H0, "hals", k),
            "disk_mu": lambda k: dnmf_fit(path, W0, H0, "mu", k, cache=False),
            "disk_hals_plain": lambda k: dnmf_fit(path, W0, H0, "hals", k, cache=False, inner_sweeps=1),
            "sklearn_mu": lambda k: sk_fit(V, W0, H0, "mu", k),
            "sklearn_cd": lambda k: sk_fit(V, W0, H0, "cd", k),
        }, lo, hi, repeats))
    return out


def case_sparse_memory(n, p, density, r, dtype, growth, workers, memory_limit_mib, iters):
    """Peak worker memory of fits streaming a sparse store (cache=False) of n and of
    ``growth`` x n rows (the same rows repeated), MU-KL and HALS, on a fresh LocalCluster of
    ``workers`` one-thread workers per fit (so each peak is that fit's)."""
    from dnmf.cluster import close_client, get_client

    base = sparse_uniform(n, p, density, dtype)
    out = {}
    with tempfile.TemporaryDirectory(dir=str(Path(__file__).resolve().parent)) as tmp:
        for rows in (n, growth * n):
            path = str(Path(tmp) / f"v{rows}.zarr")
            write_sparse_store(path, sp.vstack([base] * (rows // n), format="csr"))
            for name, params in (("kl", dict(beta_loss="kullback-leibler")), ("hals", dict(solver="hals"))):
                client, _ = get_client("local", n_workers=workers, memory_limit=f"{memory_limit_mib}MiB")
                try:
                    with client.as_current():
                        model = dnmf.NMF(r, init="random", random_state=0, max_iter=iters, tol=0, tol_x=0, cache=False,
                                         **params).fit(path)
                    peaks = client.run(lambda dask_worker: max(dask_worker.monitor.quantities["memory"]))
                    logs = client.get_worker_logs()
                finally:
                    close_client(client, True)
                paused = any("Pausing worker" in message for worker_logs in logs.values() for _, message in worker_logs)
                out[f"{name}_{rows}"] = {"peak": max(peaks.values()), "blocks": model.fit_info_["row_blocks"], "paused": paused}
    return out


def case_memory(n, p, r, dtype, who, iters):
    """Peak RSS of this process (bytes): V alone, then a fit by ``who``."""
    V = dense_uniform(n, p, dtype)
    out = {"v_bytes": V.nbytes}
    if who == "sklearn":
        SkNMF(r, solver="mu", max_iter=iters, tol=0).fit(V)
    elif who == "dnmf":
        dnmf.NMF(r, solver="mu", max_iter=iters, tol=0, tol_x=0).fit(V)
    elif who == "dnmf_hals":
        dnmf.NMF(r, solver="hals", max_iter=iters, tol=0, tol_x=0).fit(V)
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def case_small(n, p, r, iters, repeats):
    V = dense_planted(n, p, r, np.float64, seed=3)
    methods = {
        "sklearn_mu": lambda: SkNMF(r, solver="mu", max_iter=iters, tol=0, random_state=0).fit(V),
        "dnmf_mu": lambda: dnmf.NMF(r, solver="mu", max_iter=iters, tol=0, tol_x=0, random_state=0).fit(V),
        "sklearn_cd": lambda: SkNMF(r, solver="cd", max_iter=iters, tol=0, random_state=0).fit(V),
        "dnmf_hals": lambda: dnmf.NMF(r, solver="hals", max_iter=iters, tol=0, tol_x=0, random_state=0, inner_sweeps=1).fit(V),
        "dnmf_mu_graph": lambda: dnmf.NMF(r, solver="mu", max_iter=iters, tol=0, tol_x=0, random_state=0, local=False).fit(V),
    }
    per = {name: [] for name in methods}
    for _ in range(repeats):
        for name, run in methods.items():
            per[name].append(timed(run))
    return {name: median(v) for name, v in per.items()}


def case_fused(n, p, r, replicates, dtype, iters, out_of_core=False):
    """R fits of rank r from R seeds: fused (one pass over V per iteration for all) against the
    same fits one by one; their results are checked bitwise equal."""
    import zarr
    from dataclasses import replace as _replace

    from dnmf.run.fused import fit_fused
    from dnmf.run.pipeline import fit
    from dnmf.settings import FitSettings

    V = dense_planted(n, p, r, dtype)
    # Out of core: V streamed from its store every pass (not cached in memory).
    base = FitSettings.from_params(n_components=r, solver="mu", init="random", max_iter=iters, tol=0, tol_x=0,
                                   cache=False if out_of_core else "auto")
    runs = [_replace(base, seed=s) for s in range(replicates)]
    out = {}
    with tempfile.TemporaryDirectory(dir=str(Path(__file__).resolve().parent)) as tmp:
        X = V
        if out_of_core:
            X = str(Path(tmp) / "v.zarr")
            rows = auto_row_block(n, p, np.dtype(dtype).itemsize)
            z = zarr.create_array(X, shape=V.shape, chunks=(rows, p), dtype=V.dtype, compressors=default_compressors())
            z[:] = V
            del z
        keep = lambda fact: fact.H  # noqa: E731
        t = time.perf_counter()
        fused = fit_fused(X, runs, summarize=keep)
        out["fused"] = time.perf_counter() - t
        t = time.perf_counter()
        alone = [fit(X, s).H for s in runs]
        out["alone"] = time.perf_counter() - t
    out["passes"] = fused.n_passes
    out["fit_passes"] = fused.n_fit_passes
    out["bitwise"] = all(a.tobytes() == b.tobytes() for a, b in zip(fused.results, alone))
    return out


CASES = {
    "fused": case_fused,
    "dense": case_dense,
    "kl": case_kl,
    "sparse": case_sparse,
    "sparse_out_of_core": case_sparse_out_of_core,
    "sparse_memory": case_sparse_memory,
    "convergence": case_convergence,
    "cluster": case_cluster,
    "out_of_core": case_out_of_core,
    "memory": case_memory,
    "small": case_small,
    "wide": case_wide,
}


def main() -> None:
    case, params = sys.argv[1], json.loads(sys.argv[2])
    if "threads" in params:
        threads = params.pop("threads")
        dask.config.set(num_workers=threads)
        with threadpool_limits(limits=threads):
            result = CASES[case](**params)
    else:
        result = CASES[case](**params)
    print("RESULT " + json.dumps(result, default=float))


if __name__ == "__main__":
    main()
