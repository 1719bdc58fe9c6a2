"""The demo pair's synthetic problems: the last digit of a sum of single digits.

One problem (``7+5+9+3+8``) gives two assistant turns in the DeepSeek-R1 trace format:

- the base model's **short answer**, an empty think and the digit:
  ``<think>\\n\\n</think>\\n\\n2``;
- the reasoning model's **trace**, one addition per line that carries the last digit of the
  running sum forward (``7+5=12``, then ``2+9=11``, …), then the digit. After every step
  whose sum reaches ten, the trace hesitates and re-verifies the step it just got right
  (``Wait, let me check: 7+5=12. Yes.``): longer, never more accurate.

Each step is a lookup in the addition table plus finding the question's next term, both of
which a small model learns within the fine-tune, while the answer given at once needs all
the terms composed in one forward pass, which the base does no better than chance: the
trace is what raises accuracy. The
hesitation follows a rule about the content (a carry) that greedy decoding can learn,
rather than a coin flip it would average away.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from tca.cache.template import THINK_CLOSE, THINK_OPEN

DOMAIN = "last-digit"
_QUESTION = "What is the last digit of {}?"
TERM_DIGITS = range(1, 10)
"""The digits a term may be (zero is left out: adding it is no step at all)."""


@dataclass(frozen=True)
class Problem:
    """The last digit of a sum of single digits."""

    id: str
    terms: tuple[int, ...]

    @property
    def answer(self) -> int:
        return sum(self.terms) % 10

    @property
    def question(self) -> str:
        return _QUESTION.format("+".join(map(str, self.terms)))


def make_problems(
    n_train: int, n_val: int, *, seed: int, min_terms: int, max_terms: int
) -> tuple[list[Problem], list[Problem]]:
    """Distinct random problems of ``min_terms``-``max_terms`` terms, split into train and held-out val."""
    if n_train + n_val > problem_space(min_terms, max_terms) // 2:
        raise ValueError(f"{n_train + n_val} distinct problems are too many for this problem space")
    rng = random.Random(seed)
    seen: set[tuple[int, ...]] = set()
    ordered: list[tuple[int, ...]] = []
    while len(ordered) < n_train + n_val:
        k = rng.randint(min_terms, max_terms)
        terms = tuple(rng.choice(TERM_DIGITS) for _ in range(k))
        if terms not in seen:
            seen.add(terms)
            ordered.append(terms)
    problems = [Problem(f"{DOMAIN}-{i:05d}", t) for i, t in enumerate(ordered)]
    return problems[:n_train], problems[n_train:]


def problem_space(min_terms: int, max_terms: int) -> int:
    """How many distinct problems there are."""
    return sum(len(TERM_DIGITS) ** k for k in range(min_terms, max_terms + 1))


def short_answer(p: Problem) -> str:
    """The base model's assistant turn: an empty think, then the answer."""
    return f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n{p.answer}"


RECHECK_RATE = 0.7
"""Share of carries followed by a re-check. Not all of them: the traces then also show how to
go on without one, so hesitation is a habit of the fine-tune, as in real reasoning models, and
not a step the arithmetic depends on (which would make ablating it break the answers)."""


def rechecks(p: Problem, step: int) -> bool:
    """Whether the trace of ``p`` re-checks after its ``step``-th addition, if that one carries;
    a fixed draw per problem and step, so traces are reproducible."""
    return random.Random(f"{p.id}/{step}").random() < RECHECK_RATE


def reasoning_trace(p: Problem) -> str:
    """The reasoning model's assistant turn: one addition per line, a re-check after most
    carries, the answer."""
    lines = []
    digit = p.terms[0]
    for i, term in enumerate(p.terms[1:]):
        step = f"{digit}+{term}={digit + term}"
        lines.append(step)
        if digit + term >= 10 and rechecks(p, i):
            lines.append(f"Wait, let me check: {step}. Yes.")
        digit = (digit + term) % 10
    return f"{THINK_OPEN}\n" + "\n".join(lines) + f"\n{THINK_CLOSE}\n\n{p.answer}"


def to_record(p: Problem, response: str) -> dict:
    """A problem and an assistant turn in the conversation schema of reasoning datasets."""
    return {
        "id": p.id,
        "domain": DOMAIN,
        "conversations": [
            {"from": "user", "value": p.question},
            {"from": "assistant", "value": response},
        ],
    }


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
