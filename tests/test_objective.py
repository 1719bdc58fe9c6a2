"""The sparsity objective that does not reward splitting, the copies figure, and target_l0's
controller, each against an independent computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tca.toy.synthetic import SyntheticSpec, make_synthetic_store
from tca.train.adapter import Adapter, AdapterConfig
from tca.train.metrics import decoder_copies
from tca.train.trainer import TrainConfig, steered_l1, train


def _split_adapter(n: int, penalty: str, a: float, eps: float) -> Adapter:
    """n features that together carry one direction u with total weighted activation ``a`` on
    x = e0: each fires a / n with a unit decoder row u (n = 1: the feature unsplit)."""
    d = 4
    adapter = Adapter(AdapterConfig(d_model=d, n_features=n, l1=1.0, penalty=penalty, penalty_eps=eps, dec_bias=False, kernels=False))
    u = torch.tensor([0.0, 0.6, 0.8, 0.0])
    with torch.no_grad():
        adapter.W_enc.zero_()
        adapter.W_enc[0, :] = a / n
        adapter.W_dec.copy_(u.expand(n, d))
    return adapter


@pytest.mark.parametrize("n", [2, 3, 8])
def test_log_penalty_charges_one_feature_less_than_its_copies_and_l1_does_not(n):
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    a, eps = 2.0, 0.1
    one = {p: _split_adapter(1, p, a, eps).loss(x, torch.zeros(1, 4)) for p in ("l1", "log")}
    many = {p: _split_adapter(n, p, a, eps).loss(x, torch.zeros(1, 4)) for p in ("l1", "log")}
    # both predict the same delta: the split changes nothing but the penalty
    assert torch.allclose(one["log"].out.pred, many["log"].out.pred)
    # the penalty each describes, written out: eps log(1 + a/eps) once vs n times for a/n
    assert one["log"].sparsity.item() == pytest.approx(eps * math.log1p(a / eps), rel=1e-6)
    assert many["log"].sparsity.item() == pytest.approx(n * eps * math.log1p(a / n / eps), rel=1e-6)
    assert one["log"].sparsity.item() < many["log"].sparsity.item()
    # the property the L1 lacks: splitting costs nothing
    assert one["l1"].sparsity.item() == pytest.approx(many["l1"].sparsity.item(), rel=1e-6)


def test_log_penalty_is_the_same_on_the_sparse_kernels_and_the_dense_reference():
    torch.manual_seed(0)
    d, f, rows = 16, 64, 96
    cfg = AdapterConfig(d_model=d, n_features=f, penalty="log", penalty_eps=0.05, l1=0.7)
    kern, ref = Adapter(cfg), Adapter(AdapterConfig(**(vars(cfg) | {"kernels": False})))
    with torch.no_grad():
        kern.W_dec.normal_()
        kern.b_enc.fill_(-0.1)  # some entries below zero, so the kernels' entry lists are sparse
        kern.loss_scale.fill_(1.7)
    ref.load_state_dict(kern.state_dict())
    x, delta = torch.randn(rows, d), torch.randn(rows, d)
    fwd_k = kern._forward_kernels(x, None, "torch")
    fwd_r = ref._forward_reference(x, None)
    assert fwd_k.out.path == "torch"
    # independent: the dense formula in numpy
    with torch.no_grad():
        acts = np.maximum(x.double().numpy() @ kern.W_enc.double().numpy() + kern.b_enc.double().numpy(), 0)
        w = acts * np.linalg.norm(kern.W_dec.double().numpy(), axis=1) / 1.7
    expected = (0.05 * np.log1p(w / 0.05)).sum(1).mean()
    assert 0 < (acts > 0).mean() < 1
    assert fwd_k.penalty.item() == pytest.approx(expected, rel=1e-5)
    assert fwd_r.penalty.item() == pytest.approx(expected, rel=1e-5)
    kern.loss(x, delta).total.backward()
    ref.loss(x, delta).total.backward()
    for (name, pk), pr in zip(kern.named_parameters(), ref.parameters()):
        assert torch.allclose(pk.grad, pr.grad, rtol=1e-4, atol=1e-6), name


def test_decoder_copies_against_brute_force():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(5, 12))
    rows = np.concatenate([base, base[:2] * 3 + 0.05 * rng.normal(size=(2, 12)), rng.normal(size=(6, 12))])
    live = rng.random(len(rows)) < 0.8
    live[[0, 5]] = True  # one planted pair is certainly live
    copies, mean_max = decoder_copies(torch.tensor(rows, dtype=torch.float32), torch.tensor(live))
    idx = np.flatnonzero(live)
    best = []
    for i in idx:
        cos = [rows[i] @ rows[j] / np.linalg.norm(rows[i]) / np.linalg.norm(rows[j]) for j in idx if j != i]
        best.append(max(cos))
    assert copies == sum(b >= 0.9 for b in best) >= 2
    assert mean_max == pytest.approx(np.mean(best), rel=1e-6)
    assert decoder_copies(torch.tensor(rows), torch.zeros(len(rows), dtype=torch.bool)) == (0, 0.0)


def test_steered_l1_moves_toward_the_target_and_stays_put_on_it():
    assert steered_l1(0.5, 8.0, 4.0) == pytest.approx(0.5 * math.exp(0.005 * math.log(2)))
    assert steered_l1(0.5, 1.0, 4.0) == pytest.approx(0.5 * math.exp(-0.005))  # miss clipped to -1
    assert steered_l1(0.5, 4.0, 4.0) == 0.5


@pytest.mark.parametrize(("penalty", "start", "target"), [("l1", 0.1, 4.0), ("l1", 1.0, 1.5), ("log", 0.5, 1.5)])
def test_target_l0_lands_the_held_out_l0_on_the_target(tmp_path, penalty, start, target):
    """From the default l1 or one far too weak or too strong (true L0 2: 8 features firing on 25% of rows), each
    changed layer ends within 25% of the target, above or below the truth (the log penalty only
    below: it does not split features to fire more); the unchanged layer is not steered."""
    spec = SyntheticSpec(d_model=16, layers=(0, 1, 2), n_docs=48, doc_len=32, n_true=8, fire_prob=0.25,
                         block_rows=256, chunk_rows=64, unchanged=(1,))
    store = str(tmp_path / "store")
    make_synthetic_store(store, spec)
    summary = train(TrainConfig(store=store, out=str(tmp_path / "run"), features=32, batch=64, epochs=60,
                                lr=3e-3, l1=[start], target_l0=target, penalty=penalty, holdout_frac=0.2, shuffle_rows=256,
                                log_every=100, checkpoint_every=10**6, read_threads=2))
    layers = summary["members"][f"l1-{start:g}"]["layers"]
    for layer in ("0", "2"):
        assert layers[layer]["l0"] == pytest.approx(target, rel=0.25), (layer, layers[layer])
        assert layers[layer]["l1"] != start
    assert layers["1"]["unchanged"] and layers["1"]["l0"] == 0 and layers["1"]["l1"] == start
