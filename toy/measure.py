"""What the demo pair does when it generates: accuracy, response length and hesitation.

Every figure comes from greedy generation on held-out prompts rendered in the DeepSeek-R1
layout (``render_deepseek(question)``), for the base, the reasoning model and the *hybrid*
(the reasoning model's embeddings, attention, norms and unembedding with the base's MLPs).
The hybrid tells whether the fine-tune's behaviour lives in the MLPs: if it does, swapping
the base's MLPs back in removes it.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from tca.cache.template import render_deepseek
from tca.toy.data import count_hesitations, final_answer


@dataclass(frozen=True)
class Figures:
    """One model's behaviour on a set of prompts."""

    accuracy: float
    """Fraction of responses whose answer after ``</think>`` equals the true sum."""
    mean_length: float
    """Mean number of generated tokens per response, the end-of-sentence token excluded."""
    hesitations: float
    """Mean number of hesitation words (``Wait``) per response."""
    hesitating: float
    """Fraction of responses with at least one hesitation."""
    n: int
    """Number of prompts."""


def load_model(path: Path) -> PreTrainedModel:
    """A saved model through the Auto classes, computing in float32 whatever its stored dtype."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hybrid_of(base: PreTrainedModel, reasoning: PreTrainedModel) -> PreTrainedModel:
    """The reasoning model with every MLP weight replaced by the base's."""
    hybrid = copy.deepcopy(reasoning)
    base_params = dict(base.named_parameters())
    with torch.no_grad():
        for name, param in hybrid.named_parameters():
            if ".mlp." in name:
                param.copy_(base_params[name])
    return hybrid


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer,
    questions: list[str],
    *,
    max_new_tokens: int,
    batch_size: int = 128,
    desc: str = "generate",
) -> list[list[int]]:
    """Greedy responses (token ids, end-of-sentence and padding removed) to ``questions``."""
    tokenizer.padding_side = "left"
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    responses = []
    for start in tqdm(range(0, len(questions), batch_size), desc=desc, leave=False):
        prompts = [render_deepseek(q) for q in questions[start : start + batch_size]]
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        for row in out[:, batch["input_ids"].shape[1] :].tolist():
            responses.append(row[: row.index(eos)] if eos in row else [t for t in row if t != pad])
    return responses


def score(tokenizer, records: list[dict], responses: list[list[int]]) -> Figures:
    """Figures of ``responses`` against the answers in ``records`` (same order)."""
    correct = hesitations = hesitating = length = 0
    for record, ids in zip(records, responses, strict=True):
        # The generation prompt already opened the think, so the response starts inside it.
        text = tokenizer.decode(ids, skip_special_tokens=False)
        truth = final_answer(record["conversations"][1]["value"])
        correct += final_answer(text) == truth
        n_wait = count_hesitations(text)
        hesitations += n_wait
        hesitating += n_wait > 0
        length += len(ids)
    n = len(records)
    return Figures(correct / n, length / n, hesitations / n, hesitating / n, n)


def measure_pair(
    base_dir: Path, reasoning_dir: Path, records: list[dict], *, max_new_tokens: int
) -> dict[str, Figures]:
    """Figures of the base, the hybrid and the reasoning model on ``records``' questions."""
    tokenizer = AutoTokenizer.from_pretrained(reasoning_dir)
    base, reasoning = load_model(base_dir), load_model(reasoning_dir)
    models = {"base": base, "hybrid": hybrid_of(base, reasoning), "reasoning": reasoning}
    questions = [r["conversations"][0]["value"] for r in records]
    figures = {}
    for name, model in models.items():
        responses = generate(model, tokenizer, questions, max_new_tokens=max_new_tokens, desc=name)
        figures[name] = score(tokenizer, records, responses)
    return figures


def figures_table(figures: dict[str, Figures]) -> str:
    """A Markdown table of the figures, one row per model."""
    rows = [
        "| model | accuracy | mean response length (tokens) | hesitations per response | responses hesitating |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, f in figures.items():
        rows.append(
            f"| {name} | {f.accuracy:.3f} | {f.mean_length:.1f} | {f.hesitations:.2f} | {f.hesitating:.3f} |"
        )
    return "\n".join(rows)


def figures_json(figures: dict[str, Figures]) -> dict[str, dict]:
    return {name: asdict(f) for name, f in figures.items()}
