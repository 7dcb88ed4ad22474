"""Where the work runs: a Dask client for a scheduler address, a new local cluster, or none.

A minimal version for the command line; the scale-out work extends it (Slurm, caching).
"""

from __future__ import annotations

import os

from .errors import ParameterError, expected


def get_client(scheduler=None, n_workers=None, threads_per_worker=None, memory_limit=None):
    """A ``distributed.Client`` for ``scheduler``, or None to use dask's current scheduler.

    Parameters
    ----------
    scheduler : None, "local", str or distributed.Client
        None: no client (dask's threaded scheduler, or a client the caller already made).
        "local": a new LocalCluster on this machine, listening on 127.0.0.1 only.
        A path to an existing scheduler file (JSON), or a scheduler address ("tcp://host:8786");
        connecting waits up to the dask config value ``dnmf.connect-timeout`` (default "10s").
        A Client is returned as it is.
    n_workers, threads_per_worker : int, optional
        Size of a new LocalCluster (default: dask's, from the number of cores).
    memory_limit : str or int, optional
        Memory per worker of a new LocalCluster, e.g. "4GiB" (default: dask's).
    """
    import dask
    from distributed import Client

    if scheduler is None:
        return None
    if isinstance(scheduler, Client):
        return scheduler
    if not isinstance(scheduler, str):
        raise ParameterError(expected('scheduler None, "local", an address or a scheduler file', scheduler))
    if memory_limit is not None and not isinstance(memory_limit, (int, float)):
        from dask.utils import parse_bytes

        try:
            parse_bytes(memory_limit)
        except (ValueError, TypeError) as e:
            raise ParameterError(expected('memory_limit a size such as "4GiB"', memory_limit)) from e
    if scheduler == "local":
        return Client(
            n_workers=n_workers,
            threads_per_worker=threads_per_worker,
            memory_limit="auto" if memory_limit is None else memory_limit,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            processes=True,
        )
    if os.path.isfile(scheduler):
        return Client(scheduler_file=scheduler)
    try:
        return Client(scheduler, timeout=dask.config.get("dnmf.connect-timeout", "10s"))
    except (OSError, ValueError) as e:
        raise ParameterError(
            f"Cannot reach a Dask scheduler at {scheduler!r} ({e}); check the address, or use --scheduler local."
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
