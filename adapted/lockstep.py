"""Several residual streams of one adapted model, run layer by layer in lockstep.

End-to-end refinement compares, on the same tokens, the target model with the fully adapted
model and with *mixed* models cut at a layer k. All of them share the embeddings, attention,
norms and unembedding of ``adapted_model(..., keep_target=True)`` and differ only in which MLP
each layer computes, so one walk over ``model.model.layers`` carries every stream:

    T          target MLPs everywhere                        (no gradient: the reference)
    A          adapted MLPs everywhere
    mix1[k]    A's state before layer k, then target layers   ("adapted below k, target from k")
    mix2[k]    T's state before layer k (detached), then adapted layers ("target below k, ...")

so ``k = 0`` makes mix1 the target and mix2 the adapted model, and ``k = L`` the reverse.

Memory stays that of one stream's layer boundaries: each layer call runs under
``torch.utils.checkpoint`` (the MLP mode is set *inside* the checkpointed function, since it is
module state and the recomputation in backward must see the same mode), and what the loss needs
from inside a layer comes out of that call as scalars: A's squared error against T's layer
output (the NMSE numerator), the decoder-norm-weighted L1 of A's activations and their L0
count, all over real (unpadded) tokens. No list of hidden states is kept. The KL of each stream
against T is computed from the final hidden states in chunks of tokens, each chunk's final
norm, unembedding and log-softmax checkpointed too, so full-vocabulary logits exist for one
chunk at a time.

The embeddings, rotary position embeddings and causal + padding mask are built as
``Qwen2Model.forward`` builds them (transformers 5), so T's and A's logits equal
``model(...).logits`` in target and adapted mode (tested).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from tca.adapted.splice import AdaptedMLP
from tca.train.metrics import next_token_kl

KL_CHUNK_TOKENS = 2048
"""Tokens whose full-vocabulary logits are alive at once (two streams: ~2 x 2048 x 152k floats
for Qwen2 7B)."""


@dataclass
class StreamsOut:
    """Sums over the real tokens of one batch; divide by ``tokens`` for means."""

    tokens: int
    """Real (unpadded) tokens."""
    kl_adapted: torch.Tensor
    """Σ KL(T ‖ A) over real tokens."""
    kl_mix: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """Per cut-off k: (Σ KL(T ‖ mix1[k]), Σ KL(T ‖ mix2[k]))."""
    sq_err: list[torch.Tensor] = field(default_factory=list)
    """Per layer: Σ ‖h_A − h_T‖² of the layer's output."""
    sq_target: list[torch.Tensor] = field(default_factory=list)
    """Per layer: Σ ‖h_T‖²."""
    l1: dict[int, torch.Tensor] = field(default_factory=dict)
    """Per adapted layer of A: Σ over tokens of acts · ‖W_dec rows‖ / loss_scale (relu only)."""
    active: dict[int, torch.Tensor] = field(default_factory=dict)
    """Per adapted layer of A: Σ over tokens of nonzero features (L0 · tokens)."""

    @property
    def nmse(self) -> torch.Tensor:
        """Mean over layers of the per-layer hidden-state NMSE of A against T."""
        return torch.stack([e / t.clamp_min(1e-30) for e, t in zip(self.sq_err, self.sq_target, strict=True)]).mean()


