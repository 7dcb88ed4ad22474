"""Fused replicates: fits of one V run concurrently share every pass over V.

R fits (replicates of one rank with different seeds, or of different ranks) run their own
driver loops in R threads, as restarts do (:func:`dnmf.run.restarts.run_concurrently`); their
H updates stay theirs, on the client. Each fit's solver is a :class:`FusedSolver`: where the
row :class:`~dnmf.solvers.rows.Solver` would run a pass over V on its own (the partials at a
start, or a step), it hands the pass to the shared :class:`FusedPasses` and waits. Once every
fit in flight has handed in a pass, one graph runs them all: one task per row block reads V_i
once and runs each fit's kernel on it (:func:`dnmf.kernels.fused.fused_block`), then each
fit's W is persisted and its partials are summed in its own fixed-order tree, the tree of the
fit run alone. A fit whose loop stops leaves, and the others go on without it.

Each fit's block computations, their inputs and their summation order are those of the fit
run alone, so each fused fit equals, bit for bit, the same fit run alone with its seed (dense
or sparse V, MU for any β, HALS, BPP; in process or as Dask graphs). V's scan (its sums and
validation) is made once for all the fits too. So R fits read V once per iteration instead
of R times; and where the work is V's products (dense, β = 2) the fits' products of a tile
of V are one GEMM, R times the arithmetic intensity, wherever the BLAS gives each fit's bits
inside it (measured: :mod:`dnmf.kernels.fused`).

V laid out as a 2-D grid (:mod:`dnmf.solvers.grid`) is fused the same way: each fit's solver
is then a :class:`FusedGridSolver`, which hands in its graph (a start or a step, a
:class:`~dnmf.solvers.grid.GridWork`) instead of running it; the graphs handed in run as one
(:func:`~dnmf.solvers.grid.run_grid`), each of their passes over V's chunks (pass B, which
updates W, and pass A, the partials) one task per chunk V_ij that reads it once and runs every
fit's kernel on it (:func:`~dnmf.kernels.fused.fused_chunk`); each fit's H and W updates and
its sums, over j per row block and over i per column block, are its own tasks and trees, as
alone. So each fused grid fit is bitwise the fit alone too, and R fits read V twice per
iteration (as one fit on the grid does) instead of 2R times. A masked V (or missing values)
raises :class:`~dnmf.errors.ParameterError`: those fits run one by one.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import dask
import dask.array as da
import numpy as np
from dask.utils import parse_bytes

from .. import kernels
from ..data.store import Matrix, MatrixStats, scan_matrix
from ..errors import ParameterError
from ..graph import IN_PROCESS, TaskGraph, realign, row_block_keys
from ..kernels.fused import START, STEP, fused_block
from .grid import GridSolver, GridWork, run_grid
from .rows import Solver, _add_step_partials, _blocks_array, _w_blocks

LARGE_GRAPH = "distributed.admin.large-graph-warning-threshold"  # dask's setting (see _as_graph)


@dataclass(frozen=True)
class _Pass:
    """One fit's pass over V, as handed in: its solver, what to compute and its inputs."""

    solver: FusedSolver
    kind: str
    W: da.Array
    H: np.ndarray
    HHt: np.ndarray | None
    with_loss: bool
    exact: bool


class FusedPasses:
    """The passes over V of the fits in flight, run together (see the module docstring).

    Use one per V: ``with passes.member() as member: fit(..., fused=member)`` in each fit's
    thread. ``n_passes`` counts the passes over V made (each serving one or more fits),
    ``n_fit_passes`` the passes the fits asked for (on a grid, a pass is a start's or a step's
    graph: a step reads V twice, for every fit in the pass).
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._members: set[int] = set()
        self._pending: dict[int, _Pass] = {}
        self._results: dict[int, Any] = {}
        self._scans: dict = {}
        self._next = 0
        self._expected = 0
        self.n_passes = 0
        self.n_fit_passes = 0
        self.n_scans = 0

    def expect(self, n: int) -> None:
        """Wait for ``n`` more members to join before running a pass (the fits about to start
        in other threads), so that the first passes serve them all."""
        with self._cond:
            self._expected += n

    @contextlib.contextmanager
    def member(self):
        """A fit's membership for the duration of the ``with`` block (its whole fit)."""
        with self._cond:
            token = self._next
            self._next += 1
            self._members.add(token)
            self._expected = max(0, self._expected - 1)
        try:
            yield FusedMember(self, token)
        finally:
            with self._cond:
                self._members.discard(token)
                self._pending.pop(token, None)
                self._run_if_ready()

    def scan(self, matrix: Matrix, with_xlogx: bool) -> MatrixStats:
        """V's scan, made once for every fit (with Σ V log V when any asks for it first)."""
        with self._cond:
            key = (id(matrix.data), with_xlogx)
            if key not in self._scans:
                self._scans[key] = (matrix.data, scan_matrix(matrix, with_xlogx=with_xlogx))
                self.n_scans += 1
            return self._scans[key][1]

    def cached(self, plan, matrix: Matrix, place: Callable[[Any, Matrix], Matrix]) -> Matrix:
        """``place(plan, matrix)`` (V where ``plan`` says it lives: the pipeline's
        :func:`~dnmf.run.plan.apply_cache`), once for every fit: they share one copy of V."""
        with self._cond:
            key = ("placed", id(matrix.data), plan.storage)
            if key not in self._scans:
                self._scans[key] = (matrix.data, place(plan, matrix))
            return self._scans[key][1]

    def run(self, token: int, request: _Pass):
        """Hand in a pass and wait until it has run with the others; its result."""
        with self._cond:
            self._pending[token] = request
            self._run_if_ready()
            while token not in self._results:
                self._cond.wait()
            result = self._results.pop(token)
        if isinstance(result, BaseException):
            raise result
        return result

    def _run_if_ready(self) -> None:
        """Run the pending passes once every member has handed one in (holding the lock)."""
        if not self._pending or len(self._pending) < len(self._members) or self._expected:
            return
        tokens = sorted(self._pending)
        requests = [self._pending.pop(token) for token in tokens]
        try:
            outcomes = _run_together(requests)
        except BaseException as error:  # noqa: BLE001 - every fit of the pass gets the error, raised in its thread
            outcomes = [error] * len(requests)
        self.n_passes += 1
        self.n_fit_passes += len(requests)
        self._results.update(zip(tokens, outcomes))
        self._cond.notify_all()


