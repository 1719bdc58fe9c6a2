"""What one adapter forward returns to the trainer."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class SparseOutput:
    pred: Tensor
    """[B, d]: decode(encode(x)) + b_dec, differentiable to every parameter (not to x)."""
    rows: Tensor
    """[nnz] int64, nondecreasing: the batch row of each entry."""
    indices: Tensor
    """[nnz] int64: the feature of each entry."""
    values: Tensor
    """[nnz]: activation values, differentiable. An entry is active when its value is
    nonzero; zero-valued entries occur (JumpReLU's band below the threshold, TopK rows
    with fewer than k positive pre-activations) and carry no decoder contribution."""
    counts: Tensor
    """[F] int64: how many rows each feature fired in (dead-feature tracking)."""
    l1: Tensor
    """Scalar: sum over active entries of |value| * ||W_dec[feature]||, divided by B;
    differentiable to the values and to W_dec."""
    batch_threshold: Tensor | None
    """BatchTopK in training: the smallest selected activation (track it, e.g. as an
    average, to use as the threshold at inference). None otherwise."""
    aux_pred: Tensor | None
    """[B, d] when a dead mask was given: the decoder output (no b_dec) of each row's
    ``k_aux`` largest ReLU'd pre-activations among dead features, differentiable, for an
    auxiliary loss against the detached residual. None otherwise."""
    path: str
    """Which implementation ran: "triton", "torch" or "dense"."""