def _masks(model: nn.Module, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> dict:
    config = model.config
    kwargs = dict(config=config, inputs_embeds=embeds, attention_mask=attention_mask, cache=None,
                  position_ids=position_ids)
    masks = {"full_attention": create_causal_mask(**kwargs)}
    if "sliding_attention" in getattr(config, "layer_types", []):
        masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
    return masks


class _Observer:
    """Collects A's sparsity sums from inside a layer call (an ``acts_hooks`` observer)."""

    def __init__(self, keep: torch.Tensor):
        self.keep = keep
        self.l1: torch.Tensor | None = None
        self.active: torch.Tensor | None = None

    def __call__(self, mlp: AdaptedMLP, acts: torch.Tensor) -> None:
        a = mlp.adapter
        keep = self.keep.to(acts.dtype)
        if a.cfg.activation == "relu":
            weighted = acts.float() @ a.W_dec.float().norm(dim=1)
            self.l1 = (weighted * keep).sum() / a.loss_scale
        self.active = ((acts != 0).sum(-1) * self.keep).sum().detach()


def _layer(layer: nn.Module, mode: str, h: torch.Tensor, mask, cos, sin, position_ids,
           keep: torch.Tensor, h_target: torch.Tensor | None, observe: bool):
    """One decoder layer in ``mode``; with ``h_target`` also the squared error of the output
    against it, with ``observe`` the sparsity sums of the adapter."""
    mlp: AdaptedMLP = layer.mlp
    mlp.mode = mode
    observer = _Observer(keep) if observe and mlp.adapter is not None else None
    if observer is not None:
        mlp.acts_hooks.append(observer)
    try:
        out = layer(h, attention_mask=mask, position_embeddings=(cos, sin), position_ids=position_ids)
    finally:
        if observer is not None:
            mlp.acts_hooks.remove(observer)
    zero = out.new_zeros((), dtype=torch.float32)
    sq_err = zero
    if h_target is not None:
        sq_err = ((out.float() - h_target.float()).square().sum(-1) * keep).sum()
    l1 = zero if observer is None or observer.l1 is None else observer.l1
    active = zero if observer is None else observer.active.float()
    return out, sq_err, l1, active


def _kl_chunk(norm: nn.Module, head: nn.Module, h: torch.Tensor, h_target: torch.Tensor) -> torch.Tensor:
    """Σ over rows of KL(softmax(head(norm(h_target))) ‖ softmax(head(norm(h))))."""
    with torch.no_grad():
        target_logits = head(norm(h_target))
    ones = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
    return next_token_kl(target_logits, head(norm(h)), ones)


class Lockstep:
    """Runs T, A and the mixed streams of ``cutoffs`` over one batch (see the module docstring)."""

    def __init__(self, model: nn.Module, *, checkpointing: bool = True, kl_chunk: int = KL_CHUNK_TOKENS):
        self.model = model
        self.checkpointing = checkpointing
        self.kl_chunk = kl_chunk
        self.layers = list(model.model.layers)

    def _call(self, fn, *args):
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cutoffs: list[int] = (),
            autocast: torch.dtype | None = None) -> StreamsOut:
        """Sums of the loss terms over the batch's real tokens (differentiable where they depend on A)."""
        n_layers = len(self.layers)
        bad = [k for k in cutoffs if not 0 <= k <= n_layers]
        if bad:
            raise ValueError(f"cut-off {bad[0]} is outside 0..{n_layers}")
        model, inner = self.model, self.model.model
        device = input_ids.device
        ctx = torch.autocast(device.type, dtype=autocast) if autocast is not None else nullcontext()
        keep = attention_mask.to(torch.float32)
        mlps = [layer.mlp for layer in self.layers]
        modes_before = [m.mode for m in mlps]
        try:
            with ctx:
                embeds = inner.embed_tokens(input_ids)
                position_ids = torch.arange(input_ids.shape[1], device=device)[None]
                masks = _masks(model, embeds, attention_mask, position_ids)
                cos, sin = inner.rotary_emb(embeds, position_ids)
                types = model.config.layer_types
                out = StreamsOut(tokens=int(attention_mask.sum()), kl_adapted=embeds.new_zeros((), dtype=torch.float32))
                h_t, h_a = embeds.detach(), embeds
                mix1: dict[int, torch.Tensor] = {}
                mix2: dict[int, torch.Tensor] = {}
                for i, layer in enumerate(self.layers):
                    mask = masks[types[i]]
                    for k in cutoffs:
                        if k == i:
                            mix1[k], mix2[k] = h_a, h_t
                    with torch.no_grad():
                        h_t_next = _layer(layer, "target", h_t, mask, cos, sin, position_ids, keep, None, False)[0]
                    h_a, sq_err, l1, active = self._call(
                        lambda h, ht, layer=layer, mask=mask: _layer(layer, "adapted", h, mask, cos, sin, position_ids,
                                                                     keep, ht, True),
                        h_a, h_t_next)
                    out.sq_err.append(sq_err)
                    out.sq_target.append((h_t_next.float().square().sum(-1) * keep).sum())
                    if mlps[i].adapter is not None:
                        out.l1[i], out.active[i] = l1, active
                    for k in mix1:
                        for streams, m in ((mix1, "target"), (mix2, "adapted")):
                            streams[k] = self._call(
                                lambda h, layer=layer, mask=mask, m=m: _layer(layer, m, h, mask, cos, sin, position_ids,
                                                                              keep, None, False)[0],
                                streams[k])
                    h_t = h_t_next
                for k in cutoffs:  # k == L: the whole model is the prefix
                    if k == n_layers:
                        mix1[k], mix2[k] = h_a, h_t
                real = attention_mask.bool()
                h_t_real = h_t[real]
                out.kl_adapted = self._kl(h_a[real], h_t_real)
                for k in cutoffs:
                    out.kl_mix[k] = (self._kl(mix1[k][real], h_t_real), self._kl(mix2[k][real], h_t_real))
        finally:
            for m, mode in zip(mlps, modes_before, strict=True):
                m.mode = mode
        return out

    def _kl(self, h: torch.Tensor, h_target: torch.Tensor) -> torch.Tensor:
        """``_kl_chunk`` over chunks of rows; the target's logits are recomputed per chunk (and
        in backward) rather than kept, so no chunk's logits outlive it."""
        inner, head = self.model.model, self.model.lm_head
        total = h.new_zeros((), dtype=torch.float32)
        for start in range(0, h.shape[0], self.kl_chunk):
            part = slice(start, start + self.kl_chunk)
            total = total + self._call(lambda x, t: _kl_chunk(inner.norm, head, x, t), h[part], h_target[part])
        return total
