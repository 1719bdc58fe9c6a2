"""The adapter as dense PyTorch (the paper's math): the reference every sparse path is
tested against, the baseline of the benchmark, and the path the dispatcher takes while
activations are too dense for sparsity to pay."""

from __future__ import annotations

import torch
from torch import Tensor

from . import activations
from .output import SparseOutput
from .spec import check_inputs


def dense_adapter(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor,
                  b_dec: Tensor | None = None, *, activation: str, k: int | None = None,
                  threshold: Tensor | None = None, bandwidth: float = 1e-3,
                  dead_mask: Tensor | None = None, k_aux: int | None = None) -> SparseOutput:
    """Same arguments and result as ``sparse_adapter`` (less the dispatch ones)."""
    k_aux = check_inputs(x, W_enc, b_enc, W_dec, b_dec, activation, k, threshold, dead_mask, k_aux)
    n_rows, n_features = x.shape[0], W_enc.shape[1]
    pre = torch.addmm(b_enc, x, W_enc)
    batch_threshold = None
    if activations.uses_threshold(activation, threshold):
        acts = activations.apply(activation, pre, threshold.expand(n_features), bandwidth)
    elif activation == "relu":
        acts = torch.relu(pre)
    elif activation == "topk":
        top, idx = pre.topk(k, dim=1)
        acts = torch.zeros_like(pre).scatter(1, idx, torch.relu(top))
    else:
        top, flat = pre.reshape(-1).topk(k * n_rows)
        top = torch.relu(top)
        acts = torch.zeros_like(pre).reshape(-1).scatter(0, flat, top).view_as(pre)
        batch_threshold = top.min().detach()

    pred = acts @ W_dec
    if b_dec is not None:
        pred = pred + b_dec
    active = acts != 0
    rows, cols = active.nonzero(as_tuple=True)
    aux_pred = None
    if dead_mask is not None:
        top, idx = torch.where(dead_mask, pre, -torch.inf).topk(k_aux, dim=1)
        aux_pred = torch.zeros_like(pre).scatter(1, idx, torch.relu(top)) @ W_dec
    return SparseOutput(
        pred=pred,
        rows=rows,
        indices=cols,
        values=acts[rows, cols],
        counts=active.sum(0),
        l1=(acts.float().abs() @ W_dec.float().norm(dim=1)).sum() / n_rows,
        batch_threshold=batch_threshold,
        aux_pred=aux_pred,
        path="dense",
    )
