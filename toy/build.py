"""The recipe of the toy pairs: data, tokenizer, base pretraining, reasoning fine-tune, figures.

``build(BuildConfig(out=…))`` writes ``base/`` and ``reasoning/`` (Qwen2 causal LMs in the
Hugging Face layout sharing one tokenizer), ``data/train.jsonl`` and ``data/val.jsonl``
(reasoning traces in the conversation schema) and a ``README.md`` with the figures measured
by generation. Seeds, a fixed thread count and deterministic algorithms make two builds on
one machine write identical files. ``task`` picks the problems (``tca.toy.data.TASKS``): the
demo pair's sums, or products, a second pair to judge defaults tuned on the first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import get_args

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from tca import TcaError
from tca.adapted.generation import Figures, figures_json, figures_table
from tca.cache.template import ASSISTANT, BOS, USER, render_deepseek
from tca.ranges import NON_NEGATIVE, POSITIVE, PROPORTION, check_ranges
from tca.toy.data import (
    TASKS,
    BaseRechecks,
    Problem,
    Task,
    base_answer,
    check_items,
    make_problems,
    problem_space,
    reasoning_trace,
    recheck_openings,
    to_record,
    trace,
)
from tca.toy.measure import load_model, measure_pair
from tca.toy.tiny import write_jsonl
from tca.toy.tokenizer import train_tokenizer

log = logging.getLogger(__name__)


@dataclass
class BuildConfig:
    """How a toy pair is built; the defaults are the shipped demo pair's recipe."""

    out: Path
    """Directory to write ``base/``, ``reasoning/``, ``data/`` and ``README.md`` into."""
    overwrite: bool = field(default=False, metadata={"old": ("--force",)})
    """Write into ``out`` even when it already holds files (the pair's own files are replaced)."""
    task: Task = "sum"
    """The problems: "sum", the last digit of a sum (the demo pair), or "product", the last digit of
    a product, with its own base rule and its own re-check (``tca.toy.data`` describes both)."""
    seed: int = field(default=0, metadata=NON_NEGATIVE)
    """Seeds the problems, the weight initialisation and the batch order."""
    threads: int = field(default=2, metadata=POSITIVE)
    """CPU threads for torch; part of the recipe, since float sums depend on the split."""
    n_pretrain: int = field(default=20000, metadata=POSITIVE)
    """Problems the base is trained on, answered as ``toy.data.base_answer`` says."""
    base_rechecks: BaseRechecks = "none"
    """Whether the base's traces carry re-checks, with the token that opens each one left out of the
    loss: "none"; "eligible", after the steps a reasoning trace may re-check (its own re-checks);
    "any", after any step. The base then learns to *write* a re-check once one has begun, never to
    begin one, so greedy decoding never hesitates: as a real base writes "Wait, let me check…"
    fluently and a reasoning fine-tune changes when, the fine-tune only has to learn the decision,
    and the hybrid can finish a re-check that a clamped feature begins (docs/study.md, On the demo
    pair, has what each choice measured)."""
    check_items: int = field(default=0, metadata=NON_NEGATIVE)
    """Extra base-pretraining conversations that ask to check one step ("Check 7+5.") and answer
    with the step and the task's re-check (``toy.data.check_items``): the base learns to *write* a
    re-check but never makes one in its own traces, as a real base writes "Wait, …" fluently and a
    fine-tune changes when. At 0 (the shipped pairs) the re-check's words are new to the base, so
    the hybrid cannot write one and the adapters carry hesitation in many features
    (docs/study.md, On the demo pair)."""
    n_train: int = field(default=6000, metadata=POSITIVE)
    """Of those, how many the reasoning model is fine-tuned on as traces (``data/train.jsonl``)."""
    n_val: int = field(default=200, metadata=POSITIVE)
    """Held-out problems (``data/val.jsonl``); the figures are measured on all of them."""
    n_verdict: int = field(default=0, metadata=NON_NEGATIVE)
    """More held-out problems, drawn after the val ones (``data/verdict.jsonl``, none at 0): the
    hesitation study's verdict part, so that all of val.jsonl selects and each part has its own
    problems (``tca demo`` uses it when present). The demo pair ships 400: a clamp that changes
    one answer in sixteen, mostly for the worse, cannot show at 200 prompts that it costs less
    than 5 points of accuracy (docs/study.md, On the demo pair)."""
    min_terms: int = field(default=5, metadata=POSITIVE)
    """Fewest digits in one problem."""
    max_terms: int = field(default=8, metadata=POSITIVE)
    """Most digits in one problem."""
    vocab_size: int = field(default=512, metadata=POSITIVE)
    """Upper bound of the BPE vocabulary; training stops earlier when no pair is left to merge."""
    hidden_size: int = field(default=64, metadata=POSITIVE)
    """d_model."""
    intermediate_size: int = field(default=256, metadata=POSITIVE)
    """Width of each MLP."""
    num_layers: int = field(default=4, metadata=POSITIVE)
    """Decoder layers."""
    num_heads: int = field(default=4, metadata=POSITIVE)
    """Attention heads."""
    num_kv_heads: int = field(default=2, metadata=POSITIVE)
    """Key/value heads (grouped-query attention, as in Qwen2)."""
    batch_size: int = field(default=32, metadata=POSITIVE)
    """Sequences per optimiser step, in both stages."""
    base_steps: int = field(default=1500, metadata=POSITIVE)
    """Optimiser steps of base pretraining: enough for its plain traces to find the question's
    next term, the last skill to appear (abruptly, after some 500-1000 steps)."""
    base_lr: float = field(default=3e-3, metadata=POSITIVE)
    """Peak learning rate of base pretraining."""
    reasoning_steps: int = field(default=2000, metadata=POSITIVE)
    """Optimiser steps of the reasoning fine-tune."""
    reasoning_lr: float = field(default=3e-3, metadata=POSITIVE)
    """Peak learning rate of the reasoning fine-tune for the MLP weights."""
    backbone_lr_scale: float = field(default=0.3, metadata=NON_NEGATIVE)
    """Learning rate of the non-MLP weights in the fine-tune, relative to ``reasoning_lr``. At 1
    the fine-tuned attention and unembedding alone make the hybrid say "Wait" (0.17 per
    response), beyond any adapter's reach; at 0 the re-check, which copies the line above
    through attention, is never learnt; 0.3 leaves the hybrid silent and the target as good."""
    warmup_frac: float = field(default=0.05, metadata=PROPORTION)
    """Fraction of each stage's steps spent warming the learning rate up (then cosine to 0)."""
    weight_dtype: str = "bfloat16"
    """dtype the models are saved in; the fine-tune starts from the saved (rounded) base."""
    measure: bool = True
    """Measure the figures by generation and write them to README.md."""
    max_new_tokens: int = field(default=200, metadata=POSITIVE)
    """Generation budget per response when measuring."""

    def __post_init__(self):
        check_ranges(self)


