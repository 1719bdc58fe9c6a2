"""Attribution rankings in the index, beside the features they rank.

``tca attribute --index`` writes one row per (adapter, layer, feature, token) into

    attributions(adapter, layer, feature, token, score, mean_score, n_positions, n_active, rank)

named like the rest of the index (``adapter`` as ``tca index`` names the set), so SQL joins
a ranking with everything else: ``FROM attributions JOIN features USING (adapter, layer,
feature)``, or with ``activations`` and ``tokens`` for the examples. ``token`` is the attributed
token's text (``Wait``); the tokens table's ``token`` is a position, so join on it only through
``activations``.

Each (adapter, token) is written in one transaction that first deletes its old rows, so a
re-run replaces its ranking atomically and leaves other adapters' and tokens' rankings alone.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa

from tca import TcaError
from tca.adapted.attribute import AttributionResult
from tca.query.sql import in_transaction, open_writer, query

TABLE = """
CREATE TABLE IF NOT EXISTS attributions (
    adapter VARCHAR, layer INTEGER, feature INTEGER, token VARCHAR,
    score DOUBLE, mean_score DOUBLE, n_positions BIGINT, n_active BIGINT, rank INTEGER
)
"""


def write_attributions(index: str | Path, adapter: str, token: str, result: AttributionResult) -> int:
    """Create or replace the rows of (``adapter``, ``token``) in ``index``; returns the rows written.

    ``adapter`` must be an adapter the index holds, with the same layers' feature counts.
    """
    con = open_writer(index)
    try:
        _check_adapter(con, index, adapter, result)
        rows = result.ranking()
        table = pa.table({
            "adapter": pa.array([adapter] * len(rows), pa.string()),
            "layer": pa.array([r["layer"] for r in rows], pa.int32()),
            "feature": pa.array([r["feature"] for r in rows], pa.int32()),
            "token": pa.array([token] * len(rows), pa.string()),
            "score": pa.array([r["score"] for r in rows], pa.float64()),
            "mean_score": pa.array([r["mean_score"] for r in rows], pa.float64()),
            "n_positions": pa.array([r["n_positions"] for r in rows], pa.int64()),
            "n_active": pa.array([r["n_active"] for r in rows], pa.int64()),
            "rank": pa.array([r["rank"] for r in rows], pa.int32()),
        })

        def replace() -> None:
            con.execute(TABLE)
            con.execute("DELETE FROM attributions WHERE adapter = ? AND token = ?", [adapter, token])
            con.register("_ranking", table)
            try:
                con.execute("INSERT INTO attributions SELECT * FROM _ranking ORDER BY rank")
            finally:
                con.unregister("_ranking")

        in_transaction(con, replace)
        return len(rows)
    finally:
        con.close()


def check_writable(index: str | Path, adapter: str) -> None:
    """Fail now, not after the attribution, when ``index`` cannot take ``adapter``'s rankings."""
    con = open_writer(index)
    try:
        _check_adapter(con, index, adapter, None)
    finally:
        con.close()


def _check_adapter(con: duckdb.DuckDBPyConnection, path: str | Path, adapter: str,
                   result: AttributionResult | None) -> None:
    """Refuse a ranking that would not join: an adapter name or layer the index lacks, or another width."""
    held = {(name, layer): n for name, layer, n in con.sql("SELECT adapter, layer, n_features FROM adapters").fetchall()}
    names = sorted({name for name, _ in held})
    if adapter not in names:
        raise TcaError(f"{path} holds no adapter {adapter!r} (it holds: {', '.join(names) or 'none'}); "
                       "name the set as it was indexed with --adapters NAME=DIR.")
    for layer, scores in (result.scores if result is not None else {}).items():
        n = held.get((adapter, layer))
        if n is None:
            raise TcaError(f"{path} has no layer {layer} of adapter {adapter!r}; index that layer first.")
        if n != len(scores):
            raise TcaError(f"adapter {adapter!r} layer {layer} has {n} features in {path} but {len(scores)} here; "
                           "it is another adapter set under the same name.")


def read_attributions(index: str | Path, adapter: str | None = None, token: str | None = None) -> pa.Table:
    """The ranking rows of ``index`` (optionally of one adapter and/or token), best rank first."""
    return query(
        index,
        "SELECT * FROM attributions WHERE ($adapter IS NULL OR adapter = $adapter) "
        "AND ($token IS NULL OR token = $token) ORDER BY adapter, token, rank",
        {"adapter": adapter, "token": token},
    )
