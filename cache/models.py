"""Finding a base/target pair, checking that their MLPs pair up, and loading what tca needs.

tca runs only the target model. Of the base model it reads the MLP weights of the selected
layers, one tensor at a time from its safetensors files, so a 7B base costs a few hundred MB
of memory rather than 15 GB. Both MLPs are then applied in float32 to the same input.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from tca import TcaError

log = logging.getLogger(__name__)

# The gated MLP of Llama-family models (Llama, Qwen2/2.5/3, Mistral, DeepSeek-R1-Distill):
# down(act(gate(x)) * up(x)), with parameters under model.layers.<L>.mlp.
LAYER_PREFIX = "model.layers.{layer}.mlp."
MLP_PARTS = ("gate_proj", "up_proj", "down_proj")
_ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu}
_GATED_MLP_MODELS = {"llama", "qwen2", "qwen3", "mistral"}


@dataclass(frozen=True)
class ModelSource:
    """A model found on disk: where it is, what it is and how to name it in provenance."""

    ref: str
    """What the user passed: a Hugging Face id or a local directory."""
    path: Path
    """The local directory holding config.json and the safetensors files."""
    revision: str | None
    """The resolved commit for a Hub model; None for a local directory."""
    config: dict

    @property
    def config_hash(self) -> str:
        """sha256 of config.json with keys sorted, to recognise the same model later."""
        return hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()

    @property
    def n_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def d_model(self) -> int:
        return int(self.config["hidden_size"])

    def provenance(self) -> dict:
        return {"id": self.ref, "revision": self.revision, "config_hash": self.config_hash}


def find_model(ref: str, revision: str | None = None) -> ModelSource:
    """A local model directory, or a Hub model downloaded (config, tokenizer, safetensors)."""
    path = Path(ref).expanduser()
    if path.is_dir():
        resolved = None
    elif path.exists() or ref.startswith((".", "/", "~")):
        raise TcaError(f"model {ref} is not a directory with a config.json.")
    else:
        path, resolved = _download(ref, revision)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise TcaError(f"model {ref} has no config.json; pass a Hugging Face model directory or id.")
    return ModelSource(ref=ref, path=path, revision=resolved, config=json.loads(config_file.read_text()))


def _download(ref: str, revision: str | None) -> tuple[Path, str | None]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = Path(
            snapshot_download(ref, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"])
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, ValueError, OSError) as exc:
        raise TcaError(f"model {ref} is neither a local directory nor a reachable Hugging Face model ({exc}).") from None
    return path, path.name


def check_pair(base: ModelSource, target: ModelSource) -> None:
    """Refuse pairs whose MLPs cannot be compared layer by layer."""
    for source in (base, target):
        model_type = source.config.get("model_type")
        if model_type not in _GATED_MLP_MODELS:
            raise TcaError(
                f"model {source.ref} has model_type {model_type!r}, whose MLP layout tca does not know "
                f"(it reads gated MLPs of {sorted(_GATED_MLP_MODELS)})."
            )
        if source.config.get("hidden_act", "silu") not in _ACTIVATIONS:
            raise TcaError(f"model {source.ref} uses activation {source.config.get('hidden_act')!r}, which tca does not know.")
    for key, what in (("hidden_size", "hidden sizes"), ("num_hidden_layers", "layer counts")):
        if base.config.get(key) != target.config.get(key):
            raise TcaError(
                f"the base and target models have different {what} ({base.config.get(key)} vs "
                f"{target.config.get(key)}), so their MLPs cannot be paired."
            )


@dataclass
class MlpWeights:
    """One layer's gated MLP in float32: ``down(act(gate(x)) * up(x))``."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    act: str = "silu"
    biases: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] = (None, None, None)

    def to(self, device: torch.device | str) -> MlpWeights:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return MlpWeights(move(self.gate), move(self.up), move(self.down), self.act, tuple(map(move, self.biases)))


def mlp_forward(w: MlpWeights, x: torch.Tensor) -> torch.Tensor:
    """The MLP applied to ``x`` in float32, whatever dtype ``x`` has."""
    x = x.float()
    bg, bu, bd = w.biases
    hidden = _ACTIVATIONS[w.act](F.linear(x, w.gate, bg)) * F.linear(x, w.up, bu)
    return F.linear(hidden, w.down, bd)


