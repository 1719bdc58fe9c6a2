"""Refinement benchmark: three recipes side by side at equal training tokens, as JSON lines.

    offline            tca train on the cache only (every size at its default)
    offline+refined    tca train on (1 - refine_share) of the tokens, then tca refine on the rest
    refined-from-zero  tca refine from zero-decoder adapters on all the tokens

For each: tokens trained on, the fraction of the hybrid's KL closed on the demo pair's
val.jsonl (``tca.adapted.evaluate``), held-out FVE of delta and L0 on the store's holdout
documents (the trainer's loader and metrics), and wall seconds of training. Offline tokens are
cache rows (each trains every layer at once); refinement tokens are teacher-forced tokens.

``python bench/refine.py [--quick] [--l1 0.4]``  (about 4 minutes on 2 CPU cores; --quick ~1)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from tca.adapted.config import REFINE_L1
from tca.adapted.evaluate import EvalConfig, evaluate
from tca.adapted.refine import RefineConfig, refine
from tca.cache.harvest import HarvestConfig, harvest
from tca.cache.plan import PlanConfig
from tca.cache.store import Store
from tca.toy.demo import DEMO_PAIR
from tca.train.checkpoint import load_adapters
from tca.train.loader import ActivationLoader, LoaderConfig
from tca.train.metrics import MetricSums
from tca.train.trainer import TrainConfig, Trainer

DEMO_HARVEST_TOKENS = 60_000
BASE, TARGET = str(DEMO_PAIR / "base"), str(DEMO_PAIR / "reasoning")
TRAIN_DATA, VAL_DATA = str(DEMO_PAIR / "data" / "train.jsonl"), str(DEMO_PAIR / "data" / "val.jsonl")


@torch.no_grad()
def store_holdout(store_url: str, adapters_dir: Path) -> dict:
    """Mean over layers of held-out FVE of delta, and mean L0, as ``tca train`` evaluates them."""
    aset = load_adapters(adapters_dir)
    store = Store.open(store_url)
    loader = ActivationLoader(store, aset.layers, LoaderConfig(batch=4096, holdout_frac=0.05, seed=0))
    sums = {i: MetricSums(store.d_model) for i in aset.layers}
    try:
        for batch in loader.eval_batches():
            for i, a in aset.adapters.items():
                out = a(batch.x[i])
                sums[i].add(out.pred, batch.delta[i], out.acts)
    finally:
        loader.close()
    n = len(sums)
    return {"fve": sum(s.fve for s in sums.values()) / n, "l0": sum(s.l0 for s in sums.values()) / n,
            "l0_layers": {i: round(s.l0, 2) for i, s in sums.items()}}


def closed_on_val(adapters_dir: Path, max_tokens: int) -> float:
    report = evaluate(EvalConfig(adapters=str(adapters_dir), base=BASE, target=TARGET, data=VAL_DATA,
                                 max_tokens=max_tokens, device="cpu"))
    return report.faithfulness.fraction_closed


def offline(store: str, out: Path, tokens: int | None) -> tuple[int, float]:
    t0 = time.perf_counter()
    trainer = Trainer(TrainConfig(store=store, out=str(out), device="cpu", tokens=tokens))
    summary = trainer.run()
    return summary["tokens_seen"], time.perf_counter() - t0


def refined(out: Path, tokens: int, adapters: Path | None, l1: float) -> tuple[int, float]:
    t0 = time.perf_counter()
    summary = refine(RefineConfig(base=BASE, target=TARGET, data=TRAIN_DATA, out=str(out), tokens=tokens,
                                  adapters=None if adapters is None else str(adapters), from_zero=adapters is None,
                                  seq_len=512, batch=8, l1=l1, device="cpu", eval_every=10**9))
    return summary["tokens_seen"], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="A quarter of the tokens (about a minute).")
    ap.add_argument("--l1", type=float, default=REFINE_L1, help="Refinement L1 weight (default: tca refine's, %(default)s).")
    ap.add_argument("--refine-share", type=float, default=0.25, help="Share of the tokens the second recipe refines on.")
    ap.add_argument("--val-tokens", type=int, default=20_000, help="Teacher-forced tokens of val.jsonl for the KL.")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    l1 = args.l1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = str(tmp / "store")
        t0 = time.perf_counter()
        harvest(HarvestConfig(base=BASE, target=TARGET, out=store, device="cpu",
                              plan=PlanConfig(data=TRAIN_DATA, max_tokens=DEMO_HARVEST_TOKENS)))
        print(json.dumps({"stage": "harvest", "tokens": DEMO_HARVEST_TOKENS,
                          "wall_s": round(time.perf_counter() - t0, 1)}), flush=True)
        # the offline default run fixes the budget every recipe gets
        off_tokens = 57_344 if args.quick else None
        total, wall = offline(store, tmp / "offline", off_tokens)
        runs = {"offline": (tmp / "offline", total, wall)}
        share = int(total * args.refine_share)
        first, wall1 = offline(store, tmp / "offline-part", total - share)
        second, wall2 = refined(tmp / "offline+refined", share, tmp / "offline-part", l1)
        runs["offline+refined"] = (tmp / "offline+refined", first + second, wall1 + wall2)
        zero, wall3 = refined(tmp / "refined-from-zero", total, None, l1)
        runs["refined-from-zero"] = (tmp / "refined-from-zero", zero, wall3)
        for recipe, (path, tokens, wall) in runs.items():
            held = store_holdout(store, path)
            print(json.dumps({"recipe": recipe, "tokens": tokens, "l1_refine": l1 if recipe != "offline" else None,
                              "fraction_closed": round(closed_on_val(path, args.val_tokens), 4),
                              "fve": round(held["fve"], 4), "l0": round(held["l0"], 2), "l0_layers": held["l0_layers"],
                              "wall_s": round(wall, 1)}), flush=True)


if __name__ == "__main__":
    main()
