"""Query-layer benchmark: index build throughput and top-example latency as the index grows.

Prints JSON lines:
  {"bench": "index_build", ...}   rows/s of ``index_adapters`` on a synthetic store, side by side
                                  with the bare encoder (GEMM + nonzero extraction) on the same rows
  {"bench": "top_examples", ...}  median / p90 latency of ``top_examples(layer, feature, 20, 12)``
                                  on synthetic indexes of 1 M, 10 M and 50 M activations, for a
                                  typical and the busiest feature, with the ratio to the smallest index

The synthetic indexes have the real schema and layout: one segment per (adapter, layer), each
sorted by (feature, value desc), as ``tca index`` writes them; features are Zipf-like in
frequency. Run: ``python bench/query.py [--sizes 1e6,1e7,5e7] [--dir DIR]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import torch

from tca.cache.store import Store, StoreSpec
from tca.query import schema
from tca.query.index import IndexAdapter, index_adapters
from tca.query.sql import connect, run_sql

LAYERS, FEATURES, L0, DOC_LEN = 4, 8192, 16, 512


def bench_build(root: Path, rows: int, d: int, n_features: int) -> dict:
    """Index a synthetic store with one ReLU adapter; compare with encoding alone."""
    store = Store.create(str(root / "store"), StoreSpec(layers=[0], d_model=d, dtype="bfloat16", n_rows=rows,
                                                        block_rows=4096, chunk_rows=512))
    store.write_row_tokens(np.arange(rows))
    g = torch.Generator().manual_seed(0)
    for b in range(store.spec.n_blocks):
        lo, hi = store.block_range(b)
        x = torch.randn(hi - lo, d, generator=g)
        store.write_block(b, {0: {"x": x, "delta": x}})
    tokens = pa.table({"token": np.arange(rows), "doc": np.arange(rows) // DOC_LEN,
                       "pos": (np.arange(rows) % DOC_LEN).astype(np.int32), "token_id": np.zeros(rows, np.int32),
                       "piece": pa.array(["t"] * rows), "region": pa.array(["think"] * rows)})
    store.write_table("tokens", tokens)
    store.write_table("docs", pa.table({"doc": np.arange(-(-rows // DOC_LEN))}))
    W_enc = torch.randn(d, n_features, generator=g) / d**0.5
    b_enc = torch.full((n_features,), -2.3)  # about 1% of features active per row
    adapter = IndexAdapter("bench", 0, lambda x: torch.relu(x @ W_enc + b_enc), torch.randn(n_features, d))

    start = time.perf_counter()
    summary = index_adapters(store, [adapter], root / "build.duckdb")
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    for lo in range(0, rows, 4096):
        x = store.read(0, "x", lo, min(lo + 4096, rows), torch.float32)
        acts = adapter.encode(x)
        r, f = (acts > 0).nonzero(as_tuple=True)
        acts[r, f].numpy()
    encode_s = time.perf_counter() - start
    return {"bench": "index_build", "rows": rows, "d_model": d, "n_features": n_features,
            "activations": sum(summary.written.values()), "rows_per_s": rows / build_s,
            "encode_only_rows_per_s": rows / encode_s, "build_over_encode_time": build_s / encode_s}


def synthetic_index(path: Path, n_activations: int) -> None:
    """An index of ``n_activations`` rows with the layout ``tca index`` writes."""
    n_tokens = max(n_activations // (LAYERS * L0), DOC_LEN)
    con = duckdb.connect(str(path))
    con.execute("SET enable_progress_bar = false")
    try:
        con.execute(schema.TABLES)
        con.execute(f"""
            INSERT INTO tokens
            SELECT i, i // {DOC_LEN}, (i % {DOC_LEN})::INTEGER, (hash(i) % 1000)::INTEGER,
                   'tok' || (hash(i) % 1000)::VARCHAR,
                   CASE WHEN i % {DOC_LEN} < 64 THEN 'prompt' WHEN i % {DOC_LEN} < 448 THEN 'think' ELSE 'answer' END,
                   i
            FROM range({n_tokens}) t(i)""")
        per_layer = n_activations // LAYERS
        for layer in range(LAYERS):
            # Zipf-like frequencies: feature f fires about in proportion to 1 / (f + 1).
            con.execute(f"""
                INSERT INTO activations
                SELECT 'syn', {layer}, least(floor(exp(random() * ln({FEATURES} + 1.0))) - 1, {FEATURES} - 1)::INTEGER
                       AS feature, (random() * {n_tokens})::BIGINT AS token, random()::FLOAT * 10 AS value
                FROM range({per_layer})
                ORDER BY feature, value DESC, token""")
            con.execute(f"""
                INSERT INTO features
                SELECT 'syn', {layer}, feature, count(*), count(*) / {n_tokens}, max(value), avg(value),
                       NULL, 1.0, NULL, NULL
                FROM activations WHERE layer = {layer} GROUP BY feature""")
            con.execute(f"""INSERT INTO adapters VALUES ('syn', {layer}, '', 'relu', 0, {FEATURES}, {n_tokens}, 0, '',
                           current_localtimestamp())""")
        schema.install(con)
        con.execute("CHECKPOINT")
    finally:
        con.close()


def bench_latency(path: Path, n_activations: int, repeats: int) -> list[dict]:
    con = connect(path)
    out = []
    try:
        total = run_sql(con, "SELECT count(*) AS n FROM activations")["n"][0].as_py()
        busiest = run_sql(con, "SELECT feature, n_active FROM features WHERE layer = 2 ORDER BY n_active DESC LIMIT 1")
        typical = run_sql(con, """SELECT feature, n_active FROM features WHERE layer = 2
                                  ORDER BY abs(n_active - (SELECT median(n_active) FROM features WHERE layer = 2)) LIMIT 1""")
        for kind, row in (("typical", typical), ("busiest", busiest)):
            feature, n_active = row["feature"][0].as_py(), row["n_active"][0].as_py()
            sql = f"FROM top_examples(2, {feature}, 20, 12)"
            assert run_sql(con, sql).num_rows == min(20, n_active)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                run_sql(con, sql)
                times.append(time.perf_counter() - start)
            out.append({"bench": "top_examples", "activations": total, "target_size": n_activations,
                        "feature": kind, "feature_n_active": n_active, "median_ms": statistics.median(times) * 1e3,
                        "p90_ms": float(np.percentile(times, 90)) * 1e3})
    finally:
        con.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e6,1e7,5e7", help="Activation counts of the synthetic indexes.")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--build-rows", type=int, default=32768)
    parser.add_argument("--dir", default=None, help="Where to write the indexes (default: a temporary directory).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        print(json.dumps(bench_build(root, args.build_rows, 512, 4096)), flush=True)
        smallest = None
        for size in (int(float(s)) for s in args.sizes.split(",")):
            path = root / f"syn-{size}.duckdb"
            start = time.perf_counter()
            synthetic_index(path, size)
            build_s = time.perf_counter() - start
            for line in bench_latency(path, size, args.repeats):
                key = line["feature"]
                smallest = smallest or {}
                smallest.setdefault(key, line["median_ms"])
                line |= {"ratio_to_smallest": line["median_ms"] / smallest[key], "synthesis_s": build_s}
                print(json.dumps(line), flush=True)
            path.unlink()


if __name__ == "__main__":
    main()
