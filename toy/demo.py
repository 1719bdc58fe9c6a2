"""``tca demo``: the whole pipeline on the shipped demo pair, end to end.

    harvest -> train (offline) -> refine (end to end) -> index -> eval -> hesitation study

Every stage runs through the same Python API its command uses, writes into one folder and
logs what it did; the last screen summarises the figures that matter (the KL gap closed, the
behaviour recovered, the hesitation features) and where everything is. ``quick`` shrinks every
budget so the run is a smoke test (CI runs it); the full run stays under 10 minutes on 2 cores.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tca import Device, TcaError
from tca.cache.threads import DEFAULT_THREADS, command_threads
from tca.ranges import NON_NEGATIVE, POSITIVE, check_ranges

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
    """Refinement's L1 weight: the offline default, which on this pair's 300 k-token refinement
    recovers more accuracy than ``tca refine``'s default 1.0 (65% of the gain against 50%) at a
    mean L0 of 1.6, layer 0 at 2.6 (docs/train.md, Refinement)."""
    eval_prompts: int = field(default=200, metadata=NON_NEGATIVE)
    """Held-out prompts generated from by the evaluation."""
    study_prompts: int = field(default=100, metadata=POSITIVE)
    """Held-out prompts per condition of the hesitation study."""
    study_features: int = field(default=64, metadata=POSITIVE)
    """Most candidates the study tries (one ablation each)."""
    max_new_tokens: int = field(default=200, metadata=POSITIVE)
    """Longest generated response, passed to the evaluation and the study in place of their
    4096 (sized for R1 traces): the demo target's responses are about 90 tokens."""
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
        return replace(self, harvest_tokens=12_000, refine_tokens=4_000, eval_prompts=16, study_prompts=16,
                       study_features=4, max_new_tokens=120)

    def __post_init__(self):
        check_ranges(self)


@dataclass
class DemoResult:
    out: str
    seconds: dict[str, float]
    """CPU seconds per stage."""
    eval: dict
    study: dict
    paths: dict[str, str]
    threads: int
    """torch's CPU threads (``DemoConfig.threads``)."""


@command_threads
def run_demo(cfg: DemoConfig) -> DemoResult:
    """Run every stage on the demo pair; returns the figures and the paths written."""
    from tca.adapted.evaluate import EvalConfig, evaluate
    from tca.cache.harvest import HarvestConfig, harvest
    from tca.cache.plan import PlanConfig
    from tca.query.index import IndexConfig, build_index
    from tca.query.study import StudyConfig, hesitation_study
    from tca.train.trainer import TrainConfig, train

    cfg = cfg.scaled()
    pair, out = Path(cfg.pair), Path(cfg.out)
    base, target = str(pair / "base"), str(pair / "reasoning")
    train_data, val_data = str(pair / "data" / "train.jsonl"), str(pair / "data" / "val.jsonl")
    if not (pair / "base").is_dir() or not (pair / "reasoning").is_dir():
        raise TcaError(f"{pair} is not a demo pair (it needs base/, reasoning/ and data/); build one with tca build-pair.")
    _prepare(out, cfg.overwrite)
    paths = {
        "store": out / "store", "offline": out / "adapters-offline", "adapters": out / "adapters",
        "index": out / "index.duckdb", "eval": out / "eval.json", "study": out / "study",
    }
    seconds: dict[str, float] = {}

    @contextmanager
    def stage(name: str):
        # CPU seconds of this process (``DemoConfig.threads`` says why not wall)
        log.info("== %s", name)
        t0 = time.process_time()
        yield
        seconds[name] = round(time.process_time() - t0, 1)

    with stage("harvest"):
        harvest(HarvestConfig(base=base, target=target, out=str(paths["store"]), device=cfg.device, threads=cfg.threads,
                              plan=PlanConfig(data=train_data, max_tokens=cfg.harvest_tokens)))
    with stage("train"):
        train(TrainConfig(store=str(paths["store"]), out=str(paths["offline"]), device=cfg.device, threads=cfg.threads,
                          epochs=1.0 if cfg.quick else None))
    final = paths["offline"]
    if cfg.refine_tokens:
        from tca.adapted.refine import RefineConfig, refine

        with stage("refine"):
            refine(RefineConfig(adapters=str(paths["offline"]), base=base, target=target, data=train_data,
                                out=str(paths["adapters"]), tokens=cfg.refine_tokens, l1=cfg.refine_l1,
                                device=cfg.device, threads=cfg.threads))
        final = paths["adapters"]
    else:
        paths.pop("adapters")
    named = f"demo={final}"
    with stage("index"):
        build_index(IndexConfig(store=str(paths["store"]), adapters=[named], out=paths["index"], threads=cfg.threads))
    with stage("eval"):
        report = evaluate(EvalConfig(adapters=str(final), base=base, target=target, data=val_data,
                                     generate=cfg.eval_prompts, max_new_tokens=cfg.max_new_tokens, device=cfg.device,
                                     threads=cfg.threads))
        evaluation = asdict(report)
        paths["eval"].write_text(json.dumps(evaluation, indent=2) + "\n")
    with stage("study"):
        study = hesitation_study(StudyConfig(adapters=named, base=base, target=target, data=val_data,
                                             index=str(paths["index"]), out=str(paths["study"]),
                                             prompts=cfg.study_prompts, max_new_tokens=cfg.max_new_tokens,
                                             max_features=cfg.study_features, device=cfg.device,
                                             threads=cfg.threads))
    result = DemoResult(str(out), seconds, evaluation, asdict(study), {k: str(v) for k, v in paths.items()},
                        cfg.threads)
    (out / "summary.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


def _prepare(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise TcaError(f"{out} already holds files; pass --overwrite to replace them or choose another --out.")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

