"""The hesitation study: which adapter features make the fine-tuned model hesitate.

A reasoning model re-checks its work ("Wait, let me check…"); the base model does not. If
the adapters explain the fine-tune, a few of their features should carry that behaviour.
The study finds them on one set of held-out prompts and judges them on another:

0. **Two parts.** The held-out conversations split into a *selection* part and a *verdict* part
   (``split_documents``): by default each conversation's part is fixed by a hash of its question,
   half and half, so the split depends on the data alone (not on the seed or the file's order) and
   a question never sits on both sides; or ``verdict_data`` is the verdict part. Everything that
   *chooses* runs on the selection part (steps 1, 2 and the clamp scale of 4); every figure a
   verdict uses comes from the verdict part (steps 3 and 5).
1. **Candidates by attribution.** Gradient × activation of each hesitation word's logit with
   respect to every adapter feature, at the positions where the target predicts the word
   (``tca.adapted.attribute``), summed over the words. The ranking is written into the index
   (table ``attributions``) and joined there with each feature's statistics; candidates are the
   features that also fire just before a hesitation word.
2. **The search.** Ablate candidates in the adapted model best first, each joining the set if
   accuracy stays within ``accuracy_tolerance`` of the unablated model and hesitations do not
   rise, until the set cuts hesitations per response by ``cut``: *the hesitation features*.
   Then clamp them on in the hybrid (target backbone, base MLPs, no other adapter feature) at each
   multiple in ``clamp_scales`` of the activation the adapted model gives them on the same text
   (``clamp_at`` patched, the default: activation patching, the adapted model running beside the
   hybrid on the hybrid's own tokens), of their own activation where they fire on the hybrid's
   input (fires), or of their mean active value at the positions where a hesitation can begin
   (onsets: after the tokens at which the target predicts a hesitation word in the selection
   traces). Sufficiency counts
   *re-checks*, not words: a hesitation word that opens a sentence or line and is followed by
   words ("Wait, let me check…"; ``tca.adapted.generation.count_rechecks``), in a response that
   ends before ``max_new_tokens``. A feature whose decoder promotes "Wait" can make the hybrid write
   the word where a digit belongs ("5+4=Wait") or repeat it to the token limit; a word count would
   take either for hesitation. Each trial's *margin* is the room its lower bounds leave above the
   ``rechecks`` and ``accuracy`` rules of step 4 on the selection prompts (negative: how far they
   miss). *Support features* (largest attribution of either sign first, each as the adapter
   computes it) join the clamped set one at a time while the margin grows, up to
   ``support_features``, and the scale is swept again with them; the set, with or without support,
   and the scale with the largest margin are judged. A margin of about 0 on the selection prompts
   is a coin toss on the verdict prompts: the question is whether the features bring back the
   target's behaviour with room to spare, not how many words a clamp can force.
3. **Verdict conditions** on the verdict prompts, each figure with a 95% interval
   (``tca.query.stats``): the target, hybrid and adapted models, the target with the words
   banned, the adapted model with the hesitation features ablated, the hybrid with them clamped,
   and ``controls`` random feature sets, each feature replaced by a live feature of its layer with
   a matched activation frequency, ablated in the adapted model; and as many clamped in the hybrid
   in place of the support features (or of the hesitation features, without support).
4. **Necessary** when the cut's lower bound reaches ``cut``, the accuracy change's lower bound
   stays above −``accuracy_tolerance``, and the cut's lower bound exceeds the controls'
   ``control_quantile``. **Sufficient** when the lower bound of the re-checks per response the
   clamp adds to the hybrid reaches ``sufficient_fraction`` of the target's, the clamped hybrid's
   accuracy change's lower bound stays above −``accuracy_tolerance``, and the first lower bound
   exceeds the clamp controls' ``control_quantile``.
5. **How few.** The hesitation features as a fraction of all the adapters' features.

Everything is written to the output folder: ``study.json`` (every figure, and each verdict
condition prompt by prompt), ``study.md`` (the report) and ``necessity.png`` / ``sufficiency.png``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from tca import Device, ModelDtype, TcaError
from tca.adapted.attribute import attribute
from tca.adapted.batches import TokenBatch, token_batches
from tca.adapted.evaluate import conversation_records, prompt_records
from tca.adapted.evaluate import mode as computing_as
from tca.adapted.generation import (
    HESITATION_WORDS,
    Figures,
    check_words,
    count_rechecks,
    generate,
    questions_of,
    score,
    workload,
)
from tca.adapted.intervene import forward_logits, predicted_positions, single_token_ids
from tca.adapted.splice import FeatureEdit, adapted_mlps, edits, load_adapted, target_tokenizer
from tca.cache.threads import DEFAULT_THREADS, command_threads
from tca.query import stats
from tca.query.attribution import check_writable, write_attributions
from tca.query.sql import query
from tca.query.stats import Estimate, Thresholds, as_percent, as_points, as_text
from tca.ranges import FRACTION, NON_NEGATIVE, POSITIVE, PROPORTION, SHARE, Range, at_least, check_ranges
from tca.train.checkpoint import named_set

log = logging.getLogger(__name__)

EXAMPLES = 3
"""Responses kept as text per trial, shown in study.md: a count alone can hide what was written
("5+4=Wait" holds a hesitation word and no re-check)."""


@dataclass
class StudyConfig:
    """``tca study hesitation``: find the features that make the target hesitate and test them."""

    adapters: str
    """Adapter set directory; ``NAME=DIR`` names it as in the index (default: the directory's name)."""
    base: str
    """Base model: local directory or Hugging Face id (only its MLPs are read)."""
    target: str
    """Target model: local directory or Hugging Face id."""
    data: str
    """Held-out conversations (JSONL or Parquet) with reference responses: attribution runs on the
    rendered traces, generation on their prompts, accuracy against their answers. Split half and
    half by a hash of each question into a selection part and a verdict part, unless
    ``verdict_data`` is given."""
    index: str
    """The DuckDB index of these adapters (``tca index``); the attributions are written into it."""
    out: str
    """Folder for study.json, study.md and the plots."""
    verdict_data: str | None = None
    """Conversations to judge on (the verdict part); ``data`` is then all selection. Without it, the
    verdict part is the half of ``data`` that its questions' hashes assign to it."""
    words: list[str] = field(default_factory=lambda: list(HESITATION_WORDS))
    """Hesitation words, each one token of the target's tokenizer: attributed, measured teacher-forced
    and counted in the responses (default ``Wait``, ``tca.adapted.generation.HESITATION_WORDS``)."""
    contrast: bool = True
    """Attribute each word's logit minus the logit of what the target says instead, so features
    that only mark where a hesitation could go (and where the next step goes too) rank low."""
    attribution_tokens: int = field(default=20_000, metadata=POSITIVE)
    """Teacher-forced tokens of the selection part to attribute over."""
    prompts: int = field(default=100, metadata=POSITIVE)
    """Prompts per part: every condition generates from this many selection prompts (the search)
    or verdict prompts (the verdict)."""
    max_new_tokens: int = field(default=4096, metadata=POSITIVE)
    """Longest generated response. 4096 is sized for R1 traces, which run to thousands of tokens;
    a response cut here has no final answer, and the figures' ``truncated`` share says how many
    were cut: raise it until that share is near 0 (time grows with it). The demo pair needs 200."""
    max_features: int = field(default=64, metadata=POSITIVE)
    """Most candidates tried, best first, before giving up on the necessity criterion."""
    min_before_word: float = field(default=0.05, metadata=PROPORTION)
    """A candidate must sit on the token just before a hesitation word in at least this share of
    its indexed activations. Features that fire at every step (where the next step's arithmetic
    needs them too) also earn attribution there, but removing them breaks the answer."""
    cut: float = field(default=0.8, metadata=SHARE)
    """Necessary: ablation must cut hesitations per response by at least this fraction (the search's
    stopping point on the selection part; on the verdict part, the cut's lower bound)..."""
    accuracy_tolerance: float = field(default=0.05, metadata=PROPORTION)
    """...while accuracy drops by at most this much (absolute; on the verdict part, the accuracy
    change's lower bound). Sufficient too: the clamp may cost the hybrid at most this much."""
    control_quantile: float = field(default=0.95, metadata=FRACTION)
    """Necessary: the cut's lower bound must exceed this quantile of the control sets' cuts."""
    controls: int = field(default=20, metadata=POSITIVE)
    """Random control sets, each as large as the hesitation feature set, ablated on the verdict part."""
    control_frequency_ratio: float = field(
        default=1.5, metadata={"range": Range(1, None, low_open=True, words="above 1")})
    """Each control feature's activation frequency lies within ×/÷ this of the feature it replaces
    (widened by powers of it, and recorded, where no live feature of the layer is in range)."""
    clamp_scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.1, 1.25, 1.5, 1.75, 2.0, 3.0],
                                      metadata=POSITIVE)
    """Sufficient: clamp each feature at these multiples of its own activation (``clamp_at`` fires) or
    of its mean active value (onsets, everywhere) on the selection part; the scale whose lower
    bounds there leave the most room above the ``rechecks`` and ``accuracy`` rules (re-checks per
    response by ``count_rechecks``: a response cut at ``max_new_tokens`` counts none) is judged on
    the verdict part. Fine steps from 1 to 2 because on the demo pair the clamp turns from too weak
    to breaking the answers in that range."""
    clamp_at: Literal["patched", "onsets", "fires", "everywhere"] = "patched"
    """Sufficient: where, and at what strength, the clamp acts. ``patched``: at scale × the
    activation the adapted model gives the feature on the same text (activation patching: each
    prompt is generated twice in one batch, the adapted copy following the hybrid copy's tokens;
    ``tca.adapted.splice``), so the feature acts where and as strongly as the adapter has it
    without the features upstream that make it fire; the question is whether its output brings
    the behaviour back. ``onsets``: at scale × its mean
    active value, at positions whose token precedes a hesitation word where the target predicts one
    in the selection traces (on the demo pair the line break, including the one that ends the prompt
    and those of the answer), so the clamp can start a re-check but not overwrite the arithmetic.
    ``fires``: wherever the feature's encoder fires on the hybrid's own MLP input, at scale × that
    activation: a stronger question than ``patched``, since in the hybrid a feature's encoder lacks
    the upstream features that drive it (on the demo pair the hesitation feature then barely
    fires, and the support search must add its drivers). ``everywhere``: scale × the mean
    active value at every position."""
    support_features: int = field(default=0, metadata=NON_NEGATIVE)
    """Sufficient: the clamped set may grow by at most this many *support features*, each acting
    as the adapter computes it (×1). Tried in order of the size of their attribution (either sign:
    the set must also stop re-checks where the target writes none), each joins when it widens the
    margin (the room the lower bounds over selection prompts leave above the ``rechecks`` and
    ``accuracy`` rules); the support set is kept only if some scale with it leaves more margin than
    any without it, and is judged against random support sets of the same size. 0 (the default):
    the hesitation features are judged alone. Meant for ``clamp_at`` fires, where a feature lacks
    the upstream features that make it fire (the demo pair's needs about 15); patched gives it the
    adapted model's activation, and random support sets then add as much as the chosen ones."""
    onset_share: float = field(default=0.05, metadata=PROPORTION)
    """``clamp_at`` onsets: a token is an onset when at least this share of the positions where the
    target predicts a hesitation word in the selection traces sit on it, so a token after which the
    target predicts one once, by mistake (a digit, the end of a trace), does not make the clamp act
    at every occurrence of it."""
    sufficient_fraction: float = field(default=0.25, metadata=PROPORTION)
    """Sufficient: the lower bound of the re-checks per response the clamp adds to the hybrid must
    reach this fraction of the target's."""
    resamples: int = field(default=stats.RESAMPLES, metadata=at_least(100))
    """Bootstrap resamples per interval (prompts drawn with replacement, fixed seed)."""
    seq_len: int = field(default=1024, metadata=at_least(2))
    """Tokens kept per document."""
    batch: int = field(default=8, metadata=POSITIVE)
    """Documents per attribution pass."""
    gen_batch: int = field(default=64, metadata=POSITIVE)
    """Prompts generated together."""
    dtype: ModelDtype = "auto"
    """``auto`` (the checkpoint's dtype on CUDA, float32 on CPU), ``float32``, ``bfloat16`` or
    ``float16``: the models' weights and activations."""
    device: Device = "auto"
    """``auto``, ``cpu`` or ``cuda``."""
    seed: int = field(default=0, metadata=NON_NEGATIVE)
    """Seeds the random control sets."""
    threads: int = field(default=DEFAULT_THREADS, metadata=POSITIVE)
    """torch threads on the CPU, fixed whatever the machine's load (``tca.cache.threads``: more than
    one thrashed a busy 2-core machine); recorded in study.json."""

    def __post_init__(self):
        check_ranges(self)


