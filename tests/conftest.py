"""Shared fixtures: tiny random Qwen2 pairs and their data, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tca.toy.tiny import build_tiny_pair, tiny_conversations, write_jsonl

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
