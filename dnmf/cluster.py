"""Where a fit runs: one small place that finds or starts a dask.distributed cluster.

:func:`get_client` understands every way dnmf is launched:

========================  =====================================================================
``scheduler``             what happens
========================  =====================================================================
``None``                  the current ``Client`` if there is one, else a new ``LocalCluster``
``"local"``               a new ``LocalCluster`` on 127.0.0.1 (``n_workers``, ``threads_per_worker``,
                          ``memory_limit``)
``"threads"``             no cluster: dask's threaded scheduler in this process
a ``Client``              used as it is
``"tcp://host:8786"``     connect to a running scheduler (any ``proto://`` address or ``host:port``)
a ``.json`` path          connect through a scheduler file (``dask scheduler --scheduler-file``)
``"slurm"`` / ``"pbs"``   start a dask-jobqueue ``SLURMCluster`` / ``PBSCluster`` with ``job_options``
                          (cores, memory, queue, account, walltime, interface, ...) and scale it to
                          ``n_workers`` jobs
``"mpi"``                 join a dask-mpi allocation: ``dask_mpi.initialize()`` turns MPI rank 0
                          into the scheduler, rank 1 into this client, the other ranks into workers
========================  =====================================================================

Use it as a context manager, which closes what it started::

    with dnmf.cluster.connect("local", n_workers=4, memory_limit="4GiB") as client:
        NMF(10).fit("data/V.zarr")

or as ``client, owned = get_client(...)`` followed by ``close_client(client, owned)``.

The helpers at the bottom tell the estimator how much memory the workers have, so that it can
choose row blocks that fit in a worker and decide whether V can be cached.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping

import dask

from .errors import ParameterError, expected

logger = logging.getLogger(__name__)

JOBQUEUE_SCHEDULERS = ("slurm", "pbs")
NAMED_SCHEDULERS = ("local", "threads", "mpi", *JOBQUEUE_SCHEDULERS)


def get_client(
    scheduler=None,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | int | None = None,
    *,
    job_options: Mapping | None = None,
):
    """A dask.distributed ``Client`` for ``scheduler`` and whether this call created it.

    Parameters
    ----------
    scheduler : None, str, os.PathLike or distributed.Client
        See the module docstring for the accepted values.
    n_workers : int, optional
        Workers of a new ``LocalCluster`` (default: one per core, at most 4), or the number of
        jobs of a dask-jobqueue cluster (default 1).
    threads_per_worker : int, optional
        Threads per worker of a new ``LocalCluster`` (default 1: BLAS already uses the core).
    memory_limit : str or int, optional
        Memory limit per worker of a new ``LocalCluster`` (e.g. ``"4GiB"``; default: the
        machine's memory shared between the workers).
    job_options : mapping, optional
        Keyword arguments of ``SLURMCluster`` / ``PBSCluster`` (``cores``, ``memory``,
        ``queue``, ``account``, ``walltime``, ``interface``, ``job_extra_directives``, ...);
        for ``"mpi"``, those of ``dask_mpi.initialize`` named in :data:`MPI_OPTIONS`
        (``interface``, ``protocol``, ``local_directory``, ``dashboard_address``).

    Returns
    -------
    client : distributed.Client or None
        None for ``scheduler="threads"``.
    owned : bool
        True when this call started the client (and maybe its cluster): close it with
        :func:`close_client`.
    """
    from distributed import Client

    if isinstance(scheduler, Client):
        return scheduler, False
    if scheduler is None:
        current = current_client()
        if current is not None:
            return current, False
        return _local_client(n_workers, threads_per_worker, memory_limit), True
    if not isinstance(scheduler, (str, os.PathLike)):
        raise ParameterError(_scheduler_expected(scheduler))
    text = os.fspath(scheduler)
    if text == "threads":
        return None, False
    if text == "local":
        return _local_client(n_workers, threads_per_worker, memory_limit), True
    if text in JOBQUEUE_SCHEDULERS:
        return _jobqueue_client(text, n_workers or 1, job_options or {}), True
    if text == "mpi":
        return _mpi_client(memory_limit, job_options or {}), True
    if text.endswith(".json"):
        if not os.path.exists(text):
            raise ParameterError(f"No scheduler file at {text!r}: start the scheduler with --scheduler-file first.")
        return _remote_client(text, scheduler_file=text), True
    if "://" in text or _looks_like_host_port(text):
        return _remote_client(text, address=text), True
    raise ParameterError(_scheduler_expected(scheduler))


def _remote_client(label: str, **where):
    """Connect to a running scheduler, waiting at most ``dnmf.connect-timeout`` (default 10 s)."""
    from distributed import Client

    try:
        return Client(**where, timeout=dask.config.get("dnmf.connect-timeout", "10s"))
    except (OSError, ValueError) as e:
        raise ParameterError(
            f"Cannot reach a Dask scheduler at {label!r} ({e}); check the address, or use --scheduler local."
        ) from e


def dashboard_link(client) -> str | None:
    """The dashboard URL of ``client``'s cluster, or None when it has no dashboard."""
    if client is None:
        return None
    try:
        import bokeh  # noqa: F401  (the dashboard needs bokeh)
    except ImportError:
        return None
    return client.dashboard_link


def close_client(client, owned: bool) -> None:
    """Close ``client`` and the cluster it started, if :func:`get_client` created them."""
    if client is None or not owned:
        return
    cluster = getattr(client, "cluster", None)
    client.close()
    if cluster is not None:
        cluster.close()


@contextlib.contextmanager
def connect(
    scheduler=None,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | int | None = None,
    *,
    job_options: Mapping | None = None,
) -> Iterator:
    """:func:`get_client` as a context manager that closes what it started.

    Inside the block the client is the default one (``scheduler="threads"`` selects dask's
    threaded scheduler instead), so every dnmf call runs on it.
    """
    client, owned = get_client(
        scheduler, n_workers, threads_per_worker, memory_limit, job_options=job_options
    )
    try:
        if client is None:
            with dask.config.set(scheduler="threads"):
                yield None
        else:
            with client.as_current():
                yield client
    finally:
        close_client(client, owned)


def _scheduler_expected(got) -> str:
    return expected(
        f"scheduler None, a distributed.Client, one of {NAMED_SCHEDULERS}, a scheduler address "
        "such as 'tcp://10.0.0.1:8786', or the path of a scheduler file (.json)",
        got,
    )


def _looks_like_host_port(text: str) -> bool:
    host, sep, port = text.rpartition(":")
    return bool(sep and host and port.isdigit())


# glibc settings for dnmf's workers. Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536, which also
# pins glibc's mmap threshold at 128 KiB: every block-sized temporary is then a fresh mmap whose
# pages are faulted in again on every task (measured here: 340 ms against 70 ms per iteration for
# a 20000 x 5000 MU fit on 2 workers). Large thresholds let freed memory be reused instead.
# Two malloc arenas: a worker's threads (its task thread, Zarr's asyncio decoders, the comms)
# otherwise each fill an arena of their own with freed blocks that no other thread reuses;
# streaming a sparse store on 512 MiB workers peaked 30-45 MiB lower (HALS 168 -> 135 MiB at
# 50000 rows, 234 -> 188 MiB at 400000; MU-KL 341 -> 298 MiB), iterations as fast as before.
WORKER_MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": str(2**28), "MALLOC_MMAP_THRESHOLD_": str(2**28), "MALLOC_ARENA_MAX": "2"}


def worker_environ() -> dict:
    """The environment dask's nannies give their workers, with :data:`WORKER_MALLOC_ENV`."""
    return {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **WORKER_MALLOC_ENV}


def trim_freed_memory_on(client) -> None:
    """Install :class:`dnmf.run.trim.TrimFreedMemory` on ``client``'s workers, present and future."""
    from .run.trim import TrimFreedMemory

    client.register_plugin(TrimFreedMemory())


def _local_client(n_workers, threads_per_worker, memory_limit):
    from distributed import Client, LocalCluster

    n_workers = n_workers or max(1, min(4, os.cpu_count() or 1))
    if memory_limit is not None and not isinstance(memory_limit, (int, float)):
        from dask.utils import parse_bytes

        try:
            parse_bytes(memory_limit)
        except (ValueError, TypeError) as e:
            raise ParameterError(expected('memory_limit a size such as "4GiB"', memory_limit)) from e
    # No spilling to disk: dnmf keeps V in worker memory only when it fits (cache="auto") and
    # otherwise streams it, so spilling would only write V blocks that are about to be dropped;
    # with it, 256 MiB workers streaming V were seen to go from ~120 MiB to past the 80% pause
    # mark. Pausing (80%) and the nanny's restart (95%) stay. (The nanny hands its config over.)
    no_spill = {"distributed.worker.memory.target": False, "distributed.worker.memory.spill": False}
    with dask.config.set({**no_spill, "distributed.nanny.pre-spawn-environ": worker_environ()}):
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads_per_worker or 1,
            memory_limit="auto" if memory_limit is None else memory_limit,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",  # loopback only, any free port
            processes=True,
        )
    logger.info("started a LocalCluster of %d workers at %s", n_workers, cluster.scheduler_address)
    return Client(cluster)


