"""What a model does when it generates: response length, hesitation and answer accuracy.

Prompts are questions rendered as generation prompts in the DeepSeek-R1 layout
(``render_deepseek(question)``), so the response starts inside the thinking. Answers are
checkable when a record's reference response closes its thinking: the answer is what follows
``</think>`` (the content of a ``\\boxed{}`` there when present), compared as stripped text.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from tca.cache.template import THINK_CLOSE, render_deepseek

HESITATION_WORDS = ("Wait", "Hmm", "Alternatively")
"""Words that open a re-check in reasoning traces; counted as hesitations."""
_HESITATION_RE = re.compile(r"\b(?:" + "|".join(HESITATION_WORDS) + r")\b")
_BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")


def final_answer(response: str) -> str | None:
    """The answer a response gives after its thinking, or None when it never closes it."""
    if THINK_CLOSE not in response:
        return None
    tail = response.rsplit(THINK_CLOSE, 1)[1].strip()
    boxed = _BOXED_RE.findall(tail)
    return boxed[-1].strip() if boxed else tail


def count_hesitations(text: str) -> int:
    """How many hesitation words (``HESITATION_WORDS``) a text holds."""
    return len(_HESITATION_RE.findall(text))


@dataclass(frozen=True)
class Figures:
    """One model's behaviour on a set of prompts."""

    accuracy: float | None
    """Fraction of responses whose final answer equals the reference's (None: no checkable answers)."""
    mean_length: float
    """Mean number of generated tokens per response, the end-of-sentence token excluded."""
    hesitations: float
    """Mean number of hesitation words per response."""
    hesitating: float
    """Fraction of responses with at least one hesitation."""
    n: int
    """Number of prompts."""


def questions_of(records: list[dict]) -> list[str]:
    """The user turn of each conversation record."""
    return [r["conversations"][0]["value"] for r in records]


@torch.no_grad()
def generate(
    model,
    tokenizer,
    questions: list[str],
    *,
    max_new_tokens: int,
    batch_size: int = 128,
    desc: str = "generate",
    banned: list[int] | None = None,
) -> list[list[int]]:
    """Greedy responses (token ids, end-of-sentence and padding removed) to ``questions``;
    ``banned`` token ids are never generated."""
    tokenizer.padding_side = "left"
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    responses = []
    for start in tqdm(range(0, len(questions), batch_size), desc=desc, leave=False):
        prompts = [render_deepseek(q) for q in questions[start : start + batch_size]]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad,
            bad_words_ids=[[t] for t in banned] if banned else None,
        )
        for row in out[:, batch["input_ids"].shape[1] :].tolist():
            responses.append(row[: row.index(eos)] if eos in row else [t for t in row if t != pad])
    return responses


def score(tokenizer, records: list[dict], responses: list[list[int]]) -> Figures:
    """Figures of ``responses`` against the reference answers in ``records`` (same order)."""
    correct = checkable = hesitations = hesitating = length = 0
    for record, ids in zip(records, responses, strict=True):
        text = tokenizer.decode(ids, skip_special_tokens=False)
        truth = final_answer(record["conversations"][1]["value"]) if len(record["conversations"]) > 1 else None
        if truth is not None:
            checkable += 1
            correct += final_answer(text) == truth
        n_wait = count_hesitations(text)
        hesitations += n_wait
        hesitating += n_wait > 0
        length += len(ids)
    n = len(records)
    return Figures(correct / checkable if checkable else None, length / n, hesitations / n, hesitating / n, n)


def figures_table(figures: dict[str, Figures]) -> str:
    """A Markdown table of the figures, one row per model."""
    rows = [
        "| model | accuracy | mean response length (tokens) | hesitations per response | responses hesitating |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, f in figures.items():
        acc = "n/a" if f.accuracy is None else f"{f.accuracy:.3f}"
        rows.append(f"| {name} | {acc} | {f.mean_length:.1f} | {f.hesitations:.2f} | {f.hesitating:.3f} |")
    return "\n".join(rows)


def figures_json(figures: dict[str, Figures]) -> dict[str, dict]:
    return {name: asdict(f) for name, f in figures.items()}
