"""Building the index: run adapters over every stored row and keep every nonzero activation.

No language model runs: the store already holds each row's MLP input ``x``, so indexing is
one encoder GEMM per row block. Layers are read once and feed every adapter of that layer.

Nothing is written under the index's name until the whole build has succeeded: the index is
built under a temporary name beside it (starting from a copy of the existing index when there
is one) and renamed over it at the end, so a failure or a kill at any point leaves no new file
and the previous index exactly as it was. The store's chunks are checked against their checksums
as they are read. An index gains adapters freely; ``tca index`` replaces an (adapter, layer) it
already holds only with ``overwrite``, and never writes over a file that is not a tca index.

Activations are inserted sorted by (feature, value desc), so one feature's rows are contiguous
and DuckDB's per-row-group min/max skip everything else when a query asks for one feature.

With a Dask cluster (``--workers``/``--scheduler``) the encoding runs on its workers, which
write Parquet parts that this process then loads in the same order (``tca.query.parts``).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from tca import TcaError
from tca.cache.cluster import ClusterConfig, dask_client
from tca.cache.layers import select_layers
from tca.cache.memory import Workload, check_memory, memory_plan
from tca.cache.models import find_model
from tca.cache.store import Store, from_stored
from tca.cache.threads import DEFAULT_THREADS, command_threads
from tca.outputs import atomic_file, check_not_input
from tca.query import schema
from tca.query.lens import LENS_BATCH, LogitLens
from tca.query.parts import Parts, nonzeros, write_parts
from tca.query.sql import connect, in_transaction
from tca.ranges import NON_NEGATIVE, POSITIVE, check_ranges
from tca.train.checkpoint import load_adapters as load_adapter_set
from tca.train.checkpoint import named_set, store_models

log = logging.getLogger(__name__)

_TOKEN_COLUMNS = {"token": pa.int64(), "doc": pa.int64(), "pos": pa.int32(), "token_id": pa.int32(),
                  "piece": pa.string(), "region": pa.string()}


@dataclass
class IndexAdapter:
    """One layer's adapter as the index sees it: a name, an encoder and decoder directions."""

    name: str
    """How queries name it (``adapter := '…'``); several adapters can share an index."""
    layer: int
    encode: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, torch.Tensor]]
    """[B, d] float32 -> dense activations [B, F], or (indices, values) [B, k] for sparse encoders."""
    W_dec: torch.Tensor
    """[F, d] decoder directions (a feature's direction is a row)."""
    activation: str = ""
    path: str = ""
    models: dict[str, Any] | None = None
    """Base/target provenance, used to find the target model for the logit lens."""

    @property
    def n_features(self) -> int:
        return self.W_dec.shape[0]


def adapter_layers(path: str | Path, name: str | None = None) -> list[IndexAdapter]:
    """Every layer's adapter of one adapter set written by the trainer (named after its directory)."""
    aset = load_adapter_set(path)
    name = name or Path(path).resolve().name
    return [
        IndexAdapter(name, layer, ad.encode, ad.W_dec.detach(), aset.config.activation, str(path), aset.models)
        for layer, ad in sorted(aset.adapters.items())
    ]


