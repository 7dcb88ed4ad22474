"""In-memory arrays made resident on a dask.distributed cluster, block by block, and sent again
when a worker holding some of their blocks is lost.

An array the client holds (a numpy or scipy.sparse V, a mask, a starting W) would otherwise go
into the task graphs: the whole array pickled through the scheduler with every graph that reads
it ("Sending large graph", 800 MB and seconds per fit for a 20000 x 5000 float64 V), kept
there as the lineage of every result. ``client.scatter`` puts the blocks on the workers without
a graph, but scattered data has no lineage: when its worker dies the scheduler forgets it and
every task that needs it, and the fit fails.

:func:`make_resident` gives each block a key whose task *receives* the block from the client:

1. the task, on whichever worker the scheduler picks, puts a request (block, reply name, its
   own address) in a :class:`distributed.Queue` and waits on a :class:`distributed.Variable`
   named in the request, holding its thread: a worker takes the next block only once it has
   this one, so the blocks spread over the workers as evenly as their threads (seceded, the
   tasks went 7 / 5 to two workers, and every pass waited on the fuller one);
2. a thread of the client (:class:`_Sender`) answers each request by scattering the block
   straight to the requesting worker (``direct``, no detour through the scheduler) and
   setting the reply variable to it;
3. the task takes the block (from its own worker's memory: no copy) and ends with it as its
   result.

The blocks are placed this way once, when the array is persisted; they cross the network once,
in row blocks. A worker lost later takes its blocks with it, but their keys have a task, so the
scheduler runs it again elsewhere and the client sends them again, as for any lost result:
every computation waiting on them goes on, and, since the blocks are the client's own, bit for
bit as before. The sender stops when the last reference to the resident array's futures goes.
"""

from __future__ import annotations

import logging
import threading
import uuid
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from itertools import product
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask._task_spec import Task
from dask.core import flatten
from dask.highlevelgraph import HighLevelGraph

from ..cluster import current_client
from ..errors import BlockNotReceived
from ..graph import realign

logger = logging.getLogger(__name__)

# How long a block's task waits for the client to send it (seconds): past it, the client that
# holds the array is taken to be gone.
RECEIVE_TIMEOUT = 600
# Requests the client answers at once.
SENDER_THREADS = 4


def make_resident(client, arr: da.Array, prefix: str) -> da.Array:
    """``arr``, an array whose blocks the client holds, resident on ``client``'s workers.

    Parameters
    ----------
    client : distributed.Client
        The client whose workers take the blocks.
    arr : dask array
        An array of blocks in this process's memory (a graph of views of a numpy array, or of
        slices of a scipy.sparse one): computing a block needs no worker.
    prefix : str
        What the array is (``"dnmf-V"``); its keys are ``(f"{prefix}-resident-{uuid}", i, j)``.

    Returns
    -------
    dask array
        ``arr``'s values and chunks, persisted on the workers, each block sent once; a block
        lost with its worker is sent again (see the module docstring).
    """
    from distributed import futures_of, wait

    name = f"{prefix}-resident-{uuid.uuid4().hex}"
    sender = _Sender(client, f"{name}-requests", _block_source(arr))
    indices = list(product(*(range(len(sizes)) for sizes in arr.chunks)))
    dsk = {
        (name, *index): Task((name, *index), receive_block, sender.queue_name, index, RECEIVE_TIMEOUT)
        for index in indices
    }
    graph = HighLevelGraph.from_collections(name, dsk)
    lazy = da.Array(graph, name, chunks=arr.chunks, dtype=arr.dtype, meta=arr._meta)
    sender.start()
    resident = client.persist(lazy)
    futures = futures_of(resident)
    wait(futures)
    # The sender serves as long as the array's futures are held (its blocks may be lost and
    # asked for again until then).
    weakref.finalize(futures[0], sender.stop)
    return resident


def to_workers(arr: da.Array, prefix: str) -> da.Array:
    """``arr`` (blocks in this process's memory) made resident on the current distributed
    client's workers (:func:`make_resident`); ``arr`` itself under dask's local schedulers."""
    client = current_client()
    return arr if client is None else make_resident(client, arr, prefix)


def _block_source(arr: da.Array) -> Callable[[tuple], Any]:
    """Block ``index`` of ``arr``: the graph's own value when it is there (a view of the
    user's array, sent without a copy), else computed here (a slice of a sparse matrix)."""
    graph = arr.__dask_graph__()

    def block(index: tuple) -> Any:
        value = graph.get((arr.name, *index))
        if hasattr(value, "value"):  # a DataNode of dask's task spec
            value = value.value
        if hasattr(value, "shape") and hasattr(value, "dtype"):
            return value
        (value,) = dask.compute(arr.blocks[index], scheduler="sync")
        return value

    return block


