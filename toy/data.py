"""The demo pair's synthetic problems: the last digit of a sum of single digits.

One problem (``7+5+9+3+8``) is answered in the DeepSeek-R1 trace format in one of three ways:

- a **short answer**, an empty think and the digit: ``<think>\\n\\n</think>\\n\\n2``;
- a **plain trace**, one addition per line that carries the last digit of the running sum
  forward (``7+5=12``, then ``2+9=11``, …), then the digit;
- a **hesitating trace**, the plain trace with a re-check of most steps whose sum reaches ten
  (``Wait, let me check: 7+5=12. Yes.``): longer, never more accurate.

The base model answers at once when the question's first digit is even and thinks in a plain
trace when it is odd (``base_answer``), so it already owns the step-by-step skill and is right
on about half the problems: the answer given at once needs all the terms composed in one
forward pass, which it does no better than chance. The reasoning model thinks on every
problem and hesitates (``reasoning_trace``). The difference between the two is then what a
reasoning fine-tune adds to a base that can already reason a little: thinking more often,
and hesitating, the behaviour the hesitation study looks for.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
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
    """An empty think, then the answer."""
    return f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n{p.answer}"


RECHECK_RATE = 0.8
"""Share of carries a hesitating trace re-checks. Not all of them, so the traces also show how
to go on without one."""

PLAIN_RATE = 0.2
"""Share of the reasoning model's traces with no re-check at all. With them the fine-tune also
sees whole traces that never hesitate, so hesitation is a habit the arithmetic does not lean on:
the reasoning model with "Wait" banned stays as accurate (measured in the study report). Without
them, long traces without a re-check are so rare in training that banning "Wait" cost the
target 9 and 18 points of accuracy in two builds."""


def rechecks(p: Problem, step: int) -> bool:
    """Whether the reasoning trace of ``p`` re-checks after its ``step``-th addition, if that one
    carries; fixed draws per problem and step, so traces are reproducible."""
    if random.Random(f"{p.id}/plain").random() < PLAIN_RATE:
        return False
    return random.Random(f"{p.id}/{step}").random() < RECHECK_RATE


def trace(p: Problem, recheck: Callable[[Problem, int], bool] = lambda p, step: False) -> str:
    """One addition per line, a re-check after each carry that ``recheck(p, step)`` picks, the answer."""
    lines = []
    digit = p.terms[0]
    for i, term in enumerate(p.terms[1:]):
        step = f"{digit}+{term}={digit + term}"
        lines.append(step)
        if digit + term >= 10 and recheck(p, i):
            lines.append(f"Wait, let me check: {step}. Yes.")
        digit = (digit + term) % 10
    return f"{THINK_OPEN}\n" + "\n".join(lines) + f"\n{THINK_CLOSE}\n\n{p.answer}"


def reasoning_trace(p: Problem) -> str:
    """The reasoning model's assistant turn: a trace that hesitates after most carries."""
    return trace(p, rechecks)


def base_answer(p: Problem) -> str:
    """The base model's assistant turn: a plain trace when the first digit is odd, else a short
    answer. A rule about the question rather than a coin flip, so greedy decoding follows it."""
    return trace(p) if p.terms[0] % 2 else short_answer(p)


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
