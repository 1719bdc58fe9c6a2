"""End-to-end refinement (tca.adapted.refine, tca.adapted.lockstep) on the tiny pair.

Every loss term the lockstep runner produces is checked against a direct computation with the
plain model switched between modes layer by layer; training is checked to touch only adapters
and to resume exactly.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from tca import TcaError
from tca.adapted.batches import token_batches
from tca.adapted.lockstep import Lockstep
from tca.adapted.refine import RefineConfig, Refiner, refine
from tca.adapted.splice import adapted_model, target_tokenizer
from tca.cli import main
from tca.train.adapter import Adapter, AdapterConfig
from tca.train.checkpoint import AdapterSet, load_adapters, save_adapters

N_LAYERS = 4


def _adapters(d: int = 64, features: int = 32, layers=range(N_LAYERS)) -> dict[int, Adapter]:
    """ReLU adapters with random (nonzero) decoders and loss scales, as if trained offline."""
    gen = torch.Generator().manual_seed(1)
    out = {}
    for i in layers:
        a = Adapter(AdapterConfig(d_model=d, n_features=features), gen)
        with torch.no_grad():
            a.W_dec.normal_(0, 0.05, generator=gen)
            a.b_enc.normal_(0, 0.1, generator=gen)
            a.loss_scale.fill_(0.5 + i)
        out[i] = a
    return out


@pytest.fixture(scope="module")
def offline(tiny_pair, tmp_path_factory):
    path = tmp_path_factory.mktemp("offline") / "adapters"
    save_adapters(path, AdapterSet(_adapters(), AdapterConfig(d_model=64, n_features=32)))
    return path


@pytest.fixture(scope="module")
def setup(tiny_pair, tiny_data):
    base, target = tiny_pair
    model = adapted_model(target, base, _adapters(), keep_target=True)
    batch = token_batches(tiny_data, target_tokenizer(str(target)), seq_len=48, max_tokens=400, batch=4)[0]
    assert batch.attention_mask.min() == 0  # padding is present, so masking is exercised
    return model, batch


def _modes(model, modes: list[str]):
    for layer, mode in zip(model.model.layers, modes, strict=True):
        layer.mlp.mode = mode


def _direct(model, batch, modes):
    """Logits and every decoder layer's output from the plain model with per-layer modes."""
    _modes(model, modes)
    outs = []
    hooks = [layer.register_forward_hook(lambda _m, _a, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for layer in model.model.layers]
    try:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    finally:
        for h in hooks:
            h.remove()
        _modes(model, ["adapted"] * N_LAYERS)
    return logits, outs


def _kl_sum(p_logits, q_logits, mask):
    """Σ over real positions of KL(softmax p ‖ softmax q), written out in float64."""
    p = torch.log_softmax(p_logits.double(), -1)
    q = torch.log_softmax(q_logits.double(), -1)
    return ((p.exp() * (p - q)).sum(-1) * mask).sum()


@torch.no_grad()
def test_every_term_matches_a_direct_computation(setup):
    model, batch = setup
    mask = batch.attention_mask.double()
    keep = batch.attention_mask.bool()
    L = N_LAYERS
    streams = Lockstep(model, kl_chunk=7).run(batch.input_ids, batch.attention_mask, [0, 1, 3, L])
    target, h_t = _direct(model, batch, ["target"] * L)
    adapted, h_a = _direct(model, batch, ["adapted"] * L)
    assert streams.tokens == int(mask.sum())
    assert torch.allclose(streams.kl_adapted.double(), _kl_sum(target, adapted, mask), rtol=1e-4)
    assert float(_kl_sum(target, adapted, mask)) > 0.1
    for k in (0, 1, 3, L):
        mix1 = _direct(model, batch, ["adapted"] * k + ["target"] * (L - k))[0]
        mix2 = _direct(model, batch, ["target"] * k + ["adapted"] * (L - k))[0]
        got1, got2 = streams.kl_mix[k]
        assert torch.allclose(got1.double(), _kl_sum(target, mix1, mask), rtol=1e-4, atol=1e-5)
        assert torch.allclose(got2.double(), _kl_sum(target, mix2, mask), rtol=1e-4, atol=1e-5)
    # the edge cases: k = 0 mixes nothing in before the target / adapted layers, k = L after
    assert abs(float(streams.kl_mix[0][0])) < 1e-4 and abs(float(streams.kl_mix[L][1])) < 1e-4
    assert torch.allclose(streams.kl_mix[0][1], streams.kl_adapted, rtol=1e-5)
    assert torch.allclose(streams.kl_mix[L][0], streams.kl_adapted, rtol=1e-5)
    nmse = torch.stack([((a - t)[keep].double().square().sum() / t[keep].double().square().sum())
                        for a, t in zip(h_a, h_t, strict=True)]).mean()
    assert torch.allclose(streams.nmse.double(), nmse, rtol=1e-4)
    # L1 and L0 from the activations the adapters compute on the target model's... adapted stream
    acts = {}
    for i, layer in enumerate(model.model.layers):
        layer.mlp.acts_hooks.append(lambda m, a, i=i: acts.__setitem__(i, a))
    try:
        _direct(model, batch, ["adapted"] * L)
    finally:
        for layer in model.model.layers:
            layer.mlp.acts_hooks.clear()
    for i, layer in enumerate(model.model.layers):
        a = layer.mlp.adapter
        l1 = ((acts[i].double() @ a.W_dec.double().norm(dim=1)) * mask).sum() / float(a.loss_scale)
        assert torch.allclose(streams.l1[i].double(), l1, rtol=1e-4)
        assert float(streams.active[i]) == float(((acts[i] > 0).sum(-1) * keep).sum())


def test_checkpointing_gives_the_same_gradients(setup):
    model, batch = setup
    grads = []
    for checkpointing in (True, False):
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            s = Lockstep(model, checkpointing=checkpointing, kl_chunk=16).run(batch.input_ids, batch.attention_mask, [2])
            (s.kl_adapted + sum(s.kl_mix[2]) + s.nmse + sum(s.l1.values())).backward()
        grads.append(torch.cat([p.grad.flatten() for layer in model.model.layers for p in layer.mlp.adapter.parameters()]))
    model.zero_grad(set_to_none=True)
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def _cfg(tiny_pair, tiny_data, out, **kw) -> RefineConfig:
    base, target = tiny_pair
    values = dict(base=str(base), target=str(target), data=str(tiny_data), out=str(out), tokens=600, seq_len=48,
                  batch=4, eval_tokens=150, device="cpu", lr=1e-2, cutoffs=2, log_every=1)
    return RefineConfig(**(values | kw))


def test_only_adapter_parameters_change_and_the_total_is_the_documented_sum(tiny_pair, tiny_data, offline, tmp_path):
    refiner = Refiner(_cfg(tiny_pair, tiny_data, tmp_path / "r", adapters=str(offline)))
    before = {k: v.clone() for k, v in refiner.model.state_dict().items()}
    records = [refiner.train_step() for _ in range(3)]
    after = refiner.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".mlp.adapter." in k for k in changed)
    assert any(k.endswith("W_dec") for k in changed) and any(k.endswith("W_enc") for k in changed)
    cfg = refiner.cfg
    for r in records:
        expected = cfg.lambda_kl * (r["kl"] + r["kl_mix"]) + cfg.lambda_nmse * r["nmse"] + cfg.l1 * r["l1"]
        assert r["loss"] == pytest.approx(expected, rel=1e-5)
        assert len(r["cutoffs"]) == 2 and all(1 <= k < N_LAYERS for k in r["cutoffs"])


