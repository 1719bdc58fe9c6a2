"""Base/target pairs of Qwen2 causal LMs in the Hugging Face layout: random, or with planted differences.

One builder serves every pair tca builds rather than trains: the tiny random pairs of the tests
(``tca.toy.tiny.build_tiny_pair``), random pairs of any shape up to a 7B (``QWEN2_7B``: bf16,
sharded) and the ground-truth pairs of bench/groundtruth.py:

- ``build_random_pair``: a random base, and a target that is the base with every weight nudged
  (the MLPs more), so ``delta`` is dense and far from zero while the backbones stay close, as after
  a real fine-tune. Tensors are generated, written and freed one shard at a time, so a 7B pair
  never holds more than one shard of each model in memory.
- ``build_planted_pair``: a target that is the base plus known sparse MLP features in chosen
  layers, small dense noise on all MLP weights of others, and exactly nothing elsewhere; the truth
  (directions, token types, and every planted neuron's activation on every token of a dataset) is
  written beside the pair (``truth.json`` and ``truth.safetensors``).

Both write ``base/`` and ``target/``, each with config.json, generation_config.json, the given
tokenizer's files and the weights as ``model.safetensors`` or as HF-named shards with
``model.safetensors.index.json``; they load with ``AutoModelForCausalLM`` / ``AutoTokenizer``.
The weights follow Hugging Face's Qwen2 initialisation (normal linears and embeddings, unit norms,
zero biases, zero padding row), generated per tensor from the seed and the tensor's index.

How a feature is planted. tca pairs MLPs of equal width only, so the target cannot append
neurons; instead the base's MLP in a planted layer has free *slots*, neurons whose gate and up
rows and down column are zero and so add exactly nothing, and the target writes one planted
neuron into each. Delta in that layer is then the sum of the planted neurons' outputs and every
other weight of the pair is bit-identical. A feature that fires on the token types T gets

    w = sum over t in T of w_t,   where w_t . mu_s = [t == s] for the mean MLP inputs mu_s of
                                  every token type s of the data (the pseudo-inverse of their matrix)
    gate = gain * w,   up = w,   down = (amp / gain) * v,

so on a token of T, w . x is near 1 and the neuron outputs about amp * v; on any other token
w . x is near 0 (what is left is the context's share of x) and silu(gain * w . x) * (w . x)
nearly vanishes. ``amp`` is ``scale`` times the layer's mean MLP input norm. The output
directions ``v`` of a layer are unit vectors with pairwise cosine exactly ``cosine``.

The truth's activation of a planted neuron on a token is ``a = silu(gate . x) * (up . x) *
||down||`` with x the target's MLP input there, so the neuron's output is ``a * v``. It *fires*
where ``|a| > fire_frac * max |a|`` over the data.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from tca import TcaError
from tca.cache.capture import mlp_inputs
from tca.cache.harvest import HarvestConfig, batch_inputs, plan_batches
from tca.cache.models import (
    decoder_layers,
    find_model,
    live_mlps,
    load_base_mlps,
    load_model,
    load_tokenizer,
    mlp_forward,
)
from tca.cache.plan import Plan, PlanConfig, build_plan
from tca.cache.store import torch_dtype
from tca.toy.tokenizer import train_tokenizer

log = logging.getLogger(__name__)

ROLES = ("base", "target")
TRUTH_JSON, TRUTH_TENSORS = "truth.json", "truth.safetensors"
TRUTH_FORMAT, TRUTH_VERSION = "tca-planted-truth", 1
_NOISE_STREAM = 1  # generator stream of the target's noise, beside the init's stream 0


@dataclass(frozen=True)
class PairShape:
    """The architecture and storage of a pair."""

    hidden: int = 64
    """d_model."""
    intermediate: int = 128
    """Width of each MLP."""
    layers: int = 4
    """Decoder layers."""
    heads: int = 4
    """Attention heads."""
    kv_heads: int = 2
    """Key/value heads (grouped-query attention)."""
    vocab: int | None = None
    """Rows of the embedding and unembedding; None: the tokenizer's length. Larger than the
    tokenizer is fine (Qwen2.5-7B pads 151665 tokens to 152064 rows)."""
    dtype: str = "float32"
    """dtype the weights are saved in (config.json's ``dtype``): float32, bfloat16 or float16."""
    shards: int = 1
    """Safetensors files per model: 1 writes ``model.safetensors``, more write shards of about
    equal size with ``model.safetensors.index.json``."""
    init_std: float = 0.02
    """Standard deviation of the linear weights (Hugging Face's ``initializer_range``)."""
    embed_std: float = 0.02
    """Standard deviation of the token embeddings. At Hugging Face's 0.02 the attention's share of
    the MLP input outgrows the token's from the second layer on (d=128); larger values keep each
    token type a direction of x in every layer."""
    max_positions: int = 512
    """max_position_embeddings."""


QWEN2_7B = PairShape(hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, vocab=152064,
                     dtype="bfloat16", shards=4, max_positions=4096)
"""The shape of Qwen2.5-Math-7B / DeepSeek-R1-Distill-Qwen-7B (15 GB per model in bf16)."""


def qwen2_config(shape: PairShape, tokenizer) -> Qwen2Config:
    vocab = shape.vocab or len(tokenizer)
    if vocab < len(tokenizer):
        raise TcaError(f"vocab {vocab} is smaller than the tokenizer's {len(tokenizer)} tokens.")
    if shape.hidden % shape.heads or shape.heads % shape.kv_heads:
        raise TcaError(f"hidden {shape.hidden}, heads {shape.heads} and kv_heads {shape.kv_heads} do not divide evenly.")
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions,
        initializer_range=shape.init_std,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.dtype = torch_dtype(shape.dtype)
    return config


def tensor_shapes(config: Qwen2Config) -> list[tuple[str, torch.Size]]:
    """Every saved tensor's name and shape, in state-dict order, without allocating any."""
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    return [(name, t.shape) for name, t in model.state_dict().items()]


def _generator(seed: int, index: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + 2 * index + stream)


def base_tensors(config: Qwen2Config, shape: PairShape, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The random base's tensors in float32, one at a time, each from its own generator."""
    for index, (name, size) in enumerate(tensor_shapes(config)):
        if name.endswith("norm.weight"):
            yield name, torch.ones(size)
        elif name.endswith(".bias"):
            yield name, torch.zeros(size)
        else:
            std = shape.embed_std if name == "model.embed_tokens.weight" else shape.init_std
            tensor = torch.randn(size, generator=_generator(seed, index, 0)) * std
            if name == "model.embed_tokens.weight" and config.pad_token_id is not None:
                tensor[config.pad_token_id] = 0  # as nn.Embedding(padding_idx=pad) starts
            yield name, tensor


class _ModelWriter:
    """Writes one model folder; tensors arrive in state-dict order and leave memory shard by shard."""

    def __init__(self, path: Path, config: Qwen2Config, tokenizer, shape: PairShape):
        self.path, self.dtype = Path(path), torch_dtype(shape.dtype)
        if self.path.exists() and any(self.path.iterdir()):
            # weights of another build left beside these would be loaded in their place
            raise TcaError(f"{self.path} already holds files; write the pair into an empty folder.")
        self.path.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(self.path)
        GenerationConfig.from_model_config(config).save_pretrained(self.path)
        tokenizer.save_pretrained(self.path)
        sizes = [(name, math.prod(size) * self.dtype.itemsize) for name, size in tensor_shapes(config)]
        total = sum(n for _, n in sizes)
        # contiguous shards of about total / shards bytes; a tensor larger than a share can leave
        # fewer shards than asked, which are then numbered without gaps
        raw, at = [], 0
        for _, nbytes in sizes:
            raw.append(min(shape.shards - 1, at * shape.shards // total))
            at += nbytes
        used = sorted(set(raw))
        if len(used) < shape.shards:
            log.warning("%s: %d shards instead of %d (single tensors exceed a shard's share)", path, len(used), shape.shards)
        self.n_shards = len(used)
        self.shard_of = {name: used.index(r) for (name, _), r in zip(sizes, raw)}
        self.last_of = {self.shard_of[name]: name for name, _ in sizes}
        self.total_size, self.pending = total, {}

    def file(self, shard: int) -> str:
        return "model.safetensors" if self.n_shards == 1 else f"model-{shard + 1:05d}-of-{self.n_shards:05d}.safetensors"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.pending[name] = tensor.to(self.dtype).contiguous()
        shard = self.shard_of[name]
        if self.last_of[shard] == name:
            save_file(self.pending, str(self.path / self.file(shard)), metadata={"format": "pt"})
            self.pending = {}
            if shard == self.n_shards - 1 and self.n_shards > 1:
                index = {"metadata": {"total_size": self.total_size},
                         "weight_map": {n: self.file(s) for n, s in self.shard_of.items()}}
                (self.path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_model(path: Path, config: Qwen2Config, tokenizer, shape: PairShape,
                tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write a whole model folder from tensors held in memory (cast to ``shape.dtype``)."""
    writer = _ModelWriter(path, config, tokenizer, shape)
    for name, _ in tensor_shapes(config):
        writer.add(name, tensors[name])
    return Path(path)


def build_random_pair(out: Path, shape: PairShape, tokenizer, *, seed: int = 0, mlp_noise: float = 0.3,
                      other_noise: float = 0.02) -> tuple[Path, Path]:
    """Write ``out/base`` and ``out/target`` (see the module docstring) and return their paths.

    The target adds Gaussian noise to every base tensor, ``mlp_noise`` (MLP weights) or
    ``other_noise`` (all others) times that tensor's standard deviation (at least 1e-3, so norms
    and zero biases move too; in bfloat16 the norms' 1 + 2e-5 rounds back to 1). ``tokenizer`` is saved with both: ``tca.toy.tiny.tiny_tokenizer()``
    for the toy one, or any Hugging Face tokenizer.
    """
    out = Path(out)
    config = qwen2_config(shape, tokenizer)
    writers = [_ModelWriter(out / role, config, tokenizer, shape) for role in ROLES]
    for index, (name, base) in enumerate(base_tensors(config, shape, seed)):
        scale = mlp_noise if ".mlp." in name else other_noise
        noise = torch.randn(base.shape, generator=_generator(seed, index, _NOISE_STREAM))
        writers[0].add(name, base)
        writers[1].add(name, base + scale * base.std().clamp_min(1e-3) * noise)
    return out / "base", out / "target"


# ---- planted pairs -----------------------------------------------------------------------------


def pseudo_words(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct lowercase two-syllable words ("kalo", "mesu", ...), a language whose every
    word the ``word_tokenizer`` makes one token: data written in it sets each token type's
    frequency exactly."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    if n > len(syllables) ** 2:
        raise TcaError(f"at most {len(syllables) ** 2} pseudo-words exist; asked for {n}.")
    g = np.random.default_rng(seed)
    pairs = g.permutation(len(syllables) ** 2)[:n]
    return [syllables[p // len(syllables)] + syllables[p % len(syllables)] for p in pairs]


def word_tokenizer(words: list[str]):
    """A byte-level BPE (the toy tokenizer's pipeline) in which `` word`` is one token for every
    word; refuses when one is not (a text of words joined by spaces then tokenizes word by word)."""
    corpus = [" " + " ".join(words[i:] + words[:i]) for i in range(0, len(words), max(1, len(words) // 20))]
    # 256 bytes, the special tokens and at most one merge per letter of every word
    tokenizer = train_tokenizer(corpus, 300 + sum(len(w) + 1 for w in words))
    split = [w for w in words if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) != 1]
    if split:
        raise TcaError(f"the tokenizer splits {len(split)} words, e.g. {split[0]!r}.")
    return tokenizer


def word_ids(tokenizer, words: list[str]) -> list[int]:
    """The token id of `` word`` for each word."""
    return [tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in words]


@dataclass
class PlantSpec:
    """What the target adds to the base."""

    features: dict[int, list[list[int]]]
    """Planted layer -> one list per planted feature of the token ids it fires on. Two features
    sharing a token id co-fire there."""
    noise_layers: list[int] = field(default_factory=list)
    """Layers whose MLP weights all get small dense noise (a layer that changed a little everywhere)."""
    noise: float = 0.02
    """That noise's standard deviation, relative to each weight matrix's."""
    cosine: float = 0.0
    """Pairwise cosine of the planted output directions within a layer, in [0, 1)."""
    scale: float = 0.5
    """A planted neuron's output norm where it fires, relative to the layer's mean MLP input norm
    ||x||. The demo pair's delta is 0.5-1.2 times ||x|| per token; a random base's own MLP output
    is near 0.01 times ||x||, too small a yardstick."""
    gain: float = 8.0
    """Gain of the planted gates: large enough that silu acts as a switch."""
    fire_frac: float = 0.1
    """A planted neuron fires where |a| exceeds this fraction of its maximum over the data."""

    def __post_init__(self):
        self.features = {int(k): [list(map(int, f)) for f in v] for k, v in self.features.items()}
        self.noise_layers = [int(layer) for layer in self.noise_layers]


@dataclass
class PlantedPair:
    base: Path
    target: Path
    truth: Path
    """truth.json (beside truth.safetensors)."""


def build_planted_pair(out: Path, shape: PairShape, tokenizer, spec: PlantSpec, data: PlanConfig, *,
                       seed: int = 0, batch_tokens: int = HarvestConfig.batch_tokens) -> PlantedPair:
    """Write ``out/base``, ``out/target`` and the truth on every token of ``data``.

    The planted neurons are aligned with the MLP inputs the target computes on ``data``, and the
    truth is measured there: the target as saved runs in its own dtype, batched as the harvester
    batches (``batch_tokens``), so its x is the x a harvest of ``data`` stores.
    """
    out = Path(out)
    config = qwen2_config(shape, tokenizer)
    changed = set(spec.features) | set(spec.noise_layers)
    if set(spec.features) & set(spec.noise_layers) or any(not 0 <= layer < shape.layers for layer in changed):
        raise TcaError(f"planted {sorted(spec.features)} and noise {spec.noise_layers} layers must be distinct layers of {shape.layers}.")
    if not 0 <= spec.cosine < 1:
        raise TcaError(f"cosine must be in [0, 1), got {spec.cosine}.")
    g = torch.Generator().manual_seed(seed * 1_000_003 + 999_983)
    tensors = dict(base_tensors(config, shape, seed))
    slots, directions = {}, {}
    for layer, feats in sorted(spec.features.items()):
        n = len(feats)
        if n + 1 > min(shape.hidden, shape.intermediate):
            raise TcaError(f"layer {layer}: {n} planted features need hidden and intermediate sizes above {n}.")
        slots[layer] = sorted(torch.randperm(shape.intermediate, generator=g)[:n].tolist())
        directions[layer] = _directions(n, shape.hidden, spec.cosine, g)
        prefix = f"model.layers.{layer}.mlp."
        tensors[prefix + "gate_proj.weight"][slots[layer]] = 0
        tensors[prefix + "up_proj.weight"][slots[layer]] = 0
        tensors[prefix + "down_proj.weight"][:, slots[layer]] = 0
    base_dir = write_model(out / "base", config, tokenizer, shape, tensors)

    # the planting sees the base as saved (rounded to its dtype) and computes in float32
    model = Qwen2ForCausalLM(config).eval()
    model.load_state_dict({k: v.to(config.dtype).float() for k, v in tensors.items()})
    plan = build_plan(_all_tokens(data), tokenizer)
    pad_id = tokenizer.pad_token_id or 0
    with torch.no_grad():
        for layer in sorted(changed):
            mlp = decoder_layers(model)[layer].mlp
            if layer in spec.noise_layers:
                for proj in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                    proj.weight += spec.noise * proj.weight.std() * torch.randn(proj.weight.shape, generator=g)
                continue
            x = plan_inputs(model, plan, [layer], batch_tokens, pad_id)[layer]
            w = _detectors(x, plan.token_ids, spec.features[layer], layer)
            amp = spec.scale * x.norm(dim=-1).mean()
            s = slots[layer]
            mlp.gate_proj.weight[s] = spec.gain * w
            mlp.up_proj.weight[s] = w
            mlp.down_proj.weight[:, s] = (amp / spec.gain) * directions[layer].T
    target_dir = write_model(out / "target", config, tokenizer, shape, model.state_dict())
    truth = measure_truth(base_dir, target_dir, spec, slots, data, batch_tokens)
    truth.meta |= {"seed": seed, "shape": dataclasses.asdict(shape)}
    return PlantedPair(base_dir, target_dir, truth.save(out))


def _all_tokens(data: PlanConfig) -> PlanConfig:
    """``data`` with every token a row: the truth covers all tokens, whatever a harvest keeps."""
    return dataclasses.replace(data, keep_frac=1.0, skip_sinks=False)


def plan_inputs(model: torch.nn.Module, plan: Plan, layers: list[int], batch_tokens: int, pad_id: int) -> dict[int, torch.Tensor]:
    """[rows, d] MLP inputs of ``layers`` on the plan's rows, batched as the harvester batches."""
    parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for batch in plan_batches(plan, batch_tokens):
        ids, mask, select = batch_inputs(plan, batch, pad_id)
        inputs = mlp_inputs(model, layers, ids, mask)
        for layer in layers:
            parts[layer].append(inputs[layer].reshape(-1, inputs[layer].shape[-1])[select])
    return {layer: torch.cat(p) for layer, p in parts.items()}


def _directions(n: int, d: int, cosine: float, g: torch.Generator) -> torch.Tensor:
    """[n, d] unit vectors with pairwise cosine exactly ``cosine``: a shared component of weight
    sqrt(cosine) over orthonormal ones."""
    q, _ = torch.linalg.qr(torch.randn(d, n + 1, generator=g, dtype=torch.float64))
    v = math.sqrt(cosine) * q[:, :1].T + math.sqrt(1 - cosine) * q[:, 1:].T
    return v.float()


def _detectors(x: torch.Tensor, token_ids: np.ndarray, features: list[list[int]], layer: int) -> torch.Tensor:
    """[n, d]: per feature, a direction w with w . x near 1 on its token types and near 0 on every
    other token type of the data (the dual basis of the token types' mean inputs)."""
    types, inverse = np.unique(token_ids, return_inverse=True)
    inverse = torch.from_numpy(inverse)
    x = x.double()
    counts = torch.bincount(inverse, minlength=len(types)).double()
    means = torch.zeros(len(types), x.shape[1], dtype=torch.float64).index_add_(0, inverse, x) / counts[:, None]
    if len(types) > x.shape[1]:
        log.warning("layer %d: %d token types in the data exceed d=%d; planted features will also fire "
                    "weakly on other types", layer, len(types), x.shape[1])
    dual = torch.linalg.pinv(means)  # [d, types]: means @ dual = I when the means are independent
    column = {int(t): i for i, t in enumerate(types)}
    missing = sorted({t for f in features for t in f if t not in column})
    if missing:
        raise TcaError(f"layer {layer}: planted token ids {missing} never occur in the data.")
    return torch.stack([sum(dual[:, column[t]] for t in f) for f in features]).float()


# ---- the truth ---------------------------------------------------------------------------------


@dataclass
class Truth:
    """What was planted and how it behaves on the data: ``meta`` is truth.json, ``acts`` holds
    per planted layer the [tokens, features] activations ``a`` (global token index of the data)."""

    meta: dict
    acts: dict[int, torch.Tensor]

    @property
    def fire_frac(self) -> float:
        return self.meta["fire_frac"]

    def layers(self, role: str) -> list[int]:
        """Layers of a role: ``planted``, ``noise`` or ``unchanged``."""
        return sorted(int(k) for k, v in self.meta["layers"].items() if v["role"] == role)

    def directions(self, layer: int) -> torch.Tensor:
        """[features, d] unit output directions of a planted layer."""
        return torch.tensor([f["direction"] for f in self.meta["layers"][str(layer)]["features"]])

    def firing(self, layer: int) -> torch.Tensor:
        """[tokens, features] bool: where each planted neuron fires."""
        return firing(self.acts[layer], self.fire_frac)

    def save(self, folder: Path) -> Path:
        save_file({f"layers.{k}.acts": v.contiguous() for k, v in self.acts.items()}, str(Path(folder) / TRUTH_TENSORS))
        path = Path(folder) / TRUTH_JSON
        path.write_text(json.dumps(self.meta, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Truth:
        """From truth.json (or the folder holding it)."""
        path = Path(path)
        path = path / TRUTH_JSON if path.is_dir() else path
        meta = json.loads(path.read_text())
        if meta.get("format") != TRUTH_FORMAT or meta.get("version") != TRUTH_VERSION:
            raise TcaError(f"{path} is not a planted truth of version {TRUTH_VERSION}.")
        tensors = load_file(str(path.parent / meta["activations"]))
        return cls(meta, {int(k.split(".")[1]): v for k, v in tensors.items()})


def firing(acts: torch.Tensor, fire_frac: float) -> torch.Tensor:
    """Where |a| exceeds ``fire_frac`` of each column's maximum |a|."""
    mag = acts.abs()
    return mag > fire_frac * mag.amax(0, keepdim=True)


@torch.no_grad()
def measure_truth(base: Path, target: Path, spec: PlantSpec, slots: dict[int, list[int]], data: PlanConfig,
                  batch_tokens: int) -> Truth:
    """The truth of a written pair on ``data``: the saved weights, the target in its own dtype."""
    base_src, target_src = find_model(str(base)), find_model(str(target))
    tokenizer = load_tokenizer(target_src)
    plan = build_plan(_all_tokens(data), tokenizer)
    # the dtype it was saved in, as a harvest on any device runs it
    model = load_model(target_src, torch_dtype(target_src.config["dtype"]), torch.device("cpu"))
    layers = list(range(target_src.n_layers))
    xs = plan_inputs(model, plan, layers, batch_tokens, tokenizer.pad_token_id or 0)
    act = target_src.config.get("hidden_act", "silu")
    base_mlps, target_mlps = load_base_mlps(base_src, layers), live_mlps(model, layers, act)
    ids = torch.from_numpy(plan.token_ids.astype(np.int64))
    meta_layers, acts = {}, {}
    for layer in layers:
        x = xs[layer].float()
        y_base = mlp_forward(base_mlps[layer], x)
        delta = mlp_forward(target_mlps[layer], x) - y_base
        entry = {"relative_delta": float(delta.norm(dim=-1).sum() / y_base.norm(dim=-1).sum().clamp_min(1e-30))}
        if layer in spec.features:
            w, s = target_mlps[layer], slots[layer]
            down = w.down[:, s].float()
            a = F.silu(x @ w.gate[s].float().T) * (x @ w.up[s].float().T) * down.norm(dim=0)
            v = (down / down.norm(dim=0)).T
            fires = firing(a, spec.fire_frac)
            on_types = torch.stack([torch.isin(ids, torch.tensor(f)) for f in spec.features[layer]], 1)
            entry |= {
                "role": "planted",
                "true_l0": float(fires.sum(1).double().mean()),
                # the share of delta the planted neurons do not account for (float rounding only)
                "residual": float((delta - a @ v).norm() / delta.norm().clamp_min(1e-30)),
                "features": [
                    {
                        "slot": s[j], "tokens": spec.features[layer][j],
                        "pieces": [tokenizer.decode([t]) for t in spec.features[layer][j]],
                        "direction": v[j].tolist(), "max": float(a[:, j].abs().max()),
                        "n_firing": int(fires[:, j].sum()), "frequency": float(fires[:, j].double().mean()),
                        # firings on its token types / all its firings, and the converse
                        "purity": float((fires[:, j] & on_types[:, j]).sum() / fires[:, j].sum().clamp_min(1)),
                        "coverage": float((fires[:, j] & on_types[:, j]).sum() / on_types[:, j].sum().clamp_min(1)),
                    }
                    for j in range(len(s))
                ],
            }
            acts[layer] = a
        else:
            entry["role"] = "noise" if layer in spec.noise_layers else "unchanged"
        meta_layers[str(layer)] = entry
    meta = {
        "format": TRUTH_FORMAT, "version": TRUTH_VERSION, "fire_frac": spec.fire_frac,
        "fires": "a planted neuron's output is a * direction with a = silu(gate . x) * (up . x) * ||down||; "
                 "it fires on a token where |a| > fire_frac * max |a| over the data",
        "activations": TRUTH_TENSORS,
        "data": {"path": str(data.data), "n_tokens": plan.n_tokens, "n_docs": plan.n_docs, "fingerprint": plan.fingerprint},
        "spec": dataclasses.asdict(spec),
        "layers": meta_layers,
    }
    return Truth(meta, acts)
