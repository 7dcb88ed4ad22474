"""Checkpoints on an object store: a real S3 API server (moto's server mode) on 127.0.0.1,
started and stopped by these tests; fits killed mid-write resume from it bitwise."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

pytest.importorskip("moto.server", reason="the object-store tests need moto[server] (pip install 'moto[server]')")
pytest.importorskip("s3fs", reason="the object-store tests need s3fs")

import dnmf  # noqa: E402
from dnmf.errors import LockedError, ParameterError  # noqa: E402
from dnmf.data import folders  # noqa: E402
from dnmf.run import checkpoint  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CHILD = HERE / "checkpoint_child.py"
sys.path.insert(0, str(HERE))
from checkpoint_child import RANK, estimator_kwargs  # noqa: E402
from test_checkpoint import lowrank, same_bits  # noqa: E402

BUCKET = "dnmf-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """An S3 API server on 127.0.0.1 (its own process), the AWS_* variables pointing at it for
    this process and its children, and a bucket. Yields the s3fs file system."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail("the S3 server did not start")
                time.sleep(0.1)
        import s3fs

        from dnmf.data import folders

        # A file system made before these variables (another test module's s3:// path) would
        # otherwise be reused from dnmf's and fsspec's caches, without the credentials.
        folders._filesystem.cache_clear()
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
        fs.mkdir(BUCKET)
        yield fs
    finally:
        server.terminate()
        server.wait(timeout=30)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def prefix(s3, request):
    """A fresh prefix in the bucket for one test."""
    return f"s3://{BUCKET}/{request.node.name.replace('[', '-').replace(']', '')}"


def put_zarr(url: str, V: np.ndarray) -> str:
    import zarr

    z = zarr.create_array(url, shape=V.shape, chunks=(25, V.shape[1]), dtype=V.dtype)
    z[:] = V
    return url


def object_digest(fs, url: str) -> dict:
    return {key: fs.cat_file(key) for key in fs.find(url.split("://", 1)[1])}


def fit(model, X, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        W = model.fit_transform(X, **kw)
    return W.compute() if hasattr(W, "compute") else W


def test_a_fit_checkpoints_to_s3_and_resumes_from_it_bitwise(s3, prefix):
    V = lowrank()
    X = put_zarr(f"{prefix}/V.zarr", V)
    before = object_digest(s3, X)
    kw = estimator_kwargs("mu", "frobenius", 12)
    ref = dnmf.NMF(RANK, **kw)
    W_ref = fit(ref, V)
    ckpt = f"{prefix}/ckpt"
    fit(dnmf.NMF(RANK, **{**kw, "max_iter": 5}, checkpoint=ckpt, resume="auto", checkpoint_every=2), X)
    pointer = json.loads(s3.cat_file(f"{ckpt[5:]}/CURRENT"))
    assert pointer["iteration"] == 5 and checkpoint.load(ckpt).iteration == 5
    assert not s3.exists(f"{ckpt[5:]}.lock")  # released
    model = dnmf.NMF(RANK, **kw, checkpoint=ckpt, resume="auto", checkpoint_every=2)
    W = fit(model, X)
    assert [r["iteration"] for r in model.history_] == list(range(1, 13))
    assert same_bits(W, W_ref) and same_bits(model.components_, ref.components_)
    # Two versions kept (the newest and the previous good one), nothing else.
    assert sorted(folders.listdir(ckpt)) == ["CURRENT", *sorted(n for n in folders.listdir(ckpt) if n.startswith("v")),
                                             "zarr.json"]
    assert len([n for n in folders.listdir(ckpt) if n.startswith("v")]) == 2
    assert object_digest(s3, X) == before  # the input is untouched


def run_child(args: list[str], kill_after: float | None = None) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(CHILD), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    if kill_after is not None and proc.stdout.readline().strip() == "iterating":
        time.sleep(kill_after)
        proc.kill()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, -9), f"child failed ({proc.returncode}):\n{err}"
    return proc.returncode


