"""The one entry point the trainer calls, ``sparse_adapter``, and the one path rule, ``choose_path``.

Path rule: the dense reference while the measured density of active entries is above
``DensityGate.crossover`` (ReLU and JumpReLU start dense and sparsify as they train; for
TopK/BatchTopK the density is k / F, known up front); otherwise the sparse path, with the
Triton kernels on CUDA and their PyTorch twins elsewhere. The density that decides comes
from an earlier step's firing counts, copied to the host asynchronously, so choosing never
waits on the GPU. ``sparse_adapter(path="auto")`` and the adapter's training step
(train/adapter.py) both ask ``choose_path``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tca import TcaError

from . import activations
from .autograd import DecodeAt, EncodeAt
from .backend import TORCH, TRITON, Backend
from .dense import dense_adapter
from .output import SparseOutput
from .scratch import scratch
from .select import select_batch_topk, select_topk
from .spec import check_inputs

PATHS = ("auto", "triton", "torch", "dense")


@dataclass
class DensityGate:
    """Per-adapter state that picks sparse or dense from the lagged measured density."""

    crossover: float = 0.05
    """Fraction of the B x F entries active above which the dense path is used."""
    density: float | None = None
    """The latest density that has reached the host; None until the first one has."""
    _pending: deque = field(default_factory=deque, repr=False)

    def prefers_dense(self, known_density: float | None = None) -> bool:
        """Dense when the density (known up front, else the latest measured) is high;
        dense too before any measurement, since an untrained ReLU adapter is dense."""
        self._collect()
        density = known_density if known_density is not None else self.density
        return density is None or density > self.crossover

    def record(self, counts: Tensor, n_rows: int) -> None:
        """Queue this step's firing counts; readable once the device has got there."""
        size = n_rows * counts.numel()
        total = counts.sum()
        if total.device.type != "cuda":
            self.density = total.item() / size
            return
        host = torch.empty((), dtype=total.dtype, pin_memory=True)
        host.copy_(total, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._pending.append((done, host, size))

    def _collect(self) -> None:
        while self._pending and self._pending[0][0].query():
            _, host, size = self._pending.popleft()
            self.density = host.item() / size


def choose_path(activation: str, n_features: int, k: int | None, threshold: Tensor | None,
                gate: DensityGate | None, cuda: bool) -> str:
    """``dense`` while ``gate`` finds activations too dense for sparsity to pay, else ``triton``
    on CUDA and ``torch`` elsewhere. Training TopK/BatchTopK (no inference ``threshold``) is
    known to be k / F dense; the rest is judged by the gate's latest measurement."""
    known = k / n_features if activation in activations.TOP_K and threshold is None else None
    if gate is not None and gate.prefers_dense(known):
        return "dense"
    return "triton" if cuda else "torch"


def sparse_adapter(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor,
                   b_dec: Tensor | None = None, *, activation: str, k: int | None = None,
                   threshold: Tensor | None = None, bandwidth: float = 1e-3,
                   dead_mask: Tensor | None = None, k_aux: int | None = None,
                   gate: DensityGate | None = None, path: str = "auto") -> SparseOutput:
    """One adapter forward, differentiable to W_enc, b_enc, W_dec, b_dec and ``threshold``.

    ``activation``: "relu", "jumprelu" (``threshold`` [F] trained through a pseudo-gradient
    of width ``bandwidth``), "topk" (``k`` per row) or "batchtopk" (``k * B`` over the
    batch; pass a one-element ``threshold`` instead for inference). ``dead_mask`` [F] bool
    adds ``aux_pred`` from each row's ``k_aux`` (default d // 2) largest dead pre-activations.
    ``gate`` switches to the dense path while activations are dense; ``path`` forces
    "triton", "torch" or "dense" instead of choosing ("auto").
    """
    k_aux = check_inputs(x, W_enc, b_enc, W_dec, b_dec, activation, k, threshold, dead_mask, k_aux)
    if path not in PATHS:
        raise TcaError(f"unknown path {path!r}; choose one of {', '.join(PATHS)}")
    if path == "auto":
        path = choose_path(activation, W_enc.shape[1], k, threshold, gate, x.is_cuda)
    if path == "dense":
        out = dense_adapter(x, W_enc, b_enc, W_dec, b_dec, activation=activation, k=k,
                            threshold=threshold, bandwidth=bandwidth, dead_mask=dead_mask, k_aux=k_aux)
    else:
        out = _sparse(x, W_enc, b_enc, W_dec, b_dec, activation, k, threshold, bandwidth,
                      dead_mask, k_aux, TRITON if path == "triton" else TORCH)
    if gate is not None:
        gate.record(out.counts, x.shape[0])
    return out


def _sparse(x, W_enc, b_enc, W_dec, b_dec, activation, k, threshold, bandwidth, dead_mask,
            k_aux, backend: Backend) -> SparseOutput:
    n_rows, n_features = x.shape[0], W_enc.shape[1]
    by_threshold = activations.uses_threshold(activation, threshold)
    with torch.no_grad():
        # The bias rides in the GEMM's epilogue; the output is read once by the selection
        # and then dropped, which is why it can live in a reused buffer.
        pre = torch.addmm(b_enc, x, W_enc,
                          out=scratch("pre", (n_rows, n_features), x.dtype, x.device))
        if by_threshold or activation == "relu":
            floor = activations.selection_floor(activation, threshold, bandwidth, n_features, x.device)
            layout, pre_at = backend.select_above(pre, floor)
        elif activation == "topk":
            layout, pre_at = select_topk(pre, k)
        else:
            layout, pre_at = select_batch_topk(pre, k)
        if dead_mask is not None:
            aux_layout, aux_pre_at = select_topk(pre.masked_fill_(~dead_mask, -torch.inf), k_aux)

    pre_at = EncodeAt.apply(pre_at, x, W_enc, b_enc, layout, backend)
    threshold_at = threshold.expand(n_features)[layout.cols] if by_threshold else None
    values = activations.apply(activation, pre_at, threshold_at, bandwidth)
    pred = DecodeAt.apply(values, W_dec, b_dec, layout, backend)
    norms = W_dec.float().norm(dim=1)
    aux_pred = None
    if dead_mask is not None:
        aux_values = torch.relu(EncodeAt.apply(aux_pre_at, x, W_enc, b_enc, aux_layout, backend))
        aux_pred = DecodeAt.apply(aux_values, W_dec, None, aux_layout, backend)
    return SparseOutput(
        pred=pred,
        rows=layout.rows,
        indices=layout.cols,
        values=values,
        counts=torch.zeros(n_features, dtype=torch.int64, device=x.device)
        .index_add_(0, layout.cols, (values != 0).long()),
        l1=(values.float().abs() * norms[layout.cols]).sum() / n_rows,
        batch_threshold=values.min().detach() if activation == "batchtopk" and not by_threshold else None,
        aux_pred=aux_pred,
        path=backend.name,
    )
