"""The settings of ``tca train``, with the constants their defaults come from.

The field docstrings are the documentation: the CLI builds one option per field from the
field's type, default and docstring (``tca.cli.config_options``), so ``--help`` and the Python
API say the same thing. This module imports nothing heavy, which keeps ``tca --help`` quick.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tca import TcaError

DEFAULT_L1 = 0.5
"""Calibrated on the demo pair: held-out L0 in 1–10 at FVE ≥ 0.8 on every layer (docs/train.md)."""
PAPER_D, PAPER_FEATURES, PAPER_LR, PAPER_BATCH = 3584, 8192, 8e-4, 4096
"""The reference's settings for a 7B model (width 3584), from which the defaults scale."""
MAX_LR_SCALE = 8.0
"""The default lr grows as adapters narrow, up to 6.4e-3 (128 features), the largest measured
on the demo pair; above it short runs killed every feature."""
MIN_STEPS = 1500
"""Fewest steps an epochs-default run takes; the calibration of DEFAULT_L1 ran 1792."""
Device = Literal["auto", "cpu", "cuda"]
"""Where a run computes; auto: CUDA when present."""


def parse_list(text: str, kind: type, flag: str) -> list:
    """A comma list of numbers such as ``0.001,0.003``; one clear sentence when it is not."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise TcaError(f"{flag} {text!r} is not a comma list of positive {kind.__name__} values, e.g. {flag} 0.001,0.003.")
    return values


@dataclass
class TrainConfig:
    """Everything ``tca train`` needs; saved in the checkpoint and reused on ``--resume``."""

    cache: str
    """The activation store (a path or an fsspec URL)."""
    out: str
    """Directory for adapters, checkpoint, metrics.jsonl and summary.json."""
    layers: str = "all"
    """``all`` (every layer in the store) or a list like ``0,3,5-7``."""
    features: int | None = None
    """Features per adapter; None: the paper's 8192 at width 3584 scaled to the store's width
    (the power of two nearest 8192 * d / 3584; 128 on the demo pair)."""
    activation: Literal["relu", "jumprelu", "topk", "batchtopk"] = "relu"
    """The activation: the paper's ReLU with a decoder-norm-weighted L1, TopK, BatchTopK or JumpReLU."""
    l1: list[float] = field(default_factory=lambda: [DEFAULT_L1])
    """Sparsity coefficients (relu, jumprelu); several train a sweep on the same batches."""
    k: list[int] = field(default_factory=lambda: [32])
    """Active features per row (topk, batchtopk); several train a sweep."""
    lr: float | None = None
    """Peak learning rate of AdamW; None: the paper's 8e-4 at 8192 features, scaled by
    sqrt(8192 / features) up to 8x (6.4e-3)."""
    batch: int | None = None
    """Rows (tokens) per step; None: 4096, or on a small store the largest power of two that
    leaves at least 256 steps per epoch."""
    tokens: int | None = None
    """Training tokens; None: ``epochs`` passes over the training rows."""
    epochs: float | None = None
    """Passes over the training rows when ``tokens`` is not given; None: one pass, or as many
    whole passes as make ``MIN_STEPS`` steps (L0 depends on run length; docs/train.md)."""
    holdout_frac: float = 0.05
    """Fraction of documents held out for evaluation."""
    dec_bias: bool = True
    """Learn a decoder bias."""
    drop_outliers: float | None = None
    """Skip rows whose ||x|| is more than this many times the layer's median."""
    device: Device = "auto"
    """Where to train; auto takes CUDA when present."""
    resume: bool = False
    """Continue the run in ``out`` from its checkpoint."""
    seed: int = 0
    """Seeds initialisation, hold-out split and data order."""
    warmup_frac: float = 0.05
    """Fraction of steps with linearly rising learning rate."""
    grad_clip: float = 1.0
    """Gradient-norm clipping per adapter."""
    dead_after_tokens: int = 1_000_000
    """A feature silent for this many training tokens counts as dead (and gets the aux loss)."""
    log_every: int = 10
    """Steps between training records in metrics.jsonl."""
    eval_every: int = 0
    """Steps between held-out evaluations (0: ten per run)."""
    checkpoint_every: int = 200
    """Steps between checkpoints."""
    shuffle_rows: int = 65536
    """Rows mixed at once by the loader."""
    read_threads: int = 4
    """Chunks read concurrently."""
    eval_rows: int = 65536
    """Held-out rows used per evaluation."""
