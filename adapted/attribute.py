"""Attribution of a chosen token's logit to adapter features: gradient x activation.

For a token (``Wait``) the positions are the real positions of the data where the *target*
model's greedy next-token prediction is that token: where the fine-tuned model would say it.
There the adapted model's logit of the token, summed over those positions,

    L = sum_p logit_p(token)

is differentiated with respect to every adapter activation ``a[q, l, f]`` (all layers at once,
through the whole adapted model), and each feature's score is

    score(l, f) = sum_q a[q, l, f] * dL / da[q, l, f]

over every real position ``q`` (a feature at an earlier token reaches the logit through
attention). This is the first-order change of ``L`` when the feature is scaled by ``s`` at
every position, ``dL/ds`` at ``s = 1``, so ablating a feature moves ``L`` by about ``-score``:
positive scores promote the token, negative ones suppress it. Features are ranked by score;
``mean_score`` is the score per attributed position.

With ``contrast`` the objective is the token's logit *minus* the logit of what the target would
say instead (its most likely other token at that position), ``L = sum_p logit_p(token) −
logit_p(alternative_p)``. A feature that merely marks the context (a line start, where a
hesitation and the next step are both possible) raises both and scores near zero; what
remains are the features that decide *between* hesitating and going on.

Only the activations are differentiated: no parameter takes a gradient. They become part of
the graph through an observer in ``AdaptedMLP.acts_hooks``, which hands the activations back
(the first adapted layer's as a fresh leaf, since nothing upstream of it needs a gradient).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from tca import Device, ModelDtype, TcaError
from tca.adapted.batches import TokenBatch, token_batches
from tca.adapted.generation import workload
from tca.adapted.intervene import forward_logits, single_token_ids
from tca.adapted.splice import AdaptedMLP, adapted_mlps, load_adapted, set_mode, target_tokenizer
from tca.cache.layers import select_layers
from tca.cache.threads import DEFAULT_THREADS, command_threads
from tca.ranges import POSITIVE, at_least, check_ranges
from tca.train.checkpoint import named_set

log = logging.getLogger(__name__)


@dataclass
class AttributionResult:
    """Per-feature attribution of one token's logit, summed over the attributed positions."""

    token_id: int
    n_positions: int
    """Real positions where the target model predicts the token (the positions attributed)."""
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    """Per layer, [F] float64: sum of gradient x activation (see the module docstring)."""
    active: dict[int, torch.Tensor] = field(default_factory=dict)
    """Per layer, [F] int64: attributed positions where the feature is active (nonzero)."""

    def ranking(self, top: int | None = None) -> list[dict]:
        """Every (layer, feature), highest score first (ties by layer, feature), ``top`` of them."""
        rows = [
            (float(s), layer, f)
            for layer, scores in sorted(self.scores.items())
            for f, s in enumerate(scores.tolist())
        ]
        rows.sort(key=lambda r: (-r[0], r[1], r[2]))
        n = max(self.n_positions, 1)
        return [
            {"rank": rank, "layer": layer, "feature": f, "score": s, "mean_score": s / n,
             "n_active": int(self.active[layer][f]), "n_positions": self.n_positions}
            for rank, (s, layer, f) in enumerate(rows[:top] if top is not None else rows, start=1)
        ]


def attribute(model: nn.Module, batches: list[TokenBatch], token_id: int,
              layers: list[int] | None = None, contrast: bool = False) -> AttributionResult:
    """Gradient x activation of ``token_id``'s logit for every feature of ``layers`` (default: all
    layers with an adapter). ``model`` must be loaded with ``keep_target=True``; its modes and
    parameters' ``requires_grad`` are as before afterwards."""
    mlps = adapted_mlps(model)
    if any(m.target_mlp is None for m in mlps.values()):
        raise TcaError("attribution needs the target's own MLPs; load with adapted_model(..., keep_target=True).")
    with_adapter = [i for i, m in mlps.items() if m.adapter is not None]
    layers = with_adapter if layers is None else list(layers)
    missing = [layer for layer in layers if layer not in with_adapter]
    if missing:
        raise TcaError(f"there is no adapter at layer {missing[0]}; the adapters cover {with_adapter}.")
    result = AttributionResult(token_id, 0)
    for layer in layers:
        n_features = mlps[layer].adapter.cfg.n_features
        result.scores[layer] = torch.zeros(n_features, dtype=torch.float64)
        result.active[layer] = torch.zeros(n_features, dtype=torch.int64)
    modes = {i: m.mode for i, m in mlps.items()}
    needs_grad = {p: p.requires_grad for p in model.parameters()}
    captured: dict[int, torch.Tensor] = {}

    def observer(layer: int):
        def hook(_mlp: AdaptedMLP, acts: torch.Tensor) -> torch.Tensor:
            if not acts.requires_grad:  # nothing upstream is differentiated: a leaf loses no path
                acts = acts.detach().requires_grad_(True)
            captured[layer] = acts
            return acts
        return hook

    hooks = {layer: observer(layer) for layer in layers}
    try:
        for p in needs_grad:
            p.requires_grad_(False)
        for layer, hook in hooks.items():
            mlps[layer].acts_hooks.append(hook)
        for batch in tqdm(batches, desc="attribute", leave=False):
            with torch.no_grad():
                set_mode(model, "target")
                logits = forward_logits(model, batch)
            at = (logits.argmax(-1) == token_id) & batch.attention_mask.to(logits.device).bool()
            if not at.any():
                continue
            alternative = logits.index_fill(-1, torch.tensor([token_id], device=logits.device), float("-inf")).argmax(-1)
            set_mode(model, "adapted")
            captured.clear()
            with torch.enable_grad():
                logits = forward_logits(model, batch)
                chosen = logits[..., token_id][at].float().sum()
                if contrast:
                    chosen = chosen - logits.gather(-1, alternative[..., None])[..., 0][at].float().sum()
                grads = torch.autograd.grad(chosen, [captured[layer] for layer in layers])
            real = batch.attention_mask.to(logits.device).bool()
            for layer, grad in zip(layers, grads):
                acts = captured[layer].detach()
                result.scores[layer] += (acts * grad)[real].double().sum(0).cpu()
                result.active[layer] += (acts[at] != 0).sum(0).cpu()
            result.n_positions += int(at.sum())
    finally:
        for layer, hook in hooks.items():
            mlps[layer].acts_hooks.remove(hook)
        for p, flag in needs_grad.items():
            p.requires_grad_(flag)
        for i, m in modes.items():
            set_mode(model, m, [i])
        captured.clear()
    if result.n_positions == 0:
        log.warning("the target model never predicts token %d on these data; every score is 0", token_id)
    return result