@dataclass(frozen=True)
class FusedMember:
    """One fit's handle on the shared :class:`FusedPasses` (what ``fit(..., fused=)`` takes)."""

    passes: FusedPasses
    token: int

    def scan(self, matrix: Matrix, with_xlogx: bool = False) -> MatrixStats:
        return self.passes.scan(matrix, with_xlogx)

    def cached(self, plan, matrix: Matrix, place: Callable[[Any, Matrix], Matrix]) -> Matrix:
        return self.passes.cached(plan, matrix, place)

    def solver(self, solver) -> FusedSolver | FusedGridSolver:
        """``solver`` as a :class:`FusedSolver` (the plain row solver) or a
        :class:`FusedGridSolver` (the grid solver) of this member."""
        fused = {Solver: FusedSolver, GridSolver: FusedGridSolver}.get(type(solver))
        if fused is None:
            raise ParameterError(
                f"Fused replicates run the plain row-block or grid solver only, not {type(solver).__name__} "
                "(a mask or missing values); run those fits one by one."
            )
        values = {f.name: getattr(solver, f.name) for f in fields(solver) if f.init}
        return fused(**values, member=self)


@dataclass(frozen=True)
class FusedSolver(Solver):
    """A row-block :class:`~dnmf.solvers.rows.Solver` whose passes over V run with the other
    fits' (see the module docstring); its results are bitwise the plain solver's."""

    member: FusedMember | None = None
    pipelines: ClassVar[bool] = False

    def _start_pass(self, W: da.Array, H: np.ndarray, exact: bool):
        return self.member.passes.run(self.member.token, _Pass(self, START, W, H, None, False, exact))

    def _w_pass(self, state, H: np.ndarray, HHt: np.ndarray, with_loss: bool = True, exact: bool = False):
        W, partials = self.member.passes.run(self.member.token, _Pass(self, STEP, state.W, H, HHt, with_loss, exact))
        return W, None, partials

    def _w_pass_local(self, W: da.Array, H: np.ndarray, HHt: np.ndarray, with_loss: bool = True, exact: bool = False):
        return self.member.passes.run(self.member.token, _Pass(self, STEP, W, H, HHt, with_loss, exact))


@dataclass(frozen=True)
class _GridPass:
    """One grid fit's graph, as handed in: its solver and the graph (a start or a step)."""

    solver: FusedGridSolver
    work: GridWork


@dataclass(frozen=True)
class FusedGridSolver(GridSolver):
    """A :class:`~dnmf.solvers.grid.GridSolver` whose graphs (starts and steps, each with its
    passes over V's chunks) run with the other fits' (see the module docstring); its results
    are bitwise the plain grid solver's."""

    member: FusedMember | None = None

    def _run(self, work: GridWork):
        return self.member.passes.run(self.member.token, _GridPass(self, work))


def _run_together(requests: list) -> list:
    """One pass over V for every request, in the requests' order: (W, partials) for a row
    fit's, the grid solver's result (a state or a step) for a grid fit's graph."""
    outcomes: list = [None] * len(requests)
    grid = [k for k, req in enumerate(requests) if isinstance(req, _GridPass)]
    rows = [k for k, req in enumerate(requests) if not isinstance(req, _GridPass)]
    if grid:
        works = [requests[k].work for k in grid]
        outcomes_grid = run_grid(requests[grid[0]].solver.matrix, works)
        for k, outcome in zip(grid, outcomes_grid):
            outcomes[k] = outcome
    if rows:
        row_requests = [requests[k] for k in rows]
        run = _in_process if all(req.solver.local for req in row_requests) else _as_graph
        for k, outcome in zip(rows, run(row_requests)):
            outcomes[k] = outcome
    return outcomes


