"""The graph shape every pass over V has: a task per block, then a fixed-order tree reduce.

A pass maps a per-block kernel over V's blocks (and the blocks of W, H or a mask that go
with them), then sums the per-block results in a tree whose leaves and combinations come in
a fixed order, so the sum is the same bit for bit whichever scheduler runs it.

Two executors run that shape:

- :class:`TaskGraph` builds it as Dask tasks: :meth:`~TaskGraph.map` adds a task per block
  and returns their keys, :meth:`~TaskGraph.reduce` adds the tree over keys, and
  :meth:`~TaskGraph.delayed` / :meth:`~TaskGraph.array` give the Delayed objects and dask
  arrays over the one :class:`~dask.highlevelgraph.HighLevelGraph` it made;
- :class:`InProcess` (:data:`IN_PROCESS`) runs the same calls in this thread at once, on
  values instead of keys, for in-memory V where a graph's overhead would dominate.

The arguments of a per-block call follow :func:`dask.array.map_blocks`: a ``list`` holds one
argument per block; anything else (a key, an array, a number, a nested task) goes to every
block as it is. :func:`map_reduce` and :func:`map_blocks` are the two common shapes in one
call; :func:`tree_reduce` and :func:`tree_fold` are the tree itself, on a task dict and on
values.

This module imports dask and numpy only: it knows nothing of NMF.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, Protocol

import dask.array as da
import numpy as np
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

Key = Hashable
"""A dask key: a string or a tuple ``(name, *parts)``."""

Label = str | int | tuple
"""The parts of a key after a graph's name: one part, or a tuple of them."""

SPLIT_EVERY = 8
"""How many values each node of a reduction tree combines."""


