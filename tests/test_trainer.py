"""The loader, the trainer, resuming, sweeps and the train/plot commands on synthetic stores."""

from __future__ import annotations

import functools
import json
import logging
import math

import duckdb
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from tca.cache.store import Store
from tca.cli import main
from tca.kernels import DensityGate, sparse_adapter
from tca.query.index import adapter_layers as load_index_adapters
from tca.query.index import index_adapters
from tca.toy.synthetic import SyntheticSpec, make_synthetic_store
from tca.train import adapter as adapter_module
from tca.train.checkpoint import load_adapters
from tca.train.loader import ActivationLoader, LoaderConfig
from tca.train.trainer import TrainConfig, Trainer, train

SPEC = SyntheticSpec(d_model=16, layers=(0, 2), n_docs=48, doc_len=32, n_true=8, block_rows=256, chunk_rows=64, store_y=True)


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("syn") / "store")
    make_synthetic_store(url, SPEC)
    return url


def _cfg(store_url, out, **kw) -> TrainConfig:
    values = dict(store=store_url, out=str(out), features=24, batch=128, epochs=1.0, shuffle_rows=256,
                  holdout_frac=0.2, log_every=1, checkpoint_every=1000, read_threads=2)
    return TrainConfig(**(values | kw))


def _np_holdout(store: Store, frac: float, seed: int) -> np.ndarray:
    from tca.train.loader import holdout_docs

    doc = store.table("tokens").column("doc").to_numpy()  # token i is row i in these stores
    return holdout_docs(doc, frac, seed)


# ---- loader --------------------------------------------------------------------------------------


def test_loader_splits_by_document_and_returns_the_stored_rows(store_url):
    store = Store.open(store_url)
    loader = ActivationLoader(store, [0, 2], LoaderConfig(batch=100, seed=3, holdout_frac=0.25, shuffle_rows=192, eval_rows=10**6))
    try:
        doc = store.table("tokens").column("doc").to_numpy()
        held = _np_holdout(store, 0.25, 3)
        assert 0 < held.sum() < len(held)
        # whole documents go one way
        for d in np.unique(doc):
            assert len(set(held[doc == d])) == 1
        seen = []
        for batch in loader.epoch(0):
            assert len(batch.rows) == 100
            assert not held[batch.rows].any()
            for layer in (0, 2):
                x = store.read(layer, "x", 0, store.n_rows, torch.float32).numpy()
                np.testing.assert_array_equal(batch.x[layer].numpy(), x[batch.rows])
            seen.append(batch.rows)
        seen = np.concatenate(seen)
        assert len(seen) == len(np.unique(seen)) == (~held).sum() // 100 * 100
        assert not np.all(np.diff(seen) == 1)  # shuffled
        evaluated = np.concatenate([b.rows for b in loader.eval_batches()])
        assert sorted(evaluated) == list(np.flatnonzero(held))
        # the order is a function of the seed and the batch index only
        third = next(iter(loader.epoch(0, start_batch=2)))
        assert np.array_equal(third.rows, seen[200:300])
        assert loader.stats.as_dict()["docs_per_batch"] > 1
    finally:
        loader.close()


def test_drop_outliers_against_numpy(tmp_path):
    url = str(tmp_path / "sinks")
    store = make_synthetic_store(url, SyntheticSpec(d_model=8, layers=(0, 1), n_docs=24, doc_len=32, sink_scale=30, chunk_rows=64, block_rows=256))
    z = 3.0
    norms = {layer: np.linalg.norm(store.read(layer, "x", 0, store.n_rows, torch.float32).numpy(), axis=1) for layer in (0, 1)}
    keep = np.ones(store.n_rows, dtype=bool)
    for n in norms.values():  # 12 chunks: the loader's median sample is every row
        keep &= n <= z * np.median(n)
    assert 0 < (~keep).sum() < 40
    loader = ActivationLoader(store, [0, 1], LoaderConfig(batch=64, holdout_frac=0.2, drop_outliers=z, shuffle_rows=128))
    try:
        for layer, n in norms.items():
            assert loader.medians[layer] == pytest.approx(np.median(n), rel=1e-5)
        planned = np.concatenate([rows for _, rows in loader.windows(0)])[: loader.batches_per_epoch * 64]
        got = np.concatenate([b.rows for b in loader.epoch(0)])
        assert np.array_equal(got, planned[keep[planned]])
        assert loader.stats.dropped == (~keep[planned]).sum() > 0
    finally:
        loader.close()


# ---- training ------------------------------------------------------------------------------------


