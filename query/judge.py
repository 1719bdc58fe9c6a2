"""Detection scoring: does an explanation let a reader tell where the feature fires?

The judge gets the explanation and a shuffled mix of held-out excerpts, half of them centred on a
token where the feature is active and half with no indexed activation anywhere in them, and says
which excerpts the feature is active in. Held out means from documents none of the explanation's
examples came from, so the judge cannot match an excerpt it was effectively shown.

The two halves are equally large (as many as both have, up to ``n``), so balanced accuracy, the
mean of the true positive and true negative rates, equals plain accuracy here, and its 95%
interval is the Wilson interval of the correct answers (``tca.query.stats.wilson``), which stays
inside [0, 1] and keeps its coverage at a perfect score, where a bootstrap collapses to a point.
A judge that guesses scores 0.5; one that knows the activations scores 1.

``parse_detection_prompt`` reads a prompt back (``tca.toy.serve``'s oracle judge answers from the
true activations with it).
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass

import duckdb
import numpy as np

from tca.query.chat import Answer, final_text, refused
from tca.query.render import visible
from tca.query.sql import run_sql
from tca.query.stats import wilson

SYSTEM = ("You check explanations of features of a language model. A feature is active on some tokens of a "
          "text and inactive on others. You are given an explanation of one feature and numbered excerpts "
          "of text; decide, from the explanation alone, in which excerpts the feature is active on at least "
          "one token.")

_HEADER = re.compile(r"^Feature (?P<adapter>.+) layer (?P<layer>\d+) #(?P<feature>\d+)$", re.MULTILINE)
_EXAMPLE = re.compile(r"^Excerpt (?P<n>\d+): (?P<text>.*)$", re.MULTILINE)
_LIST = re.compile(r"\[\s*(?:\d+\s*(?:,\s*\d+\s*)*)?\]")
_DRAW_ROUNDS = 5
"""Rounds of random candidates drawn for the inactive half before settling for fewer."""


def one_line(piece: str) -> str:
    """A token's text with every line break shown as a symbol, so an excerpt is one line."""
    return visible(piece).replace("\r", "␍")


def feature_title(adapter: str, layer: int, feature: int) -> str:
    return f"Feature {adapter} layer {layer} #{feature}"


@dataclass
class HeldOut:
    """The excerpts of one detection prompt, in the order shown."""

    tokens: list[int]
    """Each excerpt's centre token."""
    texts: list[str]
    pieces: list[list[str]]
    """Each excerpt's token pieces (its text is theirs joined)."""
    labels: list[bool]
    """True where the feature is active (on the centre token)."""


def feature_seed(adapter: str, layer: int, feature: int, seed: int) -> list[int]:
    """A per-feature seed, the same in every process (Python's ``hash`` of a string is not)."""
    return [seed, layer, feature, zlib.crc32(adapter.encode())]


def windows(con: duckdb.DuckDBPyConnection, adapter: str, layer: int, feature: int, centres: list[int],
            context: int) -> dict[int, dict]:
    """Per centre token: its document, the pieces of the ``context`` tokens either side within the
    document, and the feature's activation on each (0 where inactive, None where not stored)."""
    if not centres:
        return {}
    rows = run_sql(con, """
        WITH centre AS (SELECT t.token, t.doc, t.pos FROM tokens t WHERE t.token IN (SELECT unnest($centres))),
        near AS (
            SELECT centre.token AS centre, centre.doc, c.token, c.pos, c.piece, c.stored_row
            FROM centre JOIN tokens c
              ON c.doc = centre.doc AND c.pos BETWEEN centre.pos - $context AND centre.pos + $context
        ),
        vals AS (
            SELECT v.token, v.value FROM activations v
            WHERE v.adapter = $adapter AND v.layer = $layer AND v.feature = $feature
              AND v.token IN (SELECT near.token FROM near)
        )
        SELECT near.centre, any_value(near.doc) AS doc, list(near.piece ORDER BY near.pos) AS pieces,
               list(CASE WHEN near.stored_row IS NULL THEN NULL ELSE coalesce(vals.value, 0) END ORDER BY near.pos)
                   AS values_
        FROM near LEFT JOIN vals ON vals.token = near.token
        GROUP BY near.centre
    """, {"centres": centres, "context": context, "adapter": adapter, "layer": layer, "feature": feature}).to_pylist()
    return {r["centre"]: r for r in rows}


