"""One NMF iteration on a 2-D grid of V's chunks, for V too wide for row blocks.

When p is so large that a row block holding all columns would have only a few rows (or H,
r x p, is too big to keep on the client), V is chunked in both dimensions: chunk (i, j) meets
only W's row block i and H's column block j. W stays distributed by row blocks and H by
column blocks; only r x r matrices and scalars reach the client.

An iteration (H first, then W, as in :mod:`dnmf.solvers`), as one graph:

1. one task per column block updates H_j from its partials (summed over the row blocks in the
   previous iteration) and WᵀW; HHᵀ and H's row sums are summed over the column blocks;
2. pass B: each chunk computes the products of V_ij and H_j that W_i's update needs
   (V_ij H_jᵀ for β = 2); one task per row block sums them over j and updates W_i;
3. pass A: each chunk computes the partials of V_ij at the new (W_i, H_j) (W_iᵀ V_ij for β = 2,
   and the divergence of the chunk otherwise); they are summed over i per column block, for
   the next H update and the objective at the new (W, H).

Every sum is a fixed-order tree, so results are bitwise reproducible on any scheduler. V is
read twice per iteration (the row layout reads it once: its row blocks hold all columns).

Each graph (a start or a step) is a :class:`GridWork`: a build that adds its own tasks and
asks for its passes over V's chunks (:class:`ChunkPass`), run by :func:`run_grid`. Alone, a
pass is a task per chunk running the kernel; fused fits (:mod:`dnmf.solvers.fused`) have their
builds run together, each pass one task per chunk for all of them.
"""

from __future__ import annotations

import operator
import uuid
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np

from .. import kernels
from ..errors import ParameterError
from ..kernels import FactorSums, Rule
from ..kernels.fused import fused_chunk
from .rows import Step, relative_change, release
from ..data.resident import to_workers
from ..data.store import Matrix, kl_offset
from ..graph import Key, TaskGraph, compute, row_block_keys

@dataclass(frozen=True)
class GridState:
    """An iterate on the grid and what the next step needs from it.

    W : dask array (n, r) in V's row blocks, persisted.
    H : dask array (r, p) in V's column blocks, persisted.
    partials : persisted Delayed objects, one per column block: the
        :class:`~dnmf.kernels.Partials` of column block j at (W, H), summed over row blocks.
    w_gram : WᵀW (r, r) (β = 2; else 0).
    objective : D_β(V | WH) at (W, H), with the penalty terms.
    penalty : the L1 / L2 penalty terms included in ``objective`` (0 unregularized).
    """

    W: da.Array
    H: da.Array
    partials: tuple
    w_gram: np.ndarray | float
    objective: float
    penalty: float = 0.0


