"""Every CPU-heavy command runs with a fixed, stated number of torch threads and records it (tca.cache.threads)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

import tca.cache.harvest as harvest_module
from tca import TcaError
from tca.adapted.attribute import AttributionConfig
from tca.adapted.config import RefineConfig
from tca.adapted.evaluate import EvalConfig, evaluate
from tca.adapted.intervene import InterventionConfig
from tca.cache.harvest import HarvestConfig, harvest
from tca.cache.plan import PlanConfig
from tca.cache.store import Store
from tca.cache.threads import DEFAULT_THREADS, torch_threads
from tca.cli import main
from tca.query.index import IndexConfig, build_index
from tca.query.study import StudyConfig
from tca.toy.demo import DemoConfig
from tca.train.trainer import TrainConfig, train

COMMANDS = {
    ("harvest",): HarvestConfig, ("train",): TrainConfig, ("refine",): RefineConfig, ("eval",): EvalConfig,
    ("intervene",): InterventionConfig, ("attribute",): AttributionConfig, ("study", "hesitation"): StudyConfig,
    ("index",): IndexConfig, ("demo",): DemoConfig,
}
"""The CPU-heavy commands and their configs."""


def test_every_cpu_heavy_command_states_one_fixed_default():
    assert DEFAULT_THREADS == 1
    for path, cls in COMMANDS.items():
        threads = next(f for f in dataclasses.fields(cls) if f.name == "threads")
        assert threads.default == DEFAULT_THREADS, cls
        res = CliRunner().invoke(main, [*path, "--help"], terminal_width=200)
        assert res.exit_code == 0 and "--threads INTEGER" in res.output and "[default: 1]" in res.output, path
    with pytest.raises(TcaError, match="--threads"):
        TrainConfig(store="s", out="o", threads=0)


def test_the_demo_help_says_its_figures_are_cpu_seconds():
    res = CliRunner().invoke(main, ["demo", "--help"], terminal_width=200)
    assert "CPU seconds" in " ".join(res.output.split())


def test_torch_threads_applies_and_restores_even_on_error():
    torch.set_num_threads(2)
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(KeyError), torch_threads(1):
        raise KeyError
    assert torch.get_num_threads() == 2


def test_commands_run_with_their_threads_and_record_them(tiny_pair, tiny_data, tmp_path, monkeypatch):
    base, target = map(str, tiny_pair)
    torch.set_num_threads(2)  # the caller's setting, which each command overrides and restores
    seen = []
    forward = harvest_module.mlp_inputs
    monkeypatch.setattr(harvest_module, "mlp_inputs",
                        lambda *a, **k: seen.append(torch.get_num_threads()) or forward(*a, **k))
    harvest(HarvestConfig(base=base, target=target, out=str(tmp_path / "store"), device="cpu",
                          plan=PlanConfig(data=str(tiny_data)), threads=1))
    assert seen and set(seen) == {1} and torch.get_num_threads() == 2
    assert Store.open(str(tmp_path / "store")).spec.attrs["threads"] == 1

    steps = []
    train(TrainConfig(store=str(tmp_path / "store"), out=str(tmp_path / "run"), features=32, batch=64, tokens=256,
                      holdout_frac=0.2, device="cpu", threads=1),
          on_step=lambda step: steps.append(torch.get_num_threads()))
    assert steps and set(steps) == {1} and torch.get_num_threads() == 2
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["threads"] == 1
    recorded = json.loads((tmp_path / "run" / "adapters.json").read_text())
    assert '"threads": 1' in json.dumps(recorded)  # the run's settings beside the adapters

    index = build_index(IndexConfig(store=str(tmp_path / "store"), adapters=[str(tmp_path / "run")],
                                    out=tmp_path / "index.duckdb", threads=1))
    assert index.threads == 1 and torch.get_num_threads() == 2

    report = evaluate(EvalConfig(adapters=str(tmp_path / "run"), base=base, target=target, data=str(tiny_data),
                                 max_tokens=64, device="cpu", threads=1))
    assert report.threads == 1 and torch.get_num_threads() == 2
