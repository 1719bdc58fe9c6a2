"""Static HTML feature pages: one self-contained file per feature, opened from disk.

Everything (style, histogram as inline SVG) is inside the page, so it needs no server, no
script and no network; ``--all`` writes one page per live feature plus an ``index.html``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from tqdm import tqdm

from tca import TcaError
from tca.outputs import atomic_dir, atomic_file, check_output
from tca.query.render import visible
from tca.query.sql import connect, run_sql
from tca.query.view import FeatureView, feature_view, has_explanations
from tca.ranges import NON_NEGATIVE, POSITIVE, check_ranges

log = logging.getLogger(__name__)

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
table { border-collapse: collapse; } td, th { padding: 2px 8px; text-align: left; vertical-align: top; }
th { border-bottom: 1px solid #ccc; } tr:nth-child(even) td { background: #fafafa; }
.ctx { font-family: ui-monospace, monospace; white-space: pre-wrap; }
.ctx span { border-radius: 2px; } .centre { outline: 1.5px solid #c40; }
.none { color: #aaa; } .tok { font-family: ui-monospace, monospace; background: #eef; padding: 0 3px; margin: 1px; }
.bar { background: #f90; height: 0.8em; display: inline-block; vertical-align: middle; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
"""


@dataclass
class ReportConfig:
    """``tca report``: static HTML feature pages."""

    index: Path
    """The DuckDB index."""
    out: Path = field(metadata={"flag": ("-o", "--out")})
    """The page to write, or with ``all_features`` the directory of pages."""
    layer: int | None = field(default=None, metadata=NON_NEGATIVE)
    """The feature's layer (with ``all_features``: only this layer; default every layer)."""
    feature: int | None = field(default=None, metadata=NON_NEGATIVE)
    """The feature (not with ``all_features``)."""
    all_features: bool = field(default=False, metadata={"flag": ("--all",)})
    """One page per live feature, and an ``index.html`` linking them."""
    adapter: str | None = None
    """The adapter (default: the index's only one)."""
    k: int = field(default=20, metadata={**POSITIVE, "flag": ("-k", "--k")})
    """Top examples per page."""
    context: int = field(default=12, metadata=NON_NEGATIVE)
    """Tokens of context either side of an example."""
    overwrite: bool = False
    """Replace ``out`` if it exists (with ``all_features`` the whole directory, so no stale page stays)."""

    def __post_init__(self):
        check_ranges(self)


def make_report(cfg: ReportConfig) -> Path:
    """Write what ``cfg`` asks for; returns the page (or the directory's index.html)."""
    if cfg.all_features:
        return write_all(cfg.index, cfg.out, cfg.adapter, cfg.layer, cfg.k, cfg.context, cfg.overwrite)
    if cfg.layer is None or cfg.feature is None:
        raise TcaError("name a LAYER and a FEATURE, or pass --all for every feature.")
    return write_report(cfg.index, cfg.layer, cfg.feature, cfg.out, cfg.adapter, cfg.k, cfg.context, cfg.overwrite)


def write_report(index: Path, layer: int, feature: int, out: Path, adapter: str | None = None,
                 k: int = 20, context: int = 12, overwrite: bool = False) -> Path:
    """One feature's page at ``out``, which appears only once complete."""
    out = check_output(out, overwrite, [index])
    con = connect(index)
    try:
        view = feature_view(con, layer, feature, adapter, k, context)
    finally:
        con.close()
    with atomic_file(out) as tmp:
        tmp.write_text(feature_html(view))
    return out


