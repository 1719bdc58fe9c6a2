"""Adapters and metrics against plain PyTorch / numpy written out independently here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tca.kernels import DensityGate
from tca.train.adapter import Adapter, AdapterConfig
from tca.train.metrics import MetricSums, fve, l0, nmse

D, F, N = 12, 40, 24


def _adapter(activation: str, **kw) -> Adapter:
    adapter = Adapter(AdapterConfig(d_model=D, n_features=F, activation=activation, **kw), torch.Generator().manual_seed(1))
    with torch.no_grad():  # a trained-looking adapter: nonzero decoder and encoder bias
        adapter.W_dec.normal_(0, 0.3)
        adapter.b_enc.normal_(0, 0.2)
        if adapter.b_dec is not None:
            adapter.b_dec.normal_(0, 0.1)
        adapter.loss_scale.fill_(1.7)
    return adapter


def _data():
    g = torch.Generator().manual_seed(2)
    return torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)


def _box(z, theta, eps):
    """A function whose derivative in theta is -(1/eps) * 1[|z - theta| < eps/2] (z held fixed)."""
    return -torch.clamp(theta - z.detach() + eps / 2, 0, eps) / eps


def reference_loss(p: dict, cfg: AdapterConfig, x, delta, dead=None, threshold=None):
    """The objective written out directly from its definition."""
    pre = x @ p["W_enc"] + p["b_enc"]
    if cfg.activation == "relu":
        acts = torch.relu(pre)
    elif cfg.activation == "topk":
        v, i = pre.topk(cfg.k, dim=1)
        acts = torch.zeros_like(pre).scatter(1, i, torch.relu(v))
    elif cfg.activation == "batchtopk":
        flat = torch.relu(pre).flatten()
        v, i = flat.topk(cfg.k * x.shape[0])
        acts = torch.zeros_like(flat).scatter(0, i, v).view_as(pre)
    else:
        theta = p["log_threshold"].exp()
        gate = (pre > theta).float()
        acts = pre * gate + theta.detach() * (_box(pre, theta, cfg.jumprelu_bandwidth) - _box(pre, theta, cfg.jumprelu_bandwidth).detach())
    pred = acts @ p["W_dec"] + (p["b_dec"] if "b_dec" in p else 0)
    s = p["loss_scale"]
    loss = ((pred - delta) ** 2).sum(1).mean() / s**2
    if cfg.activation == "relu":
        loss = loss + cfg.l1 * (acts * p["W_dec"].norm(dim=1)).sum(1).mean() / s
    elif cfg.activation == "jumprelu":
        theta = p["log_threshold"].exp()
        step = (pre > theta).float() + _box(pre, theta, cfg.jumprelu_bandwidth) - _box(pre, theta, cfg.jumprelu_bandwidth).detach()
        loss = loss + cfg.l1 * step.sum(1).mean()
    elif dead is not None:
        residual = (delta - pred).detach()
        masked = torch.relu(pre) * dead
        v, i = masked.topk(min(cfg.aux_k, int(dead.sum())), dim=1)
        recon = torch.zeros_like(pre).scatter(1, i, v) @ p["W_dec"]
        loss = loss + cfg.aux_coef * ((recon - residual) ** 2).sum(1).mean() / (residual**2).sum(1).mean()
    return loss


@pytest.mark.parametrize(
    "activation,kw",
    [
        ("relu", {"l1": 0.3}),
        ("relu", {"l1": 0.3, "dec_bias": False}),
        ("topk", {"k": 5}),
        ("batchtopk", {"k": 5}),
        ("jumprelu", {"l1": 0.05, "jumprelu_bandwidth": 0.4, "jumprelu_init_threshold": 0.3}),
    ],
)
def test_loss_and_gradients_match_plain_pytorch(activation, kw):
    adapter = _adapter(activation, **kw)
    x, delta = _data()
    loss = adapter.loss(x, delta)
    loss.total.backward()
    params = {k: v.detach().clone().requires_grad_(k != "loss_scale") for k, v in adapter.state_dict().items() if v.is_floating_point()}
    ref = reference_loss(params, adapter.cfg, x, delta)
    ref.backward()
    assert loss.total.item() == pytest.approx(ref.item(), rel=1e-5)
    for name, p in adapter.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_aux_loss_for_dead_features_matches_plain_pytorch(activation):
    adapter = _adapter(activation, k=4, aux_k=6, dead_after_tokens=100)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[::3] = True
    adapter.tokens_since_fired[dead] = 100
    x, delta = _data()
    loss = adapter.loss(x, delta)
    assert loss.aux.item() > 0
    loss.total.backward()
    params = {k: v.detach().clone().requires_grad_(k != "loss_scale") for k, v in adapter.state_dict().items() if v.is_floating_point()}
    ref = reference_loss(params, adapter.cfg, x, delta, dead=dead.float())
    ref.backward()
    assert loss.total.item() == pytest.approx(ref.item(), rel=1e-5)
    for name, p in adapter.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_initialisation_starts_at_the_hybrid_model():
    d, f = 256, 512
    adapter = Adapter(AdapterConfig(d_model=d, n_features=f), torch.Generator().manual_seed(0))
    bound = 1 / math.sqrt(d)
    w = adapter.W_enc.detach()
    assert w.shape == (d, f) and adapter.W_dec.shape == (f, d) and adapter.b_dec.shape == (d,)
    assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)  # uniform on [-b, b]
    assert not adapter.W_dec.any() and not adapter.b_dec.any()
    assert not adapter(torch.randn(5, d)).pred.any()
    assert Adapter(AdapterConfig(d_model=d, n_features=f, dec_bias=False)).b_dec is None


@pytest.mark.parametrize("kernels", [True, False])
def test_dead_feature_counters_and_batchtopk_threshold(kernels):
    adapter = _adapter("batchtopk", k=3, kernels=kernels)
    adapter.gate = DensityGate(crossover=1.0)  # the sparse path even at this small width
    x, delta = _data()
    out = adapter.loss(x, delta).out
    assert out.path == ("torch" if kernels else "reference")
    adapter.tokens_since_fired.fill_(7)
    adapter.after_step(out)
    with torch.no_grad():
        pre = x @ adapter.W_enc + adapter.b_enc
    kept = torch.relu(pre).flatten().topk(3 * N).values
    smallest = kept[kept > 0].min()
    fired = (pre >= smallest).any(0)
    assert torch.equal(adapter.tokens_since_fired, torch.where(fired, 0, 7 + N))
    assert adapter.threshold.item() == smallest.item()
    adapter.eval()
    expected = torch.where(pre > adapter.threshold, pre, torch.zeros_like(pre))
    torch.testing.assert_close(adapter.encode(x), expected)


def test_metrics_match_numpy_and_accumulate_over_batches():
    g = np.random.default_rng(0)
    target = g.normal(size=(50, 7)) + 3.0  # an offset, so centred and uncentred differ
    pred = target + g.normal(scale=0.5, size=target.shape)
    acts = g.normal(size=(50, 30)) * (g.random((50, 30)) < 0.1)
    err = ((pred - target) ** 2).sum()
    want_fve = 1 - err / ((target - target.mean(0)) ** 2).sum()
    want_nmse = err / (target**2).sum()
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    assert fve(t(pred), t(target)) == pytest.approx(want_fve, rel=1e-12)
    assert nmse(t(pred), t(target)) == pytest.approx(want_nmse, rel=1e-12)
    assert l0(t(acts)) == pytest.approx((acts != 0).sum(1).mean())
    sums = MetricSums(7)
    for a, b in ((0, 13), (13, 31), (31, 50)):
        sums.add(t(pred[a:b]), t(target[a:b]), t(acts[a:b]))
    assert sums.fve == pytest.approx(want_fve, rel=1e-10)
    assert sums.nmse == pytest.approx(want_nmse, rel=1e-10)
    assert sums.l0 == pytest.approx((acts != 0).sum(1).mean())


def test_every_stage_accepts_the_kernels_activations():
    """The torch-free configs spell the activations out for ``--help``; the kernels own the list."""
    from typing import get_args, get_type_hints

    from tca.adapted.config import RefineConfig
    from tca.kernels import ACTIVATIONS
    from tca.train.config import TrainConfig

    assert get_args(get_type_hints(TrainConfig)["activation"]) == ACTIVATIONS
    assert set(get_args(get_type_hints(RefineConfig)["activation"])) <= set(ACTIVATIONS)
    for activation in ACTIVATIONS:
        assert AdapterConfig(d_model=D, n_features=F, activation=activation).activation == activation


def _fired_in_training(adapter: Adapter, x: torch.Tensor) -> torch.Tensor:
    """[N, F] bool: which features the training objective lets fire, written out plainly."""
    pre = (x @ adapter.W_enc + adapter.b_enc).detach()
    act, k = adapter.cfg.activation, adapter.cfg.k
    if act == "relu":
        return pre > 0
    if act == "topk":
        top = torch.zeros_like(pre, dtype=torch.bool).scatter(1, pre.topk(k, dim=1).indices, True)
        return top & (pre > 0)
    if act == "batchtopk":
        top = torch.zeros(pre.numel(), dtype=torch.bool).scatter(0, pre.flatten().topk(k * len(x)).indices, True)
        return top.view_as(pre) & (pre > 0)
    return pre > adapter.log_threshold.exp().detach()


@pytest.mark.parametrize("activation,kw", [("relu", {}), ("topk", {"k": 5}), ("batchtopk", {"k": 5}),
                                           ("jumprelu", {"jumprelu_init_threshold": 0.1})])
def test_a_feature_without_a_decoder_row_is_not_active(activation, kw):
    adapter = _adapter(activation, l1=0.3, **kw)
    undecoded = torch.arange(F) % 3 == 0
    with torch.no_grad():
        adapter.W_dec[undecoded] = 0
        if activation == "batchtopk":
            adapter.threshold.fill_(0.1)
    x, delta = _data()

    # inference: the activation written out, less the features that have no decoder row
    pre = (x @ adapter.W_enc + adapter.b_enc).detach()
    if activation == "relu":
        sigma = torch.relu(pre)
    elif activation == "topk":
        top = pre.topk(5, dim=1)
        sigma = torch.zeros_like(pre).scatter(1, top.indices, torch.relu(top.values))
    else:  # BatchTopK at inference and JumpReLU: a threshold of 0.1
        sigma = pre * (pre > 0.1)
    want = sigma * ~undecoded
    assert (sigma[:, undecoded] != 0).any()  # the case is real: those features do fire
    adapter.eval()
    with torch.no_grad():
        torch.testing.assert_close(adapter.encode(x), want)
        out = adapter(x)
        torch.testing.assert_close(out.acts, want)
        torch.testing.assert_close(out.pred, want @ adapter.W_dec + adapter.b_dec)
    with torch.no_grad():  # a decoder row set afterwards makes the feature active again
        adapter.W_dec[0] = 1.0
        assert (adapter.encode(x)[:, 0] == sigma[:, 0]).all()
        adapter.W_dec[0] = 0.0

    # training: they fire (their activation is what grows their rows) but count for no L0
    adapter.train()
    for kernels in ([True, False] if activation != "jumprelu" else [False]):
        trained = _adapter(activation, l1=0.3, kernels=kernels, **kw)
        trained.load_state_dict(adapter.state_dict())
        trained.gate = DensityGate(crossover=1.0, density=0.0)  # the sparse path even at this small width
        loss = trained.loss(x, delta)
        fired = _fired_in_training(trained, x)
        assert loss.out.l0 == pytest.approx((fired & ~undecoded).sum().item() / N)
        loss.total.backward()
        grows = fired[:, undecoded].any(0)
        assert grows.any() and (trained.W_dec.grad[undecoded][grows].abs().sum(1) > 0).all()


def test_metrics_of_a_target_with_nothing_in_it_are_defined():
    zero, pred = torch.zeros(6, 4), torch.full((6, 4), 0.5)
    assert (fve(zero, zero), nmse(zero, zero)) == (1.0, 0.0)  # nothing to explain, nothing missed
    assert (fve(pred, zero), nmse(pred, zero)) == (-math.inf, math.inf)
    constant = torch.ones(6, 4)  # no variance to explain, but a norm to compare with
    assert fve(constant, constant) == 1.0 and fve(pred, constant) == -math.inf
    assert nmse(pred, constant) == pytest.approx(0.25)