@dataclass
class IndexConfig:
    """``tca index``: encode a store with adapters and write a DuckDB index."""

    store: str = field(metadata={"old": ("--cache",)})
    """The activation store (path or fsspec URL)."""
    adapters: list[str] = field(metadata={"repeat": True})
    """Adapter set directories (repeat the option for several); ``NAME=DIR`` names one, else it is named after its directory."""
    out: Path
    """The DuckDB index to create, or an index to add these adapters to (its other adapters and
    layers stay); the file appears or changes only once the build is complete."""
    layers: str = "all"
    """``all`` (every layer the adapters cover) or a list like ``0,3,5-7``."""
    min_act: float = field(default=0.0, metadata=NON_NEGATIVE)
    """Keep activations strictly above this value; 0 keeps every nonzero one."""
    target: str | None = None
    """Target model directory for the logit lens (default: the one the store or adapters record)."""
    batch_rows: int = field(default=4096, metadata=POSITIVE)
    """Rows encoded at once."""
    n_logits: int = field(default=10, metadata=POSITIVE)
    """Tokens kept per feature in ``top_logits`` and ``bottom_logits``."""
    cluster: ClusterConfig | None = None
    """Encode on Dask workers (a local cluster or one at a scheduler address); None: in this process."""
    parts: str | None = None
    """Where Dask workers write Parquet parts (a path or fsspec URL all of them reach); default:
    a directory beside ``out``. Removed once loaded."""
    storage_options: dict = field(default_factory=dict)
    """fsspec options of the store and the parts (credentials, endpoint)."""
    overwrite: bool = False
    """Replace adapter layers ``out`` already holds (same name and layer); without it they are refused."""
    threads: int = field(default=DEFAULT_THREADS, metadata=POSITIVE)
    """torch threads of this process on the CPU (Dask workers keep their own), fixed whatever the
    machine's load (``tca.cache.threads``: more than one thrashed a busy 2-core machine); recorded
    in the summary."""

    def __post_init__(self):
        check_ranges(self)


@dataclass
class IndexSummary:
    out: str
    rows: int
    """Stored rows encoded per layer."""
    written: dict[str, int] = field(default_factory=dict)
    """Activations written per ``adapter/layer``."""
    seconds: float = 0.0
    rows_per_s: float = 0.0
    workers: int = 0
    """Dask workers that encoded the rows; 0 when this process did."""
    threads: int = 0
    """torch threads this process ran with (``IndexConfig.threads`` under ``build_index``)."""


@command_threads
def build_index(cfg: IndexConfig) -> IndexSummary:
    """Load the store and adapters named by ``cfg`` and index them; every refusal comes before
    anything is written."""
    specs = [named_set(spec) for spec in cfg.adapters]
    check_not_input(cfg.out, [cfg.store, *(path for _, path in specs)])
    held = _held_adapters(cfg.out)
    store = Store.open(cfg.store, storage_options=cfg.storage_options)
    adapters: list[IndexAdapter] = []
    for name, path in specs:
        adapters += adapter_layers(path, name)
    layers = select_layers(cfg.layers, {a.layer for a in adapters}, "the adapters cover")
    adapters = [a for a in adapters if a.layer in layers]
    _check(store, adapters)
    clash = sorted(held & {(a.name, a.layer) for a in adapters})
    if clash and not cfg.overwrite:
        name, layer = clash[0]
        raise TcaError(f"--out {cfg.out} already holds adapter {name} layer {layer}; pass --overwrite to replace it "
                       "or name this set apart with NAME=DIR.")
    lens_dir = cfg.target or _recorded_target(store, adapters)
    if lens_dir:
        # the logit lens is this command's one model: its plan is logged and checked before it loads
        rows = min(max(a.W_dec.shape[0] for a in adapters), LENS_BATCH)
        check_memory(memory_plan(Workload("index", tokens=rows), find_model(lens_dir).config, None, torch.float32,
                                 torch.device("cpu")))
    lens = LogitLens.from_pretrained(lens_dir) if lens_dir else None
    if lens is None:
        log.warning("no target model found for the logit lens; pass --target to fill top_logits/bottom_logits")
    options = dict(min_act=cfg.min_act, lens=lens, batch_rows=cfg.batch_rows, n_logits=cfg.n_logits)
    if cfg.cluster is None:
        return index_adapters(store, adapters, cfg.out, **options)
    with dask_client(cfg.cluster) as client:
        return index_adapters(store, adapters, cfg.out, client=client, parts=cfg.parts, **options)


