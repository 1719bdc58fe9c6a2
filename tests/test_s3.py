"""Stores on object storage: harvest -> stats -> index -> query against a local S3 server (moto) on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys

import fsspec
import numpy as np
import pytest
from click.testing import CliRunner

from tca.cache.cluster import ClusterConfig, dask_client
from tca.cache.harvest import HarvestConfig, harvest
from tca.cache.plan import PlanConfig
from tca.cache.stats import compute_stats
from tca.cache.store import Store
from tca.cli import main
from tca.query.index import adapter_layers, index_adapters
from tca.query.sql import query

moto_server = pytest.importorskip("moto.server", reason="needs moto[server] (the dev extra)")

BUCKET = "tca-test"
SETTINGS = {"layers": "1,3", "block_rows": 64, "chunk_rows": 32, "batch_tokens": 160, "device": "cpu"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on loopback, with the standard AWS_* variables pointing at it."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_ENDPOINT_URL": endpoint,
           "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir(BUCKET)
        yield {"endpoint": endpoint, "env": env}
    server.stop()


@pytest.fixture(scope="module")
def stores(s3, tiny_pair, tiny_data, tmp_path_factory):
    """The same harvest into the S3 server and onto local disk."""
    local = tmp_path_factory.mktemp("s3-local") / "store"
    url = f"s3://{BUCKET}/run"
    for out in (str(local), url):
        harvest(HarvestConfig(base=str(tiny_pair[0]), target=str(tiny_pair[1]), out=out,
                              plan=PlanConfig(data=str(tiny_data)),
                              **SETTINGS))
    return {"local": Store.open(str(local)), "s3": Store.open(url), "url": url}


def _arrays(store: Store) -> dict[str, np.ndarray]:
    return {f"{l}/{n}": store.array(l, n)[:] for l in store.layers for n in store.spec.array_names} | {
        "rows/token": store.row_tokens(), "committed": store.committed()}


def test_harvest_to_s3_equals_local_disk(stores):
    local, remote = stores["local"], stores["s3"]
    assert local.complete and remote.complete and remote.spec.n_blocks > 4
    a, b = _arrays(local), _arrays(remote)
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    assert local.table("tokens").equals(remote.table("tokens")) and local.table("docs").equals(remote.table("docs"))
    assert local.attrs == remote.attrs
    info = CliRunner().invoke(main, ["cache", "info", stores["url"], "--json"])
    assert info.exit_code == 0 and json.loads(info.stdout)["rows_committed"] == local.n_rows
    files = fsspec.filesystem("s3").find(f"{BUCKET}/run")
    assert f"{BUCKET}/run/layers/1/x/c/0/0" in files and f"{BUCKET}/run/tokens.parquet" in files


def test_resume_on_s3(s3, stores, tiny_pair, tiny_data):
    url = f"s3://{BUCKET}/resumed"
    cfg = HarvestConfig(base=str(tiny_pair[0]), target=str(tiny_pair[1]), out=url,
                        plan=PlanConfig(data=str(tiny_data)), **SETTINGS)
    harvest(cfg)
    store = Store.open(url, mode="r+")
    fs = fsspec.filesystem("s3")
    for block in (0, 3):  # as if killed before these blocks were committed
        fs.rm([f"{store.root}/_progress/committed/c/{block}"]
              + [store.shard_path(layer, name, block) for layer in store.layers for name in store.spec.array_names])
    assert not Store.open(url).complete
    result = harvest(HarvestConfig(**{**vars(cfg), "resume": True}))
    assert result.blocks_written == 2
    a, b = _arrays(stores["local"]), _arrays(Store.open(url))
    for key in a:
        assert np.array_equal(a[key], b[key]), key


def test_two_rank_harvest_into_s3(s3, stores, tiny_pair, tiny_data):
    from test_ranks import harvest_argv, spawn_ranks

    url = f"s3://{BUCKET}/ranks"
    procs = spawn_ranks(harvest_argv(tiny_pair, tiny_data, url), 2)
    assert all(p.returncode == 0 for p in procs), [p.stderr[-2000:] for p in procs]
    a, b = _arrays(stores["local"]), _arrays(Store.open(url))
    for key in a:
        assert np.array_equal(a[key], b[key]), key


def test_stats_on_s3_equal_local(stores):
    with dask_client(ClusterConfig(workers=2)) as client:
        remote = compute_stats(stores["s3"], [1, 3], client)
        local = compute_stats(stores["local"], [1, 3], client)
    for layer in (1, 3):
        for name in ("x", "delta"):
            r, l = remote.layers[layer][name], local.layers[layer][name]
            assert r.mean == l.mean and r.norm_quantiles == l.norm_quantiles and r.outliers == l.outliers
            np.testing.assert_allclose(r.variance, l.variance, rtol=1e-12)


def test_storage_options_instead_of_environment(s3, stores):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    options = {"endpoint_url": s3["endpoint"], "key": "testing", "secret": "testing",
               "client_kwargs": {"region_name": "us-east-1"}}
    res = subprocess.run([sys.executable, "-m", "tca.cli", "-q", "cache", "stats", stores["url"], "--layers", "1",
                          "--workers", "1", "--storage-options", json.dumps(options), "--json"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["rows"] == stores["local"].n_rows
    bad = CliRunner().invoke(main, ["cache", "stats", stores["url"], "--storage-options", "[1, 2]"])
    assert bad.exit_code == 2 and "must be a JSON object" in bad.output


@pytest.fixture(scope="module")
def adapters(stores, tmp_path_factory):
    """Adapters trained on the S3 store by `tca train --store s3://…`."""
    out = tmp_path_factory.mktemp("s3-train") / "run"
    res = CliRunner().invoke(main, ["train", "--store", stores["url"], "--out", str(out), "--layers", "1,3",
                                    "--features", "32", "--batch", "128", "--tokens", "2048", "--l1", "1e-3",
                                    "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    member = next(iter(summary["members"].values()))
    return member["path"]


def test_index_and_query_with_the_store_on_s3(stores, adapters, tmp_path):
    ads = adapter_layers(adapters)
    index_adapters(stores["local"], ads, tmp_path / "local.duckdb", batch_rows=100)
    index_adapters(stores["s3"], ads, tmp_path / "s3.duckdb", batch_rows=100)
    with dask_client(ClusterConfig(workers=2)) as client:
        parts = f"s3://{BUCKET}/parts"
        index_adapters(stores["s3"], ads, tmp_path / "parts.duckdb", batch_rows=100, client=client, parts=parts)
    assert not fsspec.filesystem("s3").find(f"{BUCKET}/parts")  # parts removed once loaded
    for sql in ("SELECT * FROM activations ORDER BY ALL", "SELECT * FROM features ORDER BY ALL",
                "SELECT * FROM tokens ORDER BY ALL"):
        want = query(tmp_path / "local.duckdb", sql)
        assert query(tmp_path / "s3.duckdb", sql).equals(want) and query(tmp_path / "parts.duckdb", sql).equals(want)
    assert query(tmp_path / "s3.duckdb", "SELECT value FROM index_meta WHERE key = 'store'")[0][0].as_py() == stores["url"]
    live = query(tmp_path / "s3.duckdb", "SELECT layer, feature FROM features WHERE n_active > 0 ORDER BY n_active DESC LIMIT 1")
    layer, feature = live["layer"][0].as_py(), live["feature"][0].as_py()
    top = query(tmp_path / "s3.duckdb", f"FROM top_examples({layer}, {feature}, k := 3)").to_pylist()
    assert len(top) == 3 and top[0]["value"] >= top[-1]["value"] and top[0]["context_pieces"]
    res = CliRunner().invoke(main, ["top", str(tmp_path / "s3.duckdb"), str(layer), str(feature), "-k", "2"])
    assert res.exit_code == 0, res.output
