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

The arguments of a per-block call are told apart as :func:`dask.array.map_blocks` tells its
dask arrays from other arguments: a ``list`` holds one argument per block; anything else (a
key, an array, a number, a nested task) goes to every block as it is. :func:`map_reduce` and :func:`map_blocks` are the two common shapes in one
call; :func:`tree_reduce` and :func:`tree_fold` are the tree itself, on a task dict and on
values.

This module imports dask and numpy only: it knows nothing of NMF.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Hashable, Iterable, Sequence
from itertools import islice, repeat
from typing import Any, Protocol

import dask
import dask.array as da
import numpy as np
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
from numpy.typing import DTypeLike

Key = Hashable
"""A dask key: a string or a tuple ``(name, *parts)``."""

Label = str | int | tuple
"""The parts of a key after a graph's name: one part, or a tuple of them."""

SPLIT_EVERY = 8
"""How many values each node of a reduction tree combines."""

REDUCE_PRIORITY = 1
"""The scheduler priority of a :class:`TaskGraph`'s tree nodes over its other tasks (0).

dask's static ordering runs most per-block tasks of a pass before the first tree node: with
172 blocks, the node summing blocks 0-7 came after 128 of them. A distributed worker then holds
nearly every block's result (r × p partials each) until the end of the pass, memory that grows
with V's rows: 2 × ~100 MiB of a 2·10⁶-row sparse V's steps on two workers. With the trees in
a layer of their own at a higher priority, each node runs as soon as its inputs are there. The
priority changes when a node runs, never what it sums (the tree is fixed)."""


