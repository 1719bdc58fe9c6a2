"""The index's tables and the table macros installed next to them.

One DuckDB file holds every nonzero feature activation of one or more adapters over one
activation store, the store's token and document tables, per-feature statistics and the
macros that answer the common questions. The macros live in the file, so any DuckDB client
(the ``duckdb`` CLI, Python, R) can call them without tca.

Every macro takes ``adapter := NULL``: NULL means the only adapter in the index, and
fails with a clear message when the index holds several.
"""

from __future__ import annotations

import duckdb

from tca.query import census

SCHEMA_VERSION = 1

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
"""Probabilities of ``features.quantiles``, over the feature's indexed (nonzero) values."""

REGIONS = ("prompt", "think", "answer", "other")

TABLES = """
CREATE TABLE IF NOT EXISTS index_meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS adapters (
    adapter VARCHAR, layer INTEGER, path VARCHAR, activation VARCHAR,
    d_model INTEGER, n_features INTEGER, n_rows BIGINT, min_act FLOAT,
    store VARCHAR, indexed_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS activations (
    adapter VARCHAR, layer INTEGER, feature INTEGER, token BIGINT, value FLOAT
);
CREATE TABLE IF NOT EXISTS tokens (
    token BIGINT, doc BIGINT, pos INTEGER, token_id INTEGER, piece VARCHAR, region VARCHAR,
    stored_row BIGINT
);
CREATE TABLE IF NOT EXISTS features (
    adapter VARCHAR, layer INTEGER, feature INTEGER,
    n_active BIGINT, frequency DOUBLE, max FLOAT, mean DOUBLE, quantiles FLOAT[],
    decoder_norm FLOAT, top_logits VARCHAR[], bottom_logits VARCHAR[]
);
"""


def _resolver(names: list[str]) -> str:
    """``resolve_adapter(name)``: the adapter a macro works on (the one named, or the only one).

    The index's adapter names are written into the macro as constants, and it is rewritten
    whenever they change, so DuckDB folds it to a literal and can still skip row groups by
    their min/max; a lookup in ``adapters`` at query time would cost that and more.
    """
    def quote(text: str) -> str:
        return "'" + text.replace("'", "''") + "'"

    listed = ", ".join(names)
    if len(names) == 1:
        default = quote(names[0])
    elif names:
        default = f"error({quote(f'the index holds several adapters ({listed}); name one with adapter := ...')})"
    else:
        default = "error('the index holds no adapters yet; build it with tca index')"
    known = f"name IN ({', '.join(map(quote, names))})" if names else "false"
    unknown = quote(f"; it holds: {listed or 'none'}")
    return f"""
CREATE OR REPLACE MACRO resolve_adapter(name) AS (
    CASE WHEN name IS NULL THEN {default}
         WHEN {known} THEN name
         ELSE error('the index holds no adapter ' || name || {unknown}) END
)
"""


# Rows of one feature. Macro parameters shadow column names, so columns are always qualified.
_FEATURE_ROWS = "a.adapter = resolve_adapter(adapter) AND a.layer = layer AND a.feature = feature"


