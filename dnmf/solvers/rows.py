"""One NMF iteration as a Dask graph over V's row blocks.

An iteration updates H first, then W (the order of Lee & Seung's presentation):

1. on the client, H ← update(H, partials) from the reduced r x p / r x r partials of the
   previous pass (H is small: r x p);
2. one task per row block i reads V_i once, updates W_i from V_i Hᵀ and HHᵀ, and computes
   the partials at the new (W_i, H) that the next H update and the objective need;
3. the partials are summed in a fixed-order tree, W is persisted, the small sums computed.

So V is read once per iteration, only r x p and r x r sums travel to the client, and the
graph never grows: each iteration starts from persisted W.
"""

from __future__ import annotations

import operator
import uuid
from dataclasses import dataclass, field

import dask
import dask.array as da
import numpy as np
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

from .. import kernels, masked
from ..errors import ParameterError
from ..data.missing import mask_block_keys
from ..kernels import Partials, Rule
from ..data.store import Matrix, kl_offset
from ..graph import row_block_keys, tree_fold, tree_reduce

SOLVERS = ("mu", "hals", "bpp")

# Two shortcuts of the step graph save a task or a transfer per row block, each at the cost of
# memory of H's size per block on the workers: H copied into every step task, and the step
# results (W_i with the r×p partials_i) kept for the next step to read W_i from. They are taken
# while that memory, n_blocks × H.nbytes, stays under SMALL_H_TOTAL_BYTES (and H under
# SMALL_H_BYTES): workers keep both over the last iterations, and 512 blocks with a 64 KiB H took
# 256 MiB workers streaming V past their 80% pause mark.
SMALL_H_BYTES = 2**20
SMALL_H_TOTAL_BYTES = 4 * 2**20


def small_h(h_bytes: int, n_blocks: int) -> bool:
    """Whether the step graph copies H into each of ``n_blocks`` tasks and keeps their results."""
    return h_bytes <= SMALL_H_BYTES and h_bytes * n_blocks <= SMALL_H_TOTAL_BYTES


@dataclass(frozen=True)
class SolverState:
    """An iterate and what the next step needs from it.

    W : dask array (n, r) in V's row blocks, persisted (or, after a step, a cheap view of
        ``steps``).
    H : ndarray (r, p).
    partials : the reduced :class:`~dnmf.kernels.Partials` at (W, H).
    objective : D_β(V | WH) at (W, H).
    steps : after a step on a graph, the persisted ``(W_i, partials_i)`` results of its row
        blocks: the next step reads W_i from them directly, one task per block fewer than
        through W's chunks. None otherwise (replace W, and set this to None).
    """

    W: da.Array
    H: np.ndarray
    partials: Partials
    objective: float
    steps: tuple | None = None


@dataclass(frozen=True)
class Step:
    """The result of one iteration: the new state (a :class:`SolverState`, or the grid's
    :class:`~dnmf.grid.GridState`) and the relative changes of W and H."""

    state: SolverState
    w_change: float
    h_change: float


