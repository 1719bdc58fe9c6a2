"""The settings of ``tca refine``, with the constants their defaults come from.

Like train/config.py it imports nothing heavy: the CLI builds one option per field from the
field's type, default and docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from tca.train.config import Device

REFINE_L1 = 1.0
"""``tca refine``'s L1 weight, calibrated on the demo pair (docs/train.md, Refinement)."""
RefineActivation = Literal["relu", "topk"]
"""Activations refinement trains: the reference's ReLU with its L1, and TopK."""
REFINE_ACTIVATIONS = get_args(RefineActivation)

@dataclass
class RefineConfig:
    """Everything ``tca refine`` needs; saved in the checkpoint and reused on ``--resume``."""

    base: str
    """Base model: local directory or Hugging Face id (only its MLP weights are read)."""
    target: str
    """Target model: local directory or Hugging Face id."""
    data: str
    """JSONL or Parquet of conversations or texts, rendered as the harvester renders them."""
    out: str
    """Directory for the refined adapter set, checkpoint, metrics.jsonl and summary.json."""
    adapters: str | None = None
    """The adapter set to start from (offline-trained); None with ``from_zero``."""
    from_zero: bool = False
    """Start from new adapters with a zero decoder (the reference's recipe) instead of ``adapters``."""
    layers: str = "all"
    """``all`` or a list like ``0,3,5-7``: the set's layers to refine, or with ``from_zero`` the
    layers to create adapters for."""
    features: int | None = None
    """With ``from_zero``: features per adapter; None: ``tca train``'s default (8192 at width 3584,
    scaled to the model's width)."""
    activation: RefineActivation = "relu"
    """With ``from_zero``: ``relu`` or ``topk``."""
    k: int = 32
    """With ``from_zero`` and ``topk``: active features per token."""
    tokens: int | None = None
    """Training tokens (real, unpadded); None: one pass over the training documents."""
    seq_len: int = 1024
    """Tokens kept per document."""
    batch: int = 8
    """Documents per step."""
    lambda_kl: float = 2.0
    """Weight of the KL terms (fully adapted and mixed models)."""
    lambda_nmse: float = 1.0
    """Weight of the mean per-layer hidden-state NMSE."""
    cutoffs: int = 1
    """Distinct layer cut-offs drawn per step from 1..L-1 (0: no mixed models)."""
    l1: float = REFINE_L1
    """Weight of the decoder-norm-weighted L1 of the activations (ReLU adapters)."""
    lr: float | None = None
    """Peak AdamW learning rate; None: ``tca train``'s default for the adapters' width, divided
    by ``lr_refine_div`` when starting from offline adapters."""
    lr_refine_div: float = 4.0
    """How much smaller the default lr is when refining offline adapters (they start near a
    good solution)."""
    warmup_frac: float = 0.05
    """Fraction of steps with linearly rising learning rate."""
    grad_clip: float = 1.0
    """Clipping of the gradient norm over all adapters."""
    eval_tokens: int = 8192
    """Tokens of the first documents of ``data`` held out for evaluation."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """``float32`` or ``bfloat16``: the models' weights (the adapters always train in float32;
    bfloat16 halves the weights' memory, the choice for a 7B pair on one GPU)."""
    checkpointing: bool = True
    """Recompute each layer in backward instead of keeping its activations."""
    device: Device = "auto"
    """Where to run; auto takes CUDA when present."""
    resume: bool = False
    """Continue the run in ``out`` from its checkpoint."""
    seed: int = 0
    """Seeds new adapters, document order and the cut-offs."""
    log_every: int = 10
    """Steps between training records in metrics.jsonl."""
    eval_every: int = 0
    """Steps between held-out evaluations (0: five per run)."""
    checkpoint_every: int = 100
    """Steps between checkpoints."""
