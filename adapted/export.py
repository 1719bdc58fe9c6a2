"""Adapters to and from other tools' layouts.

``hf-reference``: a complete Hugging Face checkpoint of the adapted model as the reference
implementation lays it out, always **sharded**: ``model.safetensors.index.json`` maps every
tensor to its file and there is no ``model.safetensors`` (transformers' ``from_pretrained``
opens ``model.safetensors`` in preference to an index when both exist, and would then never
see the adapters). The target's tensors go to ``model-<k>-of-<n>.safetensors`` with every
MLP's weights replaced by the base model's, and the adapters to ``transcoder.safetensors`` as

    model.layers.<i>.mlp.transcoder_enc.weight  [F, d]  (nn.Linear: [out, in], = W_enc.T)
    model.layers.<i>.mlp.transcoder_enc.bias    [F]
    model.layers.<i>.mlp.transcoder_dec.weight  [d, F]  (= W_dec.T)
    model.layers.<i>.mlp.transcoder_dec.bias    [d]     (only with a decoder bias)

for every layer (zeros where there is no adapter, so those layers compute the base MLP), with
``architectures = ["Qwen2ForCausalLMWithTranscoder"]``, ``transcoder_n_features`` and
``transcoder_dec_bias`` in config.json. ``import_hf_reference`` reads it back, keeping the
checkpoint's dtype.

``transcoder``: circuit-tracer's transcoder-set directory: ``layer_<i>.safetensors`` for every
layer ``i`` of the target (circuit-tracer finds them by that name and needs one per layer, so
layers without an adapter get an all-zero transcoder) in the layout of its
``SingleLayerTranscoder``: ``W_enc`` [F, d] (``acts = act(x @ W_enc.T + b_enc)``, i.e. tca's
``W_enc`` transposed), ``W_dec`` [F, d] (``out = acts @ W_dec + b_dec``), ``b_enc`` [F],
``b_dec`` [d], plus ``activation_function.threshold`` [F] (JumpReLU, and BatchTopK's inference
threshold, which computes the same) or ``k`` (TopK); and a ``config.yaml`` with circuit-tracer's
keys (``model_kind: transcoder_set``, the hooks, ``model_name``, ``activation``) beside tca's own.

Both formats need to know the models; absent ``base`` / ``target`` are the ones the adapters'
store was harvested from (``AdapterSet.models``, copied from the store's zarr.json).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import yaml
from safetensors.torch import load_file, save_file

from tca import TcaError
from tca.adapted.splice import MLP_KEY, read_hf_tensors, shard_files
from tca.cache.models import ModelSource, check_pair, find_model
from tca.outputs import atomic_dir, check_output
from tca.train.adapter import Adapter, AdapterConfig
from tca.train.checkpoint import AdapterSet, load_adapters, save_adapters

log = logging.getLogger(__name__)

FORMATS = ("hf-reference", "transcoder")
ARCHITECTURE = "Qwen2ForCausalLMWithTranscoder"
ADAPTER_FILE = "transcoder.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FEATURE_INPUT_HOOK = "mlp.hook_in"
"""circuit-tracer's name for the MLP's input (after the post-attention norm): tca's ``x``."""
FEATURE_OUTPUT_HOOK = "mlp.hook_out"
"""circuit-tracer's name for the MLP's output, which the transcoder reconstructs."""


@dataclass
class ExportConfig:
    """What ``tca export`` writes."""

    adapters: str
    """A tca adapter set directory."""
    out: str
    """Directory to write; it appears only once complete."""
    format: Literal["hf-reference", "transcoder"] = "hf-reference"
    """hf-reference (the reference implementation's checkpoint of the adapted model) | transcoder
    (circuit-tracer's transcoder-set directory)."""
    base: str | None = None
    """The base model (directory or Hub id) whose MLPs the hf-reference checkpoint carries;
    default: the one the adapters' store was harvested from."""
    target: str | None = None
    """The target model (directory or Hub id): hf-reference takes its backbone, config and
    tokenizer, transcoder its layer count and name; default: the one the adapters' store was
    harvested from."""
    overwrite: bool = False
    """Replace an existing --out."""


@dataclass
class ImportConfig:
    """What ``tca import`` reads and writes (the parameters of ``import_hf_reference``)."""

    checkpoint: str
    """A Hugging Face checkpoint in the reference implementation's layout."""
    out: str
    """Adapter set directory to write; it appears only once complete."""
    overwrite: bool = False
    """Replace an existing --out."""


