"""Scale-out: dask.distributed clusters, V larger than worker memory, lost workers, Slurm."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np
import pytest
import zarr

from conftest import worker_killer
from dnmf import NMF
from dnmf.solvers import rows as solvers
from dnmf.cluster import close_client, connect, get_client, trim_freed_memory_on
from dnmf.errors import ParameterError
from dnmf.run.plan import V_CACHED, V_IN_MEMORY, V_STREAMED, apply_cache, block_bytes_for_workers, plan_cache
from dnmf.data.store import open_matrix

REPO = Path(__file__).resolve().parents[1]
MiB = 2**20


def local_cluster(n_workers: int, memory_limit: str = "1GiB"):
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=n_workers, threads_per_worker=1, memory_limit=memory_limit, host="127.0.0.1",
        dashboard_address=None, processes=True,
    )
    return Client(cluster)


@pytest.fixture(scope="module")
def client():
    c = local_cluster(2)
    yield c
    close_client(c, True)


def scheduler_tasks(client) -> int:
    return client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))


def small_matrix(n=3000, p=200, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((n, 6)) @ rng.random((6, p)) + 0.1 * rng.random((n, p))).astype(np.float64)


def fit(V, client=None, **params):
    settings = dict(init="random", random_state=0, max_iter=8, tol=0, tol_x=0, chunks=250)
    settings.update(params)
    model = NMF(5, **settings)
    W = model.fit_transform(V)
    W = W if isinstance(W, np.ndarray) else W.compute()
    return model, W


# ---------------------------------------------------------------------------
# get_client


def test_get_client_passes_a_client_through_and_threads_means_none(client):
    assert get_client(client) == (client, False)
    assert get_client("threads") == (None, False)
    with client.as_current():
        assert get_client() == (client, False)


@pytest.mark.parametrize("bad", ["nonsense", 42, "missing-scheduler.json"])
def test_get_client_rejects_unknown_schedulers(bad):
    with pytest.raises(ParameterError, match="scheduler"):
        get_client(bad)


def test_get_client_needs_dask_mpi_for_mpi(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_mpi", None)  # as if it were not installed
    with pytest.raises(ParameterError, match="dask-mpi"):
        get_client("mpi")


def test_get_client_mpi_checks_its_options_and_the_number_of_ranks():
    _skip(_mpi_unavailable_reason())
    with pytest.raises(ParameterError, match="cores"):
        get_client("mpi", job_options={"cores": 8})
    # Without mpirun there is one rank: too few for a scheduler, a client and a worker.
    alone = subprocess.run(
        [sys.executable, "-c", "from dnmf.cluster import get_client; get_client('mpi')"],
        env=recipe_env(**MPI_LOOPBACK_ENV), capture_output=True, text=True, timeout=120,
    )
    assert alone.returncode != 0 and "at least 3 MPI ranks" in alone.stderr, alone.stderr[-2000:]


def test_connect_starts_and_stops_a_local_cluster_and_connects_by_address():
    with connect("local", n_workers=1, memory_limit="512MiB") as client:
        assert len(client.scheduler_info()["workers"]) == 1
        address = client.scheduler.address
        other, owned = get_client(address)
        assert owned and other.scheduler.address == address
        close_client(other, owned)
        assert client.status == "running"  # closing a connected client leaves the cluster up
        # 512 MiB workers: row blocks of 16 MiB rather than 64.
        assert block_bytes_for_workers(client) == 16 * MiB
    assert client.status == "closed"


def test_blas_is_single_threaded_in_the_client_beside_local_workers(client):
    from threadpoolctl import threadpool_info

    from dnmf.cluster import workers_share_this_machine

    assert workers_share_this_machine(client)
    seen = []
    blas_threads = lambda record: seen.append(  # noqa: E731
        max(pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas")
    )
    with client.as_current():
        fit(small_matrix(), max_iter=2, callbacks=[blas_threads])
    assert seen == [1, 1]


def test_scheduler_file(tmp_path, client):
    path = tmp_path / "scheduler.json"
    # What `dask scheduler --scheduler-file` writes, in short. (client.write_scheduler_file
    # dumps the client's cached scheduler info, which fails on tuple-keyed worker metrics
    # once the client has run tasks.)
    path.write_text(json.dumps({"type": "Scheduler", "address": client.scheduler.address}))
    other, owned = get_client(path)
    assert owned and other.scheduler.address == client.scheduler.address
    close_client(other, owned)


# ---------------------------------------------------------------------------
# Same results everywhere


def test_distributed_threaded_cached_streamed_rerooted_are_bitwise_equal(client, tmp_path):
    V = small_matrix()
    path = str(tmp_path / "V.zarr")
    zarr.create_array(store=path, data=V, chunks=(250, V.shape[1]))
    with dask.config.set(scheduler="threads"):
        ref, W_ref = fit(V)
        threaded_zarr, W_tz = fit(path, cache=False)
    assert ref.fit_info_["v_storage"] == V_IN_MEMORY and threaded_zarr.fit_info_["v_storage"] == V_STREAMED
    results = {}
    with client.as_current():
        for label, X, params in [
            ("numpy auto", V, {}),
            ("zarr streamed", path, {"cache": False}),
            ("zarr cached", path, {"cache": True}),
            ("zarr rerooted every 3", path, {"cache": False, "reroot_every": 3, "spill_dir": str(tmp_path / "spill")}),
        ]:
            results[label] = fit(X, **params)
    for label, (model, W) in [("threaded zarr", (threaded_zarr, W_tz)), *results.items()]:
        assert np.array_equal(W, W_ref), label
        assert np.array_equal(model.components_, ref.components_), label
        assert [r["objective"] for r in model.history_] == [r["objective"] for r in ref.history_], label
    assert results["numpy auto"][0].fit_info_["v_storage"] == V_CACHED
    assert results["zarr streamed"][0].cache_used_ is False
    assert results["zarr cached"][0].cache_used_ is True
    assert {r["v_storage"] for r in results["zarr streamed"][0].history_} == {V_STREAMED}
    rerooted = results["zarr rerooted every 3"][0]
    assert rerooted.fit_info_["n_reroots"] == 2  # after iterations 3 and 6
    assert sorted(os.listdir(tmp_path / "spill")) == ["W-000000.zarr", "W-000001.zarr"]


def test_nndsvda_and_hals_are_bitwise_equal_on_a_cluster(client):
    V = small_matrix(2000, 150)
    with dask.config.set(scheduler="threads"):
        ref, W_ref = fit(V, init="nndsvda", solver="hals", max_iter=5)
    with client.as_current():
        model, W = fit(V, init="nndsvda", solver="hals", max_iter=5)
    assert model.fit_info_["scheduler"] == "distributed"
    assert np.array_equal(W, W_ref) and np.array_equal(model.components_, ref.components_)


def test_cache_and_reroot_parameters_are_checked(client):
    V = small_matrix(300, 20)
    with pytest.raises(ParameterError, match="cache"):
        NMF(2, cache="yes").fit(V)
    with client.as_current(), pytest.raises(ParameterError, match="reroot_every"):
        NMF(2, reroot_every=-1).fit(V)


def test_rerooting_keeps_the_schedulers_task_count_bounded(client, tmp_path):
    V = small_matrix(2000, 100)
    counts = {}
    with client.as_current():
        for every in (0, 4):
            seen = []
            fit(V, max_iter=24, reroot_every=every, callbacks=[lambda record, seen=seen: seen.append(scheduler_tasks(client))])
            counts[every] = seen
    without, with_reroot = counts[0], counts[4]
    # Without re-rooting the lineage grows every iteration (about a task per row block) ...
    assert without[-1] - without[3] >= 20 * 6
    # ... with it, the count does not grow: the second half of the fit needs no more tasks
    # than the first (up to transient ones), well below the count without re-rooting.
    half = len(with_reroot) // 2
    assert max(with_reroot[half:]) <= max(with_reroot[:half]) + 16, with_reroot
    assert max(with_reroot) < without[-1] / 2, (with_reroot, without)


def test_a_streamed_zarr_block_is_read_inside_the_task_that_uses_it(tmp_path):
    V = small_matrix(1000, 40)
    path = str(tmp_path / "V.zarr")
    zarr.create_array(store=path, data=V, chunks=(100, 40))
    streamed = open_matrix(path, chunks=200)  # blocks of two store chunks
    reads = streamed.block_inputs()
    graph = dict(streamed.data.__dask_graph__())
    (array_key,) = reads[0].dependencies  # the zarr.Array, a key of its own: never copied in
    assert len(reads) == 5 and all(read.dependencies == {array_key} for read in reads)
    store_array = graph[array_key]
    assert isinstance(store_array, zarr.Array)
    blocks = [read({array_key: store_array}) for read in reads]
    assert all(np.array_equal(block, V[200 * i : 200 * (i + 1)]) for i, block in enumerate(blocks))
    # Blocks held in memory (cached V, or V given as numpy) are passed by key, never copied in.
    with dask.config.set(scheduler="threads"):
        cached = apply_cache(plan_cache(True, streamed, None), streamed)
    assert cached.block_inputs() == [row[0] for row in cached.data.__dask_keys__()]
    in_memory = open_matrix(V, chunks=200)
    assert in_memory.block_inputs() == [row[0] for row in in_memory.data.__dask_keys__()]


def step_results_on_workers(client, settle: float = 0.0) -> int:
    """How many (W_i, partials_i) step results the workers hold; with ``settle``, waiting up to
    that many seconds for them to be freed (W's getitems, which free them, may still be
    running when the step returns)."""

    def is_step_result(value) -> bool:  # not the (H, HHᵀ) of a pass submitted ahead
        return type(value) is tuple and len(value) == 2 and isinstance(value[0], np.ndarray) and hasattr(value[1], "numer")

    deadline = time.monotonic() + settle
    while True:
        held = sum(client.run(lambda dask_worker: sum(map(is_step_result, dask_worker.data.values()))).values())
        if held == 0 or time.monotonic() > deadline:
            return held
        time.sleep(0.02)


def test_step_results_are_kept_only_while_blocks_times_h_is_small(client, tmp_path, monkeypatch):
    V = small_matrix()
    path = str(tmp_path / "V.zarr")
    zarr.create_array(store=path, data=V, chunks=(250, V.shape[1]))
    held = {}
    with client.as_current():
        for label, total in [("small", solvers.SMALL_H_TOTAL_BYTES), ("large", 0)]:
            monkeypatch.setattr(solvers, "SMALL_H_TOTAL_BYTES", total)
            seen = held[label] = []
            settle = 0.0 if label == "small" else 5.0
            held[label, "fit"] = fit(path, cache=False, callbacks=[
                lambda record, seen=seen, settle=settle: seen.append(step_results_on_workers(client, settle))])
    # 12 row blocks: with a small H the workers keep the results of the last steps (W_i with the
    # r x p partials, 12 a step); with a large one, W's blocks, and the results are freed once
    # reduced. The two give the same fit.
    assert min(held["small"]) >= 12 and max(held["large"]) == 0, (held["small"], held["large"])
    (small, W_small), (large, W_large) = held["small", "fit"], held["large", "fit"]
    assert np.array_equal(W_small, W_large) and np.array_equal(small.components_, large.components_)


KEEP = []


def test_workers_near_their_limit_hand_freed_memory_back(monkeypatch):
    import psutil

    import dnmf.cluster

    limit = 256 * MiB
    # An arena per thread, glibc's default: the freed memory then stays until trimmed. With
    # dnmf's two arenas glibc itself gives some of it back when another thread next uses the
    # task thread's arena, sooner or later (37-78 of 100 MiB within a second here). Out of this
    # process's environment too: a nanny copies its workers' variables into it, and keeps them.
    monkeypatch.delitem(dnmf.cluster.WORKER_MALLOC_ENV, "MALLOC_ARENA_MAX")
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)

    def allocate_and_free():
        # 100 MiB in 4 MiB arrays, freed, with small objects allocated in between that stay:
        # with dnmf's glibc thresholds the worker keeps the freed memory.
        arrays, small = [], []
        for _ in range(25):
            arrays.append(np.ones(MiB // 2))
            small.append(bytearray(64 * 1024))
        del arrays
        KEEP.append(small)
        return psutil.Process().memory_info().rss

    def rss_after(seconds: float) -> int:
        time.sleep(seconds)
        return psutil.Process().memory_info().rss

    client, owned = get_client("local", n_workers=1, memory_limit=limit)
    try:
        base = client.submit(rss_after, 0.0, pure=False).result()
        client.submit(allocate_and_free, pure=False).result()
        kept = client.submit(rss_after, 1.0, pure=False).result()
        # The worker holds most of the 100 MiB it freed (measured from its own baseline, which
        # varies with the installed packages).
        assert kept - base > 60 * MiB, (base / MiB, kept / MiB)
        trim_freed_memory_on(client)
        trim_freed_memory_on(client)  # once per cluster: a second registration changes nothing
        trimmed = client.submit(rss_after, 1.0, pure=False).result()
        plugins = client.run(lambda dask_worker: [name for name in dask_worker.plugins if name.startswith("dnmf")])
    finally:
        close_client(client, owned)
    assert trimmed - base < 25 * MiB, (base / MiB, kept / MiB, trimmed / MiB)
    assert list(plugins.values()) == [["dnmf-trim-freed-memory"]]


def test_a_workers_threads_reuse_each_others_freed_memory():
    """dnmf's workers run with two malloc arenas: memory freed by one long-lived thread (Zarr's
    decoders, the comms) is reused by the next instead of staying in an arena of its own."""

    def threads_allocate_in_turn(n_threads: int = 4) -> int:
        import threading

        import psutil

        base = psutil.Process().memory_info().rss
        done = [threading.Event() for _ in range(n_threads)]
        release = threading.Event()

        def work(k: int) -> None:
            if k:
                done[k - 1].wait()
            blocks = [np.ones(MiB // 2) for _ in range(10)]  # 40 MiB, freed at once
            del blocks
            done[k].set()
            release.wait()  # alive, with its arena, until every thread has had its turn

        threads = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
        for thread in threads:
            thread.start()
        done[-1].wait()
        grown = psutil.Process().memory_info().rss - base
        release.set()
        for thread in threads:
            thread.join()
        return grown

    client, owned = get_client("local", n_workers=1, memory_limit=1024 * MiB)
    try:
        grown = client.submit(threads_allocate_in_turn, pure=False).result()
    finally:
        close_client(client, owned)
    # An arena per thread keeps each thread's 40 MiB: ~160 MiB.
    assert grown < 100 * MiB, grown / MiB


# ---------------------------------------------------------------------------
# Lost workers


@pytest.mark.slow
@pytest.mark.parametrize("reroot_every", [0, 2])
def test_a_worker_killed_mid_fit_changes_nothing(tmp_path, reroot_every):
    V = small_matrix(4000, 300)
    path = str(tmp_path / "V.zarr")
    zarr.create_array(store=path, data=V, chunks=(250, V.shape[1]))
    client = local_cluster(3)
    try:
        with client.as_current():
            ref, W_ref = fit(path, max_iter=10, cache=True, reroot_every=reroot_every)
            before = set(client.scheduler_info()["workers"])
            killed = []

            kill_one = worker_killer(client, 4, killed)

            model, W = fit(path, max_iter=10, cache=True, reroot_every=reroot_every, callbacks=[kill_one])
        assert killed and killed[0] not in client.scheduler_info()["workers"]
        assert before != set(client.scheduler_info()["workers"])
        assert model.n_iter_ == 10
        assert np.array_equal(W, W_ref)
        assert np.array_equal(model.components_, ref.components_)
    finally:
        close_client(client, True)


# ---------------------------------------------------------------------------
# V four times larger than the workers' memory


def write_big_zarr(path: str, n: int, p: int, rows_per_chunk: int) -> None:
    """A non-negative float32 Zarr array, written chunk by chunk, uncompressed."""
    arr = zarr.create_array(store=path, shape=(n, p), chunks=(rows_per_chunk, p), dtype="float32", compressors=None)
    rng = np.random.default_rng(7)
    # One random chunk of rank ~4 plus noise, scaled differently in each chunk (cheap to make).
    base = rng.random((rows_per_chunk, 4), dtype=np.float32) @ rng.random((4, p), dtype=np.float32)
    base += rng.random(base.shape, dtype=np.float32) * np.float32(0.1)
    for i, start in enumerate(range(0, n, rows_per_chunk)):
        stop = min(n, start + rows_per_chunk)
        arr[start:stop] = base[: stop - start] * np.float32(1 + (i % 13) / 13)


@pytest.mark.slow
def test_a_zarr_four_times_the_workers_memory_is_factored_out_of_core(tmp_path):
    n, p = 131072, 4096  # 2 GiB of float32; the workers have 2 x 256 MiB
    path = str(tmp_path / "big.zarr")
    write_big_zarr(path, n, p, rows_per_chunk=256)  # 4 MiB chunks
    limit = 256 * MiB
    # 5 iterations: streamed blocks once waited in the workers, and these reached their pause
    # mark and hung by the 4th.
    settings = dict(init="random", random_state=0, max_iter=5, tol=0, tol_x=0)
    client, owned = get_client("local", n_workers=2, memory_limit=f"{limit // MiB}MiB")  # dnmf's own
    try:
        workers_before = set(client.scheduler_info()["workers"])
        with client.as_current():
            model = NMF(4, **settings)
            W_dask = model.fit_transform(path)
            W = W_dask.compute()
        workers_after = set(client.scheduler_info()["workers"])
        peaks = client.run(lambda dask_worker: max(dask_worker.monitor.quantities["memory"]))
        logs = client.get_worker_logs()
    finally:
        close_client(client, True)
    assert 4 * 2 * limit <= n * p * 4
    info = model.fit_info_
    assert info["v_storage"] == V_STREAMED and model.cache_used_ is False
    assert info["max_block_rows"] * p * 4 <= 8 * MiB  # blocks sized for 256 MiB workers
    assert model.n_iter_ == 5
    # No worker restarted, paused or near its limit.
    assert workers_after == workers_before
    # Never paused (80% of the limit) nor restarted (95%): the peak is ~145 MiB here.
    assert max(peaks.values()) < 0.7 * limit, peaks
    messages = " ".join(message for worker_logs in logs.values() for _, message in worker_logs)
    assert "Pausing worker" not in messages and "Restarting worker" not in messages
    print("peak worker memory (MiB):", {k: round(v / MiB) for k, v in peaks.items()})

    # The same fit, V cached in memory, on dask's threaded scheduler in this process.
    with dask.config.set(scheduler="threads"):
        cached = NMF(4, **settings, cache=True, chunks=info["max_block_rows"])
        W_cached = cached.fit_transform(path).compute()
    assert cached.fit_info_["v_storage"] == V_CACHED
    assert np.array_equal(W, W_cached)
    assert np.array_equal(model.components_, cached.components_)


# ---------------------------------------------------------------------------
# Slurm, for real: a one-node cluster on loopback from Debian's packages


# ---------------------------------------------------------------------------
# Recipes run for real on a one-node Slurm cluster on loopback (started once for the module)

SLURM_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
RECIPE_RANK, RECIPE_ITER = 5, 20


def _slurm_unavailable_reason() -> str | None:
    if sys.platform != "linux":
        return "Slurm test needs Linux"
    if os.geteuid() != 0:
        return "Slurm test needs root (to install and start slurmctld, slurmd and munged)"
    if all(shutil.which(cmd) for cmd in ("slurmctld", "slurmd", "sbatch", "munged")):
        return None
    if not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install it"
    return _apt_install(SLURM_PACKAGES)


def _apt_install(packages) -> str | None:
    """Install Debian packages; None when it worked, else why not."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = subprocess.run(
        f"apt-get update -qq && apt-get install -y -qq --no-install-recommends {' '.join(packages)}",
        shell=True, capture_output=True, text=True, env=env, timeout=600,
    )
    if install.returncode != 0:
        return f"could not install {' '.join(packages)} with apt-get: {install.stderr.strip()[-300:]}"
    return None


