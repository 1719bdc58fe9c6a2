"""``tca explain``: a language model reads each feature's examples and says what it is; a judge checks it.

Three stages, each resumable, each answer written into the index as it arrives:

1. **explain**: a prompt built from the index (the strongest examples and examples sampled across
   the feature's range with its active tokens marked, where it fires by region, the logit lens) goes
   to any OpenAI-compatible chat endpoint; the answer is one sentence.
2. **detect** (``--score``): the judge sees the explanation and held-out excerpts and says which
   ones the feature is active in (``tca.query.judge``); balanced accuracy with a 95% interval.
3. **classify** (``--classify``): the model puts the explanation in one of the paper's kinds of
   feature: hesitation (re-checking), planning and answer formatting, which are reasoning-related,
   or other.

Everything lands in the ``explanations`` table, one row per (adapter, layer, feature), joinable with
``features`` and the macros; the ``explanation_census`` view counts classes and scores per layer.
A stage asks only for what its table columns lack (or hold as ``error``), so a run that was killed
or failed part-way resumes where it stopped without sending anything twice; ``--redo`` asks again.
A feature whose adapter layer was indexed again after it was explained is explained again.

Prompts are built on a read-only connection (``--where`` is one read statement like ``tca sql``'s);
answers are written by this command only, each in one transaction, so ``tca sql`` stays read-only.
``--dry-run FILE`` writes the requests as JSONL in the batch API's input format instead of sending
them, and ``--import FILE`` loads a batch's output (or ``{"custom_id", "content"}`` lines): each
``custom_id`` carries a hash of its prompt, and an answer to a prompt this index and these settings
would not build is refused.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import re
from collections import deque
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from tca import TcaError
from tca.outputs import atomic_file, check_output
from tca.query import judge
from tca.query.chat import Answer, ChatClient, RateLimiter, final_text, parse_answer, refused
from tca.query.sql import connect, in_transaction, open_writer, run_sql
from tca.query.view import has_explanations
from tca.ranges import NON_NEGATIVE, POSITIVE, check_ranges

log = logging.getLogger(__name__)

STAGES = ("explain", "detect", "classify")

CLASSES = {
    "hesitation": "hesitating, re-checking or correcting itself (before or on words such as Wait, Hmm, let me check)",
    "planning": "organising the reasoning: setting up a method, choosing the next step, splitting cases, summarising",
    "answer_formatting": "ending the thinking or giving the final answer: </think>, the answer's wording or format",
    "other": "anything else: a kind of token or word, arithmetic, syntax, a topic",
}
REASONING_CLASSES = ("hesitation", "planning", "answer_formatting")
"""The paper's reasoning-related kinds; ``other`` is the rest."""

TABLE = """
CREATE TABLE IF NOT EXISTS explanations (
    adapter VARCHAR, layer INTEGER, feature INTEGER,
    explanation VARCHAR, status VARCHAR, answer VARCHAR, model VARCHAR, prompt_sha VARCHAR, shown_docs BIGINT[],
    prompt_tokens BIGINT, completion_tokens BIGINT, indexed_at VARCHAR, explained_at TIMESTAMP,
    detection DOUBLE, detection_lo DOUBLE, detection_hi DOUBLE, detection_n INTEGER, detection_correct INTEGER,
    detection_status VARCHAR, detection_answer VARCHAR, detection_tokens BIGINT[], detection_labels BOOLEAN[],
    detection_predicted BOOLEAN[], judge_model VARCHAR,
    class VARCHAR, reasoning_related BOOLEAN, class_status VARCHAR, class_answer VARCHAR, class_model VARCHAR,
    PRIMARY KEY (adapter, layer, feature)
);
CREATE OR REPLACE VIEW explanation_census AS
SELECT adapter, layer,
       count(*) AS n_explained,
       count(detection) AS n_scored, avg(detection) AS mean_detection,
       count(class) AS n_classified,
       """ + ", ".join(f"count(*) FILTER (WHERE class = '{c}') AS n_{c}" for c in CLASSES) + """,
       count(*) FILTER (WHERE reasoning_related) AS n_reasoning,
       count(*) FILTER (WHERE reasoning_related) / nullif(count(class), 0) AS reasoning_share
FROM explanations WHERE status = 'ok'
GROUP BY GROUPING SETS ((adapter, layer), (adapter))
ORDER BY adapter, layer NULLS LAST;
"""

