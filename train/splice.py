"""The adapted model: the target's backbone with the base model's MLPs plus adapters.

    adapted_model(target_dir, base_dir, adapters)   adapters on  -> the adapted model
    set_adapters(model, False)                      adapters off -> the hybrid baseline

Only the base model's MLP tensors are read (safetensors loads single tensors), never the
whole base model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

from tca import TcaError
from tca.train.adapter import Adapter
from tca.train.checkpoint import AdapterSet

MLP_KEY = "model.layers.{}.mlp."


def shard_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a Hugging Face checkpoint (sharded or not)."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    raise TcaError(f"{model_dir} holds no safetensors weights (model.safetensors or its index).")


def read_hf_tensors(model_dir: str | Path, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint whose names ``keep`` accepts, read one by one."""
    out = {}
    for path in shard_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if keep(name):
                    out[name] = f.get_tensor(name)
    return out


class AdaptedMLP(nn.Module):
    """An MLP plus an adapter that reads the same input; ``enabled`` switches the adapter."""

    def __init__(self, mlp: nn.Module, adapter: Adapter | None):
        super().__init__()
        self.mlp, self.adapter, self.enabled = mlp, adapter, True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mlp(x)
        if self.adapter is None or not self.enabled:
            return out
        return out + self.adapter(x.to(self.adapter.W_enc.dtype)).pred.to(out.dtype)


def adapted_model(
    target_dir: str | Path,
    base_dir: str | Path,
    adapters: AdapterSet | dict[int, Adapter] | None,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """The target model with every MLP replaced by the base's MLP plus that layer's adapter."""
    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=dtype).eval()
    layers = model.model.layers
    base = read_hf_tensors(base_dir, lambda name: ".mlp." in name)
    adapters = adapters.adapters if isinstance(adapters, AdapterSet) else (adapters or {})
    bad = [layer for layer in adapters if not 0 <= layer < len(layers)]
    if bad:
        raise TcaError(f"the adapters hold layer {bad[0]}, but {target_dir} has {len(layers)} layers.")
    for i, layer in enumerate(layers):
        prefix = MLP_KEY.format(i)
        mlp_state = {k[len(prefix):]: v for k, v in base.items() if k.startswith(prefix)}
        if not mlp_state:
            raise TcaError(f"{base_dir} has no MLP weights for layer {i}; is it the base of {target_dir}?")
        layer.mlp.load_state_dict(mlp_state)
        adapter = adapters.get(i)
        if adapter is not None:
            adapter = adapter.to(dtype).eval()
        layer.mlp = AdaptedMLP(layer.mlp, adapter)
    return model


def set_adapters(model: nn.Module, enabled: bool) -> None:
    """Switch every adapter of an adapted model on, or off (the hybrid model)."""
    for module in model.modules():
        if isinstance(module, AdaptedMLP):
            module.enabled = enabled
