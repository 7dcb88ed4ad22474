"""Failures that once ended in a traceback or a misleading message: one clear error each."""

import hashlib
import os

import numpy as np
import pytest
import zarr

import dnmf
from dnmf.errors import StoreError

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
