"""Ground-truth benchmark: does training find the planted features, once each, and stay quiet elsewhere?

For every point of a grid (a JSON file: ``common`` settings and ``points`` that override them):

1. build a planted pair (``tca.toy.pairs.build_planted_pair``): in each planted layer ``n``
   features, each a neuron firing on its own token type of a pseudo-word language at
   ``frequency`` of the tokens; ``co_fire`` pairs of them also share one token type, on which both
   fire (each keeps its own, at half the frequency, so both still fire on ``frequency`` of the
   tokens and stay identifiable); output directions with pairwise cosine ``cosine``; unchanged
   layers (bit-identical MLPs) and noise layers (small dense noise on all MLP weights);
2. write documents whose token frequencies realise those rates exactly, and harvest them with
   tca's harvester (``tca.cache.harvest``, defaults);
3. train with tca's trainer at its defaults (``TrainConfig`` with only store, out, layers and
   ``features = width * n`` set);
4. score (``tca.toy.scoring``) on every stored row: recovery, copies per planted feature, L0
   against the true L0 in planted layers; L0 in unchanged and noise layers; whether the trainer's
   summary.json reports each layer unchanged (``n/a`` while it reports nothing of the kind).

Prints one JSON line per point, then with ``--markdown`` a table with an ``all`` row (planted
features pooled over the grid; the worst unchanged and noise layer).

    OMP_NUM_THREADS=1 python bench/groundtruth.py bench/groundtruth_tune.json --markdown

If training crashes on a layer whose delta is exactly zero, the point is trained again without
its unchanged layers and those are reported as ``crash``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tca.cache.harvest import HarvestConfig, harvest
from tca.cache.plan import PlanConfig
from tca.cache.store import Store
from tca.toy.pairs import PairShape, PlantSpec, Truth, build_planted_pair, pseudo_words, word_ids, word_tokenizer
from tca.toy.scoring import activity, score_layer
from tca.train.checkpoint import load_adapters
from tca.train.config import TrainConfig
from tca.train.trainer import train

SHAPE_KEYS = ("hidden", "intermediate", "layers", "heads", "kv_heads", "embed_std", "dtype")
MAX_PLANTED_SHARE = 0.8
"""Most of the tokens the planted token types may take; filler words take the rest."""


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def token_plan(n: int, frequency: float, co_fire: int) -> tuple[list[list[int]], list[float]]:
    """Token types per feature (indices into the planted words) and each type's frequency."""
    if not 0 <= 2 * co_fire <= n:
        raise ValueError(f"co_fire={co_fire} pairs need at least {2 * co_fire} features, got {n}.")
    features, freqs = [], []
    for _ in range(co_fire):
        own_a, own_b, shared = len(freqs), len(freqs) + 1, len(freqs) + 2
        features += [[own_a, shared], [own_b, shared]]
        freqs += [frequency / 2] * 3
    for _ in range(n - 2 * co_fire):
        features.append([len(freqs)])
        freqs.append(frequency)
    if sum(freqs) > MAX_PLANTED_SHARE:
        raise ValueError(f"{n} features at frequency {frequency} take {sum(freqs):.0%} of the tokens "
                         f"(at most {MAX_PLANTED_SHARE:.0%}).")
    return features, freqs


def write_documents(path: Path, words: list[str], freqs: list[float], n_filler: int, tokens: int,
                    doc_len: int, seed: int) -> Path:
    """Documents of `` word`` tokens: planted word i exactly round(freqs[i] * tokens) times,
    the rest filler words drawn uniformly, all shuffled."""
    rng = np.random.default_rng(seed)
    counts = [round(f * tokens) for f in freqs]
    seq = np.concatenate([np.repeat(np.arange(len(freqs)), counts),
                          len(freqs) + rng.integers(0, n_filler, tokens - sum(counts))])
    rng.shuffle(seq)
    with path.open("w") as f:
        for start in range(0, tokens, doc_len):
            f.write(json.dumps({"text": "".join(" " + words[i] for i in seq[start : start + doc_len])}) + "\n")
    return path