def write_all(index: Path, out_dir: Path, adapter: str | None = None, layer: int | None = None,
              k: int = 20, context: int = 12, overwrite: bool = False) -> Path:
    """A page per feature that fired at least once, and an index page listing them, in a directory
    that appears only once every page is written."""
    out_dir = check_output(out_dir, overwrite, [index])
    con = connect(index)
    try:
        with atomic_dir(out_dir) as tmp:
            columns, join = _EXPLAINED if has_explanations(con) else ("", "")
            live = run_sql(
                con,
                f"""SELECT f.adapter, f.layer, f.feature, f.n_active, f.frequency, f.max, f.top_logits{columns}
                   FROM features f {join}
                   WHERE f.adapter = resolve_adapter($adapter) AND ($layer IS NULL OR f.layer = $layer)
                     AND f.n_active > 0
                   ORDER BY f.layer, f.n_active DESC, f.feature""",
                {"adapter": adapter, "layer": layer},
            ).to_pylist()
            for row in tqdm(live, desc="report", unit="page"):
                view = feature_view(con, row["layer"], row["feature"], row["adapter"], k, context)
                (tmp / _page_name(row["layer"], row["feature"])).write_text(feature_html(view, back="index.html"))
            name = live[0]["adapter"] if live else (adapter or "")
            (tmp / "index.html").write_text(_index_html(name, live))
    finally:
        con.close()
    log.info("wrote %d feature pages to %s", len(live), out_dir)
    return out_dir / "index.html"


_EXPLAINED = ((", e.explanation, e.status, e.detection, e.detection_lo, e.detection_hi, e.detection_status, "
               "e.class, e.reasoning_related, e.class_status"),
              "LEFT JOIN explanations e ON e.adapter = f.adapter AND e.layer = f.layer AND e.feature = f.feature")
"""Columns and join that add ``tca explain``'s answers to the index page."""


def _page_name(layer: int, feature: int) -> str:
    return f"L{layer}-F{feature}.html"


def _page(title: str, body: str) -> str:
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n{body}\n</body></html>\n")


def _tokens(pieces: list[str] | None) -> str:
    return " ".join(f'<span class="tok">{escape(visible(p))}</span>' for p in pieces or []) or "—"


def _context(example: dict, scale: float) -> str:
    spans = []
    for i, (piece, value) in enumerate(zip(example["context_pieces"], example["context_values"])):
        classes = ["centre"] if i == example["centre_index"] else []
        if value is None:
            classes.append("none")
            style, tip = "", "not stored"
        else:
            alpha = min(value / scale, 1.0) if scale > 0 else 0.0
            style, tip = (f' style="background: rgba(255,140,0,{alpha:.2f})"' if value else ""), f"{value:.4g}"
        cls = f' class="{" ".join(classes)}"' if classes else ""
        spans.append(f'<span{cls}{style} title="{tip}">{escape(visible(piece))}</span>')
    return "".join(spans)


def _histogram_svg(bins: list[tuple[float, float, int]], width: int = 600, height: int = 160) -> str:
    if not bins:
        return "<p>No activations.</p>"
    top = max(n for _, _, n in bins) or 1
    bar_w = width / len(bins)
    bars = "".join(
        f'<rect x="{i * bar_w:.1f}" y="{height - 20 - (n / top) * (height - 30):.1f}" width="{bar_w - 1:.1f}" '
        f'height="{(n / top) * (height - 30):.1f}" fill="#f90"><title>{lo:.3g}–{hi:.3g}: {n}</title></rect>'
        for i, (lo, hi, n) in enumerate(bins)
    )
    axis = (f'<text x="0" y="{height - 4}" font-size="11">0</text>'
            f'<text x="{width}" y="{height - 4}" font-size="11" text-anchor="end">{bins[-1][1]:.3g}</text>'
            f'<text x="{width}" y="12" font-size="11" text-anchor="end">max count {top}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'role="img" aria-label="activation histogram">{bars}{axis}</svg>')


def feature_html(view: FeatureView, back: str | None = None) -> str:
    """The whole page of one feature."""
    s = view.stats
    title = f"{view.adapter} · layer {view.layer} · feature {view.feature}"
    stats = [
        ("active rows", f"{s['n_active']} ({s['frequency']:.3%})"),
        ("max", "—" if s["max"] is None else f"{s['max']:.4g}"),
        ("mean when active", "—" if s["mean"] is None else f"{s['mean']:.4g}"),
        ("quantiles", ", ".join(f"{q:.3g}" for q in s["quantiles"] or []) or "—"),
        ("decoder norm", f"{s['decoder_norm']:.4g}"),
    ]
    stat_rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in stats)
    region_rows = "".join(
        f'<tr><td>{escape(str(r["region"]))}</td><td class="num">{r["n_rows"]}</td><td class="num">{r["n_active"]}</td>'
        f'<td class="num">{r["frequency"]:.2%}</td><td><span class="bar" style="width: {r["share"] * 12:.2f}em"></span> '
        f'{r["share"]:.0%}</td></tr>'
        for r in view.regions
    )
    scale = s["max"] or 1.0
    example_rows = "".join(
        f'<tr><td class="num">{ex["rank"]}</td><td class="num">{ex["value"]:.3g}</td>'
        f'<td>{ex["doc"]}:{ex["pos"]}</td><td>{escape(str(ex["region"]))}</td>'
        f'<td class="ctx">{_context(ex, scale)}</td></tr>'
        for ex in view.examples
    )
    nav = f'<p><a href="{escape(back)}">← all features</a></p>' if back else ""
    body = f"""{nav}<h1>{escape(title)}</h1>
{_explanation_html(view.explanation)}
<table>{stat_rows}</table>
<h2>Logit lens</h2>
<p>Promotes: {_tokens(s["top_logits"])}</p>
<p>Suppresses: {_tokens(s["bottom_logits"])}</p>
<h2>Activation histogram</h2>
{_histogram_svg(view.histogram)}
<h2>Region profile</h2>
<table><tr><th>region</th><th>rows</th><th>active</th><th>frequency</th><th>share of activations</th></tr>{region_rows}</table>
<h2>Top examples</h2>
<table><tr><th>#</th><th>value</th><th>doc:pos</th><th>region</th><th>context</th></tr>{example_rows}</table>"""
    return _page(title, body)


