"""The whole path at the paper's shapes on CPU: harvest -> train -> index -> eval, each stage's peak
resident memory against the memory plan it prints.

The pair has Qwen2.5-7B's shapes (d 3584, intermediate 18944, 28 / 4 heads, vocab 152064, bf16,
safetensors shards with an index) but two layers: 3.1 GB per model, 6.2 GB on disk for the pair,
built once per session and removed after it. The builder's own peak is about 9.5 GB of RAM
(the float32 embedding, its noise and its sum are alive at once), so CI needs about 7 GB of free
disk and 10 GB of RAM for this test.

Every stage runs in a fresh interpreter (this file run as a script), so the peak (VmHWM) is that
stage's alone; what it holds after importing everything the stages use is subtracted. The plan
held against it is the one the stage itself logs before any weight loads (harvest, eval), or, for
the index, the plan of its logit lens computed and logged by the same function
(``tca.cache.memory.memory_plan``) with the rows the lens scores at once. Training has no plan:
its peak is printed, not checked.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pairs = pytest.importorskip("tca.toy.pairs", reason="the pair builder (toy/pairs.py) has not landed")
from tca.toy.tiny import tiny_conversations, tiny_tokenizer, write_jsonl

RSS_TOLERANCE = 0.15
"""Allowed |measured - planned| / planned, the measured being peak RSS less the RSS after imports."""
FEATURES = 512
"""Adapter width: the logit lens scores every decoder row against the 152064-token unembedding
(2 x 0.56 TFLOP at this width), the costliest step of the test on CPU."""
HARVEST_TOKENS = 256
TRAIN_STEPS, TRAIN_BATCH = 4, 32
EVAL = {"max_tokens": 128, "seq_len": 128, "batch": 4, "generate": 2, "max_new_tokens": 8, "gen_batch": 2}
"""Teacher-forced on up to 4 documents at once, and two greedy responses in each mode."""
EVAL_DTYPE = "bfloat16"
"""The checkpoint's dtype, as ``auto`` picks on CUDA, where the target is mapped; on CPU ``auto`` is
float32, whose 6.2 GB copy of the target would double the test's memory."""
STAGE_TIMEOUT_S = 600


@pytest.fixture(scope="session")
def pair_7b_shape(tmp_path_factory):
    out = tmp_path_factory.mktemp("pair-7b-shape")
    t0 = time.perf_counter()
    base, target = pairs.build_random_pair(out, dataclasses.replace(pairs.QWEN2_7B, layers=2), tiny_tokenizer())
    disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"built the 2-layer 7B-shaped pair in {time.perf_counter() - t0:.0f} s, {disk / 1e9:.2f} GB on disk")
    yield base, target
    shutil.rmtree(out, ignore_errors=True)  # pytest keeps its last three temporary folders: 19 GB


def run_stage(stage: str, **args) -> dict:
    """Run one stage in a fresh interpreter; its memory, plan and timings."""
    res = subprocess.run([sys.executable, __file__, stage, json.dumps(args, default=str)], capture_output=True,
                         text=True, timeout=STAGE_TIMEOUT_S, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
                         check=False)
    assert res.returncode == 0, f"{stage} failed:\n{res.stderr[-3000:]}"
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_each_stage_peak_memory_matches_its_plan(pair_7b_shape, tmp_path):
    base, target = map(str, pair_7b_shape)
    data = str(write_jsonl(tiny_conversations(24), tmp_path / "data.jsonl"))
    store, run, index = tmp_path / "store", tmp_path / "run", tmp_path / "index.duckdb"
    got = {
        "harvest": run_stage("harvest", base=base, target=target, data=data, out=store),
        "train": run_stage("train", store=store, out=run),
        "index": run_stage("index", store=store, adapters=run, target=target, out=index),
        "eval": run_stage("eval", adapters=run, base=base, target=target, data=data),
    }
    off = {}
    for stage, g in got.items():
        used = g["peak"] - g["after_imports"]
        line = f"{stage:<8} {g['seconds']:6.1f} s wall {g['cpu_s']:6.1f} s CPU   peak RSS less RSS after imports " \
               f"{used / 1e9:5.2f} GB"
        if g["plan"] is not None:
            line += f", planned {g['plan'] / 1e9:5.2f} GB ({used / g['plan'] - 1:+.1%})"
            if abs(used - g["plan"]) > RSS_TOLERANCE * g["plan"]:
                off[stage] = g["table"]
        print(line)
    for stage, table in off.items():
        print(table)
    assert not off, f"peak RSS off the plan by more than {RSS_TOLERANCE:.0%} in {sorted(off)}"


