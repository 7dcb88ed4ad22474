"""Failures that once ended in a traceback or a misleading message: one clear error each."""

import hashlib
import json
import os
import re
import warnings

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from sklearn.exceptions import ConvergenceWarning

import dnmf
from dnmf.cli import main
from dnmf.data.results import save_result
from dnmf.errors import CheckpointWarning, StoreError
from dnmf.run import checkpoint

from conftest import one_line_error

MiB = 2**20


def tree_digest(root) -> dict:
    """Each file under ``root`` and the SHA-256 of its bytes."""
    digests = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                digests[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return digests


# ---------------------------------------------------------------------------
# Case 11: a store chunked for big machines, fitted on small workers


@pytest.fixture
def small_workers():
    """A LocalCluster of 2 single-threaded workers limited to 64 MiB each (threads, not
    processes: the limits are reported to the scheduler all the same). The workers measure
    this whole process, so they are told not to pause, spill or stop at their limit."""
    import dask
    from distributed import Client, LocalCluster

    no_memory_actions = {f"distributed.worker.memory.{key}": False for key in ("target", "spill", "pause", "terminate")}
    with dask.config.set(no_memory_actions), LocalCluster(
        n_workers=2, threads_per_worker=1, memory_limit="64MiB", processes=False,
        dashboard_address=None,
    ) as cluster, Client(cluster) as client:
        yield client


def test_store_chunks_too_big_for_the_workers_are_refused_before_any_task(tmp_path, small_workers):
    path = str(tmp_path / "big-chunks.zarr")
    n, p = 4096, 1024  # float64: 32 MiB, stored as a single chunk
    arr = zarr.create_array(path, shape=(n, p), chunks=(n, p), dtype="float64")
    arr[...] = np.ones((n, p))
    before = tree_digest(path)
    with pytest.raises(StoreError, match=r"(?s)chunks of 4096 x 1024 \(32 MiB.*64 MiB memory limit of the "
                       r"smallest worker \(1 thread\).*Rechunk the store to at most \d+ rows per chunk "
                       r"\(dnmf convert .*--chunks \d+.*dask's rechunk\).*at least 128 MiB of memory per thread"):
        dnmf.NMF(2, max_iter=2).fit(path)
    # Refused before any task ran (no scan, no kill), and the store is untouched.
    assert small_workers.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes)) == []
    assert tree_digest(path) == before


def test_milder_oversized_blocks_only_warn(tmp_path, small_workers, caplog):
    path = str(tmp_path / "mild.zarr")
    # A 12 MiB chunk: more than 4 x the 2 MiB blocks 64 MiB workers get, under the 16 MiB refused.
    n, p = 1536, 1024
    arr = zarr.create_array(path, shape=(n, p), chunks=(n, p), dtype="float64")
    arr[...] = np.ones((n, p))
    with caplog.at_level("WARNING", logger="dnmf.run.plan"):
        model = dnmf.NMF(2, max_iter=2, init="random", random_state=0).fit(path)
    assert model.n_iter_ == 2
    assert "blocks of V take up to 12 MiB, more than 4 x the 2 MiB" in caplog.text


# ---------------------------------------------------------------------------
# Case 13 (a): a zarr.json without its data_type


def broken_metadata_store(tmp_path):
    """A Zarr array whose zarr.json lost its required ``data_type`` field."""
    path = tmp_path / "broken.zarr"
    zarr.create_array(str(path), shape=(20, 10), chunks=(10, 10), dtype="float64")[...] = np.ones((20, 10))
    meta_path = path / "zarr.json"
    meta = json.loads(meta_path.read_text())
    del meta["data_type"]
    meta_path.write_text(json.dumps(meta))
    return path


def test_zarr_metadata_without_data_type_is_a_store_error(tmp_path):
    path = broken_metadata_store(tmp_path)
    before = tree_digest(path)
    message = r"'.*broken\.zarr/zarr\.json' lacks the required field 'data_type' \(a damaged or hand-written store\)"
    with pytest.raises(StoreError, match=message):
        dnmf.NMF(2).fit(str(path))
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 1
    assert re.search(message, one_line_error(result.stderr))
    assert tree_digest(path) == before


# ---------------------------------------------------------------------------
# Case 13 (b): dnmf plot --max-rows 0