# The settings of :func:`_local_client`'s workers (no spilling, glibc thresholds) as the
# environment of a batch job or a container. The glibc variables go in as they are: a nanny keeps
# variables already in its environment over its pre-spawn-environ config (which a value inherited
# from the submitting process, such as dask's 65536, would otherwise beat).
WORKER_JOB_ENV = {
    "DASK_DISTRIBUTED__WORKER__MEMORY__TARGET": "False",
    "DASK_DISTRIBUTED__WORKER__MEMORY__SPILL": "False",
    **WORKER_MALLOC_ENV,
}


def jobqueue_options(job_options: Mapping) -> dict:
    """``job_options`` with exports of :data:`WORKER_JOB_ENV` ahead of the user's job prologue.

    Variables the user already exports in ``job_script_prologue`` win (theirs run later).
    """
    import shlex

    options = dict(job_options)
    exports = [f"export {name}={shlex.quote(value)}" for name, value in WORKER_JOB_ENV.items()]
    options["job_script_prologue"] = exports + list(options.get("job_script_prologue") or ())
    return options


def _jobqueue_client(kind: str, n_jobs: int, job_options: Mapping):
    try:
        import dask_jobqueue
    except ImportError as e:
        raise ParameterError(
            f"scheduler={kind!r} needs dask-jobqueue; install it with `pip install dask-jobqueue` "
            "(or `pip install dnmf[hpc]`)."
        ) from e
    from distributed import Client

    cluster_class = {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster}[kind]
    try:
        cluster = cluster_class(**jobqueue_options(job_options))
    except TypeError as e:
        raise ParameterError(f"Invalid job_options for {cluster_class.__name__}: {e}") from e
    cluster.scale(jobs=n_jobs)
    logger.info("submitted %d %s job(s); scheduler at %s", n_jobs, kind, cluster.scheduler_address)
    return Client(cluster)


