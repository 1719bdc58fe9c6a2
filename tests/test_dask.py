"""Dask work over stores (statistics, index parts) on a LocalCluster of 2 worker processes,
against single-process NumPy and the single-process index."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner

from tca import TcaError
from tca.cache.cluster import ClusterConfig, dask_client
from tca.cache.stats import QUANTILES, compute_stats
from tca.cache.store import Store, StoreSpec
from tca.cli import main
from tca.query.index import adapter_layers, index_adapters
from tca.query.sql import query
from tca.train.adapter import Adapter, AdapterConfig
from tca.train.checkpoint import AdapterSet, save_adapters

D, LAYERS, BLOCK = 32, (0, 2), 48
MASSIVE = (5, 77, 140)
"""Rows scaled up 40-fold, as attention sinks are."""


def make_store(path, n_rows: int = 200, uncommitted: tuple[int, ...] = ()) -> Store:
    """bf16 rows with a few massive ones; the blocks in ``uncommitted`` are left unwritten."""
    rng = np.random.default_rng(1)
    store = Store.create(str(path), StoreSpec(layers=list(LAYERS), d_model=D, dtype="bfloat16", n_rows=n_rows,
                                              block_rows=BLOCK, chunk_rows=16))
    tokens = np.sort(rng.choice(n_rows * 2, n_rows, replace=False)).astype(np.int64)
    store.write_row_tokens(tokens)
    scale = np.ones((n_rows, 1), np.float32)
    scale[list(MASSIVE)] = 40
    for b in range(store.spec.n_blocks):
        if b in uncommitted:
            continue
        lo, hi = store.block_range(b)
        store.write_block(b, {layer: {
            "x": torch.from_numpy(scale[lo:hi] * (rng.standard_normal((hi - lo, D)) + layer).astype(np.float32)),
            "delta": torch.from_numpy((0.1 * rng.standard_normal((hi - lo, D))).astype(np.float32)),
        } for layer in LAYERS})
    n_tokens = n_rows * 2
    store.write_table("tokens", pa.table({
        "token": np.arange(n_tokens, dtype=np.int64), "doc": np.arange(n_tokens, dtype=np.int64) // 50,
        "pos": (np.arange(n_tokens) % 50).astype(np.int32), "token_id": (np.arange(n_tokens) % 7).astype(np.int32),
        "piece": [f"w{i % 7}" for i in range(n_tokens)], "region": ["think"] * n_tokens,
    }))
    store.write_table("docs", pa.table({"doc": np.arange(n_tokens // 50, dtype=np.int64)}))
    return store


@pytest.fixture(scope="module")
def client():
    with dask_client(ClusterConfig(workers=2)) as c:
        assert len(c.scheduler_info()["workers"]) == 2
        yield c


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("dask")
    return {"full": make_store(root / "full"), "partial": make_store(root / "partial", uncommitted=(1,)), "root": root}


@pytest.mark.parametrize("which", ["full", "partial"])
def test_stats_equal_numpy(client, stores, which):
    store = stores[which]
    got = compute_stats(store, list(LAYERS), client, outlier_factor=10.0, top_outliers=4)
    rows = np.concatenate([np.arange(*store.block_range(b)) for b in np.flatnonzero(store.committed())])
    assert got.rows == len(rows) == (store.n_rows if which == "full" else store.n_rows - BLOCK)
    for layer in LAYERS:
        for name in ("x", "delta"):
            # The reference: the committed rows, decoded by hand from their bit patterns, in float64.
            bits = store.array(layer, name)[:][rows]
            a = (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
            s = got.layers[layer][name]
            np.testing.assert_allclose(s.mean, a.mean(axis=0), rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(s.variance, a.var(axis=0), rtol=1e-10, atol=1e-15)
            norms = np.sqrt((a * a).sum(axis=1))
            np.testing.assert_allclose(list(s.norm_quantiles.values()), np.quantile(norms, QUANTILES), rtol=1e-12)
            median = np.median(norms)
            assert s.n_outliers == int((norms > 10 * median).sum())
            order = np.argsort(-norms, kind="stable")[:4]
            assert [o["row"] for o in s.outliers] == rows[order].tolist()
            assert [o["token"] for o in s.outliers] == store.row_tokens()[rows[order]].tolist()
            assert [o["piece"] for o in s.outliers] == [f"w{t % 7}" for t in store.row_tokens()[rows[order]]]
    kept = set(rows.tolist())
    assert got.layers[0]["x"].n_outliers == len(kept & set(MASSIVE)) > 0


def _adapter_set(path, activation: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    cfg = AdapterConfig(d_model=D, n_features=20, activation=activation, k=3)
    adapters = {}
    for layer in LAYERS:
        ad = Adapter(cfg)
        with torch.no_grad():
            ad.W_enc.copy_(torch.randn(D, 20, generator=g) / D**0.5)
            ad.b_enc.fill_(-0.5)
            ad.W_dec.copy_(torch.randn(20, D, generator=g))
        adapters[layer] = ad.eval()
    save_adapters(path, AdapterSet(adapters, cfg))


TABLES = {
    "activations": "SELECT * FROM activations ORDER BY ALL",
    "features": "SELECT * FROM features ORDER BY ALL",
    "tokens": "SELECT * FROM tokens ORDER BY ALL",
    "adapters": "SELECT * EXCLUDE (indexed_at) FROM adapters ORDER BY ALL",
}


@pytest.mark.parametrize("which", ["full", "partial"])
def test_index_from_dask_parts_equals_single_process(client, stores, tmp_path, which):
    store, root = stores[which], stores["root"]
    for name, activation, seed in (("relu", "relu", 1), ("topk", "topk", 2)):
        if not (root / name).exists():
            _adapter_set(root / name, activation, seed)
    adapters = adapter_layers(root / "relu") + adapter_layers(root / "topk")
    index_adapters(store, adapters, tmp_path / "one.duckdb", batch_rows=20)
    parts = tmp_path / "parts"
    summary = index_adapters(store, adapters, tmp_path / "dask.duckdb", batch_rows=20, client=client, parts=str(parts))
    assert summary.workers == 2 and sum(summary.written.values()) > 0
    for table, sql in TABLES.items():
        assert query(tmp_path / "dask.duckdb", sql).equals(query(tmp_path / "one.duckdb", sql)), table
    assert list(parts.iterdir()) == []  # the parts are removed once loaded


def test_cli_stats_and_index_on_a_local_cluster(stores, tmp_path):
    store = str(stores["root"] / "full")
    res = subprocess.run([sys.executable, "-m", "tca.cli", "-q", "cache", "stats", store, "--workers", "2",
                          "--layers", "2", "--json"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    stats = json.loads(res.stdout)
    assert list(stats["layers"]) == ["2"] and stats["rows"] == 200
    x = Store.open(store).read(2, "x", 0, 200, torch.float64).numpy()
    np.testing.assert_allclose(stats["layers"]["2"]["x"]["mean"], x.mean(axis=0), rtol=1e-12)
    text = subprocess.run([sys.executable, "-m", "tca.cli", "-q", "cache", "stats", store, "--workers", "1"],
                          capture_output=True, text=True, timeout=300)
    assert text.returncode == 0 and "outlier" in text.stdout
    if not (stores["root"] / "relu").exists():
        _adapter_set(stores["root"] / "relu", "relu", 1)
    out = tmp_path / "cli.duckdb"
    res = subprocess.run([sys.executable, "-m", "tca.cli", "-q", "index", "--store", store, "--adapters",
                          str(stores["root"] / "relu"), "--out", str(out), "--workers", "2", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["workers"] == 2
    ref = tmp_path / "ref.duckdb"
    index_adapters(Store.open(store), adapter_layers(stores["root"] / "relu"), ref)
    assert query(out, TABLES["activations"]).equals(query(ref, TABLES["activations"]))
    assert not (tmp_path / "cli.duckdb.parts").exists() or not any((tmp_path / "cli.duckdb.parts").iterdir())


def test_bad_cluster_settings_get_one_sentence(stores):
    with pytest.raises(TcaError, match="--workers must be a positive integer; got 0"):
        with dask_client(ClusterConfig(workers=0)):
            pass
    with pytest.raises(TcaError, match="could not reach the Dask scheduler at tcp://127.0.0.1:9"):
        with dask_client(ClusterConfig(scheduler="tcp://127.0.0.1:9", connect_timeout=2)):
            pass
    res = CliRunner().invoke(main, ["cache", "stats", str(stores["root"] / "full"), "--layers", "1"])
    assert res.exit_code == 2 and "layer 1 is out of range" in res.output
