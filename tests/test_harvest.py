"""The harvester against independent recomputations, resume after SIGKILL, verify, bad input."""

from __future__ import annotations

import copy
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

import tca.cache.models as models
from tca.cache.harvest import HarvestConfig, harvest, plan_batches
from tca.cache.plan import PlanConfig, build_plan
from tca.cache.store import Store
from tca.cli import main
from tca.toy.tiny import build_tiny_pair, tiny_conversations, write_jsonl

# Relative L2 error allowed per row: the harvest runs documents padded in batches, the
# reference runs each alone, so results differ by a few roundings of the dtype.
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def run(pair, data, out, **overrides) -> Store:
    plan_keys = {"keep_frac", "skip_sinks", "seq_len", "max_tokens", "seed"}
    plan = PlanConfig(data=str(data), **{k: v for k, v in overrides.items() if k in plan_keys})
    settings = {"layers": "1,3", "block_rows": 64, "chunk_rows": 32, "batch_tokens": 160}
    settings |= {k: v for k, v in overrides.items() if k not in plan_keys}
    harvest(HarvestConfig(base=str(pair[0]), target=str(pair[1]), out=str(out), plan=plan, **settings))
    return Store.open(str(out))


def raw_arrays(store: Store) -> dict[str, np.ndarray]:
    out = {f"layers/{l}/{n}": store.array(l, n)[:] for l in store.layers for n in store.spec.array_names}
    return out | {"rows/token": store.row_tokens(), "committed": store.committed()}


def reference(pair, dtype, token_ids: list[int], layers: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """x, delta and y of one document run alone through the full models with transformers."""
    target = AutoModelForCausalLM.from_pretrained(pair[1], dtype=dtype).eval()
    base = AutoModelForCausalLM.from_pretrained(pair[0], dtype=dtype).eval()
    captured = {}
    for layer in layers:
        norm = target.model.layers[layer].post_attention_layernorm
        norm.register_forward_hook(lambda m, i, o, layer=layer: captured.__setitem__(layer, o[0]))
    with torch.no_grad():
        target(torch.tensor([token_ids]))
        out = {}
        for layer in layers:
            x = captured[layer]
            y = copy.deepcopy(target.model.layers[layer].mlp).float()(x.float())
            delta = y - copy.deepcopy(base.model.layers[layer].mlp).float()(x.float())
            out[layer] = {"x": x, "delta": delta, "y": y}
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.float() - b.float()).norm(dim=-1) / b.float().norm(dim=-1)).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_equal_an_independent_recomputation(tiny_pair, bf16_pair, tiny_data, tmp_path, dtype):
    pair = tiny_pair if dtype == torch.float32 else bf16_pair
    store = run(pair, tiny_data, tmp_path / "s", store_y=True, keep_frac=0.7, seed=1)
    assert store.dtype == dtype and store.complete
    tok = AutoTokenizer.from_pretrained(pair[1])
    plan = build_plan(PlanConfig(data=str(tiny_data), keep_frac=0.7, seed=1), tok)
    assert any(b.doc1 - b.doc0 > 1 for b in plan_batches(plan, 160)), "the test needs padded multi-document batches"
    tokens = store.table("tokens").to_pydict()
    for doc in (0, 7, 23):
        in_doc = [t for t in range(len(tokens["doc"])) if tokens["doc"][t] == doc]
        ids = [tokens["token_id"][t] for t in in_doc]
        rows = [tokens["row"][t] for t in in_doc if tokens["row"][t] >= 0]
        positions = [tokens["pos"][t] for t in in_doc if tokens["row"][t] >= 0]
        assert np.array_equal(store.row_tokens()[rows], np.asarray(in_doc)[positions])
        ref = reference(pair, dtype, ids, [1, 3])
        for layer in (1, 3):
            for name in ("x", "delta", "y"):
                stored = torch.stack([store.read(layer, name, r, r + 1)[0] for r in rows])
                assert stored.dtype == dtype
                assert rel_err(stored, ref[layer][name][positions]) < REL_TOL[dtype], (doc, layer, name)
    # delta is far from zero, so the comparison above is not vacuous.
    assert store.read(1, "delta", 0, 50, torch.float32).norm() > 0.1 * store.read(1, "y", 0, 50, torch.float32).norm()


def test_only_selected_base_mlp_tensors_are_read(tiny_pair, tiny_data, tmp_path, monkeypatch):
    read: list[str] = []
    real = models.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.f = real(*args, **kwargs)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.f.get_tensor(key)

    monkeypatch.setattr(models, "safe_open", Recording)
    run(tiny_pair, tiny_data, tmp_path / "s", layers="2", max_tokens=100)
    assert sorted(read) == sorted(f"model.layers.2.mlp.{p}.weight" for p in ("down_proj", "gate_proj", "up_proj"))


