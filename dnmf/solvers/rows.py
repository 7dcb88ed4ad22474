"""One NMF iteration as a Dask graph over V's row blocks.

An iteration updates H first, then W (the order of Lee & Seung's presentation):

1. on the client, H ← update(H, partials) from the reduced r x p / r x r partials of the
   previous pass (H is small: r x p);
2. one task per row block i reads V_i once, updates W_i from V_i Hᵀ and HHᵀ, and computes
   the partials at the new (W_i, H) that the next H update and the objective need;
3. the partials are summed in a fixed-order tree, W is persisted, the small sums computed (the
   tree's root folded here, from the sums below it: one hop fewer on a cluster).

So V is read once per iteration, only r x p and r x r sums travel to the client, and the
graph never grows: each iteration starts from persisted W.
"""

from __future__ import annotations

import contextlib
import operator
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import dask
import dask.array as da
from dask.delayed import Delayed
import numpy as np
from distributed import futures_of

from .. import kernels
from ..cluster import current_client
from ..data.resident import contiguous_placement
from ..errors import ParameterError
from ..data.missing import mask_block_keys
from ..kernels import Partials, Rule, masked
from ..data.store import Matrix, kl_offset
from ..graph import IN_PROCESS, Blocks, Key, TaskGraph, call_aligned, compute, from_blocks, map_blocks, row_block_keys, tree_fold

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


# The Gram identity's objective carries rounding of about ½‖V‖² × eps(dtype) × a small factor
# (the products' sums), the KL objective as much of its constant; the stop rule compares
# relative decreases with tol. Below this many eps(dtype) / tol of those sums that rounding
# could reach a tenth of tol, and the objective is formed entry by entry instead. float32 with tol = 1e-4: below ~2% of ½‖V‖² (a relative
# error under ~14%); float64: below ~4e-11 of it.
EXACT_ROUNDING_FACTOR = 16


