"""Scale-out: dask.distributed clusters, V larger than worker memory, lost workers, Slurm."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dask
import numpy as np
import pytest
import zarr

from dnmf import NMF
from dnmf.cluster import close_client, connect, get_client
from dnmf.errors import ParameterError
from dnmf.outofcore import V_CACHED, V_IN_MEMORY, V_STREAMED, block_bytes_for_workers

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


def test_get_client_needs_dask_mpi_for_mpi():
    try:
        import dask_mpi  # noqa: F401
    except ImportError:
        with pytest.raises(ParameterError, match="dask-mpi"):
            get_client("mpi")
    else:
        pytest.skip("dask-mpi is installed; joining an MPI allocation needs mpirun")


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
    client.write_scheduler_file(str(path))
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
    # Without re-rooting the lineage grows every iteration (a few tasks per row block) ...
    assert without[-1] - without[3] >= 20 * 8
    # ... with it, the count does not grow: the second half of the fit needs no more tasks
    # than the first (up to transient ones), well below the count without re-rooting.
    half = len(with_reroot) // 2
    assert max(with_reroot[half:]) <= max(with_reroot[:half]) + 16, with_reroot
    assert max(with_reroot) < without[-1] / 2, (with_reroot, without)


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

            def kill_one(record):
                if record.iteration == 4:
                    pids = client.run(os.getpid)
                    victim = sorted(pids)[0]
                    killed.append(victim)
                    os.kill(pids[victim], signal.SIGKILL)
                    deadline = time.time() + 30
                    while victim in client.scheduler_info()["workers"] and time.time() < deadline:
                        time.sleep(0.05)

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
    settings = dict(init="random", random_state=0, max_iter=2, tol=0, tol_x=0)
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
    assert model.n_iter_ == 2
    # No worker restarted, paused or near its limit.
    assert workers_after == workers_before
    # Never paused (80% of the limit) nor restarted (95%): the peak is ~120 MiB here.
    assert max(peaks.values()) < 0.8 * limit, peaks
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


SLURM_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")


def _slurm_unavailable_reason() -> str | None:
    if sys.platform != "linux":
        return "Slurm test needs Linux"
    if os.geteuid() != 0:
        return "Slurm test needs root (to install and start slurmctld, slurmd and munged)"
    if all(shutil.which(cmd) for cmd in ("slurmctld", "slurmd", "sbatch", "munged")):
        return None
    if not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = subprocess.run(
        f"apt-get update -qq && apt-get install -y -qq --no-install-recommends {' '.join(SLURM_PACKAGES)}",
        shell=True, capture_output=True, text=True, env=env, timeout=600,
    )
    if install.returncode != 0:
        return f"could not install Slurm with apt-get: {install.stderr.strip()[-300:]}"
    return None


def _write_slurm_conf(conf_dir: Path, state_dir: Path) -> Path:
    import psutil

    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
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


@pytest.mark.slow
def test_the_slurm_sbatch_recipe_factors_a_zarr_matrix(tmp_path):
    reason = _slurm_unavailable_reason()
    if reason:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    state = tmp_path / "slurm"
    for sub in ("ctld", "d", "munge"):
        (state / sub).mkdir(parents=True)
    conf = _write_slurm_conf(tmp_path, state)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    munge_socket = state / "munge" / "munge.socket"
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
        deadline = time.time() + 60
        while time.time() < deadline:
            state_out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
            if state_out.stdout.strip() in ("idle", "mixed"):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the Slurm node did not come up: {state_out.stdout} {state_out.stderr}")

        V = small_matrix(2000, 120)
        input_path = tmp_path / "V.zarr"
        zarr.create_array(store=str(input_path), data=V, chunks=(250, V.shape[1]))
        output = tmp_path / "result.zarr"
        job_env = {
            **env,
            "DNMF_INPUT": str(input_path),
            "DNMF_OUTPUT": str(output),
            "DNMF_RANK": "5",
            "DNMF_MAX_ITER": "20",
            "DNMF_PYTHON": sys.executable,
            "DNMF_REPO": str(REPO),
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        }
        job = subprocess.run(
            ["sbatch", "--wait", "--parsable", f"--output={tmp_path / 'job.out'}", "--cpus-per-task=1",
             "--mem=1500M", str(REPO / "deploy" / "slurm" / "dnmf-single-node.sbatch")],
            env=job_env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
        )
        job_log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
        assert job.returncode == 0, f"{job.stdout}\n{job.stderr}\n{job_log}"
        result = zarr.open_group(str(output), mode="r")
        W, H = result["W"][:], result["H"][:]
        assert W.shape == (2000, 5) and H.shape == (5, 120)
        assert result.attrs["n_iter"] == 20
        assert (W >= 0).all() and (H >= 0).all()
        # The job's factorization is the one this process computes with the same settings.
        with dask.config.set(scheduler="threads"):
            here = NMF(5, init="random", random_state=0, max_iter=20, tol=0, tol_x=0).fit(str(input_path))
        assert np.array_equal(H, here.components_)
        assert result.attrs["history"][-1]["objective"] == here.history_[-1]["objective"]
        assert result.attrs["fit_info"]["scheduler"] == "distributed"
        rel_err = np.linalg.norm(V - W @ H) / np.linalg.norm(V)
        assert rel_err < 0.2
    finally:
        subprocess.run(["scancel", "--user=root"], env=env, capture_output=True)
        _kill_pidfile(state / "slurmd.pid")
        _kill_pidfile(state / "slurmctld.pid")
        if started_munge:
            _kill_pidfile(munge_pid)