@dataclass
class Feature:
    """A candidate hesitation feature, with what the index knows of it."""

    layer: int
    feature: int
    score: float
    """Attribution summed over the hesitation words."""
    mean: float
    """Mean active value over the indexed store (the clamp unit)."""
    n_active: int
    """Indexed activations."""
    frequency: float
    """Indexed activations per stored token (what the controls are matched on)."""
    top_logits: list[str]
    """Tokens its decoder direction promotes most (logit lens), when the index has them."""
    before_word: float
    """Share of its indexed activations on the token just before a hesitation word."""


@dataclass
class Trial:
    """One condition on one part: which features were edited and how the model behaved."""

    name: str
    n_features: int
    features: list[tuple[int, int]]
    figures: Figures
    """Greedy generation from the part's prompts."""
    p_words: float | None
    """Teacher-forced on the part's traces: mean probability of the hesitation words at the
    positions where the target predicts one of them (None where generation banned the words)."""
    rechecks: float
    """Re-checks per response, a response cut at ``max_new_tokens`` counting none (``Outcomes``)."""
    examples: list[str]
    """The first ``EXAMPLES`` responses as generated: what the counts count, to be read."""
    kept: bool = True
    """Necessity and support trials: whether the newest candidate stayed in the set (necessity:
    accuracy held and hesitations did not rise; support: the margin grew)."""
    margin: float | None = None
    """Clamp trials on the selection part: the room the clamp leaves above the ``rechecks`` and
    ``accuracy`` rules of *sufficient* there (``stats.sufficiency_margin``; negative: by how much
    it misses them)."""


@dataclass
class Outcomes:
    """One condition on the verdict prompts, prompt by prompt, in ``verdict_docs`` order: what the
    intervals resample."""

    correct: list[float | None]
    """1 or 0 against the reference answer; None where the reference has no checkable answer."""
    hesitations: list[float]
    hesitating: list[float]
    length: list[float]
    """Generated tokens."""
    truncated: list[float]
    """1 where the response reached ``max_new_tokens`` before ending."""
    rechecks: list[float]
    """Re-checks (``count_rechecks``: a hesitation word opening a sentence or line, words after it)
    where the response ended, 0 where it was cut: what sufficiency counts, so a clamp that writes
    the word in place of a digit, or repeats it to the token limit, adds nothing."""
    word_mass: list[float] | None
    """Teacher-forced: the summed probability of the words over the trace's positions where the
    target predicts one (None where generation banned the words)."""
    word_positions: list[int] | None
    """How many such positions the trace has."""


@dataclass
class Doc:
    """A held-out conversation: where it is, and the key that assigns it to a part."""

    line: int
    """1-based line (JSONL) or row (Parquet) of its file."""
    id: str | None
    """The record's ``id`` field, when it has one."""
    key: str
    """SHA-256 of its question (user turn): the same question always lands in the same part."""


@dataclass
class Control:
    """One random feature set, matched in activation frequency, on the verdict prompts: ablated in
    the adapted model (necessity) or clamped in the hybrid in place of the support features, or of
    the hesitation features when there are none (sufficiency)."""

    features: list[tuple[int, int]]
    factor: list[float]
    """Per feature, the frequency factor it was drawn within (``control_frequency_ratio`` unless widened)."""
    trial: Trial
    cut: float | None = None
    """Necessity: 1 − its hesitations ÷ the unablated adapted model's."""
    accuracy_delta: float | None = None
    """Necessity: its accuracy − the adapted model's."""
    added: float | None = None
    """Sufficiency: re-checks per response it adds to the hybrid."""