def _tensor_files(source: ModelSource) -> dict[str, Path]:
    """Which safetensors file holds each tensor (from the shard index when there is one)."""
    index = source.path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: source.path / name for key, name in weight_map.items()}
    single = source.path / "model.safetensors"
    if not single.is_file():
        raise TcaError(f"model {source.ref} has no safetensors weights (model.safetensors or an index).")
    with safe_open(single, framework="pt") as f:
        return {key: single for key in f.keys()}


def load_base_mlps(source: ModelSource, layers: list[int]) -> dict[int, MlpWeights]:
    """The base model's MLPs of ``layers`` in float32, reading only their tensors."""
    files = _tensor_files(source)
    act = source.config.get("hidden_act", "silu")
    wanted: dict[str, tuple[int, str, str]] = {}
    for layer in layers:
        for part in MLP_PARTS:
            for kind in ("weight", "bias"):
                key = f"{LAYER_PREFIX.format(layer=layer)}{part}.{kind}"
                if key in files:
                    wanted[key] = (layer, part, kind)
            if f"{LAYER_PREFIX.format(layer=layer)}{part}.weight" not in files:
                raise TcaError(f"model {source.ref} has no tensor {LAYER_PREFIX.format(layer=layer)}{part}.weight; its MLP layout is not one tca knows.")
    found: dict[int, dict[str, torch.Tensor]] = {layer: {} for layer in layers}
    by_file: dict[Path, list[str]] = {}
    for key in wanted:
        by_file.setdefault(files[key], []).append(key)
    for path, keys in by_file.items():
        with safe_open(path, framework="pt") as f:
            for key in keys:
                layer, part, kind = wanted[key]
                found[layer][f"{part}.{kind}"] = f.get_tensor(key).float()
    log.info("read %d base MLP tensors for layers %s", len(wanted), layers)
    return {
        layer: MlpWeights(
            gate=t["gate_proj.weight"], up=t["up_proj.weight"], down=t["down_proj.weight"], act=act,
            biases=tuple(t.get(f"{part}.bias") for part in MLP_PARTS),
        )
        for layer, t in found.items()
    }


def live_mlps(model: torch.nn.Module, layers: list[int], act: str) -> dict[int, MlpWeights]:
    """float32 copies of a loaded model's MLPs of ``layers``."""
    out = {}
    for layer in layers:
        mlp = decoder_layers(model)[layer].mlp
        parts = [getattr(mlp, part) for part in MLP_PARTS]
        copy = lambda t: None if t is None else t.detach().float().clone()  # noqa: E731
        out[layer] = MlpWeights(*(copy(p.weight) for p in parts), act=act, biases=tuple(copy(p.bias) for p in parts))
    return out


def check_mlp_shapes(base: dict[int, MlpWeights], target: dict[int, MlpWeights]) -> None:
    for layer, b in base.items():
        t = target[layer]
        if b.gate.shape != t.gate.shape or b.down.shape != t.down.shape:
            raise TcaError(
                f"layer {layer}'s MLPs have different shapes in base and target "
                f"({tuple(b.gate.shape)} vs {tuple(t.gate.shape)}), so they cannot be paired."
            )


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The list of decoder layers of a causal LM (``model.model.layers``)."""
    backbone = getattr(model, "model", model)
    layers = getattr(backbone, "layers", None)
    if layers is None:
        raise TcaError(f"{type(model).__name__} has no model.layers; tca reads Llama-family decoders.")
    return layers


def resolve_dtype(name: str, source: ModelSource) -> torch.dtype:
    """``auto`` means the dtype the target's config declares (float32 when it declares none)."""
    from tca.cache.store import torch_dtype

    if name == "auto":
        name = str(source.config.get("dtype") or source.config.get("torch_dtype") or "float32")
    return torch_dtype(name.removeprefix("torch."))


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.path)


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when present), ``cpu`` or ``cuda``; one sentence when CUDA is asked for but absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TcaError("--device cuda was asked for, but no CUDA device is available; use --device cpu.")
    if name not in ("cpu", "cuda"):
        raise TcaError(f"unknown --device {name!r}; use auto, cpu or cuda.")
    return torch.device(name)


def load_model(source: ModelSource, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The causal LM in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype).to(device).eval()
