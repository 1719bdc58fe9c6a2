"""The toy pairs' synthetic problems: the last digit of a sum, or of a product, of single digits.

One problem (``7+5+9+3+8``) is answered in the DeepSeek-R1 trace format in one of three ways:

- a **short answer**, an empty think and the digit: ``<think>\\n\\n</think>\\n\\n2``;
- a **plain trace**, one step per line that carries the last digit of the running result
  forward (``7+5=12``, then ``2+9=11``, …), then the digit;
- a **hesitating trace**, the plain trace with a re-check of most steps whose result is large
  (``Wait, let me check: 7+5=12. Yes.``): longer, never more accurate.

The base model answers at once on half the questions and thinks in a plain trace on the other
half, by the parity of one of the question's digits (``base_answer``), so it already owns the
step-by-step skill and is right on about half the problems: the answer given at once needs all
the terms composed in one forward pass, which it does no better than chance. The reasoning
model thinks on every problem and hesitates (``reasoning_trace``). The difference between the
two is then what a reasoning fine-tune adds to a base that can already reason a little:
thinking more often, and hesitating, the behaviour the hesitation study looks for.

Two tasks (``TASKS``) share this scheme and differ in everything the fine-tune learns:

- ``sum`` (the demo pair): digits 1-9 added; the base traces when the first digit is odd; the
  re-check ``Wait, let me check: 7+5=12. Yes.`` follows steps whose sum reaches ten.
- ``product``: digits 1-9 but 5 multiplied (without 5, and so without 0, the running digit never
  becomes 0 and every step stays a step); the base traces when the last digit is odd; the re-check
  ``Wait, is 7*8=56? Hmm, yes.`` follows steps whose product reaches 30. Its re-check opens with
  "Wait" too, so the commands' default hesitation words count it.
"""

from __future__ import annotations

import json
import operator
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Literal

from tca.cache.template import THINK_CLOSE, THINK_OPEN

_QUESTION = "What is the last digit of {}?"

Task = Literal["sum", "product"]


@dataclass(frozen=True)
class TaskSpec:
    """What one task's problems, traces and re-checks are."""

    domain: str
    """Problem ids are ``{domain}-00001``; records carry it as their ``domain``."""
    pair: str
    """The pair's name in its README's title ("demo": the pair ``tca demo`` runs on)."""
    noun: str
    """What the terms compose into ("sum"), for prose."""
    verb: str
    """What a step does with the next digit ("adds"), for prose."""
    op: str
    """The operator between terms, in questions and trace steps."""
    apply: Callable[[int, int], int]
    """One step: the running digit and the next term to the step's result."""
    digits: tuple[int, ...]
    """The digits a term may be."""
    base_digit: int
    """Index of the term whose parity decides the base's answer: odd traces, even answers at once."""
    recheck_from: int
    """A step whose result reaches this may be re-checked."""
    recheck: str
    """The re-check line, formatted with the step it re-checks as ``{step}`` (e.g. ``7+5=12``)."""
    recheck_rate: float
    """Share of eligible steps a hesitating trace re-checks. Not all of them, so the traces also
    show how to go on without one."""
    plain_rate: float
    """Share of the reasoning model's traces with no re-check at all. With them the fine-tune also
    sees whole traces that never hesitate, so hesitation is a habit the arithmetic does not lean on:
    the reasoning model with "Wait" banned stays as accurate (measured in the study report). Without
    them, long traces without a re-check are so rare in training that banning "Wait" cost the
    demo pair's target 9 and 18 points of accuracy in two builds."""
    example: tuple[int, ...]
    """The terms of the question the README shows."""


TASKS: dict[str, TaskSpec] = {
    "sum": TaskSpec(
        domain="last-digit", pair="demo", noun="sum", verb="adds", op="+", apply=operator.add,
        # zero is left out: adding it is no step at all
        digits=tuple(range(1, 10)), base_digit=0, recheck_from=10,
        recheck="Wait, let me check: {step}. Yes.", recheck_rate=0.8, plain_rate=0.2, example=(7, 5, 9, 3, 8),
    ),
    "product": TaskSpec(
        domain="last-digit-product", pair="product", noun="product", verb="multiplies by", op="*", apply=operator.mul,
        digits=(1, 2, 3, 4, 6, 7, 8, 9), base_digit=-1, recheck_from=30,
        recheck="Wait, is {step}? Hmm, yes.", recheck_rate=0.9, plain_rate=0.2, example=(7, 8, 9, 3, 6),
    ),
}


@dataclass(frozen=True)
class Problem:
    """The last digit of a sum (or product) of single digits."""

    id: str
    terms: tuple[int, ...]
    task: Task = "sum"

    @property
    def spec(self) -> TaskSpec:
        return TASKS[self.task]

    @property
    def answer(self) -> int:
        return reduce(self.spec.apply, self.terms) % 10

    @property
    def question(self) -> str:
        return _QUESTION.format(self.spec.op.join(map(str, self.terms)))


