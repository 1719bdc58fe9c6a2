"""What the demo pair does when it generates: accuracy, response length and hesitation.

Every figure comes from greedy generation on held-out prompts rendered in the DeepSeek-R1
layout (``render_deepseek(question)``), for the base, the reasoning model and the *hybrid*
(the reasoning model's embeddings, attention, norms and unembedding with the base's MLPs).
The hybrid tells whether the fine-tune's behaviour lives in the MLPs: if it does, swapping
the base's MLPs back in removes it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from tca.adapted.generation import Figures, generate, questions_of, score
from tca.adapted.splice import adapted_model


def load_model(path: Path) -> PreTrainedModel:
    """A saved model through the Auto classes, computing in float32 whatever its stored dtype."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def measure_pair(
    base_dir: Path, reasoning_dir: Path, records: list[dict], *, max_new_tokens: int
) -> dict[str, Figures]:
    """Figures of the base, the hybrid and the reasoning model on ``records``' questions."""
    tokenizer = AutoTokenizer.from_pretrained(reasoning_dir)
    base, reasoning = load_model(base_dir), load_model(reasoning_dir)
    hybrid = adapted_model(reasoning_dir, base_dir, None)
    models = {"base": base, "hybrid": hybrid, "reasoning": reasoning}
    questions = questions_of(records)
    figures = {}
    for name, model in models.items():
        responses = generate(model, tokenizer, questions, max_new_tokens=max_new_tokens, desc=name)
        figures[name] = score(tokenizer, records, responses)
    return figures
