"""Tiny reasoning traces, the toy tokenizer trained on them, and tiny random base/target pairs
(``tca.toy.pairs.build_random_pair`` at test sizes), built in a second for tests.

The target is the base with every weight nudged and the MLPs changed more, so ``delta`` is
far from zero while the backbones stay close, as after a real fine-tune.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tca.cache.template import THINK_CLOSE, THINK_OPEN, render_deepseek
from tca.toy.pairs import PairShape, build_random_pair
from tca.toy.tokenizer import train_tokenizer


def tiny_conversations(n: int, seed: int = 0) -> list[dict]:
    """``n`` reasoning-trace records in the conversation schema, with checkable answers."""
    g = torch.Generator().manual_seed(seed)
    records = []
    for i in range(n):
        a, b = (int(v) for v in torch.randint(2, 50, (2,), generator=g))
        hesitate = " Wait, let me check: yes." if i % 3 == 0 else ""
        answer = (
            f"{THINK_OPEN}\nWe add {a} and {b}.{hesitate} So {a} + {b} = {a + b}.\n{THINK_CLOSE}\n\n{a + b}"
        )
        records.append(
            {
                "id": f"tiny-{i}",
                "conversations": [
                    {"from": "user", "value": f"What is {a} + {b}?"},
                    {"from": "assistant", "value": answer},
                ],
            }
        )
    return records


def write_jsonl(records: list[dict], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def tiny_tokenizer(seed: int = 0, vocab_size: int = 400):
    """The toy tokenizer: a byte-level BPE (the demo pair's pipeline) trained on tiny traces."""
    corpus = [
        render_deepseek(r["conversations"][0]["value"], r["conversations"][1]["value"])
        for r in tiny_conversations(300, seed)
    ]
    return train_tokenizer(corpus, vocab_size)


def build_tiny_pair(
    out: Path,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 4,
    vocab_size: int = 400,
    seed: int = 0,
    target_mlp_scale: float = 0.3,
    target_other_scale: float = 0.02,
) -> tuple[Path, Path]:
    """Write ``out/base`` and ``out/target`` (float32, 4 heads, 2 kv heads) and return their paths."""
    shape = PairShape(hidden=hidden_size, intermediate=intermediate_size, layers=num_layers)
    return build_random_pair(out, shape, tiny_tokenizer(seed, vocab_size), seed=seed,
                             mlp_noise=target_mlp_scale, other_noise=target_other_scale)
