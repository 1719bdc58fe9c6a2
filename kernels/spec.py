"""Checks shared by the sparse entry point and its dense reference."""

from __future__ import annotations

import torch
from torch import Tensor

from tca import TcaError

from .activations import ACTIVATIONS, TOP_K


def check_inputs(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor | None,
                 activation: str, k: int | None, threshold: Tensor | None,
                 dead_mask: Tensor | None, k_aux: int | None) -> int:
    """Raise TcaError on inputs that do not form one adapter; return the aux k to use."""
    if activation not in ACTIVATIONS:
        raise TcaError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    if x.ndim != 2 or W_enc.ndim != 2:
        raise TcaError(f"x must be [B, d] and W_enc [d, F], got {tuple(x.shape)} and {tuple(W_enc.shape)}")
    d, n_features = W_enc.shape
    expected = {"x": (x.shape[0], d), "b_enc": (n_features,), "W_dec": (n_features, d)}
    if b_dec is not None:
        expected["b_dec"] = (d,)
    given = {"x": x, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    for name, shape in expected.items():
        if tuple(given[name].shape) != shape:
            raise TcaError(f"{name} has shape {tuple(given[name].shape)}; with W_enc {tuple(W_enc.shape)} it must be {shape}")
    tensors = [t for t in (x, W_enc, b_enc, W_dec, b_dec) if t is not None]
    if len({t.dtype for t in tensors}) > 1 or len({t.device for t in tensors}) > 1:
        raise TcaError("x, W_enc, b_enc, W_dec and b_dec must share one dtype and one device")
    if x.requires_grad:
        raise TcaError("x must not require grad: the adapter kernels never form a gradient for their input")
    if activation in TOP_K and threshold is None and not (k is not None and 1 <= k <= n_features):
        raise TcaError(f"{activation} needs k between 1 and the width {n_features}, got {k}")
    if activation == "jumprelu" and (threshold is None or threshold.shape != (n_features,)):
        raise TcaError(f"jumprelu needs a per-feature threshold of shape ({n_features},)")
    if activation == "batchtopk" and threshold is not None and threshold.numel() != 1:
        raise TcaError("a batchtopk inference threshold must be a single number")
    if dead_mask is None:
        return 0
    if dead_mask.shape != (n_features,) or dead_mask.dtype != torch.bool:
        raise TcaError(f"dead_mask must be a bool tensor of shape ({n_features},)")
    # Default from Gao et al. (2024), appendix B.1: half the model dimension.
    return min(k_aux if k_aux is not None else d // 2, n_features)
