"""The adapted model: the target's backbone with the base model's MLPs plus adapters.

Every MLP of the target is replaced by an ``AdaptedMLP`` whose ``mode`` picks what it computes:

    adapted   MLP_base(x) + adapter(x)        the model the adapters are judged by
    hybrid    MLP_base(x)                     the baseline: adapters off
    target    MLP_target(x)                   only with ``keep_target=True`` (refinement,
                                              cut-off models and exact-difference tests)
    patched   first half of the batch: adapted; second half: hybrid plus what the edits
              put in, reading each feature's activation from the first half's same row

``patched`` is activation patching: the batch carries each sequence twice, and the edited
hybrid rows take a feature's activation as the adapted model computes it on the same text, so
the feature acts where and as strongly as the adapter would have it, without the features
upstream that make it fire. ``forward_logits`` and ``generate`` double the batch and keep the
second half (in generation the first half follows the second's tokens).

``set_mode`` switches all layers or some, so the mixed models of end-to-end refinement
("adapted below k, target from k") are one call away. Feature edits (ablate, clamp) and
observers (attribution, the L1 term) act on the adapter's activations through
``AdaptedMLP.acts_hooks``; edits may be limited to positions whose input token is in a set,
which works under ``generate`` because the model's input ids are recorded by a pre-hook.

Only the base model's MLP tensors are read (safetensors loads single tensors), never the
whole base model: the target loads straight onto the device in the run's dtype, and each
layer's base MLP is read onto the device and copied over the target's in place, one layer at
a time. ``load_adapted`` plans the memory of all that before anything loads
(``tca.cache.memory``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open
from torch import nn

from tca import TcaError
from tca.cache.layers import select_layers
from tca.cache.memory import Workload, check_memory, memory_plan
from tca.cache.models import (
    check_pair,
    find_model,
    load_pretrained,
    load_tokenizer,
    read_mlp,
    resolve_device,
    resolve_dtype,
    tensor_files,
)
from tca.train.adapter import Adapter, decode
from tca.train.checkpoint import AdapterSet, load_adapters

MLP_KEY = "model.layers.{}.mlp."
MODES = ("adapted", "hybrid", "target", "patched")

ActsHook = Callable[["AdaptedMLP", torch.Tensor], "torch.Tensor | None"]
"""Called with the layer's module and its feature activations [..., F]; a returned tensor
replaces the activations (an edit), ``None`` leaves them (an observer)."""


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


@dataclass
class FeatureEdit:
    """Set some features of one layer to a fixed value: 0 ablates, anything else clamps; or, with
    ``relative``, scale them."""

    layer: int
    features: list[int]
    value: float = 0.0
    token_ids: frozenset[int] | None = None
    """Only at positions whose input token is one of these; None: at every position."""
    relative: bool = False
    """``value`` multiplies each feature's activation as the adapter's encoder computes it (in the
    hybrid too, where no other feature is decoded) instead of replacing it: the features act where
    they fire, at ``value`` times their own strength."""


class AdaptedMLP(nn.Module):
    """The base MLP, its adapter and (optionally) the target MLP, one of them chosen by ``mode``."""

    def __init__(self, mlp: nn.Module, adapter: Adapter | None, target_mlp: nn.Module | None = None):
        super().__init__()
        self.mlp, self.adapter, self.target_mlp = mlp, adapter, target_mlp
        self.mode = "adapted"
        self.acts_hooks: list[ActsHook] = []
        self.input_ids: Callable[[], torch.Tensor | None] = lambda: None
        """The ids of the tokens this forward runs on, [batch, seq] (set by ``adapted_model``)."""
        self.encoded: Callable[[], torch.Tensor] = _outside_forward
        """This forward's feature activations as the encoder computes them, before any edit; in
        the hybrid computed only when an edit asks (set during ``forward``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "target":
            return self.target_mlp(x)
        out = self.mlp(x)
        if self.adapter is None or (self.mode == "hybrid" and not self.acts_hooks):
            return out
        a = self.adapter
        xa = x.to(a.W_enc.dtype)
        if self.mode == "patched":
            return out + self._patched(xa).to(out.dtype)
        if self.mode == "adapted":
            acts, bias = a.encode(xa), a.b_dec
            encoded = acts
            self.encoded = lambda: encoded
        else:  # hybrid with hooks: only what the hooks put in (clamped features) is decoded
            acts, bias = xa.new_zeros(*x.shape[:-1], a.cfg.n_features), None
            self.encoded = functools.cache(lambda: a.encode(xa))
        return out + decode(self._hooked(acts), a.W_dec, bias).to(out.dtype)

    def _patched(self, xa: torch.Tensor) -> torch.Tensor:
        """The adapter's output in ``patched`` mode: the full adapter on the first half of the
        rows, the edits alone on the second, with the first half's activations as ``encoded``."""
        a, half = self.adapter, xa.shape[0] // 2
        if xa.shape[0] != 2 * half:
            raise ValueError("patched mode reads the batch as two copies of each sequence; its size must be even")
        source = a.encode(xa[:half])
        self.encoded = lambda: source
        edited = self._hooked(torch.zeros_like(source))
        return torch.cat([decode(source, a.W_dec, a.b_dec), decode(edited, a.W_dec, None)])

    def _hooked(self, acts: torch.Tensor) -> torch.Tensor:
        """``acts`` through every hook in turn (an edit replaces them, an observer leaves them)."""
        for hook in self.acts_hooks:
            edited = hook(self, acts)
            if edited is not None:
                acts = edited
        self.encoded = _outside_forward  # holds no activations between forwards
        return acts


def paired(model: nn.Module) -> bool:
    """Whether the model reads its batches as two copies (some layer in ``patched`` mode)."""
    return any(m.mode == "patched" for m in adapted_mlps(model).values())


def _outside_forward() -> torch.Tensor:
    raise RuntimeError("feature activations are only available to edits during a forward")


def adapted_model(
    target_dir: str | Path,
    base_dir: str | Path,
    adapters: AdapterSet | dict[int, Adapter] | None,
    dtype: torch.dtype = torch.float32,
    keep_target: bool = False,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """The target model with every MLP replaced by the base's MLP plus that layer's adapter, on
    ``device`` in ``dtype`` (the adapters too).

    ``keep_target`` keeps the target's own MLPs beside them (for ``set_mode(model, "target")``).
    """
    device = torch.device(device)
    model = load_pretrained(Path(target_dir), dtype, device).eval()
    layers = model.model.layers
    base_files = tensor_files(Path(base_dir))
    adapters = adapters.adapters if isinstance(adapters, AdapterSet) else (adapters or {})
    bad = [layer for layer in adapters if not 0 <= layer < len(layers)]
    if bad:
        raise TcaError(f"the adapters hold layer {bad[0]}, but {target_dir} has {len(layers)} layers.")
    d_model = model.config.hidden_size
    wrong = [layer for layer, a in adapters.items() if a.cfg.d_model != d_model]
    if wrong:
        raise TcaError(
            f"the adapter of layer {wrong[0]} reads width {adapters[wrong[0]].cfg.d_model}, "
            f"but {target_dir} has hidden size {d_model}; it was trained on another model."
        )
    recorded: dict[str, torch.Tensor | None] = {"ids": None}

    def record_ids(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        recorded["ids"] = ids

    model.register_forward_pre_hook(record_ids, with_kwargs=True)
    for i, layer in enumerate(layers):
        target_mlp = copy.deepcopy(layer.mlp) if keep_target else None
        # read as stored and cast by the copy into the target's parameters, one layer at a time
        layer.mlp.load_state_dict(read_mlp(base_files, i, device))
        adapter = adapters.get(i)
        if adapter is not None:
            adapter = adapter.to(device=device, dtype=dtype).eval()
        layer.mlp = AdaptedMLP(layer.mlp, adapter, target_mlp)
        layer.mlp.input_ids = lambda: recorded["ids"]
    return model


def load_adapted(
    adapters: str | Path | AdapterSet,
    base: str,
    target: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    keep_target: bool = False,
    layers: str = "all",
    work: Workload | None = None,
):
    """The adapted model of a base/target pair (local directories or Hub ids) on ``device``, with
    the adapters of ``layers`` (a layer spec such as ``0,3,5-7``). Read the data before calling this: a bad
    dataset should fail before gigabytes of weights load.

    ``dtype`` is resolved by ``resolve_dtype`` (``auto``: the checkpoint's dtype on CUDA, float32
    on CPU; ``model.dtype`` says what was chosen). Before the models load, the memory plan of
    ``work`` (the calling command's batch sizes; its layers, features and ``keep_target`` are
    filled in here) is logged and checked against the device; without ``work`` the plan counts
    the weights alone."""
    dev = resolve_device(device)
    base_src, target_src = find_model(base), find_model(target)
    check_pair(base_src, target_src)
    run_dtype = resolve_dtype(dtype, dev, target_src.config)
    aset = adapters if isinstance(adapters, AdapterSet) else load_adapters(adapters)
    chosen = select_layers(layers, aset.layers, f"{adapters} has adapters for")
    # checked before any weights load, so bad input costs nothing
    if aset.config.d_model != target_src.d_model:
        raise TcaError(f"{adapters} reads width {aset.config.d_model}, but {target} has hidden size "
                       f"{target_src.d_model}; the adapters were trained on another model.")
    beyond = [layer for layer in chosen if layer >= target_src.n_layers]
    if beyond:
        raise TcaError(f"{adapters} holds layer {beyond[0]}, but {target} has {target_src.n_layers} layers.")
    work = dataclasses.replace(work or Workload(command="adapted model"), layers=tuple(chosen),
                               n_features=aset.config.n_features, keep_target=keep_target)
    check_memory(memory_plan(work, target_src.config, base_src.config, run_dtype, dev))
    return adapted_model(target_src.path, base_src.path, {i: aset.adapters[i] for i in chosen},
                         dtype=run_dtype, keep_target=keep_target, device=dev)


def target_tokenizer(target: str):
    """The tokenizer of the target model (a local directory or Hub id)."""
    return load_tokenizer(find_model(target))


def adapted_mlps(model: nn.Module) -> dict[int, AdaptedMLP]:
    """The spliced MLPs of an adapted model by layer index."""
    return {i: layer.mlp for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, AdaptedMLP)}


def set_mode(model: nn.Module, mode: str, layers: Iterable[int] | None = None) -> None:
    """Make the given layers (all by default) compute as ``adapted``, ``hybrid`` or ``target``."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
    mlps = adapted_mlps(model)
    for i in mlps if layers is None else layers:
        if mode == "target" and mlps[i].target_mlp is None:
            raise ValueError("the target's MLPs were not kept; load with adapted_model(..., keep_target=True)")
        mlps[i].mode = mode


def set_adapters(model: nn.Module, enabled: bool) -> None:
    """Switch every adapter of an adapted model on, or off (the hybrid model)."""
    set_mode(model, "adapted" if enabled else "hybrid")


def _edit_hook(edit: FeatureEdit) -> ActsHook:
    features = torch.tensor(sorted(set(edit.features)), dtype=torch.long)
    selected = None if edit.token_ids is None else torch.tensor(sorted(edit.token_ids), dtype=torch.long)

    def hook(mlp: AdaptedMLP, acts: torch.Tensor) -> torch.Tensor:
        idx = features.to(acts.device)
        if edit.relative:
            value = edit.value * mlp.encoded().index_select(-1, idx).to(acts.dtype)
        else:
            value = torch.full((*acts.shape[:-1], len(idx)), edit.value, dtype=acts.dtype, device=acts.device)
        if selected is not None:
            ids = mlp.input_ids()
            if ids is None:
                raise ValueError("token-selected edits need the model's input_ids")
            ids = ids[ids.shape[0] - acts.shape[0]:]  # patched mode edits the second half only
            where = torch.isin(ids.to(acts.device), selected.to(acts.device))
            value = torch.where(where[..., None], value, acts.index_select(-1, idx))
        return acts.index_copy(-1, idx, value)

    return hook


class edits:
    """Context manager applying feature edits to an adapted model, removed on exit.

        with edits(model, [FeatureEdit(layer=2, features=[17], value=0.0)]):
            logits = model(ids).logits
    """

    def __init__(self, model: nn.Module, feature_edits: Iterable[FeatureEdit]):
        self.mlps = adapted_mlps(model)
        self.hooks: list[tuple[AdaptedMLP, ActsHook]] = []
        for edit in feature_edits:
            mlp = self.mlps.get(edit.layer)
            if mlp is None or mlp.adapter is None:
                raise TcaError(f"there is no adapter at layer {edit.layer} to edit.")
            bad = [f for f in edit.features if not 0 <= f < mlp.adapter.cfg.n_features]
            if bad:
                raise TcaError(f"feature {bad[0]} is out of range at layer {edit.layer} ({mlp.adapter.cfg.n_features} features).")
            self.hooks.append((mlp, _edit_hook(edit)))

    def __enter__(self):
        for mlp, hook in self.hooks:
            mlp.acts_hooks.append(hook)
        return self

    def __exit__(self, *exc):
        for mlp, hook in self.hooks:
            mlp.acts_hooks.remove(hook)
