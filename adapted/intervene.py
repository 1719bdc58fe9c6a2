"""Interventions on adapter features: ablate or clamp some, and measure what changes.

An edit sets chosen features of one layer's adapter to a fixed value inside the adapted
model (``tca.adapted.splice.edits``): 0 *ablates* them, any other value *clamps* them. Edits may
be limited to positions whose input token is in a set (``--at-tokens``). Two questions, two
modes:

    adapted   the model the adapters were trained for; ablating a feature asks whether it is
              *necessary* for a behaviour
    hybrid    target backbone with the base MLPs and nothing of the adapters except the clamped
              features (value x decoder row, no decoder bias); clamping asks whether a feature
              alone is *sufficient* to bring the behaviour back (ablating changes nothing here)

What is measured, before and after the edits, on the same data:

- teacher-forced over every real position of the data: the mean next-token probability mass
  on chosen tokens (``p(Wait)``) and the mean KL(before || after) of the next-token distributions;
- greedy generation from the first ``generate`` prompts: mean response length, share truncated,
  hesitations (occurrences of ``words``) and accuracy (``tca.adapted.generation.Figures``).

Edit syntax (``parse_edits``): ``LAYER:FEATURES[=VALUE]`` joined by ``;``, FEATURES a comma list
of indices and ranges: ``2:17,40;3:5-7=4.5`` ablates features 17 and 40 of layer 2 and clamps
features 5, 6 and 7 of layer 3 at 4.5.
"""

from __future__ import annotations

import logging
import re
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import torch
from torch import nn

from tca import Device, ModelDtype, TcaError
from tca.adapted.batches import TokenBatch, token_batches
from tca.adapted.evaluate import mode as computing_as
from tca.adapted.evaluate import prompt_records
from tca.adapted.generation import HESITATION_WORDS, Figures, check_words, generate, questions_of, score, workload
from tca.adapted.splice import FeatureEdit, edits, load_adapted, paired, target_tokenizer
from tca.cache.threads import DEFAULT_THREADS, command_threads
from tca.ranges import NON_NEGATIVE, POSITIVE, at_least, check_ranges
from tca.train.metrics import next_token_kl

log = logging.getLogger(__name__)

EDIT_SYNTAX = "LAYER:FEATURES[=VALUE] joined by ';', e.g. '2:17,40;3:5-7=4.5' (VALUE 0, the default, ablates)"
_EDIT_RE = re.compile(r"^\s*(\d+)\s*:\s*([\d\s,\-]+?)\s*(?:=\s*(\S+))?\s*$")
INTERVENTION_MODES = ("adapted", "hybrid")


def parse_edits(spec: str, token_ids: frozenset[int] | None = None) -> list[FeatureEdit]:
    """Feature edits from ``LAYER:FEATURES[=VALUE];…`` (see the module docstring).

    ``token_ids`` limits every edit to positions whose input token is one of them.
    """
    out = []
    for part in filter(str.strip, spec.split(";")):
        m = _EDIT_RE.match(part)
        if m is None:
            raise TcaError(f"cannot read the edit {part.strip()!r}; write {EDIT_SYNTAX}.")
        features: list[int] = []
        for item in m.group(2).split(","):
            lo, dash, hi = item.strip().partition("-")
            if not lo.isdigit() or (dash and not hi.isdigit()) or (dash and int(hi) < int(lo)):
                raise TcaError(f"cannot read the features {m.group(2)!r} of the edit {part.strip()!r}; "
                               "list indices and ranges like 17,40,100-103.")
            features.extend(range(int(lo), int(hi or lo) + 1))
        try:
            value = float(m.group(3)) if m.group(3) is not None else 0.0
        except ValueError:
            raise TcaError(f"the value {m.group(3)!r} of the edit {part.strip()!r} is not a number.") from None
        out.append(FeatureEdit(int(m.group(1)), features, value, token_ids))
    if not out:
        raise TcaError(f"no edits given; write {EDIT_SYNTAX}.")
    return out


def single_token_ids(tokenizer, words: list[str]) -> list[int]:
    """The token id of each word, which must be exactly one token of ``tokenizer``."""
    ids = []
    for word in words:
        pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(pieces) != 1:
            shown = tokenizer.convert_ids_to_tokens(pieces)
            raise TcaError(f"{word!r} is not a single token of the target's tokenizer (it is {shown}); "
                           "pass a word that is one token, with its leading space where the text has one.")
        ids.append(pieces[0])
    return ids


def split_words(text: str) -> list[str]:
    """A comma list of words from the command line (spaces kept, so ' Wait' stays itself)."""
    words = [w for w in text.split(",") if w.strip()]
    if not words:
        raise TcaError(f"{text!r} names no token.")
    return words


