"""Faithfulness of spliced adapters: how much of the hybrid→target gap the adapted model closes.

One model is loaded (``adapted_model(..., keep_target=True)``) and switched between its three
modes, so the target, the hybrid (target backbone, base MLPs) and the adapted model (base
MLPs plus adapters) share every weight but the MLPs and are never loaded twice.

Teacher-forced on the tokens of ``--data``, over real (unpadded) positions only:

    KL(target ‖ m)   mean next-token KL of mode m against the target    (tca.train.metrics)
    fraction_closed  1 − KL(target ‖ adapted) / KL(target ‖ hybrid)
    NMSE_l(m)        Σ‖h_l(m) − h_l(target)‖² / Σ‖h_l(target)‖², h_l the output of decoder layer l

With ``generate > 0``, greedy responses to the first prompts of ``--data`` give each mode's
``Figures`` (accuracy, length, share truncated, hesitations counted as ``words``;
``tca.adapted.generation``), and the adapters' share of the target's gain over the hybrid:
``(adapted − hybrid) / (target − hybrid)``.

Layers without an adapter (``layers`` selects a subset) keep the base MLP in the adapted
model, so the adapted and hybrid models differ exactly by the spliced adapters.
"""

from __future__ import annotations

import itertools
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from tca import Device, ModelDtype, TcaError
from tca.adapted.batches import TokenBatch, token_batches
from tca.adapted.generation import HESITATION_WORDS, Figures, check_words, generate, questions_of, score, workload
from tca.adapted.splice import adapted_mlps, load_adapted, set_mode, target_tokenizer
from tca.cache.data import read_records, turns_of
from tca.cache.threads import DEFAULT_THREADS, command_threads
from tca.ranges import NON_NEGATIVE, POSITIVE, at_least, check_ranges
from tca.train.metrics import next_token_kl

log = logging.getLogger(__name__)

BEHAVIOUR_MODES = ("target", "hybrid", "adapted")


@dataclass
class EvalConfig:
    """What ``tca eval`` measures and on what."""

    adapters: str
    """Adapter set directory (``adapters.json`` + ``adapters.safetensors``)."""
    base: str
    """Base model: local directory or Hugging Face id (only its MLP weights are read)."""
    target: str
    """Target model: local directory or Hugging Face id (the backbone of every mode)."""
    data: str
    """JSONL or Parquet of conversations or texts; pass held-out data (not the training split)."""
    max_tokens: int | None = field(default=100_000, metadata=POSITIVE)
    """Teacher-forced tokens to measure KL and NMSE on (None: the whole file)."""
    seq_len: int = field(default=1024, metadata=at_least(2))
    """Tokens kept per document."""
    batch: int = field(default=8, metadata=POSITIVE)
    """Documents per forward pass (each is run three times: target, hybrid, adapted)."""
    generate: int = field(default=0, metadata=NON_NEGATIVE)
    """Prompts (the first records of ``data``) to generate from in each mode; 0 skips generation."""
    max_new_tokens: int = field(default=4096, metadata=POSITIVE)
    """Longest greedy response. 4096 is sized for R1 traces, which run to thousands of tokens; a
    response cut here has no final answer, and the figures' ``truncated`` share says how many were
    cut: raise it until that share is near 0 (time grows with it). Short-answer models such as the
    demo pair need far less (the demo passes 200)."""
    words: list[str] = field(default_factory=lambda: list(HESITATION_WORDS))
    """Words counted as hesitations in the generated responses (whole words; default ``Wait``,
    ``tca.adapted.generation.HESITATION_WORDS``)."""
    gen_batch: int = field(default=64, metadata=POSITIVE)
    """Prompts generated together."""
    dtype: ModelDtype = "auto"
    """``auto`` (the checkpoint's dtype on CUDA, float32 on CPU), ``float32``, ``bfloat16`` or
    ``float16``: the models' weights and activations; the one chosen is written into the report."""
    device: Device = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``."""
    layers: str = "all"
    """Which of the set's layers to splice: ``all`` or a list like ``0,3,5-7``."""
    threads: int = field(default=DEFAULT_THREADS, metadata=POSITIVE)
    """torch threads on the CPU, fixed whatever the machine's load (``tca.cache.threads``: more than
    one thrashed a busy 2-core machine); recorded in the report."""

    def __post_init__(self):
        check_ranges(self)


