"""Exports as other people's code opens them: transformers' ``from_pretrained`` of a class that
declares the reference's transcoder parameters, circuit-tracer's transcoder-set directory; the
import back; and how exports refuse to overwrite."""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import shutil

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import DEMO_PAIR
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

from tca import TcaError
from tca.adapted.export import FORMATS, ExportConfig, ImportConfig, export, import_hf_reference
from tca.adapted.splice import adapted_model, set_adapters
from tca.cli import main
from tca.train.adapter import Adapter, AdapterConfig
from tca.train.checkpoint import AdapterSet, load_adapters, save_adapters

D, F = 64, 96
LAYERS = (0, 2)


class TranscoderMLP(Qwen2MLP):
    """The reference implementation's MLP: the (base) MLP plus a ReLU transcoder beside it."""

    def __init__(self, config):
        super().__init__(config)
        self.transcoder_enc = nn.Linear(config.hidden_size, config.transcoder_n_features)
        self.transcoder_dec = nn.Linear(config.transcoder_n_features, config.hidden_size,
                                        bias=config.transcoder_dec_bias)

    def forward(self, x):
        return super().forward(x) + self.transcoder_dec(torch.relu(self.transcoder_enc(x)))


class Qwen2ForCausalLMWithTranscoder(Qwen2ForCausalLM):
    """Declares the reference's parameter names and shapes; knows nothing of tca's files."""

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            layer.mlp = TranscoderMLP(config)
        self.post_init()


def _adapter_set(path, dec_bias=True, activation="relu", models=None, layers=LAYERS) -> AdapterSet:
    cfg = AdapterConfig(d_model=D, n_features=F, activation=activation, dec_bias=dec_bias, k=5)
    adapters = {}
    for layer in layers:
        g = torch.Generator().manual_seed(layer)
        adapter = Adapter(cfg, g)
        with torch.no_grad():
            adapter.W_enc.normal_(0, 0.3, generator=g)
            adapter.b_enc.normal_(0, 0.1, generator=g)
            adapter.W_dec.normal_(0, 0.1, generator=g)
            if dec_bias:
                adapter.b_dec.normal_(0, 0.1, generator=g)
            if activation == "jumprelu":
                adapter.log_threshold.fill_(-1.5)
            if activation == "batchtopk":
                adapter.threshold.fill_(0.2)
        adapters[layer] = adapter.eval()
    aset = AdapterSet(adapters, cfg, "synthetic-store", models)
    save_adapters(path, aset)
    return aset


def _provenance(base, target) -> dict:
    """What the harvester records: ids and the sha256 of each config.json with sorted keys."""
    def entry(path):
        config = json.loads((path / "config.json").read_text())
        return {"id": str(path), "revision": None,
                "config_hash": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()}
    return {"base": entry(base), "target": entry(target)}


def _sharded_copy(model_dir, out):
    """``model_dir`` with its tensors split over two files and an index, as large checkpoints ship."""
    out.mkdir()
    tensors = load_file(str(model_dir / "model.safetensors"))
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, str(out / file), metadata={"format": "pt"})
    weight_map = {n: file for file, part in halves.items() for n in part}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for path in model_dir.iterdir():
        if path.name != "model.safetensors":
            shutil.copy2(path, out / path.name)
    return out


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


IDS = torch.tensor([[1, 5, 9, 22, 40, 7, 3, 11, 60, 2, 17, 33]])


def _pair(kind, tiny_pair, tmp_path):
    if kind == "demo":
        if not (DEMO_PAIR / "base").is_dir():
            pytest.skip(f"the demo pair is missing ({DEMO_PAIR})")
        return DEMO_PAIR / "base", DEMO_PAIR / "reasoning"
    base, target = tiny_pair
    return base, (_sharded_copy(target, tmp_path / "sharded-target") if kind == "sharded" else target)


@pytest.mark.parametrize("kind,dec_bias", [("single-file", True), ("single-file", False), ("sharded", True),
                                           ("demo", True)])
