"""Scale-out benchmark: Dask statistics and index building with 1 and 2 workers, and harvesting
into an S3-compatible server against local disk.

    python bench/scale.py                    # everything
    python bench/scale.py --skip-s3          # only the Dask figures

Prints JSON lines, each a ratio measured side by side in one run:

- ``stats_workers``: rows/s of ``tca cache stats`` (mean, variance, norms of x and delta) on a
  local Dask cluster of 2 worker processes ÷ the same with 1 worker, over one synthetic store;
- ``index_workers``: rows/s of ``tca index`` with Dask workers writing Parquet parts, 2 workers
  ÷ 1 worker, and 1 worker ÷ the single-process index (what the parts round trip costs);
- ``harvest_s3``: wall time of a harvest into a moto S3 server (its own process, on 127.0.0.1)
  ÷ the same harvest onto local disk, alternating, repeated ``--repeats`` times.

Cluster start-up is not timed: the figures are throughput once the workers are running.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import torch

from tca.cache.cluster import ClusterConfig, dask_client
from tca.cache.harvest import HarvestConfig, harvest
from tca.cache.plan import PlanConfig
from tca.cache.stats import compute_stats
from tca.cache.store import Store, StoreSpec
from tca.query.index import adapter_layers, index_adapters
from tca.toy.tiny import build_tiny_pair, tiny_conversations, write_jsonl
from tca.train.adapter import Adapter, AdapterConfig
from tca.train.checkpoint import AdapterSet, save_adapters

LAYERS = (0, 1)


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def synthetic_store(path: Path, n_rows: int, d: int, block_rows: int) -> Store:
    """Random bf16 rows for two layers, with token and document tables."""
    store = Store.create(str(path), StoreSpec(layers=list(LAYERS), d_model=d, dtype="bfloat16", n_rows=n_rows,
                                              block_rows=block_rows, chunk_rows=block_rows // 8))
    store.write_row_tokens(np.arange(n_rows, dtype=np.int64))
    g = torch.Generator().manual_seed(0)
    for b in range(store.spec.n_blocks):
        lo, hi = store.block_range(b)
        store.write_block(b, {layer: {"x": torch.randn(hi - lo, d, generator=g) + 0.5,
                                      "delta": 0.1 * torch.randn(hi - lo, d, generator=g)} for layer in LAYERS})
    store.write_table("tokens", pa.table({
        "token": np.arange(n_rows, dtype=np.int64), "doc": np.arange(n_rows, dtype=np.int64) // 512,
        "pos": (np.arange(n_rows) % 512).astype(np.int32), "token_id": np.zeros(n_rows, np.int32),
        "piece": ["t"] * n_rows, "region": ["think"] * n_rows,
    }))
    store.write_table("docs", pa.table({"doc": np.arange(-(-n_rows // 512), dtype=np.int64)}))
    return store


def adapter_set(path: Path, d: int, n_features: int) -> Path:
    g = torch.Generator().manual_seed(1)
    cfg = AdapterConfig(d_model=d, n_features=n_features, activation="relu")
    adapters = {}
    for layer in LAYERS:
        ad = Adapter(cfg)
        with torch.no_grad():
            ad.W_enc.copy_(torch.randn(d, n_features, generator=g) / d**0.5)
            ad.b_enc.fill_(-2.5)  # a few dozen active features per row, as a trained adapter has
        adapters[layer] = ad.eval()
    save_adapters(path, AdapterSet(adapters, cfg))
    return path


def bench_dask(work: Path, args) -> None:
    store = synthetic_store(work / "store", args.rows, args.d, args.block_rows)
    adapters = adapter_layers(adapter_set(work / "adapters", args.d, args.features))
    mb = store.n_rows * args.d * 2 * 2 * len(LAYERS) / 1e6
    t0 = time.perf_counter()
    single = index_adapters(store, adapters, work / "single.duckdb", batch_rows=args.block_rows)
    single_s = time.perf_counter() - t0
    stats, index = {}, {}
    for workers in (1, 2):
        with dask_client(ClusterConfig(workers=workers)) as client:
            stats[workers] = compute_stats(store, list(LAYERS), client)
            t0 = time.perf_counter()
            index_adapters(store, adapters, work / f"dask{workers}.duckdb", batch_rows=args.block_rows,
                           client=client, parts=str(work / "parts"))
            index[workers] = time.perf_counter() - t0
    emit(figure="stats_workers", ratio=round(stats[2].rows_per_s / stats[1].rows_per_s, 3),
         rows_per_s_1=round(stats[1].rows_per_s), rows_per_s_2=round(stats[2].rows_per_s),
         MB_per_s_1=round(mb / stats[1].seconds, 1), MB_per_s_2=round(mb / stats[2].seconds, 1),
         rows=store.n_rows, layers=len(LAYERS), d=args.d, cpus=os.cpu_count())
    rows = store.n_rows * len(LAYERS)
    emit(figure="index_workers", ratio=round(index[1] / index[2], 3), one_worker_over_single=round(single_s / index[1], 3),
         rows_per_s_single=round(rows / single_s), rows_per_s_1=round(rows / index[1]),
         rows_per_s_2=round(rows / index[2]), activations=sum(single.written.values()), features=args.features,
         d=args.d, cpus=os.cpu_count())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_s3() -> tuple[subprocess.Popen, dict]:
    """A moto S3 server in its own process on loopback, and the AWS_* variables that reach it."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    else:
        proc.kill()
        raise SystemExit("the moto S3 server did not start")
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_DEFAULT_REGION": "us-east-1"}
    return proc, env