def exact_below(size: float, dtype, tol: float) -> float:
    """The objective below which β = 2 or 1 evaluates it entry by entry (see :class:`Solver`).

    ``size`` is what the objective's sums are made of: ½‖V‖² for β = 2 (the Gram identity),
    Σ V (1 + |log V|) for β = 1 (the constant Σ V log V − Σ V and the cross term).
    """
    eps = float(np.finfo(np.dtype(dtype)).eps)
    return size * min(1.0, EXACT_ROUNDING_FACTOR * eps / max(tol, 1e-12))


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
    penalty : the L1 / L2 penalty terms included in ``objective`` (0 unregularized), so that
        ``objective - penalty`` is the divergence alone.
    ahead : the next iteration's pass, already submitted to the cluster (:class:`Pass`), or
        None. Dropping the state drops it (its futures released, its tasks cancelled).
    """

    W: da.Array
    H: np.ndarray
    partials: Partials
    objective: float
    steps: tuple | None = None
    penalty: float = 0.0
    ahead: Pass | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Pass:
    """A pass over V submitted to a dask.distributed cluster and not yet waited for.

    H : the pass's H: an ndarray, or (a pass submitted ahead) the persisted result of the
        task that updated it from the previous pass's partials.
    W : the new W (a view of ``steps``, or its own persisted blocks).
    steps : the persisted step results when they are kept (:func:`small_h`), else None.
    sums : the persisted top of the partials' tree.
    with_loss, exact : what the steps computed.
    """

    H: Any
    W: da.Array
    steps: tuple | None
    sums: list
    with_loss: bool
    exact: bool


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
    kl_offset : Σ V log V − Σ V, the constant of the KL objective (β = 1 only); None to have
        it computed here by one extra scan of V when needed.
    local : run the same per-block kernels in this thread, block by block, instead of as a
        Dask graph (for small in-memory V, where the graph's overhead would dominate). The
        blocks, their order and the reduction tree are the graph's, so the results are the
        same bit for bit.
    exact_below : β = 2 and 1: once the objective is below this, it is evaluated entry by
        entry (the residual V − WH, or the KL terms in float64) rather than from the Gram
        identity or the KL constant, whose rounding in V's dtype would then swamp the stop
        rule's relative decreases (see :func:`exact_below`); 0 never.
    """

    matrix: Matrix
    rule: Rule
    v_sq: float
    update_h: bool = True
    kl_offset: float | None = None
    local: bool = False
    exact_below: float = 0.0
    _blocks: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    # Whether step(ahead=...) may submit the next pass early (a fused fit's passes wait for
    # the other fits' instead).
    pipelines: ClassVar[bool] = True

    @property
    def _inputs(self) -> list:
        """The collections every pass reads besides W (V)."""
        return [self.matrix.data]

    def start(self, W: da.Array, H: np.ndarray) -> SolverState:
        """The state at a starting point: one pass over V for the partials at (W, H) (two
        when the objective turns out below :attr:`exact_below`)."""
        H = np.ascontiguousarray(H, dtype=self.matrix.dtype)
        W = W.rechunk((self.matrix.row_chunks, (H.shape[0],)))
        W, partials = self._start_pass(W, H, exact=False)
        HHt = kernels.gram(H.T)
        objective = self._objective(partials, H, HHt)
        if self._exact(objective):
            W, partials = self._start_pass(W, H, exact=True)
            objective = self._objective(partials, H, HHt, exact=True)
        penalty = self._penalty(partials, H)
        return SolverState(W, H, partials, objective + penalty, penalty=penalty)

    def _start_pass(self, W: da.Array, H: np.ndarray, exact: bool):
        """(W laid out for the steps, the partials at (W, H)) from one pass over V."""
        if self.local:
            W_blocks = _w_blocks(W)
            partials = self._initial_partials(IN_PROCESS, self._v_blocks(), W_blocks, H, exact)
            return _blocks_array(W_blocks, W), partials
        graph = TaskGraph("dnmf-start", [*self._inputs, W])
        parts = self._initial_parts(graph, self.matrix.block_inputs(), row_block_keys(W), H, exact)
        total = graph.reduce(parts, kernels.add_partials)
        # W's blocks (made here by the start's tasks, unless W was persisted) where the steps
        # will run, so that the first pass moves none of them.
        with self._placed(parts, row_block_keys(W)):
            W, partials = dask.persist(W, graph.delayed(total), optimize_graph=False)
        return W, compute(partials)[0]

    def _exact(self, objective: float) -> bool:
        """Whether the objective is too small for the Gram identity (β = 2) or for the KL
        constant's cancellation (β = 1), unmasked."""
        return (self.rule.frobenius or self.rule.kullback_leibler) and objective < self.exact_below

    def _initial_partials(self, blocks: Blocks, V: list, W: list, H: np.ndarray, exact: bool = False) -> Partials | Key:
        """The partials at (W, H): a task per row block of V, summed in the fixed tree, on a
        :class:`~dnmf.graph.TaskGraph` (V and W as keys) or in process (as blocks)."""
        return blocks.reduce(self._initial_parts(blocks, V, W, H, exact), kernels.add_partials)

    def _initial_parts(self, blocks: Blocks, V: list, W: list, H: np.ndarray, exact: bool = False) -> list:
        """The per-block partials at (W, H), before they are summed (:meth:`_initial_partials`)."""
        return blocks.map(kernels.initial_partials_block, V, W, blocks.constant("H", H), self.rule, exact)

    def _step_tasks(self, graph: TaskGraph, V: list, W: list, H, HHt, with_loss: bool, exact: bool = False) -> list[Key]:
        """A step task per row block: W_i updated, then the partials at (W_i, H)."""
        return graph.map(kernels.step_block, V, W, H, HHt, self.rule, with_loss, exact)

    def _update_h(self, H: np.ndarray, partials: Partials) -> np.ndarray:
        return self._h_update(H, partials, self.rule)

    @property
    def _h_update(self):
        """The H update, ``(H, partials, rule) -> H``: a module-level function, for a task."""
        return kernels.update_h

    def _needs_loss(self, evaluate: bool) -> bool:
        """Whether a step computes the objective's per-entry work (free for β = 2)."""
        return evaluate or self.rule.frobenius

    def step(self, state: SolverState, evaluate: bool = True, ahead: bool | None = None) -> Step:
        """One iteration: H from the partials, then one pass over V that updates W.

        ``evaluate=False`` skips the objective where it costs work per entry of V (β ≠ 2,
        unmasked): the new state's objective is then NaN.

        ``ahead`` (the next iteration's ``evaluate``; None: no next iteration) asks for the
        next iteration's pass to be submitted before this one is waited for, on a
        dask.distributed cluster: its H update runs on the workers from this pass's partials
        (each worker's steps update H once, and a task gives it to this process), and its
        steps follow on the workers without a round trip through this process (~30 ms of a
        140 ms iteration on a 2-worker LocalCluster here). The new state carries that pass
        (``ahead``); the next :meth:`step` takes it up when it asks for what it computes, and
        otherwise drops it. Every value is the same, bit for bit, either way.
        """
        H_old = state.H
        with_loss = self._needs_loss(evaluate)
        exact = evaluate and self._exact(state.objective - state.penalty)
        pipelined = ahead is not None and self.pipelines and self.update_h
        following = None
        if self.local:
            H = self._next_h(state)
            W, partials = self._w_pass_local(state.W, H, kernels.gram(H.T), with_loss, exact)
            steps = None
        elif not pipelined and state.ahead is None:
            H = self._next_h(state)
            W, steps, partials = self._w_pass(state, H, kernels.gram(H.T), with_loss, exact)
        else:
            pending = state.ahead
            if pending is None or (pending.with_loss, pending.exact) != (with_loss, exact):
                pending = self._submit(state.W, state.steps, self._next_h(state), with_loss, exact)
            if pipelined and futures_of(pending.sums):  # only a distributed client's persist is asynchronous
                following = self._submit(pending.W, pending.steps, pending, self._needs_loss(ahead), False)
            W, steps, partials, H = self._finish(pending, state)
        HHt = kernels.gram(H.T)
        h_norm, h_delta = np.linalg.norm(H), np.linalg.norm(H - H_old)
        h_change = float(h_delta / max(h_norm, np.finfo(float).tiny)) if h_norm else relative_change(float(h_delta), 0.0)
        w_change = relative_change(partials.dw_sq, partials.w_sq)
        penalty = self._penalty(partials, H)
        objective = self._objective(partials, H, HHt, exact) + penalty if with_loss else float("nan")
        if following is not None and ahead and self._exact(objective - penalty):
            following = None  # the next pass forms the objective entry by entry: submitted again
        return Step(SolverState(W, H, partials, objective, steps, penalty, following), w_change, h_change)

    def _next_h(self, state: SolverState) -> np.ndarray:
        """H updated from ``state``'s partials, here (``state.H`` when H is fixed)."""
        return self._update_h(state.H, state.partials) if self.update_h else state.H

    def settled(self, state: SolverState) -> SolverState:
        """``state`` without a pass submitted ahead (its tasks cancelled)."""
        return state if state.ahead is None else replace(state, ahead=None)

    def _w_pass(self, state: SolverState, H: np.ndarray, HHt: np.ndarray, with_loss: bool = True, exact: bool = False):
        """One pass over V on the graph: (W, the persisted step results, the reduced partials)."""
        return self._finish(self._submit(state.W, state.steps, H, with_loss, exact), state)[:3]

    def _submit(self, W: da.Array, steps: tuple | None, H, with_loss: bool, exact: bool) -> Pass:
        """Submit a pass over V from W (and its step results, if kept) with ``H``: an ndarray,
        or the :class:`Pass` whose partials update H in a task first (a pass submitted ahead)."""
        collections = [*self._inputs, W, *(steps or ())]
        if isinstance(H, Pass):
            prior = H.H
            graph = TaskGraph("dnmf-step", [*collections, *H.sums, prior if isinstance(prior, Delayed) else None])
            previous = (operator.getitem, prior.key, 0) if isinstance(prior, Delayed) else graph.constant("H0", prior)
            inputs = (f"{graph.name}/H", self._h_update, self.rule, previous, *[total.key for total in H.sums])
            # The H task gives this process (H, HHᵀ), and the next pass its H. The steps do
            # not wait for it: each worker updates H itself from the same sums, once (see
            # _shared_updated_h), so the first steps follow the last partials with one hop
            # of the scheduler's fewer, and no transfer of H between the workers.
            head = graph.task("H", _shared_updated_h, *inputs)
            shared = (_shared_updated_h, *inputs)
            h, hht = (operator.getitem, shared, 0), (operator.getitem, shared, 1)
            shortcuts = small_h(W.shape[1] * self.matrix.shape[1] * self.matrix.dtype.itemsize, len(self.matrix.row_chunks))
        else:
            graph = TaskGraph("dnmf-step", collections)
            shortcuts = small_h(H.nbytes, len(self.matrix.row_chunks))
            if shortcuts:
                # H goes into every step task: no task of its own to schedule, and no transfer of
                # it from the worker that ran that task (~8 ms of a 2-worker LocalCluster
                # iteration here).
                h, hht = H, kernels.gram(H.T)
            else:
                # H once, as a key of its own; HHᵀ (r×r) in every task: one array for the workers
                # to pass around instead of two, which the scheduler put on different workers, so
                # that both waited for a transfer before their first step.
                h, hht = graph.constant("H", H), kernels.gram(H.T)
        # W_i from the previous step's (W_i, partials_i) results when there are any: the
        # kernels take either (see _w_of).
        w = row_block_keys(W) if steps is None else [(_w_of, step.key) for step in steps]
        step_keys = self._step_tasks(graph, self.matrix.block_inputs(), w, h, hht, with_loss, exact)
        # The tree's first level takes the step results, (W_i, partials_i), as they are:
        # one task fewer per block than a getitem for each partials_i. Its root is folded by
        # :meth:`_finish` (or the next pass's H task) from the sums it would fold: a hop fewer
        # between the last step and the H update.
        parts = step_keys if len(step_keys) > 1 else graph.map(operator.getitem, step_keys, 1, label="partials")
        top = graph.reduce_below_root(parts, _add_step_partials, label="partials")
        heads = [head] if isinstance(H, Pass) else []
        with self._placed(step_keys):
            return self._persist(graph, W, H, step_keys, top, heads, shortcuts, with_loss, exact)

    def _placed(self, *per_block: list):
        """A context for persisting a pass on a distributed cluster: its tasks run in the order
        of V's row blocks, and those of a V streamed from its store in runs of blocks, one run
        per worker. Each list of ``per_block`` has a key per row block; no-op without a
        distributed client.

        - Order: dask orders tasks alike by their keys as strings, so that blocks 0, 1, 10, 100,
          101, ... ran in that order, and the partials' tree (consecutive blocks) waited with
          their results: 35 step results (30 MiB) held on one 512 MiB worker streaming a
          152-block sparse V (HALS). A priority falling with the block puts them in order.
        - Runs (:func:`~dnmf.data.resident.contiguous_placement`; loose: a worker gone leaves
          its tasks to the others): the tree's nodes then find their leaves on their worker.
          Blocks in the workers' memory already decide where their tasks run.
        """
        client = current_client()
        if client is None:
            return contextlib.nullcontext()
        n_blocks = len(self.matrix.row_chunks)
        threads = client.nthreads() if self.matrix.reads_inline and n_blocks > 1 else {}
        if len(threads) < 2:
            order = {key: -b for keys in per_block for b, key in enumerate(keys)}
            return dask.annotate(priority=lambda key: order.get(key, 0))
        runs = contiguous_placement(n_blocks, threads)
        where = {key: [runs[b][0]] for keys in per_block for b, key in enumerate(keys)}
        order = {key: -runs[b][1] for keys in per_block for b, key in enumerate(keys)}
        return dask.annotate(
            priority=lambda key: order.get(key, 0), workers=lambda key: where.get(key, []), allow_other_workers=True
        )

    def _persist(self, graph: TaskGraph, W: da.Array, H, step_keys: list, top: list, heads: list, shortcuts: bool,
                 with_loss: bool, exact: bool) -> Pass:
        """Persist a pass's graph (:meth:`_submit`): the new W, the step results when kept, the
        sums, and the H task's result when there is one."""
        # No graph optimization: it would fuse and inline tasks across the collections, and
        # could run a step (a pass over V) twice.
        if shortcuts:
            # The step results are kept and the next step reads W_i from them; W's getitems
            # only run when W is read (checkpoint, re-rooting, the result).
            kept, sums, new_h = dask.persist(
                [graph.delayed(key) for key in step_keys], [graph.delayed(key) for key in top],
                [graph.delayed(key) for key in heads],
                optimize_graph=False,
            )
            W_new = map_blocks(
                "dnmf-step-W", operator.getitem, [step.key for step in kept], 0,
                chunks=W.chunks, dtype=W.dtype, dependencies=kept,
            )
            return Pass(new_h[0] if new_h else H, W_new, tuple(kept), list(sums), with_loss, exact)
        # W's blocks are kept, and the step results (with their partials) freed once reduced.
        w_keys = graph.map_blocks(operator.getitem, step_keys, 0, array="W", eager=True)
        W_new, sums, new_h = dask.persist(
            graph.array(w_keys, W.chunks, W.dtype), [graph.delayed(key) for key in top],
            [graph.delayed(key) for key in heads], optimize_graph=False,
        )
        return Pass(new_h[0] if new_h else H, W_new, None, list(sums), with_loss, exact)

    def _finish(self, pending: Pass, state: SolverState) -> tuple:
        """Wait for a submitted pass: (W, its step results, the reduced partials, H as an
        ndarray). The iterate it replaces, ``state``'s, is released (see :func:`release`)."""
        release(state.W, state.steps)
        if isinstance(pending.H, Delayed):  # (H, HHᵀ) of a pass submitted ahead
            (H, _), *sums = compute(pending.H, *pending.sums)
        else:
            H, sums = pending.H, compute(*pending.sums)
        return pending.W, pending.steps, tree_fold(list(sums), _add_step_partials), H

    def rerooted(self, state: SolverState, reroot) -> SolverState:
        """The state with W replaced by ``reroot(W, "W")`` (its values, read back from a store)
        and no step results to read W from: nothing depends on earlier iterations."""
        return replace(state, W=reroot(state.W, "W"), steps=None, ahead=None)

    def _objective(self, partials: Partials, H: np.ndarray, HHt: np.ndarray, exact: bool = False) -> float:
        """D_β(V | WH) at (W, H), the divergence alone."""
        return kernels.objective(partials, H, HHt, self.v_sq, self.rule.beta, self._kl_offset(), exact)

    def _penalty(self, partials: Partials, H: np.ndarray) -> float:
        """The rule's L1 / L2 penalty terms at (W, H) (0 unregularized)."""
        if not self.rule.regularized:
            return 0.0
        return self.rule.penalty(partials.w_l1, partials.w_sq, kernels.l1_norm(H), float(np.vdot(H, H)))

    def _kl_offset(self) -> float:
        if not self.rule.kullback_leibler:
            return 0.0
        return kl_offset(self.matrix, self.kl_offset, self._blocks)

    # The local path: the graph's tasks, run here in the same order.

    def _v_blocks(self) -> list:
        if "V" not in self._blocks:
            blocks = range(len(self.matrix.row_chunks))
            self._blocks["V"] = list(compute(*[self.matrix.data.blocks[i, 0] for i in blocks]))
        return self._blocks["V"]

    def _w_pass_local(
        self, W: da.Array, H: np.ndarray, HHt: np.ndarray, with_loss: bool = True, exact: bool = False
    ) -> tuple[da.Array, Partials]:
        results = IN_PROCESS.map(
            kernels.step_block, self._v_blocks(), _w_blocks(W), H, HHt, self.rule, with_loss, exact
        )
        partials = IN_PROCESS.reduce([part for _, part in results], kernels.add_partials)
        return _blocks_array([w for w, _ in results], W), partials