@dataclass
class StudyReport:
    adapter: str
    words: list[str]
    thresholds: Thresholds
    selection_docs: list[Doc]
    """The selection part's conversations used (generation prompts and attributed traces)."""
    verdict_docs: list[Doc]
    """The verdict prompts, in order."""
    n_positions: int
    """Positions of the selection traces where the target predicts a hesitation word (attributed)."""
    total_features: int
    candidates: list[Feature]
    """The best ``max_features`` of the features that pass the filter."""
    n_passing: int
    """Features that pass the filter (none of them may serve as a control)."""
    selection_adapted: Trial
    """The unablated adapted model on the selection prompts: the search's reference."""
    selection_target: Trial
    """The target on the selection prompts: the clamp sweep's reference."""
    selection_hybrid: Trial
    """The hybrid on the selection prompts: a clamp scale whose accuracy falls more than
    ``accuracy_tolerance`` below it is not chosen (unless every scale's does)."""
    clamp_at: str
    """Where the clamp acted (``StudyConfig.clamp_at``)."""
    clamp_tokens: list[int] | None
    """The tokens after which the clamp acts (``clamp_at`` onsets), None: wherever it fires, or everywhere."""
    clamp_pieces: list[str] | None
    """Those tokens as text."""
    necessity: list[Trial]
    """Selection part: one ablation in the adapted model per candidate tried, best first, the
    candidate with the ones kept so far. It is kept when accuracy stays within the tolerance and
    hesitations do not rise; the search stops as soon as the kept set cuts hesitations enough."""
    search_met_cut: bool
    """Whether the search's set reached ``cut`` on the selection prompts."""
    clamp_sweep: list[Trial]
    """Selection part: the hesitation features clamped in the hybrid, one trial per scale."""
    support_search: list[Trial]
    """Selection part: the hesitation features at ×1 with the support features kept so far and the
    next candidate, one trial per candidate (empty when ``support_features`` is 0)."""
    support_features: list[tuple[int, int]]
    """The support features clamped with the hesitation features (empty: judged alone)."""
    support_sweep: list[Trial]
    """Selection part: the hesitation features at each scale with the support features at ×1."""
    clamp_scale: float
    """The hesitation features' scale judged: of the sweep that is judged (``support_sweep`` when
    there are support features), the scale with the largest margin on the selection part."""
    hesitation_features: list[Feature]
    """The kept set: necessary when ``necessary``; otherwise the set that cut most while keeping
    accuracy, which sufficiency then tests."""
    baseline: dict[str, Figures]
    """Verdict part: unedited target, hybrid and adapted models."""
    baseline_p_words: dict[str, float]
    """``Trial.p_words`` of the unedited models, verdict part."""
    baseline_examples: dict[str, list[str]]
    """``Trial.examples`` of the unedited models, verdict part."""
    target_banned: Figures
    """Verdict part: the target generating with the hesitation words banned: whether the task
    survives without hesitation at all (if not, no ablation can keep accuracy)."""
    ablated: Trial | None
    """Verdict part: the hesitation features ablated in the adapted model."""
    sufficiency: list[Trial]
    """Verdict part: the hesitation features clamped in the hybrid at ``clamp_scale``, with the
    support features (one trial)."""
    conditions: dict[str, dict[str, Estimate]]
    """Verdict part, per condition (target, hybrid, adapted, target_banned, ablated, clamped), per
    figure (accuracy, hesitations, rechecks, hesitating, mean_length, truncated, p_words): value
    and 95% interval."""
    changes: dict[str, Estimate]
    """Paired over verdict prompts: ``cut`` (1 − ablated ÷ adapted hesitations per response),
    ``accuracy_delta`` (ablated − adapted), ``clamped_hesitations`` (clamped − hybrid re-checks per
    response) and ``clamped_accuracy_delta`` (clamped − hybrid accuracy)."""
    controls: list[Control]
    control_spread: dict[str, dict[str, float | None]]
    """Median and ``control_quantile`` of the controls' ``cut`` and ``accuracy_delta``, and of the
    clamp controls' ``added``."""
    clamp_controls: list[Control]
    """Random sets clamped in the hybrid: the support features (or, without them, the hesitation
    features) replaced by frequency-matched live features, never one the search could pick."""
    necessary: bool
    necessary_rules: dict[str, bool]
    """Each condition of *necessary*: ``cut``, ``accuracy``, ``controls``."""
    sufficient: bool
    sufficient_rules: dict[str, bool]
    """Each condition of *sufficient*: ``rechecks``, ``accuracy``, ``controls``."""
    hesitation_cut: float | None
    """``changes["cut"]``'s value."""
    accuracy_change: float | None
    """``changes["accuracy_delta"]``'s value."""
    fraction_of_features: float
    per_prompt: dict[str, Outcomes]
    """Every verdict condition (controls as ``control 1`` …) prompt by prompt."""
    threads: int
    """torch threads on the CPU (``StudyConfig.threads``)."""


# ---- the two parts ------------------------------------------------------------------------------


def conversations(path: str | Path) -> list[tuple[Doc, dict]]:
    """The records of ``path`` that have a question (user turn), in file order, with their ``Doc``."""
    out = []
    for line, record in conversation_records(path):
        rid = record.get("id")
        key = hashlib.sha256(record["conversations"][0]["value"].encode("utf-8")).hexdigest()
        out.append((Doc(line, None if rid is None else str(rid), key), record))
    return out