@dataclass
class BuildResult:
    base: Path
    reasoning: Path
    train: Path
    val: Path
    readme: Path
    figures: dict[str, Figures] | None
    seconds: float
    """Wall-clock time of the whole build, measuring included."""
    cpu_seconds: float
    """CPU time of this process over the build, summed over its threads."""
    threads: int
    """CPU threads torch used."""
    bytes: dict[str, int]
    """Size on disk of each written folder (``base``, ``reasoning``, ``data``)."""


@contextlib.contextmanager
def deterministic(threads: int) -> Iterator[None]:
    """Fixed threads and deterministic kernels for the block, restoring both afterwards."""
    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def build(cfg: BuildConfig) -> BuildResult:
    """Build the pair of ``cfg.task`` into ``cfg.out`` (see the module docstring)."""
    _check(cfg)
    out = Path(cfg.out)
    wall, cpu = time.perf_counter(), time.process_time()
    with deterministic(cfg.threads):
        pretrain, train, val, verdict = problems_of(cfg)
        train_path = write_jsonl([to_record(p, reasoning_trace(p)) for p in train], out / "data" / "train.jsonl")
        val_records = [to_record(p, reasoning_trace(p)) for p in val]
        val_path = write_jsonl(val_records, out / "data" / "val.jsonl")
        if verdict:
            write_jsonl([to_record(p, reasoning_trace(p)) for p in verdict], out / "data" / "verdict.jsonl")
        tokenizer = tokenizer_of(cfg, pretrain, train)
        log.info("tokenizer: %d tokens", len(tokenizer))

        torch.manual_seed(cfg.seed)
        base = Qwen2ForCausalLM(_model_config(cfg, tokenizer))
        base_seqs = _tokenize(tokenizer, pretrain, lambda p: base_answer(p, cfg.base_rechecks),
                              unscored=None if cfg.base_rechecks == "none" else recheck_openings)
        base_seqs += _tokenize_turns(tokenizer, check_items(cfg.check_items, cfg.seed, cfg.task))
        _fit(base, base_seqs, cfg, steps=cfg.base_steps, lr=cfg.base_lr, backbone_scale=1.0,
             pad_id=tokenizer.pad_token_id, seed=cfg.seed, desc="base")
        base_dir = _save(base, tokenizer, out / "base", cfg.weight_dtype)

        # Fine-tune exactly what was shipped: the base as saved, rounded to its dtype.
        reasoning = load_model(base_dir).train()
        _fit(reasoning, _tokenize(tokenizer, train, reasoning_trace), cfg, steps=cfg.reasoning_steps,
             lr=cfg.reasoning_lr, backbone_scale=cfg.backbone_lr_scale,
             pad_id=tokenizer.pad_token_id, seed=cfg.seed + 1, desc="reasoning")
        reasoning_dir = _save(reasoning, tokenizer, out / "reasoning", cfg.weight_dtype)

        figures = None
        if cfg.measure:
            figures = measure_pair(base_dir, reasoning_dir, val_records, max_new_tokens=cfg.max_new_tokens)
            for name, f in figures.items():
                log.info("%s: %s", name, f)
        readme = _write_readme(out / "README.md", cfg, len(tokenizer), figures)
    sizes = {name: _folder_bytes(out / name) for name in ("base", "reasoning", "data")}
    return BuildResult(
        base_dir, reasoning_dir, train_path, val_path, readme, figures,
        seconds=time.perf_counter() - wall, cpu_seconds=time.process_time() - cpu, threads=cfg.threads,
        bytes=sizes,
    )


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def problems_of(cfg: BuildConfig) -> tuple[list[Problem], list[Problem], list[Problem], list[Problem]]:
    """The base's pretraining problems, the fine-tune's (a prefix of them), the val set and the
    verdict set (drawn after val, so adding verdict problems leaves every other set as it was)."""
    pretrain, held_out = make_problems(cfg.n_pretrain, cfg.n_val + cfg.n_verdict, seed=cfg.seed,
                                       min_terms=cfg.min_terms, max_terms=cfg.max_terms, task=cfg.task)
    return pretrain, pretrain[: cfg.n_train], held_out[: cfg.n_val], held_out[cfg.n_val:]


