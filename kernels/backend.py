"""The two implementations of the sparse primitives: Triton kernels and their PyTorch twins."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import backward, decode, select


@dataclass(frozen=True)
class Backend:
    name: str
    select_above: Callable
    """(pre, floor) -> (layout, pre-activations at the entries)."""
    decode: Callable
    """(layout, values, W_dec, b_dec) -> [B, d]."""
    entry_dot: Callable
    """(layout, grad_pred, W_dec) -> float32 [nnz]."""
    segment_sum: Callable
    """(layout, weights, src, out) -> out filled with per-feature sums."""


TRITON = Backend("triton", select.select_above_triton, decode.decode_triton,
                 backward.entry_dot_triton, backward.segment_sum_triton)
TORCH = Backend("torch", select.select_above_torch, decode.decode_torch,
                backward.entry_dot_torch, backward.segment_sum_torch)
