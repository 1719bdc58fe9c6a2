"""Tiny random base/target pairs in the Hugging Face layout, built in a second for tests.

The target is the base with every weight nudged and the MLPs changed more, so ``delta`` is
far from zero while the backbones stay close, as after a real fine-tune.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from tca.cache.template import THINK_CLOSE, THINK_OPEN, render_deepseek
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
    """Write ``out/base`` and ``out/target`` and return their paths."""
    corpus = [
        render_deepseek(r["conversations"][0]["value"], r["conversations"][1]["value"])
        for r in tiny_conversations(300, seed)
    ]
    tokenizer = train_tokenizer(corpus, vocab_size)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    base = Qwen2ForCausalLM(config).eval()
    target = Qwen2ForCausalLM(config).eval()
    target.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in target.named_parameters():
            scale = target_mlp_scale if ".mlp." in name else target_other_scale
            noise = torch.randn(param.shape, generator=g) * param.std().clamp_min(1e-3)
            param.add_(scale * noise)
    paths = []
    for name, model in (("base", base), ("target", target)):
        path = Path(out) / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]
