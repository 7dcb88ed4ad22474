"""Re-rooting: W (and the grid's H) reloaded from a spill store, so lineage stays bounded.

A dask.distributed scheduler keeps the lineage of the persisted W so that it can recompute
blocks lost with a worker: a few tasks per row block and iteration, growing without bound.
:class:`Rerooting`, a driver hook, writes W every ``every`` iterations (by the workers, row
block by row block) to a Zarr array in a spill directory and reloads it, so nothing depends
on older iterations any more. The values are bitwise the same, so re-rooting never changes a
result.

A user-given spill folder is locked (:class:`~dnmf.run.locks.FolderLock`, or
:class:`~dnmf.run.locks.ObjectLock` for a URL) from the
hook's creation to :meth:`Rerooting.close`, for as long as W may read its spills: two runs
sharing the folder would otherwise write the same spill names and delete each other's. (Each
run could instead spill into a subfolder of its own, but then a killed run's spills would stay
forever in a folder nothing tells apart from a live run's; the lock names the holder and is
taken over once it is dead.) A run that takes the folder over from a killed one numbers its
spills after the leftovers, which it leaves alone: it deletes only what it wrote.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid

import dask
import dask.array as da

from ..errors import ParameterError, expected
from .driver import Hook, Solver, State
from .locks import FolderLock, ObjectLock
from .plan import wait_until_persisted

SPILL_NAME = re.compile(r"^[WH]-(\d{6,})\.zarr$")


def reroot(X: da.Array, url: str) -> da.Array:
    """X (W in row blocks, or the grid's H in column blocks) written to a new Zarr array at
    ``url`` by the workers and read back, persisted.

    The result has X's values bit for bit and X's chunks, and depends on nothing but the
    Zarr array.
    """
    import zarr

    regular = all(_regular(sizes) for sizes in X.chunks)
    source = X if regular else X.rechunk(tuple(max(sizes) for sizes in X.chunks))
    target = zarr.create_array(
        store=url, shape=X.shape, chunks=tuple(sizes[0] for sizes in source.chunks), dtype=X.dtype,
        compressors=None, overwrite=False,
    )
    da.store(source, target, lock=False, compute=True)
    loaded = da.from_zarr(url, name=f"dnmf-rerooted-{uuid.uuid4().hex}")
    if not regular:
        loaded = loaded.rechunk(X.chunks)
    (loaded,) = dask.persist(loaded)
    wait_until_persisted(loaded)
    return loaded


def _regular(sizes: tuple[int, ...]) -> bool:
    return all(size == sizes[0] for size in sizes[:-1]) and sizes[-1] <= sizes[0]


class Rerooting(Hook):
    """A driver hook that re-roots the state every ``every`` iterations (see the module docstring).

    After every ``every``-th step of this run, W (and the grid's H, whose partials are then
    recomputed from the reloaded W and H) comes from a fresh Zarr array in ``directory``
    (:meth:`Solver.rerooted <dnmf.run.driver.Solver.rerooted>`). The two latest spills are
    kept (a lost worker's blocks are re-read from the latest); older ones are deleted;
    :meth:`close` deletes the directory if this object created it. A user-given local
    directory is locked until :meth:`close` (see the module docstring).

    solver : the solver whose states are re-rooted.
    every : iterations between re-rootings (positive).
    directory : the spill directory, on a file system every worker can read and write (a
        shared one on a multi-node cluster), or an fsspec URL (``s3://bucket/spill``). None: a
        new temporary directory, deleted by :meth:`close`.

    Raises
    ------
    LockedError
        When another run holds the lock of ``directory``.
    """

    def __init__(self, solver: Solver, every: int, directory: str | os.PathLike | None = None):
        if every < 1:
            raise ParameterError(expected("a positive re-rooting interval", every))
        self.solver = solver
        self.every = int(every)
        self._owns_directory = directory is None
        base = dask.config.get("temporary-directory", None) or None
        if directory is None:
            directory = tempfile.mkdtemp(prefix="dnmf-reroot-", dir=base)
        self._lock = None
        if not self._owns_directory:
            self._lock = (ObjectLock if _is_url(directory) else FolderLock)(directory, "spill folder")
            self._lock.acquire()
            if not _is_url(directory):
                os.makedirs(directory, exist_ok=True)
        self.directory = os.fspath(directory)
        self.n_steps = 0
        self.n_reroots = 0
        self._first = _next_generation(self.directory)
        self._spills: list[int] = []

    def on_step(self, state: State) -> State:
        self.n_steps += 1
        if self.n_steps % self.every:
            return state
        generation = self._first + self.n_reroots
        self._spills.append(generation)

        def spill(X: da.Array, label: str) -> da.Array:
            return reroot(X, self._spill_url(label, generation))

        state = self.solver.rerooted(state, spill)
        self.n_reroots += 1
        while len(self._spills) > 2:
            self._remove(self._spills.pop(0))
        return state

    def _spill_url(self, label: str, generation: int) -> str:
        return f"{self.directory.rstrip('/')}/{label}-{generation:06d}.zarr"

    def _remove(self, generation: int) -> None:
        for label in ("W", "H"):
            _remove_tree(self._spill_url(label, generation))

    def close(self) -> None:
        """Delete the spills (and the directory if this object created it) and release the
        directory's lock; W must not need them."""
        for generation in self._spills:
            self._remove(generation)
        self._spills = []
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)
        if self._lock is not None:
            self._lock.release()


def _next_generation(directory: str) -> int:
    """The first spill number free in ``directory`` (a local folder or a URL prefix): after a
    killed run's leftovers."""
    if _is_url(directory):
        import fsspec

        fs, root = fsspec.core.url_to_fs(directory)
        try:
            names = [os.path.basename(entry.rstrip("/")) for entry in fs.ls(root, detail=False, refresh=True)]
        except FileNotFoundError:
            names = []
    else:
        names = os.listdir(directory)
    taken = [int(match.group(1)) for match in map(SPILL_NAME.match, names) if match]
    return max(taken, default=-1) + 1


def _is_url(path) -> bool:
    return "://" in os.fspath(path)


def _remove_tree(path: str) -> None:
    """Delete a directory or an fsspec URL prefix, ignoring what is already gone."""
    if not _is_url(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    try:
        fs.rm(root, recursive=True)
    except FileNotFoundError:
        pass
