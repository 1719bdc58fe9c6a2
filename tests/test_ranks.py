"""Harvesting with several processes (torchrun ranks, gloo on CPU) against one process."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tca.cache.harvest import HarvestConfig, harvest
from tca.cache.plan import PlanConfig
from tca.cache.ranks import Ranks
from tca.cache.store import Store

SETTINGS = {"layers": "1,3", "block_rows": 64, "chunk_rows": 32, "batch_tokens": 160}


def harvest_argv(pair, data, out) -> list[str]:
    return ["harvest", "--base", str(pair[0]), "--target", str(pair[1]), "--data", str(data), "--out", str(out),
            "--layers", SETTINGS["layers"], "--block-rows", str(SETTINGS["block_rows"]),
            "--chunk-rows", str(SETTINGS["chunk_rows"]), "--batch-tokens", str(SETTINGS["batch_tokens"]),
            "--device", "cpu", "--json"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(args: list[str], world: int) -> list[subprocess.CompletedProcess]:
    """``tca ARGS`` as ``world`` processes with the variables torchrun would set."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tca.cli", "-q", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=os.environ | {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"},
        )
        for r in range(world)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def same_files(a: Path, b: Path) -> list[str]:
    """Relative paths of files that are missing from ``b`` or differ in bytes."""
    differ = []
    for path in sorted(p for p in a.rglob("*") if p.is_file()):
        other = b / path.relative_to(a)
        if not other.is_file() or not filecmp.cmp(path, other, shallow=False):
            differ.append(str(path.relative_to(a)))
    return differ + [str(p.relative_to(b)) for p in b.rglob("*") if p.is_file() and not (a / p.relative_to(b)).exists()]


@pytest.fixture(scope="module")
def single(tiny_pair, tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "store"
    harvest(HarvestConfig(base=str(tiny_pair[0]), target=str(tiny_pair[1]), out=str(out),
                          plan=PlanConfig(data=str(tiny_data)), device="cpu", **SETTINGS))
    return out


@pytest.mark.parametrize("n_blocks,world", [(17, 2), (1, 2), (5, 3), (64, 8), (3, 1)])
def test_rank_blocks_partition_the_store(n_blocks, world):
    shares = [Ranks(r, world).blocks(n_blocks) for r in range(world)]
    assert [b for share in shares for b in share] == list(range(n_blocks))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    for r, share in enumerate(shares):
        assert np.flatnonzero(~Ranks(r, world).others(n_blocks)).tolist() == list(share)


def test_two_ranks_write_the_single_process_store(tiny_pair, tiny_data, single, tmp_path):
    out = tmp_path / "store"
    procs = spawn_ranks(harvest_argv(tiny_pair, tiny_data, out), 2)
    assert all(p.returncode == 0 for p in procs), [p.stderr[-2000:] for p in procs]
    results = [json.loads(p.stdout) for p in procs]
    n_blocks = Store.open(str(single)).spec.n_blocks
    assert n_blocks > 4
    # Each rank wrote exactly its share, and the shares cover the store.
    assert [r["blocks_written"] for r in results] == [len(Ranks(r, 2).blocks(n_blocks)) for r in range(2)]
    # Every file, zarr.json and the Parquet tables included, is the one a single process writes.
    assert same_files(single, out) == []
    assert Store.open(str(out)).attrs["complete"] is True


def test_resume_per_rank_under_torchrun(tiny_pair, tiny_data, single, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(single, out)
    store = Store.open(str(out), mode="r+")
    n_blocks = store.spec.n_blocks
    # As if both ranks were killed part-way: some blocks of each rank's range never committed.
    lost = [1, 2, n_blocks - 2]
    for block in lost:
        (out / "_progress" / "committed" / "c" / str(block)).unlink()
        for layer in store.layers:
            for name in store.spec.array_names:
                (out / store.shard_path(layer, name, block).removeprefix(store.root + "/")).unlink()
    store.update_attrs(complete=False)
    logs = tmp_path / "logs"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "--redirects", "1", "--log-dir", str(logs), "-m", "tca.cli", "-q", *harvest_argv(tiny_pair, tiny_data, out),
         "--resume"],
        capture_output=True, text=True, timeout=300, env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    written = {}
    for log in logs.rglob("stdout.log"):
        result = json.loads(log.read_text())
        written[result["rank"]] = result["blocks_written"]
    mine = [set(Ranks(r, 2).blocks(n_blocks)) for r in range(2)]
    assert written == {r: len(mine[r] & set(lost)) for r in range(2)}
    assert all(written.values())  # both ranks had lost blocks to redo
    assert same_files(single, out) == []


def test_refusal_on_rank_0_stops_every_rank_without_damage(tiny_pair, tiny_data, single, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(single, out)
    procs = spawn_ranks(harvest_argv(tiny_pair, tiny_data, out), 2)
    assert [p.returncode for p in procs] == [2, 2]
    for p in procs:
        assert "already exists" in p.stderr and "Traceback" not in p.stderr
    assert same_files(single, out) == []