@pytest.mark.parametrize("death", ["store:13", "fsync:3", "prune:2"])
def test_killed_during_a_checkpoint_write_to_s3_resumes_bitwise(s3, prefix, tmp_path, death):
    """SIGKILL while a version's W is half written ("store"), once a version is written but the
    pointer not yet switched ("fsync"), or after the switch, before the old versions are pruned
    ("prune"): the pointer names a complete version, and the same command ends bitwise equal."""
    V = lowrank()
    X = put_zarr(f"{prefix}/V.zarr", V)
    ckpt = f"{prefix}/ckpt"
    ref = dnmf.NMF(RANK, **estimator_kwargs("mu", "frobenius", 8))
    fit(ref, V)
    args = ["auto", X, ckpt, str(tmp_path), "mu", "frobenius", "8"]
    assert run_child([*args, "--die-in", death]) == -9
    saved = checkpoint.load(ckpt)  # the pointer names a complete, verified version
    pointer = json.loads(s3.cat_file(f"{ckpt[5:]}/CURRENT"))
    assert saved.version == pointer["version"]
    versions = sorted(n for n in folders.listdir(ckpt) if n.startswith("v"))
    if death.startswith(("store", "fsync")):
        assert versions[-1] > saved.version  # the unfinished version is there, and not used
    assert run_child(args) == 0
    W, H = np.load(tmp_path / "W.npy"), np.load(tmp_path / "H.npy")
    assert same_bits(H, ref.components_) and same_bits(W, fit(dnmf.NMF(RANK, **estimator_kwargs("mu", "frobenius", 8)), V))
    assert np.load(tmp_path / "iterations.npy").tolist() == list(range(1, 9))


@pytest.mark.slow
def test_killed_at_random_moments_and_resumed_from_s3_ends_bitwise_equal(s3, prefix, tmp_path):
    V = lowrank(400, 80)
    X = put_zarr(f"{prefix}/V.zarr", V)
    ckpt = f"{prefix}/ckpt"
    ref = dnmf.NMF(RANK, **estimator_kwargs("hals", "frobenius", 40))
    W_ref = fit(ref, V)
    args = ["auto", X, ckpt, str(tmp_path), "hals", "frobenius", "40"]
    outcomes = [run_child(args, kill_after=after) for after in (0.3, 0.7)]
    outcomes.append(run_child(args))
    assert outcomes[-1] == 0
    assert same_bits(np.load(tmp_path / "H.npy"), ref.components_) and same_bits(np.load(tmp_path / "W.npy"), W_ref)


def test_the_s3_lock_refuses_a_live_run_and_takes_over_a_dead_ones(s3, prefix):
    from dnmf.run.locks import ObjectLock, holder_record

    V = lowrank()
    ckpt = f"{prefix}/ckpt"
    lock = f"{ckpt[5:]}.lock"
    s3.pipe_file(lock, json.dumps({**holder_record(), "host": "elsewhere"}).encode())
    with pytest.raises(LockedError, match="host 'elsewhere'.*delete its lock"):
        fit(dnmf.NMF(RANK, **estimator_kwargs("mu", "frobenius", 3), checkpoint=ckpt), V)
    assert not s3.exists(ckpt[5:])  # nothing written
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    s3.pipe_file(lock, json.dumps({**holder_record(), "pid": dead.pid, "process_started": 1.0}).encode())
    fit(dnmf.NMF(RANK, **estimator_kwargs("mu", "frobenius", 3), checkpoint=ckpt), V)  # stale: taken over
    assert checkpoint.load(ckpt).iteration == 3 and not s3.exists(lock)
    with ObjectLock(ckpt, "checkpoint folder"):
        with pytest.raises(LockedError, match="earlier fit in this process"):
            fit(dnmf.NMF(RANK, **estimator_kwargs("mu", "frobenius", 3), checkpoint=ckpt, resume="auto"), V)


def test_objects_dnmf_did_not_write_are_never_deleted(s3, prefix):
    V = lowrank()
    ckpt = f"{prefix}/ckpt"
    s3.pipe_file(f"{ckpt[5:]}/notes.txt", b"mine")
    with pytest.raises(ParameterError, match="notes.txt"):
        fit(dnmf.NMF(RANK, **estimator_kwargs("mu", "frobenius", 3), checkpoint=ckpt, resume="auto"), V)
    assert s3.cat_file(f"{ckpt[5:]}/notes.txt") == b"mine"
    # An object dnmf does not write, slipped into a version: the resume refuses the folder.
    other = f"{prefix}/other"
    fit(dnmf.NMF(RANK, **estimator_kwargs("mu", "frobenius", 4), checkpoint=other, checkpoint_every=1), V)
    first = sorted(n for n in folders.listdir(other) if n.startswith("v"))[0]
    s3.pipe_file(f"{other[5:]}/{first}/W/c/extra.bin", b"mine")
    with pytest.raises(ParameterError, match=f"holds files dnmf did not write \\({first}"):
        fit(dnmf.NMF(RANK, **estimator_kwargs("mu", "frobenius", 6), checkpoint=other, resume="auto",
                     checkpoint_every=1), V)
    assert s3.cat_file(f"{other[5:]}/{first}/W/c/extra.bin") == b"mine"


