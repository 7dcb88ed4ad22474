"""Every parameter of a fit in one table, validated once, before any data is touched.

:data:`TABLE` lists the parameters of :class:`dnmf.NMF` (and of every other face: the function,
restarts, the rank survey, the CLI): name, default, parser, and whether the value changes the
iterates. :meth:`FitSettings.from_params` runs every parser, then the checks that involve two
parameters, and returns a frozen :class:`FitSettings`; nothing else validates a parameter.
The only checks left for later are those that need V's shape (:meth:`FitSettings.for_shape`:
the rank against min(n, p) and the default init) or the file system (the checkpoint folder).

A parser takes the value as given and returns it validated and normalised (a resolved seed,
β for a loss name, ε for None), or raises :class:`~dnmf.errors.ParameterError` naming the
parameter.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .errors import ParameterError, expected
from .run.driver import StoppingRules

SOLVERS = ("mu", "hals", "bpp")
BETA_LOSSES = {"frobenius": 2.0, "kullback-leibler": 1.0, "itakura-saito": 0.0}
INIT_METHODS = ("random", "nndsvd", "nndsvda", "nndsvdar", "custom")
MISSING_VALUES = (None, "nan")
CACHE_CHOICES = ("auto", True, False)
DEFAULT_EPS = 1e-10
DEFAULT_CHECKPOINT_EVERY = 10

# Accelerated HALS (Gillis & Glineur 2012): inner sweeps ⌊1 + α ρ⌋, where ρ is the cost of
# the products a half-step needs relative to one sweep; α = 0.5 as they recommend. A sweep
# is a Python loop over the r components, so a cap keeps its overhead below the products'.
INNER_SWEEPS_ALPHA = 0.5
MAX_AUTO_SWEEPS = 10


# ---------------------------------------------------------------------------
# Parsers: value as given -> value validated and normalised


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_int(name: str, allow_none: bool = False, allow: tuple = ()) -> Callable[[Any], Any]:
    def parse(value):
        if (value is None and allow_none) or any(value == a and type(value) is type(a) for a in allow):
            return value
        if not _is_int(value) or value < 1:
            raise ParameterError(expected(f"{name} a positive integer", value))
        return int(value)

    return parse


def _nonnegative_real(name: str, allow_none: bool = False) -> Callable[[Any], Any]:
    def parse(value):
        if value is None and allow_none:
            return None
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value >= 0:
            raise ParameterError(expected(f"{name} a non-negative number", value))
        return float(value)

    return parse


def _choice(name: str, choices) -> Callable[[Any], Any]:
    def parse(value):
        if not any(value is c or (isinstance(value, str) and value == c) for c in choices):
            raise ParameterError(expected(f"{name} in {tuple(choices)}", value))
        return value

    return parse


def beta_value(beta_loss) -> float:
    """β for a loss name or number."""
    if isinstance(beta_loss, str) and beta_loss in BETA_LOSSES:
        return BETA_LOSSES[beta_loss]
    if not isinstance(beta_loss, str) and isinstance(beta_loss, numbers.Real) and np.isfinite(beta_loss):
        return float(beta_loss)
    raise ParameterError(expected(f"beta_loss in {tuple(BETA_LOSSES)} or a number", beta_loss))


def resolve_seed(random_state) -> int:
    """An integer seed from None, an int, or a numpy RandomState / Generator."""
    if random_state is None:
        return int(np.random.SeedSequence().generate_state(1)[0])
    if isinstance(random_state, numbers.Integral) and not isinstance(random_state, bool):
        if not 0 <= random_state < 2**32:
            raise ParameterError(expected("random_state an int from 0 to 2**32 - 1", random_state))
        return int(random_state)
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(np.iinfo(np.int32).max))
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(np.iinfo(np.int32).max))
    raise ParameterError(expected("random_state None, an int, or a numpy RandomState/Generator", random_state))


def _init(value):
    if value is not None and value not in INIT_METHODS:
        raise ParameterError(expected(f"init in {INIT_METHODS}", value))
    return value


def _eps(value):
    eps = _nonnegative_real("eps")(DEFAULT_EPS if value is None else value)
    if not np.isfinite(eps):
        raise ParameterError(expected("eps a finite non-negative number (None: 1e-10)", value))
    return eps


def _chunks(value):
    if value is None:
        return None
    if isinstance(value, (tuple, list)) and value and all(_is_int(v) and v >= 1 for v in value):
        return tuple(int(v) for v in value)
    if _is_int(value) and value >= 1:
        return int(value)
    raise ParameterError(expected("chunks None, a positive number of rows per block, or a tuple of them", value))


def _column_chunks(value):
    if value is None or value == "auto":
        return value
    if isinstance(value, (tuple, list)) and value and all(_is_int(v) and v >= 1 for v in value):
        return tuple(int(v) for v in value)
    if _is_int(value) and value >= 1:
        return int(value)
    raise ParameterError(
        expected('column_chunks "auto", None, a positive number of columns per chunk, or a tuple of them', value)
    )


def _alpha_h(value):
    if isinstance(value, str) and value == "same":
        return value
    try:
        return _nonnegative_real("alpha_H")(value)
    except ParameterError:
        raise ParameterError(expected('alpha_H "same" or a non-negative number', value)) from None


def _l1_ratio(value):
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 <= value <= 1:
        raise ParameterError(expected("l1_ratio a number from 0 to 1", value))
    return float(value)


def _finite(parse: Callable[[Any], Any], name: str, what: str) -> Callable[[Any], Any]:
    def check(value):
        parsed = parse(value)
        if isinstance(parsed, float) and not np.isfinite(parsed):
            raise ParameterError(expected(f"{name} {what}", value))
        return parsed

    return check


def _verbose(value):
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if not _is_int(value) or value < 0:
        raise ParameterError(expected("verbose a non-negative integer or a bool", value))
    return int(value)


def _callbacks(value) -> tuple:
    callbacks = tuple(value or ())
    for callback in callbacks:
        if not callable(callback):
            raise ParameterError(expected("callbacks a sequence of callables", callback))
    return callbacks


def _path(name: str) -> Callable[[Any], Any]:
    def parse(value):
        if not value:  # None or "": not asked for
            return None
        if not isinstance(value, (str, os.PathLike)):
            raise ParameterError(expected(f"{name} None or a directory path", value))
        return os.fspath(value)

    return parse


def _resume(value):
    if value is None or value == "":
        return None
    if isinstance(value, str) and value == "auto":
        return "auto"
    if not isinstance(value, (str, os.PathLike)):
        raise ParameterError(expected('resume None, "auto" or a checkpoint directory', value))
    return os.fspath(value)


def _reroot_every(value):
    if value is not None and (not _is_int(value) or value < 0):
        raise ParameterError(expected("reroot_every None, 0 (never) or a positive integer", value))
    return None if value is None else int(value)


def _checkpoint_every(value):
    if value is not None and (not _is_int(value) or value < 1):
        raise ParameterError(expected("checkpoint_every a positive integer (iterations) or None", value))
    return None if value is None else int(value)


def _checkpoint_interval(value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0):
        raise ParameterError(expected("checkpoint_interval a non-negative number of seconds or None", value))
    return None if value is None else float(value)


def _local(value):
    if not (value == "auto" and isinstance(value, str)) and not isinstance(value, (bool, np.bool_)):
        raise ParameterError(expected('local "auto", True or False', value))
    return value if isinstance(value, str) else bool(value)


# ---------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class Setting:
    """One parameter: its name, default, parser, and where its parsed value goes.

    name : the parameter of :class:`dnmf.NMF`.
    default : its default.
    parse : the value as given -> the value validated and normalised.
    iterates : whether it changes W and H (a resume must match it; see :func:`iterate_settings`).
    field : the :class:`FitSettings` attribute that holds the parsed value (default: ``name``).
    help : one line for the command line's ``dnmf fit --help``; empty: not a command-line option.
    """

    name: str
    default: Any
    parse: Callable[[Any], Any]
    iterates: bool = False
    field: str = ""
    help: str = ""

    @property
    def attribute(self) -> str:
        return self.field or self.name


TABLE: tuple[Setting, ...] = (
    Setting("n_components", None, _positive_int("n_components", allow_none=True, allow=("auto",)), iterates=True,
            help="Number of components (rank of the factorization)."),
    Setting("solver", "mu", _choice("solver", SOLVERS), iterates=True,
            help="Multiplicative updates (any β), HALS or block principal pivoting (Frobenius)."),
    Setting("beta_loss", "frobenius", beta_value, iterates=True, field="beta",
            help="frobenius, kullback-leibler, itakura-saito, or a number β."),
    Setting("init", None, _init, iterates=True, help="Start; auto: nndsvda when rank <= min(n, p), else random."),
    Setting("max_iter", 200, _positive_int("max_iter"), help="Most iterations."),
    Setting("tol", 1e-4, _nonnegative_real("tol"), help="Stop when the objective's relative decrease is below this ..."),
    Setting("tol_x", 1e-3, _nonnegative_real("tol_x"), help="... and the relative change of W and H is below this."),
    Setting("max_time", None, _nonnegative_real("max_time", allow_none=True), help="Stop after this many seconds."),
    Setting("random_state", None, resolve_seed, iterates=True, field="seed",
            help="Random seed (same seed and chunks: same result, bit for bit)."),
    Setting("alpha_W", 0.0, _finite(_nonnegative_real("alpha_W"), "alpha_W", "a finite non-negative number"),
            iterates=True,
            help="Penalty of W (scikit-learn's): L1 alpha_W*l1_ratio*n_features, L2 alpha_W*(1-l1_ratio)*n_features."),
    Setting("alpha_H", "same", _finite(_alpha_h, "alpha_H", '"same" or a finite non-negative number'), iterates=True,
            help="Penalty of H, scaled by n_samples; 'same' (default): alpha_W."),
    Setting("l1_ratio", 0.0, _l1_ratio, iterates=True,
            help="Mix of the penalties: 0 is L2 only, 1 is L1 only (sparse factors)."),
    Setting("eps", None, _eps, iterates=True, help=f"Added to every denominator of the updates (default {DEFAULT_EPS:g})."),
    Setting("chunks", None, _chunks, help="Rows per block of V (default: ~64 MiB blocks, aligned with the Zarr chunks)."),
    Setting("callbacks", None, _callbacks),
    Setting("missing", None, _choice("missing", MISSING_VALUES), help="nan: NaN entries of V are missing, fit the observed ones."),
    Setting("n_runs", 1, _positive_int("n_runs"), help="Random restarts: fit this many seeds, keep the lowest objective."),
    Setting("checkpoint", None, _path("checkpoint"), help="Checkpoint folder, so `dnmf resume` can continue a killed fit."),
    Setting("resume", None, _resume,
            help="auto: continue the fit saved in --checkpoint when it holds one of this fit, start it when it "
                 "holds none; one command for every (re)submission of a batch job."),
    Setting("checkpoint_every", DEFAULT_CHECKPOINT_EVERY, _checkpoint_every, help="Iterations between checkpoints."),
    Setting("checkpoint_interval", None, _checkpoint_interval, help="Also checkpoint when this many seconds have passed."),
    Setting("cache", "auto", _choice("cache", CACHE_CHOICES),
            help="Keep V in the workers' memory: auto (when it fits half of it), true or false (stream it). "
                 "A V given in memory is sent to the workers once, whatever this says."),
    Setting("reroot_every", None, _reroot_every,
            help="Reload W from a spill every this many iterations on a cluster (default 20; 0: never)."),
    Setting("spill_dir", None, _path("spill_dir"), help="Where re-rooting spills W: a folder every worker can reach, or a URL."),
    Setting("inner_sweeps", "auto", _positive_int("inner_sweeps", allow=("auto",)),
            help="HALS: most sweeps per half-step from the same products (1: plain HALS)."),
    Setting("local", "auto", _local, help="Run the kernels in this process instead of as Dask graphs (small V)."),
    Setting("column_chunks", "auto", _column_chunks,
            help="Columns per chunk: a number for a 2-D grid of chunks (W by row blocks, H by column blocks), "
                 "'none' for row blocks holding all columns, 'auto' (default): the grid only for a very wide V."),
    Setting("verbose", 0, _verbose),
    Setting("objective_every", 1, _positive_int("objective_every"),
            help="Evaluate the objective (and check --tol) every this many iterations; for KL and other β it costs a log per entry."),
)

DEFAULTS = {setting.name: setting.default for setting in TABLE}


# ---------------------------------------------------------------------------
# The frozen settings


@dataclass(frozen=True)
class FitSettings:
    """The validated settings of one fit (see :data:`TABLE` for each field's meaning).

    ``params`` keeps the parameters as given (callbacks left out), the record a checkpoint
    stores so that a resume rebuilds the same estimator. ``n_components`` and ``init`` may be
    None until :meth:`for_shape` resolves them from V's shape.
    """

    n_components: int | None
    solver: str
    beta: float
    init: str | None
    max_iter: int
    tol: float
    tol_x: float
    max_time: float | None
    seed: int
    eps: float
    chunks: int | tuple | None
    callbacks: tuple
    missing: str | None
    n_runs: int
    checkpoint: str | None
    resume: str | None
    checkpoint_every: int | None
    checkpoint_interval: float | None
    cache: str | bool
    reroot_every: int | None
    spill_dir: str | None
    inner_sweeps: int | str
    local: str | bool
    column_chunks: Any
    objective_every: int
    alpha_W: float = 0.0
    alpha_H: float | str = "same"
    l1_ratio: float = 0.0
    verbose: int = 0
    params: Mapping = None

    @classmethod
    def from_params(cls, params: Mapping | None = None, **overrides) -> FitSettings:
        """Validate ``params`` (missing ones take their defaults) and ``overrides``."""
        given = {**DEFAULTS, **(params or {}), **overrides}
        unknown = sorted(set(given) - set(DEFAULTS))
        if unknown:
            raise ParameterError(f"Unknown parameter(s) {', '.join(unknown)}; the parameters are {', '.join(DEFAULTS)}.")
        values = {setting.attribute: setting.parse(given[setting.name]) for setting in TABLE}
        settings = cls(**values, params={k: v for k, v in given.items() if k != "callbacks"})
        settings._check_together()
        return settings

    def _check_together(self) -> None:
        if self.resume == "auto" and self.checkpoint is None:
            raise ParameterError(
                'resume="auto" continues the fit saved in the checkpoint folder, or starts it there; '
                "give that folder too (checkpoint=PATH, --checkpoint DIR)."
            )
        if self.solver in ("hals", "bpp") and self.beta != 2.0:
            raise ParameterError(
                f"solver={self.solver!r} minimizes the Frobenius loss only; got beta_loss={self.params['beta_loss']!r}. "
                "Use solver='mu' for other β-divergences."
            )

    def for_shape(self, shape: tuple[int, int], start_rank: int | None = None) -> FitSettings:
        """The settings with the rank and the init resolved for V of ``shape``.

        The rank: None is p; "auto" is ``start_rank`` (the rank of a custom W or H, as
        scikit-learn reads it) or p without one. The init: None is scikit-learn's default,
        NNDSVDa when the rank allows, else random. A rank above min(n, p) is allowed, as in
        scikit-learn, with any init but the NNDSVD ones (an SVD has only min(n, p) factors).
        """
        n, p = shape
        if self.n_components == "auto":
            r = p if start_rank is None else start_rank
        else:
            r = p if self.n_components is None else self.n_components
        init = self.init if self.init is not None else ("nndsvda" if r <= min(shape) else "random")
        if r > min(n, p) and init.startswith("nndsvd"):
            raise ParameterError(
                f"init = {init!r} can only be used when n_components <= min(n_samples, n_features): got "
                f"n_components={r} for a {n} x {p} matrix. Choose a rank between 1 and {min(n, p)}, or "
                "init='random'."
            )
        return replace(self, n_components=int(r), init=init)

    @property
    def alpha_H_value(self) -> float:
        """alpha_H resolved: alpha_W when "same"."""
        return self.alpha_W if self.alpha_H == "same" else self.alpha_H

    @property
    def nan_is_missing(self) -> bool:
        return self.missing == "nan"

    @property
    def rules(self) -> StoppingRules:
        return StoppingRules(self.max_iter, self.tol, self.tol_x, self.max_time, self.objective_every)

    def sweeps(self, shape: tuple[int, int], nnz: int) -> tuple[int, int]:
        """(W sweeps, H sweeps) per half-step of accelerated HALS, resolved for V's size."""
        return inner_sweep_counts(self.inner_sweeps, shape, nnz, self.n_components)


def iterate_settings(settings: FitSettings) -> dict:
    """The resolved values of the parameters that change the iterates, as a checkpoint records them
    (alpha_H "same" resolved to alpha_W's value)."""
    values = {setting.attribute: _plain(getattr(settings, setting.attribute)) for setting in TABLE if setting.iterates}
    values["alpha_H"] = float(settings.alpha_H_value)
    return values


# What a checkpoint written before a setting existed meant by its absence.
ITERATE_SETTINGS_BEFORE = {"alpha_W": 0.0, "alpha_H": 0.0, "l1_ratio": 0.0}


def _plain(value):
    if isinstance(value, (bool, str)) or value is None:
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def inner_sweep_counts(inner_sweeps, shape: tuple[int, int], nnz: int, r: int) -> tuple[int, int]:
    """(W sweeps, H sweeps) per half-step: ``inner_sweeps`` itself, or "auto" from V's size.

    ρ_W = 1 + (nnz + p r) / (n (r + 1)) and ρ_H = 1 + (nnz + n r) / (p (r + 1)).
    """
    if inner_sweeps != "auto":
        return int(inner_sweeps), int(inner_sweeps)
    n, p = shape

    def count(rho: float) -> int:
        return int(min(MAX_AUTO_SWEEPS, max(1, np.floor(1 + INNER_SWEEPS_ALPHA * rho))))

    return count(1 + (nnz + p * r) / (n * (r + 1))), count(1 + (nnz + n * r) / (p * (r + 1)))
