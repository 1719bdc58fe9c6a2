"""The CPU threads of a command: a fixed, stated count, never chosen from the machine's load.

Every CPU-heavy command (harvest, train, refine, eval, intervene, attribute, study, index, demo)
has a ``threads`` setting, default ``DEFAULT_THREADS``, that ``command_threads`` applies to
torch's intra-op pool (``torch.set_num_threads``) for the command's duration and that the run
writes into its metadata (summary.json, eval.json, study.json, the store's attributes, the
reports), so a figure says what it was measured with.

Why 1. torch starts one intra-op thread per core, and its OpenMP threads wait for each other at
the end of every operation. On a machine other work also loads, a descheduled thread stalls its
partners, which spin while they wait: on a loaded 2-core machine two threads made the demo's
refinement 5x slower than one (753 s against 143 s wall, same result), and the demo measured in
CPU seconds at 1 and 2 threads on such a machine shows why (docs/scale.md, Threads). A free
machine with many cores gains from more: pass ``--threads`` (a GPU run needs few: the device
computes). The count is not taken from the current load, so a run repeats whatever else runs.

This module imports nothing heavy: the configs import ``DEFAULT_THREADS`` and ``tca --help``
stays quick.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import TypeVar

log = logging.getLogger(__name__)

DEFAULT_THREADS = 1
"""torch intra-op threads of every CPU-heavy command unless ``--threads`` says otherwise."""

F = TypeVar("F", bound=Callable)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for the block and restored after it, so a command
    called from Python leaves its caller's setting as it found it."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    log.debug("torch intra-op threads: %d (was %d)", n, old)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def command_threads(fn: F) -> F:
    """Run ``fn(cfg, ...)`` with ``cfg.threads`` torch threads (``torch_threads``)."""

    @functools.wraps(fn)
    def run(cfg, *args, **kwargs):
        with torch_threads(cfg.threads):
            return fn(cfg, *args, **kwargs)

    return run  # type: ignore[return-value]