def _write_slurm_conf(conf_dir: Path, state_dir: Path) -> Path:
    import psutil

    host = socket.gethostname().split(".")[0]
    # At least 4 CPUs, more than a small machine has (config_overrides lets slurmd accept that):
    # the dask-mpi recipe needs 4 tasks on the one node (scheduler, client, 2 workers).
    cpus = max(4, os.cpu_count() or 1)
    memory_mb = int(psutil.virtual_memory().total / MiB * 0.9)
    conf = conf_dir / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=dnmftest",
                f"SlurmctldHost={host}(127.0.0.1)",
                "AuthType=auth/munge",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "SwitchType=switch/none",
                "MpiDefault=none",
                "ReturnToService=2",
                "SlurmdParameters=config_overrides",
                "CommunicationParameters=NoInAddrAny",  # listen on NodeAddr (127.0.0.1), not on all
                "SchedulerType=sched/builtin",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core_Memory",
                "AccountingStorageType=accounting_storage/none",
                "JobAcctGatherType=jobacct_gather/none",
                "JobCompType=jobcomp/none",
                "SlurmUser=root",
                "SlurmdUser=root",
                f"StateSaveLocation={state_dir / 'ctld'}",
                f"SlurmdSpoolDir={state_dir / 'd'}",
                f"SlurmctldPidFile={state_dir / 'slurmctld.pid'}",
                f"SlurmdPidFile={state_dir / 'slurmd.pid'}",
                f"SlurmctldLogFile={state_dir / 'slurmctld.log'}",
                f"SlurmdLogFile={state_dir / 'slurmd.log'}",
                "SlurmctldPort=16817",
                "SlurmdPort=16818",
                f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN",
                f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )
    )
    return conf