@dataclass(frozen=True)
class GridSolver:
    """Builds and runs the per-iteration graphs on V's 2-D grid of chunks.

    The same interface as :class:`dnmf.solvers.Solver` (``start``, ``step``), for MU (any β),
    HALS and BPP, without missing entries. With several HALS sweeps per half-step, each column
    block of H stops its inner sweeps on its own.

    matrix : V chunked as a grid (``matrix.is_grid``).
    rule : the update rule.
    v_sq : ‖V‖², for the Frobenius objective.
    update_h : False to keep H fixed.
    kl_offset : Σ V log V − Σ V (β = 1); None to compute it with one extra scan when needed.
    """

    matrix: Matrix
    rule: Rule
    v_sq: float
    update_h: bool = True
    kl_offset: float | None = None
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if not self.matrix.is_grid:
            raise ParameterError("GridSolver needs V chunked along its columns too (a 2-D grid).")

    def start(self, W, H) -> GridState:
        """The state at a starting point: one pass over V for the partials at (W, H)."""
        W = W.rechunk((self.matrix.row_chunks, (W.shape[1],)))
        H = self._column_blocks(H)
        return self._run(GridWork("dnmf-grid-start", (W, H), lambda graph: self._start_tasks(graph, W, H)))

    def step(self, state: GridState, evaluate: bool = True, ahead: bool | None = None) -> Step:
        """One iteration: H_j from the partials, pass B updating W, pass A for the next partials.

        ``evaluate=False`` skips the divergence in pass A (β ≠ 2): the objective is then NaN.
        ``ahead`` is taken as a hint only: the grid's H already lives on the workers, and each
        iteration runs as it is asked for.
        """
        dependencies = (state.W, state.H, *state.partials)
        return self._run(GridWork("dnmf-grid-step", dependencies, lambda graph: self._step_tasks(graph, state, evaluate)))

    def settled(self, state: GridState) -> GridState:
        """``state`` (nothing is submitted ahead)."""
        return state

    def rerooted(self, state: GridState, reroot) -> GridState:
        """The state with W and H replaced by ``reroot(W, "W")`` and ``reroot(H, "H")`` (the same
        values, from a store) and the partials recomputed from them, so nothing depends on
        earlier iterations: bitwise the same state, for one extra pass over V."""
        return self.start(reroot(state.W, "W"), reroot(state.H, "H"))

    def _run(self, work: GridWork):
        """Run ``work``'s graph (alone here; a fused solver runs it with the other fits')."""
        return run_grid(self.matrix, [work])[0]

    def _start_tasks(self, graph: TaskGraph, W: da.Array, H: da.Array):
        """The start's graph (a :class:`GridWork` build): pass A at (W, H), the factors' sums."""
        w_keys, h_keys = row_block_keys(W), _col_keys(H)
        w_parts = graph.map(_w_sums_at_start, w_keys, self.rule, label="wsum")
        w_sums = graph.reduce(w_parts, kernels.add_factor_sums, label="w")
        p_keys, terms = yield from self._pass_a(graph, w_keys, h_keys)
        summary_key = graph.task("summary", tuple, [w_sums, terms, self._h_sums(graph, h_keys)])
        W, H, partials, summary = yield Persist(
            lambda: (W, H, [graph.delayed(key) for key in p_keys], graph.delayed(summary_key))
        )
        w_sums, terms, h_sums = compute(summary)[0]
        penalty = self._penalty(w_sums, h_sums)
        objective = self._objective(terms, w_sums.gram, h_sums.gram) + penalty
        return GridState(W, H, tuple(partials), w_sums.gram, objective, penalty)

    def _step_tasks(self, graph: TaskGraph, state: GridState, evaluate: bool):
        """The step's graph (a :class:`GridWork` build): see :meth:`step`."""
        with_loss = evaluate or self.rule.frobenius
        W, H = state.W, state.H
        rule = self.rule
        old_w, old_h = row_block_keys(W), _col_keys(H)
        # 1. H's column blocks: (H_j, its sums) from the partials of column block j.
        partials = [part.key for part in state.partials]
        h_updates = graph.map(kernels.grid_update_h, old_h, partials, state.w_gram, rule, self.update_h, label="hupd")
        new_h = graph.map_blocks(operator.getitem, h_updates, 0, array="H", axis=1)
        h_sums = graph.map(operator.getitem, h_updates, 1, label="hsum")
        h_total = graph.reduce(h_sums, kernels.add_factor_sums, label="hsums")
        # 2. Pass B: W_i from the products of its chunks with the new H, summed over j.
        chunks = yield ChunkPass(kernels.chunk_w_products, old_w, new_h, (rule,))
        products = [graph.reduce(row, kernels.add_w_products, label=f"wprod{i}") for i, row in enumerate(chunks)]
        w_updates = graph.map(kernels.grid_update_w, old_w, products, h_total, rule, label="wupd")
        new_w = graph.map_blocks(operator.getitem, w_updates, 0, array="W")
        w_sums = graph.map(operator.getitem, w_updates, 1, label="wsum")
        w_total = graph.reduce(w_sums, kernels.add_factor_sums, label="wsums")
        # 3. Pass A at the new (W, H).
        p_keys, terms = yield from self._pass_a(graph, new_w, new_h, with_loss)
        summary_key = graph.task("summary", tuple, [w_total, terms, h_total])
        W_new, H_new, partials, summary = yield Persist(
            lambda: (
                graph.array(new_w, W.chunks, W.dtype),
                graph.array(new_h, ((W.shape[1],), H.chunks[1]), H.dtype),
                [graph.delayed(key) for key in p_keys],
                graph.delayed(summary_key),
            )
        )
        release(state.W, state.H, state.partials)
        w_sums, terms, h_sums = compute(summary)[0]
        penalty = self._penalty(w_sums, h_sums)
        objective = self._objective(terms, w_sums.gram, h_sums.gram) + penalty if with_loss else float("nan")
        new_state = GridState(W_new, H_new, tuple(partials), w_sums.gram, objective, penalty)
        w_change = relative_change(w_sums.d_sq, w_sums.sq)
        h_change = relative_change(h_sums.d_sq, h_sums.sq)
        return Step(new_state, w_change, h_change)

    def _pass_a(self, graph: TaskGraph, w_keys: list, h_keys: list, with_loss: bool = True):
        """Add pass A to ``graph`` (a build's part, ``yield from`` it): the partials per column
        block (a task per chunk, summed over i) and the objective's terms (summed over j);
        returns their keys."""
        parts = yield ChunkPass(kernels.chunk_h_partials, w_keys, h_keys, (self.rule, with_loss))
        p_keys = [
            graph.reduce([row[j] for row in parts], kernels.add_partials, label=f"hpart{j}")
            for j in range(len(h_keys))
        ]
        terms = graph.map(kernels.column_objective_term, p_keys, h_keys, self.rule.beta, label="term")
        return p_keys, graph.reduce(terms, operator.add, label="terms")

    def _h_sums(self, graph: TaskGraph, h_keys: list) -> Key:
        """Add H's :class:`~dnmf.kernels.FactorSums` (HHᵀ, ‖H‖², ‖H‖₁), summed over the column
        blocks, to ``graph``."""
        return graph.reduce(graph.map(_h_sums_at_start, h_keys, label="hgram"), kernels.add_factor_sums, label="hgram")

    def _penalty(self, w_sums: FactorSums, h_sums: FactorSums) -> float:
        """The rule's L1 / L2 penalty terms from the factors' sums (0 unregularized)."""
        return self.rule.penalty(w_sums.l1, w_sums.sq, h_sums.l1, h_sums.sq)

    def _column_blocks(self, H) -> da.Array:
        """H as a dask array in V's column blocks (from numpy without holding a second copy)."""
        chunks = ((H.shape[0],), self.matrix.col_chunks)
        if isinstance(H, da.Array):
            return H.astype(self.matrix.dtype).rechunk(chunks)
        H = np.asarray(H, dtype=self.matrix.dtype)
        return to_workers(da.from_array(H, chunks=chunks, name=f"dnmf-H0-{uuid.uuid4().hex}"), "dnmf-H0")

    def _objective(self, terms: float, w_gram, h_gram) -> float:
        offset = kl_offset(self.matrix, self.kl_offset, self._cache) if self.rule.kullback_leibler else 0.0
        return kernels.objective_from_sums(terms, w_gram, h_gram, self.v_sq, self.rule.beta, offset)


