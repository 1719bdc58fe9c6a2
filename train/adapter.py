"""Transcoder adapters: a sparse, wide layer that runs beside one MLP and predicts ``delta``.

    pre  = x @ W_enc + b_enc                  W_enc [d, F], b_enc [F]
    acts = sigma(pre)                          relu | topk | batchtopk | jumprelu
    pred = acts @ W_dec (+ b_dec)              W_dec [F, d], b_dec [d]

A feature's decoder direction is a row of ``W_dec``; the ReLU adapter's L1 penalty weights
each activation by that row's norm, so shrinking activations cannot be paid for by growing
decoder rows. The decoder starts at zero, so an untrained adapter is the hybrid model.

A feature whose decoder row is zero adds nothing, so it is not active: outside training mode
``activate`` (and so ``encode``, ``forward``, the index, the spliced model and every count of
active features) reports it as 0. In training mode it fires as its encoder says, since that
activation is the only gradient a zero row (every row, at the start) can grow from.

Training runs through ``tca.kernels.sparse_adapter`` for ReLU, TopK and BatchTopK: the decoder
and every backward product touch only the active entries. The kernels' path rule
(``tca.kernels.choose_path``, fed by a density gate the adapter holds) keeps the dense objective
written out here while activations are still dense. ``kernels=False`` (and JumpReLU, whose L0
term needs every pre-activation) always trains on that dense objective, the reference the
kernel path is tested against.

The loss is scale-free: squared error is divided by the mean squared norm of ``delta``
(``loss_scale`` squared, estimated by the trainer) and the weighted L1 by ``loss_scale``, so one
``l1`` means the same on layers whose deltas differ by orders of magnitude.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tca.kernels import ACTIVATIONS, TOP_K, DensityGate, choose_path, sparse_adapter
from tca.kernels.activations import JumpReLU, JumpReLUStep


PENALTIES = ("l1", "log")


def sparsity_penalty(weighted: torch.Tensor, penalty: str, eps: float) -> torch.Tensor:
    """The elementwise sparsity cost of weighted activations a >= 0 (``AdapterConfig.penalty``);
    zero at a = 0, so a sum over the active entries equals the sum over every entry."""
    if penalty == "l1":
        return weighted
    return eps * torch.log1p(weighted / eps)


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
    penalty: str = "l1"
    """``relu``'s sparsity term on each weighted activation a = |f|·||d|| / loss_scale: ``l1`` sums
    a, which costs the same whether one feature or n copies carry a direction (so nothing stops a
    split); ``log`` sums ``penalty_eps * log(1 + a / penalty_eps)``, strictly subadditive, so one
    feature costs less than the copies it would split into."""
    penalty_eps: float = 0.1
    """Where ``log`` bends: like L1 for a << eps (in units of the RMS ||delta||), logarithmic above."""
    kernels: bool = True
    """Train through the sparse kernels (``relu``, ``topk``, ``batchtopk``); False trains on the
    dense reference objective. ``jumprelu`` always uses the dense one."""

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; use one of {ACTIVATIONS}")
        if self.penalty not in PENALTIES:
            raise ValueError(f"unknown penalty {self.penalty!r}; use one of {PENALTIES}")


@dataclass
class AdapterOutput:
    pred: torch.Tensor
    """The predicted delta [N, d]."""
    acts: torch.Tensor
    """Feature activations [N, F] (dense, mostly zeros)."""
    pre: torch.Tensor
    """Pre-activations [N, F]."""


@dataclass
class StepOutput:
    """What a training forward leaves for the metrics and ``after_step``, on either path."""

    pred: torch.Tensor
    """The predicted delta [N, d]."""
    counts: torch.Tensor
    """[F] int64: rows each feature fired in."""
    batch_threshold: torch.Tensor | None
    """BatchTopK: the smallest activation kept in this batch; None otherwise."""
    path: str
    """``triton``, ``torch`` or ``dense`` (the kernels' dispatch), or ``reference``."""
    decoded: torch.Tensor
    """[F] bool: features with a nonzero decoder row in this forward (``Adapter.decoded``)."""

    @property
    def l0(self) -> float:
        """Mean number of active features per row: firing, with a decoder row to add."""
        return (self.counts * self.decoded).sum().item() / self.pred.shape[0]


@dataclass
class AdapterLoss:
    total: torch.Tensor
    mse: torch.Tensor
    """Squared error over the mean squared norm of delta (a batch NMSE)."""
    sparsity: torch.Tensor
    aux: torch.Tensor
    out: StepOutput


@dataclass
class _Forward:
    """One training forward before the loss is assembled."""

    out: StepOutput
    penalty: torch.Tensor
    """The sparsity term before ``l1``: relu's decoder-norm-weighted L1 per row over
    ``loss_scale``, jumprelu's L0 per row; zero otherwise."""
    aux_pred: torch.Tensor | None
    """The dead features' reconstruction [N, d] when the aux loss applies."""


def decode(acts: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor | None) -> torch.Tensor:
    """``acts @ W_dec (+ b_dec)``: the one place where a sparse decode kernel plugs in."""
    pred = acts @ W_dec
    return pred if b_dec is None else pred + b_dec


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
        # lets the kernels run dense while activations are denser than the crossover
        self.gate = DensityGate()
        self._decoded: tuple[tuple[int, int], torch.Tensor] | None = None

    # ---- inference ---------------------------------------------------------------------------

    def preactivations(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W_enc + self.b_enc

    @torch.no_grad()
    def decoded(self) -> torch.Tensor:
        """[F] bool: which features have a nonzero decoder row, the only ones that can be active."""
        # kept until W_dec changes (an optimizer step or a load bumps its version, a move or cast
        # makes a new tensor): a generating model encodes one token at a time, and reading all
        # of W_dec for every token would cost as much again as decoding it
        if self.W_dec.is_inference():  # made under torch.inference_mode: no version to key on
            return self.W_dec.ne(0).any(dim=1)
        key = (self.W_dec._version, self.W_dec.data_ptr())
        if self._decoded is None or self._decoded[0] != key:
            self._decoded = key, self.W_dec.ne(0).any(dim=1)
        return self._decoded[1]

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        acts = self._sigma(pre)
        return acts if self.training else acts * self.decoded()

    def _sigma(self, pre: torch.Tensor) -> torch.Tensor:
        act = self.cfg.activation
        if act == "relu":
            return torch.relu(pre)
        if act == "topk":
            return _keep_topk(torch.relu(pre), self.cfg.k)
        if act == "jumprelu":
            return JumpReLU.apply(pre, self.log_threshold.exp(), self.cfg.jumprelu_bandwidth)
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
        aux_dead = self._aux_dead()
        # JumpReLU's L0 term needs every pre-activation, which the kernels do not return
        gated = self.cfg.kernels and self.cfg.activation != "jumprelu"
        k = min(self.cfg.k, self.cfg.n_features)
        path = choose_path(self.cfg.activation, self.cfg.n_features, k, None, self.gate, x.is_cuda) if gated else "dense"
        # the kernels' own dense path forms entry lists the loss does not need, so dense steps
        # take the reference objective
        fwd = self._forward_reference(x, aux_dead) if path == "dense" else self._forward_kernels(x, aux_dead, path)
        if gated:
            self.gate.record(fwd.out.counts, x.shape[0])  # so the gate sees activations sparsify
        scale = self.loss_scale
        err = fwd.out.pred - delta
        mse = err.square().sum(-1).mean() / scale.square()
        sparsity = self.cfg.l1 * fwd.penalty
        aux = mse.new_zeros(())
        if fwd.aux_pred is not None:
            residual = -err.detach()  # what the live features still miss: delta - pred
            aux_mse = (fwd.aux_pred - residual).square().sum(-1).mean()
            aux = self.cfg.aux_coef * aux_mse / residual.square().sum(-1).mean().clamp_min(1e-12)
        return AdapterLoss(mse + sparsity + aux, mse, sparsity, aux, fwd.out)

    def _aux_dead(self) -> tuple[torch.Tensor, int] | None:
        """(dead mask, how many of them reconstruct the residual) when the aux loss applies."""
        if self.cfg.activation not in TOP_K or self.cfg.aux_coef <= 0:
            return None
        dead = self.dead_mask
        n_dead = int(dead.sum())
        if n_dead == 0:
            return None
        return dead, min(self.cfg.aux_k or self.cfg.d_model // 2, n_dead)

    def _forward_kernels(self, x: torch.Tensor, aux_dead: tuple[torch.Tensor, int] | None, path: str) -> _Forward:
        dead, k_aux = aux_dead if aux_dead is not None else (None, None)
        out = sparse_adapter(
            x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, activation=self.cfg.activation,
            k=min(self.cfg.k, self.cfg.n_features), dead_mask=dead, k_aux=k_aux, path=path,
        )
        penalty = out.l1.new_zeros(())
        if self.cfg.activation == "relu" and self.cfg.penalty == "l1":
            # the kernels' l1 is the per-row mean of the weighted L1, as the reference's
            penalty = out.l1 / self.loss_scale
        elif self.cfg.activation == "relu":
            # on the active entries only: the penalty is zero at zero, so this is the dense sum
            weighted = out.values.float().abs() * self.W_dec.float().norm(dim=1)[out.indices] / self.loss_scale
            penalty = sparsity_penalty(weighted, self.cfg.penalty, self.cfg.penalty_eps).sum() / x.shape[0]
        step = StepOutput(out.pred, out.counts, out.batch_threshold, out.path, self.decoded())
        return _Forward(step, penalty, out.aux_pred)

    def _forward_reference(self, x: torch.Tensor, aux_dead: tuple[torch.Tensor, int] | None) -> _Forward:
        out = self(x)
        act = self.cfg.activation
        penalty = out.pred.new_zeros(())
        if act == "relu" and self.cfg.penalty == "l1":
            penalty = (out.acts @ self.W_dec.norm(dim=1)).mean() / self.loss_scale
        elif act == "relu":
            weighted = out.acts * self.W_dec.norm(dim=1) / self.loss_scale
            penalty = sparsity_penalty(weighted, self.cfg.penalty, self.cfg.penalty_eps).sum(-1).mean()
        elif act == "jumprelu":
            penalty = JumpReLUStep.apply(out.pre, self.log_threshold.exp(), self.cfg.jumprelu_bandwidth).sum(-1).mean()
        aux_pred = None
        if aux_dead is not None:
            dead, k_aux = aux_dead
            masked = torch.where(dead, torch.relu(out.pre), torch.zeros_like(out.pre))
            aux_pred = _keep_topk(masked, k_aux) @ self.W_dec
        with torch.no_grad():
            smallest = None
            if act == "batchtopk":
                positive = out.acts[out.acts > 0]
                smallest = positive.min() if positive.numel() else None
            # activations are >= 0, so a GEMV over their signs counts firings: several times
            # faster on CPU than reducing a [N, F] bool mask, and exact below 2**24 rows
            counts = (out.acts.new_ones(out.acts.shape[0]) @ out.acts.sign()).long()
            step = StepOutput(out.pred, counts, smallest, "reference", self.decoded())
        return _Forward(step, penalty, aux_pred)

    @torch.no_grad()
    def after_step(self, out: StepOutput) -> None:
        """Book-keeping after an optimizer step: dead-feature counters, BatchTopK threshold."""
        self.tokens_since_fired += out.pred.shape[0]
        self.tokens_since_fired.masked_fill_(out.counts > 0, 0)
        if out.batch_threshold is not None:
            m = self.cfg.threshold_momentum
            smallest = out.batch_threshold.to(self.threshold.dtype)
            first = bool(self.threshold == 0)
            self.threshold.copy_(smallest if first else m * self.threshold + (1 - m) * smallest)


def train_step(adapter: Adapter, opt: torch.optim.Optimizer, x: torch.Tensor, delta: torch.Tensor,
               grad_clip: float = 1.0) -> AdapterLoss:
    """One optimisation step of ``adapter`` on a batch: loss, clipped gradients, update, and
    the dead-feature and threshold bookkeeping that follows it."""
    loss = adapter.loss(x, delta)
    opt.zero_grad(set_to_none=True)
    loss.total.backward()
    torch.nn.utils.clip_grad_norm_(adapter.parameters(), grad_clip)
    opt.step()
    adapter.after_step(loss.out)
    return loss