def _start(cmd: list[str], env: dict) -> None:
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=60)


def _kill_pidfile(pidfile: Path) -> None:
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        pass


def _wait_for_idle_node(env: dict, timeout: float = 60) -> None:
    """Wait until the node is up and runs no job (a previous test's jobs may still be ending)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        node = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
        jobs = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True)
        if node.stdout.strip() == "idle" and not jobs.stdout.strip():
            return
        time.sleep(0.5)
    pytest.fail(f"the Slurm node is not idle: {node.stdout} {node.stderr} jobs: {jobs.stdout}")


@dataclass(frozen=True)
class RecipeProblem:
    """A Zarr V on disk and the local fit (threaded scheduler) every recipe's job must reproduce."""

    V: np.ndarray
    input_path: Path
    H: np.ndarray
    objective: float


@pytest.fixture(scope="module")
def recipe_problem(tmp_path_factory) -> RecipeProblem:
    root = tmp_path_factory.mktemp("recipe")
    V = small_matrix(2000, 120)
    input_path = root / "V.zarr"
    zarr.create_array(store=str(input_path), data=V, chunks=(250, V.shape[1]))
    with dask.config.set(scheduler="threads"):
        here = NMF(RECIPE_RANK, init="random", random_state=0, max_iter=RECIPE_ITER, tol=0, tol_x=0).fit(
            str(input_path)
        )
    return RecipeProblem(V, input_path, here.components_, here.history_[-1]["objective"])