def index_adapters(
    store: Store,
    adapters: Sequence[IndexAdapter],
    out: str | Path,
    *,
    min_act: float = 0.0,
    lens: LogitLens | None = None,
    batch_rows: int = 4096,
    n_logits: int = 10,
    client=None,
    parts: str | None = None,
) -> IndexSummary:
    """Write every given adapter's layer into the index at ``out``: a new index, or an existing one
    whose other adapters and layers stay and whose layers of these adapters are replaced.

    The build runs on a temporary file beside ``out`` (a copy of the existing index, if any) that
    replaces ``out`` only once complete; ``out`` must be absent or a tca index.

    With a Dask ``client``, workers encode the rows into Parquet parts under ``parts`` first
    (``tca.query.parts``; default: a directory beside ``out``), and this process loads them;
    the index is the same either way.
    """
    out = Path(out)
    _check(store, adapters)
    _held_adapters(out)  # refuses an out that is not a tca index before anything is written
    rows = store.committed_row_indices()
    if not len(rows):
        raise TcaError(f"{store.url} has no committed rows yet; index it after (part of) the harvest is done.")
    if len(rows) < store.n_rows:
        log.warning("indexing the %d committed rows of %d; the rest of the store is not harvested yet",
                    len(rows), store.n_rows)
    row_tokens = store.row_tokens()
    layers = sorted({a.layer for a in adapters})
    of_layer = {layer: [a for a in adapters if a.layer == layer] for layer in layers}
    runs = list(_runs(rows, batch_rows))
    summary = IndexSummary(str(out), len(rows), threads=torch.get_num_threads())
    written: Parts | None = None
    with atomic_file(out) as building:
        if out.exists():
            _copy_index(out, building)
        con = duckdb.connect(str(building))
        con.execute("SET enable_progress_bar = false")  # stdout is for results; tqdm reports on stderr
        try:
            in_transaction(con, lambda: _write_tables(con, store, rows, row_tokens))
            start = time.perf_counter()
            if client is not None:
                encoders = {layer: [a.encode for a in mine] for layer, mine in of_layer.items()}
                parts = parts or str(out.resolve().with_name(out.name + ".parts"))
                written = write_parts(client, store, encoders, runs, min_act, parts)
                summary.workers = len(client.scheduler_info().get("workers", {}))

            def tables(layer: int) -> Iterator[tuple[int, list[pa.Table]]]:
                """(rows, one activation table per adapter of ``layer``) per run, in row order."""
                if written is not None:
                    yield from written.read(layer)
                    return
                encoders = [a.encode for a in of_layer[layer]]
                # The shard reader checks each chunk's checksum and names a corrupted one in a sentence.
                reader, encoding = store.shard_reader(layer, "x"), store.array(layer, "x").attrs["tca_encoding"]
                for lo, hi in runs:
                    x = from_stored(reader.read(lo, hi), encoding, torch.float32)
                    yield hi - lo, [nonzeros(encode, x, row_tokens[lo:hi], min_act) for encode in encoders]

            with tqdm(total=len(rows) * len(layers), unit="row", unit_scale=True, desc="index", dynamic_ncols=True) as bar:
                for layer, mine in of_layer.items():
                    stages = [f"stage_{i}" for i in range(len(mine))]
                    for stage in stages:
                        con.execute(f"CREATE OR REPLACE TEMP TABLE {stage} (feature INTEGER, token BIGINT, value FLOAT)")
                    try:
                        for n, batch in tables(layer):
                            for stage, table in zip(stages, batch):
                                _append(con, stage, table)
                            bar.update(n)
                        for adapter, stage in zip(mine, stages):
                            stats_extra = _decoder_table(adapter, lens, n_logits)
                            in_transaction(con, lambda: _replace(con, adapter, stage, stats_extra, len(rows), min_act, store.url))
                            summary.written[f"{adapter.name}/{layer}"] = con.sql(
                                "SELECT count(*) FROM activations WHERE adapter = ? AND layer = ?", params=[adapter.name, layer]
                            ).fetchall()[0][0]
                    finally:
                        for stage in stages:
                            con.execute(f"DROP TABLE IF EXISTS {stage}")
            summary.seconds = time.perf_counter() - start
            summary.rows_per_s = len(rows) * len(layers) / max(summary.seconds, 1e-9)
            con.execute("CHECKPOINT")
        finally:
            con.close()
            _wal(building).unlink(missing_ok=True)
            if written is not None:
                written.remove()
    return summary