EXPLAIN_SYSTEM = (
    "You explain features of a transcoder adapter, a sparse dictionary trained on what fine-tuning a language "
    "model into a reasoning model changed in its MLPs. A feature is active on some tokens of a text. From its "
    "examples (active tokens between << and >>, activation in brackets), where it fires and the tokens it "
    "promotes, say in one specific sentence what the feature responds to (which tokens, in which context) and, "
    "where the examples make it clear, what it does next. Answer with that sentence only, after 'Explanation:'."
)
CLASSIFY_SYSTEM = "You sort features of a reasoning language model into kinds, from an explanation and examples."
_EXPLANATION = re.compile(r"explanation\s*:\s*", re.IGNORECASE)
_CLASS = re.compile(r"\b(hesitation|planning|answer[ _-]formatting|other)\b", re.IGNORECASE)
ESTIMATE_SAMPLE = 32
"""Prompts a stage builds before its first request; the estimate logged before sending extrapolates from them."""
MAX_EXPLANATION = 1000
"""Characters kept of an explanation (a model that ignores the one-sentence instruction)."""


@dataclass
class ExplainConfig:
    """``tca explain``: explanations, detection scores and classes of features from a chat endpoint."""

    index: Path
    """The DuckDB index; the answers go into its ``explanations`` table."""
    endpoint: str | None = None
    """OpenAI-compatible base URL, e.g. ``http://127.0.0.1:8000/v1`` (``/chat/completions`` is appended);
    not needed with ``dry_run`` or ``import_file``."""
    model: str | None = None
    """Model name sent with each request."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key (sent as a bearer token; none when it is unset)."""
    where: str | None = None
    """Only features matching this SQL condition on ``features`` columns (``layer = 2 AND frequency < 0.01``;
    ``feature IN (SELECT feature FROM census() WHERE kind = 'hesitation')``)."""
    adapter: str | None = None
    """The adapter (default: the index's only one)."""
    limit: int | None = field(default=None, metadata=POSITIVE)
    """At most this many features (by layer, then feature)."""
    min_active: int = field(default=10, metadata=POSITIVE)
    """Features with fewer indexed activations are left out."""
    explain: bool = True
    """Ask for explanations (``--no-explain``: only score or classify the ones already there)."""
    score: bool = False
    """Detection scoring of every explanation (held-out excerpts; balanced accuracy and its interval)."""
    classify: bool = False
    """Put every explanation in one of the kinds hesitation, planning, answer_formatting (the reasoning-related
    ones) or other."""
    examples: int = field(default=10, metadata=POSITIVE)
    """Strongest examples shown per feature."""
    quantile_bins: int = field(default=5, metadata=POSITIVE)
    """Examples across the range: the feature's activations in this many equal-count bins by value..."""
    per_bin: int = field(default=2, metadata=NON_NEGATIVE)
    """...and this many from each (0: none)."""
    context: int = field(default=8, metadata=NON_NEGATIVE)
    """Tokens either side of an example (and of a detection excerpt)."""
    detect_examples: int = field(default=10, metadata=POSITIVE)
    """Held-out active excerpts per detection prompt, and as many inactive ones."""
    judge_endpoint: str | None = None
    """The detection judge's endpoint (default: ``endpoint``)."""
    judge_model: str | None = None
    """The detection judge's model (default: ``model``)."""
    max_tokens: int = field(default=512, metadata=POSITIVE)
    """Longest answer; a thinking model needs room for its thinking before the answer."""
    temperature: float = field(default=0.0, metadata=NON_NEGATIVE)
    """Sampling temperature sent with each request."""
    concurrency: int = field(default=4, metadata=POSITIVE)
    """Requests in flight at once."""
    requests_per_minute: float = field(default=0.0, metadata=NON_NEGATIVE)
    """Most request starts per minute over all threads (0: no limit)."""
    retries: int = field(default=5, metadata=NON_NEGATIVE)
    """Tries after the first for a connection failure, a timeout, HTTP 429 or 5xx."""
    backoff: float = field(default=1.0, metadata=NON_NEGATIVE)
    """Seconds before the first retry; doubles each time (at most 60), plus up to as much again at random."""
    timeout: float = field(default=120.0, metadata=POSITIVE)
    """Seconds one request may take."""
    price_prompt: float = field(default=0.0, metadata=NON_NEGATIVE)
    """Price per million prompt tokens, for the cost logged before sending (0: tokens only)."""
    price_completion: float = field(default=0.0, metadata=NON_NEGATIVE)
    """Price per million completion tokens."""
    seed: int = field(default=0, metadata=NON_NEGATIVE)
    """Seed of the held-out excerpts' choice and order."""
    dry_run: Path | None = None
    """Write the requests this run would send to this JSONL file (the batch API's input format) and send nothing."""
    import_file: Path | None = field(default=None, metadata={"flag": ("--import",)})
    """Load answers produced elsewhere: a batch API output JSONL, or lines of ``{"custom_id", "content"}``."""
    redo: bool = False
    """Ask again for the selected features' answers that are already stored."""
    overwrite: bool = False
    """Replace the ``dry_run`` file if it exists."""

    def __post_init__(self):
        check_ranges(self)


