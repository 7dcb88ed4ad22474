"""Batch jobs: start-or-resume (resume="auto"), a clean stop on SIGTERM / SIGUSR1, and the same
command killed or terminated at random moments and rerun until it ends bitwise equal."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

import dnmf
from dnmf.errors import CheckpointMismatchError, FitInterrupted, ParameterError
from dnmf.run import checkpoint
from dnmf.run.signals import EXIT_INTERRUPTED

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_checkpoint import same_bits, tree_digest, write_zarr  # noqa: E402

KW = dict(init="random", random_state=0, tol=0, tol_x=0, chunks=25)


@pytest.fixture
def V():
    rng = np.random.default_rng(7)
    return rng.random((150, 4)) @ rng.random((4, 40)) + 0.01 * rng.random((150, 40))


def fit(model, X, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        W = model.fit_transform(X, **kw)
    return W.compute() if hasattr(W, "compute") else W


def signal_at(iterations: set[int], signum=signal.SIGTERM):
    """A callback that sends this process ``signum`` after each of ``iterations``."""

    def callback(record):
        if record.iteration in iterations:
            os.kill(os.getpid(), signum)

    return callback


# ---------------------------------------------------------------------------
# resume="auto"


def test_resume_auto_starts_then_resumes_bitwise(tmp_path, V):
    ckpt = tmp_path / "ckpt"
    ref = dnmf.NMF(4, max_iter=12, **KW)
    W_ref = fit(ref, V)
    first = dnmf.NMF(4, max_iter=5, checkpoint=ckpt, resume="auto", checkpoint_every=2, **KW)
    fit(first, V)  # nothing saved yet: a fresh start
    assert first.n_iter_ == 5 and checkpoint.load(ckpt).iteration == 5
    again = dnmf.NMF(4, max_iter=12, checkpoint=ckpt, resume="auto", checkpoint_every=2, **KW)
    W = fit(again, V)  # the same call, with more iterations allowed: continues from 5
    assert [r["iteration"] for r in again.history_] == list(range(1, 13))
    assert same_bits(W, W_ref) and same_bits(again.components_, ref.components_)
    # Once finished, the same call again changes nothing and returns the same result.
    done = dnmf.NMF(4, max_iter=12, checkpoint=ckpt, resume="auto", checkpoint_every=2, **KW)
    assert same_bits(fit(done, V), W_ref) and done.n_iter_ == 12


def test_resume_auto_in_the_function_and_as_a_fit_argument(tmp_path, V):
    ref = dnmf.NMF(4, max_iter=9, **KW)
    fit(ref, V)
    kw = {**KW, "checkpoint": str(tmp_path / "f"), "resume": "auto", "checkpoint_every": 3}
    _, H, n = dnmf.non_negative_factorization(V, n_components=4, max_iter=4, **kw)
    _, H, n = dnmf.non_negative_factorization(V, n_components=4, max_iter=9, **kw)
    assert n == 9 and same_bits(H, ref.components_)
    model = dnmf.NMF(4, max_iter=4, checkpoint=tmp_path / "m", **KW)
    fit(model, V, resume="auto")
    model.max_iter = 9
    fit(model, V, resume="auto")
    assert same_bits(model.components_, ref.components_)


def test_resume_auto_starts_over_the_leftovers_of_a_fit_killed_before_its_first_checkpoint(tmp_path, V):
    ckpt = tmp_path / "ckpt"
    fit(dnmf.NMF(4, max_iter=3, checkpoint=ckpt, **KW), V)
    # What a kill during the first version's write leaves: the marked folder, a version, no pointer.
    os.remove(ckpt / "CURRENT")
    ref = dnmf.NMF(4, max_iter=6, **KW)
    fit(ref, V)
    model = dnmf.NMF(4, max_iter=6, checkpoint=ckpt, resume="auto", **KW)
    fit(model, V)
    assert model.n_iter_ == 6 and same_bits(model.components_, ref.components_)


def test_resume_auto_refuses_another_fits_checkpoint_naming_the_differences(tmp_path, V):
    ckpt = tmp_path / "ckpt"
    fit(dnmf.NMF(4, max_iter=3, checkpoint=ckpt, **KW), V)
    before = tree_digest(str(ckpt))
    other = dnmf.NMF(3, max_iter=3, checkpoint=ckpt, resume="auto", **{**KW, "random_state": 1})
    with pytest.raises(CheckpointMismatchError, match=r"n_components: checkpoint 4, now 3.*seed: checkpoint 0, now 1"):
        fit(other, V)
    with pytest.raises(CheckpointMismatchError, match="matrix content"):
        fit(dnmf.NMF(4, max_iter=3, checkpoint=ckpt, resume="auto", **KW), V * 2)
    assert tree_digest(str(ckpt)) == before  # refused before anything was written


def test_resume_auto_refuses_a_folder_with_files_dnmf_did_not_write(tmp_path, V):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "notes.txt").write_text("mine")
    with pytest.raises(ParameterError, match="notes.txt"):
        fit(dnmf.NMF(4, max_iter=3, checkpoint=ckpt, resume="auto", **KW), V)
    assert (ckpt / "notes.txt").read_text() == "mine"


def test_resume_auto_needs_the_checkpoint_folder(V):
    with pytest.raises(ParameterError, match='resume="auto".*checkpoint'):
        fit(dnmf.NMF(4, max_iter=3, resume="auto", **KW), V)
    with pytest.raises(ParameterError, match="resume"):
        dnmf.NMF(4, resume=3).fit(V)


# ---------------------------------------------------------------------------
# Signals


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_stops_after_the_iteration_with_a_checkpoint_and_rerun_is_bitwise(tmp_path, V, signum):
    ckpt = tmp_path / "ckpt"
    kw = {**KW, "objective_every": 3}  # stops on iterations without an objective too
    ref = dnmf.NMF(4, max_iter=14, **kw)
    W_ref = fit(ref, V)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    stops = []
    for _ in range(5):
        model = dnmf.NMF(4, max_iter=14, checkpoint=ckpt, resume="auto", checkpoint_every=5,
                         callbacks=[signal_at({4, 8}, signum)], **kw)
        try:
            W = fit(model, V)
            break
        except FitInterrupted as e:
            stops.append((e.signal_name, e.iteration, checkpoint.load(ckpt).iteration))
        assert {s: signal.getsignal(s) for s in before} == before  # handlers restored
    assert stops == [(signum.name, 4, 4), (signum.name, 8, 8)]
    assert same_bits(W, W_ref) and same_bits(model.components_, ref.components_)
    objectives = [r["objective"] for r in model.history_]
    np.testing.assert_array_equal(objectives, [r["objective"] for r in ref.history_])  # NaNs where ref has them


def test_a_signal_during_the_set_up_stops_before_the_first_iteration(tmp_path, V, monkeypatch):
    from dnmf.run import pipeline

    original = pipeline.start_or_restore

    def start_then_signal(*args, **kwargs):
        out = original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGUSR1)
        return out

    monkeypatch.setattr(pipeline, "start_or_restore", start_then_signal)
    with pytest.raises(FitInterrupted, match="SIGUSR1 after iteration 0"):
        fit(dnmf.NMF(4, max_iter=5, checkpoint=tmp_path / "c", resume="auto", **KW), V)
    assert checkpoint.load(tmp_path / "c").iteration == 0  # the start is saved


def test_without_a_checkpoint_or_outside_the_main_thread_signals_are_left_alone(tmp_path, V):
    seen = []

    def inside(record):
        seen.append(signal.getsignal(signal.SIGTERM))

    before = signal.getsignal(signal.SIGTERM)
    fit(dnmf.NMF(4, max_iter=2, callbacks=[inside], **KW), V)
    assert seen == [before, before]
    errors = []

    def in_thread():
        try:
            fit(dnmf.NMF(4, max_iter=2, checkpoint=tmp_path / "t", callbacks=[inside], **KW), V)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert not errors and seen[2:] == [before, before]


# ---------------------------------------------------------------------------
# The command line: the same command, killed or terminated at random moments, rerun


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "dnmf", *map(str, args)]


def cli_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def fit_command(V_path, out, ckpt, log, max_iter=200):
    return cli("fit", V_path, "-o", out, "-r", 6, "--init", "random", "--seed", 3, "--tol", 0, "--tol-x", 0,
               "--max-iter", max_iter, "--chunks", 100, "--scheduler", "threads", "-q", "--checkpoint", ckpt,
               "--resume", "auto", "--checkpoint-every", 7, "--log-json", log, "--overwrite")


@pytest.fixture
def big_zarr(tmp_path):
    rng = np.random.default_rng(11)
    V = rng.random((1200, 6)) @ rng.random((6, 400)) + 0.05 * rng.random((1200, 400))
    return write_zarr(tmp_path / "V.zarr", V)


def wait_for_lines(log: Path, n: int, timeout: float = 60) -> None:
    """Wait until the JSON-lines log ``log`` has ``n`` more lines than now."""
    start = len(log.read_text().splitlines()) if log.exists() else 0
    deadline = time.monotonic() + timeout
    while not (log.exists() and len(log.read_text().splitlines()) >= start + n) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_sigterm_ends_the_command_within_an_iteration_and_a_checkpoint_write(tmp_path, big_zarr):
    log = tmp_path / "log.jsonl"
    command = fit_command(big_zarr, tmp_path / "r.zarr", tmp_path / "ckpt", log, max_iter=100000)
    proc = subprocess.Popen(command, env=cli_env(), stderr=subprocess.PIPE, text=True)
    wait_for_lines(log, 20)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "Stopped: The fit stopped on SIGTERM" in err
    records = [json.loads(line) for line in log.read_text().splitlines()]
    # Nothing lost: the checkpoint holds the last iteration the command logged.
    assert checkpoint.load(tmp_path / "ckpt").iteration == records[-1]["iteration"]
    iteration = max(r["seconds"] for r in records)
    print(f"SIGTERM to exit: {took:.2f} s (longest iteration {iteration:.3f} s)")
    assert took < iteration + 5.0  # an iteration, a checkpoint write, the interpreter's exit
    assert not (tmp_path / "r.zarr").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_same_command_killed_or_terminated_at_random_moments_ends_bitwise_equal(tmp_path, big_zarr):
    digest = tree_digest(big_zarr)
    ref = subprocess.run(fit_command(big_zarr, tmp_path / "ref.zarr", tmp_path / "ref-ckpt", tmp_path / "ref.jsonl"),
                         env=cli_env(), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    out, ckpt, log = tmp_path / "r.zarr", tmp_path / "ckpt", tmp_path / "log.jsonl"
    rng = random.Random(19)
    outcomes = []
    for attempt in range(20):
        proc = subprocess.Popen(fit_command(big_zarr, out, ckpt, log), env=cli_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if attempt == 0:  # terminated while iterating, for sure
            wait_for_lines(log, 3)
            proc.send_signal(signal.SIGTERM)
        elif attempt == 1:  # killed while iterating, for sure (whatever the machine's speed)
            wait_for_lines(log, 3)
            proc.send_signal(signal.SIGKILL)
        elif attempt < 8:  # then killed or terminated at random moments; then one run finishes
            how = rng.choice([signal.SIGKILL, signal.SIGTERM])
            try:
                proc.wait(timeout=rng.uniform(1.0, 9.0))
            except subprocess.TimeoutExpired:
                proc.send_signal(how)
        _, err = proc.communicate(timeout=300)
        outcomes.append(proc.returncode)
        # -SIGTERM: terminated before the fit set its handlers up, or after it (writing the
        # result): nothing to save then.
        assert proc.returncode in (0, EXIT_INTERRUPTED, -signal.SIGKILL, -signal.SIGTERM), err
        if proc.returncode == 0:
            break
    print("exit statuses of the runs:", outcomes)
    assert outcomes[0] == EXIT_INTERRUPTED and outcomes[-1] == 0 and -signal.SIGKILL in outcomes
    got, want = dnmf.results.load_result(out), dnmf.results.load_result(tmp_path / "ref.zarr")
    assert got.n_iter == want.n_iter == 200
    assert same_bits(np.asarray(got.H), np.asarray(want.H))
    assert same_bits(got.W.compute(), want.W.compute())
    assert tree_digest(big_zarr) == digest  # the input is untouched
