"""Export to the reference HF layout and the transcoder layout, import back, and the spliced model."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import Qwen2ForCausalLM

from tca.adapted.splice import adapted_model, read_hf_tensors, set_adapters
from tca.cli import main
from tca.train.adapter import Adapter, AdapterConfig
from tca.train.checkpoint import AdapterSet, load_adapters, save_adapters

D, F = 64, 96
LAYERS = (0, 2)


def _adapter_set(path, dec_bias=True, activation="relu") -> AdapterSet:
    cfg = AdapterConfig(d_model=D, n_features=F, activation=activation, dec_bias=dec_bias)
    adapters = {}
    for layer in LAYERS:
        g = torch.Generator().manual_seed(layer)
        adapter = Adapter(cfg, g)
        with torch.no_grad():
            adapter.W_enc.normal_(0, 0.3, generator=g)
            adapter.b_enc.normal_(0, 0.1, generator=g)
            adapter.W_dec.normal_(0, 0.1, generator=g)
            if dec_bias:
                adapter.b_dec.normal_(0, 0.1, generator=g)
        adapters[layer] = adapter.eval()
    aset = AdapterSet(adapters, cfg, "synthetic-store", {"base": {"id": "b"}, "target": {"id": "t"}})
    save_adapters(path, aset)
    return aset


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _ids():
    return torch.tensor([[1, 5, 9, 22, 40, 7, 3, 11, 60, 2]])


def _hooked_reference(export_dir):
    """Plain Qwen2ForCausalLM from the export, with the reference's transcoder added by hooks."""
    model = Qwen2ForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    config = json.loads((export_dir / "config.json").read_text())
    tensors = read_hf_tensors(export_dir, lambda n: "transcoder_" in n)
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}.mlp."
        enc_w, enc_b = tensors[p + "transcoder_enc.weight"], tensors[p + "transcoder_enc.bias"]
        dec_w = tensors[p + "transcoder_dec.weight"]
        dec_b = tensors[p + "transcoder_dec.bias"] if config["transcoder_dec_bias"] else None

        def hook(module, args, output, enc_w=enc_w, enc_b=enc_b, dec_w=dec_w, dec_b=dec_b):
            feats = torch.relu(torch.nn.functional.linear(args[0], enc_w, enc_b))
            return output + torch.nn.functional.linear(feats, dec_w, dec_b)

        layer.mlp.register_forward_hook(hook)
    return model


@pytest.mark.parametrize("dec_bias", [True, False])
def test_hf_reference_export_reproduces_the_adapted_model(tiny_pair, tmp_path, dec_bias):
    base, target = tiny_pair
    aset = _adapter_set(tmp_path / "adapters", dec_bias=dec_bias)
    res = _run("export", tmp_path / "adapters", "--format", "hf-reference", "--base", base, "--target", target,
               "--out", tmp_path / "hf")
    assert res.exit_code == 0, res.output
    export_dir = tmp_path / "hf"
    config = json.loads((export_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLMWithTranscoder"]
    assert config["transcoder_n_features"] == F and config["transcoder_dec_bias"] is dec_bias

    exported = read_hf_tensors(export_dir, lambda n: True)
    base_t, target_t = read_hf_tensors(base, lambda n: True), read_hf_tensors(target, lambda n: True)
    for name, t in target_t.items():
        assert torch.equal(exported[name], base_t[name] if ".mlp." in name else t), name
    for i in range(4):
        p = f"model.layers.{i}.mlp."
        assert exported[p + "transcoder_enc.weight"].shape == (F, D)
        assert exported[p + "transcoder_dec.weight"].shape == (D, F)
        assert (p + "transcoder_dec.bias" in exported) is dec_bias
        if i not in LAYERS:
            assert not exported[p + "transcoder_dec.weight"].any()
    assert torch.equal(exported["model.layers.2.mlp.transcoder_enc.weight"], aset.adapters[2].W_enc.T)

    ids = _ids()
    ours = adapted_model(target, base, load_adapters(tmp_path / "adapters"))
    reference = _hooked_reference(export_dir)
    plain = Qwen2ForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        adapted, ref_logits = ours(ids).logits, reference(ids).logits
        set_adapters(ours, False)
        hybrid, plain_logits = ours(ids).logits, plain(ids).logits
        target_logits = Qwen2ForCausalLM.from_pretrained(target).eval()(ids).logits
    torch.testing.assert_close(adapted, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hybrid, plain_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(adapted, hybrid, atol=1e-3)  # the adapters matter
    assert not torch.allclose(hybrid, target_logits, atol=1e-3)  # the base MLPs are in

    res = _run("import", export_dir, "--out", tmp_path / "back")
    assert res.exit_code == 0, res.output
    back = load_adapters(tmp_path / "back")
    assert back.layers == list(LAYERS) and back.config.dec_bias is dec_bias
    for layer in LAYERS:
        a, b = aset.adapters[layer], back.adapters[layer]
        for name in ("W_enc", "b_enc", "W_dec"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert (b.b_dec is None) is not dec_bias
        if dec_bias:
            assert torch.equal(a.b_dec, b.b_dec)


def test_transcoder_export_writes_circuit_tracers_layout(tmp_path):
    aset = _adapter_set(tmp_path / "adapters", dec_bias=False)
    res = _run("export", tmp_path / "adapters", "--format", "transcoder", "--out", tmp_path / "tc")
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "tc" / "config.json").read_text())
    assert meta["files"] == {str(layer): f"layer_{layer}.safetensors" for layer in LAYERS}
    for layer in LAYERS:
        t = load_file(str(tmp_path / "tc" / f"layer_{layer}.safetensors"))
        a = aset.adapters[layer]
        assert t["W_enc"].shape == t["W_dec"].shape == (F, D)
        assert torch.equal(t["W_enc"], a.W_enc.T) and torch.equal(t["W_dec"], a.W_dec)
        assert torch.equal(t["b_enc"], a.b_enc) and not t["b_dec"].any()
        x = torch.randn(5, D)
        # SingleLayerTranscoder: encode = act(F.linear(x, W_enc, b_enc)), decode = acts @ W_dec + b_dec
        acts = torch.relu(torch.nn.functional.linear(x, t["W_enc"], t["b_enc"]))
        torch.testing.assert_close(acts @ t["W_dec"] + t["b_dec"], a(x).pred)


def test_export_and_import_refuse_bad_input(tiny_pair, tmp_path):
    base, target = tiny_pair
    _adapter_set(tmp_path / "topk", activation="topk")
    res = _run("export", tmp_path / "topk", "--base", base, "--target", target, "--out", tmp_path / "x")
    assert res.exit_code == 2 and "--format transcoder" in res.output
    _adapter_set(tmp_path / "relu")
    res = _run("export", tmp_path / "relu", "--out", tmp_path / "y")
    assert res.exit_code == 2 and "needs --base and --target" in res.output
    res = _run("import", target, "--out", tmp_path / "z")
    assert res.exit_code == 2 and "carries no transcoder adapters" in res.output
    assert not (tmp_path / "z").exists()
