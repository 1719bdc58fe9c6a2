"""Shared fixtures: tiny random Qwen2 pairs and their data, built once per session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tca.cache.harvest import HarvestConfig, harvest
from tca.cache.plan import PlanConfig
from tca.toy.tiny import build_tiny_pair, tiny_conversations, write_jsonl
from tca.train.trainer import TrainConfig, train

REPO = Path(__file__).resolve().parent.parent
DEMO_PAIR = REPO / "examples" / "toy-pair"


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(base, target) directories of a 4-layer, d=64 random pair with a shared tokenizer."""
    return build_tiny_pair(tmp_path_factory.mktemp("tiny-pair"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A JSONL of 24 short reasoning traces in the conversation schema."""
    return write_jsonl(tiny_conversations(24), tmp_path_factory.mktemp("tiny-data") / "data.jsonl")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(2)


@dataclass(frozen=True)
class DemoRun:
    """A harvest of the demo pair (all layers) and the default ReLU adapters trained on it."""

    store: Path
    adapters: Path
    """The run directory: adapters.{json,safetensors}, summary.json, metrics.jsonl."""


DEMO_HARVEST_TOKENS = 60_000
"""Tokens harvested from the demo pair: the fixture stays near a minute on 2 cores."""
DEMO_TRAIN: dict = {}
"""Every setting at its default: sizes scale to the store (docs/train.md, Calibration)."""


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> DemoRun:
    """Built once per session; skips when the demo pair is not in the checkout."""
    if not (DEMO_PAIR / "base").is_dir():
        pytest.skip(f"the demo pair is missing ({DEMO_PAIR})")
    root = tmp_path_factory.mktemp("demo-run")
    store, adapters = root / "store", root / "adapters"
    torch.manual_seed(0)
    torch.set_num_threads(2)
    data = str(DEMO_PAIR / "data" / "train.jsonl")
    harvest(HarvestConfig(base=str(DEMO_PAIR / "base"), target=str(DEMO_PAIR / "reasoning"), out=str(store),
                          plan=PlanConfig(data=data, max_tokens=DEMO_HARVEST_TOKENS), device="cpu"))
    train(TrainConfig(cache=str(store), out=str(adapters), device="cpu", **DEMO_TRAIN))
    return DemoRun(store, adapters)
