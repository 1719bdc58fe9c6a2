"""Reusable [B, F] buffers for the dense encoder output on CPU.

The sparse path never keeps the pre-activations past the selection, so one buffer per
shape can be reused every step. That matters on CPU only: a fresh multi-hundred-megabyte
tensor is mapped and page-faulted anew each step, costing about a quarter of a GEMM at
d = 512; CUDA's caching allocator already recycles such blocks.
"""

from __future__ import annotations

import threading

import torch

_local = threading.local()


def scratch(tag: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor, the same one on every call with these arguments in a thread."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    buffers = _local.__dict__.setdefault("buffers", {})
    key = (tag, tuple(shape), dtype)
    if key not in buffers:
        # Keep one buffer per tag: a new batch shape replaces the old one rather than piling up.
        for old in [k for k in buffers if k[0] == tag]:
            del buffers[old]
        buffers[key] = torch.empty(shape, dtype=dtype, device=device)
    return buffers[key]
