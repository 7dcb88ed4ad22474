"""The one iteration loop every solver runs: history, stopping rules, callbacks.

Each iteration appends an :class:`IterationRecord`. The loop stops when

- the relative objective decrease (f_{t-1} - f_t) / f_{t-1} < ``tol`` **and** the relative
  iterate change max(‖ΔW‖/‖W‖, ‖ΔH‖/‖H‖) < ``tol_x`` ("converged"), or
- ``max_iter`` iterations have run in all ("max_iter"), or
- ``max_time`` seconds have passed in this run ("max_time"), or
- a callback returned True ("callback"), or
- a hook asked to stop (``Hook.stop_reason``; "signal": a batch system's SIGTERM / SIGUSR1,
  see :mod:`dnmf.run.signals`), checked before every iteration.

Like scikit-learn's ``tol``, both tolerances are relative, so they do not depend on the scale
of V; ``tol_x=0`` turns the convergence stop off. The checks run after every iteration that
evaluates the objective: every iteration by default. For β ≠ 2 the objective costs a log or a
power per entry of V, so ``objective_every=k`` evaluates it only every k-th iteration (and at
the last), as scikit-learn checks its ``tol`` every 10 iterations; the records in between
have a NaN objective, and the relative decrease is then per iteration since the last one.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol

from ..errors import DivergenceError


@dataclass(frozen=True)
class IterationRecord:
    """What one iteration did: its number (from 1), objective, changes and wall seconds."""

    iteration: int
    objective: float
    rel_decrease: float
    w_change: float
    h_change: float
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StoppingRules:
    """When to stop; see the module docstring."""

    max_iter: int = 200
    tol: float = 1e-4
    tol_x: float = 1e-3
    max_time: float | None = None
    objective_every: int = 1

    def evaluates(self, iteration: int) -> bool:
        """Whether ``iteration`` (from 1) evaluates the objective."""
        return iteration % self.objective_every == 0 or iteration >= self.max_iter

    def converged(self, record: IterationRecord) -> bool:
        return record.rel_decrease < self.tol and max(record.w_change, record.h_change) < self.tol_x


class State(Protocol):
    """What the driver reads of a solver's state: the iterate and its objective."""

    W: Any
    H: Any
    objective: float


class Step(Protocol):
    """What a solver's step returns: the new state and the relative changes of W and H."""

    state: State
    w_change: float
    h_change: float


class Solver(Protocol):
    """What the driver asks of a solver: the row solver (:class:`dnmf.solvers.rows.Solver`,
    plain or masked) and the grid solver (:class:`dnmf.solvers.grid.GridSolver`) implement it.

    ``start`` computes the state at a starting (W, H); ``step`` runs one iteration, skipping
    the objective's per-entry work when ``evaluate`` is False (the new objective is then NaN),
    and may submit the next one already when told its ``evaluate`` (``ahead``; None when it
    is the last), leaving it in the new state; ``settled`` drops such a pass from a state;
    ``rerooted`` returns the same state with its distributed parts replaced by ``reroot(X,
    label)`` (X's values, read back from a store), so that nothing depends on earlier
    iterations.
    """

    def start(self, W, H) -> State: ...

    def step(self, state: State, evaluate: bool = True, ahead: bool | None = None) -> Step: ...

    def settled(self, state: State) -> State: ...

    def rerooted(self, state: State, reroot: Callable[[Any, str], Any]) -> State: ...


class Hook:
    """Something the driver calls around every iteration (a checkpoint writer, re-rooting).

    ``on_step`` sees each new state before it is recorded and may replace it by an equal one
    (re-rooting does); ``after_iteration`` sees the state and the history once the iteration
    is recorded; ``finish`` sees the last state and why the run stopped; ``stop_reason``,
    asked before every iteration, returns a reason to stop now (else None). The
    defaults do nothing.
    """

    def stop_reason(self) -> str | None:
        return None

    def on_step(self, state: State) -> State:
        return state

    def after_iteration(self, state: State, history: list[IterationRecord]) -> None:
        return None

    def finish(self, state: State, history: list[IterationRecord], stop_reason: str) -> None:
        return None


Callback = Callable[[IterationRecord], "bool | None"]


@dataclass(frozen=True)
class RunResult:
    """The end of a run: the final state, the whole history and why it stopped."""

    state: State
    history: list[IterationRecord] = field(default_factory=list)
    stop_reason: str = "max_iter"

    @property
    def n_iter(self) -> int:
        return self.history[-1].iteration if self.history else 0


def relative_decrease(previous: float, current: float) -> float:
    """(previous - current) / previous, 0 when both are 0."""
    if previous == 0:
        return 0.0
    return (previous - current) / abs(previous)


