"""Checkpoint and spill folders: dnmf deletes only what it wrote, and two runs never share one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_checkpoint import ROOT, lowrank, quiet_fit, tree_digest, write_zarr

import dnmf
from dnmf.errors import LockedError, ParameterError
from dnmf.run import checkpoint, locks

RANK = 3


def fast_model(**params) -> dnmf.NMF:
    return dnmf.NMF(RANK, **{"init": "random", "random_state": 0, "max_iter": 3, "tol": 0, "tol_x": 0, "chunks": 25, **params})


@pytest.fixture
def live_pid():
    """The pid of a running process other than this one."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc.pid
    proc.kill()
    proc.wait()


def write_lock(folder: Path, process: int, **changes) -> None:
    """A lock of ``folder`` naming the pid ``process`` (which must exist now) as its holder."""
    Path(locks.lock_path(folder)).write_text(json.dumps({**locks.holder_record(process), **changes}))


def test_a_folder_dnmf_did_not_write_is_refused_and_left_alone(tmp_path):
    # Issue 14, case 2: entries that merely look like versions are not dnmf's.
    mydir = tmp_path / "mydir"
    (mydir / "v000001").mkdir(parents=True)
    (mydir / "v000001" / "data.txt").write_text("precious\n")
    with pytest.raises(ParameterError, match=r"already holds other files \(v000001\)"):
        quiet_fit(fast_model(checkpoint=str(mydir)), lowrank())
    assert (mydir / "v000001" / "data.txt").read_text() == "precious\n"
    assert sorted(os.listdir(mydir)) == ["v000001"]
    assert not os.path.exists(locks.lock_path(mydir))  # the lock went with the refused fit


def test_a_dnmf_checkpoint_abandoned_before_its_first_pointer_is_removed(tmp_path):
    ckpt = tmp_path / "ck"
    checkpoint._mark(str(ckpt))
    array = ckpt / "v000001" / "W"
    (array / "c" / "0").mkdir(parents=True)
    (array / "zarr.json").write_text("{}")
    (array / "c" / "0" / f"0.{'a' * 32}.partial").write_bytes(b"\0" * 8)  # a chunk cut short
    quiet_fit(fast_model(checkpoint=str(ckpt)), lowrank())
    assert checkpoint.load(str(ckpt)).iteration == 3


def test_a_foreign_file_in_an_old_version_stops_a_resume_before_it_writes(tmp_path):
    ckpt = tmp_path / "ck"
    quiet_fit(fast_model(checkpoint=str(ckpt), checkpoint_every=1), lowrank())
    old = min(name for name in os.listdir(ckpt) if name.startswith("v"))
    (ckpt / old / "notes.txt").write_text("mine")
    before = tree_digest(str(ckpt))
    with pytest.raises(ParameterError, match="holds files dnmf did not write"):
        quiet_fit(fast_model(max_iter=5), lowrank(), resume=str(ckpt))
    assert tree_digest(str(ckpt)) == before


@pytest.mark.parametrize("how", ["fit", "resume"])
def test_a_live_lock_refuses_a_second_run_which_touches_nothing(tmp_path, live_pid, how):
    ckpt = tmp_path / "ck"
    quiet_fit(fast_model(checkpoint=str(ckpt)), lowrank())
    write_lock(ckpt, live_pid)
    before = tree_digest(str(tmp_path))
    with pytest.raises(LockedError, match=rf"in use by another dnmf run \(host '.+', pid {live_pid}, since"):
        if how == "fit":
            quiet_fit(fast_model(checkpoint=str(ckpt)), lowrank())
        else:
            dnmf.checkpoint.resume(str(ckpt), lowrank(), max_iter=6)
    assert tree_digest(str(tmp_path)) == before  # the lock file included


def test_a_lock_of_another_host_is_never_taken_over(tmp_path, live_pid):
    ckpt = tmp_path / "ck"
    write_lock(ckpt, live_pid, host="elsewhere", pid=12345)
    with pytest.raises(LockedError, match=r"host 'elsewhere' \(pid 12345.*delete its lock file"):
        quiet_fit(fast_model(checkpoint=str(ckpt)), lowrank())
    assert not ckpt.exists()


def test_a_stale_lock_is_taken_over(tmp_path):
    ckpt = tmp_path / "ck"
    quiet_fit(fast_model(checkpoint=str(ckpt)), lowrank())
    dead = subprocess.Popen(["sleep", "0"])
    write_lock(ckpt, dead.pid)
    dead.wait()
    quiet_fit(fast_model(max_iter=6), lowrank(), resume=str(ckpt))
    assert checkpoint.load(str(ckpt)).iteration == 6
    assert not os.path.exists(locks.lock_path(ckpt))