def export(cfg: ExportConfig) -> Path:
    """Write ``cfg.adapters`` in ``cfg.format`` to ``cfg.out`` (atomically)."""
    if cfg.format not in FORMATS:
        raise TcaError(f"unknown export format {cfg.format!r}; use one of {', '.join(FORMATS)}.")
    # refused before anything loads, and again below once the models are known
    check_output(cfg.out, cfg.overwrite, [cfg.adapters, cfg.base, cfg.target])
    aset = load_adapters(cfg.adapters)
    if cfg.format == "hf-reference" and aset.config.activation != "relu":
        raise TcaError(
            f"the reference layout computes ReLU features but these adapters use {aset.config.activation}; "
            "export them with --format transcoder."
        )
    target = _model(aset, "target", cfg.target, cfg.format)
    base = _model(aset, "base", cfg.base, cfg.format) if cfg.format == "hf-reference" else None
    out = check_output(cfg.out, cfg.overwrite, [target.path, base.path if base else None])
    _check_fits(aset, target)
    if base is not None:
        check_pair(base, target)
    with atomic_dir(out) as tmp:
        if base is None:  # --format transcoder
            export_transcoder(aset, target, tmp)
        else:
            export_hf_reference(aset, base.path, target.path, tmp)
    log.info("wrote %s (%s, layers %s)", out, cfg.format, aset.layers)
    return out


def _model(aset: AdapterSet, role: str, given: str | None, fmt: str) -> ModelSource:
    """The ``role`` model: as given, or as the adapters' store recorded it."""
    if given:
        return find_model(given)
    recorded = (aset.models or {}).get(role) or {}
    ref = recorded.get("id")
    if not ref:
        raise TcaError(f"--format {fmt} needs --{role}: the adapters record no {role} model.")
    try:
        source = find_model(ref, recorded.get("revision"))
    except TcaError:
        raise TcaError(f"the adapters' {role} model {ref} is not found from here; pass --{role}.") from None
    # a relative path recorded at harvest time may name another model from another directory
    if recorded.get("config_hash") and source.config_hash != recorded["config_hash"]:
        raise TcaError(f"{ref} is not the {role} model the adapters were trained on (its config.json differs); "
                       f"pass --{role}.")
    log.info("%s model from the adapters' store: %s", role, ref)
    return source


def _check_fits(aset: AdapterSet, target: ModelSource) -> None:
    if aset.config.d_model != target.d_model:
        raise TcaError(f"the adapters are {aset.config.d_model} wide but {target.ref} has hidden size "
                       f"{target.d_model}.")
    if aset.layers and aset.layers[-1] >= target.n_layers:
        raise TcaError(f"the adapters hold layer {aset.layers[-1]}, but {target.ref} has {target.n_layers} layers.")