@dataclass
class Faithfulness:
    """Teacher-forced agreement of the hybrid and adapted models with the target."""

    tokens: int
    """Real tokens measured."""
    kl_hybrid: float
    """Mean next-token KL(target ‖ hybrid) in nats."""
    kl_adapted: float
    """Mean next-token KL(target ‖ adapted) in nats."""
    fraction_closed: float | None
    """1 − kl_adapted / kl_hybrid (None when the hybrid already matches the target)."""
    nmse_hybrid: dict[int, float]
    """Per decoder layer: NMSE of the hybrid's layer output against the target's."""
    nmse_adapted: dict[int, float]
    """Per decoder layer: NMSE of the adapted model's layer output against the target's."""


@dataclass
class Recovery:
    """How much of the target's behaviour over the hybrid the adapters bring back."""

    accuracy_gain_recovered: float | None
    """(acc_adapted − acc_hybrid) / (acc_target − acc_hybrid); None without a gain to recover."""
    hesitation_gain_recovered: float | None
    """The same for hesitations per response."""
    length_ratio: float | None
    """Mean response length of the adapted model over the target's."""


@dataclass
class EvalReport:
    """Everything ``tca eval`` measures."""

    adapters: str
    layers: list[int]
    """The layers whose adapters were spliced."""
    dtype: str
    device: str
    faithfulness: Faithfulness
    threads: int
    """torch threads on the CPU (``EvalConfig.threads``)."""
    behaviour: dict[str, Figures] | None = None
    """Figures of ``target``, ``hybrid`` and ``adapted`` (None without ``generate``)."""
    recovery: Recovery | None = None


# ---- the gap-closing arithmetic -----------------------------------------------------------------

_EPS = 1e-12


def fraction_closed(kl_adapted: float, kl_hybrid: float) -> float | None:
    """1 − KL_adapted / KL_hybrid: 1 when the adapters close the gap, 0 when they add nothing."""
    return None if kl_hybrid <= _EPS else 1.0 - kl_adapted / kl_hybrid


def recovered(target: float | None, hybrid: float | None, adapted: float | None) -> float | None:
    """The share of the target's difference from the hybrid that the adapted model reproduces."""
    if target is None or hybrid is None or adapted is None or abs(target - hybrid) <= _EPS:
        return None
    return (adapted - hybrid) / (target - hybrid)


def recovery(figures: dict[str, Figures]) -> Recovery:
    """``Recovery`` from the figures of the target, hybrid and adapted modes."""
    t, h, a = (figures[m] for m in ("target", "hybrid", "adapted"))
    return Recovery(
        accuracy_gain_recovered=recovered(t.accuracy, h.accuracy, a.accuracy),
        hesitation_gain_recovered=recovered(t.hesitations, h.hesitations, a.hesitations),
        length_ratio=None if t.mean_length <= _EPS else a.mean_length / t.mean_length,
    )


# ---- measuring one model in its modes -----------------------------------------------------------


@contextmanager
def mode(model: nn.Module, name: str) -> Iterator[nn.Module]:
    """Run a block with every spliced layer in mode ``name``, restoring each layer's mode after."""
    before = {i: mlp.mode for i, mlp in adapted_mlps(model).items()}
    set_mode(model, name)
    try:
        yield model
    finally:
        for i, m in before.items():
            set_mode(model, m, [i])