@dataclass
class Request:
    stage: str
    adapter: str
    layer: int
    feature: int
    messages: list[dict]
    est_tokens: int
    """Prompt tokens, estimated (``estimate_tokens``)."""
    max_tokens: int
    extra: dict = field(default_factory=dict)
    """What recording the answer needs: the shown documents, the held-out excerpts' labels."""

    @property
    def key(self) -> tuple[str, int, int]:
        return self.adapter, self.layer, self.feature

    @property
    def sha(self) -> str:
        text = json.dumps([self.messages, self.max_tokens], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def custom_id(self) -> str:
        return f"{self.stage}/{self.layer}/{self.feature}/{self.sha}/{self.adapter}"


@dataclass
class StageSummary:
    pending: int = 0
    """Requests this run had to make (or write, or import)."""
    already: int = 0
    """Selected features whose answer was already stored."""
    est_prompt_tokens: int = 0
    max_completion_tokens: int = 0
    est_cost: float = 0.0
    answered: dict[str, int] = field(default_factory=dict)
    """Answers recorded this run by status (ok, refused, malformed, error, too_few)."""
    prompt_tokens: int = 0
    """As the endpoint counted them (where it reports usage)."""
    completion_tokens: int = 0


@dataclass
class ExplainSummary:
    index: str
    features: int
    """Features selected (imported: features the file answers for)."""
    stages: dict[str, StageSummary]
    census: list[dict]
    """Rows of the ``explanation_census`` view after the run."""
    dry_run: str | None = None
    imported: int = 0
    refused_lines: int = 0
    """``import_file`` lines whose prompt these settings would not build (or that name no feature)."""

    @property
    def errors(self) -> int:
        return sum(s.answered.get("error", 0) for s in self.stages.values())


# ---- prompts -----------------------------------------------------------------------------------


def estimate_tokens(messages: list[dict], pieces: Iterable[str]) -> int:
    """Prompt tokens, estimated: each of the studied model's token pieces shown costs about one token
    of any modern tokenizer, the rest of the text about one token per 4 characters, plus 4 per message."""
    pieces = list(pieces)
    chars = sum(len(m["content"]) for m in messages) - sum(len(judge.one_line(p)) for p in pieces)
    return math.ceil(max(chars, 0) / 4) + len(pieces) + 4 * len(messages)


def _marked(example: dict) -> tuple[str, list[str]]:
    """An example's context on one line with every active token between << and >>; and its pieces."""
    out = []
    for piece, value in zip(example["context_pieces"], example["context_values"]):
        text = judge.one_line(piece)
        out.append(f"<<{text}>>" if value else text)
    return "".join(out), list(example["context_pieces"])


def _quote(tokens: list[str] | None) -> str:
    return ", ".join(json.dumps(t, ensure_ascii=False) for t in tokens or []) or "unknown"


def explain_request(con: duckdb.DuckDBPyConnection, adapter: str, layer: int, feature: int,
                    cfg: ExplainConfig) -> Request:
    """The explanation prompt of one feature, from the index."""
    where = {"adapter": adapter, "layer": layer, "feature": feature}
    stats = run_sql(con, "SELECT * FROM features WHERE adapter = $adapter AND layer = $layer AND feature = $feature",
                    where).to_pylist()[0]
    args = "$layer, $feature, adapter := $adapter, context := $context"
    top = run_sql(con, f"FROM top_examples({args}, k := $k)", where | {"k": cfg.examples, "context": cfg.context}
                  ).to_pylist()
    shown = {e["token"] for e in top}
    spread = [] if not cfg.per_bin else [
        e for e in run_sql(con, f"FROM quantile_samples({args}, n_bins := $bins, per_bin := $per_bin)",
                           where | {"bins": cfg.quantile_bins, "per_bin": cfg.per_bin, "context": cfg.context}
                           ).to_pylist() if e["token"] not in shown]
    regions = run_sql(con, "FROM region_profile($layer, $feature, adapter := $adapter)", where).to_pylist()
    pieces: list[str] = [*(stats["top_logits"] or []), *(stats["bottom_logits"] or [])]
    lines = [judge.feature_title(adapter, layer, feature),
             (f"Active on {stats['n_active']} tokens ({stats['frequency']:.3%} of those indexed); "
              f"strongest activation {stats['max']:.3g}."),
             "Where its activations fall (share of them; share of that region's tokens it is active on): " + "; ".join(
                 f"{r['region']} {r['share']:.0%} ({r['frequency']:.2%})" for r in regions if r["n_rows"]) + ".",
             (f"Tokens it promotes: {_quote(stats['top_logits'])}. "
              f"Tokens it suppresses: {_quote(stats['bottom_logits'])}."),
             "", "Strongest examples:"]
    for i, e in enumerate(top, 1):
        text, shown_pieces = _marked(e)
        lines.append(f"{i}. ({e['value']:.3g}) {text}")
        pieces += shown_pieces
    if spread:
        lines += ["", "Examples across its range, strongest first:"]
        for i, e in enumerate(spread, 1):
            text, shown_pieces = _marked(e)
            lines.append(f"{i}. ({e['value']:.3g}) {text}")
            pieces += shown_pieces
    messages = [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": "\n".join(lines)}]
    docs = sorted({e["doc"] for e in top + spread})
    return Request("explain", adapter, layer, feature, messages, estimate_tokens(messages, pieces), cfg.max_tokens,
                   {"shown_docs": docs})


def detect_request(con: duckdb.DuckDBPyConnection, row: dict, cfg: ExplainConfig) -> Request:
    """The detection prompt of one explained feature (``row``: its explanations row)."""
    held = judge.held_out(con, row["adapter"], row["layer"], row["feature"], list(row["shown_docs"] or []),
                          cfg.detect_examples, cfg.context, cfg.seed)
    messages = judge.detection_messages(row["adapter"], row["layer"], row["feature"], row["explanation"], held.texts)
    est = estimate_tokens(messages, [p for pieces in held.pieces for p in pieces])
    return Request("detect", row["adapter"], row["layer"], row["feature"], messages, est, cfg.max_tokens,
                   {"tokens": held.tokens, "labels": held.labels})


def classify_request(con: duckdb.DuckDBPyConnection, row: dict, cfg: ExplainConfig) -> Request:
    where = {"adapter": row["adapter"], "layer": row["layer"], "feature": row["feature"], "context": cfg.context}
    top = run_sql(con, "FROM top_examples($layer, $feature, k := 5, context := $context, adapter := $adapter)",
                  where).to_pylist()
    lines = [judge.feature_title(row["adapter"], row["layer"], row["feature"]), f"Explanation: {row['explanation']}",
             "", "Strongest examples (active tokens between << and >>):"]
    pieces: list[str] = []
    for i, e in enumerate(top, 1):
        text, shown = _marked(e)
        lines.append(f"{i}. {text}")
        pieces += shown
    lines += ["", "Kinds:", *(f"- {name}: {text}" for name, text in CLASSES.items()), "",
              "Which kind is this feature? Answer with the kind's name only."]
    messages = [{"role": "system", "content": CLASSIFY_SYSTEM}, {"role": "user", "content": "\n".join(lines)}]
    return Request("classify", row["adapter"], row["layer"], row["feature"], messages,
                   estimate_tokens(messages, pieces), cfg.max_tokens)


# ---- answers -----------------------------------------------------------------------------------


def parse_explanation(answer: Answer) -> tuple[str, str | None]:
    """(status, explanation): ``ok``, ``refused``, ``malformed`` (empty, or thinking never closed) or ``error``."""
    if answer.text is None:
        return "error", None
    if refused(answer):
        return "refused", None
    text = final_text(answer.text)
    if text is None:
        return "malformed", None
    parts = _EXPLANATION.split(text)
    body = parts[-1] if len(parts) > 1 else text
    line = next((ln.strip().strip("*\"'` ").strip() for ln in body.splitlines() if ln.strip().strip("*\"'` ")), "")
    return ("ok", line[:MAX_EXPLANATION]) if line else ("malformed", None)


def parse_class(answer: Answer) -> tuple[str, str | None]:
    """(status, class): exactly one kind named in the answer, else ``malformed``."""
    if answer.text is None:
        return "error", None
    if refused(answer):
        return "refused", None
    found = {re.sub(r"[ -]", "_", m.lower()) for m in _CLASS.findall(final_text(answer.text) or "")}
    return ("ok", found.pop()) if len(found) == 1 else ("malformed", None)


# ---- the index ---------------------------------------------------------------------------------


def _in_transaction(con: duckdb.DuckDBPyConnection, *statements: tuple[str, list]) -> None:
    in_transaction(con, lambda: [con.execute(sql, params) for sql, params in statements])


def stored(con: duckdb.DuckDBPyConnection) -> dict[tuple[str, int, int], dict]:
    """The explanations rows by (adapter, layer, feature); empty when the table is not there yet."""
    if not has_explanations(con):
        return {}
    return {(r["adapter"], r["layer"], r["feature"]): r for r in run_sql(con, "FROM explanations").to_pylist()}


def select_features(con: duckdb.DuckDBPyConnection, cfg: ExplainConfig) -> list[dict]:
    """The features ``cfg`` asks for, with when their adapter layer was indexed."""
    condition = f"({cfg.where})" if cfg.where and cfg.where.strip() else "true"
    return run_sql(con, f"""
        WITH chosen AS (
            SELECT * FROM features
            WHERE adapter = resolve_adapter($adapter) AND n_active >= $min_active AND {condition}
        )
        SELECT chosen.adapter, chosen.layer, chosen.feature, adapters.indexed_at::VARCHAR AS indexed_at
        FROM chosen JOIN adapters ON adapters.adapter = chosen.adapter AND adapters.layer = chosen.layer
        ORDER BY chosen.layer, chosen.feature LIMIT $limit
    """, {"adapter": cfg.adapter, "min_active": cfg.min_active, "limit": cfg.limit}).to_pylist()


def _pending(stage: str, features: list[dict], rows: dict, redo: bool) -> tuple[list[dict], int]:
    """What ``stage`` still has to ask about (the features, or past the first stage their explanations
    rows), and how many selected features it need not ask about again."""
    todo, done = [], 0
    for f in features:
        row = rows.get((f["adapter"], f["layer"], f["feature"]))
        current = row is not None and row["indexed_at"] == f["indexed_at"]
        if stage == "explain":
            asked, item = current and row["status"] != "error", f
        elif current and row["status"] == "ok":
            asked, item = row["detection_status" if stage == "detect" else "class_status"] not in (None, "error"), row
        else:
            continue  # no explanation to score or classify (yet)
        if asked and not redo:
            done += 1
        else:
            todo.append(item)
    return todo, done


def _record(con: duckdb.DuckDBPyConnection, request: Request, answer: Answer, indexed_at: str | None,
            summary: StageSummary) -> str:
    """Write one answer in one transaction; returns its status."""
    key = list(request.key)
    raw = answer.text if answer.text is not None else answer.error
    summary.prompt_tokens += answer.prompt_tokens or 0
    summary.completion_tokens += answer.completion_tokens or 0
    if request.stage == "explain":
        status, text = parse_explanation(answer)
        _in_transaction(
            con,
            ("DELETE FROM explanations WHERE adapter = ? AND layer = ? AND feature = ?", key),
            ("""INSERT INTO explanations (adapter, layer, feature, explanation, status, answer, model, prompt_sha,
                    shown_docs, prompt_tokens, completion_tokens, indexed_at, explained_at)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, current_localtimestamp())""",
             [*key, text, status, raw, answer.model, request.sha, request.extra["shown_docs"], answer.prompt_tokens,
              answer.completion_tokens, indexed_at]),
        )
    elif request.stage == "detect":
        labels = request.extra["labels"]
        d = judge.score_detection(labels, answer) if labels else judge.Detection("too_few")
        status = d.status
        lo, hi = d.ci95 or (None, None)
        _in_transaction(con, ("""
            UPDATE explanations SET detection = ?, detection_lo = ?, detection_hi = ?, detection_n = ?,
                   detection_correct = ?, detection_status = ?, detection_answer = ?, detection_tokens = ?,
                   detection_labels = ?, detection_predicted = ?, judge_model = ?
            WHERE adapter = ? AND layer = ? AND feature = ?""",
            [d.score, lo, hi, len(labels), d.correct, status, raw, request.extra["tokens"], labels, d.predicted,
             answer.model, *key]))
    else:
        status, kind = parse_class(answer)
        _in_transaction(con, ("""
            UPDATE explanations SET class = ?, reasoning_related = ?, class_status = ?, class_answer = ?,
                   class_model = ?
            WHERE adapter = ? AND layer = ? AND feature = ?""",
            [kind, None if kind is None else kind in REASONING_CLASSES, status, raw, answer.model, *key]))
    summary.answered[status] = summary.answered.get(status, 0) + 1
    return status


# ---- running -----------------------------------------------------------------------------------


def _client(cfg: ExplainConfig, stage: str, limiter: RateLimiter) -> ChatClient:
    judging = stage == "detect"
    endpoint = (cfg.judge_endpoint if judging else None) or cfg.endpoint
    model = (cfg.judge_model if judging else None) or cfg.model
    return ChatClient(endpoint or "", model or "", os.environ.get(cfg.api_key_env) or None, cfg.timeout, cfg.retries,
                      cfg.backoff, limiter)


def _check(cfg: ExplainConfig) -> None:
    if cfg.dry_run is not None and cfg.import_file is not None:
        raise TcaError("--dry-run writes requests and --import loads answers; give one of them.")
    if not (cfg.explain or cfg.score or cfg.classify):
        raise TcaError("--no-explain without --score or --classify leaves nothing to do.")
    if cfg.dry_run is not None:
        check_output(cfg.dry_run, cfg.overwrite, [cfg.index], flag="--dry-run")
    if cfg.import_file is not None and not Path(cfg.import_file).is_file():
        raise TcaError(f"--import {cfg.import_file} is not a file.")
    if cfg.import_file is None:
        asking = cfg.explain or cfg.classify
        if (asking and not cfg.model) or (cfg.score and not (cfg.judge_model or cfg.model)):
            raise TcaError("name the model with --model (and the judge's with --judge-model if it differs).")
        if cfg.dry_run is None and ((asking and not cfg.endpoint) or (cfg.score and not (cfg.judge_endpoint
                                                                                         or cfg.endpoint))):
            raise TcaError("give the chat endpoint with --endpoint URL (e.g. http://127.0.0.1:8000/v1; the "
                           "judge's with --judge-endpoint), or write the requests with --dry-run FILE.")


def _request(cfg: ExplainConfig, stage: str, con: duckdb.DuckDBPyConnection, item: dict) -> Request:
    if stage == "explain":
        return explain_request(con, item["adapter"], item["layer"], item["feature"], cfg)
    return (detect_request if stage == "detect" else classify_request)(con, item, cfg)


def _estimate(cfg: ExplainConfig, stage: str, summary: StageSummary, built: list[Request]) -> None:
    """Log the tokens (and the cost) of the stage's ``summary.pending`` requests, from those ``built``."""
    n, mean = summary.pending, sum(r.est_tokens for r in built) / max(len(built), 1)
    summary.est_prompt_tokens = round(mean * n)
    summary.max_completion_tokens = n * cfg.max_tokens
    summary.est_cost = (summary.est_prompt_tokens * cfg.price_prompt
                        + summary.max_completion_tokens * cfg.price_completion) / 1e6
    basis = "" if len(built) == n else f" (from the first {len(built)} prompts)"
    cost = (f"; at most ${summary.est_cost:,.2f} at ${cfg.price_prompt:g} and ${cfg.price_completion:g} per M"
            if cfg.price_prompt or cfg.price_completion else "")
    log.info("%s: %d requests (%d features already answered): about %.3g M prompt tokens%s and at most %.3g M "
             "completion tokens%s", stage, n, summary.already, summary.est_prompt_tokens / 1e6, basis,
             summary.max_completion_tokens / 1e6, cost)


def _run_stage(cfg: ExplainConfig, stage: str, features: list[dict], indexed_at: dict, summary: StageSummary,
               limiter: RateLimiter) -> None:
    """Ask for what ``stage`` lacks, ``cfg.concurrency`` requests at a time, and record each answer as
    it comes. Prompts are built on this thread while others wait for answers, a few ahead of them."""
    con = open_writer(cfg.index)
    pool = ThreadPoolExecutor(cfg.concurrency, thread_name_prefix=f"tca-{stage}")
    try:
        todo, summary.already = _pending(stage, features, stored(con), cfg.redo)
        summary.pending = len(todo)
        items = iter(todo)
        ahead = deque(_request(cfg, stage, con, item) for item in itertools.islice(items, ESTIMATE_SAMPLE))
        _estimate(cfg, stage, summary, list(ahead))
        client, in_flight, answered = _client(cfg, stage, limiter), {}, 0
        while True:
            while len(in_flight) < 2 * cfg.concurrency:
                if not ahead:
                    item = next(items, None)
                    if item is None:
                        break
                    ahead.append(_request(cfg, stage, con, item))
                request = ahead.popleft()
                if stage == "detect" and not request.extra["labels"]:  # no excerpt on one side: nothing to ask
                    _record(con, request, Answer(None), indexed_at[request.key], summary)
                    continue
                in_flight[pool.submit(client.complete, request.messages, request.max_tokens, cfg.temperature)] = request
            if not in_flight:
                break
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                request = in_flight.pop(future)
                status = _record(con, request, future.result(), indexed_at[request.key], summary)
                log.debug("%s %s/%s/%s: %s", stage, *request.key, status)
                answered += 1
                if answered % 100 == 0:
                    log.info("%s: %d of %d answered", stage, answered, summary.pending)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        con.close()


def _dry_run(cfg: ExplainConfig, stage: str, features: list[dict], summary: StageSummary) -> list[dict]:
    """The batch-API lines of every request ``stage`` would send."""
    con = connect(cfg.index)
    try:
        todo, summary.already = _pending(stage, features, stored(con), cfg.redo)
        requests = [_request(cfg, stage, con, item) for item in todo]
    finally:
        con.close()
    requests = [r for r in requests if stage != "detect" or r.extra["labels"]]
    summary.pending = len(requests)
    _estimate(cfg, stage, summary, requests)
    client = _client(cfg, stage, RateLimiter(0))
    return [{"custom_id": r.custom_id, "method": "POST", "url": "/v1/chat/completions",
             "body": client.body(r.messages, r.max_tokens, cfg.temperature)} for r in requests]


def explain(cfg: ExplainConfig) -> ExplainSummary:
    """Run the stages ``cfg`` asks for (or write their requests, or import answers)."""
    _check(cfg)
    if cfg.import_file is not None:
        return import_answers(cfg)
    stages = [s for s, on in zip(STAGES, (cfg.explain, cfg.score, cfg.classify)) if on]
    con = connect(cfg.index)
    try:
        features = select_features(con, cfg)
    finally:
        con.close()
    if not features:
        raise TcaError(f"no feature of {cfg.index} has at least {cfg.min_active} activations"
                       f"{' and matches --where' if cfg.where else ''}.")
    log.info("%d features selected", len(features))
    summaries = {stage: StageSummary() for stage in stages}
    if cfg.dry_run is not None:
        lines = [line for stage in stages for line in _dry_run(cfg, stage, features, summaries[stage])]
        with atomic_file(cfg.dry_run) as tmp:
            tmp.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
        log.info("wrote %d requests to %s; nothing was sent", len(lines), cfg.dry_run)
    else:
        indexed_at = {(f["adapter"], f["layer"], f["feature"]): f["indexed_at"] for f in features}
        limiter = RateLimiter(cfg.requests_per_minute)
        _ensure_table(cfg.index)
        for stage in stages:
            _run_stage(cfg, stage, features, indexed_at, summaries[stage], limiter)
    return ExplainSummary(str(cfg.index), len(features), summaries, census(cfg.index),
                          None if cfg.dry_run is None else str(cfg.dry_run))


def _ensure_table(index: Path) -> None:
    con = open_writer(index)
    try:
        _in_transaction(con, *((sql, []) for sql in TABLE.split(";\n") if sql.strip()))
    finally:
        con.close()


def census(index: Path) -> list[dict]:
    """The ``explanation_census`` rows (none before the first explanation)."""
    con = connect(index)
    try:
        return run_sql(con, "FROM explanation_census").to_pylist() if has_explanations(con) else []
    finally:
        con.close()


# ---- import ------------------------------------------------------------------------------------


def _imported(line: dict) -> Answer:
    """The answer in one line of a batch output (``response.body`` a chat completion) or a plain
    ``{"custom_id", "content"}`` line."""
    if "content" in line:
        return Answer(line["content"] if isinstance(line["content"], str) else None, model=line.get("model"),
                      error=None if isinstance(line["content"], str) else "no content")
    response = line.get("response") or {}
    if line.get("error") or response.get("status_code", 200) != 200 or "body" not in response:
        return Answer(None, error=json.dumps(line.get("error") or response)[:300])
    try:
        return parse_answer(json.dumps(response["body"]).encode(), 1)
    except ValueError as exc:
        return Answer(None, error=f"unreadable response: {exc}")


def _read_lines(path: Path) -> dict[str, list[tuple[tuple[str, int, int], str, dict]]]:
    """The import file's lines by stage: ((adapter, layer, feature), prompt hash, line)."""
    by_stage: dict[str, list] = {s: [] for s in STAGES}
    for number, text in enumerate(Path(path).read_text().splitlines(), 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
            stage, layer, feature, sha, adapter = str(line["custom_id"]).split("/", 4)
            by_stage[stage].append(((adapter, int(layer), int(feature)), sha, line))
        except (json.JSONDecodeError, KeyError, ValueError, TypeError) as exc:
            raise TcaError(f"--import {path} line {number} is not a tca request's answer "
                           f"(a JSON object whose custom_id tca wrote): {exc}.") from None
    return by_stage


def import_answers(cfg: ExplainConfig) -> ExplainSummary:
    """Record the answers of ``cfg.import_file``: explanations first, then detections and classes."""
    by_stage = _read_lines(cfg.import_file)
    _ensure_table(cfg.index)
    summaries, refused_lines, imported = {}, 0, 0
    con = open_writer(cfg.index)
    try:
        current = {(r["adapter"], r["layer"]): r["indexed_at"] for r in
                   run_sql(con, "SELECT adapter, layer, indexed_at::VARCHAR AS indexed_at FROM adapters").to_pylist()}
        for stage in STAGES:
            if not by_stage[stage]:
                continue
            summary = summaries[stage] = StageSummary()
            rows = stored(con)
            for key, sha, line in by_stage[stage]:
                if (key[0], key[1]) not in current:
                    refused_lines += 1
                    continue
                row = rows.get(key)
                if stage == "explain":
                    if row is not None and row["status"] != "error" and not cfg.redo:
                        summary.already += 1
                        continue
                    request = explain_request(con, *key, cfg)
                elif row is None or row["status"] != "ok":
                    refused_lines += 1
                    continue
                elif row["detection_status" if stage == "detect" else "class_status"] not in (None, "error") \
                        and not cfg.redo:
                    summary.already += 1
                    continue
                else:
                    request = (detect_request if stage == "detect" else classify_request)(con, row, cfg)
                if request.sha != sha:
                    refused_lines += 1
                    continue
                _record(con, request, _imported(line), current[(key[0], key[1])], summary)
                imported += 1
    finally:
        con.close()
    if refused_lines:
        log.warning("%d lines of %s answer prompts that this index and these settings do not build (another "
                    "index, other --examples/--context/--seed, or a feature not explained yet); they were skipped",
                    refused_lines, cfg.import_file)
    keys = {key for lines in by_stage.values() for key, _, _ in lines}
    return ExplainSummary(str(cfg.index), len(keys), summaries, census(cfg.index),
                          imported=imported, refused_lines=refused_lines)


def summary_json(summary: ExplainSummary) -> dict[str, Any]:
    return asdict(summary) | {"errors": summary.errors}