def receive_block(queue_name: str, index: tuple, timeout: float) -> Any:
    """The task of a resident block: ask the client for block ``index`` and wait for it.

    Runs on a worker, holding its thread while it waits (see the module docstring). Raises
    :class:`BlockNotReceived` when nothing comes within ``timeout`` seconds.
    """
    from distributed import Queue, Variable, get_worker, worker_client

    address = get_worker().address
    reply = f"{queue_name}-reply-{uuid.uuid4().hex}"
    with worker_client(separate_thread=False) as client:
        requests = Queue(queue_name, client=client)
        requests.put((index, reply, address))
        requests.close()
        variable = Variable(reply, client=client)
        try:
            future = variable.get(timeout=timeout)
        except TimeoutError as e:
            raise BlockNotReceived(
                f"Block {index} of an array held by the client ({queue_name}) was lost with its worker, "
                f"and the client did not send it again within {timeout} s: the client is gone."
            ) from e
        block = future.result()
        variable.delete()
    # Kept aligned, once: a scattered array sits at whatever offset its message put it, and
    # every task would otherwise copy it again (see aligned_block).
    return aligned_block(block)


def aligned_block(block: Any) -> Any:
    """``block`` (a numpy array or a scipy.sparse matrix) with its arrays aligned to their item
    size, copied only where they are not (:func:`dnmf.graph.realign`).

    An array a worker received in a message (scattered, embedded in a graph, or fetched from
    another worker) sits at the byte offset the message put it at. dnmf's tasks realign their
    arguments, since numpy computes with unaligned arrays in other loops that round
    differently; a V block that stays unaligned is then copied by every task that reads it:
    ~20 ms of a 30 ms step on a 66 MB block here, one and a half times the step's time.
    """
    if is_aligned(block):
        return block
    if _is_sparse(block):
        return type(block)(tuple(realign(part) for part in _arrays(block)), shape=block.shape)
    return realign(block)


def is_aligned(block: Any) -> bool:
    """Whether the arrays of ``block`` (a numpy array or a CSR / CSC matrix) are aligned."""
    return all(part.flags.aligned for part in _arrays(block))


def _is_sparse(block: Any) -> bool:
    return hasattr(block, "indptr") and hasattr(block, "data")


def _arrays(block: Any) -> tuple:
    return (block.data, block.indices, block.indptr) if _is_sparse(block) else (block,)


def _aligned_here(keys: list, dask_worker=None) -> list:
    """``(key, aligned)`` for each of ``keys`` that this worker holds in memory (on a worker,
    by ``client.run``)."""
    data = dask_worker.data
    fast = getattr(data, "fast", data)  # not unspilled to look at it: read back, it is aligned
    return [(key, is_aligned(fast[key])) for key in map(tuple, keys) if key in fast]


def placed_for_the_fit(client, arr: da.Array, v_bytes: int, spare_bytes: int) -> da.Array:
    """``arr``, persisted on ``client``'s cluster, as copies of its blocks aligned and spread
    over the workers as evenly as their threads, when its own blocks are not (some unaligned,
    see :func:`aligned_block`, or more on one worker than its share) and the copies, of
    ``v_bytes``, fit in ``spare_bytes``; ``arr`` itself otherwise (already so, not persisted,
    or no room).

    A dask array made from an in-memory one (``client.persist(da.from_array(x))``) or scattered
    by the user arrives in the workers inside messages, at any offset: 10 of 12 blocks were
    unaligned here. And each step runs where its block is, so a worker holding 4 of 6 blocks
    made every pass wait for it (a 20000 x 5000 float32 V placed so by the scheduler: 127 ms
    of steps on one worker, 71 on the other). The copies are dnmf's own, freed with the fit;
    a block already where it should be is copied in place, the others move once. The user's
    blocks stay as they are.
    """
    from distributed import futures_of

    keys = list(flatten(arr.__dask_keys__()))
    futures = {future.key: future for future in futures_of(arr)}
    if not keys or any(key not in futures for key in keys):
        return arr
    holders = client.who_has([futures[key] for key in keys])
    targets = even_placement(keys, {key: holders.get(key, ()) for key in keys}, client.nthreads())
    # Looked at in each worker's memory: a task would see the block moved to its worker.
    aligned_on = {
        (tuple(key), address): flag for address, found in client.run(_aligned_here, keys).items() for key, flag in found
    }
    aligned = np.array([aligned_on.get((key, targets[key]), False) for key in keys])
    moved = sum(targets[key] not in holders.get(key, ()) for key in keys)
    if aligned.all() and not moved:
        return arr
    if v_bytes > spare_bytes:
        logger.info(
            "V's blocks in the workers: %d of %d unaligned (every task copies them), %d more on some "
            "workers than their share; copies placed for the fit (%.0f MiB) would not fit beside them",
            int((~aligned).sum()), aligned.size, moved, v_bytes / 2**20,
        )
        return arr
    copy = arr.map_blocks(_aligned_copy, dtype=arr.dtype, meta=arr._meta)
    where = {(copy.name, *key[1:]): [targets[key]] for key in keys}
    # Loose restrictions: a copy whose worker is gone goes elsewhere rather than wait for it.
    with dask.annotate(workers=lambda key: where.get(key, []), allow_other_workers=True):
        (copy,) = dask.persist(copy, optimize_graph=False)
    return copy