@dataclass(frozen=True)
class MaskedSolver(Solver):
    """A :class:`Solver` that minimizes the divergence over the observed entries only
    (:mod:`dnmf.kernels.masked`): NaN entries of V are missing, and so are the False entries
    of ``mask``. MU for any β (the masked updates), HALS on V with its missing entries filled
    by the current WH (an EM-style majorization). Always as Dask graphs; always evaluates
    the (masked) objective, which the step computes anyway.

    mask : optional boolean dask array shaped and row-chunked like V (True = observed).
    """

    mask: da.Array | None = None

    def __post_init__(self):
        if self.local:
            raise ParameterError("The local path runs the unmasked kernels only; use local=False with a mask.")

    @property
    def _inputs(self) -> list:
        return [self.matrix.data, self.mask]

    def _initial_parts(self, blocks: Blocks, V: list, W: list, H: np.ndarray, exact: bool = False) -> list:
        mask = mask_block_keys(self.mask, self.matrix)
        return blocks.map(masked.masked_initial_partials, V, mask, W, blocks.constant("H", H), self.rule)

    def _step_tasks(self, graph: TaskGraph, V: list, W: list, H, HHt, with_loss: bool, exact: bool = False) -> list[Key]:
        return graph.map(masked.masked_step_block, V, mask_block_keys(self.mask, self.matrix), W, H, self.rule)

    @property
    def _h_update(self):
        return masked.masked_update_h

    def _needs_loss(self, evaluate: bool) -> bool:
        return True

    def _exact(self, objective: float) -> bool:
        return False  # the masked objective is the divergence summed entry by entry already

    def _objective(self, partials: Partials, H: np.ndarray, HHt: np.ndarray, exact: bool = False) -> float:
        return max(float(partials.loss), 0.0)