def export_hf_reference(aset: AdapterSet, base_dir: str | Path, target_dir: str | Path, out: Path) -> Path:
    """Write the adapted model as the reference implementation's checkpoint into the folder ``out``."""
    target_dir, base_dir = Path(target_dir), Path(base_dir)
    config = json.loads((target_dir / "config.json").read_text())
    base_mlps = read_hf_tensors(base_dir, lambda name: ".mlp." in name)
    shards = shard_files(target_dir)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        tensors = load_file(str(shard))
        for name in tensors:
            if ".mlp." in name:
                if name not in base_mlps:
                    raise TcaError(f"{base_dir} has no tensor {name}; is it the base of {target_dir}?")
                tensors[name] = base_mlps[name]
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, name)
        total += sum(_nbytes(t) for t in tensors.values())
    adapter_tensors = _reference_tensors(aset, config["num_hidden_layers"])
    save_file(adapter_tensors, str(out / ADAPTER_FILE), metadata={"format": "pt"})
    weight_map |= dict.fromkeys(adapter_tensors, ADAPTER_FILE)
    total += sum(_nbytes(t) for t in adapter_tensors.values())
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config |= {
        "architectures": [ARCHITECTURE],
        "transcoder_n_features": aset.config.n_features,
        "transcoder_dec_bias": aset.config.dec_bias,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for path in target_dir.iterdir():
        # tokenizer, generation config, chat template: everything but the weights and their index
        if path.is_file() and path.name not in ("config.json", INDEX_FILE) and path.suffix != ".safetensors":
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


def import_hf_reference(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> AdapterSet:
    """Read a reference checkpoint's adapters into a tca adapter set at ``out``, in the
    checkpoint's dtype (a bfloat16 checkpoint gives bfloat16 adapters)."""
    model_dir = Path(checkpoint)
    out = check_output(out, overwrite, [model_dir])
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
        dec_w = tensors[prefix + "transcoder_dec.weight"]
        state = {
            "W_enc": tensors[prefix + "transcoder_enc.weight"].T.contiguous(),
            "b_enc": tensors[prefix + "transcoder_enc.bias"],
            "W_dec": dec_w.T.contiguous(),
        }
        if dec_bias:
            state["b_dec"] = tensors.get(prefix + "transcoder_dec.bias", dec_w.new_zeros(cfg.d_model))
        if not state["W_dec"].any() and not (dec_bias and state["b_dec"].any()):
            continue  # a zero decoder is how the layout marks a layer without an adapter
        adapter = Adapter(cfg)
        # assign: the parameters take the checkpoint's tensors as they are, dtype included
        adapter.load_state_dict(state, strict=False, assign=True)
        adapters[i] = adapter.eval()
    if not adapters:
        raise TcaError(f"every transcoder in {model_dir} has a zero decoder; there are no adapters to import.")
    aset = AdapterSet(adapters, cfg, None, None, {"imported_from": str(model_dir)})
    with atomic_dir(out) as tmp:
        save_adapters(tmp, aset)
    return aset


def export_transcoder(aset: AdapterSet, target: ModelSource, out: Path) -> Path:
    """Write circuit-tracer's transcoder-set directory for ``target`` into the folder ``out``."""
    cfg = aset.config
    for layer in range(target.n_layers):
        adapter = aset.adapters.get(layer)
        tensors = _transcoder_tensors(adapter) if adapter is not None else _zero_transcoder(cfg)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"layer_{layer}.safetensors"))
    meta = {
        "model_kind": "transcoder_set",
        "model_name": target.ref,
        "feature_input_hook": FEATURE_INPUT_HOOK,
        "feature_output_hook": FEATURE_OUTPUT_HOOK,
        # circuit-tracer's names: BatchTopK at inference is a JumpReLU at its running threshold
        "activation": {"batchtopk": "jumprelu"}.get(cfg.activation, cfg.activation),
    }
    if cfg.activation == "topk":
        meta["k"] = cfg.k
    meta["tca"] = {
        "what": "transcoder adapters: each reconstructs MLP_target(x) - MLP_base(x), not the MLP's output",
        "adapter_layers": aset.layers,
        "d_model": cfg.d_model,
        "n_features": cfg.n_features,
        "activation": cfg.activation,
        "models": aset.models,
    }
    (out / "config.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    return out


def _transcoder_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    cfg = adapter.cfg
    tensors = {
        "W_enc": adapter.W_enc.detach().T, "b_enc": adapter.b_enc.detach(), "W_dec": adapter.W_dec.detach(),
        "b_dec": adapter.b_dec.detach() if adapter.b_dec is not None else adapter.W_dec.new_zeros(cfg.d_model),
    }
    if cfg.activation == "jumprelu":
        tensors["activation_function.threshold"] = adapter.log_threshold.detach().exp()
    elif cfg.activation == "batchtopk":
        # tca's BatchTopK keeps pre > max(threshold, 0) at inference
        tensors["activation_function.threshold"] = adapter.threshold.detach().clamp_min(0).expand(cfg.n_features)
    elif cfg.activation == "topk":
        tensors["k"] = torch.tensor(cfg.k)
    return tensors


def _zero_transcoder(cfg: AdapterConfig) -> dict[str, torch.Tensor]:
    """A transcoder that never fires and adds nothing, for a layer without an adapter."""
    d, f = cfg.d_model, cfg.n_features
    tensors = {"W_enc": torch.zeros(f, d), "b_enc": torch.zeros(f), "W_dec": torch.zeros(f, d), "b_dec": torch.zeros(d)}
    if cfg.activation in ("jumprelu", "batchtopk"):
        tensors["activation_function.threshold"] = torch.zeros(f)
    elif cfg.activation == "topk":
        tensors["k"] = torch.tensor(cfg.k)
    return tensors