def _fit_w(results: list, r: int) -> np.ndarray:
    """Fit ``r``'s new W_b from a fused block's results (a step's ``(W_b, partials)``)."""
    return results[r][0]


def _partials_of(results: list) -> list:
    """Each fit's partials from a fused block's results (a step's ``(W_b, partials)`` gives
    partials)."""
    return [part if isinstance(part, kernels.Partials) else part[1] for part in results]


def _add_fits(combines: tuple, a: list, b: list) -> list:
    """The sums of two fused tree nodes, fit by fit: ``combines[r]`` of fit r's values, each
    realigned first as the fit's own tree realigns its values (:func:`~dnmf.graph.realign`)."""
    return [combine(realign(x), realign(y)) for combine, x, y in zip(combines, a, b)]


def _columns(requests: list[_Pass]) -> tuple:
    """The per-replicate arguments of :func:`fused_block`, besides V_b and W_b."""
    return (
        [req.kind for req in requests],
        [req.solver.rule for req in requests],
        [req.with_loss for req in requests],
        [req.exact for req in requests],
    )


def _in_process(requests: list[_Pass]) -> list[tuple]:
    """The pass in this thread, block by block (the local path's order and trees)."""
    V = requests[0].solver._v_blocks()
    Ws = [_w_blocks(req.W) for req in requests]
    kinds, rules, losses, exact = _columns(requests)
    Hs, HHts = [req.H for req in requests], [req.HHt for req in requests]
    per_block = [fused_block(V[b], kinds, [W[b] for W in Ws], Hs, HHts, rules, losses, exact) for b in range(len(V))]
    outcomes = []
    for r, req in enumerate(requests):
        results = [block[r] for block in per_block]
        if req.kind == START:
            outcomes.append((_blocks_array(Ws[r], req.W), IN_PROCESS.reduce(results, kernels.add_partials)))
        else:
            W_new = _blocks_array([w for w, _ in results], req.W)
            outcomes.append((W_new, IN_PROCESS.reduce([part for _, part in results], kernels.add_partials)))
    return outcomes


def _as_graph(requests: list[_Pass]) -> list[tuple]:
    """The pass as one Dask graph: a task per row block for every fit, then each fit's tree."""
    matrix = requests[0].solver.matrix
    graph = TaskGraph("dnmf-fused", [*requests[0].solver._inputs, *[req.W for req in requests]])
    n_blocks = len(matrix.row_chunks)
    kinds, rules, losses, exact = _columns(requests)
    Hs = [graph.constant(("H", r), req.H) for r, req in enumerate(requests)]
    HHts = [None if req.HHt is None else graph.constant(("HHt", r), req.HHt) for r, req in enumerate(requests)]
    w_keys = [row_block_keys(req.W) for req in requests]
    tasks = graph.map(
        fused_block, matrix.block_inputs(), [kinds] * n_blocks, [[keys[b] for keys in w_keys] for b in range(n_blocks)],
        [Hs] * n_blocks, [HHts] * n_blocks, [rules] * n_blocks, [losses] * n_blocks, [exact] * n_blocks, label="pass",
    )
    # Each fit's W, a task per block; the fits' partials summed in one tree over the pass's
    # tasks whose every node adds each fit's values as that fit's own tree would (the same
    # leaves, grouping and order: bitwise the same sums), instead of a tree and a getitem per
    # block for every fit: 36 fits of 20 blocks made ~1600 tasks a pass, now ~750.
    w_blocks = [None if req.kind == START else graph.map_blocks(_fit_w, tasks, r, array=f"W{r}")
                for r, req in enumerate(requests)]
    combines = tuple(kernels.add_partials if req.kind == START else _add_step_partials for req in requests)
    if n_blocks > 1:
        total = graph.reduce(tasks, functools.partial(_add_fits, combines), label="partials")
    else:  # the one block's partials, taken on its worker (its W's stay there)
        (total,) = graph.map(_partials_of, tasks, label="partials")
    collections = [
        req.W if blocks is None else graph.array(blocks, req.W.chunks, req.W.dtype)
        for req, blocks in zip(requests, w_blocks)
    ]
    # The fits' H's (and HHᵀ's) are in the graph once each, keys that every block's task reads:
    # what the pass needs, not repeated (0.8 MB a fit at r = 10, p = 20000). So dask's warning
    # about a large graph, given on every pass from about 12 such fits, is raised by their bytes.
    constants = sum(req.H.nbytes + (0 if req.HHt is None else req.HHt.nbytes) for req in requests)
    with dask.config.set({LARGE_GRAPH: parse_bytes(str(dask.config.get(LARGE_GRAPH, "10MB"))) + constants}):
        persisted = dask.persist(*collections, graph.delayed(total), optimize_graph=False)
    Ws, (partials,) = persisted[: len(requests)], dask.compute(persisted[-1])
    return list(zip(Ws, partials))