def recipe_env(**extra: str) -> dict:
    """This environment, with dnmf importable and this Python's bin (mpirun of the mpich wheel) first."""
    return {
        **os.environ,
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        **extra,
    }


def recipe_job_env(problem: RecipeProblem, output: Path, **extra: str) -> dict:
    """The DNMF_* variables the sbatch / qsub recipes read."""
    return recipe_env(
        DNMF_INPUT=str(problem.input_path), DNMF_OUTPUT=str(output), DNMF_RANK=str(RECIPE_RANK),
        DNMF_MAX_ITER=str(RECIPE_ITER), DNMF_PYTHON=sys.executable, DNMF_REPO=str(REPO), **extra,
    )


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict:
    """Start munged, slurmctld and slurmd on 127.0.0.1 once for the module; stop them after.

    Yields this environment with ``SLURM_CONF`` set (and dnmf importable).
    """
    reason = _slurm_unavailable_reason()
    if reason:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm")
    state = root / "state"
    for sub in ("ctld", "d", "munge"):
        (state / sub).mkdir(parents=True)
    conf = _write_slurm_conf(root, state)
    env = recipe_env(SLURM_CONF=str(conf))
    munge_key = state / "munge" / "munge.key"
    munge_key.write_bytes(os.urandom(1024))
    munge_key.chmod(0o400)
    # slurmctld and slurmd talk to munged through its default socket.
    default_socket = Path("/run/munge/munge.socket.2")
    default_socket.parent.mkdir(parents=True, exist_ok=True)
    munge_pid = state / "munge" / "munged.pid"
    started_munge = False
    try:
        if not default_socket.exists():
            _start(
                ["munged", "--force", f"--key-file={munge_key}", f"--socket={default_socket}",
                 f"--pid-file={munge_pid}", f"--seed-file={state / 'munge' / 'seed'}",
                 f"--log-file={state / 'munge' / 'munged.log'}"],
                env,
            )
            started_munge = True
        _start(["slurmctld", "-f", str(conf)], env)
        _start(["slurmd", "-f", str(conf)], env)
        _wait_for_idle_node(env)
        yield env
    finally:
        subprocess.run(["scancel", "--user=root"], env=env, capture_output=True)
        _kill_pidfile(state / "slurmd.pid")
        _kill_pidfile(state / "slurmctld.pid")
        if started_munge:
            _kill_pidfile(munge_pid)


