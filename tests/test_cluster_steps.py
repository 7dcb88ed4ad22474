"""The per-iteration graph on a distributed cluster: the partials' tree folded on the client
below its root, H as one key, and results equal to the threaded scheduler's bit for bit."""

from __future__ import annotations

import warnings

import dask
import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

import dnmf
from dnmf.graph import SPLIT_EVERY, tree_fold, tree_reduce, tree_reduce_below_root
from dnmf.solvers import rows


def _nest(a: str, b: str) -> str:
    # Not associative: the string records the tree's every grouping and order.
    return f"({a}+{b})"


@pytest.mark.parametrize("n_leaves", [1, 2, SPLIT_EVERY, SPLIT_EVERY + 1, 12, 64, 65, 200])
def test_tree_below_root_folds_to_the_root(n_leaves):
    leaves = [(f"leaf-{i}",) for i in range(n_leaves)]
    values = {key: f"v{i}" for i, key in enumerate(leaves)}
    whole, below = dict(values), dict(values)
    root = tree_reduce(whole, "t", list(leaves), _nest)
    keys = tree_reduce_below_root(below, "t", list(leaves), _nest)
    expected = dask.get(whole, root)
    assert tree_fold(list(dask.get(below, keys)), _nest) == expected
    assert len(keys) <= SPLIT_EVERY
    if n_leaves > SPLIT_EVERY:  # the root's level is left to the caller, never a leaf handed out
        assert len(keys) > 1 and not set(keys) & set(leaves)
    else:  # one level: the root folds the leaves, and stays in the graph
        assert keys == [root]


def _scheduler_rank(hlg) -> dict:
    """Each key's place in the order a distributed scheduler prefers its tasks: by the layer's
    ``priority`` annotation (higher first), then dask's static order."""
    from dask.order import order

    tasks = dict(hlg)
    static = order(tasks)
    annotated = {key: -(layer.annotations or {}).get("priority", 0) for layer in hlg.layers.values() for key in layer}
    return {key: rank for rank, key in enumerate(sorted(tasks, key=lambda k: (annotated[k], static[k])))}


@pytest.mark.parametrize("n_blocks", [64, 172])
def test_a_pass_sums_its_first_blocks_before_it_runs_the_rest(n_blocks, monkeypatch):
    """dask's static order put the node summing blocks 0-7 after ~3/4 of the per-block tasks
    (128 of 172), so the workers held nearly every block's r x p partials until a pass ended;
    the trees' layer at REDUCE_PRIORITY puts each node right after its inputs."""
    from dnmf import graph as graph_module

    def ranks(priority):
        monkeypatch.setattr(graph_module, "REDUCE_PRIORITY", priority)
        graph = graph_module.TaskGraph("t")
        steps = graph.map(np.add, [(("w", i),) for i in range(n_blocks)], ("h",))
        top = graph.reduce_below_root(steps, np.add)
        rank = _scheduler_rank(graph.delayed(top[0]).__dask_graph__())
        firsts = [key for key in rank if isinstance(key, tuple) and key[0].endswith("-sum0")]
        return max(sum(rank[step] < rank[node] for step in steps) - SPLIT_EVERY * (node[1] + 1) for node in firsts)

    # How many more blocks than its own (and those of the nodes before it) run before a node.
    assert ranks(graph_module.REDUCE_PRIORITY) <= 0
    assert ranks(0) >= n_blocks // 2  # what the static order alone does


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=":0") as cluster:
        with Client(cluster) as c:
            yield c