def test_relu_adapter_learns_the_known_sparse_function(store_url, tmp_path):
    summary = train(_cfg(store_url, tmp_path / "run", epochs=60, lr=3e-3, l1=[0.1], log_every=50, layers="0"))
    layer = summary["members"]["l1-0.1"]["layers"]["0"]
    assert layer["fve"] > 0.85 and layer["l0"] < 10
    # summary figures agree with a recomputation from the saved adapters on the held-out rows
    store = Store.open(store_url)
    held = np.flatnonzero(_np_holdout(store, 0.2, 0))
    adapter = load_adapters(tmp_path / "run").adapters[0]
    x = store.read(0, "x", 0, store.n_rows, torch.float32)[held]
    delta = store.read(0, "delta", 0, store.n_rows, torch.float32)[held].double().numpy()
    y = store.read(0, "y", 0, store.n_rows, torch.float32)[held].double().numpy()
    with torch.no_grad():
        out = adapter(x)
    pred = out.pred.double().numpy()
    err = ((pred - delta) ** 2).sum()
    assert layer["fve"] == pytest.approx(1 - err / ((delta - delta.mean(0)) ** 2).sum(), rel=1e-6)
    assert layer["nmse"] == pytest.approx(err / (delta**2).sum(), rel=1e-6)
    assert layer["nmse_y"] == pytest.approx(err / (y**2).sum(), rel=1e-6)
    assert layer["nmse_y_hybrid"] == pytest.approx((delta**2).sum() / (y**2).sum(), rel=1e-6)
    assert layer["l0"] == pytest.approx((out.acts != 0).sum(1).double().mean().item())


def test_an_unchanged_layer_is_a_result_with_no_activity(tmp_path, caplog):
    url = str(tmp_path / "store")
    make_synthetic_store(url, SyntheticSpec(**{**SPEC.__dict__, "unchanged": (0,)}))
    with caplog.at_level(logging.INFO, logger="tca.train.trainer"):
        summary = train(_cfg(url, tmp_path / "run", epochs=2.0, log_every=5))
    assert "layer 0: no difference" in caplog.text and "layer 2: no difference" not in caplog.text
    layers = summary["members"]["l1-0.5"]["layers"]
    assert layers["0"]["unchanged"] and "unchanged" not in layers["2"]
    assert (layers["0"]["fve"], layers["0"]["nmse"], layers["0"]["l0"]) == (1.0, 0.0, 0.0)
    assert (layers["0"]["fve_y"], layers["0"]["nmse_y"]) == (1.0, 0.0)
    assert layers["2"]["l0"] > 0 and layers["2"]["fve"] > 0  # trained as ever
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in records if r["kind"] == "train" and r["layer"] == 0]
    assert all(math.isfinite(v) for r in records for v in r.values() if isinstance(v, float))

    # the index and the adapter agree: the unchanged layer's features never fire, and the changed
    # layer's fire where the plain activation is positive and the feature has a decoder row
    aset = load_adapters(tmp_path / "run")
    assert not aset.adapters[0].W_dec.any() and aset.adapters[0].loss_scale.item() == 1.0
    index = tmp_path / "run.duckdb"
    index_adapters(Store.open(url), load_index_adapters(tmp_path / "run"), index)
    with duckdb.connect(str(index), read_only=True) as con:
        counts = dict(con.execute("SELECT layer * 1000 + feature, count(*) FROM activations GROUP BY ALL").fetchall())
    store = Store.open(url)
    x = store.read(2, "x", 0, store.n_rows, torch.float32)
    a = aset.adapters[2]
    fired = (x @ a.W_enc + a.b_enc > 0) & a.W_dec.ne(0).any(1)
    want = {2000 + f: int(n) for f, n in enumerate(fired.sum(0)) if n}
    assert counts == want


def test_base_equal_to_target_ends_cleanly(tmp_path):
    url = str(tmp_path / "store")
    make_synthetic_store(url, SyntheticSpec(**{**SPEC.__dict__, "unchanged": SPEC.layers}))
    summary = train(_cfg(url, tmp_path / "run", epochs=0.5))
    for layer in summary["members"]["l1-0.5"]["layers"].values():
        assert layer["unchanged"] and (layer["fve"], layer["nmse"], layer["l0"]) == (1.0, 0.0, 0.0)


def _weights(path):
    return load_file(str(path / "adapters.safetensors"))


def test_sweep_members_equal_separately_trained_runs(store_url, tmp_path):
    train(_cfg(store_url, tmp_path / "sweep", l1=[0.05, 0.2], epochs=0.5))
    train(_cfg(store_url, tmp_path / "alone", l1=[0.2], layers="2", epochs=0.5))
    swept, alone = _weights(tmp_path / "sweep" / "l1-0.2"), _weights(tmp_path / "alone")
    assert set(alone) < set(swept)
    for name, t in alone.items():
        assert torch.equal(t, swept[name]), name
    other = _weights(tmp_path / "sweep" / "l1-0.05")
    assert not torch.equal(other["layers.2.W_dec"], swept["layers.2.W_dec"])


