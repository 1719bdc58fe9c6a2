"""tca harvest --layers-per-pass: the store of a harvest in passes equals the one-pass store byte for
byte, each pass holds only its own base MLPs, and an interrupted harvest in passes resumes where it
stopped, with the same or another number of layers per pass."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_harvest import raw_arrays
from test_ranks import same_files, spawn_ranks

import tca.cache.harvest as harvest_module
from tca.cache.harvest import HarvestConfig, harvest, layer_passes
from tca.cache.plan import PlanConfig
from tca.cache.store import Store
from tca.cli import main

SETTINGS = dict(layers="all", block_rows=64, chunk_rows=32, batch_tokens=160, store_y=True, device="cpu")
MAX_TOKENS = 500


class Interrupted(Exception):
    """Stands for a kill: raised by a writer thread after a number of block writes."""


def run(pair, data, out: Path, **overrides) -> Store:
    plan = PlanConfig(data=str(data), max_tokens=MAX_TOKENS, keep_frac=0.8)
    harvest(HarvestConfig(base=str(pair[0]), target=str(pair[1]), out=str(out), plan=plan, **SETTINGS | overrides))
    return Store.open(str(out))


def files(root: Path) -> dict[str, bytes]:
    """Every file of a store and its bytes, zarr.json's aside (their attributes are compared decoded)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "zarr.json"}


@pytest.fixture(scope="module")
def one_pass(tiny_pair, tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one-pass") / "store"
    run(tiny_pair, tiny_data, out)
    return out


def test_layer_passes():
    assert layer_passes([0, 1, 2, 3], None) == [[0, 1, 2, 3]]
    assert layer_passes([0, 1, 2, 3], 3) == [[0, 1, 2], [3]]
    assert layer_passes([1, 5, 9], 1) == [[1], [5], [9]]
    assert layer_passes([1, 5], 9) == [[1, 5]]


@pytest.mark.parametrize("per_pass", [1, 2, 3, 9])
def test_passes_store_what_one_pass_stores(tiny_pair, tiny_data, one_pass, tmp_path, monkeypatch, caplog, per_pass):
    read = []
    real = harvest_module.load_base_mlps
    monkeypatch.setattr(harvest_module, "load_base_mlps", lambda src, layers, device: read.append(layers) or
                        real(src, layers, device))
    with caplog.at_level(logging.INFO, logger="tca.cache.harvest"):
        store = run(tiny_pair, tiny_data, tmp_path / "s", layers_per_pass=per_pass)
    assert read == layer_passes([0, 1, 2, 3], per_pass)  # each pass reads its own base MLPs, once
    reference = Store.open(str(one_pass))
    assert store.complete and store.attrs["complete"]
    assert store.attrs == reference.attrs  # layers_per_pass is not part of the store's identity
    ours, theirs = raw_arrays(store), raw_arrays(reference)
    assert ours.keys() == theirs.keys()
    for key, values in theirs.items():
        assert np.array_equal(ours[key], values), key
    assert files(tmp_path / "s") == files(one_pass)  # the per-layer flags are gone once it is complete
    passes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pass ")]
    if per_pass == 1:
        assert [m.split(": harvesting")[0] for m in passes] == [f"pass {i + 1}/4: layer {i}" for i in range(4)]
    elif per_pass == 9:
        assert passes == []


def interrupt_after(monkeypatch, writes: int) -> list[tuple[str, int, tuple[int, ...]]]:
    """Make block writes raise ``Interrupted`` once ``writes`` of them are done; return the log of
    (kind, block, layers) of every write done."""
    done: list[tuple[str, int, tuple[int, ...]]] = []
    for kind in ("write_block", "write_layers"):
        real = getattr(Store, kind)

        def write(self, block, arrays, real=real, kind=kind):
            if len(done) >= writes:
                raise Interrupted
            real(self, block, arrays)
            done.append((kind, block, tuple(sorted(arrays))))

        monkeypatch.setattr(Store, kind, write)
    return done


@pytest.mark.parametrize("first, then", [(1, 1), (2, 1), (1, None), (None, 3)])
def test_an_interrupted_harvest_in_passes_resumes_where_it_stopped(tiny_pair, tiny_data, one_pass, tmp_path,
                                                                   monkeypatch, first, then):
    reference = Store.open(str(one_pass))
    n_blocks = reference.spec.n_blocks
    assert n_blocks >= 5
    out = tmp_path / "s"
    # stop in the second pass (in the only pass of a one-pass harvest), a few blocks in
    interrupt_after(monkeypatch, n_blocks + 3 if first else 3)
    with pytest.raises(Interrupted):
        run(tiny_pair, tiny_data, out, layers_per_pass=first)
    partial = Store.open(str(out))
    before, committed = partial.layers_written(), partial.committed()
    assert 0 < before.sum() < before.size
    # tca cache info shows each layer's progress, which the commits alone do not
    shown = CliRunner().invoke(main, ["cache", "info", str(out), "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["blocks_written"] == {str(layer): int(before[i].sum())
                                                          for i, layer in enumerate(partial.layers)}
    assert json.loads(shown.output)["blocks_committed"] == int(committed.sum())
    if first:
        assert before[:first].all()  # the first pass finished
        # only the last pass commits blocks: before it, readers see none
        assert committed.any() == (2 * first >= 4)
    monkeypatch.undo()
    writes = interrupt_after(monkeypatch, 10**6)
    final = run(tiny_pair, tiny_data, out, layers_per_pass=then, resume=True)
    # nothing written before is written again when the resume groups layers as the harvest did
    rewritten = {(layer, block) for _, block, layers in writes for layer in layers if before[layer, block]}
    if first == (then or 4):
        assert rewritten == set()
    written = {(layer, block) for _, block, layers in writes for layer in layers}
    assert written >= {(layer, block) for layer in range(4) for block in range(n_blocks) if not before[layer, block]}
    # each block is committed once, by the write that completes it
    commits = sorted(block for kind, block, _ in writes if kind == "write_block")
    assert commits == np.flatnonzero(~committed).tolist()
    ours, theirs = raw_arrays(final), raw_arrays(reference)
    for key, values in theirs.items():
        assert np.array_equal(ours[key], values), key
    assert files(out) == files(one_pass)


def test_two_ranks_in_passes_write_the_one_pass_store(tiny_pair, tiny_data, one_pass, tmp_path):
    """Each rank runs every pass over its own blocks; whichever finishes last removes the layer flags."""
    out = tmp_path / "store"
    argv = ["harvest", "--base", str(tiny_pair[0]), "--target", str(tiny_pair[1]), "--data", str(tiny_data),
            "--out", str(out), "--layers", "all", "--block-rows", "64", "--chunk-rows", "32", "--batch-tokens", "160",
            "--store-y", "--device", "cpu", "--max-tokens", str(MAX_TOKENS), "--keep-frac", "0.8",
            "--layers-per-pass", "3", "--json"]
    procs = spawn_ranks(argv, 2)
    assert all(p.returncode == 0 for p in procs), [p.stderr[-2000:] for p in procs]
    assert same_files(one_pass, out) == []
