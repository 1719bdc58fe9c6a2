"""What a feature's page shows, fetched from the index once for the terminal and HTML views."""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from tca import TcaError
from tca.query.sql import run_sql


@dataclass
class FeatureView:
    """One feature of one adapter: statistics, logit lens, examples, regions, histogram."""

    adapter: str
    layer: int
    feature: int
    stats: dict
    """The feature's row of ``features``."""
    examples: list[dict]
    """Rows of ``top_examples``."""
    regions: list[dict]
    """Rows of ``region_profile``."""
    histogram: list[tuple[float, float, int]]
    """(low, high, count) of equal-width bins from 0 to the feature's max."""
    explanation: dict | None = None
    """Its row of ``explanations`` (``tca explain``), if it has one."""


def feature_view(
    con: duckdb.DuckDBPyConnection, layer: int, feature: int, adapter: str | None = None,
    k: int = 20, context: int = 12, n_bins: int = 30,
) -> FeatureView:
    """Everything one feature page shows; ``adapter=None`` means the index's only adapter."""
    where = {"adapter": adapter, "layer": layer, "feature": feature}
    rows = run_sql(
        con,
        "SELECT * FROM features WHERE adapter = resolve_adapter($adapter) AND layer = $layer AND feature = $feature",
        where,
    ).to_pylist()
    if not rows:
        held = run_sql(
            con,
            "SELECT count(*) AS n FROM features WHERE adapter = resolve_adapter($adapter) AND layer = $layer",
            {"adapter": adapter, "layer": layer},
        )["n"][0].as_py()
        holds = f"it has features 0 to {held - 1}" if held else "that layer is not indexed"
        raise TcaError(f"feature {feature} of layer {layer} is not in the index; {holds}.")
    stats = rows[0]
    macro_args = "$layer, $feature, adapter := $adapter"
    examples = run_sql(
        con, f"FROM top_examples({macro_args}, k := $k, context := $context)", where | {"k": k, "context": context}
    ).to_pylist()
    regions = run_sql(con, f"FROM region_profile({macro_args})", where).to_pylist()
    return FeatureView(stats["adapter"], layer, feature, stats, examples, regions,
                       _histogram(con, where | {"adapter": stats["adapter"]}, stats["max"], n_bins),
                       explanation_row(con, stats["adapter"], layer, feature))


def explanation_row(con: duckdb.DuckDBPyConnection, adapter: str, layer: int, feature: int) -> dict | None:
    """A feature's row of ``explanations``; None when it has none or the index has no such table."""
    if not has_explanations(con):
        return None
    rows = run_sql(con, "SELECT * FROM explanations WHERE adapter = $adapter AND layer = $layer AND feature = $feature",
                   {"adapter": adapter, "layer": layer, "feature": feature}).to_pylist()
    return rows[0] if rows else None


def has_explanations(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether ``tca explain`` has written into this index."""
    return bool(run_sql(con, "SELECT count(*) AS n FROM duckdb_tables() WHERE table_name = 'explanations'"
                        )["n"][0].as_py())


def _histogram(con, where: dict, top: float | None, n_bins: int) -> list[tuple[float, float, int]]:
    if not top:
        return []
    counts = run_sql(
        con,
        """SELECT least(floor(a.value / $top * $n)::INTEGER, $n - 1) AS bin, count(*) AS n
           FROM activations a WHERE a.adapter = $adapter AND a.layer = $layer AND a.feature = $feature
           GROUP BY bin""",
        where | {"top": top, "n": n_bins},
    ).to_pydict()
    by_bin = dict(zip(counts["bin"], counts["n"]))
    width = top / n_bins
    return [(b * width, (b + 1) * width, by_bin.get(b, 0)) for b in range(n_bins)]
