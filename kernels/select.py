"""Encode: find the entries of the encoder pre-activations that the activation keeps.

The encoder GEMM (``x @ W_enc + b_enc``, the bias fused into it) stays dense; what follows
is one pass over its output that compacts every entry above a per-feature floor into the
flat row-sorted layout. ReLU's floor is 0; JumpReLU's is ``threshold - bandwidth / 2`` so that
the entries its pseudo-gradient needs come along (see ``activations``). TopK and BatchTopK
select with ``torch.topk`` on every device (a tuned selection kernel; no Triton twin).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .layout import SparseLayout
from .scratch import scratch


@triton.jit
def _count_above_kernel(pre_ptr, floor_ptr, count_ptr, n_features, stride_row,
                        BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    total = 0
    for start in range(0, n_features, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < n_features
        z = tl.load(pre_ptr + row * stride_row + offs, mask=inside, other=0.0).to(tl.float32)
        floor = tl.load(floor_ptr + offs, mask=inside, other=0.0)
        total += tl.sum(((z > floor) & inside).to(tl.int32), axis=0)
    tl.store(count_ptr + row, total)


@triton.jit
def _compact_above_kernel(pre_ptr, floor_ptr, crow_ptr, cols_ptr, vals_ptr, n_features,
                          stride_row, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = tl.load(crow_ptr + row)
    for start in range(0, n_features, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < n_features
        z = tl.load(pre_ptr + row * stride_row + offs, mask=inside, other=0.0)
        floor = tl.load(floor_ptr + offs, mask=inside, other=0.0)
        keep = ((z.to(tl.float32) > floor) & inside).to(tl.int32)
        # Exclusive prefix sum: each kept entry's slot among this block's kept entries.
        slot = base + tl.cumsum(keep, axis=0) - keep
        tl.store(cols_ptr + slot, offs.to(tl.int64), mask=keep != 0)
        tl.store(vals_ptr + slot, z, mask=keep != 0)
        base += tl.sum(keep, axis=0)


def select_above_triton(pre: Tensor, floor: Tensor, *, block: int = 1024) -> tuple[SparseLayout, Tensor]:
    """Entries with ``pre > floor`` (floor [F] float32) and their pre-activations.

    Two passes over ``pre``: count per row, then compact into slots from the prefix sum.
    Sizing the output reads the total back to the host, the one sync of this path.
    """
    n_rows, n_features = pre.shape
    counts = torch.empty(n_rows, dtype=torch.int32, device=pre.device)
    _count_above_kernel[(n_rows,)](pre, floor, counts, n_features, pre.stride(0), BLOCK=block)
    rows = torch.arange(n_rows, device=pre.device).repeat_interleave(counts.long())
    layout = SparseLayout.from_rows(rows, torch.empty_like(rows), n_rows, n_features)
    values = torch.empty(rows.numel(), dtype=pre.dtype, device=pre.device)
    _compact_above_kernel[(n_rows,)](pre, floor, layout.crow, layout.cols, values, n_features,
                                     pre.stride(0), BLOCK=block)
    return layout, values


def select_above_torch(pre: Tensor, floor: Tensor) -> tuple[SparseLayout, Tensor]:
    """Twin of ``select_above_triton``."""
    n_rows, n_features = pre.shape
    mask = torch.gt(pre, floor, out=scratch("mask", pre.shape, torch.bool, pre.device))
    rows, cols = mask.nonzero(as_tuple=True)
    return SparseLayout.from_rows(rows, cols, n_rows, n_features), pre[rows, cols]


def select_topk(pre: Tensor, k: int) -> tuple[SparseLayout, Tensor]:
    """The k largest pre-activations of each row."""
    values, cols = pre.topk(k, dim=1, sorted=False)
    return SparseLayout.uniform(cols, pre.shape[1]), values.reshape(-1)


def select_batch_topk(pre: Tensor, k: int) -> tuple[SparseLayout, Tensor]:
    """The ``k * B`` largest pre-activations of the whole batch, in row order."""
    n_rows, n_features = pre.shape
    values, flat = pre.reshape(-1).topk(k * n_rows, sorted=False)
    flat, order = flat.sort()
    rows, cols = flat.div(n_features, rounding_mode="floor"), flat.remainder(n_features)
    return SparseLayout.from_rows(rows, cols, n_rows, n_features), values[order]
