"""A harvest at the paper's shapes on CPU: its peak resident memory against the memory plan it logs.

The pair has Qwen2.5-7B's shapes (d 3584, intermediate 18944, 28 / 4 heads, vocab 152064, bf16,
four safetensors shards with an index) but two layers: 3.1 GB per model on disk.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pairs = pytest.importorskip("tca.toy.pairs", reason="the pair builder (toy/pairs.py) has not landed")
from tca.toy.tiny import tiny_conversations, tiny_tokenizer, write_jsonl  # noqa: E402  (lands with the builder)

RSS_TOLERANCE = 0.15
"""Allowed |measured - planned| / planned, the measured being peak RSS less the RSS after imports."""

# Runs in a fresh interpreter, so the peak (VmHWM) is this harvest's alone; the plan is the one the
# harvest itself checks before loading anything.
HARVEST_SCRIPT = """
import json, sys
import pyarrow.parquet, tokenizers, transformers.models.qwen2.modeling_qwen2, zarr  # what the harvest imports late
import tca.cache.harvest as h
from tca.cache.plan import PlanConfig

def status(key):
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024

after_imports = status("VmRSS")
plans = []
check = h.check_memory
h.check_memory = lambda plan: plans.append(plan) or check(plan)
base, target, data, out = sys.argv[1:]
h.harvest(h.HarvestConfig(base=base, target=target, out=out, plan=PlanConfig(data=data, max_tokens=256),
                          batch_tokens=128, device="cpu"))
print(json.dumps({"after_imports": after_imports, "peak": status("VmHWM"), "plan": plans[0].need()["cpu"],
                  "table": plans[0].table()}))
"""


@pytest.fixture(scope="module")
def pair_7b_shape(tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("pair-7b-shape")
    t0 = time.perf_counter()
    base, target = pairs.build_random_pair(out, dataclasses.replace(pairs.QWEN2_7B, layers=2), tiny_tokenizer())
    disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"built the 2-layer 7B-shaped pair in {time.perf_counter() - t0:.0f} s, {disk / 1e9:.2f} GB on disk")
    return base, target


@pytest.mark.slow
def test_harvest_peak_memory_matches_the_plan(pair_7b_shape, tmp_path):
    data = write_jsonl(tiny_conversations(24), tmp_path / "data.jsonl")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", HARVEST_SCRIPT, *map(str, pair_7b_shape), str(data), str(tmp_path / "store")],
                         capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    used = got["peak"] - got["after_imports"]
    print(f"harvest {time.perf_counter() - t0:.0f} s; peak RSS less RSS after imports {used / 1e9:.2f} GB, "
          f"planned {got['plan'] / 1e9:.2f} GB\n{got['table']}")
    assert abs(used - got["plan"]) <= RSS_TOLERANCE * got["plan"]
