"""The activation functions, written once for any shape: the sparse path applies them to
the selected pre-activations [nnz], the dense reference to the whole [B, F] matrix, and the
adapter (train/adapter.py) to its [..., F] pre-activations. This module owns the list of
activations every other stage accepts.

JumpReLU follows Rajamanoharan et al. (2024): ``z * H(z - threshold)``, with a straight-through
pseudo-gradient for the threshold, ``-(threshold / bandwidth) * K((z - threshold) / bandwidth)``
with K the unit rectangle. That gradient is nonzero for entries just *below* the threshold,
so the sparse path selects from ``threshold - bandwidth / 2`` up and carries those entries
with value 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

ACTIVATIONS = ("relu", "jumprelu", "topk", "batchtopk")
"""Every activation an adapter can have: ReLU (the paper's), JumpReLU, TopK, BatchTopK."""
TOP_K = ("topk", "batchtopk")
"""The activations whose sparsity is a count ``k`` of active features; the others' is a coefficient."""


class JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, threshold = ctx.saved_tensors
        grad_z = grad * (z > threshold) if ctx.needs_input_grad[0] else None
        grad_threshold = None
        if ctx.needs_input_grad[1]:
            in_band = (z - threshold).abs() < ctx.bandwidth / 2
            pseudo = -(threshold / ctx.bandwidth) * in_band * grad
            grad_threshold = pseudo.sum_to_size(threshold.shape).to(threshold.dtype)
        return grad_z, grad_threshold, None


class JumpReLUStep(torch.autograd.Function):
    """``1[z > threshold]``, the count JumpReLU's L0 penalty sums, with the same pseudo-gradient
    for the threshold, ``-(1 / bandwidth) * K((z - threshold) / bandwidth)``, and none for ``z``."""

    @staticmethod
    def forward(ctx, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, threshold = ctx.saved_tensors
        in_band = (z - threshold).abs() < ctx.bandwidth / 2
        pseudo = -(1 / ctx.bandwidth) * in_band * grad
        return None, pseudo.sum_to_size(threshold.shape).to(threshold.dtype), None


def selection_floor(activation: str, threshold: Tensor | None, bandwidth: float,
                    n_features: int, device: torch.device) -> Tensor:
    """float32 [F]: the sparse path keeps every entry strictly above it."""
    if activation == "relu":
        return torch.zeros(n_features, device=device)
    floor = threshold.detach().float().expand(n_features)
    if activation == "jumprelu":
        floor = floor - bandwidth / 2
    return floor.contiguous()


def uses_threshold(activation: str, threshold: Tensor | None) -> bool:
    """JumpReLU always; BatchTopK at inference, where a fixed threshold replaces the batch k."""
    return activation == "jumprelu" or (activation == "batchtopk" and threshold is not None)


def apply(activation: str, z: Tensor, threshold: Tensor | None, bandwidth: float) -> Tensor:
    """Activation values of pre-activations ``z`` that the selection kept.

    ``threshold`` is already gathered/broadcast to ``z``'s shape. TopK and BatchTopK keep the
    ReLU of what they selected (a row with fewer than k positives keeps zeros).
    """
    if uses_threshold(activation, threshold):
        if activation == "batchtopk":  # an inference threshold is not trained
            threshold = threshold.detach()
        return JumpReLU.apply(z, threshold.to(z.dtype), bandwidth)
    return torch.relu(z)
