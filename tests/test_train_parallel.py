"""``tca train`` by two processes (as torchrun starts them) writes the files of a serial run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tca import TcaError
from tca.cache.ranks import Ranks
from tca.toy.synthetic import SyntheticSpec, make_synthetic_store
from tca.train.trainer import TrainConfig, Trainer

SPEC = SyntheticSpec(d_model=16, layers=(0, 2), n_docs=48, doc_len=32, n_true=8, block_rows=256, chunk_rows=64,
                     store_y=True, sink_scale=20.0)
# a sweep puts members of one layer on different processes; outliers at 1.3 x the median norm
# differ between layers, so a process must read the other layers to drop the rows a serial run drops
ARGS = ["--features", "24", "--batch", "128", "--epochs", "2", "--holdout-frac", "0.2", "--device", "cpu",
        "--l1", "0.05,0.2", "--drop-outliers", "1.3"]


def _train(store: str, out, world_size: int) -> None:
    """Run ``tca train`` as ``world_size`` processes with the variables torchrun sets."""
    # one thread everywhere: a matmul's rounding may depend on how many threads split it
    env = os.environ | {"OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517"}
    cmd = [sys.executable, "-m", "tca.cli", "train", "--store", store, "--out", str(out), *ARGS]
    procs = [
        subprocess.Popen(cmd, env=env | {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world_size)},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(world_size)
    ]
    for p in procs:
        output, _ = p.communicate(timeout=120)
        assert p.returncode == 0, output


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("syn") / "store")
    make_synthetic_store(url, SPEC)
    return url


def test_two_processes_write_the_files_of_a_serial_run(store, tmp_path):
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    _train(store, serial, 1)
    _train(store, parallel, 2)

    assert not (parallel / "ranks").exists()
    for member in ("l1-0.05", "l1-0.2"):
        a, b = load_file(str(serial / member / "adapters.safetensors")), load_file(str(parallel / member / "adapters.safetensors"))
        assert set(a) == set(b) and {k.split(".")[1] for k in a} == {"0", "2"}
        for name in a:
            assert torch.equal(a[name], b[name]), (member, name)
        assert (serial / member / "adapters.json").read_text() == (parallel / member / "adapters.json").read_text()
    assert (serial / "metrics.jsonl").read_text() == (parallel / "metrics.jsonl").read_text()

    s, p = json.loads((serial / "summary.json").read_text()), json.loads((parallel / "summary.json").read_text())
    assert (s["steps"], s["tokens_seen"]) == (p["steps"], p["tokens_seen"])
    for member in s["members"]:
        assert s["members"][member]["layers"] == p["members"][member]["layers"]
        assert list(p["members"][member]["layers"]) == ["0", "2"]
        assert p["members"][member]["path"] == str(parallel / member)

    # the merged checkpoint is the serial one, up to its run directory
    state_s = json.loads((serial / "checkpoint" / "state.json").read_text())
    state_p = json.loads((parallel / "checkpoint" / "state.json").read_text())
    assert state_p["config"]["out"] == str(parallel)
    state_p["config"]["out"] = state_s["config"]["out"]
    assert state_s == state_p
    ts, tp = (load_file(str(d / "checkpoint" / "state.safetensors")) for d in (serial, parallel))
    assert set(ts) == set(tp)
    # training draws nothing from the global generator, whose state an imported library seeds
    # afresh in every process, so two serial runs differ there too
    for k in set(ts) - {"rng.torch"}:
        assert torch.equal(ts[k], tp[k]), k


def test_more_processes_than_adapters_is_refused(store, tmp_path):
    cfg = TrainConfig(store=store, out=str(tmp_path / "run"), features=8, batch=128, holdout_frac=0.2, layers="0")
    with pytest.raises(TcaError, match="WORLD_SIZE=2 exceeds the 1 adapters"):
        Trainer(cfg, Ranks(rank=1, world_size=2))