def assert_the_local_fit(output: Path, problem: RecipeProblem, n_workers: int | None = None) -> None:
    """The result group a job wrote holds the factorization this process computed."""
    result = zarr.open_group(str(output), mode="r")
    W, H = result["W"][:], result["H"][:]
    assert W.shape == (problem.V.shape[0], RECIPE_RANK) and H.shape == (RECIPE_RANK, problem.V.shape[1])
    assert result.attrs["n_iter"] == RECIPE_ITER
    assert (W >= 0).all() and (H >= 0).all()
    assert np.array_equal(H, problem.H)
    assert result.attrs["history"][-1]["objective"] == problem.objective
    assert result.attrs["fit_info"]["scheduler"] == "distributed"
    if n_workers is not None:
        assert result.attrs["fit_info"]["n_workers"] == n_workers
    rel_err = np.linalg.norm(problem.V - W @ H) / np.linalg.norm(problem.V)
    assert rel_err < 0.2


def _job_log(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _slurm_logs(env: dict, lines: int = 30) -> str:
    """The last lines of the test Slurm's daemon logs, for a failure's message."""
    state = Path(env["SLURM_CONF"]).parent / "state"
    return "\n".join(f"--- {name}, last {lines} lines\n" + "\n".join(_job_log(state / name).splitlines()[-lines:])
                     for name in ("slurmctld.log", "slurmd.log"))


@pytest.mark.slow
def test_the_slurm_sbatch_recipe_factors_a_zarr_matrix(slurm, recipe_problem, tmp_path):
    _wait_for_idle_node(slurm)
    output = tmp_path / "result.zarr"
    job = subprocess.run(
        ["sbatch", "--wait", "--parsable", f"--output={tmp_path / 'job.out'}", "--cpus-per-task=1",
         "--mem=1500M", str(REPO / "deploy" / "slurm" / "dnmf-single-node.sbatch")],
        env={**slurm, **recipe_job_env(recipe_problem, output)}, capture_output=True, text=True, timeout=300,
        cwd=str(tmp_path),
    )
    assert job.returncode == 0, f"{job.stdout}\n{job.stderr}\n{_job_log(tmp_path / 'job.out')}"
    assert_the_local_fit(output, recipe_problem, n_workers=1)


REQUEUE_ITER = int(os.environ.get("DNMF_TEST_REQUEUE_ITER", "1500"))  # ~70 s of iterations: several 1-minute job runs


@pytest.mark.slow
@pytest.mark.timeout(1000)
def test_the_slurm_recipe_outlives_its_time_limit_by_requeueing_and_ends_bitwise_equal(slurm, recipe_problem, tmp_path):
    """deploy/slurm/dnmf-single-node.sbatch with a 1-minute time limit and a fit that needs
    several: Slurm signals the job (USR1 before the limit, SIGTERM at it), the fit checkpoints
    and exits 75, the script requeues the job, and the last run ends the fit bitwise equal to
    an uninterrupted one."""
    _wait_for_idle_node(slurm)
    output, log = tmp_path / "result.zarr", tmp_path / "job.out"
    with dask.config.set(scheduler="threads"):
        here = NMF(RECIPE_RANK, init="random", random_state=0, max_iter=REQUEUE_ITER, tol=0, tol_x=0).fit(
            str(recipe_problem.input_path)
        )
    env = {**slurm, **recipe_job_env(recipe_problem, output), "DNMF_MAX_ITER": str(REQUEUE_ITER),
           "DNMF_CHECKPOINT_EVERY": "100"}
    submit = subprocess.run(
        ["sbatch", "--parsable", f"--output={log}", "--cpus-per-task=1", "--mem=1500M", "--time=1",
         "--signal=B:USR1@45", str(REPO / "deploy" / "slurm" / "dnmf-single-node.sbatch")],
        env=env, capture_output=True, text=True, timeout=60, cwd=str(tmp_path),
    )
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip().split(";")[0]
    started, state, idle_since = time.monotonic(), "", {}
    while time.monotonic() - started < 900:
        show = subprocess.run(["scontrol", "show", "job", job_id], env=slurm, capture_output=True, text=True)
        state = show.stdout
        if any(f"JobState={s}" in state for s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")):
            break
        if "JobState=PENDING" in state and "Reason=BeginTime" in state:
            # Slurm holds a requeued job back for 2 minutes; the test lets it start sooner, once
            # the node has been idle for 2 s. Not in the second the run before ended: slurmd
            # revokes a job's credential as it ends and refuses a new one created in the same
            # second (it compares whole seconds), which FAILED the run with exit code 1 after
            # 0 s and nothing in its log in 2 of about 15 CI runs that started it on "idle".
            restarts = state.split("Restarts=")[1].split()[0]
            node = subprocess.run(["sinfo", "-h", "-o", "%T"], env=slurm, capture_output=True, text=True)
            if node.stdout.strip() == "idle" and time.time() - idle_since.setdefault(restarts, time.time()) >= 2:
                subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=slurm, capture_output=True)
        time.sleep(2)
    else:
        subprocess.run(["scancel", job_id], env=slurm)
        pytest.fail(f"the job did not end in 15 minutes:\n{state}\n{_job_log(log)[-3000:]}")
    text = _job_log(log)
    print(f"job {job_id}: {time.monotonic() - started:.0f} s; {state.split('Restarts=')[1].split()[0]} requeues")
    print("\n".join(line for line in text.splitlines() if line.startswith("dnmf")))
    summary = " ".join(w for w in state.split() if w.split("=")[0] in ("JobState", "Reason", "Restarts", "RunTime", "ExitCode"))
    assert "JobState=COMPLETED" in state, f"{summary}\n{text[-3000:]}\n{_slurm_logs(slurm)}"
    assert text.count("requeueing job") >= 2 and "Restarts=0 " not in state, text[-3000:]
    result = zarr.open_group(str(output), mode="r")
    assert result.attrs["n_iter"] == REQUEUE_ITER
    assert np.array_equal(result["H"][:], here.components_)
    assert result.attrs["history"][-1]["objective"] == here.history_[-1]["objective"]


@pytest.mark.slow
def test_the_jobqueue_recipe_runs_its_workers_as_slurm_jobs(slurm, recipe_problem, tmp_path):
    """deploy/jobqueue_driver.py: SLURMCluster submits two worker jobs that connect back on lo."""
    _wait_for_idle_node(slurm)
    output = tmp_path / "result.zarr"
    driver = subprocess.run(
        [sys.executable, str(REPO / "deploy" / "jobqueue_driver.py"), str(recipe_problem.input_path), str(output),
         "--rank", str(RECIPE_RANK), "--max-iter", str(RECIPE_ITER), "--system", "slurm", "--jobs", "2",
         "--cores", "1", "--memory", "1GiB", "--walltime", "00:10:00", "--interface", "lo",
         "--dashboard-address", "127.0.0.1:0"],
        env=slurm, capture_output=True, text=True, timeout=240, cwd=str(tmp_path),
    )
    worker_logs = sorted(tmp_path.glob("slurm-*.out"))
    logs = "\n".join(f"--- {p.name}\n{p.read_text()}" for p in worker_logs)
    assert driver.returncode == 0, f"{driver.stdout}\n{driver.stderr[-4000:]}\n{logs}"
    assert_the_local_fit(output, recipe_problem)
    # The driver submitted the two worker jobs (their logs are Slurm's). That the workers of
    # such jobs are what the fit ran on is checked by the connect("slurm") test below, through
    # their SLURM_JOB_IDs; their own log lines were not always flushed before the cancel.
    assert len(worker_logs) == 2, logs


@pytest.mark.slow
def test_connect_slurm_gives_batch_job_workers_dnmfs_worker_settings(slurm, recipe_problem, tmp_path, monkeypatch):
    """dnmf.cluster.connect("slurm"): the workers are Slurm jobs with the LocalCluster's settings."""
    _wait_for_idle_node(slurm)
    for name in ("SLURM_CONF", "PYTHONPATH"):  # sbatch exports this environment to the jobs
        monkeypatch.setenv(name, slurm[name])
    monkeypatch.chdir(tmp_path)  # the worker jobs' slurm-*.out
    job_options = {
        "cores": 1, "processes": 1, "memory": "1GiB", "walltime": "00:10:00", "interface": "lo",
        "scheduler_options": {"dashboard_address": "127.0.0.1:0"},
    }
    with connect("slurm", n_workers=2, job_options=job_options) as client:
        client.wait_for_workers(2, timeout=120)
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        jobs = client.run(lambda: os.environ.get("SLURM_JOB_ID"))
        assert len(set(jobs.values())) == 2 and None not in jobs.values()
        settings = client.run(
            lambda: (
                os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("MALLOC_MMAP_THRESHOLD_"),
                os.environ.get("MALLOC_ARENA_MAX"), dask.config.get("distributed.worker.memory.target"),
                dask.config.get("distributed.worker.memory.spill"),
            )
        )
        assert set(settings.values()) == {(str(2**28), str(2**28), "2", False, False)}
        model = NMF(RECIPE_RANK, init="random", random_state=0, max_iter=RECIPE_ITER, tol=0, tol_x=0)
        model.fit(str(recipe_problem.input_path))
    assert np.array_equal(model.components_, recipe_problem.H)
    assert model.history_[-1]["objective"] == recipe_problem.objective
    assert model.fit_info_["scheduler"] == "distributed" and model.fit_info_["n_workers"] == 2
    assert client.status == "closed"
    _wait_for_idle_node(slurm)  # closing the cluster cancelled the worker jobs


# dask-mpi: the sbatch recipe under srun, the PBS recipe's body under mpirun. MPI's own sockets
# stay on loopback (MPICH's UCX / libfabric, Open MPI's TCP transports).
MPI_LOOPBACK_ENV = {
    "UCX_NET_DEVICES": "lo", "FI_TCP_IFACE": "lo", "FI_SOCKETS_IFACE": "lo",
    "OMPI_MCA_btl_tcp_if_include": "lo", "OMPI_MCA_oob_tcp_if_include": "lo",
}
MPI_RANKS = 4  # scheduler, client, 2 workers


def _mpi_unavailable_reason() -> str | None:
    if sys.platform != "linux":
        return "the MPI tests need Linux"
    for module in ("mpi4py", "dask_mpi"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install dask-mpi mpi4py mpich, as the test extra does)"
    probe = subprocess.run(
        [sys.executable, "-c", "from mpi4py import MPI; print(MPI.Get_library_version())"],
        capture_output=True, text=True, timeout=60, env=recipe_env(),
    )
    if probe.returncode != 0:
        return f"mpi4py finds no working MPI library: {probe.stderr.strip()[-300:]}"
    return None


def _skip(reason: str | None) -> None:
    if reason:
        print(f"SKIP: {reason}")
        pytest.skip(reason)


@pytest.mark.slow
def test_the_dask_mpi_sbatch_recipe_factors_a_zarr_matrix(slurm, recipe_problem, tmp_path):
    """deploy/slurm/dnmf-mpi.sbatch: srun starts 4 ranks, dask-mpi makes them a cluster on lo."""
    _skip(_mpi_unavailable_reason())
    plugins = subprocess.run(["srun", "--mpi=list"], env=slurm, capture_output=True, text=True)
    _skip(None if "pmi2" in plugins.stdout + plugins.stderr else f"Slurm has no pmi2 MPI plugin: {plugins.stdout}")
    _wait_for_idle_node(slurm)
    output = tmp_path / "result.zarr"
    env = {
        **slurm, **recipe_job_env(recipe_problem, output, DNMF_EXTRA_ARGS="--interface lo"), **MPI_LOOPBACK_ENV,
        "SLURM_MPI_TYPE": "pmi2",  # the mpich wheel speaks PMI-2 (PMIx would need libpmix)
    }
    job = subprocess.run(
        ["sbatch", "--wait", "--parsable", f"--output={tmp_path / 'job.out'}", "--nodes=1",
         f"--ntasks={MPI_RANKS}", f"--ntasks-per-node={MPI_RANKS}", "--mem-per-cpu=400M", "--time=00:10:00",
         str(REPO / "deploy" / "slurm" / "dnmf-mpi.sbatch")],
        env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
    )
    log = _job_log(tmp_path / "job.out")
    assert job.returncode == 0, f"{job.stdout}\n{job.stderr}\n{log[-6000:]}"
    # The ranks became a scheduler, this client and MPI_RANKS - 2 workers. (The scheduler's
    # "Scheduler at:" line does not always reach the job's log before srun ends the ranks.)
    assert_the_local_fit(output, recipe_problem, n_workers=MPI_RANKS - 2)


@pytest.mark.slow
def test_the_pbs_qsub_recipes_commands_run_under_mpirun(recipe_problem, tmp_path):
    """deploy/pbs/dnmf-pbs.qsub run by bash (no PBS here) with a PBS_NODEFILE of 4 local slots.

    mpirun listens on all interfaces, so the job runs in a network namespace of its own that
    has only the loopback interface.
    """
    env = _pbs_recipe_env()
    netns = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True)
    _skip(None if netns.returncode == 0 else f"cannot make a network namespace: {netns.stderr.strip()}")
    output = tmp_path / "result.zarr"
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("localhost\n" * MPI_RANKS)
    env = {
        **recipe_job_env(recipe_problem, output, DNMF_EXTRA_ARGS="--interface lo"), **MPI_LOOPBACK_ENV,
        "PBS_NODEFILE": str(nodefile), "PBS_O_WORKDIR": str(tmp_path),
    }
    job = subprocess.run(
        ["unshare", "--net", "bash", "-c", 'ip link set lo up && exec bash "$0"',
         str(REPO / "deploy" / "pbs" / "dnmf-pbs.qsub")],
        env=env, capture_output=True, text=True, timeout=180, cwd=str(tmp_path),
    )
    assert job.returncode == 0, f"{job.stdout[-3000:]}\n{job.stderr[-6000:]}"
    assert_the_local_fit(output, recipe_problem, n_workers=MPI_RANKS - 2)


