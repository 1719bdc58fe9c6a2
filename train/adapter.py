"""Transcoder adapters: a sparse, wide layer that runs beside one MLP and predicts ``delta``.

    pre  = x @ W_enc + b_enc                  W_enc [d, F], b_enc [F]
    acts = sigma(pre)                          relu | topk | batchtopk | jumprelu
    pred = acts @ W_dec (+ b_dec)              W_dec [F, d], b_dec [d]

A feature's decoder direction is a row of ``W_dec``; the ReLU adapter's L1 penalty weights
each activation by that row's norm, so shrinking activations cannot be paid for by growing
decoder rows. The decoder starts at zero, so an untrained adapter is the hybrid model.

The loss is scale-free: squared error is divided by the mean squared norm of ``delta``
(``loss_scale`` squared, estimated by the trainer) and the weighted L1 by ``loss_scale``, so one
``l1`` means the same on layers whose deltas differ by orders of magnitude.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

ACTIVATIONS = ("relu", "topk", "batchtopk", "jumprelu")


@dataclass
class AdapterConfig:
    """The shape and objective of one adapter."""

    d_model: int
    """Width of the MLP input and output."""
    n_features: int
    """Number of features F."""
    activation: str = "relu"
    """``relu`` (the paper's, with decoder-norm-weighted L1), ``topk``, ``batchtopk`` or ``jumprelu``."""
    l1: float = 0.0
    """Sparsity coefficient: weighted L1 for ``relu``, L0 (straight-through) for ``jumprelu``."""
    k: int = 32
    """Active features per row for ``topk``; mean active per row for ``batchtopk``."""
    dec_bias: bool = True
    """Learn a decoder bias ``b_dec``."""
    aux_k: int = 0
    """Dead features that reconstruct the residual in the auxiliary loss (0: d_model // 2)."""
    aux_coef: float = 1 / 32
    """Weight of the auxiliary dead-feature loss (``topk`` and ``batchtopk`` only)."""
    dead_after_tokens: int = 1_000_000
    """A feature that has not fired for this many training tokens counts as dead."""
    jumprelu_bandwidth: float = 1e-3
    """Width of the rectangle kernel of the JumpReLU threshold's straight-through gradient."""
    jumprelu_init_threshold: float = 1e-3
    """Initial JumpReLU threshold (in units of the pre-activation)."""
    threshold_momentum: float = 0.99
    """Momentum of the running BatchTopK inference threshold."""

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; use one of {ACTIVATIONS}")


@dataclass
class AdapterOutput:
    pred: torch.Tensor
    """The predicted delta [N, d]."""
    acts: torch.Tensor
    """Feature activations [N, F] (dense, mostly zeros)."""
    pre: torch.Tensor
    """Pre-activations [N, F]."""


@dataclass
class AdapterLoss:
    total: torch.Tensor
    mse: torch.Tensor
    """Squared error over the mean squared norm of delta (a batch NMSE)."""
    sparsity: torch.Tensor
    aux: torch.Tensor
    out: AdapterOutput


def decode(acts: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor | None) -> torch.Tensor:
    """``acts @ W_dec (+ b_dec)``: the one place where a sparse decode kernel plugs in."""
    pred = acts @ W_dec
    return pred if b_dec is None else pred + b_dec


class _JumpReLU(torch.autograd.Function):
    """``pre * 1[pre > theta]``; the threshold's gradient by a rectangle-kernel estimator."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        window = ((pre - threshold).abs() < eps / 2).to(grad.dtype)
        grad_threshold = -(threshold / eps) * window * grad
        return grad * (pre > threshold), grad_threshold.sum(0), None


class _Step(torch.autograd.Function):
    """``1[pre > theta]`` with the same estimator for the threshold (the JumpReLU L0 penalty)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        window = ((pre - threshold).abs() < eps / 2).to(grad.dtype)
        return torch.zeros_like(pre), (-(1 / eps) * window * grad).sum(0), None


def _keep_topk(values: torch.Tensor, k: int) -> torch.Tensor:
    """``values`` with all but the ``k`` largest of each row set to zero."""
    top = values.topk(min(k, values.shape[-1]), dim=-1)
    return torch.zeros_like(values).scatter(-1, top.indices, top.values)


class Adapter(nn.Module):
    """One layer's adapter; ``forward`` is inference, ``loss`` the training objective."""

    def __init__(self, cfg: AdapterConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        d, f = cfg.d_model, cfg.n_features
        bound = 1 / math.sqrt(d)
        self.W_enc = nn.Parameter(torch.empty(d, f).uniform_(-bound, bound, generator=generator))
        self.b_enc = nn.Parameter(torch.zeros(f))
        self.W_dec = nn.Parameter(torch.zeros(f, d))
        self.b_dec = nn.Parameter(torch.zeros(d)) if cfg.dec_bias else None
        if cfg.activation == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((f,), math.log(cfg.jumprelu_init_threshold)))
        if cfg.activation == "batchtopk":
            self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("tokens_since_fired", torch.zeros(f, dtype=torch.int64))
        self.register_buffer("loss_scale", torch.ones(()))

    # ---- inference ---------------------------------------------------------------------------

    def preactivations(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        act = self.cfg.activation
        if act == "relu":
            return torch.relu(pre)
        if act == "topk":
            return _keep_topk(torch.relu(pre), self.cfg.k)
        if act == "jumprelu":
            return _JumpReLU.apply(pre, self.log_threshold.exp(), self.cfg.jumprelu_bandwidth)
        # batchtopk: the k * N largest over the whole batch while training, a fixed threshold after
        if not self.training:
            return pre * (pre > self.threshold.clamp_min(0))
        relu = torch.relu(pre)
        flat = _keep_topk(relu.flatten()[None], self.cfg.k * pre.shape[0])
        return flat.view_as(pre)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.preactivations(x))

    def forward(self, x: torch.Tensor) -> AdapterOutput:
        pre = self.preactivations(x)
        acts = self.activate(pre)
        return AdapterOutput(decode(acts, self.W_dec, self.b_dec), acts, pre)

    # ---- training ----------------------------------------------------------------------------

    @property
    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.cfg.dead_after_tokens

    def loss(self, x: torch.Tensor, delta: torch.Tensor) -> AdapterLoss:
        out = self(x)
        scale = self.loss_scale
        err = out.pred - delta
        mse = err.square().sum(-1).mean() / scale.square()
        zero = mse.new_zeros(())
        sparsity, aux = zero, zero
        act = self.cfg.activation
        if act == "relu":
            weighted = out.acts @ self.W_dec.norm(dim=1)
            sparsity = self.cfg.l1 * weighted.mean() / scale
        elif act == "jumprelu":
            fired = _Step.apply(out.pre, self.log_threshold.exp(), self.cfg.jumprelu_bandwidth)
            sparsity = self.cfg.l1 * fired.sum(-1).mean()
        elif self.cfg.aux_coef > 0:
            aux = self.cfg.aux_coef * self._aux_loss(out.pre, err.detach())
        return AdapterLoss(mse + sparsity + aux, mse, sparsity, aux, out)

    def _aux_loss(self, pre: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
        """Dead features' top activations reconstruct the residual, so they get gradient again."""
        dead = self.dead_mask
        n_dead = int(dead.sum())
        if n_dead == 0:
            return pre.new_zeros(())
        k = min(self.cfg.aux_k or self.cfg.d_model // 2, n_dead)
        masked = torch.where(dead, torch.relu(pre), torch.zeros_like(pre))
        recon = _keep_topk(masked, k) @ self.W_dec
        residual = -err  # what the live features still miss: delta - pred
        return (recon - residual).square().sum(-1).mean() / residual.square().sum(-1).mean().clamp_min(1e-12)

    @torch.no_grad()
    def after_step(self, out: AdapterOutput) -> None:
        """Book-keeping after an optimizer step: dead-feature counters, BatchTopK threshold."""
        fired = (out.acts > 0).any(0)
        self.tokens_since_fired += out.acts.shape[0]
        self.tokens_since_fired[fired] = 0
        if self.cfg.activation == "batchtopk":
            positive = out.acts[out.acts > 0]
            if positive.numel():
                m = self.cfg.threshold_momentum
                smallest = positive.min()
                first = bool(self.threshold == 0)
                self.threshold.copy_(smallest if first else m * self.threshold + (1 - m) * smallest)
