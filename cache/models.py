"""Finding a base/target pair, checking that their MLPs pair up, and loading what tca needs.

tca runs only the target model, loaded straight onto its device in the dtype it runs in. Of
the base model it reads the MLP weights of the selected layers, one tensor at a time from its
safetensors files, in the dtype they are stored in: for a 7B base (28 layers, d 3584,
intermediate 18944, bf16) that is 28 x 408 MB = 11.4 GB on the device for all layers rather
than the whole 15 GB model. Both MLPs are applied in float32 to the same input, each weight
matrix upcast only while its product runs, so no float32 copy of any MLP persists
(``tca.cache.memory`` plans it all before anything loads).
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
from tca.cache.memory import checkpoint_dtype

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
    """One layer's gated MLP, ``down(act(gate(x)) * up(x))``, its tensors in their stored dtype."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    act: str = "silu"
    biases: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] = (None, None, None)

    def to(self, device: torch.device | str) -> MlpWeights:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return MlpWeights(move(self.gate), move(self.up), move(self.down), self.act, tuple(map(move, self.biases)))


def mlp_forward(w: MlpWeights, x: torch.Tensor) -> torch.Tensor:
    """The MLP applied to ``x`` in float32, whatever dtype ``x`` and the weights have.

    Each weight is upcast only for its own product and freed after it, so at most one float32
    matrix of one MLP exists at a time. Upcasting is exact, so the result is bit for bit that of
    float32 copies of the weights (tested).
    """
    x = x.float()
    bg, bu, bd = (None if b is None else b.float() for b in w.biases)
    hidden = _ACTIVATIONS[w.act](F.linear(x, w.gate.float(), bg)) * F.linear(x, w.up.float(), bu)
    return F.linear(hidden, w.down.float(), bd)


def tensor_files(model_dir: Path) -> dict[str, Path]:
    """Which safetensors file of a checkpoint holds each tensor (from the shard index when there is one)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: model_dir / name for key, name in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise TcaError(f"{model_dir} has no safetensors weights (model.safetensors or an index).")
    with safe_open(single, framework="pt") as f:
        return {key: single for key in f.keys()}


def read_mlp(files: dict[str, Path], layer: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """One layer's MLP tensors (``gate_proj.weight``, ..., biases when present) in their stored
    dtype, read one by one straight onto ``device``; ``files`` comes from ``tensor_files``."""
    prefix = LAYER_PREFIX.format(layer=layer)
    for part in MLP_PARTS:
        if f"{prefix}{part}.weight" not in files:
            raise TcaError(f"{next(iter(files.values())).parent} has no tensor {prefix}{part}.weight; "
                           "its MLP layout is not one tca knows.")
    keys = [f"{prefix}{part}.{kind}" for part in MLP_PARTS for kind in ("weight", "bias") if f"{prefix}{part}.{kind}" in files]
    out: dict[str, torch.Tensor] = {}
    for path in dict.fromkeys(files[key] for key in keys):
        with safe_open(path, framework="pt", device=_safetensors_device(device)) as f:
            for key in keys:
                if files[key] == path:
                    out[key[len(prefix):]] = f.get_tensor(key)
    return out


def _safetensors_device(device: torch.device | str) -> str:
    device = torch.device(device)
    return "cpu" if device.type == "cpu" else f"{device.type}:{device.index or 0}"


def load_base_mlps(source: ModelSource, layers: list[int], device: torch.device | str = "cpu") -> dict[int, MlpWeights]:
    """The base model's MLPs of ``layers`` on ``device`` in their stored dtype, reading only their tensors."""
    files = tensor_files(source.path)
    act = source.config.get("hidden_act", "silu")
    out = {}
    for layer in layers:
        t = read_mlp(files, layer, device)
        out[layer] = MlpWeights(gate=t["gate_proj.weight"], up=t["up_proj.weight"], down=t["down_proj.weight"], act=act,
                                biases=tuple(t.get(f"{part}.bias") for part in MLP_PARTS))
    log.info("read the base MLPs of layers %s (%s)", layers, next(iter(out.values())).gate.dtype if out else "none")
    return out


