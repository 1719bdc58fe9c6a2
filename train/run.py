"""What a training run's driver needs whatever it trains: ``tca train`` (train/trainer.py) and
``tca refine`` (adapted/refine.py) start, seed, log and describe their runs through these."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tca import TcaError
from tca.train.checkpoint import CONFIG_FILE, load_checkpoint

RUN_FILES = ("checkpoint", "summary.json", CONFIG_FILE)
"""What a run leaves in its directory; any of them there means the directory holds a run."""


def refuse_existing_run(out: Path) -> None:
    """One sentence when ``out`` already holds a run (or an adapter set) a new run would overwrite."""
    if any((out / name).exists() for name in RUN_FILES):
        raise TcaError(f"{out} already holds a training run; pass --resume to continue it or choose a new --out.")


def open_run(out: Path, resume: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """The checkpoint (state, tensors) of the run in ``out`` to resume; None for a new run, which
    ``out`` must not hold already."""
    if resume:
        return load_checkpoint(out / "checkpoint")
    refuse_existing_run(out)
    return None


def seeded(seed: int, stream: int) -> torch.Generator:
    """The generator of one random stream of a run; an adapter's is its layer's, so sweep members,
    parallel shares and a refinement from zero start a layer's adapter alike."""
    return torch.Generator().manual_seed(seed * 1_000_003 + stream)


def run_settings(cfg) -> dict[str, Any]:
    """A run's configuration as recorded beside its adapters: less where it ran and was written."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "resume", "device")}


def due(step: int, every: int, total: int) -> bool:
    """Whether something done every ``every`` steps (and after the last) is due after ``step``."""
    return step % every == 0 or step == total


class RunLog:
    """A run's ``metrics.jsonl`` (appended to: a resumed run has cut it back to its checkpoint)
    and its progress bar, with the token rate since this process took over."""

    def __init__(self, out: Path, desc: str, total: int, step: int, tokens: int):
        out.mkdir(parents=True, exist_ok=True)
        self.bar = tqdm(total=total, initial=step, desc=desc, unit="step", dynamic_ncols=True)
        self.file = open(out / "metrics.jsonl", "a")
        self.t0, self.tokens0 = time.perf_counter(), tokens

    def write(self, records: list[dict]) -> None:
        for record in records:
            self.file.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        """Before a checkpoint, so the records it covers are on disk."""
        self.file.flush()

    def stepped(self, tokens_seen: int, postfix: dict[str, str] | None = None) -> None:
        """Advance the bar by one step; show ``postfix`` and the token rate when given."""
        if postfix is not None:
            rate = (tokens_seen - self.tokens0) / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix({"tok/s": f"{rate:,.0f}", **postfix}, refresh=False)
        self.bar.update()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        self.file.close()
