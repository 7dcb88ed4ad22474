"""Crash-safe checkpoints of a running fit, and exact resume.

A checkpoint directory ``PATH`` holds versions, each a complete Zarr group, and a pointer::

    PATH/zarr.json        a Zarr group (so Zarr tools can browse PATH) whose attrs["dnmf_checkpoint_root"]
                          marks PATH as dnmf's, written before the first version
    PATH/CURRENT          {"version": "v000007", ...}: the newest complete version
    PATH/v000006/         the previous good version (kept until the next one is complete)
    PATH/v000007/         arrays W (n, r; written block by block by the workers), H (r, p),
                          history (n_iter, 6) and attrs["dnmf_checkpoint"]: iteration, stop
                          reason, seed, configuration, fingerprint of V, checksums.

A version is written into a fresh directory, every file in it is fsynced, then ``CURRENT`` is
replaced atomically (temp file, fsync, ``os.replace``, fsync of ``PATH``), then versions other
than the new one and the previous one are removed. ``PATH`` may also be an fsspec URL
(``s3://bucket/ckpt``, ``gs://...``; :mod:`dnmf.data.folders`): a version is then a key prefix
written object by object, and ``CURRENT`` is switched by one PUT, atomic on object stores, so
readers see a complete version or the previous one, never half of one; the lock is the object
``PATH.lock`` created by a conditional write (:class:`~dnmf.run.locks.ObjectLock`). A kill at any moment leaves ``CURRENT``
naming a complete version. Each array's CRC-32 (per stored block for W) is recorded, so a
version damaged later is detected on resume; the previous good version is then used, with a
:class:`CheckpointWarning`.

dnmf deletes only what it provably wrote: version directories of a marked folder whose
contents are exactly those of a version (Zarr metadata and numbered chunks of W, H and the
history, and the temporary files of a write cut short). Anything else makes it refuse to write
into the folder. A fit holds the lock of each checkpoint folder it reads or writes
(:class:`~dnmf.run.locks.FolderLock`) from before it reads or writes anything to its end, so
two runs never prune each other's versions.

Resume starts the solver at the saved (W, H), with the saved history. The solver's ``start``
recomputes the partials at (W, H) with the same kernel and the same summation order as a step,
so the continued iterates are bitwise those of the uninterrupted fit, given the same matrix,
row chunks, dtype and iterate-altering settings; anything else is refused with a
:class:`~dnmf.errors.CheckpointMismatchError`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import warnings
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np

from .driver import Hook, IterationRecord, State
from ..data import folders
from .locks import FolderLock, ObjectLock
from ..errors import CheckpointMismatchError, CheckpointWarning, ParameterError, StoreError
from ..data.store import Matrix, MatrixStats
from ..data.zarrio import create_array, json_safe, library_versions, write_array
from ..graph import TaskGraph, row_block_keys
from ..settings import ITERATE_SETTINGS_BEFORE

FORMAT_VERSION = 1
POINTER = "CURRENT"
ATTRS_KEY = "dnmf_checkpoint"
ROOT_KEY = "dnmf_checkpoint_root"
HISTORY_COLUMNS = ("iteration", "objective", "rel_decrease", "w_change", "h_change", "seconds")
VERSION_PATTERN = re.compile(r"^v(\d{6,})$")
# What dnmf writes into a checkpoint folder and its versions (Zarr's LocalStore writes each file
# as NAME.<hex>.partial, then renames it; a kill can leave the temporary file).
POINTER_TEMP = re.compile(rf"^\.{POINTER}\.[0-9a-f]{{32}}\.tmp$")
METADATA = re.compile(r"^zarr\.(json|[0-9a-f]{32}\.partial)$")
CHUNK_DIR = re.compile(r"^[0-9]+$")
CHUNK = re.compile(r"^[0-9]+(\.[0-9a-f]{32}\.partial)?$")
VERSION_ARRAYS = ("W", "H", "history")
# What a version's record must hold to be resumed from (written by every version).
RECORD_KEYS = ("iteration", "checksums", "storage_rows", "params", "settings", "fingerprint")


# ---------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class Schedule:
    """When to write: every ``every`` iterations and/or every ``interval`` seconds, and at the end."""

    every: int | None = 10
    interval: float | None = None

    def due(self, iteration: int, seconds_since_write: float) -> bool:
        by_count = self.every is not None and iteration % self.every == 0
        by_time = self.interval is not None and seconds_since_write >= self.interval
        return by_count or by_time


def _local_path(path) -> str:
    """The checkpoint folder ``path``: a local path made absolute, or an fsspec URL."""
    return folders.normalized(path)


def has_checkpoint(path) -> bool:
    """True when ``path`` holds a checkpoint pointer."""
    return folders.isfile(folders.join(folders.normalized(path), POINTER))


def check_target(path, resume) -> str:
    """The absolute checkpoint directory to write, refusing to overwrite anything.

    A fresh fit needs a new or empty directory, or one a fit killed before its first
    checkpoint left (which is removed); a resumed fit may go on writing into the checkpoint it
    resumes from when everything in it is dnmf's. Call it holding the directory's lock
    (:func:`locked`).

    Raises
    ------
    ParameterError
        When the directory holds a checkpoint (for a fresh fit) or anything dnmf did not write.
    """
    target = _local_path(path)
    if resume is not None and _local_path(resume) == target:
        foreign = _foreign_entries(target)
        if foreign:
            raise ParameterError(
                f"checkpoint={os.fspath(path)!r} holds files dnmf did not write ({_listing(foreign)}); "
                "dnmf deletes old versions as it goes, so it will not write there. Move them out, or "
                "resume into a new directory (checkpoint=NEW_PATH)."
            )
        return target
    if _abandoned_start(target):
        folders.remove_tree(target)
    if folders.exists(target) and (not folders.isdir(target) or folders.listdir(target)):
        foreign = _foreign_entries(target) if folders.isdir(target) else [folders.basename(target)]
        what = f"other files ({_listing(foreign)})" if foreign else "a checkpoint"
        raise ParameterError(
            f"checkpoint={os.fspath(path)!r} already holds {what}; resume from it with "
            "fit(X, resume=PATH), or choose a new or empty directory."
        )
    return target


@contextlib.contextmanager
def locked(*paths):
    """Hold the locks of the checkpoint directories ``paths`` (None ignored) for a ``with`` block.

    Raises
    ------
    LockedError
        When another run holds one of them; then none is held.
    """
    with contextlib.ExitStack() as held:
        for folder in sorted({_local_path(p) for p in paths if p is not None}):
            lock = ObjectLock if folders.is_url(folder) else FolderLock
            held.enter_context(lock(folder, "checkpoint folder"))
        yield


def _abandoned_start(path: str) -> bool:
    """A directory holding only the leftovers of a fit killed before its first checkpoint."""
    if not folders.isdir(path) or has_checkpoint(path):
        return False
    return bool(_versions(path)) and not _foreign_entries(path)


def _marked(root: str) -> bool:
    """Whether ``root``'s Zarr group carries dnmf's checkpoint marker."""
    try:
        return ROOT_KEY in json.loads(folders.read_bytes(folders.join(root, "zarr.json"))).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return False


def _complete_before_markers(root: str) -> bool:
    """Whether ``root`` is a checkpoint written before roots carried the marker: a pointer
    naming a version whose Zarr group holds dnmf's checkpoint record (written last, once the
    version was complete)."""
    version = str(read_pointer(root).get("version", ""))
    if not VERSION_PATTERN.match(version):
        return False
    try:
        return ATTRS_KEY in json.loads(folders.read_bytes(folders.join(root, version, "zarr.json"))).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return False


def _mark(root: str) -> None:
    """Create ``root`` as a Zarr group marked as a dnmf checkpoint (before any version)."""
    import zarr

    folders.makedirs(root)
    zarr.open_group(root, mode="a").attrs[ROOT_KEY] = {"format": FORMAT_VERSION}
    folders.fsync_path(folders.join(root, "zarr.json"))


def _foreign_entries(root: str) -> list[str]:
    """The entries of the checkpoint directory ``root`` that dnmf did not write: all of them
    unless ``root`` carries dnmf's marker."""
    names = sorted(folders.listdir(root))
    if not (_marked(root) or _complete_before_markers(root)):
        return names
    return [
        name for name in names
        if not (name == POINTER or METADATA.match(name) or POINTER_TEMP.match(name)
                or (VERSION_PATTERN.match(name) and _written_by_dnmf(folders.join(root, name))))
    ]


