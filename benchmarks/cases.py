"""One benchmark case per child process: ``python benchmarks/cases.py CASE JSON_PARAMS``.

Each case builds its matrix, times its competitors side by side (interleaved repeats in the
same process, so they see the same machine state) and prints one line ``RESULT {json}``.
Steady-state seconds per iteration come from differencing fits of ``hi`` and ``lo``
iterations from the same start: (t_hi - t_lo) / (hi - lo), which removes the fixed costs
(validation, scan, start, final error). Run through ``benchmarks/run.py``, which sets the
malloc environment variables these machines need for stable timings.
"""

from __future__ import annotations

import gc
import json
import os
import re
import resource
import shutil
import subprocess
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


def _products(V, W, H):
    """The two products of an iteration: V @ Hᵀ and Wᵀ @ V (as (Vᵀ W)ᵀ for sparse V)."""
    if sp.issparse(V):
        return V @ H.T, (V.T @ W).T
    return V @ H.T, W.T @ V


def floor_parts(V, W, H, repeats: int = 5, cores: int | None = None) -> dict:
    """Two ways to compute one V @ Hᵀ plus one Wᵀ @ V, median seconds of each.

    ``threaded``: numpy's own products with its default BLAS threads. ``per_core``: V's rows cut
    in ``cores`` parts whose products run at once, one thread each with one BLAS thread (as
    MPI ranks or dask workers of one thread do; the r×p sums added). At rank 20 the products
    are bound by memory and one multi-threaded GEMM splits them poorly, so the second can be
    the faster; neither is a floor alone.
    """
    from concurrent.futures import ThreadPoolExecutor

    cores = cores or len(os.sched_getaffinity(0))
    bounds = np.linspace(0, V.shape[0], cores + 1).astype(int)
    parts = [(V[a:b], W[a:b]) for a, b in zip(bounds, bounds[1:])]

    def per_core():
        with ThreadPoolExecutor(cores) as pool:
            results = list(pool.map(lambda part: _products(part[0], part[1], H), parts))
        total = results[0][1]
        for _, WtV in results[1:]:
            total = total + WtV
        return total

    threaded = median(timed(lambda: _products(V, W, H)) for _ in range(repeats))
    with threadpool_limits(limits=1):
        per_core()  # the pool's threads start and touch their parts once
        concurrent = median(timed(per_core) for _ in range(repeats))
    return {"threaded": threaded, "per_core": concurrent, "cores": cores}


def floor_seconds(V, W, H, repeats: int = 5) -> float:
    """A lower bound on one iteration: the faster of :func:`floor_parts`'s two ways of
    computing V @ Hᵀ + Wᵀ @ V (median seconds)."""
    parts = floor_parts(V, W, H, repeats)
    return min(parts["threaded"], parts["per_core"])


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


def case_sparse_kl(n, p, density, r, dtype, lo, hi, repeats, sklearn_lo=1, sklearn_hi=2):
    """KL against Frobenius MU on the same in-memory CSR (threaded scheduler), and against
    scikit-learn's KL (its own shorter lo/hi: it takes tens of seconds per iteration)."""
    V = sparse_uniform(n, p, density, dtype)
    W0, H0 = start(V.shape, r, float(V.sum(dtype=np.float64)) / (n * p), dtype)
    out = steady_state({
        "dnmf_mu": lambda k: dnmf_fit(V, W0, H0, "mu", k),
        "dnmf_kl": lambda k: dnmf_fit(V, W0, H0, "mu", k, "kullback-leibler"),
        "dnmf_kl_every10": lambda k: dnmf_fit(V, W0, H0, "mu", k, "kullback-leibler", objective_every=10),
    }, lo, hi, repeats)
    out.update(steady_state({"sklearn_kl": lambda k: sk_fit(V, W0, H0, "mu", k, "kullback-leibler")},
                            sklearn_lo, sklearn_hi, 1))
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


# The solvers of the cluster case: dnmf's keyword arguments, and PLANC's ``-a`` algorithm.
CLUSTER_SOLVERS = {
    "mu": ({"solver": "mu"}, 0),
    "hals": ({"solver": "hals"}, 1),  # accelerated: inner sweeps chosen by dnmf
    "hals_plain": ({"solver": "hals", "inner_sweeps": 1}, 1),
    "bpp": ({"solver": "bpp"}, 2),
}