def relative_change(d_sq: float, sq: float) -> float:
    """‖X_new − X_old‖ / ‖X_new‖ from ‖X_new − X_old‖² and ‖X_new‖². A factor that became all
    zero (a strong L1 penalty can do that) moved by 1; one that stayed zero, by 0."""
    if sq == 0.0:
        return 0.0 if d_sq == 0.0 else 1.0
    return float(np.sqrt(d_sq / max(sq, np.finfo(float).tiny)))


def release(*collections) -> None:
    """Drop this client's hold on the persisted blocks of ``collections``: the iterate a step
    has just replaced (its tasks are submitted, so the scheduler keeps each old block until
    the tasks reading it are done, and can still recompute it for a lost worker).

    Without this the old W stays whole in the workers beside the new one (and the step
    results) until the step returns: 3 x W's n x r at the peak instead of ~1.5 x
    (tests/test_sparse_memory.py), the part of a streaming worker's memory that grows with n.
    The state the blocks belong to must not be computed again. Nothing happens without
    dask.distributed (no futures).
    """
    for future in futures_of([c for c in collections if c is not None]):
        future.release()


# (H, HHᵀ) of the last passes, by pass, in each process that runs step tasks
# (_shared_updated_h): two, so that two fits on one cluster do not evict each other's at every
# pass, and an H over 16 MiB not kept (what is kept stays in the workers after the fit).
_SHARED_H: OrderedDict = OrderedDict()
_SHARED_H_LOCK = threading.Lock()
SHARED_H_PASSES = 2
SHARED_H_MAX_BYTES = 16 * 2**20