def split_documents(data: str | Path, verdict_data: str | Path | None = None
                    ) -> tuple[list[tuple[Doc, dict]], list[tuple[Doc, dict]]]:
    """(selection, verdict): the two parts of the held-out conversations, each in file order.

    Without ``verdict_data``, the conversations of ``data`` ordered by key: the first half is the
    selection part (with any other conversation of the same question), the rest the verdict part.
    A conversation's part depends on its question and on which others the file holds, never on a
    seed or the file's order. With ``verdict_data``, ``data`` selects and ``verdict_data`` judges;
    a question in both is refused.
    """
    docs = conversations(data)
    if verdict_data is not None:
        verdict = conversations(verdict_data)
        shared = {d.key for d, _ in docs} & {d.key for d, _ in verdict}
        if shared:
            raise TcaError(f"{len(shared)} question(s) of {verdict_data} are also in {data}; the verdict must be "
                           "judged on prompts the selection never saw.")
        selection = docs
    else:
        keys = sorted(d.key for d, _ in docs)
        last = keys[len(keys) // 2 - 1] if len(keys) >= 2 else ""
        selection = [(d, r) for d, r in docs if d.key <= last]
        verdict = [(d, r) for d, r in docs if d.key > last]
    if not selection or not verdict:
        raise TcaError(f"{data} needs conversations with at least two different questions to split into a "
                       "selection part and a verdict part.")
    return selection, verdict


@dataclass
class _Part:
    """One part as the model sees it: prompts to generate from, traces to teacher-force."""

    docs: list[Doc]
    records: list[dict]
    batches: list[TokenBatch]
    positions: list[torch.Tensor] = field(default_factory=list)
    """Per batch, where the target predicts a hesitation word."""


def _parts(cfg: StudyConfig, tokenizer) -> tuple[_Part, _Part]:
    """The selection part (its first ``prompts`` prompts, traces up to ``attribution_tokens``) and
    the verdict part (its first ``prompts`` conversations, prompts and whole traces aligned)."""
    selection, verdict = split_documents(cfg.data, cfg.verdict_data)
    verdict = verdict[: cfg.prompts]
    with tempfile.TemporaryDirectory(prefix="tca-study-") as tmp:
        # each part is read back through the same readers as any data file, so prompts and
        # traces are rendered exactly as generation and attribution render them elsewhere
        files = []
        for name, part in (("selection", selection), ("verdict", verdict)):
            path = Path(tmp) / f"{name}.jsonl"
            path.write_text("".join(json.dumps(r, default=str) + "\n" for _, r in part), encoding="utf-8")
            files.append(path)
        sel_records = prompt_records(files[0], cfg.prompts)
        sel_batches = token_batches(files[0], tokenizer, seq_len=cfg.seq_len, max_tokens=cfg.attribution_tokens,
                                    batch=cfg.batch)
        ver_records = prompt_records(files[1], cfg.prompts)
        ver_batches = token_batches(files[1], tokenizer, seq_len=cfg.seq_len, max_tokens=None, batch=cfg.batch)
    for name, records in (("selection", sel_records), ("verdict", ver_records)):
        if not any(len(r["conversations"]) > 1 for r in records):
            raise TcaError(f"the {name} part of the data has no reference responses, so accuracy cannot be checked.")
    used = max(len(sel_records), max(d for b in sel_batches for d in b.docs) + 1)
    if len(ver_records) < cfg.prompts:
        log.warning("the verdict part holds %d prompts, fewer than --prompts %d", len(ver_records), cfg.prompts)
    return (_Part([d for d, _ in selection[:used]], sel_records, sel_batches),
            _Part([d for d, _ in verdict], ver_records, ver_batches))


# ---- running it ---------------------------------------------------------------------------------


def _edit_sets(features: list[tuple[int, int]], value_of=lambda layer, f: 0.0,
               token_ids: frozenset[int] | None = None) -> list[FeatureEdit]:
    """One FeatureEdit per (layer, feature), so each may carry its own value."""
    return [FeatureEdit(layer, [f], float(value_of(layer, f)), token_ids) for layer, f in features]


def _onsets(part: _Part, share: float) -> frozenset[int]:
    """The tokens that hold at least ``share`` of the positions where the target predicts a
    hesitation word in the part's traces."""
    counts = Counter(t for batch, where in zip(part.batches, part.positions, strict=True)
                     for t in batch.input_ids.cpu()[where].tolist())
    total = sum(counts.values())
    return frozenset(t for t, n in counts.items() if n >= share * total)


def _candidates(cfg: StudyConfig, name: str) -> list[Feature]:
    """Every feature that raises the hesitation words and fires just before them, best attribution
    first, joined with the index."""
    words = ", ".join("'" + w.replace("'", "''") + "'" for w in cfg.words)
    table = query(cfg.index, f"""
        WITH scored AS (
            SELECT layer, feature, sum(score) AS score FROM attributions
            WHERE adapter = $adapter AND token IN ({words}) GROUP BY layer, feature HAVING sum(score) > 0
        ),
        before AS (  -- activations on the token just before a hesitation word
            SELECT a.layer, a.feature, count(*) AS n
            FROM activations a JOIN tokens t ON t.token = a.token + 1
            WHERE a.adapter = $adapter AND trim(t.piece) IN ({words})
            GROUP BY a.layer, a.feature
        )
        SELECT s.layer, s.feature, s.score, coalesce(f.mean, 0) AS mean, coalesce(f.n_active, 0) AS n_active,
               coalesce(f.frequency, 0) AS frequency, coalesce(f.top_logits, []) AS top_logits,
               coalesce(b.n, 0) / greatest(coalesce(f.n_active, 0), 1) AS before_word
        FROM scored s
        LEFT JOIN features f ON f.adapter = $adapter AND f.layer = s.layer AND f.feature = s.feature
        LEFT JOIN before b ON b.layer = s.layer AND b.feature = s.feature
        WHERE coalesce(b.n, 0) / greatest(coalesce(f.n_active, 0), 1) >= $min_before
        ORDER BY s.score DESC, s.layer, s.feature
    """, {"adapter": name, "min_before": cfg.min_before_word})
    return [Feature(r["layer"], r["feature"], r["score"], r["mean"], r["n_active"], r["frequency"],
                    list(r["top_logits"]), r["before_word"]) for r in table.to_pylist()]


@torch.no_grad()
def _word_mass(model, batches: list[TokenBatch], word_ids: list[int], positions: list[torch.Tensor]
               ) -> tuple[list[float], list[int]]:
    """Per document: the summed next-token probability of ``word_ids`` over its ``positions``, and
    how many positions it has (``token_probability`` per document, so traces can be resampled)."""
    mass, count = [], []
    for batch, where in zip(batches, positions, strict=True):
        logits = forward_logits(model, batch)
        rows = where.nonzero()[:, 0]
        p = torch.softmax(logits[where.to(logits.device)].float(), -1)[:, word_ids].sum(-1).double().cpu()
        mass += torch.zeros(where.shape[0], dtype=torch.float64).index_add_(0, rows, p).tolist()
        count += where.sum(1).tolist()
    return mass, count


@command_threads
def hesitation_study(cfg: StudyConfig) -> StudyReport:
    """Run the study and write its report into ``cfg.out``."""
    check_words(cfg.words)
    thresholds = Thresholds(cut=cfg.cut, accuracy_tolerance=cfg.accuracy_tolerance,
                            control_quantile=cfg.control_quantile, sufficient_fraction=cfg.sufficient_fraction,
                            frequency_ratio=cfg.control_frequency_ratio, resamples=cfg.resamples)
    name, path = named_set(cfg.adapters)
    check_writable(cfg.index, name)  # a wrong index or name fails before the models load
    tokenizer = target_tokenizer(cfg.target)
    word_ids = single_token_ids(tokenizer, cfg.words)
    selection, verdict = _parts(cfg, tokenizer)
    log.info("selection part: %d prompts, %d traces attributed; verdict part: %d prompts", len(selection.records),
             sum(len(b.docs) for b in selection.batches), len(verdict.records))
    work = workload("study", selection.batches, tokenizer, selection.records + verdict.records,
                    gen_batch=cfg.gen_batch, new_tokens=cfg.max_new_tokens)
    if cfg.clamp_at == "patched":  # every batch of a patched clamp runs twice
        work = replace(work, tokens=2 * work.tokens, gen_batch=2 * work.gen_batch)
    model = load_adapted(path, cfg.base, cfg.target, device=cfg.device, dtype=cfg.dtype, keep_target=True, work=work)
    mlps = {i: m for i, m in adapted_mlps(model).items() if m.adapter is not None}
    total = sum(m.adapter.cfg.n_features for m in mlps.values())

    n_positions = 0
    for word, word_id in zip(cfg.words, word_ids, strict=True):
        result = attribute(model, selection.batches, word_id, contrast=cfg.contrast)
        write_attributions(cfg.index, name, word, result)
        n_positions += result.n_positions
        log.info("%r: attributed at %d positions", word, result.n_positions)
    if n_positions == 0:
        raise TcaError(f"the target never predicts {cfg.words} on the selection part of {cfg.data}; "
                       "nothing to attribute.")
    passing = _candidates(cfg, name)
    candidates = passing[: cfg.max_features]
    if not candidates:
        raise TcaError("no adapter feature both raises the hesitation words' logits and fires before them in "
                       f"at least {cfg.min_before_word:.0%} of its activations; there is nothing to test.")

    with computing_as(model, "target"):
        for part in (selection, verdict):
            part.positions = predicted_positions(model, part.batches, word_ids)

    def run(part: _Part, trial: str, mode: str, features: list[tuple[int, int]],
            feature_edits: list[FeatureEdit], banned: list[int] | None = None) -> tuple[Trial, Outcomes]:
        log.info("%s", trial)
        with computing_as(model, mode), edits(model, feature_edits):
            responses = generate(model, tokenizer, questions_of(part.records), max_new_tokens=cfg.max_new_tokens,
                                 batch_size=cfg.gen_batch, desc=trial, banned=banned)
            # banning acts on generation only: teacher-forced, the words' probability is the unbanned model's
            mass, count = (None, None) if banned else _word_mass(model, part.batches, word_ids, part.positions)
        # scored one prompt at a time by the same function as the whole part, so per-prompt
        # outcomes and the part's figures cannot disagree on what counts as correct or a hesitation
        each = [score(tokenizer, [r], [resp], cfg.words) for r, resp in zip(part.records, responses, strict=True)]
        texts = [tokenizer.decode(r.ids, skip_special_tokens=False) for r in responses]
        finished = [0.0 if r.truncated else float(count_rechecks(text, cfg.words))
                    for r, text in zip(responses, texts, strict=True)]
        outcomes = Outcomes([f.accuracy for f in each], [f.hesitations for f in each], [f.hesitating for f in each],
                            [f.mean_length for f in each], [f.truncated for f in each], finished, mass, count)
        p_words = None if mass is None else sum(mass) / max(sum(count), 1)
        figures = score(tokenizer, part.records, responses, cfg.words)
        return Trial(trial, len(features), features, figures, p_words, sum(finished) / len(finished),
                     texts[:EXAMPLES]), outcomes

    # ---- selection: the search and the clamp scale
    sel_adapted, _ = run(selection, "adapted (selection)", "adapted", [], [])
    if sel_adapted.figures.hesitations <= 0:
        raise TcaError("the adapted model does not hesitate on the selection prompts, so there is nothing to remove; "
                       "train (or refine) the adapters further first.")
    necessity, hesitation, best, met = [], [], None, False
    for c in candidates:
        trial_set = hesitation + [c]
        features = [(f.layer, f.feature) for f in trial_set]
        trial, _ = run(selection, f"ablate {len(features)}: + ({c.layer}, {c.feature})", "adapted", features,
                       _edit_sets(features))
        current = best.figures.hesitations if best else sel_adapted.figures.hesitations
        if not _accuracy_held(cfg, sel_adapted.figures, trial.figures):
            trial.kept, trial.name = False, f"{trial.name} (dropped: accuracy)"
        elif trial.figures.hesitations > current:
            trial.kept, trial.name = False, f"{trial.name} (dropped: more hesitations)"
        necessity.append(trial)
        if trial.kept:
            hesitation, best = trial_set, trial
            if 1 - trial.figures.hesitations / sel_adapted.figures.hesitations >= cfg.cut:
                met = True
                break
    chosen = [(c.layer, c.feature) for c in hesitation]
    clamped_set = chosen or [(candidates[0].layer, candidates[0].feature)]
    table = query(cfg.index, "SELECT layer, feature, frequency, mean FROM features WHERE adapter = $a ORDER BY ALL",
                  {"a": name}).to_pydict()
    means = {(l, f): m for l, f, m in zip(table["layer"], table["feature"], table["mean"], strict=True)}
    onsets = _onsets(selection, cfg.onset_share) if cfg.clamp_at == "onsets" else None
    clamp_mode = "patched" if cfg.clamp_at == "patched" else "hybrid"

    def clamps(scale: float, features: list[tuple[int, int]], support: list[tuple[int, int]] = ()
               ) -> list[FeatureEdit]:
        """``features`` clamped as ``clamp_at`` says at ``scale``; ``support`` as the adapter computes them."""
        if cfg.clamp_at in ("fires", "patched"):
            main = [FeatureEdit(layer, [f], scale, relative=True) for layer, f in features]
        else:
            main = _edit_sets(features, lambda layer, f: scale * means.get((layer, f), 0.0), onsets)
        return main + [FeatureEdit(layer, [f], 1.0, relative=True) for layer, f in support]

    sel_target, _ = run(selection, "target (selection)", "target", [], [])
    sel_hybrid, sel_hybrid_out = run(selection, "hybrid (selection)", "hybrid", [], [])
    sel_counts = stats.resample_counts(len(selection.records), cfg.resamples)

    def clamp_trial(trial: str, support: list[tuple[int, int]], scale: float) -> Trial:
        """The clamped hybrid on the selection part, with its margin above the rules."""
        t, out = run(selection, trial, clamp_mode, clamped_set + support, clamps(scale, clamped_set, support))
        t.margin = stats.sufficiency_margin(
            stats.paired_difference(out.rechecks, sel_hybrid_out.rechecks, sel_counts), sel_target.rechecks,
            stats.paired_difference(out.correct, sel_hybrid_out.correct, sel_counts), thresholds)
        return t

    def sweep_scales(support: list[tuple[int, int]]) -> tuple[list[Trial], int]:
        with_support = f" + {len(support)} support" if support else ""
        trials = [clamp_trial(f"clamp x{s:g}{with_support} in the hybrid (selection)", support, s)
                  for s in cfg.clamp_scales]
        return trials, _judged_scale(trials, cfg.clamp_scales)

    sweep, pick = sweep_scales([])
    support, support_search, support_sweep = [], [], []
    if chosen and cfg.support_features:
        current = (sweep[cfg.clamp_scales.index(1.0)] if 1.0 in cfg.clamp_scales
                   else clamp_trial("clamp x1 in the hybrid (selection)", [], 1.0))
        for layer, f in _support_pool(cfg, name, clamped_set):
            if len(support) == cfg.support_features:
                break
            trial = clamp_trial(f"x1 + support {len(support) + 1}: + ({layer}, {f})", support + [(layer, f)], 1.0)
            trial.kept = trial.margin > current.margin
            if not trial.kept:
                trial.name += " (dropped: no more margin)"
            support_search.append(trial)
            if trial.kept:
                support, current = support + [(layer, f)], trial
        if support:
            support_sweep, support_pick = sweep_scales(support)
            if support_sweep[support_pick].margin > sweep[pick].margin:
                pick = support_pick
            else:
                support = []
    scale = cfg.clamp_scales[pick]

    # ---- verdict: every figure a verdict uses, prompt by prompt
    per_prompt: dict[str, Outcomes] = {}
    trials: dict[str, Trial] = {}
    for key, trial_name, mode, features, feature_edits, banned in [
        ("target", "target", "target", [], [], None),
        ("hybrid", "hybrid", "hybrid", [], [], None),
        ("adapted", "adapted", "adapted", [], [], None),
        ("target_banned", "target, words banned", "target", [], [], word_ids),
        *([("ablated", "adapted, hesitation features ablated", "adapted", chosen, _edit_sets(chosen), None)]
          if chosen else []),
        ("clamped", f"hybrid, clamped x{scale:g}" + (f" + {len(support)} support" if support else ""), clamp_mode,
         clamped_set + support, clamps(scale, clamped_set, support), None),
    ]:
        trials[key], per_prompt[key] = run(verdict, trial_name, mode, features, feature_edits, banned)
    counts = stats.resample_counts(len(verdict.records), cfg.resamples)
    adapted = per_prompt["adapted"]

    def change(after: Outcomes) -> tuple[Estimate, Estimate]:
        return (stats.cut(after.hesitations, adapted.hesitations, counts),
                stats.paired_difference(after.correct, adapted.correct, counts))

    controls, clamp_controls = [], []
    if chosen:
        spliced = [i for i, layer in enumerate(table["layer"]) if layer in mlps]

        def matched(replaced: list[tuple[int, int]], excluded: set[tuple[int, int]]) -> list[stats.ControlSet]:
            return stats.matched_controls(
                [table["layer"][i] for i in spliced], [table["feature"][i] for i in spliced],
                [table["frequency"][i] for i in spliced], replaced, excluded, cfg.controls,
                cfg.control_frequency_ratio, cfg.seed)

        passing_keys = {(c.layer, c.feature) for c in passing}
        for i, draw in enumerate(matched(chosen, passing_keys), start=1):
            key = f"control {i}"
            trial, per_prompt[key] = run(verdict, f"ablate random set {i} (control)", "adapted", draw.features,
                                         _edit_sets(draw.features))
            cut, acc = change(per_prompt[key])
            controls.append(Control(draw.features, draw.factor, trial, cut=cut.value, accuracy_delta=acc.value))
        # random support sets keep the hesitation features; without support the hesitation features are replaced
        tried = {tuple(t.features[-1]) for t in support_search}
        for i, draw in enumerate(matched(support or chosen, passing_keys | tried | set(chosen)), start=1):
            key = f"clamp control {i}"
            kept, extra = (clamped_set, draw.features) if support else (draw.features, [])
            trial, per_prompt[key] = run(verdict, f"clamp random set {i} (control)", clamp_mode, kept + extra,
                                         clamps(scale, kept, extra))
            clamp_controls.append(Control(draw.features, draw.factor, trial, added=float(
                np.mean(per_prompt[key].rechecks) - np.mean(per_prompt["hybrid"].rechecks))))
        for i, c in enumerate(controls + clamp_controls, start=1):
            if any(f > cfg.control_frequency_ratio for f in c.factor):
                log.info("control set %d: frequency range widened to x/÷ %s", i, max(c.factor))

    conditions = {key: _figure_estimates(per_prompt[key], counts) for key in trials}
    cut, accuracy_delta = change(per_prompt["ablated"]) if chosen else (stats.NONE, stats.NONE)
    added = stats.paired_difference(per_prompt["clamped"].rechecks,
                                    per_prompt["hybrid"].rechecks, counts)
    clamped_accuracy = stats.paired_difference(per_prompt["clamped"].correct, per_prompt["hybrid"].correct, counts)
    sufficiency = stats.sufficiency_rules(added, conditions["target"]["rechecks"].value, clamped_accuracy,
                                          [c.added for c in clamp_controls], thresholds)
    rules = stats.necessity_rules(cut, accuracy_delta, [c.cut for c in controls], thresholds)
    report = StudyReport(
        adapter=name, words=list(cfg.words), thresholds=thresholds, selection_docs=selection.docs,
        verdict_docs=verdict.docs, n_positions=n_positions, total_features=total, candidates=candidates,
        n_passing=len(passing), selection_adapted=sel_adapted, selection_target=sel_target, selection_hybrid=sel_hybrid,
        clamp_at=cfg.clamp_at,
        clamp_tokens=None if onsets is None else sorted(onsets),
        clamp_pieces=None if onsets is None else [tokenizer.decode([t]) for t in sorted(onsets)],
        necessity=necessity, search_met_cut=met,
        clamp_sweep=sweep, support_search=support_search, support_features=support, support_sweep=support_sweep,
        clamp_scale=scale, hesitation_features=hesitation,
        baseline={k: trials[k].figures for k in ("target", "hybrid", "adapted")},
        baseline_p_words={k: trials[k].p_words for k in ("target", "hybrid", "adapted")},
        baseline_examples={k: trials[k].examples for k in ("target", "hybrid", "adapted")},
        target_banned=trials["target_banned"].figures, ablated=trials.get("ablated"),
        sufficiency=[trials["clamped"]], conditions=conditions,
        changes={"cut": cut, "accuracy_delta": accuracy_delta, "clamped_hesitations": added,
                 "clamped_accuracy_delta": clamped_accuracy},
        controls=controls,
        control_spread={k: stats.spread([getattr(c, k) for c in controls], cfg.control_quantile)
                        for k in ("cut", "accuracy_delta")}
        | {"added": stats.spread([c.added for c in clamp_controls], cfg.control_quantile)},
        clamp_controls=clamp_controls,
        necessary=bool(chosen) and all(rules.values()), necessary_rules=rules,
        sufficient=bool(chosen) and all(sufficiency.values()), sufficient_rules=sufficiency,
        hesitation_cut=cut.value, accuracy_change=accuracy_delta.value,
        fraction_of_features=len(hesitation) / total, per_prompt=per_prompt, threads=cfg.threads,
    )
    write_study(report, cfg)
    return report


def _support_pool(cfg: StudyConfig, name: str, clamped: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ``max_features`` features with the largest attribution to the hesitation words, of either
    sign, other than the clamped ones: those that raise the words where the target writes them,
    and those that hold them down."""
    words = ", ".join("'" + w.replace("'", "''") + "'" for w in cfg.words)
    rows = query(cfg.index, f"""
        SELECT layer, feature FROM attributions WHERE adapter = $adapter AND token IN ({words})
        GROUP BY layer, feature HAVING sum(score) <> 0 ORDER BY abs(sum(score)) DESC, layer, feature
    """, {"adapter": name}).to_pylist()
    return [(r["layer"], r["feature"]) for r in rows if (r["layer"], r["feature"]) not in clamped][: cfg.max_features]


def _judged_scale(trials: list[Trial], scales: list[float]) -> int:
    """The trial of a sweep to judge: the largest margin on the selection part; on a tie (accuracy
    moves in steps of one prompt) the weaker clamp, then the first listed."""
    return min(range(len(trials)), key=lambda i: (-trials[i].margin, scales[i], i))


def _figure_estimates(o: Outcomes, counts) -> dict[str, Estimate]:
    """Wilson intervals for the proportions, bootstrap over prompts for the rest."""
    return {
        "accuracy": stats.proportion(o.correct),
        "hesitations": stats.mean(o.hesitations, counts),
        "rechecks": stats.mean(o.rechecks, counts),
        "hesitating": stats.proportion(o.hesitating),
        "mean_length": stats.mean(o.length, counts),
        "truncated": stats.proportion(o.truncated),
        "p_words": stats.NONE if o.word_mass is None else stats.ratio(o.word_mass, o.word_positions, counts),
    }


def _accuracy_held(cfg: StudyConfig, reference: Figures, edited: Figures) -> bool:
    """Accuracy stays within the tolerance of the unedited model's (the adapted model's for an
    ablation, the hybrid's for a clamp)."""
    return reference.accuracy is None or stats.reaches(edited.accuracy, reference.accuracy - cfg.accuracy_tolerance)


# ---- the report ---------------------------------------------------------------------------------


def write_study(report: StudyReport, cfg: StudyConfig) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    _plot_necessity(report, out / "necessity.png")
    _plot_sufficiency(report, out / "sufficiency.png")
    (out / "study.md").write_text(study_markdown(report, cfg))
    return out


CONDITION_NAMES = {
    "target": "target", "hybrid": "hybrid", "adapted": "adapted", "target_banned": "target, words banned",
    "ablated": "adapted, hesitation features ablated", "clamped": "hybrid, hesitation features clamped",
}


def study_markdown(report: StudyReport, cfg: StudyConfig) -> str:
    words = ", ".join(f"“{w}”" for w in report.words)
    t, ch, cond = report.thresholds, report.changes, report.conditions
    split = (f"`{cfg.verdict_data}`" if cfg.verdict_data else
             "the other half of the same file (each conversation's half fixed by a hash of its question)")
    lines = [
        f"# Hesitation study: {report.adapter}",
        "",
        f"Target `{cfg.target}`, base `{cfg.base}`, held-out data `{cfg.data}`; greedy, at most {cfg.max_new_tokens} "
        f"new tokens. Hesitation words: {words}.",
        "",
        f"Features are **selected** on {len(report.selection_docs)} conversations (attribution over their traces; "
        f"the search and the clamp sweep on the first {report.selection_adapted.figures.n} prompts) and **judged** on "
        f"{len(report.verdict_docs)} others: {split}. Every verdict figure carries a 95% interval over the verdict "
        f"prompts: Wilson for proportions (accuracy, responses hesitating), a percentile bootstrap over prompts "
        f"({t.resamples} resamples, fixed seed) otherwise, paired (both conditions on the same resampled prompts) "
        "for changes.",
        "",
        "## Verdict",
        "",
    ]
    n = len(report.hesitation_features)
    chosen = ", ".join(f"({f.layer}, {f.feature})" for f in report.hesitation_features)
    adapted = cond["adapted"]
    spread = report.control_spread
    if n:
        ablated = cond["ablated"]
        lines.append(
            f"- **Necessary: {_yes(report.necessary)}.** Ablating {n} feature{'s' * (n > 1)} ({chosen}; "
            f"{report.fraction_of_features:.2%} of {report.total_features}) cuts hesitations per response by "
            f"{as_percent(ch['cut'])} ({as_text(adapted['hesitations'])} → {as_text(ablated['hesitations'])}); "
            f"accuracy changes by {as_points(ch['accuracy_delta'])}.")
        rules = report.necessary_rules
        lo = None if ch["cut"].ci95 is None else ch["cut"].ci95[0]
        acc_lo = None if ch["accuracy_delta"].ci95 is None else ch["accuracy_delta"].ci95[0]
        lines += [
            f"  - the cut's lower bound {_frac(lo)} ≥ {t.cut:.0%} asked: {_yes(rules['cut'])}",
            f"  - the accuracy change's lower bound {_signed_points(acc_lo)} ≥ −{100 * t.accuracy_tolerance:g} points: "
            f"{_yes(rules['accuracy'])}",
            f"  - the cut's lower bound above the {t.control_quantile:.0%} quantile of {len(report.controls)} random "
            f"sets' cuts, {_frac(spread['cut']['p95'])} (median {_frac(spread['cut']['median'])}): "
            f"{_yes(rules['controls'])}",
        ]
        if not report.search_met_cut:
            lines.append(f"  - on the selection prompts the search did not reach the {t.cut:.0%} cut; this is the set "
                         "that cut most while keeping accuracy.")
    else:
        lines.append(f"- **Necessary: no.** No candidate kept accuracy within {100 * t.accuracy_tolerance:g} points "
                     "without raising hesitations on the selection prompts, so there is no set to judge.")
    banned = cond["target_banned"]
    lines.append(f"- Reference: the target itself with the words banned keeps accuracy {as_text(banned['accuracy'])} "
                 f"(unbanned {as_text(cond['target']['accuracy'])}), "
                 f"mean length {as_text(banned['mean_length'], '.1f')}.")
    clamped, hybrid, target = cond["clamped"], cond["hybrid"], cond["target"]
    need = (None if target["rechecks"].value is None
            else t.sufficient_fraction * target["rechecks"].value)
    added = ch["clamped_hesitations"]
    who, adds = {0: ("the top candidate", "adds"), 1: ("this feature", "adds")}.get(n, (f"these {n} features", "add"))
    k = len(report.support_features)
    if k:
        who, adds = (f"{who.removeprefix('these ')} with {k} support feature{'s' * (k > 1)} at ×1 "
                     f"({', '.join(f'({l}, {f})' for l, f in report.support_features)}; grown on the selection "
                     "prompts because no scale of the hesitation features alone met the rules there)"), "add"
    rules = report.sufficient_rules
    lo = None if added.ci95 is None else added.ci95[0]
    lines += [
        f"- **Sufficient: {_yes(report.sufficient)}.** Clamped on in the hybrid at ×{report.clamp_scale:g} "
        f"{_clamp_basis(report)} (chosen on the selection prompts), {who} {adds} {as_text(added)} re-checks per "
        f"response ({as_text(hybrid['rechecks'])} → {as_text(clamped['rechecks'])}); the hesitation words, counted "
        f"anywhere, go {as_text(hybrid['hesitations'])} → {as_text(clamped['hesitations'])} "
        f"({as_text(clamped['truncated'], '.0%')} of clamped responses cut at the token limit).",
        f"  - the lower bound {_num(lo)} ≥ {t.sufficient_fraction:g} × the target's "
        f"{as_text(target['rechecks'])} = {_num(need)}: {_yes(rules['rechecks'])}",
        f"  - the clamped hybrid's accuracy change {as_points(ch['clamped_accuracy_delta'])} against the hybrid's, "
        f"lower bound ≥ −{100 * t.accuracy_tolerance:g} points (re-checks bought by breaking the model are not the "
        f"target's behaviour): {_yes(rules['accuracy'])}",
        f"  - the lower bound above the {t.control_quantile:.0%} quantile of what {len(report.clamp_controls)} random "
        f"{'support ' if k else ''}sets add, {_num(spread['added']['p95'])} (median "
        f"{_num(spread['added']['median'])}): {_yes(rules['controls'])}",
        f"  - teacher-forced on the target's traces, the clamp moves p(words) from the hybrid's "
        f"{as_text(hybrid['p_words'], '.3f')} to {as_text(clamped['p_words'], '.3f')} (target "
        f"{as_text(target['p_words'], '.3f')}). Generation can only show hesitation where the hybrid writes a trace "
        f"to hesitate in: its responses average {as_text(hybrid['mean_length'], '.1f')} tokens, the target's "
        f"{as_text(target['mean_length'], '.1f')}.",
    ]
    lines += ["", "## Verdict conditions", "",
              f"On the {len(report.verdict_docs)} verdict prompts; each figure with its 95% interval.", "",
              "| condition | features | accuracy | mean length | truncated | hesitations / response "
              "| re-checks / response | responses hesitating | p(words) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    features = {"ablated": n, "clamped": len(report.sufficiency[0].features)}
    for key, est in cond.items():
        cells = [as_text(est["accuracy"]), as_text(est["mean_length"], ".1f"), as_text(est["truncated"]),
                 as_text(est["hesitations"]), as_text(est["rechecks"]), as_text(est["hesitating"]),
                 as_text(est["p_words"], ".3f")]
        lines.append(f"| {CONDITION_NAMES[key]} | {features.get(key, 0)} | {' | '.join(cells)} |")
    lines += ["", "Changes, paired over the verdict prompts:", "",
              f"- hesitation cut (1 − ablated ÷ adapted hesitations per response): {as_percent(ch['cut'])}",
              f"- accuracy change (ablated − adapted): {as_points(ch['accuracy_delta'])}",
              "- re-checks per response the clamp adds (clamped − hybrid): "
              f"{as_text(ch['clamped_hesitations'])}",
              f"- accuracy change of the clamp (clamped − hybrid): {as_points(ch['clamped_accuracy_delta'])}",
              "", "The banned row bans the hesitation words from the target's generation: the accuracy the task keeps "
              "without hesitating at all, an upper bound for any ablation.", "",
              "### What the responses look like", "",
              "The first verdict prompts' responses, as generated (study.json keeps them per trial, `examples`).", ""]
    examples = report.baseline_examples | {"clamped": report.sufficiency[0].examples}
    if report.ablated is not None:
        examples["ablated"] = report.ablated.examples
    for key in ("target", "hybrid", "adapted", "ablated", "clamped"):
        if key in examples:
            lines += [f"{CONDITION_NAMES[key]}:", "", "```text", *_shown(examples[key]), "```", ""]
    if report.controls:
        lines += ["## Controls", "",
                  f"{len(report.controls)} random sets of {n} feature{'s' * (n > 1)}: each hesitation feature replaced "
                  f"by a live feature of its layer whose activation frequency (index, `features.frequency`) is within "
                  f"×/÷ {t.frequency_ratio:g} of its own, never one of the {report.n_passing} features that pass the "
                  f"candidate filter; ablated in the adapted model on the verdict prompts.", "",
                  f"- cut: median {_frac(spread['cut']['median'])}, {t.control_quantile:.0%} quantile "
                  f"{_frac(spread['cut']['p95'])}",
                  f"- accuracy change: median {_signed_points(spread['accuracy_delta']['median'])}, "
                  f"{t.control_quantile:.0%} quantile {_signed_points(spread['accuracy_delta']['p95'])}", "",
                  "| set | features | frequency range | hesitations / response | accuracy | cut | accuracy change |",
                  "|---:|---|---:|---:|---:|---:|---:|"]
        for i, c in enumerate(report.controls, start=1):
            lines.append(f"| {i} | {' '.join(f'({l}, {f})' for l, f in c.features)} | ×/÷ {max(c.factor):g} | "
                         f"{c.trial.figures.hesitations:.2f} | {_acc(c.trial.figures.accuracy)} | {_frac(c.cut)} | "
                         f"{_signed_points(c.accuracy_delta)} |")
        lines.append("")
    if report.clamp_controls:
        replaced = "support features" if k else "hesitation features"
        lines += [f"{len(report.clamp_controls)} random sets for sufficiency: the {replaced} replaced the same way "
                  "(never a feature the support search tried), clamped as the verdict clamps them.", "",
                  "| set | features | frequency range | re-checks / response | accuracy | re-checks added |",
                  "|---:|---|---:|---:|---:|---:|"]
        for i, c in enumerate(report.clamp_controls, start=1):
            lines.append(f"| {i} | {' '.join(f'({l}, {f})' for l, f in c.features)} | ×/÷ {max(c.factor):g} | "
                         f"{c.trial.rechecks:.2f} | {_acc(c.trial.figures.accuracy)} | {_num(c.added)} |")
        lines.append("")
    lines += ["## Selection", "",
              f"Attribution ran over {report.n_positions} positions of the selection traces where the target predicts "
              "a hesitation word.", "",
              "### Candidates (attribution, joined with the index)", "",
              f"{report.n_passing} features pass the filter; the best {len(report.candidates)} are tried.", "",
              "| rank | layer | feature | attribution | mean act | frequency | before a hesitation word | top logits |",
              "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for rank, c in enumerate(report.candidates[:20], start=1):
        mark = " **" if c in report.hesitation_features else ""
        lines.append(f"| {rank}{mark} | {c.layer} | {c.feature} | {c.score:.1f} | {c.mean:.3f} | {c.frequency:.2e} | "
                     f"{c.before_word:.0%} | {' '.join(repr(w) for w in c.top_logits[:5])} |")
    lines += ["", "### The search: ablations in the adapted model", "",
              "Candidates join the ablated set best first; one that costs more than "
              f"{100 * t.accuracy_tolerance:g} points of accuracy, or brings hesitations back up, is dropped "
              "again (marked). Point values on the selection prompts; the right panel of the plot is the verdict.", "",
              "![necessity](necessity.png)", "",
              _trials_table([report.selection_adapted] + report.necessity),
              "", "### The clamp sweep in the hybrid", "",
              f"Each feature is clamped at the given multiple of {_clamp_basis(report)}, with every other adapter "
              "feature off, " + _clamp_where(report),
              "", "![sufficiency](sufficiency.png)", "",
              _trials_table([report.selection_target] + report.clamp_sweep), "",
              f"p(words): teacher-forced probability of {words} at the positions where the target predicts one; the "
              "other columns are greedy generations from the part's prompts. The first selection prompt's "
              "response at each scale:", "",
              "```text", *[f"{t.name.split()[1]:>6}  {t.examples[0]!r}" for t in report.clamp_sweep if t.examples],
              "```", "",
              *_support_section(report, words),
              "Find a feature's examples with `tca top INDEX LAYER FEATURE`, or in SQL:", "",
              "```sql",
              "SELECT * FROM attributions JOIN features USING (adapter, layer, feature)",
              f"WHERE adapter = '{report.adapter}' ORDER BY rank LIMIT 20;",
              "```", ""]
    return "\n".join(lines)


def _support_section(report: StudyReport, words: str) -> list[str]:
    if not report.support_search:
        return []
    rows = ["### The support search", "",
            "Margin: the room the lower bounds of the added re-checks and of the accuracy change leave above "
            "the rules of *sufficient* on the selection prompts (the smaller of the two; negative: how far they "
            "miss). At ×1, features of the largest attribution to " + words + ", of either sign, join one at a "
            "time, each kept when the margin grows.", "",
            "| trial | features | accuracy | re-checks / response | margin | kept |",
            "|---|---:|---:|---:|---:|---|"]
    for t, kept in [(t, _yes(t.kept)) for t in report.support_search] + [(t, "") for t in report.support_sweep]:
        rows.append(f"| {t.name} | {t.n_features} | {_acc(t.figures.accuracy)} | {t.rechecks:.2f} | "
                    f"{_num(t.margin, '+.3f')} | {kept} |")
    kept = (f"The {len(report.support_features)} kept are judged with the hesitation features at "
            f"×{report.clamp_scale:g} (the last rows: the hesitation features' scale swept with them)."
            ) if report.support_features else (
            "With them no scale left more margin than the hesitation features alone, which are judged alone.")
    return rows + ["", kept, ""]


def _shown(examples: list[str]) -> list[str]:
    """Responses one per block, line breaks kept, separated by a rule."""
    out: list[str] = []
    for i, text in enumerate(examples):
        out += (["---"] if i else []) + text.strip("\n").splitlines()
    return out


def _clamp_basis(report: StudyReport) -> str:
    return {"fires": "their own activation", "patched": "the activation the adapted model gives them on the same text"
            }.get(report.clamp_at, "their mean active value")


def _clamp_where(report: StudyReport) -> str:
    if report.clamp_at == "fires":
        return "wherever its encoder fires on the hybrid's MLP input."
    if report.clamp_at == "patched":
        return ("wherever it fires in the adapted model, which runs beside the hybrid on the hybrid's own text "
                "(activation patching).")
    if report.clamp_pieces is None:
        return "at every position."
    return ("at the positions after " + ", ".join(repr(x) for x in report.clamp_pieces)
            + " (where the target predicts a hesitation word in the selection traces).")


def _trials_table(trials: list[Trial]) -> str:
    rows = ["| condition | features | accuracy | mean length | truncated | hesitations / response "
            "| re-checks / response | responses hesitating | p(words) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in trials:
        f = t.figures
        rows.append(f"| {t.name} | {t.n_features} | {_acc(f.accuracy)} | {f.mean_length:.1f} | {f.truncated:.0%} | "
                    f"{f.hesitations:.2f} | {t.rechecks:.2f} | {f.hesitating:.2f} | "
                    f"{_num(t.p_words, '.3f')} |")
    return "\n".join(rows)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _frac(x: float | None) -> str:
    return _num(x, ".0%")


def _signed_points(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f} points"


def _acc(acc: float | None) -> str:
    return _num(acc, ".3f")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _errorbar(ax, x, e: Estimate, **kw) -> None:
    """A point with its 95% interval (a bare point without one)."""
    if e.value is None:
        return
    err = None if e.ci95 is None else [[e.value - e.ci95[0]], [e.ci95[1] - e.value]]
    ax.errorbar([x], [e.value], yerr=err, capsize=4, **kw)


def _plot_necessity(report: StudyReport, path: Path) -> None:
    plt = _pyplot()
    fig, (search, verdict) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    tried = range(1, len(report.necessity) + 1)
    search.plot(tried, [t.figures.hesitations for t in report.necessity], "o-", label="hesitations / response")
    search.plot(tried, [t.figures.accuracy or 0 for t in report.necessity], "s--", label="accuracy")
    dropped = [(i, t.figures.hesitations) for i, t in zip(tried, report.necessity, strict=True) if not t.kept]
    if dropped:
        search.plot(*zip(*dropped, strict=True), "rx", ms=9, label="dropped again")
    search.axhline(report.selection_adapted.figures.hesitations, color="grey", lw=0.8, ls=":", label="adapted, unablated")
    search.xaxis.get_major_locator().set_params(integer=True)
    search.set_xlabel("candidates tried, best attribution first")
    search.set_title("selection prompts: the search", fontsize=9)
    search.legend(fontsize=7)

    t = report.thresholds
    for x, key, attr, threshold, label in ((0, "cut", "cut", t.cut, "cut asked"),
                                           (1, "accuracy_delta", "accuracy_delta", -t.accuracy_tolerance, "−tolerance")):
        controls = [getattr(c, attr) for c in report.controls if getattr(c, attr) is not None]
        if controls:
            jitter = [x + 0.25 + 0.1 * ((i % 5) - 2) / 2 for i in range(len(controls))]
            verdict.plot(jitter, controls, ".", color="grey", label="random sets (controls)" if x == 0 else None)
        _errorbar(verdict, x, report.changes[key], fmt="o", color="C0",
                  label="hesitation features, 95% CI" if x == 0 else None)
        verdict.hlines(threshold, x - 0.3, x + 0.45, color="C3", ls="--", lw=1, label=label)
    verdict.axhline(0, color="k", lw=0.5)
    verdict.set_xticks([0, 1], ["hesitation cut", "accuracy change"])
    verdict.set_xlim(-0.5, 1.6)
    verdict.set_title("verdict prompts: ablated vs adapted (paired)", fontsize=9)
    verdict.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_sufficiency(report: StudyReport, path: Path) -> None:
    plt = _pyplot()
    fig, (sweep, verdict) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = [t.name.split()[1] for t in report.clamp_sweep]  # "clamp x0.5 in the hybrid …" -> "x0.5"
    values = [t.rechecks for t in report.clamp_sweep]
    colours = ["C1" if n == f"x{report.clamp_scale:g}" else "C0" for n in names]
    sweep.bar(names, values, color=colours)
    sweep.axhline(report.selection_target.rechecks, color="C2", ls="--", lw=1, label="target")
    sweep.legend(fontsize=7)
    sweep.set_xlabel(f"clamp scale (× {_clamp_basis(report).removeprefix('their ')}); orange: the one judged")
    sweep.set_ylabel("re-checks / response")
    sweep.set_title("selection prompts: clamped in the hybrid", fontsize=9)

    cond = report.conditions
    keys = ["hybrid", "clamped", "target"]
    for x, key in enumerate(keys):
        e = cond[key]["rechecks"]
        verdict.bar([x], [e.value or 0], color=["grey", "C1", "C2"][x])
        _errorbar(verdict, x, e, fmt="none", ecolor="k")
    if cond["target"]["rechecks"].value is not None:
        need = (cond["hybrid"]["rechecks"].value
                + report.thresholds.sufficient_fraction * cond["target"]["rechecks"].value)
        verdict.axhline(need, color="C3", ls="--", lw=1,
                        label=f"hybrid + {report.thresholds.sufficient_fraction:g} × target")
        verdict.legend(fontsize=7)
    verdict.set_xticks(range(len(keys)), ["hybrid", f"clamped x{report.clamp_scale:g}", "target"])
    verdict.set_title("verdict prompts, 95% CI", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
