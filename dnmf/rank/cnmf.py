"""Consensus NMF (Kotliar et al. 2019): many replicates per rank, clustered into stable programs.

For every rank K, :func:`consensus` fits ``n_replicates`` NMFs of V from random starts (seeds
spawned reproducibly from one) as fused replicates (:func:`dnmf.run.fused.fit_fused`: the
replicates in flight share every pass over V, each bitwise the fit run alone), then

1. stacks the R·K rows of the replicates' H's, normalizes them, and drops the outliers whose
   local density (mean distance to their nearest neighbours) exceeds ``density_threshold``
   (:mod:`dnmf.rank.clustering`, distances by blocks);
2. clusters the rest into K clusters (k-means) and takes each cluster's median as a consensus
   program; the silhouette of the clustering is the rank's **stability**;
3. refits W with H fixed at the consensus programs (the ``transform`` path of the fit
   pipeline, streamed over V's row blocks) and records the **error** of that fit,
   sqrt(2 D(V | WH) / ‖V‖²) (‖V − WH‖ / ‖V‖ for Frobenius).

A K is suggested by :func:`suggest_k`.

**Checkpoints.** With a ``workdir``, every replicate's H is written there as soon as its fit
ends, and every rank's consensus once it is complete; a run with the same settings over the
same V in the same ``workdir`` (a job killed and started again) reads what is there and fits
only what is missing. Replicates are fitted bitwise reproducibly, and the consensus step is
deterministic, so a resumed run gives the same consensus bit for bit. Changing only the
filter (``density_threshold``, ``neighbor_fraction``) reuses the replicates and redoes the
consensus step. A rank already complete is never written again (its ``programs_K{K}.tsv`` and
``K{K}.h5ad`` are written when missing: a kill between them and its Zarr group). The input is
only read: ``K{K}.h5ad`` is a new file beside the other results. The layout of ``workdir``::

    dnmf_consensus.json        the settings and V's fingerprint (what a resume must match)
    replicates/K{K}/{i}.npz    replicate i of rank K: H, its final objective, its seed
    K{K}.zarr                  rank K: H (consensus), W (refitted), components (R·K rows of H),
                               labels, density; attrs: the measures and the filter
    programs_K{K}.tsv          the consensus programs, one column per program, one row per feature
                               (named by the input's var_names for an AnnData input)
    K{K}.h5ad                  for an AnnData input only: a new AnnData with no X, the input's
                               obs and var, obsm["X_nmf"] = W, varm["NMF_components"] = Hᵀ and
                               uns["dnmf"] the rank's measures, seeds and the run's settings
    consensus.json             the measures per rank, the suggested K and its reason
    k_plot.png                 stability and error against K
    density.png                the local-density histograms, with the threshold

References
----------
D. Kotliar, A. Veres, M. A. Nagy, et al. (2019). Identifying gene expression programs of
cell-type identity and cellular activity with single-cell RNA-Seq. eLife 8:e43803.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import uuid
import warnings
from dataclasses import replace

import dask.array as da
import numpy as np
from sklearn.exceptions import ConvergenceWarning

from ..cluster import current_client
from ..data import ondisk
from ..data.outputs import atomic_directory, check_output, mark_written
from ..data.results import anndata_frames, anndata_written_by_dnmf, write_anndata
from ..data.store import Matrix, is_anndata, open_matrix, scan_matrix, validate_stats
from ..data.zarrio import json_safe, write_array
from ..errors import CheckpointMismatchError, ParameterError, StoreError, expected
from ..run.fused import fit_fused
from ..run.locks import FolderLock
from ..run.pipeline import fit
from ..run.plan import blas_threads_for_scheduler, block_bytes_for_workers
from ..run.restarts import spawn_seeds
from ..settings import FitSettings, beta_value, resolve_seed
from .clustering import cluster_components
from .consensus_report import Consensus, ConsensusRank
from .measures import UNSTABLE_SILHOUETTE
from .survey import parse_ranks

logger = logging.getLogger(__name__)

STATE_FILE = "dnmf_consensus.json"
STATE_FORMAT = 1
# What the replicates depend on: a resume must match these (the filter may change).
# ``layer``: the AnnData layer V was read from (None: X; absent from records of earlier versions).
REPLICATE_KEYS = ("fingerprint", "layer", "n_replicates", "beta_loss", "solver", "max_iter", "tol", "tol_x", "seed")
FILTER_KEYS = ("density_threshold", "neighbor_fraction")
OUTPUT_NAMES = ("consensus.json", "k_plot.png", "density.png")


def consensus(
    X,
    ranks,
    *,
    n_replicates: int = 100,
    beta_loss="frobenius",
    solver: str | None = None,
    max_iter: int = 500,
    tol: float = 1e-5,
    tol_x: float = 1e-4,
    random_state=None,
    chunks=None,
    density_threshold: float = 0.5,
    neighbor_fraction: float = 0.3,
    error_margin: float = 0.02,
    workdir=None,
    input_path=None,
    max_concurrent: int | None = None,
    layer: str | None = None,
    like=None,
) -> Consensus:
    """Consensus NMF of X for each rank in ``ranks`` (see the module docstring).

    Parameters
    ----------
    X : ndarray, scipy.sparse, dask array, zarr.Array or Zarr path, shape (n_samples, n_features)
    ranks : iterable of int, or a string "5:15" (inclusive), "5:15:2", "5,7,9".
    n_replicates : int, default=100
        Replicate fits per rank, each from its own random start.
    beta_loss, solver, max_iter, tol, tol_x : the replicates' fits (solver: default HALS for
        Frobenius, MU otherwise).
    random_state : int or None
        Every replicate's seed derives from it: replicate i of rank K has seed
        ``spawn_seeds(seed, R, key=(K,))[i]``. None: a fresh seed (or, resuming, the workdir's).
    chunks : rows per block of V.
    density_threshold : float, default=0.5
        Components whose local density (mean Euclidean distance of the unit-norm component to
        its nearest neighbours) exceeds it are outliers; ≥ √2 keeps all.
    neighbor_fraction : float in (0, 1], default=0.3
        The neighbours of the density filter, as a fraction of ``n_replicates``.
    error_margin : float, default=0.02
        The drop in error, as a fraction of the error at the smallest rank, that a rank must
        bring to be suggested (see :func:`suggest_k`).
    workdir : path, optional
        Where replicates, results, plots and the resume record go (see the module docstring);
        None keeps everything in memory.
    input_path : path, optional
        The path V was read from, which ``workdir`` may not be, lie inside or hold.
    max_concurrent : replicates fused at once (default: as many as their W's fit in
        :data:`dnmf.run.fused.FUSED_MEMORY_BYTES` and, under a distributed client, as many as
        the workers hold beside V: :func:`dnmf.run.fused.fused_width`). A replicate is written
        to ``workdir`` when it ends, so a kill loses the replicates in flight: fewer at once (a
        new one starts as one ends) lose less and share fewer passes.
    layer : str, optional
        For an AnnData input (an AnnData object in memory or backed, a ``.h5ad`` file, an
        AnnData ``.zarr`` store): the layer to factor instead of X. It is recorded in
        ``workdir``: a resume must read the same layer.
    like : AnnData, or the path of a ``.h5ad`` file or AnnData ``.zarr`` store, optional
        Whose obs and var the ``K{K}.h5ad`` results carry (and whose var_names name the rows
        of ``programs_K{K}.tsv``); read, never written. Default: X itself when it is AnnData
        (an object or the path of an AnnData store); with neither, no ``K{K}.h5ad`` is
        written. Its obs and var must have V's numbers of rows and columns.

    Returns
    -------
    Consensus
    """
    wanted = parse_ranks(ranks)
    _check_params(n_replicates, density_threshold, neighbor_fraction, error_margin)
    base = FitSettings.from_params(
        solver=solver or ("hals" if beta_value(beta_loss) == 2.0 else "mu"), beta_loss=beta_loss, init="random",
        max_iter=max_iter, tol=tol, tol_x=tol_x, chunks=chunks,
    )
    if workdir is None:
        return _consensus(X, wanted, base, n_replicates, random_state, density_threshold, neighbor_fraction,
                          error_margin, None, max_concurrent, layer, like)
    workdir = os.fspath(workdir)
    check_output(workdir, protected={"input": input_path}, kind="folder", label="workdir")
    with FolderLock(workdir, "consensus folder"):
        os.makedirs(workdir, exist_ok=True)
        return _consensus(X, wanted, base, n_replicates, random_state, density_threshold, neighbor_fraction,
                          error_margin, _Workdir(workdir, input_path), max_concurrent, layer, like)


def _check_params(n_replicates, density_threshold, neighbor_fraction, error_margin) -> None:
    if not isinstance(n_replicates, (int, np.integer)) or isinstance(n_replicates, bool) or n_replicates < 2:
        raise ParameterError(expected("n_replicates an integer of at least 2", n_replicates))
    if not isinstance(density_threshold, (int, float)) or not density_threshold > 0:
        raise ParameterError(expected("density_threshold a positive number (distances of unit vectors: 0 to √2)", density_threshold))
    if not isinstance(neighbor_fraction, (int, float)) or not 0 < neighbor_fraction <= 1:
        raise ParameterError(expected("neighbor_fraction in (0, 1]", neighbor_fraction))
    if not isinstance(error_margin, (int, float)) or not error_margin >= 0:
        raise ParameterError(expected("error_margin a non-negative number", error_margin))


def _anndata_like(X, like):
    """What the ``K{K}.h5ad`` take obs and var from: ``like``, else X when it is AnnData (an
    object, or the path of a .h5ad file or AnnData .zarr store), else None."""
    if like is not None:
        return like
    if is_anndata(X):
        return X
    if isinstance(X, (str, os.PathLike)) and ondisk.is_anndata_store(X):
        return os.fspath(X)
    return None


def _consensus(X, wanted, base, n_replicates, random_state, density_threshold, neighbor_fraction, error_margin,
               work, max_concurrent, layer=None, like=None) -> Consensus:
    saved = work.read_state() if work is not None else None
    chunks = base.chunks
    if saved is not None and chunks is None:
        chunks = tuple(saved["fingerprint"]["row_chunks"])  # the blocks the replicates were fitted on
    matrix = open_matrix(X, chunks, block_bytes=block_bytes_for_workers(current_client()), layer=layer)
    n, p = matrix.shape
    if wanted[-1] > min(n, p):
        raise ParameterError(f"Rank {wanted[-1]} is larger than min(n_samples, n_features) = {min(n, p)}; ask for smaller ranks.")
    like = _anndata_like(X, like)
    # obs and var of an AnnData input, for the K{K}.h5ad: read (and checked against V) once, before any fit
    frames = anndata_frames(like, n, p) if like is not None and work is not None else None
    with blas_threads_for_scheduler():
        stats = scan_matrix(matrix)
    validate_stats(stats, base.beta)
    if random_state is None and saved is not None:
        seed = int(saved["seed"])
    else:
        seed = resolve_seed(random_state)
    record = json_safe({
        "dnmf_consensus": STATE_FORMAT,
        "fingerprint": {
            "shape": [n, p], "dtype": str(matrix.data.dtype), "sparse": bool(matrix.sparse),
            "row_chunks": [int(c) for c in matrix.row_chunks], "v_sq": float(stats.v_sq),
            "v_sum": float(stats.v_sum), "nnz": int(stats.nnz),
        },
        "n_replicates": int(n_replicates), "beta_loss": base.params["beta_loss"], "solver": base.solver,
        "max_iter": int(base.max_iter), "tol": float(base.tol), "tol_x": float(base.tol_x), "seed": seed,
        "density_threshold": float(density_threshold), "neighbor_fraction": float(neighbor_fraction),
        "ranks": wanted, "source": matrix.source, "layer": layer,
    }, keep_nonfinite=True)
    if work is not None:
        work.adopt(record, saved)
        work.frames = frames
        work.settings = {key: record[key] for key in record if key not in ("dnmf_consensus", "ranks")}
    job = _Job(matrix, base, stats.v_sq, stats.mean, n_replicates, seed, density_threshold, neighbor_fraction, work, max_concurrent)
    results = tuple(job.rank(k) for k in wanted)
    suggested, reason = suggest_k(results, error_margin)
    settings = {key: record[key] for key in record if key not in ("dnmf_consensus", "fingerprint")}
    settings["shape"] = [n, p]
    settings["error_margin"] = error_margin
    settings["passes_over_v"] = {"made": job.n_passes, "asked_by_replicates": job.n_fit_passes}
    outcome = Consensus(results, suggested, reason, settings)
    if work is not None:
        work.write_summary(outcome)
    return outcome


class _Job:
    """The replicates and consensus step of each rank, reading and writing the workdir."""

    def __init__(self, matrix: Matrix, base: FitSettings, v_sq: float, v_mean: float, n_replicates: int, seed: int,
                 density_threshold: float, neighbor_fraction: float, work, max_concurrent):
        self.matrix, self.base, self.v_sq, self.v_mean = matrix, base, v_sq, v_mean
        self.n_replicates, self.seed = n_replicates, seed
        self.density_threshold, self.neighbor_fraction = density_threshold, neighbor_fraction
        self.work, self.max_concurrent = work, max_concurrent
        self.n_passes = self.n_fit_passes = 0  # passes over V made by the replicates / asked for

    def rank(self, k: int) -> ConsensusRank:
        if self.work is not None and (done := self.work.load_rank(k)) is not None:
            logger.info("rank %d: consensus read from %s", k, self.work.rank_path(k))
            self.work.complete_rank(done)
            return done
        seeds = spawn_seeds(self.seed, self.n_replicates, key=(k,))
        Hs, losses = self.replicates(k, seeds)
        clustering = cluster_components(
            np.vstack(Hs), k, self.n_replicates, density_threshold=self.density_threshold,
            neighbor_fraction=self.neighbor_fraction, seed=self.seed,
        )
        W, error = self.refit(clustering.programs.astype(self.matrix.dtype), k)
        result = ConsensusRank(
            rank=k, H=clustering.programs.astype(self.matrix.dtype), W=W, stability=clustering.stability,
            error=error, n_outliers=clustering.n_outliers, labels=clustering.labels, density=clustering.density,
            replicate_losses=np.asarray(losses), seeds=tuple(seeds),
        )
        logger.info("rank %d: stability %.4f, error %.4g, %d outliers", k, result.stability, error, result.n_outliers)
        if self.work is not None:
            return self.work.save_rank(result, np.vstack(Hs), self.filter_record())
        return result

    def filter_record(self) -> dict:
        return {"density_threshold": float(self.density_threshold), "neighbor_fraction": float(self.neighbor_fraction)}

    def replicates(self, k: int, seeds: list[int]) -> tuple[list[np.ndarray], list[float]]:
        """Each replicate's (H, final objective): read from the workdir, or fitted (and written)."""
        found = {i: self.work.load_replicate(k, i) for i in range(len(seeds))} if self.work is not None else {}
        todo = [i for i in range(len(seeds)) if found.get(i) is None]
        if len(todo) < len(seeds):
            logger.info("rank %d: %d of %d replicates read from the workdir", k, len(seeds) - len(todo), len(seeds))
        settings = replace(self.base, n_components=k)

        def keep(fact):
            H, loss, seed = np.asarray(fact.H), float(fact.result.state.objective), fact.settings.seed
            fact.release()
            if self.work is not None:  # written as soon as the replicate ends
                self.work.save_replicate(k, seeds.index(seed), H, loss, seed)
            return H, loss

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            runs = fit_fused(self.matrix, [replace(settings, seed=seeds[i]) for i in todo], summarize=keep,
                             max_concurrent=self.max_concurrent)
        self.n_passes += runs.n_passes
        self.n_fit_passes += runs.n_fit_passes
        found.update(zip(todo, runs.results))
        return [found[i][0] for i in range(len(seeds))], [found[i][1] for i in range(len(seeds))]

    def refit(self, H: np.ndarray, k: int):
        """W for V with H fixed at the consensus programs, and the fit's relative error."""
        settings = replace(self.base, n_components=k, init="custom", seed=self.seed).for_shape(self.matrix.shape)
        p = self.matrix.shape[1]
        # A flat start with V's scale: H's rows have unit norm, so a typical entry is about
        # 1/√p, and W = mean(V) √p / K makes WH about mean(V).
        start = max(self.v_mean, np.finfo(np.float32).tiny) * np.sqrt(p) / k
        W0 = da.full((self.matrix.shape[0], k), start, dtype=self.matrix.dtype, chunks=(self.matrix.row_chunks, (k,)))
        with blas_threads_for_scheduler(), warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            fact = fit(self.matrix, settings, W=W0, H=H, update_h=False)
        error = float(np.sqrt(max(2.0 * fact.result.state.objective, 0.0) / max(self.v_sq, np.finfo(float).tiny)))
        if self.matrix.in_memory:
            W = fact.W.compute()
            fact.release()
        else:
            W = fact.W
        return W, error


def suggest_k(results, error_margin: float = 0.02) -> tuple[int, str]:
    """The suggested K and why.

    Each rank's **gain** is the drop of the consensus error from the rank surveyed before it,
    as a fraction of the error at the smallest rank surveyed (the smallest rank counts as a
    gain). The suggestion is the largest stable rank (stability ≥ 0.75, the threshold of
    :mod:`dnmf.rank.measures`) whose gain is at least ``error_margin``: its programs reproduce
    across replicates, and ranks beyond it explain little more (they split programs or fit
    noise). With no such rank, the most stable rank, said so.
    """
    results = sorted(results, key=lambda res: res.rank)
    scale = max(results[0].error, np.finfo(float).tiny)
    gains = [float("inf")] + [(a.error - b.error) / scale for a, b in itertools.pairwise(results)]
    stable = [np.isfinite(res.stability) and res.stability >= UNSTABLE_SILHOUETTE for res in results]
    good = [i for i in range(len(results)) if stable[i] and gains[i] >= error_margin]
    if not good:
        finite = [res for res in results if np.isfinite(res.stability)] or results
        best = max(finite, key=lambda res: (np.nan_to_num(res.stability, nan=-2.0), -res.rank))
        return best.rank, (
            f"No rank is both stable (silhouette ≥ {UNSTABLE_SILHOUETTE}) and a gain in error of at least "
            f"{error_margin:.0%}; K = {best.rank} is the most stable (silhouette {best.stability:.4f})."
        )
    i = good[-1]
    chosen = results[i]
    reason = f"K = {chosen.rank} is stable (silhouette {chosen.stability:.4f} ≥ {UNSTABLE_SILHOUETTE})"
    if i > 0:
        reason += (
            f" and lowers the consensus error from {results[i - 1].error:.4g} to {chosen.error:.4g} "
            f"({gains[i]:.1%} of the error at K = {results[0].rank})"
        )
    beyond = results[i + 1 :]
    if beyond:
        reason += (
            f"; larger ranks gain less than {error_margin:.0%} each"
            if all(gains[j] < error_margin for j in range(i + 1, len(results)))
            else "; larger ranks that gain more are unstable"
        )
    return chosen.rank, reason + "."


class _Workdir:
    """The consensus folder: the resume record, replicates, per-rank results, the summary.

    Writes go to a temporary name and are renamed into place, so a kill leaves either the
    whole file or none; files of other names are never touched.
    """

    def __init__(self, path: str, input_path=None):
        self.path, self.input_path = path, input_path
        self.frames = None  # (obs, var) of an AnnData input: the K{K}.h5ad are written
        self.settings: dict = {}  # the run's record, copied into each K{K}.h5ad

    def _file(self, *parts) -> str:
        return os.path.join(self.path, *parts)

    def read_state(self) -> dict | None:
        path = self._file(STATE_FILE)
        if not os.path.exists(path):
            names = os.listdir(self.path) if os.path.isdir(self.path) else []
            clashes = [name for name in names if name in OUTPUT_NAMES or name == "replicates"
                       or re.fullmatch(r"K\d+\.(zarr|h5ad)|programs_K\d+\.tsv", name)]
            if clashes:
                raise StoreError(
                    f"{self.path!r} holds {min(clashes)!r} but no {STATE_FILE}, so it is not a dnmf consensus "
                    "folder this run may continue, and dnmf writes nothing over it; choose another folder."
                )
            return None
        try:
            with open(path) as f:
                state = json.load(f)
        except (OSError, ValueError) as e:
            raise StoreError(f"{path!r} is not a readable consensus record ({e}); choose another folder.") from e
        if state.get("dnmf_consensus") != STATE_FORMAT:
            raise StoreError(f"{path!r} is not a dnmf consensus record of format {STATE_FORMAT}.")
        return state

    def adopt(self, record: dict, saved: dict | None) -> None:
        """Check ``record`` against the saved one (the replicates' settings must match), then
        write it; a changed filter drops the ranks' consensus results, not the replicates."""
        if saved is not None:
            differ = [key for key in REPLICATE_KEYS if saved.get(key) != record.get(key)]
            if differ:
                values = "; ".join(f"{key} {saved.get(key)!r} there, {record.get(key)!r} now"
                                   for key in differ if key != "fingerprint")
                raise CheckpointMismatchError(
                    f"{self.path!r} holds replicates of another run (its {', '.join(differ)} differ"
                    f"{' (V is not the same matrix or its blocks differ)' if 'fingerprint' in differ else ''}"
                    f"{': ' + values if values else ''}); use the same settings to continue it, or another folder."
                )
        self._write_text(STATE_FILE, json.dumps(record, indent=2))

    def _write_text(self, name: str, text: str) -> None:
        tmp = self._file(f".{name}.tmp-{uuid.uuid4().hex[:8]}")
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._file(name))

    def replicate_path(self, k: int, i: int) -> str:
        return self._file("replicates", f"K{k}", f"{i:05d}.npz")

    def load_replicate(self, k: int, i: int):
        path = self.replicate_path(k, i)
        if not os.path.exists(path):
            return None
        try:
            with np.load(path) as data:
                return data["H"], float(data["objective"])
        except (OSError, ValueError, KeyError):  # damaged: fitted again
            logger.warning("replicate %s is unreadable; fitting it again", path)
            return None

    def save_replicate(self, k: int, i: int, H: np.ndarray, objective: float, seed: int) -> None:
        path = self.replicate_path(k, i)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}.npz"
        with open(tmp, "wb") as f:
            np.savez(f, H=H, objective=np.float64(objective), seed=np.uint64(seed))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def rank_path(self, k: int) -> str:
        return self._file(f"K{k}.zarr")

    def anndata_path(self, k: int) -> str:
        return self._file(f"K{k}.h5ad")

    def tsv_name(self, k: int) -> str:
        return f"programs_K{k}.tsv"

    def save_rank(self, res: ConsensusRank, components: np.ndarray, filter_record: dict) -> ConsensusRank:
        """Write rank K's consensus (Zarr), then its programs (TSV) and, for an AnnData input,
        its AnnData; the result reads W from the store.

        The TSV and AnnData of an earlier consensus of K (another filter) are removed first, so
        a kill leaves none that disagrees with the Zarr group; a resume writes the missing ones.
        """
        import zarr

        stale = self.anndata_path(res.rank)
        if os.path.lexists(stale):
            if not anndata_written_by_dnmf(stale):
                raise StoreError(f"{stale!r} is not an AnnData dnmf wrote, and dnmf writes nothing over it; "
                                 "move it away to continue.")
            os.remove(stale)
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._file(self.tsv_name(res.rank)))
        with atomic_directory(self.rank_path(res.rank), overwrite=True) as tmp:
            group = zarr.open_group(str(tmp), mode="w")
            write_array(group, "H", res.H)
            write_array(group, "W", res.W)
            write_array(group, "components", components)
            group.create_array("labels", data=res.labels)
            group.create_array("density", data=res.density)
            group.create_array("replicate_losses", data=np.asarray(res.replicate_losses, dtype=np.float64))
            group.attrs.update(json_safe({
                "dnmf_consensus_rank": STATE_FORMAT, **res.summary(), **filter_record, "seeds": list(res.seeds),
            }, keep_nonfinite=True))
            mark_written(group, "dnmf.rank.consensus")
        W = res.W if isinstance(res.W, np.ndarray) else da.from_zarr(self.rank_path(res.rank), component="W")
        res = replace(res, W=W)
        self.complete_rank(res)
        return res

    def complete_rank(self, res: ConsensusRank) -> None:
        """Write rank K's programs TSV and (for an AnnData input) AnnData where missing."""
        names = None if self.frames is None else [str(name) for name in self.frames[1].index]
        if not os.path.exists(self._file(self.tsv_name(res.rank))):
            self._write_text(self.tsv_name(res.rank), programs_tsv(res.H, names))
        if self.frames is not None and not os.path.exists(self.anndata_path(res.rank)):
            write_anndata(self.anndata_path(res.rank), res.W, res.H, like=self.frames, uns=self.rank_uns(res),
                          protected={"input": self.input_path})
            logger.info("rank %d: wrote %s", res.rank, self.anndata_path(res.rank))

    def rank_uns(self, res: ConsensusRank) -> dict:
        """uns["dnmf"] of rank K's AnnData: its measures, seeds and filter, and the run's settings."""
        state = self.read_state() or {}
        return {
            "kind": "consensus", **{key: value for key, value in res.summary().items() if value is not None},
            "seeds": np.asarray(res.seeds, dtype=np.int64),
            "replicate_losses": np.asarray(res.replicate_losses, dtype=np.float64),
            **{key: float(state[key]) for key in FILTER_KEYS if key in state},
            "settings": json.dumps(json_safe(self.settings, keep_nonfinite=True)),
        }

    def load_rank(self, k: int) -> ConsensusRank | None:
        """Rank K's consensus as saved, when it is complete and was made with this filter."""
        import zarr

        path = self.rank_path(k)
        if not os.path.exists(path):
            return None
        group = zarr.open_group(path, mode="r")
        attrs = dict(group.attrs)
        state = self.read_state() or {}
        if any(attrs.get(key) != state.get(key) for key in FILTER_KEYS):
            return None  # another filter: redo the consensus step from the replicates
        W = da.from_zarr(path, component="W")
        return ConsensusRank(
            rank=k, H=np.asarray(group["H"][...]), W=W, stability=float(attrs["stability"]),
            error=float(attrs["error"]), n_outliers=int(attrs["n_outliers"]), labels=np.asarray(group["labels"][...]),
            density=np.asarray(group["density"][...]), replicate_losses=np.asarray(group["replicate_losses"][...]),
            seeds=tuple(int(s) for s in attrs["seeds"]),
        )

    def write_summary(self, outcome: Consensus) -> None:
        self._write_text("consensus.json", json.dumps(outcome.to_dict(), indent=2))
        for name, draw in (("k_plot.png", outcome.plot), ("density.png", outcome.plot_density)):
            tmp = self._file(f".{name}.tmp-{uuid.uuid4().hex[:8]}.png")
            try:
                draw(tmp)
                os.replace(tmp, self._file(name))
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)


def programs_tsv(H: np.ndarray, feature_names=None) -> str:
    """The programs as TSV: a header ``feature  program_1 … program_K``, one row per feature."""
    names = feature_names if feature_names is not None else [str(j) for j in range(H.shape[1])]
    lines = ["feature\t" + "\t".join(f"program_{c + 1}" for c in range(H.shape[0]))]
    lines += [f"{name}\t" + "\t".join(repr(float(x)) for x in column) for name, column in zip(names, H.T)]
    return "\n".join(lines) + "\n"