def _with_context(examples: str) -> str:
    """A macro body that shows each example of ``examples`` in its document.

    ``examples`` is a SELECT of ``rank, token, value`` and any further columns. Each output row
    is one example with the ``context`` tokens either side (within its document): their pieces,
    and the feature's activation on each (0 where inactive, NULL where the token has no stored
    row). ``centre_index`` is the example's position in those lists, counted from 0.
    """
    return f"""
WITH ex AS ({examples}),
centre AS (
    SELECT ex.*, t.doc, t.pos, t.piece, t.region
    FROM ex JOIN tokens t ON t.token = ex.token
),
near AS (
    SELECT centre.rank, c.token, c.pos, c.piece, c.stored_row
    FROM centre
    JOIN tokens c ON c.doc = centre.doc AND c.pos BETWEEN centre.pos - context AND centre.pos + context
),
-- The feature's values on the context tokens only. As a semi-join the few context tokens are the
-- hash side and the feature's rows only probe it; a LEFT JOIN straight onto activations would
-- build a hash table of every row of the feature (a million for a dense one at 50 M rows).
near_values AS (
    SELECT v.token, v.value FROM activations v
    WHERE v.adapter = resolve_adapter(adapter) AND v.layer = layer AND v.feature = feature
      AND v.token IN (SELECT near.token FROM near)
),
ctx AS (
    SELECT near.rank, near.pos AS ctx_pos, near.piece AS ctx_piece,
           CASE WHEN near.stored_row IS NULL THEN NULL ELSE coalesce(near_values.value, 0) END AS ctx_value
    FROM near LEFT JOIN near_values ON near_values.token = near.token
)
SELECT centre.*,
       list(ctx.ctx_piece ORDER BY ctx.ctx_pos) AS context_pieces,
       list(ctx.ctx_value ORDER BY ctx.ctx_pos) AS context_values,
       (count(*) FILTER (WHERE ctx.ctx_pos < centre.pos))::INTEGER AS centre_index
FROM centre JOIN ctx ON ctx.rank = centre.rank
GROUP BY ALL
ORDER BY centre.rank
"""


