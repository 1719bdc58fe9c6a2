"""A Dask client for CPU-side work over stores: a local cluster by default, any cluster by address.

Statistics (``tca cache stats``) and index building (``tca index --workers``) hand row blocks
to Dask workers. Without an address a ``LocalCluster`` of worker *processes* starts on the
loopback interface (the work is NumPy and PyTorch, which hold the GIL in places, and separate
processes also keep one worker's memory from another's) and stops when the work is done.
With ``--scheduler tcp://host:8786`` the work runs on a cluster the user already operates; its
workers must reach the store (a shared path or an object-store URL) and have tca installed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from tca import TcaError
from tca.ranges import POSITIVE, check_ranges

log = logging.getLogger(__name__)


@dataclass
class ClusterConfig:
    """Where Dask work runs."""

    scheduler: str | None = None
    """Address of a running Dask scheduler (``tcp://host:8786``); None starts a local cluster."""
    workers: int = field(default=2, metadata=POSITIVE)
    """Worker processes of the local cluster (ignored with ``scheduler``)."""
    threads_per_worker: int = field(default=1, metadata=POSITIVE)
    """Threads per local worker process; NumPy and PyTorch already use the cores they get."""
    connect_timeout: float = field(default=30.0, metadata=POSITIVE)
    """Seconds to wait for ``scheduler`` to answer."""

    def __post_init__(self):
        check_ranges(self)


@contextmanager
def dask_client(cfg: ClusterConfig) -> Iterator:
    """A ``distributed.Client`` for the duration of the block; a local cluster is shut down after."""
    from distributed import Client, LocalCluster

    with _quiet_dask():
        if cfg.scheduler is None:
            # The scheduler always serves HTTP; keep it on loopback, on a free port, so nothing is
            # exposed and no fixed port can clash.
            with LocalCluster(n_workers=cfg.workers, threads_per_worker=cfg.threads_per_worker, processes=True,
                              host="127.0.0.1", dashboard_address="127.0.0.1:0",
                              silence_logs=logging.WARNING) as cluster, Client(cluster) as client:
                log.info("started a local Dask cluster of %d worker processes", cfg.workers)
                yield client
            return
        try:
            client = Client(cfg.scheduler, timeout=cfg.connect_timeout)
        except (OSError, TimeoutError, ValueError) as exc:
            raise TcaError(f"could not reach the Dask scheduler at {cfg.scheduler} ({exc}).") from None
        with client:
            log.info("connected to the Dask scheduler at %s (%d workers)", cfg.scheduler,
                     len(client.scheduler_info().get("workers", {})))
            yield client


@contextmanager
def _quiet_dask() -> Iterator[None]:
    """Dask's own start-up and shut-down chatter only with debug logging (``tca -vv``)."""
    logger = logging.getLogger("distributed")
    old = logger.level
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(old)