def _written_by_dnmf(vdir: str) -> bool:
    """Whether the folder ``vdir`` holds exactly what dnmf writes into a version (maybe cut
    short): Zarr metadata, and the arrays W, H and history with their numbered chunks."""
    entries = folders.files_under(vdir)
    return entries is not None and all(_version_entry(entry) for entry in entries)


def _version_entry(entry: str) -> bool:
    """Whether ``entry`` (relative to a version; a trailing ``/``: an empty folder) is one that
    dnmf writes: ``zarr.json``, ``A/zarr.json``, ``A/c/I/J`` for A in W, H, history (or Zarr's
    temporary files of those, or the folders on the way)."""
    folder = entry.endswith("/")
    parts = entry.rstrip("/").split("/")
    if parts[0] not in VERSION_ARRAYS:
        return len(parts) == 1 and not folder and bool(METADATA.match(parts[0]))
    if len(parts) == 1:
        return folder
    if len(parts) == 2 and not folder and METADATA.match(parts[1]):
        return True
    if parts[1] != "c" or not all(CHUNK_DIR.match(part) for part in parts[2:-1]):
        return False
    last = parts[-1] if len(parts) > 2 else "0"
    return bool((CHUNK_DIR if folder else CHUNK).match(last))


def _listing(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


# ---------------------------------------------------------------------------
# Fingerprint and configuration


def fingerprint(matrix: Matrix, stats: MatrixStats) -> dict:
    """What identifies V for resume: shape, dtypes, row chunks, and sums from the validation scan.

    ‖V‖², ΣV and nnz come free from the scan every fit makes; with the same row chunks they
    are reproduced bit for bit, so they act as a cheap content checksum (they do not see,
    e.g., a permutation of rows).
    """
    return {
        "shape": [int(s) for s in matrix.shape],
        "dtype": str(matrix.data.dtype),
        "factor_dtype": str(matrix.dtype),
        "sparse": bool(matrix.sparse),
        "row_chunks": [int(c) for c in matrix.row_chunks],
        "col_chunks": [int(c) for c in matrix.col_chunks],
        "v_sq": float(stats.v_sq),
        "v_sum": float(stats.v_sum),
        "nnz": int(stats.nnz),
    }


def _jsonable(value):
    """A parameter's value as JSON, non-finite floats kept: a resumed fit gets it back as it was."""
    return json_safe(value, keep_nonfinite=True)


def saved_params(params: dict, seed: int) -> dict:
    """The estimator's parameters as JSON, with the resolved seed as ``random_state``."""
    skip = {"callbacks", "resume"}  # how this run was started is no property of the fit
    out = {k: _jsonable(v) for k, v in params.items() if k not in skip}
    out["random_state"] = int(seed)
    return out


# ---------------------------------------------------------------------------
# Low-level file safety


def fsync_tree(root: str) -> None:
    """fsync every file and directory under ``root`` (and ``root`` itself); nothing for a URL."""
    folders.fsync_tree(root)


def write_pointer(root: str, content: dict) -> None:
    """Switch ``root/CURRENT`` atomically: locally a temp file, fsync, ``os.replace``, fsync of
    ``root``; on an object store a single-object write."""
    folders.replace_file(folders.join(root, POINTER), json.dumps(content).encode(), folders.temp_name(POINTER))


def read_pointer(root: str) -> dict:
    try:
        content = json.loads(folders.read_bytes(folders.join(root, POINTER)))
        return content if isinstance(content, dict) and "version" in content else {}
    except (OSError, ValueError):
        return {}


def crc32(array: np.ndarray) -> int:
    """CRC-32 of an array's bytes in C order."""
    return zlib.crc32(np.ascontiguousarray(array).data) & 0xFFFFFFFF


def _versions(root: str) -> list[tuple[int, str]]:
    """(sequence number, name) of the version directories under ``root``, oldest first."""
    found = []
    for name in folders.listdir(root):
        match = VERSION_PATTERN.match(name)
        if match and folders.isdir(folders.join(root, name)):
            found.append((int(match.group(1)), name))
    return sorted(found)


# ---------------------------------------------------------------------------
# Writing W block by block on the workers


def storage_rows(row_chunks: tuple[int, ...]) -> int:
    """Rows per stored chunk of W: the fit's row block when the blocks are regular."""
    first = row_chunks[0]
    if all(c == first for c in row_chunks[:-1]) and row_chunks[-1] <= first:
        return first
    return max(row_chunks)


def _regular_chunks(n: int, rows: int) -> tuple[int, ...]:
    full, rest = divmod(n, rows)
    return (rows,) * full + ((rest,) if rest else ())


def _store_block(block: np.ndarray, array_path: str, start: int, axis: int = 0) -> int:
    """Write one block of W (rows from ``start``) or of the grid's H (columns, ``axis=1``)
    into its own stored chunk(s); return its CRC-32."""
    import zarr

    arr = zarr.open_array(array_path, mode="r+")
    span = slice(start, start + block.shape[axis])
    arr[(span, slice(None)) if axis == 0 else (slice(None), span)] = block
    return crc32(block)


def _block_checksum(array_path: str, start: int, stop: int, axis: int = 0) -> int:
    import zarr

    arr = zarr.open_array(array_path, mode="r")
    return crc32(arr[start:stop] if axis == 0 else arr[:, start:stop])


def _run_blocks(prefix: str, func: Callable, *args, dependencies: Iterable = ()) -> list:
    """A task per block, ``func(*args_b)`` (see :meth:`dnmf.graph.TaskGraph.map`), run on the
    workers: the list of their results."""
    graph = TaskGraph(prefix, dependencies)
    everything = graph.task("all", list, graph.map(func, *args))
    return list(dask.compute(graph.delayed(everything))[0])


def write_blocks(W: da.Array, array_path: str, rows: int, axis: int = 0) -> list[int]:
    """Store W (already a Zarr array at ``array_path``) chunk by chunk from the workers; with
    ``axis=1``, the grid's H by column blocks of ``rows`` columns.

    Each task writes whole stored chunks, so tasks never share a chunk; only the CRC-32 of
    each block comes back to the client.
    """
    chunks = list(W.chunks)
    chunks[axis] = _regular_chunks(W.shape[axis], rows)
    W = W.rechunk(tuple(chunks))
    offsets = np.cumsum((0,) + W.chunks[axis]).tolist()
    blocks = row_block_keys(W) if axis == 0 else list(W.__dask_keys__()[0])
    prefix = f"dnmf-checkpoint-{'W' if axis == 0 else 'H'}"
    return _run_blocks(prefix, _store_block, blocks, array_path, offsets[:-1], axis, dependencies=[W])


def verify_blocks(array_path: str, n: int, rows: int, expected_sums: list[int], axis: int = 0) -> None:
    """Recompute the per-chunk CRC-32 of a stored W (or, ``axis=1``, H by column blocks) on
    the workers; raise on any difference."""
    label = "W" if axis == 0 else "H"
    starts = list(range(0, n, rows))
    if len(starts) != len(expected_sums):
        raise _Corrupt(f"{label} has {len(starts)} blocks, the checksums list {len(expected_sums)}")
    stops = [min(n, start + rows) for start in starts]
    got = _run_blocks("dnmf-checkpoint-verify", _block_checksum, array_path, starts, stops, axis)
    bad = [i for i, (g, e) in enumerate(zip(got, expected_sums)) if g != e]
    if bad:
        raise _Corrupt(f"{label} block(s) {bad} fail their checksum")


class _Corrupt(Exception):
    """A version failed verification (internal; becomes a warning or a StoreError)."""


# ---------------------------------------------------------------------------
# The writer the driver calls


def _history_array(history: list[IterationRecord]) -> np.ndarray:
    out = np.array([[getattr(r, c) for c in HISTORY_COLUMNS] for r in history], dtype=np.float64)
    return out.reshape(len(history), len(HISTORY_COLUMNS))


class Checkpointer(Hook):
    """Writes checkpoint versions, a hook of :func:`dnmf.run.driver.run`.

    Parameters
    ----------
    root : absolute checkpoint directory (see :func:`check_target`).
    schedule : when to write.
    meta : what every version records besides the state (see :func:`version_record`).
    resumed_from : the :class:`Snapshot` this run resumes from when it writes into the same
        directory: that version is kept as the previous good one until the next is complete.
    """

    def __init__(self, root: str, schedule: Schedule, meta: dict, resumed_from: Snapshot | None = None):
        self.root = root
        self.schedule = schedule
        self.meta = meta
        self.last_saved = None if resumed_from is None else (resumed_from.iteration, resumed_from.record.get("stop_reason"))
        self._good = None if resumed_from is None else resumed_from.version
        self._last_write = time.monotonic()

    def after_iteration(self, state: State, history: list[IterationRecord]) -> None:
        iteration = history[-1].iteration if history else 0
        if self.schedule.due(iteration, time.monotonic() - self._last_write):
            self.save(state, history)

    def finish(self, state: State, history: list[IterationRecord], stop_reason: str) -> None:
        iteration = history[-1].iteration if history else 0
        if stop_reason == "signal" and self.last_saved is not None and self.last_saved[0] == iteration:
            return  # this iteration is saved already: exit without writing it again
        if self.last_saved != (iteration, stop_reason):
            self.save(state, history, stop_reason)

    def save(self, state: State, history: list[IterationRecord], stop_reason: str | None = None) -> str:
        """Write one complete version, switch the pointer to it, prune; return its name."""
        import zarr

        if not _marked(self.root):
            _mark(self.root)
        existing = _versions(self.root)
        name = f"v{(existing[-1][0] + 1) if existing else 1:06d}"
        vdir = folders.join(self.root, name)
        group = zarr.open_group(vdir, mode="w-")
        n, r = state.W.shape
        rows = storage_rows(state.W.chunks[0])
        create_array(group, "W", (n, r), (rows, r), state.W.dtype, compressed=False)
        w_sums = write_blocks(state.W, folders.join(vdir, "W"), rows)
        if isinstance(state.H, da.Array):  # the grid's H: written by the workers, column blocks
            cols = storage_rows(state.H.chunks[1])
            create_array(group, "H", state.H.shape, (state.H.shape[0], cols), state.H.dtype, compressed=False)
            h_sums = write_blocks(state.H, folders.join(vdir, "H"), cols, axis=1)
        else:
            H = np.ascontiguousarray(state.H)
            write_array(group, "H", H, compressed=False)
            h_sums = crc32(H)
        hist = _history_array(history)
        write_array(group, "history", hist, compressed=False)
        iteration = history[-1].iteration if history else 0
        record = {
            **self.meta,
            "format": FORMAT_VERSION,
            "iteration": int(iteration),
            "stop_reason": stop_reason,
            "history_columns": list(HISTORY_COLUMNS),
            "storage_rows": int(rows),
            "checksums": {"W": w_sums, "H": h_sums, "history": crc32(hist)},
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": library_versions(),
        }
        group.attrs[ATTRS_KEY] = record
        fsync_tree(vdir)
        write_pointer(self.root, {"version": name, "iteration": int(iteration), "stop_reason": stop_reason})
        # Keep the last version known good (not merely the one the pointer named before: it
        # may be the damaged one a resume skipped).
        self._prune(keep={name, self._good})
        self._good = name
        self.last_saved = (iteration, stop_reason)
        self._last_write = time.monotonic()
        return name

    def _prune(self, keep: set) -> None:
        """Remove versions other than ``keep`` and pointer temp files left by a kill.

        Raises :class:`~dnmf.errors.StoreError`, removing nothing more, at a version directory
        holding anything dnmf does not write there.
        """
        for _, name in _versions(self.root):
            if name in keep:
                continue
            vdir = folders.join(self.root, name)
            if not _written_by_dnmf(vdir):
                raise StoreError(
                    f"The checkpoint version {vdir!r} holds files dnmf did not write; dnmf leaves it alone "
                    "and stops writing checkpoints here. Move those files out of the checkpoint directory."
                )
            folders.remove_tree(vdir)
        for name in folders.listdir(self.root):
            if POINTER_TEMP.match(name):
                with contextlib.suppress(OSError):
                    folders.remove_file(folders.join(self.root, name))


def version_record(params: dict, settings: dict, matrix_print: dict, X, layer: str | None = None) -> dict:
    """What every version of a fit's checkpoint records besides the state: the parameters as
    given (with the resolved seed), the iterate-altering settings, V's fingerprint and path (and
    the AnnData layer read from it)."""
    X_path = os.fspath(X) if isinstance(X, (str, os.PathLike)) else None
    return {
        "params": saved_params(params, settings["seed"]),
        "settings": settings,
        "fingerprint": matrix_print,
        "input_path": os.path.abspath(X_path) if X_path is not None and "://" not in X_path else X_path,
        "input_layer": layer,
    }


def start_writer(target: str, schedule: Schedule, meta: dict, state, snapshot: Snapshot | None) -> Checkpointer:
    """The writer of a fit (fresh or resumed); writes its first version unless it continues
    writing into the checkpoint it resumes from.

    A fresh fit's first version is its start, so init work (e.g. NNDSVD's passes) is never lost.
    """
    same_place = snapshot is not None and snapshot.root == target
    writer = Checkpointer(target, schedule, meta, resumed_from=snapshot if same_place else None)
    if not same_place:
        writer.save(state, snapshot.history if snapshot is not None else [])
    return writer


# ---------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class Snapshot:
    """A verified checkpoint version.

    W : dask array (n, r) read lazily from the version's Zarr array.
    H : ndarray (r, p); for a fit on a 2-D grid, a dask array read lazily by column blocks.
    history : the iteration records up to ``iteration``.
    record : the version's attrs (params, settings, fingerprint, input, stop reason, ...).
    version : the version's directory name.
    root : the checkpoint directory (absolute).
    """

    W: da.Array
    H: np.ndarray | da.Array
    history: list[IterationRecord]
    record: dict
    version: str
    root: str

    @property
    def iteration(self) -> int:
        return int(self.record["iteration"])


def _load_version(root: str, name: str) -> Snapshot:
    import zarr

    vdir = folders.join(root, name)
    try:
        group = zarr.open_group(vdir, mode="r")
        record = dict(group.attrs[ATTRS_KEY])
        missing = [key for key in RECORD_KEYS if key not in record]
        if missing:
            raise _Corrupt(f"its record is incomplete (no {', '.join(map(repr, missing))})")
        sums = record["checksums"]
        h_arr = group["H"]
        by_columns = isinstance(sums["H"], list)  # the grid's H, stored by column blocks
        H = da.from_zarr(h_arr) if by_columns else np.asarray(h_arr[...])
        hist = np.asarray(group["history"][...])
        w_arr = group["W"]
    except _Corrupt:
        raise
    except Exception as e:  # a damaged version can fail in many ways
        raise _Corrupt(f"cannot be read ({type(e).__name__}: {e})") from e
    if by_columns:
        try:
            verify_blocks(folders.join(vdir, "H"), h_arr.shape[1], h_arr.chunks[1], sums["H"], axis=1)
        except _Corrupt:
            raise
        except Exception as e:
            raise _Corrupt(f"H cannot be read ({type(e).__name__}: {e})") from e
    elif crc32(H) != sums["H"]:
        raise _Corrupt("H fails its checksum")
    if crc32(hist) != sums["history"]:
        raise _Corrupt("the history fails its checksum")
    try:
        verify_blocks(folders.join(vdir, "W"), w_arr.shape[0], record["storage_rows"], sums["W"])
    except _Corrupt:
        raise
    except Exception as e:
        raise _Corrupt(f"W cannot be read ({type(e).__name__}: {e})") from e
    history = [
        IterationRecord(int(row[0]), *(float(x) for x in row[1:])) for row in hist.reshape(-1, len(HISTORY_COLUMNS))
    ]
    W = da.from_zarr(w_arr, chunks=(record["storage_rows"], w_arr.shape[1]))
    return Snapshot(W, H, history, record, name, root)


def load(path) -> Snapshot:
    """The newest good version of the checkpoint at ``path``.

    The version ``CURRENT`` names is tried first, then older ones, newest first; each
    unusable one (damaged, or its record incomplete) is reported with a
    :class:`CheckpointWarning`. A damaged ``CURRENT`` (unreadable, or naming a missing version)
    is reported likewise, and every version is tried, newest first. Raises
    :class:`~dnmf.errors.StoreError` when there is no checkpoint or no good version.
    """
    root = _local_path(path)
    if not has_checkpoint(root):
        raise StoreError(f"No checkpoint at {os.fspath(path)!r}: it has no {POINTER} pointer file.")
    versions = [name for _, name in reversed(_versions(root))]
    pointer = read_pointer(root)
    named = str(pointer.get("version", ""))
    if named in versions:
        # Versions newer than the pointer's may be incomplete: a kill before the switch.
        candidates = versions[versions.index(named):]
    else:
        # A damaged pointer: every version is a candidate, newest first; verification tells
        # complete ones (the record is written last) from the rest.
        problem = f"names {named!r}, which is missing" if pointer else "cannot be read"
        warnings.warn(
            f"The {POINTER} pointer of the checkpoint {root!r} {problem}; using the newest "
            "intact version instead.",
            CheckpointWarning,
            stacklevel=2,
        )
        candidates = versions
    problems = []
    for name in candidates:
        try:
            snapshot = _load_version(root, name)
        except _Corrupt as e:
            problems.append(f"{name}: {e}")
            warnings.warn(
                f"Checkpoint version {name} in {root!r} is unusable ({e}); trying an older version.",
                CheckpointWarning,
                stacklevel=2,
            )
            continue
        return snapshot
    detail = "; ".join(problems) if problems else "it holds no versions"
    raise StoreError(
        f"No usable checkpoint version in {os.fspath(path)!r}: the checkpoint is damaged or incomplete "
        f"({detail}). Start a new fit (without resume=), or restore the checkpoint from a copy."
    )


def check_compatible(snapshot: Snapshot, settings: dict, matrix_print: dict, path) -> None:
    """Refuse a resume whose matrix or iterate-altering settings differ from the checkpoint's."""
    saved_print, saved_settings = snapshot.record["fingerprint"], snapshot.record["settings"]
    differences = []
    saved_print = {"col_chunks": [saved_print["shape"][1]], **saved_print}  # before column chunks
    labels = {"row_chunks": "row chunks (chunks=)", "col_chunks": "column chunks (column_chunks=)"}
    for key in ("shape", "dtype", "sparse", "row_chunks", "col_chunks"):
        if saved_print[key] != matrix_print[key]:
            label = labels.get(key, f"matrix {key}")
            differences.append(f"{label}: checkpoint {saved_print[key]!r}, now {matrix_print[key]!r}")
    if not differences:
        for key in ("v_sq", "v_sum", "nnz"):
            if saved_print[key] != matrix_print[key]:
                differences.append(
                    f"matrix content (checksum {key}: checkpoint {saved_print[key]!r}, now {matrix_print[key]!r})"
                )
                break
    for key in settings:
        saved = saved_settings.get(key, ITERATE_SETTINGS_BEFORE.get(key))
        if saved != settings[key]:
            differences.append(f"{key}: checkpoint {saved!r}, now {settings[key]!r}")
    if differences:
        raise CheckpointMismatchError(
            f"Cannot resume from {os.fspath(path)!r}: it was made for a different matrix or with "
            f"settings that change the iterates ({'; '.join(differences)}). Resume with the "
            "checkpoint's matrix and settings, or start a new fit in another checkpoint folder."
        )