@pytest.mark.parametrize("h_in_tasks", [True, False])
@pytest.mark.parametrize("solver", ["mu", "hals", "bpp"])
def test_cluster_equals_threaded_with_a_two_level_tree(client, monkeypatch, solver, h_in_tasks):
    from distributed import get_task_stream

    # 20 row blocks: the partials' tree has two levels, so its root is folded on the client.
    # h_in_tasks=False: H too large to copy into each step task (one key of its own instead).
    if not h_in_tasks:
        monkeypatch.setattr(rows, "SMALL_H_TOTAL_BYTES", 0)
    rng = np.random.default_rng(4)
    V = rng.random((200, 5)) @ rng.random((5, 60)) + 0.01 * rng.random((200, 60))
    kw = dict(solver=solver, init="nndsvda", random_state=0, max_iter=6, tol=0, tol_x=0, chunks=10, local=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        with dask.config.set(scheduler="threads"):
            ref = dnmf.NMF(5, **kw)
            W_ref = ref.fit_transform(V)
        with client.as_current(), get_task_stream(client) as stream:
            got = dnmf.NMF(5, **kw)
            W_got = got.fit_transform(V)
    assert any("dnmf-step" in str(task["key"]) for task in stream.data)  # the workers ran the steps
    np.testing.assert_array_equal(W_got, W_ref)
    np.testing.assert_array_equal(got.components_, ref.components_)
    assert [r["objective"] for r in got.history_] == [r["objective"] for r in ref.history_]


def _held_step_keys(client) -> list:
    return [key for keys in client.has_what().values() for key in keys if "dnmf-step" in str(key)]


def test_on_a_cluster_each_pass_is_submitted_before_the_last_one_ends(client):
    """The next iteration's pass goes to the scheduler before this one is waited for, its H
    updated by a task; a fit stopped early drops the pass it submitted ahead, and is the same
    as the fit that ran exactly that far."""
    import time

    from distributed import get_task_stream

    rng = np.random.default_rng(5)
    V = rng.random((200, 5)) @ rng.random((5, 60)) + 0.01 * rng.random((200, 60))
    kw = dict(solver="mu", init="nndsvda", random_state=0, tol=0, tol_x=0, chunks=10, local=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        with dask.config.set(scheduler="threads"):
            ref = dnmf.NMF(5, max_iter=4, **kw)
            W_ref = ref.fit_transform(V)
        with client.as_current(), get_task_stream(client) as stream:
            whole = dnmf.NMF(5, max_iter=4, **kw)
            W_whole = whole.fit_transform(V)
        heads = [key for key in (task["key"] for task in stream.data) if str(key[0]).startswith("dnmf-step") and key[1:] == ("H",)]
        assert len(heads) == 3  # iterations 2 to 4, each submitted during the one before
        with client.as_current():
            stopped = dnmf.NMF(5, max_iter=50, callbacks=[lambda record: record.iteration >= 4], **kw)
            W_stopped = stopped.fit_transform(V)
    for model, W in [(whole, W_whole), (stopped, W_stopped)]:
        np.testing.assert_array_equal(W, W_ref)
        np.testing.assert_array_equal(model.components_, ref.components_)
        assert [r["objective"] for r in model.history_] == [r["objective"] for r in ref.history_]
    deadline = time.monotonic() + 5  # the pass submitted for iteration 5 is cancelled, not kept
    while (_held_step_keys(client) or any(client.processing().values())) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _held_step_keys(client) == [] and not any(client.processing().values())


def test_the_steps_of_a_pass_submitted_ahead_do_not_wait_for_its_h_task(client, monkeypatch):
    """Each worker updates H from the previous pass's sums itself, once per pass: the steps
    depend on those sums, not on the H task (a hop of the scheduler's and a transfer of H
    fewer), and the fit is the threaded one, bit for bit."""
    from dask.core import get_dependencies

    import dnmf.solvers.rows as rows

    graphs = []
    persist = rows.dask.persist

    def recording(*collections, **kw):
        items = [item for c in collections for item in (c if isinstance(c, list) else [c])]
        graphs.append({key: task for item in items for key, task in dict(item.__dask_graph__()).items()})
        return persist(*collections, **kw)

    monkeypatch.setattr(rows.dask, "persist", recording)
    rng = np.random.default_rng(6)
    V = rng.random((200, 5)) @ rng.random((5, 60)) + 0.01 * rng.random((200, 60))
    kw = dict(solver="mu", init="nndsvda", random_state=0, tol=0, tol_x=0, chunks=10, local=False, max_iter=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        with dask.config.set(scheduler="threads"):
            ref = dnmf.NMF(5, **kw).fit(V)
        with client.as_current():
            got = dnmf.NMF(5, **kw).fit(V)
    np.testing.assert_array_equal(got.components_, ref.components_)
    heads = {}  # each graph holds the earlier passes' too, as its dependencies
    for g in graphs:
        for key in g:
            if isinstance(key, tuple) and key[1:] == ("H",) and key[0].startswith("dnmf-step"):
                heads.setdefault(key, g)
    ahead = [(g, key) for key, g in heads.items()]
    assert len(ahead) >= 4
    for graph, head in ahead:
        steps = [key for key in graph if key[0] == head[0] and len(key) == 2 and isinstance(key[1], int)]
        assert len(steps) == 20
        sums = get_dependencies(graph, head) - {key for key in graph if key[0] == head[0]}
        for key in steps:
            deps = get_dependencies(graph, key)
            assert head not in deps and sums <= deps
    tokens = client.run(lambda: list(rows._SHARED_H))
    assert all(any(t.startswith(head[0]) for t in per_worker) for per_worker in tokens.values() for head in [ahead[-1][1]])