def _pbs_recipe_env() -> dict:
    """The recipes' environment, skipping (with the reason) where the PBS recipe cannot run:
    it needs MPI, mpirun, and root with unshare and ip for a loopback-only network namespace."""
    _skip(_mpi_unavailable_reason())
    env = recipe_env()
    if shutil.which("mpirun", path=env["PATH"]) is None:
        _skip("no mpirun on PATH (the mpich wheel brings one)")
    if not (shutil.which("unshare") and shutil.which("ip")) or os.geteuid() != 0:
        _skip("the PBS recipe test needs root, unshare and ip for a loopback-only network namespace")
    return env


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_pbs_recipe_stops_before_its_walltime_with_status_75_and_the_rerun_ends_bitwise_equal(
        recipe_problem, tmp_path):
    """deploy/pbs/dnmf-pbs.qsub (by bash under mpirun, as above) with a 25 s walltime: its timer
    sends USR1 to mpirun 10 s before it, the client rank checkpoints and the script exits 75
    (qsub would resubmit it here); the same script again ends the fit bitwise equal."""
    env = _pbs_recipe_env()
    max_iter = 600
    with dask.config.set(scheduler="threads"):
        here = NMF(RECIPE_RANK, init="random", random_state=0, max_iter=max_iter, tol=0, tol_x=0).fit(
            str(recipe_problem.input_path)
        )
    output = tmp_path / "result.zarr"
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("localhost\n" * MPI_RANKS)
    env = {
        **recipe_job_env(recipe_problem, output, DNMF_EXTRA_ARGS="--interface lo"), **MPI_LOOPBACK_ENV,
        "PBS_NODEFILE": str(nodefile), "PBS_O_WORKDIR": str(tmp_path), "DNMF_MAX_ITER": str(max_iter),
    }

    def job(**extra):
        return subprocess.run(
            ["unshare", "--net", "bash", "-c", 'ip link set lo up && exec bash "$0"',
             str(REPO / "deploy" / "pbs" / "dnmf-pbs.qsub")],
            env={**env, **extra}, capture_output=True, text=True, timeout=240, cwd=str(tmp_path),
        )

    first = job(DNMF_WALLTIME_SECONDS="25", DNMF_STOP_MARGIN="10")
    assert first.returncode == 75, f"{first.stdout[-3000:]}\n{first.stderr[-3000:]}"
    saved = json.loads((tmp_path / "result.zarr.checkpoint" / "CURRENT").read_text())["iteration"]
    assert 0 < saved < max_iter and not output.exists()
    second = job()
    assert second.returncode == 0, f"{second.stdout[-3000:]}\n{second.stderr[-3000:]}"
    result = zarr.open_group(str(output), mode="r")
    print(f"PBS recipe stopped by its timer after iteration {saved}, then finished")
    assert result.attrs["n_iter"] == max_iter
    assert np.array_equal(result["H"][:], here.components_)
    assert result.attrs["history"][-1]["objective"] == here.history_[-1]["objective"]