def live_mlps(model: torch.nn.Module, layers: list[int], act: str) -> dict[int, MlpWeights]:
    """A loaded model's MLPs of ``layers``: its own tensors, not copies."""
    out = {}
    for layer in layers:
        mlp = decoder_layers(model)[layer].mlp
        parts = [getattr(mlp, part) for part in MLP_PARTS]
        own = lambda t: None if t is None else t.detach()  # noqa: E731
        out[layer] = MlpWeights(*(own(p.weight) for p in parts), act=act, biases=tuple(own(p.bias) for p in parts))
    return out


def check_mlp_pair(base: dict[int, MlpWeights], target: dict[int, MlpWeights],
                   n_selected: int | None = None) -> list[int]:
    """Refuse MLPs of different shapes; warn in one line about layers whose MLP weights are identical
    in base and target (their delta is 0) and return those layers. ``n_selected``: the layers selected
    in all, when ``base`` holds one pass's share of them."""
    same = []
    for layer, b in base.items():
        t = target[layer]
        if b.gate.shape != t.gate.shape or b.down.shape != t.down.shape:
            raise TcaError(
                f"layer {layer}'s MLPs have different shapes in base and target "
                f"({tuple(b.gate.shape)} vs {tuple(t.gate.shape)}), so they cannot be paired."
            )
        if all(torch.equal(x, y.to(x.dtype)) for x, y in ((b.gate, t.gate), (b.up, t.up), (b.down, t.down))):
            same.append(layer)
    if same and len(same) == (n_selected or len(base)):
        log.warning("the base and target MLP weights are identical in every selected layer, so every delta is 0: "
                    "is --base the same model as --target?")
    elif same:
        log.warning("the base and target MLP weights are identical in layers %s: their delta is 0", same)
    return same


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The list of decoder layers of a causal LM (``model.model.layers``)."""
    backbone = getattr(model, "model", model)
    layers = getattr(backbone, "layers", None)
    if layers is None:
        raise TcaError(f"{type(model).__name__} has no model.layers; tca reads Llama-family decoders.")
    return layers


def resolve_dtype(requested: str, device: torch.device, model_config: dict, *,
                  checkpoint_on_cpu: bool = False) -> torch.dtype:
    """The precision a command runs a model in: ``requested``, or for ``auto`` the dtype the
    model's config.json declares (float32 when it declares none) on CUDA and float32 on CPU,
    where half-precision matrix products are slow and round every product.
    ``checkpoint_on_cpu`` takes the checkpoint's dtype on CPU too: the harvest's store keeps the
    activations of the model as it is, on any device."""
    from tca.cache.store import torch_dtype

    if requested == "auto":
        on_cpu = torch.device(device).type == "cpu"
        requested = "float32" if on_cpu and not checkpoint_on_cpu else checkpoint_dtype(model_config)
    return torch_dtype(requested)


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
    """The causal LM in eval mode, loaded in ``dtype`` straight onto ``device``."""
    return load_pretrained(source.path, dtype, device).eval()


def load_pretrained(model_dir: Path, dtype: torch.dtype, device: torch.device | str) -> torch.nn.Module:
    """``from_pretrained`` with every tensor read straight onto ``device`` in ``dtype``: no full
    copy of the model is built in host memory first. On CPU that is what ``from_pretrained``
    does by itself; elsewhere it takes a device map, which transformers serves only with the
    accelerate package installed."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import is_accelerate_available

    device = torch.device(device)
    if device.type == "cpu":
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    if not is_accelerate_available():
        raise TcaError(f"loading {model_dir} straight onto {device} needs the accelerate package; "
                       "install it with pip install accelerate.")
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map={"": _safetensors_device(device)})
