"""Terminal rendering with rich: query results as tables, a feature's examples highlighted."""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from tca import TcaError
from tca.outputs import atomic_file, check_output
from tca.query.sql import FORMATS, SqlConfig, connect, export, query
from tca.query.view import FeatureView, feature_view
from tca.ranges import NON_NEGATIVE, POSITIVE, check_ranges

_HIGHLIGHT = (255, 140, 0)  # activations shade towards orange; white on a dark terminal stays readable


def visible(piece: str) -> str:
    """A token's text with line breaks and tabs shown, so a context stays on one line."""
    return piece.replace("\n", "↵").replace("\t", "⇥")


def arrow_table(table: pa.Table, title: str | None = None) -> Table:
    """A query result as a rich table (lists shown as Python lists)."""
    out = Table(title=title, show_lines=False)
    for name in table.column_names:
        out.add_column(name, overflow="fold")
    for row in table.to_pylist():
        out.add_row(*("NULL" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()))
    return out


def context_text(example: dict, scale: float) -> Text:
    """An example's context with each token shaded by the feature's activation on it."""
    text = Text()
    for i, (piece, value) in enumerate(zip(example["context_pieces"], example["context_values"])):
        style = "dim" if value is None else ""
        if value:
            a = min(value / scale, 1.0) if scale > 0 else 1.0
            r, g, b = (int(255 * (1 - a) * 0.15 + c * a) for c in _HIGHLIGHT)
            style = f"black on rgb({r},{g},{b})" if a > 0.5 else f"on rgb({r},{g},{b})"
        if i == example["centre_index"]:
            style += " bold underline"
        text.append(visible(piece), style=style.strip())
    return text


def feature_panel(view: FeatureView) -> Group:
    """Statistics, logit lens, region profile and highlighted top examples of one feature."""
    s = view.stats
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    quantiles = ", ".join(f"{q:.3g}" for q in s["quantiles"] or [])
    for name, value in [
        ("active", f"{s['n_active']} rows ({s['frequency']:.3%})"),
        ("max / mean", "—" if s["max"] is None else f"{s['max']:.4g} / {s['mean']:.4g}"),
        ("quantiles", quantiles or "—"),
        ("decoder norm", f"{s['decoder_norm']:.4g}"),
        ("promotes", " ".join(repr(t) for t in s["top_logits"] or []) or "— (no logit lens)"),
        ("suppresses", " ".join(repr(t) for t in s["bottom_logits"] or []) or "—"),
    ]:
        head.add_row(name, value)
    regions = Table("region", "rows", "active", "frequency", "share", title="where it fires", title_justify="left")
    for r in view.regions:
        regions.add_row(str(r["region"]), str(r["n_rows"]), str(r["n_active"]), f"{r['frequency']:.2%}", f"{r['share']:.0%}")
    examples = Table("#", "value", "doc:pos", "region", "context", title="top examples", title_justify="left")
    scale = s["max"] or 1.0
    for ex in view.examples:
        examples.add_row(str(ex["rank"]), f"{ex['value']:.3g}", f"{ex['doc']}:{ex['pos']}", str(ex["region"]),
                         context_text(ex, scale))
    title = f"{view.adapter} · layer {view.layer} · feature {view.feature}"
    return Group(Panel(head, title=title, title_align="left"), regions, examples)


def print_feature(view: FeatureView, console: Console | None = None) -> None:
    (console or Console()).print(feature_panel(view))


@dataclass
class TopConfig:
    """``tca top``: one feature's top examples in the terminal."""

    index: str
    """The DuckDB index."""
    layer: int = field(metadata=NON_NEGATIVE)
    """The feature's layer."""
    feature: int = field(metadata=NON_NEGATIVE)
    """The feature."""
    k: int = field(default=20, metadata={**POSITIVE, "flag": ("-k", "--k")})
    """Examples to show."""
    context: int = field(default=12, metadata=NON_NEGATIVE)
    """Tokens of context either side of an example."""
    adapter: str | None = None
    """The adapter (default: the index's only one)."""

    def __post_init__(self):
        check_ranges(self)


def show_top(cfg: TopConfig, console: Console | None = None) -> None:
    """Print ``cfg.feature``'s page: statistics, logit lens and top examples highlighted."""
    con = connect(cfg.index)
    try:
        view = feature_view(con, cfg.layer, cfg.feature, cfg.adapter, cfg.k, cfg.context)
    finally:
        con.close()
    print_feature(view, console)


def run_sql_command(cfg: SqlConfig) -> str | None:
    """``tca sql``: run ``cfg.sql`` and write the result to ``cfg.out`` (returns None), or return
    the text for stdout (a rendered table, CSV or JSON)."""
    if cfg.format not in FORMATS:
        raise TcaError(f"unknown format {cfg.format!r}; use one of {', '.join(FORMATS)}.")
    if cfg.format == "parquet" and cfg.out is None:
        raise TcaError("--format parquet needs --out FILE.")
    if cfg.out is not None:
        check_output(cfg.out, cfg.overwrite, [cfg.index])
    table = query(cfg.index, cfg.sql)
    fmt = "csv" if cfg.format == "table" else cfg.format
    if cfg.out is not None:
        with atomic_file(cfg.out) as tmp:
            tmp.write_bytes(export(table, fmt))
        return None
    if cfg.format != "table":
        return export(table, fmt).decode()
    console = Console()
    with console.capture() as captured:
        console.print(arrow_table(table))
    return captured.get()
