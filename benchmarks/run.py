"""dnmf's performance benchmark: one table of ratios against the floor and scikit-learn.

    python benchmarks/run.py            # the issue's sizes (20000 x 5000, ...), ≲ 10 minutes
    python benchmarks/run.py --quick    # smaller matrices, ~1-2 minutes
    python benchmarks/run.py --only dense,kl --json out.json

Every case runs in its own child process (``benchmarks/cases.py``) with
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000`` (fresh pages are slow to touch on
these machines), times its competitors side by side, and reports medians of interleaved
repeats. Per-iteration figures are steady state: (t(hi iterations) - t(lo)) / (hi - lo) from
the same start. The floor is one V @ Hᵀ plus one Wᵀ @ V, the faster of numpy's default BLAS
threads and row parts computed at once, one thread per core, measured in the same process.
Each line is printed against its goal from issue 5 (the cluster's, from issue 17).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GB = 1e9

FULL = {
    "dense_f32": ("dense", dict(n=20000, p=5000, r=20, dtype="float32", lo=10, hi=30, repeats=3)),
    "dense_f64": ("dense", dict(n=20000, p=5000, r=20, dtype="float64", lo=10, hi=30, repeats=2)),
    "convergence": ("convergence", dict(n=20000, p=5000, r=20, dtype="float32", sk_iters=200, max_iter=200)),
    "kl": ("kl", dict(n=20000, p=5000, r=20, dtype="float32", lo=5, hi=15, repeats=2)),
    "cluster": ("cluster", dict(n=20000, p=5000, r=20, lo=5, hi=15, repeats=2)),
    "cluster_numpy": ("cluster_numpy", dict(n=20000, p=5000, r=20, dtype="float64", lo=5, hi=15, repeats=2)),
    "out_of_core": ("out_of_core", dict(n=20000, p=5000, r=20, dtype="float32", lo=5, hi=15, repeats=2)),
    "sparse": ("sparse", dict(n=200000, p=20000, density=0.005, r=20, dtype="float32", lo=2, hi=6, repeats=2)),
    "memory": ("memory", dict(n=20000, p=5000, r=20, dtype="float32", iters=10)),
    "memory_sparse": ("memory", dict(n=200000, p=20000, r=10, dtype="float32", iters=5, density=0.02)),
    "sparse_out_of_core": ("sparse_out_of_core", dict(n=200000, p=20000, density=0.02, r=10, dtype="float32", lo=2, hi=5, repeats=3)),
    "sparse_kl": ("sparse_kl", dict(n=200000, p=20000, density=0.02, r=10, dtype="float32", lo=2, hi=6, repeats=5)),
    "sparse_memory": ("sparse_memory", dict(n=50000, p=20000, density=0.01, r=10, dtype="float32", growth=8, workers=2,
                                            memory_limit_mib=512, iters=3)),
    "small": ("small", dict(n=2000, p=500, r=10, iters=200, repeats=5)),
    "wide": ("wide", dict(n=1000, p=200000, r=20, dtype="float32", lo=3, hi=9, repeats=2, column_chunks=20000)),
    "fused": ("fused", dict(n=20000, p=5000, r=10, replicates=20, dtype="float32", iters=20)),
    "fused_out_of_core": ("fused", dict(n=20000, p=5000, r=10, replicates=20, dtype="float32", iters=20, out_of_core=True)),
    "fused_sparse": ("fused", dict(n=200000, p=20000, r=10, replicates=20, dtype="float32", iters=4, density=0.02,
                                   solver="hals")),
}

QUICK = {
    "dense_f32": ("dense", dict(n=6000, p=2000, r=20, dtype="float32", lo=5, hi=25, repeats=3)),
    "dense_f64": ("dense", dict(n=6000, p=2000, r=20, dtype="float64", lo=5, hi=25, repeats=2)),
    "convergence": ("convergence", dict(n=6000, p=2000, r=20, dtype="float32", sk_iters=100, max_iter=100)),
    "kl": ("kl", dict(n=6000, p=2000, r=20, dtype="float32", lo=5, hi=20, repeats=2)),
    "cluster": ("cluster", dict(n=6000, p=2000, r=20, lo=5, hi=15, repeats=2)),
    "cluster_numpy": ("cluster_numpy", dict(n=6000, p=2000, r=20, dtype="float64", lo=5, hi=15, repeats=2)),
    "out_of_core": ("out_of_core", dict(n=6000, p=2000, r=20, dtype="float32", lo=5, hi=15, repeats=2)),
    "sparse": ("sparse", dict(n=40000, p=8000, density=0.005, r=20, dtype="float32", lo=5, hi=20, repeats=2)),
    "memory": ("memory", dict(n=6000, p=2000, r=20, dtype="float32", iters=5)),
    "memory_sparse": ("memory", dict(n=40000, p=8000, r=10, dtype="float32", iters=5, density=0.02)),
    "sparse_out_of_core": ("sparse_out_of_core", dict(n=40000, p=8000, density=0.02, r=10, dtype="float32", lo=2, hi=6, repeats=2)),
    "sparse_kl": ("sparse_kl", dict(n=40000, p=8000, density=0.02, r=10, dtype="float32", lo=2, hi=8, repeats=2)),
    "sparse_memory": ("sparse_memory", dict(n=20000, p=8000, density=0.01, r=10, dtype="float32", growth=8, workers=2,
                                            memory_limit_mib=512, iters=2)),
    "small": ("small", dict(n=2000, p=500, r=10, iters=200, repeats=3)),
    "wide": ("wide", dict(n=500, p=100000, r=20, dtype="float32", lo=3, hi=9, repeats=2, column_chunks=10000)),
    "fused": ("fused", dict(n=6000, p=2000, r=10, replicates=20, dtype="float32", iters=10)),
    "fused_out_of_core": ("fused", dict(n=6000, p=2000, r=10, replicates=20, dtype="float32", iters=10, out_of_core=True)),
    "fused_sparse": ("fused", dict(n=40000, p=8000, r=10, replicates=20, dtype="float32", iters=4, density=0.02,
                                   solver="hals")),
}


# The allocator settings the cases run under (see the module docstring); the memory cases
# also run under glibc's defaults, what users get.
TUNED_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}


def child_env(allocator: str = "tuned") -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if allocator == "tuned":
        env.update(TUNED_MALLOC)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_case(case: str, params: dict, timeout: float, allocator: str = "tuned") -> dict:
    """Run one case in a child process (``allocator``: "tuned" or glibc's "default" settings)
    and return its RESULT dict (or an error)."""
    # cases.py is imported by a `-c` program, not run as the main module: a LocalCluster's
    # workers start by importing the main module of the process that made them, and with
    # cases.py (scikit-learn, scipy, ...) each began at 180 MiB instead of 63 MiB, enough to
    # pause 512 MiB workers before a sparse KL fit's first pass (sparse_memory hung).
    program = f"import sys; sys.path.insert(0, {str(HERE)!r}); import cases; cases.main()"
    cmd = [sys.executable, "-c", program, case, json.dumps(params)]
    tick = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=child_env(allocator), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result["wall_seconds"] = time.perf_counter() - tick
            return result
    return {"error": (proc.stderr or proc.stdout)[-2000:]}


# ---------------------------------------------------------------------------
# Lines of the table


def line(what: str, value, goal: str | None = None, passed: bool | None = None, detail: str = "") -> dict:
    return {"what": what, "value": value, "goal": goal or "", "status": "info" if passed is None else ("PASS" if passed else "FAIL"), "detail": detail}


def ms(seconds: float) -> str:
    return f"{1e3 * seconds:.0f} ms"


def lines_dense(res: dict, label: str) -> list[dict]:
    floor = res["floor"]
    out = [line(f"{label}: floor (V@Hᵀ + Wᵀ@V, best of threads / per core)", ms(floor))]
    for solver, goal in (("mu", 1.15), ("hals", 1.15), ("hals_plain", None), ("bpp", None)):
        t = res[f"dnmf_{solver}"]
        name = {"hals": "HALS (accelerated, auto)", "hals_plain": "HALS (1 sweep)", "mu": "MU", "bpp": "BPP"}[solver]
        ratio = t / floor
        out.append(line(f"{label}: dnmf {name} / floor", f"{ratio:.2f}", f"≤ {goal}" if goal else None,
                        None if goal is None else ratio <= goal, ms(t) + "/iter"))
    out.append(line(f"{label}: dnmf MU / scikit-learn MU", f"{res['dnmf_mu'] / res['sklearn_mu']:.2f}", None, None,
                    f"{ms(res['dnmf_mu'])} vs {ms(res['sklearn_mu'])}"))
    out.append(line(f"{label}: dnmf HALS (1 sweep) / scikit-learn CD", f"{res['dnmf_hals_plain'] / res['sklearn_cd']:.2f}", None, None,
                    f"{ms(res['dnmf_hals_plain'])} vs {ms(res['sklearn_cd'])}"))
    out.append(line(f"{label}: scikit-learn MU / floor", f"{res['sklearn_mu'] / floor:.2f}"))
    return out


def lines_convergence(res: dict) -> list[dict]:
    sk_t, sk_p = res["sklearn_cd_seconds"], res["sklearn_cd_passes"]
    solvers = [k[len("dnmf_"):-len("_seconds")] for k in res if k.startswith("dnmf_") and k.endswith("_seconds")]
    out = [line("to CD's loss: scikit-learn CD, 200 iterations", f"{sk_t:.1f} s", detail=f"{sk_p} passes, rel. error {res['relative_target']:.4f}")]
    for s in solvers:
        out.append(line(f"to CD's loss: dnmf {s} time / CD's", f"{res[f'dnmf_{s}_seconds'] / sk_t:.2f}", detail=f"{res[f'dnmf_{s}_iterations']} iterations"))
    best = min(solvers, key=lambda s: res[f"dnmf_{s}_seconds"])
    t_ratio = res[f"dnmf_{best}_seconds"] / sk_t
    p_ratio = res[f"dnmf_{best}_passes"] / sk_p
    out.append(line(f"to CD's loss: best dnmf ({best}) time / CD's", f"{t_ratio:.2f}", "≤ 0.5", t_ratio <= 0.5))
    out.append(line(f"to CD's loss: best dnmf ({best}) passes over V / CD's", f"{p_ratio:.3f}", "≤ 0.3", p_ratio <= 0.3,
                    f"{res[f'dnmf_{best}_passes']} vs {sk_p}"))
    return out


def lines_kl(res: dict) -> list[dict]:
    ratio = res["dnmf_kl_every10"] / res["sklearn_kl"]
    every = res["dnmf_kl"] / res["sklearn_kl"]
    return [
        line("KL MU: dnmf (objective every 10th iteration) / scikit-learn per iteration", f"{ratio:.2f}", "≤ 0.75",
             ratio <= 0.75, f"{ms(res['dnmf_kl_every10'])} vs {ms(res['sklearn_kl'])}; floor {ms(res['floor'])}"),
        line("KL MU: dnmf (objective every iteration) / scikit-learn per iteration", f"{every:.2f}", None, None,
             f"{ms(res['dnmf_kl'])}"),
    ]


def lines_sparse_kl(res: dict, params: dict) -> list[dict]:
    label = f"sparse KL {params['n']}×{params['p']} CSR, {100 * params['density']:.0f}%, r={params['r']}"
    to_mu = res["dnmf_kl_every10"] / res["dnmf_mu"]
    to_sk = res["dnmf_kl_every10"] / res["sklearn_kl"]
    return [
        line(f"{label}: dnmf KL / dnmf Frobenius MU per iteration", f"{to_mu:.2f}", "≤ 2.0", to_mu <= 2.0,
             f"{ms(res['dnmf_kl_every10'])} vs {ms(res['dnmf_mu'])}/iter, objective every 10th; {res['nnz'] / 1e6:.1f}M nnz"),
        line(f"{label}: dnmf KL / scikit-learn KL per iteration", f"{to_sk:.2f}", "≤ 0.25", to_sk <= 0.25,
             f"scikit-learn {ms(res['sklearn_kl'])}/iter"),
        line(f"{label}: dnmf KL, objective every iteration / Frobenius MU", f"{res['dnmf_kl'] / res['dnmf_mu']:.2f}",
             detail=f"{ms(res['dnmf_kl'])}/iter"),
    ]


CLUSTER_NAMES = {"mu": "MU", "hals": "HALS (accelerated)", "hals_plain": "HALS (1 sweep)", "bpp": "BPP"}


def lines_cluster(res: dict) -> list[dict]:
    """Issue 17's goals: the 2-worker LocalCluster ≤ 1.1× the threaded scheduler and ≤ 1.0×
    PLANC (when it ran; PLANC reads float64 only, so both dtypes are set against its float64)."""
    out = []
    for dtype in res["dtypes"]:
        floor = res[f"{dtype}_floor"]
        out.append(line(f"cluster {dtype}: floor (best of numpy threads, per-core halves)", ms(floor),
                        detail=f"threaded {ms(res[f'{dtype}_floor_threaded'])}, per core {ms(res[f'{dtype}_floor_per_core'])}"))
        for s in res["solvers"]:
            cluster, threaded = res[f"{dtype}_cluster_{s}"], res[f"{dtype}_threaded_{s}"]
            name = f"cluster {dtype} {CLUSTER_NAMES.get(s, s)}"
            ratio = cluster / threaded
            out.append(line(f"{name}: LocalCluster 2×1 / threaded", f"{ratio:.2f}", "≤ 1.1", ratio <= 1.1,
                            f"{ms(cluster)} vs {ms(threaded)}/iter; floor ×{cluster / floor:.2f}"))
            planc = res.get(f"float64_planc_{s}")
            if planc is not None:
                ratio = cluster / planc
                out.append(line(f"{name}: LocalCluster / PLANC 2 ranks", f"{ratio:.2f}", "≤ 1.0", ratio <= 1.0,
                                f"PLANC {ms(planc)}/iter"))
    return out


def lines_cluster_numpy(res: dict) -> list[dict]:
    """A numpy V on the LocalCluster: sent to the workers once, outside the graphs."""
    warned = res["large_graph_warnings"]
    return [
        line("numpy V, LocalCluster: large-graph warnings per fit", warned, "0", warned == 0),
        line("numpy V, LocalCluster: bitwise equal to the threaded fit", res["bitwise"], "True", res["bitwise"]),
        line("numpy V, LocalCluster: seconds to the first iteration", f"{res['cluster_first']:.2f} s", None, None,
             f"threaded {res['threaded_first']:.2f} s"),
        line("numpy V, LocalCluster / threaded scheduler, MU", f"{res['cluster_mu'] / res['threaded_mu']:.2f}", None, None,
             f"{ms(res['cluster_mu'])} vs {ms(res['threaded_mu'])}/iter"),
    ]


def lines_out_of_core(res: dict) -> list[dict]:
    out = [line("out-of-core: read V once from Zarr (Blosc LZ4HC)", ms(res["read_once"]))]
    for s in ("mu", "hals"):
        ratio = res[f"zarr_{s}"] / res["read_once"]
        out.append(line(f"out-of-core: dnmf {s.upper()} per iteration / read once", f"{ratio:.2f}", "≤ 1.3", ratio <= 1.3,
                        f"{ms(res[f'zarr_{s}'])}/iter"))
    return out


def lines_sparse(res: dict, params: dict) -> list[dict]:
    label = f"sparse {params['n']}×{params['p']} CSR, {100 * params['density']:.1f}%"
    ratio = res["dnmf_mu"] / res["sklearn_mu"]
    return [
        line(f"{label}: dnmf MU / scikit-learn MU", f"{ratio:.2f}", "≤ 1.0", ratio <= 1.0,
             f"{ms(res['dnmf_mu'])} vs {ms(res['sklearn_mu'])}/iter, {res['nnz'] / 1e6:.1f}M nnz"),
        line(f"{label}: dnmf HALS / scikit-learn MU", f"{res['dnmf_hals'] / res['sklearn_mu']:.2f}", detail=f"{ms(res['dnmf_hals'])}/iter"),
        line(f"{label}: dnmf MU / floor", f"{res['dnmf_mu'] / res['floor']:.2f}", detail=f"floor {ms(res['floor'])}"),
    ]


def lines_sparse_out_of_core(res: dict, params: dict) -> list[dict]:
    label = f"sparse on disk {params['n']}×{params['p']}, {100 * params['density']:.0f}%, r={params['r']}"
    out = [line(f"{label}: read the sparse store once", ms(res["read_once"]), detail=f"{res['nnz'] / 1e6:.1f}M nnz")]
    for name, disk, mem in (("MU-KL", "disk_kl", "mem_kl"), ("HALS", "disk_hals", "mem_hals")):
        ratio = res[disk] / res[mem]
        out.append(line(f"{label}: dnmf {name} streamed / in-memory CSR", f"{ratio:.2f}", "≤ 1.3", ratio <= 1.3,
                        f"{ms(res[disk])} vs {ms(res[mem])}/iter"))
        ratio = res[disk] / res["read_once"]
        out.append(line(f"{label}: dnmf {name} streamed / read once", f"{ratio:.2f}", "≤ 1.3", ratio <= 1.3))
    out.append(line(f"{label}: read the uncompressed store once (convert --no-compress)", ms(res["raw_read_once"])))
    for name, disk, mem in (("MU-KL", "raw_kl", "mem_kl"), ("HALS", "raw_hals", "mem_hals")):
        out.append(line(f"{label}: dnmf {name} streamed from the uncompressed store / in-memory CSR",
                        f"{res[disk] / res[mem]:.2f}", detail=f"{ms(res[disk])}/iter"))
    if "counts_read_once" in res:  # results of a run before these lines
        out.append(line(f"{label}: read the store of count values once", ms(res["counts_read_once"])))
        out.append(line(f"{label}: dnmf HALS streamed / in-memory CSR, count values",
                        f"{res['counts_disk_hals'] / res['counts_mem_hals']:.2f}",
                        detail=f"{ms(res['counts_disk_hals'])} vs {ms(res['counts_mem_hals'])}/iter"))
    for name, disk, sk in (("MU", "disk_mu", "sklearn_mu"), ("HALS (1 sweep) vs CD", "disk_hals_plain", "sklearn_cd")):
        ratio = res[disk] / res[sk]
        out.append(line(f"{label}: dnmf {name} streamed / scikit-learn on the CSR", f"{ratio:.2f}", "≤ 1.0", ratio <= 1.0,
                        f"{ms(res[disk])} vs {ms(res[sk])}/iter"))
    return out


def lines_sparse_memory(res: dict, params: dict) -> list[dict]:
    n, big = params["n"], params["growth"] * params["n"]
    label = (f"sparse on disk ×{params['p']}, {100 * params['density']:.0f}%, r={params['r']}, "
             f"{params['workers']} workers × {params['memory_limit_mib']} MiB")
    out = []
    for name, what in (("kl", "MU-KL"), ("hals", "HALS")):
        small, large = res[f"{name}_{n}"], res[f"{name}_{big}"]
        ratio = large["peak"] / small["peak"]
        out.append(line(f"{label}: {what} peak worker memory, n = {big} / n = {n}", f"{ratio:.2f}", "≤ 1.2", ratio <= 1.2,
                        f"{small['peak'] / 2**20:.0f} → {large['peak'] / 2**20:.0f} MiB, {small['blocks']} → {large['blocks']} blocks"
                        + (", paused" if small["paused"] or large["paused"] else "")))
    return out


def lines_memory(mem: dict, params: dict) -> list[dict]:
    kind = "dense" if params.get("density") is None else f"CSR {100 * params['density']:.0f}%"
    out = []
    for allocator in ("tuned", "default"):
        v_gb = mem[f"dnmf/{allocator}"]["v_bytes"] / GB
        for who, goal in (("dnmf", 0.3), ("dnmf_hals", 0.3), ("dnmf_kl", 0.3), ("sklearn", None)):
            extra = mem[f"{who}/{allocator}"]["above_v"] / GB
            name = {"dnmf": "dnmf MU", "dnmf_hals": "dnmf HALS", "dnmf_kl": "dnmf KL", "sklearn": "scikit-learn MU"}[who]
            out.append(line(f"peak memory, {kind} {params['n']}×{params['p']}, {allocator} malloc: {name}, above V (V = {v_gb:.2f} GB)",
                            f"{extra:+.2f} GB", f"≤ +{goal} GB" if goal else None, None if goal is None else extra <= goal))
    return out


def lines_small(res: dict) -> list[dict]:
    ratio = res["dnmf_mu"] / res["sklearn_mu"]
    return [
        line("small 2000×500: whole fit, dnmf MU / scikit-learn MU", f"{ratio:.2f}", "≤ 2.0", ratio <= 2.0,
             f"{ms(res['dnmf_mu'])} vs {ms(res['sklearn_mu'])}"),
        line("small 2000×500: whole fit, dnmf HALS / scikit-learn CD", f"{res['dnmf_hals'] / res['sklearn_cd']:.2f}", "≤ 2.0",
             res["dnmf_hals"] / res["sklearn_cd"] <= 2.0, f"{ms(res['dnmf_hals'])} vs {ms(res['sklearn_cd'])}"),
        line("small 2000×500: whole fit, dnmf MU through Dask graphs / scikit-learn", f"{res['dnmf_mu_graph'] / res['sklearn_mu']:.2f}"),
    ]


def lines_wide(res: dict, params: dict) -> list[dict]:
    label = f"wide {params['n']}×{params['p']}"
    grid, rows, floor = res["grid_mu"], res["rows_mu"], res["floor"]
    return [
        line(f"{label}: dnmf MU on a grid of {params['column_chunks']}-column chunks / row blocks", f"{grid / rows:.2f}",
             None, None, f"{ms(grid)} vs {ms(rows)} per iteration"),
        line(f"{label}: dnmf MU on the grid / floor", f"{grid / floor:.2f}", None, None, f"floor {ms(floor)}"),
    ]


def lines_fused(res: dict, params: dict) -> list[dict]:
    where = "out of core (Zarr)" if params.get("out_of_core") else "in memory"
    goal = 0.15 if params.get("out_of_core") else 0.3
    if params.get("density"):  # issue 18's goals are for dense V: the sparse line is information
        where, goal = f"{params['solver'].upper()} sparse {params['density']:.0%} {where}", None
    label = f"{params['replicates']} replicates r={params['r']} {params['n']}×{params['p']} {where}"
    ratio = res["fused"] / res["alone"]
    passes = res["passes"] / res["fit_passes"]
    return [
        line(f"{label}: fused / one by one", f"{ratio:.2f}", goal and f"≤ {goal}", goal and ratio <= goal,
             f"{res['fused']:.1f} s vs {res['alone']:.1f} s (CPU {res['fused_cpu']:.1f} s vs {res['alone_cpu']:.1f} s, "
             f"ratio {res['fused_cpu'] / res['alone_cpu']:.2f}); bitwise equal: {res['bitwise']}"),
        line(f"{label}: passes over V fused / one by one", f"{passes:.3f}", f"≤ {1 / params['replicates']:.3f}",
             passes <= 1 / params["replicates"] + 1e-9, f"{res['passes']} of {res['fit_passes']}"),
    ]


def format_table(rows: list[dict]) -> str:
    head = "| what | measured | goal | status | detail |\n|---|---|---|---|---|"
    body = [f"| {r['what']} | {r['value']} | {r['goal']} | {r['status']} | {r['detail']} |" for r in rows]
    return "\n".join([head, *body])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller matrices, ~1-2 minutes")
    parser.add_argument("--only", default="", help="comma-separated cases: " + ",".join(FULL))
    parser.add_argument("--json", default=str(HERE / "results" / "latest.json"), help="where to write the results")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per case")
    args = parser.parse_args(argv)

    plan = QUICK if args.quick else FULL
    chosen = [c for c in args.only.split(",") if c] or list(plan)
    raw, rows = {}, []
    started = time.perf_counter()
    for key in chosen:
        case, params = plan[key]
        if case == "memory":
            raw[key] = {f"{who}/{allocator}": run_case(case, {**params, "who": who}, args.timeout, allocator)
                        for allocator in ("tuned", "default")
                        for who in ("dnmf", "dnmf_hals", "dnmf_kl", "sklearn")}
            errors = [v["error"] for v in raw[key].values() if "error" in v]
        else:
            raw[key] = run_case(case, params, args.timeout)
            errors = [raw[key]["error"]] if "error" in raw[key] else []
        if errors:
            rows.append(line(f"{key}: ERROR", "", detail=errors[0].strip().splitlines()[-1][:200]))
            print(f"[{key}] error:\n{errors[0]}", file=sys.stderr)
            continue
        res = raw[key]
        if key.startswith("dense"):
            rows += lines_dense(res, f"dense {params['n']}×{params['p']} {params['dtype']}")
        else:
            rows += {"convergence": lines_convergence, "kl": lines_kl, "cluster": lines_cluster,
                     "cluster_numpy": lines_cluster_numpy, "out_of_core": lines_out_of_core,
                     "memory": lambda r: lines_memory(r, params), "memory_sparse": lambda r: lines_memory(r, params),
                     "small": lines_small, "wide": lambda r: lines_wide(r, params),
                     "sparse_out_of_core": lambda r: lines_sparse_out_of_core(r, params),
                     "sparse_kl": lambda r: lines_sparse_kl(r, params),
                     "sparse_memory": lambda r: lines_sparse_memory(r, params),
                     "fused": lambda r: lines_fused(r, params), "fused_out_of_core": lambda r: lines_fused(r, params),
                     "fused_sparse": lambda r: lines_fused(r, params),
                     }.get(key, lambda r: lines_sparse(r, params))(res)
        print(f"[{key}] done in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)

    machine = f"{platform.node()}: {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}"
    table = format_table(rows)
    print(f"\ndnmf benchmark ({'quick' if args.quick else 'full'}), {machine}, r = 20 unless noted\n")
    print(table)
    n_fail = sum(r["status"] == "FAIL" for r in rows)
    print(f"\n{sum(r['status'] == 'PASS' for r in rows)} PASS, {n_fail} FAIL, {time.perf_counter() - started:.0f} s")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"mode": "quick" if args.quick else "full", "machine": machine, "plan": {k: plan[k] for k in chosen},
                               "raw": raw, "rows": rows, "table": table}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