@pytest.mark.parametrize("activation, crossover", [("relu", None), ("batchtopk", None), ("relu", 1.0)],
                         ids=["relu", "batchtopk", "relu-sparse"])
def test_killed_and_resumed_run_ends_with_the_same_weights(store_url, tmp_path, monkeypatch, activation, crossover):
    kernel_paths = []
    if crossover is not None:
        # a crossover no density exceeds: ReLU trains through the sparse kernels from its second
        # step on, so the kill falls where the gate's measured density decides the path
        monkeypatch.setattr(adapter_module, "DensityGate", functools.partial(DensityGate, crossover=crossover))

        def recording(*args, **kwargs):
            out = sparse_adapter(*args, **kwargs)
            kernel_paths.append(out.path)
            return out

        monkeypatch.setattr(adapter_module, "sparse_adapter", recording)
    kw = dict(activation=activation, k=[4], epochs=2.0, checkpoint_every=3, dead_after_tokens=256)
    whole = train(_cfg(store_url, tmp_path / "whole", **kw))

    def kill(step):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(store_url, tmp_path / "killed", **kw), on_step=kill)
    assert json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())["step"] == 6
    kernel_paths.clear()
    resumed = train(TrainConfig(store=store_url, out=str(tmp_path / "killed"), resume=True))
    if crossover is not None:  # every resumed step, the first included, took the sparse kernels
        total = json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())["step"]
        assert kernel_paths == ["torch"] * (total - 6) * len(whole["members"]) * len(SPEC.layers)
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed["members"] == {k: v | {"path": str(tmp_path / "killed")} for k, v in whole["members"].items()}
    records = lambda p: [{k: v for k, v in json.loads(line).items()} for line in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert records(tmp_path / "whole") == records(tmp_path / "killed")


# ---- the commands --------------------------------------------------------------------------------


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_train_and_plot_commands(store_url, tmp_path):
    out = tmp_path / "cli"
    res = _run("train", "--store", store_url, "--out", out, "--features", 16, "--batch", 128, "--epochs", 0.5,
               "--layers", "0", "--k", "3,5", "--activation", "topk", "--holdout-frac", 0.2, "--device", "cpu")
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["members"]) == {"k-3", "k-5"}
    assert load_adapters(out / "k-5").config.k == 5
    res = _run("plot", out, "-o", tmp_path / "curves.png")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_gets_one_sentence(store_url, tmp_path):
    base = ["train", "--store", store_url, "--features", 16, "--batch", 128, "--holdout-frac", 0.2]
    cases = {
        "layer 5 is out of range": [*base, "--out", tmp_path / "a", "--layers", "5"],
        "is not a comma list": [*base, "--out", tmp_path / "b", "--l1", "0.1,abc"],
        "too little data": [*base[:-2], "--holdout-frac", 0.0001, "--out", tmp_path / "c"],
        "no checkpoint to resume": [*base, "--out", tmp_path / "d", "--resume"],
    }
    for needle, args in cases.items():
        res = _run(*args)
        assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1


def test_resume_refuses_a_store_of_other_models(store_url, tmp_path):
    def kill(step):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(store_url, tmp_path / "run", checkpoint_every=1), on_step=kill)
    other = str(tmp_path / "other")
    make_synthetic_store(other, SyntheticSpec(**{**SPEC.__dict__, "seed": 5}))
    res = _run("train", "--store", other, "--out", tmp_path / "run", "--resume")
    assert res.exit_code == 2 and "other models" in res.output, res.output
    assert Trainer(TrainConfig(store=store_url, out=str(tmp_path / "run"), resume=True)).step == 1


def test_default_sizes_scale_from_the_papers_settings():
    from tca.train.trainer import scaled_defaults

    def sizes(d, rows, **kw):
        c = scaled_defaults(TrainConfig(store="s", out="o", **kw), d, rows)
        return c.features, c.batch, c.lr, c.epochs

    # the paper's 7B width on a large store: its own settings, one pass
    assert sizes(3584, 50_000_000) == (8192, 4096, pytest.approx(8e-4), 1.0)
    # the demo pair: 64 wide, 60k rows -> 57k training rows, 224 rows per 256 steps -> 128;
    # 448 steps an epoch -> 4 passes for 1500 steps; lr 8e-4 * sqrt(8192 / 128) = 6.4e-3
    assert sizes(64, 60_416) == (128, 128, pytest.approx(6.4e-3), 4.0)
    # explicit values are kept, and --tokens leaves epochs unset
    assert sizes(64, 60_416, features=256, batch=32, lr=1e-3, tokens=1000) == (256, 32, 1e-3, None)
