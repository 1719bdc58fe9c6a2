"""Adapters to and from other layouts.

``hf-reference``: a complete Hugging Face checkpoint of the adapted model as the reference
implementation lays it out. The target's shards are copied with every MLP's weights replaced
by the base model's, and the adapters go to ``transcoder.safetensors`` as

    model.layers.<i>.mlp.transcoder_enc.weight  [F, d]  (nn.Linear: [out, in], = W_enc.T)
    model.layers.<i>.mlp.transcoder_enc.bias    [F]
    model.layers.<i>.mlp.transcoder_dec.weight  [d, F]  (= W_dec.T)
    model.layers.<i>.mlp.transcoder_dec.bias    [d]     (only with a decoder bias)

for every layer (zeros where there is no adapter, so those layers compute the base MLP), with
``architectures = ["Qwen2ForCausalLMWithTranscoder"]``, ``transcoder_n_features`` and
``transcoder_dec_bias`` in config.json. ``import_hf_reference`` reads it back.

``transcoder``: one ``layer_<L>.safetensors`` per layer in circuit-tracer's per-layer transcoder
layout (``SingleLayerTranscoder``): ``W_enc`` [F, d] (``acts = act(x @ W_enc.T + b_enc)``, i.e.
tca's ``W_enc`` transposed), ``W_dec`` [F, d] (``out = acts @ W_dec + b_dec``), ``b_enc`` [F],
``b_dec`` [d], plus ``activation_function.threshold`` [F] (JumpReLU, BatchTopK's inference
threshold) or ``k`` (TopK); and a ``config.json`` naming the activation, hooks and files.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tca import TcaError
from tca.adapted.splice import MLP_KEY, read_hf_tensors, shard_files
from tca.train.adapter import Adapter, AdapterConfig
from tca.train.checkpoint import AdapterSet, load_adapters, save_adapters

FORMATS = ("hf-reference", "transcoder")
ARCHITECTURE = "Qwen2ForCausalLMWithTranscoder"
ADAPTER_FILE = "transcoder.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MODEL_FILES = ("model.safetensors", INDEX_FILE)


@dataclass
class ExportConfig:
    """What ``tca export`` writes."""

    adapters: str
    """A tca adapter set directory."""
    out: str
    """Directory to write (must not exist or be empty)."""
    format: str = "hf-reference"
    """hf-reference | transcoder."""
    base: str | None = None
    """The base model directory (hf-reference: its MLP weights)."""
    target: str | None = None
    """The target model directory (hf-reference: its backbone, config and tokenizer)."""


def export(cfg: ExportConfig) -> Path:
    aset = load_adapters(cfg.adapters)
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        raise TcaError(f"{out} already exists and is not empty; choose a new --out.")
    if cfg.format == "transcoder":
        return export_transcoder(aset, out)
    if cfg.format != "hf-reference":
        raise TcaError(f"unknown export format {cfg.format!r}; use one of {', '.join(FORMATS)}.")
    if not cfg.base or not cfg.target:
        raise TcaError("--format hf-reference needs --base and --target model directories.")
    return export_hf_reference(aset, cfg.base, cfg.target, out)


def export_hf_reference(aset: AdapterSet, base_dir: str | Path, target_dir: str | Path, out: Path) -> Path:
    """Write the adapted model as the reference implementation's checkpoint."""
    if aset.config.activation != "relu":
        raise TcaError(
            f"the reference layout computes ReLU features but these adapters use {aset.config.activation}; "
            "export them with --format transcoder."
        )
    target_dir, base_dir = Path(target_dir), Path(base_dir)
    config = json.loads((target_dir / "config.json").read_text())
    n_layers, d = config["num_hidden_layers"], config["hidden_size"]
    if aset.config.d_model != d:
        raise TcaError(f"the adapters are {aset.config.d_model} wide but {target_dir} has hidden size {d}.")
    if aset.layers and aset.layers[-1] >= n_layers:
        raise TcaError(f"the adapters hold layer {aset.layers[-1]}, but {target_dir} has {n_layers} layers.")
    out.mkdir(parents=True, exist_ok=True)
    base_mlps = read_hf_tensors(base_dir, lambda name: ".mlp." in name)
    weight_map, total_backbone = {}, 0
    for shard in shard_files(target_dir):
        tensors = load_file(str(shard))
        for name in tensors:
            if ".mlp." in name:
                if name not in base_mlps:
                    raise TcaError(f"{base_dir} has no tensor {name}; is it the base of {target_dir}?")
                tensors[name] = base_mlps[name]
        save_file(tensors, str(out / shard.name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, shard.name)
        total_backbone += sum(_nbytes(t) for t in tensors.values())
    adapter_tensors = _reference_tensors(aset, n_layers)
    save_file(adapter_tensors, str(out / ADAPTER_FILE), metadata={"format": "pt"})
    weight_map |= dict.fromkeys(adapter_tensors, ADAPTER_FILE)
    total = sum(_nbytes(t) for t in adapter_tensors.values()) + total_backbone
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config |= {
        "architectures": [ARCHITECTURE],
        "transcoder_n_features": aset.config.n_features,
        "transcoder_dec_bias": aset.config.dec_bias,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for path in target_dir.iterdir():
        if path.is_file() and path.name != "config.json" and path.suffix != ".safetensors" and path.name not in _MODEL_FILES:
            shutil.copy2(path, out / path.name)
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _reference_tensors(aset: AdapterSet, n_layers: int) -> dict[str, torch.Tensor]:
    d, f = aset.config.d_model, aset.config.n_features
    tensors = {}
    for i in range(n_layers):
        prefix = MLP_KEY.format(i)
        adapter = aset.adapters.get(i)
        if adapter is None:
            enc_w, enc_b, dec_w, dec_b = torch.zeros(f, d), torch.zeros(f), torch.zeros(d, f), torch.zeros(d)
        else:
            enc_w, enc_b = adapter.W_enc.detach().T, adapter.b_enc.detach()
            dec_w = adapter.W_dec.detach().T
            dec_b = adapter.b_dec.detach() if adapter.b_dec is not None else None
        tensors[prefix + "transcoder_enc.weight"] = enc_w.contiguous()
        tensors[prefix + "transcoder_enc.bias"] = enc_b.contiguous()
        tensors[prefix + "transcoder_dec.weight"] = dec_w.contiguous()
        if aset.config.dec_bias:
            tensors[prefix + "transcoder_dec.bias"] = dec_b.contiguous()
    return tensors


def import_hf_reference(model_dir: str | Path, out: str | Path) -> AdapterSet:
    """Read a reference checkpoint's adapters into a tca adapter set at ``out``."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.exists():
        raise TcaError(f"{model_dir} is not a Hugging Face checkpoint (no config.json).")
    config = json.loads(config_path.read_text())
    if "transcoder_n_features" not in config:
        raise TcaError(f"{model_dir} carries no transcoder adapters (no transcoder_n_features in its config.json).")
    tensors = read_hf_tensors(model_dir, lambda name: ".mlp.transcoder_" in name)
    dec_bias = bool(config.get("transcoder_dec_bias", True))
    cfg = AdapterConfig(d_model=config["hidden_size"], n_features=config["transcoder_n_features"], dec_bias=dec_bias)
    adapters = {}
    for i in range(config["num_hidden_layers"]):
        prefix = MLP_KEY.format(i)
        if prefix + "transcoder_enc.weight" not in tensors:
            continue
        state = {
            "W_enc": tensors[prefix + "transcoder_enc.weight"].T.float().contiguous(),
            "b_enc": tensors[prefix + "transcoder_enc.bias"].float(),
            "W_dec": tensors[prefix + "transcoder_dec.weight"].T.float().contiguous(),
        }
        if dec_bias:
            state["b_dec"] = tensors.get(prefix + "transcoder_dec.bias", torch.zeros(cfg.d_model)).float()
        if not state["W_dec"].any() and not (dec_bias and state["b_dec"].any()):
            continue  # a zero decoder is how the layout marks a layer without an adapter
        adapter = Adapter(cfg)
        adapter.load_state_dict(state, strict=False)
        adapters[i] = adapter.eval()
    if not adapters:
        raise TcaError(f"every transcoder in {model_dir} has a zero decoder; there are no adapters to import.")
    aset = AdapterSet(adapters, cfg, None, None, {"imported_from": str(model_dir)})
    save_adapters(out, aset)
    return aset


def export_transcoder(aset: AdapterSet, out: Path) -> Path:
    """Write one ``layer_<L>.safetensors`` per adapter plus ``config.json``."""
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for layer, adapter in aset.adapters.items():
        tensors = {
            "W_enc": adapter.W_enc.detach().T, "b_enc": adapter.b_enc.detach(), "W_dec": adapter.W_dec.detach(),
            "b_dec": adapter.b_dec.detach() if adapter.b_dec is not None else torch.zeros(aset.config.d_model),
        }
        if aset.config.activation == "jumprelu":
            tensors["activation_function.threshold"] = adapter.log_threshold.detach().exp()
        elif aset.config.activation == "batchtopk":
            tensors["activation_function.threshold"] = adapter.threshold.detach().expand(aset.config.n_features)
        elif aset.config.activation == "topk":
            tensors["k"] = torch.tensor(aset.config.k)
        name = f"layer_{layer}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / name))
        files[str(layer)] = name
    meta = {
        "format": "tca-transcoder",
        "activation": aset.config.activation,
        "k": aset.config.k if aset.config.activation in ("topk", "batchtopk") else None,
        "d_model": aset.config.d_model,
        "n_features": aset.config.n_features,
        "shapes": {"W_enc": "[n_features, d_model]", "W_dec": "[n_features, d_model]"},
        "feature_input": "mlp_in",
        "feature_output": "mlp_out",
        "files": files,
        "models": aset.models,
    }
    (out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