def _shared_updated_h(token: str, update, rule: Rule, H: np.ndarray, *sums) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_updated_h` of pass ``token``, computed once in this process: its step tasks
    (and its H task) all ask for it. A value found here is one this function computed from the
    same inputs, so the steps' H is the H task's, bit for bit; a value not found (evicted, or an
    H over SHARED_H_MAX_BYTES, not kept) is computed again."""
    with _SHARED_H_LOCK:
        found = _SHARED_H.get(token)
    if found is not None:
        return found
    found = call_aligned(_updated_h, update, rule, H, *sums)
    if found[0].nbytes <= SHARED_H_MAX_BYTES:
        with _SHARED_H_LOCK:
            _SHARED_H[token] = found
            while len(_SHARED_H) > SHARED_H_PASSES:
                _SHARED_H.popitem(last=False)
    return found


def _updated_h(update, rule: Rule, H: np.ndarray, *sums) -> tuple[np.ndarray, np.ndarray]:
    """(H, HHᵀ) with H updated from the top of a pass's partials tree (the task of a pass
    submitted ahead): the fold and the update the client would do, on a worker."""
    H = update(H, tree_fold(list(sums), _add_step_partials), rule)
    return H, kernels.gram(H.T)


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
    return list(compute(*[W.blocks[i, 0] for i in range(len(keys))]))


def _blocks_array(blocks: list[np.ndarray], like: da.Array) -> da.Array:
    """A dask array holding ``blocks`` (already computed) with ``like``'s chunks."""
    return from_blocks("dnmf-W-local", [[block] for block in blocks], chunks=like.chunks, dtype=like.dtype)