def planc_command(algorithm: int, path: str, shape: tuple, r: int, iters: int) -> list[str] | None:
    """PLANC's ``dense_distnmf`` on 2 MPI ranks over a 1 × 2 grid, or None when it is not on PATH
    (see benchmarks/PLANC.md). Prefers Open MPI's own launcher (PLANC built against it), and lets
    it run as root where the benchmark does."""
    program = shutil.which("dense_distnmf")
    launcher = shutil.which("mpirun.openmpi") or shutil.which("mpirun")
    if program is None or launcher is None:
        return None
    extra = []
    version = subprocess.run([launcher, "--version"], capture_output=True, text=True).stdout
    if ("Open MPI" in version or "OpenRTE" in version) and os.geteuid() == 0:
        extra = ["--allow-run-as-root", "--oversubscribe"]
    return [launcher, *extra, "-np", "2", program, "-a", str(algorithm), "-i", path,
            "-d", f"{shape[0]} {shape[1]}", "-p", "1 2", "-k", str(r), "-t", str(iters)]


def planc_seconds(command: list[str]) -> float:
    """PLANC's own timing of its iterations ("NMF took … secs."; reading V is not in it)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    return float(re.search(r"NMF took ([0-9.eE+-]+) secs", out).group(1))


def case_cluster(n, p, r, lo, hi, repeats, dtypes=("float64", "float32"), solvers=tuple(CLUSTER_SOLVERS)):
    """dnmf on a 2-worker LocalCluster (1 thread each, V persisted in the workers) against its
    threaded scheduler (V in this process), interleaved, for each solver and dtype; the floor
    (:func:`floor_parts`); and PLANC on 2 MPI ranks when ``dense_distnmf`` is on PATH (float64
    only: PLANC reads doubles). Keys: ``{dtype}_{threaded|cluster|planc}_{solver}``."""
    from dnmf.cluster import connect

    out = {}
    with connect("local", n_workers=2, threads_per_worker=1) as client:  # dnmf's own LocalCluster
        for dtype in dtypes:
            out.update({f"{dtype}_{key}": value for key, value in _cluster_dtype(client, n, p, r, dtype, lo, hi, repeats, solvers).items()})
    out["dtypes"], out["solvers"] = list(dtypes), list(solvers)
    return out


def _cluster_dtype(client, n, p, r, dtype, lo, hi, repeats, solvers) -> dict:
    """:func:`case_cluster` for one dtype (V and its copy in the workers freed on return)."""
    from distributed import wait

    V = dense_uniform(n, p, dtype)
    W0, H0 = start(V.shape, r, mean_of(V), dtype)
    parts = floor_parts(V, W0, H0)
    out = {"floor_threaded": parts["threaded"], "floor_per_core": parts["per_core"],
           "floor": min(parts["threaded"], parts["per_core"])}
    rows = auto_row_block(n, p, np.dtype(dtype).itemsize, parallelism=2)
    X = client.persist(da.from_array(V, chunks=(rows, p)))  # V's values in the workers, by row blocks
    wait(X)

    def threaded(k, kw):
        with dask.config.set(scheduler="threads"):
            return dnmf_fit(V, W0, H0, iters=k, **kw)

    methods = {}
    for s in solvers:
        kw = CLUSTER_SOLVERS[s][0]
        methods[f"threaded_{s}"] = lambda k, kw=kw: threaded(k, kw)
        methods[f"cluster_{s}"] = lambda k, kw=kw: dnmf_fit(X, W0, H0, iters=k, **kw)
    out.update(steady_state(methods, lo, hi, repeats))
    if dtype == "float64" and planc_command(0, "", V.shape, r, 1) is not None:
        with tempfile.TemporaryDirectory() as tmp:
            path = str(Path(tmp) / "V.bin")
            V.T.tofile(path)  # column-major doubles, as PLANC reads them
            for s in solvers:
                algorithm = CLUSTER_SOLVERS[s][1]
                times = [(planc_seconds(planc_command(algorithm, path, V.shape, r, hi))
                          - planc_seconds(planc_command(algorithm, path, V.shape, r, lo))) / (hi - lo)
                         for _ in range(repeats)]
                out[f"planc_{s}"] = median(times)
                out[f"planc_{s}_all"] = times
    return out


def case_cluster_numpy(n, p, r, dtype, lo, hi, repeats):
    """A numpy V fitted on a 2-worker LocalCluster (1 thread each), against the threaded
    scheduler: seconds to the first iteration (V placed on the workers, scanned, the start's
    pass), seconds per iteration, the large-graph warnings of one fit, and whether the two
    results are bitwise equal."""
    from dnmf.cluster import connect

    V = dense_uniform(n, p, dtype)
    W0, H0 = start(V.shape, r, mean_of(V), dtype)

    def first_iteration(**kw) -> float:
        """Seconds from the fit's call to the end of its first iteration."""
        seen = []
        tick = time.perf_counter()
        dnmf_fit(V, W0, H0, "mu", 1, callbacks=[lambda record: seen.append(time.perf_counter() - tick)], **kw)
        return seen[0]

    out = {}
    out.update(steady_state({"threaded_mu": lambda k: dnmf_fit(V, W0, H0, "mu", k)}, lo, hi, repeats))
    out["threaded_first"] = median(first_iteration() for _ in range(repeats))
    threaded = dnmf_fit(V, W0, H0, "mu", lo)
    with connect("local", n_workers=2, threads_per_worker=1):  # dnmf's own LocalCluster
        out.update(steady_state({"cluster_mu": lambda k: dnmf_fit(V, W0, H0, "mu", k)}, lo, hi, repeats))
        out["cluster_first_all"] = [first_iteration() for _ in range(repeats)]
        out["cluster_first"] = median(out["cluster_first_all"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cluster = dnmf_fit(V, W0, H0, "mu", lo)
    out["large_graph_warnings"] = sum("large graph" in str(w.message) or "Large object" in str(w.message) for w in caught)
    out["bitwise"] = bool(np.array_equal(cluster.components_, threaded.components_))
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


def write_sparse_store(path: str, V: sp.csr_matrix, rows: int = 65536, compressed: bool = True) -> None:
    """V as a dnmf sparse store (AnnData's CSR encoding), as dnmf convert writes it (with
    ``compressed=False``: as ``dnmf convert --no-compress`` does)."""
    from dnmf.data.ondisk import CSRWriter, create_csr_store

    writer = CSRWriter(create_csr_store(path, V.shape, V.dtype, compressed=compressed))
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
    reading the store once, vs scikit-learn on the CSR; the same from an uncompressed store
    (``raw_*``), and HALS on the same entries holding counts (``counts_*``: negative binomial
    values, which compress as count data does, where the uniform values barely compress);
    dask's threaded scheduler."""
    V = sparse_uniform(n, p, density, dtype)
    W0, H0 = start(V.shape, r, float(V.sum(dtype=np.float64)) / (n * p), dtype)
    C = V.copy()
    C.data[:] = np.random.default_rng(2).negative_binomial(1, 0.4, size=C.nnz) + 1
    Wc, Hc = start(C.shape, r, float(C.sum(dtype=np.float64)) / (n * p), dtype)
    out = {"nnz": int(V.nnz)}
    with tempfile.TemporaryDirectory(dir=str(Path(__file__).resolve().parent)) as tmp:
        path, raw, counts = (str(Path(tmp) / name) for name in ("v.zarr", "raw.zarr", "counts.zarr"))
        write_sparse_store(path, V)
        write_sparse_store(raw, V, compressed=False)
        write_sparse_store(counts, C)
        for key, where in (("read_once", path), ("raw_read_once", raw), ("counts_read_once", counts)):
            read_sparse_once_seconds(where)  # warm the page cache
            out[key] = median(read_sparse_once_seconds(where) for _ in range(max(3, repeats)))
        kl = "kullback-leibler"
        out.update(steady_state({
            "disk_kl": lambda k: dnmf_fit(path, W0, H0, "mu", k, kl, cache=False),
            "mem_kl": lambda k: dnmf_fit(V, W0, H0, "mu", k, kl),
            "disk_hals": lambda k: dnmf_fit(path, W0, H0, "hals", k, cache=False),
            "mem_hals": lambda k: dnmf_fit(V, W0, H0, "hals", k),
            "disk_mu": lambda k: dnmf_fit(path, W0, H0, "mu", k, cache=False),
            "disk_hals_plain": lambda k: dnmf_fit(path, W0, H0, "hals", k, cache=False, inner_sweeps=1),
            "raw_kl": lambda k: dnmf_fit(raw, W0, H0, "mu", k, kl, cache=False),
            "raw_hals": lambda k: dnmf_fit(raw, W0, H0, "hals", k, cache=False),
            "counts_disk_hals": lambda k: dnmf_fit(counts, Wc, Hc, "hals", k, cache=False),
            "counts_mem_hals": lambda k: dnmf_fit(C, Wc, Hc, "hals", k),
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


def _proc_status(field: str) -> int | None:
    """A ``/proc/self/status`` field in bytes (Linux), None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for row in f:
                if row.startswith(field + ":"):
                    return int(row.split()[1]) * 1024
    except OSError:
        pass
    return None


def case_memory(n, p, r, dtype, who, iters, density=None):
    """Peak memory of a fit by ``who`` above V (bytes): the resident size's peak since V was
    made (its generator's temporaries excluded: the peak is reset then, on Linux), less the
    resident size with V alone."""
    V = dense_uniform(n, p, dtype) if density is None else sparse_uniform(n, p, density, dtype)
    gc.collect()
    out = {"v_bytes": V.nbytes if density is None else V.data.nbytes + V.indices.nbytes + V.indptr.nbytes}
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak resident size (VmHWM)
        base = _proc_status("VmRSS")
    except OSError:
        base = None
    if who == "sklearn":
        SkNMF(r, solver="mu", max_iter=iters, tol=0).fit(V)
    elif who == "dnmf":
        dnmf.NMF(r, solver="mu", max_iter=iters, tol=0, tol_x=0).fit(V)
    elif who == "dnmf_hals":
        dnmf.NMF(r, solver="hals", max_iter=iters, tol=0, tol_x=0).fit(V)
    elif who == "dnmf_kl":
        dnmf.NMF(r, solver="mu", beta_loss="kullback-leibler", max_iter=iters, tol=0, tol_x=0).fit(V)
    peak = _proc_status("VmHWM")
    if base is None or peak is None:  # no /proc: the process's peak, generator included
        out["above_v"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - out["v_bytes"]
    else:
        out["above_v"] = peak - base
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


def case_fused(n, p, r, replicates, dtype, iters, out_of_core=False, density=None, solver="mu"):
    """R fits of rank r from R seeds: fused (one pass over V per iteration for all) against the
    same fits one by one; their results are checked bitwise equal. With ``density``, V is an
    in-memory CSR of that density (the fits' two products with each block then stacked)."""
    import zarr
    from dataclasses import replace as _replace

    from dnmf.run.fused import fit_fused
    from dnmf.run.pipeline import fit
    from dnmf.settings import FitSettings

    V = dense_planted(n, p, r, dtype) if density is None else sparse_uniform(n, p, density, dtype)
    # Out of core: V streamed from its store every pass (not cached in memory).
    base = FitSettings.from_params(n_components=r, solver=solver, init="random", max_iter=iters, tol=0, tol_x=0,
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
        # CPU seconds too: on a shared machine they vary less than the wall clock.
        t, c = time.perf_counter(), time.process_time()
        fused = fit_fused(X, runs, summarize=keep)
        out["fused"], out["fused_cpu"] = time.perf_counter() - t, time.process_time() - c
        t, c = time.perf_counter(), time.process_time()
        alone = [fit(X, s).H for s in runs]
        out["alone"], out["alone_cpu"] = time.perf_counter() - t, time.process_time() - c
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
    "sparse_kl": case_sparse_kl,
    "sparse_memory": case_sparse_memory,
    "convergence": case_convergence,
    "cluster": case_cluster,
    "cluster_numpy": case_cluster_numpy,
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