def test_from_pretrained_of_the_reference_class_loads_every_tensor(tiny_pair, tmp_path, kind, dec_bias):
    base, target = _pair(kind, tiny_pair, tmp_path)
    _adapter_set(tmp_path / "adapters", dec_bias=dec_bias)
    out = export(ExportConfig(adapters=str(tmp_path / "adapters"), out=str(tmp_path / "hf"),
                              base=str(base), target=str(target)))
    # transformers opens model.safetensors in preference to an index: there must be none
    assert not (out / "model.safetensors").exists() and (out / "model.safetensors.index.json").exists()

    reference, info = Qwen2ForCausalLMWithTranscoder.from_pretrained(out, dtype=torch.float32,
                                                                     output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    plain = Qwen2ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = adapted_model(target, base, load_adapters(tmp_path / "adapters"))
    with torch.no_grad():
        adapted, ref_logits = ours(IDS).logits, reference.eval()(IDS).logits
        set_adapters(ours, False)
        hybrid, plain_logits = ours(IDS).logits, plain(IDS).logits
        target_logits = Qwen2ForCausalLM.from_pretrained(target, dtype=torch.float32).eval()(IDS).logits
    assert (adapted - ref_logits).abs().max() <= 1e-6
    assert (hybrid - plain_logits).abs().max() <= 1e-6
    assert (adapted - hybrid).abs().max() > 1e-3  # the adapters matter
    assert (hybrid - target_logits).abs().max() > 1e-3  # the base MLPs are in


def test_hf_reference_tensors_and_import_round_trip(tiny_pair, tmp_path):
    base, target = tiny_pair
    aset = _adapter_set(tmp_path / "adapters")
    res = _run("export", tmp_path / "adapters", "--format", "hf-reference", "--base", base, "--target", target,
               "--out", tmp_path / "hf")
    assert res.exit_code == 0, res.output
    out = tmp_path / "hf"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLMWithTranscoder"]
    assert config["transcoder_n_features"] == F and config["transcoder_dec_bias"] is True
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert sorted(p.name for p in out.glob("*.safetensors")) == files
    exported = {n: t for f in files for n, t in load_file(str(out / f)).items()}
    assert set(exported) == set(index["weight_map"])
    base_t, target_t = load_file(str(base / "model.safetensors")), load_file(str(target / "model.safetensors"))
    for name, t in target_t.items():
        assert torch.equal(exported[name], base_t[name] if ".mlp." in name else t), name
    for i in range(4):
        p = f"model.layers.{i}.mlp."
        assert exported[p + "transcoder_enc.weight"].shape == (F, D)
        assert exported[p + "transcoder_dec.weight"].shape == (D, F)
        if i not in LAYERS:
            assert not exported[p + "transcoder_dec.weight"].any()
    assert torch.equal(exported["model.layers.2.mlp.transcoder_enc.weight"], aset.adapters[2].W_enc.T)
    assert (out / "tokenizer.json").read_bytes() == (target / "tokenizer.json").read_bytes()

    res = _run("import", out, "--out", tmp_path / "back")
    assert res.exit_code == 0, res.output
    back = load_adapters(tmp_path / "back")
    assert back.layers == list(LAYERS)
    for layer in LAYERS:
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert torch.equal(getattr(aset.adapters[layer], name), getattr(back.adapters[layer], name)), name


def test_import_keeps_a_bfloat16_checkpoints_dtype(tiny_pair, tmp_path):
    base, target = tiny_pair
    _adapter_set(tmp_path / "adapters")
    out = export(ExportConfig(adapters=str(tmp_path / "adapters"), out=str(tmp_path / "hf"),
                              base=str(base), target=str(target)))
    # the reference trains and saves in bfloat16
    bf16 = {n: t.to(torch.bfloat16) for n, t in load_file(str(out / "transcoder.safetensors")).items()}
    save_file(bf16, str(out / "transcoder.safetensors"), metadata={"format": "pt"})
    import_hf_reference(**dataclasses.asdict(ImportConfig(checkpoint=str(out), out=str(tmp_path / "back"))))
    stored = load_file(str(tmp_path / "back" / "adapters.safetensors"))
    for layer in LAYERS:
        p = f"model.layers.{layer}.mlp."
        expected = {"W_enc": bf16[p + "transcoder_enc.weight"].T, "b_enc": bf16[p + "transcoder_enc.bias"],
                    "W_dec": bf16[p + "transcoder_dec.weight"].T, "b_dec": bf16[p + "transcoder_dec.bias"]}
        for name, t in expected.items():
            got = stored[f"layers.{layer}.{name}"]
            assert got.dtype == torch.bfloat16 and torch.equal(got, t), name
    assert not any(n.startswith("layers.1.") for n in stored)  # zero decoder: no adapter


def test_export_takes_the_models_from_the_adapters_provenance(tiny_pair, tmp_path):
    base, target = tiny_pair
    _adapter_set(tmp_path / "recorded", models=_provenance(base, target))
    shutil.copytree(tmp_path / "recorded", tmp_path / "same")
    from_flags = export(ExportConfig(adapters=str(tmp_path / "same"), out=str(tmp_path / "flags"),
                                     base=str(base), target=str(target)))
    from_store = export(ExportConfig(adapters=str(tmp_path / "recorded"), out=str(tmp_path / "store")))
    names = sorted(p.name for p in from_flags.iterdir())
    assert names == sorted(p.name for p in from_store.iterdir())
    for name in names:
        assert (from_flags / name).read_bytes() == (from_store / name).read_bytes(), name
    tc = export(ExportConfig(adapters=str(tmp_path / "recorded"), out=str(tmp_path / "tc"), format="transcoder"))
    assert yaml.safe_load((tc / "config.yaml").read_text())["model_name"] == str(target)

    other = _provenance(base, target)
    other["target"]["config_hash"] = "0" * 64  # the recorded path now holds another model
    _adapter_set(tmp_path / "moved", models=other)
    with pytest.raises(TcaError, match="not the target model the adapters were trained on"):
        export(ExportConfig(adapters=str(tmp_path / "moved"), out=str(tmp_path / "x")))
    _adapter_set(tmp_path / "unknown")
    for fmt in FORMATS:
        with pytest.raises(TcaError, match="needs --target: the adapters record no target model"):
            export(ExportConfig(adapters=str(tmp_path / "unknown"), out=str(tmp_path / "x"), format=fmt))
    with pytest.raises(TcaError, match="needs --base: the adapters record no base model"):
        export(ExportConfig(adapters=str(tmp_path / "unknown"), out=str(tmp_path / "x"), target=str(target)))
    assert not (tmp_path / "x").exists()


def _circuit_tracer_directory(path):
    """What circuit-tracer's directory loader reads: config.yaml and layer_<i>.safetensors for
    every layer from 0 up, as ``SingleLayerTranscoder`` encode/decode functions."""
    config = yaml.safe_load((path / "config.yaml").read_text())
    files = {int(os.path.basename(f)[len("layer_"):-len(".safetensors")]): f
             for f in glob.glob(str(path / "layer_*.safetensors"))}
    assert set(files) == set(range(max(files) + 1))

    def transcoder(layer):
        t = load_file(files[layer])

        def act(pre):
            if config["activation"] == "topk":
                gate = torch.zeros_like(pre).scatter_(-1, pre.topk(config["k"], dim=-1).indices, 1)
                return pre * gate
            if "activation_function.threshold" in t:
                return pre * (pre > t["activation_function.threshold"])
            return torch.relu(pre)

        def encode(x):
            return act(torch.nn.functional.linear(x, t["W_enc"], t["b_enc"]))

        return encode, lambda acts: acts @ t["W_dec"] + t["b_dec"]

    return config, {layer: transcoder(layer) for layer in files}


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "batchtopk", "topk"])
def test_transcoder_export_is_a_circuit_tracer_transcoder_set(tiny_pair, tmp_path, activation):
    target = tiny_pair[1]
    aset = _adapter_set(tmp_path / "adapters", dec_bias=activation != "relu", activation=activation)
    out = export(ExportConfig(adapters=str(tmp_path / "adapters"), out=str(tmp_path / "tc"), format="transcoder",
                              target=str(target)))
    config, transcoders = _circuit_tracer_directory(out)
    assert config["model_kind"] == "transcoder_set" and config["model_name"] == str(target)
    assert config["feature_input_hook"] == "mlp.hook_in" and config["feature_output_hook"] == "mlp.hook_out"
    assert config["tca"]["adapter_layers"] == list(LAYERS)
    assert sorted(transcoders) == [0, 1, 2, 3]  # one per layer of the target, as circuit-tracer needs
    # at least k positive pre-activations per row, where circuit-tracer's TopK (no ReLU) and tca's agree
    x = torch.randn(7, D) + (2.0 if activation == "topk" else 0.0)
    for layer, (encode, decode) in transcoders.items():
        if layer in LAYERS:
            out_ = aset.adapters[layer](x)
            torch.testing.assert_close(encode(x), out_.acts)
            torch.testing.assert_close(decode(encode(x)), out_.pred)
        else:
            assert not encode(x).any() and not decode(encode(x)).any()