# ---------------------------------------------------------------------------
# Recipes that cannot run here (no PBS server, no Kubernetes, no image registry): checked statically


def test_the_recipes_that_cannot_run_here_parse_and_carry_dnmfs_worker_settings():
    import yaml

    sys.path.insert(0, str(REPO / "deploy"))
    try:
        import fit_zarr
    finally:
        sys.path.remove(str(REPO / "deploy"))
    from dnmf.cluster import WORKER_JOB_ENV

    deploy = REPO / "deploy"
    for script in [*deploy.glob("slurm/*.sbatch"), *deploy.glob("pbs/*.qsub")]:
        check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert check.returncode == 0, f"{script}: {check.stderr}"
    for source in [*deploy.glob("*.py"), *deploy.glob("kubernetes/*.py")]:
        compile(source.read_text(), str(source), "exec")
    # The Kubernetes Job's command is a fit_zarr.py command line that parses.
    (job,) = yaml.safe_load_all((deploy / "kubernetes" / "fit-job.yaml").read_text())
    assert job["kind"] == "Job"
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["python", "deploy/fit_zarr.py"]
    args = fit_zarr.parse_args(command[2:])
    assert args.scheduler == "tcp://dnmf-dask-scheduler:8786" and args.rank == 20
    # The Helm chart's workers, the image and the operator's workers get dnmf's worker settings.
    values = yaml.safe_load((deploy / "kubernetes" / "values.yaml").read_text())
    worker_env = {item["name"]: item.get("value") for item in values["worker"]["env"]}
    assert {name: worker_env.get(name) for name in WORKER_JOB_ENV} == WORKER_JOB_ENV
    dockerfile = (deploy / "Dockerfile").read_text()
    for name, value in WORKER_JOB_ENV.items():
        assert f"{name}={value}" in dockerfile or f'{name}="{value}"' in dockerfile, name
    assert "env=dict(WORKER_JOB_ENV)" in (deploy / "kubernetes" / "operator_driver.py").read_text()