def forward_logits(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """The model's logits [B, T, V] on a batch (moved to the model's device); in ``patched`` mode
    the patched copy's, the batch run twice."""
    device = next(model.parameters()).device
    batch = batch.to(device)
    if paired(model):
        twice = [torch.cat([t, t]) for t in (batch.input_ids, batch.attention_mask)]
        return model(input_ids=twice[0], attention_mask=twice[1]).logits[batch.input_ids.shape[0]:]
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def _mass(logits: torch.Tensor, mask: torch.Tensor, token_ids: list[int]) -> float:
    """Sum over real positions of the next-token probability of ``token_ids``."""
    probs = torch.softmax(logits[mask.to(logits.device).bool()].float(), -1)
    return probs[:, token_ids].sum().item()


@torch.no_grad()
def token_probability(model: nn.Module, batches: list[TokenBatch], token_ids: list[int],
                      positions: list[torch.Tensor] | None = None) -> float:
    """Mean over real (unpadded) positions, or over ``positions`` (one [B, T] mask per batch), of
    the next-token probability mass on ``token_ids``, teacher-forced on ``batches``."""
    masks = positions if positions is not None else [b.attention_mask for b in batches]
    total = sum(_mass(forward_logits(model, b), m, token_ids) for b, m in zip(batches, masks, strict=True))
    return total / max(sum(int(m.sum()) for m in masks), 1)


@torch.no_grad()
def predicted_positions(model: nn.Module, batches: list[TokenBatch], token_ids: list[int]) -> list[torch.Tensor]:
    """Per batch, the real positions where ``model`` (in its current mode) predicts one of
    ``token_ids`` greedily, as a [B, T] bool mask on the CPU."""
    ids = torch.tensor(token_ids)
    masks = []
    for b in batches:
        predicted = forward_logits(model, b).argmax(-1).cpu()
        masks.append(torch.isin(predicted, ids) & b.attention_mask.bool())
    return masks


@dataclass
class Effect:
    """One intervention's effect: each figure before and after the edits."""

    p_before: float
    """Mean next-token probability mass on the measured tokens at real positions, unedited."""
    p_after: float
    """The same with the edits."""
    kl: float
    """Mean over real positions of KL(unedited || edited) next-token distributions (nats)."""
    n_positions: int
    """Real positions the probabilities and KL are averaged over."""
    before: Figures | None
    """Generation figures unedited (None when nothing was generated)."""
    after: Figures | None
    """Generation figures with the edits."""


def intervention_effect(
    model: nn.Module,
    tokenizer,
    batches: list[TokenBatch],
    records: list[dict],
    feature_edits: list[FeatureEdit],
    mode: str,
    token_ids: list[int],
    n_generate: int,
    max_new_tokens: int,
    batch_size: int = 32,
    words: tuple[str, ...] | list[str] = HESITATION_WORDS,
) -> Effect:
    """Before/after figures of ``feature_edits`` on ``model`` computing as ``mode``.

    The model's modes are restored afterwards. ``records`` are conversation records whose
    first ``n_generate`` prompts are generated from (0: no generation); ``words`` are counted
    as hesitations in the responses.
    """
    if mode not in INTERVENTION_MODES:
        raise TcaError(f"unknown intervention mode {mode!r}; use one of {', '.join(INTERVENTION_MODES)}.")
    editing = edits(model, feature_edits)  # checks layers and features before any work
    if mode == "hybrid" and all(e.value == 0 for e in feature_edits):
        log.warning("ablating in the hybrid changes nothing (it decodes only clamped features); clamp instead")
    with computing_as(model, mode):
        before = after = kl = 0.0
        with torch.no_grad():
            for batch in batches:
                plain = forward_logits(model, batch)
                with editing:
                    edited = forward_logits(model, batch)
                mask = batch.attention_mask.to(plain.device)
                before += _mass(plain, mask, token_ids)
                after += _mass(edited, mask, token_ids)
                kl += next_token_kl(plain, edited, mask).item()
        n = sum(b.n_tokens for b in batches)
        figures: list[Figures | None] = [None, None]
        if n_generate > 0:
            chosen = records[:n_generate]
            questions = questions_of(chosen)
            for i, name in enumerate(("before", "after")):
                with editing if name == "after" else nullcontext():
                    responses = generate(model, tokenizer, questions, max_new_tokens=max_new_tokens,
                                         batch_size=batch_size, desc=f"generate {name}")
                figures[i] = score(tokenizer, chosen, responses, words)
        return Effect(before / n, after / n, kl / n, n, *figures)


# ---- the command ---------------------------------------------------------------------------------


@dataclass
class InterventionConfig:
    """``tca intervene``: ablate or clamp adapter features and measure the change."""

    adapters: str
    """Adapter set directory."""
    base: str
    """Base model: local directory or Hugging Face id (only its MLPs are read)."""
    target: str
    """Target model: local directory or Hugging Face id (backbone and tokenizer)."""
    data: str
    """JSONL or Parquet conversations: teacher-forced text and generation prompts."""
    edits: str = field(metadata={"flag": ("--edit",)})
    """The edits, ``LAYER:FEATURES[=VALUE];…`` (``parse_edits``)."""
    mode: Literal["adapted", "hybrid"] = "adapted"
    """``adapted`` (ablation: necessity) or ``hybrid`` (clamping alone: sufficiency)."""
    at_tokens: list[str] | None = None
    """Edit only at positions whose input token is one of these (each one token); None: everywhere."""
    measure: list[str] = field(default_factory=lambda: list(HESITATION_WORDS))
    """Tokens whose next-token probability mass is measured (each one token; default the
    hesitation words, ``tca.adapted.generation.HESITATION_WORDS``)."""
    max_tokens: int | None = field(default=20_000, metadata=POSITIVE)
    """Teacher-forced tokens read from ``data`` (None: all)."""
    generate: int = field(default=32, metadata=NON_NEGATIVE)
    """Prompts to generate from, the first ones of ``data`` (0: no generation)."""
    max_new_tokens: int = field(default=4096, metadata=POSITIVE)
    """Longest generated response. 4096 is sized for R1 traces, which run to thousands of tokens;
    a response cut here has no final answer, and the figures' ``truncated`` share says how many
    were cut: raise it until that share is near 0 (time grows with it). The demo pair needs 200."""
    words: list[str] = field(default_factory=lambda: list(HESITATION_WORDS))
    """Words counted as hesitations in the generated responses (whole words; default ``Wait``,
    ``tca.adapted.generation.HESITATION_WORDS``)."""
    seq_len: int = field(default=1024, metadata=at_least(2))
    """Tokens kept per document."""
    batch: int = field(default=16, metadata=POSITIVE)
    """Documents (teacher-forced) or prompts (generation) per forward pass."""
    dtype: ModelDtype = "auto"
    """``auto`` (the checkpoint's dtype on CUDA, float32 on CPU), ``float32``, ``bfloat16`` or
    ``float16``: the models' weights and activations; the one chosen is written into the report."""
    device: Device = "auto"
    """``auto``, ``cpu`` or ``cuda``."""
    threads: int = field(default=DEFAULT_THREADS, metadata=POSITIVE)
    """torch threads on the CPU, fixed whatever the machine's load (``tca.cache.threads``: more than
    one thrashed a busy 2-core machine); recorded in the report."""

    def __post_init__(self):
        check_ranges(self)


@dataclass
class InterventionReport:
    mode: str
    edits: list[dict]
    measure: list[str]
    effect: Effect
    threads: int
    """torch threads on the CPU (``InterventionConfig.threads``)."""


@command_threads
def run_intervention(cfg: InterventionConfig) -> InterventionReport:
    """Load the models and data named by ``cfg`` and measure the edits' effect."""
    feature_edits = parse_edits(cfg.edits)  # a typo fails before any model is loaded
    tokenizer = target_tokenizer(cfg.target)
    check_words(cfg.words)
    if cfg.at_tokens:
        at = frozenset(single_token_ids(tokenizer, cfg.at_tokens))
        feature_edits = [replace(e, token_ids=at) for e in feature_edits]
    measure_ids = single_token_ids(tokenizer, cfg.measure)
    batches = token_batches(cfg.data, tokenizer, seq_len=cfg.seq_len, max_tokens=cfg.max_tokens, batch=cfg.batch)
    records = prompt_records(cfg.data, cfg.generate) if cfg.generate > 0 else []
    work = workload("intervene", batches, tokenizer, records, gen_batch=cfg.batch, new_tokens=cfg.max_new_tokens)
    model = load_adapted(cfg.adapters, cfg.base, cfg.target, device=cfg.device, dtype=cfg.dtype, work=work)
    effect = intervention_effect(model, tokenizer, batches, records, feature_edits, cfg.mode, measure_ids,
                                 cfg.generate, cfg.max_new_tokens, cfg.batch, cfg.words)
    shown = [asdict(e) | {"token_ids": sorted(e.token_ids) if e.token_ids else None} for e in feature_edits]
    return InterventionReport(cfg.mode, shown, cfg.measure, effect, cfg.threads)