# The dask_mpi.initialize arguments that job_options may set for scheduler="mpi".
MPI_OPTIONS = ("interface", "protocol", "local_directory", "dashboard_address")


def _mpi_client(memory_limit, options: Mapping):
    try:
        import dask_mpi
    except ImportError as e:
        raise ParameterError(
            "scheduler='mpi' needs dask-mpi and mpi4py; install them with `pip install dask-mpi mpi4py` "
            "and launch the script with mpirun / srun."
        ) from e
    from distributed import Client
    from distributed.utils import get_ip_interface
    from threadpoolctl import threadpool_limits

    unknown = sorted(set(options) - set(MPI_OPTIONS))
    if unknown:
        raise ParameterError(expected(f"job_options for scheduler='mpi' among {MPI_OPTIONS}", unknown))
    # Rank 0 becomes the scheduler and ranks >= 2 workers (neither returns from initialize);
    # rank 1 goes on running this program as the client. The workers run in this process, not
    # under a nanny: give them one BLAS thread and no spilling here, like _local_client's workers.
    no_spill = {"distributed.worker.memory.target": False, "distributed.worker.memory.spill": False}
    # No dashboard unless asked for; the scheduler's HTTP server then takes any free port of the
    # scheduler's interface.
    host = get_ip_interface(options["interface"]) if options.get("interface") else ""
    with threadpool_limits(1), dask.config.set(no_spill):
        try:
            dask_mpi.initialize(
                nthreads=1, memory_limit="auto" if memory_limit is None else memory_limit,
                dashboard="dashboard_address" in options, **{"dashboard_address": f"{host}:0", **options},
            )
        except dask_mpi.WorldTooSmallException as e:
            raise ParameterError(
                "scheduler='mpi' needs at least 3 MPI ranks (scheduler, client, a worker); "
                "launch the program with `mpirun -n 3` or more, or `srun` in a job of 3+ tasks."
            ) from e
    from mpi4py import MPI

    client = Client()
    # Every rank but the scheduler's and this one is a worker, started with this one: wait for all
    # (a rank that fails ends the whole MPI job), so that the fit plans for the real cluster.
    client.wait_for_workers(MPI.COMM_WORLD.Get_size() - 2)
    return client


def current_client():
    """The current dask.distributed client, or None (threaded scheduler)."""
    try:
        from distributed import default_client
    except ImportError:  # pragma: no cover - distributed is a dependency
        return None
    try:
        client = default_client()
    except ValueError:
        return None
    # A client only runs dnmf's graphs when it is dask's scheduler (not overridden).
    return client if dask.base.get_scheduler() == client.get else None


# ---------------------------------------------------------------------------
# What the workers have


def worker_memory_limits(client) -> list[int]:
    """Each worker's memory limit in bytes (0 for a worker without a limit)."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return [int(info.get("memory_limit") or 0) for info in workers.values()]


def worker_threads(client) -> list[int]:
    """Each worker's number of threads."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return [int(info.get("nthreads") or 1) for info in workers.values()]


def workers_share_this_machine(client) -> bool:
    """Whether any of ``client``'s workers runs on this machine (a LocalCluster, or a
    scheduler and workers started beside the client), judged by the workers' IP addresses."""
    import socket
    from urllib.parse import urlsplit

    import psutil

    local = {"localhost"}
    for addresses in psutil.net_if_addrs().values():
        local.update(a.address.split("%")[0] for a in addresses if a.family in (socket.AF_INET, socket.AF_INET6))
    return any(urlsplit(address).hostname in local for address in client.nthreads())