def realign(value: Any, depth: int = 2) -> Any:
    """``value`` with each numpy array in it (itself, or inside tuples and lists up to ``depth``
    levels) aligned to its item size, copying only those that are not.

    An array that a distributed worker receives from another one can sit at any byte offset of
    the message's buffer. numpy hands only aligned arrays to BLAS and its vector loops, and
    computes products of unaligned ones with plain loops that round differently; so without
    this a result would depend on which worker ran which task.
    """
    if isinstance(value, np.ndarray):
        return value if value.flags.aligned else value.copy()
    if depth > 0 and isinstance(value, (tuple, list)):
        items = [realign(item, depth - 1) for item in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        if isinstance(value, list):
            return items
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    return value


def call_aligned(func: Callable, *args: Any) -> Any:
    """``func(*args)`` with the arrays of ``args`` aligned (:func:`realign`): the form of every
    task a :class:`TaskGraph` adds."""
    return func(*[realign(arg) for arg in args])


def compute(*collections: Any) -> tuple:
    """``dask.compute`` with the arrays of the results aligned (:func:`realign`), for the
    client's own products (the H update, the objective)."""
    return tuple(realign(value) for value in dask.compute(*collections))


def tree_reduce(dsk: dict, name: str, keys: list, combine: Callable, split_every: int = SPLIT_EVERY) -> Key:
    """Add a fixed-order tree of ``combine`` over ``keys`` to ``dsk``.

    Level ``l`` of the tree has keys ``(f"{name}-sum{l}", g)``; each folds ``split_every``
    consecutive keys of the level below, left to right. The order of the leaves and of each
    combination is fixed, so the result is the same bit for bit whichever scheduler runs it.

    Parameters
    ----------
    dsk : dict
        The task dict the tree's tasks are added to.
    name : str
        The name the tree's keys start with.
    keys : list
        The leaves, in order.
    combine : callable
        ``combine(a, b)``, the sum of two values.
    split_every : int
        How many values each task of the tree folds.

    Returns
    -------
    Key
        The root's key: ``keys[0]`` itself, with no task added, for a single leaf.
    """
    return _tree_levels(dsk, name, keys, combine, split_every, stop_below_root=False)[0]


def tree_reduce_below_root(dsk: dict, name: str, keys: list, combine: Callable, split_every: int = SPLIT_EVERY) -> list:
    """:func:`tree_reduce` less its root, when the root would fold sums rather than leaves.

    Returns the keys the root would fold, in order (at most ``split_every``); ``tree_fold`` of
    their values is the root's value, bit for bit. Where the caller needs the sum on the client
    anyway, folding them there saves the tree's last hop (a task, and a transfer to the worker
    that runs it). A tree of one level, whose root folds the leaves themselves, is kept whole:
    the leaves can be large (a step's W_i), and the list is then ``[root]``.
    """
    return _tree_levels(dsk, name, keys, combine, split_every, stop_below_root=True)


def _tree_levels(dsk: dict, name: str, keys: list, combine: Callable, split_every: int, stop_below_root: bool) -> list:
    """Add the tree's levels to ``dsk``; return the root's key alone, or (``stop_below_root``,
    past the first level) the keys below it."""
    level = 0
    while len(keys) > 1:
        if stop_below_root and level > 0 and len(keys) <= split_every:
            return keys
        next_keys = []
        for j in range(0, len(keys), split_every):
            group = keys[j : j + split_every]
            key = (f"{name}-sum{level}", j // split_every)
            dsk[key] = (_fold, combine, group)
            next_keys.append(key)
        keys, level = next_keys, level + 1
    return keys


def tree_fold(values: list, combine: Callable, split_every: int = SPLIT_EVERY) -> Any:
    """What :func:`tree_reduce` computes, run directly: the same tree, the same order.

    Parameters
    ----------
    values : list
        The leaves, in order.
    combine : callable
        ``combine(a, b)``, the sum of two values.
    split_every : int
        How many values each node of the tree folds.

    Returns
    -------
    object
        The sum; ``values[0]`` itself for a single value.
    """
    while len(values) > 1:
        values = [_fold(combine, values[j : j + split_every]) for j in range(0, len(values), split_every)]
    return values[0]


def _fold(combine: Callable, values: list) -> Any:
    values = [realign(value) for value in values]
    total = values[0]
    for value in values[1:]:
        total = combine(total, value)
    return total


def _reads(task: Any, keys: set) -> bool:
    """Whether ``task`` (a tuple task, its arguments nested in tuples and lists) names one of ``keys``."""
    if isinstance(task, (tuple, list)):
        try:
            if task in keys:
                return True
        except TypeError:  # an unhashable part
            pass
        return any(_reads(part, keys) for part in task)
    try:
        return task in keys
    except TypeError:
        return False


def row_block_keys(arr: da.Array) -> list:
    """Dask keys of the row blocks of a 2-D array with one chunk of columns, top to bottom."""
    return [row[0] for row in arr.__dask_keys__()]


def _per_block(args: tuple) -> list[tuple]:
    """The arguments of each block: the lists' items side by side, the rest repeated."""
    lengths = {len(arg) for arg in args if isinstance(arg, list)}
    if len(lengths) != 1:
        raise ValueError(f"A per-block call needs lists of one length (one item per block), got lengths {sorted(lengths)}.")
    (n_blocks,) = lengths
    return list(zip(*(arg if isinstance(arg, list) else repeat(arg, n_blocks) for arg in args)))


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
        self._tree_keys: set = set()
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
        return self._add((self.name, *_parts(label)), (call_aligned, func, *args))

    def map(self, func: Callable, *args: Any, label: Label = ()) -> list[Key]:
        """Add a task per block, ``func(*args_b)``.

        Parameters
        ----------
        func : callable
            The per-block kernel.
        *args
            Each ``list`` gives block b its item b (the lists have one length, the number of
            blocks); anything else goes to every block as it is.
        label : str, int or tuple
            The key parts between the graph's name and the block number.

        Returns
        -------
        list of Key
            ``(name, *label, b)`` for each block b, in order.
        """
        prefix = (self.name, *_parts(label))
        return [self._add((*prefix, b), (call_aligned, func, *block)) for b, block in enumerate(_per_block(args))]

    def map_blocks(self, func: Callable, *args: Any, array: str | None = None, axis: int = 0, eager: bool = False) -> list[Key]:
        """Add a task per block of a dask array, ``func(*args_b)`` (see :meth:`map`); the
        array itself comes from :meth:`array`.

        Parameters
        ----------
        func, *args
            As in :meth:`map`.
        array : str, optional
            The array's name after the graph's: ``f"{name}-{array}"``; by default ``name``.
        axis : {0, 1}
            0 for row blocks (keys ``(array_name, b, 0)``), 1 for column blocks
            (``(array_name, 0, b)``).
        eager : bool
            Run each task as soon as it can, as the trees' nodes do (:data:`REDUCE_PRIORITY`):
            for tasks that let a larger result be freed, such as W_i taken out of a step's
            ``(W_i, partials_i)`` (the step result is held until its last reader has run).

        Returns
        -------
        list of Key
            The blocks' keys, in order.
        """
        name = self.name if array is None else f"{self.name}-{array}"
        keys = [
            self._add((name, b, 0) if axis == 0 else (name, 0, b), (call_aligned, func, *block))
            for b, block in enumerate(_per_block(args))
        ]
        if eager:
            self._tree_keys.update(keys)
        return keys

    def reduce(self, parts: Sequence[Key], combine: Callable, label: str | None = None) -> Key:
        """Add the fixed-order tree of ``combine`` over ``parts`` (:func:`tree_reduce`).

        Parameters
        ----------
        parts : sequence of Key
            The leaves, in order.
        combine : callable
            ``combine(a, b)``, the sum of two values.
        label : str, optional
            The tree's keys start with ``f"{name}-{label}"``; by default with ``name``.

        Returns
        -------
        Key
            The root's key.
        """
        return self._add_tree(tree_reduce, parts, combine, label)

    def reduce_below_root(self, parts: Sequence[Key], combine: Callable, label: str | None = None) -> list[Key]:
        """Add the fixed-order tree of ``combine`` over ``parts`` less its root
        (:func:`tree_reduce_below_root`): :func:`tree_fold` of the returned keys' values is
        what :meth:`reduce` would compute, bit for bit.
        """
        return self._add_tree(tree_reduce_below_root, parts, combine, label)

    def _add_tree(self, add: Callable, parts: Sequence[Key], combine: Callable, label: str | None):
        """``add(tasks, name, parts, combine)`` (a tree builder) on this graph; the keys it adds
        (the last ones in the task dict) are remembered as the trees' (see :attr:`graph`)."""
        self._check_open()
        tree = self.name if label is None else f"{self.name}-{label}"
        before = len(self._tasks)
        out = add(self._tasks, tree, list(parts), combine)
        self._tree_keys.update(islice(self._tasks, before, None))
        return out

    @property
    def _trees_layer(self) -> str:
        return f"{self.name}-trees"

    def scope(self, prefix: str) -> Scope:
        """This graph with the labels of what is added through it prefixed by ``prefix``: to
        build several computations of one kind side by side in one graph (fused fits)."""
        return Scope(self, prefix)

    @property
    def graph(self) -> HighLevelGraph:
        """The tasks, as a layer named ``name`` over the dependencies' graphs, and their trees
        in a layer of their own at :data:`REDUCE_PRIORITY` (when no other task reads them)."""
        if self._graph is None:
            self._graph = self._make_graph()
        return self._graph

    def _make_graph(self) -> HighLevelGraph:
        trees = {key: task for key, task in self._tasks.items() if key in self._tree_keys}
        rest = {key: task for key, task in self._tasks.items() if key not in self._tree_keys}
        if not trees or any(_reads(task, self._tree_keys) for task in rest.values()):
            self._tree_keys = set()
            return HighLevelGraph.from_collections(self.name, self._tasks, dependencies=self._dependencies)
        graph = HighLevelGraph.from_collections(self.name, rest, dependencies=self._dependencies)
        layers, deps = dict(graph.layers), dict(graph.dependencies)
        layers[self._trees_layer] = MaterializedLayer(trees, annotations={"priority": REDUCE_PRIORITY})
        deps[self._trees_layer] = {self.name, *graph.dependencies[self.name]}
        return HighLevelGraph(layers, deps)

    def delayed(self, key: Key) -> Delayed:
        """The result of task ``key``."""
        graph = self.graph
        return Delayed(key, graph, layer=self._trees_layer if key in self._tree_keys else self.name)

    def array(self, blocks: list[Key], chunks: tuple, dtype: DTypeLike) -> da.Array:
        """The dask array whose blocks are ``blocks`` (from :meth:`map_blocks`), of ``chunks``."""
        return da.Array(self.graph, blocks[0][0], chunks=chunks, dtype=dtype)


class Scope:
    """A :class:`TaskGraph` seen with its labels prefixed (:meth:`TaskGraph.scope`): the same
    calls, whose keys (and arrays' and trees' names) carry ``prefix``, so that builders that
    label their tasks alike can share one graph without their keys meeting."""

    def __init__(self, graph: TaskGraph, prefix: str):
        self.graph = graph
        self.prefix = prefix

    def _label(self, label: Label) -> tuple:
        return (self.prefix, *_parts(label))

    def _name(self, name: str | None) -> str:
        return self.prefix if name is None else f"{self.prefix}-{name}"

    def constant(self, label: Label, value: Any) -> Key:
        return self.graph.constant(self._label(label), value)

    def task(self, label: Label, func: Callable, *args: Any) -> Key:
        return self.graph.task(self._label(label), func, *args)

    def map(self, func: Callable, *args: Any, label: Label = ()) -> list[Key]:
        return self.graph.map(func, *args, label=self._label(label))

    def map_blocks(self, func: Callable, *args: Any, array: str | None = None, axis: int = 0, eager: bool = False) -> list[Key]:
        return self.graph.map_blocks(func, *args, array=self._name(array), axis=axis)

    def reduce(self, parts: Sequence[Key], combine: Callable, label: str | None = None) -> Key:
        return self.graph.reduce(parts, combine, label=self._name(label))

    def reduce_below_root(self, parts: Sequence[Key], combine: Callable, label: str | None = None) -> list[Key]:
        return self.graph.reduce_below_root(parts, combine, label=self._name(label))

    def delayed(self, key: Key) -> Delayed:
        return self.graph.delayed(key)

    def array(self, blocks: list[Key], chunks: tuple, dtype: DTypeLike) -> da.Array:
        return self.graph.array(blocks, chunks, dtype)


class InProcess:
    """:class:`TaskGraph`'s per-block calls and trees, run in this thread at once: the same
    blocks in the same order and the same tree, so the results are the same bit for bit.

    The ``label`` arguments name keys on a TaskGraph; here they are ignored.
    """

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
    """A task per block, summed in the fixed-order tree: one pass, as a Delayed sum.

    Parameters
    ----------
    prefix : str
        What the pass is (see :class:`TaskGraph`).
    func, *args
        The per-block kernel and its arguments, as in :meth:`TaskGraph.map`.
    combine : callable
        ``combine(a, b)``, the sum of two results.
    dependencies : iterable of dask collections
        The collections whose keys the tasks read.

    Returns
    -------
    Delayed
        The sum of ``func``'s results over the blocks.
    """
    graph = TaskGraph(prefix, dependencies)
    return graph.delayed(graph.reduce(graph.map(func, *args), combine))


def map_blocks(
    prefix: str, func: Callable, *args: Any, chunks: tuple, dtype: DTypeLike, dependencies: Iterable = ()
) -> da.Array:
    """A dask array made by a task per block.

    Parameters
    ----------
    prefix : str
        What the array is (see :class:`TaskGraph`).
    func, *args
        Block b is ``func(*args_b)``, ``args`` as in :meth:`TaskGraph.map`.
    chunks : tuple
        The array's chunks: row blocks or column blocks (one chunk along the other axis).
    dtype : dtype
        The blocks' dtype.
    dependencies : iterable of dask collections
        The collections whose keys the tasks read.

    Returns
    -------
    dask.array.Array
    """
    if len(chunks[0]) > 1 and len(chunks[1]) > 1:
        raise ValueError(f"map_blocks lays out row or column blocks, not a grid of {len(chunks[0])} x {len(chunks[1])}.")
    graph = TaskGraph(prefix, dependencies)
    blocks = graph.map_blocks(func, *args, axis=0 if len(chunks[1]) == 1 else 1)
    return graph.array(blocks, chunks, dtype)


def from_blocks(prefix: str, blocks: Sequence[Sequence[Any]], chunks: tuple, dtype: DTypeLike, meta: Any = None) -> da.Array:
    """A dask array of blocks already in memory, with no task and no copy.

    Parameters
    ----------
    prefix : str
        What the array is; its name is the prefix and a fresh uuid.
    blocks : sequence of sequences of arrays
        ``blocks[i][j]`` is block (i, j) (a view is kept as it is).
    chunks : tuple
        The array's chunks, matching the blocks' shapes.
    dtype : dtype
        The blocks' dtype.
    meta : array-like, optional
        An empty block of the blocks' type (a CSR matrix for sparse blocks); numpy's by default.

    Returns
    -------
    dask.array.Array
    """
    name = f"{prefix}-{uuid.uuid4().hex}"
    dsk = {(name, i, j): block for i, row in enumerate(blocks) for j, block in enumerate(row)}
    return da.Array(HighLevelGraph.from_collections(name, dsk), name, chunks=chunks, dtype=dtype, meta=meta)
