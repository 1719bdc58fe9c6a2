"""Shared fixtures: tiny random Qwen2 pairs and their data, built once per session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tca.cache.harvest import HarvestConfig, harvest
from tca.cache.plan import PlanConfig
from tca.toy.tiny import build_tiny_pair, tiny_conversations, write_jsonl
from tca.train.adapter import Adapter, AdapterConfig
from tca.train.checkpoint import AdapterSet
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


@pytest.fixture(scope="session")
def bf16_pair(tiny_pair, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny pair saved in bfloat16, as most released checkpoints are."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("bf16-pair")
    paths = []
    for src in tiny_pair:
        AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(out / src.name)
        AutoTokenizer.from_pretrained(src).save_pretrained(out / src.name)
        paths.append(out / src.name)
    return paths[0], paths[1]


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
    train(TrainConfig(store=str(store), out=str(adapters), device="cpu", **DEMO_TRAIN))
    return DemoRun(store, adapters)


def random_adapter_set(n_features: int, *, seed: int, b_enc: float, dec_scale: float, d_model: int = 64,
                       layers: tuple[int, ...] = (0, 1, 2, 3)) -> AdapterSet:
    """Untrained adapters on ``layers`` with nonzero decoders; a negative ``b_enc`` makes only a
    few features fire per token, like trained ones."""
    g = torch.Generator().manual_seed(seed)
    cfg = AdapterConfig(d_model=d_model, n_features=n_features)
    adapters = {}
    for layer in layers:
        ad = Adapter(cfg)
        with torch.no_grad():
            ad.W_enc.copy_(torch.randn(d_model, n_features, generator=g) / d_model**0.5)
            ad.b_enc.fill_(b_enc)
            ad.W_dec.copy_(torch.randn(n_features, d_model, generator=g) * dec_scale)
            ad.b_dec.copy_(torch.randn(d_model, generator=g) * 0.05)
        adapters[layer] = ad.eval()
    return AdapterSet(adapters, cfg)
