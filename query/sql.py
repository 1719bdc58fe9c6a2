"""Users' SQL over an index: a read-only connection, and only read statements.

A read-only DuckDB connection cannot change the database file, but it still runs
``COPY … TO`` (writes any file), ``ATTACH`` (opens other databases for writing),
``CREATE TEMP TABLE``, ``SET`` and ``PRAGMA``. So each statement's type is taken from DuckDB's
own parser and only a single SELECT (which covers ``FROM …``, ``VALUES``, ``DESCRIBE``,
``SHOW`` and ``SUMMARIZE``) runs.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from tca import TcaError

_ALLOWED = {duckdb.StatementType.SELECT}
FORMATS = ("table", "csv", "json", "parquet")


@dataclass
class SqlConfig:
    """``tca sql``: one read-only query over an index."""

    index: Path
    """The DuckDB index."""
    sql: str
    """One read statement; the macros (``top_examples`` …) are available."""
    format: str = "table"
    """``table`` (for reading), ``csv``, ``json`` (a list of records) or ``parquet`` (needs ``out``)."""
    out: Path | None = None
    """Write the result here instead of stdout."""


def connect(index: str | Path) -> duckdb.DuckDBPyConnection:
    """A read-only connection to an index file."""
    path = Path(index)
    if not path.is_file():
        raise TcaError(f"{path} is not an index file; build one with `tca index`.")
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.Error as exc:
        raise TcaError(f"cannot open {path} as a DuckDB index: {_first_line(exc)}") from None
    con.execute("SET enable_progress_bar = false")  # DuckDB would draw it on stdout, among the results
    if not con.sql("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'activations'").fetchall()[0][0]:
        con.close()
        raise TcaError(f"{path} is a DuckDB file but not a tca index (it has no activations table).")
    return con


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Raise ``TcaError`` unless ``sql`` is exactly one read statement."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise TcaError(f"the query does not parse: {_first_line(exc)}") from None
    if len(statements) != 1:
        raise TcaError(f"run one statement at a time (this query has {len(statements)}).")
    kind = statements[0].type
    if kind not in _ALLOWED:
        name = kind.name.replace("_STATEMENT", "")
        raise TcaError(f"only read queries (SELECT, FROM, DESCRIBE, SHOW …) may run on an index; this one is {name}.")


def run_sql(con: duckdb.DuckDBPyConnection, sql: str, params: list | dict | None = None) -> pa.Table:
    """The result of one read statement as an Arrow table."""
    check_read_only(con, sql)
    try:
        return con.sql(sql, params=params).to_arrow_table()
    except duckdb.Error as exc:
        raise TcaError(f"the query failed: {_first_line(exc)}") from None


def query(index: str | Path, sql: str, params: list | dict | None = None) -> pa.Table:
    """Open ``index`` read-only, run one read statement, return an Arrow table."""
    con = connect(index)
    try:
        return run_sql(con, sql, params)
    finally:
        con.close()


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0].rstrip(".") + "."


def export(table: pa.Table, fmt: str) -> bytes:
    """A result as CSV, JSON (a list of records) or Parquet bytes."""
    if fmt == "json":
        return (json.dumps(table.to_pylist(), indent=1, default=str) + "\n").encode()
    buffer = io.BytesIO()
    if fmt == "parquet":
        pq.write_table(table, buffer)
    elif fmt == "csv":
        # CSV has no lists: nested values (context pieces, quantiles) go in as JSON text.
        flat = pa.table({
            name: pa.array([json.dumps(v) for v in col.to_pylist()]) if pa.types.is_nested(col.type) else col
            for name, col in zip(table.column_names, table.columns)
        })
        pa_csv.write_csv(flat, buffer)
    else:
        raise TcaError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}.")
    return buffer.getvalue()