def test_circuit_tracer_opens_the_transcoder_export(tiny_pair, tmp_path):
    hf_utils = pytest.importorskip("circuit_tracer.utils.hf_utils")
    target = tiny_pair[1]
    aset = _adapter_set(tmp_path / "adapters")
    out = export(ExportConfig(adapters=str(tmp_path / "adapters"), out=str(tmp_path / "tc"), format="transcoder",
                              target=str(target)))
    # what ReplacementModel.from_pretrained(model, transcoder_set=<directory>) loads
    transcoders, config = hf_utils.load_transcoder_from_hub(str(out.resolve()), device=torch.device("cpu"),
                                                            dtype=torch.float32, lazy_decoder=False)
    assert config["model_name"] == str(target) and len(transcoders) == 4
    x = torch.randn(7, D)
    for layer in LAYERS:
        torch.testing.assert_close(transcoders[layer](x), aset.adapters[layer](x).pred)


def _tree(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_exports_refuse_existing_outputs_and_inputs_and_write_atomically(tiny_pair, tmp_path):
    base, target = tiny_pair
    _adapter_set(tmp_path / "adapters", models=_provenance(base, target))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    before = {p: _tree(p) for p in (tmp_path / "adapters", tmp_path / "taken", base, target)}

    res = _run("export", tmp_path / "adapters", "--out", tmp_path / "taken")
    assert res.exit_code == 2 and "already exists; pass --overwrite" in res.output
    with pytest.raises(TcaError, match="is also an input"):
        export(ExportConfig(adapters=str(tmp_path / "adapters"), out=str(tmp_path / "adapters"), overwrite=True))
    with pytest.raises(TcaError, match="is also an input"):  # the target known only from provenance
        export(ExportConfig(adapters=str(tmp_path / "adapters"), out=str(target), overwrite=True))
    with pytest.raises(TcaError, match="is also an input"):
        import_hf_reference(target, target, overwrite=True)
    with pytest.raises(TcaError, match="already exists"):
        import_hf_reference(target, tmp_path / "taken")
    # fails while writing (the base has other layer names): nothing is left behind
    (tmp_path / "bad-base").mkdir()
    shutil.copy2(base / "config.json", tmp_path / "bad-base" / "config.json")
    renamed = {k.replace("mlp.", "mlp_"): v for k, v in load_file(str(base / "model.safetensors")).items()}
    save_file(renamed, str(tmp_path / "bad-base" / "model.safetensors"))
    with pytest.raises(TcaError, match="has no tensor"):
        export(ExportConfig(adapters=str(tmp_path / "adapters"), out=str(tmp_path / "half"),
                            base=str(tmp_path / "bad-base")))
    assert not list(tmp_path.glob("*half*"))
    assert {p: _tree(p) for p in before} == before

    for fmt in ("hf-reference", "transcoder"):
        out = export(ExportConfig(adapters=str(tmp_path / "adapters"), out=str(tmp_path / "taken"), format=fmt,
                                  overwrite=True))
        written = "config.yaml" if fmt == "transcoder" else "model.safetensors.index.json"
        assert not (out / "notes.txt").exists() and (out / written).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_export_and_import_refuse_bad_input(tiny_pair, tmp_path):
    base, target = tiny_pair
    _adapter_set(tmp_path / "topk", activation="topk")
    res = _run("export", tmp_path / "topk", "--base", base, "--target", target, "--out", tmp_path / "x")
    assert res.exit_code == 2 and "--format transcoder" in res.output
    _adapter_set(tmp_path / "relu")
    res = _run("export", tmp_path / "relu", "--out", tmp_path / "y")
    assert res.exit_code == 2 and "needs --target" in res.output
    res = _run("export", tmp_path / "relu", "--format", "transcoder", "--target", base / "config.json",
               "--out", tmp_path / "y")
    assert res.exit_code == 2 and "is not a directory" in res.output
    wide = AdapterConfig(d_model=2 * D, n_features=F)
    save_adapters(tmp_path / "wide", AdapterSet({0: Adapter(wide)}, wide))
    res = _run("export", tmp_path / "wide", "--format", "transcoder", "--target", target, "--out", tmp_path / "y")
    assert res.exit_code == 2 and "hidden size 64" in res.output
    res = _run("import", target, "--out", tmp_path / "z")
    assert res.exit_code == 2 and "carries no transcoder adapters" in res.output
    assert not any((tmp_path / name).exists() for name in "xyz")
