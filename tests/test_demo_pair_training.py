"""Acceptance: the default ReLU adapters on a harvest of the demo pair (issue 5).

The held-out figures are recomputed here from the saved adapter tensors and the store's
held-out rows with plain torch, then compared with what the trainer wrote to summary.json.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tca.cache.store import Store
from tca.train.loader import holdout_docs, row_docs

pytestmark = pytest.mark.slow


def held_out_rows(store: Store, holdout_frac: float, seed: int) -> np.ndarray:
    """Rows of the documents the trainer's split holds out (the split is defined by document id)."""
    return np.flatnonzero(holdout_docs(row_docs(store), holdout_frac, seed))


def reference_figures(x: torch.Tensor, delta: torch.Tensor, w: dict[str, torch.Tensor]) -> dict[str, float]:
    """FVE of delta and L0 of a ReLU adapter, float64, straight from the definitions."""
    acts = torch.relu(x @ w["W_enc"] + w["b_enc"])
    pred = acts @ w["W_dec"] + w.get("b_dec", torch.zeros(delta.shape[-1], dtype=delta.dtype))
    residual = (pred - delta).square().sum()
    variance = (delta - delta.mean(0)).square().sum()
    return {"fve": 1 - (residual / variance).item(), "l0": (acts > 0).sum(-1).double().mean().item()}


def test_default_relu_adapters_reach_the_paper_range(demo_run):
    config = json.loads((demo_run.adapters / "adapters.json").read_text())
    settings = config["train"]
    assert config["adapter"]["activation"] == "relu" and settings["drop_outliers"] is None
    # the defaults scaled to a 60k-token store of width 64 (docs/train.md, Calibration)
    assert (settings["features"], settings["batch"], settings["epochs"]) == (128, 128, 4.0)
    tensors = load_file(str(demo_run.adapters / "adapters.safetensors"))
    summary = json.loads((demo_run.adapters / "summary.json").read_text())
    (member,) = summary["members"].values()

    store = Store.open(str(demo_run.store))
    rows = held_out_rows(store, settings["holdout_frac"], settings["seed"])
    assert 0 < len(rows) <= settings["eval_rows"]  # the trainer evaluated on exactly these rows
    assert config["layers"] == store.layers == list(range(4))
    for layer in store.layers:
        x = store.read(layer, "x", 0, store.n_rows)[rows].double()
        delta = store.read(layer, "delta", 0, store.n_rows)[rows].double()
        w = {k.split(".")[-1]: v.double() for k, v in tensors.items() if k.startswith(f"layers.{layer}.")}
        ours = reference_figures(x, delta, w)
        theirs = member["layers"][str(layer)]
        assert theirs["rows"] == len(rows)
        assert ours["fve"] == pytest.approx(theirs["fve"], abs=2e-3), layer
        assert ours["l0"] == pytest.approx(theirs["l0"], abs=0.05), layer
        assert ours["fve"] >= 0.8, f"layer {layer}: held-out FVE {ours['fve']:.3f} at L0 {ours['l0']:.1f}"
        assert 0.1 <= ours["l0"] <= 10, f"layer {layer}: held-out L0 {ours['l0']:.1f} at FVE {ours['fve']:.3f}"
