"""Checkpoints and resume: SIGKILL at any moment, resume bitwise; refusals; corruption; stopping."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.exceptions import ConvergenceWarning

import dnmf
from dnmf.run import checkpoint
from dnmf.errors import CheckpointMismatchError, ParameterError, StoreError

ROOT = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).resolve().parent / "checkpoint_child.py"
sys.path.insert(0, str(CHILD.parent))
from checkpoint_child import PENALTY_ENV, RANK, estimator_kwargs  # noqa: E402

SOLVERS = [("mu", "frobenius"), ("mu", "kullback-leibler"), ("hals", "frobenius")]


def lowrank(n=200, p=60, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, RANK)) @ rng.random((RANK, p)) + 0.01 * rng.random((n, p))


def write_zarr(path: Path, V: np.ndarray) -> str:
    import zarr

    z = zarr.create_array(str(path), shape=V.shape, chunks=(25, V.shape[1]), dtype=V.dtype)
    z[:] = V
    return str(path)


def tree_digest(path: str) -> str:
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(path)):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            digest.update(full.encode())
            digest.update(Path(full).read_bytes())
    return digest.hexdigest()


def quiet_fit(model, X, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        W = model.fit_transform(X, **kw)
    return W.compute() if hasattr(W, "compute") else W


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ---------------------------------------------------------------------------
# Kill tests


def run_child(args: list[str], kill_after: float | None = None) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    if kill_after is not None:
        if proc.stdout.readline().strip() == "iterating":
            time.sleep(kill_after)
            proc.kill()
    _, err = proc.communicate(timeout=120)
    if proc.returncode not in (0, -9):
        raise AssertionError(f"child failed ({proc.returncode}):\n{err}")
    return proc.returncode


# For each solver: where the first run dies inside a checkpoint write (deterministically),
# then two runs SIGKILLed at random moments, then a run to the end.
IN_WRITE_DEATHS = {
    ("mu", "frobenius"): "store:44",  # half-way through writing W of the 6th version
    ("mu", "kullback-leibler"): "fsync:4",  # 4th version written, not yet synced or pointed to
    ("hals", "frobenius"): "prune:3",  # pointer switched to the 3rd version, old ones not pruned
}


@pytest.mark.slow
@pytest.mark.parametrize("solver,beta_loss", SOLVERS)
def test_killed_and_resumed_fit_is_bitwise_equal(tmp_path, solver, beta_loss):
    kill_and_resume(tmp_path, solver, beta_loss)


@pytest.mark.slow
@pytest.mark.parametrize("solver,beta_loss", [("mu", "kullback-leibler"), ("hals", "frobenius")])
def test_killed_and_resumed_regularized_fit_is_bitwise_equal(tmp_path, monkeypatch, solver, beta_loss):
    monkeypatch.setenv(PENALTY_ENV, "0.002,0.001,0.5")
    kill_and_resume(tmp_path, solver, beta_loss)
    assert estimator_kwargs(solver, beta_loss, 1)["alpha_W"] == 0.002


def kill_and_resume(tmp_path, solver, beta_loss):
    """Kill a fit inside a checkpoint write and at random moments, resume it: W, H and the
    objectives are bitwise those of the uninterrupted fit."""
    max_iter = 40
    V = lowrank()
    v_path = write_zarr(tmp_path / "V.zarr", V)
    v_digest = tree_digest(v_path)
    ref = dnmf.NMF(RANK, **estimator_kwargs(solver, beta_loss, max_iter))
    W_ref = quiet_fit(ref, v_path)

    ckpt, out = str(tmp_path / "ckpt"), tmp_path / "out"
    out.mkdir()
    common = [v_path, ckpt, str(out), solver, beta_loss, str(max_iter)]
    assert run_child(["fit", *common, "--die-in", IN_WRITE_DEATHS[(solver, beta_loss)]]) == -9
    rng = random.Random(f"{solver}-{beta_loss}-kill-times")
    for mode in ("resume-api", "resume-fit"):
        run_child([mode, *common], kill_after=rng.uniform(0.0, 0.4))
    assert run_child(["resume-fit" if solver == "mu" else "resume-api", *common]) == 0

    W, H = np.load(out / "W.npy"), np.load(out / "H.npy")
    assert same_bits(W, W_ref)
    assert same_bits(H, ref.components_)
    iterations = np.load(out / "iterations.npy")
    assert iterations.tolist() == list(range(1, max_iter + 1))
    objectives = np.load(out / "objectives.npy")
    assert same_bits(objectives, np.array([r["objective"] for r in ref.history_]))
    assert tree_digest(v_path) == v_digest  # V was never written
    versions = [name for name in os.listdir(ckpt) if name.startswith("v")]
    assert len(versions) <= 2 and not [name for name in os.listdir(ckpt) if name.endswith(".tmp")]


# ---------------------------------------------------------------------------
# In-process resume, refusals and corruption


@pytest.fixture
def V():
    return lowrank(120, 50, seed=1)


def kwargs(**over):
    base = dict(solver="mu", init="random", random_state=0, tol=0, tol_x=0, chunks=25)
    return {**base, **over}


@pytest.mark.parametrize(
    "layout,settings",
    [
        ("float64", {}),
        ("float32", {"solver": "hals"}),
        ("sparse", {"beta_loss": "kullback-leibler"}),
        ("uneven-chunks", {"chunks": (30, 20, 40, 30)}),
    ],
)
def test_resume_continues_history_bitwise(tmp_path, V, layout, settings):
    X = {"float32": V.astype(np.float32), "sparse": sp.csr_matrix(V * (V > 0.6))}.get(layout, V)
    ckpt = str(tmp_path / "ck")
    ref = dnmf.NMF(RANK, max_iter=12, **kwargs(**settings))
    W_ref = quiet_fit(ref, X)
    first = dnmf.NMF(RANK, max_iter=5, checkpoint=ckpt, checkpoint_every=2, **kwargs(**settings))
    quiet_fit(first, X)
    assert len(first.history_) == 5
    # max_iter and the checkpoint frequency may change
    second = dnmf.NMF(RANK, max_iter=12, checkpoint_every=3, **kwargs(**settings))
    W = quiet_fit(second, X, resume=ckpt)
    assert same_bits(W, W_ref) and same_bits(second.components_, ref.components_)
    assert [r["iteration"] for r in second.history_] == list(range(1, 13))
    assert checkpoint.load(ckpt).iteration == 12
    if layout == "float64":  # resuming into another directory starts it with the resumed state
        elsewhere = str(tmp_path / "elsewhere")
        third = dnmf.NMF(RANK, max_iter=12, checkpoint=elsewhere, **kwargs(**settings))
        quiet_fit(third, X, resume=ckpt)
        assert checkpoint.read_pointer(elsewhere) == {"version": "v000002", "iteration": 12, "stop_reason": "max_iter"}


def test_resume_on_more_threads_keeps_the_checkpoint_blocks(tmp_path, V):
    # Default row blocks follow the thread count; a resume elsewhere keeps the saved blocks.
    import dask

    ckpt = str(tmp_path / "ck")
    settings = kwargs(chunks=None, solver="hals")
    with dask.config.set(num_workers=2):
        ref = dnmf.NMF(RANK, max_iter=8, **settings)
        W_ref = quiet_fit(ref, V)
        quiet_fit(dnmf.NMF(RANK, max_iter=3, checkpoint=ckpt, **settings), V)
    with dask.config.set(num_workers=3):
        assert dnmf.open_matrix(V).row_chunks != checkpoint.load(ckpt).W.chunks[0]
        resumed = dnmf.NMF(RANK, max_iter=8, **settings)
        W = quiet_fit(resumed, V, resume=ckpt)
    assert same_bits(W, W_ref) and same_bits(resumed.components_, ref.components_)


def test_resume_function_with_in_memory_matrix(tmp_path, V):
    ckpt = str(tmp_path / "ck")
    quiet_fit(dnmf.NMF(RANK, max_iter=4, checkpoint=ckpt, **kwargs(solver="hals")), V)
    with pytest.raises(ParameterError, match="in-memory matrix"):
        dnmf.checkpoint.resume(ckpt)
    ref = dnmf.NMF(RANK, max_iter=9, **kwargs(solver="hals"))
    quiet_fit(ref, V)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = dnmf.checkpoint.resume(ckpt, V, max_iter=9)
    assert model.n_iter_ == 9 and same_bits(model.components_, ref.components_)


def test_unseeded_fit_resumes_with_saved_seed(tmp_path, V):
    ckpt = str(tmp_path / "ck")
    first = dnmf.NMF(RANK, max_iter=3, checkpoint=ckpt, **kwargs(random_state=None))
    quiet_fit(first, V)
    second = dnmf.NMF(RANK, max_iter=6, **kwargs(random_state=None))
    quiet_fit(second, V, resume=ckpt)
    assert second.seed_ == first.seed_ and second.n_iter_ == 6


@pytest.mark.parametrize(
    "change,match",
    [
        ({"n_components": RANK + 1}, "n_components"),
        ({"solver": "hals"}, "solver"),
        ({"beta_loss": "kullback-leibler"}, "beta"),
        ({"chunks": 30}, "row chunks"),
        ({"random_state": 5}, "seed"),
        ({"eps": 1e-6}, "eps"),
        ({"matrix": "other"}, "matrix content"),
        ({"matrix": "float32"}, "dtype"),
        ({"matrix": "shape"}, "shape"),
    ],
)
def test_resume_refuses_changes_that_alter_iterates(tmp_path, V, change, match):
    ckpt = str(tmp_path / "ck")
    quiet_fit(dnmf.NMF(RANK, max_iter=3, checkpoint=ckpt, **kwargs()), V)
    change = dict(change)
    X = {None: V, "other": V * 1.001, "float32": V.astype(np.float32), "shape": V[:100]}[change.pop("matrix", None)]
    params = {"n_components": RANK, "max_iter": 6, **kwargs(), **change}
    before = tree_digest(ckpt)
    with pytest.raises(CheckpointMismatchError, match=match):
        quiet_fit(dnmf.NMF(**params), X, resume=ckpt)
    assert tree_digest(ckpt) == before  # a refused resume writes nothing


def test_fresh_fit_never_overwrites(tmp_path, V):
    ckpt = tmp_path / "ck"
    quiet_fit(dnmf.NMF(RANK, max_iter=2, checkpoint=str(ckpt), **kwargs()), V)
    with pytest.raises(ParameterError, match="already holds a checkpoint"):
        quiet_fit(dnmf.NMF(RANK, max_iter=2, checkpoint=str(ckpt), **kwargs()), V)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ParameterError, match="other files"):
        quiet_fit(dnmf.NMF(RANK, max_iter=2, checkpoint=str(tmp_path / "other"), **kwargs()), V)
    with pytest.raises(ParameterError, match="checkpoint_every"):
        quiet_fit(dnmf.NMF(RANK, checkpoint=str(tmp_path / "new"), checkpoint_every=0, **kwargs()), V)


def test_fit_killed_before_its_first_checkpoint_can_start_again(tmp_path, V):
    ckpt = tmp_path / "ck"
    checkpoint._mark(str(ckpt))  # the marked root a fit writes first
    (ckpt / "v000001" / "W").mkdir(parents=True)  # a first version cut short, no pointer yet
    with pytest.raises(StoreError, match="No checkpoint"):
        quiet_fit(dnmf.NMF(RANK, max_iter=2, **kwargs()), V, resume=str(ckpt))
    model = dnmf.NMF(RANK, max_iter=2, checkpoint=str(ckpt), **kwargs())
    quiet_fit(model, V)
    assert checkpoint.load(str(ckpt)).iteration == 2


def test_missing_checkpoint_is_a_store_error(tmp_path, V):
    with pytest.raises(StoreError, match="No checkpoint"):
        quiet_fit(dnmf.NMF(RANK, max_iter=2, **kwargs()), V, resume=str(tmp_path / "none"))


def test_resume_with_a_start_is_refused(tmp_path, V):
    ckpt = str(tmp_path / "ck")
    quiet_fit(dnmf.NMF(RANK, max_iter=2, checkpoint=ckpt, **kwargs()), V)
    W0, H0 = np.ones((V.shape[0], RANK)), np.ones((RANK, V.shape[1]))
    with pytest.raises(ParameterError, match="do not pass W or H"):
        quiet_fit(dnmf.NMF(RANK, max_iter=4, **kwargs(init="custom")), V, resume=ckpt, W=W0, H=H0)


def _w_chunk_files(version_dir: Path) -> list[Path]:
    return sorted(p for p in (version_dir / "W").rglob("*") if p.is_file() and p.name != "zarr.json")


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corrupt_newest_version_falls_back_to_previous(tmp_path, V, damage):
    ckpt = tmp_path / "ck"
    quiet_fit(dnmf.NMF(RANK, max_iter=8, checkpoint=str(ckpt), checkpoint_every=3, **kwargs()), V)
    newest = ckpt / checkpoint.read_pointer(str(ckpt))["version"]
    chunk = _w_chunk_files(newest)[1]
    data = bytearray(chunk.read_bytes())
    if damage == "flip":
        data[len(data) // 2 : len(data) // 2 + 4] = bytes(b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 4])
        chunk.write_bytes(bytes(data))
    elif damage == "truncate":
        chunk.write_bytes(bytes(data[: len(data) // 3]))
    else:
        chunk.unlink()
    with pytest.warns(checkpoint.CheckpointWarning, match=newest.name):
        snapshot = checkpoint.load(str(ckpt))
    assert snapshot.iteration == 6 and snapshot.version != newest.name

    ref = dnmf.NMF(RANK, max_iter=14, **kwargs())
    W_ref = quiet_fit(ref, V)
    listings = {}

    def look(record):
        listings[record.iteration] = sorted(n for n in os.listdir(ckpt) if n.startswith("v"))

    model = dnmf.NMF(RANK, max_iter=14, checkpoint_every=3, callbacks=[look], **kwargs())
    with pytest.warns(checkpoint.CheckpointWarning):
        W = quiet_fit(model, V, resume=str(ckpt))
    assert same_bits(W, W_ref) and same_bits(model.components_, ref.components_)
    assert [r["iteration"] for r in model.history_] == list(range(1, 15))
    # After the first new version (iteration 9) the damaged one is gone and the good one the
    # resume used is kept as the previous version.
    assert newest.name not in listings[9] and snapshot.version in listings[9] and len(listings[9]) == 2
    assert checkpoint.load(str(ckpt)).iteration == 14


def test_no_good_version_is_a_store_error(tmp_path, V):
    ckpt = tmp_path / "ck"
    quiet_fit(dnmf.NMF(RANK, max_iter=4, checkpoint=str(ckpt), checkpoint_every=2, **kwargs()), V)
    for version in ckpt.glob("v*"):
        (version / "H" / "c" / "0" / "0").write_bytes(b"garbage")
    with pytest.raises(StoreError, match="No usable checkpoint"), pytest.warns(checkpoint.CheckpointWarning):
        checkpoint.load(str(ckpt))


def test_schedule_by_iterations_and_seconds(tmp_path, V):
    every = tmp_path / "every"
    quiet_fit(dnmf.NMF(RANK, max_iter=10, checkpoint=str(every), checkpoint_every=4, **kwargs()), V)
    # the start, iterations 4 and 8, and the end: four versions in all
    assert checkpoint.read_pointer(str(every)) == {"version": "v000004", "iteration": 10, "stop_reason": "max_iter"}
    timed = tmp_path / "timed"
    quiet_fit(dnmf.NMF(RANK, max_iter=5, checkpoint=str(timed), checkpoint_every=None, checkpoint_interval=0, **kwargs()), V)
    assert checkpoint.read_pointer(str(timed))["version"] == "v000007"  # start, 5 iterations, end
    never = tmp_path / "never"
    quiet_fit(dnmf.NMF(RANK, max_iter=5, checkpoint=str(never), checkpoint_every=None, checkpoint_interval=1e9, **kwargs()), V)
    assert checkpoint.read_pointer(str(never))["version"] == "v000002"  # start and end only


def test_checkpoint_contents(tmp_path, V):
    import zarr

    ckpt = tmp_path / "ck"
    model = dnmf.NMF(RANK, max_iter=3, checkpoint=str(ckpt), **kwargs())
    W = quiet_fit(model, V)
    group = zarr.open_group(str(ckpt / checkpoint.read_pointer(str(ckpt))["version"]), mode="r")
    record = group.attrs["dnmf_checkpoint"]
    assert same_bits(group["W"][...], W) and same_bits(group["H"][...], model.components_)
    assert group["W"].chunks == (25, RANK)  # chunked like the fit
    assert record["iteration"] == 3 and record["stop_reason"] == "max_iter"
    assert record["settings"]["seed"] == 0 and record["params"]["max_iter"] == 3
    assert record["fingerprint"]["shape"] == [120, 50] and record["fingerprint"]["row_chunks"] == [25] * 4 + [20]
    assert group["history"].shape == (3, 6)


def test_checkpoint_keeps_non_finite_and_numpy_parameters_for_resume(tmp_path, V):
    # A result's attributes store inf as None; a checkpoint keeps it, so a resume gets back
    # tol=inf (None would be refused) and max_time=inf.
    ckpt = str(tmp_path / "ck")
    settings = kwargs(solver="hals", tol=float("inf"), tol_x=0.0, max_time=np.float64("inf"), chunks=(60, 60))
    quiet_fit(dnmf.NMF(np.int64(RANK), max_iter=3, checkpoint=ckpt, **settings), V)
    params = checkpoint.load(ckpt).record["params"]
    assert params["tol"] == float("inf") and params["max_time"] == float("inf")
    assert params["n_components"] == RANK and type(params["n_components"]) is int and params["chunks"] == [60, 60]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = dnmf.checkpoint.resume(ckpt, V, max_iter=5)
    assert model.n_iter_ == 5 and model.tol == float("inf") and model.chunks == (60, 60)


# ---------------------------------------------------------------------------
# Stopping rules


def test_stop_reasons(V):
    converged = dnmf.NMF(RANK, max_iter=500, **kwargs(tol=1e-3, tol_x=1e-2))
    quiet_fit(converged, V)
    assert converged.stop_reason_ == "converged" and converged.n_iter_ < 500
    last = converged.history_[-1]
    assert last["rel_decrease"] < 1e-3 and max(last["w_change"], last["h_change"]) < 1e-2

    at_max = dnmf.NMF(RANK, max_iter=7, **kwargs())
    with pytest.warns(ConvergenceWarning, match="max_iter"):
        at_max.fit(V)
    assert at_max.stop_reason_ == "max_iter" and at_max.n_iter_ == 7

    timed = dnmf.NMF(RANK, max_iter=1000, max_time=0.0, **kwargs())
    quiet_fit(timed, V)
    assert timed.stop_reason_ == "max_time" and timed.n_iter_ == 1

    seen = []
    called = dnmf.NMF(RANK, max_iter=1000, callbacks=[lambda r: seen.append(r.iteration) or r.iteration == 4], **kwargs())
    quiet_fit(called, V)
    assert called.stop_reason_ == "callback" and called.n_iter_ == 4 and seen == [1, 2, 3, 4]

    for model in (converged, at_max, timed, called):
        assert [r["iteration"] for r in model.history_] == list(range(1, model.n_iter_ + 1))


def test_tolerances_are_both_needed(V):
    # A loose tol alone does not stop the fit while the iterates still move more than tol_x.
    only_tol = dnmf.NMF(RANK, max_iter=30, **kwargs(tol=1.0, tol_x=0))
    quiet_fit(only_tol, V)
    assert only_tol.stop_reason_ == "max_iter"
    only_x = dnmf.NMF(RANK, max_iter=30, **kwargs(tol=0, tol_x=1.0))
    quiet_fit(only_x, V)
    assert only_x.stop_reason_ == "max_iter"
    both = dnmf.NMF(RANK, max_iter=30, **kwargs(tol=1.0, tol_x=1.0))
    quiet_fit(both, V)
    assert both.stop_reason_ == "converged" and both.n_iter_ == 1


def test_converged_checkpoint_resumes_to_the_same_stop(tmp_path, V):
    ckpt = str(tmp_path / "ck")
    params = dict(max_iter=500, **kwargs(tol=1e-2, tol_x=3e-2))
    first = dnmf.NMF(RANK, checkpoint=ckpt, checkpoint_every=1, **params)
    quiet_fit(first, V)
    assert first.stop_reason_ == "converged"
    # As if killed after the last iteration's checkpoint but before the final one.
    previous = sorted(name for name in os.listdir(ckpt) if name.startswith("v"))[-2]
    assert checkpoint.load(ckpt).record["stop_reason"] == "converged"
    checkpoint.write_pointer(ckpt, {"version": previous})
    assert checkpoint.load(ckpt).record["stop_reason"] is None
    again = dnmf.NMF(RANK, **params)
    quiet_fit(again, V, resume=ckpt)
    assert again.stop_reason_ == "converged" and again.n_iter_ == first.n_iter_
    assert same_bits(again.components_, first.components_)


@pytest.mark.slow
def test_checkpoint_and_resume_on_a_distributed_cluster(tmp_path, V):
    from distributed import Client, LocalCluster

    ref = dnmf.NMF(RANK, max_iter=8, **kwargs(solver="hals"))
    W_ref = quiet_fit(ref, V)
    ckpt = str(tmp_path / "ck")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=":0") as cluster, Client(cluster):
        quiet_fit(dnmf.NMF(RANK, max_iter=4, checkpoint=ckpt, checkpoint_every=2, **kwargs(solver="hals")), V)
        model = dnmf.NMF(RANK, max_iter=8, **kwargs(solver="hals"))
        W = quiet_fit(model, V, resume=ckpt)  # W blocks written and read by the worker processes
    assert same_bits(W, W_ref) and same_bits(model.components_, ref.components_)