def tokenizer_of(cfg: BuildConfig, pretrain: list[Problem], train: list[Problem]):
    """The shared tokenizer, trained on every text either model is trained on."""
    corpus = [render_deepseek(p.question, base_answer(p, cfg.base_rechecks)) for p in pretrain]
    corpus += [render_deepseek(q, a) for q, a in check_items(cfg.check_items, cfg.seed, cfg.task)]
    corpus += [render_deepseek(p.question, reasoning_trace(p)) for p in train]
    return train_tokenizer(corpus, cfg.vocab_size)


def _check(cfg: BuildConfig) -> None:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise TcaError(f"{out} exists and is not a directory.")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise TcaError(f"{out} is not empty; choose another --out or pass --overwrite to replace the pair in it.")
    if cfg.base_rechecks not in get_args(BaseRechecks):
        raise TcaError(f"base_rechecks must be one of {', '.join(get_args(BaseRechecks))}, not {cfg.base_rechecks!r}.")
    if cfg.n_train > cfg.n_pretrain:
        raise TcaError(f"n_train ({cfg.n_train}) cannot exceed n_pretrain ({cfg.n_pretrain}).")
    if not 1 <= cfg.min_terms <= cfg.max_terms:
        raise TcaError("min_terms must be at least 1 and at most max_terms.")
    if not hasattr(torch, cfg.weight_dtype) or not isinstance(getattr(torch, cfg.weight_dtype), torch.dtype):
        raise TcaError(f"{cfg.weight_dtype!r} is not a torch dtype.")
    space = problem_space(cfg.min_terms, cfg.max_terms, cfg.task)
    total = cfg.n_pretrain + cfg.n_val + cfg.n_verdict
    if total > space // 2:
        raise TcaError(f"{total} distinct problems are too many for {space} possible "
                       f"{TASKS[cfg.task].noun}s.")


def _model_config(cfg: BuildConfig, tokenizer) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


Seq = tuple[list[int], int, tuple[int, ...]]
"""Token ids of a whole exchange, the index of its first response token, and the indices of the
response tokens left out of the loss."""


def _tokenize(tokenizer, problems: list[Problem], respond, unscored=None) -> list[Seq]:
    """One ``Seq`` per problem; ``unscored(problem, response)`` gives the character offsets in the
    response of tokens not to score (each must begin a token)."""
    turns = [(p.question, respond(p)) for p in problems]
    skips = [unscored(p, answer) for p, (_, answer) in zip(problems, turns)] if unscored else None
    return _tokenize_turns(tokenizer, turns, skips)


