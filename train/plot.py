"""``tca plot``: training curves of a run from its metrics.jsonl.

Four panels against training tokens: loss, L0, FVE of delta and the fraction of dead
features. Lines are training records (one per layer and sweep member); dots are held-out
evaluations, which are the figures to trust (training FVE is measured on the batch just
trained on).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from tca import TcaError

PANELS = (("loss", "loss", "log"), ("l0", "L0 (active features per token)", "log"),
          ("fve", "FVE of delta", "linear"), ("dead_frac", "dead fraction", "linear"))


def read_metrics(run: str | Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        raise TcaError(f"{run} has no metrics.jsonl; pass the --out directory of a `tca train` run.")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(run: str | Path, out: str | Path) -> Path:
    """Draw the curves of ``run`` into the image ``out`` (format from its suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, str, int], dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in read_metrics(run):
        s = series[r["kind"], r["member"], r["layer"]]
        for key in ("tokens", *(p[0] for p in PANELS)):
            s[key].append(r.get(key))
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    colours = {}
    for (kind, member, layer), s in sorted(series.items()):
        label = f"{member} L{layer}"
        colour = colours.setdefault(label, f"C{len(colours) % 10}")
        for ax, (key, title, scale) in zip(axes.flat, PANELS):
            pts = [(t, v) for t, v in zip(s["tokens"], s[key]) if v is not None]
            if not pts:
                continue
            xs, ys = zip(*pts)
            if kind == "train":
                ax.plot(xs, ys, color=colour, alpha=0.6, lw=1, label=label)
            else:
                ax.plot(xs, ys, "o--", color=colour, ms=4, lw=0.8)
            ax.set_title(title)
            if scale == "log" and min(ys) > 0:
                ax.set_yscale("log")
    for ax in axes[1]:
        ax.set_xlabel("training tokens")
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=2)
            break
    fig.suptitle(f"{Path(run).name}: lines = training batches, dots = held-out evaluation", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