def _shares(n: int, threads: dict) -> dict:
    """How many of ``n`` keys each worker gets: its share of the threads, the shares differing
    by at most one key (the remainder to the workers whose exact share lost the most)."""
    workers = sorted(threads)
    total = sum(threads.values())
    exact = {w: n * threads[w] / total for w in workers}
    share = {w: int(exact[w]) for w in workers}
    for w in sorted(workers, key=lambda w: share[w] - exact[w])[: n - sum(share.values())]:
        share[w] += 1
    return share


def contiguous_placement(n_blocks: int, threads: dict) -> list[tuple[str, int]]:
    """For each of ``n_blocks`` row blocks, its worker and its place in that worker's run: the
    first worker's share of the blocks (as in :func:`even_placement`), then the next worker's;
    the first run taken from its last block down, the second from its first up, and so on.

    For the tasks of a V streamed from its store, which could run anywhere. The partials' tree
    sums consecutive blocks, so with runs each worker's tree nodes find their leaves on it, and
    its results are summed and freed as it goes; with every other run reversed, the node over
    the blocks where two runs meet has them all early in the pass. Placed by the scheduler,
    blocks alternated between the workers, and a worker that ran ahead held its results until
    the other caught up: 35 step results (30 MiB) on one 512 MiB worker streaming a 152-block
    sparse V (HALS), against 13 on the other.
    """
    share = _shares(n_blocks, threads)
    return [
        (w, i if k % 2 else share[w] - 1 - i) for k, w in enumerate(sorted(threads)) for i in range(share[w])
    ]


def even_placement(keys: list, holders: dict, threads: dict) -> dict:
    """A worker for each key: each worker gets a share of the keys as its share of the threads
    (shares differing by at most one key), a key staying on a worker that holds it whenever
    that worker's share allows (``holders``: the workers holding each key)."""
    workers = sorted(threads)
    share = _shares(len(keys), threads)
    targets = {}
    # Keys held by one worker first; a key held by several (copies made by earlier tasks) stays
    # on the one with the most of its share left.
    for key in sorted(keys, key=lambda key: len(holders.get(key, ()))):
        held = [w for w in holders.get(key, ()) if share.get(w, 0) > 0]
        if held:
            w = max(held, key=lambda w: share[w])
            targets[key] = w
            share[w] -= 1
    for key in keys:
        if key not in targets:
            w = max(workers, key=lambda w: share[w])
            targets[key] = w
            share[w] -= 1
    return targets


def _aligned_copy(block: Any) -> Any:
    """A copy of ``block`` made here (so aligned), whether or not ``block`` is."""
    return block.copy()


class _Sender:
    """The client's side of :func:`receive_block`: a daemon thread that answers each request
    by scattering the block to the worker that asked for it, until :meth:`stop` or the client
    closes."""

    def __init__(self, client, queue_name: str, source: Callable[[tuple], Any]):
        self.client = client
        self.queue_name = queue_name
        self.source = source
        self._thread = threading.Thread(target=self._serve, name=f"dnmf-sender-{queue_name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Make the thread end (from any thread, a garbage collection's included: the request
        that ends it is sent from a thread of its own)."""
        threading.Thread(target=self._put_end, name=f"dnmf-sender-end-{self.queue_name}", daemon=True).start()

    def _put_end(self) -> None:
        from distributed import Queue

        try:
            if self.client.status == "running":
                Queue(self.queue_name, client=self.client).put(None)
        except Exception:  # the client closed meanwhile, and the thread with it
            pass

    def _serve(self) -> None:
        from distributed import Queue

        requests = Queue(self.queue_name, client=self.client)
        # Requests come in bursts (every block at once when the array is placed): answered a
        # few at a time, the round trips of each overlap the others' and the transfers go to
        # several workers at once.
        with ThreadPoolExecutor(SENDER_THREADS, thread_name_prefix=f"dnmf-sender-{self.queue_name}") as pool:
            while True:
                try:
                    request = requests.get()
                except Exception:  # the client closed: nothing more can be asked for
                    return
                if request is None:
                    break
                pool.submit(self._send, *request)
        try:
            requests.close()
        except Exception:
            pass

    def _send(self, index: tuple, reply: str, address: str) -> None:
        """Scatter block ``index`` to the worker at ``address`` and name it in ``reply``."""
        from distributed import Variable

        try:
            future = self.client.scatter(self.source(index), workers=[address], direct=True, hash=False)
            Variable(reply, client=self.client).set(future)
            del future  # the reply variable holds the block until the task has it
        except Exception as e:  # the asking worker is gone too: its task will ask again elsewhere
            logger.info("block %s of %s not sent to %s: %s: %s", index, self.queue_name, address, type(e).__name__, e)
