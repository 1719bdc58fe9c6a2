"""The kernel training path against the dense reference objective of the same adapter."""

from __future__ import annotations

import copy

import pytest
import torch

from tca.kernels import DensityGate
from tca.train.adapter import Adapter, AdapterConfig, train_step

D, F, N = 12, 40, 24

CASES = [
    ("relu", {"l1": 0.3}),
    ("relu", {"l1": 0.3, "dec_bias": False}),
    ("topk", {"k": 5}),
    ("batchtopk", {"k": 5}),
]


def _pair(activation: str, **kw) -> tuple[Adapter, Adapter]:
    """(kernel path forced sparse, dense reference) with identical trained-looking weights."""
    sparse = Adapter(AdapterConfig(d_model=D, n_features=F, activation=activation, **kw), torch.Generator().manual_seed(1))
    with torch.no_grad():
        sparse.W_dec.normal_(0, 0.3)
        sparse.b_enc.normal_(-0.3, 0.2)  # mostly negative: ReLU rows keep a few features
        if sparse.b_dec is not None:
            sparse.b_dec.normal_(0, 0.1)
        sparse.loss_scale.fill_(1.7)
    sparse.gate = DensityGate(crossover=1.0, density=0.0)  # sparse even at this small width
    dense = copy.deepcopy(sparse)
    dense.cfg = AdapterConfig(**{**sparse.cfg.__dict__, "kernels": False})
    return sparse, dense


def _data(seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)


def _kill_every_third(*adapters: Adapter) -> None:
    for adapter in adapters:
        adapter.tokens_since_fired[::3] = adapter.cfg.dead_after_tokens


@pytest.mark.parametrize("activation,kw", CASES)
@pytest.mark.parametrize("with_dead", [False, True])
def test_kernel_loss_and_gradients_equal_the_dense_reference(activation, kw, with_dead):
    sparse, dense = _pair(activation, aux_k=6, dead_after_tokens=100, **kw)
    if with_dead:
        _kill_every_third(sparse, dense)
    x, delta = _data()
    got, want = sparse.loss(x, delta), dense.loss(x, delta)
    assert got.out.path == "torch" and want.out.path == "reference"
    got.total.backward()
    want.total.backward()
    for term in ("total", "mse", "sparsity", "aux"):
        torch.testing.assert_close(getattr(got, term), getattr(want, term), rtol=1e-5, atol=1e-7, msg=term)
    if with_dead and activation != "relu":
        assert want.aux.item() > 0
    assert torch.equal(got.out.counts, want.out.counts)
    for (name, p), q in zip(sparse.named_parameters(), dense.parameters()):
        assert q.grad is not None and q.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("activation,kw", CASES[0:1] + CASES[2:])
def test_short_training_run_ends_with_the_same_weights(activation, kw):
    sparse, dense = _pair(activation, aux_k=6, dead_after_tokens=2 * N, **kw)
    opts = [torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.0) for a in (sparse, dense)]
    for step in range(6):
        x, delta = _data(10 + step)
        for adapter, opt in zip((sparse, dense), opts):
            loss = train_step(adapter, opt, x, delta)
            assert loss.out.path == ("torch" if adapter is sparse else "reference")
    for (name, p), q in zip(sparse.named_parameters(), dense.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    assert torch.equal(sparse.tokens_since_fired, dense.tokens_since_fired)
    if activation == "batchtopk":
        torch.testing.assert_close(sparse.threshold, dense.threshold)


def test_gate_keeps_untrained_relu_dense_measures_it_and_jumprelu_stays_on_the_reference():
    relu = Adapter(AdapterConfig(d_model=D, n_features=F, l1=0.1))
    x, delta = _data()
    assert relu.gate.density is None
    assert relu.loss(x, delta).out.path == "reference"  # nothing measured yet: an untrained ReLU is dense
    assert relu.gate.density == pytest.approx((torch.relu(x @ relu.W_enc) > 0).double().mean().item())
    jump = Adapter(AdapterConfig(d_model=D, n_features=F, activation="jumprelu", l1=0.1))
    assert jump.loss(x, delta).out.path == "reference"
