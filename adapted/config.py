"""The settings of ``tca refine``, with the constants their defaults come from.

Like train/config.py it imports nothing heavy: the CLI builds one option per field from the
field's type, default and docstring.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from tca import Device, ModelDtype
from tca.cache.threads import DEFAULT_THREADS
from tca.ranges import NON_NEGATIVE, POSITIVE, PROPORTION, at_least, check_ranges

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
    features: int | None = field(default=None, metadata=POSITIVE)
    """With ``from_zero``: features per adapter; None: ``tca train``'s default (8192 at width 3584,
    scaled to the model's width)."""
    activation: RefineActivation = "relu"
    """With ``from_zero``: ``relu`` or ``topk``."""
    k: int = field(default=32, metadata=POSITIVE)
    """With ``from_zero`` and ``topk``: active features per token."""
    tokens: int | None = field(default=None, metadata=POSITIVE)
    """Training tokens (real, unpadded); None: one pass over the training documents."""
    seq_len: int = field(default=1024, metadata=at_least(2))
    """Tokens kept per document."""
    batch: int = field(default=8, metadata=POSITIVE)
    """Documents per step."""
    lambda_kl: float = field(default=2.0, metadata=NON_NEGATIVE)
    """Weight of the KL terms (fully adapted and mixed models)."""
    lambda_nmse: float = field(default=1.0, metadata=NON_NEGATIVE)
    """Weight of the mean per-layer hidden-state NMSE."""
    cutoffs: int = field(default=1, metadata=NON_NEGATIVE)
    """Distinct layer cut-offs drawn per step from 1..L-1 (0: no mixed models)."""
    l1: float = field(default=REFINE_L1, metadata=NON_NEGATIVE)
    """Weight of the decoder-norm-weighted L1 of the activations (ReLU adapters)."""
    lr: float | None = field(default=None, metadata=POSITIVE)
    """Peak AdamW learning rate; None: ``tca train``'s default for the adapters' width, divided
    by ``lr_refine_div`` when starting from offline adapters."""
    lr_refine_div: float = field(default=4.0, metadata=POSITIVE)
    """How much smaller the default lr is when refining offline adapters (they start near a
    good solution)."""
    warmup_frac: float = field(default=0.05, metadata=PROPORTION)
    """Fraction of steps with linearly rising learning rate."""
    grad_clip: float = field(default=1.0, metadata=POSITIVE)
    """Clipping of the gradient norm over all adapters."""
    eval_tokens: int = field(default=8192, metadata=NON_NEGATIVE)
    """Tokens of the first documents of ``data`` held out for evaluation."""
    dtype: ModelDtype = "auto"
    """The models' weights: ``auto`` (the checkpoint's dtype on CUDA, float32 on CPU), ``float32``,
    ``bfloat16`` or ``float16``. The adapters always train in float32; bfloat16 halves the weights'
    memory, the choice for a 7B pair on one GPU. The one chosen is written into summary.json."""
    checkpointing: bool = True
    """Recompute each layer in backward instead of keeping its activations."""
    device: Device = "auto"
    """Where to run; auto takes CUDA when present."""
    resume: bool = False
    """Continue the run in ``out`` from its checkpoint."""
    seed: int = field(default=0, metadata=NON_NEGATIVE)
    """Seeds new adapters, document order and the cut-offs."""
    log_every: int = field(default=10, metadata=POSITIVE)
    """Steps between training records in metrics.jsonl."""
    eval_every: int = field(default=0, metadata=NON_NEGATIVE)
    """Steps between held-out evaluations (0: five per run)."""
    checkpoint_every: int = field(default=100, metadata=POSITIVE)
    """Steps between checkpoints."""
    threads: int = field(default=DEFAULT_THREADS, metadata=POSITIVE)
    """torch threads on the CPU, fixed whatever the machine's load (``tca.cache.threads``: more than
    one thrashed a busy 2-core machine); recorded in summary.json and beside the adapters."""

    def __post_init__(self):
        check_ranges(self)
