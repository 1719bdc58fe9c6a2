"""tca's adapter format and the trainer's resumable checkpoints.

An *adapter set* is a directory with the adapters of some layers trained together:

    SET/adapters.json          format tag, the store and models trained on, layers, the
                               adapter config (activation, features, ...) and training settings
    SET/adapters.safetensors   layers.<L>.W_enc [d, F], layers.<L>.b_enc [F],
                               layers.<L>.W_dec [F, d], layers.<L>.b_dec [d] (with a decoder
                               bias), plus the activation's own state (JumpReLU log_threshold,
                               BatchTopK threshold) and training counters

A training checkpoint (``OUT/checkpoint/``) holds every sweep member's adapters and optimizer
moments in ``state.safetensors`` and the step, loader position and configuration in
``state.json``; it is written to a temporary directory and renamed, so a kill at any instant
leaves either the old checkpoint or the new one.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tca import TcaError
from tca.cache.store import Store
from tca.train.adapter import Adapter, AdapterConfig

FORMAT = "tca-adapters"
FORMAT_VERSION = 1
CONFIG_FILE = "adapters.json"
WEIGHTS_FILE = "adapters.safetensors"


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (a state dict) under names starting with ``prefix``, to share one file."""
    return {prefix + name: t for name, t in tensors.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors named ``prefix...``, with ``prefix`` taken off: the inverse of ``prefixed``."""
    return {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}


def store_models(store: Store) -> dict[str, Any] | None:
    """The base and target model provenance the harvester recorded, if any."""
    attrs = store.attrs
    for holder in (attrs.get("attrs") or {}, attrs):
        models = holder.get("models")
        if models:
            return models
        if "base" in holder and "target" in holder:
            return {"base": holder["base"], "target": holder["target"]}
    return None


@dataclass
class AdapterSet:
    """Adapters for some layers of one model pair, with where they came from."""

    adapters: dict[int, Adapter]
    config: AdapterConfig
    store: str | None = None
    """The store the adapters were trained on (None for imported ones)."""
    models: dict[str, Any] | None = None
    """Base/target provenance copied from the store's attributes."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Training settings, import source and anything else worth keeping."""

    @property
    def layers(self) -> list[int]:
        return sorted(self.adapters)


def save_adapters(path: str | Path, aset: AdapterSet) -> Path:
    """Write an adapter set directory (replacing the files of an older one)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: t.detach().cpu().contiguous()
        for layer, adapter in aset.adapters.items()
        for name, t in prefixed(f"layers.{layer}.", adapter.state_dict()).items()
    }
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "store": aset.store,
        "models": aset.models,
        "layers": aset.layers,
        "adapter": dataclasses.asdict(aset.config),
        **aset.extra,
    }
    save_file(tensors, str(path / WEIGHTS_FILE))
    (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def named_set(spec: str) -> tuple[str, str]:
    """(name, directory) of an ``[NAME=]DIR`` adapter-set argument: the name given, else the
    directory's own (how an index and its attributions name the set)."""
    name, _, path = spec.partition("=") if "=" in spec else ("", "", spec)
    return name or Path(path).resolve().name, path


def load_adapters(path: str | Path) -> AdapterSet:
    """Read an adapter set directory written by ``save_adapters``."""
    path = Path(path)
    config_path = path / CONFIG_FILE
    if not config_path.exists():
        members = sorted(p.parent.name for p in path.glob(f"*/{CONFIG_FILE}"))
        hint = f"; it is a sweep, pass one member: {', '.join(str(path / m) for m in members)}" if members else ""
        raise TcaError(f"{path} is not a tca adapter set (no {CONFIG_FILE}){hint}.")
    meta = json.loads(config_path.read_text())
    if meta.get("format") != FORMAT:
        raise TcaError(f"{path} is not a tca adapter set (format {meta.get('format')!r}).")
    if meta.get("format_version") != FORMAT_VERSION:
        raise TcaError(f"{path} has adapter format version {meta.get('format_version')}; this tca reads {FORMAT_VERSION}.")
    cfg = AdapterConfig(**meta.pop("adapter"))
    tensors = load_file(str(path / WEIGHTS_FILE))
    adapters = {}
    for layer in meta.pop("layers"):
        adapter = Adapter(cfg)
        adapter.load_state_dict(unprefixed(f"layers.{layer}.", tensors))
        adapters[int(layer)] = adapter.eval()
    for key in ("format", "format_version"):
        meta.pop(key)
    return AdapterSet(adapters, cfg, meta.pop("store"), meta.pop("models"), meta)


# ---- training checkpoints --------------------------------------------------------------------


def save_checkpoint(path: Path, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write ``state.json`` and ``state.safetensors`` to ``path`` atomically (via a rename)."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    old = path.with_name(path.name + ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The state and tensors of a checkpoint; an interrupted save falls back to the previous one."""
    for candidate in (path, path.with_name(path.name + ".old")):
        if (candidate / "state.json").exists() and (candidate / "state.safetensors").exists():
            return json.loads((candidate / "state.json").read_text()), load_file(str(candidate / "state.safetensors"))
    raise TcaError(f"there is no checkpoint to resume in {path.parent}; start without --resume.")


def optimizer_tensors(prefix: str, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """An optimizer's state as flat tensors plus its JSON-able parameter groups."""
    sd = opt.state_dict()
    tensors = {f"{prefix}.{i}.{key}": t for i, st in sd["state"].items() for key, t in st.items()}
    return tensors, sd["param_groups"]


def restore_optimizer(prefix: str, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if name.startswith(prefix + "."):
            i, key = name[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(i), {})[key] = t
    opt.load_state_dict({"state": state, "param_groups": groups})


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records of ``metrics.jsonl`` written after the checkpoint at ``step`` by the run
    that was interrupted, so a resumed run's records follow on without repeats."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))
