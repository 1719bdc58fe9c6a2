"""A query over an index reaches the index and nothing else.

Each escape is tried twice: through ``query`` (the statement check and the connection together,
which must answer one sentence) and straight on the connection ``connect`` returns, skipping the
statement check, where DuckDB's own configuration must refuse it. A plain read-only DuckDB
connection is the control: it does what the confined one refuses.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from test_query import LAYERS, _make_set, _make_store, _reference

from tca import TcaError
from tca.query.index import adapter_layers, index_adapters
from tca.query.sql import connect, query, run_sql
from tca.train.checkpoint import save_adapters


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sql-safety")
    store = _make_store(root / "store")
    sets = {"relu-a": _make_set("relu", 1)}
    save_adapters(root / "relu-a", sets["relu-a"])
    index_adapters(store, adapter_layers(root / "relu-a"), root / "one.duckdb", batch_rows=50)
    secret = root / "secret.txt"
    secret.write_text("the-secret-line\n")
    (root / "secret.csv").write_text("secret\nthe-secret-line\n")
    return {"root": root, "store": store, "sets": sets, "index": root / "one.duckdb", "secret": secret,
            "secret_csv": root / "secret.csv"}


def _one_sentence(message: str) -> None:
    assert "\n" not in message and "Traceback" not in message and message.endswith("."), message


# (sql, whether DuckDB's configuration refuses it on its own: temporary tables live in memory
# and PRAGMAs ran under a locked configuration before DuckDB 2.0, so only the statement check
# stops those two on every supported DuckDB)
ESCAPES = {
    "read_csv": ("SELECT * FROM read_csv('/etc/passwd', sep = ':')", True),
    "read_text": ("SELECT * FROM read_text('/etc/passwd')", True),
    "read_blob": ("SELECT * FROM read_blob('/etc/shadow')", True),
    "glob": ("SELECT * FROM glob('~/*')", True),
    "read_parquet_url": ("SELECT * FROM read_parquet('https://example.com/x.parquet')", True),
    "file_by_name": ("SELECT * FROM '{secret_csv}'", True),
    "sniff_csv": ("SELECT * FROM sniff_csv('/etc/passwd')", True),
    "install": ("INSTALL httpfs", True),
    "load": ("LOAD httpfs", True),
    "set_external_access": ("SET enable_external_access = true", True),
    "unlock": ("SET lock_configuration = false", True),
    "attach": ("ATTACH '{tmp}/other.duckdb' AS other", True),
    "copy_to": ("COPY (SELECT 1) TO '{tmp}/leak.csv'", True),
    "copy_table_to": ("COPY activations TO '{tmp}/leak.parquet' (FORMAT parquet)", True),
    "export_database": ("EXPORT DATABASE '{tmp}/dump'", True),
    "copy_inside_query": ("SELECT * FROM query('COPY (SELECT 1) TO ''{tmp}/leak.csv''')", True),
    "pragma": ("PRAGMA enable_profiling", False),
    "temp_table": ("CREATE TEMP TABLE t AS SELECT 1", False),
}


@pytest.mark.parametrize("name", list(ESCAPES))
def test_escape_is_refused(world, tmp_path, name):
    sql, engine_refuses = ESCAPES[name]
    sql = sql.format(tmp=tmp_path, secret_csv=world["secret_csv"])
    with pytest.raises(TcaError) as refused:
        query(world["index"], sql)
    _one_sentence(str(refused.value))
    assert "root:" not in str(refused.value) and "the-secret-line" not in str(refused.value)  # nothing read comes back
    if engine_refuses:
        con = connect(world["index"])
        try:
            with pytest.raises(duckdb.Error):
                con.execute(sql).fetchall()
        finally:
            con.close()
    assert not list(tmp_path.iterdir())  # nothing written, nothing attached


def test_a_plain_connection_reaches_what_the_index_connection_does_not(world):
    """The control: the same file read through an ordinary read-only connection, and refused
    through ``query`` with the reason in one sentence."""
    sql = f"SELECT content FROM read_text('{world['secret']}')"
    with duckdb.connect(str(world["index"]), read_only=True) as plain:
        assert plain.sql(sql).fetchall() == [("the-secret-line\n",)]
    with pytest.raises(TcaError, match="reads only the index's tables") as refused:
        query(world["index"], sql)
    _one_sentence(str(refused.value))
    assert "the-secret-line" not in str(refused.value)


def test_python_objects_are_not_tables(world):
    """DuckDB's Python client would answer a table name with a data frame or Arrow table of the
    caller's variables; on the index connection (which Python users get from ``connect``) it does not."""
    secret_table = pa.table({"secret": ["the-secret-line"]})  # noqa: F841 - what a replacement scan would find
    with duckdb.connect(str(world["index"]), read_only=True) as plain:
        assert plain.sql("SELECT * FROM secret_table").fetchall() == [("the-secret-line",)]
    con = connect(world["index"])
    try:
        with pytest.raises(duckdb.CatalogException, match="secret_table does not exist"):
            con.sql("SELECT * FROM secret_table").fetchall()
    finally:
        con.close()


