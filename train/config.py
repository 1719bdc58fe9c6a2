"""The settings of ``tca train``, with the constants their defaults come from.

The field docstrings are the documentation: the CLI builds one option per field from the
field's type, default and docstring (``tca.cli.config_options``), so ``--help`` and the Python
API say the same thing. This module imports nothing heavy, which keeps ``tca --help`` quick.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tca import Device
from tca.cache.threads import DEFAULT_THREADS
from tca.ranges import FRACTION, NON_NEGATIVE, POSITIVE, PROPORTION, check_ranges

DEFAULT_L1 = 0.5
"""Calibrated on the demo pair with the L1 penalty: held-out L0 in 1–10 at FVE ≥ 0.8 on every layer;
with the log penalty, the default, it gives L0 0.9–1.6 at FVE ≥ 0.89 there (docs/train.md)."""
PAPER_D, PAPER_FEATURES, PAPER_LR, PAPER_BATCH = 3584, 8192, 8e-4, 4096
"""The reference's settings for a 7B model (width 3584), from which the defaults scale."""
MAX_LR_SCALE = 8.0
"""The default lr grows as adapters narrow, up to 8x the paper's (docs/train.md, Calibration, says
what larger rates did)."""
MIN_STEPS = 1500
"""Fewest steps an epochs-default run takes (L0 depends on run length; docs/train.md, Calibration)."""


@dataclass
class TrainConfig:
    """Everything ``tca train`` needs; saved in the checkpoint and reused on ``--resume``."""

    store: str = field(metadata={"old": ("--cache",)})
    """The activation store (a path or an fsspec URL)."""
    out: str
    """Directory for adapters, checkpoint, metrics.jsonl and summary.json."""
    layers: str = "all"
    """``all`` (every layer in the store) or a list like ``0,3,5-7``."""
    features: int | None = field(default=None, metadata=POSITIVE)
    """Features per adapter; None: the paper's 8192 at width 3584 scaled to the store's width
    (the power of two nearest 8192 * d / 3584; 128 on the demo pair)."""
    activation: Literal["relu", "jumprelu", "topk", "batchtopk"] = "relu"
    """The activation: the paper's ReLU with a decoder-norm-weighted L1, TopK, BatchTopK or JumpReLU."""
    l1: list[float] = field(default_factory=lambda: [DEFAULT_L1], metadata=POSITIVE)
    """Sparsity coefficients (relu, jumprelu); several train a sweep on the same batches."""
    penalty: Literal["l1", "log"] = "log"
    """relu's sparsity term on each activation weighted by its decoder norm (a = |f|·||d||): ``log``
    sums eps·log(1 + a/eps), which charges one feature less than the copies it could split into
    (on the ground-truth tuning grid: about one adapter feature per planted one, where ``l1`` made
    2-15; docs/train.md); ``l1``, the paper's, sums a, the same for one feature as for n copies."""
    penalty_eps: float = field(default=0.1, metadata=POSITIVE)
    """Where the ``log`` penalty bends, in units of the layer's RMS ||delta||: L1-like below, logarithmic above."""
    target_l0: float | None = field(default=None, metadata=POSITIVE)
    """Held-out L0 to reach (relu, jumprelu): after warm-up each layer's sparsity coefficient, starting
    from ``l1``, is steered multiplicatively by its training L0's miss; the coefficient each layer
    ends with is in summary.json. None: ``l1`` stays fixed. Unchanged layers are not steered."""
    k: list[int] = field(default_factory=lambda: [32], metadata=POSITIVE)
    """Active features per row (topk, batchtopk); several train a sweep."""
    lr: float | None = field(default=None, metadata=POSITIVE)
    """Peak learning rate of AdamW; None: the paper's 8e-4 at 8192 features, scaled by
    sqrt(8192 / features) up to 8x (6.4e-3)."""
    batch: int | None = field(default=None, metadata=POSITIVE)
    """Rows (tokens) per step; None: 4096, or on a small store the largest power of two that
    leaves at least 256 steps per epoch."""
    tokens: int | None = field(default=None, metadata=POSITIVE)
    """Training tokens; None: ``epochs`` passes over the training rows."""
    epochs: float | None = field(default=None, metadata=POSITIVE)
    """Passes over the training rows when ``tokens`` is not given; None: one pass, or as many
    whole passes as make ``MIN_STEPS`` steps (L0 depends on run length; docs/train.md)."""
    holdout_frac: float = field(default=0.05, metadata=FRACTION)
    """Fraction of documents held out for evaluation."""
    dec_bias: bool = True
    """Learn a decoder bias."""
    drop_outliers: float | None = field(default=None, metadata=POSITIVE)
    """Skip rows whose ||x|| is more than this many times the layer's median."""
    device: Device = "auto"
    """Where to train; auto takes CUDA when present."""
    resume: bool = False
    """Continue the run in ``out`` from its checkpoint."""
    seed: int = field(default=0, metadata=NON_NEGATIVE)
    """Seeds initialisation, hold-out split and data order."""
    warmup_frac: float = field(default=0.05, metadata=PROPORTION)
    """Fraction of steps with linearly rising learning rate."""
    grad_clip: float = field(default=1.0, metadata=POSITIVE)
    """Gradient-norm clipping per adapter."""
    dead_after_tokens: int = field(default=1_000_000, metadata=POSITIVE)
    """A feature silent for this many training tokens counts as dead (and gets the aux loss)."""
    log_every: int = field(default=10, metadata=POSITIVE)
    """Steps between training records in metrics.jsonl."""
    eval_every: int = field(default=0, metadata=NON_NEGATIVE)
    """Steps between held-out evaluations (0: ten per run)."""
    checkpoint_every: int = field(default=200, metadata=POSITIVE)
    """Steps between checkpoints."""
    shuffle_rows: int = field(default=65536, metadata=POSITIVE)
    """Rows mixed at once by the loader."""
    read_threads: int = field(default=4, metadata=POSITIVE)
    """Chunks read concurrently."""
    eval_rows: int = field(default=65536, metadata=POSITIVE)
    """Held-out rows used per evaluation."""
    unchanged_below: float = field(default=1e-6, metadata=NON_NEGATIVE)
    """A layer whose RMS ||delta|| on the held-out rows is at most this times its RMS ||x|| is
    unchanged: reported as "no difference", not trained (no feature active), FVE 1 and NMSE 0.
    0: only an exactly zero delta."""
    threads: int = field(default=DEFAULT_THREADS, metadata=POSITIVE)
    """torch threads on the CPU, fixed whatever the machine's load (``tca.cache.threads``: more than
    one thrashed a busy 2-core machine); recorded in summary.json and beside the adapters."""

    @classmethod
    def from_saved(cls, saved: dict) -> TrainConfig:
        """The config a checkpoint recorded, also one written before the store field was named ``store``."""
        saved = dict(saved)
        if "cache" in saved:
            saved["store"] = saved.pop("cache")
        # a run checkpointed before the penalty was a setting trained on the L1, and resumes on it
        saved.setdefault("penalty", "l1")
        return cls(**saved)

    def __post_init__(self):
        check_ranges(self)