def _col_keys(H: da.Array) -> list:
    return list(H.__dask_keys__()[0])


def _w_sums_at_start(W_b: np.ndarray, rule: Rule) -> FactorSums:
    gram = kernels.gram(W_b) if rule.frobenius else 0.0
    return FactorSums(gram, 0.0, float(np.vdot(W_b, W_b)), 0.0, kernels.l1_norm(W_b))


def _h_sums_at_start(H_b: np.ndarray) -> FactorSums:
    return FactorSums(kernels.gram(H_b.T), 0.0, float(np.vdot(H_b, H_b)), 0.0, kernels.l1_norm(H_b))


@dataclass(frozen=True)
class ChunkPass:
    """A pass over V's chunks that a grid graph asks for (a :class:`GridWork` build yields it):
    ``kernel(V_ij, W_i, H_j, *args)`` for every chunk (i, j), W_i and H_j given by their keys
    (``w_keys[i]``, ``h_keys[j]``). The build is sent back the keys of the results, [i][j]."""

    kernel: Callable
    w_keys: list
    h_keys: list
    args: tuple = ()


@dataclass(frozen=True)
class Persist:
    """What a :class:`GridWork` build yields once all its tasks are added: ``collections()``
    makes the collections to persist (W, H, the partials, the summary); the build is sent back
    them persisted, and returns its result."""

    collections: Callable[[], tuple]