def tree_reduce(dsk: dict, name: str, keys: list, combine: Callable, split_every: int = SPLIT_EVERY) -> Key:
    """Add a fixed-order tree of ``combine`` over ``keys`` to ``dsk``; return the root key.

    Level ``l`` of the tree has keys ``(f"{name}-sum{l}", g)``; each folds ``split_every``
    consecutive keys of the level below, left to right. The order of the leaves and of each
    combination is fixed, so the result is the same bit for bit whichever scheduler runs
    it. A single key is its own root (no task is added).
    """
    level = 0
    while len(keys) > 1:
        next_keys = []
        for j in range(0, len(keys), split_every):
            group = keys[j : j + split_every]
            key = (f"{name}-sum{level}", j // split_every)
            dsk[key] = (_fold, combine, group)
            next_keys.append(key)
        keys, level = next_keys, level + 1
    return keys[0]


def tree_fold(values: list, combine: Callable, split_every: int = SPLIT_EVERY) -> Any:
    """What :func:`tree_reduce` computes, run directly: the same tree, the same order."""
    while len(values) > 1:
        values = [_fold(combine, values[j : j + split_every]) for j in range(0, len(values), split_every)]
    return values[0]


def _fold(combine: Callable, values: list) -> Any:
    total = values[0]
    for value in values[1:]:
        total = combine(total, value)
    return total


def row_block_keys(arr: da.Array) -> list:
    """Dask keys of the row blocks of a 2-D array with one chunk of columns, top to bottom."""
    return [row[0] for row in arr.__dask_keys__()]


def _per_block(args: tuple) -> list[tuple]:
    """The arguments of each block: the lists' items side by side, the rest repeated."""
    lengths = {len(arg) for arg in args if isinstance(arg, list)}
    if len(lengths) != 1:
        raise ValueError(f"A per-block call needs lists of one length (one item per block), got lengths {sorted(lengths)}.")
    (n_blocks,) = lengths
    return [tuple(arg[b] if isinstance(arg, list) else arg for arg in args) for b in range(n_blocks)]


def _parts(label: Label) -> tuple:
    return label if isinstance(label, tuple) else (label,)


class Blocks(Protocol):
    """What :class:`TaskGraph` and :class:`InProcess` both do: per-block calls and fixed trees.

    On a TaskGraph the results are keys of tasks to run later; in process, they are values.
    """

    def constant(self, label: Label, value: Any) -> Any: ...

    def map(self, func: Callable, *args: Any, label: Label = ()) -> list: ...

    def reduce(self, parts: Sequence, combine: Callable, label: str | None = None) -> Any: ...


class TaskGraph:
    """A Dask graph under construction: tasks per block, fixed-order trees over them, and then
    the Delayed objects and dask arrays that read them, over one HighLevelGraph.

    Parameters
    ----------
    prefix : str
        What the graph's tasks are (``"dnmf-scan"``); its name is the prefix and a fresh
        uuid, and its keys are ``(name, *parts)``.
    dependencies : iterable of dask collections
        The collections whose keys the tasks read (V, W, a mask, persisted results); None
        entries are skipped.

    Notes
    -----
    Tasks are added until the first :meth:`delayed`, :meth:`array` or :attr:`graph`; the
    collections share the task dict, so adding to it afterwards raises.
    """

    def __init__(self, prefix: str, dependencies: Iterable = ()):
        self.name = f"{prefix}-{uuid.uuid4().hex}"
        self._dependencies = [dep for dep in dependencies if dep is not None]
        self._tasks: dict = {}
        self._graph: HighLevelGraph | None = None

    def _check_open(self) -> None:
        if self._graph is not None:
            raise RuntimeError(f"{self.name}: no task can be added once its collections are made.")

    def _add(self, key: Key, task: Any) -> Key:
        self._check_open()
        self._tasks[key] = task
        return key

    def constant(self, label: Label, value: Any) -> Key:
        """``value`` (an array the tasks share, such as H) as a key of its own: ``(name, *label)``."""
        return self._add((self.name, *_parts(label)), value)

    def task(self, label: Label, func: Callable, *args: Any) -> Key:
        """One task ``func(*args)`` with key ``(name, *label)``; ``args`` go in as they are."""
        return self._add((self.name, *_parts(label)), (func, *args))

    def map(self, func: Callable, *args: Any, label: Label = ()) -> list[Key]:
        """A task per block, ``func(*args_b)``: each ``list`` in ``args`` gives block b its
        item b, anything else goes to every block. Keys ``(name, *label, b)``, in order."""
        prefix = (self.name, *_parts(label))
        return [self._add((*prefix, b), (func, *block)) for b, block in enumerate(_per_block(args))]

    def map_blocks(self, func: Callable, *args: Any, array: str | None = None, axis: int = 0) -> list[Key]:
        """Like :meth:`map`, for the tasks that make the blocks of a dask array along ``axis``
        (0: row blocks, keys ``(array_name, b, 0)``; 1: column blocks, ``(array_name, 0, b)``),
        named ``name`` or ``f"{name}-{array}"``: see :meth:`array`."""
        name = self.name if array is None else f"{self.name}-{array}"
        return [
            self._add((name, b, 0) if axis == 0 else (name, 0, b), (func, *block))
            for b, block in enumerate(_per_block(args))
        ]

    def reduce(self, parts: Sequence[Key], combine: Callable, label: str | None = None) -> Key:
        """The fixed-order tree of ``combine`` over ``parts`` (:func:`tree_reduce`, named ``name``
        or ``f"{name}-{label}"``); its root key."""
        self._check_open()
        tree = self.name if label is None else f"{self.name}-{label}"
        return tree_reduce(self._tasks, tree, list(parts), combine)

    @property
    def graph(self) -> HighLevelGraph:
        """The tasks, as one layer named ``name`` over the dependencies' graphs."""
        if self._graph is None:
            self._graph = HighLevelGraph.from_collections(self.name, self._tasks, dependencies=self._dependencies)
        return self._graph

    def delayed(self, key: Key) -> Delayed:
        """The result of task ``key``."""
        return Delayed(key, self.graph, layer=self.name)

    def array(self, blocks: list[Key], chunks: tuple, dtype) -> da.Array:
        """The dask array whose blocks are ``blocks``, from :meth:`map_blocks`."""
        return da.Array(self.graph, blocks[0][0], chunks=chunks, dtype=dtype)


class InProcess:
    """:class:`TaskGraph`'s per-block calls and trees, run in this thread at once: the same
    blocks in the same order and the same tree, so the results are the same bit for bit."""

    def constant(self, label: Label, value: Any) -> Any:
        """``value`` itself (no key is needed to share it)."""
        return value

    def map(self, func: Callable, *args: Any, label: Label = ()) -> list:
        """``func(*args_b)`` for each block b, in order (``args`` as in :meth:`TaskGraph.map`)."""
        return [func(*block) for block in _per_block(args)]

    def reduce(self, parts: Sequence, combine: Callable, label: str | None = None) -> Any:
        """:func:`tree_fold` of ``parts``."""
        return tree_fold(list(parts), combine)


IN_PROCESS = InProcess()
"""The in-process executor (it holds no state)."""


def map_reduce(prefix: str, func: Callable, *args: Any, combine: Callable, dependencies: Iterable = ()) -> Delayed:
    """``func`` per block (``args`` as in :meth:`TaskGraph.map`), summed by ``combine`` in the
    fixed-order tree: the Delayed result of one pass."""
    graph = TaskGraph(prefix, dependencies)
    return graph.delayed(graph.reduce(graph.map(func, *args), combine))


def map_blocks(prefix: str, func: Callable, *args: Any, chunks: tuple, dtype, dependencies: Iterable = ()) -> da.Array:
    """A dask array with one task per block, ``func(*args_b)`` (``args`` as in
    :meth:`TaskGraph.map`), for ``chunks`` with one chunk along one of the two axes."""
    if len(chunks[0]) > 1 and len(chunks[1]) > 1:
        raise ValueError(f"map_blocks lays out row or column blocks, not a grid of {len(chunks[0])} x {len(chunks[1])}.")
    graph = TaskGraph(prefix, dependencies)
    blocks = graph.map_blocks(func, *args, axis=0 if len(chunks[1]) == 1 else 1)
    return graph.array(blocks, chunks, dtype)


def from_blocks(prefix: str, blocks: Sequence[Sequence[np.ndarray]], chunks: tuple, dtype) -> da.Array:
    """A dask array of blocks already in memory (``blocks[i][j]``), with no task: each is a key
    of its own, so nothing is copied."""
    name = f"{prefix}-{uuid.uuid4().hex}"
    dsk = {(name, i, j): block for i, row in enumerate(blocks) for j, block in enumerate(row)}
    return da.Array(HighLevelGraph.from_collections(name, dsk), name, chunks=chunks, dtype=dtype)