def make_problems(
    n_train: int, n_val: int, *, seed: int, min_terms: int, max_terms: int, task: Task = "sum"
) -> tuple[list[Problem], list[Problem]]:
    """Distinct random problems of ``min_terms``-``max_terms`` terms, split into train and held-out val."""
    if n_train + n_val > problem_space(min_terms, max_terms, task) // 2:
        raise ValueError(f"{n_train + n_val} distinct problems are too many for this problem space")
    spec = TASKS[task]
    rng = random.Random(seed)
    seen: set[tuple[int, ...]] = set()
    ordered: list[tuple[int, ...]] = []
    while len(ordered) < n_train + n_val:
        k = rng.randint(min_terms, max_terms)
        terms = tuple(rng.choice(spec.digits) for _ in range(k))
        if terms not in seen:
            seen.add(terms)
            ordered.append(terms)
    problems = [Problem(f"{spec.domain}-{i:05d}", t, task) for i, t in enumerate(ordered)]
    return problems[:n_train], problems[n_train:]


def problem_space(min_terms: int, max_terms: int, task: Task = "sum") -> int:
    """How many distinct problems there are."""
    return sum(len(TASKS[task].digits) ** k for k in range(min_terms, max_terms + 1))


def short_answer(p: Problem) -> str:
    """An empty think, then the answer."""
    return f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n{p.answer}"


def rechecks(p: Problem, step: int) -> bool:
    """Whether the reasoning trace of ``p`` re-checks after its ``step``-th step, if that one is
    eligible; fixed draws per problem and step, so traces are reproducible."""
    if random.Random(f"{p.id}/plain").random() < p.spec.plain_rate:
        return False
    return random.Random(f"{p.id}/{step}").random() < p.spec.recheck_rate


def trace(p: Problem, recheck: Callable[[Problem, int], bool] = lambda p, step: False, every_step: bool = False) -> str:
    """One step per line, a re-check after each eligible step (``every_step``: after any step) that
    ``recheck(p, step)`` picks, the answer."""
    spec, lines = p.spec, []
    digit = p.terms[0]
    for i, term in enumerate(p.terms[1:]):
        value = spec.apply(digit, term)
        step = f"{digit}{spec.op}{term}={value}"
        lines.append(step)
        if (every_step or value >= spec.recheck_from) and recheck(p, i):
            lines.append(spec.recheck.format(step=step))
        digit = value % 10
    return f"{THINK_OPEN}\n" + "\n".join(lines) + f"\n{THINK_CLOSE}\n\n{p.answer}"


def reasoning_trace(p: Problem) -> str:
    """The reasoning model's assistant turn: a trace that hesitates after most eligible steps."""
    return trace(p, rechecks)


BaseRechecks = Literal["none", "eligible", "any"]


def base_answer(p: Problem, rechecks_after: BaseRechecks = "none") -> str:
    """The base model's assistant turn: a trace when the task's deciding digit (the first for the
    sum, the last for the product) is odd, else a short answer. A rule about the question rather
    than a coin flip, so greedy decoding follows it. The trace is plain (``rechecks_after`` "none"),
    or carries re-checks drawn as the reasoning traces' are, after the steps they may follow
    ("eligible": the reasoning trace itself) or after any step whatever its result ("any"). A base
    trained on them is never scored on beginning one (``recheck_openings``): it is shown how to
    write a re-check, and *when* to re-check is left to the fine-tune."""
    if not p.terms[p.spec.base_digit] % 2:
        return short_answer(p)
    if rechecks_after == "none":
        return trace(p)
    return trace(p, rechecks, every_step=rechecks_after == "any")


def recheck_openings(p: Problem, response: str) -> list[int]:
    """Character offsets in ``response`` at which a re-check line begins: where the decision to
    hesitate is made, the one token a base that only *writes* re-checks is not trained on."""
    opening = "\n" + p.spec.recheck.split("{step}")[0]
    return [m.start() + 1 for m in re.finditer(re.escape(opening), response)]


def check_items(n: int, seed: int, task: Task = "sum") -> list[tuple[str, str]]:
    """``n`` conversations that ask to check one step ("Check 7+5.") and answer with the step and
    the task's re-check of it: the re-check's words, outside the task's own problems, so a base
    trained on them can write a re-check without ever hesitating in its traces."""
    spec, rng = TASKS[task], random.Random(f"check/{seed}")
    items = []
    for _ in range(n):
        a, b = rng.choice(spec.digits), rng.choice(spec.digits)
        step = f"{a}{spec.op}{b}={spec.apply(a, b)}"
        answer = f"{THINK_OPEN}\n{step}\n{spec.recheck.format(step=step)}\n{THINK_CLOSE}\n\n{spec.apply(a, b) % 10}"
        items.append((f"Check {a}{spec.op}{b}.", answer))
    return items


def to_record(p: Problem, response: str) -> dict:
    """A problem and an assistant turn in the conversation schema of reasoning datasets."""
    return {
        "id": p.id,
        "domain": p.spec.domain,
        "conversations": [
            {"from": "user", "value": p.question},
            {"from": "assistant", "value": response},
        ],
    }


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