@dataclass(frozen=True)
class GridWork:
    """One graph of a grid solver (a start or a step), to run alone or with other fits' (fused).

    prefix : what the graph is (its name's start when it runs alone).
    dependencies : the persisted collections its tasks read, besides V.
    build : ``build(graph)``, a generator that adds the graph's own tasks to ``graph``, yields a
        :class:`ChunkPass` for each pass over V it needs (and is sent its results' keys), then
        a :class:`Persist` (and is sent the persisted collections), and returns the result.
    """

    prefix: str
    dependencies: tuple
    build: Callable[[Any], Generator]


def run_grid(matrix: Matrix, works: list[GridWork]) -> list:
    """Run the graphs of ``works`` as one graph; their results, in order.

    Alone, each chunk task of a pass runs its kernel. Together (fused fits), the builds go in
    step: each round gathers the passes they ask for into one task per chunk (i, j), which
    reads V_ij once and runs each one's kernel on it (:func:`~dnmf.kernels.fused.fused_chunk`),
    and each build takes its own results from it, then sums them in its own trees, the trees it
    has alone: so each result is bitwise the graph's run alone. Everything is persisted at once.
    """
    dependencies = [matrix.data, *(dep for work in works for dep in work.dependencies)]
    graph = TaskGraph(works[0].prefix if len(works) == 1 else "dnmf-grid-fused", dependencies)
    builds = [work.build(graph if len(works) == 1 else graph.scope(f"fit{r}")) for r, work in enumerate(works)]
    asks = [next(build) for build in builds]
    rounds = 0
    while any(isinstance(ask, ChunkPass) for ask in asks):
        passing = [r for r, ask in enumerate(asks) if isinstance(ask, ChunkPass)]
        answers = _chunk_tasks(graph, matrix, [asks[r] for r in passing], rounds)
        for r, keys in zip(passing, answers):
            asks[r] = builds[r].send(keys)
        rounds += 1
    collections = [ask.collections() for ask in asks]
    persisted = dask.persist(*[c for group in collections for c in group], optimize_graph=False)
    results, at = [], 0
    for build, group in zip(builds, collections):
        try:
            build.send(persisted[at : at + len(group)])
        except StopIteration as done:
            results.append(done.value)
        else:
            raise RuntimeError("A grid graph's build goes on past its Persist.")
        at += len(group)
    return results


def _chunk_tasks(graph: TaskGraph, matrix: Matrix, asks: list[ChunkPass], label: int) -> list:
    """The tasks of one pass over V's chunks for each of ``asks``: per ask, its results' keys [i][j]."""
    rows = matrix.grid_inputs()
    if len(asks) == 1:
        (ask,) = asks
        return [[
            graph.map(ask.kernel, row, w_key, ask.h_keys, *ask.args, label=("chunk", label, i))
            for i, (row, w_key) in enumerate(zip(rows, ask.w_keys))
        ]]
    n_cols = len(matrix.col_chunks)
    funcs, args = [ask.kernel for ask in asks], [list(ask.args) for ask in asks]
    h_keys = [[ask.h_keys[j] for ask in asks] for j in range(n_cols)]
    keys: list = [[] for _ in asks]
    for i, row in enumerate(rows):
        w_keys = [ask.w_keys[i] for ask in asks]
        tasks = graph.map(fused_chunk, row, [funcs] * n_cols, [w_keys] * n_cols, h_keys, [args] * n_cols,
                          label=("chunks", label, i))
        for k in range(len(asks)):
            keys[k].append(graph.map(operator.getitem, tasks, k, label=("chunk", label, i, k)))
    return keys
