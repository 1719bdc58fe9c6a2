"""Users' SQL over an index: a connection that reaches the index and nothing else, and only read statements.

An index is something people share and serve, so a query must not reach past it. Every
connection opened here is read-only and configured before any user SQL runs:
``enable_external_access = false`` (no file but the index, no URL, no Python objects by name),
no automatic extension install or load, no community extensions, and then
``lock_configuration = true``, so no statement can change any of that back.

The configuration alone still lets a read-only connection make temporary tables, set variables
and (before DuckDB 2.0) run some PRAGMAs, so each statement's type is also taken from DuckDB's
own parser and only a single SELECT (which covers ``FROM …``, ``VALUES``, ``DESCRIBE``, ``SHOW``
and ``SUMMARIZE``) runs. docs/query.md lists what is refused and why.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, get_args

import duckdb
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from tca import TcaError

_ALLOWED = {duckdb.StatementType.SELECT}
Format = Literal["table", "csv", "json", "parquet"]
FORMATS = get_args(Format)

_CONFINED = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
}
"""Set when the connection opens; ``lock_configuration`` follows once the session settings are made."""


@dataclass
class SqlConfig:
    """``tca sql``: one read-only query over an index."""

    index: Path
    """The DuckDB index."""
    sql: str
    """One read statement; the macros (``top_examples`` …) are available."""
    format: Format = "table"
    """``table`` (for reading), ``csv``, ``json`` (a list of records) or ``parquet`` (needs ``out``)."""
    out: Path | None = None
    """Write the result here (``table`` writes CSV) instead of stdout; never the index itself."""
    overwrite: bool = False
    """Replace ``out`` if it exists."""


def connect(index: str | Path) -> duckdb.DuckDBPyConnection:
    """A read-only connection to an index file that reaches nothing but the index."""
    path = Path(index)
    if not path.is_file():
        raise TcaError(f"{path} is not an index file; build one with `tca index`.")
    try:
        con = duckdb.connect(str(path), read_only=True, config=_CONFINED)
    except duckdb.Error as exc:
        raise TcaError(f"cannot open {path} as a DuckDB index: {_first_line(exc)}") from None
    con.execute("SET enable_progress_bar = false")  # DuckDB would draw it on stdout, among the results
    con.execute("SET lock_configuration = true")
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
    except duckdb.PermissionException as exc:
        raise TcaError(f"a query reads only the index's tables, not other files, URLs or extensions "
                       f"({_first_line(exc).rstrip('.')}).") from None
    except duckdb.Error as exc:
        raise TcaError(f"the query failed: {_first_line(exc)}") from None


def query(index: str | Path, sql: str, params: list | dict | None = None) -> pa.Table:
    """Open ``index`` read-only, run one read statement, return an Arrow table."""
    con = connect(index)
    try:
        return run_sql(con, sql, params)
    finally:
        con.close()


def open_writer(index: str | Path) -> duckdb.DuckDBPyConnection:
    """A writable connection to an existing tca index, for the writer commands (attribute --index,
    explain); one sentence when ``index`` is not one. Users' queries go through ``connect``."""
    path = Path(index)
    if not path.is_file():
        raise TcaError(f"{path} is not an index file; build one with `tca index` first.")
    try:
        con = duckdb.connect(str(path))
    except duckdb.Error as exc:
        raise TcaError(f"cannot open {path} for writing: {str(exc).strip().splitlines()[0]}") from None
    con.execute("SET enable_progress_bar = false")  # stdout is for results
    if not con.sql("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'adapters'").fetchall()[0][0]:
        con.close()
        raise TcaError(f"{path} is a DuckDB file but not a tca index (it has no adapters table).")
    return con


def in_transaction(con: duckdb.DuckDBPyConnection, work: Callable[[], Any]) -> None:
    """Run ``work`` (writes of a writer command: index, attribute, census, explain) as one transaction:
    all of it lands or none."""
    con.execute("BEGIN TRANSACTION")
    try:
        work()
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


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