# ---- the command ---------------------------------------------------------------------------------


@dataclass
class AttributionConfig:
    """``tca attribute``: rank adapter features by their attribution to one token's logit."""

    adapters: str
    """Adapter set directory; ``NAME=DIR`` names it as in the index (default: the directory's name)."""
    base: str
    """Base model: local directory or Hugging Face id (only its MLPs are read)."""
    target: str
    """Target model: local directory or Hugging Face id (backbone, its own MLPs for the positions,
    tokenizer)."""
    data: str
    """JSONL or Parquet conversations or texts, rendered as the harvester renders them."""
    token: str = field(metadata={"flag": ("--target-token",)})
    """The token whose logit is attributed (one token of the target's tokenizer)."""
    layers: str = "all"
    """``all`` (every layer with an adapter) or a list like ``0,3,5-7``."""
    max_tokens: int | None = field(default=20_000, metadata=POSITIVE)
    """Tokens read from ``data`` (None: all)."""
    seq_len: int = field(default=1024, metadata=at_least(2))
    """Tokens kept per document."""
    batch: int = field(default=8, metadata=POSITIVE)
    """Documents per forward and backward pass."""
    dtype: ModelDtype = "auto"
    """``auto`` (the checkpoint's dtype on CUDA, float32 on CPU), ``float32``, ``bfloat16`` or
    ``float16``: the models' weights and activations; the one chosen is written into the report."""
    device: Device = "auto"
    """``auto``, ``cpu`` or ``cuda``."""
    contrast: bool = False
    """Attribute the token's logit minus that of the target's most likely other token there."""
    top: int = field(default=20, metadata=POSITIVE)
    """Features shown."""
    threads: int = field(default=DEFAULT_THREADS, metadata=POSITIVE)
    """torch threads on the CPU, fixed whatever the machine's load (``tca.cache.threads``: more than
    one thrashed a busy 2-core machine); recorded in the summary."""

    def __post_init__(self):
        check_ranges(self)


@dataclass
class AttributionRun:
    """One ``tca attribute`` run: the result and what it ran on."""

    adapter: str
    """The adapter set's name, as the index names it."""
    token: str
    result: AttributionResult
    layers: list[int]
    n_tokens: int
    """Real tokens of the data read."""
    dtype: str
    """The dtype the model ran in (``--dtype auto`` resolved)."""
    threads: int
    """torch threads on the CPU (``AttributionConfig.threads``)."""

    def summary(self, top: int) -> dict:
        return {
            "adapter": self.adapter, "token": self.token, "token_id": self.result.token_id, "layers": self.layers,
            "n_tokens": self.n_tokens, "n_positions": self.result.n_positions, "dtype": self.dtype,
            "threads": self.threads,
            "top": self.result.ranking(top),
        }


@command_threads
def run_attribution(cfg: AttributionConfig) -> AttributionRun:
    """Load the models and data named by ``cfg`` and attribute the token's logit."""
    name, path = named_set(cfg.adapters)
    tokenizer = target_tokenizer(cfg.target)
    (token_id,) = single_token_ids(tokenizer, [cfg.token])
    batches = token_batches(cfg.data, tokenizer, seq_len=cfg.seq_len, max_tokens=cfg.max_tokens, batch=cfg.batch)
    model = load_adapted(path, cfg.base, cfg.target, device=cfg.device, dtype=cfg.dtype, keep_target=True,
                         work=workload("attribute", batches))
    with_adapter = [i for i, m in adapted_mlps(model).items() if m.adapter is not None]
    layers = select_layers(cfg.layers, with_adapter, "the adapters cover")
    result = attribute(model, batches, token_id, layers, contrast=cfg.contrast)
    return AttributionRun(name, cfg.token, result, layers, sum(b.n_tokens for b in batches),
                          str(model.dtype).removeprefix("torch."), cfg.threads)