MACROS: dict[str, str] = {
    "top_examples": f"""
CREATE OR REPLACE MACRO top_examples(layer, feature, k := 20, context := 12, adapter := NULL) AS TABLE
{_with_context(f'''
    WITH top AS (
        SELECT a.token, a.value FROM activations a WHERE {_FEATURE_ROWS}
        ORDER BY a.value DESC, a.token LIMIT k
    )
    SELECT row_number() OVER (ORDER BY top.value DESC, top.token) AS rank, top.token, top.value FROM top''')}
""",
    "top_per_doc": f"""
CREATE OR REPLACE MACRO top_per_doc(layer, feature, k := 20, context := 12, adapter := NULL) AS TABLE
{_with_context(f'''
    WITH best AS (
        SELECT a.token, a.value
        FROM activations a JOIN tokens t ON t.token = a.token
        WHERE {_FEATURE_ROWS}
        QUALIFY row_number() OVER (PARTITION BY t.doc ORDER BY a.value DESC, a.token) = 1
    ),
    top AS (SELECT best.token, best.value FROM best ORDER BY best.value DESC, best.token LIMIT k)
    SELECT row_number() OVER (ORDER BY top.value DESC, top.token) AS rank, top.token, top.value FROM top''')}
""",
    "quantile_samples": f"""
CREATE OR REPLACE MACRO quantile_samples(layer, feature, n_bins := 10, per_bin := 5, context := 12,
                                         adapter := NULL) AS TABLE
{_with_context(f'''
    WITH binned AS (
        SELECT a.token, a.value, ntile(n_bins) OVER (ORDER BY a.value, a.token) AS bin
        FROM activations a WHERE {_FEATURE_ROWS}
    ),
    bounds AS (SELECT bin, min(value) AS bin_min, max(value) AS bin_max FROM binned GROUP BY bin),
    picked AS (
        SELECT * FROM binned
        QUALIFY row_number() OVER (PARTITION BY bin ORDER BY hash(token), token) <= per_bin
    )
    SELECT row_number() OVER (ORDER BY picked.bin DESC, picked.value DESC, picked.token) AS rank,
           picked.token, picked.value, picked.bin, bounds.bin_min, bounds.bin_max
    FROM picked JOIN bounds USING (bin)''')}
""",
    "features_on": """
CREATE OR REPLACE MACRO features_on(text, layer := NULL, adapter := NULL) AS TABLE
WITH hits AS (
    SELECT t.token FROM tokens t WHERE trim(t.piece) = trim(text) AND t.stored_row IS NOT NULL
),
n AS (SELECT count(*) AS n_tokens FROM hits)
SELECT a.layer, a.feature, count(*) AS n_hits, any_value(n.n_tokens) AS n_tokens,
       count(*) / any_value(n.n_tokens) AS hit_rate, avg(a.value) AS mean_value, max(a.value) AS max_value,
       count(*) / any_value(f.n_active) AS precision
FROM activations a
JOIN hits ON hits.token = a.token
JOIN features f ON f.adapter = a.adapter AND f.layer = a.layer AND f.feature = a.feature
CROSS JOIN n
WHERE a.adapter = resolve_adapter(adapter) AND (layer IS NULL OR a.layer = layer)
GROUP BY a.layer, a.feature
ORDER BY n_hits DESC, mean_value DESC, a.layer, a.feature
""",
    "cooccurring": f"""
CREATE OR REPLACE MACRO cooccurring(layer, feature, k := 20, same_layer := true, adapter := NULL) AS TABLE
WITH mine AS (SELECT a.token FROM activations a WHERE {_FEATURE_ROWS}),
n AS (SELECT count(*) AS n_this FROM mine),
pairs AS (
    SELECT a.layer AS other_layer, a.feature AS other_feature, count(*) AS n_both
    FROM activations a JOIN mine ON mine.token = a.token
    WHERE a.adapter = resolve_adapter(adapter)
      AND NOT (a.layer = layer AND a.feature = feature)
      AND (NOT same_layer OR a.layer = layer)
    GROUP BY ALL
)
SELECT pairs.other_layer, pairs.other_feature, pairs.n_both, n.n_this, f.n_active AS n_other,
       pairs.n_both / (n.n_this + f.n_active - pairs.n_both) AS jaccard,
       pairs.n_both / n.n_this AS p_other_given_this
FROM pairs CROSS JOIN n
JOIN features f ON f.adapter = resolve_adapter(adapter) AND f.layer = pairs.other_layer
               AND f.feature = pairs.other_feature
ORDER BY jaccard DESC, pairs.n_both DESC, pairs.other_layer, pairs.other_feature
LIMIT k
""",
    "region_profile": f"""
CREATE OR REPLACE MACRO region_profile(layer, feature, adapter := NULL) AS TABLE
WITH stored AS (
    SELECT t.region, count(*) AS n_rows FROM tokens t WHERE t.stored_row IS NOT NULL GROUP BY ALL
),
active AS (
    SELECT t.region, count(*) AS n_active, avg(a.value) AS mean_value, max(a.value) AS max_value
    FROM activations a JOIN tokens t ON t.token = a.token
    WHERE {_FEATURE_ROWS}
    GROUP BY ALL
)
SELECT stored.region, stored.n_rows, coalesce(active.n_active, 0) AS n_active,
       coalesce(active.n_active, 0) / stored.n_rows AS frequency,
       coalesce(active.n_active, 0) / greatest(sum(coalesce(active.n_active, 0)) OVER (), 1) AS share,
       active.mean_value, active.max_value
FROM stored LEFT JOIN active ON active.region = stored.region
ORDER BY list_position({list(REGIONS)}, stored.region) NULLS LAST, stored.region
""",
}


def install(con: duckdb.DuckDBPyConnection) -> None:
    """Create the tables (when missing) and (re)create every macro, in the current transaction.

    Run it again whenever the set of adapters changes (``resolve_adapter`` lists them).
    """
    con.execute(TABLES)
    names = [r[0] for r in con.sql("SELECT DISTINCT adapter FROM adapters ORDER BY adapter").fetchall()]
    con.execute(_resolver(names))
    for sql in MACROS.values():
        con.execute(sql)
    con.execute(
        "INSERT OR REPLACE INTO index_meta VALUES ('schema_version', ?), ('quantiles', ?)",
        [str(SCHEMA_VERSION), ",".join(map(str, QUANTILES))],
    )
    census.install(con)  # the census macros (tca census) belong to every index
