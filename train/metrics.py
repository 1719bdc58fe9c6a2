"""Reconstruction metrics, one definition for every stage of tca.

    FVE  = 1 - sum ||pred - delta||^2 / sum ||delta - mean(delta)||^2   (centred)
    NMSE =     sum ||pred - delta||^2 / sum ||delta||^2                  (uncentred)
    L0   = mean number of nonzero features per row
    KL   = mean over real (unpadded) positions of KL(target || model) of next-token distributions

Evaluation runs over many batches, so ``MetricSums`` accumulates the sums in float64 and
computes the ratios at the end; the one-batch functions are the same sums over one batch.

A target with nothing in it (delta of a layer fine-tuning left alone: zero, or constant so it has
no variance) leaves a ratio with a zero denominator. Both are defined there: an exact prediction
misses nothing of nothing (FVE 1, NMSE 0), any other misses infinitely much (FVE -inf, NMSE inf).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def fve(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of the (centred) variance of ``target`` that ``pred`` explains."""
    sums = MetricSums(target.shape[-1])
    sums.add(pred, target)
    return sums.fve


def nmse(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Squared error relative to the squared norm of ``target`` (no centring)."""
    sums = MetricSums(target.shape[-1])
    sums.add(pred, target)
    return sums.nmse


def next_token_kl(target_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over positions where ``mask`` is nonzero of KL(softmax(target) || softmax(model)),
    in float32 (differentiable in ``logits``); divide by ``mask.sum()`` for the mean."""
    keep = mask.bool()
    target_logp = torch.log_softmax(target_logits[keep].float(), -1)
    logp = torch.log_softmax(logits[keep].float(), -1)
    return (target_logp.exp() * (target_logp - logp)).sum()


def l0(acts: torch.Tensor) -> float:
    """Mean number of nonzero features per row."""
    return (acts != 0).sum(-1).double().mean().item()


@dataclass
class MetricSums:
    """Running sums from which FVE, NMSE and L0 follow exactly over any number of batches."""

    d: int
    rows: int = 0
    sq_err: float = 0.0
    sq_target: float = 0.0
    nonzero: int = 0

    def __post_init__(self):
        self.sum_target = torch.zeros(self.d, dtype=torch.float64)

    def add(self, pred: torch.Tensor, target: torch.Tensor, acts: torch.Tensor | None = None) -> None:
        pred, target = pred.detach().double(), target.detach().double()
        self.rows += target.shape[0]
        self.sq_err += (pred - target).square().sum().item()
        self.sq_target += target.square().sum().item()
        self.sum_target += target.sum(0).cpu()
        if acts is not None:
            self.nonzero += int((acts != 0).sum().item())

    @property
    def centred_sq_target(self) -> float:
        # sum ||t - mean||^2 = sum ||t||^2 - n ||mean||^2
        mean = self.sum_target / max(self.rows, 1)
        # the difference of two equal sums can round below zero; a variance cannot be
        return max(self.sq_target - self.rows * mean.square().sum().item(), 0.0)

    @property
    def fve(self) -> float:
        return 1.0 - relative(self.sq_err, self.centred_sq_target)

    @property
    def nmse(self) -> float:
        return relative(self.sq_err, self.sq_target)

    @property
    def l0(self) -> float:
        return self.nonzero / max(self.rows, 1)


def relative(err: float, ref: float) -> float:
    """``err / ref``, also where ``ref`` is 0: 0 when ``err`` is too, infinity otherwise."""
    if ref > 0:
        return err / ref
    return 0.0 if err == 0 else float("inf")


COPY_COSINE = 0.9
"""Two decoder rows this close in direction say one thing twice (the ground-truth bench's copy
threshold, toy/scoring.py)."""


@torch.no_grad()
def decoder_copies(W_dec: torch.Tensor, live: torch.Tensor, threshold: float = COPY_COSINE) -> tuple[int, float]:
    """(copies, mean max cosine) over the ``live`` [F] bool features: how many have a decoder row
    at cosine >= ``threshold`` with another live feature's row, and the mean over live features
    of their largest cosine with another; (0, 0.0) with fewer than two live features."""
    rows = W_dec[live].double()
    if rows.shape[0] < 2:
        return 0, 0.0
    unit = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-300)
    cos = unit @ unit.T
    cos.fill_diagonal_(-math.inf)  # a row is not its own copy
    best = cos.max(dim=1).values
    return int((best >= threshold).sum()), best.mean().item()
