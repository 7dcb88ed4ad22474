"""Failures that once ended in a traceback or a misleading message: one clear error each."""

import hashlib
import json
import os
import re

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

import dnmf
from dnmf.cli import main
from dnmf.data.results import save_result
from dnmf.errors import StoreError

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