class _Stop(Exception):
    pass


def test_resume_ends_with_the_uninterrupted_weights(tiny_pair, tiny_data, offline, tmp_path):
    whole = refine(_cfg(tiny_pair, tiny_data, tmp_path / "whole", adapters=str(offline), checkpoint_every=2))

    def stop(step):
        if step == 2:
            raise _Stop

    with pytest.raises(_Stop):
        refine(_cfg(tiny_pair, tiny_data, tmp_path / "cut", adapters=str(offline), checkpoint_every=2), on_step=stop)
    resumed = refine(RefineConfig(base="", target="", data="", out=str(tmp_path / "cut"), device="cpu", resume=True))
    a = load_file(str(tmp_path / "whole" / "adapters.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapters.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = load_file(str(offline / "adapters.safetensors"))
    assert not torch.equal(a["layers.0.W_dec"], start["layers.0.W_dec"])
    assert resumed["steps"] == whole["steps"] and resumed["kl_adapted"] == whole["kl_adapted"]
    lines = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == list(range(1, whole["steps"] + 1))
    # the output is a normal adapter set that records where it came from
    aset = load_adapters(tmp_path / "whole")
    assert aset.layers == list(range(N_LAYERS)) and aset.extra["refined_from"] == str(offline)
    assert aset.extra["refine"]["lambda_kl"] == 2.0


def test_from_zero_starts_as_the_hybrid_and_sets_loss_scales(tiny_pair, tiny_data, tmp_path):
    refiner = Refiner(_cfg(tiny_pair, tiny_data, tmp_path / "z", from_zero=True, layers="1,2", features=16))
    assert sorted(refiner.adapters) == [1, 2]
    first = refiner.batch_at(0)
    refiner._scale_from_target(first)
    # the RMS norm of MLP_target(x) - MLP_base(x) at the target's MLP inputs, captured independently
    keep = first.attention_mask.bool()
    xs = {}
    layers = refiner.model.model.layers
    for i in (1, 2):
        layers[i].mlp.mode = "target"
        layers[i].mlp.register_forward_pre_hook(lambda _m, a, i=i: xs.__setitem__(i, a[0][keep]))
    with torch.no_grad():
        _modes(refiner.model, ["target"] * N_LAYERS)
        refiner.model(input_ids=first.input_ids, attention_mask=first.attention_mask)
        _modes(refiner.model, ["adapted"] * N_LAYERS)
        for i in (1, 2):
            layers[i].mlp._forward_pre_hooks.clear()
            delta = layers[i].mlp.target_mlp(xs[i]) - layers[i].mlp.mlp(xs[i])
            assert float(refiner.adapters[i].loss_scale) == pytest.approx(float(delta.square().sum(-1).mean().sqrt()), rel=1e-5)
    summary = refiner.evaluate()
    assert summary["kl_adapted"] == pytest.approx(summary["kl_hybrid"], rel=1e-6)  # zero decoder: the hybrid


def test_cli_refine_and_bad_input(tiny_pair, tiny_data, offline, tmp_path):
    base, target = tiny_pair
    common = ["--base", str(base), "--target", str(target), "--data", str(tiny_data), "--seq-len", "48",
              "--batch", "4", "--eval-tokens", "150", "--device", "cpu"]
    run = CliRunner().invoke(main, ["refine", "--adapters", str(offline), "--out", str(tmp_path / "ok"), "--tokens", "300",
                                    "--json", *common])
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout)["tokens_seen"] >= 250
    assert load_adapters(tmp_path / "ok").layers == list(range(N_LAYERS))

    narrow = tmp_path / "narrow"
    save_adapters(narrow, AdapterSet(_adapters(d=32, layers=[0]), AdapterConfig(d_model=32, n_features=32)))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = [
        (["--adapters", str(tmp_path / "nope")], "does not exist"),
        (["--adapters", str(narrow)], "another model"),
        (["--from-zero", "--layers", "0,9"], "out of range"),
        (["--adapters", str(offline), "--cutoffs", "9"], "cut-offs"),
        (["--adapters", str(offline), "--out", str(tmp_path / "ok")], "--resume"),
    ]
    for flags, words in cases:
        args = ["refine", *common, *flags] + ([] if "--out" in flags else ["--out", str(tmp_path / "x")])
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2 and words in res.output, (flags, res.output)
    with pytest.raises(TcaError, match="document"):
        Refiner(_cfg(tiny_pair, empty, tmp_path / "e", adapters=str(offline)))
