"""Where the adapted model's remaining KL comes from, layer by layer: offline against refined.

For each adapter set and each layer l, the model is the *target* with only layer l's MLP
replaced (by the base MLP: the hybrid at l; by base MLP + adapter: the adapted model at l),
teacher-forced on the pair's val.jsonl. KL(target ‖ that model) per token is layer l's own
error, free of what the other layers do; the last row replaces every layer at once, as
``tca eval`` does. Comparing the sum of the per-layer KLs with the all-layer KL says whether
errors compound (all > sum) or cancel (all < sum), and comparing offline with refined adapters
says which layers refinement repairs.

    python bench/offline_gap.py ADAPTERS [ADAPTERS ...] [--pair examples/toy-pair] [--tokens 20000]

Prints one JSON line per set and a markdown table (about 10 CPU seconds per set on the demo pair).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tca.adapted.batches import token_batches
from tca.adapted.evaluate import fraction_closed
from tca.adapted.intervene import forward_logits
from tca.adapted.splice import load_adapted, set_mode, target_tokenizer
from tca.toy.demo import DEMO_PAIR
from tca.train.metrics import next_token_kl


@torch.no_grad()
def layer_kls(adapters: str, pair: Path, tokens: int) -> dict:
    """KL per token of the target with one layer (or all) replaced, hybrid and adapted."""
    tokenizer = target_tokenizer(str(pair / "reasoning"))
    batches = token_batches(str(pair / "data" / "val.jsonl"), tokenizer, seq_len=1024, max_tokens=tokens, batch=8)
    model = load_adapted(adapters, str(pair / "base"), str(pair / "reasoning"), device="cpu", dtype="float32",
                         keep_target=True)
    n_tokens = sum(b.n_tokens for b in batches)
    set_mode(model, "target")
    targets = [forward_logits(model, b) for b in batches]
    rows = {}
    for where in [*range(len(model.model.layers)), "all"]:
        kl = {}
        for mode in ("hybrid", "adapted"):
            set_mode(model, "target")
            set_mode(model, mode, None if where == "all" else [where])
            kl[mode] = sum(next_token_kl(t, forward_logits(model, b), b.attention_mask).item()
                           for t, b in zip(targets, batches, strict=True)) / n_tokens
        rows[str(where)] = {"kl_hybrid": kl["hybrid"], "kl_adapted": kl["adapted"],
                            "fraction_closed": fraction_closed(kl["adapted"], kl["hybrid"])}
    return {"adapters": adapters, "tokens": n_tokens, "layers": rows}


def markdown(results: list[dict]) -> str:
    head = "| layer replaced | KL hybrid | " + " | ".join(f"KL adapted ({Path(r['adapters']).name}) | closed"
                                                      for r in results) + " |"
    lines = [head, "|---" * (2 + 2 * len(results)) + "|"]
    for key in results[0]["layers"]:
        cells = [f"{results[0]['layers'][key]['kl_hybrid']:.3f}"]
        for r in results:
            row = r["layers"][key]
            cells += [f"{row['kl_adapted']:.4f}", f"{row['fraction_closed']:.3f}"]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    def single(r: dict, key: str) -> float:
        return sum(v[key] for layer, v in r["layers"].items() if layer != "all")

    sums = ["sum of the single layers", f"{single(results[0], 'kl_hybrid'):.3f}"]
    for r in results:
        sums += [f"{single(r, 'kl_adapted'):.4f}", ""]
    lines.append("| " + " | ".join(sums) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapters", nargs="+", help="adapter sets (tca train or tca refine output folders)")
    parser.add_argument("--pair", type=Path, default=DEMO_PAIR, help="base/, reasoning/ and data/val.jsonl")
    parser.add_argument("--tokens", type=int, default=20_000, help="teacher-forced tokens of val.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = [layer_kls(a, args.pair, args.tokens) for a in args.adapters]
    for r in results:
        print(json.dumps(r))
    print(markdown(results))


if __name__ == "__main__":
    main()