def _score(row: dict) -> str:
    """A detection score with its interval, or why there is none."""
    if row.get("detection") is None:
        return row.get("detection_status") or "not scored"
    return f"{row['detection']:.2f} [{row['detection_lo']:.2f}, {row['detection_hi']:.2f}]"


def _kind(row: dict) -> str:
    if row.get("class") is None:
        return row.get("class_status") or "not classified"
    return row["class"] + (" (reasoning-related)" if row["reasoning_related"] else "")


def _explanation_html(row: dict | None) -> str:
    """The explanation ``tca explain`` stored, its detection score and its class."""
    if row is None:
        return ""
    if row["status"] != "ok":
        return f"<p><em>No explanation: the model's answer was {escape(row['status'])}.</em></p>"
    judged = (f" on {row['detection_n']} held-out excerpts, judge {escape(str(row['judge_model']))}"
              if row.get("detection") is not None else "")
    return (f'<p class="explanation"><strong>Explanation</strong> ({escape(str(row["model"]))}): '
            f"{escape(row['explanation'])}</p>\n"
            f"<p>Detection, balanced accuracy [95% interval]: {escape(_score(row))}{judged}. "
            f"Kind: {escape(_kind(row))}.</p>")


def _index_html(adapter: str, rows: list[dict]) -> str:
    explained = any("status" in r for r in rows)

    def answers(r: dict) -> str:
        if not explained:
            return ""
        if r["status"] is None:  # not explained (yet)
            return "<td></td>" * 3
        text = r["explanation"] if r["status"] == "ok" else (r["status"] or "")
        return f"<td>{escape(text or '')}</td><td>{escape(_score(r))}</td><td>{escape(_kind(r))}</td>"

    items = "".join(
        f'<tr><td class="num">{r["layer"]}</td><td class="num"><a href="{_page_name(r["layer"], r["feature"])}">'
        f'{r["feature"]}</a></td><td class="num">{r["n_active"]}</td><td class="num">{r["frequency"]:.3%}</td>'
        f'<td class="num">{r["max"]:.3g}</td><td>{_tokens((r["top_logits"] or [])[:5])}</td>{answers(r)}</tr>'
        for r in rows
    )
    extra = "<th>explanation</th><th>detection</th><th>kind</th>" if explained else ""
    body = (f"<h1>{escape(adapter)}: {len(rows)} live features</h1><table><tr><th>layer</th><th>feature</th>"
            f"<th>active</th><th>frequency</th><th>max</th><th>promotes</th>{extra}</tr>{items}</table>")
    return _page(f"{adapter} features", body)