def test_a_reused_pid_does_not_hold_a_lock(tmp_path):
    ckpt = tmp_path / "ck"
    write_lock(ckpt, os.getpid(), process_started=0.0)  # this pid, but not this process
    quiet_fit(fast_model(checkpoint=str(ckpt)), lowrank())
    assert checkpoint.load(str(ckpt)).iteration == 3


def test_two_fits_racing_on_one_checkpoint(tmp_path):
    v_path = write_zarr(tmp_path / "V.zarr", lowrank())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "dnmf", "fit", v_path, "-r", str(RANK), "-o", str(tmp_path / f"out{k}.zarr"),
             "--checkpoint", str(tmp_path / "ck"), "--checkpoint-every", "1", "--max-iter", "300", "--tol", "0",
             "--seed", "0", "--scheduler", "threads", "--quiet"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for k in range(2)
    ]
    results = [(run.wait(timeout=120), run.stderr.read()) for run in runs]
    assert sorted(code for code, _ in results) == [0, 1], results
    _, error = next(result for result in results if result[0] == 1)
    lines = error.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in error, error
    assert lines[0].startswith("Error: The checkpoint folder") and "in use by another dnmf run" in lines[0], error
    assert checkpoint.load(str(tmp_path / "ck")).iteration == 300


def test_a_spill_folder_in_use_refuses_a_second_fit(tmp_path, live_pid):
    from distributed import Client

    spill = tmp_path / "spill"
    (spill / "W-000000.zarr").mkdir(parents=True)
    (spill / "W-000000.zarr" / "zarr.json").write_text("{}")  # the running fit's spill
    write_lock(spill, live_pid)
    before = tree_digest(str(tmp_path))
    refused = pytest.raises(LockedError, match=rf"spill folder .* in use by another dnmf run .*pid {live_pid}")
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=":0"), refused:
        quiet_fit(fast_model(reroot_every=1, spill_dir=str(spill)), lowrank())
    assert tree_digest(str(tmp_path)) == before


def test_a_spill_folder_taken_over_from_a_killed_run_keeps_its_leftovers(tmp_path):
    from distributed import Client

    spill = tmp_path / "spill"
    (spill / "W-000004.zarr").mkdir(parents=True)  # a killed run's spill
    dead = subprocess.Popen(["sleep", "0"])
    write_lock(spill, dead.pid)
    dead.wait()
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=":0"):
        model = fast_model(reroot_every=1, spill_dir=str(spill))
        W = quiet_fit(model, lowrank())
    assert isinstance(W, np.ndarray) and model.fit_info_["n_reroots"] == 3
    assert sorted(os.listdir(spill)) == ["W-000004.zarr"]  # its own spills deleted, the leftover kept
    assert not os.path.exists(locks.lock_path(spill))


def test_a_checkpoint_written_before_roots_were_marked_resumes_in_place(tmp_path):
    # A checkpoint of an earlier dnmf (complete versions, no marker on the root) is still
    # provably dnmf's: its pointer names a version holding dnmf's record.
    V = lowrank()
    ck = tmp_path / "ck"
    quiet_fit(fast_model(max_iter=4, checkpoint=str(ck), checkpoint_every=2), V)
    root = json.loads((ck / "zarr.json").read_text())
    root["attributes"].pop(checkpoint.ROOT_KEY)
    (ck / "zarr.json").write_text(json.dumps(root))
    model = fast_model(max_iter=6, checkpoint=str(ck), checkpoint_every=2)
    quiet_fit(model, V, resume=str(ck))
    assert model.n_iter_ == 6 and checkpoint.load(str(ck)).iteration == 6


def test_a_requeued_slurm_job_takes_over_the_lock_of_its_earlier_run_on_another_node(tmp_path, live_pid, monkeypatch):
    ckpt = tmp_path / "ckpt"
    V = lowrank()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    # Run 0 of this job, killed on another node: taken over.
    write_lock(ckpt, live_pid, host="node-a", batch_job={"system": "slurm", "id": "4242", "run": 0})
    quiet_fit(fast_model(checkpoint=str(ckpt), resume="auto"), V)
    assert checkpoint.load(ckpt).iteration == 3 and not os.path.exists(locks.lock_path(ckpt))
    # The same run (another step of it), another job, or no job: refused.
    for job in ({"system": "slurm", "id": "4242", "run": 1}, {"system": "slurm", "id": "99", "run": 0}, None):
        write_lock(ckpt, live_pid, host="node-a", **({} if job is None else {"batch_job": job}))
        with pytest.raises(LockedError, match="node-a"):
            quiet_fit(fast_model(checkpoint=str(ckpt), resume="auto", max_iter=4), V)
        os.remove(locks.lock_path(ckpt))