def _wal(path: Path) -> Path:
    """DuckDB's write-ahead log of the database at ``path``."""
    return path.with_name(path.name + ".wal")


def _held_adapters(out: str | Path) -> set[tuple[str, int]]:
    """The (adapter, layer) pairs the index at ``out`` holds: none when nothing is there; a
    sentence when ``out`` is something other than a tca index (which no build may replace)."""
    out = Path(out)
    if not out.exists():
        return set()
    if out.is_dir():
        raise TcaError(f"--out {out} is a folder; name the index file to create or update.")
    try:
        con = connect(out)
    except TcaError as exc:
        raise TcaError(f"--out {out} exists but is not a tca index that can be updated ({str(exc).rstrip('.')}); "
                       "choose another path.") from None
    try:
        # Under our read lock no writer is open, so a log here is a killed writer's: the rename of
        # the rebuilt index would leave it beside a file it does not belong to.
        if _wal(out).exists():
            raise TcaError(f"--out {out} has a write-ahead log left by an interrupted writer; open it once with "
                           f"`duckdb {out}` to fold the log in, then index again.")
        return {(name, layer) for name, layer in con.sql("SELECT adapter, layer FROM adapters").fetchall()}
    finally:
        con.close()


def _copy_index(index: Path, to: Path) -> None:
    """Copy an index while a read-only connection holds DuckDB's lock on it, so no writer can
    change it halfway through the copy."""
    con = connect(index)
    try:
        shutil.copyfile(index, to)
    finally:
        con.close()


def _check(store: Store, adapters: Sequence[IndexAdapter]) -> None:
    if not adapters:
        raise TcaError("no adapters to index.")
    seen = set()
    for a in adapters:
        if a.layer not in store.layers:
            raise TcaError(f"adapter {a.name} has layer {a.layer}, which {store.url} does not hold (it has {store.layers}).")
        if a.W_dec.shape[1] != store.d_model:
            raise TcaError(
                f"adapter {a.name} (layer {a.layer}) has width {a.W_dec.shape[1]} but {store.url} has "
                f"d_model {store.d_model}; it was trained on another model."
            )
        if (a.name, a.layer) in seen:
            raise TcaError(f"two adapters are named {a.name} on layer {a.layer}; name them apart with NAME=DIR.")
        seen.add((a.name, a.layer))


