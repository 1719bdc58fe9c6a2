"""Backward at the active entries only; no gradient is ever formed for the cached ``x``.

Two primitives cover every gradient of the sparse adapter:

- ``entry_dot``: ``out[e] = grad_pred[rows[e]] . W_dec[cols[e]]``, the gradient of each
  value through the decoder (a sampled dense x dense product).
- ``segment_sum``: ``out[f] = sum over f's entries e of weights[e] * src[rows[e]]``, a
  per-feature sum in the feature-grouped order of the layout: with ``weights = values``,
  ``src = grad_pred`` it is grad W_dec; with the pre-activation gradient and ``src = x`` it is
  grad W_enc (written straight into the transposed view); with ``src`` a column of ones it is
  grad b_enc. Each feature's sum runs in one program in a fixed order: no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .layout import SparseLayout, csr


@triton.jit
def _entry_dot_kernel(crow_ptr, cols_ptr, g_ptr, w_ptr, out_ptr, d, stride_g, stride_w,
                      BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    start = tl.load(crow_ptr + row)
    end = tl.load(crow_ptr + row + 1)
    for e0 in range(start, end, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        in_e = e < end
        col = tl.load(cols_ptr + e, mask=in_e, other=0)
        acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            in_d = offs_d < d
            g = tl.load(g_ptr + row * stride_g + offs_d, mask=in_d, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + col[:, None] * stride_w + offs_d[None, :],
                        mask=in_e[:, None] & in_d[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * g[None, :], axis=1)
        tl.store(out_ptr + e, acc, mask=in_e)


def entry_dot_triton(layout: SparseLayout, grad_pred: Tensor, W_dec: Tensor, *,
                     block_e: int = 16, block_d: int = 128) -> Tensor:
    """float32 [nnz]."""
    grad_pred, W_dec = grad_pred.contiguous(), W_dec.contiguous()
    out = torch.empty(layout.cols.numel(), dtype=torch.float32, device=W_dec.device)
    _entry_dot_kernel[(layout.n_rows,)](layout.crow, layout.cols, grad_pred, W_dec, out,
                                        W_dec.shape[1], grad_pred.stride(0), W_dec.stride(0),
                                        BLOCK_E=block_e, BLOCK_D=block_d)
    return out


def entry_dot_torch(layout: SparseLayout, grad_pred: Tensor, W_dec: Tensor) -> Tensor:
    """Twin of ``entry_dot_triton``: a sampled GEMM over the layout's pattern, float32 [nnz]."""
    pattern = csr(layout.crow, layout.cols,
                  torch.zeros(layout.cols.numel(), device=W_dec.device),
                  (layout.n_rows, layout.n_features))
    return torch.sparse.sampled_addmm(pattern, grad_pred.float(), W_dec.float().t(),
                                      beta=0.0).values()


@triton.jit
def _segment_sum_kernel(fptr_ptr, perm_ptr, rows_ptr, weights_ptr, src_ptr, out_ptr, n,
                        stride_src_r, stride_src_c, stride_out_f, stride_out_c,
                        BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):
    f = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < n
    start = tl.load(fptr_ptr + f)
    end = tl.load(fptr_ptr + f + 1)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j0 in range(start, end, BLOCK_E):
        j = j0 + tl.arange(0, BLOCK_E)
        in_j = j < end
        e = tl.load(perm_ptr + j, mask=in_j, other=0)
        r = tl.load(rows_ptr + j, mask=in_j, other=0)
        w = tl.load(weights_ptr + e, mask=in_j, other=0.0).to(tl.float32)
        s = tl.load(src_ptr + r[:, None] * stride_src_r + offs_n[None, :] * stride_src_c,
                    mask=in_j[:, None] & in_n[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w[:, None] * s, axis=0)
    tl.store(out_ptr + f * stride_out_f + offs_n * stride_out_c,
             acc.to(out_ptr.dtype.element_ty), mask=in_n)


def segment_sum_triton(layout: SparseLayout, weights: Tensor, src: Tensor, out: Tensor, *,
                       block_e: int = 16, block_n: int = 128) -> Tensor:
    """Fill ``out`` [F, n] (any strides, e.g. a transposed view) and return it."""
    perm, fptr, rows = layout.by_feature
    weights, n = weights.contiguous(), src.shape[1]
    grid = (layout.n_features, triton.cdiv(n, block_n))
    _segment_sum_kernel[grid](fptr, perm, rows, weights, src, out, n, src.stride(0),
                              src.stride(1), out.stride(0), out.stride(1), BLOCK_E=block_e,
                              BLOCK_N=block_n)
    return out


def segment_sum_torch(layout: SparseLayout, weights: Tensor, src: Tensor, out: Tensor) -> Tensor:
    """Twin of ``segment_sum_triton``: the feature-major CSR matrix times ``src`` (MKL on CPU)."""
    perm, fptr, rows = layout.by_feature
    by_feature = csr(fptr, rows, weights[perm].float(), (layout.n_features, layout.n_rows))
    return out.copy_(torch.sparse.mm(by_feature, src.float()))


def ones_column(n_rows: int, device: torch.device) -> Tensor:
    """[n_rows, 1] of ones without storage per row: ``segment_sum`` with it sums the weights."""
    return torch.ones(1, 1, device=device).expand(n_rows, 1)
