"""One target forward pass turned into rows: x, delta (and y) of the selected layers.

Forward pre-hooks on the selected layers' MLPs capture their input ``x`` (the output of the
post-attention norm); the hook of the last selected layer ends the forward by raising, so
no later layer, final norm or unembedding runs. Both MLPs are then applied to the captured
``x`` in float32, so the model's own rounding of its MLP output never leaks into ``delta``;
their weights stay in their stored dtype and are upcast one matrix at a time
(``tca.cache.models.mlp_forward``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tca.cache.models import MlpWeights, decoder_layers, mlp_forward


class _StopForward(Exception):
    """Raised by the last hook: everything after it is not needed."""


@dataclass
class PairedMlps:
    """The selected layers' base MLPs (as stored) and the target's (the loaded model's own
    tensors), on the harvest device."""

    base: dict[int, MlpWeights]
    target: dict[int, MlpWeights]

    @property
    def layers(self) -> list[int]:
        return sorted(self.base)


@torch.no_grad()
def mlp_inputs(model: torch.nn.Module, layers: list[int], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[int, torch.Tensor]:
    """``[batch, seq, d]`` MLP inputs of ``layers`` from a forward that stops after the last."""
    captured: dict[int, torch.Tensor] = {}
    last = max(layers)

    def hook_for(layer: int):
        def hook(module, args):
            captured[layer] = args[0]
            if layer == last:
                raise _StopForward

        return hook

    blocks = decoder_layers(model)
    handles = [blocks[layer].mlp.register_forward_pre_hook(hook_for(layer)) for layer in layers]
    try:
        getattr(model, "model", model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured


@torch.no_grad()
def rows_from_inputs(
    inputs: dict[int, torch.Tensor], select: torch.Tensor, mlps: PairedMlps, store_y: bool
) -> dict[int, dict[str, torch.Tensor]]:
    """x, delta (and y) of the flattened positions ``select``; x keeps the model dtype,
    delta and y are computed in float32 and rounded once to it."""
    out = {}
    for layer in mlps.layers:
        h = inputs[layer]
        x = h.reshape(-1, h.shape[-1])[select]
        y = mlp_forward(mlps.target[layer], x)
        arrays = {"x": x, "delta": (y - mlp_forward(mlps.base[layer], x)).to(x.dtype)}
        if store_y:
            arrays["y"] = y.to(x.dtype)
        out[layer] = arrays
    return out
