"""Decode: ``out[b] = sum_e values[e] * W_dec[cols[e]] (+ b_dec)`` over row b's entries.

A sparse x dense product: each output row gathers only the decoder rows its active
features name, accumulating in float32 whatever the storage dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .layout import SparseLayout, csr


@triton.jit
def _decode_kernel(crow_ptr, cols_ptr, vals_ptr, w_ptr, bias_ptr, out_ptr, d, stride_w,
                   stride_out, HAS_BIAS: tl.constexpr, BLOCK_E: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = offs_d < d
    start = tl.load(crow_ptr + row)
    end = tl.load(crow_ptr + row + 1)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        in_e = e < end
        col = tl.load(cols_ptr + e, mask=in_e, other=0)
        v = tl.load(vals_ptr + e, mask=in_e, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + col[:, None] * stride_w + offs_d[None, :],
                    mask=in_e[:, None] & in_d[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(v[:, None] * w, axis=0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=in_d, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs_d, acc.to(out_ptr.dtype.element_ty), mask=in_d)


def decode_triton(layout: SparseLayout, values: Tensor, W_dec: Tensor, b_dec: Tensor | None,
                  *, block_e: int = 16, block_d: int = 128) -> Tensor:
    W_dec, values = W_dec.contiguous(), values.contiguous()
    d = W_dec.shape[1]
    out = torch.empty(layout.n_rows, d, dtype=W_dec.dtype, device=W_dec.device)
    grid = (layout.n_rows, triton.cdiv(d, block_d))
    _decode_kernel[grid](layout.crow, layout.cols, values, W_dec,
                         b_dec if b_dec is not None else W_dec, out, d, W_dec.stride(0),
                         out.stride(0), HAS_BIAS=b_dec is not None, BLOCK_E=block_e,
                         BLOCK_D=block_d)
    return out


def decode_torch(layout: SparseLayout, values: Tensor, W_dec: Tensor, b_dec: Tensor | None) -> Tensor:
    """Twin of ``decode_triton``: a CSR x dense product (MKL on CPU), in float32."""
    acts = csr(layout.crow, layout.cols, values.float(), (layout.n_rows, layout.n_features))
    out = torch.sparse.mm(acts, W_dec.float())
    if b_dec is not None:
        out += b_dec.float()
    return out.to(W_dec.dtype)