def reported_unchanged(summary: dict, layer: int) -> bool | None:
    """Whether the trainer's summary reports a layer unchanged (its ``unchanged`` flag); None when
    no layer of the summary carries the flag, i.e. the trainer does not report it at all."""
    entries = [e for m in summary.get("members", {}).values() for e in m.get("layers", {}).values()]
    if not any("unchanged" in e for e in entries):
        return None
    return any(bool(m["layers"].get(str(layer), {}).get("unchanged")) for m in summary["members"].values())


def train_point(store: Path, out: Path, features: int, skip: list[int], layers: list[int],
                l1: float | None = None) -> tuple[dict, bool]:
    """Train at the defaults (or at ``l1``); (summary, whether the unchanged layers crashed and were dropped)."""
    penalty = {} if l1 is None else {"l1": [l1]}
    try:
        return train(TrainConfig(str(store), str(out), layers="all", features=features, **penalty)), False
    except ZeroDivisionError:
        kept = ",".join(str(layer) for layer in layers if layer not in skip)
        return train(TrainConfig(str(store), str(out) + "-retry", layers=kept, features=features, **penalty)), True


def run_point(settings: dict, work: Path, l1: float | None = None) -> dict:
    s = settings
    n, seed = s["n"], s["seed"]
    features_tokens, freqs = token_plan(n, s["frequency"], s["co_fire"])
    words = pseudo_words(len(freqs) + s["filler_words"], seed)
    tokenizer = word_tokenizer(words)
    ids = word_ids(tokenizer, words)
    data = write_documents(work / "data.jsonl", words, freqs, s["filler_words"], s["tokens"], s["doc_len"], seed)
    shape = PairShape(**{k: s[k] for k in SHAPE_KEYS})
    planted = {layer: [[ids[i] for i in f] for f in features_tokens] for layer in s["planted_layers"]}
    spec = PlantSpec(features=planted, noise_layers=s["noise_layers"], noise=s["noise"], cosine=s["cosine"],
                     scale=s["scale"], fire_frac=s["fire_frac"])
    seconds = {}
    t0 = time.perf_counter()
    pair = build_planted_pair(work / "pair", shape, tokenizer, spec, PlanConfig(data=str(data)), seed=seed)
    seconds["build"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    harvest(HarvestConfig(base=str(pair.base), target=str(pair.target), out=str(work / "store"),
                          plan=PlanConfig(data=str(data))))
    seconds["harvest"] = time.perf_counter() - t0
    truth = Truth.load(pair.truth)
    unchanged, noise = truth.layers("unchanged"), truth.layers("noise")
    width = s["width"] * n
    t0 = time.perf_counter()
    summary, crashed = train_point(work / "store", work / "run", width, unchanged, list(range(shape.layers)), l1)
    seconds["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    store = Store.open(str(work / "store"))
    rows = torch.from_numpy(store.row_tokens().astype(np.int64))
    (member,) = summary["members"].values()
    adapters = load_adapters(member["path"]).adapters
    scores = {"planted": {}, "unchanged": {}, "noise": {}}
    for layer in range(shape.layers):
        entry = member["layers"].get(str(layer), {})
        if layer not in adapters:
            scores["unchanged"][str(layer)] = {"l0": None, "l0_raw": None, "reported": "crash"}
            continue
        adapter = adapters[layer]
        with torch.no_grad():
            acts = adapter.encode(store.read(layer, "x", 0, store.n_rows, dtype=torch.float32))
        W_dec = adapter.W_dec.detach()
        reported = reported_unchanged(summary, layer)
        if layer in truth.layers("planted"):
            score = score_layer(truth.directions(layer), truth.firing(layer)[rows], W_dec, acts)
            scores["planted"][str(layer)] = score.as_dict() | {"fve": entry.get("fve"), "reported": reported}
        else:
            role = "noise" if layer in noise else "unchanged"
            scores[role][str(layer)] = activity(W_dec, acts) | {"fve": entry.get("fve"), "reported": reported}
    seconds["score"] = time.perf_counter() - t0
    return {"features": width, "true_frequency": _true_frequency(truth), "unchanged_crashed": crashed,
            "relative_delta": {k: v["relative_delta"] for k, v in truth.meta["layers"].items()},
            "scores": scores, "seconds": seconds}


def _true_frequency(truth: Truth) -> float:
    """Mean firing frequency of the planted features as realised on the data."""
    fs = [f["frequency"] for layer in truth.layers("planted") for f in truth.meta["layers"][str(layer)]["features"]]
    return sum(fs) / len(fs)


# ---- the table ---------------------------------------------------------------------------------


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "n/a" if v is None else format(v, spec)


def _reported(entries: list[dict], want: bool) -> str:
    """How many of these layers the trainer reported as ``want`` (unchanged or not), or n/a / crash."""
    values = [e["reported"] for e in entries]
    if any(v == "crash" for v in values):
        return "crash"
    if not values or any(v is None for v in values):
        return "n/a"
    return f"{sum(v == want for v in values)}/{len(values)}"


def _row(label: str, rec: dict | None, records: list[dict]) -> str:
    planted = [p for r in records for p in r["scores"]["planted"].values()]
    unchanged = [u for r in records for u in r["scores"]["unchanged"].values()]
    noise = [u for r in records for u in r["scores"]["noise"].values()]
    copies = [c for p in planted for c in p["copies"]]
    recovered = [x for p in planted for x in p["recovered"]]
    # the first 2 * co_fire features of a point are its co-firing pairs (token_plan)
    cofiring = [x for r in records for p in r["scores"]["planted"].values() for x in p["recovered"][: 2 * r["co_fire"]]]
    l0 = sum(p["l0"] for p in planted) / len(planted)
    true_l0 = sum(p["true_l0"] for p in planted) / len(planted)
    fve = min((p["fve"] for p in planted if p["fve"] is not None), default=None)
    unchanged_l0 = [u["l0"] for u in unchanged if u["l0"] is not None]
    unchanged_raw = [u["l0_raw"] for u in unchanged if u["l0_raw"] is not None]
    settings = ["", "", "", "", ""] if rec is None else [
        str(rec["n"]), f"{rec['frequency']:.3g}", f"{rec['cosine']:g}", str(rec["co_fire"]),
        f"{rec['width']}x ({rec['features']})",
    ]
    cells = settings + [
        f"{sum(recovered)}/{len(recovered)}",
        f"{sum(cofiring)}/{len(cofiring)}" if cofiring else "-",
        f"{sum(copies) / len(copies):.2f} / {max(copies)}",
        f"{l0:.2f} / {true_l0:.3f} ({l0 / true_l0:.1f}x)",
        _fmt(fve, ".3f"),
        f"{_fmt(max(unchanged_l0) if unchanged_l0 else None)} ({_fmt(max(unchanged_raw) if unchanged_raw else None, '.1f')})",
        _reported(unchanged, True),
        _fmt(max(u["l0"] for u in noise) if noise else None),
        _reported(noise, False),
    ]
    return f"| {label} | " + " | ".join(cells) + " |"


def markdown(records: list[dict]) -> str:
    head = ("| point | n | freq | cos | co-fire | width (F) | recovered | of them co-firing | copies mean / max | L0 / true L0 | "
            "FVE (min) | unchanged L0 (raw) | unchanged reported | noise L0 | noise reported changed |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    lines += [_row(r["point"], r, [r]) for r in records]
    lines.append(_row("all", None, records))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("grid", type=Path, help="a grid JSON file (bench/groundtruth_*.json)")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table after the JSON lines")
    ap.add_argument("--points", help="comma list of point ids to run (default: all)")
    ap.add_argument("--keep", type=Path, help="keep each point's pair, store and run under this folder")
    ap.add_argument("--l1", type=float, help="train at this sparsity coefficient instead of the default "
                    "(to map the trade-off on the tune grid; the held-out grid reports the defaults)")
    args = ap.parse_args()
    grid = json.loads(args.grid.read_text())
    wanted = set(args.points.split(",")) if args.points else None
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        for point in grid["points"]:
            if wanted and point["id"] not in wanted:
                continue
            settings = grid["common"] | point
            work = root / f"{grid['name']}-{point['id']}"
            work.mkdir(parents=True)
            t0 = time.perf_counter()
            record = {"bench": "groundtruth", "grid": grid["name"], "point": point["id"], "l1": args.l1, **settings,
                      **run_point(settings, work, args.l1)}
            record["seconds"]["total"] = time.perf_counter() - t0
            emit(**record)
            records.append(record)
    if args.markdown and records:
        print(markdown(records))


if __name__ == "__main__":
    main()