def test_the_cli_starts_or_resumes_a_checkpoint_on_s3(s3, prefix, tmp_path):
    V = lowrank()
    X = put_zarr(f"{prefix}/V.zarr", V)
    ckpt = f"{prefix}/ckpt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    common = ["-r", RANK, "--init", "random", "--seed", 0, "--tol", 0, "--tol-x", 0, "--chunks", 25,
              "--scheduler", "threads", "-q", "--checkpoint", ckpt, "--resume", "auto", "--checkpoint-every", 3]
    out = f"{prefix}/result.zarr"
    s3.pipe_file(f"{prefix[5:]}/mine.zarr/zarr.json", b'{"zarr_format": 3, "node_type": "group"}')

    def dnmf_fit(max_iter, out, *extra):
        return subprocess.run([sys.executable, "-m", "dnmf", "fit", X, "-o", out, "--max-iter", str(max_iter),
                               *map(str, common), *extra], env=env, capture_output=True, text=True, timeout=120)

    first = dnmf_fit(5, out)
    assert first.returncode == 0, first.stderr
    assert dnmf.results.load_result(out).n_iter == 5
    again = dnmf_fit(11, out)  # the result exists: refused before any work
    assert again.returncode == 1 and "already exists" in again.stderr and checkpoint.load(ckpt).iteration == 5
    again = dnmf_fit(11, out, "--overwrite")  # resumes at 5, replaces dnmf's own result
    assert again.returncode == 0, again.stderr
    refused = dnmf_fit(11, f"{prefix}/mine.zarr", "--overwrite")  # not dnmf's: never replaced
    assert refused.returncode == 1 and "not something dnmf wrote" in refused.stderr
    assert s3.exists(f"{prefix[5:]}/mine.zarr/zarr.json")
    ref = dnmf.NMF(RANK, init="random", random_state=0, tol=0, tol_x=0, chunks=25, max_iter=11)
    W_ref = fit(ref, V)
    result = dnmf.results.load_result(out)
    assert result.n_iter == 11 and checkpoint.load(ckpt).iteration == 11
    assert same_bits(result.H, ref.components_) and same_bits(result.W.compute(), W_ref)


def test_a_spill_folder_on_s3_is_locked_and_continues_after_leftovers(s3, prefix):
    """Issue 14, case 4 for object stores: a spill folder given as a URL is locked like a local
    one (a second run sharing it is refused while W still reads its spills), and a run after a
    killed one's leftover spills numbers its own after them and leaves the leftovers alone."""
    from dnmf.cluster import connect

    V = lowrank()
    spill = f"{prefix}/spill"
    s3.pipe_file(f"{spill[5:]}/W-000000.zarr/zarr.json", b"{}")  # a killed run's leftover
    kw = dict(estimator_kwargs("mu", "frobenius", 8), reroot_every=3, local=False)
    ref = dnmf.NMF(RANK, **kw)
    W_ref = fit(ref, V)
    with connect("local", n_workers=2, threads_per_worker=1, memory_limit="1GiB"):
        model = dnmf.NMF(RANK, **kw, spill_dir=spill)
        W = fit(model, V)
        assert same_bits(W, W_ref) and model.fit_info_["n_reroots"] == 2
        assert s3.cat_file(f"{spill[5:]}/W-000000.zarr/zarr.json") == b"{}"
    assert not s3.exists(f"{spill[5:]}.lock")  # released with the spills (W is in memory)
    from dnmf.run.locks import ObjectLock

    other = ObjectLock(spill, "spill folder")  # another run using the folder
    other.acquire()
    try:
        with connect("local", n_workers=1, threads_per_worker=1, memory_limit="1GiB"):
            with pytest.raises(LockedError, match="spill folder"):
                fit(dnmf.NMF(RANK, **kw, spill_dir=spill), V)
    finally:
        other.release()
    assert s3.cat_file(f"{spill[5:]}/W-000000.zarr/zarr.json") == b"{}"