# ---- one stage, in its own process (``python tests/test_7b_shape.py STAGE ARGS``) ------------------


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def _stage(stage: str, args: dict) -> dict:
    # everything the stages import late, so that the RSS after imports holds it
    import duckdb  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import tokenizers  # noqa: F401
    import torch
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401
    import zarr  # noqa: F401

    import tca.adapted.splice
    import tca.cache.harvest
    from tca.adapted.evaluate import EvalConfig, evaluate
    from tca.cache.memory import Workload, check_memory, memory_plan, read_config
    from tca.cache.plan import PlanConfig
    from tca.query.index import IndexConfig, build_index
    from tca.query.lens import LogitLens
    from tca.train.trainer import TrainConfig, train

    after_imports = _status("VmRSS")
    plans = []

    def recording(check):
        return lambda plan: plans.append(plan) or check(plan)

    # the commands' own check, which logs the plan before any weight loads
    tca.cache.harvest.check_memory = recording(tca.cache.harvest.check_memory)
    tca.adapted.splice.check_memory = recording(tca.adapted.splice.check_memory)
    t0, cpu0 = time.perf_counter(), time.process_time()
    if stage == "harvest":
        tca.cache.harvest.harvest(tca.cache.harvest.HarvestConfig(
            base=args["base"], target=args["target"], out=args["out"], device="cpu", batch_tokens=128,
            plan=PlanConfig(data=args["data"], max_tokens=HARVEST_TOKENS)))
    elif stage == "train":
        train(TrainConfig(store=args["store"], out=args["out"], features=FEATURES, batch=TRAIN_BATCH,
                          tokens=TRAIN_STEPS * TRAIN_BATCH, holdout_frac=0.25, eval_rows=TRAIN_BATCH,
                          shuffle_rows=4 * TRAIN_BATCH, checkpoint_every=10**6, device="cpu"))
    elif stage == "index":
        # build_index reads the lens's two tensors without a plan of its own: its plan, as
        # bench/memory_plan.py states it, with the rows the lens scores at once here
        lens_rows = inspect.signature(LogitLens.top_bottom).parameters["batch"].default  # rows scored at once
        work = Workload("index", tokens=min(FEATURES, lens_rows))
        recording(check_memory)(memory_plan(work, read_config(args["target"]), None, torch.float32,
                                            torch.device("cpu")))
        build_index(IndexConfig(store=args["store"], adapters=[f"main={args['adapters']}"], out=Path(args["out"]),
                                target=args["target"]))
    elif stage == "eval":
        evaluate(EvalConfig(adapters=args["adapters"], base=args["base"], target=args["target"], data=args["data"],
                            dtype=EVAL_DTYPE, device="cpu", **EVAL))
    else:
        raise SystemExit(f"unknown stage {stage!r}")
    return {"after_imports": after_imports, "peak": _status("VmHWM"), "seconds": time.perf_counter() - t0,
            "cpu_s": time.process_time() - cpu0,
            "plan": plans[0].need()["cpu"] if plans else None, "table": plans[0].table() if plans else None}


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    print(json.dumps(_stage(sys.argv[1], json.loads(sys.argv[2]))))