def bench_s3(work: Path, args) -> None:
    base, target = build_tiny_pair(work / "pair", hidden_size=256, intermediate_size=768, num_layers=4)
    data = write_jsonl(tiny_conversations(400), work / "data.jsonl")
    proc, env = _start_s3()
    os.environ.update(env)
    try:
        fsspec.filesystem("s3").mkdir("bench")

        def run(out: str) -> float:
            cfg = HarvestConfig(base=str(base), target=str(target), out=out, device="cpu", layers="all",
                                plan=PlanConfig(data=str(data), max_tokens=args.harvest_tokens, seq_len=512),
                                batch_tokens=4096, block_rows=1024, chunk_rows=256)
            return harvest(cfg).seconds

        local, remote = [], []
        for i in range(args.repeats):
            local.append(run(str(work / f"local-{i}")))
            remote.append(run(f"s3://bench/run-{i}"))
        size = Store.open("s3://bench/run-0").bytes_on_disk()
    finally:
        proc.terminate()
        proc.wait()
    emit(figure="harvest_s3", ratio=round(sum(remote) / sum(local), 3), s3_s=[round(t, 2) for t in remote],
         local_s=[round(t, 2) for t in local], MB=round(size / 1e6, 1), tokens=args.harvest_tokens, d=256, layers=4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=32768, help="Rows per layer of the synthetic store.")
    p.add_argument("--d", type=int, default=1024, help="Row width of the synthetic store.")
    p.add_argument("--block-rows", type=int, default=2048)
    p.add_argument("--features", type=int, default=4096, help="Adapter features for the index figure.")
    p.add_argument("--harvest-tokens", type=int, default=20000)
    p.add_argument("--repeats", type=int, default=2, help="Alternating local/S3 harvests.")
    p.add_argument("--skip-s3", action="store_true")
    p.add_argument("--skip-dask", action="store_true")
    p.add_argument("--work", type=Path, default=None, help="Scratch folder (default: a temporary one).")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        emit(figure="setup", cpus=os.cpu_count(), threads=torch.get_num_threads())
        if not args.skip_dask:
            bench_dask(Path(tmp), args)
        if not args.skip_s3:
            bench_s3(Path(tmp), args)


if __name__ == "__main__":
    main()