def _runs(rows: np.ndarray, batch: int):
    """Contiguous [lo, hi) ranges of at most ``batch`` rows covering ``rows``."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for run in np.split(rows, breaks):
        for lo in range(int(run[0]), int(run[-1]) + 1, batch):
            yield lo, min(lo + batch, int(run[-1]) + 1)


def _append(con: duckdb.DuckDBPyConnection, stage: str, batch: pa.Table) -> None:
    con.register("_batch", batch)
    try:
        con.execute(f"INSERT INTO {stage} SELECT * FROM _batch")
    finally:
        con.unregister("_batch")


def _decoder_table(adapter: IndexAdapter, lens: LogitLens | None, n_logits: int) -> pa.Table:
    """Per-feature columns that come from the decoder: its norm and the logit lens."""
    W = adapter.W_dec.detach().float().cpu()
    top, bottom = lens.top_bottom(W, n_logits) if lens is not None else ([None] * len(W),) * 2
    return pa.table({
        "feature": pa.array(np.arange(len(W), dtype=np.int32)),
        "decoder_norm": pa.array(W.norm(dim=1).numpy()),
        "top_logits": pa.array(top, pa.list_(pa.string())),
        "bottom_logits": pa.array(bottom, pa.list_(pa.string())),
    })


def _replace(con, adapter: IndexAdapter, stage: str, decoder: pa.Table, n_rows: int, min_act: float, store_url: str) -> None:
    """Swap one (adapter, layer) for the staged activations; the caller holds the transaction."""
    key = [adapter.name, adapter.layer]
    for table in ("activations", "features", "adapters"):
        con.execute(f"DELETE FROM {table} WHERE adapter = ? AND layer = ?", key)
    con.execute(
        f"INSERT INTO activations SELECT ?, ?, feature, token, value FROM {stage} ORDER BY feature, value DESC, token",
        key,
    )
    con.register("_decoder", decoder)
    try:
        con.execute(
            f"""
            INSERT INTO features
            SELECT ?, ?, d.feature, coalesce(s.n_active, 0), coalesce(s.n_active, 0) / ?::DOUBLE,
                   s.max, s.mean, s.quantiles, d.decoder_norm, d.top_logits, d.bottom_logits
            FROM _decoder d LEFT JOIN (
                SELECT feature, count(*) AS n_active, max(value) AS max, avg(value) AS mean,
                       quantile_cont(value, {list(schema.QUANTILES)}) AS quantiles
                FROM {stage} GROUP BY feature
            ) s ON s.feature = d.feature
            ORDER BY d.feature
            """,
            [*key, n_rows],
        )
    finally:
        con.unregister("_decoder")
    con.execute(
        "INSERT INTO adapters VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, current_localtimestamp())",
        [*key, adapter.path, adapter.activation, adapter.W_dec.shape[1], adapter.n_features, n_rows, min_act, store_url],
    )
    schema.install(con)  # the macros' default adapter follows the adapters the index now holds


def _write_tables(con, store: Store, rows: np.ndarray, row_tokens: np.ndarray) -> None:
    """(Re)write ``tokens`` and ``docs`` from the store; refuses an index of another store."""
    schema.install(con)
    tokens = store.table("tokens")
    missing = [c for c in _TOKEN_COLUMNS if c not in tokens.column_names and c != "region"]
    if missing:
        raise TcaError(f"{store.url}/tokens.parquet lacks the column(s) {', '.join(missing)}.")
    held = con.sql("SELECT value FROM index_meta WHERE key = 'store_tokens'").fetchall()
    if held and int(held[0][0]) != tokens.num_rows:
        raise TcaError(
            f"the index was built over a store of {held[0][0]} tokens and {store.url} has {tokens.num_rows}; "
            "write this store's index to a new --out file."
        )
    cols = {c: tokens[c].cast(t) if c in tokens.column_names else pa.nulls(tokens.num_rows, t)
            for c, t in _TOKEN_COLUMNS.items()}
    stored = pa.table({"token": pa.array(row_tokens[rows]), "stored_row": pa.array(rows.astype(np.int64))})
    con.register("_tokens", pa.table(cols))
    con.register("_stored", stored)
    con.register("_docs", store.table("docs"))
    try:
        con.execute("DELETE FROM tokens")
        con.execute("""
            INSERT INTO tokens SELECT t.*, s.stored_row
            FROM _tokens t LEFT JOIN _stored s ON s.token = t.token ORDER BY t.token
        """)
        con.execute("CREATE OR REPLACE TABLE docs AS SELECT * FROM _docs ORDER BY doc")
    finally:
        for name in ("_tokens", "_stored", "_docs"):
            con.unregister(name)
    con.execute(
        "INSERT OR REPLACE INTO index_meta VALUES ('store', ?), ('store_tokens', ?)",
        [store.url, str(tokens.num_rows)],
    )


def _recorded_target(store: Store, adapters: Sequence[IndexAdapter]) -> str | None:
    """The target model directory the adapters or the store record, if it exists here."""
    for models in [a.models for a in adapters] + [store_models(store)]:
        target = (models or {}).get("target")
        if isinstance(target, dict):
            target = target.get("path") or target.get("name_or_path") or target.get("id")
        if isinstance(target, str) and Path(target, "config.json").exists():
            return target
    return None
