"""``tca plot``: training curves of a run from its metrics.jsonl.

Four panels against training tokens: loss, L0, FVE of delta and the fraction of dead
features. Lines are training records (one per layer and sweep member); dots are held-out
evaluations, which are the figures to trust (training FVE is measured on the batch just
trained on).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tca import TcaError
from tca.outputs import atomic_file, check_output

PANELS = (("loss", "loss", "log"), ("l0", "L0 (active features per token)", "log"),
          ("fve", "FVE of delta", "linear"), ("dead_frac", "dead fraction", "linear"))


@dataclass
class PlotConfig:
    """``tca plot``: the training curves of one ``tca train`` run as an image."""

    run: Path
    """The run directory (the ``out`` of ``tca train``); its metrics.jsonl is read."""
    out: Path = field(default=Path("curves.png"), metadata={"flag": ("-o", "--out")})
    """The image; its suffix picks the format (png, pdf, svg, jpg, …)."""
    overwrite: bool = False
    """Replace ``out`` if it exists."""


def read_metrics(run: str | Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        raise TcaError(f"{run} has no metrics.jsonl; pass the --out directory of a `tca train` run.")
    records = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise TcaError(f"{path} line {n} is not JSON; it is not a metrics file `tca train` wrote.") from None
    return records


def plot(cfg: PlotConfig) -> Path:
    """Draw the curves of ``cfg.run`` into the image ``cfg.out``, which appears only once complete."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backend_bases import FigureCanvasBase

    run = Path(cfg.run)
    out = check_output(cfg.out, cfg.overwrite, [run / "metrics.jsonl"])
    fmt = out.suffix.lower().lstrip(".")
    formats = FigureCanvasBase.get_supported_filetypes()
    if fmt not in formats:
        raise TcaError(f"--out {out} does not end in an image format matplotlib writes; use one of "
                       f".{', .'.join(sorted(formats))}.")
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
    try:
        with atomic_file(out) as tmp:
            # The temporary name ends in .partial, so the format is named, not guessed from it.
            fig.savefig(tmp, dpi=120, format=fmt)
    finally:
        plt.close(fig)
    return out
