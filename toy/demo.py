"""``tca demo``: the whole pipeline on the shipped demo pair, end to end.

    harvest -> train (offline) -> refine (end to end) -> index -> eval -> hesitation study

Every stage runs through the same Python API its command uses, writes into one folder and
logs what it did; the last screen summarises the figures that matter (the KL gap closed, the
behaviour recovered, the hesitation features) and where everything is. ``quick`` shrinks every
budget so the run is a smoke test (CI runs it).

With ``seeds`` N > 1 the store is harvested once (it does not depend on the seed) and seeds
F … F+N−1 (``first_seed`` F, default 0) each run train → refine → index → eval → study into
``OUT/seed-S/``; ``stability.md`` compares them (``tca.query.stability``): each seed's findings,
and which hesitation features recur, matched by decoder direction. One seed writes the
single-run layout into ``OUT``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from tca import Device, TcaError
from tca.cache.threads import DEFAULT_THREADS, command_threads
from tca.ranges import NON_NEGATIVE, POSITIVE, SHARE, check_ranges

if TYPE_CHECKING:
    from tca.query.stability import SeedFindings

log = logging.getLogger(__name__)

DEMO_PAIR = Path(__file__).resolve().parent.parent / "examples" / "toy-pair"


@dataclass
class DemoConfig:
    """``tca demo``: harvest, train, refine, index, evaluate and study the demo pair."""

    out: str = "demo-out"
    """Folder for everything the demo writes."""
    pair: str = str(DEMO_PAIR)
    """The pair: base/, reasoning/ and data/{train,val}.jsonl."""
    overwrite: bool = False
    """Replace an existing ``out`` folder."""
    quick: bool = False
    """Small budgets everywhere: a smoke test of every stage, not figures to quote."""
    harvest_tokens: int = field(default=60_000, metadata=POSITIVE)
    """Tokens of train.jsonl harvested."""
    refine_tokens: int = field(default=300_000, metadata=NON_NEGATIVE)
    """Tokens of end-to-end refinement after offline training (0: skip refinement)."""
    refine_l1: float = field(default=0.5, metadata=NON_NEGATIVE)
    """Refinement's L1 weight: the offline default, which on this pair recovers more of the accuracy
    gain than ``tca refine``'s default (docs/train.md, Refinement, has the measured comparison and
    its command)."""
    eval_prompts: int = field(default=200, metadata=NON_NEGATIVE)
    """Held-out prompts generated from by the evaluation."""
    study_prompts: int = field(default=400, metadata=POSITIVE)
    """Prompts per part of the hesitation study, at most: val.jsonl selects (the demo pair's 200),
    data/verdict.jsonl judges (its 400; a pair without verdict.jsonl splits val.jsonl in two)."""
    study_features: int = field(default=64, metadata=POSITIVE)
    """Most candidates the study tries (one ablation each)."""
    max_new_tokens: int = field(default=200, metadata=POSITIVE)
    """Longest generated response, passed to the evaluation and the study in place of their
    4096 (sized for R1 traces): the demo target's responses are about 90 tokens."""
    seeds: int = field(default=1, metadata=POSITIVE)
    """Run seeds F … F+N−1 (training, refinement and the study's controls; F is ``first_seed``),
    each in OUT/seed-S/ after one harvest, and compare what they find in OUT/stability.md; 1 keeps
    the single-run layout."""
    first_seed: int = field(default=0, metadata=NON_NEGATIVE)
    """The first seed run. A seed's results do not depend on the others run with it, so
    ``--seeds 3 --first-seed 6`` gives seeds 6–8 as ``--seeds 9`` would: fresh seeds on which to
    judge a change of method that was designed while watching seeds 0 … 5."""
    match_cosine: float = field(default=0.9, metadata=SHARE)
    """Features of two seeds are the same feature when their decoder directions (rows of the refined
    ``W_dec``, same layer) have at least this cosine."""
    device: Device = "auto"
    """auto, cpu or cuda."""
    threads: int = field(default=DEFAULT_THREADS, metadata=POSITIVE)
    """torch threads on the CPU for every stage, fixed whatever the machine's load
    (``tca.cache.threads``). The stage times the demo reports ("stages (s)", ``seconds`` in
    summary.json) are CPU seconds of this process summed over its threads: what each stage costs,
    which other work on the machine does not inflate as it inflates wall time, unless threads spin
    waiting for each other (docs/scale.md, Threads: 1 thread against 2 on a loaded 2-core machine)."""

    def scaled(self) -> "DemoConfig":
        if not self.quick:
            return self
        return replace(self, harvest_tokens=12_000, refine_tokens=4_000, eval_prompts=16, study_prompts=32,
                       study_features=8, max_new_tokens=120)

    def __post_init__(self):
        check_ranges(self)


@dataclass
class DemoResult:
    out: str
    seconds: dict[str, float]
    """CPU seconds per stage, summed over the seeds (the harvest runs once)."""
    eval: dict
    """The first seed's evaluation (its eval.json)."""
    study: dict
    """The first seed's hesitation study (its study/study.json)."""
    paths: dict[str, str]
    """The store, the stability table and the first seed's outputs (one seed) or each seed's folder."""
    seeds: list[dict]
    """Per seed: its ``SeedFindings`` (seed, features, necessary, sufficient and their figures), with
    its stages' ``seconds`` and ``paths``."""
    stability: list[dict]
    """The seeds' hesitation features grouped into directions (``tca.query.stability.Direction``)."""
    support_stability: list[dict]
    """The seeds' support features (the study's ``support_features``) grouped the same way."""
    threads: int
    """torch's CPU threads: runs agree byte for byte at the same seed and thread count."""


@command_threads
def run_demo(cfg: DemoConfig) -> DemoResult:
    """Run every stage on the demo pair; returns the figures and the paths written."""
    import torch

    from tca.cache.harvest import HarvestConfig, harvest
    from tca.cache.plan import PlanConfig
    from tca.query.stability import directions, stability_markdown
    from tca.train.checkpoint import load_adapters

    command, cfg = _command(cfg), cfg.scaled()
    pair, out = Path(cfg.pair), Path(cfg.out)
    if not (pair / "base").is_dir() or not (pair / "reasoning").is_dir():
        raise TcaError(f"{pair} is not a demo pair (it needs base/, reasoning/ and data/); "
                       "build one with tca build-pair.")
    _prepare(out, cfg.overwrite)
    store = out / "store"
    seconds: dict[str, float] = {}
    with _stage("harvest", seconds):
        harvest(HarvestConfig(base=str(pair / "base"), target=str(pair / "reasoning"), out=str(store),
                              device=cfg.device, threads=cfg.threads,
                              plan=PlanConfig(data=str(pair / "data" / "train.jsonl"), max_tokens=cfg.harvest_tokens)))
    runs = []
    for seed in range(cfg.first_seed, cfg.first_seed + cfg.seeds):
        # one seed keeps the folder layout of a single run; several get a folder each
        folder = out if cfg.seeds == 1 else out / f"seed-{seed}"
        log.info("== seed %d (%d of %d), into %s", seed, len(runs) + 1, cfg.seeds, folder)
        runs.append(_run_seed(cfg, seed, store, folder))
        for name, s in runs[-1].seconds.items():
            seconds[name] = round(seconds.get(name, 0.0) + s, 1)

    decoders = {r.findings.seed: {layer: a.W_dec for layer, a in load_adapters(r.paths["final"]).adapters.items()}
                for r in runs}
    found = directions(decoders, {r.findings.seed: r.findings.features for r in runs}, cfg.match_cosine)
    support = directions(decoders, {r.findings.seed: r.findings.support for r in runs}, cfg.match_cosine, "S")
    stability = out / "stability.md"
    stability.write_text(stability_markdown([r.findings for r in runs], found, cfg.match_cosine, command, support))

    paths = {"store": str(store), "stability": str(stability)}
    if cfg.seeds == 1:
        paths |= {k: v for k, v in runs[0].paths.items() if k != "final"}
    else:
        paths |= {f"seed {r.findings.seed}": str(out / f"seed-{r.findings.seed}") for r in runs}
    result = DemoResult(
        str(out), seconds, runs[0].eval, runs[0].study, paths,
        seeds=[asdict(r.findings) | {"seconds": r.seconds, "paths": r.paths} for r in runs],
        stability=[asdict(d) for d in found], support_stability=[asdict(d) for d in support],
        threads=torch.get_num_threads())
    (out / "summary.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


@dataclass
class _SeedRun:
    findings: SeedFindings
    eval: dict
    study: dict
    seconds: dict[str, float]
    paths: dict[str, str]
    """Where the seed's stages wrote; ``final`` is the adapters the evaluation and study used."""


def _run_seed(cfg: DemoConfig, seed: int, store: Path, folder: Path) -> _SeedRun:
    """train -> refine -> index -> eval -> study of one seed into ``folder``."""
    from tca.adapted.evaluate import EvalConfig, evaluate
    from tca.query.index import IndexConfig, build_index
    from tca.query.stability import SeedFindings
    from tca.query.study import StudyConfig, hesitation_study
    from tca.train.trainer import TrainConfig, train

    pair = Path(cfg.pair)
    base, target = str(pair / "base"), str(pair / "reasoning")
    train_data, val_data = str(pair / "data" / "train.jsonl"), str(pair / "data" / "val.jsonl")
    verdict_data = pair / "data" / "verdict.jsonl"
    paths = {
        "offline": folder / "adapters-offline", "adapters": folder / "adapters",
        "index": folder / "index.duckdb", "eval": folder / "eval.json", "study": folder / "study",
    }
    seconds: dict[str, float] = {}
    with _stage("train", seconds):
        train(TrainConfig(store=str(store), out=str(paths["offline"]), device=cfg.device, seed=seed,
                          threads=cfg.threads, epochs=1.0 if cfg.quick else None))
    final = paths["offline"]
    if cfg.refine_tokens:
        from tca.adapted.refine import RefineConfig, refine

        with _stage("refine", seconds):
            refine(RefineConfig(adapters=str(paths["offline"]), base=base, target=target, data=train_data,
                                out=str(paths["adapters"]), tokens=cfg.refine_tokens, l1=cfg.refine_l1,
                                device=cfg.device, seed=seed, threads=cfg.threads))
        final = paths["adapters"]
    else:
        paths.pop("adapters")
    named = f"demo={final}"
    with _stage("index", seconds):
        build_index(IndexConfig(store=str(store), adapters=[named], out=paths["index"], threads=cfg.threads))
    with _stage("eval", seconds):
        evaluation = asdict(evaluate(EvalConfig(adapters=str(final), base=base, target=target, data=val_data,
                                                generate=cfg.eval_prompts, max_new_tokens=cfg.max_new_tokens,
                                                device=cfg.device, threads=cfg.threads)))
        paths["eval"].write_text(json.dumps(evaluation, indent=2) + "\n")
    with _stage("study", seconds):
        study = hesitation_study(StudyConfig(adapters=named, base=base, target=target, data=val_data,
                                             verdict_data=str(verdict_data) if verdict_data.is_file() else None,
                                             index=str(paths["index"]), out=str(paths["study"]),
                                             prompts=cfg.study_prompts, max_new_tokens=cfg.max_new_tokens,
                                             max_features=cfg.study_features, device=cfg.device, seed=seed,
                                             threads=cfg.threads))
    findings = SeedFindings(
        seed=seed, features=[(f.layer, f.feature) for f in study.hesitation_features],
        necessary=study.necessary, sufficient=study.sufficient, necessary_rules=study.necessary_rules,
        sufficient_rules=study.sufficient_rules, support=study.support_features, cut=study.changes["cut"],
        accuracy_delta=study.changes["accuracy_delta"],
        clamped_rechecks=study.changes["clamped_hesitations"],
        target_rechecks=study.conditions["target"]["rechecks"], clamp_scale=study.clamp_scale,
        clamped_truncated=study.conditions["clamped"]["truncated"],
        kl_closed=evaluation["faithfulness"]["fraction_closed"],
        accuracy_gain_recovered=(evaluation.get("recovery") or {}).get("accuracy_gain_recovered"))
    return _SeedRun(findings, evaluation, asdict(study), seconds,
                    {k: str(v) for k, v in paths.items()} | {"final": str(final)})


@contextmanager
def _stage(name: str, seconds: dict[str, float]):
    """Time a stage in CPU seconds of this process (``DemoConfig.threads`` says why not wall)."""
    log.info("== %s", name)
    t0 = time.process_time()
    yield
    seconds[name] = round(time.process_time() - t0, 1)


def _command(cfg: DemoConfig) -> str:
    """The ``tca demo`` command line that reproduces this run (the flags that differ from the defaults)."""
    flags = []
    for f in fields(DemoConfig):
        value, default = getattr(cfg, f.name), f.default
        if f.name in ("out", "overwrite") or value == default:
            continue
        flag = "--" + f.name.replace("_", "-")
        flags.append(flag if value is True else f"{flag} {value}")
    return " ".join(["tca demo", *flags])


def _prepare(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise TcaError(f"{out} already holds files; pass --overwrite to replace them or choose another --out.")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

