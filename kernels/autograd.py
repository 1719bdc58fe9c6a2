"""Autograd functions for the two sparse halves of the adapter.

``EncodeAt`` stands for ``(x @ W_enc + b_enc)[rows, cols]``: its forward receives the values
the selection already read from the dense GEMM, and its backward forms grad W_enc and
grad b_enc as per-feature segment sums over the entries, never a [B, F] matrix. ``DecodeAt``
is the sparse decoder. The activation between them is plain differentiable PyTorch on [nnz].
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backend import Backend
from .backward import ones_column
from .layout import SparseLayout


class EncodeAt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre_at: Tensor, x: Tensor, W_enc: Tensor, b_enc: Tensor,
                layout: SparseLayout, backend: Backend) -> Tensor:
        ctx.save_for_backward(x)
        ctx.layout, ctx.backend = layout, backend
        ctx.param = (W_enc.shape, W_enc.dtype)
        return pre_at.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        layout, backend = ctx.layout, ctx.backend
        grad_W = grad_b = None
        if ctx.needs_input_grad[2]:
            shape, dtype = ctx.param
            grad_W = torch.empty(shape, dtype=dtype, device=x.device)
            backend.segment_sum(layout, grad, x, grad_W.t())
        if ctx.needs_input_grad[3]:
            grad_b = torch.empty(layout.n_features, 1, dtype=ctx.param[1], device=x.device)
            grad_b = backend.segment_sum(layout, grad, ones_column(layout.n_rows, x.device), grad_b)[:, 0]
        return None, None, grad_W, grad_b, None, None


class DecodeAt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: Tensor, W_dec: Tensor, b_dec: Tensor | None, layout: SparseLayout,
                backend: Backend) -> Tensor:
        ctx.save_for_backward(values, W_dec)
        ctx.layout, ctx.backend = layout, backend
        return backend.decode(layout, values, W_dec, b_dec)

    @staticmethod
    def backward(ctx, grad: Tensor):
        values, W_dec = ctx.saved_tensors
        layout, backend = ctx.layout, ctx.backend
        grad_values = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_values = backend.entry_dot(layout, grad, W_dec).to(values.dtype)
        if ctx.needs_input_grad[1]:
            grad_W = backend.segment_sum(layout, values, grad, torch.empty_like(W_dec))
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_values, grad_W, grad_b, None, None