def held_out(con: duckdb.DuckDBPyConnection, adapter: str, layer: int, feature: int, shown_docs: list[int],
             n: int, context: int, seed: int) -> HeldOut:
    """Up to ``n`` active and as many inactive excerpts from documents not in ``shown_docs``, shuffled.

    The active ones are spread over the feature's range: its held-out activations in ``n`` equal-count
    bins by value, one (pseudo-randomly chosen) from each. The inactive ones are stored tokens drawn
    at random whose whole excerpt has no indexed activation of the feature.
    """
    rng = np.random.default_rng(feature_seed(adapter, layer, feature, seed))
    params = {"adapter": adapter, "layer": layer, "feature": feature, "shown": shown_docs, "n": n, "seed": seed}
    active = run_sql(con, """
        WITH acts AS (
            SELECT a.token, a.value FROM activations a JOIN tokens t ON t.token = a.token
            WHERE a.adapter = $adapter AND a.layer = $layer AND a.feature = $feature
              AND NOT list_contains($shown, t.doc)
        ),
        binned AS (SELECT acts.*, ntile($n) OVER (ORDER BY acts.value, acts.token) AS bin FROM acts)
        SELECT binned.token FROM binned
        QUALIFY row_number() OVER (PARTITION BY binned.bin
                                   ORDER BY (binned.token::HUGEINT * 2654435761 + $seed) % 4294967291, binned.token) = 1
        ORDER BY binned.bin
    """, params)["token"].to_pylist()
    n_rows = run_sql(con, "SELECT count(*) AS n FROM tokens WHERE stored_row IS NOT NULL")["n"][0].as_py()
    shown, inactive = set(shown_docs), []
    for _ in range(_DRAW_ROUNDS):
        if len(inactive) >= n or not n_rows:
            break
        rows = sorted({int(r) for r in rng.integers(0, n_rows, 4 * n)})
        drawn = run_sql(con, "SELECT token FROM tokens WHERE stored_row IN (SELECT unnest($rows)) ORDER BY token",
                        {"rows": rows})["token"].to_pylist()
        for token, w in sorted(windows(con, adapter, layer, feature, drawn, context).items()):
            if w["doc"] not in shown and token not in inactive and not any(v for v in w["values_"] if v is not None):
                inactive.append(token)
    k = min(n, len(active), len(inactive))
    # with fewer than n on either side, keep the active ones spread over the bins
    active = [active[i] for i in np.linspace(0, len(active) - 1, k).round().astype(int)] if k else []
    chosen = [(t, True) for t in active] + [(t, False) for t in inactive[:k]]
    order = rng.permutation(len(chosen))
    chosen = [chosen[i] for i in order]
    shown_windows = windows(con, adapter, layer, feature, [t for t, _ in chosen], context)
    pieces = [list(shown_windows[t]["pieces"]) for t, _ in chosen]
    return HeldOut([t for t, _ in chosen], ["".join(map(one_line, p)) for p in pieces], pieces,
                   [label for _, label in chosen])


def detection_messages(adapter: str, layer: int, feature: int, explanation: str, excerpts: list[str]) -> list[dict]:
    lines = [feature_title(adapter, layer, feature), f"Explanation: {explanation}", "",
             *(f"Excerpt {i}: {text}" for i, text in enumerate(excerpts, 1)), "",
             ("In which excerpts is the feature active? Answer with the excerpt numbers as a JSON list, "
              "e.g. [2, 5], or [] for none, and nothing else.")]
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "\n".join(lines)}]


def parse_detection_prompt(messages: list[dict]) -> tuple[tuple[str, int, int], dict[int, str]] | None:
    """The (adapter, layer, feature) and the numbered excerpts of a detection prompt; None for
    any other prompt."""
    text = "\n".join(m.get("content") or "" for m in messages if m.get("role") == "user")
    head = _HEADER.search(text)
    excerpts = {int(m["n"]): m["text"] for m in _EXAMPLE.finditer(text)}
    if head is None or not excerpts:
        return None
    return (head["adapter"], int(head["layer"]), int(head["feature"])), excerpts


@dataclass
class Detection:
    status: str
    """``ok``, ``refused``, ``malformed`` (no readable list of excerpt numbers) or ``error``."""
    predicted: list[bool] | None = None
    score: float | None = None
    """Balanced accuracy (= accuracy: the halves are equal)."""
    ci95: list[float] | None = None
    correct: int | None = None


def parse_detection(answer: Answer, n: int) -> tuple[str, list[int] | None]:
    """(status, the excerpt numbers said to be active) from the judge's answer."""
    if answer.text is None:
        return "error", None
    if refused(answer):
        return "refused", None
    text = final_text(answer.text)
    found = _LIST.findall(text or "")
    if not found:
        return "malformed", None
    numbers = json.loads(found[-1])  # the last list: a judge may restate the question's example first
    if any(not 1 <= k <= n for k in numbers):
        return "malformed", None
    return "ok", sorted(set(numbers))


def score_detection(labels: list[bool], answer: Answer) -> Detection:
    """The judge's answer against the true labels."""
    status, numbers = parse_detection(answer, len(labels))
    if status != "ok":
        return Detection(status)
    predicted = [i + 1 in numbers for i in range(len(labels))]
    correct = sum(p == y for p, y in zip(predicted, labels, strict=True))
    positives = sum(labels)
    tpr = sum(p and y for p, y in zip(predicted, labels)) / positives
    tnr = sum(not p and not y for p, y in zip(predicted, labels)) / (len(labels) - positives)
    lo, hi = wilson(correct, len(labels))
    return Detection("ok", predicted, (tpr + tnr) / 2, [float(lo), float(hi)], correct)