def test_plot_max_rows_zero_is_a_usage_error(tmp_path):
    V = np.random.default_rng(0).random((30, 8))
    model = dnmf.NMF(2, max_iter=5, random_state=0)
    W = model.fit_transform(V)
    out = save_result(tmp_path / "r.zarr", model, W)
    before = tree_digest(out)
    result = CliRunner().invoke(main, ["plot", str(out), "--out-dir", str(tmp_path / "plots"), "--max-rows", "0"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert re.search(r"Invalid value for '--max-rows': 0 is not in the range x>=1", result.stderr)
    assert not (tmp_path / "plots").exists()
    assert tree_digest(out) == before


# ---------------------------------------------------------------------------
# Case 13 (c, e): a checkpoint with an incomplete record, a damaged CURRENT pointer

CHECKPOINT_FIT = dict(init="random", random_state=0, tol=0, tol_x=0, solver="hals")


def small_checkpoint(tmp_path):
    """V and a checkpoint of 6 iterations written every 3 (the last two versions kept: iteration
    6, and the end at iteration 6)."""
    V = np.random.default_rng(3).random((40, 12))
    ckpt = tmp_path / "ck"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        dnmf.NMF(3, max_iter=6, checkpoint=str(ckpt), checkpoint_every=3, **CHECKPOINT_FIT).fit(V)
    return V, ckpt


def versions_digest(ckpt):
    return {name: tree_digest(ckpt / name) for name in os.listdir(ckpt) if name.startswith("v")}


def drop_from_record(version_dir, key):
    meta_path = version_dir / "zarr.json"
    meta = json.loads(meta_path.read_text())
    del meta["attributes"][checkpoint.ATTRS_KEY][key]
    meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize("key", ["settings", "fingerprint"])
def test_a_checkpoint_whose_records_are_incomplete_is_a_store_error(tmp_path, key):
    V, ckpt = small_checkpoint(tmp_path)
    for version in ckpt.glob("v*"):
        drop_from_record(version, key)
    before = versions_digest(ckpt)
    with pytest.raises(StoreError, match=rf"(?s)damaged or incomplete .*its record is incomplete \(no '{key}'\).*"
                       r"Start a new fit"), pytest.warns(CheckpointWarning):
        dnmf.NMF(3, max_iter=8, **CHECKPOINT_FIT).fit(V, resume=str(ckpt))
    assert versions_digest(ckpt) == before


def test_an_incomplete_newest_record_falls_back_to_the_previous_version(tmp_path):
    V, ckpt = small_checkpoint(tmp_path)
    newest = checkpoint.read_pointer(str(ckpt))["version"]
    drop_from_record(ckpt / newest, "settings")
    with pytest.warns(CheckpointWarning, match=rf"{newest} .*its record is incomplete \(no 'settings'\)"):
        snapshot = checkpoint.load(str(ckpt))
    # The version before the end's: iteration 6 too, written before the stop was known.
    assert snapshot.version != newest and snapshot.iteration == 6 and snapshot.record["stop_reason"] is None


@pytest.mark.parametrize("pointer", ["{not json", '{"version": "v000099"}', '["v000001"]'])
def test_a_damaged_pointer_falls_back_to_the_newest_intact_version(tmp_path, pointer):
    V, ckpt = small_checkpoint(tmp_path)
    newest = checkpoint.read_pointer(str(ckpt))["version"]
    (ckpt / checkpoint.POINTER).write_text(pointer)
    with pytest.warns(CheckpointWarning, match="pointer of the checkpoint .* using the newest intact version"):
        snapshot = checkpoint.load(str(ckpt))
    assert snapshot.version == newest and snapshot.iteration == 6

    # The fit resumes (bitwise the uninterrupted one) and writes a sound pointer again.
    reference = dnmf.NMF(3, max_iter=9, **CHECKPOINT_FIT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        W_ref = reference.fit_transform(V)
        resumed = dnmf.NMF(3, max_iter=9, checkpoint_every=3, **CHECKPOINT_FIT)
        with pytest.warns(CheckpointWarning):
            W = resumed.fit_transform(V, resume=str(ckpt))
    np.testing.assert_array_equal(W, W_ref)
    np.testing.assert_array_equal(resumed.components_, reference.components_)
    assert checkpoint.load(str(ckpt)).iteration == 9


def test_a_damaged_pointer_without_an_intact_version_is_a_store_error(tmp_path):
    V, ckpt = small_checkpoint(tmp_path)
    (ckpt / checkpoint.POINTER).write_text("{not json")
    for version in ckpt.glob("v*"):
        drop_from_record(version, "checksums")
    with pytest.raises(StoreError, match="No usable checkpoint version .* damaged or incomplete"), \
            pytest.warns(CheckpointWarning):
        checkpoint.load(str(ckpt))


# ---------------------------------------------------------------------------
# Case 13, misleading messages: a fixed H of the wrong shape; the CLI's names for parameters


@pytest.mark.parametrize(
    "H, expected_shape",
    [(np.ones((3, 29)), r"Expected \(3, 30\)"), (np.ones((30, 3)), r"Expected \(3, n_features"),
     (np.ones((4, 30)), r"Expected \(3, n_features"), (np.ones(30), r"Expected \(3, n_features")],
)
def test_a_fixed_h_of_the_wrong_shape_is_named_as_h(H, expected_shape):
    """update_H=False once answered "Expected X with 29 features, as in fit": X was right."""
    X = np.random.default_rng(0).random((20, 30))
    with pytest.raises(dnmf.errors.ParameterError, match=r"input H, fixed by update_H=False") as info:
        dnmf.non_negative_factorization(X, H=H, n_components=3, update_H=False)
    assert re.search(expected_shape, str(info.value)) and str(H.shape) in str(info.value)


@pytest.mark.parametrize(
    "args, message",
    [
        (["-r", "-1"], "Expected --rank/-r a positive integer. Got -1 instead."),
        (["-r", "2", "--eps", "-1"], "Expected --eps a non-negative number"),
        (["-r", "2", "--seed", "-3"], "--seed"),
        (["-r", "2", "--solver", "bpp", "--beta-loss", "itakura-saito"], "--beta-loss='itakura-saito'"),
    ],
)
def test_cli_refuses_bad_options_by_their_flags_before_any_work(tmp_path, args, message):
    """`dnmf fit -r -1` was refused as "n_components", after converting the input and starting
    Dask; now the settings table checks the options first and the error names the flag."""
    np.save(tmp_path / "V.npy", np.random.default_rng(0).random((20, 6)))
    before = tree_digest(tmp_path)
    result = CliRunner().invoke(main, ["fit", str(tmp_path / "V.npy"), *args, "-o", str(tmp_path / "o.zarr")])
    assert result.exit_code == 1
    line = one_line_error(result.stderr)
    assert message in line and "n_components" not in line and "random_state" not in line
    assert "Converting" not in result.stderr and "Starting Dask" not in result.stderr
    assert tree_digest(tmp_path) == before