def test_connection_settings_are_locked(world):
    got = query(world["index"], """
        SELECT name, value FROM duckdb_settings()
        WHERE name IN ('enable_external_access', 'autoinstall_known_extensions', 'autoload_known_extensions',
                       'allow_community_extensions', 'lock_configuration')
        ORDER BY name""").to_pylist()
    assert {r["name"]: r["value"] for r in got} == {
        "allow_community_extensions": "false", "autoinstall_known_extensions": "false",
        "autoload_known_extensions": "false", "enable_external_access": "false", "lock_configuration": "true",
    }


def test_macros_and_reads_still_work(world):
    """Every macro runs on the confined connection; values against numpy over the store."""
    layer = LAYERS[0]
    ref = _reference(world, "relu-a", layer)
    acts, row_tokens, tokens = ref["acts"], ref["row_tokens"], ref["tokens"]
    feature = int(np.argmax((acts > 0).sum(0)))
    con = connect(world["index"])
    try:
        top = run_sql(con, f"FROM top_examples({layer}, {feature}, k := 5, context := 2)").to_pylist()
        col = acts[:, feature]
        assert [r["value"] for r in top] == pytest.approx(sorted(col, reverse=True)[:5], rel=1e-5)
        assert [r["token"] for r in top] == row_tokens[np.argsort(-col, kind="stable")[:5]].tolist()

        piece = tokens["piece"][int(row_tokens[0])]
        mask = np.array([tokens["piece"][int(t)].strip() == piece.strip() for t in row_tokens])
        on = run_sql(con, f"FROM features_on($p, layer := {layer})", {"p": piece}).to_pylist()
        expected = {f: int(n) for f, n in enumerate((acts[mask] > 0).sum(0)) if n}
        assert {r["feature"]: r["n_hits"] for r in on} == expected

        profile = run_sql(con, f"FROM region_profile({layer}, {feature})").to_pylist()
        regions = {r["region"]: r["n_active"] for r in profile}
        by_region: dict[str, int] = {}
        for i in np.flatnonzero(col > 0):
            region = tokens["region"][int(row_tokens[i])]
            by_region[region] = by_region.get(region, 0) + 1
        assert {k: v for k, v in regions.items() if v} == by_region

        for sql in (f"FROM top_per_doc({layer}, {feature}, k := 3)", f"FROM quantile_samples({layer}, {feature})",
                    f"FROM cooccurring({layer}, {feature})", "SELECT resolve_adapter(NULL) AS a",
                    "DESCRIBE features", "SUMMARIZE docs", "SHOW TABLES"):
            assert run_sql(con, sql).num_rows > 0, sql
    finally:
        con.close()