def test_sharded_checkpoint_with_index(tiny_pair, tiny_data, tmp_path):
    base = tmp_path / "base-sharded"
    AutoModelForCausalLM.from_pretrained(tiny_pair[0]).save_pretrained(base, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(tiny_pair[0]).save_pretrained(base)
    assert (base / "model.safetensors.index.json").exists()
    a = run(tiny_pair, tiny_data, tmp_path / "a", max_tokens=200)
    b = run((base, tiny_pair[1]), tiny_data, tmp_path / "b", max_tokens=200)
    assert torch.equal(a.read(3, "delta", 0, a.n_rows), b.read(3, "delta", 0, b.n_rows))


def harvest_argv(pair, data, out) -> list[str]:
    return [
        sys.executable, "-m", "tca.cli", "harvest", "--base", str(pair[0]), "--target", str(pair[1]),
        "--data", str(data), "--out", str(out), "--layers", "0,2", "--batch-tokens", "60",
        "--block-rows", "32", "--chunk-rows", "16", "--store-y", "--keep-frac", "0.8", "--skip-sinks",
    ]


def committed_files(out: Path) -> int:
    d = out / "_progress" / "committed" / "c"
    return len(os.listdir(d)) if d.exists() else 0


def test_sigkill_at_random_points_then_resume_is_identical(tiny_pair, tmp_path):
    data = write_jsonl(tiny_conversations(150, seed=5), tmp_path / "d.jsonl")
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(harvest_argv(tiny_pair, data, ref_out), check=True, env=env, capture_output=True)
    reference_arrays = raw_arrays(Store.open(str(ref_out)))
    n_blocks = len(reference_arrays["committed"])
    rng = random.Random(0)
    kills = 0
    # Kill once at a random instant of start-up or store creation, then each time the harvest
    # passes a random number of committed blocks (plus a random few milliseconds, so the kill
    # lands inside the next block's writes). Progress, not wall time, places the kills, so a
    # loaded machine moves them no closer to the end. After each kill every committed block
    # must already be whole.
    targets = [0] + sorted(rng.sample(range(1, n_blocks - 1), 3))
    for target in targets:
        proc = subprocess.Popen(harvest_argv(tiny_pair, data, out) + ["--resume"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + (rng.uniform(0.2, 3.0) if target == 0 else 120)
        while proc.poll() is None and time.monotonic() < deadline:
            if committed_files(out) > target:
                time.sleep(rng.uniform(0.0, 0.05))
                break
            time.sleep(0.005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        if (out / "zarr.json").exists() and Store.open(str(out)).setup_complete:
            partial = Store.open(str(out))
            for block in np.flatnonzero(partial.committed()):
                start, stop = partial.block_range(block)
                for key in ("layers/0/x", "layers/2/delta", "layers/2/y"):
                    layer, name = int(key.split("/")[1]), key.split("/")[2]
                    assert np.array_equal(partial.array(layer, name)[start:stop], reference_arrays[key][start:stop])
    assert kills >= 3
    done = subprocess.run(harvest_argv(tiny_pair, data, out) + ["--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    final = raw_arrays(Store.open(str(out)))
    assert not list(out.rglob("*.partial"))  # whatever the kills left half-written is gone
    assert final.keys() == reference_arrays.keys() and n_blocks > 5
    for key, values in reference_arrays.items():
        assert np.array_equal(final[key], values), key
    ref_tokens, tokens = Store.open(str(ref_out)).table("tokens"), Store.open(str(out)).table("tokens")
    assert ref_tokens.equals(tokens)


def test_verify_finds_damage_and_wrong_values(tiny_pair, tiny_data, tmp_path):
    out = tmp_path / "s"
    run(tiny_pair, tiny_data, out, block_rows=128, chunk_rows=64)
    cli = CliRunner()
    ok = cli.invoke(main, ["cache", "verify", str(out), "--recompute", "20", "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["rows_recomputed"] == 20
    # The wrong base model: delta cannot match, and verify says so.
    wrong = cli.invoke(main, ["cache", "verify", str(out), "--recompute", "5", "--base", str(tiny_pair[1])])
    assert wrong.exit_code == 1 and "delta" in wrong.output and "differ" in wrong.output
    store = Store.open(str(out))
    flipped, cut, gone = (Path(store.shard_path(*where)) for where in ((1, "x", 0), (3, "delta", 2), (1, "delta", 4)))
    data = bytearray(flipped.read_bytes())
    data[100] ^= 0x10
    flipped.write_bytes(bytes(data))
    cut.write_bytes(cut.read_bytes()[:-200])
    gone.unlink()
    bad = cli.invoke(main, ["cache", "verify", str(out)])
    assert bad.exit_code == 1
    assert "layers/1/x rows 0:128: corrupted" in bad.output
    assert "layers/3/delta rows 256:384: corrupted" in bad.output
    assert "layers/1/delta rows 512:640: the shard file is missing" in bad.output
    info = cli.invoke(main, ["cache", "info", str(out), "--json"])
    assert info.exit_code == 0
    summary = json.loads(info.stdout)
    assert summary["rows"] == store.n_rows == summary["tokens"] and summary["docs"] == 24 and summary["complete"]


def test_temporary_files_of_killed_writes_are_reported_then_removed_on_resume(tiny_pair, tiny_data, tmp_path):
    out = tmp_path / "s"
    store = run(tiny_pair, tiny_data, out, block_rows=128, chunk_rows=64)
    shard = Path(store.shard_path(1, "x", 0))
    # what zarr's local store leaves when a process dies between writing and renaming a chunk
    leftover = shard.with_name(shard.name + ".0123abcd.partial")
    leftover.write_bytes(b"half a chunk")
    before = raw_arrays(store)
    report = CliRunner().invoke(main, ["cache", "verify", str(out)])
    assert report.exit_code == 1 and "1 temporary files of interrupted chunk writes" in report.output
    run(tiny_pair, tiny_data, out, block_rows=128, chunk_rows=64, resume=True)
    assert not leftover.exists()
    assert CliRunner().invoke(main, ["cache", "verify", str(out)]).exit_code == 0
    after = raw_arrays(Store.open(str(out)))
    assert all(np.array_equal(after[k], v) for k, v in before.items())


@pytest.fixture(scope="module")
def odd_pairs(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("odd-pairs")
    narrow = build_tiny_pair(out / "narrow", hidden_size=32, intermediate_size=64)[0]
    shallow = build_tiny_pair(out / "shallow", num_layers=3)[0]
    return {"narrow": narrow, "shallow": shallow}


def unknown_layout(src: Path, out: Path) -> Path:
    shutil.copytree(src, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | {"model_type": "gpt2"}))
    return out


@pytest.mark.parametrize(
    "case, message",
    [
        ("narrow", "different hidden sizes (32 vs 64)"),
        ("shallow", "different layer counts (3 vs 4)"),
        ("layout", "MLP layout tca does not know"),
        ("layer", "layer 9 is out of range; the models have layers 0 to 3"),
        ("empty", "holds no documents"),
        ("malformed", "line 2 is not valid JSON"),
    ],
)
def test_bad_input_gets_one_sentence(tiny_pair, tiny_data, odd_pairs, tmp_path, case, message):
    base, target, data, layers = tiny_pair[0], tiny_pair[1], tiny_data, "all"
    if case in odd_pairs:
        base = odd_pairs[case]
    elif case == "layout":
        base = unknown_layout(tiny_pair[0], tmp_path / "gpt2-like")
    elif case == "layer":
        layers = "1,9"
    elif case == "empty":
        data = tmp_path / "empty.jsonl"
        data.write_text("\n")
    elif case == "malformed":
        data = tmp_path / "bad.jsonl"
        data.write_text('{"text": "fine"}\n{"text": oops}\n')
    out = tmp_path / "s"
    result = CliRunner().invoke(main, ["harvest", "--base", str(base), "--target", str(target), "--data", str(data),
                                       "--out", str(out), "--layers", layers])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_existing_store_other_version_and_other_config_are_refused_undamaged(tiny_pair, tiny_data, tmp_path):
    out = tmp_path / "s"
    before = raw_arrays(run(tiny_pair, tiny_data, out, max_tokens=300))
    argv = ["harvest", "--base", str(tiny_pair[0]), "--target", str(tiny_pair[1]), "--data", str(tiny_data),
            "--out", str(out), "--layers", "1,3", "--max-tokens", "300", "--block-rows", "64", "--chunk-rows", "32",
            "--batch-tokens", "160"]
    cli = CliRunner()
    again = cli.invoke(main, argv)
    assert again.exit_code == 2 and "already exists; pass --resume" in again.output
    other = cli.invoke(main, argv + ["--resume", "--keep-frac", "0.5"])
    assert other.exit_code == 2 and "cannot resume" in other.output and "keep_frac" in other.output
    same = cli.invoke(main, argv + ["--resume"])
    assert same.exit_code == 0, same.output
    after = raw_arrays(Store.open(str(out)))
    assert all(np.array_equal(after[k], v) for k, v in before.items())
    meta_path = out / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["format_version"] = 0
    meta_path.write_text(json.dumps(meta))
    for args in (argv + ["--resume"], ["cache", "info", str(out)]):
        old = cli.invoke(main, args)
        assert old.exit_code == 2 and "has store format version 0" in old.output


def test_full_disk_stops_cleanly_and_resumes(tiny_pair, tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "s"
    reference = raw_arrays(run(tiny_pair, tiny_data, tmp_path / "ref"))
    real = Store.write_block
    calls = []

    def fill_up(self, block, arrays):
        calls.append(block)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, block, arrays)

    monkeypatch.setattr(Store, "write_block", fill_up)
    argv = ["harvest", "--base", str(tiny_pair[0]), "--target", str(tiny_pair[1]), "--data", str(tiny_data),
            "--out", str(out), "--layers", "1,3", "--block-rows", "64", "--chunk-rows", "32", "--batch-tokens", "160"]
    full = CliRunner().invoke(main, argv)
    assert full.exit_code == 2 and "disk holding" in full.output and "--resume" in full.output
    partial = Store.open(str(out))
    assert 0 < partial.committed().sum() < len(partial.committed())
    monkeypatch.setattr(Store, "write_block", real)
    resumed = CliRunner().invoke(main, argv + ["--resume"])
    assert resumed.exit_code == 0, resumed.output
    final = raw_arrays(Store.open(str(out)))
    assert all(np.array_equal(final[k], v) for k, v in reference.items())
