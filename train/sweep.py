"""A ``tca train`` run's sweep: its members' names, settings and directories.

The trainer and the merge of parallel shares (train/parallel.py) both name members this way.
"""

from __future__ import annotations

from pathlib import Path

from tca import TcaError
from tca.kernels import ACTIVATIONS, TOP_K
from tca.train.config import TrainConfig


def sweep_param(activation: str) -> str:
    """The setting a sweep varies: ``k`` for the TopK activations, ``l1`` for the rest."""
    if activation not in ACTIVATIONS:
        raise TcaError(f"unknown activation {activation!r}; use one of {', '.join(ACTIVATIONS)}.")
    return "k" if activation in TOP_K else "l1"


def sweep_values(cfg: TrainConfig) -> list[tuple[str, dict]]:
    """(member name, AdapterConfig overrides) for each sweep value."""
    param = sweep_param(cfg.activation)
    other = "k" if param == "l1" else "l1"
    if len(getattr(cfg, other)) > 1:
        raise TcaError(f"a --{other} sweep does not apply to --activation {cfg.activation}; sweep --{param} instead.")
    return [(f"{param}-{v:g}", {param: v}) for v in getattr(cfg, param)]


def member_dir(out: Path, cfg: TrainConfig, name: str) -> Path:
    """Where sweep member ``name`` of a run in ``out`` is written (``out`` itself without a sweep)."""
    return out if len(sweep_values(cfg)) == 1 else out / name