def test_the_recipes_checkpoint_and_requeue_on_the_documented_status():
    """Every batch recipe checkpoints with start-or-resume and reruns itself on exit status 75."""
    import yaml

    from dnmf.run.signals import EXIT_INTERRUPTED

    deploy = REPO / "deploy"
    assert EXIT_INTERRUPTED == 75
    for script in deploy.glob("slurm/*.sbatch"):
        text = script.read_text()
        for needle in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@", "--checkpoint", "scontrol requeue",
                       "trap 'kill -USR1", "INTERRUPTED=75"):
            assert needle in text, f"{script.name}: {needle}"
    pbs = (deploy / "pbs" / "dnmf-pbs.qsub").read_text()
    for needle in ("#PBS -r y", "--checkpoint", "kill -USR1", "INTERRUPTED=75", "qsub -v"):
        assert needle in pbs, needle
    (job,) = yaml.safe_load_all((deploy / "kubernetes" / "fit-job.yaml").read_text())
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onExitCodes": {"containerName": "dnmf", "operator": "In", "values": [75]}} in rules
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["terminationGracePeriodSeconds"] >= 60
    assert any(arg.startswith("--checkpoint=s3://") for arg in pod["containers"][0]["command"])


def test_a_stop_signal_after_the_fit_does_not_fail_the_finished_job(tmp_path):
    """Slurm's USR1 (``--signal=B:USR1@…``) comes at a time of its own: once it came while the
    fit's process shut down after writing its result, which then died of it (status 138) and
    the job FAILED. After main() the stop signals are ignored: nothing is left to stop."""
    V = small_matrix(400, 30)
    source = tmp_path / "V.zarr"
    zarr.create_array(store=str(source), data=V, chunks=(100, 30))
    script = (
        "import os, signal, sys\n"
        f"sys.path.insert(0, {str(REPO / 'deploy')!r})\n"
        "import fit_zarr\n"
        f"status = fit_zarr.main([{str(source)!r}, {str(tmp_path / 'out.zarr')!r}, '--rank', '3', '--max-iter', '5',"
        f" '--checkpoint', {str(tmp_path / 'ckpt.zarr')!r}, '--n-workers', '1'])\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "print('survived', status)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, cwd=str(tmp_path))
    assert run.returncode == 0 and "survived 0" in run.stdout, (run.returncode, run.stdout, run.stderr[-3000:])
    assert zarr.open_group(str(tmp_path / "out.zarr"), mode="r").attrs["n_iter"] == 5