def _layer_outputs(model: nn.Module, batch: TokenBatch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits [B, T, V] and every decoder layer's output at real tokens ([N, d] each)."""
    keep = batch.attention_mask.bool()
    outputs: list[torch.Tensor] = []

    def capture(_module, _args, out):
        outputs.append((out[0] if isinstance(out, tuple) else out)[keep])

    handles = [layer.register_forward_hook(capture) for layer in model.model.layers]
    try:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    finally:
        for h in handles:
            h.remove()
    return logits, outputs


@torch.no_grad()
def kl_and_nmse(model: nn.Module, batches: Iterable[TokenBatch]) -> Faithfulness:
    """KL and per-layer hidden-state NMSE of the hybrid and adapted modes against the target mode.

    ``model`` comes from ``adapted_model(..., keep_target=True)``; batches are moved to its device.
    """
    device = next(model.parameters()).device
    n_layers = len(model.model.layers)
    kl = {"hybrid": 0.0, "adapted": 0.0}
    sq_err = {m: [0.0] * n_layers for m in kl}
    sq_target = [0.0] * n_layers
    tokens = 0
    for batch in tqdm(list(batches), desc="kl", leave=False):
        batch = batch.to(device)
        with mode(model, "target"):
            target_logits, target_h = _layer_outputs(model, batch)
        for layer, h in enumerate(target_h):
            sq_target[layer] += h.double().square().sum().item()
        for name in kl:
            with mode(model, name):
                logits, hs = _layer_outputs(model, batch)
            kl[name] += next_token_kl(target_logits, logits, batch.attention_mask).item()
            for layer, (h, ht) in enumerate(zip(hs, target_h, strict=True)):
                sq_err[name][layer] += (h.double() - ht.double()).square().sum().item()
        tokens += batch.n_tokens
    if tokens == 0:
        raise TcaError("there are no tokens to measure KL on.")
    nmse = {m: {layer: sq_err[m][layer] / sq_target[layer] for layer in range(n_layers)} for m in kl}
    kl_h, kl_a = kl["hybrid"] / tokens, kl["adapted"] / tokens
    return Faithfulness(tokens, kl_h, kl_a, fraction_closed(kl_a, kl_h), nmse["hybrid"], nmse["adapted"])


def behaviour(
    model: nn.Module,
    tokenizer,
    records: list[dict],
    modes: Iterable[str] = BEHAVIOUR_MODES,
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    words: tuple[str, ...] | list[str] = HESITATION_WORDS,
) -> dict[str, Figures]:
    """Greedy responses to the records' questions in each mode, scored against their answers,
    ``words`` counted as hesitations."""
    questions = questions_of(records)
    figures = {}
    for name in modes:
        with mode(model, name):
            responses = generate(model, tokenizer, questions, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, desc=name)
        figures[name] = score(tokenizer, records, responses, words)
    return figures


# ---- inputs -------------------------------------------------------------------------------------


def conversation_records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line, record) of each conversation of a JSONL or Parquet file that has a user turn, in file
    order, as ``{"conversations": [user, assistant?]}`` (the schema of ``generation.score``) with the
    record's ``id`` when it has one; text records are skipped."""
    path = Path(path)
    if not path.is_file():
        raise TcaError(f"data file {path} does not exist.")
    for line, record in read_records(path):
        if "conversations" not in record and "messages" not in record:
            continue
        turns = turns_of(record, path, line)
        user = next((c for r, c in turns if r == "user"), None)
        if user is None:
            continue
        reply = next((c for r, c in turns if r == "assistant"), None)
        conv = [{"from": "user", "value": user}] + ([{"from": "assistant", "value": reply}] if reply else [])
        yield line, {"conversations": conv} | ({"id": record["id"]} if "id" in record else {})


def prompt_records(path: str | Path, n: int) -> list[dict]:
    """The first ``n`` conversation records of ``path`` (``conversation_records``)."""
    out = [record for _, record in itertools.islice(conversation_records(path), n)]
    if not out:
        raise TcaError(f"{path} holds no conversation with a user turn to generate from.")
    return out


@command_threads
def evaluate(cfg: EvalConfig) -> EvalReport:
    """Load the adapted model once and measure its faithfulness (and behaviour) against the target."""
    check_words(cfg.words)
    tokenizer = target_tokenizer(cfg.target)
    batches = token_batches(cfg.data, tokenizer, seq_len=cfg.seq_len, max_tokens=cfg.max_tokens, batch=cfg.batch)
    records = prompt_records(cfg.data, cfg.generate) if cfg.generate else None
    work = workload("eval", batches, tokenizer, records or [], gen_batch=cfg.gen_batch, new_tokens=cfg.max_new_tokens)
    model = load_adapted(cfg.adapters, cfg.base, cfg.target, device=cfg.device, dtype=cfg.dtype,
                         keep_target=True, layers=cfg.layers, work=work)
    dtype = str(model.dtype).removeprefix("torch.")
    layers = [i for i, mlp in adapted_mlps(model).items() if mlp.adapter is not None]
    device = next(model.parameters()).device
    log.info("spliced %d adapters (layers %s) into %s on %s in %s", len(layers), layers, cfg.target, device, dtype)
    faith = kl_and_nmse(model, batches)
    report = EvalReport(str(cfg.adapters), layers, dtype, str(device), faith, cfg.threads)
    if records is not None:
        report.behaviour = behaviour(model, tokenizer, records, max_new_tokens=cfg.max_new_tokens,
                                     batch_size=cfg.gen_batch, words=cfg.words)
        report.recovery = recovery(report.behaviour)
    return report