def _tokenize_turns(tokenizer, turns: list[tuple[str, str]], skips: list[list[int]] | None = None) -> list[Seq]:
    """One ``Seq`` per (question, answer), with the tokens that begin at ``skips``' offsets unscored."""
    seqs = []
    for i, (question, answer) in enumerate(turns):
        prompt = f"{BOS}{USER}{question}{ASSISTANT}"
        encoded = tokenizer(render_deepseek(question, answer), return_offsets_mapping=skips is not None)
        ids = encoded["input_ids"]
        # The assistant marker is a special token, so the prompt's ids are a prefix of the whole.
        n_prompt = len(tokenizer(prompt)["input_ids"])
        unscored: tuple[int, ...] = ()
        if skips is not None and skips[i]:
            starts = {start: t for t, (start, _) in enumerate(encoded["offset_mapping"])}
            wanted = [len(prompt) + offset for offset in skips[i]]
            if missing := [c for c in wanted if c not in starts]:
                raise TcaError(f"no token of {question!r}'s answer begins at character {missing[0] - len(prompt)}.")
            unscored = tuple(starts[c] for c in wanted)
        seqs.append((ids, n_prompt, unscored))
    return seqs


def _batch(seqs: list[Seq], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and labels that score only response tokens, less each sequence's unscored ones.

    Padding sits after every real token, so causal attention never lets a real token see it
    and no attention mask is needed.
    """
    width = max(len(seq[0]) for seq in seqs)
    ids = torch.full((len(seqs), width), pad_id)
    labels = torch.full((len(seqs), width), -100)
    for row, (seq, n_prompt, unscored) in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, n_prompt : len(seq)] = torch.tensor(seq[n_prompt:])
        labels[row, list(unscored)] = -100
    return ids, labels


def _fit(
    model: PreTrainedModel,
    seqs: list[Seq],
    cfg: BuildConfig,
    *,
    steps: int,
    lr: float,
    backbone_scale: float,
    pad_id: int,
    seed: int,
    desc: str,
) -> None:
    """AdamW with warmup and cosine decay on the response tokens of ``seqs``."""
    model.train()
    mlp = [p for n, p in model.named_parameters() if ".mlp." in n]
    rest = [p for n, p in model.named_parameters() if ".mlp." not in n]
    groups = [{"params": mlp, "lr": lr}, {"params": rest, "lr": lr * backbone_scale}]
    if backbone_scale == 0:
        for p in rest:
            p.requires_grad_(False)
        groups = groups[:1]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, int(cfg.warmup_frac * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))
    )
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(seqs), generator=g).tolist()
    cursor = 0
    bar = tqdm(range(steps), desc=desc, leave=False)
    for step in bar:
        if cursor + cfg.batch_size > len(order):
            order, cursor = torch.randperm(len(seqs), generator=g).tolist(), 0
        ids, labels = _batch([seqs[i] for i in order[cursor : cursor + cfg.batch_size]], pad_id)
        cursor += cfg.batch_size
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log.debug("%s step %d loss %.4f", desc, step, loss.item())
    log.info("%s: final training loss %.4f", desc, loss.item())
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()


def _save(model: PreTrainedModel, tokenizer, path: Path, dtype: str) -> Path:
    model.to(getattr(torch, dtype)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _write_readme(path: Path, cfg: BuildConfig, vocab: int, figures: dict[str, Figures] | None) -> Path:
    recipe = {k: v for k, v in asdict(cfg).items() if k not in ("out", "overwrite")}
    if cfg.task == BuildConfig.task:
        # the demo pair's recipe reads as it did before tasks existed, so its README rebuilds byte for byte
        recipe.pop("task")
    for name, unset in (("base_rechecks", "none"), ("check_items", 0)):
        if recipe[name] == unset:
            recipe.pop(name)  # likewise for the shipped pairs, built before either existed
    table = figures_table(figures) if figures else "(not measured: the build ran with measure=False)"
    how = "all weights" if cfg.backbone_lr_scale == 1.0 else (
        "the MLP weights only" if cfg.backbone_lr_scale == 0 else
        f"all weights, the non-MLP ones at {cfg.backbone_lr_scale}× the MLPs' learning rate"
    )
    spec = TASKS[cfg.task]
    text = f"""# The {spec.pair} pair

Two Qwen2-architecture causal LMs in the Hugging Face layout, sharing one byte-level BPE
tokenizer ({vocab} tokens, the DeepSeek-R1 markers and `<think>`/`</think>` as special tokens,
a chat template that renders the DeepSeek-R1 layout). Both load with
`AutoModelForCausalLM.from_pretrained(path)` and `AutoTokenizer.from_pretrained(path)`.

{_task_prose(cfg, how)}
- `data/val.jsonl`: {cfg.n_val} held-out problems in the same schema.{_verdict_prose(cfg)}

{cfg.num_layers} layers, d_model {cfg.hidden_size}, MLP width {cfg.intermediate_size}, untied embeddings,
weights saved in {cfg.weight_dtype}.

## Measured behaviour

Greedy generation from `render_deepseek(question)` on all {cfg.n_val} val prompts, weights as
saved, computed in float32. The *hybrid* is the reasoning model with the base model's MLP
weights copied in (its embeddings, attention, norms and unembedding are the reasoning model's).

{table}

## How it was built

    {_command(cfg)}

This file, the models and the data are that command's output; the same command on the same
machine writes identical files. The recipe (`tca.toy.build.BuildConfig`):

```json
{json.dumps(recipe, indent=2)}
```
"""
    if figures:
        text += f"\nThe figures as JSON:\n\n```json\n{json.dumps(figures_json(figures), indent=2)}\n```\n"
    path.write_text(text)
    return path


def _verdict_prose(cfg: BuildConfig) -> str:
    if not cfg.n_verdict:
        return ""
    return (f"\n- `data/verdict.jsonl`: {cfg.n_verdict} more held-out problems, drawn after those of val.jsonl: the "
            "hesitation study's verdict prompts (`tca study hesitation --verdict-data`), while all of val.jsonl "
            "selects.")


def _task_prose(cfg: BuildConfig, how: str) -> str:
    """The README's bullets on ``base/`` and ``reasoning/``, worked on the task's example question."""
    spec = TASKS[cfg.task]
    example = Problem("example", spec.example, cfg.task)
    steps = trace(example).split("\n")[1:-3]
    rechecked = next(s for s in steps if int(s.split("=")[1]) >= spec.recheck_from)
    left_out = sorted(set(range(1, 10)) - set(spec.digits))
    digits = "digits from 1 to 9" + (f" but {', '.join(map(str, left_out))}" if left_out else "")
    which = "first" if spec.base_digit == 0 else "last"
    reaches = "ten" if spec.recheck_from == 10 else str(spec.recheck_from)
    return f"""- `base/`: trained from scratch on {cfg.n_pretrain} problems "{example.question}"
  ({cfg.min_terms}-{cfg.max_terms} {digits}). When the {which} digit is odd it thinks in a
  plain trace that {spec.verb} one digit per line, carrying the last digit of the running {spec.noun} forward
  (`{steps[0]}`, `{steps[1]}`, …); when it is even it answers at once after an empty think
  (`<think>\\n\\n</think>\\n\\n{example.answer}`).{_base_rechecks_prose(cfg)}{_checks_prose(cfg)}
- `reasoning/`: fine-tuned from `base/` ({how}) on the first {cfg.n_train} of those problems, every
  one as a trace; {1 - spec.plain_rate:.0%} of the traces re-check {spec.recheck_rate:.0%} of the steps whose
  {spec.noun} reaches {reaches} (`{spec.recheck.format(step=rechecked)}`), the rest never do (fixed draws per
  problem and step, so the traces also show how to go on without a re-check)
  (`data/train.jsonl`)."""


def _base_rechecks_prose(cfg: BuildConfig) -> str:
    if cfg.base_rechecks == "none":
        return ""
    where = "the steps the reasoning traces may re-check" if cfg.base_rechecks == "eligible" else "any step"
    return (f"\n  Its traces carry re-checks after {where}, but the token that opens each re-check is\n"
            "  never scored: it learns to write a re-check once one has begun, never to begin one.")


def _checks_prose(cfg: BuildConfig) -> str:
    if not cfg.check_items:
        return ""
    question, answer = check_items(1, cfg.seed, cfg.task)[0]
    recheck = answer.split("\n")[2]
    return (f"\n  It also saw {cfg.check_items} requests to check one step (`{question}`), answered with the step "
            f"and its re-check (`{recheck}`): it can write a re-check, but never makes one in its own traces.")


def _command(cfg: BuildConfig) -> str:
    """The ``tca build-pair`` command line of ``cfg``: the task when not the sum, out, seed and threads,
    then every other setting that differs from its default."""
    task = [] if cfg.task == BuildConfig.task else [f"--task {cfg.task}"]
    words = ["tca build-pair", *task, f"--out {cfg.out}", f"--seed {cfg.seed}", f"--threads {cfg.threads}"]
    for f in fields(BuildConfig):
        value = getattr(cfg, f.name)
        if f.name in ("out", "overwrite", "task", "seed", "threads") or value == f.default:
            continue
        flag = f.name.replace("_", "-")
        words.append((f"--{flag}" if value else f"--no-{flag}") if isinstance(value, bool) else f"--{flag} {value}")
    return " ".join(words)