@dataclass(frozen=True)
class Solver:
    """Builds and runs the per-iteration graphs for one matrix and one update rule.

    matrix : the row-blocked V.
    rule : which update (MU for any β, or HALS for β = 2) and ε.
    v_sq : ‖V‖², for the Frobenius objective.
    update_h : False to keep H fixed (``transform``: solve for W only).
    masked : minimize the divergence over observed entries only (:mod:`dnmf.masked`): NaN
        entries of V are missing, and so are the False entries of ``mask``.
    mask : optional boolean dask array shaped and row-chunked like V (True = observed).
    kl_offset : Σ V log V − Σ V, the constant of the KL objective (β = 1 only); None to have
        it computed here by one extra scan of V when needed.
    local : run the same per-block kernels in this thread, block by block, instead of as a
        Dask graph (for small in-memory V, where the graph's overhead would dominate). The
        blocks, their order and the reduction tree are the graph's, so the results are the
        same bit for bit.
    """

    matrix: Matrix
    rule: Rule
    v_sq: float
    update_h: bool = True
    masked: bool = False
    mask: da.Array | None = None
    kl_offset: float | None = None
    local: bool = False
    _blocks: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.local and self.masked:
            raise ParameterError("The local path runs the unmasked kernels only; use local=False with a mask.")

    def _dependencies(self, W: da.Array) -> list:
        return [self.matrix.data, W] + ([self.mask] if self.mask is not None else [])

    def start(self, W: da.Array, H: np.ndarray) -> SolverState:
        """The state at a starting point: one pass over V for the partials at (W, H)."""
        H = np.ascontiguousarray(H, dtype=self.matrix.dtype)
        W = W.rechunk((self.matrix.row_chunks, (H.shape[0],)))
        if self.local:
            return self._start_local(W, H)
        name = f"dnmf-start-{uuid.uuid4().hex}"
        dsk = {(name, "H"): H}
        leaves = []
        blocks = zip(self.matrix.block_inputs(), row_block_keys(W), mask_block_keys(self.mask, self.matrix))
        for i, (vk, wk, mk) in enumerate(blocks):
            if self.masked:
                dsk[(name, i)] = (masked.masked_initial_partials, vk, mk, wk, (name, "H"), self.rule)
            else:
                dsk[(name, i)] = (kernels.initial_partials_block, vk, wk, (name, "H"), self.rule)
            leaves.append((name, i))
        root = tree_reduce(dsk, name, leaves, kernels.add_partials)
        graph = HighLevelGraph.from_collections(name, dsk, dependencies=self._dependencies(W))
        W, partials = dask.persist(W, Delayed(root, graph, layer=name), optimize_graph=False)
        partials = dask.compute(partials)[0]
        HHt = kernels.gram(H.T)
        return SolverState(W, H, partials, self._objective(partials, H, HHt))

    def step(self, state: SolverState, evaluate: bool = True) -> Step:
        """One iteration: H from the partials, then one pass over V that updates W.

        ``evaluate=False`` skips the objective where it costs work per entry of V (β ≠ 2,
        unmasked): the new state's objective is then NaN.
        """
        H_old = state.H
        update = masked.masked_update_h if self.masked else kernels.update_h
        H = update(H_old, state.partials, self.rule) if self.update_h else H_old
        HHt = kernels.gram(H.T)
        with_loss = evaluate or self.masked or self.rule.beta == kernels.FROBENIUS
        if self.local:
            W, partials = self._w_pass_local(state.W, H, HHt, with_loss)
            steps = None
        else:
            W, steps, partials = self._w_pass(state, H, HHt, with_loss)
        h_change = float(np.linalg.norm(H - H_old) / max(np.linalg.norm(H), np.finfo(float).tiny))
        w_change = float(np.sqrt(partials.dw_sq / max(partials.w_sq, np.finfo(float).tiny)))
        objective = self._objective(partials, H, HHt) if with_loss else float("nan")
        return Step(SolverState(W, H, partials, objective, steps), w_change, h_change)

    def _w_pass(self, state: SolverState, H: np.ndarray, HHt: np.ndarray, with_loss: bool = True):
        """One pass over V on the graph: (W, the persisted step results, the reduced partials)."""
        W = state.W
        name = f"dnmf-step-{uuid.uuid4().hex}"
        w_name, p_name = f"{name}-W", f"{name}-partials"
        shortcuts = small_h(H.nbytes, len(self.matrix.row_chunks))
        if shortcuts:
            # H goes into every step task: no task of its own to schedule, and no transfer of
            # it from the worker that ran that task (~8 ms of a 2-worker LocalCluster
            # iteration here).
            h_arg, hht_arg, dsk = H, HHt, {}
        else:
            h_arg, hht_arg = (name, "H"), (name, "HHt")
            dsk = {h_arg: H, hht_arg: HHt}
        leaves = []
        # W_i from the previous step's (W_i, partials_i) results when there are any: the
        # kernels take either (see _w_of).
        sources = [step.key for step in state.steps] if state.steps is not None else row_block_keys(W)
        blocks = zip(self.matrix.block_inputs(), sources, mask_block_keys(self.mask, self.matrix))
        for i, (vk, wk, mk) in enumerate(blocks):
            w_i = (_w_of, wk) if state.steps is not None else wk
            if self.masked:
                dsk[(name, i)] = (masked.masked_step_block, vk, mk, w_i, h_arg, self.rule)
            else:
                dsk[(name, i)] = (kernels.step_block, vk, w_i, h_arg, hht_arg, self.rule, with_loss)
            leaves.append((name, i))
        if len(leaves) == 1:
            dsk[(p_name, 0)] = (operator.getitem, leaves[0], 1)
            leaves = [(p_name, 0)]
        # The tree's first level takes the step results, (W_i, partials_i), as they are:
        # one task fewer per block than a getitem for each partials_i.
        root = tree_reduce(dsk, p_name, leaves, _add_step_partials)
        # W: a getitem per block of the step results.
        w_dsk = {(w_name, i, 0): (operator.getitem, (name, i), 0) for i in range(len(self.matrix.row_chunks))}
        dependencies = self._dependencies(W) + list(state.steps or ())
        # No graph optimization: it would fuse and inline tasks across the collections, and
        # could run a step (a pass over V) twice.
        if shortcuts:
            # The step results are kept and the next step reads W_i from them; W's getitems
            # only run when W is read (checkpoint, re-rooting, the result).
            graph = HighLevelGraph.from_collections(name, dsk, dependencies=dependencies)
            steps = [Delayed((name, i), graph, layer=name) for i in range(len(self.matrix.row_chunks))]
            steps, partials = dask.persist(steps, Delayed(root, graph, layer=name), optimize_graph=False)
            w_graph = HighLevelGraph.from_collections(w_name, w_dsk, dependencies=steps)
            W_new = da.Array(w_graph, w_name, chunks=W.chunks, dtype=W.dtype)
            return W_new, tuple(steps), dask.compute(partials)[0]
        # W's blocks are kept, and the step results (with their partials) freed once reduced.
        graph = HighLevelGraph.from_collections(w_name, {**dsk, **w_dsk}, dependencies=dependencies)
        W_new = da.Array(graph, w_name, chunks=W.chunks, dtype=W.dtype)
        W_new, partials = dask.persist(W_new, Delayed(root, graph, layer=w_name), optimize_graph=False)
        return W_new, None, dask.compute(partials)[0]

    def _objective(self, partials: Partials, H: np.ndarray, HHt: np.ndarray) -> float:
        if self.masked:
            return max(float(partials.loss), 0.0)
        return kernels.objective(partials, H, HHt, self.v_sq, self.rule.beta, self._kl_offset())

    def _kl_offset(self) -> float:
        if self.rule.beta != kernels.KULLBACK_LEIBLER:
            return 0.0
        return kl_offset(self.matrix, self.kl_offset, self._blocks)

    # The local path: the graph's tasks, run here in the same order.

    def _v_blocks(self) -> list:
        if "V" not in self._blocks:
            blocks = range(len(self.matrix.row_chunks))
            self._blocks["V"] = list(dask.compute(*[self.matrix.data.blocks[i, 0] for i in blocks]))
        return self._blocks["V"]

    def _start_local(self, W: da.Array, H: np.ndarray) -> SolverState:
        W_blocks = _w_blocks(W)
        parts = [kernels.initial_partials_block(v, w, H, self.rule) for v, w in zip(self._v_blocks(), W_blocks)]
        partials = tree_fold(parts, kernels.add_partials)
        return SolverState(_blocks_array(W_blocks, W), H, partials, self._objective(partials, H, kernels.gram(H.T)))

    def _w_pass_local(
        self, W: da.Array, H: np.ndarray, HHt: np.ndarray, with_loss: bool = True
    ) -> tuple[da.Array, Partials]:
        blocks = zip(self._v_blocks(), _w_blocks(W))
        results = [kernels.step_block(v, w, H, HHt, self.rule, with_loss) for v, w in blocks]
        partials = tree_fold([part for _, part in results], kernels.add_partials)
        return _blocks_array([w for w, _ in results], W), partials


def _w_of(step_result) -> np.ndarray:
    """W_i of a step's ``(W_i, partials_i)`` result."""
    return step_result[0]


def _add_step_partials(a, b) -> Partials:
    """:func:`kernels.add_partials` of two partials or ``step_block`` results."""
    return kernels.add_partials(a if isinstance(a, Partials) else a[1], b if isinstance(b, Partials) else b[1])


def _w_blocks(W: da.Array) -> list[np.ndarray]:
    """W's row blocks as numpy arrays, taken straight from the graph when they are there."""
    keys = row_block_keys(W)
    graph = W.__dask_graph__()
    values = [graph.get(key) for key in keys]
    if all(isinstance(v, np.ndarray) for v in values):
        return values
    return list(dask.compute(*[W.blocks[i, 0] for i in range(len(keys))]))


def _blocks_array(blocks: list[np.ndarray], like: da.Array) -> da.Array:
    """A dask array holding ``blocks`` (already computed) with ``like``'s chunks."""
    name = f"dnmf-W-local-{uuid.uuid4().hex}"
    dsk = {(name, i, 0): block for i, block in enumerate(blocks)}
    return da.Array(HighLevelGraph.from_collections(name, dsk), name, chunks=like.chunks, dtype=like.dtype)
