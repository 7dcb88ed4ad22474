"""Keeping a dask worker's resident memory to what it uses: freed heap memory goes back to the OS
when the worker nears its memory limit."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

import dask
from dask.utils import parse_timedelta
from distributed import WorkerPlugin
from tornado.ioloop import PeriodicCallback

logger = logging.getLogger(__name__)


class TrimFreedMemory(WorkerPlugin):
    """A worker plugin that hands freed heap memory back to the OS as a worker's memory grows.

    With the large thresholds of :data:`dnmf.cluster.WORKER_MALLOC_ENV`, glibc keeps what a task
    frees for the next task, which is what makes repeated block-sized temporaries cheap, but it
    keeps it in the process, where it counts against dask's pause (80%) and restart (95%) marks:
    2 workers of 256 MiB held ~180 MiB each after streaming a 2 GiB V, ~130 MiB after
    ``malloc_trim``. So, at the worker's memory monitor interval, once the process holds more
    than ``fraction`` of its memory limit and ``step`` of the limit more than after the last
    trim: ``malloc_trim(0)``. A trim costs page faults when the memory is used again, hence the
    step. Nothing happens on a worker without a memory limit or outside glibc.
    """

    name = "dnmf-trim-freed-memory"
    idempotent = True  # registering it again (every fit does) is a no-op

    def __init__(self, fraction: float = 0.25, step: float = 1 / 16):
        self.fraction = fraction
        self.step = step

    def setup(self, worker):
        self._trim = _malloc_trim()
        limit = worker.memory_manager.memory_limit
        if self._trim is None or not limit:
            return
        self._worker = worker
        self._limit = limit
        self._after_last_trim = 0
        interval = parse_timedelta(dask.config.get("distributed.worker.memory.monitor-interval"))
        callback = PeriodicCallback(self._maybe_trim, interval * 1000)
        worker.periodic_callbacks[self.name] = callback  # stopped when the worker closes
        callback.start()

    def teardown(self, worker):
        callback = worker.periodic_callbacks.pop(self.name, None)
        if callback is not None:
            callback.stop()

    def _maybe_trim(self) -> None:
        memory = self._worker.monitor.get_process_memory()
        if memory > self.fraction * self._limit and memory > self._after_last_trim + self.step * self._limit:
            self._trim(0)
            self._after_last_trim = self._worker.monitor.get_process_memory()
            logger.debug("malloc_trim: %d -> %d bytes", memory, self._after_last_trim)


def _malloc_trim():
    """glibc's ``malloc_trim``, or None elsewhere."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
