"""What a streamed fit keeps in its workers' memory (issue 15): one W, not the old and the new."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from distributed import Client, LocalCluster
from distributed import WorkerPlugin

from dnmf import NMF
from dnmf.data.ondisk import CSRWriter, create_csr_store


# The in-process workers of the test's cluster, and the peak of the bytes they held together.
_WORKERS: list = []
_PEAK = [0]


class HeldMemory(WorkerPlugin):
    """Tracks the bytes of the distinct arrays in the memory of a cluster's in-process workers
    together (an array that two workers or two results hold counts once), and their peak."""

    name = "dnmf-test-held-memory"

    def setup(self, worker):
        _WORKERS.append(worker)

    def transition(self, key, start, finish, **kwargs):
        if finish == "memory":
            arrays = {}
            for worker in list(_WORKERS):
                for value in list(worker.data.values()):
                    _collect_arrays(value, arrays)
            _PEAK[0] = max(_PEAK[0], sum(arrays.values()))


def _collect_arrays(value, arrays: dict, depth: int = 3) -> None:
    if isinstance(value, np.ndarray):
        base = value if value.base is None else value.base
        arrays[id(base)] = getattr(base, "nbytes", value.nbytes)
    elif sp.issparse(value):
        for part in (value.data, value.indices, value.indptr):
            _collect_arrays(part, arrays, depth)
    elif depth > 0 and isinstance(value, (tuple, list)):
        for item in value:
            _collect_arrays(item, arrays, depth - 1)
    elif depth > 0 and dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            _collect_arrays(getattr(value, f.name), arrays, depth - 1)


@pytest.fixture(scope="module")
def client():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None)
    c = Client(cluster)
    c.register_plugin(HeldMemory())
    yield c
    c.close()
    cluster.close()


def write_store(path, n: int, p: int, per_row: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    cols = np.sort(rng.integers(0, p, size=(n, per_row)), axis=1)
    X = sp.csr_matrix((rng.random(n * per_row) + 0.5, cols.ravel(), np.arange(0, n * per_row + 1, per_row)), shape=(n, p))
    X.sum_duplicates()
    writer = CSRWriter(create_csr_store(str(path), X.shape, X.dtype))
    writer.append(X)
    writer.close()


# p = 200: the step keeps its results (W_i with the partials) and the next step reads W_i from
# them (rows.small_h); p = 4000: H is too big for that, W's blocks are kept on their own; and
# the 2-D grid.
@pytest.mark.parametrize("p, column_chunks", [(200, None), (4000, None), (4000, 2000)])
@pytest.mark.parametrize("solver, beta_loss", [("mu", "kullback-leibler"), ("hals", "frobenius")])
def test_a_streamed_fit_holds_one_w_in_the_workers_not_two(client, tmp_path, p, column_chunks, solver, beta_loss):
    n, r, blocks = 160_000, 20, 16  # W: 25.6 MB of float64, V's CSR ~10 MB
    path = tmp_path / "V.zarr"
    write_store(path, n, p, per_row=4)
    w_bytes = n * r * 8
    peaks = []

    def measure(record):  # the peak over iterations 2 and 3, not the start's nor the end's
        if record.iteration == 1:
            _PEAK[0] = 0
        elif record.iteration == 3:
            peaks.append(_PEAK[0])

    with client.as_current():
        model = NMF(r, solver=solver, beta_loss=beta_loss, init="random", random_state=0, max_iter=4,
                    tol=0, tol_x=0, cache=False, chunks=n // blocks, column_chunks=column_chunks, reroot_every=0,
                    callbacks=[measure])
        model.fit(str(path))
    assert model.fit_info_["row_blocks"] == blocks
    (peak,) = peaks
    # The new W_i replaces the old one block by block: one W, a few blocks and the partials
    # waiting in the reduction tree at the peak. Without the release the old W, the new one and
    # the step results were 3 x W and more (3.4 x on the grid, where the peak is 2.3 x: each
    # old W_i waits for its row's products over all column blocks).
    bound = 1.75 if column_chunks is None else 2.6
    assert w_bytes <= peak < bound * w_bytes, (peak, w_bytes)