def run(
    solver: Solver,
    state: State,
    rules: StoppingRules,
    callbacks: tuple[Callback, ...] = (),
    history: list[IterationRecord] | None = None,
    hooks: tuple[Hook, ...] = (),
) -> RunResult:
    """Iterate ``solver`` from ``state`` until a stopping rule fires.

    ``history`` continues an earlier run (on resume): iteration numbers go on from its end and
    ``max_iter`` counts all iterations. ``max_time`` counts this run's seconds only. ``hooks``
    are called in their order around every iteration (see :class:`Hook`).
    """
    history = list(history or [])
    check_finite(history[-1].iteration if history else 0, 0.0, 0.0, state.objective)
    started = time.perf_counter()
    stop_reason = "max_iter"
    # A resumed run whose last recorded iteration already met the tolerances stops where the
    # uninterrupted run stopped.
    already_converged = bool(history) and rules.converged(history[-1])
    start = (history[-1].iteration if history else 0, state.objective)
    if already_converged:
        stop_reason = "converged"
    while not already_converged and (history[-1].iteration if history else 0) < rules.max_iter:
        if (asked := _asked_to_stop(hooks)) is not None:
            stop_reason = asked
            break
        tick = time.perf_counter()
        iteration = (history[-1].iteration if history else 0) + 1
        anchor = last_evaluated(history, start)
        # The next iteration's evaluate flag, when there is one: a solver on a cluster may
        # submit it before this one ends (see Solver.step).
        ahead = rules.evaluates(iteration + 1) if iteration < rules.max_iter else None
        step = solver.step(state, rules.evaluates(iteration), ahead)
        state, w_change, h_change = step.state, step.w_change, step.h_change
        del step  # a hook may replace the state (re-rooting): keep nothing of the one it replaces
        check_finite(iteration, w_change, h_change, state.objective if rules.evaluates(iteration) else 0.0)
        for hook in hooks:
            state = hook.on_step(state)
        record = IterationRecord(
            iteration=iteration,
            objective=state.objective,
            rel_decrease=decrease_since(anchor, iteration, state.objective),
            w_change=w_change,
            h_change=h_change,
            seconds=time.perf_counter() - tick,
        )
        history.append(record)
        for hook in hooks:
            hook.after_iteration(state, history)
        asked_to_stop = [bool(callback(record)) for callback in callbacks]
        if any(asked_to_stop):
            stop_reason = "callback"
            break
        if rules.converged(record):
            stop_reason = "converged"
            break
        if rules.max_time is not None and time.perf_counter() - started >= rules.max_time:
            stop_reason = "max_time"
            break
    state = solver.settled(state)  # a pass submitted ahead is not run
    if history and math.isnan(state.objective) and stop_reason != "signal":
        # Stopped (time, callback) on an iteration that skipped the objective: one more pass.
        # Not for a signal: that run is continued later, and the pass would put an objective
        # into the history that the uninterrupted run does not have.
        anchor = last_evaluated(history[:-1], start)
        state = solver.start(state.W, state.H)
        last = history[-1]
        check_finite(last.iteration, 0.0, 0.0, state.objective)
        history[-1] = IterationRecord(
            last.iteration, state.objective, decrease_since(anchor, last.iteration, state.objective),
            last.w_change, last.h_change, last.seconds,
        )
    for hook in hooks:
        hook.finish(state, history, stop_reason)
    return RunResult(state, history, stop_reason)


def _asked_to_stop(hooks: tuple[Hook, ...]) -> str | None:
    """The first stop reason a hook gives, if any."""
    for hook in hooks:
        reason = hook.stop_reason()
        if reason is not None:
            return reason
    return None


def check_finite(iteration: int, w_change: float, h_change: float, objective: float) -> None:
    """Raise :class:`~dnmf.errors.DivergenceError` when an iterate is no longer finite.

    The relative changes of W and H are computed from sums over every entry (‖W‖², ‖ΔW‖²,
    ‖H‖), so a single NaN or Inf in W or H makes them non-finite; the objective catches an
    overflow of WH. Raised before the state reaches the hooks, so no checkpoint holds it
    and the last good one stays.
    """
    if math.isfinite(w_change) and math.isfinite(h_change) and math.isfinite(objective):
        return
    where = "at the start" if iteration == 0 else f"at iteration {iteration}"
    raise DivergenceError(
        f"The fit diverged {where}: W, H or the objective became NaN or infinite (objective "
        f"{objective!r}). Likely causes: eps=0 with all-zero rows or columns in V (0/0), or V or a "
        "custom start so large or small that float arithmetic overflows. Try the default eps "
        "(1e-10), float64 data, or V rescaled (e.g. divided by its largest entry)."
    )


def last_evaluated(history: list[IterationRecord], start: tuple[int, float]) -> tuple[int, float]:
    """(iteration, objective) of the latest record with an objective, else ``start``'s."""
    for record in reversed(history):
        if not math.isnan(record.objective):
            return record.iteration, record.objective
    return start


def decrease_since(anchor: tuple[int, float], iteration: int, objective: float) -> float:
    """The relative decrease per iteration from ``anchor`` to ``iteration`` (NaN when the
    objective was not evaluated)."""
    if math.isnan(objective):
        return math.nan
    since, previous = anchor
    return relative_decrease(previous, objective) / max(1, iteration - since)
