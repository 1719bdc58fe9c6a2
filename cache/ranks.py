"""Several harvest processes (``torchrun`` ranks) filling one store.

The data plan fixes every row before any activation exists, so the store's blocks can be
dealt out up front: rank ``r`` of ``w`` owns a contiguous range of whole blocks (shards), so
no two ranks ever write one file. Every rank builds the same plan and runs the same batches
as a single process would; it runs only the batches that touch its own blocks and writes only
their rows, so a batch that straddles two ranges is run by both and the finished store is the
one a single process writes.

Rank 0 creates the store (arrays, row tokens, Parquet tables); the others wait for it. The
only collective is that hand-over, a broadcast of rank 0's outcome, so a rank 0 that refuses
(an existing store, another configuration) stops every rank with its sentence.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from tca import TcaError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """Where this process stands among the harvest's processes."""

    rank: int = 0
    """This process's index among all processes (``RANK``)."""
    world_size: int = 1
    """Number of processes sharing the harvest (``WORLD_SIZE``)."""
    local_rank: int = 0
    """This process's index on its machine (``LOCAL_RANK``): picks its GPU."""

    @classmethod
    def from_env(cls) -> Ranks:
        """The ranks torchrun (or any launcher setting the same variables) gave this process."""
        try:
            ranks = cls(*(int(os.environ.get(k, v)) for k, v in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0))))
        except ValueError:
            raise TcaError("RANK, WORLD_SIZE and LOCAL_RANK must be integers when set.") from None
        if not 0 <= ranks.rank < ranks.world_size:
            raise TcaError(f"RANK={ranks.rank} is outside WORLD_SIZE={ranks.world_size}.")
        return ranks

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def blocks(self, n_blocks: int) -> range:
        """This rank's contiguous share of the store's blocks (shares differ by at most one)."""
        return range(self.rank * n_blocks // self.world_size, (self.rank + 1) * n_blocks // self.world_size)

    def others(self, n_blocks: int) -> np.ndarray:
        """One bool per block: True where another rank owns it."""
        mine = self.blocks(n_blocks)
        mask = np.ones(n_blocks, dtype=bool)
        mask[mine.start : mine.stop] = False
        return mask

    def device(self, device: torch.device) -> torch.device:
        """Each rank on a machine takes its own GPU."""
        if device.type == "cuda" and self.distributed:
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return device


@contextmanager
def process_group(ranks: Ranks, device: torch.device) -> Iterator[None]:
    """Join the processes of a harvest (gloo on CPU, NCCL on CUDA); nothing for one process."""
    if not ranks.distributed or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    log.info("rank %d of %d joined the harvest", ranks.rank, ranks.world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def rank0_first(ranks: Ranks, work: Callable[[], T]) -> T | None:
    """Run ``work`` on rank 0 while the other ranks wait; every rank fails if it fails.

    Returns what ``work`` returned on rank 0 and None elsewhere.
    """
    if not ranks.distributed:
        return work()
    result, failure = None, None
    if ranks.rank == 0:
        try:
            result = work()
        except Exception as exc:
            failure = exc
    message = [None if failure is None else str(failure) if isinstance(failure, TcaError)
               else f"{type(failure).__name__}: {failure}"]
    dist.broadcast_object_list(message, src=0)
    if failure is not None:
        raise failure
    if message[0] is not None:
        raise TcaError(f"rank 0 stopped the harvest: {message[0]}")
    return result
